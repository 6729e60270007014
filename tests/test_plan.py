"""The memory plan (nrt_mlx.plan): every recipe plans from a config.json alone, the plan is within
20 % of mx.get_peak_memory() on real tiny-model runs, and train refuses a run that cannot fit."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import tiny_recipe, write_recipe
from typer.testing import CliRunner

from nrt_mlx.cli import app
from nrt_mlx.errors import NrtError
from nrt_mlx.export.default_model import fetch_default_gguf
from nrt_mlx.plan import GB, check_fits, make_plan, model_shape, read_shape, render
from nrt_mlx.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent

# The published config.json values (Hugging Face model repos) of the recipes' models.
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16"}
CONFIGS = {
    "meta-llama/Llama-3.1-8B": {
        **LLAMA,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
    },
    "meta-llama/Llama-3.2-3B": {
        **LLAMA,
        "hidden_size": 3072,
        "head_dim": 128,
        "intermediate_size": 8192,
        "num_attention_heads": 24,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
    },
    "mistralai/Mistral-7B-v0.3": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "torch_dtype": "bfloat16",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32768,
        "tie_word_embeddings": False,
        "rope_theta": 1000000.0,
    },
}
PEAK = re.compile(r"^peak: \d+\.\d\d GB$")


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("configs")
    out = {}
    for repo, config in CONFIGS.items():
        out[repo] = folder / f"{repo.split('/')[1]}.json"
        out[repo].write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def default_model() -> Path:
    """The quickstart's model, fetched and converted once if this machine has not yet (as
    ``nrt-mlx quickstart`` does), so that recipes without model.path plan it."""
    from nrt_mlx.export.default_model import default_model_dir

    return default_model_dir()


@pytest.mark.parametrize(
    "recipe", sorted(p.relative_to(REPO) for p in (REPO / "recipes").rglob("*.yaml")), ids=str
)
def test_every_recipe_plans(recipe, configs, default_model):
    path = yaml.safe_load((REPO / recipe).read_text())["model"]["path"]
    args = ["plan", str(REPO / recipe), "--backend", "metal"]
    if path:  # no model.path (quickstart, reference) plans the cached default model
        args += ["--config", str(configs[path])]
    code, out = cli(*args)
    assert code == 0, out
    lines = out.strip().splitlines()
    assert PEAK.match(lines[-1]), lines[-1]
    for term in ("weights", "AdamW state", "layer activations", "logits"):
        assert any(line.strip().startswith(term) for line in lines), term


def test_weights_follow_the_resolved_quantization(configs):
    recipe = load_recipe(REPO / "recipes" / "llama-3.1-8b-nrt.yaml")
    shape = read_shape(configs["meta-llama/Llama-3.1-8B"])
    metal = make_plan(recipe, shape, "metal", memory=1e12).resident["weights"] / GB
    recipe.model.quantize = "auto"
    cpu = make_plan(recipe, shape, "cpu", memory=1e12).resident["weights"] / GB
    # 8.0B parameters: 4-bit linears + a bf16 embedding on Metal; dense fp32 on the CPU backend.
    assert 4.5 < metal < 6.0
    assert 31 < cpu < 33


def test_plan_within_20_percent_of_measured_on_the_tiny_model(tiny_model_dir, tmp_path):
    """Real 2-step runs, each in its own process (scripts/plan_memory.py --one)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from plan_memory import recipe_for

    for settings in (
        {"rollout.samples": 2, "rollout.max_think_tokens": 16},
        {"rollout.samples": 4, "rollout.max_think_tokens": 32, "train.grad_checkpoint": True},
        {"rollout.samples": 4, "rollout.max_think_tokens": 32, "train.micro_batch_questions": 1},
    ):
        out = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "plan_memory.py"), "--one",
             str(tiny_model_dir), json.dumps(settings)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        measured = float(out.stdout.strip().splitlines()[-1].split()[0])
        recipe = recipe_for(tiny_model_dir, tmp_path / "plan" / "run", settings)
        planned = make_plan(recipe, read_shape(tiny_model_dir), "cpu", memory=1e12).peak
        assert abs(planned - measured) <= 0.2 * measured, (settings, planned, measured)


def test_a_run_that_cannot_fit_is_refused_before_loading(tiny_model_dir, tmp_path):
    big = {
        "rollout": {"samples": 64, "max_think_tokens": 8192},
        "train": {"questions_per_step": 256},
    }
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_model_dir, **big))
    code, out = cli("train", str(path), "--quiet")
    assert code == 2
    assert "does not fit in memory" in out and "train.memory_check: false" in out
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
    recipe = load_recipe(path, ["train.memory_check=false"])
    check_fits(recipe)  # the override turns the check off


def test_the_suggestion_is_the_smallest_change_that_fits(tiny_model_dir, tmp_path):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, tiny_model_dir))
    recipe = load_recipe(path, ["rollout.samples=4", "rollout.max_think_tokens=64"])
    shape = read_shape(tiny_model_dir)
    full = make_plan(recipe, shape, "cpu", memory=1e12)
    recipe.train.grad_checkpoint = True
    checkpointed = make_plan(recipe, shape, "cpu", memory=1e12)
    recipe.train.grad_checkpoint = False
    assert checkpointed.peak < full.peak
    between = make_plan(recipe, shape, "cpu", memory=(full.peak + checkpointed.peak) / 2)
    text = render(recipe, between)
    assert "does not fit" in text and "--set train.grad_checkpoint=true fits it" in text
    assert PEAK.match(text.splitlines()[-1])


def test_no_config_at_hand_is_a_one_line_error(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "llama-3.1-8b-nrt.yaml")
    recipe.model.path = "nobody/not-downloaded-model"
    with pytest.raises(NrtError, match="--config") as err:
        model_shape(recipe)
    assert "\n" not in str(err.value)
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(NrtError, match="num_attention_heads"):
        read_shape(bad)


def test_an_empty_model_path_plans_the_default_model(tmp_path, monkeypatch):
    from nrt_mlx.export.default_model import CACHE_ENV, GGUF_NAME

    gguf = fetch_default_gguf()
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    assert recipe.model.path == ""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))  # nothing cached: one line naming --config
    with pytest.raises(NrtError, match="--config") as err:
        model_shape(recipe)
    assert "\n" not in str(err.value) and not any(tmp_path.iterdir())  # nothing downloaded
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / GGUF_NAME).symlink_to(gguf)  # only the GGUF: read as it is converted
    shape = model_shape(recipe)
    assert (shape.layers, shape.hidden, shape.bits, shape.dtype_bytes) == (30, 576, None, 4)


def test_a_gguf_file_plans_from_its_metadata():
    shape = read_shape(fetch_default_gguf())
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads) == (30, 576, 9, 3)
    assert (shape.vocab, shape.tied, shape.bits) == (49152, True, 4)
