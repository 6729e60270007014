"""Experiment tracking (``train.report_to``): every metrics.jsonl line also goes to Weights & Biases
and/or TensorBoard, as mlx-lm's ``--report-to`` and TRL's ``report_to`` users expect.

Each tracker is an optional extra (``pip install 'nrt-mlx[wandb]'``, ``'nrt-mlx[tensorboard]'``);
a missing one is a one-line error before the model loads (``require``). What is logged: the numeric
fields of each metrics line at its step, under the names metrics.jsonl uses; the recipe as the
run's config; the run's name is its directory's name.

- wandb: project ``train.report_project``; its files go to ``RUN/wandb/`` unless WANDB_DIR is
  set (WANDB_MODE=offline works as usual). The run id is kept in ``RUN/wandb_id``, so a resumed
  run continues the same wandb run. (mlx-lm's ``WandBCallback`` starts a new wandb run each time
  it is made, so it cannot continue one; the wandb API is used directly.)
- tensorboard: event files in ``RUN/tensorboard/``, through tensorboardX (no torch, no
  TensorFlow). A resumed run appends a new event file that first purges the steps after its
  checkpoint, as metrics.jsonl drops them, so TensorBoard shows what metrics.jsonl holds.

Tracking never stops a run: a tracker that fails to start or to log gets one warning and is off
for the rest of the run; metrics.jsonl keeps every step.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from nrt_mlx.errors import NrtError, first_line
from nrt_mlx.fileio import atomic_write_text

if TYPE_CHECKING:
    from nrt_mlx.recipe import Recipe

# tracker -> (the module it needs, the extra that installs it)
TRACKERS: dict[str, tuple[str, str]] = {
    "wandb": ("wandb", "wandb"),
    "tensorboard": ("tensorboardX", "tensorboard"),
}
WANDB_ID_FILE = "wandb_id"
TENSORBOARD_DIR = "tensorboard"


def report_targets(names: list[str], source: str) -> list[str]:
    """``train.report_to`` checked: known tracker names, lower case, without repeats; ``none``
    (Hugging Face's spelling of no tracker) and empty names are dropped."""
    out: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if name in ("", "none") or name in out:
            continue
        if name not in TRACKERS:
            raise NrtError(
                f"{source}: train.report_to: unknown tracker {raw!r}, valid: {', '.join(TRACKERS)}"
            )
        out.append(name)
    return out


def require(names: list[str]) -> None:
    """A one-line error naming the extra to install for a tracker whose package is missing (call
    it before the model loads: a run should not load for minutes and then fail on this)."""
    for name in names:
        module, extra = TRACKERS[name]
        try:
            __import__(module)
        except ImportError:
            raise NrtError(
                f"train.report_to: {name} needs the {module} package: "
                f"pip install 'nrt-mlx[{extra}]' (or remove {name} from train.report_to)"
            ) from None


def numeric_fields(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics line but its step (text such as collapse_warning is not a
    series)."""
    return {
        key: float(value)
        for key, value in record.items()
        if key != "step"
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


class _Tracker(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class WandbTracker:
    """One wandb run per run directory, continued on resume (its id is kept in the directory)."""

    def __init__(self, recipe: Recipe, root: Path, start_step: int) -> None:
        import wandb

        id_file = root / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = uuid.uuid4().hex[:12]
            atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(
            project=recipe.train.report_project,
            name=root.name,
            id=run_id,
            resume="allow",
            dir=None if os.environ.get("WANDB_DIR") else str(root),
            # Our progress bar redraws the terminal: wandb's copy of it would be noise.
            settings=wandb.Settings(console="off"),
        )
        # A resume may change keys (run.overrides): the config is the recipe as it is now.
        self.run.config.update(recipe.to_dict(), allow_val_change=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        # A resumed wandb run is at its last logged step: the steps a killed attempt logged after
        # the checkpoint come again with the same values (resume is exact), and wandb would
        # refuse each of them with a warning.
        if step >= self.run.step:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardTracker:
    """Scalars in RUN/tensorboard/, one event file per start; the recipe as a text summary."""

    def __init__(self, recipe: Recipe, root: Path, start_step: int) -> None:
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard drops the older files' events from this step on, which a
        # killed attempt may have logged past the checkpoint the run resumes from.
        # The file name tensorboardX makes has the time in seconds: the suffix keeps two starts in
        # one second apart, in the order TensorBoard must read them.
        self.writer = SummaryWriter(
            str(root / TENSORBOARD_DIR),
            purge_step=start_step + 1,
            filename_suffix=f".step{start_step:09d}.{os.getpid()}",
        )
        recipe_yaml = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
        self.writer.add_text("recipe", f"```yaml\n{recipe_yaml}```", start_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a step takes seconds: the file is current for a live TensorBoard

    def close(self) -> None:
        self.writer.close()


_MAKERS: dict[str, Callable[[Recipe, Path, int], _Tracker]] = {
    "wandb": WandbTracker,
    "tensorboard": TensorBoardTracker,
}


class Trackers:
    """The run's trackers; ``warn`` shows a line (above the progress bar while it runs)."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.warn = warn
        self.active: dict[str, _Tracker] = {}

    def start(self, recipe: Recipe, root: Path, start_step: int) -> None:
        """Start every tracker of ``train.report_to`` for a run continuing after ``start_step``."""
        for name in recipe.train.report_to:
            try:
                self.active[name] = _MAKERS[name](recipe, root, start_step)
            except Exception as err:  # wandb not logged in, an unwritable folder...
                self._off(name, "could not start", err)

    def log(self, record: dict[str, Any]) -> None:
        """Send one metrics line to every tracker still on."""
        values = numeric_fields(record)
        for name, tracker in list(self.active.items()):
            try:
                tracker.log(int(record["step"]), values)
            except Exception as err:
                self._off(name, "failed", err)

    def close(self) -> None:
        for name, tracker in list(self.active.items()):
            try:
                tracker.close()
            except Exception as err:
                self._off(name, "failed to close", err)
        self.active.clear()

    def _off(self, name: str, what: str, err: Exception) -> None:
        """One warning, then the tracker is off: training goes on, metrics.jsonl has every step."""
        tracker = self.active.pop(name, None)
        if tracker is not None:
            with suppress(Exception):
                tracker.close()
        self.warn(
            f"train.report_to: {name} {what} ({first_line(err)}); it is off for the rest of "
            "this run, training goes on and metrics.jsonl has every step"
        )
