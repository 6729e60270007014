"""The quickstart ends with the commands that use the run (fuse, generate, eval, upload), naming
the run's own paths; each printed command, executed as printed, works on a tiny-model run."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
from helpers import DATA, run_cli, tiny_recipe, write_recipe

from nrt_mlx.quickstart import next_steps, run_quickstart
from nrt_mlx.recipe import Recipe


def _next_steps(out: str) -> dict[str, list[str]]:
    """The printed commands, split as a shell would, by their first words."""
    lines = out.split("next steps:\n", 1)[1].splitlines()
    assert lines[0].startswith("  # ")  # each command follows a line saying what it does
    commands = [shlex.split(line) for line in lines if line.startswith("  ") and line[2] != "#"]
    return {" ".join(argv[:2]) if argv[0] == "nrt-mlx" else argv[0]: argv for argv in commands}


def test_quickstart_prints_next_steps_that_run(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    recipe = tiny_recipe(
        tmp_path, tiny_model_dir, "my run", data={"valid": str(DATA / "test.jsonl")}
    )
    recipe["train"]["steps"] = 2
    path = write_recipe(tmp_path, recipe)
    monkeypatch.chdir(tmp_path)
    run = run_quickstart(path, quiet=True, eval_questions=2)
    steps = _next_steps(capsys.readouterr().out)
    assert run == tmp_path / "my run"
    fused = "my run-fused"  # relative to the working folder, quoted for the space
    assert steps["nrt-mlx fuse"] == ["nrt-mlx", "fuse", "my run", fused]
    generate = steps["mlx_lm.generate"]
    assert generate[generate.index("--model") + 1] == fused
    assert generate[generate.index("--prompt") + 1]  # a held-out question
    assert steps["nrt-mlx eval"] == [
        "nrt-mlx",
        *("eval", "--adapter", "my run", "--data", str(DATA.resolve() / "test.jsonl")),
    ]
    assert steps["nrt-mlx upload"][:4] == ["nrt-mlx", "upload", fused, "YOUR_HF_NAME/my-run"]

    for name in ("nrt-mlx fuse", "nrt-mlx upload"):  # upload: --dry-run sends nothing
        code, _, err = run_cli(monkeypatch, capsys, *steps[name][1:])
        assert code == 0, err
    assert (tmp_path / fused / "config.json").is_file()

    from mlx_lm.generate import main as mlx_lm_generate

    generate[generate.index("--max-tokens") + 1] = "4"  # the printed budget, shortened
    monkeypatch.setattr(sys, "argv", generate)
    mlx_lm_generate()
    assert "Generation:" in capsys.readouterr().out


def test_next_steps_pass_hub_data_through():
    recipe = Recipe()
    recipe.run.dir = "/tmp/runs/gsm"
    recipe.data.train = "hf:openai/gsm8k:train"
    recipe.data.valid = "hf:openai/gsm8k:test"
    commands = [cmd for _, cmd in next_steps(recipe, "What is 2 + 2?")]
    assert any(cmd.endswith("--data hf:openai/gsm8k:test") for cmd in commands), commands
