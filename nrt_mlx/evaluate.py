"""Does reasoning help? Answer likelihood with and without sampled traces, and generation quality.

For each question x with reference y* (T tokens, EOS included) the model samples K traces z_k
(``nrt_mlx.rollout``), and batched forward passes over the rows of ``nrt_mlx.batch`` give

    null_nll        = -(1/T) sum_i log p(y*_i | x, m, y*_<i)          no reasoning (null think)
    trace_nll[k]    = -(1/T) sum_i log p(y*_i | x, z_k, m, y*_<i)
    trace_nll_mean  = (1/K) sum_k trace_nll[k]        trace_nll_best = min_k trace_nll[k]
    gain            = null_nll - trace_nll_mean       gain_best      = null_nll - trace_nll_best

Then the model writes its own answer after each trace and the marker (greedy, up to
``max_answer_tokens``), scored against the reference by token F1 and by exact match twice, as
lm-evaluation-harness's filters do: strict (the normalised whole answer) and flexible (an answer
extracted from the text first: a regex's capture group, else the final number when the reference
is a number, else the first line; see ``extract_answer``).
With ``options`` (multiple choice) the pick is the option of highest likelihood, without a trace
(log p(o | x, m)) and with the traces (log (1/K) sum_k p(o | x, z_k, m)), and the option closest
(token F1) to each generated answer. The trace figures (length, marker rate, entropy per think
token of the untempered model, distinct-2) are ``nrt_mlx.stats.trace_stats``, as in training.
Everything is deterministic for a seed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from nrt_mlx.answers import (
    compile_extract,
    exact_match,
    extract_answer,
    flexible_match,
    normalize_answer,
    token_f1,
)
from nrt_mlx.batch import THINK, Row, build_rows, collate
from nrt_mlx.data import Example
from nrt_mlx.errors import NrtError
from nrt_mlx.fileio import atomic_write_text, write_error_text
from nrt_mlx.objective import answer_logprobs, forward
from nrt_mlx.recipe import Recipe, RolloutConfig, rollout_problem
from nrt_mlx.rollout import Trace, greedy_answers, sample_traces
from nrt_mlx.rundir import AdapterSource
from nrt_mlx.stats import trace_stats
from nrt_mlx.vocab import Vocabulary


@dataclass
class EvalConfig:
    rollout: RolloutConfig = field(
        default_factory=RolloutConfig
    )  # K, think budget, sampler, marker
    seed: int = 0
    max_questions: int = 0  # 0 = all
    generate: bool = True  # also let the model write its own answer after each trace
    max_answer_tokens: int = 64
    batch_tokens: int = 2048  # padded tokens per forward pass (bounds the [B, L, V] logits)
    extract: str = ""  # regex with one capture group for the flexible match; "": the default rule

    def to_dict(self) -> dict[str, Any]:
        """Flat settings for the report: the rollout's fields beside the others."""
        return {**vars(self.rollout), **{k: v for k, v in vars(self).items() if k != "rollout"}}


# Think budget of eval and score when no run says otherwise.
EVAL_THINK_TOKENS = 128


def run_rollout(source: AdapterSource | None) -> RolloutConfig:
    """The rollout settings to evaluate adapters with: their run's, else the defaults with the
    marker adapter_config.json records (and a think budget of ``EVAL_THINK_TOKENS``)."""
    if source is not None and source.recipe is not None:
        return source.recipe.rollout
    marker = (source.marker if source is not None else None) or "auto"
    return RolloutConfig(max_think_tokens=EVAL_THINK_TOKENS, marker=marker)


def run_extract(recipe: Recipe | None) -> str:
    """The flexible match's extraction regex a run's recipe names ("" = the default rule)."""
    return recipe.train.eval_extract if recipe is not None else ""


def eval_config(rollout: RolloutConfig | None = None, **overrides: Any) -> EvalConfig:
    """EvalConfig with a run's rollout settings (K, think budget, sampler, marker, think prefix),
    then ``overrides`` by name, of EvalConfig or of its rollout; None keeps a value."""
    given = {k: v for k, v in overrides.items() if v is not None}
    rollout = rollout or RolloutConfig()
    own = {k: v for k, v in given.items() if k in vars(rollout)}
    rest = {k: v for k, v in given.items() if k not in own}
    return EvalConfig(rollout=replace(rollout, **own), **rest)


@dataclass
class EvalReport:
    summary: dict[str, float]
    questions: list[dict]
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, "config": self.config, "questions": self.questions}

    def to_json(self, path: str | Path) -> Path:
        """Write the report (summary, config, per-question figures and generations) as JSON."""
        path = Path(path)
        try:
            atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        except OSError as err:
            why = write_error_text(err, path.parent if path.parent.is_dir() else Path.cwd())
            raise NrtError(f"{path}: could not write the report ({why})") from None
        return path


# ---- answer likelihoods: one padded forward pass per chunk of rows --------------------------------


@dataclass
class RowLikelihood:
    """What one forward pass tells about one row."""

    answer_logprobs: np.ndarray  # [T] log p of each answer token (EOS included)
    think_entropy: float  # sum over the think positions of the model's entropy there
    think_tokens: int

    @property
    def nll(self) -> float:
        """Answer NLL per token: -(1/T) sum_i log p(y*_i | ...)."""
        return float(-self.answer_logprobs.sum() / max(len(self.answer_logprobs), 1))

    @property
    def logprob(self) -> float:
        """log p(y* EOS | ...) of the whole answer."""
        return float(self.answer_logprobs.sum())


def _chunks(rows: list[Row], batch_tokens: int) -> list[list[Row]]:
    """Runs of whole questions (consecutive rows of one ``question`` id) whose padded size (rows x
    longest row) stays within ``batch_tokens``; a question larger than that is a chunk alone."""
    groups: list[list[Row]] = []
    for row in rows:
        if groups and groups[-1][0].question == row.question:
            groups[-1].append(row)
        else:
            groups.append([row])
    out: list[list[Row]] = []
    for group in groups:
        merged = (out[-1] if out else []) + group
        if out and len(merged) * max(len(r.tokens) for r in merged) <= batch_tokens:
            out[-1] = merged
        else:
            out.append(group)
    return out


def row_likelihoods(
    model: nn.Module, rows: list[Row], pad_id: int, batch_tokens: int = 2048
) -> list[RowLikelihood]:
    """Answer log-probs and think-token entropy of every row, from the objective's own forward
    pass (the numbers training sees). Rows of different questions carry different ``question``
    ids."""
    out: list[RowLikelihood] = []
    for chunk in _chunks(rows, batch_tokens):
        batch = collate(chunk, pad_id)
        lp, ent = forward(model, batch)
        ans = answer_logprobs(lp, batch)
        think = batch.segments == THINK
        ent_sum, n_think = mx.where(think, ent, 0.0).sum(axis=-1), think.sum(axis=-1)
        mx.eval(ans, ent_sum, n_think)
        ans_np, mask_np = np.array(ans), np.array(batch.answer_mask) > 0
        for b in range(len(chunk)):
            out.append(RowLikelihood(ans_np[b][mask_np[b]], float(ent_sum[b]), int(n_think[b])))
    return out


# ---- evaluation -----------------------------------------------------------------------------------


def _check_config(cfg: EvalConfig) -> None:
    q, a, b = cfg.max_questions, cfg.max_answer_tokens, cfg.batch_tokens
    checks = [
        (q >= 0, f"max_questions must be >= 0 (0 = all), got {q}"),
        (a >= 1, f"max_answer_tokens must be at least 1, got {a}"),
        (b >= 1, f"batch_tokens must be at least 1, got {b}"),
    ]
    problems = [rollout_problem(cfg.rollout, "")] + [message for ok, message in checks if not ok]
    for problem in filter(None, problems):
        raise NrtError(f"eval: {problem}")


def _correct_option(example: Example) -> int | None:
    """Index of the option that is the reference answer (normalised), or None."""
    target = normalize_answer(example.answer)
    for i, option in enumerate(example.options or []):
        if normalize_answer(option) == target:
            return i
    return None


def _log_mean_exp(values: list[float]) -> float:
    """log (1/K) sum_k exp(v_k), stable."""
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values) / len(values))


def _option_pick_generated(answer: str, options: list[str]) -> int | None:
    """The option with the highest token F1 against a generated answer (None if all are 0)."""
    f1 = [token_f1(answer, option) for option in options]
    best = int(np.argmax(f1))
    return best if f1[best] > 0 else None


def _multiple_choice(
    example: Example, option_rows: list[list[RowLikelihood]], answers: list[str] | None
) -> dict[str, Any]:
    """Accuracy of the option picks; ``option_rows[o]`` = K trace rows then the null row."""
    correct = _correct_option(example)
    out: dict[str, Any] = {"options": example.options, "correct_option": correct}
    if correct is None:
        return out  # the reference is not one of the options: nothing to score against
    null_lp = [scores[-1].logprob for scores in option_rows]
    trace_lp = [_log_mean_exp([s.logprob for s in scores[:-1]]) for scores in option_rows]
    out["pick_null"] = int(np.argmax(null_lp))
    out["pick_likelihood"] = int(np.argmax(trace_lp))
    out["mc_acc_null"] = float(out["pick_null"] == correct)
    out["mc_acc_likelihood"] = float(out["pick_likelihood"] == correct)
    if answers is not None:
        picks = [_option_pick_generated(a, example.options) for a in answers]
        out["pick_generated"] = picks
        out["mc_acc_generated"] = float(np.mean([p == correct for p in picks]))
    return out


def _think_figures(rows: list[RowLikelihood], traces: list[Trace]) -> dict[str, float]:
    """trace_stats of traces whose K rows are ``rows`` (null row excluded)."""
    entropy = sum(r.think_entropy for r in rows)
    return trace_stats(traces, entropy, sum(r.think_tokens for r in rows))


def _question_record(
    example: Example,
    rows: list[RowLikelihood],
    traces: list[Trace],
    vocab: Vocabulary,
    answers: list[list[int]] | None,
    pattern: re.Pattern | None = None,
) -> dict[str, Any]:
    """Per-question figures from its K trace rows and null row (last); ``pattern``: the
    flexible match's extraction regex (None: the default rule)."""
    trace_nll = [r.nll for r in rows[:-1]]
    null_nll = rows[-1].nll
    stats = _think_figures(rows[:-1], traces)
    record: dict[str, Any] = {
        "line": example.line,
        "question": example.question,
        "reference": example.answer,
        "null_nll": null_nll,
        "trace_nll": trace_nll,
        "trace_nll_mean": float(np.mean(trace_nll)),
        "trace_nll_best": float(np.min(trace_nll)),
        "gain": null_nll - float(np.mean(trace_nll)),
        "gain_best": null_nll - float(np.min(trace_nll)),
        "trace_tokens": stats["trace_tokens_mean"],
        "trace_entropy": stats["trace_entropy"],
        "marker_rate": stats["marker_rate"],
    }
    generations = []
    for k, trace in enumerate(traces):
        item: dict[str, Any] = {
            "trace": vocab.decode(trace.tokens),
            "trace_tokens": len(trace.tokens),
            "emitted_marker": trace.emitted_marker,
            "trace_nll": trace_nll[k],
        }
        if answers is not None:
            text = vocab.decode(answers[k])
            item.update(
                answer=text,
                exact_match=exact_match(text, example.answer),
                extracted=extract_answer(text, example.answer, pattern),
                exact_match_flexible=flexible_match(text, example.answer, pattern),
                f1=token_f1(text, example.answer),
            )
        generations.append(item)
    record["generations"] = generations
    if answers is not None:
        for key in ("exact_match", "exact_match_flexible"):
            record[key] = float(np.mean([g[key] for g in generations]))
        record["f1"] = float(np.mean([g["f1"] for g in generations]))
    return record


def _summary(
    records: list[dict], traces: list[list[Trace]], rows: list[list[RowLikelihood]]
) -> dict[str, float]:
    """Means over questions; the trace figures over all traces together."""
    summary: dict[str, float] = {"questions": float(len(records)), "samples": float(len(traces[0]))}
    for key in (
        "null_nll",
        "trace_nll_mean",
        "trace_nll_best",
        "gain",
        "gain_best",
        "exact_match",
        "exact_match_flexible",
        "f1",
    ):
        if key in records[0]:
            summary[key] = float(np.mean([r[key] for r in records]))
    stats = _think_figures([r for g in rows for r in g[:-1]], [t for g in traces for t in g])
    summary["trace_tokens"] = stats["trace_tokens_mean"]
    for key in ("marker_rate", "trace_entropy", "distinct_2"):
        summary[key] = stats[key]
    mc = [r for r in records if "mc_acc_null" in r]
    if mc:
        summary["mc_questions"] = float(len(mc))
        for key in ("mc_acc_null", "mc_acc_likelihood", "mc_acc_generated"):
            if key in mc[0]:
                summary[key] = float(np.mean([r[key] for r in mc]))
    return summary


def evaluate(
    model: nn.Module, vocab: Vocabulary, examples: list[Example], cfg: EvalConfig
) -> EvalReport:
    """Evaluate ``examples`` (the first ``cfg.max_questions``); see the module docstring."""
    _check_config(cfg)
    pattern = compile_extract(cfg.extract, "eval: extract")  # refused before any work
    examples = list(examples[: cfg.max_questions] if cfg.max_questions else examples)
    if not examples:
        raise NrtError("eval: no questions to evaluate")
    m = vocab.marker.ids
    prompts = [vocab.encode_prompt(ex.messages, cfg.rollout.think_prefix) for ex in examples]
    answers = [vocab.encode_answer(ex.answer) for ex in examples]
    was_training = model.training
    model.eval()  # no LoRA dropout while measuring
    try:
        # The first of two keys of the seed, as nrt-mlx 0.1 drew it: reports stay reproducible.
        key = mx.random.split(mx.random.key(cfg.seed))[0]
        traces, _ = sample_traces(model, prompts, cfg.rollout, vocab, key)
        # Rows of the reference answers, then of every option: distinct group ids, one scoring pass.
        groups = [
            build_rows(p, t, m, a, q) for q, (p, t, a) in enumerate(zip(prompts, traces, answers))
        ]
        option_of: list[int] = []  # question of each option group, in order
        for q, ex in enumerate(examples):
            for option in ex.options or []:
                option_ids = vocab.encode_answer(option)
                groups.append(build_rows(prompts[q], traces[q], m, option_ids, len(groups)))
                option_of.append(q)
        flat = row_likelihoods(
            model, [r for g in groups for r in g], vocab.pad_id, cfg.batch_tokens
        )
        generated = None
        if cfg.generate:
            contexts = [p + t.tokens + m for p, group in zip(prompts, traces) for t in group]
            flat_answers = greedy_answers(model, contexts, vocab.eos_ids, cfg.max_answer_tokens)
            k = cfg.rollout.samples
            generated = [flat_answers[q * k : (q + 1) * k] for q in range(len(examples))]
    finally:
        model.train(was_training)

    width = cfg.rollout.samples + 1
    grouped = [flat[i * width : (i + 1) * width] for i in range(len(groups))]
    records = []
    for q, ex in enumerate(examples):
        answers_q = generated[q] if generated is not None else None
        record = _question_record(ex, grouped[q], traces[q], vocab, answers_q, pattern)
        if ex.options:
            per_option = [grouped[len(examples) + i] for i, qq in enumerate(option_of) if qq == q]
            texts = [g["answer"] for g in record["generations"]] if answers_q is not None else None
            record.update(_multiple_choice(ex, per_option, texts))
        records.append(record)
    summary = _summary(records, traces, grouped[: len(examples)])
    return EvalReport(summary, records, {**cfg.to_dict(), "marker_text": vocab.marker.text})


# ---- a base model with a run's adapters (eval, score) ----------------------------------------------


def load_for_eval(
    model_path: str | None, source: AdapterSource | None = None, trust_remote_code: bool = False
) -> Any:
    """Load the base model (``model_path``, else the run's model.path) with the adapters of
    ``source`` applied; returns the ``LoadedModel``.

    With adapters, the base loads as their run did (same quantization), and every adapter weight
    must be in the file (``model.apply_adapters``). ``trust_remote_code`` (the command line's
    --trust-remote-code) alone lets the model run its Hub code: a run's recipe.yaml asking for it
    is refused without the flag (``recipe.with_remote_code``).
    """
    from nrt_mlx.model import apply_adapters, load_model, load_trained_base
    from nrt_mlx.recipe import ModelConfig, with_remote_code

    path = model_path or (source.base_model if source else "")
    if not path:
        raise NrtError(
            "missing --model: the base model directory (or an --adapter run whose recipe names it)"
        )
    if source is None:
        loaded = load_model(ModelConfig(path=path, trust_remote_code=trust_remote_code))
        loaded.model.eval()
        return loaded
    cfg = source.recipe.model if source.recipe is not None else ModelConfig(quantize="none")
    cfg = with_remote_code(
        cfg, trust_remote_code, f"recipe.yaml of the run of {source.adapter_dir}"
    )
    loaded = load_trained_base(replace(cfg, path=path), source.adapter_config)
    apply_adapters(loaded.model, source.adapter_dir)
    return loaded
