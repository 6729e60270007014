"""Resuming with --set, Ctrl-C, absolute data paths and --trust-remote-code, on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx_lm.utils
import pytest
import yaml
from helpers import DATA, run_cli, tiny_recipe, write_recipe

from nrt_mlx import session as session_module
from nrt_mlx import trainer
from nrt_mlx.recipe import load_recipe
from nrt_mlx.rundir import RunDir


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished 2-step NRT run (checkpoints at 1 and 2; cosine schedule, no warm-up)."""
    tmp = tmp_path_factory.mktemp("finished")
    recipe = tiny_recipe(tmp, tiny_model_dir, train={"steps": 2}, run={"save_every": 1})
    trainer.train(load_recipe(write_recipe(tmp, recipe)), quiet=True)
    return tmp / "run"


@pytest.fixture
def run(finished_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def resume(monkeypatch, capsys, run: Path, *args: str) -> tuple[int, str, str]:
    return run_cli(monkeypatch, capsys, "train", "--resume", run, "--quiet", *args)


# ---- the resume policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting", ["lora.rank=8", "lora.keys=[self_attn.q_proj]", "objective.aggregator=prob"]
)
def test_a_refused_override_leaves_the_run_untouched(run, monkeypatch, capsys, setting):
    before = files(run)
    code, _, err = resume(monkeypatch, capsys, run, "--set", "train.steps=4", "--set", setting)
    key = setting.split("=")[0]
    assert code == 2 and err.startswith(f"error: --set {key}: cannot change when resuming")
    assert files(run) == before


def test_a_safe_override_is_recorded_with_its_step(run, monkeypatch, capsys):
    """train.steps 2 -> 4 from step 3: recorded in recipe.yaml, the schedule recomputed for 4 steps
    (cosine, no warm-up: the old schedule ends at 0, the new one gives lr/2 at update 2)."""
    code, _, err = resume(
        monkeypatch, capsys, run, "--set", "train.steps=4", "--set", "run.samples_every=0"
    )
    assert code == 0, err
    assert "train.steps 2 -> 4" in err and "warning: the learning-rate schedule" in err
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["train"]["steps"] == 4
    assert saved["run"]["overrides"] == [
        {"from_step": 3, "key": "train.steps", "value": 4, "was": 2},
        {"from_step": 3, "key": "run.samples_every", "value": 0, "was": 10},
    ]
    assert (
        load_recipe(run / "recipe.yaml", saved_run=True).run.overrides == saved["run"]["overrides"]
    )
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["lr"] == pytest.approx(0.5e-3, rel=1e-5)  # learning_rate 1e-3 of tiny_recipe
    assert [json.loads(x)["step"] for x in (run / "samples.jsonl").read_text().splitlines()] == [1]
    # A later resume keeps the record and adds to it; a finished run says there is nothing to do.
    code, _, err = resume(monkeypatch, capsys, run, "--set", "train.steps=5")
    assert code == 0, err
    entries = yaml.safe_load((run / "recipe.yaml").read_text())["run"]["overrides"]
    assert entries[-1] == {"from_step": 5, "key": "train.steps", "value": 5, "was": 4}
    assert len(entries) == 3
    code, _, err = resume(monkeypatch, capsys, run)
    assert code == 0 and "nothing to train" in err and len(metrics(run)) == 5


def test_unchanged_values_are_not_overrides(run, monkeypatch, capsys):
    before = files(run)
    code, _, err = resume(
        monkeypatch, capsys, run, "--set", "lora.rank=4", "--set", "train.steps=2"
    )
    assert code == 0 and "nothing to train" in err
    assert files(run)["recipe.yaml"] == before["recipe.yaml"]


# ---- Ctrl-C -------------------------------------------------------------------------------------


def interrupt_at(monkeypatch, stop: int) -> None:
    original = trainer.train_step

    def step(session, number):
        if number == stop:
            raise KeyboardInterrupt
        return original(session, number)

    monkeypatch.setattr(trainer, "train_step", step)


def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, train={"steps": 4}, run={"save_every": 2})
    path = write_recipe(tmp_path, recipe)
    interrupt_at(monkeypatch, 3)
    code, _, err = run_cli(monkeypatch, capsys, "train", path, "--quiet")
    run = tmp_path / "run"
    lines = [line for line in err.splitlines() if not line.startswith("step ")]  # --quiet's log
    assert code == 130 and len(lines) == 1 and "Traceback" not in err
    assert lines[0] == (
        f"interrupted; the last checkpoint is {run}/checkpoints/step_000002 (step 2); "
        f"continue with: nrt-mlx train --resume {run}"
    )
    monkeypatch.undo()
    code, _, err = resume(monkeypatch, capsys, run)
    assert code == 0, err
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]


def test_ctrl_c_before_the_first_checkpoint_and_before_training(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, train={"steps": 2}, run={"save_every": 5})
    path = write_recipe(tmp_path, recipe)
    interrupt_at(monkeypatch, 2)
    code, _, err = run_cli(monkeypatch, capsys, "train", path, "--quiet")
    run = tmp_path / "run"
    assert code == 130
    assert err.splitlines()[-1] == (
        f"interrupted before the first checkpoint; start the run again with: "
        f"nrt-mlx train --resume {run}"
    )
    monkeypatch.undo()
    code, _, err = resume(monkeypatch, capsys, run)  # no checkpoint: from step 1
    assert code == 0, err
    assert [r["step"] for r in metrics(run)] == [1, 2]

    def interrupted_load(*args, **kwargs):
        raise KeyboardInterrupt

    recipe = tiny_recipe(tmp_path, tiny_model_dir, "other")
    monkeypatch.setattr(session_module, "load_model", interrupted_load)
    code, _, err = run_cli(monkeypatch, capsys, "train", write_recipe(tmp_path, recipe, "other"))
    assert code == 130 and err.strip() == (
        "interrupted before training started: nothing to resume; run the same command again"
    )


# ---- paths --------------------------------------------------------------------------------------


def test_relative_data_paths_are_saved_absolute(tmp_path, tiny_model_dir, monkeypatch, capsys):
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    shutil.copy(DATA / "train.jsonl", work / "data" / "train.jsonl")
    shutil.copy(DATA / "test.jsonl", work / "data" / "held-out.jsonl")
    recipe = tiny_recipe(tmp_path, tiny_model_dir, train={"steps": 1})
    recipe["data"]["train"] = "data/train.jsonl"  # relative to the working folder
    (work / "recipes").mkdir()
    path = write_recipe(work / "recipes", recipe)
    monkeypatch.chdir(work)
    code, _, err = run_cli(
        monkeypatch, capsys, "train", path, "--quiet", "--set", "data.valid=data/held-out.jsonl"
    )
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["data"]["train"] == str(work / "data" / "train.jsonl")
    assert saved["data"]["valid"] == str(work / "data" / "held-out.jsonl")
    # From another folder the run resumes with the same files.
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    (elsewhere / "data" / "train.jsonl").write_text('{"question": "other", "answer": "file"}\n')
    monkeypatch.chdir(elsewhere)
    code, _, err = resume(monkeypatch, capsys, tmp_path / "run", "--set", "train.steps=2")
    assert code == 0, err
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2]
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["data"]["train"] == str(work / "data" / "train.jsonl")


# ---- trust_remote_code comes from the command line only ---------------------------------------


@pytest.fixture
def load_calls(monkeypatch) -> list[bool]:
    """The trust_remote_code of every mlx_lm load (the real load still runs)."""
    calls: list[bool] = []
    original = mlx_lm.utils.load

    def load(*args, **kwargs):
        calls.append(kwargs.get("trust_remote_code", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(mlx_lm.utils, "load", load)
    return calls


def test_trust_remote_code_is_never_read_from_a_saved_recipe(
    tiny_run_factory, tmp_path, monkeypatch, capsys, load_calls
):
    run = Path(shutil.copytree(tiny_run_factory(), tmp_path / "run"))
    load_calls.clear()  # building the fixture's run loaded the model once
    data = str(DATA / "test.jsonl")
    eval_args = ["eval", "--adapter", run, "--data", data, "--max-questions", "1", "--samples", "2"]
    eval_args += ["--max-think", "2", "--max-answer", "2", "--no-generate"]
    eval_args += ["--out", tmp_path / "report.json"]
    # A run that did not ask: its base loads without remote code.
    assert run_cli(monkeypatch, capsys, *eval_args)[0] == 0
    assert load_calls == [False]
    # A saved recipe that asks is refused without the flag, before anything loads ...
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"]["trust_remote_code"] = True
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    for args in (
        eval_args,
        ["fuse", run, tmp_path / "fused"],
        ["score", "--adapter", run, "--question", "2+2?", "--answer", "4", "--samples", "2"],
    ):
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert code == 2 and "--trust-remote-code" in err, (args, err)
        assert len(err.splitlines()) == 1
    assert load_calls == [False] and not (tmp_path / "fused").exists()
    # ... and honoured with it.
    code, _, err = run_cli(
        monkeypatch, capsys, "fuse", run, tmp_path / "fused", "--trust-remote-code"
    )
    assert code == 0, err
    assert load_calls == [False, True]


def test_a_new_run_takes_trust_remote_code_from_the_flag(
    tmp_path, tiny_model_dir, monkeypatch, capsys, load_calls
):
    recipe = tiny_recipe(tmp_path, tiny_model_dir, train={"steps": 1})
    recipe["model"]["trust_remote_code"] = True
    path = write_recipe(tmp_path, recipe)
    code, _, err = run_cli(monkeypatch, capsys, "train", path)
    assert code == 2 and "only the --trust-remote-code flag" in err and load_calls == []
    assert not (tmp_path / "run").exists()
    code, _, err = run_cli(monkeypatch, capsys, "train", path, "--quiet", "--trust-remote-code")
    assert code == 0, err
    assert load_calls == [True]
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["model"]["trust_remote_code"] is True  # a record: resuming needs the flag again
    code, _, err = resume(monkeypatch, capsys, tmp_path / "run", "--set", "train.steps=2")
    assert code == 2 and "--trust-remote-code" in err
    # Without the recipe asking, the flag alone is enough (the user's decision) ...
    recipe["model"]["trust_remote_code"] = False
    recipe["run"]["dir"] = str(tmp_path / "second")
    second = write_recipe(tmp_path, recipe, "second")
    assert run_cli(monkeypatch, capsys, "train", second, "--quiet")[0] == 0
    assert load_calls == [True, False]


def test_the_resume_command_is_quoted_for_a_shell(tmp_path):
    run = RunDir(tmp_path / "my run")
    message = trainer.interrupted_message(
        run, True, ["train.steps=9", "data.system_prompt=Be brief"]
    )
    assert message.endswith(
        f"start the run again with: nrt-mlx train --resume '{tmp_path}/my run' --set "
        "train.steps=9 --set 'data.system_prompt=Be brief' --trust-remote-code"
    )


# ---- what a review found: trained work is never started over or marked by a refused command ----


def test_a_run_whose_checkpoints_were_removed_is_not_trained_over(run, monkeypatch, capsys):
    shutil.rmtree(run / "checkpoints")  # freeing disk after the run finished
    before = files(run)
    code, _, err = resume(monkeypatch, capsys, run, "--set", "train.steps=4")
    assert code == 2 and "has adapters/ but no checkpoint to resume from" in err
    assert files(run) == before  # adapters and metrics as they were


def test_a_new_run_over_a_trained_directory_is_refused_without_touching_it(
    run, tmp_path, tiny_model_dir, monkeypatch, capsys
):
    (run / ".nrt-mlx-run").unlink()  # as a run written before the marker existed
    before = files(run)
    recipe = write_recipe(
        tmp_path, tiny_recipe(tmp_path, tiny_model_dir, run={"dir": str(run)}), "again"
    )
    code, _, err = run_cli(monkeypatch, capsys, "train", recipe, "--quiet")
    assert code == 2 and "already holds a trained run" in err
    assert files(run) == before and not (run / ".nrt-mlx-run").exists()


def test_values_earlier_versions_accepted_still_load(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"train": {"eval_questions": 0}, "run": {"log_every": 0}}))
    recipe = load_recipe(path, saved_run=True)  # 0 meant "all questions" / "every step"
    assert (recipe.train.eval_questions, recipe.run.log_every) == (0, 0)


def test_run_dir_expands_home_and_is_saved_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"run": {"dir": "~/runs/a"}}))
    assert load_recipe(path).run.dir == str(tmp_path / "home" / "runs" / "a")
    path.write_text(yaml.safe_dump({"run": {"dir": "runs/b"}}))
    assert load_recipe(path).run.dir == str(tmp_path / "runs" / "b")


def test_a_run_saved_before_the_memory_check_resumes(run, monkeypatch, capsys):
    # A recipe.yaml without memory_check (and shared_prompt) is an older version's: its worst-case
    # plan (a prompt limit far beyond this machine) must not stop it, as that version trained it.
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    for key in ("memory_check", "shared_prompt"):
        saved["train"].pop(key)
    saved["data"]["max_prompt_tokens"] = 10**9
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    code, _, err = resume(monkeypatch, capsys, run, "--set", "train.steps=3")
    assert code == 0, err
    assert metrics(run)[-1]["step"] == 3
    # The same recipe with the key, as this version writes it: refused, naming the --set form.
    saved["train"]["memory_check"] = True
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    code, _, err = resume(monkeypatch, capsys, run, "--set", "train.steps=4")
    assert code == 2 and "--set train.memory_check=false" in err
