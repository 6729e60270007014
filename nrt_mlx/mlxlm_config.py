"""mlx-lm LoRA configs (``mlx_lm.lora --config lora_config.yaml``) as nrt-mlx recipes.

``recipe_from_mlxlm`` maps the keys of an mlx-lm config onto recipe keys and says, per key, what it
did: how a key was translated, or why it was not mapped (no key is dropped silently). Keys the
config does not set take nrt-mlx's recipe defaults, not mlx-lm's ``CONFIG_DEFAULTS``. An mlx-lm
config has no NRT settings, so the recipe trains NRT with the default rollout and objective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nrt_mlx.errors import NrtError
from nrt_mlx.recipe import DataConfig, Recipe, RolloutConfig, TrainConfig, read_yaml_mapping

RECIPE_SECTIONS = frozenset(f.name for f in dataclasses.fields(Recipe))

# Top-level keys of mlx-lm's LoRA configs: mlx_lm/lora.py's CONFIG_DEFAULTS, the keys its dataset
# loader reads from the config (hf_dataset, *_feature), and older names (lora_layers, wandb,
# training_mode) still found in configs people keep.
MLXLM_KEYS = frozenset(
    {
        "model",
        "train",
        "fine_tune_type",
        "optimizer",
        "optimizer_config",
        "data",
        "seed",
        "num_layers",
        "batch_size",
        "iters",
        "val_batches",
        "learning_rate",
        "steps_per_report",
        "steps_per_eval",
        "resume_adapter_file",
        "adapter_path",
        "save_every",
        "test",
        "test_batches",
        "max_seq_length",
        "config",
        "grad_checkpoint",
        "grad_accumulation_steps",
        "clear_cache_threshold",
        "lr_schedule",
        "lora_parameters",
        "mask_prompt",
        "report_to",
        "project_name",
        "trust_remote_code",
        "hf_dataset",
        "prompt_feature",
        "completion_feature",
        "chat_feature",
        "text_feature",
        "lora_layers",
        "wandb",
        "training_mode",
    }
)

# Keys with no counterpart in an nrt-mlx run, and why.
UNMAPPED: dict[str, str] = {
    "test": "nrt-mlx train does not test after training; run nrt-mlx eval --adapter-path RUN_DIR "
    "--data DIR/test.jsonl",
    "test_batches": "used by test, which nrt-mlx train does not run",
    "config": "a config naming another config is not followed",
    "resume_adapter_file": "training starts from fresh adapters; an nrt-mlx run continues with "
    "nrt-mlx train --resume RUN_DIR",
    "clear_cache_threshold": "nrt-mlx does not clear MLX's allocator cache between steps",
    "mask_prompt": "always on: NRT scores the trace and the answer, never the prompt",
    "trust_remote_code": "only the --trust-remote-code flag of nrt-mlx train lets a model run its "
    "own code (a config file can come from anyone)",
    "text_feature": "plain-text records have no reference answer, which NRT needs",
    "wandb": "the key of older mlx-lm versions; write report_to: wandb and project_name",
    "training_mode": "mlx-lm's training modes (normal, dpo) are not NRT; the recipe trains NRT",
}

# An mlx-lm optimizer config key -> the recipe's optimizer key.
OPTIMIZER_KEYS = {"betas": "betas", "eps": "eps", "weight_decay": "weight_decay"}

LR_SCHEDULES = {"cosine_decay": "cosine", "linear_schedule": "linear"}


@dataclass
class Note:
    """What happened to one mlx-lm key: ``mapped`` false means the recipe does not reflect it."""

    key: str
    text: str
    mapped: bool = True


def is_mlxlm_config(data: Any) -> bool:
    """True for a mapping that reads as an mlx-lm config rather than a recipe: a key only mlx-lm
    has (iters, lora_parameters, ...), or a recipe section name whose value is not a mapping
    (mlx-lm's ``model: PATH``, ``data: DIR``, ``train: true``, ``optimizer: adamw``)."""
    if not isinstance(data, dict):
        return False
    return any(
        (key in MLXLM_KEYS and key not in RECIPE_SECTIONS)
        or (key in RECIPE_SECTIONS and not isinstance(value, (dict, type(None))))
        for key, value in data.items()
    )


def _number(value: Any, key: str) -> float:
    """A number of the config (PyYAML reads 1e-5 as a string; mlx-lm's own loader does not)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise NrtError(f"mlx-lm config: {key}: expected a number, got {value!r}") from None


def _put(recipe: dict, dotted: str, value: Any) -> None:
    section, key = dotted.split(".")
    recipe.setdefault(section, {})[key] = value


def _direct(
    pairs: Iterable[tuple[str, str]],
    recipe: dict,
    notes: list[Note],
    take: Callable[[str], Any],
    convert: Callable[[Any], Any] = lambda value: value,
) -> None:
    """Keys that map one to one: each (mlx-lm key, recipe key) the config sets is put, noted."""
    for key, target in pairs:
        value = take(key)
        if value is not None:
            _put(recipe, target, convert(value))
            notes.append(Note(key, f"{target}: {value}"))


def recipe_from_mlxlm(config: dict[str, Any]) -> tuple[dict[str, Any], list[Note]]:
    """The recipe (nested dict, only the keys the config decides) of an mlx-lm LoRA config, and a
    note per key of the config, plus the decisions the config leaves to nrt-mlx.

    Relative paths stay as written; the caller resolves them (mlx-lm reads them from the working
    folder). ``data: DIR`` is checked for DIR/valid.jsonl on disk, as mlx-lm's loader does.
    """
    recipe: dict[str, Any] = {"train": {"method": "nrt"}}
    notes: list[Note] = []
    note = notes.append
    seen: set[str] = set()

    def take(key: str) -> Any:
        seen.add(key)
        return config.get(key)

    _direct([("model", "model.path")], recipe, notes, take, str)
    has_valid = _map_data(config, recipe, notes, take)
    _map_lora(config, recipe, notes, take)
    steps = _map_steps(config, recipe, notes, take, has_valid)
    _map_optimizer(config, recipe, notes, take, steps)
    _map_run(config, recipe, notes, take)
    for key, value in config.items():
        if key in seen:
            continue
        if key == "train":
            text = "nrt-mlx train always trains" + (
                "" if value else " (the config says train: false, so mlx_lm.lora would only test)"
            )
            note(Note(key, text, mapped=False))
        elif key in UNMAPPED and value in (None, False):
            note(Note(key, f"{value}: off, nothing to map", mapped=False))
        elif key in UNMAPPED:
            note(Note(key, UNMAPPED[key], mapped=False))
        else:
            note(Note(key, "not an mlx-lm LoRA key nrt-mlx knows; check its spelling", False))
    noted = {n.key.split(".")[0] for n in notes}
    for key in config:  # a key mapping took but had nothing to map (null, empty): said too
        if key not in noted:
            note(Note(key, f"{config[key]!r}: nothing to map", mapped=False))
    rollout = RolloutConfig()
    note(
        Note(
            "(method)",
            "train.method: nrt. An mlx-lm config has no NRT settings, so rollout and objective "
            f"take the recipe defaults ({rollout.samples} traces of up to "
            f"{rollout.max_think_tokens} tokens per question, marker {rollout.marker}); "
            "--set train.method=sft trains the supervised baseline, the closest to mlx_lm.lora",
        )
    )
    return recipe, notes


# mlx-lm's record field names (top level, or in hf_dataset) -> the recipe's data keys.
HF_FIELDS = {
    "prompt_feature": "prompt_field",
    "completion_feature": "completion_field",
    "chat_feature": "messages_field",
}


def _map_data(config: dict, recipe: dict, notes: list[Note], take: Any) -> bool:
    """data / hf_dataset -> data.train and data.valid; True when there is a valid split."""
    data, hub = take("data"), take("hf_dataset")
    has_valid = False
    if hub is not None:
        has_valid = _map_hf_dataset(hub, recipe, notes)
        if data is not None:
            notes.append(Note("data", "hf_dataset is read instead, as mlx-lm does", False))
    elif data is not None:
        folder = Path(str(data)).expanduser()
        if folder.is_dir():
            # nrt-mlx reads mlx-lm's folder layout itself: train.jsonl for data.train, valid.jsonl
            # for data.valid, test.jsonl for eval --data.
            _put(recipe, "data.train", str(data))
            text = f"data.train: {data} (its train.jsonl)"
            has_valid = (folder / "valid.jsonl").is_file()
            if has_valid:
                _put(recipe, "data.valid", str(data))
                text += f", data.valid: {data} (its valid.jsonl)"
            else:
                text += "; no valid.jsonl, so no evaluation during training, as in mlx-lm"
            if (folder / "test.jsonl").is_file():
                text += f"; its test.jsonl: nrt-mlx eval --data {data}"
        else:  # mlx-lm loads a name that is no local folder from the Hub
            _put(recipe, "data.train", f"hf:{data}:train")
            text = (
                f"data.train: hf:{data}:train (not a folder here: a Hub dataset, as mlx-lm reads "
                f"it); add --set data.valid=hf:{data}:valid if it has that split"
            )
        notes.append(Note("data", text))
    # The same names at the top level.
    _direct([(k, f"data.{f}") for k, f in HF_FIELDS.items()], recipe, notes, take, str)
    length = take("max_seq_length")
    if length is not None:
        _map_max_seq_length(int(_number(length, "max_seq_length")), recipe, notes)
    return has_valid


def _map_hf_dataset(hub: Any, recipe: dict, notes: list[Note]) -> bool:
    """One hf_dataset entry -> hf: sources with mlx-lm's default splits; True with a valid split."""
    if isinstance(hub, list) and len(hub) == 1:
        hub = hub[0]
    if not isinstance(hub, dict) or "path" not in hub:
        text = "one dataset with a path is mapped; give the others as one JSONL file"
        notes.append(Note("hf_dataset", text, mapped=False))
        return False
    name = hub["path"]
    # mlx-lm's defaults when the splits are not given.
    train_split = hub.get("train_split", "train[:80%]")
    valid_split = hub.get("valid_split", "train[-10%:]")
    _put(recipe, "data.train", f"hf:{name}:{train_split}")
    _put(recipe, "data.valid", f"hf:{name}:{valid_split}")
    notes.append(
        Note(
            "hf_dataset",
            f"data.train: hf:{name}:{train_split}, data.valid: hf:{name}:{valid_split}",
        )
    )
    for key, value in hub.items():
        where = f"hf_dataset.{key}"
        if key in HF_FIELDS:
            _put(recipe, f"data.{HF_FIELDS[key]}", str(value))
            notes.append(Note(where, f"data.{HF_FIELDS[key]}: {value}"))
        elif key == "config" and isinstance(value, dict) and set(value) <= {"name"}:
            _put(recipe, "data.hf_config", str(value.get("name", "")))
            notes.append(Note(where, f"data.hf_config: {value.get('name', '')}"))
        elif key == "test_split":
            text = f"nrt-mlx train does not test; nrt-mlx eval --data hf:{name}:{value}"
            notes.append(Note(where, text, mapped=False))
        elif key not in ("path", "train_split", "valid_split"):
            notes.append(Note(where, "no data key of nrt-mlx takes it", mapped=False))
    return True


def _map_max_seq_length(length: int, recipe: dict, notes: list[Note]) -> None:
    """NRT bounds prompt, trace and answer apart, and skips (never cuts) records too long."""
    prompt, answer = DataConfig().max_prompt_tokens, DataConfig().max_answer_tokens
    think = RolloutConfig().max_think_tokens
    if prompt + think + answer <= length:
        text = (
            f"the recipe defaults fit: data.max_prompt_tokens {prompt} + rollout.max_think_tokens "
            f"{think} + data.max_answer_tokens {answer} <= {length}"
        )
    else:
        prompt, answer = max(1, length // 2), max(1, length // 4)
        think = max(1, length - prompt - answer)
        _put(recipe, "data.max_prompt_tokens", prompt)
        _put(recipe, "data.max_answer_tokens", answer)
        _put(recipe, "rollout.max_think_tokens", think)
        text = (
            f"split into data.max_prompt_tokens {prompt}, rollout.max_think_tokens {think}, "
            f"data.max_answer_tokens {answer}"
        )
    notes.append(
        Note("max_seq_length", text + "; longer prompts or answers are skipped, not truncated")
    )


def _map_lora(config: dict, recipe: dict, notes: list[Note], take: Any) -> None:
    kind = take("fine_tune_type")
    if kind in ("lora", "dora"):
        _put(recipe, "lora.type", kind)
        notes.append(Note("fine_tune_type", f"lora.type: {kind}"))
    elif kind is not None:
        notes.append(
            Note("fine_tune_type", f"{kind}: nrt-mlx trains LoRA/DoRA adapters; lora.type: lora")
        )
        _put(recipe, "lora.type", "lora")
    # lora_layers: its name before mlx-lm 0.20.
    _direct([("num_layers", "lora.layers"), ("lora_layers", "lora.layers")], recipe, notes, take)
    params = take("lora_parameters")
    if params is None:
        return
    if not isinstance(params, dict):
        raise NrtError(f"mlx-lm config: lora_parameters must be a mapping, got {params!r}")
    for key, value in params.items():
        where = f"lora_parameters.{key}"
        if key in ("rank", "scale", "dropout", "keys"):
            _put(recipe, f"lora.{key}", value)
            notes.append(Note(where, f"lora.{key}: {value}"))
        elif key == "alpha" and "scale" not in params:
            # PEFT's alpha: the update is scaled by alpha / rank, which is mlx-lm's scale.
            rank = _number(params.get("rank", 8), "lora_parameters.rank")
            scale = _number(value, where) / rank
            _put(recipe, "lora.scale", scale)
            notes.append(Note(where, f"lora.scale: {scale:g} (alpha / rank)"))
        elif key == "alpha":
            notes.append(Note(where, "scale is given, and mlx-lm uses scale", mapped=False))
        else:
            notes.append(Note(where, "not a LoRA parameter nrt-mlx knows", mapped=False))


def _map_steps(
    config: dict, recipe: dict, notes: list[Note], take: Any, has_valid: bool
) -> int | None:
    """iters, batch_size and gradient accumulation -> steps of questions; the number of steps."""
    iters, batch = take("iters"), take("batch_size")
    given_accumulate = take("grad_accumulation_steps")
    accumulate = int(_number(given_accumulate or 1, "grad_accumulation_steps"))
    steps = None
    if iters is not None:
        # mlx-lm's iteration is one batch; it updates every grad_accumulation_steps iterations.
        updates = int(_number(iters, "iters")) // max(accumulate, 1)
        steps = max(1, updates)
        _put(recipe, "train.steps", steps)
        per = f" / grad_accumulation_steps {accumulate}" if accumulate > 1 else ""
        text = f"train.steps: {steps} (optimizer updates{per})"
        if updates < 1:  # mlx-lm would not update at all; a run trains at least one step
            text += f"; iters {iters} makes no update, and nrt-mlx trains at least 1 step"
        notes.append(Note("iters", text))
    if batch is not None:
        size = int(_number(batch, "batch_size"))
        _put(recipe, "train.questions_per_step", size * max(accumulate, 1))
        text = f"train.questions_per_step: {size * max(accumulate, 1)}"
        if accumulate > 1:
            _put(recipe, "train.micro_batch_questions", size)
            text += f", train.micro_batch_questions: {size}"
        k = RolloutConfig().samples
        notes.append(Note("batch_size", text + f" (each question is sampled {k} times)"))
    if given_accumulate is not None:
        notes.append(
            Note("grad_accumulation_steps", f"{accumulate}: mapped with iters and batch_size")
        )
    evaluate_every = take("steps_per_eval")
    if evaluate_every is not None:
        if has_valid:
            _put(recipe, "train.eval_every", evaluate_every)
            notes.append(Note("steps_per_eval", f"train.eval_every: {evaluate_every}"))
        else:
            notes.append(Note("steps_per_eval", "no valid.jsonl to evaluate on", mapped=False))
    val_batches = take("val_batches")
    if val_batches is not None and has_valid:
        n = int(_number(val_batches, "val_batches"))
        questions = 0 if n < 0 else n * int(_number(batch or 4, "batch_size"))
        _put(recipe, "train.eval_questions", questions)
        notes.append(Note("val_batches", f"train.eval_questions: {questions} (0 = all)"))
    elif val_batches is not None:
        notes.append(Note("val_batches", "no valid.jsonl to evaluate on", mapped=False))
    pairs = [("seed", "train.seed"), ("grad_checkpoint", "train.grad_checkpoint")]
    _direct(pairs, recipe, notes, take)
    return steps


def _map_optimizer(
    config: dict, recipe: dict, notes: list[Note], take: Any, steps: int | None
) -> None:
    given = take("optimizer")
    name = str(given or "adam").lower()  # adam: mlx-lm's default
    settings = take("optimizer_config") or {}
    if not isinstance(settings, dict):
        raise NrtError(f"mlx-lm config: optimizer_config must be a mapping, got {settings!r}")
    if name == "adam":
        _put(recipe, "optimizer.weight_decay", 0.0)  # AdamW without weight decay is Adam
        unset = "" if given else " (not set: mlx-lm's default)"
        text = f"adam{unset}: AdamW with optimizer.weight_decay 0 (= Adam)"
        notes.append(Note("optimizer", text))
    elif name == "adamw":
        notes.append(Note("optimizer", "adamw: nrt-mlx's optimizer"))
    else:
        text = f"{name}: nrt-mlx trains with AdamW (optimizer.* keys)"
        notes.append(Note("optimizer", text, mapped=False))
    for opt_name, values in settings.items():
        where = f"optimizer_config.{opt_name}"
        if not values:
            continue
        if opt_name != name or name not in ("adam", "adamw"):
            notes.append(Note(where, f"not the optimizer used ({name})", mapped=False))
            continue
        for key, value in values.items():
            if key in OPTIMIZER_KEYS:
                _put(recipe, f"optimizer.{OPTIMIZER_KEYS[key]}", value)
                notes.append(Note(f"{where}.{key}", f"optimizer.{OPTIMIZER_KEYS[key]}: {value}"))
            else:
                notes.append(Note(f"{where}.{key}", "not an AdamW setting nrt-mlx has", False))
    rate, schedule = take("learning_rate"), take("lr_schedule")
    scheduled = schedule is not None and _map_lr_schedule(schedule, recipe, notes, steps)
    if rate is not None and scheduled:
        text = "lr_schedule's first argument is the rate (mlx-lm ignores learning_rate then)"
        notes.append(Note("learning_rate", text, mapped=False))
    elif rate is not None:
        _put(recipe, "optimizer.learning_rate", rate)
        notes.append(Note("learning_rate", f"optimizer.learning_rate: {rate}"))
    if not scheduled:  # mlx-lm without a schedule it maps: a constant rate, no warm-up
        _put(recipe, "optimizer.schedule", "constant")
        _put(recipe, "optimizer.warmup_ratio", 0.0)
    if schedule is None:
        text = "absent: a constant rate, as mlx-lm (optimizer.schedule constant, warmup_ratio 0)"
        notes.append(Note("lr_schedule", text))


def _map_lr_schedule(schedule: Any, recipe: dict, notes: list[Note], steps: int | None) -> bool:
    """mlx-lm's {name, arguments, warmup, warmup_init} -> schedule, rate, min ratio, warm-up;
    False when the schedule has no nrt-mlx counterpart (the note says so)."""
    if not isinstance(schedule, dict) or "name" not in schedule:
        raise NrtError(
            f"mlx-lm config: lr_schedule must be a mapping with name and arguments, got {schedule!r}"
        )
    name, args = schedule["name"], list(schedule.get("arguments") or [])
    numbers = [_number(a, f"lr_schedule.arguments[{i}]") for i, a in enumerate(args)]
    if name not in LR_SCHEDULES or not numbers:
        text = (
            f"{name}: nrt-mlx schedules are constant, cosine and linear after a warm-up; "
            "the rate stays constant at learning_rate"
        )
        notes.append(Note("lr_schedule", text, mapped=False))
        return False
    initial = numbers[0]

    def ratio_of(value: float) -> float:  # 6 digits: 1e-7 / 1e-5 is 0.01, not 0.00999...98
        return float(f"{value / initial:.6g}") if initial else 0.0

    # cosine_decay(init, decay_steps, end=0); linear_schedule(init, end, steps).
    end = (numbers[2] if len(numbers) > 2 else 0.0) if name == "cosine_decay" else numbers[1]
    _put(recipe, "optimizer.schedule", LR_SCHEDULES[name])
    _put(recipe, "optimizer.learning_rate", initial)
    _put(recipe, "optimizer.min_lr_ratio", ratio_of(end))
    text = (
        f"{name}: optimizer.schedule {LR_SCHEDULES[name]}, learning_rate {initial:g}, "
        f"min_lr_ratio {ratio_of(end):g} (the decay spans the steps after the warm-up)"
    )
    warmup = int(_number(schedule.get("warmup", 0), "lr_schedule.warmup"))
    total = steps or TrainConfig().steps
    ratio = min(warmup / total, 0.99)
    _put(recipe, "optimizer.warmup_ratio", ratio)
    text += f"; warmup {warmup} of {total} steps: optimizer.warmup_ratio {ratio:g}"
    notes.append(Note("lr_schedule", text))
    # mlx-lm's cosine reaches its end after warmup + decay_steps updates; nrt-mlx's at the last step.
    decay_span = total - min(warmup, total - 1)
    if name == "cosine_decay" and len(numbers) > 1 and numbers[1] != decay_span:
        text = (
            f"cosine_decay's decay_steps {numbers[1]:g} is not used: nrt-mlx's cosine decays over "
            f"the {decay_span} steps after the warm-up (set iters to warmup + decay_steps to match)"
        )
        notes.append(Note("lr_schedule.arguments[1]", text, mapped=False))
    if schedule.get("warmup_init"):
        notes.append(
            Note(
                "lr_schedule.warmup_init",
                "nrt-mlx's warm-up starts at learning_rate / warm-up steps",
                mapped=False,
            )
        )
    return True


def _map_run(config: dict, recipe: dict, notes: list[Note], take: Any) -> None:
    adapter_path = take("adapter_path")
    if adapter_path is not None:
        _put(recipe, "run.dir", str(adapter_path))
        notes.append(
            Note(
                "adapter_path",
                f"run.dir: {adapter_path} (the adapters land in {Path(adapter_path) / 'adapters'}: "
                f"mlx_lm.generate --adapter-path {Path(adapter_path) / 'adapters'})",
            )
        )
    _map_report_to(take("report_to"), recipe, notes)
    pairs = [
        ("save_every", "run.save_every"),
        ("steps_per_report", "run.log_every"),
        ("project_name", "train.report_project"),
    ]
    _direct(pairs, recipe, notes, take)


def _map_report_to(targets: Any, recipe: dict, notes: list[Note]) -> None:
    """mlx-lm's "wandb,swanlab" (or a list) -> train.report_to, with the trackers nrt-mlx has."""
    from nrt_mlx.tracking import TRACKERS

    if not targets:
        return
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    known = [n for n in names if n in TRACKERS]
    if known:
        _put(recipe, "train.report_to", known)
        notes.append(Note("report_to", f"train.report_to: {known}"))
    for name in (n for n in names if n not in TRACKERS):
        text = f"nrt-mlx reports to {', '.join(TRACKERS)} (and RUN_DIR/metrics.jsonl)"
        notes.append(Note(f"report_to.{name}", text, mapped=False))


def read_mlxlm_config(path: str | Path) -> dict[str, Any]:
    """The mapping in an mlx-lm YAML config; a missing or unreadable file is one line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise NrtError(f"{p}: config file not found")
    return read_yaml_mapping(p, "mlx-lm options (model:, data:, iters:, ...)")


def mlxlm_config_in(path: str | Path) -> dict[str, Any] | None:
    """The mlx-lm config ``path`` holds, or None when it reads as a recipe (anything unreadable is
    left to the recipe loader, whose errors name the problem)."""
    try:
        data = read_mlxlm_config(path)
    except NrtError:
        return None
    return data if is_mlxlm_config(data) else None


@dataclass
class Imported:
    recipe: Recipe  # validated, paths resolved as mlx-lm resolves them (the working folder)
    made: dict[str, Any]  # the keys the config decided (and --set), as a nested dict
    notes: list[Note]

    def recipe_yaml(self) -> str:
        """The keys the config decided, with their resolved values, as a recipe file."""
        full = self.recipe.to_dict()  # its section order, the recipe's
        chosen = {s: {k: full[s][k] for k in self.made[s]} for s in full if s in self.made}
        return yaml.safe_dump(chosen, sort_keys=False)

    def report(self, source: str) -> str:
        """The recipe made, where the run keeps it, and a line per mlx-lm key."""
        lines = [f"{source}: an mlx-lm LoRA config; the recipe made from it:", ""]
        lines += ["  " + line for line in self.recipe_yaml().splitlines()]
        lines += [
            "",
            f"the run saves the full recipe as {Path(self.recipe.run.dir) / 'recipe.yaml'} "
            "(unlisted keys: recipes/reference.yaml defaults)",
        ]
        for mapped, title in ((True, "mapped"), (False, "not mapped")):
            chosen = [n for n in self.notes if n.mapped is mapped]
            if chosen:
                lines.append(f"{title}:")
                lines += [f"  {n.key}: {n.text}" for n in chosen]
        return "\n".join(lines)


def import_mlxlm_config(
    path: str | Path, overrides: list[str] | None = None, config: dict[str, Any] | None = None
) -> Imported:
    """Read an mlx-lm config (``config``: its mapping, already read by ``mlxlm_config_in``), map it
    (``recipe_from_mlxlm``), apply ``--set`` overrides and validate as a recipe; relative paths
    are taken from the working folder, as mlx-lm does."""
    from nrt_mlx.recipe import _absolute_paths, apply_overrides, recipe_from_dict

    made, notes = recipe_from_mlxlm(read_mlxlm_config(path) if config is None else config)
    overrides = overrides or []
    apply_overrides(made, overrides)
    recipe = recipe_from_dict(made, f"{path} (mlx-lm config, as a recipe)")
    given = {item.split("=", 1)[0].strip() for item in overrides}
    _absolute_paths(recipe, Path.cwd(), given)
    return Imported(recipe, made, notes)
