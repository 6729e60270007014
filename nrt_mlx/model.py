"""Loading the base model, quantizing it, adding LoRA/DoRA, and saving adapters in mlx-lm's format.

Adapters are written exactly as mlx-lm's tuner writes them (``adapters.safetensors`` +
``adapter_config.json``), so ``mlx_lm.load(base, adapter_path=...)`` and
``mlx_lm.generate --adapter-path`` use them without nrt-mlx.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from nrt_mlx import kernels, marker
from nrt_mlx.errors import NrtError, first_line
from nrt_mlx.recipe import LoraConfig, ModelConfig

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")  # parameter names of LoRA/DoRA layers


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any  # mlx_lm TokenizerWrapper
    path: str  # what the user gave (local dir or repo id)
    local_path: Path
    config: dict
    bits: int | None  # quantization the model trains with (None: dense)


def backend() -> str:
    """'metal', 'cuda' or 'cpu': where MLX's default device runs."""
    if mx.default_device() == mx.gpu:
        if mx.metal.is_available():
            return "metal"
        return "cuda"
    return "cpu"


def resolve_quantize(cfg: ModelConfig) -> int | None:
    """Bits to quantize to, or None for dense.

    ``auto`` is 4-bit QLoRA on Metal and CUDA, and dense fp32 on the CPU backend, whose quantized
    matmul is a slow generic kernel (docs/CPU.md: ~57x slower than dense).
    """
    q = cfg.quantize
    if q == "none":
        return None
    if q == "auto":
        return None if backend() == "cpu" else 4
    return int(q)


def _is_quantized(model: nn.Module) -> int | None:
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return module.bits
    return None


def _resolve_local(path: str) -> Path:
    """Local directory, or the Hub snapshot; an offline miss is a one-line error."""
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise NrtError(
                f"model.path {path}: no config.json there; is it an mlx-lm model directory?"
            )
        return local
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        raise NrtError(f"model.path {path}: no such directory (and not a Hugging Face repo id)")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                path,
                allow_patterns=[
                    "*.json",
                    "*.safetensors",
                    "*.py",
                    "tokenizer.model",
                    "*.tiktoken",
                    "*.txt",
                    "*.jinja",
                ],
            )
        )
    except Exception as err:  # network, auth, not found: all user-facing
        kind = type(err).__name__
        raise NrtError(
            f"model.path {path}: could not fetch it from the Hugging Face Hub ({kind}); "
            "check the repo id and your network, or point model.path at a local directory"
        ) from None


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load an mlx-lm model and tokenizer, then quantize or dequantize as ``cfg.quantize`` says.

    ``none`` (and ``auto`` on the CPU backend) dequantizes a quantized checkpoint: fp32 trains and
    samples faster there. A bit width quantizes a dense checkpoint on load (QLoRA); a checkpoint
    that is already quantized is kept as it is.
    """
    from mlx_lm.utils import dequantize_model, load

    if not cfg.path:
        raise NrtError("model.path is empty: set it to an mlx-lm model directory or a Hub repo id")
    local = _resolve_local(cfg.path)
    try:
        model, tokenizer, config = load(
            str(local), return_config=True, trust_remote_code=cfg.trust_remote_code
        )
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise NrtError(f"model.path {cfg.path}: mlx-lm could not load it ({err})") from None
    want = resolve_quantize(cfg)
    have = _is_quantized(model)
    if want is None and have is not None:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        have = None
    elif want is not None and have is None:
        nn.quantize(
            model,
            group_size=cfg.group_size,
            bits=want,
            class_predicate=lambda _, m: (
                isinstance(m, nn.Linear) and m.weight.shape[-1] % cfg.group_size == 0
            ),
        )
        have = want
    if backend() == "cpu":
        # bf16/fp16 matmuls on the CPU backend are emulated; fp32 is both faster and exact.
        model.set_dtype(mx.float32)
        # and its exp is scalar: the gated MLPs' SiLU gets a vectorised kernel (nrt_mlx.kernels).
        kernels.fast_mlps(model)
    mx.eval(model.parameters())
    return LoadedModel(model, tokenizer, cfg.path, local, config, have)


def lora_parameters(cfg: LoraConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rank": cfg.rank, "scale": cfg.scale, "dropout": cfg.dropout}
    if cfg.keys:
        params["keys"] = list(cfg.keys)
    return params


def num_lora_layers(model: nn.Module, cfg: LoraConfig) -> int:
    total = len(model.layers)
    return total if cfg.layers == -1 else min(cfg.layers, total)


def add_adapters(model: nn.Module, cfg: LoraConfig, seed: int) -> int:
    """Freeze the base and add LoRA/DoRA to the last ``cfg.layers`` blocks.

    Returns the number of trainable parameters. ``seed`` fixes the LoRA initialisation.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    mx.random.seed(seed)
    try:
        linear_to_lora_layers(
            model, num_lora_layers(model, cfg), lora_parameters(cfg), use_dora=cfg.type == "dora"
        )
    except ValueError as err:
        raise NrtError(f"lora: {err}") from None
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    if trainable == 0:
        raise NrtError("lora.keys matched no layer of this model: check the module names")
    return trainable


def adapter_config(
    loaded: LoadedModel, cfg: LoraConfig, extra: dict[str, Any] | None = None
) -> dict:
    """mlx-lm's adapter_config.json, plus what fuse and the model card need to know."""
    out = {
        "fine_tune_type": cfg.type,
        "num_layers": num_lora_layers(loaded.model, cfg),
        "lora_parameters": lora_parameters(cfg),
        "model": loaded.path,
        "base_model": loaded.path,
        "base_quantization_bits": loaded.bits,
    }
    if extra:
        out.update(extra)
    return out


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The LoRA/DoRA weights, exactly the keys mlx-lm's adapter loading expects."""
    return {
        k: v
        for k, v in tree_flatten(model.trainable_parameters())
        if not k.endswith(marker.ROW_NAME)
    }


def write_adapters_into(model: nn.Module, config: dict, directory: Path) -> None:
    """Write the adapter files (and the marker rows, if trained) into an existing directory."""
    mx.save_safetensors(str(directory / ADAPTER_WEIGHTS), adapter_weights(model))
    marker.save_rows(model, directory)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    """Load saved adapter weights into a model that already has the same adapters."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.exists():
        raise NrtError(f"{path}: adapter weights not found")
    model.load_weights(str(path), strict=False)
    marker.load_rows(model, Path(directory))
    mx.eval(model.parameters())


# ---- a base with trained adapters (fuse, eval) -------------------------------------------------


def trained_bits(adapter_cfg: dict[str, Any], quantize: str | int) -> int | None:
    """Quantization the adapters were trained on: adapter_config.json records it (nrt-mlx writes
    ``base_quantization_bits``); else the recipe's resolved ``model.quantize``."""
    if "base_quantization_bits" in adapter_cfg:
        bits = adapter_cfg["base_quantization_bits"]
        return int(bits) if bits is not None else None
    if quantize == "auto":
        raise NrtError(
            "recipe.yaml: model.quantize is 'auto' and the adapter config does not say which "
            "quantization the run used; set model.quantize to none or the bit width it trained with"
        )
    return None if quantize == "none" else int(quantize)


def load_trained_base(cfg: ModelConfig, adapter_cfg: dict[str, Any]) -> LoadedModel:
    """Load the base as the run did: same checkpoint (``cfg.path``, else adapter_config's
    base_model) and the quantization the adapters were trained on (or none)."""
    import copy

    cfg = copy.deepcopy(cfg)
    if not cfg.path:
        cfg.path = str(adapter_cfg.get("base_model") or "")
    bits = trained_bits(adapter_cfg, cfg.quantize)
    cfg.quantize = bits if bits is not None else "none"
    loaded = load_model(cfg)
    if loaded.bits != bits:
        raise NrtError(
            f"{cfg.path}: the base loads with {_bits_text(loaded.bits)} weights but the run trained "
            f"on {_bits_text(bits)}; point model.path in the run's recipe.yaml at the base it used"
        )
    return loaded


def _bits_text(bits: int | None) -> str:
    return "dense" if bits is None else f"{bits}-bit"


def apply_adapters(model: nn.Module, adapter_dir: Path) -> None:
    """Rebuild the adapter layers from ``adapter_config.json`` and load every adapter weight."""
    from mlx_lm.utils import load_adapters

    weights_file = adapter_dir / ADAPTER_WEIGHTS
    try:
        load_adapters(model, str(adapter_dir))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
        raise NrtError(
            f"{weights_file}: the adapters do not fit the base model ({first_line(err)})"
        ) from None
    # mlx-lm loads non-strictly; an adapter left at its initial value would be used silently.
    saved = set(mx.load(str(weights_file)))
    expected = [
        k for k, _ in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES
    ]
    missing = [k for k in expected if k not in saved]
    if missing:
        raise NrtError(
            f"{weights_file}: {len(missing)} adapter weights are missing (e.g. {missing[0]}); "
            "the file is incomplete or belongs to another run"
        )
    marker.load_rows(model, adapter_dir)
    mx.eval(model.parameters())
    model.eval()
