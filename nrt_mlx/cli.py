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


@app.command()
def train(
    recipe: Optional[str] = typer.Argument(None, help="YAML recipe (see recipes/reference.yaml)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.steps=10 (repeatable)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue RUN_DIR from its latest checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of a progress bar."),
) -> None:
    """Train LoRA adapters with NRT (or the SFT baseline) as RECIPE says."""
    from nrt_mlx import trainer
    from nrt_mlx.recipe import load_recipe

    if resume:
        if recipe:
            fail("give either a recipe or --resume RUN_DIR, not both")
        run_dir = trainer.resume(resume, quiet=quiet, overrides=set_)
    else:
        if not recipe:
            fail("missing recipe: nrt-mlx train RECIPE.yaml (or --resume RUN_DIR)")
        run_dir = trainer.train(load_recipe(recipe, set_), quiet=quiet)
    typer.echo(f"adapters: {run_dir / 'adapters'}")


@app.command()
def doctor() -> None:
    """Report the device, MLX backend, BLAS in use and memory."""
    from nrt_mlx.doctor import report

    for key, value in report().items():
        typer.echo(f"{key:>14}: {value}")


# ---- convert (issue 4) -----------------------------------------------------------------------


# ---- fuse / upload (issue 5) -----------------------------------------------------------------


# ---- eval / plot / score / compare (issue 6) -------------------------------------------------


_ = Optional  # re-exported for command signatures
