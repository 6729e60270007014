"""nrt-mlx eval: determinism, NLL figures against a plain forward pass, generation, options, the
config builder, tables, CLI."""

import json
import shutil
from dataclasses import replace

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from typer.testing import CliRunner

from nrt_mlx.analysis.tables import eval_tables, render_text
from nrt_mlx.answers import compile_extract, exact_match, extract_answer, flexible_match, token_f1
from nrt_mlx.cli import app
from nrt_mlx.data import Example
from nrt_mlx.errors import NrtError
from nrt_mlx.evaluate import EVAL_THINK_TOKENS, EvalConfig, eval_config, evaluate, run_rollout
from nrt_mlx.model import adapter_config, add_adapters, load_model, write_adapters_into
from nrt_mlx.recipe import LoraConfig, ModelConfig, Recipe, RolloutConfig, save_recipe
from nrt_mlx.rollout import sample_traces
from nrt_mlx.rundir import find_adapters
from nrt_mlx.vocab import Vocabulary

EXAMPLES = [
    Example([{"role": "user", "content": "What is the capital of France?"}], "Paris", 1),
    Example(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two plus two"}],
        "four",
        2,
        ["three", "Four.", "five"],
    ),
    Example([{"role": "user", "content": "why is the sky blue"}], "because of light", 3),
]

CFG = eval_config(samples=3, max_think_tokens=10, max_answer_tokens=5)


@pytest.fixture(scope="module")
def model_and_vocab(tiny_model_dir):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    return model, Vocabulary.of(tok, "auto")


@pytest.fixture(scope="module")
def report(model_and_vocab):
    model, vocab = model_and_vocab
    return evaluate(model, vocab, EXAMPLES, CFG)


@pytest.fixture(scope="module")
def trace_ids(model_and_vocab, report):
    """The token ids of the report's traces, traces[q][k]: sampled again the way evaluate samples
    them (the first of two keys of the seed), and checked against what the report recorded."""
    model, vocab = model_and_vocab
    prompts = [vocab.encode_prompt(ex.messages, CFG.rollout.think_prefix) for ex in EXAMPLES]
    key = mx.random.split(mx.random.key(CFG.seed))[0]
    traces, _ = sample_traces(model, prompts, CFG.rollout, vocab, key)
    for group, record in zip(traces, report.questions):
        assert len(group) == len(record["generations"]) == CFG.rollout.samples
        for t, g in zip(group, record["generations"]):
            assert g["trace"] == vocab.decode(t.tokens) and g["trace_tokens"] == len(t.tokens)
            assert g["emitted_marker"] == t.emitted_marker
    return [[t.tokens for t in group] for group in traces]


def plain_logprobs(model, ids: list[int]) -> np.ndarray:
    """log p(ids[j] | ids[:j]) for j >= 1, from one unbatched forward pass."""
    logits = model(mx.array(ids)[None])[0].astype(mx.float32)
    lp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    return np.array([lp[j - 1, ids[j]] for j in range(1, len(ids))])


def answer_nll(model, context: list[int], answer: list[int]) -> float:
    return float(-plain_logprobs(model, context + answer)[-len(answer) :].mean())


def trace_texts(report) -> list[str]:
    return [g["trace"] for q in report.questions for g in q["generations"]]


def test_same_seed_same_numbers_other_seed_other_numbers(model_and_vocab, report):
    model, vocab = model_and_vocab
    again = evaluate(model, vocab, EXAMPLES, CFG)
    assert again.summary == report.summary
    assert again.questions == report.questions
    other = evaluate(model, vocab, EXAMPLES, replace(CFG, seed=1))
    assert trace_texts(other) != trace_texts(report)
    assert other.summary["trace_nll_mean"] != report.summary["trace_nll_mean"]
    # No trace involved: the null-think NLL does not depend on the seed.
    assert other.summary["null_nll"] == pytest.approx(report.summary["null_nll"], abs=1e-6)


def test_nll_figures_agree_with_a_plain_forward_pass(model_and_vocab, report, trace_ids):
    model, vocab = model_and_vocab
    marker = vocab.marker
    for ex, record, traces in zip(EXAMPLES, report.questions, trace_ids):
        prompt, answer = vocab.encode_prompt(ex.messages), vocab.encode_answer(ex.answer)
        null = answer_nll(model, prompt + marker.ids, answer)
        assert record["null_nll"] == pytest.approx(null, abs=1e-4)
        expected = [answer_nll(model, prompt + z + marker.ids, answer) for z in traces]
        np.testing.assert_allclose(record["trace_nll"], expected, atol=1e-4)
        assert record["trace_nll_mean"] == pytest.approx(np.mean(expected), abs=1e-4)
        assert record["trace_nll_best"] == pytest.approx(min(expected), abs=1e-4)
        assert record["gain"] == pytest.approx(null - np.mean(expected), abs=1e-4)
        assert record["trace_tokens"] == pytest.approx(np.mean([len(z) for z in traces]))
    assert report.summary["null_nll"] == pytest.approx(
        np.mean([q["null_nll"] for q in report.questions])
    )
    assert report.summary["questions"] == 3 and report.summary["samples"] == 3
    assert report.summary["trace_entropy"] > 0 and 0 < report.summary["distinct_2"] <= 1
    # The report's config is flat: the rollout's settings beside eval's own, and the marker text.
    assert report.config["samples"] == 3 and report.config["max_think_tokens"] == 10
    assert report.config["max_answer_tokens"] == 5 and "rollout" not in report.config
    assert report.config["marker_text"] == vocab.marker.text


def test_generated_answers_are_greedy_after_trace_and_marker(model_and_vocab, report, trace_ids):
    model, vocab = model_and_vocab
    marker = vocab.marker
    eos = vocab.eos_ids
    ex, record, traces = EXAMPLES[0], report.questions[0], trace_ids[0]
    for z, generation in zip(traces, record["generations"]):
        ids = vocab.encode_prompt(ex.messages) + z + marker.ids
        out: list[int] = []
        for _ in range(CFG.max_answer_tokens):
            nxt = int(mx.argmax(model(mx.array(ids + out)[None])[0, -1]).item())
            if nxt in eos:
                break
            out.append(nxt)
        assert generation["answer"] == vocab.decode(out)
        assert generation["f1"] == token_f1(generation["answer"], ex.answer)
        assert generation["exact_match"] == exact_match(generation["answer"], ex.answer)
    assert record["f1"] == pytest.approx(np.mean([g["f1"] for g in record["generations"]]))


def test_report_carries_strict_and_flexible_match(report):
    """Both figures per generation, per question and in the summary; the flexible one is the
    default extraction applied to the generated text."""
    for ex, record in zip(EXAMPLES, report.questions):
        for g in record["generations"]:
            assert g["extracted"] == extract_answer(g["answer"], ex.answer)
            assert g["exact_match_flexible"] == flexible_match(g["answer"], ex.answer)
        flexible = np.mean([g["exact_match_flexible"] for g in record["generations"]])
        assert record["exact_match_flexible"] == pytest.approx(flexible)
    for key in ("exact_match", "exact_match_flexible"):
        assert report.summary[key] == pytest.approx(np.mean([q[key] for q in report.questions]))
    text = render_text(eval_tables(report), width=160)
    assert "exact_match_flexible" in text and " flex " in text and "(strict)" in text


def test_strict_and_flexible_match_on_answers_models_write():
    # Numbers: the last number in the text, compared by value (lm-eval's flexible-extract).
    assert exact_match("The answer is 12.", "12") == 0.0
    assert flexible_match("The answer is 12.", "12") == 1.0
    assert flexible_match("3 + 9 = 12, so 12 apples", "12") == 1.0
    assert flexible_match("Costs $1,200 in total.", "1200") == 1.0
    assert flexible_match("She had 12.0", "$12") == 1.0
    assert flexible_match("The answer is -7", "-7") == 1.0
    assert flexible_match("12 first, then 13", "12") == 0.0  # the final number counts
    assert flexible_match("about 125", "12.5") == 0.0  # by value, not by digits
    assert extract_answer("no number here", "12") is None
    assert flexible_match("no number here", "12") == 0.0
    # Text: the first non-empty line, normalised as the strict match.
    assert flexible_match("\nParis.\nIt is the capital because...", "paris") == 1.0
    assert exact_match("Paris.\nIt is the capital because...", "paris") == 0.0
    assert extract_answer("", "Paris") is None
    # A regex: its one capture group in the first match; numbers still compared by value.
    pattern = compile_extract(r"answer is (\w+)", "--extract")
    assert extract_answer("I think... the answer is Rome. Or Paris.", "Rome", pattern) == "Rome"
    number = compile_extract(r"answer is ([\d,.]+)", "--extract")
    assert flexible_match("so the answer is 1,200", "1200.0", number) == 1.0
    assert flexible_match("Paris", "Paris", pattern) == 0.0  # no match: a miss, as "[invalid]"
    assert compile_extract("", "--extract") is None
    with pytest.raises(NrtError, match=r"--extract '\(': not a valid regular expression"):
        compile_extract("(", "--extract")
    with pytest.raises(NrtError, match="needs exactly one capture group .it has 2"):
        compile_extract(r"(a)(b)", "--extract")
    with pytest.raises(NrtError, match="needs exactly one capture group .it has 0"):
        compile_extract(r"answer", "--extract")


def test_extract_changes_the_flexible_figure_only(model_and_vocab, report):
    model, vocab = model_and_vocab
    # A pattern every generation matches whole: flexible = strict match of the full text.
    whole = evaluate(model, vocab, EXAMPLES, replace(CFG, extract=r"(?s)^(.*)$"))
    for q, record in zip(whole.questions, report.questions):
        assert [g["answer"] for g in q["generations"]] == [
            g["answer"] for g in record["generations"]
        ]
        assert [g["exact_match_flexible"] for g in q["generations"]] == [
            g["exact_match"] for g in q["generations"]
        ]
    assert whole.summary["exact_match"] == report.summary["exact_match"]
    assert whole.config["extract"] == r"(?s)^(.*)$" and report.config["extract"] == ""
    with pytest.raises(NrtError, match="eval: extract"):
        evaluate(model, vocab, EXAMPLES, replace(CFG, extract="(x"))


def test_options_are_scored_by_likelihood(model_and_vocab, report, trace_ids):
    model, vocab = model_and_vocab
    marker = vocab.marker
    ex, record = EXAMPLES[1], report.questions[1]
    assert record["correct_option"] == 1  # "Four." normalises to "four"
    prompt = vocab.encode_prompt(ex.messages)

    def option_lp(context: list[int], option: str) -> float:
        answer = vocab.encode_answer(option)
        return float(plain_logprobs(model, context + answer)[-len(answer) :].sum())

    null_lp = [option_lp(prompt + marker.ids, o) for o in ex.options]
    assert record["pick_null"] == int(np.argmax(null_lp))
    assert record["mc_acc_null"] == float(record["pick_null"] == 1)
    # With traces: log (1/K) sum_k p(o | x, z_k, m), the mean of the probabilities over the traces.
    trace_lp = [
        np.logaddexp.reduce([option_lp(prompt + z + marker.ids, o) for z in trace_ids[1]])
        - np.log(len(trace_ids[1]))
        for o in ex.options
    ]
    assert record["pick_likelihood"] == int(np.argmax(trace_lp))
    assert record["mc_acc_likelihood"] == float(record["pick_likelihood"] == 1)
    assert report.summary["mc_questions"] == 1
    assert report.summary["mc_acc_likelihood"] == record["mc_acc_likelihood"]
    assert "mc_acc_null" not in report.questions[0]  # no options there


def test_answer_matching_is_normalised():
    assert exact_match("The Paris!", "paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert token_f1("the capital is Paris", "Paris") == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_no_generation_and_bad_settings(model_and_vocab):
    model, vocab = model_and_vocab
    quick = evaluate(
        model,
        vocab,
        EXAMPLES,
        eval_config(samples=1, max_think_tokens=4, generate=False, max_questions=2),
    )
    assert quick.summary["questions"] == 2 and "f1" not in quick.summary
    assert len(quick.questions) == 2 and "exact_match" not in quick.questions[0]
    assert all("answer" not in g for q in quick.questions for g in q["generations"])
    # The terminal tables: the summary, and one line per question with "-" for the missing EM/F1.
    text = render_text(eval_tables(quick), width=120)
    assert "null_nll" in text and "capital of France" in text and "questions (first 2 of 2)" in text
    line = next(row for row in text.splitlines() if "two plus two" in row)
    assert line.count(" - ") >= 2
    bad_settings = (
        eval_config(samples=0),
        eval_config(max_think_tokens=0),
        eval_config(temperature=0),
        eval_config(top_p=1.5),
        eval_config(max_questions=-1),
        eval_config(max_answer_tokens=0),
        eval_config(batch_tokens=0),
    )
    for bad in bad_settings:
        with pytest.raises(NrtError, match="eval:"):
            evaluate(model, vocab, EXAMPLES, bad)
    with pytest.raises(NrtError, match="no questions"):
        evaluate(model, vocab, [], EvalConfig())


def test_eval_config_puts_each_override_in_its_place():
    run = RolloutConfig(
        samples=8,
        max_think_tokens=33,
        temperature=0.7,
        top_p=0.9,
        marker="\nA:",
        think_prefix="<t>",
    )
    cfg = eval_config(run, samples=2, marker="X", seed=5, max_answer_tokens=7, generate=False)
    # Rollout fields go to cfg.rollout, the others to EvalConfig itself.
    assert cfg.rollout == replace(run, samples=2, marker="X")
    assert (cfg.seed, cfg.max_answer_tokens, cfg.generate) == (5, 7, False)
    assert (cfg.max_questions, cfg.batch_tokens) == (EvalConfig().max_questions, 2048)
    assert not hasattr(cfg, "samples") and not hasattr(cfg.rollout, "seed")
    assert run.samples == 8 and run.marker == "\nA:"  # the run's settings are not changed
    # None keeps the value: the run's for rollout fields, EvalConfig's default for the others.
    kept = eval_config(run, samples=None, max_think_tokens=None, marker=None, seed=None)
    assert kept.rollout == run and kept.seed == EvalConfig().seed
    assert eval_config(run, generate=None, batch_tokens=None).generate is True
    assert eval_config(None, max_answer_tokens=None) == EvalConfig()
    assert eval_config(max_think_tokens=12).rollout == RolloutConfig(max_think_tokens=12)
    # A falsy value is a value: 0 and False override.
    zero = eval_config(run, max_questions=0, seed=0, generate=False, samples=0)
    assert zero.generate is False and zero.rollout.samples == 0
    flat = cfg.to_dict()
    assert flat["samples"] == 2 and flat["seed"] == 5 and flat["think_prefix"] == "<t>"
    with pytest.raises((TypeError, NrtError)):
        eval_config(run, sample=3)  # a misspelt name is not silently ignored


# --------------------------------------------------------------------------------------------
# Adapters and the CLI
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """A run directory as the trainer writes it: recipe.yaml (text marker) and non-trivial adapters."""
    root = tmp_path_factory.mktemp("run")
    loaded = load_model(ModelConfig(path=str(tiny_model_dir)))
    lora = LoraConfig(layers=2, rank=4)
    add_adapters(loaded.model, lora, seed=0)
    # LoRA's B starts at zero, so fresh adapters change nothing: give every adapter weight values.
    mx.random.seed(0)
    params = tree_flatten(loaded.model.trainable_parameters())
    loaded.model.update(tree_unflatten([(k, 0.5 * mx.random.normal(v.shape)) for k, v in params]))
    extra = {"nrt_mlx": {"marker": "\nAnswer:\n"}}  # what the trainer writes
    (root / "adapters").mkdir()
    write_adapters_into(loaded.model, adapter_config(loaded, lora, extra), root / "adapters")
    recipe = Recipe()
    recipe.model.path = str(tiny_model_dir)
    recipe.rollout.marker = "\nAnswer:\n"
    save_recipe(recipe, root / "recipe.yaml")
    return root


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    lines = [
        {"question": "What is the capital of France?", "answer": "Paris"},
        {"question": "two plus two", "answer": "four", "options": ["three", "four"]},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_find_adapters_resolves_runs_checkpoints_and_adapter_dirs(run_dir, tmp_path):
    assert find_adapters(run_dir).adapter_dir == run_dir / "adapters"
    assert find_adapters(run_dir).recipe.rollout.marker == "\nAnswer:\n"
    step = run_dir / "checkpoints" / "step_000002"
    shutil.copytree(run_dir / "adapters", step)
    assert find_adapters(step).adapter_dir == step and find_adapters(step).recipe is not None
    bare = find_adapters(shutil.copytree(run_dir / "adapters", tmp_path / "bare"))
    # Without a recipe, adapter_config.json still names the base model and the marker.
    assert bare.recipe is None and bare.marker == run_rollout(bare).marker == "\nAnswer:\n"
    assert run_rollout(bare).max_think_tokens == EVAL_THINK_TOKENS
    assert run_rollout(None) == RolloutConfig(max_think_tokens=EVAL_THINK_TOKENS)
    assert bare.base_model == find_adapters(run_dir).base_model != ""
    # With a recipe, the run's own rollout settings.
    assert run_rollout(find_adapters(run_dir)) == find_adapters(run_dir).recipe.rollout
    with pytest.raises(NrtError, match="no such run"):
        find_adapters(tmp_path / "missing")
    with pytest.raises(NrtError, match="no adapters.safetensors"):
        find_adapters(tmp_path)


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


def test_eval_cli_with_a_run_and_without(run_dir, data_file, tiny_model_dir, tmp_path):
    runner = CliRunner()
    args = [
        "eval",
        "--data",
        str(data_file),
        "--samples",
        "2",
        "--max-think",
        "6",
        "--max-answer",
        "3",
    ]
    with_run = runner.invoke(
        app, args + ["--adapter", str(run_dir), "--out", str(tmp_path / "a.json")]
    )
    assert with_run.exit_code == 0, with_run.output
    assert "null_nll" in with_run.stdout and "report written to" in with_run.stdout
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["config"]["marker_text"] == "\nAnswer:\n"  # the run's marker, from its recipe
    assert len(a["questions"]) == 2 and "mc_acc_likelihood" in a["summary"]
    base = runner.invoke(
        app,
        args
        + [
            "--model",
            str(tiny_model_dir),
            "--marker",
            "\nAnswer:\n",
            "--out",
            str(tmp_path / "b.json"),
        ],
    )
    assert base.exit_code == 0, base.output
    b = json.loads((tmp_path / "b.json").read_text())
    assert a["summary"]["null_nll"] != pytest.approx(
        b["summary"]["null_nll"], abs=1e-4
    )  # adapters applied


def test_eval_cli_bad_input_is_one_line(run_dir, data_file, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(
        app, ["eval", "--adapter", str(run_dir), "--data", str(tmp_path / "nope.jsonl")]
    )
    assert "file not found" in one_line_error(missing)
    unknown = runner.invoke(
        app, ["eval", "--adapter", str(tmp_path / "norun"), "--data", str(data_file)]
    )
    assert "no such run" in one_line_error(unknown)
    no_model = runner.invoke(app, ["eval", "--data", str(data_file)])
    assert "missing --model" in one_line_error(no_model)


def test_forward_chunking_does_not_change_the_numbers(model_and_vocab):
    model, vocab = model_and_vocab
    cfg = eval_config(samples=2, max_think_tokens=6, generate=False)
    one_batch = evaluate(model, vocab, EXAMPLES, cfg)
    row_by_row = evaluate(model, vocab, EXAMPLES, replace(cfg, batch_tokens=1))
    for key, value in one_batch.summary.items():
        assert row_by_row.summary[key] == pytest.approx(value, abs=1e-5), key


def test_a_report_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    import errno
    import os

    from nrt_mlx import evaluate as ev
    from nrt_mlx.evaluate import EvalReport

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ev, "atomic_write_text", full)
    with pytest.raises(NrtError, match=r"report.json: could not write the report \("):
        EvalReport({"questions": 1.0}, []).to_json(tmp_path / "report.json")
