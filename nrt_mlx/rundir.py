"""The run directory: resolved recipe, latest adapters, checkpoints, metrics and samples.

    RUN_DIR/recipe.yaml                     the resolved recipe
    RUN_DIR/adapters/                       latest adapters (mlx-lm format)
    RUN_DIR/checkpoints/step_NNNNNN/        adapters, optimizer.safetensors, state.json
    RUN_DIR/metrics.jsonl                   one line per step (and per evaluation)
    RUN_DIR/samples.jsonl                   sampled traces with their rewards, every few steps
    RUN_DIR/.nrt-mlx-run                    marks a directory nrt-mlx created for a run
    RUN_DIR/.nrt-mlx.lock                   locked by the process training the run

Nothing is lost and nothing is silent when a run is killed, its disk fills or a file is damaged:

- every file is written under a temporary name, fsynced and renamed into place, and directories
  replace older ones through ``.NAME.old`` (``nrt_mlx.fileio``), so each instant of a checkpoint
  is recoverable; state.json records a SHA-256 of every other file of its checkpoint;
- one process at a time trains a run: ``lock`` (``train`` also ``claim``s a new directory and
  refuses one holding files nrt-mlx did not write);
- on resume, ``recover`` picks the newest intact checkpoint (a damaged newer one gets a one-line
  warning); ``rewind`` finishes or undoes interrupted writes, removes their temporary files,
  moves damaged checkpoints to ``checkpoints/damaged/`` and makes ``adapters/`` a copy of the
  checkpoint resumed from;
- a failed write (a full disk above all) is a one-line error that names the checkpoint to resume
  from; older checkpoints are removed only after a newer one is complete.

Everything that reads a run (resume, eval, score, fuse, the model card, compare, plot) reads it
through ``RunDir``; ``find_adapters`` resolves what a user gives as ``--adapter``.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from nrt_mlx.errors import NrtError, first_line
from nrt_mlx.fileio import (
    append_jsonl,
    atomic_dir,
    atomic_write_text,
    exclusive_lock,
    fault_point,
    is_disk_full,
    is_write_error,
    recover_dir,
    remove_dir,
    remove_stale_temps,
    write_error_text,
)
from nrt_mlx.marker import MARKER_FILE
from nrt_mlx.model import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapter_weights,
    write_adapters_into,
)
from nrt_mlx.recipe import Recipe, load_recipe

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
_ASIDE_STEP_DIR = re.compile(r"^\.(step_\d{6,})\.old$")

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, MARKER_FILE)  # what adapters/ copies
RUN_MARK = ".nrt-mlx-run"
LOCK_FILE = ".nrt-mlx.lock"


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

    @property
    def mark(self) -> Path:
        return self.root / RUN_MARK

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"

    def list_checkpoints(self) -> list[int]:
        """The steps of the checkpoints that finished writing (their state.json exists)."""
        return [s for s in self.step_dirs() if (self.checkpoint_dir(s) / STATE_FILE).exists()]

    def latest_checkpoint(self) -> int | None:
        steps = self.list_checkpoints()
        return steps[-1] if steps else None

    def step_dirs(self) -> list[int]:
        """The step of every checkpoint directory, complete or damaged, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = (_STEP_DIR.match(p.name) for p in self.checkpoints.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

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

    def latest_adapters(self) -> Path:
        """adapters/, or the newest checkpoint while a killed write has left adapters/ missing
        (the next resume repairs it): both hold the latest adapters."""
        if (self.adapters / ADAPTER_WEIGHTS).exists():
            return self.adapters
        for step in reversed(self.list_checkpoints()):
            if (self.checkpoint_dir(step) / ADAPTER_WEIGHTS).exists():
                return self.checkpoint_dir(step)
        return self.adapters

    def adapter_dir(self, step: int | None = None) -> tuple[Path, int | None]:
        """The adapters of checkpoint ``step`` (None: the latest, in adapters/) and their step."""
        if step is None:
            latest = self.latest_adapters()
            if not (latest / ADAPTER_WEIGHTS).exists():
                raise NrtError(
                    f"{self.adapters}: no {ADAPTER_WEIGHTS}; has the run saved a checkpoint yet? "
                    "(pick one with --checkpoint STEP)"
                )
            # adapters/ is rewritten with every checkpoint, so it holds the latest one.
            return latest, self.latest_checkpoint()
        directory = self.checkpoint_dir(step)
        if not (directory / ADAPTER_WEIGHTS).exists():
            have = ", ".join(str(s) for s in self.list_checkpoints()) or "none"
            raise NrtError(
                f"--checkpoint {step}: {directory} has no adapters (checkpoints in this run: {have})"
            )
        return directory, step

    # -- one training process per run ------------------------------------------------------

    def lock(self) -> AbstractContextManager[None]:
        """Hold the run for one training process (``with run.lock():``); a second ``train`` or
        ``--resume`` gets a one-line error naming the directory. The OS releases the lock when
        the process ends, even when it is killed."""

        def busy(pid: str) -> str:
            who = f" (pid {pid})" if pid else ""
            return (
                f"run.dir {self.root} is in use: another nrt-mlx process{who} is training it; "
                "wait for it to finish (or stop it), then try again"
            )

        return exclusive_lock(self.root / LOCK_FILE, busy)

    @contextmanager
    def claim(self) -> Iterator[RunDir]:
        """``lock`` the directory of a new run, creating it; refuse a directory that holds files
        nrt-mlx did not write (say the user's own recipe.yaml), and mark it as a run directory.
        A directory it created is removed again when the block fails before writing to it."""
        self._refuse_foreign()  # before creating anything in it
        created = not self.root.exists()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise NrtError(f"run.dir {self.root}: cannot create it ({err.strerror})") from None
        try:
            with self.lock():
                self._refuse_foreign()  # again under the lock: another process may have written
                self.refuse_trained()  # a run of ours that trained: it is resumed, not restarted
                if not self.mark.exists():
                    self._write_mark()
                yield self
        except BaseException:
            if created and [p.name for p in self.root.iterdir()] == [RUN_MARK]:
                with suppress(OSError):
                    self.mark.unlink()
                    self.root.rmdir()
            raise

    def _write_mark(self) -> None:
        try:
            atomic_write_text(self.mark, "a run directory of nrt-mlx\n")
        except OSError as err:
            why = write_error_text(err, self.root)
            raise NrtError(f"run.dir {self.root}: cannot write in it: {why}") from None

    def refuse_trained(self) -> None:
        """Refuse to start a run over one that has trained (a checkpoint, adapters or metrics)."""
        logged = self.metrics.exists() and self.metrics.stat().st_size > 0
        if (
            self.latest_checkpoint() is not None
            or logged
            or (self.adapters / ADAPTER_WEIGHTS).exists()
        ):
            raise NrtError(
                f"run.dir {self.root} already holds a trained run: continue it with "
                f"'nrt-mlx train --resume {self.root}' (it needs a checkpoint), or set run.dir "
                "to a new directory"
            )

    def _refuse_foreign(self) -> None:
        """A new run may use a missing or empty directory, or one nrt-mlx marked; an unmarked run
        of an earlier nrt-mlx (metrics.jsonl, checkpoints/, adapters/) is refused by refuse_trained
        (a marked one too, under the lock: ``claim``)."""
        if not self.root.exists() or self.mark.exists():
            return
        if not self.root.is_dir():
            raise NrtError(f"run.dir {self.root}: exists and is not a directory")
        self.refuse_trained()
        if self.checkpoints.exists():
            return
        # Hidden files (.DS_Store, a lock file) are no one's work.
        names = sorted(p.name for p in self.root.iterdir() if not p.name.startswith("."))
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise NrtError(
                f"run.dir {self.root}: not empty and not created by nrt-mlx (it holds {shown}); "
                "a run would overwrite them: set run.dir to a new or empty directory"
            )

    # -- recovery on resume ----------------------------------------------------------------

    def recover(self) -> int:
        """The step to resume from: the newest intact checkpoint (0: the run has none yet).

        Call it holding ``lock()``. It reads, verifies and warns; it changes nothing (so an error
        of the command line after it leaves the run as it was) but a checkpoint directory whose
        replacement a killed process interrupted, which it puts back whole. A damaged newer
        checkpoint gets a one-line warning on stderr (``rewind`` moves it away); no intact
        checkpoint at all is a one-line error.
        """
        # A checkpoint directory replaced over an older one (never by the trainer, which moves
        # the steps after the one it resumes from away) comes back whole before the choice.
        if self.checkpoints.is_dir():
            for path in list(self.checkpoints.iterdir()):
                m = _ASIDE_STEP_DIR.match(path.name)
                if m:
                    recover_dir(self.checkpoints / m.group(1))
        damaged: list[tuple[Path, str]] = []
        for step in reversed(self.step_dirs()):
            problem = self.checkpoint_problem(step)
            if problem is None:
                break
            damaged.append((self.checkpoint_dir(step), problem))
        else:
            if damaged:
                found = "; ".join(f"{path.name}: {problem}" for path, problem in damaged)
                raise NrtError(f"{self.root}: no intact checkpoint to resume from ({found})")
            return 0
        for path, problem in damaged:
            print(
                f"warning: {path}: damaged checkpoint ({problem}); resuming from step {step}, "
                f"the damaged one goes to {self.damaged}",
                file=sys.stderr,
                flush=True,
            )
        return step

    @property
    def damaged(self) -> Path:
        return self.checkpoints / "damaged"

    def rewind(self, step: int) -> None:
        """Make the run continue from checkpoint ``step`` (0: from the start): move newer,
        damaged checkpoints to checkpoints/damaged/ (the resumed run writes those steps again),
        make adapters/ a copy of the checkpoint and drop the log lines after it. Call it holding
        ``lock()``: it first finishes or undoes the adapters/ replacement a killed process
        interrupted and removes the temporary files of its interrupted writes."""
        recover_dir(self.adapters)
        for directory in (self.root, self.checkpoints):
            remove_stale_temps(directory)
        for newer in self.step_dirs():
            if newer > step:
                moved = self.damaged / self.checkpoint_dir(newer).name
                moved.parent.mkdir(exist_ok=True)
                if moved.exists():  # an older damaged copy of the same step
                    shutil.rmtree(moved)
                self.checkpoint_dir(newer).rename(moved)
        if step:
            source = self.checkpoint_dir(step)
            if not all(_same_file(source / n, self.adapters / n) for n in ADAPTER_FILES):
                with self._writing(f"{self.adapters.name}/ of step {step}"):
                    self._write_latest(source)
        self.truncate_logs(step)

    def checkpoint_problem(self, step: int) -> str | None:
        """What is wrong with checkpoint ``step``: None when every file is there and loads
        (and matches the checksum its state.json records)."""
        path = self.checkpoint_dir(step)
        try:
            state = _json_object(path / STATE_FILE)
            if state.get("step") != step or not isinstance(state.get("position"), int):
                return f"{STATE_FILE} does not describe step {step}"
            config = _json_object(path / ADAPTER_CONFIG)
            tensors = [ADAPTER_WEIGHTS, OPTIMIZER_FILE]
            if (config.get("nrt_mlx") or {}).get("marker_rows") or (path / MARKER_FILE).exists():
                tensors.append(MARKER_FILE)
            for name, digest in (state.get("files") or {}).items():
                if _sha256(path / name) != digest:
                    return f"{name} does not match its checksum in {STATE_FILE}"
            for name in tensors:
                _load_tensors(path / name)
        except _Damaged as err:
            return str(err)
        except OSError as err:  # unreadable is not damaged: nothing is moved
            raise NrtError(f"{path}: cannot read the checkpoint ({err.strerror})") from None
        return None

    def _write_latest(self, source: Path) -> None:
        """adapters/ becomes a copy of the adapter files of checkpoint directory ``source``."""
        tmp, commit = atomic_dir(self.adapters, "adapters")
        try:
            for name in ADAPTER_FILES:
                if (source / name).exists():
                    shutil.copy2(source / name, tmp / name)
            commit()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # -- metrics ---------------------------------------------------------------------------

    def log_metrics(self, record: dict[str, Any]) -> None:
        with self._writing(self.metrics.name):
            append_jsonl(self.metrics, record)

    def log_sample(self, record: dict[str, Any]) -> None:
        with self._writing(self.samples.name):
            append_jsonl(self.samples, record)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics)

    def truncate_logs(self, step: int) -> None:
        """Drop log lines after ``step``: a resumed run rewrites them exactly."""
        for path in (self.metrics, self.samples):
            if path.exists():
                kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
                with self._writing(path.name):
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
        """Write checkpoint ``step``, make adapters/ its copy, then remove all but the ``keep``
        newest checkpoints (0: keep all). A failed write is a one-line error and leaves the
        previous checkpoint as it was."""
        with self._writing(f"checkpoint step {step}"):
            path = self._write_checkpoint(step, model, optimizer, adapter_config, state)
        # The latest adapters are the checkpoint's: copy the files rather than serialise again.
        with self._writing(f"{self.adapters.name}/ of step {step}"):
            self._write_latest(path)
        if keep > 0:
            for old in self.step_dirs()[:-keep]:
                try:
                    remove_dir(self.checkpoint_dir(old), "checkpoint.prune")
                except OSError as err:  # the new checkpoint is safe: training goes on
                    print(
                        f"warning: {self.checkpoint_dir(old)}: could not remove this old "
                        f"checkpoint ({err.strerror}); remove it by hand",
                        file=sys.stderr,
                        flush=True,
                    )
        return path

    def _write_checkpoint(
        self,
        step: int,
        model: nn.Module,
        optimizer: optim.Optimizer,
        adapter_config: dict,
        state: dict[str, Any],
    ) -> Path:
        tmp, commit = atomic_dir(self.checkpoint_dir(step), "checkpoint")
        try:
            write_adapters_into(model, adapter_config, tmp)
            fault_point("checkpoint.adapters")
            # Sorted: a resumed optimizer's state is in load order, a fresh one's in creation
            # order, and the same state must give the same bytes.
            opt_state = dict(sorted(tree_flatten(optimizer.state)))
            mx.save_safetensors(str(tmp / OPTIMIZER_FILE), opt_state)
            fault_point("checkpoint.optimizer")
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
            record = {"step": step, **state, "files": files}
            (tmp / STATE_FILE).write_text(json.dumps(record, indent=2))
            fault_point("checkpoint.state")
            return commit()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """A failed write of ``what`` (a full disk above all) becomes a one-line error naming the
        run directory and the checkpoint a resume starts from."""
        try:
            yield
        except (OSError, RuntimeError) as err:
            if not is_write_error(err):
                raise
            step = self.latest_checkpoint()
            fix = "free some space" if is_disk_full(err, self.root) else "fix it"
            command = f"'nrt-mlx train --resume {self.root}'"
            then = (
                f"continue from checkpoint step {step} with {command}"
                if step is not None
                else f"start it over with {command}"  # no checkpoint yet: it resumes from step 0
            )
            raise NrtError(
                f"run.dir {self.root}: {write_error_text(err, self.root)} while writing {what}; "
                f"{fix}, then {then}"
            ) from None

    def load_checkpoint(
        self, step: int, model: nn.Module, optimizer: optim.Optimizer
    ) -> dict[str, Any]:
        """Restore adapters and optimizer state; returns the saved training state."""
        path = self.checkpoint_dir(step)
        state_file = path / STATE_FILE
        if not state_file.exists():
            raise NrtError(f"{path}: not a complete checkpoint (state.json missing)")
        load_adapter_weights(model, path)
        opt = mx.load(str(path / OPTIMIZER_FILE))
        optimizer.state = tree_unflatten(list(opt.items()))
        mx.eval(optimizer.state)
        return json.loads(state_file.read_text())


class _Damaged(Exception):
    """A checkpoint file that is missing or does not load; the message says which and how."""


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise _Damaged(f"{path.name} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _Damaged(f"{path.name} is not valid JSON") from None
    if not isinstance(data, dict):
        raise _Damaged(f"{path.name} is not a JSON object")
    return data


def _load_tensors(path: Path) -> None:
    if not path.exists():
        raise _Damaged(f"{path.name} is missing")
    try:
        mx.load(str(path))  # reads the header and checks every tensor's extent against the size
    except (RuntimeError, ValueError) as err:
        raise _Damaged(f"{path.name} does not load: {first_line(err)}") from None


def _sha256(path: Path) -> str:
    if not path.exists():
        raise _Damaged(f"{path.name} is missing")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _same_file(a: Path, b: Path) -> bool:
    """Both missing, or both there with the same bytes."""
    if not a.exists() or not b.exists():
        return a.exists() == b.exists()
    return filecmp.cmp(a, b, shallow=False)


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
    adapter_dir = RunDir(root).latest_adapters() if RunDir(root).recipe.exists() else root
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
