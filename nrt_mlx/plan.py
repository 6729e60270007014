"""The memory plan: the peak unified memory a recipe needs, from the model's config.json alone.

``nrt-mlx plan RECIPE`` and the check ``nrt-mlx train`` makes first (``check_fits``) compute it
before any weight is loaded, so a run that cannot fit is refused in a second instead of crashing
after minutes of loading and sampling. A run has three phases whose peaks are planned apart:

* load: the weights at the precision ``model.quantize`` resolves to (``nrt_mlx.model.load_model``);
* sample: what stays resident (weights, adapters, marker rows, AdamW state) plus the KV caches of
  the step's Q x K rows at the prompt + think budget (``nrt_mlx.rollout``);
* update: resident, gradients, and the activations of one micro-batch's forward and backward pass
  (``nrt_mlx.step.update``, ``nrt_mlx.objective``), with or without gradient checkpointing.

Every term is one small function whose docstring gives its formula. Lengths are the recipe's
limits (the worst case: every trace at the think budget); the activation coefficients were counted
from what MLX's autodiff keeps, then scaled to ``mx.get_peak_memory()`` of real runs of the tiny
model and SmolLM2-135M (scripts/plan_memory.py prints the grid; within 20 % on every row).
Terms that depend on how the training step is structured: ``update_passes`` (shared-prompt or full
rows, which rows get a backward pass), ``layer_activations`` and ``logits_activations``; the
sampler's: ``kv_cache`` and ``prompt_caches``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nrt_mlx.errors import NrtError
from nrt_mlx.recipe import Recipe

GB = 1e9
FP32 = 4
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
KV_STEP = 256  # mlx-lm's KVCache and BatchKVCache grow in blocks of this many positions
MARKER_WINDOW = 32  # bound on MarkerWatch.window (marker bytes + 2) for a special-token marker
LORA_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- the model, from its config ---------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a decoder's config.json (Llama-family names)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    dtype_bytes: int  # of the checkpoint's floating tensors
    bits: int | None  # quantization of the checkpoint (None: dense)
    group_size: int
    source: str  # where the config came from

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of a block, by mlx-lm module name."""
        d, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "self_attn.q_proj": (d, q),
            "self_attn.k_proj": (d, kv),
            "self_attn.v_proj": (d, kv),
            "self_attn.o_proj": (q, d),
            "mlp.gate_proj": (d, i),
            "mlp.up_proj": (d, i),
            "mlp.down_proj": (i, d),
        }


def shape_from_config(config: dict[str, Any], source: str) -> ModelShape:
    """A ModelShape from config.json's keys; a missing one is a one-line error naming it."""
    text = config.get("text_config")
    if isinstance(text, dict):  # multimodal configs nest the language model's
        config = {**config, **text}

    def need(key: str) -> int:
        if not isinstance(config.get(key), int):
            raise NrtError(
                f"{source}: no integer '{key}' in the model config; the planner needs it"
            )
        return int(config[key])

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    quant = config.get("quantization") or {}
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return ModelShape(
        hidden=hidden,
        layers=need("num_hidden_layers"),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate=need("intermediate_size"),
        vocab=need("vocab_size"),
        tied=bool(config.get("tie_word_embeddings", False)),
        dtype_bytes=DTYPE_BYTES.get(dtype, 2),
        bits=quant.get("bits") if isinstance(quant, dict) else None,
        group_size=int(quant.get("group_size", 64)) if isinstance(quant, dict) else 64,
        source=source,
    )


def _gguf_shape(path: Path) -> ModelShape:
    """The shape from a GGUF file's metadata (no tensor data is read)."""
    from nrt_mlx.export.convert import model_config
    from nrt_mlx.export.gguf import QUANT_GROUP_SIZE, read_gguf

    gguf = read_gguf(path)
    config = model_config(gguf, {})  # the arrays are only read for rope scaling
    bits = [t.kind.bits for t in gguf.tensors.values() if t.kind.bits]
    if bits:  # nrt-mlx convert keeps the file's quantization
        common = max(set(bits), key=bits.count)
        config["quantization"] = {"bits": common, "group_size": QUANT_GROUP_SIZE}
    config["torch_dtype"] = "float16"
    return shape_from_config(config, str(path))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise NrtError(f"{path}: not a readable JSON model config ({err})") from None
    if not isinstance(data, dict):
        raise NrtError(f"{path}: not a model config (expected a JSON object)")
    return data


def read_shape(path: str | Path) -> ModelShape:
    """A config.json, a model directory holding one, or a .gguf file."""
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        return _gguf_shape(p)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise NrtError(f"{path}: no such config.json (or model directory, or .gguf file)")
    return shape_from_config(_read_json(p), str(p))


def _hub_config(repo_id: str) -> Path | None:
    """config.json of a Hub repo from the local Hugging Face cache, without the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found) if isinstance(found, str) else None


def default_model_shape() -> ModelShape:
    """The shape of the default model an empty model.path trains (quickstart fetches it): its
    converted directory, else its cached GGUF read as ``default_model_dir`` converts it (dense
    float32); never downloads."""
    from nrt_mlx.export import default_model

    root = default_model.cache_root()
    converted = root / default_model.MODEL_DIR_NAME / "config.json"
    if converted.is_file():
        return read_shape(converted)
    gguf = root / "gguf" / default_model.GGUF_NAME
    if not gguf.is_file():
        raise NrtError(
            f"model.path is empty, so the run uses the default model, which is not in {root} yet "
            "(quickstart fetches it); give the model's config with --config path/to/config.json"
        )
    return dataclasses.replace(_gguf_shape(gguf), bits=None, dtype_bytes=FP32)


def model_shape(recipe: Recipe, config: str | Path | None = None) -> ModelShape:
    """The shape of the recipe's model: from ``config`` when given, else from model.path (a local
    directory, a .gguf file, or a Hub id whose config.json is in the Hugging Face cache; empty:
    ``default_model_shape``)."""
    if config:
        return read_shape(config)
    path = recipe.model.path
    if not path:
        return default_model_shape()
    local = Path(path).expanduser()
    if local.exists():
        return read_shape(local)
    cached = _hub_config(path) if path.count("/") == 1 else None
    if cached is None:
        raise NrtError(
            f"model.path {path}: its config.json is not at hand (not downloaded yet); give it with "
            f"--config path/to/config.json (e.g. from https://huggingface.co/{path})"
        )
    return read_shape(cached)


# ---- precision ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """How the weights sit in memory once ``load_model`` is done (``resolve_quantize``)."""

    backend: str  # metal, cuda or cpu
    bits: int | None  # quantized linears (None: dense)
    group_size: int
    embedding_quantized: bool  # a quantized checkpoint kept as it is quantizes the embedding too
    float_bytes: int  # dense weights, scales and biases, and activations

    def describe(self) -> str:
        kind = "dense" if self.bits is None else f"{self.bits}-bit (group {self.group_size})"
        return f"{kind}, {8 * self.float_bytes}-bit floats on {self.backend}"


def resolve_precision(recipe: Recipe, shape: ModelShape, backend: str) -> Precision:
    """``model.quantize`` as ``load_model`` resolves it: auto is dense fp32 on the CPU backend and
    4-bit elsewhere; a quantized checkpoint keeps its own bits unless dense is asked for; the CPU
    backend casts every float to fp32 (docs/CPU.md)."""
    q = recipe.model.quantize
    want = None if q == "none" or (q == "auto" and backend == "cpu") else 4 if q == "auto" else q
    floats = FP32 if backend == "cpu" else shape.dtype_bytes
    if want is None:
        return Precision(backend, None, 0, False, floats)
    if shape.bits is not None:
        return Precision(backend, int(shape.bits), shape.group_size, True, floats)
    return Precision(backend, int(want), recipe.model.group_size, False, floats)


# ---- resident terms -----------------------------------------------------------------------------


def _matrix_bytes(rows: int, cols: int, p: Precision, quantized: bool) -> float:
    """rows x cols at bits/8 bytes each plus a scale and a bias per group when quantized (and the
    group size divides cols), else float_bytes each."""
    if quantized and p.bits and cols % p.group_size == 0:
        return rows * cols * (p.bits / 8 + 2 * p.float_bytes / p.group_size)
    return rows * cols * p.float_bytes


def weight_bytes(shape: ModelShape, p: Precision) -> float:
    """Embedding V x D (+ lm_head V x D when untied) + layers x sum of the block's linears, each
    at ``_matrix_bytes`` (nn.quantize takes Linear layers only, so a dense checkpoint quantized on
    load keeps its embedding dense) + the norms (2 per layer + 1) x D floats."""
    d, v = shape.hidden, shape.vocab
    total = _matrix_bytes(v, d, p, p.embedding_quantized)
    if not shape.tied:
        total += _matrix_bytes(v, d, p, True)
    block = sum(_matrix_bytes(o, i, p, True) for i, o in shape.linear_dims().values())
    return total + shape.layers * block + (2 * shape.layers + 1) * d * p.float_bytes


def lora_layers(recipe: Recipe, shape: ModelShape) -> int:
    """The blocks with adapters: lora.layers of them (-1: all), as ``num_lora_layers``."""
    n = recipe.lora.layers
    return shape.layers if n == -1 else min(n, shape.layers)


def adapter_parameters(recipe: Recipe, shape: ModelShape) -> int:
    """layers x sum over adapted linears of r (in + out), + out per linear for DoRA's magnitude;
    lora.keys null adapts every linear of a block (mlx-lm's default). Names other than the
    Llama-family ones are not counted (loading the model reports keys that match nothing)."""
    dims = shape.linear_dims()
    keys = [k for k in recipe.lora.keys or dims if k in dims]
    r, dora = recipe.lora.rank, recipe.lora.type == "dora"
    per_block = sum(r * (dims[k][0] + dims[k][1]) + (dims[k][1] if dora else 0) for k in keys)
    return lora_layers(recipe, shape) * per_block


def special_marker(recipe: Recipe) -> bool:
    """The marker is one special token: auto, or spelled <|...|>."""
    m = recipe.rollout.marker
    return m == "auto" or (m.startswith("<") and m.endswith(">"))


def marker_trained(recipe: Recipe) -> bool:
    """NRT with a special-token marker whose rows start from EOS's."""
    return (
        recipe.train.method == "nrt"
        and special_marker(recipe)
        and recipe.rollout.marker_rows == "eos"
    )


def marker_parameters(recipe: Recipe, shape: ModelShape) -> int:
    """D for the input row, + D for the output row when the embeddings are untied (marker.py)."""
    if not marker_trained(recipe):
        return 0
    return shape.hidden * (1 if shape.tied else 2)


def trainable_parameters(recipe: Recipe, shape: ModelShape) -> int:
    return adapter_parameters(recipe, shape) + marker_parameters(recipe, shape)


def optimizer_state(trainable: int) -> float:
    """AdamW's m and v: 2 x trainable x 4 bytes (the adapters are fp32)."""
    return 2 * trainable * FP32


def gradients(trainable: int) -> float:
    """3 x trainable x 4 bytes while micro-batches accumulate: the sum so far, the micro-batch's
    gradients and their new sum (clipping makes one more copy of the sum while the old one lives)."""
    return 3 * trainable * FP32


# ---- sampling -----------------------------------------------------------------------------------


def marker_tokens(recipe: Recipe) -> int:
    """Tokens of the marker: 1 for a special token; a text marker has at most one per UTF-8 byte."""
    return 1 if special_marker(recipe) else len(recipe.rollout.marker.encode())


def decode_steps(recipe: Recipe) -> int:
    """Most tokens a trace row decodes: the think budget + the marker window (rollout.py)."""
    m = recipe.rollout.marker
    window = MARKER_WINDOW if marker_tokens(recipe) == 1 else len(m.encode()) + 2
    return recipe.rollout.max_think_tokens + window


def _kv_row(shape: ModelShape, p: Precision) -> float:
    """Bytes of one position of one row's cache: layers x 2 (K, V) x kv heads x head_dim floats."""
    return shape.layers * 2 * shape.kv_heads * shape.head_dim * p.float_bytes


def kv_cache(recipe: Recipe, shape: ModelShape, p: Precision) -> float:
    """Q x K rows x (P + 256 ceil((S - 1) / 256)) positions x ``_kv_row``: the batched cache holds
    the longest prompt P (data.max_prompt_tokens) and grows in blocks of 256 over the S decode
    steps (``decode_steps``); rows are dropped as they finish, so this is the start's worst case."""
    rows = recipe.train.questions_per_step * recipe.rollout.samples
    grown = KV_STEP * math.ceil(max(decode_steps(recipe) - 1, 1) / KV_STEP)
    return rows * (recipe.data.max_prompt_tokens + grown) * _kv_row(shape, p)


def prompt_caches(recipe: Recipe, shape: ModelShape, p: Precision) -> float:
    """Q x 256 ceil(P / 256) positions x ``_kv_row``: each prompt's own prefill cache, kept until
    the rollout ends (rollout._decode)."""
    blocks = KV_STEP * math.ceil(recipe.data.max_prompt_tokens / KV_STEP)
    return recipe.train.questions_per_step * blocks * _kv_row(shape, p)


def reused_blocks(recipe: Recipe, shape: ModelShape) -> int:
    """Blocks below the first adapted one whose rollout states the update reuses
    (``nrt_mlx.reuse``): NRT with the shared prompt and a special-token marker, else 0."""
    t = recipe.train
    if t.method != "nrt" or not t.shared_prompt or not special_marker(recipe):
        return 0
    return shape.layers - lora_layers(recipe, shape)


def rollout_states(recipe: Recipe, shape: ModelShape, p: Precision) -> float:
    """(Q P + Q K T) positions x (D + 2 b KV head_dim) floats, b = ``reused_blocks``: per prompt
    and trace token, the hidden state entering the first adapted block and the keys and values
    of the blocks below it: one copy while sampling, and the passes' padded copy of it in the
    update (``step.release_states``)."""
    b = reused_blocks(recipe, shape)
    if b == 0:
        return 0.0
    q, k = recipe.train.questions_per_step, recipe.rollout.samples
    positions = q * recipe.data.max_prompt_tokens + q * k * recipe.rollout.max_think_tokens
    return positions * (shape.hidden + 2 * b * shape.kv_heads * shape.head_dim) * p.float_bytes


def sampling_logits(recipe: Recipe, shape: ModelShape, p: Precision) -> float:
    """max(prefill: P x V logits of one prompt, decode: 4 x Q K x V fp32 (logits, scaled, top-p's
    sorted copies))."""
    rows = recipe.train.questions_per_step * recipe.rollout.samples
    prefill = recipe.data.max_prompt_tokens * shape.vocab * p.float_bytes
    return max(prefill, 4 * rows * shape.vocab * FP32)


# ---- the update ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedPass:
    """One model call of a micro-batch: rows x tokens queries attending to ``keys`` positions."""

    rows: int
    tokens: int
    keys: int
    grad: bool  # a backward pass runs through it
    logits: bool  # the lm_head runs on it
    gathered: bool  # its rows concatenate keys and values recorded by earlier passes
    deep: bool  # its inputs hold the marker: the backward runs through every block


def micro_questions(recipe: Recipe) -> int:
    """Questions per forward/backward: micro_batch_questions, or the whole (largest) mini-batch."""
    t = recipe.train
    mini = math.ceil(t.questions_per_step / t.mini_batches)
    return min(t.micro_batch_questions or mini, mini)


def update_passes(recipe: Recipe) -> list[PlannedPass]:
    """The model calls of one micro-batch of q questions (P prompt, T think, m marker, A answer
    limits; Session.max_length = P + T + m + A), as ``nrt_mlx.batch.collate`` lays them out:

    * full rows (SFT; NRT without train.shared_prompt): q (K + 1) rows of P + T + m + A - 1 tokens
      (SFT: q rows of P + A - 1), all with gradient;
    * shared prompt (nrt_mlx.prefix): a prompt pass of q rows x P - 1 tokens; the think pass of
      q K rows x [last prompt token | z] = 1 + T tokens attending to P + T keys; the answer pass of
      q K rows x [m | y*] = m + A - 1 tokens attending to P + T + m + A - 1 keys; and the
      null-think rows' pass of q rows x m + A tokens without gradient (``backward_layers`` says
      which blocks each backward reaches).

    The trace rows are planned as one think pass at the think budget; ``collate`` may split them
    by think length into up to 4 passes, which only pads fewer tokens. Models the trainer's probe
    refuses for the shared prompt (sliding-window attention, absolute positions) train on full
    rows, so their plan is an underestimate.
    """
    q, k = micro_questions(recipe), recipe.rollout.samples
    d, t, m = recipe.data, recipe.rollout.max_think_tokens, marker_tokens(recipe)
    p, a = d.max_prompt_tokens, d.max_answer_tokens
    if recipe.train.method == "sft":
        n = p + a - 1
        return [PlannedPass(q, n, n, True, True, False, False)]
    if not recipe.train.shared_prompt:
        n = p + t + m + a - 1
        return [PlannedPass(q * (k + 1), n, n, True, True, False, True)]
    return [
        PlannedPass(q, p - 1, p - 1, True, False, False, False),
        PlannedPass(q * k, 1 + t, p + t, True, True, True, False),
        PlannedPass(q * k, m + a - 1, p + t + m + a - 1, True, True, True, True),
        PlannedPass(q, m + a, p - 1 + m + a, False, True, True, False),
    ]


# What MLX's autodiff keeps of a block for its backward pass (on the CPU backend attention runs
# as plain ops, so its probabilities are materialised): per query token the two RMSNorms' inputs,
# the queries and the SwiGLU's inputs (counted: 2 D + H head_dim + 2 I); per key the keys and
# values attended to (2 KV head_dim: a pass's own, concatenated after the gathered ones); and the
# attention probabilities [rows, H, tokens, keys]. A block with adapters also keeps the inputs of
# its adapted linears (counted: + 2 D + H head_dim + I). Measured peaks (scripts/plan_memory.py)
# are ~1.4x these counts on both models, so the coefficients below carry that factor: MLX keeps
# some arrays (masked scores, casts, graph siblings) longer than the vjp needs them.
FROZEN_FLOATS = (3, 1, 3)  # (x D, x H head_dim, x I) per token
ADAPTED_FLOATS = (5, 2, 5)
# On the CPU backend ``kernels.fast_mlps`` swaps in a SwiGLU whose backward keeps only its two
# inputs, not mlx-lm's sigmoid and product as well: one I fewer per token (measured: 4 % of the
# tiny model's peak).
CPU_SWIGLU_SAVED = 1
PROBABILITY_COPIES = 1.25
# At the backward's peak the pass with the largest probabilities holds one more block's copy
# (their cotangent); with checkpointing, also the activations of the block being recomputed.
ATTENTION_TEMPORARIES = 1
RECOMPUTED_BLOCKS = 1


def block_floats_per_token(shape: ModelShape, adapted: bool, p: Precision) -> int:
    """a D + b H head_dim + c I floats per token (FROZEN_FLOATS, or ADAPTED_FLOATS for a block
    with adapters; c less CPU_SWIGLU_SAVED on the CPU backend): what a block keeps for its
    backward, keys, values and probabilities aside."""
    a, b, c = ADAPTED_FLOATS if adapted else FROZEN_FLOATS
    c -= CPU_SWIGLU_SAVED if p.backend == "cpu" else 0
    return a * shape.hidden + b * shape.heads * shape.head_dim + c * shape.intermediate


def attention_floats(shape: ModelShape, ps: PlannedPass) -> int:
    """rows x (H x tokens x keys probabilities + 2 KV head_dim x keys keys and values): one
    block's attention arrays kept for the backward."""
    probs = PROBABILITY_COPIES * shape.heads * ps.tokens
    return ps.rows * ps.keys * (probs + 2 * shape.kv_heads * shape.head_dim)


def backward_layers(recipe: Recipe, shape: ModelShape, ps: PlannedPass) -> int:
    """Blocks a pass's backward runs through: every block for the ``deep`` pass, whose inputs hold
    the marker, when the marker's input row trains; else the adapted ones (passes without the
    marker take its row as a constant: ``marker.input_row_unused``)."""
    deep = ps.deep and marker_trained(recipe)
    return shape.layers if deep else lora_layers(recipe, shape)


def pass_activations(recipe: Recipe, shape: ModelShape, ps: PlannedPass, p: Precision) -> float:
    """What a pass keeps until its backward, without checkpointing: over its n =
    ``backward_layers`` blocks, the top lora.layers adapted, rows x tokens x
    ``block_floats_per_token`` + ``attention_floats``, at float_bytes each."""
    n = backward_layers(recipe, shape, ps)
    adapted = min(lora_layers(recipe, shape), n)
    tokens = ps.rows * ps.tokens
    per_token = adapted * block_floats_per_token(shape, True, p)
    per_token += (n - adapted) * block_floats_per_token(shape, False, p)
    return (tokens * per_token + n * attention_floats(shape, ps)) * p.float_bytes


def checkpointed_activations(
    recipe: Recipe, shape: ModelShape, ps: PlannedPass, p: Precision
) -> float:
    """With train.grad_checkpoint (``prefix.grad_checkpoint``), what a pass keeps: per block its
    inputs, rows x (tokens x D + 2 KV head_dim x keys) floats (the hidden state and the keys and
    values it attends to, which are explicit inputs of the checkpointed call)."""
    n = backward_layers(recipe, shape, ps)
    kv = 2 * shape.kv_heads * shape.head_dim
    return n * ps.rows * (ps.tokens * shape.hidden + kv * ps.keys) * p.float_bytes


def layer_activations(recipe: Recipe, shape: ModelShape, p: Precision, checkpoint: bool) -> float:
    """Over the passes with gradient, what each keeps until the backward (``pass_activations``, or
    ``checkpointed_activations`` with train.grad_checkpoint), plus the largest pass's transient
    (one block is differentiated at a time): ATTENTION_TEMPORARIES x one block's probabilities,
    and with checkpointing also RECOMPUTED_BLOCKS x an adapted block's activations."""
    kept, transient = 0.0, 0.0
    for ps in update_passes(recipe):
        if not ps.grad:
            continue
        probs = ps.rows * shape.heads * ps.tokens * ps.keys * p.float_bytes
        extra = ATTENTION_TEMPORARIES * probs
        if checkpoint:
            kept += checkpointed_activations(recipe, shape, ps, p)
            block = ps.rows * ps.tokens * block_floats_per_token(shape, True, p)
            extra += RECOMPUTED_BLOCKS * (block + attention_floats(shape, ps)) * p.float_bytes
        else:
            kept += pass_activations(recipe, shape, ps, p)
        transient = max(transient, extra)
    return kept + transient


# [rows, tokens, V] float32 arrays: each pass with gradient keeps its (tempered) logits for the
# log-softmax's backward; at the peak the largest pass holds LOGITS_TEMPORARIES more (the
# softmax and the cotangent; the marker's output column is a one-column update, so it adds no
# vocabulary-wide select to differentiate).
LOGITS_TEMPORARIES = 2


def logits_activations(recipe: Recipe, shape: ModelShape, p: Precision) -> float:
    """(sum over passes with gradient + LOGITS_TEMPORARIES x the largest pass) x rows x tokens x
    V x 4 bytes, over the passes that reach the lm_head."""
    sizes = [ps.rows * ps.tokens for ps in update_passes(recipe) if ps.logits]
    kept = sum(ps.rows * ps.tokens for ps in update_passes(recipe) if ps.logits and ps.grad)
    return (kept + LOGITS_TEMPORARIES * max(sizes, default=0)) * shape.vocab * FP32


# ---- the plan -----------------------------------------------------------------------------------


@dataclass
class Plan:
    """Bytes of every term, grouped by phase, the peak, and the memory it must fit in."""

    shape: ModelShape
    precision: Precision
    resident: dict[str, float]
    sample: dict[str, float]
    update: dict[str, float]
    memory: float
    memory_source: str

    def phase_peaks(self) -> dict[str, float]:
        base = sum(self.resident.values())
        return {
            "load": self.resident["weights"],
            "sample": base + sum(self.sample.values()),
            "update": base + sum(self.update.values()),
        }

    @property
    def peak(self) -> float:
        return max(self.phase_peaks().values())

    @property
    def fits(self) -> bool:
        return self.peak <= self.memory


def backend_name() -> str:
    from nrt_mlx.model import backend

    return backend()


def machine_memory(backend: str | None = None) -> tuple[float, str]:
    """(bytes, what they are): Metal's recommended working set on a Mac; else physical memory."""
    import mlx.core as mx

    backend = backend or backend_name()
    if backend == "metal":
        info = mx.device_info()
        size = info.get("max_recommended_working_set_size") or info.get("memory_size")
        if size:
            return float(size), "Metal's recommended working set"
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return float(pages), "physical memory"


def make_plan(
    recipe: Recipe,
    shape: ModelShape,
    backend: str | None = None,
    memory: float | None = None,
) -> Plan:
    """The plan of ``recipe`` on ``backend`` (default: this machine's) with ``memory`` bytes
    (default: ``machine_memory``)."""
    backend = backend or backend_name()
    if memory is None:
        memory, source = machine_memory(backend)
    else:
        source = "given"
    p = resolve_precision(recipe, shape, backend)
    trainable = trainable_parameters(recipe, shape)
    resident = {
        "weights": weight_bytes(shape, p),
        "adapters": adapter_parameters(recipe, shape) * FP32,
        "marker rows": marker_parameters(recipe, shape) * FP32,
        "AdamW state": optimizer_state(trainable),
    }
    sample = {}
    if recipe.train.method == "nrt":
        sample = {
            "KV cache": kv_cache(recipe, shape, p),
            "prompt caches": prompt_caches(recipe, shape, p),
            "sampling logits": sampling_logits(recipe, shape, p),
            "rollout states": rollout_states(recipe, shape, p),
        }
    update = {
        "gradients": gradients(trainable),
        "layer activations": layer_activations(recipe, shape, p, recipe.train.grad_checkpoint),
        "logits": logits_activations(recipe, shape, p),
        "rollout states": rollout_states(recipe, shape, p),
    }
    return Plan(shape, p, resident, sample, update, memory, source)


# ---- what to change when it does not fit ----------------------------------------------------------


def _changes(recipe: Recipe, p: Precision) -> list[tuple[str, list[Any]]]:
    """Keys to try, least change to the method first, each with its values from mildest on."""
    t, k = recipe.train, recipe.rollout.samples
    mq = micro_questions(recipe)
    out: list[tuple[str, list[Any]]] = []
    if not t.grad_checkpoint:
        out.append(("train.grad_checkpoint", [True]))
    if mq > 1:
        out.append(("train.micro_batch_questions", list(range(mq - 1, 0, -1))))
    bits = 16 if p.bits is None else p.bits
    lower = [b for b in (8, 4) if b < bits]
    if lower and p.backend != "cpu":  # quantized matmuls are ~57x slower on the CPU backend
        out.append(("model.quantize", lower))
    if recipe.train.method == "nrt" and k > 2:
        out.append(("rollout.samples", list(range(k - 1, 1, -1))))
    return out


def _with(recipe: Recipe, key: str, value: Any) -> Recipe:
    changed = copy.deepcopy(recipe)
    section, name = key.split(".")
    setattr(getattr(changed, section), name, value)
    return changed


def suggest(
    recipe: Recipe, shape: ModelShape, backend: str, memory: float
) -> tuple[list[tuple[str, Any]], float] | None:
    """The smallest change that fits: one key at its mildest value that fits, in the order of
    ``_changes``; else the keys applied one after another (each at its mildest fitting value, or
    its last). Returns ([(key, value)], planned peak), or None when nothing tried fits."""
    p = resolve_precision(recipe, shape, backend)
    changes = _changes(recipe, p)
    for key, values in changes:
        for value in values:
            plan = make_plan(_with(recipe, key, value), shape, backend, memory)
            if plan.fits:
                return [(key, value)], plan.peak
    chosen: list[tuple[str, Any]] = []
    current = recipe
    for key, values in changes:
        for value in values:
            trial = _with(current, key, value)
            plan = make_plan(trial, shape, backend, memory)
            if plan.fits or value == values[-1]:
                current = trial
                chosen.append((key, value))
                break
        if plan.fits:
            return chosen, plan.peak
    return None


def _setting(changes: list[tuple[str, Any]]) -> str:
    return " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes)


def advice(recipe: Recipe, plan: Plan) -> str:
    """One line: what to set so the run fits, or that nothing in the recipe makes it fit."""
    need = f"the plan needs {plan.peak / GB:.2f} GB of {plan.memory / GB:.2f} GB ({plan.memory_source})"
    found = suggest(recipe, plan.shape, plan.precision.backend, plan.memory)
    if found is None:
        return (
            f"{need}; no change of micro_batch_questions, grad_checkpoint, quantize or "
            "rollout.samples fits it: lower data.max_prompt_tokens, max_answer_tokens or "
            "rollout.max_think_tokens, or use a smaller model"
        )
    changes, peak = found
    return f"{need}; {_setting(changes)} fits it ({peak / GB:.2f} GB)"


# ---- report and check ---------------------------------------------------------------------------


def render(recipe: Recipe, plan: Plan) -> str:
    """The plan as text, term by term, ending with ``peak: N.NN GB``."""
    s, p = plan.shape, plan.precision
    mq, passes = micro_questions(recipe), update_passes(recipe)
    lines = [
        f"model: {s.source} ({s.layers} layers, hidden {s.hidden}, vocab {s.vocab}); "
        f"weights {p.describe()}",
        f"memory: {plan.memory / GB:.2f} GB ({plan.memory_source})",
        "resident:",
        *(f"  {k:<20} {v / GB:8.2f} GB" for k, v in plan.resident.items()),
    ]
    if plan.sample:
        rows = recipe.train.questions_per_step * recipe.rollout.samples
        lines.append(
            f"sampling ({rows} rows = Q {recipe.train.questions_per_step} x K "
            f"{recipe.rollout.samples}, up to {decode_steps(recipe)} decode steps):"
        )
        lines += [f"  {k:<20} {v / GB:8.2f} GB" for k, v in plan.sample.items()]
    shape_text = ", ".join(f"{ps.rows}x{ps.tokens}" for ps in passes)
    ckpt = "with" if recipe.train.grad_checkpoint else "without"
    lines.append(
        f"update ({mq} question(s) per micro-batch: rows x tokens {shape_text}; "
        f"{ckpt} gradient checkpointing):"
    )
    lines += [f"  {k:<20} {v / GB:8.2f} GB" for k, v in plan.update.items()]
    other = make_plan(
        _with(recipe, "train.grad_checkpoint", not recipe.train.grad_checkpoint),
        s,
        p.backend,
        plan.memory,
    ).update["layer activations"]
    lines.append(
        f"  ({'without' if recipe.train.grad_checkpoint else 'with'} checkpointing "
        f"the layer activations would be {other / GB:.2f} GB)"
    )
    lines += [
        "phase peaks: " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in plan.phase_peaks().items())
    ]
    if not plan.fits:
        lines.append(f"does not fit: {advice(recipe, plan)}")
    lines.append(f"peak: {plan.peak / GB:.2f} GB")
    return "\n".join(lines)


def check_fits(recipe: Recipe, source: str = "recipe") -> None:
    """Refuse, before any weight loads, a run whose plan exceeds this machine's memory; skipped
    with train.memory_check: false, or when the model's config is not at hand (the load itself
    then reports what is missing)."""
    if not recipe.train.memory_check:
        return
    try:
        shape = model_shape(recipe)
    except NrtError:
        return
    plan = make_plan(recipe, shape)
    if not plan.fits:
        raise NrtError(
            f"{source}: the run does not fit in memory: {advice(recipe, plan)}; "
            "'nrt-mlx plan' shows the terms; train.memory_check: false in the recipe (or --set "
            "train.memory_check=false) runs it anyway"
        )


BACKENDS = ("metal", "cuda", "cpu")


def plan_text(
    recipe_path: str,
    overrides: list[str] | None = None,
    config: str | None = None,
    backend: str | None = None,
    memory_gb: float | None = None,
) -> str:
    """``nrt-mlx plan``: the rendered plan of a recipe file."""
    from nrt_mlx.recipe import load_recipe

    if backend is not None and backend not in BACKENDS:
        raise NrtError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if memory_gb is not None and memory_gb <= 0:
        raise NrtError(f"--memory-gb must be > 0, got {memory_gb}")
    recipe = load_recipe(recipe_path, overrides)
    shape = model_shape(recipe, config)
    memory = None if memory_gb is None else memory_gb * GB
    return render(recipe, make_plan(recipe, shape, backend, memory))
