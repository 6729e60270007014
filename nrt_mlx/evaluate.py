"""Does reasoning help? Answer likelihood with and without sampled traces, and generation quality.

For each question x with reference y* (T tokens, EOS included) the model samples K traces z_k
(``nrt_mlx.rollout``), and one batched forward pass over the rows of ``nrt_mlx.sequences`` gives

    null_nll        = -(1/T) sum_i log p(y*_i | x, m, y*_<i)          no reasoning (null think)
    trace_nll[k]    = -(1/T) sum_i log p(y*_i | x, z_k, m, y*_<i)
    trace_nll_mean  = (1/K) sum_k trace_nll[k]        trace_nll_best = min_k trace_nll[k]
    gain            = null_nll - trace_nll_mean       gain_best      = null_nll - trace_nll_best

Then the model writes its own answer after each trace and the marker (greedy, up to
``max_answer_tokens``), scored against the reference by normalised exact match and token F1.
With ``options`` (multiple choice) the pick is the option of highest likelihood, without a trace
(log p(o | x, m)) and with the traces (log (1/K) sum_k p(o | x, z_k, m)), and the option closest
(token F1) to each generated answer. Trace length, per-token entropy on the traces (of the
untempered model), marker rate and distinct-2 are reported too. Everything is deterministic for a
seed.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from nrt_mlx.collapse import distinct_n
from nrt_mlx.data import Example
from nrt_mlx.errors import NrtError
from nrt_mlx.loss import answer_logprobs, forward_logprobs
from nrt_mlx.recipe import Recipe, RolloutConfig
from nrt_mlx.rollout import Trace, sample_traces
from nrt_mlx.sequences import (
    THINK,
    AnswerMarker,
    Row,
    build_rows,
    collate,
    encode_answer,
    encode_prompt,
    eos_ids,
    pad_id,
    resolve_marker,
)

# A temperature this low turns the sampler's Gumbel-max draw into the argmax: greedy decoding.
GREEDY_TEMPERATURE = 1e-5

# A marker id no tokenizer has: the answer generation stops at EOS or at its token budget only.
_NO_MARKER = [-1]


@dataclass
class EvalConfig:
    samples: int = 4  # K traces per question
    max_think_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    max_questions: int = 0  # 0 = all
    generate: bool = True  # also let the model write its own answer after each trace
    max_answer_tokens: int = 64
    marker: str = "auto"
    think_prefix: str = ""
    batch_tokens: int = 2048  # padded tokens per forward pass (bounds the [B, L, V] logits)


@dataclass
class EvalReport:
    summary: dict[str, float]
    questions: list[dict]
    config: dict[str, Any] = field(default_factory=dict)
    trace_ids: list[list[list[int]]] = field(
        default_factory=list, repr=False
    )  # [q][k], not in JSON

    def metrics(self, prefix: str = "eval_") -> dict[str, float]:
        """The summary with prefixed keys, for metrics.jsonl."""
        return {f"{prefix}{key}": value for key, value in self.summary.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, "config": self.config, "questions": self.questions}

    def to_json(self, path: str | Path) -> Path:
        """Write the report (summary, config, per-question figures and generations) as JSON."""
        from nrt_mlx.fileio import atomic_write_text

        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    def tables(self, max_rows: int = 20, width: int = 120) -> list[Any]:
        """rich Tables: the summary, then the first ``max_rows`` questions, for ``width`` columns."""
        from rich.table import Table

        summary = Table(title="evaluation", show_header=True)
        summary.add_column("metric")
        summary.add_column("value", justify="right")
        for key, value in self.summary.items():
            summary.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        return [summary, self._question_table(max_rows, width)]

    def _question_table(self, max_rows: int, width: int) -> Any:
        """One line per question; the question text gets the width the numbers leave."""
        from rich.table import Table

        heads = ["line", "question", "null", "mean", "best", "gain", "EM", "F1", "think"]
        rows = [
            [
                str(q["line"]),
                q["question"],
                f"{q['null_nll']:.3f}",
                f"{q['trace_nll_mean']:.3f}",
                f"{q['trace_nll_best']:.3f}",
                f"{q['gain']:+.3f}",
                _fmt(q.get("exact_match")),
                _fmt(q.get("f1")),
                f"{q['trace_tokens']:.0f}",
            ]
            for q in self.questions[:max_rows]
        ]
        # Each column takes its text + 2 padding + 1 border; the question gets the rest.
        numbers = sum(
            max(len(r[c]) for r in [heads, *rows]) + 3 for c in range(len(heads)) if c != 1
        )
        room = max(8, width - numbers - 4)
        table = Table(
            title=f"questions (first {len(rows)} of {len(self.questions)})",
            caption="answer NLL per token: null = no trace, mean / best of the K traces; "
            "gain = null - mean; think = mean trace tokens",
        )
        for c, name in enumerate(heads):
            table.add_column(name, justify="left" if c == 1 else "right", no_wrap=c == 1)
        for row in rows:
            gain = float(row[5])
            style = "green" if gain > 0 else "red" if gain < 0 else None
            row[1] = _shorten(row[1], room)
            table.add_row(*row[:5], f"[{style}]{row[5]}[/]" if style else row[5], *row[6:])
        return table

    def table(self, max_rows: int = 20, width: int = 120) -> str:
        """The tables as plain text."""
        return render_text(self.tables(max_rows, width), width)


def render_text(renderables: list[Any], width: int = 120) -> str:
    """rich renderables as plain text (no colour codes)."""
    import io

    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
    for item in renderables:
        console.print(item)
    return buffer.getvalue()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# --------------------------------------------------------------------------------------------
# Answer matching (SQuAD-style normalisation)
# --------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised texts are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 = 2 P R / (P + R) of the normalised word multisets (P = common/|pred|, R = common/|ref|)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------
# Scoring rows: one padded forward pass per chunk
# --------------------------------------------------------------------------------------------


@dataclass
class RowScore:
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
    """Consecutive rows whose padded size (rows x longest row) stays within ``batch_tokens``."""
    out: list[list[Row]] = []
    current: list[Row] = []
    longest = 0
    for row in rows:
        size = max(longest, len(row.tokens))
        if current and size * (len(current) + 1) > batch_tokens:
            out.append(current)
            current, size = [], len(row.tokens)
        current.append(row)
        longest = size
    if current:
        out.append(current)
    return out


def score_rows(
    model: nn.Module, rows: list[Row], pad: int, batch_tokens: int = 2048
) -> list[RowScore]:
    """Answer log-probs and think-token entropy of every row, from batched forward passes.

    Uses the loss's own forward (``nrt_mlx.loss``), so these are the numbers training sees.
    Rows of different questions must carry different ``question`` ids (collate checks that the
    rows of one id share the answer).
    """
    scores: list[RowScore] = []
    for chunk in _chunks(rows, batch_tokens):
        batch = collate(chunk, pad)
        lp, ent = forward_logprobs(model, batch, with_entropy=True)
        ans = answer_logprobs(lp, batch)
        think = (batch.segments == THINK).astype(mx.float32)
        ent_sum = (ent * think).sum(axis=-1)
        mx.eval(ans, ent_sum)
        ans_np, mask_np = np.array(ans), np.array(batch.answer_mask) > 0
        ent_np, think_np = np.array(ent_sum), np.array(think.sum(axis=-1))
        for b in range(len(chunk)):
            scores.append(RowScore(ans_np[b][mask_np[b]], float(ent_np[b]), int(think_np[b])))
    return scores


def trace_rows(
    prompt: list[int], traces: list[Trace], marker: AnswerMarker, answer: list[int], group: int
) -> list[Row]:
    """K rows [prompt | z_k | m | answer] and the null row last; long enough never to cut z."""
    longest = max((len(t.tokens) for t in traces), default=0)
    max_length = len(prompt) + longest + len(marker.ids) + len(answer)
    return build_rows(
        prompt,
        [t.tokens for t in traces],
        marker,
        answer,
        group,
        [t.emitted_marker for t in traces],
        max_length,
    )


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _check_config(cfg: EvalConfig) -> None:
    checks = [
        (cfg.samples >= 1, f"samples must be at least 1, got {cfg.samples}"),
        (
            cfg.max_think_tokens >= 1,
            f"max_think_tokens must be at least 1, got {cfg.max_think_tokens}",
        ),
        (cfg.temperature > 0, f"temperature must be > 0, got {cfg.temperature}"),
        (0 < cfg.top_p <= 1, f"top_p must be in (0, 1], got {cfg.top_p}"),
        (cfg.max_questions >= 0, f"max_questions must be >= 0 (0 = all), got {cfg.max_questions}"),
        (
            cfg.max_answer_tokens >= 1,
            f"max_answer_tokens must be at least 1, got {cfg.max_answer_tokens}",
        ),
        (cfg.batch_tokens >= 1, f"batch_tokens must be at least 1, got {cfg.batch_tokens}"),
    ]
    for ok, message in checks:
        if not ok:
            raise NrtError(f"eval: {message}")


def _generate_answers(
    model: nn.Module,
    prompts: list[list[int]],
    traces: list[list[Trace]],
    marker: AnswerMarker,
    eos: set[int],
    cfg: EvalConfig,
    key: mx.array,
) -> list[list[list[int]]]:
    """Greedy answer ids after [prompt | z_k | m] for every trace, in one batched generation."""
    contexts = [p + t.tokens + marker.ids for p, group in zip(prompts, traces) for t in group]
    greedy = RolloutConfig(
        samples=1, max_think_tokens=cfg.max_answer_tokens, temperature=GREEDY_TEMPERATURE
    )
    out, _ = sample_traces(model, contexts, greedy, _NO_MARKER, eos, key, samples=1)
    k = cfg.samples
    return [[out[q * k + j][0].tokens for j in range(k)] for q in range(len(prompts))]


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
    example: Example, option_scores: list[list[RowScore]], answers: list[str] | None
) -> dict[str, Any]:
    """Accuracy of the option picks; ``option_scores[o]`` = K trace rows then the null row."""
    correct = _correct_option(example)
    out: dict[str, Any] = {"options": example.options, "correct_option": correct}
    if correct is None:
        return out  # the reference is not one of the options: nothing to score against
    null_lp = [scores[-1].logprob for scores in option_scores]
    trace_lp = [_log_mean_exp([s.logprob for s in scores[:-1]]) for scores in option_scores]
    out["pick_null"] = int(np.argmax(null_lp))
    out["pick_likelihood"] = int(np.argmax(trace_lp))
    out["mc_acc_null"] = float(out["pick_null"] == correct)
    out["mc_acc_likelihood"] = float(out["pick_likelihood"] == correct)
    if answers is not None:
        picks = [_option_pick_generated(a, example.options) for a in answers]
        out["pick_generated"] = picks
        out["mc_acc_generated"] = float(np.mean([p == correct for p in picks]))
    return out


def _question_record(
    example: Example,
    scores: list[RowScore],
    traces: list[Trace],
    tokenizer: Any,
    answers: list[list[int]] | None,
) -> dict[str, Any]:
    """Per-question figures from its K trace rows and null row (last)."""
    trace_nll = [s.nll for s in scores[:-1]]
    null_nll = scores[-1].nll
    think = sum(s.think_tokens for s in scores[:-1])
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
        "trace_tokens": float(np.mean([len(t.tokens) for t in traces])),
        "trace_entropy": sum(s.think_entropy for s in scores[:-1]) / think if think else 0.0,
        "marker_rate": float(np.mean([t.emitted_marker for t in traces])),
    }
    generations = []
    for k, trace in enumerate(traces):
        item: dict[str, Any] = {
            "trace": tokenizer.decode(trace.tokens),
            "trace_tokens": len(trace.tokens),
            "emitted_marker": trace.emitted_marker,
            "trace_nll": trace_nll[k],
        }
        if answers is not None:
            text = tokenizer.decode(answers[k])
            item.update(
                answer=text,
                exact_match=exact_match(text, example.answer),
                f1=token_f1(text, example.answer),
            )
        generations.append(item)
    record["generations"] = generations
    if answers is not None:
        record["exact_match"] = float(np.mean([g["exact_match"] for g in generations]))
        record["f1"] = float(np.mean([g["f1"] for g in generations]))
    return record


def _summary(
    records: list[dict], traces: list[list[Trace]], scores: list[list[RowScore]]
) -> dict[str, float]:
    """Means over questions; entropy per think token over all traces; distinct-2 over all traces."""
    summary: dict[str, float] = {"questions": float(len(records)), "samples": float(len(traces[0]))}
    for key in (
        "null_nll",
        "trace_nll_mean",
        "trace_nll_best",
        "gain",
        "gain_best",
        "exact_match",
        "f1",
        "trace_tokens",
        "marker_rate",
    ):
        if key in records[0]:
            summary[key] = float(np.mean([r[key] for r in records]))
    think = sum(s.think_tokens for group in scores for s in group[:-1])
    entropy = sum(s.think_entropy for group in scores for s in group[:-1])
    summary["trace_entropy"] = entropy / think if think else 0.0
    summary["distinct_2"] = distinct_n([t.tokens for group in traces for t in group], 2)
    mc = [r for r in records if "mc_acc_null" in r]
    if mc:
        summary["mc_questions"] = float(len(mc))
        for key in ("mc_acc_null", "mc_acc_likelihood", "mc_acc_generated"):
            if key in mc[0]:
                summary[key] = float(np.mean([r[key] for r in mc]))
    return summary


def evaluate(
    model: nn.Module, tokenizer: Any, examples: list[Example], cfg: EvalConfig
) -> EvalReport:
    """Evaluate ``examples`` (the first ``cfg.max_questions``); see the module docstring."""
    _check_config(cfg)
    examples = list(examples[: cfg.max_questions] if cfg.max_questions else examples)
    if not examples:
        raise NrtError("eval: no questions to evaluate")
    marker = resolve_marker(tokenizer, cfg.marker)
    eos = eos_ids(tokenizer)
    prompts = [encode_prompt(tokenizer, ex.messages, cfg.think_prefix) for ex in examples]
    answers = [encode_answer(tokenizer, ex.answer) for ex in examples]
    rollout = RolloutConfig(
        samples=cfg.samples,
        max_think_tokens=cfg.max_think_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
    )
    was_training = model.training
    model.eval()  # no LoRA dropout while measuring
    try:
        key_traces, key_answers = mx.random.split(mx.random.key(cfg.seed))
        traces, _ = sample_traces(
            model, prompts, rollout, marker.ids, eos, key_traces, samples=cfg.samples
        )
        # Rows of the reference answers, then of every option: distinct group ids, one scoring pass.
        groups = [
            trace_rows(p, t, marker, a, q)
            for q, (p, t, a) in enumerate(zip(prompts, traces, answers))
        ]
        option_groups: list[tuple[int, int]] = []  # (question, option) of each extra group
        for q, ex in enumerate(examples):
            for o, option in enumerate(ex.options or []):
                option_ids = encode_answer(tokenizer, option)
                groups.append(trace_rows(prompts[q], traces[q], marker, option_ids, len(groups)))
                option_groups.append((q, o))
        flat = score_rows(
            model, [row for g in groups for row in g], pad_id(tokenizer), cfg.batch_tokens
        )
        generated = (
            _generate_answers(model, prompts, traces, marker, eos, cfg, key_answers)
            if cfg.generate
            else None
        )
    finally:
        model.train(was_training)

    width = cfg.samples + 1
    grouped = [flat[i * width : (i + 1) * width] for i in range(len(groups))]
    records = []
    for q, ex in enumerate(examples):
        answers_q = generated[q] if generated is not None else None
        record = _question_record(ex, grouped[q], traces[q], tokenizer, answers_q)
        if ex.options:
            per_option = [
                grouped[len(examples) + i] for i, (qq, _) in enumerate(option_groups) if qq == q
            ]
            texts = [g["answer"] for g in record["generations"]] if answers_q is not None else None
            record.update(_multiple_choice(ex, per_option, texts))
        records.append(record)
    summary = _summary(records, traces, grouped[: len(examples)])
    trace_ids = [[t.tokens for t in group] for group in traces]
    return EvalReport(summary, records, {**asdict(cfg), "marker_text": marker.text}, trace_ids)


# --------------------------------------------------------------------------------------------
# Model + adapters for the CLI (eval, score)
# --------------------------------------------------------------------------------------------


@dataclass
class AdapterSource:
    """Where adapters live, the recipe of their run (None without one) and their adapter_config."""

    adapter_dir: Path
    recipe: Recipe | None
    adapter_config: dict[str, Any] = field(default_factory=dict)

    @property
    def marker(self) -> str | None:
        """The marker the adapters were trained with: the recipe's, else adapter_config's."""
        if self.recipe is not None:
            return self.recipe.rollout.marker
        return (self.adapter_config.get("nrt_mlx") or {}).get("marker")

    @property
    def base_model(self) -> str:
        """The base model: the recipe's model.path, else adapter_config's base_model."""
        if self.recipe is not None:
            return self.recipe.model.path
        return str(self.adapter_config.get("base_model") or self.adapter_config.get("model") or "")


def find_adapters(path: str | Path) -> AdapterSource:
    """Resolve RUN_DIR (its latest adapters/), RUN_DIR/checkpoints/step_N or an adapter directory."""
    from nrt_mlx.recipe import load_recipe

    root = Path(path).expanduser()
    if not root.exists():
        raise NrtError(f"--adapter {path}: no such run, checkpoint or adapter directory")
    adapter_dir = root / "adapters" if (root / "recipe.yaml").exists() else root
    if (
        not (adapter_dir / "adapters.safetensors").exists()
        or not (adapter_dir / "adapter_config.json").exists()
    ):
        raise NrtError(
            f"--adapter {path}: no adapters.safetensors + adapter_config.json in {adapter_dir}; "
            f"give a run directory, RUN_DIR/checkpoints/step_NNNNNN or an adapter directory"
        )
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except json.JSONDecodeError as err:
        raise NrtError(f"{adapter_dir / 'adapter_config.json'}: not valid JSON ({err})") from None
    # A run's recipe sits beside adapters/ or two levels above a checkpoint.
    for candidate in (root, adapter_dir.parent, adapter_dir.parent.parent):
        if (candidate / "recipe.yaml").exists():
            return AdapterSource(adapter_dir, load_recipe(candidate / "recipe.yaml"), config)
    return AdapterSource(adapter_dir, None, config)


def load_for_eval(model_path: str | None, source: AdapterSource | None = None) -> Any:
    """Load the base model (``model_path``, else the run's model.path) with the adapters applied.

    Returns the ``LoadedModel``. With adapters, the base loads as their run did (same
    quantization), and every adapter weight must be in the file (``model.apply_adapters``).
    """
    from nrt_mlx.model import apply_adapters, load_model, load_trained_base
    from nrt_mlx.recipe import ModelConfig

    path = model_path or (source.base_model if source else "")
    if not path:
        raise NrtError(
            "missing --model: the base model directory (or an --adapter run whose recipe names it)"
        )
    if source is None:
        loaded = load_model(ModelConfig(path=path))
        loaded.model.eval()
        return loaded
    cfg = source.recipe.model if source.recipe is not None else ModelConfig(quantize="none")
    loaded = load_trained_base(replace(cfg, path=path), source.adapter_config)
    apply_adapters(loaded.model, source.adapter_dir)
    return loaded


def eval_config(recipe: Recipe | None = None, **overrides: Any) -> EvalConfig:
    """EvalConfig with a recipe's rollout settings (marker, think prefix, sampler, think budget),
    then ``overrides``; overrides that are None keep the recipe's (or the default) value."""
    cfg = EvalConfig()
    if recipe is not None:
        r = recipe.rollout
        cfg = EvalConfig(
            max_think_tokens=r.max_think_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            marker=r.marker,
            think_prefix=r.think_prefix,
        )
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def config_from_run(source: AdapterSource | None, **overrides: Any) -> EvalConfig:
    """EvalConfig with the run's rollout settings, then ``overrides`` (None keeps a value).

    Without a recipe the marker comes from adapter_config.json (nrt-mlx writes it there).
    """
    if source is not None and source.recipe is None and source.marker:
        overrides = {
            "marker": source.marker,
            **{k: v for k, v in overrides.items() if v is not None},
        }
    return eval_config(source.recipe if source is not None else None, **overrides)
