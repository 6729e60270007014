"""The ``nrt-mlx`` command: a thin Typer layer over the Python API.

Each command parses its arguments, calls one API function and turns ``NrtError`` into a one-line
message with exit status 2 (see ``run_cli``).
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from nrt_mlx.errors import NrtError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Native Reasoning Training on MLX: train, evaluate, fuse and share reasoning models.",
)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def main() -> None:
    """Console-script entry point: user errors become one line, never a traceback."""
    try:
        app()
    except NrtError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


# ---- train (issue 3) -------------------------------------------------------------------------


# ---- convert (issue 4) -----------------------------------------------------------------------


# ---- fuse / upload (issue 5) -----------------------------------------------------------------


# ---- eval / plot / score / compare (issue 6) -------------------------------------------------


_ = Optional  # re-exported for command signatures
