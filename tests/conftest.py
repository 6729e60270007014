"""Shared pytest fixtures: tiny model directories built once per test session.

Each directory is a random tiny Llama with a real BPE tokenizer (``tiny.py``); building one
takes well under a second. Load them with ``mlx_lm.load(str(dir))`` inside a test or a
module-scoped fixture, so that no test sees weights another test changed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import TinySpec, build_tiny_model

import nrt_mlx  # noqa: F401  first: it loads the system BLAS before anything imports mlx.core


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ChatML template, no BOS."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), TinySpec())


@pytest.fixture(scope="session")
def tiny_bos_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ChatML template, and a tokenizer that puts <s> in front of plain text."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_bos"), TinySpec(add_bos=True))


@pytest.fixture(scope="session")
def tiny_no_template_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No chat template (a base model), no BOS."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_plain"), TinySpec(chat_template=False))


@pytest.fixture(scope="session")
def tiny_bos_no_template_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No chat template, BOS tokenizer."""
    spec = TinySpec(add_bos=True, chat_template=False)
    return build_tiny_model(tmp_path_factory.mktemp("tiny_bos_plain"), spec)


# ---- fuse / upload ---------------------------------------------------------------------------

TINY_RUN_MARKER = "<|reserved_0|>"
TINY_BASE_README = """---
license: apache-2.0
language:
- en
---

# tiny base
"""


def _write_tiny_run(base: Path, run_dir: Path, quantize: str | int, lora_type: str) -> Path:
    """A finished run directory laid out as ``nrt_mlx.trainer`` writes it.

    recipe.yaml, adapters/ (= step 20), checkpoints step_000010 and step_000020 with different
    adapter weights, and metrics.jsonl with training lines and two evaluation lines. Built with the
    model API instead of by training, so the adapters move the logits clearly; to use the real
    trainer, replace this one function by a short ``nrt_mlx.trainer.train(recipe)`` run.
    """
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_unflatten

    from nrt_mlx.model import adapter_config, add_adapters, load_model
    from nrt_mlx.recipe import LoraConfig, Recipe, save_recipe
    from nrt_mlx.rundir import RunDir

    recipe = Recipe()
    recipe.model.path = str(base)
    recipe.model.quantize = quantize
    recipe.model.group_size = 32
    recipe.lora = LoraConfig(type=lora_type, layers=2, rank=4, scale=2.0)
    recipe.rollout.marker = TINY_RUN_MARKER
    recipe.train.steps = 20
    recipe.run.dir = str(run_dir)
    recipe.run.save_every = 10
    loaded = load_model(recipe.model)
    add_adapters(loaded.model, recipe.lora, recipe.train.seed)
    recipe.model.quantize = (
        loaded.bits if loaded.bits is not None else "none"
    )  # as the trainer records it
    extra = {
        "nrt_mlx": {
            "method": "nrt",
            "aggregator": recipe.objective.aggregator,
            "marker": TINY_RUN_MARKER,
        }
    }
    config = adapter_config(loaded, recipe.lora, extra)
    run = RunDir(run_dir)
    run.root.mkdir(parents=True)
    for step in range(1, recipe.train.steps + 1):
        run.log_metrics(
            {
                "step": step,
                "loss": 2.0 / step,
                "reward_mean": 0.01 * step,
                "reward_std": 0.5,
                "answer_nll": 3.0 - 0.1 * step,
                "null_answer_nll": 3.5,
                "trace_tokens_mean": 40.0 + step,
                "marker_rate": 0.9,
                "trace_entropy": 1.25,
                "lr": 1e-4,
            }
        )
        if step % 10 == 0:
            mx.random.seed(step)
            lora_b = [
                (k, 0.2 * mx.random.normal(v.shape))
                for k, v in tree_flatten(loaded.model.trainable_parameters())
                if k.endswith("lora_b")
            ]
            loaded.model.update(tree_unflatten(lora_b))
            run.save_checkpoint(
                step,
                loaded.model,
                optim.Adam(learning_rate=1e-4),
                config,
                {"position": step},
                keep=3,
            )
            run.log_metrics(
                {
                    "step": step,
                    "eval_answer_nll": 2.5 - 0.01 * step,
                    "eval_reward_mean": 0.02 * step,
                }
            )
    save_recipe(recipe, run.recipe)
    return run_dir


@pytest.fixture(scope="session")
def tiny_base_with_card(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A copy of the tiny model with a README.md whose front matter names a licence and language."""
    import shutil

    base = tmp_path_factory.mktemp("tiny_carded") / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "README.md").write_text(TINY_BASE_README)
    return base


@pytest.fixture(scope="session")
def tiny_run_factory(tmp_path_factory: pytest.TempPathFactory, tiny_base_with_card: Path):
    """``make(quantize="none", lora_type="lora") -> run dir``, built once per argument pair."""
    runs: dict[tuple, Path] = {}

    def make(quantize: str | int = "none", lora_type: str = "lora") -> Path:
        key = (quantize, lora_type)
        if key not in runs:
            run_dir = tmp_path_factory.mktemp(f"run_{quantize}_{lora_type}") / "run"
            runs[key] = _write_tiny_run(tiny_base_with_card, run_dir, quantize, lora_type)
        return runs[key]

    return make
