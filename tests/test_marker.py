"""The answer marker: rows started from EOS's and trained, saved, restored and fused; text markers
found however they are tokenised; special tokens ending traces; untrained rows refused."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import yaml
from helpers import tiny_recipe
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from nrt_mlx import marker
from nrt_mlx.cli import app
from nrt_mlx.errors import NrtError
from nrt_mlx.evaluate import load_for_eval
from nrt_mlx.recipe import RolloutConfig, load_recipe
from nrt_mlx.rollout import MarkerWatch, sample_traces
from nrt_mlx.rundir import find_adapters
from nrt_mlx.vocab import AnswerMarker, Vocabulary

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def logits_of(model, tok, text: str = PROMPT) -> np.ndarray:
    return np.array(model(mx.array(tok.encode(text))[None])[0].astype(mx.float32))


def test_auto_marker_starts_as_eos_on_an_untied_model(tiny_model_dir):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    vocab = Vocabulary.of(tok)  # auto: <|reserved_0|>
    m, eos = vocab.marker.ids[0], vocab.eos_id
    before = logits_of(model, tok)
    assert not np.allclose(before[:, m], before[:, eos], atol=1e-3)  # the token's own rows differ
    model.freeze()  # as add_adapters leaves the base
    assert marker.setup(model, vocab, "eos") is True
    after = logits_of(model, tok)
    np.testing.assert_allclose(after[:, m], after[:, eos], atol=1e-5)  # every position
    others = np.arange(after.shape[1]) != m
    np.testing.assert_allclose(after[:, others], before[:, others], atol=1e-6)
    assert set(marker.rows(model)) == {"model.embed_tokens.marker_row", "lm_head.marker_row"}
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable == set(marker.rows(model))  # the base matrices stay frozen


@pytest.mark.real
def test_auto_marker_starts_as_eos_on_smollm2_with_tied_embeddings():
    from nrt_mlx.export.default_model import default_model_dir

    model, tok = mlx_lm.load(str(default_model_dir()))
    vocab = Vocabulary.of(tok)
    m, eos = vocab.marker.ids[0], vocab.eos_id
    marker.setup(model, vocab, "eos")
    assert set(marker.rows(model)) == {"model.embed_tokens.marker_row"}  # one shared row
    out = logits_of(model, tok)
    np.testing.assert_allclose(out[:, m], out[:, eos], atol=1e-4)


def test_rows_round_trip_and_bake(tiny_model_dir, tmp_path):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    vocab = Vocabulary.of(tok)
    marker.setup(model, vocab, "eos")
    rng = np.random.default_rng(0)
    trained = [
        (k, v + mx.array(rng.normal(0, 0.5, v.shape), dtype=v.dtype))
        for k, v in marker.rows(model).items()
    ]
    model.load_weights(trained, strict=False)
    want = logits_of(model, tok)
    marker.save_rows(model, tmp_path)
    fresh, _ = mlx_lm.load(str(tiny_model_dir))
    assert marker.load_rows(fresh, tmp_path) is True
    np.testing.assert_allclose(logits_of(fresh, tok), want, atol=1e-5)
    marker.bake(fresh)  # into the base matrices: plain modules again, same logits
    assert not marker.rows(fresh)
    np.testing.assert_allclose(logits_of(fresh, tok), want, atol=1e-5)
    assert marker.load_rows(fresh, tmp_path / "nothing") is False


def test_untrained_special_token_is_refused_unless_started_from_eos(tiny_model_dir, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for f in tiny_model_dir.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    weights = mx.load(str(base / "model.safetensors"))
    weights["model.embed_tokens.weight"][4] = 0.0  # <|reserved_1|> as in Llama-3: never trained
    mx.save_safetensors(str(base / "model.safetensors"), weights, metadata={"format": "mlx"})
    rollout = {"max_think_tokens": 6, "marker": "<|reserved_1|>", "marker_rows": "keep"}
    recipe = tiny_recipe(tmp_path, base, rollout=rollout, train={"steps": 1})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run(
        [sys.executable, "-m", "nrt_mlx.cli", "train", str(path), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "looks untrained" in proc.stderr and "marker_rows: eos" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    recipe["rollout"]["marker_rows"] = "eos"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["train", str(path), "--quiet"])
    assert result.exit_code == 0, result.output


def test_training_moves_the_rows_and_every_loader_restores_them(tiny_model_dir, tmp_path):
    recipe = tiny_recipe(
        tmp_path,
        tiny_model_dir,
        rollout={"max_think_tokens": 6},
        optimizer={"learning_rate": 1e-2},
        train={"steps": 2},
        run={"save_every": 1},
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert CliRunner().invoke(app, ["train", str(path), "--quiet"]).exit_code == 0
    run = tmp_path / "run"
    for d in (run / "adapters", run / "checkpoints" / "step_000001"):
        assert (d / marker.MARKER_FILE).exists()
    info = json.loads((run / "adapters" / "adapter_config.json").read_text())["nrt_mlx"]
    assert info["marker_rows"] == marker.MARKER_FILE and info["marker_id"] == 3
    assert set(mx.load(str(run / "adapters" / "adapters.safetensors"))).isdisjoint(
        mx.load(str(run / "adapters" / marker.MARKER_FILE))
    )  # adapters.safetensors keeps exactly mlx-lm's LoRA keys
    # The format term moved the rows away from EOS's.
    model, tok = mlx_lm.load(str(tiny_model_dir))
    eos_row = np.array(model.model.embed_tokens.weight[2])
    saved = mx.load(str(run / "adapters" / marker.MARKER_FILE))
    assert not np.allclose(np.array(saved["model.embed_tokens.marker_row"]), eos_row, atol=1e-4)
    # eval/score's loader and the fused model give the same logits, marker column included.
    loaded = load_for_eval(None, find_adapters(run))
    want = logits_of(loaded.model, tok)
    assert CliRunner().invoke(app, ["fuse", str(run), str(tmp_path / "fused")]).exit_code == 0
    fused, _ = mlx_lm.load(str(tmp_path / "fused"))
    np.testing.assert_allclose(logits_of(fused, tok), want, atol=1e-4)
    # A resumed run starts from the saved rows, not from EOS's again.
    again = load_recipe(run / "recipe.yaml", saved_run=True)
    assert again.rollout.marker_rows == "eos"


def _fused_with_marker_over_eos(model_dir: Path, out: Path) -> tuple[Path, int]:
    """A fused model whose marker rows are EOS's, nudged so the marker wins where EOS would."""
    from nrt_mlx.export.fuse import write_model_dir
    from nrt_mlx.model import load_model
    from nrt_mlx.recipe import ModelConfig

    loaded = load_model(ModelConfig(path=str(model_dir), quantize="none"))
    vocab = Vocabulary.of(loaded.tokenizer)
    marker.setup(loaded.model, vocab, "eos")
    loaded.model.load_weights(
        [(k, v * 1.05) for k, v in marker.rows(loaded.model).items()], strict=False
    )
    marker.bake(loaded.model)
    out.mkdir()
    write_model_dir(out, loaded, loaded.config)
    return out, vocab.marker.ids[0]


@pytest.mark.real
def test_mlx_lm_generate_on_a_fused_model_writes_the_marker_then_an_answer(tmp_path):
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from nrt_mlx.export.default_model import default_model_dir

    fused, marker_id = _fused_with_marker_over_eos(default_model_dir(), tmp_path / "fused")
    model, tok = mlx_lm.load(str(fused))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    ids = [
        r.token
        for r in stream_generate(model, tok, prompt, max_tokens=60, sampler=make_sampler(temp=0.0))
    ]
    assert marker_id in ids, tok.decode(ids)
    after = ids[ids.index(marker_id) + 1 :]
    assert len(after) > 0  # generation goes on after the marker: the answer
    # and the command-line tool a user runs works on the same directory
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "generate",
            "--model",
            str(fused),
            "--prompt",
            "What is 2+2?",
            "--max-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


def test_text_marker_is_found_however_it_is_tokenised(tiny_model_dir):
    _, tok = mlx_lm.load(str(tiny_model_dir))
    base = Vocabulary.of(tok, "\nAnswer:")
    assert not base.marker.is_special
    watch = MarkerWatch(base)
    # Written one character at a time, after text that ends inside the marker's first token.
    pieces = [tok.encode("the city is Paris")] + [tok.encode(c) for c in "\nAnswer:"]
    seq = [i for p in pieces for i in p]
    assert seq[-len(base.marker.ids) :] != base.marker.ids  # not the canonical ids
    assert watch.written(seq) and watch.think(seq, 100) == tok.encode("the city is Paris")
    assert not watch.written(seq[:-1]) and watch.begun(seq[:-1])
    assert watch.think(seq, 2) is None  # begun after a budget of 2 tokens: not emitted


def test_special_tokens_end_traces_when_asked(tiny_model_dir):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    vocab = Vocabulary.of(tok)
    assert vocab.special_ids == {0, 1, 2, 4}  # the marker <|reserved_0|> excluded
    prompt = tok.encode("why is the sky blue")
    first = int(mx.argmax(model(mx.array(prompt)[None])[0, -1]))
    as_special = replace(vocab, special_ids=frozenset({first}))
    cold = RolloutConfig(samples=2, max_think_tokens=6, temperature=1e-4)
    [stopped], stats = sample_traces(model, [prompt], cold, as_special, mx.random.key(0))
    assert all(t.tokens == [] and not t.emitted_marker for t in stopped) and stats.tokens == 2
    free = replace(cold, stop_at_special=False)
    [[t, _]], _ = sample_traces(model, [prompt], free, as_special, mx.random.key(0))
    assert t.tokens[0] == first and len(t.tokens) > 1


def test_runs_saved_before_these_keys_keep_their_behaviour(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"rollout": {"marker": "auto"}}))
    assert load_recipe(path).rollout.marker_rows == "eos"  # a new recipe: the released method
    old = load_recipe(path, saved_run=True)  # a run's recipe.yaml written by 0.1
    assert (old.rollout.marker_rows, old.rollout.stop_at_special) == ("keep", False)
    assert AnswerMarker("x", [1], True).is_special


def test_rows_of_a_quantized_model_start_as_eos_and_bake_into_its_packed_rows(tiny_model_dir):
    import mlx.nn as nn

    model, tok = mlx_lm.load(str(tiny_model_dir))
    nn.quantize(model, group_size=32, bits=4)  # embedding and output layer become quantized
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    model.freeze()
    vocab = Vocabulary.of(tok)
    m, eos = vocab.marker.ids[0], vocab.eos_id
    marker.setup(model, vocab, "eos")
    out = logits_of(model, tok)
    np.testing.assert_allclose(out[:, m], out[:, eos], atol=1e-5)  # the dequantized EOS rows
    trained = [(k, v * 1.3) for k, v in marker.rows(model).items()]
    model.load_weights(trained, strict=False)
    want = dict(trained)
    marker.bake(model)
    embed, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embed, nn.QuantizedEmbedding) and isinstance(head, nn.QuantizedLinear)
    for module, key in ((embed, "model.embed_tokens.marker_row"), (head, "lm_head.marker_row")):
        row = mx.dequantize(
            module.weight[m : m + 1], module.scales[m : m + 1], module.biases[m : m + 1], 32, 4
        )[0]
        step = float(mx.abs(want[key]).max()) / 7  # one 4-bit quantization step, at most
        np.testing.assert_allclose(np.array(row), np.array(want[key]), atol=step)
    # the other rows are untouched
    other = mx.dequantize(
        embed.weight[eos : eos + 1], embed.scales[eos : eos + 1], embed.biases[eos : eos + 1], 32, 4
    )
    np.testing.assert_allclose(
        np.array(other[0]) * 1.3, np.array(want["model.embed_tokens.marker_row"]), atol=1e-5
    )


def test_a_marker_spelled_in_byte_tokens_is_found(tiny_model_dir):
    _, tok = mlx_lm.load(str(tiny_model_dir))
    vocab = Vocabulary.of(tok, "\n答案:\n")  # CJK: several byte-level tokens per character
    assert len(vocab.marker.ids) > len(vocab.marker.text) + 2
    seq = tok.encode("the city is Paris") + vocab.marker.ids
    watch = MarkerWatch(vocab)
    assert watch.written(seq) and watch.think(seq, 100) == tok.encode("the city is Paris")


def test_a_trace_is_never_longer_than_the_think_budget(tiny_model_dir):
    """A row let past the budget by a text marker begun there, then ended by a stop token, is cut
    to the budget like any other row that did not write the marker."""
    model, tok = mlx_lm.load(str(tiny_model_dir))
    prompt = tok.encode("why is the sky blue")
    base = replace(Vocabulary.of(tok), eos_ids=frozenset({-1}), special_ids=frozenset())
    never = replace(base, marker=AnswerMarker("\x00", [1, 1], False))
    free = RolloutConfig(samples=1, max_think_tokens=8, temperature=1e-4)
    [[run]], _ = sample_traces(model, [prompt], free, never, mx.random.key(0))
    g = run.tokens  # what the model writes, nearly greedily
    # A marker whose text the row begins at the budget (4) and goes on writing for one more token,
    # then a stop token: the row runs two tokens past the budget before it ends.
    text = tok.decode(g[3:5]) + "\x00"
    vocab = replace(base, marker=AnswerMarker(text, [1, 1], False), eos_ids=frozenset({g[5]}))
    cold = replace(free, max_think_tokens=4)
    [[trace]], stats = sample_traces(model, [prompt], cold, vocab, mx.random.key(0))
    assert stats.tokens == 6 and not trace.emitted_marker  # it did run past the budget
    assert trace.tokens == g[:4]


def test_bases_quantized_in_other_modes_are_refused_with_a_route(tiny_model_dir):
    """Microscaling modes (mxfp4, nvfp4: no biases) are not copied row by row yet: a one-line
    refusal naming the way out. The mode is set on an affine-quantized model, so the check runs
    whatever modes this mlx offers."""
    import mlx.nn as nn

    model, tok = mlx_lm.load(str(tiny_model_dir))
    nn.quantize(model, group_size=32, bits=4)
    model.model.embed_tokens.mode = "mxfp4"
    model.freeze()
    with pytest.raises(NrtError, match=r"quantized in mode 'mxfp4'.*marker_rows: keep"):
        marker.setup(model, Vocabulary.of(tok), "eos")


@pytest.mark.parametrize("kind", ["tied", "untied", "untied with bias"])
def test_marker_column_value_and_gradients_are_those_of_the_replaced_row(kind):
    """The output layer equals x @ W'.T, W' = the base weight with the marker's row replaced by
    the trainable row, in value and in the gradients for x and the row."""
    import mlx.nn as nn

    vocab_size, dim, m = 40, 16, 7
    mx.random.seed(3)
    if kind == "tied":
        base = nn.Embedding(vocab_size, dim)
        layer, call = marker.MarkerEmbedding(base, m, mx.random.normal((dim,))), "as_linear"
    else:
        base = nn.Linear(dim, vocab_size, bias=kind.endswith("bias"))
        layer, call = marker.MarkerHead(base, m, mx.random.normal((dim,))), "__call__"
    base.freeze()
    x = mx.random.normal((2, 3, dim))
    cot = mx.random.normal((2, 3, vocab_size))

    def ours(x, row):
        layer.marker_row = row
        return getattr(layer, call)(x)

    def replaced(x, row):
        weight = mx.concatenate([base.weight[:m], row[None], base.weight[m + 1 :]])
        out = x @ weight.T
        if "bias" in base:
            out = out + mx.where(mx.arange(vocab_size) == m, 0.0, base.bias)
        return out

    row = layer.marker_row
    (got,), got_grads = mx.vjp(ours, [x, row], [cot])
    (want,), want_grads = mx.vjp(replaced, [x, row], [cot])
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-5, atol=1e-5)
