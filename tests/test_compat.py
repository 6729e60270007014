"""A run written by nrt-mlx 0.1 (tests/fixtures/run_v0_1) resumes, fuses and evaluates today.

The fixture was interrupted while step 3 was being checkpointed; its metrics.jsonl still holds the
step-3 line 0.1 logged. Resuming must rewrite exactly that line: same data order, same randomness,
same objective.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from nrt_mlx.cli import app

FIXTURE = Path(__file__).parent / "fixtures" / "run_v0_1"
TIMING = {"sample_tokens_per_s", "sample_seconds", "train_tokens_per_s", "train_seconds"}
TIMING |= {"peak_memory_gb"}


@pytest.fixture
def old_run(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A copy of the fixture whose recipe points at this machine's tiny model and data."""
    run = shutil.copytree(FIXTURE / "run", tmp_path / "run")
    data = shutil.copytree(FIXTURE / "data", tmp_path / "data")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["path"] = str(tiny_model_dir)
    recipe["data"]["train"] = str(data / "train.jsonl")
    recipe["data"]["valid"] = str(data / "valid.jsonl")
    recipe["run"]["dir"] = str(run)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return run


def lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_resume_rewrites_step_3_exactly_as_0_1_did(old_run: Path) -> None:
    before = lines(old_run)
    assert [r["step"] for r in before] == [1, 2, 3]
    invoke("train", "--resume", str(old_run), "--quiet")
    after = lines(old_run)
    assert [r["step"] for r in after] == [1, 2, 3]
    assert after[:2] == before[:2]  # steps before the checkpoint are kept as written
    old, new = before[2], after[2]
    # Figures added since 0.1: the clipped ratio's share, eval's flexible exact match.
    assert {k for k in new if k not in ("clip_fraction", "eval_exact_match_flexible")} == set(old)
    for key in set(old) - TIMING:
        assert new[key] == pytest.approx(old[key], rel=1e-5, abs=1e-7), key
    state = json.loads((old_run / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["step"] == 3 and state["position"] == 6


def test_fuse_and_mlx_lm_agree_on_a_0_1_run(old_run: Path, tiny_model_dir: Path, tmp_path: Path):
    invoke("fuse", str(old_run), str(tmp_path / "fused"))
    prompt = mx.array([[1, 5, 9, 42, 7]])
    fused, _ = mlx_lm.load(str(tmp_path / "fused"))
    base, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(old_run / "adapters"))
    plain, _ = mlx_lm.load(str(tiny_model_dir))
    np.testing.assert_allclose(np.array(fused(prompt)), np.array(base(prompt)), atol=1e-4)
    assert not np.allclose(np.array(fused(prompt)), np.array(plain(prompt)), atol=1e-5)


def test_eval_and_score_read_a_0_1_run(old_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    data = str(tmp_path / "data" / "valid.jsonl")
    args = ["--samples", "2", "--max-think", "4", "--max-answer", "3", "--out", str(out)]
    invoke("eval", "--adapter", str(old_run), "--data", data, *args)
    report = json.loads(out.read_text())
    assert report["config"]["marker_text"] == "<|reserved_0|>"  # the run's own marker
    assert report["summary"]["questions"] == 4 and np.isfinite(report["summary"]["null_nll"])
    step = old_run / "checkpoints" / "step_000001"
    scored = invoke(
        "score", "--adapter", str(step), "--question", "2+2?", "--answer", "4", "--json"
    )
    assert json.loads(scored)["marker"] == "<|reserved_0|>"
