"""End to end through the CLI on the tiny model: every aggregator, SFT, determinism, resume."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import yaml
from helpers import DATA, tiny_recipe, write_recipe
from typer.testing import CliRunner

from nrt_mlx.cli import app
from nrt_mlx.objective import AGGREGATORS


def make_recipe(tmp_path: Path, model_dir: Path, name: str = "run", **sections) -> Path:
    recipe = tiny_recipe(
        tmp_path,
        model_dir,
        name,
        data={"valid": str(DATA / "test.jsonl")},
        run={"save_every": 2, "samples_every": 1},
    )
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return write_recipe(tmp_path, recipe, name)


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def logits(model_dir: Path, adapter: Path | None) -> np.ndarray:
    model, tok = mlx_lm.load(str(model_dir), adapter_path=str(adapter) if adapter else None)
    return np.array(model(mx.array(tok.encode("What is the capital of France?"))[None]))


@pytest.mark.parametrize("aggregator", list(AGGREGATORS))
def test_nrt_three_steps_per_aggregator(tmp_path, tiny_model_dir, aggregator):
    recipe = make_recipe(tmp_path, tiny_model_dir, objective={"aggregator": aggregator})
    cli("train", str(recipe), "--quiet")
    run = tmp_path / "run"
    for name in (
        "recipe.yaml",
        "adapters/adapters.safetensors",
        "adapters/adapter_config.json",
        "checkpoints/step_000002/optimizer.safetensors",
        "checkpoints/step_000003/state.json",
        "metrics.jsonl",
        "samples.jsonl",
    ):
        assert (run / name).exists(), name
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for key in (
            "loss",
            "trace_loss",
            "token_loss",
            "format_loss",
            "reward_mean",
            "reward_std",
            "answer_nll",
            "null_answer_nll",
            "trace_tokens_mean",
            "trace_tokens_min",
            "trace_tokens_max",
            "marker_rate",
            "trace_entropy",
            "sample_tokens_per_s",
            "train_tokens_per_s",
            "peak_memory_gb",
            "lr",
        ):
            assert np.isfinite(r[key]), (key, r[key])
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["objective"]["aggregator"] == aggregator
    assert saved["model"]["quantize"] == "none"  # resolved: dense on the CPU backend
    sample = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert sample["reference"] and len(sample["traces"]) == 2
    # The adapters load in mlx-lm itself and change the model.
    assert not np.allclose(
        logits(tiny_model_dir, run / "adapters"), logits(tiny_model_dir, None), atol=1e-5
    )


def test_sft_baseline(tmp_path, tiny_model_dir):
    one = tmp_path / "one.jsonl"
    one.write_text(
        json.dumps({"question": "What is the capital of France?", "answer": "Paris"}) + "\n"
    )
    recipe = make_recipe(
        tmp_path, tiny_model_dir, train={"method": "sft", "steps": 5}, data={"train": str(one)}
    )
    cli("train", str(recipe), "--quiet")
    rows = metrics(tmp_path / "run")
    assert len(rows) == 5 and all(np.isfinite(r["loss"]) for r in rows)
    assert "reward_mean" not in rows[0]
    assert rows[-1]["answer_nll"] < rows[0]["answer_nll"] - 0.5  # it learns the one answer
    assert not np.allclose(
        logits(tiny_model_dir, tmp_path / "run" / "adapters"),
        logits(tiny_model_dir, None),
        atol=1e-5,
    )


def strip_timing(rows: list[dict]) -> list[dict]:
    drop = (
        "sample_tokens_per_s",
        "train_tokens_per_s",
        "sample_seconds",
        "train_seconds",
        "peak_memory_gb",
    )
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def test_same_seed_same_metrics_and_resume_matches(tmp_path, tiny_model_dir):
    extra = {
        "train": {"steps": 4, "questions_per_step": 2, "micro_batch_questions": 1},
        "lora": {"layers": 2, "rank": 4, "dropout": 0.1},
    }
    a = make_recipe(tmp_path, tiny_model_dir, "a", **extra)
    b = make_recipe(tmp_path, tiny_model_dir, "b", **extra)
    cli("train", str(a), "--quiet")
    cli("train", str(b), "--quiet")
    full = strip_timing(metrics(tmp_path / "a"))
    assert full == strip_timing(metrics(tmp_path / "b"))
    assert len(full) == 4
    # A crash after step 3: the step-2 checkpoint survives, step 3's metrics line is written,
    # step 4 never happened. Resuming rewrites step 3 and runs step 4 exactly as before.
    c = make_recipe(tmp_path, tiny_model_dir, "c", **extra)
    cli("train", str(c), "--quiet")
    run = tmp_path / "c"
    shutil.rmtree(run / "checkpoints" / "step_000004")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3]) + '\n{"step": 4, "lo')  # torn line
    cli("train", "--resume", str(run), "--quiet")
    resumed = strip_timing(metrics(tmp_path / "c"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for x, y in zip(resumed[2:], full[2:]):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), key


def test_refuses_to_overwrite_a_run_and_bad_input_is_one_line(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir, train={"steps": 1})
    cli("train", str(recipe), "--quiet")
    exe = [sys.executable, "-m", "nrt_mlx.cli"]
    cases = [
        (["train", str(recipe), "--quiet"], "already holds a trained run"),
        (["train", str(recipe), "--set", "train.stepz=2"], "did you mean 'steps'"),
        (["train", str(tmp_path / "missing.yaml")], "recipe file not found"),
        (["train", "--resume", str(tmp_path / "nothing")], "no such run directory"),
        (["train", "--resume", str(tmp_path)], "not a run directory"),
        (
            ["train", str(make_recipe(tmp_path, tmp_path / "no-model", "nomodel"))],
            "no such directory",
        ),
    ]
    for args, expected in cases:
        proc = subprocess.run(exe + args, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_trained_run_fuses_into_a_standalone_model(tmp_path, tiny_model_dir):
    """The user's day: train, fuse, then mlx-lm alone runs the result with the trained behaviour."""
    recipe = make_recipe(
        tmp_path,
        tiny_model_dir,
        train={
            "steps": 2,
            "updates_per_rollout": 2,
            "micro_batch_questions": 1,
            "grad_checkpoint": True,
            "eval_every": 2,
            "eval_questions": 2,
        },
    )
    cli("train", str(recipe), "--quiet")
    run = tmp_path / "run"
    rows = metrics(run)
    assert all(np.isfinite(r["loss"]) for r in rows)
    # The valid split is evaluated at step 2 within the budget, into metrics.jsonl.
    assert "eval_null_nll" not in rows[0] and rows[1]["eval_questions"] == 2
    assert np.isfinite(rows[1]["eval_null_nll"]) and np.isfinite(rows[1]["eval_trace_nll_mean"])
    cli("fuse", str(run), str(tmp_path / "fused"))
    fused = logits(tmp_path / "fused", None)
    # mlx-lm's own adapter loading carries the LoRA weights; the trained marker rows (the
    # marker's logit column) reach mlx-lm through the fused model only.
    marker = json.loads((run / "adapters" / "adapter_config.json").read_text())["nrt_mlx"]
    others = np.arange(fused.shape[-1]) != marker["marker_id"]
    with_adapters = logits(tiny_model_dir, run / "adapters")
    np.testing.assert_allclose(fused[..., others], with_adapters[..., others], atol=1e-4)
    assert not np.allclose(fused, logits(tiny_model_dir, None), atol=1e-5)


def test_clip_fraction_is_logged_when_the_clipped_ratio_is_active(tmp_path, tiny_model_dir):
    """Several updates per rollout: from the second update on, tokens leave the trust region."""
    several = make_recipe(
        tmp_path,
        tiny_model_dir,
        "several",
        optimizer={"learning_rate": 1e-2, "warmup_ratio": 0.0},
        train={"steps": 2, "updates_per_rollout": 3},
    )
    cli("train", str(several), "--quiet")
    rows = metrics(tmp_path / "several")
    assert all(0 < r["clip_fraction"] < 1 for r in rows), [r["clip_fraction"] for r in rows]
    one = make_recipe(tmp_path, tiny_model_dir, "one", train={"steps": 1})
    cli("train", str(one), "--quiet")
    assert "clip_fraction" not in metrics(tmp_path / "one")[0]  # rho = 1: nothing to clip


@pytest.mark.parametrize("method", ["nrt", "sft"])
def test_evaluating_during_training_does_not_change_training(tmp_path, tiny_model_dir, method):
    """Evaluation switches LoRA dropout off and samples with its own key: the training figures
    of a run that evaluates every step equal those of a run that never does."""
    extra = {"lora": {"layers": 2, "rank": 4, "dropout": 0.3}}
    plain = make_recipe(tmp_path, tiny_model_dir, "plain", train={"method": method}, **extra)
    watched = make_recipe(
        tmp_path,
        tiny_model_dir,
        "watched",
        train={"method": method, "eval_every": 1, "eval_questions": 2},
        **extra,
    )
    cli("train", str(plain), "--quiet")
    cli("train", str(watched), "--quiet")
    evaluated = strip_timing(metrics(tmp_path / "watched"))
    assert all("eval_null_nll" in r for r in evaluated)
    training = [{k: v for k, v in r.items() if not k.startswith("eval_")} for r in evaluated]
    assert training == strip_timing(metrics(tmp_path / "plain"))
