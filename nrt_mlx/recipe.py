"""The recipe: a YAML file parsed into typed, documented configuration.

Every section is a dataclass; ``recipes/reference.yaml`` documents every key. Unknown keys are
errors that name the closest valid key, and ``--set section.key=value`` overrides any key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from nrt_mlx.errors import NrtError


@dataclass
class ModelConfig:
    path: str = ""  # local mlx-lm directory or Hugging Face repo id
    quantize: Literal["auto", "none"] | int = "auto"  # auto: 4-bit on Metal/CUDA, fp32 on CPU
    group_size: int = 64
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    train: str = ""
    valid: str = ""
    question_field: str = "question"
    answer_field: str = "answer"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    system_prompt: str = ""  # prepended as a system turn when a record has none
    max_prompt_tokens: int = 1024
    max_answer_tokens: int = 512
    strict: bool = False
    shuffle: bool = True


@dataclass
class LoraConfig:
    type: Literal["lora", "dora"] = "lora"
    layers: int = 16
    rank: int = 16
    scale: float = 20.0
    dropout: float = 0.0
    keys: list[str] | None = (
        None  # e.g. ["self_attn.q_proj", "self_attn.v_proj"]; None: all linears
    )


@dataclass
class RolloutConfig:
    samples: int = 4  # K traces per question
    max_think_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    marker: str = "auto"  # answer marker: auto = an unused special token, else this text
    # A special-token marker's input/output rows: "eos" = start as copies of EOS's and train them
    # with the adapters (the released method); "keep" = the token's own rows, frozen.
    marker_rows: Literal["eos", "keep"] = "eos"
    stop_at_special: bool = True  # any special token ends a trace (dropped; the marker follows)
    think_prefix: str = ""  # text appended to the generation prompt before the trace


@dataclass
class ObjectiveConfig:
    aggregator: str = "weighted_sum_log_prob"
    fixed_token_reward: bool = True
    trace_coef: float = 1.0
    token_coef: float = 1.0
    format_coef: float = 0.3
    clip_to_null: bool = False  # R_k <- max(0, R_k - R_null)
    scale_by_std: bool = True
    # N, the per-row token-sum divisor: "released" = the released code's scale (longest response of
    # the rollout / 16, objective.released_normalizer); 0 = max_think_tokens + max_answer_tokens (the
    # automatic value of nrt-mlx 0.1, which saved runs store); > 0 = that constant
    normalizer: Literal["released"] | int = "released"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28


@dataclass
class OptimizerConfig:
    learning_rate: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    schedule: Literal["constant", "cosine", "linear"] = "cosine"  # after the linear warm-up
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    method: Literal["nrt", "sft"] = "nrt"
    steps: int = 100
    questions_per_step: int = 4
    micro_batch_questions: int = 0  # questions per forward/backward; 0 = all of the mini-batch
    mini_batches: int = 1  # disjoint mini-batches of whole questions, one update each
    updates_per_rollout: int = 1  # epochs over the rollout; >1 update per step turns on the ratio
    grad_checkpoint: bool = False
    seed: int = 0
    eval_every: int = 0
    eval_questions: int = 16
    eval_samples: int = 2
    collapse_stop: bool = False
    collapse_fraction: float = 0.3


@dataclass
class RunConfig:
    dir: str = "runs/nrt"
    save_every: int = 50
    keep_checkpoints: int = 3
    samples_every: int = 10
    log_every: int = 1


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f"did you mean '{match[0]}'?" if match else f"valid keys: {', '.join(options)}"


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint, converting ints to floats and YAML strings where sane."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except NrtError as err:
                errors.append(str(err))
        raise NrtError(f"{where}: {value!r} is not valid ({'; '.join(errors)})")
    if origin is Literal:
        if value in args:
            return value
        if isinstance(value, str) and value.lower() in args:
            return value.lower()
        allowed = ", ".join(repr(a) for a in args)
        raise NrtError(f"{where}: {value!r} is not one of {allowed}")
    if hint is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        raise NrtError(f"{where}: expected null, got {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list):
            raise NrtError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    scalar = _SCALARS.get(hint)
    return scalar(value, where) if scalar else value


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise NrtError(f"{where}: expected true or false, got {value!r}")


def _number(value: Any, kind: type, where: str, name: str) -> Any:
    """``value`` as ``kind`` (int or float): a number that is one, or a string that parses as one."""
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    elif not isinstance(value, bool) and isinstance(value, (int, float)):
        if kind is float or isinstance(value, int) or value.is_integer():
            return kind(value)
    raise NrtError(f"{where}: expected {name}, got {value!r}")


def _str(value: Any, where: str) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise NrtError(f"{where}: expected a string, got {value!r}")


_SCALARS = {
    bool: _bool,
    int: lambda value, where: _number(value, int, where, "an integer"),
    float: lambda value, where: _number(value, float, where, "a number"),
    str: _str,
}


def _section_from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise NrtError(f"{where}: unknown key '{key}', {_closest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Build a Recipe from nested dicts, validating every key and value."""
    if not isinstance(data, dict):
        raise NrtError(f"{source}: expected a mapping of sections (model:, data:, ...)")
    sections = {f.name: f for f in dataclasses.fields(Recipe)}
    hints = typing.get_type_hints(Recipe)
    kwargs = {}
    for name, value in data.items():
        if name not in sections:
            raise NrtError(
                f"{source}: unknown section '{name}', {_closest(str(name), list(sections))}"
            )
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise NrtError(f"{source}: section '{name}' must be a mapping of keys")
        kwargs[name] = _section_from_dict(hints[name], value, f"{source}: {name}")
    recipe = Recipe(**kwargs)
    validate(recipe, source)
    return recipe


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "--set") -> None:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars) in place."""
    sections = {f.name: f for f in dataclasses.fields(Recipe)}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise NrtError(f"{source} {item!r}: expected section.key=value, e.g. train.steps=10")
        dotted, raw = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if section not in sections:
            raise NrtError(
                f"{source} {item!r}: unknown section '{section}', {_closest(section, list(sections))}"
            )
        value = yaml.safe_load(raw) if raw.strip() else ""
        data.setdefault(section, {})
        if data[section] is None:
            data[section] = {}
        data[section][key] = value


# A run's recipe.yaml records every key its version had. A key it lacks is newer than the run: it
# takes the value that reproduces what the run's version did, so old runs resume unchanged.
SAVED_RUN_DEFAULTS: dict[str, dict[str, Any]] = {
    "rollout": {"marker_rows": "keep", "stop_at_special": False},  # nrt-mlx 0.1
}


def load_recipe(
    path: str | Path, overrides: list[str] | None = None, saved_run: bool = False
) -> Recipe:
    """Read a YAML recipe, apply overrides and validate. Errors name the file and key.

    ``saved_run``: the file is a run's resolved recipe; keys it lacks take ``SAVED_RUN_DEFAULTS``.
    """
    path = Path(path)
    if not path.exists():
        raise NrtError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise NrtError(
            f"{path}:{line} is not valid YAML ({getattr(err, 'problem', err)})"
        ) from None
    if not isinstance(data, dict):
        raise NrtError(f"{path}: expected a mapping of sections (model:, data:, ...)")
    if saved_run:
        for section, values in SAVED_RUN_DEFAULTS.items():
            given = data.get(section) or {}
            data[section] = {**values, **given} if isinstance(given, dict) else given
    apply_overrides(data, overrides or [])
    recipe = recipe_from_dict(data, str(path))
    base = path.parent
    # Relative data paths are relative to the recipe file, like mlx-lm's config files.
    for attr in ("train", "valid"):
        value = getattr(recipe.data, attr)
        if value and not Path(value).is_absolute() and (base / value).exists():
            setattr(recipe.data, attr, str((base / value).resolve()))
    if (
        recipe.model.path
        and not Path(recipe.model.path).is_absolute()
        and (base / recipe.model.path).exists()
    ):
        recipe.model.path = str((base / recipe.model.path).resolve())
    return recipe


def validate(recipe: Recipe, source: str = "recipe") -> None:
    """Value checks that types cannot express."""
    from nrt_mlx.objective import AGGREGATORS

    q = recipe.model.quantize
    if q not in ("auto", "none", 4, 8, 2, 3, 5, 6):
        raise NrtError(f"{source}: model.quantize must be auto, none, 4 or 8, got {q!r}")
    if recipe.objective.aggregator not in AGGREGATORS:
        raise NrtError(
            f"{source}: objective.aggregator '{recipe.objective.aggregator}' is unknown, "
            f"valid: {', '.join(AGGREGATORS)}"
        )
    problem = rollout_problem(recipe.rollout, "rollout.")
    if problem:
        raise NrtError(f"{source}: {problem}")
    checks = [
        (recipe.train.steps >= 1, "train.steps must be at least 1"),
        (recipe.train.questions_per_step >= 1, "train.questions_per_step must be at least 1"),
        (recipe.train.updates_per_rollout >= 1, "train.updates_per_rollout must be at least 1"),
        (recipe.train.mini_batches >= 1, "train.mini_batches must be at least 1"),
        (
            recipe.train.mini_batches <= recipe.train.questions_per_step,
            f"train.mini_batches ({recipe.train.mini_batches}) exceeds train.questions_per_step "
            f"({recipe.train.questions_per_step}): a mini-batch needs at least one question",
        ),
        (recipe.lora.layers >= 1 or recipe.lora.layers == -1, "lora.layers must be >= 1 (-1: all)"),
        (recipe.lora.rank >= 1, "lora.rank must be at least 1"),
        (recipe.optimizer.learning_rate > 0, "optimizer.learning_rate must be > 0"),
        (
            recipe.objective.normalizer == "released" or recipe.objective.normalizer >= 0,
            "objective.normalizer must be >= 0 (0: max_think_tokens + max_answer_tokens) or released",
        ),
        (len(recipe.optimizer.betas) == 2, "optimizer.betas must be a list of two numbers"),
        (0 <= recipe.optimizer.warmup_ratio < 1, "optimizer.warmup_ratio must be in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise NrtError(f"{source}: {message}")


def rollout_problem(r: RolloutConfig, prefix: str) -> str | None:
    """What is wrong with the sampler settings (keys named with ``prefix``), or None."""
    for ok, key, rule, value in (
        (r.samples >= 1, "samples", "must be at least 1", r.samples),
        (r.max_think_tokens >= 1, "max_think_tokens", "must be at least 1", r.max_think_tokens),
        (r.temperature > 0, "temperature", "must be > 0", r.temperature),
        (0 < r.top_p <= 1, "top_p", "must be in (0, 1]", r.top_p),
    ):
        if not ok:
            return f"{prefix}{key} {rule}, got {value}"
    return None


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML (atomically)."""
    from nrt_mlx.fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
