"""train.report_to: wandb (offline mode) and TensorBoard files written by a real run, read back.

The TensorBoard event files are read with TensorBoard's own EventAccumulator; wandb 0.31 has no
Python reader of its .wandb files, so ``wandb_history`` reads the record log (LevelDB's log
format, wandb's header) into wandb's own protobuf records. wandb and tensorboardX (the [wandb] and
[tensorboard] extras) are imported plainly: the dev install has them, so a missing one fails.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import tensorboardX  # noqa: F401
import wandb  # noqa: F401
from helpers import DATA, tiny_recipe, write_recipe

from nrt_mlx.errors import NrtError
from nrt_mlx.recipe import Recipe, load_recipe
from nrt_mlx.rundir import RUN_MARK
from nrt_mlx.tracking import TENSORBOARD_DIR, WANDB_ID_FILE, TensorBoardTracker, Trackers
from nrt_mlx.trainer import resume, train


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "wandb_dir"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return folder


def wandb_history(path: Path) -> dict[int, dict[str, float]]:
    """step -> logged values of one .wandb file."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, part = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"  # the header: ident, magic, version (7 bytes)
    history: dict[int, dict[str, float]] = {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        part, pos = part + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record.FromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                values = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                history.setdefault(record.history.step.num, {}).update(values)
    return history


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / TENSORBOARD_DIR))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_report_to_takes_a_name_a_list_or_none() -> None:
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"

    def report_to(value: str) -> list[str]:
        return load_recipe(recipe, [f"train.report_to={value}"]).train.report_to

    assert report_to("wandb") == ["wandb"]
    assert report_to("[WandB, tensorboard, wandb]") == ["wandb", "tensorboard"]
    assert report_to("none") == [] and Recipe().train.report_to == []
    with pytest.raises(NrtError, match="train.report_to: unknown tracker 'mlflow', valid: wandb"):
        report_to("mlflow")


def test_missing_tracker_package_fails_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tiny_recipe(tmp_path, tmp_path / "no-such-model", train={"report_to": "tensorboard"})
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if the extra were not installed
    with pytest.raises(NrtError) as err:
        train(load_recipe(write_recipe(tmp_path, recipe)))  # the model would fail to load
    assert str(err.value) == (
        "train.report_to: tensorboard needs the tensorboardX package: "
        "pip install 'nrt-mlx[tensorboard]' (or remove tensorboard from train.report_to)"
    )
    assert not (tmp_path / "run").exists()  # nothing was started


def test_run_and_resume_log_every_metrics_line_to_wandb_and_tensorboard(
    tmp_path: Path,
    tiny_model_dir: Path,
    wandb_offline: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    folder = tmp_path / "qa"  # mlx-lm's --data DIR, its valid.jsonl evaluated on
    folder.mkdir()
    lines = (DATA / "train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(lines[:6]) + "\n")
    (folder / "valid.jsonl").write_text(lines[6] + "\n")
    recipe = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        data={"train": str(folder)},
        train={"steps": 3, "eval_every": 2, "eval_questions": 1, "eval_samples": 1},
        run={"save_every": 2, "keep_checkpoints": 0},
    )
    recipe["train"]["report_to"] = ["wandb", "tensorboard"]
    run = train(load_recipe(write_recipe(tmp_path, recipe)), quiet=True)
    assert "(data.valid: valid.jsonl of the same folder)" in capsys.readouterr().out
    # As if killed after logging step 3, before its checkpoint: the resume rewinds to step 2,
    # logs step 3 again and goes on to step 4.
    shutil.rmtree(run / "checkpoints" / "step_000003")
    resume(run, quiet=True, overrides=["train.steps=4"])

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and metrics[1]["eval_questions"] == 1
    scalars = tensorboard_scalars(run)
    numeric = {k for m in metrics for k, v in m.items() if isinstance(v, (int, float))} - {"step"}
    assert set(scalars) == numeric and "eval_questions" in numeric  # every field, evaluation too
    for key in numeric:
        logged = [(m["step"], m[key]) for m in metrics if key in m]
        assert [s for s, _ in scalars[key]] == [s for s, _ in logged]  # step 3 once: purged
        assert [v for _, v in scalars[key]] == pytest.approx([v for _, v in logged], rel=1e-6)

    run_id = (run / WANDB_ID_FILE).read_text().strip()
    files = sorted(wandb_offline.glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb"))
    assert len(files) == 2  # the start and the resume, one wandb run id
    history: dict[int, dict[str, float]] = {}
    for path in files:
        for step, values in wandb_history(path).items():
            history.setdefault(step, {}).update(values)
    for m in metrics:
        assert history[m["step"]]["loss"] == pytest.approx(m["loss"])
        assert history[m["step"]]["trace_tokens_mean"] == pytest.approx(m["trace_tokens_mean"])

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(NrtError, match=r"pip install 'nrt-mlx\[wandb\]'"):
        resume(run, quiet=True, overrides=["train.steps=5"])
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4  # untouched


def test_a_failing_tracker_warns_once_and_the_others_go_on(tmp_path: Path) -> None:
    class Broken:  # a tracker whose service went away
        def log(self, step: int, values: dict[str, float]) -> None:
            raise ConnectionResetError("connection reset by peer")

        def close(self) -> None:
            raise ConnectionResetError("connection reset by peer")

    warnings: list[str] = []
    trackers = Trackers(warnings.append)
    trackers.active = {"wandb": Broken(), "tensorboard": TensorBoardTracker(Recipe(), tmp_path, 0)}
    for step in (1, 2, 3):
        trackers.log({"step": step, "loss": 1.0 / step, "collapse_warning": "text"})
    trackers.close()
    assert warnings == [
        "train.report_to: wandb failed (connection reset by peer); it is off for the rest of "
        "this run, training goes on and metrics.jsonl has every step"
    ]
    assert [s for s, _ in tensorboard_scalars(tmp_path)["loss"]] == [1, 2, 3]


def test_a_tracker_that_cannot_start_leaves_the_run_whole(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = tiny_recipe(tmp_path, tiny_model_dir, train={"steps": 2, "report_to": "tensorboard"})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RUN_MARK).write_text("")  # a run directory nrt-mlx made
    (tmp_path / "run" / TENSORBOARD_DIR).write_text("a file where the event folder goes")
    run = train(load_recipe(write_recipe(tmp_path, recipe)), quiet=True)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    err = capsys.readouterr().err
    assert err.count("train.report_to: tensorboard could not start") == 1
