"""``nrt-mlx quickstart``: real NRT training on a real model, with nothing to download by hand.

Gets the offline SmolLM2-135M-Instruct (``nrt_mlx.export.default_model``), trains with
``recipes/quickstart.yaml`` on the bundled data, and prints the held-out answer log-likelihood
before and after training, and a few sample traces.
"""

from __future__ import annotations

from pathlib import Path

from nrt_mlx.errors import NrtError
from nrt_mlx.evaluate import EvalReport
from nrt_mlx.recipe import Recipe, load_recipe
from nrt_mlx.rundir import RunDir

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"


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
    from nrt_mlx.trainer import ready_to_train

    path = Path(recipe_path) if recipe_path else DEFAULT_RECIPE
    if not path.exists():
        raise NrtError(
            f"{path}: quickstart recipe not found (run from a clone of nrt-mlx, or pass --recipe)"
        )
    recipe = load_recipe(path, overrides)
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
    return session.run.root


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
