"""Merge a run's LoRA/DoRA adapters into the base weights: a standalone mlx-lm model directory.

The output loads with ``mlx_lm.load`` and ``python -m mlx_lm generate --model OUT`` without
nrt-mlx: ``model.safetensors`` (+ index), ``config.json`` (with ``quantization`` when the base
stays quantized), the base model's tokenizer files and chat template, copied byte for byte, and a
model card (``README.md``). The base is loaded exactly as the run loaded it, so the fused logits
equal base plus adapters (up to re-quantization of the merged weights for a quantized base).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from nrt_mlx import marker
from nrt_mlx.errors import NrtError, first_line
from nrt_mlx.export.manifest import OutputKind, check_output_dir, write_output_dir
from nrt_mlx.model import LoadedModel, apply_adapters, load_trained_base
from nrt_mlx.recipe import Recipe, with_remote_code
from nrt_mlx.rundir import RunDir, read_adapter_config

GGUF_FILE = "model.gguf"
GGUF_MODEL_TYPES = ("llama", "mistral", "mixtral")

# Files of the base model directory that belong to the tokenizer, chat template and generation
# defaults; weights, config.json and the base README are written anew.
TOKENIZER_PATTERNS = (
    "tokenizer*.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "tiktoken.model",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
    "*.py",
)


def fuse_run(
    run_dir: str | Path,
    out_dir: str | Path,
    checkpoint: int | None = None,
    dequantize: bool = False,
    export_gguf: bool = False,
    *,
    repo_id: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Fuse the adapters of ``run_dir`` (latest, or ``checkpoint``) into ``out_dir``; returns it.

    ``trust_remote_code`` (the --trust-remote-code flag) alone lets the base run its Hub code;
    the run's recipe.yaml asking for it without the flag is refused (``recipe.with_remote_code``).

    ``dequantize`` writes a dense model even when the run trained on a quantized base;
    ``export_gguf`` also writes ``model.gguf`` (Llama/Mistral, dense only); ``repo_id`` is the Hub
    repository the model card's usage snippet names (default: the output directory's name).
    The output directory is written atomically: it appears complete or not at all. An existing
    ``out_dir`` is replaced only when it is empty or holds exactly an earlier fused model (see
    ``nrt_mlx.export.manifest``); anything else is refused and left as it is.
    """
    run = RunDir(Path(run_dir))
    recipe = run.read_recipe()
    adapter_dir, step = run.adapter_dir(checkpoint)
    adapter_cfg = read_adapter_config(adapter_dir)
    out = Path(out_dir)
    check_out_dir(out, [run.root, Path(recipe.model.path).expanduser()])

    model_cfg = with_remote_code(recipe.model, trust_remote_code, str(run.recipe))
    loaded = load_trained_base(model_cfg, adapter_cfg)
    check_out_dir(out, [loaded.local_path])
    if export_gguf:
        check_gguf_exportable(loaded, dequantize)
    apply_adapters(loaded.model, adapter_dir)
    # The trained marker rows go into the embedding and output matrices: after dequantizing when
    # the output is dense (the row stays exact), before fusing otherwise (into the packed rows).
    if not dequantize:
        marker.bake(loaded.model)
    fuse_adapters(loaded.model, dequantize)
    if dequantize:
        marker.bake(loaded.model)
    config = fused_config(loaded, dequantize)
    restore_checkpoint_dtype(loaded.model, loaded.local_path)

    def fill(tmp: Path) -> None:
        write_model_dir(tmp, loaded, config)
        gguf_file = write_gguf(tmp, loaded.model, config) if export_gguf else None
        name = repo_id or out.name
        _write_card(tmp, run, recipe, adapter_cfg, step, loaded, config, name, gguf_file)

    return write_output_dir(out, FUSE_OUTPUT, fill)


# ---- the output directory ----------------------------------------------------------------------


def check_out_dir(out: Path, protected: list[Path]) -> None:
    """Refuse outputs that would replace the run, the base model or an unrelated directory."""
    target = out.expanduser().resolve()
    for path in protected:
        if not path.exists():
            continue
        keep = path.resolve()
        if target == keep or target in keep.parents:
            raise NrtError(
                f"{out}: writing there would replace {path}; choose another output directory"
            )
    check_output_dir(out, FUSE_OUTPUT)


def _is_fused_0_1(directory: Path) -> bool:
    """A model fused by nrt-mlx 0.1 (no manifest): its README.md is our model card."""
    from nrt_mlx.export.card import is_nrt_model_card

    return is_nrt_model_card(directory / "README.md")


FUSE_OUTPUT = OutputKind(
    command="fuse",
    what="a model fused by nrt-mlx",
    kinds=(
        ("model*.safetensors", "weights"),
        ("model.safetensors.index.json", "weights-index"),
        ("config.json", "config"),
        ("README.md", "model-card"),
        (GGUF_FILE, "gguf"),
        ("generation_config.json", "generation-config"),
        ("*.py", "code"),
        ("*", "tokenizer"),
    ),
    is_legacy=_is_fused_0_1,
    # What 0.1 wrote, less ``*.py`` (a user's script must not pass for copied model code).
    legacy_files=(
        "model.safetensors",
        "model-*-of-*.safetensors",
        "model.safetensors.index.json",
        "config.json",
        "README.md",
        GGUF_FILE,
        *(p for p in TOKENIZER_PATTERNS if p != "*.py"),
    ),
)


# ---- the base model and the fuse -------------------------------------------------------------


def fuse_adapters(model: nn.Module, dequantize: bool) -> int:
    """Replace every adapter layer by its merged layer; returns how many were fused.

    A quantized base layer is dequantized, merged and quantized again with its own group size
    and bits, unless ``dequantize``; then the remaining quantized layers are dequantized too.
    """
    fused = [
        (name, m.fuse(dequantize=dequantize))
        for name, m in model.named_modules()
        if hasattr(m, "fuse")
    ]
    if not fused:
        raise NrtError(
            "the adapter config added no adapter layer to the base model; nothing to fuse"
        )
    model.update_modules(tree_unflatten(fused))
    if dequantize:
        from mlx_lm.utils import dequantize_model

        dequantize_model(model)
    mx.eval(model.parameters())
    return len(fused)


def quantization_of(model: nn.Module) -> dict[str, Any] | None:
    """``{"group_size", "bits", "mode"}`` of the model's quantized layers, or None if dense."""
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return {"group_size": module.group_size, "bits": module.bits, "mode": module.mode}
    return None


def fused_config(loaded: LoadedModel, dequantize: bool) -> dict[str, Any]:
    """The model config for the output: the base's, with the quantization the weights now have."""
    config = copy.deepcopy(loaded.config)
    quant = quantization_of(loaded.model)
    if dequantize or quant is None:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    elif "quantization" not in config:
        # The run quantized a dense checkpoint on load; mlx-lm needs this to rebuild the layers.
        config["quantization"] = quant
    return config


def restore_checkpoint_dtype(model: nn.Module, base_dir: Path) -> None:
    """Cast float weights back to the base checkpoint's half precision, if it had one.

    On the CPU backend the base is upcast to fp32 for speed; writing the fused model in fp32 would
    double its size without adding information the base did not have.
    """
    dtype = _checkpoint_half_dtype(base_dir)
    if dtype is not None:
        model.set_dtype(dtype)
        mx.eval(model.parameters())


def _checkpoint_half_dtype(base_dir: Path) -> mx.Dtype | None:
    """bfloat16/float16 if the base's safetensors store floats that way, else None."""
    found: set[str] = set()
    for path in sorted(base_dir.glob("model*.safetensors")):
        found |= _safetensors_dtypes(path)
    if "BF16" in found:
        return mx.bfloat16
    if "F16" in found:
        return mx.float16
    return None


def _safetensors_dtypes(path: Path) -> set[str]:
    """Tensor dtypes named in a safetensors header (8-byte length, then JSON), without loading."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError):
        return set()
    return {v["dtype"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


# ---- writing the output --------------------------------------------------------------------------


def write_model_dir(directory: Path, loaded: LoadedModel, config: dict[str, Any]) -> None:
    """Weights, config and tokenizer files: what ``mlx_lm.load`` needs."""
    from mlx_lm.utils import save_config, save_model

    save_model(directory, loaded.model, donate_model=False)
    save_config(copy.deepcopy(config), config_path=directory / "config.json")
    copied = copy_tokenizer_files(loaded.local_path, directory)
    if not any(name.startswith("tokenizer") for name in copied):
        raise NrtError(f"{loaded.local_path}: no tokenizer files to copy into the fused model")


def copy_tokenizer_files(base_dir: Path, directory: Path) -> list[str]:
    """Copy the tokenizer, chat template and generation defaults unchanged; returns the names."""
    names = sorted(
        {p.name for pattern in TOKENIZER_PATTERNS for p in base_dir.glob(pattern) if p.is_file()}
    )
    for name in names:
        shutil.copyfile(base_dir / name, directory / name)
    return names


def check_gguf_exportable(loaded: LoadedModel, dequantize: bool) -> None:
    """mlx-lm's GGUF exporter writes dense Llama/Mistral weights only: fail before fusing."""
    model_type = loaded.config.get("model_type")
    if model_type not in GGUF_MODEL_TYPES:
        raise NrtError(
            f"--export-gguf: model_type '{model_type}' is not supported "
            f"(mlx-lm exports {', '.join(GGUF_MODEL_TYPES)}); drop --export-gguf"
        )
    if loaded.bits is not None and not dequantize:
        raise NrtError(
            f"--export-gguf: the base is {loaded.bits}-bit and GGUF export needs dense weights; "
            "add --dequantize"
        )


def write_gguf(directory: Path, model: nn.Module, config: dict[str, Any]) -> str:
    """Export the fused weights with mlx-lm's GGUF writer; reads the tokenizer from ``directory``."""
    from mlx_lm.gguf import convert_to_gguf

    gguf_config = copy.deepcopy(config)
    # Llama configs may leave out the KV head count when it equals the head count.
    gguf_config.setdefault("num_key_value_heads", gguf_config.get("num_attention_heads"))
    weights = dict(tree_flatten(model.parameters()))
    try:
        # mlx-lm prints the temporary path it writes to; the CLI reports the final directory.
        with contextlib.redirect_stdout(io.StringIO()):
            convert_to_gguf(directory, weights, gguf_config, str(directory / GGUF_FILE))
    except (ValueError, KeyError, NotImplementedError) as err:
        raise NrtError(
            f"--export-gguf: mlx-lm could not export this model ({first_line(err)})"
        ) from None
    return GGUF_FILE


def _write_card(
    directory: Path,
    run: RunDir,
    recipe: Recipe,
    adapter_cfg: dict[str, Any],
    step: int | None,
    loaded: LoadedModel,
    config: dict[str, Any],
    repo_id: str,
    gguf_file: str | None,
) -> None:
    from nrt_mlx.export.card import CardInputs, render_model_card
    from nrt_mlx.fileio import atomic_write_text

    inputs = CardInputs(
        recipe=recipe,
        adapter_config=adapter_cfg,
        metrics=run.read_metrics(),
        step=step,
        base_dir=loaded.local_path,
        quantization=config.get("quantization"),
        repo_id=repo_id,
        gguf_file=gguf_file,
    )
    atomic_write_text(directory / "README.md", render_model_card(inputs))
