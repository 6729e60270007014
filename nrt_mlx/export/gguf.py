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
# Arrays of arrays are legal but unused by llama.cpp; deeper nesting means a corrupt file.
MAX_ARRAY_DEPTH = 4
# Fewest bytes an item can take, to bound every count by the bytes left: a string is its u64
# length, an array its u32 type and u64 count; a metadata entry is a key, a u32 type and a value;
# a tensor info is a name, u32 n_dims, u32 type and u64 offset.
_MIN_STRING_BYTES = 8
_MIN_ARRAY_BYTES = 12
_MIN_KV_BYTES = _MIN_STRING_BYTES + 4 + 1
_MIN_TENSOR_INFO_BYTES = _MIN_STRING_BYTES + 4 + 4 + 8


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


def _quote(name: str) -> str:
    """A key or tensor name read from the file, quoted, on one line and at most ~100 characters."""
    if name.isprintable() and len(name) <= 100:
        return f"'{name}'"
    return repr(name[:100]) + ("..." if len(name) > 100 else "")


class _Cursor:
    """Sequential little-endian reads over a buffer; running off the end means truncation."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def left(self) -> int:
        return len(self.buf) - self.pos

    def check_count(self, count: int, item_bytes: int, what: str) -> None:
        """Refuse a count whose items cannot fit in the rest of the file, before reading any."""
        if count * item_bytes > self.left():
            raise NrtError(
                f"{self.path}: truncated or corrupt GGUF file ({what} claims {count} items at byte "
                f"{self.pos}, but only {self.left()} bytes follow)"
            )

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
        if n > self.left():
            raise NrtError(
                f"{self.path}: truncated or corrupt GGUF file (string at byte {self.pos} claims "
                f"{n} bytes, but only {self.left()} follow)"
            )
        start = self.take(n)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError as err:
            raise NrtError(
                f"{self.path}: corrupt GGUF file (string at byte {start}: {err})"
            ) from err

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        """A metadata value of type ``vtype``; ``key`` names it in errors."""
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array(key, depth + 1)
        if vtype not in _SCALAR_FORMATS:
            raise NrtError(
                f"{self.path}: corrupt GGUF file (metadata {_quote(key)} has unknown type {vtype})"
            )
        return self.scalar(_SCALAR_FORMATS[vtype])

    def array(self, key: str, depth: int) -> list[Any]:
        if depth > MAX_ARRAY_DEPTH:
            raise NrtError(
                f"{self.path}: corrupt GGUF file (metadata {_quote(key)} nests arrays more than "
                f"{MAX_ARRAY_DEPTH} deep)"
            )
        itype = self.scalar("I")
        count = self.scalar("Q")
        if itype in _SCALAR_FORMATS:
            fmt = _SCALAR_FORMATS[itype]
            self.check_count(count, struct.calcsize("<" + fmt), f"array {_quote(key)}")
            # One unpack for the whole array: vocabularies hold ~100k entries.
            fmt = f"<{count}{fmt}"
            return list(struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt))))
        if itype not in (_STRING, _ARRAY):
            raise NrtError(
                f"{self.path}: corrupt GGUF file (array {_quote(key)} has unknown item type {itype})"
            )
        item_bytes = _MIN_STRING_BYTES if itype == _STRING else _MIN_ARRAY_BYTES
        self.check_count(count, item_bytes, f"array {_quote(key)}")
        return [self.value(itype, key, depth) for _ in range(count)]


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
    cur.check_count(n_kv, _MIN_KV_BYTES, "the metadata table")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("I"), key)
    gguf = GGUFFile(path=path, version=version, metadata=metadata)
    # The architecture is the more basic mismatch: report it before any tensor type.
    check_architecture(gguf)
    cur.check_count(n_tensors, _MIN_TENSOR_INFO_BYTES, "the tensor table")
    raw_infos = [_tensor_info(cur) for _ in range(n_tensors)]
    alignment = _alignment(gguf)
    data_start = -(-cur.pos // alignment) * alignment
    for name, shape, type_id, rel_offset in raw_infos:
        gguf.tensors[name] = _checked_info(path, name, shape, type_id, data_start + rel_offset)
    _check_data_present(gguf, len(buf))
    return gguf


def _alignment(gguf: GGUFFile) -> int:
    """``general.alignment``: a positive power of two (a zero would divide by zero)."""
    value = gguf.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value & (value - 1):
        raise NrtError(
            f"{gguf.path}: corrupt GGUF file (general.alignment is {value!r}, "
            "not a positive power of two)"
        )
    return value


def _tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string()
    n_dims = cur.scalar("I")
    if n_dims > 8:
        raise NrtError(f"{cur.path}: corrupt GGUF file (tensor {_quote(name)} has {n_dims} dims)")
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
            f"{path}: tensor {_quote(name)} has type {type_name}, which cannot be converted "
            f"(supported: {supported}; re-quantize the model to one of these with llama.cpp)"
        )
    per_block, block_bytes, _ = SUPPORTED_TYPES[type_name]
    count = 1
    for d in shape:
        count *= d
    if shape and shape[-1] % per_block:
        raise NrtError(
            f"{path}: tensor {_quote(name)} has rows of {shape[-1]} values, "
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
