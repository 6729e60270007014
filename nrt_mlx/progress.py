"""Training progress: a live bar (rich) or plain log lines (``--quiet``, or no terminal)."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def format_metrics(m: dict[str, Any]) -> str:
    parts = [f"step {m['step']}"]
    for key, label, fmt in (
        ("loss", "loss", ".4f"),
        ("reward_mean", "reward", ".4g"),
        ("answer_nll", "nll", ".3f"),
        ("null_answer_nll", "nll0", ".3f"),
        ("trace_tokens_mean", "trace", ".1f"),
        ("marker_rate", "marker", ".2f"),
        ("trace_entropy", "entropy", ".2f"),
        ("sample_tokens_per_s", "sample tok/s", ".0f"),
        ("train_tokens_per_s", "train tok/s", ".0f"),
        ("lr", "lr", ".2e"),
    ):
        if key in m and m[key] is not None:
            parts.append(f"{label} {m[key]:{fmt}}")
    return " | ".join(parts)


class Reporter:
    """Shows progress; ``warn`` prints a line that stays visible above the bar."""

    def __init__(
        self,
        total: int,
        start: int = 0,
        quiet: bool = False,
        log_every: int = 1,
        silent: bool = False,
    ) -> None:
        """``silent``: show nothing at all (ranks other than 0 under mlx.launch)."""
        self.log_every = max(1, log_every)
        self.silent = silent
        self.quiet = quiet or silent or not sys.stderr.isatty()
        self.console = Console(stderr=True)
        self.start_time = time.perf_counter()
        self.progress: Progress | None = None
        if not self.quiet:
            self.progress = Progress(
                TextColumn("[bold]NRT"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                transient=False,
            )
            self.task = self.progress.add_task(
                "train", total=total, completed=start, info="sampling..."
            )
            self.progress.start()

    def step(self, metrics: dict[str, Any]) -> None:
        if self.progress is not None:
            info = (
                f"reward {metrics.get('reward_mean', 0):.3g} | trace {metrics.get('trace_tokens_mean', 0):.0f} tok"
                f" | {metrics.get('sample_tokens_per_s', 0):.0f} tok/s"
            )
            self.progress.update(self.task, advance=1, info=info)
        elif metrics["step"] % self.log_every == 0 and not self.silent:
            elapsed = time.perf_counter() - self.start_time
            print(f"{format_metrics(metrics)} | {elapsed:.0f}s", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        if self.silent:
            return
        if self.progress is not None:
            self.progress.console.print(f"[bold yellow]warning:[/] {message}")
        else:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
