"""The model card (README.md) of a fused model: Hub metadata, training summary, recipe, usage.

The YAML front matter is what the Hugging Face Hub indexes: ``library_name: mlx``,
``base_model`` (only for a Hub repo id, never a local path), tags, the base model's licence and
languages (read from the base's own card when it has one) and the datasets when they are Hub
datasets. The body says how the model answers (reasoning, marker, answer), how to run it with
mlx-lm, how it was trained, its final and evaluation metrics, and the full recipe.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nrt_mlx.recipe import Recipe

PAPER_URL = "https://arxiv.org/abs/2602.11549"
BASE_KEYS = ("license", "license_name", "license_link", "language")

# Metrics shown first, in this order; any other numeric metric follows alphabetically.
PREFERRED_METRICS = (
    "loss",
    "reward_mean",
    "reward_std",
    "answer_nll",
    "null_answer_nll",
    "trace_tokens_mean",
    "marker_rate",
    "trace_entropy",
)
HIDDEN_METRICS = ("step", "lr", "time", "elapsed", "tokens_per_sec")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class CardInputs:
    """Everything the card describes; ``fuse_run`` fills it from the run directory."""

    recipe: Recipe
    adapter_config: dict[str, Any]
    metrics: list[dict[str, Any]]  # metrics.jsonl records, in order
    step: int | None  # training step of the fused adapters (None: unknown)
    base_dir: Path | None  # local directory of the base model (its README.md has the licence)
    quantization: dict[str, Any] | None  # quantization of the fused weights, None if dense
    repo_id: str  # what the usage snippet loads: Hub repo id or directory name
    gguf_file: str | None = None


def render_model_card(inputs: CardInputs) -> str:
    """The whole README.md: YAML front matter, then the Markdown body."""
    meta = card_metadata(inputs)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n{card_body(inputs)}"


# ---- metadata ------------------------------------------------------------------------------------


def card_metadata(inputs: CardInputs) -> dict[str, Any]:
    recipe = inputs.recipe
    base_path = recipe.model.path or str(inputs.adapter_config.get("base_model") or "")
    base_repo = hub_repo_id(base_path, "models")
    meta: dict[str, Any] = {"library_name": "mlx", "pipeline_tag": "text-generation"}
    if base_repo:
        meta["base_model"] = base_repo
        meta["base_model_relation"] = "finetune"
    base_meta = base_card_metadata(inputs.base_dir, base_repo)
    for key in BASE_KEYS:
        if base_meta.get(key):
            meta[key] = base_meta[key]
    datasets = [
        d
        for d in (
            hub_repo_id(recipe.data.train, "datasets"),
            hub_repo_id(recipe.data.valid, "datasets"),
        )
        if d
    ]
    if datasets:
        meta["datasets"] = sorted(set(datasets))
    meta["tags"] = [
        "mlx",
        "nrt",
        "reasoning",
        "nrt-mlx",
        _adapter_type(inputs),
        recipe.train.method,
    ]
    meta["tags"] = list(dict.fromkeys(meta["tags"]))
    return meta


def hub_repo_id(path: str, kind: str) -> str | None:
    """The Hub id ``owner/name`` behind ``path``, or None for a plain local path.

    A path that does not exist locally and reads ``owner/name`` is a repo id; a local path inside
    the Hugging Face cache (``{kind}--owner--name/snapshots/...``) names its repo too.
    """
    if not path:
        return None
    local = Path(path).expanduser()
    if local.exists():
        for part in local.absolute().parts:
            pieces = part.split("--")
            if len(pieces) == 3 and pieces[0] == kind:
                return f"{pieces[1]}/{pieces[2]}"
        return None
    if path.startswith((".", "/", "~")) or not _REPO_ID.match(path):
        return None
    return path


def base_card_metadata(base_dir: Path | None, base_repo: str | None) -> dict[str, Any]:
    """Front matter of the base model's own README (licence, languages), or {} if unknown."""
    readme = base_dir / "README.md" if base_dir is not None else None
    if (readme is None or not readme.exists()) and base_repo:
        readme = _download_readme(base_repo)
    if readme is None or not readme.exists():
        return {}
    return read_front_matter(readme)


def _download_readme(repo_id: str) -> Path | None:
    """The base's README from the Hub (or its cache); None when offline or absent."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, "README.md"))
    except Exception:  # the licence is optional: no network, gated or missing README
        return None


def read_front_matter(readme: Path) -> dict[str, Any]:
    """The YAML metadata block at the top of a model card, or {} if it has none or is broken."""
    try:
        from huggingface_hub import metadata_load

        return metadata_load(readme) or {}
    except Exception:  # a base card with broken YAML must not stop the fuse
        return {}


def is_nrt_model_card(readme: Path) -> bool:
    """Whether ``readme`` is a card this module wrote (so its directory may be replaced)."""
    if not readme.exists():
        return False
    meta = read_front_matter(readme)
    tags = meta.get("tags") or []
    return meta.get("library_name") == "mlx" and "nrt" in tags


# ---- body ----------------------------------------------------------------------------------------


def card_body(inputs: CardInputs) -> str:
    parts = [
        _intro(inputs),
        _how_it_answers(inputs),
        _usage(inputs),
        _training(inputs),
        _metrics_section(inputs),
        _recipe_section(inputs),
    ]
    return "\n".join(p for p in parts if p)


def _intro(inputs: CardInputs) -> str:
    recipe = inputs.recipe
    base = recipe.model.path or str(inputs.adapter_config.get("base_model") or "the base model")
    base_repo = hub_repo_id(base, "models")
    base_ref = (
        f"[{base_repo}](https://huggingface.co/{base_repo})"
        if base_repo
        else inline_code(_display_path(base))
    )
    how = (
        f"with [Native Reasoning Training]({PAPER_URL}) (NRT): it learned to reason from "
        "question/answer pairs alone, rewarding the reasoning traces that make the reference "
        "answer more likely"
        if recipe.train.method == "nrt"
        else "with supervised fine-tuning on question/answer pairs (the NRT baseline)"
    )
    return (
        f"# {inputs.repo_id}\n\n"
        f"A fine-tune of {base_ref} {how}. It was trained with nrt-mlx on MLX, and the "
        f"{_adapter_name(inputs)} adapters were merged into the weights, so it is a "
        "standalone mlx-lm model.\n"
    )


def _marker(inputs: CardInputs) -> str | None:
    """The answer marker text the run used, when the run recorded it."""
    info = inputs.adapter_config.get("nrt_mlx") or {}
    marker = info.get("marker") or inputs.recipe.rollout.marker
    return None if not marker or marker == "auto" else str(marker)


def _how_it_answers(inputs: CardInputs) -> str:
    if inputs.recipe.train.method != "nrt":
        return ""
    marker = _marker(inputs)
    marker_text = (
        f"the answer marker {inline_code(marker_literal(marker))}"
        if marker
        else "the answer marker chosen at training time"
    )
    lines = [
        "## How it answers\n",
        f"The model first writes its reasoning, then {marker_text}, then the answer. "
        "Split the output at the marker to get the answer alone.",
    ]
    prefix = inputs.recipe.rollout.think_prefix
    if prefix:
        lines.append(
            f"During training the text {inline_code(json.dumps(prefix))} followed the generation prompt; "
            "append it to the prompt as the snippet below does."
        )
    return "\n".join(lines) + "\n"


def _usage(inputs: CardInputs) -> str:
    r = inputs.recipe
    max_tokens = r.rollout.max_think_tokens + r.data.max_answer_tokens
    code = [
        "from mlx_lm import generate, load",
        "",
        f"model, tokenizer = load({json.dumps(inputs.repo_id)})",
        'messages = [{"role": "user", "content": "Why is the sky blue?"}]',
        "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
    ]
    if r.rollout.think_prefix:
        code.append(f"prompt += {json.dumps(r.rollout.think_prefix)}")
    code.append(f"text = generate(model, tokenizer, prompt=prompt, max_tokens={max_tokens})")
    marker = _marker(inputs) if r.train.method == "nrt" else None
    if marker:
        code.append(f"reasoning, _, answer = text.partition({json.dumps(marker)})")
        code.append("print(answer.strip())")
    else:
        code.append("print(text)")
    cli = f'mlx_lm.generate --model {inputs.repo_id} --prompt "Why is the sky blue?" --max-tokens {max_tokens}'
    text = (
        "## Use with mlx\n\n"
        + fenced(f"pip install mlx-lm\n{cli}\n", "bash")
        + "\n"
        + fenced("\n".join(code) + "\n", "python")
    )
    if inputs.gguf_file:
        text += (
            f"\n{inline_code(inputs.gguf_file)} holds the same weights in GGUF, exported with mlx-lm "
            "(llama.cpp and compatible runtimes).\n"
        )
    return text


def _training(inputs: CardInputs) -> str:
    r = inputs.recipe
    a = inputs.adapter_config
    params = a.get("lora_parameters") or {}
    kind = _adapter_name(inputs)
    method = f"NRT, aggregator `{r.objective.aggregator}`" if r.train.method == "nrt" else "SFT"
    steps = (
        f"{inputs.step} of {r.train.steps}"
        if inputs.step is not None
        else f"{r.train.steps} (planned)"
    )
    rows = [
        ("Method", method),
        (
            "Adapters",
            f"{kind}, rank {params.get('rank', r.lora.rank)}, scale {params.get('scale', r.lora.scale)}, "
            f"{a.get('num_layers', r.lora.layers)} layers, merged into the weights",
        ),
        ("Base during training", _precision(a.get("base_quantization_bits"))),
        ("Fused weights", _quant_text(inputs.quantization)),
        ("Steps", steps),
        ("Questions per step", str(r.train.questions_per_step)),
        ("Learning rate", f"{r.optimizer.learning_rate:g}"),
    ]
    if r.train.method == "nrt":
        rows.insert(
            4,
            (
                "Traces per question",
                f"{r.rollout.samples}, up to {r.rollout.max_think_tokens} tokens",
            ),
        )
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"## Training\n\n| | |\n|---|---|\n{table}\n"


def _precision(bits: Any) -> str:
    return "dense" if bits is None else f"{bits}-bit (QLoRA)"


def _quant_text(quantization: dict[str, Any] | None) -> str:
    if not quantization:
        return "dense"
    return f"{quantization.get('bits')}-bit, group size {quantization.get('group_size')}"


def final_metrics(
    metrics: list[dict[str, Any]], step: int | None
) -> tuple[int | None, dict[str, Any]]:
    """The last training record up to ``step``: its step and its numeric metrics."""
    for record in reversed(_up_to(metrics, step)):
        if "loss" in record:
            values = {k: v for k, v in record.items() if not k.startswith("eval_")}
            return record.get("step"), _numeric(values)
    return None, {}


def eval_metrics(
    metrics: list[dict[str, Any]], step: int | None
) -> tuple[int | None, dict[str, Any]]:
    """The last evaluation up to ``step``: its step and its ``eval_*`` metrics."""
    for record in reversed(_up_to(metrics, step)):
        evals = {k: v for k, v in record.items() if k.startswith("eval_")}
        if evals:
            return record.get("step"), _numeric(evals)
    return None, {}


def _up_to(metrics: list[dict[str, Any]], step: int | None) -> list[dict[str, Any]]:
    if step is None:
        return metrics
    return [m for m in metrics if isinstance(m.get("step"), int) and m["step"] <= step]


def _numeric(values: dict[str, Any]) -> dict[str, Any]:
    keep = {
        k: v
        for k, v in values.items()
        if k not in HIDDEN_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    first = [k for k in PREFERRED_METRICS if k in keep]
    rest = sorted(k for k in keep if k not in PREFERRED_METRICS)
    return {k: keep[k] for k in first + rest}


def _metrics_section(inputs: CardInputs) -> str:
    out = []
    step, final = final_metrics(inputs.metrics, inputs.step)
    if final:
        out.append(f"### Final training metrics (step {step})\n\n" + _table(final))
    else:
        out.append("### Final training metrics\n\nNo metrics were recorded.\n")
    estep, evals = eval_metrics(inputs.metrics, inputs.step)
    if evals:
        out.append(f"### Evaluation (step {estep}, held-out questions)\n\n" + _table(evals))
    return "\n".join(out)


def _table(values: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in values.items())
    return f"| Metric | Value |\n|---|---|\n{rows}\n"


def _fmt(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _recipe_section(inputs: CardInputs) -> str:
    text = yaml.safe_dump(inputs.recipe.to_dict(), sort_keys=False, allow_unicode=True)
    return (
        "## Recipe\n\nThe full nrt-mlx recipe of the run (`nrt-mlx train` accepts it as is):\n\n"
        + fenced(_hide_home(text), "yaml")
    )


def marker_literal(marker: str) -> str:
    """The marker as typed: plain when Markdown shows it faithfully, else its JSON string literal.

    Inside inline code Markdown turns a newline into a space and trims one space at each end, so
    a marker such as "\\nAnswer:\\n" would show as " Answer: "; the literal "\\nAnswer:\\n" is
    also what the usage snippet splits on.
    """
    plain = marker.isprintable() and marker == marker.strip() and "  " not in marker
    return marker if plain else json.dumps(marker, ensure_ascii=False)


def inline_code(text: str) -> str:
    """``text`` as Markdown inline code, whatever backticks or spaces it holds (CommonMark 6.1)."""
    fence = "`" * (_longest_backtick_run(text) + 1)
    # A space inside the fence keeps a backtick at either end from joining it; one is trimmed.
    pad = " " if text.startswith(("`", " ")) or text.endswith(("`", " ")) else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def fenced(text: str, lang: str) -> str:
    """A fenced code block longer than any backtick run inside ``text`` (which ends in a newline)."""
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{fence}{lang}\n{text}{fence}\n"


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _adapter_type(inputs: CardInputs) -> str:
    """``lora`` or ``dora`` (lower case: it is also a tag)."""
    return str(inputs.adapter_config.get("fine_tune_type") or inputs.recipe.lora.type)


def _adapter_name(inputs: CardInputs) -> str:
    return {"lora": "LoRA", "dora": "DoRA"}.get(_adapter_type(inputs), _adapter_type(inputs))


def _display_path(path: str) -> str:
    return _hide_home(path)


def _hide_home(text: str) -> str:
    """Write the user's home directory as ``~``: the card may be published."""
    home = str(Path.home())
    return text.replace(home + "/", "~/") if home not in ("/", "") else text
