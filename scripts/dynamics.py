"""Training dynamics on the real model: the answer marker and the trace length over a longer run.

Runs NRT on SmolLM2-135M-Instruct (the quickstart's model and bundled data) once per marker
setting, side by side with the same seed, then prints the first and last ten steps' means of the
figures that show whether the model learns to write the marker (marker rate), keeps reasoning
(trace length, entropy) and whether the traces help (answer NLL after the trace against no trace),
and writes one plot of all runs.

    python scripts/dynamics.py                       # 40 steps, auto (EOS-started) vs text marker
    python scripts/dynamics.py --steps 10 --out runs/dyn --variant auto

Each variant is a recipe override of recipes/quickstart.yaml; the runs land in OUT/<variant>.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from nrt_mlx.analysis.compare import load_run
from nrt_mlx.analysis.plot import plot_runs
from nrt_mlx.export.default_model import default_model_dir
from nrt_mlx.recipe import load_recipe
from nrt_mlx.trainer import train

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "auto": ["rollout.marker=auto"],  # an unused special token started from EOS's rows
    "text": ['rollout.marker="\\nAnswer:\\n"'],  # the 0.1 quickstart's text marker (YAML-quoted)
}
FIGURES = (
    ("marker_rate", "marker rate"),
    ("trace_tokens_mean", "trace tokens"),
    ("trace_entropy", "trace entropy"),
    ("answer_nll", "answer NLL after trace"),
    ("null_answer_nll", "answer NLL no trace"),
    ("reward_mean", "reward"),
)


def run_variant(name: str, steps: int, out: Path, extra: list[str]) -> Path:
    overrides = VARIANTS[name] + [
        f"model.path={default_model_dir()}",
        f"train.steps={steps}",
        f"run.dir={out / name}",
        "run.save_every=1000",
        *extra,
    ]
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", overrides)
    shutil.rmtree(out / name, ignore_errors=True)
    return train(recipe, quiet=True)


def _finished(run: Path, steps: int) -> bool:
    return (run / "metrics.jsonl").exists() and load_run(run).last_step() >= steps


def summary(run: Path, window: int = 10) -> dict[str, tuple[float, float]]:
    log = load_run(run)
    out = {}
    for key, _ in FIGURES:
        _, values = log.series(key)
        if values:
            head, tail = values[:window], values[-window:]
            out[key] = (sum(head) / len(head), sum(tail) / len(tail))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "dynamics")
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    parser.add_argument("--set", action="append", default=[], help="extra recipe override")
    parser.add_argument("--reuse", action="store_true", help="keep runs that already finished")
    args = parser.parse_args()
    names = args.variant or list(VARIANTS)
    runs = [
        args.out / name
        if args.reuse and _finished(args.out / name, args.steps)
        else run_variant(name, args.steps, args.out, args.set)
        for name in names
    ]
    print(f"{'figure':<24}" + "".join(f"{name + ' first10 -> last10':>30}" for name in names))
    tables = [summary(r) for r in runs]
    for key, label in FIGURES:
        cells = [
            f"{t[key][0]:>13.3f} -> {t[key][1]:<13.3f}" if key in t else f"{'-':>30}"
            for t in tables
        ]
        print(f"{label:<24}" + "".join(f"{c:>30}" for c in cells))
    png = plot_runs(runs, args.out / "dynamics.png")
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
