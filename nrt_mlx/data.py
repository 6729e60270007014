"""Question/answer data: JSONL files, folders of them, and Hugging Face Hub datasets.

Where the data comes from (``data.train``, ``data.valid``, ``eval --data``):

- a JSONL file;
- a folder holding train.jsonl, valid.jsonl and test.jsonl (mlx-lm's ``--data DIR``): data.train
  reads train.jsonl, data.valid valid.jsonl and ``eval --data`` test.jsonl (the recipe takes the
  folder's valid.jsonl as data.valid when data.valid is not set: ``recipe._absolute_paths``);
- ``hf:owner/name`` or ``hf:owner/name:split`` (any split ``datasets`` accepts, ``train[:1000]``
  too): a Hub dataset through the ``datasets`` package (``pip install 'nrt-mlx[hf]'``), its
  configuration from ``data.hf_config``. The default split is train for data.train, validation
  for data.valid and test for ``eval --data``. Offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)
  ``datasets`` reads the copy a first online load left in its cache (HF_DATASETS_CACHE).

Accepted records (field names configurable in the recipe's ``data`` section):

- ``{"question": ..., "answer": ...}``
- ``{"prompt": ..., "completion": ...}``
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: the last assistant turn is the reference
  answer; earlier turns (system turns included) are the context.

An optional ``options`` list (multiple choice) is kept for evaluation. Malformed lines and empty
answers are skipped and reported with their line numbers (a Hub dataset's rows by their index, as
``dataset[i]`` counts them), or are errors with ``data.strict``.
Files are UTF-8 (a leading byte-order mark is accepted); any other byte is an error naming the
line, never a replacement character trained on.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from nrt_mlx.errors import NrtError, first_line
from nrt_mlx.recipe import DataConfig


@dataclass
class Example:
    messages: list[dict[str, str]]  # the context: system/user/assistant turns before the answer
    answer: str
    line: int
    options: list[str] | None = None

    @property
    def question(self) -> str:
        """The last user turn, for display."""
        for message in reversed(self.messages):
            if message["role"] == "user":
                return message["content"]
        return self.messages[-1]["content"] if self.messages else ""


@dataclass
class Dataset:
    path: str
    examples: list[Example]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    unit: str = "line"  # what ``Example.line`` counts: JSONL lines, or a Hub dataset's rows
    note: str = ""  # where the records came from, when the path alone does not say

    def __len__(self) -> int:
        return len(self.examples)

    def report(self) -> str:
        """One line saying what was kept and what was skipped (first lines shown)."""
        text = f"{self.path}: {len(self.examples)} examples"
        if self.note:
            text += f" ({self.note})"
        if self.skipped:
            shown = ", ".join(f"{self.unit} {n} ({why})" for n, why in self.skipped[:5])
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            text += f", skipped {len(self.skipped)}: {shown}{more}"
        return text


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def parse_record(
    record: object, cfg: DataConfig
) -> tuple[list[dict[str, str]], str, list[str] | None]:
    """Turn one JSON object into (context messages, reference answer, options). Raises ValueError."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    options = record.get("options")
    if options is not None and not (
        isinstance(options, list) and all(isinstance(o, str) for o in options)
    ):
        raise ValueError("'options' must be a list of strings")
    if cfg.messages_field in record:
        messages = record[cfg.messages_field]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"'{cfg.messages_field}' must be a non-empty list")
        for m in messages:
            if (
                not isinstance(m, dict)
                or _text(m.get("role")) is None
                or _text(m.get("content")) is None
            ):
                raise ValueError("each message needs string 'role' and 'content'")
        if messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's reference answer")
        context = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        if not any(m["role"] == "user" for m in context):
            raise ValueError("no user turn before the answer")
        answer = messages[-1]["content"]
    else:
        for q_key, a_key in (
            (cfg.question_field, cfg.answer_field),
            (cfg.prompt_field, cfg.completion_field),
        ):
            if q_key in record or a_key in record:
                question, answer = _text(record.get(q_key)), _text(record.get(a_key))
                if question is None or answer is None:
                    raise ValueError(f"needs string fields '{q_key}' and '{a_key}'")
                break
        else:
            raise ValueError(
                f"no '{cfg.question_field}'/'{cfg.answer_field}', '{cfg.prompt_field}'/"
                f"'{cfg.completion_field}' or '{cfg.messages_field}' field"
            )
        if not question.strip():
            raise ValueError("empty question")
        context = [{"role": "user", "content": question}]
    if not answer.strip():
        raise ValueError("empty answer")
    if cfg.system_prompt and context[0]["role"] != "system":
        context = [{"role": "system", "content": cfg.system_prompt}] + context
    return context, answer, options


# mlx-lm's --data DIR layout: the file each reader takes from a folder.
FOLDER_FILES = {"data.train": "train.jsonl", "data.valid": "valid.jsonl"}
FOLDER_TEST_FILE = "test.jsonl"  # anything else (eval --data)
HF_PREFIX = "hf:"
HF_SPLITS = {"data.train": "train", "data.valid": "validation"}  # else test (eval --data)


def load_data(source: str | Path, cfg: DataConfig, key: str = "data.train") -> Dataset:
    """Read question/answer records from a JSONL file, a folder of them or a Hub dataset (see the
    module docstring); ``key`` names the setting in errors and picks the folder's file."""
    if not source:
        raise NrtError(f"{key} is empty: set it to a JSONL file of question/answer records")
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        return load_hub(source, cfg, key)
    p = Path(source).expanduser()
    if p.is_dir():
        return _load_folder(p, cfg, key)
    if not p.is_file():
        raise NrtError(f"{key}: file not found: {p}")
    return read_jsonl(p, cfg)


def _load_folder(folder: Path, cfg: DataConfig, key: str) -> Dataset:
    """The folder's train/valid/test.jsonl for ``key``; a one-line error when it is missing."""
    name = FOLDER_FILES.get(key, FOLDER_TEST_FILE)
    path = folder / name
    if not path.is_file():
        held = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        shown = ", ".join(held[:8]) + (", ..." if len(held) > 8 else "") if held else "nothing"
        raise NrtError(
            f"{key}: {folder} is a folder without {name} (it holds {shown}); a data folder holds "
            "train.jsonl, and optionally valid.jsonl and test.jsonl (mlx-lm's --data layout), "
            "or give the JSONL file itself"
        )
    data = read_jsonl(path, cfg)
    valid = folder / FOLDER_FILES["data.valid"]
    if key == "data.train" and cfg.valid and _same_path(cfg.valid, valid):
        data.note = f"data.valid: {valid.name} of the same folder"
    return data


def _same_path(given: str, path: Path) -> bool:
    return Path(given).expanduser().resolve() == path.resolve()


def read_jsonl(path: Path, cfg: DataConfig) -> Dataset:
    """Read a JSONL file of question/answer records; see the module docstring for the formats."""

    def lines() -> Iterator[tuple[int, str]]:
        with open(path, "rb") as f:
            for n, line in enumerate(_lines(f), start=1):
                raw = _decode(line, path, n)
                if raw.strip():
                    yield n, raw

    return _collect(lines(), json.loads, cfg, str(path), "line")


def _collect(
    items: Iterable[tuple[int, Any]],
    load: Callable[[Any], object],
    cfg: DataConfig,
    source: str,
    unit: str,
) -> Dataset:
    """Parse numbered records into a Dataset, skipping (or, with data.strict, refusing) bad ones.

    ``load`` turns an item into a record; it and ``parse_record`` raise ValueError on a bad one.
    """
    examples: list[Example] = []
    skipped: list[tuple[int, str]] = []
    for n, item in items:
        try:
            context, answer, options = parse_record(load(item), cfg)
        except ValueError as err:
            reason = "invalid JSON" if isinstance(err, json.JSONDecodeError) else str(err)
            if cfg.strict:
                where = f"{source}:{n}" if unit == "line" else f"{source} {unit} {n}"
                raise NrtError(f"{where}: {reason} (data.strict is on)") from None
            skipped.append((n, reason))
            continue
        examples.append(Example(context, answer, n, options))
    if not examples:
        why = (
            f"; first problem: {unit} {skipped[0][0]}: {skipped[0][1]}"
            if skipped
            else f" (empty {'file' if unit == 'line' else 'split'})"
        )
        raise NrtError(f"{source}: no usable question/answer record{why}")
    return Dataset(source, examples, skipped, unit)


# ---- Hugging Face Hub datasets --------------------------------------------------------------------


def parse_hub_source(source: str, key: str) -> tuple[str, str]:
    """(dataset id, split) of ``hf:owner/name[:split]``; the split defaults by ``key``."""
    name, _, split = source[len(HF_PREFIX) :].partition(":")
    parts = name.split("/")
    if not name or len(parts) > 2 or not all(parts):
        raise NrtError(
            f"{key}: {source!r} is not a Hub dataset: write hf:owner/name or hf:owner/name:split "
            "(e.g. hf:openai/gsm8k:train; the configuration goes in data.hf_config)"
        )
    return name, split or HF_SPLITS.get(key, "test")


def load_hub(source: str, cfg: DataConfig, key: str) -> Dataset:
    """The rows of a Hub dataset split through ``datasets.load_dataset``, parsed like JSONL
    records (skipped rows are named by their index)."""
    name, split = parse_hub_source(source, key)
    try:
        import datasets
    except ImportError:
        raise NrtError(
            f"{key}: {source} needs the Hugging Face datasets package: pip install 'nrt-mlx[hf]'"
        ) from None
    label = f"hf:{name}:{split}" + (f" ({cfg.hf_config})" if cfg.hf_config else "")
    try:
        rows = datasets.load_dataset(name, cfg.hf_config or None, split=split)
    except ConnectionError as err:  # offline, or the Hub unreachable, and not in the cache
        offline = "HF_HUB_OFFLINE is set" if datasets.config.HF_HUB_OFFLINE else first_line(err)
        raise NrtError(
            f"{key}: {label} is not in the Hugging Face datasets cache "
            f"({datasets.config.HF_DATASETS_CACHE}) and the Hub cannot be reached ({offline}); "
            "load it once with the Hub reachable (later runs use the cached copy offline), or "
            "export it to JSONL and give the file"
        ) from None
    except datasets.exceptions.DatasetNotFoundError as err:
        raise NrtError(
            f"{key}: {label}: {first_line(err)}; check the name, and for a private or gated "
            "dataset set HF_TOKEN or run 'hf auth login'"
        ) from None
    except Exception as err:  # a library boundary: wrong split or config, unreadable files...
        raise NrtError(f"{key}: {label}: {first_line(err)}{_hub_hint(err)}") from None
    return _collect(enumerate(rows), _present, cfg, label, "row")


def _present(row: dict[str, Any]) -> dict[str, Any]:
    """A Hub row's set fields: a table has every column in every row, None where a record of
    another format has none (a JSONL record simply lacks the key)."""
    return {key: value for key, value in row.items() if value is not None}


def _hub_hint(err: Exception) -> str:
    """The route for the errors ``datasets`` raises on a wrong split or configuration."""
    text = str(err)
    if "split" in text.lower():
        return "; pick the split with hf:owner/name:SPLIT"
    if "config" in text.lower():
        return "; set data.hf_config to one of the configurations"
    return ""


def _lines(f: BinaryIO) -> Iterator[bytes]:
    """The lines of a binary file as text mode splits them (at \\n, \\r\\n or \\r), undecoded."""
    for chunk in f:
        body = chunk[:-2] if chunk.endswith(b"\r\n") else chunk.rstrip(b"\n")
        yield from body.split(b"\r")


def _decode(line: bytes, path: Path, n: int) -> str:
    """One line as text: UTF-8 (a byte-order mark on line 1 is dropped), else a one-line error."""
    if n == 1 and line.startswith(codecs.BOM_UTF8):
        line = line[len(codecs.BOM_UTF8) :]
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise NrtError(
            f"{path}:{n}: not UTF-8 text (byte 0x{line[err.start]:02x} at byte {err.start + 1} "
            "of the line); save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def drop_long(
    data: Dataset,
    prompt_len: Callable[[Example], int],
    answer_len: Callable[[Example], int],
    max_prompt: int,
    max_answer: int,
) -> Dataset:
    """Skip (and count) examples whose prompt or answer is over the token limits."""
    kept = []
    for ex in data.examples:
        if (n := prompt_len(ex)) > max_prompt:
            data.skipped.append(
                (ex.line, f"prompt {n} tokens > data.max_prompt_tokens {max_prompt}")
            )
        elif (n := answer_len(ex)) > max_answer:
            data.skipped.append(
                (ex.line, f"answer {n} tokens > data.max_answer_tokens {max_answer}")
            )
        else:
            kept.append(ex)
    if not kept:
        raise NrtError(
            f"{data.path}: every record is over the length limits ({data.skipped[0][1]})"
        )
    data.examples = kept
    data.skipped.sort()
    return data
