"""Reading GGUF files (llama.cpp's model format) with clear errors for files we cannot convert.

The header, metadata and tensor table are parsed here in pure Python, so every problem (not a GGUF
file, a truncated download, a tensor type or an architecture we do not handle) is reported as a
one-line ``NrtError`` before any tensor is touched.

The tensor data is then read one of two ways. A file holding only F32/F16/Q4_0/Q4_1/Q8_0 tensors
is read by ``mx.load``, which turns the block types into MLX's affine quantized triplets
(``weight``/``scales``/``biases``, group size 32) exactly. Any other file (K-quants, Q5_0/Q5_1,
BF16) is decoded tensor by tensor with llama.cpp's own ``gguf`` package (an optional dependency):
``mx.load`` cannot read Q3_K/Q5_K/Q5_0/Q5_1 at all, and reads Q2_K/Q4_K/Q6_K and BF16 only as
float16, which is lossy and twice the size of the file.

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


@dataclass(frozen=True)
class TensorType:
    """How a ggml tensor type is stored and what MLX form it converts to."""

    per_block: int  # values per block
    block_bytes: int
    bits: int | None = None  # MLX affine bits (group size QUANT_GROUP_SIZE); None: a float type
    # llama.cpp's grid has groups of 16, which MLX lacks: the values are re-quantized, not copied.
    requantized: bool = False
    mx_load: bool = False  # mx.load reads it exactly, so the gguf package is not needed


QUANT_GROUP_SIZE = 32
# Rows are decoded this many values at a time, bounding the float32 and bit-plane temporaries
# (~64 MB each) whatever the tensor's size (a 70B model's embedding holds 10^9 values).
DECODE_CHUNK_VALUES = 1 << 24
# Every type we convert. The exact ones keep llama.cpp's grid: a group of 32 values is
# scale * q + bias with q on ``bits`` bits (Q4_K and Q5_K: 8 such groups per 256-value block).
TENSOR_TYPES: dict[str, TensorType] = {
    "F32": TensorType(1, 4, mx_load=True),
    "F16": TensorType(1, 2, mx_load=True),
    "BF16": TensorType(1, 2),
    "Q4_0": TensorType(32, 18, 4, mx_load=True),
    "Q4_1": TensorType(32, 20, 4, mx_load=True),
    "Q5_0": TensorType(32, 22, 5),
    "Q5_1": TensorType(32, 24, 5),
    "Q8_0": TensorType(32, 34, 8, mx_load=True),
    "Q2_K": TensorType(256, 84, 2, requantized=True),
    "Q3_K": TensorType(256, 110, 3, requantized=True),
    "Q4_K": TensorType(256, 144, 4),
    "Q5_K": TensorType(256, 176, 5),
    "Q6_K": TensorType(256, 210, 6, requantized=True),
}
GGUF_PACKAGE_HINT = "pip install 'nrt-mlx[gguf]'"
TYPE_ROUTE = (
    "re-quantize the GGUF to Q8_0, Q4_K_M or F16 with llama.cpp "
    "(llama-quantize --allow-requantize IN.gguf OUT.gguf Q8_0), or convert the original "
    "Hugging Face model with mlx_lm.convert"
)


@dataclass(frozen=True)
class Architecture:
    """What an architecture's GGUF tensors mean for mlx-lm."""

    model_type: str  # mlx-lm's model module
    hf_class: str  # transformers' ``architectures`` entry
    # llama.cpp's converter interleaves the two rotary halves of each q/k head for Llama (its rope
    # rotates adjacent pairs) but not for Qwen2/Qwen3 (NEOX rope, which rotates halves like mlx-lm).
    permuted_qk: bool
    # Layer tensors beyond the Llama set, e.g. Qwen3's per-head RMSNorm of q and k.
    extra_layer_modules: tuple[tuple[str, str], ...] = ()
    # Modules allowed (and required) to carry a bias; None: any, as Llama's attention_bias and
    # mlp_bias say from the tensors present.
    bias_modules: tuple[str, ...] | None = ()


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "LlamaForCausalLM", permuted_qk=True, bias_modules=None),
    "qwen2": Architecture(
        "qwen2", "Qwen2ForCausalLM", permuted_qk=False, bias_modules=("attn_q", "attn_k", "attn_v")
    ),
    "qwen3": Architecture(
        "qwen3",
        "Qwen3ForCausalLM",
        permuted_qk=False,
        extra_layer_modules=(
            ("attn_q_norm", "self_attn.q_norm"),
            ("attn_k_norm", "self_attn.k_norm"),
        ),
    ),
}
ARCH_ROUTE = "convert the original Hugging Face model with mlx_lm.convert"

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
    def kind(self) -> TensorType:
        return TENSOR_TYPES[self.type_name]


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

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.architecture]

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
    holds a tensor type we cannot convert.
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
    if not 1 <= n_dims <= 8:
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
    if type_name not in TENSOR_TYPES:
        raise NrtError(
            f"{path}: tensor {_quote(name)} has type {type_name}, which cannot be converted "
            f"(supported: {', '.join(TENSOR_TYPES)}); {TYPE_ROUTE}"
        )
    per_block, block_bytes = TENSOR_TYPES[type_name].per_block, TENSOR_TYPES[type_name].block_bytes
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
    if arch not in ARCHITECTURES:
        raise NrtError(
            f"{gguf.path}: architecture '{arch or '(none)'}' is not supported (supported: "
            f"llama (Llama, Mistral), {', '.join(a for a in ARCHITECTURES if a != 'llama')}); "
            f"{ARCH_ROUTE}"
        )


def load_tensors(gguf: GGUFFile) -> dict[str, Any]:
    """All tensors as MLX arrays, keyed like ``mx.load`` names them.

    Tensors of an exact quantized type appear as ``NAME.weight`` (packed uint32), ``NAME.scales``
    and ``NAME.biases`` (a quantized tensor's name always ends in ``.weight`` in GGUF files);
    float tensors and those of a re-quantized type (``TensorType.requantized``) as one float array.
    """
    import mlx.core as mx

    if all(info.kind.mx_load for info in gguf.tensors.values()):
        try:
            arrays = mx.load(str(gguf.path))
        except (RuntimeError, ValueError) as err:
            raise NrtError(f"{gguf.path}: cannot read tensor data ({err})") from err
        return dict(arrays)
    quants = _gguf_quants(gguf)
    arrays = {}
    with open(gguf.path, "rb") as f:
        for info in gguf.tensors.values():
            f.seek(info.offset)
            arrays.update(_decode(quants, gguf.path, info, f.read(info.nbytes)))
    return arrays


def _gguf_quants(gguf: GGUFFile) -> Any:
    """llama.cpp's ``gguf.quants``, or a one-line error naming the tensor type that needs it."""
    try:
        from gguf import quants
    except ImportError:
        info = next(i for i in gguf.tensors.values() if not i.kind.mx_load)
        raise NrtError(
            f"{gguf.path}: tensor {_quote(info.name)} has type {info.type_name}, which is read "
            f"with llama.cpp's gguf package: {GGUF_PACKAGE_HINT}"
        ) from None
    return quants


def _decode(quants: Any, path: Path, info: TensorInfo, data: bytes) -> dict[str, Any]:
    """One tensor's MLX array(s) from its raw bytes (see ``load_tensors`` for the keys)."""
    import mlx.core as mx
    import numpy as np

    if info.type_name in ("F32", "F16"):
        dtype = "<f4" if info.type_name == "F32" else "<f2"
        return {info.name: mx.array(np.frombuffer(data, dtype=dtype).reshape(info.shape))}
    kind, cols = info.kind, info.shape[-1]
    rows = np.frombuffer(data, dtype=np.uint8).reshape(
        -1, cols // kind.per_block * kind.block_bytes
    )
    step = max(1, DECODE_CHUNK_VALUES // cols)
    pieces = [
        _decode_rows(quants, path, info, rows[i : i + step]) for i in range(0, len(rows), step)
    ]
    lead = info.shape[:-1]
    if kind.bits is None or kind.requantized:
        return {info.name: mx.array(np.concatenate(pieces).reshape(info.shape))}
    base = info.name[: -len(".weight")]
    return {
        f"{base}.{part}": mx.array(np.concatenate([p[i] for p in pieces]).reshape(*lead, -1))
        for i, part in enumerate(("weight", "scales", "biases"))
    }


def _decode_rows(quants: Any, path: Path, info: TensorInfo, rows: Any) -> Any:
    """Float values [rows, cols] of some rows' blocks, or their MLX (packed, scales, biases)."""
    from gguf import GGMLQuantizationType

    kind = info.kind
    blocks = rows.reshape(-1, kind.block_bytes)
    values = quants.dequantize(blocks, GGMLQuantizationType[info.type_name]).reshape(len(rows), -1)
    if kind.bits is None or kind.requantized:
        return values
    scales, biases = (a.reshape(len(rows), -1) for a in _affine_grid(info.type_name, blocks))
    codes = _codes(path, info, values, scales, biases)
    return pack_codes(codes, kind.bits), scales, biases


def _f16(blocks: Any, at: int) -> Any:
    """The float16 field at byte ``at`` of every block, as float32 of shape [blocks, 1]."""
    import numpy as np

    return blocks[:, at : at + 2].copy().view("<f2").astype(np.float32)


def _affine_grid(type_name: str, blocks: Any) -> tuple[Any, Any]:
    """Scale and bias of every group of 32 values: [blocks, groups per block] each.

    Facts from ggml's block layouts: Q4_0/Q5_0/Q8_0 hold a float16 d and decode to d * (q - 8),
    d * (q - 16), d * q with q signed; Q4_1/Q5_1 hold d and m and decode to d * q + m; Q4_K/Q5_K
    hold a float16 d and dmin and eight 6-bit (scale, min) pairs and decode group j to
    d * scale_j * q - dmin * min_j.
    """
    d = _f16(blocks, 0)
    if type_name in ("Q4_1", "Q5_1"):
        return d, _f16(blocks, 2)
    if type_name in ("Q4_0", "Q5_0", "Q8_0"):
        # As unsigned codes: Q8_0's int8 q is the code minus 128.
        offset = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128}[type_name]
        return d, -offset * d
    sc, mins = _k_scales_mins(blocks[:, 4:16])
    return d * sc, -(_f16(blocks, 2) * mins)


def _k_scales_mins(packed: Any) -> tuple[Any, Any]:
    """The eight 6-bit scales and mins packed in 12 bytes (ggml's get_scale_min_k4 layout):
    bytes 0-3 hold scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits; scales and mins 4-7
    take their low 4 bits from bytes 8-11 and their top 2 bits from the top of bytes 0-3 / 4-7."""
    import numpy as np

    lo, mid, hi = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=1)
    mins = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _codes(path: Path, info: TensorInfo, values: Any, scales: Any, biases: Any) -> Any:
    """The integer codes of ``values`` on their groups' grids; checked to reproduce them exactly."""
    import numpy as np

    bits = info.kind.bits
    assert bits is not None
    groups = values.reshape(*scales.shape, QUANT_GROUP_SIZE)
    s, b = scales[..., None], biases[..., None]
    safe = np.where(s == 0, 1, s)  # a zero scale: every value is the bias, any code does
    with np.errstate(invalid="ignore"):  # NaN in a corrupt block: reported below
        codes = np.clip(np.rint((groups - b) / safe), 0, 2**bits - 1).astype(np.uint8)
    if not np.array_equal(codes * s + b, groups):
        raise NrtError(
            f"{path}: tensor {_quote(info.name)} ({info.type_name}) has values off its blocks' grid "
            "(corrupt tensor data?); download the file again"
        )
    return codes.reshape(values.shape)


def pack_codes(codes: Any, bits: int) -> Any:
    """MLX's packed uint32 weight for integer codes [..., n]: code i at bit i * bits of each row's
    little-endian bit stream (for every bit width MLX supports)."""
    import numpy as np

    shape = codes.shape
    planes = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    stream = np.packbits(planes.reshape(*shape[:-1], shape[-1] * bits), axis=-1, bitorder="little")
    return np.ascontiguousarray(stream).view("<u4")
