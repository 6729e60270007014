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
def quickstart(
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe (default: recipes/quickstart.yaml)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.steps=4 (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of a progress bar."),
) -> None:
    """Train SmolLM2-135M (fetched and converted once) with NRT on the bundled data."""
    from nrt_mlx.quickstart import run_quickstart

    run_quickstart(recipe, set_, quiet)


@app.command()
def doctor() -> None:
    """Report the device, MLX backend, BLAS in use and memory."""
    from nrt_mlx.doctor import report

    for key, value in report().items():
        typer.echo(f"{key:>14}: {value}")


# ---- convert (issue 4) -----------------------------------------------------------------------


# ---- fuse / upload (issue 5) -----------------------------------------------------------------


@app.command()
def fuse(
    run_dir: str = typer.Argument(..., help="Run directory written by 'nrt-mlx train'."),
    out_dir: str = typer.Argument(..., help="Directory to write the standalone mlx-lm model to."),
    checkpoint: Optional[int] = typer.Option(
        None, "--checkpoint", help="Fuse the checkpoint of this step instead of the latest adapters."
    ),
    dequantize: bool = typer.Option(False, "--dequantize", help="Write dense weights for a quantized base."),
    export_gguf: bool = typer.Option(
        False, "--export-gguf", help="Also write model.gguf (Llama/Mistral, dense weights)."
    ),
    upload_repo: Optional[str] = typer.Option(
        None, "--upload-repo", help="Then upload the model to this Hugging Face repo (owner/name)."
    ),
    private: bool = typer.Option(False, "--private", help="Create the uploaded repo as private."),
) -> None:
    """Merge a run's LoRA/DoRA adapters into the base: a model mlx_lm.generate runs as is."""
    from nrt_mlx.fuse import fuse_run

    if upload_repo:
        from nrt_mlx.hub import check_repo_id

        check_repo_id(upload_repo)  # fail before minutes of fusing, not after
    out = fuse_run(
        run_dir, out_dir, checkpoint=checkpoint, dequantize=dequantize, export_gguf=export_gguf,
        repo_id=upload_repo,
    )
    typer.echo(f"fused model written to {out}")
    typer.echo(f"try it: mlx_lm.generate --model {out} --prompt \"Why is the sky blue?\"")
    if upload_repo:
        _upload_or_list(out, upload_repo, private, dry_run=False)


@app.command()
def upload(
    out_dir: str = typer.Argument(..., help="Model directory written by 'nrt-mlx fuse'."),
    repo_id: str = typer.Argument(..., help="Hugging Face repo id, owner/name."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files that would be sent; send nothing."),
) -> None:
    """Upload a fused model directory to the Hugging Face Hub (token: HF_TOKEN or 'hf auth login')."""
    _upload_or_list(out_dir, repo_id, private, dry_run)


def _upload_or_list(folder: str, repo_id: str, private: bool, dry_run: bool) -> None:
    """Upload (or list) the folder; stdout gets exactly the file list, notes go to stderr."""
    from nrt_mlx.hub import hub_endpoint, upload_folder_to_hub

    files = upload_folder_to_hub(folder, repo_id, private=private, dry_run=dry_run)
    for name in files:
        typer.echo(name)
    if dry_run:
        typer.echo(f"dry run: {len(files)} files would be uploaded to {repo_id}; nothing was sent", err=True)
    else:
        typer.echo(f"uploaded {len(files)} files to {repo_id} on {hub_endpoint()}", err=True)


# ---- eval / plot / score / compare (issue 6) -------------------------------------------------


_ = Optional  # re-exported for command signatures
if __name__ == "__main__":
    main()
