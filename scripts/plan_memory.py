"""Measured against planned peak memory: real NRT runs of the tiny model and SmolLM2-135M.

Each setting trains 2 steps (so the second rollout also holds the AdamW state) in its own process
(gradient checkpointing patches the model class for the whole process) and reports
``mx.get_peak_memory()`` after ``mx.reset_peak_memory()``; the plan is ``nrt_mlx.plan`` from the
model's config.json. The data is one question repeated, and the recipe's prompt and answer limits
are set to its exact token lengths, so the run meets the limits the plan assumes (its worst case);
only traces that stop before the think budget make a run smaller than planned.

    python scripts/plan_memory.py            # tiny grid, then SmolLM2 (minutes on 2 cores)
    python scripts/plan_memory.py --tiny     # tiny grid only
    python scripts/plan_memory.py --one MODEL_DIR '{"rollout.samples": 4, ...}'
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
QUESTION = REPO / "recipes" / "data" / "train.jsonl"

# (label, --set overrides); every run: 2 steps, Q = 2, LoRA rank 8 on the last 2 (tiny) or 8 blocks.
TINY_GRID: list[dict[str, Any]] = [
    {"rollout.samples": 2, "rollout.max_think_tokens": 16},
    {"rollout.samples": 4, "rollout.max_think_tokens": 64},
    {"rollout.samples": 8, "rollout.max_think_tokens": 64},
    {"rollout.samples": 4, "rollout.max_think_tokens": 300},
    {"rollout.samples": 4, "rollout.max_think_tokens": 64, "train.grad_checkpoint": True},
    {"rollout.samples": 4, "rollout.max_think_tokens": 64, "train.micro_batch_questions": 1},
    {"rollout.samples": 4, "rollout.max_think_tokens": 64, "train.shared_prompt": False},
    {"rollout.samples": 4, "rollout.max_think_tokens": 64, "rollout.marker": "\nAnswer:"},
]
SMOL_GRID: list[dict[str, Any]] = [
    {"rollout.samples": 2, "rollout.max_think_tokens": 16},
    {"rollout.samples": 4, "rollout.max_think_tokens": 32},
    {"rollout.samples": 4, "rollout.max_think_tokens": 32, "train.grad_checkpoint": True},
    {"rollout.samples": 4, "rollout.max_think_tokens": 32, "train.micro_batch_questions": 1},
]


def uniform_data(model_dir: Path, folder: Path) -> tuple[Path, int, int]:
    """A JSONL of one question repeated, and its prompt and answer lengths in tokens."""
    from mlx_lm.utils import load_tokenizer

    from nrt_mlx.vocab import Vocabulary

    record = json.loads(QUESTION.read_text().splitlines()[0])
    path = folder / "train.jsonl"
    path.write_text((json.dumps(record) + "\n") * 8)
    vocab = Vocabulary.of(load_tokenizer(model_dir))
    messages = [{"role": "user", "content": record["question"]}]
    return path, len(vocab.encode_prompt(messages)), len(vocab.encode_answer(record["answer"]))


def recipe_for(model_dir: Path, run_dir: Path, settings: dict[str, Any]) -> Any:
    from nrt_mlx.recipe import load_recipe

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    data, prompt, answer = uniform_data(model_dir, run_dir.parent)
    tiny = "tiny" in model_dir.name
    base = {
        "model.path": str(model_dir),
        "data.train": str(data),
        "data.max_prompt_tokens": prompt,
        "data.max_answer_tokens": answer,
        "lora.layers": 2 if tiny else 8,
        "lora.rank": 8,
        "rollout.stop_at_special": False,
        # Nucleus of ~one token: near-greedy traces that run to the think budget (at top_p 1 a
        # random tiny model writes EOS or the marker every ~250 tokens), as the plan assumes.
        "rollout.top_p": 0.01,
        "train.steps": 2,
        "train.questions_per_step": 2,
        "run.dir": str(run_dir),
        "run.save_every": 100,
    }
    overrides = [
        f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in {**base, **settings}.items()
    ]
    empty = run_dir.parent / "empty.yaml"
    empty.write_text("{}\n")
    return load_recipe(empty, overrides)


def measure(model_dir: Path, settings: dict[str, Any]) -> tuple[float, float]:
    """Peak bytes of a real 2-step run, in this process, and its traces' mean length in tokens
    (the plan assumes the think budget)."""
    import mlx.core as mx

    from nrt_mlx.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_for(model_dir, Path(tmp) / "run", settings)
        mx.reset_peak_memory()
        run = train(recipe, quiet=True)
        peak = float(mx.get_peak_memory())
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        think = [s["trace_tokens_mean"] for s in steps if "trace_tokens_mean" in s]
        return peak, sum(think) / max(len(think), 1)


def measure_in_process(model_dir: Path, settings: dict[str, Any]) -> tuple[float, float]:
    """``measure`` in a fresh Python process (its last line: the peak and the mean trace)."""
    out = subprocess.run(
        [sys.executable, __file__, "--one", str(model_dir), json.dumps(settings)],
        capture_output=True,
        text=True,
        check=True,
    )
    peak, think = out.stdout.strip().splitlines()[-1].split()
    return float(peak), float(think)


def planned(model_dir: Path, settings: dict[str, Any]) -> float:
    from nrt_mlx.plan import make_plan, read_shape

    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe_for(model_dir, Path(tmp) / "run", settings)
        return make_plan(recipe, read_shape(model_dir), memory=float("inf")).peak


def tiny_model() -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import build_tiny_model

    return build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")


def table(models: list[tuple[str, Path, list[dict[str, Any]]]]) -> None:
    print("| model | settings | mean trace | measured MB | planned MB | planned / measured |")
    print("|---|---|---:|---:|---:|---:|")
    for name, model_dir, grid in models:
        for settings in grid:
            (got, think), plan = (
                measure_in_process(model_dir, settings),
                planned(model_dir, settings),
            )
            label = " ".join(f"{k.split('.')[-1]}={v!r}" for k, v in settings.items())
            print(
                f"| {name} | {label} | {think:.1f} | {got / 1e6:.1f} | {plan / 1e6:.1f} "
                f"| {plan / got:.2f} |",
                flush=True,
            )


def main(argv: list[str]) -> None:
    if argv[:1] == ["--one"]:
        print(*measure(Path(argv[1]), json.loads(argv[2])))
        return
    models = [("tiny", tiny_model(), TINY_GRID)]
    if "--tiny" not in argv:
        from nrt_mlx.export.default_model import default_model_dir

        models.append(("SmolLM2-135M", default_model_dir(), SMOL_GRID))
    table(models)


if __name__ == "__main__":
    main(sys.argv[1:])
