"""JSONL data: the three record formats, skipped lines with their numbers, strict mode, errors."""

import json

import pytest

from nrt_mlx.data import drop_long, load_data
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
    d = load_data(p, DataConfig())
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
    d = load_data(p, DataConfig())
    assert len(d) == 2
    assert [n for n, _ in d.skipped] == [2, 3, 4, 6]
    assert "invalid JSON" in d.skipped[0][1] and "empty answer" in d.skipped[1][1]
    assert d.examples[1].options == ["fine", "bad"]
    assert "line 2" in d.report() and "skipped 4" in d.report()
    with pytest.raises(NrtError, match=r"d.jsonl:2: invalid JSON"):
        load_data(p, DataConfig(strict=True))


def test_configurable_fields_and_system_prompt(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [{"instruction": "Do X", "output": "Done"}])
    d = load_data(
        p, DataConfig(question_field="instruction", answer_field="output", system_prompt="S")
    )
    assert d.examples[0].answer == "Done"
    assert d.examples[0].messages[0] == {"role": "system", "content": "S"}


def test_missing_or_unusable_file_is_one_line_error(tmp_path):
    with pytest.raises(NrtError, match="data.train: file not found"):
        load_data(tmp_path / "nope.jsonl", DataConfig())
    p = write_lines(tmp_path / "bad.jsonl", ["[1, 2]", {"q": 1}])
    with pytest.raises(NrtError, match="no usable question/answer record; first problem: line 1"):
        load_data(p, DataConfig())


def test_long_prompts_are_skipped_and_counted(tmp_path):
    p = write_lines(
        tmp_path / "d.jsonl",
        [
            {"question": "short", "answer": "a"},
            {"question": "a much longer question here", "answer": "a"},
            {"question": "short", "answer": "a very long answer indeed"},
        ],
    )
    d = load_data(p, DataConfig())
    drop_long(d, lambda e: len(e.question.split()), lambda e: len(e.answer.split()), 3, 3)
    assert len(d) == 1
    assert [n for n, _ in d.skipped] == [2, 3]
    assert (
        "data.max_prompt_tokens" in d.skipped[0][1] and "data.max_answer_tokens" in d.skipped[1][1]
    )


# ---- bytes on disk: encodings, byte-order mark, line endings ------------------------------------


def test_non_utf8_bytes_are_an_error_naming_file_and_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    good = json.dumps({"question": "ok?", "answer": "yes"}).encode()
    bad = '{"question": "Où est le café?", "answer": "Paris"}'.encode("latin-1")
    p.write_bytes(good + b"\n" + bad + b"\n" + good + b"\n")
    for strict in (False, True):
        with pytest.raises(NrtError) as err:
            load_data(p, DataConfig(strict=strict))
        assert str(err.value) == (
            f"{p}:2: not UTF-8 text (byte 0xf9 at byte 16 of the line); "
            "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        )


def test_utf16_file_is_an_error_not_an_empty_dataset(tmp_path):
    p = tmp_path / "utf16.jsonl"
    p.write_bytes(json.dumps({"question": "q?", "answer": "a"}).encode("utf-16"))
    with pytest.raises(NrtError, match=r"utf16\.jsonl:1: not UTF-8 text \(byte 0xff at byte 1 "):
        load_data(p, DataConfig())


def test_byte_order_mark_keeps_the_first_record(tmp_path):
    p = tmp_path / "bom.jsonl"
    lines = [{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}]
    p.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(x) + "\n" for x in lines).encode())
    d = load_data(p, DataConfig(strict=True))
    assert [e.answer for e in d.examples] == ["A1", "A2"] and d.skipped == []


def test_any_line_ending_and_real_non_ascii_text(tmp_path):
    p = tmp_path / "endings.jsonl"
    records = [{"question": f"Où {i}?", "answer": f"café {i} 🙂"} for i in range(4)]
    raw = [json.dumps(r, ensure_ascii=False).encode() for r in records]
    p.write_bytes(raw[0] + b"\r\n" + raw[1] + b"\r" + b"{bad\n" + raw[2] + b"\n" + raw[3])
    d = load_data(p, DataConfig())
    assert [(e.line, e.answer) for e in d.examples] == [
        (1, "café 0 🙂"),
        (2, "café 1 🙂"),
        (4, "café 2 🙂"),
        (5, "café 3 🙂"),
    ]
    assert d.skipped == [(3, "invalid JSON")]


def test_report_is_one_line(tmp_path):
    bad = ["{oops"] * 7
    p = write_lines(tmp_path / "d.jsonl", [{"question": "q?", "answer": "a"}, *bad])
    report = load_data(p, DataConfig()).report()
    assert report == (
        f"{p}: 1 examples, skipped 7: line 2 (invalid JSON), line 3 (invalid JSON), "
        "line 4 (invalid JSON), line 5 (invalid JSON), line 6 (invalid JSON) and 2 more"
    )


def test_train_quiet_still_prints_the_skipped_records(tmp_path, tiny_model_dir):
    from helpers import DATA, tiny_recipe, write_recipe
    from typer.testing import CliRunner

    from nrt_mlx.cli import app

    data = tmp_path / "train.jsonl"
    lines = (DATA / "train.jsonl").read_text().splitlines()[:4]
    data.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    recipe = tiny_recipe(tmp_path, tiny_model_dir, data={"train": str(data)}, train={"steps": 1})
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path, recipe)), "--quiet"])
    assert result.exit_code == 0, result.output
    summary = [line for line in result.output.splitlines() if line.startswith(str(data))]
    assert summary == [f"{data}: 4 examples, skipped 1: line 2 (invalid JSON)"]


# ---- mlx-lm's --data DIR: a folder of train/valid/test.jsonl ------------------------------------


def _qa_folder(folder, files=("train", "valid", "test")):
    folder.mkdir()
    for name in files:
        write_lines(folder / f"{name}.jsonl", [{"question": f"{name}?", "answer": name}])
    return folder


def test_folder_gives_train_valid_and_test_jsonl(tmp_path):
    from nrt_mlx.data import load_data
    from nrt_mlx.recipe import load_recipe

    folder = _qa_folder(tmp_path / "qa")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("data:\n  train: qa\n")  # relative to the recipe's folder
    cfg = load_recipe(recipe_file).data
    assert cfg.train == str(folder) and cfg.valid == str(folder / "valid.jsonl")
    train = load_data(cfg.train, cfg, "data.train")
    assert train.examples[0].answer == "train"
    assert train.report() == (
        f"{folder / 'train.jsonl'}: 1 examples (data.valid: valid.jsonl of the same folder)"
    )
    assert load_data(cfg.valid, cfg, "data.valid").examples[0].answer == "valid"
    assert load_data(folder, cfg, "data.valid").examples[0].answer == "valid"
    assert load_data(folder, cfg, "--data").examples[0].answer == "test"  # eval --data DIR


def test_folder_keeps_a_given_valid_and_needs_no_valid_jsonl(tmp_path):
    from nrt_mlx.data import load_data
    from nrt_mlx.recipe import load_recipe

    _qa_folder(tmp_path / "qa", files=("train",))
    other = write_lines(tmp_path / "other.jsonl", [{"question": "o?", "answer": "o"}])
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("data:\n  train: qa\n")
    assert load_recipe(recipe_file).data.valid == ""  # no valid.jsonl: no evaluation set
    both = _qa_folder(tmp_path / "qa2")
    given = load_recipe(recipe_file, [f"data.train={both}", f"data.valid={other}"]).data
    assert given.valid == str(other)
    assert "same folder" not in load_data(given.train, given, "data.train").report()


def test_folder_without_train_jsonl_is_a_one_line_error(tmp_path):
    from nrt_mlx.data import load_data

    folder = tmp_path / "qa"
    folder.mkdir()
    (folder / "data.json").write_text("{}")
    (folder / "notes.txt").write_text("")
    with pytest.raises(NrtError) as err:
        load_data(folder, DataConfig(), "data.train")
    assert str(err.value) == (
        f"data.train: {folder} is a folder without train.jsonl (it holds data.json, notes.txt); "
        "a data folder holds train.jsonl, and optionally valid.jsonl and test.jsonl (mlx-lm's "
        "--data layout), or give the JSONL file itself"
    )
    with pytest.raises(NrtError, match=r"without test\.jsonl \(it holds data\.json, notes\.txt\)"):
        load_data(folder, DataConfig(), "--data")
