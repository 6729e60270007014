"""Reading GGUF files (llama.cpp's model format) with clear errors for files we cannot convert.

The header, metadata and tensor table are parsed here in pure Python, so every problem (not a GGUF
file, a truncated download, a tensor type or an architecture we do not handle) is reported as a
one-line ``NrtError`` before any tensor is touched. The tensor data itself is then read by
``mx.load``, which turns F32/F16 tensors into arrays and Q4_0/Q4_1/Q8_0 blocks into MLX's affine
quantized triplets (``weight``/``scales``/``biases``, group size 32).

Format facts (from the GGUF specification): little-endian; magic ``GGUF``; u32 version (2 or 3);
u64 tensor count; u64 metadata count; metadata as (string key, u32 value type, value); tensor infos
as (string name, u32 n_dims, u64 dims innermost first, u32 ggml type, u64 offset relative to the
data section); the data section starts at the next multiple of ``general.alignment`` (default 32).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nrt_mlx.errors import NrtError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ggml tensor type ids, named so that an unsupported one can be reported by name.
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    30: "BF16",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
}

# The types mx.load reads: name -> (values per block, bytes per block, quantization bits or None).
SUPPORTED_TYPES: dict[str, tuple[int, int, int | None]] = {
    "F32": (1, 4, None),
    "F16": (1, 2, None),
    "Q4_0": (32, 18, 4),
    "Q4_1": (32, 20, 4),
    "Q8_0": (32, 34, 8),
}
QUANT_GROUP_SIZE = 32

SUPPORTED_ARCHITECTURES = ("llama",)

# Metadata value types: id -> struct format of a scalar (strings and arrays are handled apart).
_SCALAR_FORMATS: dict[int, str] = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING = 8
_ARRAY = 9


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table.

    ``shape`` is in row-major (numpy/MLX) order, i.e. GGUF's dims reversed; ``offset`` is absolute.
    """

    name: str
    shape: tuple[int, ...]
    type_name: str
    offset: int
    nbytes: int

    @property
    def bits(self) -> int | None:
        """Quantization bits (4 or 8), or None for a float tensor."""
        return SUPPORTED_TYPES[self.type_name][2]


@dataclass
class GGUFFile:
    """A validated GGUF file: its metadata and tensor table (tensor data stays on disk)."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str, default: Any = None) -> Any:
        """An architecture-scoped value, e.g. ``arch_value("block_count")`` -> ``llama.block_count``."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def require(self, key: str) -> Any:
        """A metadata value the conversion cannot do without."""
        if key not in self.metadata:
            raise NrtError(f"{self.path}: GGUF metadata has no '{key}'")
        return self.metadata[key]


class _Cursor:
    """Sequential little-endian reads over a buffer; running off the end means truncation."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def take(self, n: int) -> int:
        """Advance by ``n`` bytes and return the start position."""
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise NrtError(
                f"{self.path}: truncated GGUF file (header needs byte {start + n}, "
                f"file has {len(self.buf)})"
            )
        self.pos = start + n
        return start

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self.buf, self.take(size))[0]

    def string(self) -> str:
        n = self.scalar("Q")
        start = self.take(n)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError as err:
            raise NrtError(
                f"{self.path}: corrupt GGUF file (string at byte {start}: {err})"
            ) from err

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        if vtype not in _SCALAR_FORMATS:
            raise NrtError(f"{self.path}: corrupt GGUF file (unknown metadata type {vtype})")
        return self.scalar(_SCALAR_FORMATS[vtype])

    def array(self) -> list[Any]:
        itype = self.scalar("I")
        count = self.scalar("Q")
        if itype in _SCALAR_FORMATS:
            # One unpack for the whole array: vocabularies hold ~100k entries.
            fmt = f"<{count}{_SCALAR_FORMATS[itype]}"
            return list(struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt))))
        return [self.value(itype) for _ in range(count)]


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse and validate a GGUF file's header, metadata and tensor table.

    Raises ``NrtError`` if the file is missing, not GGUF, truncated, of another architecture, or
    holds a tensor type that ``mx.load`` cannot read.
    """
    path = Path(path)
    if not path.is_file():
        raise NrtError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    with open(path, "rb") as f:
        size = path.stat().st_size
        if size < 4:
            raise NrtError(f"{path}: not a GGUF file ({size} bytes, too short for a header)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, path)


def _parse(buf: mmap.mmap, path: Path) -> GGUFFile:
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise NrtError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    cur = _Cursor(buf, path)
    cur.take(4)
    version = cur.scalar("I")
    if version not in (2, 3):
        # Version 1 used 32-bit counts; a huge number usually means a big-endian file.
        raise NrtError(f"{path}: GGUF version {version} is not supported (only 2 and 3)")
    n_tensors = cur.scalar("Q")
    n_kv = cur.scalar("Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("I"))
    gguf = GGUFFile(path=path, version=version, metadata=metadata)
    # The architecture is the more basic mismatch: report it before any tensor type.
    check_architecture(gguf)
    raw_infos = [_tensor_info(cur) for _ in range(n_tensors)]
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment
    for name, shape, type_id, rel_offset in raw_infos:
        gguf.tensors[name] = _checked_info(path, name, shape, type_id, data_start + rel_offset)
    _check_data_present(gguf, len(buf))
    return gguf


def _tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string()
    n_dims = cur.scalar("I")
    if n_dims > 8:
        raise NrtError(f"{cur.path}: corrupt GGUF file (tensor '{name}' has {n_dims} dims)")
    dims = [cur.scalar("Q") for _ in range(n_dims)]
    type_id = cur.scalar("I")
    offset = cur.scalar("Q")
    return name, tuple(reversed(dims)), type_id, offset


def _checked_info(
    path: Path, name: str, shape: tuple[int, ...], type_id: int, offset: int
) -> TensorInfo:
    """A TensorInfo with its byte size, or an error naming an unsupported tensor type."""
    type_name = GGML_TYPE_NAMES.get(type_id, f"type {type_id}")
    if type_name not in SUPPORTED_TYPES:
        supported = ", ".join(SUPPORTED_TYPES)
        raise NrtError(
            f"{path}: tensor '{name}' has type {type_name}, which cannot be converted "
            f"(supported: {supported}; re-quantize the model to one of these with llama.cpp)"
        )
    per_block, block_bytes, _ = SUPPORTED_TYPES[type_name]
    count = 1
    for d in shape:
        count *= d
    if shape and shape[-1] % per_block:
        raise NrtError(
            f"{path}: tensor '{name}' has rows of {shape[-1]} values, "
            f"not a multiple of the {type_name} block size {per_block}"
        )
    return TensorInfo(name, shape, type_name, offset, count // per_block * block_bytes)


def _check_data_present(gguf: GGUFFile, file_size: int) -> None:
    """A file cut short (an interrupted download) ends before its last tensor's data does."""
    end = max((t.offset + t.nbytes for t in gguf.tensors.values()), default=0)
    if end > file_size:
        raise NrtError(
            f"{gguf.path}: truncated GGUF file (tensor data needs {end} bytes, "
            f"file has {file_size}; download it again)"
        )


def check_architecture(gguf: GGUFFile) -> None:
    arch = gguf.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise NrtError(
            f"{gguf.path}: architecture '{arch or '(none)'}' is not supported "
            f"(only llama-architecture GGUF files, which include Llama and Mistral models)"
        )


def load_tensors(gguf: GGUFFile) -> dict[str, Any]:
    """All tensors as MLX arrays, keyed like ``mx.load`` names them.

    Quantized tensors appear as ``NAME.weight`` (packed uint32), ``NAME.scales`` and
    ``NAME.biases``; a quantized tensor's name always ends in ``.weight`` in GGUF files.
    """
    import mlx.core as mx

    try:
        arrays = mx.load(str(gguf.path))
    except (RuntimeError, ValueError) as err:
        raise NrtError(f"{gguf.path}: cannot read tensor data ({err})") from err
    return dict(arrays)
