"""The run directory: resolved recipe, latest adapters, checkpoints, metrics and samples.

    RUN_DIR/recipe.yaml                     the resolved recipe
    RUN_DIR/adapters/                       latest adapters (mlx-lm format)
    RUN_DIR/checkpoints/step_NNNNNN/        adapters, optimizer.safetensors, state.json
    RUN_DIR/metrics.jsonl                   one line per step (and per evaluation)
    RUN_DIR/samples.jsonl                   sampled traces with their rewards, every few steps

Checkpoints are written into a temporary directory and renamed into place, so a crash never
leaves a half-written checkpoint, and older checkpoints are removed only after a newer one exists.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from nrt_mlx.errors import NrtError
from nrt_mlx.fileio import append_jsonl, atomic_dir, atomic_write_text
from nrt_mlx.model import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapter_weights,
    write_adapters_into,
)

_STEP_DIR = re.compile(r"^step_(\d{6,})$")


@dataclass
class RunDir:
    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples.jsonl"

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"

    def list_checkpoints(self) -> list[int]:
        if not self.checkpoints.is_dir():
            return []
        steps = []
        for p in self.checkpoints.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / "state.json").exists():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest_checkpoint(self) -> int | None:
        steps = self.list_checkpoints()
        return steps[-1] if steps else None

    # -- metrics ---------------------------------------------------------------------------

    def log_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics, record)

    def log_sample(self, record: dict[str, Any]) -> None:
        append_jsonl(self.samples, record)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics)

    def truncate_logs(self, step: int) -> None:
        """Drop log lines after ``step``: a resumed run rewrites them exactly."""
        for path in (self.metrics, self.samples):
            if path.exists():
                kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
                atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    # -- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(
        self,
        step: int,
        model: nn.Module,
        optimizer: optim.Optimizer,
        adapter_config: dict,
        state: dict[str, Any],
        keep: int,
    ) -> Path:
        tmp, commit = atomic_dir(self.checkpoint_dir(step))
        write_adapters_into(model, adapter_config, tmp)
        opt_state = dict(tree_flatten(optimizer.state))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt_state)
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        path = commit()
        # The latest adapters are the checkpoint's: copy the files rather than serialise again.
        tmp, commit_latest = atomic_dir(self.adapters)
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            shutil.copy2(path / name, tmp / name)
        commit_latest()
        if keep > 0:
            for old in self.list_checkpoints()[:-keep]:
                shutil.rmtree(self.checkpoint_dir(old), ignore_errors=True)
        return path

    def load_checkpoint(
        self, step: int, model: nn.Module, optimizer: optim.Optimizer
    ) -> dict[str, Any]:
        """Restore adapters and optimizer state; returns the saved training state."""
        path = self.checkpoint_dir(step)
        state_file = path / "state.json"
        if not state_file.exists():
            raise NrtError(f"{path}: not a complete checkpoint (state.json missing)")
        load_adapter_weights(model, path)
        opt = mx.load(str(path / "optimizer.safetensors"))
        optimizer.state = tree_unflatten(list(opt.items()))
        mx.eval(optimizer.state)
        return json.loads(state_file.read_text())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL log, ignoring a torn last line (a crash mid-append)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
