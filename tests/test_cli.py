"""The command line as mlx-lm users type it: mlx-lm's option names, --version, shell completion."""

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version

import pytest
import yaml
from typer.testing import CliRunner

from nrt_mlx.answers import flexible_match
from nrt_mlx.cli import app

runner = CliRunner()


def invoke(*args: object, **kwargs):
    result = runner.invoke(app, [str(a) for a in args], prog_name="nrt-mlx", **kwargs)
    assert result.exit_code == 0, result.output
    return result


def test_version_names_nrt_mlx_mlx_and_mlx_lm():
    out = invoke("--version").stdout.strip()
    assert out == (
        f"nrt-mlx {version('nrt-mlx')} (mlx {version('mlx')}, mlx-lm {version('mlx-lm')})"
    )


def test_shell_completion_script_and_completions():
    script = invoke("--show-completion", "bash").stdout
    assert "complete -o default -F _nrt_mlx_completion nrt-mlx" in script
    assert "_NRT_MLX_COMPLETE=complete_bash" in script

    def complete(words: str) -> list[str]:
        env = {
            "_NRT_MLX_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - 1),
        }
        return invoke(env=env).stdout.split()

    assert complete("nrt-mlx ev") == ["eval"]
    assert complete("nrt-mlx eval --adapter") == ["--adapter-path", "--adapter"]
    assert "--max-tokens" in complete("nrt-mlx score --max")


@pytest.fixture(scope="module")
def number_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("numbers") / "test.jsonl"
    rows = [
        {"question": "What is three plus four?", "answer": "7"},
        {"question": "What is the capital of France?", "answer": "Paris"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def eval_report(run, data, out, names: dict[str, str]) -> dict:
    """eval with the settings under the given option names; the report without its file name."""
    args = ["eval", "--data", data, "--samples", 2, "--max-answer", 4, "--out", out]
    for name, value in names.items():
        args += [name, value]
    invoke(*args)
    return json.loads(out.read_text())


def test_mlx_lm_option_names_do_what_nrt_mlx_names_do(tiny_run_factory, number_data, tmp_path):
    run = tiny_run_factory()
    ours = eval_report(
        run,
        number_data,
        tmp_path / "a.json",
        {"--adapter": run, "--max-think": 5, "--seed": 3},
    )
    theirs = eval_report(
        run,
        number_data,
        tmp_path / "b.json",
        {"--adapter-path": run, "--max-tokens": 5, "--seed": 3},
    )
    assert theirs == ours
    assert ours["config"]["max_think_tokens"] == 5 and ours["config"]["seed"] == 3
    # --temp and --top-p set the trace sampler (the run's recipe had 1.0 and 1.0).
    tempered = eval_report(
        run,
        number_data,
        tmp_path / "c.json",
        {"--adapter-path": run, "--max-tokens": 5, "--seed": 3, "--temp": 0.5, "--top-p": 0.8},
    )
    assert (tempered["config"]["temperature"], tempered["config"]["top_p"]) == (0.5, 0.8)
    traces = [[g["trace"] for g in q["generations"]] for q in ours["questions"]]
    assert [[g["trace"] for g in q["generations"]] for q in tempered["questions"]] != traces
    # Strict and flexible match in the report, per generation and in the summary.
    assert {"exact_match", "exact_match_flexible"} <= set(ours["summary"])
    for q in ours["questions"]:
        for g in q["generations"]:
            assert g["exact_match_flexible"] == flexible_match(g["answer"], q["reference"])


def test_eval_extract_and_sampler_options(tiny_run_factory, number_data, tmp_path):
    run = tiny_run_factory()
    out = tmp_path / "x.json"
    first_char = r"(\S)"
    report = eval_report(
        run, number_data, out, {"--adapter-path": run, "--max-tokens": 3, "--extract": first_char}
    )
    assert report["config"]["extract"] == first_char
    found = [g["extracted"] for q in report["questions"] for g in q["generations"]]
    answers = [g["answer"] for q in report["questions"] for g in q["generations"]]
    assert found == [next((c for c in a if not c.isspace()), None) for a in answers]
    # Without --extract, the run's train.eval_extract applies.
    copy = shutil.copytree(run, tmp_path / "run")
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["train"]["eval_extract"] = first_char
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    again = eval_report(
        copy, number_data, tmp_path / "y.json", {"--adapter-path": copy, "--max-tokens": 3}
    )
    assert again["config"]["extract"] == first_char
    for bad, message in (
        (["--extract", "(a)(b)"], "--extract '(a)(b)': needs exactly one capture group"),
        (["--temp", "0"], "--temp must be > 0"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    ):
        result = runner.invoke(
            app, ["eval", "--adapter-path", str(run), "--data", str(number_data), *bad]
        )
        assert result.exit_code == 2 and result.stderr.strip().startswith(f"error: {message}")
        assert len(result.stderr.strip().splitlines()) == 1


def test_score_takes_mlx_lm_names(tiny_run_factory):
    run = tiny_run_factory()
    common = ["score", "--question", "What is three plus four?", "--answer", "7", "--json"]
    common += ["--samples", "2", "--seed", "1"]
    ours = invoke(*common, "--adapter", run, "--max-think", 4).stdout
    theirs = invoke(*common, "--adapter-path", run, "--max-tokens", 4).stdout
    assert json.loads(theirs) == json.loads(ours)
    tempered = invoke(*common, "--adapter-path", run, "--max-tokens", 4, "--temp", 0.3).stdout
    assert json.loads(tempered) != json.loads(ours)
    result = runner.invoke(app, [*common, "--adapter-path", str(run), "--top-p", "0"])
    assert result.exit_code == 2 and "--top-p must be in (0, 1]" in result.stderr


def test_eval_hf_config_reaches_the_dataset_loader(tmp_path):
    # No Hub here: the loader's one-line error names the dataset with the configuration it was given.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "nrt_mlx.cli", "eval", "--data", "hf:nobody/nothing:test"]
    out = subprocess.run(
        [*cmd, "--hf-config", "main"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert out.returncode == 2 and "hf:nobody/nothing:test (main)" in out.stderr, out.stderr
