"""Helpers shared by test modules (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from nrt_mlx.cli import main
from nrt_mlx.quickstart import bundled_path


def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: object
) -> tuple[int, str, str]:
    """Run the console entry point in-process; returns (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["nrt-mlx", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


DATA = bundled_path("data")  # the repository's recipes/data, found as the package finds it


def tiny_recipe(tmp_path: Path, model_dir: Path, name: str = "run", **sections: dict) -> dict:
    """A small NRT recipe for the tiny model on the bundled data; ``sections`` update its keys."""
    recipe: dict = {
        "model": {"path": str(model_dir)},
        "data": {
            "train": str(DATA / "train.jsonl"),
            "max_prompt_tokens": 96,
            "max_answer_tokens": 48,
        },
        "lora": {"layers": 2, "rank": 4},
        "rollout": {"samples": 2, "max_think_tokens": 8},
        "optimizer": {"learning_rate": 1e-3, "warmup_ratio": 0.0},
        "train": {"steps": 3, "questions_per_step": 2},
        "run": {"dir": str(tmp_path / name)},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def write_recipe(tmp_path: Path, recipe: dict, name: str = "run") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
