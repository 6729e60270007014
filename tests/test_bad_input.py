"""Bad input of every kind is one line: exit status 2, ``error: ...`` naming the key or flag and the
fix, never a traceback. In-process (``helpers.run_cli``), plus a few real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from helpers import DATA, run_cli

from nrt_mlx.recipe import Recipe, save_recipe


@dataclass
class Case:
    """``args`` with {placeholders} of ``workspace``; ``recipe``: sections written to {recipe}."""

    id: str
    args: list[str]
    expect: list[str]
    recipe: dict | None = None
    process: bool = False  # run as a real process too (where the process boundary matters)
    extra: list[str] = field(default_factory=list)


def recipe_case(id: str, sections: dict, *expect: str, process: bool = False) -> Case:
    return Case(id, ["train", "{recipe}", "--quiet"], list(expect), sections, process)


def resume_case(id: str, setting: str, *expect: str, run: str = "{run}") -> Case:
    return Case(id, ["train", "--resume", run, "--set", setting], list(expect))


CASES = [
    # ---- ranges checked when the recipe loads ------------------------------------------------
    recipe_case(
        "save_every", {"run": {"save_every": 0}}, "run.save_every", "at least 1", process=True
    ),
    recipe_case(
        "micro_batch", {"train": {"micro_batch_questions": -1}}, "micro_batch_questions", ">= 0"
    ),
    recipe_case("beta_one", {"optimizer": {"betas": [0.9, 1.0]}}, "optimizer.betas[1]", "[0, 1)"),
    recipe_case(
        "beta_negative", {"optimizer": {"betas": [-0.1, 0.9]}}, "optimizer.betas[0]", "[0, 1)"
    ),
    recipe_case(
        "betas_one_number", {"optimizer": {"betas": [0.9]}}, "optimizer.betas", "two numbers"
    ),
    recipe_case(
        "group_size_0",
        {"model": {"quantize": 4, "group_size": 0}},
        "model.group_size",
        "32, 64 or 128",
        process=True,  # mlx dies of SIGFPE on group size 0: no Python error at all
    ),
    recipe_case(
        "group_size_auto", {"model": {"group_size": 48}}, "model.group_size", "32, 64 or 128"
    ),
    recipe_case("quantize_7", {"model": {"quantize": 7}}, "model.quantize", "2, 3, 4, 5, 6, 8"),
    recipe_case("eps", {"optimizer": {"eps": 0}}, "optimizer.eps", "> 0"),
    recipe_case(
        "weight_decay", {"optimizer": {"weight_decay": -0.01}}, "optimizer.weight_decay", ">= 0"
    ),
    recipe_case("grad_clip", {"optimizer": {"grad_clip": -1}}, "optimizer.grad_clip", ">= 0"),
    recipe_case(
        "learning_rate", {"optimizer": {"learning_rate": 0}}, "optimizer.learning_rate", "> 0"
    ),
    recipe_case(
        "min_lr_ratio", {"optimizer": {"min_lr_ratio": 1.5}}, "optimizer.min_lr_ratio", "[0, 1]"
    ),
    recipe_case(
        "keep_checkpoints", {"run": {"keep_checkpoints": -1}}, "run.keep_checkpoints", ">= 0"
    ),
    recipe_case("log_every", {"run": {"log_every": -1}}, "run.log_every", ">= 0"),
    recipe_case("samples_every", {"run": {"samples_every": -2}}, "run.samples_every", ">= 0"),
    recipe_case("run_dir_empty", {"run": {"dir": ""}}, "run.dir", "not empty"),
    recipe_case("eval_every_negative", {"train": {"eval_every": -1}}, "train.eval_every", ">= 0"),
    recipe_case(
        "eval_questions", {"train": {"eval_questions": -1}}, "train.eval_questions", ">= 0 (0: all)"
    ),
    recipe_case("eval_samples", {"train": {"eval_samples": 0}}, "train.eval_samples", "at least 1"),
    recipe_case(
        "collapse_fraction", {"train": {"collapse_fraction": 1.0}}, "collapse_fraction", "(0, 1)"
    ),
    recipe_case("seed", {"train": {"seed": -1}}, "train.seed", "[0, 4294967296)"),
    recipe_case("clip_low", {"objective": {"clip_ratio_low": 1.5}}, "clip_ratio_low", "[0, 1]"),
    recipe_case("clip_high", {"objective": {"clip_ratio_high": -0.1}}, "clip_ratio_high", ">= 0"),
    recipe_case("trace_coef", {"objective": {"trace_coef": -1}}, "objective.trace_coef", ">= 0"),
    recipe_case(
        "format_coef", {"objective": {"format_coef": -0.3}}, "objective.format_coef", ">= 0"
    ),
    recipe_case(
        "max_prompt", {"data": {"max_prompt_tokens": 0}}, "data.max_prompt_tokens", "at least 1"
    ),
    recipe_case(
        "max_answer", {"data": {"max_answer_tokens": 0}}, "data.max_answer_tokens", "at least 1"
    ),
    recipe_case("lora_scale", {"lora": {"scale": 0}}, "lora.scale", "> 0"),
    recipe_case("lora_dropout", {"lora": {"dropout": 1.0}}, "lora.dropout", "[0, 1)"),
    recipe_case(
        "lora_keys_empty", {"lora": {"keys": []}}, "lora.keys", "null for every linear layer"
    ),
    Case(
        "set_save_every", ["train", "{recipe}", "--set", "run.save_every=0"], ["run.save_every"], {}
    ),
    Case(
        "set_broken_list", ["train", "{recipe}", "--set", "lora.keys=[a"], ["lora.keys", "list"], {}
    ),
    recipe_case("broken_list", {"optimizer": {"betas": "[0.9"}}, "optimizer.betas", "[a, b]"),
    # ---- refused at the start of training (before any data or model loads) -------------------
    recipe_case("one_sample", {"rollout": {"samples": 1}}, "rollout.samples is 1", "trace term"),
    recipe_case(
        "eval_without_valid", {"train": {"eval_every": 5}}, "train.eval_every", "data.valid"
    ),
    recipe_case(
        "remote_code_in_recipe",
        {"model": {"trust_remote_code": True}},
        "model.trust_remote_code",
        "--trust-remote-code",
    ),
    # ---- the recipe file itself --------------------------------------------------------------
    Case("recipe_is_a_dir", ["train", "{dir}"], ["is a directory", "YAML file"], process=True),
    Case("recipe_is_a_run", ["train", "{run}"], ["is a directory", "--resume"]),
    Case("recipe_not_utf8", ["train", "{binary}"], ["not UTF-8"]),
    Case("recipe_missing", ["train", "{tmp}/nope.yaml"], ["recipe file not found"]),
    # ---- resume: overrides that would change what the run saved ------------------------------
    resume_case("resume_rank", "lora.rank=8", "lora.rank", "cannot change when resuming", "4 -> 8"),
    resume_case("resume_scale", "lora.scale=2", "lora.scale", "adapter weights"),
    resume_case("resume_model", "model.path=/elsewhere", "model.path", "trained on this base"),
    resume_case("resume_quantize", "model.quantize=4", "model.quantize", "precision"),
    resume_case("resume_method", "train.method=sft", "train.method", "one method"),
    resume_case("resume_aggregator", "objective.aggregator=log_prob", "objective.aggregator"),
    resume_case("resume_marker", "rollout.marker=Answer:", "rollout.marker", "'auto' -> 'Answer:'"),
    resume_case("resume_mini_batches", "train.mini_batches=2", "train.mini_batches", "schedule"),
    resume_case("resume_run_dir", "run.dir=/tmp/x", "run.dir", "stays in its directory"),
    resume_case("resume_remote_code", "model.trust_remote_code=true", "--trust-remote-code"),
    resume_case("resume_fewer_steps", "train.steps=1", "already at step 2", "above 2"),
    resume_case("resume_unknown_key", "train.stepz=9", "did you mean 'steps'"),
    resume_case("resume_one_sample", "rollout.samples=1", "rollout.samples is 1"),
    Case(
        "resume_remote_run",
        ["train", "--resume", "{remote_run}"],
        ["model.trust_remote_code is true", "--trust-remote-code"],
    ),
    # ---- eval / fuse / score -----------------------------------------------------------------
    Case(
        "eval_out_dir",
        ["eval", "--data", "{data}", "--model", "{tmp}/no-model", "--out", "{dir}"],
        ["--out", "is a directory"],
        process=True,
    ),
    Case(
        "eval_out_under_file",
        ["eval", "--data", "{data}", "--model", "{tmp}/no-model", "--out", "{binary}/r.json"],
        ["--out", "is a file, not a directory"],
    ),
    Case(
        "eval_remote_run",
        ["eval", "--adapter", "{remote_run}", "--data", "{data}", "--out", "{tmp}/r.json"],
        ["model.trust_remote_code is true", "--trust-remote-code"],
    ),
    Case(
        "fuse_remote_run",
        ["fuse", "{remote_run}", "{tmp}/fused"],
        ["model.trust_remote_code is true", "--trust-remote-code"],
    ),
    Case(
        "score_remote_run",
        ["score", "--adapter", "{remote_run}", "--question", "q?", "--answer", "a"],
        ["model.trust_remote_code is true", "--trust-remote-code"],
    ),
]


def saved_run(root: Path, **model) -> Path:
    """A run directory as the trainer leaves it after step 2 of 4 (adapter files are stand-ins:
    every case fails before they are read)."""
    recipe = Recipe()
    recipe.model.path = str(root.parent / "no-base")
    recipe.model.quantize = "none"
    for key, value in model.items():
        setattr(recipe.model, key, value)
    recipe.data.train = str(DATA / "train.jsonl")
    recipe.lora.rank = 4
    recipe.train.steps = 4
    recipe.run.dir = str(root)
    save_recipe(recipe, root / "recipe.yaml")
    step = root / "checkpoints" / "step_000002"
    step.mkdir(parents=True)
    (step / "state.json").write_text(json.dumps({"step": 2, "position": 8, "seed": 0}))
    (root / "adapters").mkdir()
    (root / "adapters" / "adapters.safetensors").write_bytes(b"")
    config = {"num_layers": 16, "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0}}
    (root / "adapters" / "adapter_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture
def workspace(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01 not yaml")
    return {
        "tmp": str(tmp_path),
        "recipe": str(tmp_path / "recipe.yaml"),
        "dir": str(tmp_path / "empty"),
        "binary": str(tmp_path / "binary.yaml"),
        "data": str(DATA / "test.jsonl"),
        "run": str(saved_run(tmp_path / "run")),
        "remote_run": str(saved_run(tmp_path / "remote", trust_remote_code=True)),
    }


def prepare_case(case: Case, ws: dict[str, str]) -> list[str]:
    if case.recipe is not None:
        recipe = {
            "model": {"path": f"{ws['tmp']}/no-model"},
            "data": {"train": str(DATA / "train.jsonl")},
            "run": {"dir": f"{ws['tmp']}/new-run"},
        }
        for section, values in case.recipe.items():
            recipe.setdefault(section, {}).update(values)
        Path(ws["recipe"]).write_text(yaml.safe_dump(recipe))
    return [arg.format(**ws) for arg in case.args]


def check_one_line(case: Case, code: int, out: str, err: str) -> str:
    assert code == 2, (case.id, code, out, err)
    assert "Traceback" not in out + err, case.id
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (case.id, err)
    for phrase in case.expect:
        assert phrase in lines[0], (case.id, phrase, lines[0])
    return lines[0]


def test_the_table_has_at_least_30_cases():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line(case: Case, workspace, monkeypatch, capsys):
    args = prepare_case(case, workspace)
    before = snapshot(Path(workspace["run"]))
    check_one_line(case, *run_cli(monkeypatch, capsys, *args))
    assert snapshot(Path(workspace["run"])) == before  # nothing touched the saved run
    assert not (Path(workspace["tmp"]) / "new-run").exists()  # nor started one


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.process], ids=[c.id for c in CASES if c.process]
)
def test_bad_input_is_one_line_in_a_real_process(case: Case, workspace):
    args = prepare_case(case, workspace)
    proc = subprocess.run(
        [sys.executable, "-m", "nrt_mlx.cli", *args], capture_output=True, text=True, timeout=120
    )
    check_one_line(case, proc.returncode, proc.stdout, proc.stderr)


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ---- eval --out is checked before the evaluation ---------------------------------------------


def test_eval_refuses_an_unwritable_out_before_loading_anything(
    workspace, monkeypatch, capsys, tiny_model_dir
):
    import nrt_mlx.evaluate as evaluate_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("the evaluation ran although --out cannot be written")

    monkeypatch.setattr(evaluate_module, "load_for_eval", must_not_run)
    monkeypatch.setattr(evaluate_module, "evaluate", must_not_run)
    for out in (workspace["dir"], workspace["binary"] + "/report.json"):
        code, _, err = run_cli(
            monkeypatch, capsys, "eval", "--data", workspace["data"], "--model", tiny_model_dir,
            "--out", out,
        )  # fmt: skip
        assert code == 2 and err.startswith("error: --out ") and len(err.splitlines()) == 1
    assert list(Path(workspace["dir"]).iterdir()) == []  # the write test left nothing behind
