"""The run directory: resolved recipe, latest adapters, checkpoints, metrics and samples.

    RUN_DIR/recipe.yaml                     the resolved recipe
    RUN_DIR/adapters/                       latest adapters (mlx-lm format)
    RUN_DIR/checkpoints/step_NNNNNN/        adapters, optimizer.safetensors, state.json
    RUN_DIR/metrics.jsonl                   one line per step (and per evaluation)
    RUN_DIR/samples.jsonl                   sampled traces with their rewards, every few steps

Checkpoints are written into a temporary directory and renamed into place, so a crash never
leaves a half-written checkpoint, and older checkpoints are removed only after a newer one exists.
Everything that reads a run (resume, eval, score, fuse, the model card, compare, plot) reads it
through ``RunDir``; ``find_adapters`` resolves what a user gives as ``--adapter``.
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
from nrt_mlx.marker import MARKER_FILE
from nrt_mlx.model import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapter_weights,
    write_adapters_into,
)
from nrt_mlx.recipe import Recipe, load_recipe

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

    # -- reading a finished or running run ----------------------------------------------------

    def check(self) -> RunDir:
        """Itself, once it is known to be a run directory (a one-line error otherwise)."""
        if not self.root.is_dir():
            raise NrtError(f"{self.root}: no such run directory")
        if not self.recipe.exists():
            raise NrtError(f"{self.root}: not a run directory (no recipe.yaml)")
        return self

    def read_recipe(self, overrides: list[str] | None = None) -> Recipe:
        """The resolved recipe the run saved."""
        return load_recipe(self.check().recipe, overrides, saved_run=True)

    def adapter_dir(self, step: int | None = None) -> tuple[Path, int | None]:
        """The adapters of checkpoint ``step`` (None: the latest, in adapters/) and their step."""
        if step is None:
            if not (self.adapters / ADAPTER_WEIGHTS).exists():
                raise NrtError(
                    f"{self.adapters}: no {ADAPTER_WEIGHTS}; has the run saved a checkpoint yet? "
                    "(pick one with --checkpoint STEP)"
                )
            # adapters/ is rewritten with every checkpoint, so it holds the latest one.
            return self.adapters, self.latest_checkpoint()
        directory = self.checkpoint_dir(step)
        if not (directory / ADAPTER_WEIGHTS).exists():
            have = ", ".join(str(s) for s in self.list_checkpoints()) or "none"
            raise NrtError(
                f"--checkpoint {step}: {directory} has no adapters (checkpoints in this run: {have})"
            )
        return directory, step

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
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, MARKER_FILE):
            if (path / name).exists():
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


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """``adapter_config.json``, checked for the keys mlx-lm needs to rebuild the adapters."""
    path = adapter_dir / ADAPTER_CONFIG
    if not path.exists():
        raise NrtError(f"{path}: not found; the adapter directory is incomplete")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise NrtError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    for key in ("num_layers", "lora_parameters"):
        if key not in cfg:
            raise NrtError(f"{path}: key '{key}' is missing; is this an mlx-lm adapter config?")
    kind = cfg.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise NrtError(f"{path}: fine_tune_type '{kind}' is not supported (lora or dora expected)")
    return cfg


@dataclass
class AdapterSource:
    """Where adapters live, the recipe of their run (None without one) and their adapter_config."""

    adapter_dir: Path
    recipe: Recipe | None
    adapter_config: dict[str, Any]

    @property
    def base_model(self) -> str:
        """The base model: the recipe's model.path, else adapter_config's base_model."""
        if self.recipe is not None:
            return self.recipe.model.path
        cfg = self.adapter_config
        return str(cfg.get("base_model") or cfg.get("model") or "")

    @property
    def marker(self) -> str | None:
        """The marker the adapters were trained with: the recipe's, else adapter_config's."""
        if self.recipe is not None:
            return self.recipe.rollout.marker
        return (self.adapter_config.get("nrt_mlx") or {}).get("marker")


def find_adapters(path: str | Path) -> AdapterSource:
    """Resolve RUN_DIR (its latest adapters/), RUN_DIR/checkpoints/step_N or an adapter directory."""
    root = Path(path).expanduser()
    if not root.exists():
        raise NrtError(f"--adapter {path}: no such run, checkpoint or adapter directory")
    adapter_dir = RunDir(root).adapters if RunDir(root).recipe.exists() else root
    if not (adapter_dir / ADAPTER_WEIGHTS).exists() or not (adapter_dir / ADAPTER_CONFIG).exists():
        raise NrtError(
            f"--adapter {path}: no {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG} in {adapter_dir}; give a "
            f"run directory, RUN_DIR/checkpoints/step_NNNNNN or an adapter directory"
        )
    config = read_adapter_config(adapter_dir)
    # A run's recipe sits beside adapters/ or two levels above a checkpoint.
    for candidate in map(RunDir, (root, adapter_dir.parent, adapter_dir.parent.parent)):
        if candidate.recipe.exists():
            return AdapterSource(adapter_dir, candidate.read_recipe(), config)
    return AdapterSource(adapter_dir, None, config)


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
