"""GGUF test files written and read with llama.cpp's own ``gguf`` package.

``write`` makes a file with ``gguf.GGUFWriter``; ``read`` decodes every tensor with
``gguf.quants.dequantize`` (the reference values a converted model must reproduce).

gguf-py quantizes F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 but not the K-quants (its ``quantize`` raises
NotImplementedError for Q2_K-Q6_K), so ``random_k_blocks`` makes K-quant tensors as random block
bytes with finite super-block scales. Every byte pattern of a K-quant block is a valid block, so
such a file is a model as real as a quantized one, and its codes and 6-bit sub-scales cover their
whole ranges; the model the tests check is whatever these blocks decode to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# Byte offsets of the float16 super-block scale d (and dmin) in each K-quant block (ggml's
# block_q*_K layouts). Blocks decode to d * A - dmin * B with A, B made of the other bytes.
K_SCALE_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def qtype(name: str) -> Any:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def _decode(blocks: np.ndarray, name: str) -> np.ndarray:
    from gguf.quants import dequantize

    return dequantize(blocks, qtype(name))


def random_k_blocks(
    name: str, shape: tuple[int, int], rng: np.random.Generator, std: float
) -> np.ndarray:
    """Raw ``name`` blocks (uint8 [rows, bytes per row]) that decode to about mean 0, std ``std``."""
    from gguf.constants import GGML_QUANT_SIZES

    per_block, block_bytes = GGML_QUANT_SIZES[qtype(name)]
    rows, cols = shape
    blocks = rng.integers(0, 256, (rows * cols // per_block, block_bytes), dtype=np.uint8)

    def with_scales(d: float, dmin: float) -> np.ndarray:
        out = blocks.copy()
        for at, value in zip(K_SCALE_FIELDS[name], (d, dmin), strict=False):
            out[:, at : at + 2] = np.float16(value).reshape(1).view(np.uint8)
        return out

    # dmin balances the mean of d * A (zero for the symmetric Q3_K and Q6_K, which have no dmin).
    a = _decode(with_scales(1.0, 0.0), name)
    ratio = (
        0.0
        if len(K_SCALE_FIELDS[name]) == 1
        else a.mean() / -_decode(with_scales(0.0, 1.0), name).mean()
    )
    spread = _decode(with_scales(1.0, ratio), name).std()
    c = std / spread
    return with_scales(c, c * ratio).reshape(rows, -1)


def encode(name: str, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``values`` stored as GGUF type ``name``: gguf's own quantizer, or random K-quant blocks of
    the same shape and spread (see the module docstring)."""
    from gguf.quants import quantize

    if name in K_SCALE_FIELDS:
        return random_k_blocks(name, values.shape, rng, float(values.std()))
    return quantize(values.astype(np.float32), qtype(name))


def write(
    path: Path, arch: str, metadata: dict[str, Any], tensors: dict[str, tuple[str, np.ndarray]]
) -> Path:
    """A GGUF file by ``gguf.GGUFWriter``: ``tensors`` maps names to (GGUF type, float values)."""
    import gguf

    rng = np.random.default_rng(7)
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if key == "general.architecture":
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, (kind, values) in tensors.items():
        data = encode(kind, values, rng)
        writer.add_tensor(name, data, raw_dtype=qtype(kind) if kind != "F32" else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
    """(metadata, {tensor: float64 values in row-major shape}, {tensor: GGUF type}) of a file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    weights, types = {}, {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        weights[t.name] = (
            _decode(np.asarray(t.data), t.tensor_type.name).reshape(shape).astype(np.float64)
        )
        types[t.name] = t.tensor_type.name
    return meta, weights, types
