"""Several runs side by side: their final training metrics and latest evaluation in one table.

Also the run-directory reading that ``nrt_mlx.analysis.plot`` shares: ``load_runs`` turns RUN_DIRs into
per-key series of (step, value), whether the trainer logs evaluations on the step's own line or
on lines of their own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nrt_mlx.errors import NrtError
from nrt_mlx.rundir import RunDir

# Training metrics: (key, label, format).
TRAIN_METRICS = (
    ("loss", "loss", ".4g"),
    ("reward_mean", "reward", ".4g"),
    ("answer_nll", "answer NLL, trace", ".3f"),
    ("null_answer_nll", "answer NLL, no trace", ".3f"),
    ("trace_tokens_mean", "trace tokens", ".1f"),
    ("trace_entropy", "trace entropy", ".3f"),
    ("distinct_2", "distinct-2", ".2f"),
    ("marker_rate", "marker rate", ".2f"),
)

# Latest-evaluation figures (keys as the trainer logs them, with the "eval_" prefix).
EVAL_METRICS = (
    ("eval_null_nll", "eval NLL, no trace", ".3f"),
    ("eval_trace_nll_mean", "eval NLL, trace", ".3f"),
    ("eval_gain", "eval gain", "+.3f"),
    ("eval_exact_match", "eval exact match", ".2f"),
    ("eval_exact_match_flexible", "eval exact match (flexible)", ".2f"),
    ("eval_f1", "eval F1", ".2f"),
    ("eval_mc_acc_likelihood", "eval accuracy", ".2f"),
)


@dataclass
class RunLog:
    """One run's metrics.jsonl, and its recipe's method and aggregator when known."""

    name: str
    root: Path
    records: list[dict[str, Any]]
    method: str = ""
    aggregator: str = ""

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the records holding a finite number under ``key``."""
        steps, values = [], []
        for record in self.records:
            value = record.get(key)
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                steps.append(int(record.get("step", len(steps))))
                values.append(float(value))
        return steps, values

    def has(self, key: str) -> bool:
        return bool(self.series(key)[0])

    def last_step(self) -> int:
        steps = [int(r["step"]) for r in self.records if isinstance(r.get("step"), int)]
        return max(steps) if steps else 0

    def final(self, key: str, last: int = 5) -> float | None:
        """Mean of the last ``last`` values of ``key`` (single steps are noisy), or None."""
        _, values = self.series(key)
        return sum(values[-last:]) / len(values[-last:]) if values else None

    def latest(self, key: str) -> float | None:
        _, values = self.series(key)
        return values[-1] if values else None

    def collapse_warnings(self) -> list[tuple[int, str]]:
        """(step, message) of every collapse warning the trainer logged."""
        out = []
        for record in self.records:
            warning = record.get("collapse_warning")
            for message in warning if isinstance(warning, list) else [warning] if warning else []:
                out.append((int(record.get("step", 0)), str(message)))
        return out


def load_run(path: str | Path) -> RunLog:
    """Read a run directory; a missing directory or metrics file is a one-line error."""
    root = Path(path).expanduser()
    run = RunDir(root)
    if not root.is_dir():
        raise NrtError(f"{path}: no such run directory")
    if not run.metrics.exists():
        raise NrtError(
            f"{path}: not a run directory (no metrics.jsonl); give the run.dir of a training run"
        )
    records = run.read_metrics()
    if not records:
        raise NrtError(f"{path}: metrics.jsonl is empty; the run has not finished a step yet")
    method, aggregator = _recipe_names(run)
    return RunLog(root.name or str(root), root, records, method, aggregator)


def _recipe_names(run: RunDir) -> tuple[str, str]:
    """(train.method, objective.aggregator) from recipe.yaml, or blanks when it cannot be read."""
    if not run.recipe.exists():
        return "", ""
    try:
        recipe = run.read_recipe()
    except NrtError:
        return "", ""  # a recipe from another version must not stop a comparison
    return recipe.train.method, recipe.objective.aggregator


def load_runs(paths: list[str | Path]) -> list[RunLog]:
    """Read several runs; their names are the directory names, made unique with parent folders."""
    if not paths:
        raise NrtError("give at least one run directory")
    runs = [load_run(p) for p in paths]
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.root.resolve().parent.name}/{run.root.name}"
    return runs


def compare_runs(paths: list[str | Path], last: int = 5) -> list[dict[str, Any]]:
    """One dict per run: name, method, aggregator, steps, final training metrics, latest eval.

    Final training metrics are the mean of the last ``last`` steps; eval figures are the latest.
    """
    rows = []
    for run in load_runs(paths):
        row: dict[str, Any] = {
            "run": run.name,
            "method": run.method,
            "aggregator": run.aggregator,
            "steps": run.last_step(),
        }
        for key, _, _ in TRAIN_METRICS:
            row[key] = run.final(key, last)
        eval_steps, _ = run.series("eval_null_nll")
        row["eval_step"] = eval_steps[-1] if eval_steps else None
        for key, _, _ in EVAL_METRICS:
            row[key] = run.latest(key)
        warnings = run.collapse_warnings()
        row["collapse"] = f"step {warnings[0][0]}" if warnings else ""
        rows.append(row)
    return rows


def compare_table(rows: list[dict[str, Any]], last: int = 5) -> Any:
    """A rich Table of ``compare_runs`` rows: one column per run, one row per metric.

    Runs are columns so that a few runs with a dozen metrics fit an 80-column terminal; metrics
    no run has are left out, and a run with a collapse warning is shown in red.
    """
    from rich.table import Table

    table = Table(title=f"runs (training metrics: mean of the last {last} steps; eval: latest)")
    table.add_column("metric")
    for row in rows:
        table.add_column(
            str(row["run"]), justify="right", style="red" if row.get("collapse") else None
        )
    fields = [("method", "method", ""), ("aggregator", "aggregator", ""), ("steps", "steps", "d")]
    fields += list(TRAIN_METRICS) + [("eval_step", "eval step", "d")] + list(EVAL_METRICS)
    fields += [("collapse", "collapse warning", "")]
    for key, label, fmt in fields:
        values = [row.get(key) for row in rows]
        if all(v in (None, "") for v in values):
            continue
        cells = ["-" if v in (None, "") else format(v, fmt) if fmt else str(v) for v in values]
        table.add_row(label, *cells)
    return table


def rows_to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)
