"""mlx-lm LoRA configs imported as recipes: the real key set, every key accounted for, and a run
trained from one with ``nrt-mlx train --config``."""

import ast
import json
from pathlib import Path

import mlx_lm
import pytest
import yaml
from helpers import DATA, run_cli

from nrt_mlx.errors import NrtError
from nrt_mlx.mlxlm_config import (
    MLXLM_KEYS,
    import_mlxlm_config,
    is_mlxlm_config,
    recipe_from_mlxlm,
)
from nrt_mlx.recipe import recipe_from_dict

# mlx-lm's examples/lora_config.yaml (ml-explore/mlx-lm), comments dropped, schedule uncommented.
EXAMPLE = """
model: "mlx_model"
train: true
fine_tune_type: lora
training_mode: normal
optimizer: adamw
data: "/path/to/training/data"
seed: 0
num_layers: 16
batch_size: 4
iters: 1000
val_batches: 25
learning_rate: 1e-5
steps_per_report: 10
steps_per_eval: 200
resume_adapter_file: null
adapter_path: "adapters"
save_every: 100
test: false
test_batches: 100
max_seq_length: 2048
grad_checkpoint: false
lora_parameters:
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 8
  scale: 20.0
  dropout: 0.0
lr_schedule:
  name: cosine_decay
  warmup: 100
  warmup_init: 1e-7
  arguments: [1e-5, 1000, 1e-7]
"""


def mlx_lm_config_defaults() -> dict:
    """CONFIG_DEFAULTS of the installed mlx_lm/lora.py, read without importing the module (its
    import changes PyYAML's SafeLoader for the whole process)."""
    source = (Path(mlx_lm.__file__).parent / "lora.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CONFIG_DEFAULTS":
            return ast.literal_eval(node.value)
    raise AssertionError("CONFIG_DEFAULTS not found in mlx_lm/lora.py")


def notes_by_key(notes) -> dict:
    return {n.key: n for n in notes}


def test_the_example_config_maps_key_by_key(tmp_path):
    config = yaml.safe_load(EXAMPLE)
    recipe, notes = recipe_from_mlxlm(config)
    assert recipe["model"] == {"path": "mlx_model"}
    assert recipe["lora"] == {
        "type": "lora",
        "layers": 16,
        "keys": ["self_attn.q_proj", "self_attn.v_proj"],
        "rank": 8,
        "scale": 20.0,
        "dropout": 0.0,
    }
    t = recipe["train"]
    assert (t["method"], t["steps"], t["questions_per_step"], t["seed"]) == ("nrt", 1000, 4, 0)
    o = recipe["optimizer"]
    assert o["schedule"] == "cosine" and o["learning_rate"] == pytest.approx(1e-5)
    assert o["min_lr_ratio"] == pytest.approx(0.01) and o["warmup_ratio"] == pytest.approx(0.1)
    assert recipe["run"] == {"dir": "adapters", "save_every": 100, "log_every": 10}
    # Not a local folder: a Hub dataset, as mlx-lm reads it; no valid split, so no evaluation.
    assert recipe["data"]["train"] == "hf:/path/to/training/data:train"
    assert "eval_every" not in t
    # Every key of the config has a note; those not mapped say why.
    by_key = notes_by_key(notes)
    assert set(config) <= {k.split(".")[0] for k in by_key}
    unmapped = {n.key for n in notes if not n.mapped}
    assert {"training_mode", "train", "test", "test_batches", "resume_adapter_file"} <= unmapped
    assert {"steps_per_eval", "val_batches", "lr_schedule.warmup_init", "learning_rate"} <= unmapped
    assert "mlx-lm ignores learning_rate" in by_key["learning_rate"].text
    # decay_steps 1000 after 100 warm-up updates: nrt-mlx decays over the other 900 steps.
    assert "decay_steps 1000 is not used" in by_key["lr_schedule.arguments[1]"].text
    assert "900 steps" in by_key["lr_schedule.arguments[1]"].text
    assert "train.method: nrt" in by_key["(method)"].text
    assert not by_key["lora_parameters.rank"].text.startswith("not")
    recipe_from_dict(recipe, "mapped")  # a valid recipe


def test_every_key_mlx_lm_defines_is_known_and_accounted_for():
    defaults = mlx_lm_config_defaults()
    assert set(defaults) <= MLXLM_KEYS  # a key mlx-lm adds fails here first
    recipe, notes = recipe_from_mlxlm(defaults)
    assert set(defaults) <= {n.key.split(".")[0] for n in notes}
    assert recipe["lora"]["rank"] == defaults["lora_parameters"]["rank"]
    # mlx-lm's default optimizer is Adam: AdamW without weight decay; no schedule: constant rate.
    assert recipe["optimizer"]["weight_decay"] == 0.0
    assert recipe["optimizer"]["schedule"] == "constant"
    assert recipe["optimizer"]["warmup_ratio"] == 0.0
    recipe_from_dict(recipe, "defaults")


def test_other_spellings_and_what_has_no_counterpart(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("train", "valid", "test"):
        (folder / f"{name}.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    config = {
        "data": str(folder),
        "lora_parameters": {"rank": 4, "alpha": 16, "dropout": 0.1, "init": "gaussian"},
        "iters": 100,
        "batch_size": 2,
        "grad_accumulation_steps": 4,
        "steps_per_eval": 10,
        "val_batches": -1,
        "optimizer": "sgd",
        "optimizer_config": {"sgd": {"momentum": 0.9}},
        "lr_schedule": {"name": "exponential_decay", "arguments": [1e-4, 0.99]},
        "fine_tune_type": "full",
        "report_to": "wandb,swanlab",
        "project_name": "mine",
        "interations": 5,
    }
    recipe, notes = recipe_from_mlxlm(config)
    by_key = notes_by_key(notes)
    # The folder, for nrt-mlx's folder reader; valid.jsonl there turns on evaluation.
    assert recipe["data"] == {"train": str(folder), "valid": str(folder)}
    assert recipe["train"]["eval_every"] == 10 and recipe["train"]["eval_questions"] == 0
    assert "nrt-mlx eval --data" in by_key["data"].text  # test.jsonl
    assert recipe["lora"]["scale"] == pytest.approx(16 / 4)  # PEFT's alpha / rank
    assert not by_key["lora_parameters.init"].mapped
    # Gradient accumulation: one step = one update over batch x accumulation questions.
    t = recipe["train"]
    assert (t["steps"], t["questions_per_step"], t["micro_batch_questions"]) == (25, 8, 2)
    assert not by_key["optimizer"].mapped and not by_key["optimizer_config.sgd"].mapped
    assert not by_key["lr_schedule"].mapped and recipe["optimizer"]["schedule"] == "constant"
    assert recipe["lora"]["type"] == "lora" and "LoRA/DoRA" in by_key["fine_tune_type"].text
    assert recipe["train"]["report_to"] == ["wandb"] and not by_key["report_to.swanlab"].mapped
    assert recipe["train"]["report_project"] == "mine"
    assert "check its spelling" in by_key["interations"].text
    recipe_from_dict(recipe, "mapped")
    with pytest.raises(NrtError, match="iters: expected a number"):
        recipe_from_mlxlm({"iters": "many"})


def test_mlx_lm_configs_are_told_from_recipes():
    assert is_mlxlm_config(yaml.safe_load(EXAMPLE))
    assert is_mlxlm_config({"model": "some/model", "data": "dir"})
    root = Path(__file__).resolve().parent.parent / "recipes"
    for path in (root / "reference.yaml", root / "quickstart.yaml"):
        assert not is_mlxlm_config(yaml.safe_load(path.read_text())), path
    # A recipe with a misspelt section stays a recipe, so its error names the section.
    assert not is_mlxlm_config({"modle": {"path": "x"}, "train": {"steps": 2}})


def test_train_from_an_mlx_lm_config(tmp_path, monkeypatch, capsys, tiny_model_dir):
    """mlx_lm.lora's config, relative paths from the working folder, trained by nrt-mlx."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text((DATA / "train.jsonl").read_text())
    config = {
        "model": str(tiny_model_dir),
        "train": True,
        "data": "data",
        "num_layers": 2,
        "batch_size": 2,
        "iters": 2,
        "learning_rate": 1e-3,
        "adapter_path": "my_adapters",
        "max_seq_length": 160,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0},
        "test": False,
        "clear_cache_threshold": 0,
    }
    (tmp_path / "lora_config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    small = ["--set", "rollout.samples=2", "--set", "run.save_every=2"]
    code, out, err = run_cli(
        monkeypatch, capsys, "train", "--config", "lora_config.yaml", "-q", *small
    )
    assert code == 0, err
    assert "an mlx-lm LoRA config; the recipe made from it" in out
    assert f"{tmp_path / 'my_adapters' / 'recipe.yaml'}" in out
    assert "not mapped:" in out and "clear_cache_threshold:" in out
    run = tmp_path / "my_adapters"
    assert (run / "adapters" / "adapters.safetensors").is_file()
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["train"]["steps"] == 2 and saved["lora"]["rank"] == 4
    assert saved["data"]["train"] == str(data)  # resolved from the working folder
    assert saved["data"]["max_prompt_tokens"] + saved["data"]["max_answer_tokens"] < 160
    adapter = json.loads((run / "adapters" / "adapter_config.json").read_text())
    assert adapter["num_layers"] == 2 and adapter["lora_parameters"]["scale"] == 10.0
    # Given as the recipe argument, the config is recognised; --print-recipe stops before training.
    code, out, err = run_cli(
        monkeypatch, capsys, "train", "lora_config.yaml", "--print-recipe", "--set", "run.dir=b"
    )
    assert code == 0, err
    assert "mlx-lm LoRA config" in out and not (tmp_path / "b").exists()
    full = yaml.safe_load(out[out.index("\nmodel:\n") + 1 :])  # the resolved recipe, unindented
    assert full["run"]["dir"] == str(tmp_path / "b") and full["train"]["steps"] == 2


def test_bad_configs_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "train", "--config", "missing.yaml")
    assert code == 2 and err.strip() == "error: missing.yaml: recipe file not found"
    (tmp_path / "bad.yaml").write_text("model: x\nlora_parameters: [1, 2]\n")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--config", "bad.yaml")
    assert code == 2 and "lora_parameters must be a mapping" in err and len(err.splitlines()) == 1
    code, _, err = run_cli(monkeypatch, capsys, "train", "x.yaml", "--config", "bad.yaml")
    assert code == 2 and "not both" in err
    with pytest.raises(NrtError, match="config file not found"):
        import_mlxlm_config(tmp_path / "none.yaml")


def test_decay_steps_that_match_and_zero_iters_are_said():
    schedule = {"name": "cosine_decay", "warmup": 10, "arguments": [1e-4, 90, 0.0]}
    _, notes = recipe_from_mlxlm({"iters": 100, "lr_schedule": schedule})
    assert "lr_schedule.arguments[1]" not in notes_by_key(notes)  # 10 + 90 = iters: the same
    recipe, notes = recipe_from_mlxlm({"iters": 0})
    assert recipe["train"]["steps"] == 1
    assert "iters 0 makes no update" in notes_by_key(notes)["iters"].text
