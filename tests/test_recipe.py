"""Recipe parsing: typed values, overrides, and one-line errors that name the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nrt_mlx.errors import NrtError
from nrt_mlx.recipe import (
    RESUME_FIXED,
    ModelConfig,
    Recipe,
    flat_keys,
    load_recipe,
    resume_overrides,
    save_recipe,
    with_remote_code,
)

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_reference_recipe_documents_every_key_and_loads():
    data = yaml.safe_load((REPO / "recipes" / "reference.yaml").read_text())
    recipe = Recipe()
    assert set(data) == set(recipe.to_dict())
    for section, keys in recipe.to_dict().items():
        assert set(data[section]) == set(keys), section
    text = (REPO / "recipes" / "reference.yaml").read_text()
    for keys in recipe.to_dict().values():
        for key in keys:  # every key has a comment on its line or a section comment
            line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"{key}:"))
            assert "#" in line or key in (
                "question_field",
                "answer_field",
                "prompt_field",
                "completion_field",
                "messages_field",
                "trust_remote_code",
                "temperature",
                "top_p",
                "rank",
                "dropout",
                "eps",
                "weight_decay",
                "betas",
                "learning_rate",
                "clip_ratio_high",
                "steps",
                "group_size",
            ), key
    load_recipe(REPO / "recipes" / "reference.yaml")


def test_values_are_typed_and_overrides_apply(tmp_path):
    p = write(
        tmp_path, "train:\n  steps: 5\noptimizer:\n  learning_rate: 3e-4\nmodel:\n  quantize: 4\n"
    )
    r = load_recipe(p, ["train.steps=7", "rollout.temperature=0.5", "lora.keys=[self_attn.q_proj]"])
    assert r.train.steps == 7
    assert r.optimizer.learning_rate == pytest.approx(3e-4)
    assert r.model.quantize == 4
    assert r.rollout.temperature == 0.5
    assert r.lora.keys == ["self_attn.q_proj"]
    # A value YAML would read as a mapping, or not at all, is the text as given.
    r = load_recipe(p, ["rollout.marker=Answer:", "data.system_prompt=Be: brief: [x"])
    assert r.rollout.marker == "Answer:" and r.data.system_prompt == "Be: brief: [x"


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("train:\n  stpes: 3\n", [], "did you mean 'steps'"),
        ("trian:\n  steps: 3\n", [], "did you mean 'train'"),
        ("", ["rollout.sample=3"], "did you mean 'samples'"),
        ("train:\n  steps: many\n", [], "train.steps: expected an integer"),
        ("objective:\n  aggregator: mean\n", [], "valid: log_prob, prob"),
        ("model:\n  quantize: 5bit\n", [], "model.quantize"),
        ("train:\n  method: dpo\n", [], "'nrt', 'sft'"),
        ("train:\n  steps: 3: 4\n", [], "line 2"),
        ("", ["steps=3"], "expected section.key=value"),
        ("", ["objective.normalizer=-5"], "objective.normalizer must be >= 0"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, text, overrides, expected):
    p = write(tmp_path, text)
    with pytest.raises(NrtError) as err:
        load_recipe(p, overrides)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(NrtError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_saved_recipe_round_trips(tmp_path):
    r = load_recipe(write(tmp_path, "train:\n  steps: 9\nlora:\n  type: dora\n"))
    save_recipe(r, tmp_path / "out" / "recipe.yaml")
    again = load_recipe(tmp_path / "out" / "recipe.yaml")
    assert again == r


def test_every_shipped_recipe_passes_the_range_checks():
    paths = sorted((REPO / "recipes").rglob("*.yaml"))
    assert len(paths) > 10
    for path in paths:
        load_recipe(path)


def test_the_resume_policy_is_documented_key_by_key():
    text = (REPO / "recipes" / "reference.yaml").read_text()
    header = text.split("\nmodel:")[0]
    flat = flat_keys(Recipe())
    for key in RESUME_FIXED:
        assert key in header, key
        assert key in flat or key == "run.overrides", key


def test_resume_overrides_refuse_fixed_keys_and_record_the_rest():
    saved = Recipe()
    changed = Recipe()
    changed.train.steps, changed.lora.dropout = 300, 0.1
    assert resume_overrides(saved, changed, 101) == [
        {"from_step": 101, "key": "lora.dropout", "value": 0.1, "was": 0.0},
        {"from_step": 101, "key": "train.steps", "value": 300, "was": 100},
    ]
    assert resume_overrides(saved, Recipe(), 5) == []
    changed.lora.rank = 8
    with pytest.raises(NrtError, match=r"--set lora.rank: cannot change when resuming \(16 -> 8\)"):
        resume_overrides(saved, changed, 101)


def test_with_remote_code_takes_the_flag_only():
    asked = ModelConfig(path="owner/model", trust_remote_code=True)
    with pytest.raises(NrtError, match="only the --trust-remote-code flag"):
        with_remote_code(asked, False, "r.yaml")
    assert with_remote_code(asked, True, "r.yaml").trust_remote_code is True
    assert with_remote_code(ModelConfig(), True, "r.yaml").trust_remote_code is True
    assert with_remote_code(ModelConfig(), False, "r.yaml").trust_remote_code is False
    assert asked.trust_remote_code is True  # a copy: the recipe itself is unchanged


def test_paths_become_absolute_file_relative_first_then_working_folder(tmp_path, monkeypatch):
    (tmp_path / "recipes" / "data").mkdir(parents=True)
    (tmp_path / "recipes" / "data" / "train.jsonl").write_text("{}\n")  # beside the recipe
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "valid.jsonl").write_text("{}\n")  # in the working folder only
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text("data:\n  train: data/train.jsonl\n  valid: data/valid.jsonl\n")
    monkeypatch.chdir(tmp_path)
    r = load_recipe(path)
    assert r.data.train == str(tmp_path / "recipes" / "data" / "train.jsonl")
    assert r.data.valid == str(tmp_path / "data" / "valid.jsonl")
    # --set paths are the working folder's; a Hub id or a missing file stays as given.
    r = load_recipe(path, ["data.train=data/train.jsonl", "model.path=owner/model"])
    assert r.data.train == str(tmp_path / "data" / "train.jsonl")
    assert r.model.path == "owner/model"
    assert load_recipe(path, ["data.valid=nowhere.jsonl"]).data.valid == "nowhere.jsonl"


def test_a_saved_run_without_overrides_loads_with_none(tmp_path):
    data = Recipe().to_dict()
    del data["run"]["overrides"]  # a run of an earlier version
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    assert load_recipe(tmp_path / "recipe.yaml", saved_run=True).run.overrides == []
    data["run"]["overrides"] = ["train.steps=5"]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(NrtError, match=r"run.overrides\[0\] must be a mapping"):
        load_recipe(tmp_path / "recipe.yaml")


def test_loading_a_recipe_imports_no_mlx_lm():
    # A recipe is read and validated by commands that never load a model (plan, check, completion).
    code = (
        "import sys\n"
        "from nrt_mlx.recipe import load_recipe\n"
        f"load_recipe({str(REPO / 'recipes' / 'quickstart.yaml')!r})\n"
        "assert 'mlx_lm' not in sys.modules, 'mlx_lm imported'\n"
        "assert 'nrt_mlx.evaluate' not in sys.modules, 'evaluate imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_aggregator_names_are_the_objectives():
    from nrt_mlx.objective import AGGREGATORS
    from nrt_mlx.recipe import AGGREGATOR_NAMES

    assert set(AGGREGATOR_NAMES) == set(AGGREGATORS)
