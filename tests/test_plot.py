"""nrt-mlx plot and compare: a readable PNG with the expected panels, one table of runs."""

import json
import math

import matplotlib.image as mpimg
import numpy as np
import pytest
from typer.testing import CliRunner

from nrt_mlx.analysis.compare import compare_runs, load_runs
from nrt_mlx.analysis.plot import build_figure, plot_runs
from nrt_mlx.cli import app
from nrt_mlx.errors import NrtError

TRAIN_PANELS = {"reward", "trace length", "trace entropy"}


def write_run(root, steps: int = 30, collapse: bool = False, evals: bool = True):
    """A run directory with a metrics.jsonl as the trainer writes it (evals on lines of their own)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(1, steps + 1):
        decay = math.exp(-s / 6) if collapse else 1.0
        length = 100 * decay + 3 * math.sin(s)
        lines.append(
            {
                "step": s,
                "loss": 1 / s,
                "reward_mean": 0.1 + 0.01 * s,
                "reward_std": 0.02,
                "answer_nll": 3 - 0.02 * s,
                "null_answer_nll": 3.1,
                "trace_tokens_mean": length,
                "trace_tokens_min": 0.5 * length,
                "trace_tokens_max": 1.5 * length,
                "trace_entropy": 2 * decay,
                "marker_rate": 0.8,
                "distinct_2": 0.7 * decay + 0.05,
            }
        )
        if collapse and s == 10:
            lines[-1]["collapse_warning"] = "step 10: mean trace length fell"
        if evals and s % 10 == 0:
            lines.append(
                {
                    "step": s,
                    "eval_null_nll": 3.0,
                    "eval_trace_nll_mean": 2.9 - 0.01 * s,
                    "eval_gain": 0.1 + 0.01 * s,
                    "eval_f1": 0.01 * s,
                    "eval_exact_match": 0.005 * s,
                    "eval_exact_match_flexible": 0.008 * s,
                }
            )
    (root / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


@pytest.fixture()
def two_runs(tmp_path):
    return [write_run(tmp_path / "weighted"), write_run(tmp_path / "arith", collapse=True)]


def test_plot_writes_a_png_with_the_expected_panels(two_runs, tmp_path):
    out = plot_runs(two_runs, tmp_path / "plots" / "runs.png")
    assert out.exists() and out.stat().st_size > 20_000
    image = mpimg.imread(out)
    assert image.shape[0] >= 1000 and image.shape[1] >= 1200  # 4 rows x 2 columns at 100 dpi
    assert float(np.var(image[..., :3])) > 0.005  # not blank
    # Coloured pixels: the lines of the runs, not just black text on white.
    rgb = image[..., :3]
    assert (rgb.max(axis=-1) - rgb.min(axis=-1) > 0.3).mean() > 0.002
    _, titles = build_figure(load_runs(two_runs))
    assert TRAIN_PANELS <= set(titles)
    assert any(t.startswith("answer NLL") for t in titles)
    assert {"eval: answers"} <= set(titles) and any(
        t.startswith("eval: answer NLL") for t in titles
    )
    fig, _ = build_figure(load_runs(two_runs))
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["weighted", "arith"]


def test_panels_follow_the_data(tmp_path):
    run = write_run(tmp_path / "plain", evals=False)
    _, titles = build_figure(load_runs([run]))
    assert not any(t.startswith("eval") for t in titles) and TRAIN_PANELS <= set(titles)
    out = plot_runs([run])
    assert out == run / "plot.png" and out.exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.jsonl").write_text(json.dumps({"step": 1, "foo": 1.0}) + "\n")
    with pytest.raises(NrtError, match="nothing to plot"):
        plot_runs([tmp_path / "other"], tmp_path / "x.png")
    with pytest.raises(NrtError, match=r"\.png"):
        plot_runs([run], tmp_path / "x.pdf")


def test_same_names_are_told_apart(tmp_path):
    runs = load_runs([write_run(tmp_path / "a" / "nrt"), write_run(tmp_path / "b" / "nrt")])
    assert [r.name for r in runs] == ["a/nrt", "b/nrt"]


def test_compare_gives_final_metrics_and_latest_eval(two_runs):
    rows = compare_runs(two_runs, last=5)
    assert [r["run"] for r in rows] == ["weighted", "arith"]
    healthy, collapsed = rows
    lengths = [100 + 3 * math.sin(s) for s in range(26, 31)]
    assert healthy["trace_tokens_mean"] == pytest.approx(np.mean(lengths))
    assert healthy["steps"] == 30 and healthy["eval_step"] == 30
    assert healthy["eval_gain"] == pytest.approx(0.4) and healthy["eval_f1"] == pytest.approx(0.3)
    assert healthy["collapse"] == "" and collapsed["collapse"] == "step 10"
    assert collapsed["trace_entropy"] < 0.05
    assert healthy["eval_exact_match_flexible"] == pytest.approx(0.24)


def test_flexible_em_is_drawn_beside_strict_em(two_runs):
    fig, titles = build_figure(load_runs(two_runs))
    answers = fig.axes[titles.index("eval: answers")]
    labels = [line.get_label() for line in answers.get_lines()]
    assert any(label.endswith("EM (flexible)") for label in labels), labels
    assert any(label.endswith(" EM") for label in labels), labels


def test_plot_and_compare_cli(two_runs, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.png"
    result = runner.invoke(app, ["plot", *map(str, two_runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.exists() and str(out) in result.stdout
    table = runner.invoke(app, ["compare", *map(str, two_runs)], terminal_width=250)
    assert table.exit_code == 0, table.output
    assert "weighted" in table.stdout and "arith" in table.stdout and "step 10" in table.stdout
    as_json = runner.invoke(app, ["compare", *map(str, two_runs), "--json"])
    assert [r["run"] for r in json.loads(as_json.stdout)] == ["weighted", "arith"]


@pytest.mark.parametrize("command", ["plot", "compare"])
def test_unknown_run_dirs_are_one_line_errors(command, two_runs, tmp_path):
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    for bad, why in (
        (tmp_path / "nope", "no such run directory"),
        (tmp_path / "empty", "no metrics.jsonl"),
    ):
        result = runner.invoke(app, [command, str(two_runs[0]), str(bad)])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and why in lines[0]


def test_a_real_run_plots_loss_and_learning_rate_over_whole_steps(tmp_path, tiny_model_dir):
    """A run the trainer wrote (tiny model, 3 steps): loss and learning-rate panels hold its
    figures, and a short run's step axis has no fractional ticks."""
    from helpers import tiny_recipe, write_recipe

    from nrt_mlx.recipe import load_recipe
    from nrt_mlx.trainer import train

    recipe = tiny_recipe(tmp_path, tiny_model_dir, optimizer={"schedule": "cosine"})
    run = train(load_recipe(write_recipe(tmp_path, recipe)), quiet=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fig, titles = build_figure(load_runs([run]))
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert set(panels) == set(titles)
    loss_ax = next(ax for title, ax in panels.items() if title.startswith("loss"))
    by_label = {line.get_label(): list(line.get_ydata()) for line in loss_ax.get_lines()}
    assert by_label["run total"] == pytest.approx([r["loss"] for r in records])
    assert {"run trace", "run token"} <= set(by_label)
    (lr_line,) = panels["learning rate"].get_lines()
    rates = list(lr_line.get_ydata())
    assert rates == pytest.approx([r["lr"] for r in records]) and rates[0] > rates[-1]
    for title, ax in panels.items():
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks == [1, 2, 3], f"{title}: step ticks {ticks}"
    out = plot_runs([run], tmp_path / "real.png")
    assert float(np.var(mpimg.imread(out)[..., :3])) > 0.005
