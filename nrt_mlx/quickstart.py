"""``nrt-mlx quickstart``: real NRT training on a real model, with nothing to download by hand.

Gets the offline SmolLM2-135M-Instruct (``nrt_mlx.export.default_model``), trains with
``recipes/quickstart.yaml`` on the bundled data, and prints the held-out answer log-likelihood
before and after training, a few sample traces, and the commands that fuse, try, evaluate and
upload the run.

The bundled recipes and data are the repository's ``recipes/`` folder, installed as the package
``nrt_mlx.recipes`` (pyproject.toml), so they are found in a clone and in an installed wheel alike.
"""

from __future__ import annotations

import re
import shlex
from importlib.resources import files
from pathlib import Path

from nrt_mlx.data import HF_PREFIX
from nrt_mlx.errors import NrtError
from nrt_mlx.evaluate import EvalReport
from nrt_mlx.recipe import Recipe, load_recipe
from nrt_mlx.rundir import RunDir

RECIPES_PACKAGE = "nrt_mlx.recipes"
DEFAULT_RECIPE_NAME = "quickstart.yaml"


def bundled_path(name: str = "") -> Path:
    """A bundled recipe or data file (``"data/train.jsonl"``), or the folder itself for ``""``."""
    root = files(RECIPES_PACKAGE)
    if not isinstance(root, Path):  # a zip import: recipes load from real files only
        raise NrtError(
            f"{root}: nrt-mlx is installed inside an archive; install it with pip to use its "
            "bundled recipes, or pass --recipe"
        )
    return root / name if name else root


def load_quickstart_recipe(
    recipe_path: str | Path | None = None, overrides: list[str] | None = None
) -> tuple[Recipe, Path]:
    """The quickstart recipe (bundled unless ``recipe_path``) and its file; no model is loaded."""
    path = Path(recipe_path) if recipe_path else bundled_path(DEFAULT_RECIPE_NAME)
    if not path.exists():
        raise NrtError(f"{path}: quickstart recipe not found (pass --recipe RECIPE.yaml)")
    return load_recipe(path, overrides), path


def _fresh_run_dir(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``...: a quickstart never overwrites an earlier run."""
    candidate, n = path, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def run_quickstart(
    recipe_path: str | Path | None = None,
    overrides: list[str] | None = None,
    quiet: bool = False,
    eval_questions: int = 12,
) -> Path:
    """Train the quickstart recipe on the default model; returns the run directory."""
    from nrt_mlx.export.default_model import default_model_dir
    from nrt_mlx.session import ready_to_train

    recipe, path = load_quickstart_recipe(recipe_path, overrides)
    if not recipe.model.path:
        print(
            "Getting the default model (SmolLM2-135M-Instruct, converted once and cached)...",
            flush=True,
        )
        recipe.model.path = str(default_model_dir())
    recipe.run.dir = str(_fresh_run_dir(Path(recipe.run.dir)))
    ready_to_train(recipe, False, str(path))
    with RunDir(Path(recipe.run.dir)).claim():  # held for the whole run, as `train` does
        return _train_and_report(recipe, quiet, eval_questions)


def _train_and_report(recipe: Recipe, quiet: bool, eval_questions: int) -> Path:
    """Evaluate the held-out split, train, evaluate again, print the figures and a few traces."""
    from nrt_mlx.evaluate import eval_config, evaluate
    from nrt_mlx.trainer import run_training, start_run

    session = start_run(recipe)
    print(session.data_report, flush=True)
    held_out = [e.example for e in (session.valid or session.train)]
    cfg = eval_config(
        recipe.rollout,
        samples=2,
        seed=recipe.train.seed,
        max_questions=eval_questions,
        generate=False,
    )
    model, vocab = session.loaded.model, session.vocab
    before = evaluate(model, vocab, held_out, cfg)
    print(f"held-out answer NLL/token before: {_nll_line(before.summary)}", flush=True)
    run_training(session, 0, quiet)
    after = evaluate(model, vocab, held_out, cfg)
    before.to_json(session.run.root / "eval_before.json")
    after.to_json(session.run.root / "eval_after.json")
    print(f"held-out answer NLL/token before: {_nll_line(before.summary)}")
    print(f"held-out answer NLL/token after:  {_nll_line(after.summary)}")
    print(
        f"held-out answer log-likelihood per token: {-before.summary['null_nll']:.3f} -> "
        f"{-after.summary['null_nll']:.3f} (no reasoning), {-before.summary['trace_nll_mean']:.3f} -> "
        f"{-after.summary['trace_nll_mean']:.3f} (after sampled reasoning)"
    )
    _print_samples(after)
    print(f"run directory: {session.run.root}")
    question = held_out[0].question if held_out else "Why is the sky blue?"
    print("next steps:")
    for why, command in next_steps(recipe, question):
        print(f"  # {why}\n  {command}")
    return session.run.root


def next_steps(recipe: Recipe, question: str) -> list[tuple[str, str]]:
    """(what it does, shell command): fuse the run, try the fused model, evaluate, upload.

    Paths are the run's own, relative to the working folder when inside it (so they stay short).
    """
    run = Path(recipe.run.dir)
    fused = run.with_name(f"{run.name}-fused")
    data = recipe.data.valid or recipe.data.train
    max_tokens = recipe.rollout.max_think_tokens + recipe.data.max_answer_tokens
    # The run's name as a valid Hub repo name (letters, digits, "_", ".", "-").
    repo_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", run.name).strip("-.") or "nrt-model"
    run_q, fused_q = (shlex.quote(_short(p)) for p in (run, fused))
    # A Hub dataset (hf:owner/name[:split]) is no path: given to eval as it is.
    data_q = shlex.quote(data if data.startswith(HF_PREFIX) else _short(Path(data)))
    return [
        (
            "merge the adapters into the base: a standalone mlx-lm model",
            f"nrt-mlx fuse {run_q} {fused_q}",
        ),
        (
            "ask it a held-out question (it writes its reasoning, the marker, then the answer)",
            f"mlx_lm.generate --model {fused_q} --prompt {shlex.quote(question)} "
            f"--max-tokens {max_tokens}",
        ),
        (
            "held-out answer NLL with and without reasoning, EM/F1",
            f"nrt-mlx eval --adapter {run_q} --data {data_q}",
        ),
        (
            "share it on the Hugging Face Hub (--dry-run lists the files; drop it to upload)",
            f"nrt-mlx upload {fused_q} YOUR_HF_NAME/{repo_name} --dry-run",
        ),
    ]


def _short(path: Path) -> str:
    """``path`` relative to the working folder when it is inside it, else absolute."""
    absolute = path.absolute()
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def _nll_line(summary: dict) -> str:
    return (
        f"no reasoning {summary['null_nll']:.3f}, after reasoning {summary['trace_nll_mean']:.3f} "
        f"(best of K {summary['trace_nll_best']:.3f})"
    )


def _print_samples(report: EvalReport, n: int = 3) -> None:
    print("sample traces (held-out questions):")
    for q in report.questions[:n]:
        trace = (q.get("generations") or [{}])[0].get("trace", "")
        print(
            f"  Q: {q['question']}\n  reference: {q['reference']}\n  trace: {trace.strip()[:200]!r}\n"
        )
