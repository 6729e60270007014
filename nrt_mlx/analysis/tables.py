"""Terminal tables of an evaluation report, and rich renderables as plain text."""

from __future__ import annotations

import io
from typing import Any

from nrt_mlx.evaluate import EvalReport


def render_text(renderables: list[Any], width: int = 120) -> str:
    """rich renderables as plain text (no colour codes)."""
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
    for item in renderables:
        console.print(item)
    return buffer.getvalue()


def eval_tables(report: EvalReport, max_rows: int = 20, width: int = 120) -> list[Any]:
    """rich Tables: the summary, then the first ``max_rows`` questions, for ``width`` columns."""
    from rich.table import Table

    summary = Table(title="evaluation", show_header=True)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for key, value in report.summary.items():
        summary.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return [summary, _question_table(report.questions, max_rows, width)]


def _question_table(questions: list[dict], max_rows: int, width: int) -> Any:
    """One line per question; the question text gets the width the numbers leave."""
    from rich.table import Table

    heads = ["line", "question", "null", "mean", "best", "gain", "EM", "flex", "F1", "think"]
    rows = [
        [
            str(q["line"]),
            q["question"],
            f"{q['null_nll']:.3f}",
            f"{q['trace_nll_mean']:.3f}",
            f"{q['trace_nll_best']:.3f}",
            f"{q['gain']:+.3f}",
            _fmt(q.get("exact_match")),
            _fmt(q.get("exact_match_flexible")),
            _fmt(q.get("f1")),
            f"{q['trace_tokens']:.0f}",
        ]
        for q in questions[:max_rows]
    ]
    # Each column takes its text + 2 padding + 1 border; the question gets the rest.
    numbers = sum(max(len(r[c]) for r in [heads, *rows]) + 3 for c in range(len(heads)) if c != 1)
    room = max(8, width - numbers - 4)
    table = Table(
        title=f"questions (first {len(rows)} of {len(questions)})",
        caption="answer NLL per token: null = no trace, mean / best of the K traces; "
        "gain = null - mean; EM = exact match of the whole answer (strict), flex = of the answer "
        "extracted from it (flexible); think = mean trace tokens",
    )
    for c, name in enumerate(heads):
        table.add_column(name, justify="left" if c == 1 else "right", no_wrap=c == 1)
    for row in rows:
        gain = float(row[5])
        style = "green" if gain > 0 else "red" if gain < 0 else None
        row[1] = _shorten(row[1], room)
        table.add_row(*row[:5], f"[{style}]{row[5]}[/]" if style else row[5], *row[6:])
    return table


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
