"""JSONL data: the three record formats, skipped lines with their numbers, strict mode, errors."""

import json

import pytest

from nrt_mlx.data import drop_long, load_jsonl
from nrt_mlx.errors import NrtError
from nrt_mlx.recipe import DataConfig


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_three_formats_and_context(tmp_path):
    p = write_lines(
        tmp_path / "d.jsonl",
        [
            {"question": "Q1?", "answer": "A1"},
            {"prompt": "Q2?", "completion": "A2"},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Q3?"},
                    {"role": "assistant", "content": "A3"},
                ]
            },
        ],
    )
    d = load_jsonl(p, DataConfig())
    assert [e.answer for e in d.examples] == ["A1", "A2", "A3"]
    assert d.examples[0].messages == [{"role": "user", "content": "Q1?"}]
    assert [m["role"] for m in d.examples[2].messages] == ["system", "user", "assistant", "user"]
    assert d.examples[2].question == "Q3?"
    assert d.skipped == []


def test_malformed_lines_are_skipped_with_line_numbers(tmp_path):
    p = write_lines(
        tmp_path / "d.jsonl",
        [
            {"question": "ok?", "answer": "yes"},
            "{not json",
            {"question": "empty?", "answer": "  "},
            {"foo": 1},
            "",
            {"messages": [{"role": "user", "content": "no answer"}]},
            {"question": "ok2?", "answer": "fine", "options": ["fine", "bad"]},
        ],
    )
    d = load_jsonl(p, DataConfig())
    assert len(d) == 2
    assert [n for n, _ in d.skipped] == [2, 3, 4, 6]
    assert "invalid JSON" in d.skipped[0][1] and "empty answer" in d.skipped[1][1]
    assert d.examples[1].options == ["fine", "bad"]
    assert "line 2" in d.report() and "skipped 4" in d.report()
    with pytest.raises(NrtError, match=r"d.jsonl:2: invalid JSON"):
        load_jsonl(p, DataConfig(strict=True))


def test_configurable_fields_and_system_prompt(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [{"instruction": "Do X", "output": "Done"}])
    d = load_jsonl(
        p, DataConfig(question_field="instruction", answer_field="output", system_prompt="S")
    )
    assert d.examples[0].answer == "Done"
    assert d.examples[0].messages[0] == {"role": "system", "content": "S"}


def test_missing_or_unusable_file_is_one_line_error(tmp_path):
    with pytest.raises(NrtError, match="data.train: file not found"):
        load_jsonl(tmp_path / "nope.jsonl", DataConfig())
    p = write_lines(tmp_path / "bad.jsonl", ["[1, 2]", {"q": 1}])
    with pytest.raises(NrtError, match="no usable question/answer record; first problem: line 1"):
        load_jsonl(p, DataConfig())


def test_long_prompts_are_skipped_and_counted(tmp_path):
    p = write_lines(
        tmp_path / "d.jsonl",
        [
            {"question": "short", "answer": "a"},
            {"question": "a much longer question here", "answer": "a"},
            {"question": "short", "answer": "a very long answer indeed"},
        ],
    )
    d = load_jsonl(p, DataConfig())
    drop_long(d, lambda e: len(e.question.split()), lambda e: len(e.answer.split()), 3, 3)
    assert len(d) == 1
    assert [n for n, _ in d.skipped] == [2, 3]
    assert (
        "data.max_prompt_tokens" in d.skipped[0][1] and "data.max_answer_tokens" in d.skipped[1][1]
    )
