"""One PNG of a training run (or several overlaid): what one would otherwise open a dashboard for.

Panels, each drawn when some run logged its figures: reward (mean, band of +-1 std), answer NLL
with the sampled trace (solid) and without it (null think, dashed), the loss and its terms, the
learning rate, trace length (mean, band from min to max), trace entropy, marker rate and
distinct-2, and the periodic evaluation (answer NLL, then exact match / F1 / accuracy). Steps are
whole numbers on every x axis. Each run has one colour, labelled with its directory name;
collapse warnings are dotted vertical lines in the run's colour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nrt_mlx.analysis.compare import RunLog, load_runs
from nrt_mlx.errors import NrtError


@dataclass(frozen=True)
class Line:
    key: str  # metric key in metrics.jsonl
    label: str  # suffix after the run name in the legend ("" = the run name alone)
    style: str | tuple = "-"  # a matplotlib line style: "-", "--", ":", "-." or a dash pattern
    band: tuple[str, str] | None = None  # keys of the lower and upper edge of a shaded band
    std: str | None = None  # key of a std: band mean +- std


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    lines: tuple[Line, ...]
    marks_collapse: bool = False
    scientific: bool = False  # y ticks as 2.0 with "1e-4" above, not 0.000200


PANELS = (
    Panel("reward", "trace reward R", (Line("reward_mean", "", std="reward_std"),)),
    Panel(
        "answer NLL (solid: after trace, dashed: no trace)",
        "NLL per answer token",
        (Line("answer_nll", "trace"), Line("null_answer_nll", "null", "--")),
    ),
    Panel(
        "loss (solid: total, dashed: trace, dotted: token, dash-dot: format)",
        "loss",
        (
            Line("loss", "total"),
            Line("trace_loss", "trace", "--"),
            Line("token_loss", "token", ":"),
            Line("format_loss", "format", "-."),
        ),
    ),
    Panel("learning rate", "learning rate", (Line("lr", ""),), scientific=True),
    Panel(
        "trace length",
        "tokens",
        (Line("trace_tokens_mean", "", band=("trace_tokens_min", "trace_tokens_max")),),
        marks_collapse=True,
    ),
    Panel("trace entropy", "nats per token", (Line("trace_entropy", ""),), marks_collapse=True),
    Panel(
        "marker rate (solid), distinct-2 (dashed)",
        "fraction",
        (Line("marker_rate", "marker"), Line("distinct_2", "distinct-2", "--")),
        marks_collapse=True,
    ),
    Panel(
        "eval: answer NLL (solid: after trace, dashed: no trace)",
        "NLL per answer token",
        (Line("eval_trace_nll_mean", "trace"), Line("eval_null_nll", "null", "--")),
    ),
    Panel(
        "eval: answers",
        "score",
        (
            Line("eval_f1", "F1"),
            Line("eval_exact_match", "EM", "--"),
            Line("eval_exact_match_flexible", "EM (flexible)", (0, (5, 1, 1, 1))),
            Line("eval_mc_acc_likelihood", "acc (likelihood)", ":"),
            Line("eval_mc_acc_generated", "acc (generated)", "-."),
        ),
    ),
)


def panels_for(runs: list[RunLog]) -> list[Panel]:
    """The panels some run has data for."""
    return [p for p in PANELS if any(run.has(line.key) for run in runs for line in p.lines)]


def _draw_line(ax: Any, run: RunLog, line: Line, color: str) -> bool:
    steps, values = run.series(line.key)
    if not steps:
        return False
    label = run.name if not line.label else f"{run.name} {line.label}"
    marker = "o" if len(steps) <= 20 else None  # sparse series (evals) need visible points
    ax.plot(
        steps,
        values,
        linestyle=line.style,
        color=color,
        label=label,
        marker=marker,
        markersize=3,
        linewidth=1.4,
    )
    edges = None
    if line.band:
        low, high = dict(zip(*run.series(line.band[0]))), dict(zip(*run.series(line.band[1])))
        edges = [(s, low[s], high[s]) for s in steps if s in low and s in high]
    elif line.std:
        std = dict(zip(*run.series(line.std)))
        edges = [(s, v - std[s], v + std[s]) for s, v in zip(steps, values) if s in std]
    if edges:
        xs, lo, hi = zip(*edges)
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
    return True


def _draw_panel(ax: Any, panel: Panel, runs: list[RunLog], colors: list[str]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 2.5 on a short run
    if panel.scientific:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    for run, color in zip(runs, colors):
        for line in panel.lines:
            _draw_line(ax, run, line, color)
        if panel.marks_collapse:
            for step, _ in run.collapse_warnings():
                ax.axvline(step, color=color, linestyle=":", linewidth=1.2)
    ax.legend(fontsize=7, loc="best")


def build_figure(runs: list[RunLog]) -> tuple[Any, list[str]]:
    """A matplotlib Figure with one panel per figure logged, and the panel titles.

    The Figure is made without pyplot, so it renders with Agg whatever backend the user has
    (no display needed: CI, SSH) and leaves no global pyplot state behind.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    panels = panels_for(runs)
    if not panels:
        raise NrtError("nothing to plot: the runs' metrics.jsonl hold none of the plotted figures")
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(6.5 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    colors = [colormaps["tab10"](i % 10) for i in range(len(runs))]
    flat = axes.flatten()
    for ax, panel in zip(flat, panels):
        _draw_panel(ax, panel, runs, colors)
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("NRT: " + ", ".join(run.name for run in runs), fontsize=12)
    fig.tight_layout()
    return fig, [p.title for p in panels]


def default_output(paths: list[str | Path]) -> Path:
    """RUN_DIR/plot.png for one run; nrt_plot.png in the current directory for several."""
    return Path(paths[0]) / "plot.png" if len(paths) == 1 else Path("nrt_plot.png")


def plot_runs(paths: list[str | Path], out: str | Path | None = None, dpi: int = 100) -> Path:
    """Write the PNG of one or several runs; returns its path."""
    runs = load_runs(paths)
    out = Path(out) if out else default_output(paths)
    if out.suffix.lower() != ".png":
        raise NrtError(f"--out {out}: the plot is a PNG; give a file name ending in .png")
    fig, _ = build_figure(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out
