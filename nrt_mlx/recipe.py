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
    train: str = ""  # JSONL file, folder of train/valid/test.jsonl, or hf:owner/name[:split]
    valid: str = ""
    hf_config: str = ""  # configuration ("subset") of hf: datasets, e.g. main for openai/gsm8k
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
    # Training's random draws: "row" = each trace row draws from its own key (from the step's key
    # and the row's index in the step), so a run on N processes (mlx.launch) samples the traces
    # one process would; "batch" = one key per decode step for the whole batch (runs saved before)
    sample_keys: Literal["row", "batch"] = "row"


# objective.AGGREGATORS' names, here so that validating a recipe imports no MLX (tests/test_recipe.py
# checks that the two agree).
AGGREGATOR_NAMES = (
    "log_prob",
    "prob",
    "geometric_mean",
    "arithmetic_mean",
    "weighted_sum_inverse_prob",
    "weighted_sum_log_prob",
)


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
    memory_check: bool = True  # refuse a run whose memory plan (nrt_mlx.plan) does not fit
    shared_prompt: bool = True  # run each question's prompt once for its K + 1 rows (NRT)
    seed: int = 0
    eval_every: int = 0
    eval_questions: int = 16
    eval_samples: int = 2
    eval_extract: str = ""  # regex (one capture group) of eval's flexible match; "": default rule
    collapse_stop: bool = False
    collapse_fraction: float = 0.3
    report_to: list[str] = field(default_factory=list)  # trackers: wandb, tensorboard
    report_project: str = "nrt-mlx"  # the wandb project


@dataclass
class RunConfig:
    dir: str = "runs/nrt"
    save_every: int = 50
    keep_checkpoints: int = 3
    samples_every: int = 10  # 0: never
    log_every: int = 1
    # Written by ``train --resume --set``: {from_step, key, value, was} per accepted override.
    overrides: list[dict[str, Any]] = field(default_factory=list)


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
            try:
                value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
            except yaml.YAMLError:
                raise NrtError(
                    f"{where}: {value!r} is not a valid list; write it as [a, b] or a,b"
                ) from None
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
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict):  # no key takes a mapping: "Answer:" is the text as given
            value = raw
        data.setdefault(section, {})
        if data[section] is None:
            data[section] = {}
        data[section][key] = value


# A run's recipe.yaml records every key its version had. A key it lacks is newer than the run: it
# takes the value that reproduces what the run's version did, so old runs resume unchanged.
SAVED_RUN_DEFAULTS: dict[str, dict[str, Any]] = {
    # marker_rows, stop_at_special: nrt-mlx 0.1; sample_keys: before data-parallel training
    "rollout": {"marker_rows": "keep", "stop_at_special": False, "sample_keys": "batch"},
    # shared_prompt: full rows, same figures; memory_check: a run that trained is not refused now
    "train": {"shared_prompt": False, "memory_check": False},
}


# ---- resuming with --set ------------------------------------------------------------------------

_WEIGHTS = "the checkpoint's adapter weights have this layout"
# Keys a resumed run cannot change: they fix the shape or the meaning of what the run saved.
# Every other key may change; the change is recorded in run.overrides with its first step.
RESUME_FIXED: dict[str, str] = {
    "model.path": "the adapters were trained on this base",
    "model.quantize": "the adapters were trained on the base at this precision",
    "model.group_size": "the adapters were trained on the base quantized with this group size",
    "model.trust_remote_code": "only the --trust-remote-code flag sets it",
    "lora.type": _WEIGHTS,
    "lora.layers": _WEIGHTS,
    "lora.rank": _WEIGHTS,
    "lora.keys": _WEIGHTS,
    "lora.scale": "it multiplies the saved adapter weights, so another value is another model",
    "rollout.marker": "the checkpoint trained this answer marker",
    "rollout.marker_rows": "the checkpoint holds (or lacks) trained rows of the marker",
    "train.method": "the checkpoint, its adapter_config.json and the metrics belong to one method",
    "objective.aggregator": (
        "adapter_config.json, the model card and compare name the run by it, and rewards before "
        "and after would be on different scales"
    ),
    "train.mini_batches": (
        "the checkpoint counts optimizer updates as steps x mini_batches x updates_per_rollout, "
        "so the learning-rate schedule would jump"
    ),
    "train.updates_per_rollout": (
        "the checkpoint counts optimizer updates as steps x mini_batches x updates_per_rollout, "
        "so the learning-rate schedule would jump"
    ),
    "run.dir": "a resumed run stays in its directory (copy the directory to continue elsewhere)",
    "run.overrides": "resume writes it",
}


def flat_keys(recipe: Recipe) -> dict[str, Any]:
    """``section.key -> value`` of every key but run.overrides (the record of changes itself)."""
    out = {
        f"{section}.{key}": value
        for section, values in recipe.to_dict().items()
        for key, value in values.items()
    }
    out.pop("run.overrides")
    return out


def resume_overrides(saved: Recipe, changed: Recipe, from_step: int) -> list[dict[str, Any]]:
    """The run.overrides entries of resuming ``saved`` as ``changed`` from step ``from_step``.

    A change to a key of ``RESUME_FIXED`` is an error naming the key and why it is fixed.
    """
    before, after = flat_keys(saved), flat_keys(changed)
    entries = []
    for key, value in after.items():
        if value == before[key]:
            continue
        if key in RESUME_FIXED:
            raise NrtError(
                f"--set {key}: cannot change when resuming ({before[key]!r} -> {value!r}): "
                f"{RESUME_FIXED[key]}; start a new run to change it"
            )
        entries.append({"from_step": from_step, "key": key, "value": value, "was": before[key]})
    return entries


def with_remote_code(cfg: ModelConfig, allowed: bool, source: str) -> ModelConfig:
    """``cfg`` with trust_remote_code set by the command line (``--trust-remote-code``) alone.

    A recipe (the user's own or a saved run's) that asks for the model's own code from the Hub
    without the flag is refused: a recipe file can come from anyone, and running the code it asks
    for must be the decision of the user who runs the command.
    """
    if cfg.trust_remote_code and not allowed:
        raise NrtError(
            f"{source}: model.trust_remote_code is true, but only the --trust-remote-code flag "
            f"lets a model run its own code from the Hub; add the flag if you trust {cfg.path or 'it'}"
        )
    return dataclasses.replace(cfg, trust_remote_code=allowed)


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (an empty file: {}). A file that cannot be read, is
    not UTF-8 or not YAML (with its line), or holds no mapping of ``what`` is one line naming it."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise NrtError(
            f"{path}:{line} is not valid YAML ({getattr(err, 'problem', err)})"
        ) from None
    except UnicodeDecodeError:
        raise NrtError(f"{path}: not a text file (not UTF-8); give a YAML file") from None
    except OSError as err:
        raise NrtError(f"{path}: cannot read it ({err.strerror})") from None
    if not isinstance(data, dict):
        raise NrtError(f"{path}: expected a mapping of {what}")
    return data


def load_recipe(
    path: str | Path, overrides: list[str] | None = None, saved_run: bool = False
) -> Recipe:
    """Read a YAML recipe, apply overrides and validate. Errors name the file and key.

    ``saved_run``: the file is a run's resolved recipe; keys it lacks take ``SAVED_RUN_DEFAULTS``.
    Local paths (data.train, data.valid, and model.path when it is a local directory) come back
    absolute: see ``_absolute_paths``.
    """
    path = Path(path)
    if not path.exists():
        raise NrtError(f"{path}: recipe file not found")
    if path.is_dir():
        hint = (
            f"; it is a run directory: continue it with 'nrt-mlx train --resume {path}'"
            if (path / "recipe.yaml").is_file()
            else ""
        )
        raise NrtError(f"{path}: is a directory, not a recipe file (give the YAML file){hint}")
    data = read_yaml_mapping(path, "sections (model:, data:, ...)")
    if saved_run:
        for section, values in SAVED_RUN_DEFAULTS.items():
            given = data.get(section) or {}
            data[section] = {**values, **given} if isinstance(given, dict) else given
    overrides = overrides or []
    apply_overrides(data, overrides)
    recipe = recipe_from_dict(data, str(path))
    from_command_line = {item.split("=", 1)[0].strip() for item in overrides}
    _absolute_paths(recipe, path.parent, from_command_line)
    return recipe


def _absolute_paths(recipe: Recipe, base: Path, from_command_line: set[str]) -> None:
    """Make local paths absolute, so that a run's recipe.yaml means the same files from any folder.

    A relative path in a recipe file is relative to the file's folder when it exists there (like
    mlx-lm's config files), else to the working folder; one given with ``--set`` is relative to the
    working folder. ``~`` is expanded. A path that exists in neither place is left as given: a Hub
    repo id (model.path), or a data file the loader then reports as missing.
    """
    # run.dir: ~ expanded and absolute (a folder literally named "~" is a trap), made if missing.
    recipe.run.dir = str(Path(recipe.run.dir).expanduser().absolute())
    for section, key in (("data", "train"), ("data", "valid"), ("model", "path")):
        cfg = getattr(recipe, section)
        value = getattr(cfg, key)
        if not value or value.startswith("hf:"):  # empty, or a Hub dataset (nrt_mlx.data)
            continue
        given = Path(value).expanduser()
        bases = [Path.cwd()] if f"{section}.{key}" in from_command_line else [base, Path.cwd()]
        for folder in bases:
            candidate = given if given.is_absolute() else folder / given
            if candidate.exists():
                setattr(cfg, key, str(candidate.resolve()))
                break
    # mlx-lm's --data DIR: the folder's valid.jsonl is data.valid unless one is given.
    folder = Path(recipe.data.train)
    if not recipe.data.valid and folder.is_dir() and (folder / "valid.jsonl").is_file():
        recipe.data.valid = str(folder / "valid.jsonl")


def validate(recipe: Recipe, source: str = "recipe") -> None:
    """Value checks that types cannot express: every key with a range, one line naming it."""
    from nrt_mlx.answers import compile_extract

    compile_extract(recipe.train.eval_extract, f"{source}: train.eval_extract")
    q = recipe.model.quantize
    if q not in ("auto", "none", *QUANTIZE_BITS):
        raise NrtError(
            f"{source}: model.quantize must be auto, none or a bit width "
            f"({', '.join(map(str, QUANTIZE_BITS))}), got {q!r}"
        )
    if recipe.objective.aggregator not in AGGREGATOR_NAMES:
        raise NrtError(
            f"{source}: objective.aggregator '{recipe.objective.aggregator}' is unknown, "
            f"valid: {', '.join(AGGREGATOR_NAMES)}"
        )
    problem = rollout_problem(recipe.rollout, "rollout.")
    if problem:
        raise NrtError(f"{source}: {problem}")
    if len(recipe.optimizer.betas) != 2:
        raise NrtError(
            f"{source}: optimizer.betas must be a list of two numbers, got {recipe.optimizer.betas}"
        )
    for key, value, ok, allowed in _learning_ranges(recipe) + _run_ranges(recipe):
        if not ok:
            raise NrtError(f"{source}: {key} must be {allowed}, got {value!r}")
    t = recipe.train
    if t.mini_batches > t.questions_per_step:
        raise NrtError(
            f"{source}: train.mini_batches ({t.mini_batches}) exceeds train.questions_per_step "
            f"({t.questions_per_step}): a mini-batch needs at least one question"
        )
    from nrt_mlx.tracking import report_targets

    recipe.train.report_to = report_targets(recipe.train.report_to, source)
    if recipe.lora.keys is not None and not recipe.lora.keys:
        raise NrtError(
            f"{source}: lora.keys is an empty list; give module names, or null for every linear layer"
        )
    for i, entry in enumerate(recipe.run.overrides):
        if not (isinstance(entry, dict) and isinstance(entry.get("from_step"), int)):
            raise NrtError(
                f"{source}: run.overrides[{i}] must be a mapping with from_step, key, value and "
                "was (resume writes it; remove the entry)"
            )


QUANTIZE_BITS = (2, 3, 4, 5, 6, 8)  # the bit widths mx.quantize supports
GROUP_SIZES = (32, 64, 128)  # the group sizes mx.quantize supports
MAX_SEED = 2**32  # seed x 1_000_003 + step must fit mx.random.seed's 64 bits


Range = tuple[str, Any, bool, str]  # key, value, within range, the allowed range
AT_LEAST_1, AT_LEAST_0 = "at least 1", ">= 0"


def _learning_ranges(r: Recipe) -> list[Range]:
    """The ranged keys of what is learned and how: lora, objective, optimizer."""
    lo, o, ob = r.lora, r.objective, r.optimizer
    at_least_1, at_least_0 = AT_LEAST_1, AT_LEAST_0
    out = [
        ("lora.layers", lo.layers, lo.layers >= 1 or lo.layers == -1, "at least 1 (-1: all)"),
        ("lora.rank", lo.rank, lo.rank >= 1, at_least_1),
        ("lora.scale", lo.scale, lo.scale > 0, "> 0"),
        ("lora.dropout", lo.dropout, 0 <= lo.dropout < 1, "in [0, 1)"),
        ("objective.trace_coef", o.trace_coef, o.trace_coef >= 0, at_least_0),
        ("objective.token_coef", o.token_coef, o.token_coef >= 0, at_least_0),
        ("objective.format_coef", o.format_coef, o.format_coef >= 0, at_least_0),
        (
            "objective.normalizer",
            o.normalizer,
            o.normalizer == "released" or o.normalizer >= 0,
            ">= 0 (0: max_think_tokens + max_answer_tokens) or released",
        ),
        ("objective.clip_ratio_low", o.clip_ratio_low, 0 <= o.clip_ratio_low <= 1, "in [0, 1]"),
        ("objective.clip_ratio_high", o.clip_ratio_high, o.clip_ratio_high >= 0, at_least_0),
        ("optimizer.learning_rate", ob.learning_rate, ob.learning_rate > 0, "> 0"),
        ("optimizer.eps", ob.eps, ob.eps > 0, "> 0"),
        ("optimizer.weight_decay", ob.weight_decay, ob.weight_decay >= 0, at_least_0),
        ("optimizer.warmup_ratio", ob.warmup_ratio, 0 <= ob.warmup_ratio < 1, "in [0, 1)"),
        ("optimizer.min_lr_ratio", ob.min_lr_ratio, 0 <= ob.min_lr_ratio <= 1, "in [0, 1]"),
        ("optimizer.grad_clip", ob.grad_clip, ob.grad_clip >= 0, ">= 0 (0: off)"),
    ]
    return out + [
        (f"optimizer.betas[{i}]", b, 0 <= b < 1, "in [0, 1)") for i, b in enumerate(ob.betas)
    ]


def _run_ranges(r: Recipe) -> list[Range]:
    """The ranged keys of the run around it: data, train, run, model."""
    d, t, run = r.data, r.train, r.run
    at_least_1 = AT_LEAST_1
    out = [
        ("data.max_prompt_tokens", d.max_prompt_tokens, d.max_prompt_tokens >= 1, at_least_1),
        ("data.max_answer_tokens", d.max_answer_tokens, d.max_answer_tokens >= 1, at_least_1),
        ("train.steps", t.steps, t.steps >= 1, at_least_1),
        ("train.questions_per_step", t.questions_per_step, t.questions_per_step >= 1, at_least_1),
        (
            "train.micro_batch_questions",
            t.micro_batch_questions,
            t.micro_batch_questions >= 0,
            ">= 0 (0: the whole mini-batch)",
        ),
        ("train.mini_batches", t.mini_batches, t.mini_batches >= 1, at_least_1),
        (
            "train.updates_per_rollout",
            t.updates_per_rollout,
            t.updates_per_rollout >= 1,
            at_least_1,
        ),
        ("train.seed", t.seed, 0 <= t.seed < MAX_SEED, f"in [0, {MAX_SEED})"),
        ("train.eval_every", t.eval_every, t.eval_every >= 0, ">= 0 (0: never)"),
        ("train.eval_questions", t.eval_questions, t.eval_questions >= 0, ">= 0 (0: all)"),
        ("train.eval_samples", t.eval_samples, t.eval_samples >= 1, at_least_1),
        ("train.collapse_fraction", t.collapse_fraction, 0 < t.collapse_fraction < 1, "in (0, 1)"),
        ("run.dir", run.dir, bool(run.dir.strip()), "a directory path, not empty"),
        ("run.save_every", run.save_every, run.save_every >= 1, at_least_1),
        ("run.keep_checkpoints", run.keep_checkpoints, run.keep_checkpoints >= 0, ">= 0 (0: all)"),
        ("run.samples_every", run.samples_every, run.samples_every >= 0, ">= 0 (0: never)"),
        ("run.log_every", run.log_every, run.log_every >= 0, ">= 0 (0 and 1: every step)"),
    ]
    if r.model.quantize != "none":  # auto quantizes on Metal and CUDA
        size = r.model.group_size
        out.append(("model.group_size", size, size in GROUP_SIZES, "32, 64 or 128 when quantizing"))
    return out


def rollout_problem(
    r: RolloutConfig, prefix: str, names: dict[str, str] | None = None
) -> str | None:
    """What is wrong with the sampler settings, or None. Keys are named with ``prefix``, or as
    ``names`` maps them (the command-line option a key was given as, e.g. temperature: --temp)."""
    # mlx-lm's --temp 0 is greedy decoding: a user may try it, so say why it cannot work here.
    greedy = ": K traces are sampled per question, and temperature 0 (greedy) makes them identical"
    for ok, key, rule, value in (
        (r.samples >= 1, "samples", "must be at least 1", r.samples),
        (r.max_think_tokens >= 1, "max_think_tokens", "must be at least 1", r.max_think_tokens),
        (r.temperature > 0, "temperature", "must be > 0", r.temperature),
        (0 < r.top_p <= 1, "top_p", "must be in (0, 1]", r.top_p),
    ):
        if not ok:
            name = (names or {}).get(key, f"{prefix}{key}")
            return f"{name} {rule}, got {value}{greedy if key == 'temperature' else ''}"
    return None


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML (atomically)."""
    from nrt_mlx.fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
