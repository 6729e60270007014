"""The peer of scripts/bench.py: mlx-lm-lora's GRPO trainer imitating NRT, one timed run.

Runs in the throwaway venv that bench.py creates (mlx-lm-lora installed, nrt-mlx not), as

    python bench_peer.py SPEC.json

SPEC (written by bench.py) holds the model folder, the prompts and answers exactly as nrt-mlx
tokenizes them (same chat template), the answer marker, K, the think budget, the LoRA layers and
rank, the sampling temperature, the steps and the seed. The policy is trained by mlx-lm-lora's
``train_grpo`` with beta 0; the only reward is NRT's: log p(answer | prompt + completion + marker),
scored by a second, frozen copy of the model. Per iteration the script prints one line
``BENCH {json}`` with the iteration's seconds (from the trainer's own ``iterations_per_second``)
split into generation, reward and the rest (the gradient step), and mlx's peak memory.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx_lm import load
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm_lora.trainer import grpo_trainer


def emit(record: dict) -> None:
    print("BENCH " + json.dumps(record), flush=True)


class Clock:
    """Seconds spent in a wrapped function during the current iteration."""

    def __init__(self) -> None:
        self.spent = {"generation": 0.0, "reward": 0.0}
        self.tokens = 0  # prompt + completion tokens of the iteration's rows (the gradient's input)
        self.generated = 0  # completion tokens of the iteration

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[name] += time.perf_counter() - start

        return timed


def answer_logprob_reward(model, tokenizer, spec: dict):
    """The reward function: the summed log-probs of the reference answer (with EOS) after
    prompt + completion + marker, all completions of the step in one forward pass."""
    marker_text, marker_ids = spec["marker_text"], spec["marker_ids"]
    examples = spec["examples"]

    def nrt_reward(prompts, completions, answer, types=None, **_) -> list[float]:
        rows, spans = [], []
        for key, text in zip(prompts, completions):
            ex = examples[int(key)]
            if marker_text and text.endswith(marker_text):  # the stop string is kept in the text
                text = text[: -len(marker_text)]
            context = ex["prompt"] + tokenizer.encode(text, add_special_tokens=False) + marker_ids
            rows.append(context + ex["answer"])
            spans.append((len(context), len(ex["answer"])))
        width = max(len(r) for r in rows)
        tokens = mx.array([r + [0] * (width - len(r)) for r in rows])
        logits = model(tokens[:, :-1]).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        pos = mx.arange(width - 1)[None]
        start = mx.array([s - 1 for s, _ in spans])[:, None]  # position predicting answer token 0
        count = mx.array([n for _, n in spans])[:, None]
        mask = (pos >= start) & (pos < start + count)
        return mx.where(mask, picked, 0).sum(axis=1).tolist()

    return nrt_reward


class Report(TrainingCallback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_loss_report(self, info: dict) -> None:
        seconds = 1.0 / info["iterations_per_second"]
        spent = self.clock.spent
        emit(
            {
                "step": info["iteration"],
                "seconds": seconds,
                "generation": spent["generation"],
                "reward": spent["reward"],
                "gradient": seconds - spent["generation"] - spent["reward"],
                "update_tokens": self.clock.tokens,
                "generated_tokens": self.clock.generated,
                "think_tokens_mean": info.get("train_average_generated_tokens"),
                "peak_memory_gb": info["peak_memory"],
            }
        )
        self.clock.spent = {k: 0.0 for k in spent}

    def on_val_loss_report(self, info: dict) -> None:
        pass


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    emit({"versions": {p: version(p) for p in ("mlx", "mlx-lm", "mlx-lm-lora")}})
    mx.random.seed(spec["seed"])
    np.random.seed(spec["seed"])  # mlx-lm-lora shuffles its batches with numpy
    model, tokenizer = load(spec["model"])
    judge, _ = load(spec["model"])  # the reward's own frozen copy
    judge.freeze()
    judge.eval()
    model.freeze()
    lora = {"rank": spec["lora_rank"], "scale": spec["lora_scale"], "dropout": 0.0}
    linear_to_lora_layers(model, spec["lora_layers"], lora)

    clock = Clock()
    generate = clock.wrap("generation", grpo_trainer.generate_grpo)

    def generate_counted(*args, **kwargs):
        completions, texts, indices = generate(*args, **kwargs)
        prompts = kwargs["prompt_tokens"]
        clock.generated = sum(c.size for c in completions)
        clock.tokens = sum(len(prompts[i]) for i in indices) + clock.generated
        return completions, texts, indices

    # train_grpo looks these names up in its module at call time: timing wrappers, nothing else.
    grpo_trainer.generate_grpo = generate_counted
    grpo_trainer._rollout_rewards = clock.wrap("reward", grpo_trainer._rollout_rewards)

    # (prompt ids, answer ids, prompt text, answer text): the texts are keys the reward looks up.
    dataset = [
        (ex["prompt"], ex["answer"], str(i), str(i)) for i, ex in enumerate(spec["examples"])
    ]
    with tempfile.TemporaryDirectory() as tmp:
        args = grpo_trainer.GRPOTrainingArgs(
            batch_size=spec["questions"],
            iters=spec["steps"],
            steps_per_report=1,
            steps_per_save=spec["steps"] + 1,
            adapter_file=str(Path(tmp) / "adapters.safetensors"),
            group_size=spec["samples"],
            beta=0.0,
            max_completion_length=spec["think"],
            temperature=spec["temperature"],
            top_p=spec["top_p"],
            top_k=0,  # off, as in nrt-mlx's sampler
            min_p=0.0,
        )
        grpo_trainer.train_grpo(
            model=model,
            ref_model=None,
            tokenizer=tokenizer,
            optimizer=optim.AdamW(learning_rate=spec["learning_rate"]),
            train_dataset=dataset,
            reward_funcs=[answer_logprob_reward(judge, tokenizer, spec)],
            args=args,
            training_callback=Report(clock),
            end_answer_token=spec["marker_text"],
        )


if __name__ == "__main__":
    main()
