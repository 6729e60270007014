"""Convert a GGUF file (Llama/Mistral, Qwen2, Qwen3 architectures) into an mlx-lm model directory.

The output loads with ``mlx_lm.load`` and nothing from nrt-mlx installed:

- ``config.json``: the hyper-parameters (mlx-lm ``model_type`` llama, qwen2 or qwen3); a
  ``quantization`` entry unless ``dequantize`` (with a per-module entry for every module whose bit
  width differs from the most common one, e.g. the 8-bit token embedding of a Q4_1 file);
- ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` past 5 GB) and
  ``model.safetensors.index.json``, in mlx-lm's tensor naming;
- ``tokenizer.json`` and ``tokenizer_config.json`` built from the GGUF vocabulary, merges, token
  types, BOS/EOS ids and chat template with the ``tokenizers`` library.

Two facts drive the weight mapping. Most GGUF block types are MLX affine quantization with group
size 32 in another layout (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K, see ``nrt_mlx.export.gguf``), so
those weights are copied onto the same grid, not re-quantized; Q2_K/Q3_K/Q6_K use groups of 16,
which MLX lacks, so they are decoded and re-quantized with ``mx.quantize`` at the same bit width
(``--dequantize`` keeps every value exact instead). llama.cpp's converter permutes the rows of
the Llama q and k projections within each head so that the two rotary halves interleave (its rope
rotates adjacent pairs); mlx-lm's Llama rotates halves, so those rows are permuted back, carrying
their scales and biases with them. Qwen2/Qwen3 files are not permuted.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nrt_mlx.errors import NrtError
from nrt_mlx.export.gguf import (
    ARCH_ROUTE,
    QUANT_GROUP_SIZE,
    Architecture,
    GGUFFile,
    TensorInfo,
    load_tensors,
    read_gguf,
)
from nrt_mlx.export.manifest import OutputKind, check_output_dir, write_output_dir

DTYPES = ("float16", "bfloat16", "float32")
MAX_SHARD_BYTES = 5 * 1024**3  # mlx-lm's shard size

# GGUF tensor base names -> mlx-lm module paths.
_GLOBAL_MODULES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_MODULES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors that carry no weights of their own in mlx-lm (rope factors become config).
_DROPPED = {"rope_freqs"}

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(
    1, 7
)

# Pre-tokenizers of byte-level BPE vocabularies, by llama.cpp's ``tokenizer.ggml.pre`` name.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's split is Llama 3's with every digit apart (Qwen2/2.5/3 GGUF files say "qwen2").
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
_BPE_PRE_TOKENIZERS = ("gpt-2", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2")


# ---- public API ---------------------------------------------------------------------------------


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dequantize: bool = False,
    dtype: str | None = None,
    report: Callable[[str], None] | None = _to_stderr,
) -> Path:
    """Convert ``gguf_path`` into an mlx-lm model directory at ``out_dir`` and return its path.

    ``dequantize`` writes dense weights instead of MLX-quantized ones (what training on a CPU
    wants: quantized matmuls are slow there). ``dtype`` (float16, bfloat16 or float32) is the type
    of every floating tensor written: dense weights, norms, and the scales and biases of quantized
    weights; by default float16 on a GPU (Metal, CUDA) and float32 on the CPU backend (see
    ``default_dtype``). The directory is built beside ``out_dir`` and renamed into place,
    so it is never seen half-written. An existing ``out_dir`` is replaced only when it is empty or
    holds exactly an earlier conversion (see ``nrt_mlx.export.manifest``); anything else is refused.
    ``report`` receives one line per GGUF tensor type saying what MLX format it became (stdout
    stays the output path alone for scripts); None says nothing.
    """
    dtype = _check_dtype(dtype)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, CONVERT_OUTPUT)
    gguf = read_gguf(gguf_path)
    arrays = load_tensors(gguf)
    config = model_config(gguf, arrays)
    tokenizer, tokenizer_config = build_tokenizer(gguf)
    weights, quantized, formats = convert_weights(
        gguf, arrays, config, dequantize=dequantize, dtype=dtype
    )
    if quantized:
        config["quantization"] = quantization_config(quantized, weights)
        config["quantization_config"] = config["quantization"]
    config["torch_dtype"] = dtype
    config[CONVERTED_KEY] = Path(gguf_path).name

    def fill(tmp: Path) -> None:
        save_weights(tmp, weights)
        _write_json(tmp / "config.json", config)
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "special_tokens_map.json", _special_tokens_map(tokenizer_config))

    out = write_output_dir(Path(out_dir), CONVERT_OUTPUT, fill)
    if report is not None:
        for line in format_lines(formats):
            report(line)
    return out


def format_lines(formats: Counter[tuple[str, str]]) -> list[str]:
    """'Q4_K -> 4-bit affine, group 32, exact: 98 tensors', one line per (GGUF type, MLX form)."""
    return [
        f"{gguf_type} -> {mlx_form}: {n} tensor{'s' if n != 1 else ''}"
        for (gguf_type, mlx_form), n in sorted(formats.items())
    ]


# config.json key naming the source GGUF: marks a conversion of nrt-mlx 0.1 (no manifest).
CONVERTED_KEY = "nrt_mlx_converted_from"


def _is_conversion(directory: Path) -> bool:
    try:
        return CONVERTED_KEY in json.loads((directory / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CONVERT_OUTPUT = OutputKind(
    command="convert",
    what="a model converted by nrt-mlx",
    kinds=(
        ("model*.safetensors", "weights"),
        ("model.safetensors.index.json", "weights-index"),
        ("config.json", "config"),
        ("*", "tokenizer"),
    ),
    is_legacy=_is_conversion,
    legacy_files=(*WEIGHT_FILES, "config.json", *TOKENIZER_FILES),
)


def default_dtype() -> str:
    """float16 where MLX runs on a GPU; float32 on the CPU backend.

    On the CPU backend float16 arithmetic is emulated: SmolLM2-135M with float16 scales takes ~5 s
    per token against ~0.15 s with float32 ones, so a float16 default would make the converted
    model unusable there.
    """
    import mlx.core as mx

    return "float16" if mx.default_device().type == mx.DeviceType.gpu else "float32"


def _check_dtype(dtype: str | None) -> str:
    if dtype is None:
        return default_dtype()
    if dtype not in DTYPES:
        raise NrtError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return dtype


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- config -------------------------------------------------------------------------------------


def model_config(gguf: GGUFFile, arrays: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm/transformers ``config.json`` for the model in ``gguf`` (no quantization).

    ``arrays`` are the file's tensors (from ``load_tensors``); only ``rope_freqs`` is read.
    """
    if gguf.arch_value("expert_count", 0):
        raise NrtError(f"{gguf.path}: mixture-of-experts models are not supported; {ARCH_ROUTE}")
    hidden = _int(gguf, "embedding_length")
    heads = _int(gguf, "attention.head_count")
    kv_heads = _int(gguf, "attention.head_count_kv", heads)
    head_dim = _int(gguf, "attention.key_length", hidden // heads)
    arch = gguf.arch
    if _int(gguf, "attention.value_length", head_dim) != head_dim:
        raise NrtError(
            f"{gguf.path}: key and value head sizes differ, which {arch.model_type} does not allow"
        )
    if arch.model_type == "qwen2" and head_dim * heads != hidden:
        # mlx-lm's qwen2 derives the head size from hidden_size / num_attention_heads.
        raise NrtError(
            f"{gguf.path}: qwen2 head size {head_dim} is not hidden size / heads "
            f"({hidden} / {heads}), which mlx-lm's qwen2 assumes; {ARCH_ROUTE}"
        )
    if _int(gguf, "rope.dimension_count", head_dim) != head_dim:
        raise NrtError(f"{gguf.path}: partial rotary embeddings are not supported")
    if "token_embd.weight" not in gguf.tensors:
        raise NrtError(f"{gguf.path}: no 'token_embd.weight' tensor")
    tokens = gguf.require("tokenizer.ggml.tokens")
    _check_layer_tensors(gguf)
    config: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": _int(gguf, "block_count"),
        "intermediate_size": _int(gguf, "feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(gguf.arch_value("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(gguf.arch_value("rope.freq_base", 10000.0)),
        "rope_traditional": False,
        "max_position_embeddings": _int(gguf, "context_length", 4096),
        "vocab_size": gguf.tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "attention_bias": "blk.0.attn_q.bias" in gguf.tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in gguf.tensors,
        "bos_token_id": gguf.metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_ids(gguf),
    }
    # Padding rows beyond the vocabulary are harmless; fewer rows than tokens are not.
    if len(tokens) > config["vocab_size"]:
        raise NrtError(
            f"{gguf.path}: {len(tokens)} tokens but the embedding has {config['vocab_size']} rows"
        )
    scaling = rope_scaling(gguf, config, arrays)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _int(gguf: GGUFFile, key: str, default: int | None = None) -> int:
    """An integer hyper-parameter ``<arch>.<key>``; per-layer lists must be uniform."""
    value = gguf.arch_value(key, default)
    if value is None:
        raise NrtError(f"{gguf.path}: GGUF metadata has no '{gguf.architecture}.{key}'")
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise NrtError(f"{gguf.path}: '{gguf.architecture}.{key}' varies by layer")
        value = value[0]
    return int(value)


def _f32(value: float) -> float:
    """A float32 metadata value as its shortest decimal (1e-05, not 9.999999747378752e-06)."""
    import numpy as np

    return float(str(np.float32(value)))


def _eos_ids(gguf: GGUFFile) -> int | list[int] | None:
    """EOS plus end-of-turn/end-of-message ids, so generation stops at the end of a chat turn."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = gguf.metadata.get(f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else ids


def rope_scaling(
    gguf: GGUFFile, config: dict[str, Any], arrays: dict[str, Any]
) -> dict[str, Any] | None:
    """mlx-lm ``rope_scaling`` from GGUF's scaling metadata or its ``rope_freqs`` tensor."""
    kind = gguf.arch_value("rope.scaling.type", "none")
    if kind == "linear":
        return {"type": "linear", "factor": float(gguf.arch_value("rope.scaling.factor", 1.0))}
    if kind not in ("none", None):
        raise NrtError(
            f"{gguf.path}: rope scaling '{kind}' is not supported (only linear, llama3); {ARCH_ROUTE}"
        )
    if "rope_freqs.weight" not in arrays:
        return None
    factors = arrays["rope_freqs.weight"].tolist()
    return llama3_scaling_from_factors(factors, config["rope_theta"], config["head_dim"], gguf.path)


def llama3_rope_factors(
    base: float, dims: int, factor: float, low: float, high: float, original: int
) -> list[float]:
    """Per-frequency divisors of Llama 3.1's rope scaling (Meta's published formula)."""
    out = []
    for i in range(0, dims, 2):
        wavelen = 2 * math.pi * base ** (i / dims)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


def llama3_scaling_from_factors(
    factors: list[float], base: float, dims: int, path: Path | str
) -> dict[str, Any]:
    """Recover Llama 3 rope-scaling settings from the factors llama.cpp stores as ``rope_freqs``.

    GGUF keeps only the computed factors; mlx-lm wants the settings they came from, so the
    settings Meta has published are tried and the one that reproduces the factors is returned.
    """
    factor = max(factors)
    for original in (8192, 4096, 16384, 32768, 2048):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 8.0)):
            guess = llama3_rope_factors(base, dims, factor, low, high, original)
            if all(math.isclose(a, b, rel_tol=1e-3) for a, b in zip(guess, factors, strict=True)):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": original,
                }
    raise NrtError(f"{path}: the 'rope_freqs' tensor matches no known Llama 3 rope scaling")


# ---- weights ------------------------------------------------------------------------------------


def mlx_module_name(gguf_base: str, arch: Architecture) -> str | None:
    """mlx-lm module path for a GGUF tensor base name (``blk.3.attn_q``), None if dropped."""
    if gguf_base in _DROPPED:
        return None
    if gguf_base in _GLOBAL_MODULES:
        return _GLOBAL_MODULES[gguf_base]
    layer_modules = _LAYER_MODULES | dict(arch.extra_layer_modules)
    parts = gguf_base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in layer_modules:
        return f"model.layers.{parts[1]}.{layer_modules[parts[2]]}"
    if len(parts) == 3 and parts[2] == "attn_rot_embd":
        return None  # precomputed rope tables of old files
    raise NrtError(
        f"unexpected tensor '{gguf_base}' in a {arch.model_type} GGUF file; {ARCH_ROUTE}"
    )


def _check_layer_tensors(gguf: GGUFFile) -> None:
    """Biases only where the architecture has them (Qwen2 needs q/k/v biases), and Qwen3's
    q/k norms: mlx-lm refuses a model with a missing or an extra parameter."""
    arch = gguf.arch
    layers = _int(gguf, "block_count")
    required = [m for m, _ in arch.extra_layer_modules]
    for i in range(layers):
        for kind in required:
            if f"blk.{i}.{kind}.weight" not in gguf.tensors:
                raise NrtError(
                    f"{gguf.path}: {arch.model_type} file without 'blk.{i}.{kind}.weight'"
                )
        for kind in arch.bias_modules or ():
            if f"blk.{i}.{kind}.bias" not in gguf.tensors:
                raise NrtError(f"{gguf.path}: {arch.model_type} file without 'blk.{i}.{kind}.bias'")
    if arch.bias_modules is None:
        return
    for name in gguf.tensors:
        base, _, suffix = name.rpartition(".")
        if suffix == "bias" and base.rsplit(".", 1)[-1] not in arch.bias_modules:
            raise NrtError(
                f"{gguf.path}: tensor '{name}' is a bias that {arch.model_type} models do not have"
            )


def unpermute_rows(a: Any, n_heads: int) -> Any:
    """Undo llama.cpp's per-head interleaving of the rotary halves along axis 0.

    llama.cpp stores row ``h*D + 2*i + j`` where the original had ``h*D + j*D/2 + i``.
    """
    rows = a.shape[0]
    rest = a.shape[1:]
    head_dim = rows // n_heads
    return a.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def convert_weights(
    gguf: GGUFFile, arrays: dict[str, Any], config: dict[str, Any], dequantize: bool, dtype: str
) -> tuple[dict[str, Any], dict[str, int], Counter[tuple[str, str]]]:
    """mlx-lm weights from the GGUF tensors (``arrays`` from ``load_tensors``), {module path: bits}
    of the quantized modules, and a count of tensors per (GGUF type, MLX form written)."""
    import mlx.core as mx

    target = getattr(mx, dtype)
    arch = gguf.arch
    heads_for = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    weights: dict[str, Any] = {}
    quantized: dict[str, int] = {}
    formats: Counter[tuple[str, str]] = Counter()
    for name, info in gguf.tensors.items():
        base, _, suffix = name.rpartition(".")  # suffix: "weight" or "bias"
        module = mlx_module_name(base, arch)
        if module is None:
            continue
        kind = info.kind
        parts = _tensor_parts(arrays, name, _is_triplet(info))
        n_heads = heads_for.get(base.rsplit(".", 1)[-1]) if arch.permuted_qk else None
        if n_heads is not None:
            parts = {k: unpermute_rows(v, n_heads) for k, v in parts.items()}
        if kind.bits is None or dequantize:
            dense = parts[suffix] if not _is_triplet(info) else _dequantize(parts, kind.bits)
            weights[f"{module}.{suffix}"], exact = _cast(dense, target)
            form = f"{dtype}{', dequantized' if kind.bits else ''}"
            form += ", exact" if exact else f", rounded to {dtype}"
        else:
            if not _is_triplet(info):  # re-quantized: llama.cpp's groups of 16 do not fit MLX
                parts = _quantize(parts["weight"], kind.bits)
            weights[f"{module}.weight"] = parts["weight"]
            weights[f"{module}.scales"], exact_s = _cast(parts["scales"], target)
            weights[f"{module}.biases"], exact_b = _cast(parts["biases"], target)
            quantized[module] = kind.bits
            form = f"{kind.bits}-bit affine, group {QUANT_GROUP_SIZE}"
            if kind.requantized:
                form += ", re-quantized"
            else:
                form += ", exact" if exact_s and exact_b else f", scales rounded to {dtype}"
        formats[(info.type_name, form)] += 1
    return weights, quantized, formats


def _is_triplet(info: TensorInfo) -> bool:
    """``load_tensors`` gives this tensor as MLX's (weight, scales, biases)."""
    return info.kind.bits is not None and not info.kind.requantized


def _dequantize(parts: dict[str, Any], bits: int) -> Any:
    import mlx.core as mx

    return mx.dequantize(
        parts["weight"],
        parts["scales"].astype(mx.float32),
        parts["biases"].astype(mx.float32),
        group_size=QUANT_GROUP_SIZE,
        bits=bits,
    )


def _quantize(dense: Any, bits: int) -> dict[str, Any]:
    import mlx.core as mx

    weight, scales, biases = mx.quantize(
        dense.astype(mx.float32), group_size=QUANT_GROUP_SIZE, bits=bits
    )
    return {"weight": weight, "scales": scales, "biases": biases}


def _cast(a: Any, target: Any) -> tuple[Any, bool]:
    """``a`` as ``target`` and whether every value survived the cast."""
    import mlx.core as mx

    out = a.astype(target)
    return out, out.dtype == a.dtype or bool(mx.array_equal(out.astype(a.dtype), a).item())


def _tensor_parts(arrays: dict[str, Any], name: str, is_quantized: bool) -> dict[str, Any]:
    """The array(s) mx.load produced for one GGUF tensor."""
    if not is_quantized:
        return {name.rsplit(".", 1)[-1]: arrays[name]}
    base = name[: -len(".weight")]
    return {k: arrays[f"{base}.{k}"] for k in ("weight", "scales", "biases")}


def quantization_config(quantized: dict[str, int], weights: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm's ``quantization`` entry: the common bit width, plus one entry per exception.

    Dense linear layers in a partly quantized file get ``false`` so that no mlx-lm version tries
    to quantize them on load.
    """
    bits = Counter(quantized.values()).most_common(1)[0][0]
    config: dict[str, Any] = {"group_size": QUANT_GROUP_SIZE, "bits": bits, "mode": "affine"}
    for module, b in sorted(quantized.items()):
        if b != bits:
            config[module] = {"group_size": QUANT_GROUP_SIZE, "bits": b, "mode": "affine"}
    for key in sorted(weights):
        module = key.rsplit(".", 1)[0]
        is_matrix = key.endswith(".weight") and weights[key].ndim == 2
        if is_matrix and module not in quantized:
            config[module] = False
    return config


def save_weights(out_dir: Path, weights: dict[str, Any]) -> None:
    """Write safetensors shards (one ``model.safetensors`` when small) and the index."""
    import mlx.core as mx

    shards: list[dict[str, Any]] = [{}]
    size = 0
    for key in sorted(weights):
        nbytes = weights[key].nbytes
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = weights[key]
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        )
        mx.save_safetensors(str(out_dir / file), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(w.nbytes for w in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out_dir / "model.safetensors.index.json", index)


# ---- tokenizer ----------------------------------------------------------------------------------


def build_tokenizer(gguf: GGUFFile) -> tuple[Any, dict[str, Any]]:
    """A ``tokenizers.Tokenizer`` and ``tokenizer_config.json`` content for the GGUF vocabulary."""
    kind = gguf.require("tokenizer.ggml.model")
    tokens: list[str] = gguf.require("tokenizer.ggml.tokens")
    types: list[int] = gguf.metadata.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(gguf, tokens)
        add_bos_default = False
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(gguf, tokens)
        add_bos_default = True
    else:
        raise NrtError(
            f"{gguf.path}: tokenizer model '{kind}' is not supported "
            "(only 'gpt2' byte-level BPE and 'llama' SentencePiece)"
        )
    _add_special_tokens(tokenizer, tokens, types)
    meta = gguf.metadata
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    special = _special_token_strings(gguf, tokens)
    _set_post_processor(tokenizer, special, add_bos, add_eos, tokens, gguf)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _int(gguf, "context_length", 4096),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer, config


def _merges(gguf: GGUFFile) -> list[tuple[str, str]]:
    merges = []
    for line in gguf.require("tokenizer.ggml.merges"):
        left, sep, right = line.partition(" ")
        if not sep:
            raise NrtError(f"{gguf.path}: malformed merge {line!r} in tokenizer.ggml.merges")
        merges.append((left, right))
    return merges


def _vocab(tokens: list[str]) -> dict[str, int]:
    """Token -> id; a duplicated token keeps its first id, as llama.cpp's lookup does."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    return vocab


def _byte_level_bpe(gguf: GGUFFile, tokens: list[str]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = gguf.metadata.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in _BPE_PRE_TOKENIZERS:
        raise NrtError(
            f"{gguf.path}: pre-tokenizer '{pre}' is not supported "
            f"(supported: {', '.join(_BPE_PRE_TOKENIZERS)})"
        )
    llama3 = pre in ("llama-bpe", "llama3")
    regex = _LLAMA3_REGEX if llama3 else _QWEN2_REGEX if pre == "qwen2" else None
    # Llama 3's vocabulary takes a whole pre-token when it is a token (``ignore_merges``).
    model = models.BPE(vocab=_vocab(tokens), merges=_merges(gguf), ignore_merges=llama3)
    tokenizer = Tokenizer(model)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None)
    if regex is not None:
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    elif pre == "smollm":
        # SmolLM splits every digit apart before the GPT-2 rules.
        digits = pre_tokenizers.Digits(individual_digits=True)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-ordered merging.

    Every token that splits into two tokens yields a merge; merges are ranked by the merged
    token's score (highest first, then lowest id), like transformers' SentencePiece extractor.
    """
    vocab = _vocab(tokens)
    order = sorted(range(len(tokens)), key=lambda i: (-scores[i], i))
    merges: list[tuple[str, str]] = []
    for i in order:
        piece = tokens[i]
        pairs = [
            (piece[:k], piece[k:])
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        merges.extend(sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]])))
    return merges


def _sentencepiece_bpe(gguf: GGUFFile, tokens: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = gguf.metadata.get("tokenizer.ggml.scores")
    if scores is None:
        raise NrtError(f"{gguf.path}: SentencePiece vocabulary without tokenizer.ggml.scores")
    unk_id = int(gguf.metadata.get("tokenizer.ggml.unknown_token_id", 0))
    model = models.BPE(
        vocab=_vocab(tokens),
        merges=sentencepiece_merges(tokens, scores),
        unk_token=tokens[unk_id],
        byte_fallback=True,
        fuse_unk=True,
    )
    tokenizer = Tokenizer(model)
    add_prefix = bool(gguf.metadata.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if add_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(dec)
    return tokenizer


def _add_special_tokens(tokenizer: Any, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens."""
    from tokenizers import AddedToken

    special, user = [], []
    for tok, kind in zip(tokens, types, strict=False):
        if kind == TOKEN_CONTROL:
            special.append(AddedToken(tok, special=True, normalized=False))
        elif kind == TOKEN_USER_DEFINED:
            user.append(AddedToken(tok, special=False, normalized=False))
    if special:
        tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)


def _special_token_strings(gguf: GGUFFile, tokens: list[str]) -> dict[str, str]:
    out = {}
    for role in ("bos", "eos", "unk", "pad"):
        idx = gguf.metadata.get(f"tokenizer.ggml.{role}_token_id")
        if idx is not None and 0 <= int(idx) < len(tokens):
            out[f"{role}_token"] = tokens[int(idx)]
    return out


def _set_post_processor(
    tokenizer: Any,
    special: dict[str, str],
    add_bos: bool,
    add_eos: bool,
    tokens: list[str],
    gguf: GGUFFile,
) -> None:
    """Add BOS/EOS in the tokenizer itself: PreTrainedTokenizerFast ignores ``add_bos_token``."""
    from tokenizers import processors

    pieces_a, pieces_b, ids = ["$A:0"], ["$B:1"], []
    for flag, role, where in ((add_bos, "bos", 0), (add_eos, "eos", None)):
        if not flag:
            continue
        tok = special.get(f"{role}_token")
        if tok is None:
            raise NrtError(f"{gguf.path}: add_{role}_token is set but there is no {role} token")
        ids.append((tok, int(gguf.metadata[f"tokenizer.ggml.{role}_token_id"])))
        if where == 0:
            pieces_a.insert(0, f"{tok}:0")
            pieces_b.insert(0, f"{tok}:1")
        else:
            pieces_a.append(f"{tok}:0")
            pieces_b.append(f"{tok}:1")
    if ids:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=pieces_a, pair=pieces_a + pieces_b, special_tokens=sorted(set(ids))
        )


def _special_tokens_map(tokenizer_config: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in tokenizer_config.items() if k.endswith("_token") and "add_" not in k}
