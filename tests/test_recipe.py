"""Recipe parsing: typed values, overrides, and one-line errors that name the key."""

from pathlib import Path

import pytest
import yaml

from nrt_mlx.errors import NrtError
from nrt_mlx.recipe import Recipe, load_recipe, save_recipe

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
