"""The ``nrt-mlx`` command: a thin Typer layer over the Python API.

Each command parses its arguments, calls one API function and turns ``NrtError`` into a one-line
message with exit status 2 (see ``command``).
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from nrt_mlx.errors import NrtError

app = typer.Typer(
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Native Reasoning Training on MLX: train, evaluate, fuse and share reasoning models.",
)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def command(*args: Any, **kwargs: Any) -> Callable[[Callable], Callable]:
    """``app.command`` whose NrtError becomes ``error: ...`` and exit status 2, never a traceback,
    and whose Ctrl-C becomes one line (training: where the last checkpoint is and how to continue)
    and exit status 130 (inside the command, so typer's CliRunner sees the same as a terminal)."""

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*a: Any, **k: Any) -> Any:
            try:
                return fn(*a, **k)
            except NrtError as err:
                fail(str(err))
            except KeyboardInterrupt as err:
                typer.echo(str(err) or "interrupted", err=True)
                raise typer.Exit(130) from None

        return app.command(*args, **kwargs)(run)

    return register


def version_text() -> str:
    """``nrt-mlx X.Y.Z (mlx A, mlx-lm B)``: the versions installed, as bug reports need them."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"nrt-mlx {installed('nrt-mlx')} (mlx {installed('mlx')}, mlx-lm {installed('mlx-lm')})"


def _print_version(given: bool) -> None:
    if given:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the versions of nrt-mlx, mlx and mlx-lm, and exit.",
    ),
) -> None:
    pass


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


TRUST_HELP = (
    "Let the model run its own Python code from the Hub (tokenizer code). A recipe's "
    "model.trust_remote_code alone never does: it needs this flag."
)


# mlx-lm's option names are accepted beside nrt-mlx's where they mean the same (mlx_lm.generate:
# --adapter-path, --max-tokens, --temp, --top-p, --seed): one option with two names, never two
# options that could disagree.
ADAPTER_NAMES = ("--adapter-path", "--adapter")
ADAPTER_HELP = "RUN_DIR, RUN_DIR/checkpoints/step_N or an adapter dir (--adapter: the same)."
MAX_THINK_NAMES = ("--max-think", "--max-tokens")
TEMP_HELP = "Sampling temperature of the traces, > 0 (default: the run's, else 1.0)."
TOP_P_HELP = "Nucleus (top-p) sampling of the traces, in (0, 1] (default: the run's, else 1.0)."


# The options of eval and score that set the sampler, by RolloutConfig field: recipe.rollout_problem
# names a bad value by the option it came from.
SAMPLER_OPTIONS = {
    "samples": "--samples",
    "max_think_tokens": MAX_THINK_NAMES[0],
    "temperature": "--temp",
    "top_p": "--top-p",
}
HF_CONFIG_HELP = "Configuration (subset) of an hf:owner/name --data, e.g. main for openai/gsm8k."


def check_out_file(out: str, flag: str) -> Path:
    """Refuse an output file that cannot be written, before the work whose result it keeps."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise NrtError(
            f"{flag} {out}: is a directory; give a file path, e.g. {path / 'report.json'}"
        )
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise NrtError(f"{flag} {out}: {folder} is a file, not a directory; choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".nrt-mlx-write-test-")
    except OSError as err:
        raise NrtError(
            f"{flag} {out}: cannot write in {folder} ({err.strerror}); choose another path"
        ) from None
    os.close(fd)
    os.unlink(probe)
    return path


# ---- train -----------------------------------------------------------------------------------


@command()
def train(
    recipe: str | None = typer.Argument(
        None, help="YAML recipe (see recipes/reference.yaml), or an mlx-lm LoRA config."
    ),
    config: str | None = typer.Option(
        None,
        "--config",
        "-c",
        help="An mlx-lm LoRA config (lora_config.yaml): mapped onto a recipe, which is printed "
        "with a line per mlx-lm key, then trained. A recipe file is accepted too.",
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a key: --set train.steps=10 (repeatable)."
    ),
    print_recipe: bool = typer.Option(
        False, "--print-recipe", help="Print the recipe (resolved) and stop before training."
    ),
    resume: str | None = typer.Option(
        None, "--resume", help="Continue RUN_DIR from its latest checkpoint."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Plain log lines instead of a progress bar."
    ),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Train LoRA adapters with NRT (or the SFT baseline) as RECIPE says.

    --resume RUN_DIR --set KEY=VALUE changes a key from the run's next step on, recorded in RUN_DIR/recipe.yaml; keys that fix what the run saved (model, LoRA shape, marker, method, aggregator, mini_batches, updates_per_rollout) are refused.
    """
    import yaml

    from nrt_mlx import trainer
    from nrt_mlx.distributed import join
    from nrt_mlx.mlxlm_config import import_mlxlm_config, mlxlm_config_in
    from nrt_mlx.recipe import load_recipe, with_remote_code

    if recipe and config:
        fail("give either a recipe or --config FILE, not both")
    group = join()  # the ranks of mlx.launch (one process without it); rank 0 alone prints
    recipe = recipe or config
    if resume:
        if recipe or print_recipe:
            fail("--resume RUN_DIR takes no recipe, --config or --print-recipe")
        run_dir = trainer.resume(
            resume, quiet=quiet, overrides=set_, trust_remote_code=trust_remote_code, group=group
        )
    else:
        if not recipe:
            fail("missing recipe: nrt-mlx train RECIPE.yaml (or --resume RUN_DIR)")
        mlxlm = mlxlm_config_in(recipe)  # None: a recipe (load_recipe names what is wrong)
        if mlxlm is not None:
            imported = import_mlxlm_config(recipe, set_, mlxlm)
            typer.echo(imported.report(recipe))
            loaded = imported.recipe
        else:
            loaded = load_recipe(recipe, set_)
        loaded.model = with_remote_code(loaded.model, trust_remote_code, recipe)
        if print_recipe:
            typer.echo(yaml.safe_dump(loaded.to_dict(), sort_keys=False), nl=False)
            return
        run_dir = trainer.train(
            loaded, quiet=quiet, trust_remote_code=trust_remote_code, group=group
        )
    typer.echo(f"adapters: {run_dir / 'adapters'}")


@command()
def quickstart(
    recipe: str | None = typer.Option(
        None, "--recipe", help="Recipe (default: recipes/quickstart.yaml)."
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a key: --set train.steps=4 (repeatable)."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Plain log lines instead of a progress bar."
    ),
) -> None:
    """Train SmolLM2-135M (fetched and converted once) with NRT on the bundled data."""
    from nrt_mlx.quickstart import run_quickstart

    run_quickstart(recipe, set_, quiet)


@command()
def doctor() -> None:
    """Report the device, MLX backend, BLAS in use and memory."""
    from nrt_mlx.doctor import report

    for key, value in report().items():
        typer.echo(f"{key:>14}: {value}")


@command()
def plan(
    recipe: str = typer.Argument(..., help="YAML recipe (see recipes/reference.yaml)."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a key: --set rollout.samples=8 (repeatable)."
    ),
    config: str | None = typer.Option(
        None, "--config", help="The model's config.json (or model dir, or .gguf) to plan with."
    ),
    backend: str | None = typer.Option(
        None, "--backend", help="Plan for metal, cuda or cpu (default: this machine's)."
    ),
    memory_gb: float | None = typer.Option(
        None, "--memory-gb", help="Memory to fit in (default: this machine's)."
    ),
) -> None:
    """The peak memory RECIPE will need, term by term, before any weight is loaded."""
    from nrt_mlx.plan import plan_text

    typer.echo(plan_text(recipe, set_, config, backend, memory_gb))


# ---- convert ---------------------------------------------------------------------------------


@command()
def convert(
    gguf: str = typer.Argument(
        ...,
        metavar="MODEL.gguf",
        help="GGUF file: Llama/Mistral, Qwen2, Qwen3; F32/F16/BF16, Q4_0-Q8_0, Q2_K-Q6_K (K-quants and BF16 need the gguf extra).",
    ),
    out_dir: str = typer.Argument(
        ...,
        metavar="OUT_DIR",
        help="mlx-lm model directory to write (an earlier conversion there is replaced).",
    ),
    dequantize: bool = typer.Option(
        False, "--dequantize", help="Write dense weights, not quantized ones."
    ),
    dtype: str | None = typer.Option(
        None,
        "--dtype",
        help="float16, bfloat16 or float32 (default: float16 on a GPU, float32 on the CPU).",
    ),
) -> None:
    """Convert a GGUF file (llama.cpp, Ollama, LM Studio) into an mlx-lm model directory."""
    from nrt_mlx.export.convert import convert_gguf

    out = convert_gguf(gguf, out_dir, dequantize=dequantize, dtype=dtype)
    typer.echo(str(out))


# ---- fuse / upload ---------------------------------------------------------------------------


@command()
def fuse(
    run_dir: str = typer.Argument(..., help="Run directory written by 'nrt-mlx train'."),
    out_dir: str = typer.Argument(..., help="Directory to write the standalone mlx-lm model to."),
    checkpoint: int | None = typer.Option(
        None,
        "--checkpoint",
        help="Fuse the checkpoint of this step instead of the latest adapters.",
    ),
    dequantize: bool = typer.Option(
        False, "--dequantize", help="Write dense weights for a quantized base."
    ),
    export_gguf: bool = typer.Option(
        False, "--export-gguf", help="Also write model.gguf (Llama/Mistral, dense weights)."
    ),
    upload_repo: str | None = typer.Option(
        None, "--upload-repo", help="Then upload the model to this Hugging Face repo (owner/name)."
    ),
    private: bool = typer.Option(False, "--private", help="Create the uploaded repo as private."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Merge a run's LoRA/DoRA adapters into the base: a model mlx_lm.generate runs as is."""
    from nrt_mlx.export.fuse import fuse_run

    if upload_repo:
        from nrt_mlx.export.hub import check_repo_id

        check_repo_id(upload_repo)  # fail before minutes of fusing, not after
    out = fuse_run(
        run_dir,
        out_dir,
        checkpoint=checkpoint,
        dequantize=dequantize,
        export_gguf=export_gguf,
        repo_id=upload_repo,
        trust_remote_code=trust_remote_code,
    )
    typer.echo(f"fused model written to {out}")
    typer.echo(f'try it: mlx_lm.generate --model {out} --prompt "Why is the sky blue?"')
    if upload_repo:
        _upload_or_list(out, upload_repo, private, dry_run=False)


@command()
def upload(
    out_dir: str = typer.Argument(..., help="Model directory written by 'nrt-mlx fuse'."),
    repo_id: str = typer.Argument(..., help="Hugging Face repo id, owner/name."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="List the files that would be sent; send nothing."
    ),
) -> None:
    """Upload a fused model directory to the Hugging Face Hub (token: HF_TOKEN or 'hf auth login')."""
    _upload_or_list(out_dir, repo_id, private, dry_run)


def _upload_or_list(folder: str, repo_id: str, private: bool, dry_run: bool) -> None:
    """Upload (or list) the folder; stdout gets exactly the file list, notes go to stderr."""
    from nrt_mlx.export.hub import hub_endpoint, upload_folder_to_hub

    files = upload_folder_to_hub(folder, repo_id, private=private, dry_run=dry_run)
    for name in files:
        typer.echo(name)
    if dry_run:
        typer.echo(
            f"dry run: {len(files)} files would be uploaded to {repo_id}; nothing was sent",
            err=True,
        )
    else:
        typer.echo(f"uploaded {len(files)} files to {repo_id} on {hub_endpoint()}", err=True)


# ---- eval / plot / score / compare -----------------------------------------------------------


def _print(renderables: list) -> None:
    """rich tables to stdout, in colour on a terminal."""
    from rich.console import Console

    console = Console()
    for item in renderables:
        console.print(item)


@command("eval")
def eval_(
    data: str = typer.Option(
        ...,
        "--data",
        help="JSONL of question/answer records (optional 'options'), a folder, or "
        "hf:owner/name[:split].",
    ),
    hf_config: str | None = typer.Option(
        None, "--hf-config", help=HF_CONFIG_HELP + " Default: the run's data.hf_config."
    ),
    model: str | None = typer.Option(
        None, "--model", help="Base model (default: the --adapter run's model)."
    ),
    adapter: str | None = typer.Option(None, *ADAPTER_NAMES, help=ADAPTER_HELP),
    samples: int = typer.Option(4, "--samples", help="Sampled traces per question (K)."),
    max_think: int | None = typer.Option(
        None,
        *MAX_THINK_NAMES,
        help="Token limit of each sampled trace (default: the run's, else 128).",
    ),
    temp: float | None = typer.Option(None, "--temp", help=TEMP_HELP),
    top_p: float | None = typer.Option(None, "--top-p", help=TOP_P_HELP),
    max_questions: int = typer.Option(
        0, "--max-questions", help="Evaluate the first N questions (0 = all)."
    ),
    max_answer: int = typer.Option(
        64, "--max-answer", help="Token limit of the generated answers."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Sampling seed: the same seed gives the same report."
    ),
    marker: str | None = typer.Option(
        None, "--marker", help="Answer marker (default: the run's, else auto)."
    ),
    no_generate: bool = typer.Option(
        False, "--no-generate", help="Skip the generated answers (likelihoods only)."
    ),
    extract: str | None = typer.Option(
        None,
        "--extract",
        help="Regex with one capture group: the answer the flexible match compares (default: "
        "the run's train.eval_extract, else the final number if the reference is one, "
        "else the first line).",
    ),
    out: str = typer.Option("eval_report.json", "--out", help="Where to write the JSON report."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Answer NLL with and without reasoning, generated-answer EM (strict and flexible) and F1,
    accuracy on options, traces."""
    from dataclasses import replace

    from rich.console import Console

    from nrt_mlx.analysis.tables import eval_tables
    from nrt_mlx.answers import compile_extract
    from nrt_mlx.data import load_data
    from nrt_mlx.evaluate import eval_config, evaluate, load_for_eval, run_extract, run_rollout
    from nrt_mlx.recipe import DataConfig, rollout_problem
    from nrt_mlx.rundir import find_adapters
    from nrt_mlx.vocab import Vocabulary

    check_out_file(out, "--out")  # before the evaluation, whose results it would lose
    compile_extract(extract, "--extract")
    source = find_adapters(adapter) if adapter else None
    recipe = source.recipe if source else None
    cfg = eval_config(
        run_rollout(source),
        samples=samples,
        max_think_tokens=max_think,
        temperature=temp,
        top_p=top_p,
        max_questions=max_questions,
        max_answer_tokens=max_answer,
        seed=seed,
        marker=marker,
        generate=not no_generate,
        extract=extract if extract is not None else run_extract(recipe),
    )
    problem = rollout_problem(cfg.rollout, "", SAMPLER_OPTIONS)
    if problem:  # before the data and the model load
        fail(problem)
    # The run's data section: same field names and system prompt as in training.
    data_cfg = recipe.data if recipe else DataConfig()
    if hf_config is not None:
        data_cfg = replace(data_cfg, hf_config=hf_config)
    dataset = load_data(data, data_cfg, "--data")
    loaded = load_for_eval(model, source, trust_remote_code=trust_remote_code)
    vocab = Vocabulary.of(loaded.tokenizer, cfg.rollout.marker)
    report = evaluate(loaded.model, vocab, dataset.examples, cfg)
    _print(eval_tables(report, width=Console().width))  # shown even if the file cannot be written
    path = report.to_json(out)
    typer.echo(f"report written to {path}")


@command()
def score(
    question: str = typer.Option(..., "--question", help="The question (one user turn)."),
    answer: str = typer.Option(..., "--answer", help="The reference answer to score."),
    model: str | None = typer.Option(
        None, "--model", help="Base model (default: the --adapter run's model)."
    ),
    adapter: str | None = typer.Option(None, *ADAPTER_NAMES, help=ADAPTER_HELP),
    trace: list[str] = typer.Option(
        [], "--trace", help="A reasoning trace to score (repeatable); else sample."
    ),
    samples: int = typer.Option(4, "--samples", help="Traces to sample when no --trace is given."),
    max_think: int | None = typer.Option(
        None, *MAX_THINK_NAMES, help="Token limit of each sampled trace."
    ),
    temp: float | None = typer.Option(None, "--temp", help=TEMP_HELP),
    top_p: float | None = typer.Option(None, "--top-p", help=TOP_P_HELP),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    marker: str | None = typer.Option(
        None, "--marker", help="Answer marker (default: the run's, else auto)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Per answer token: c_i, b_i and the weighted-sum weights; every aggregator's trace reward."""
    from dataclasses import replace

    from nrt_mlx.analysis.token_rewards import token_rewards
    from nrt_mlx.evaluate import load_for_eval, run_rollout
    from nrt_mlx.recipe import rollout_problem
    from nrt_mlx.rundir import find_adapters
    from nrt_mlx.vocab import Vocabulary

    source = find_adapters(adapter) if adapter else None
    given = {
        "samples": samples,
        "max_think_tokens": max_think,
        "temperature": temp,
        "top_p": top_p,
        "marker": marker,
    }
    rollout = replace(run_rollout(source), **{k: v for k, v in given.items() if v is not None})
    problem = rollout_problem(rollout, "", SAMPLER_OPTIONS)
    if problem:  # before the model loads
        fail(problem)
    loaded = load_for_eval(model, source, trust_remote_code=trust_remote_code)
    vocab = Vocabulary.of(loaded.tokenizer, rollout.marker)
    report = token_rewards(loaded.model, vocab, question, answer, trace or None, rollout, seed)
    if as_json:
        typer.echo(report.to_json())
    else:
        _print(report.tables())


@command()
def plot(
    run_dirs: list[str] = typer.Argument(..., help="One or more run directories (overlaid)."),
    out: str | None = typer.Option(
        None, "--out", help="PNG to write (default: RUN_DIR/plot.png, or nrt_plot.png)."
    ),
) -> None:
    """One PNG of reward, answer NLL, trace length, entropy and eval metrics over steps."""
    from nrt_mlx.analysis.plot import plot_runs

    path = plot_runs(run_dirs, out)
    typer.echo(f"plot written to {path}")


@command()
def compare(
    run_dirs: list[str] = typer.Argument(..., help="Run directories to compare."),
    last: int = typer.Option(
        5, "--last", help="Average the training metrics over the last N steps."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """One table of several runs' final training metrics and latest eval results."""
    from nrt_mlx.analysis.compare import compare_runs, compare_table, rows_to_json

    if last < 1:
        fail("--last must be at least 1")
    rows = compare_runs(run_dirs, last)
    if as_json:
        typer.echo(rows_to_json(rows))
    else:
        _print([compare_table(rows, last)])


if __name__ == "__main__":
    main()
