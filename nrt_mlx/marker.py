"""The answer marker's rows in the model: started as copies of EOS's, trained with the adapters.

The released method adds a marker token whose input-embedding row and output (lm_head) row are
copies of EOS's, so at the start the model writes the marker exactly where it would have written
EOS, and the format term has something to raise (docs/NRT.md, "The answer marker"). With LoRA the
embedding and output matrices are frozen, so nrt-mlx wraps them: ``MarkerEmbedding`` and
``MarkerHead`` replace the marker token's row by a trainable ``marker_row`` (one shared row when
the embeddings are tied) and leave every other row to the frozen base, quantized or not.

The rows travel with the adapters in ``marker.safetensors`` (adapters.safetensors keeps exactly
mlx-lm's LoRA keys); ``load_rows`` puts them back into a freshly loaded base and ``bake`` writes
them into the base matrices for a fused model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from nrt_mlx.errors import NrtError
from nrt_mlx.vocab import Vocabulary

MARKER_FILE = "marker.safetensors"
ROW_NAME = "marker_row"

# A special token whose embedding row is this much shorter than a typical row was never trained
# (Llama-3's reserved tokens are ~0); the marker must not start there.
UNTRAINED_NORM_RATIO = 0.1


def _row(module: nn.Module, idx: int) -> mx.array:
    """Row ``idx`` of an embedding or linear weight [V, D], dequantized if needed, float32."""
    w = module.weight[idx : idx + 1]
    if getattr(module, "mode", "affine") != "affine":
        raise NrtError(
            f"rollout.marker_rows: eos: the base is quantized in mode '{module.mode}', whose rows "
            "nrt-mlx cannot copy yet; use an affine-quantized or dense base, or marker_rows: keep"
        )
    if isinstance(module, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
        scales, biases = module.scales[idx : idx + 1], module.biases[idx : idx + 1]
        w = mx.dequantize(w, scales, biases, module.group_size, module.bits)
    return w[0].astype(mx.float32)


def _with_column(logits: mx.array, x: mx.array, layer: _MarkerRow) -> mx.array:
    """The frozen base's ``logits`` [..., V] with the marker's column replaced by x . marker_row.

    Written as an update of that one column, the base's own column subtracted (its bias too): an
    ``mx.where`` over the vocabulary copies the logits, and its gradient twice more (measured: 3x
    the logits' memory in the backward pass against 1x, and 20 ms more per pass of 8 x 33 rows
    on SmolLM2). The column equals x . marker_row up to float rounding of the base's product."""
    base_row = mx.stop_gradient(_row(layer.base, layer.marker_id))
    delta = x @ layer.marker_row - x @ base_row.astype(x.dtype)
    bias = getattr(layer.base, "bias", None)
    if bias is not None:
        delta = delta - mx.stop_gradient(bias[layer.marker_id])
    return logits.at[..., layer.marker_id].add(delta.astype(logits.dtype))


class _MarkerRow(nn.Module):
    """A frozen ``base`` layer whose row ``marker_id`` is replaced by the trainable ``marker_row``."""

    def __init__(self, base: nn.Module, marker_id: int, row: mx.array) -> None:
        super().__init__()
        self.base = base
        self.marker_id = marker_id
        self.marker_row = row


class MarkerEmbedding(_MarkerRow):
    """The input embedding with the marker's row trainable (and, tied, its output row too)."""

    constant_row = False  # set by ``input_row_unused`` for inputs without the marker

    def __call__(self, ids: mx.array) -> mx.array:
        x = self.base(ids)
        row = mx.stop_gradient(self.marker_row) if self.constant_row else self.marker_row
        return mx.where((ids == self.marker_id)[..., None], row.astype(x.dtype), x)

    def as_linear(self, x: mx.array) -> mx.array:
        return _with_column(self.base.as_linear(x), x, self)


class MarkerHead(_MarkerRow):
    """The output layer with the marker's row trainable (untied embeddings)."""

    def __call__(self, x: mx.array) -> mx.array:
        return _with_column(self.base(x), x, self)


@contextmanager
def input_row_unused(model: nn.Module, ids: mx.array) -> Iterator[None]:
    """Within: when ``ids`` (host-built inputs, cheap to read) hold no marker token, the marker's
    input row enters the embedding as a constant. Its gradient from such inputs is 0 anyway, but
    MLX cannot tell: through ``mx.where`` every position depends on the row, so the backward pass
    would run through every layer below the LoRA layers for them (nrt_mlx.prefix's prompt and
    think passes)."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if not isinstance(embed, MarkerEmbedding) or bool(mx.any(ids == embed.marker_id)):
        yield
        return
    embed.constant_row = True
    try:
        yield
    finally:
        embed.constant_row = False


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(the module holding ``embed_tokens``, the model's ``lm_head`` or None when tied)."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "embed_tokens"):
        raise NrtError(
            f"rollout.marker_rows: eos: {type(model).__module__} has no model.embed_tokens to "
            "give the marker EOS's rows; set rollout.marker_rows: keep or a text rollout.marker"
        )
    head = getattr(model, "lm_head", None)
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", head is None)
    if head is None and not tied:  # e.g. an output layer named otherwise (llama4's `output`)
        raise NrtError(
            f"rollout.marker_rows: eos: {type(model).__module__} has untied embeddings but no "
            "lm_head to give the marker EOS's output row; set rollout.marker_rows: keep"
        )
    return inner, head


def install(model: nn.Module, marker_id: int, source_id: int) -> None:
    """Make the marker's rows trainable, starting from the rows of ``source_id`` (EOS)."""
    inner, head = _parts(model)
    embed = inner.embed_tokens
    inner.embed_tokens = MarkerEmbedding(embed, marker_id, _row(embed, source_id))
    inner.embed_tokens.base.freeze()
    if head is not None:
        model.lm_head = MarkerHead(head, marker_id, _row(head, source_id))
        model.lm_head.base.freeze()
    mx.eval(model.parameters())


def rows(model: nn.Module) -> dict[str, mx.array]:
    """The marker rows of a model, by parameter path (empty when none are installed)."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.endswith(ROW_NAME)}


def save_rows(model: nn.Module, directory: Path) -> None:
    """Write ``marker.safetensors`` into ``directory`` when the model has marker rows."""
    found = rows(model)
    if found:
        marker_id = str(_parts(model)[0].embed_tokens.marker_id)
        mx.save_safetensors(str(directory / MARKER_FILE), found, metadata={"marker_id": marker_id})


def load_rows(model: nn.Module, directory: Path) -> bool:
    """Install and load the marker rows saved in ``directory``, if any; True when there were."""
    path = directory / MARKER_FILE
    if not path.exists():
        return False
    try:
        saved, meta = mx.load(str(path), return_metadata=True)
        marker_id = int(meta["marker_id"])
    except (ValueError, KeyError, RuntimeError) as err:
        raise NrtError(f"{path}: not a marker-rows file ({err})") from None
    if not rows(model):
        install(model, marker_id, marker_id)
    expected = set(rows(model))
    if set(saved) != expected:
        raise NrtError(
            f"{path}: holds {sorted(saved)} but the model's marker rows are {sorted(expected)}; "
            "the file belongs to a model with other (tied/untied) embeddings"
        )
    model.load_weights(list(saved.items()), strict=False)
    mx.eval(model.parameters())
    return True


def _write_row(module: nn.Module, idx: int, row: mx.array) -> None:
    if isinstance(module, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
        q, scales, biases = mx.quantize(
            row[None].astype(mx.float32), module.group_size, module.bits
        )
        module.weight[idx] = q[0]
        module.scales[idx] = scales[0].astype(module.scales.dtype)
        module.biases[idx] = biases[0].astype(module.biases.dtype)
    else:
        module.weight[idx] = row.astype(module.weight.dtype)


def bake(model: nn.Module) -> None:
    """Write the trained marker rows into the base matrices and remove the wrappers (fuse)."""
    inner, head = _parts(model)
    if isinstance(inner.embed_tokens, MarkerEmbedding):
        wrapper = inner.embed_tokens
        _write_row(wrapper.base, wrapper.marker_id, wrapper.marker_row)
        inner.embed_tokens = wrapper.base
    if isinstance(head, MarkerHead):
        _write_row(head.base, head.marker_id, head.marker_row)
        model.lm_head = head.base
    mx.eval(model.parameters())


def check_trained(model: nn.Module, marker_id: int, text: str) -> None:
    """Refuse a special-token marker whose own input row looks untrained (rows kept as they are)."""
    embed = _parts(model)[0].embed_tokens
    count = embed.weight.shape[0]
    sample = [int(i) for i in mx.random.randint(0, count, (256,), key=mx.random.key(0)).tolist()]
    norms = sorted(float(mx.linalg.norm(_row(embed, i))) for i in sample)
    typical, own = norms[len(norms) // 2], float(mx.linalg.norm(_row(embed, marker_id)))
    if own < UNTRAINED_NORM_RATIO * typical:
        raise NrtError(
            f"rollout.marker {text!r}: its embedding row looks untrained (norm {own:.3g} against a "
            f"typical {typical:.3g}); set rollout.marker_rows: eos to start it from EOS's rows"
        )


def setup(model: nn.Module, vocab: Vocabulary, mode: str) -> bool:
    """The marker rows as ``rollout.marker_rows`` says: "eos" installs trainable rows started from
    EOS's, "keep" checks that the token's own rows are trained. True when rows are trained."""
    m = vocab.marker
    if not m.is_special:
        return False  # a text marker is made of ordinary, trained tokens
    if mode == "eos":
        install(model, m.ids[0], vocab.eos_id)
        return True
    check_trained(model, m.ids[0], m.text)
    return False
