"""``nrt-mlx fuse``: fused logits equal base + adapters, the output runs under mlx-lm, the card.

Runs come from the ``tiny_run_factory`` fixture (tests/conftest.py): a tiny Llama with LoRA/DoRA
adapters whose weights clearly move the logits, saved exactly as the trainer saves them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from filetree import MANIFEST, manifest_files, modes, snapshot, umask
from helpers import run_cli

from nrt_mlx.errors import NrtError
from nrt_mlx.export.fuse import fuse_run
from nrt_mlx.model import add_adapters, load_adapter_weights, load_model
from nrt_mlx.recipe import ModelConfig, load_recipe

PROMPT = "what is the capital of France and why is the river cold"


# ---- helpers -------------------------------------------------------------------------------------


def prompt_ids(model_dir: Path) -> mx.array:
    import mlx_lm

    _, tokenizer = mlx_lm.load(str(model_dir))
    return mx.array([tokenizer.encode(PROMPT)])


def run_logits(run_dir: Path, ids: mx.array, adapter_dir: Path | None) -> mx.array:
    """Logits of the base as the run loaded it, with the adapters of ``adapter_dir`` (or none)."""
    recipe = load_recipe(run_dir / "recipe.yaml")
    loaded = load_model(recipe.model)
    if adapter_dir is not None:
        add_adapters(loaded.model, recipe.lora, recipe.train.seed)
        load_adapter_weights(loaded.model, adapter_dir)
    return loaded.model(ids)


def fused_logits(out_dir: Path, ids: mx.array) -> mx.array:
    """Logits of the fused directory loaded by plain mlx-lm (no nrt-mlx involved)."""
    import mlx_lm

    model, _ = mlx_lm.load(str(out_dir))
    return model(ids)


def max_diff(a: mx.array, b: mx.array) -> float:
    return mx.abs(a - b).max().item()


def mean_diff(a: mx.array, b: mx.array) -> float:
    return mx.abs(a - b).mean().item()


def saved_weights(out_dir: Path) -> dict[str, mx.array]:
    return mx.load(str(out_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def dense_fused(tiny_run_factory, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run dir, fused dir) for the dense LoRA run, fused once for this module."""
    run = tiny_run_factory()
    return run, fuse_run(run, tmp_path_factory.mktemp("fused") / "tiny-nrt")


# ---- logits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora_type", ["lora", "dora"])
def test_dense_fuse_equals_base_plus_adapters(
    tiny_run_factory, tmp_path: Path, lora_type: str
) -> None:
    run = tiny_run_factory(lora_type=lora_type)
    out = fuse_run(run, tmp_path / "out")
    ids = prompt_ids(out)
    want = run_logits(run, ids, run / "adapters")
    effect = max_diff(want, run_logits(run, ids, None))
    assert effect > 0.3, (
        "the fixture's adapters must move the logits for this test to mean anything"
    )
    assert max_diff(fused_logits(out, ids), want) < 1e-4

    weights = saved_weights(out)
    assert not [k for k in weights if "lora" in k or k.endswith(".m")], (
        "adapter tensors left in the model"
    )
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["model_type"] == "llama"
    base = Path(load_recipe(run / "recipe.yaml").model.path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert not list(tmp_path.glob(".out.*")), "temporary directory left behind"


def _loads_quantized_intact(base: str) -> bool:
    loaded = load_model(ModelConfig(path=base, quantize=4, group_size=32))
    return loaded.model.layers[0].self_attn.q_proj.weight.dtype == mx.uint32


def test_4bit_base_stays_quantized_and_matches_to_quantization_tolerance(
    tiny_run_factory, tmp_path: Path
) -> None:
    run = tiny_run_factory(quantize=4)
    base = load_recipe(run / "recipe.yaml").model.path
    assert _loads_quantized_intact(base), (
        "nrt_mlx.model.load_model casts the packed uint32 weights of a quantized model to float32 "
        "on the CPU backend (set_dtype with predicate=lambda k: True); cast floating params only"
    )
    out = fuse_run(run, tmp_path / "q4")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    weights = saved_weights(out)
    assert weights["model.layers.3.self_attn.q_proj.weight"].dtype == mx.uint32  # an adapted layer

    ids = prompt_ids(out)
    want = run_logits(run, ids, run / "adapters")
    got = fused_logits(out, ids)
    base_q = run_logits(run, ids, None)
    dense = load_model(ModelConfig(path=base, quantize="none")).model(ids)
    # Re-quantizing W + BA costs about what quantizing W once cost, far less than the adapters' effect.
    quantization_noise = mean_diff(base_q, dense)
    assert mean_diff(got, want) <= quantization_noise
    assert mean_diff(got, want) < 0.3 * mean_diff(want, base_q)

    dense_out = fuse_run(run, tmp_path / "q4-dequantized", dequantize=True)
    assert "quantization" not in json.loads((dense_out / "config.json").read_text())
    assert all(w.dtype == mx.float32 for w in saved_weights(dense_out).values())
    assert max_diff(fused_logits(dense_out, ids), want) < 1e-4


def test_mlx_lm_generate_runs_on_fused_dir(dense_fused) -> None:
    _, out = dense_fused
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "mlx_lm",
        "generate",
        "--model",
        str(out),
        "--prompt",
        "hi",
        "--max-tokens",
        "5",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Generation:" in proc.stdout


# ---- model card -----------------------------------------------------------------------------------


def _code_block(text: str, lang: str) -> str:
    match = re.search(rf"```{lang}\n(.*?)```", text, re.S)
    assert match, f"no {lang} block in the card"
    return match.group(1)


def test_model_card_metadata_and_summary(dense_fused) -> None:
    from huggingface_hub import ModelCard

    run, out = dense_fused
    text = (out / "README.md").read_text()
    card = ModelCard(text, ignore_metadata_errors=False)
    data = card.data.to_dict()
    assert data["library_name"] == "mlx"
    assert {"mlx", "nrt", "reasoning"} <= set(data["tags"])
    assert data["license"] == "apache-2.0" and data["language"] == ["en"]  # from the base's README
    assert "base_model" not in data  # the base is a local path, not a Hub repo
    assert data["pipeline_tag"] == "text-generation"

    body = card.text
    assert "aggregator `weighted_sum_log_prob`" in body
    assert "| Steps | 20 of 20 |" in body
    assert "### Final training metrics (step 20)" in body and "| loss | 0.1 |" in body
    assert "| trace_tokens_mean | 60 |" in body
    assert "### Evaluation (step 20" in body and "| eval_answer_nll | 2.3 |" in body
    assert "`<|reserved_0|>`" in body  # the answer marker, so users can split the output
    recipe = load_recipe(run / "recipe.yaml").to_dict()
    shown = yaml.safe_load(_code_block(body, "yaml"))
    assert shown.keys() == recipe.keys()
    assert shown["lora"] == recipe["lora"] and shown["objective"] == recipe["objective"]


def test_card_usage_snippet_runs(dense_fused, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    _, out = dense_fused
    code = _code_block((out / "README.md").read_text(), "python")
    assert 'load("tiny-nrt")' in code
    code = re.sub(r"max_tokens=\d+", "max_tokens=4", code)  # the real budget is 768 tokens
    monkeypatch.chdir(out.parent)
    exec(compile(code, "README.md", "exec"), {})


def test_card_names_hub_base_models_and_datasets_only(tmp_path: Path, dense_fused) -> None:
    from huggingface_hub import ModelCard

    from nrt_mlx.export.card import CardInputs, hub_repo_id, render_model_card

    run, _ = dense_fused
    snapshot = tmp_path / "hub" / "models--acme--tiny-base" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    data_file = tmp_path / "hub" / "datasets--acme--qa" / "snapshots" / "0123abc" / "train.jsonl"
    data_file.parent.mkdir(parents=True)
    data_file.write_text("{}\n")
    assert (
        hub_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct", "models")
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert hub_repo_id(str(snapshot), "models") == "acme/tiny-base"
    assert hub_repo_id(str(tmp_path), "models") is None
    assert hub_repo_id("./models/tiny", "models") is None

    recipe = load_recipe(run / "recipe.yaml")
    recipe.model.path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    recipe.data.train = str(data_file)
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n")
    inputs = CardInputs(
        recipe,
        {"fine_tune_type": "dora"},
        [],
        None,
        snapshot,
        {"bits": 4, "group_size": 64},
        "me/x",
    )
    data = ModelCard(render_model_card(inputs)).data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["license"] == "mit" and data["datasets"] == ["acme/qa"] and "dora" in data["tags"]


# ---- checkpoints, refusals, GGUF ------------------------------------------------------------------


def test_checkpoint_option_picks_that_checkpoint(
    tiny_run_factory, tmp_path: Path, monkeypatch, capsys
) -> None:
    run = tiny_run_factory()
    out = tmp_path / "step10"
    code, stdout, err = run_cli(monkeypatch, capsys, "fuse", run, out, "--checkpoint", 10)
    assert code == 0, err
    assert f"fused model written to {out}" in stdout
    ids = prompt_ids(out)
    at_10 = run_logits(run, ids, run / "checkpoints" / "step_000010")
    latest = run_logits(run, ids, run / "adapters")
    assert max_diff(at_10, latest) > 0.3
    assert max_diff(fused_logits(out, ids), at_10) < 1e-4
    body = (out / "README.md").read_text()
    assert "| Steps | 10 of 20 |" in body and "### Final training metrics (step 10)" in body

    code, stdout, err = run_cli(
        monkeypatch, capsys, "fuse", run, tmp_path / "step7", "--checkpoint", 7
    )
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --checkpoint 7")
    assert "10, 20" in err and not (tmp_path / "step7").exists()


def test_fuse_refuses_to_replace_other_directories(tiny_run_factory, tmp_path: Path) -> None:
    run = tiny_run_factory()
    with pytest.raises(NrtError, match="would replace"):
        fuse_run(run, run)
    with pytest.raises(NrtError, match="would replace"):
        fuse_run(run, run.parent)
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "todo.txt").write_text("keep me")
    with pytest.raises(NrtError) as err:
        fuse_run(run, unrelated)
    assert str(err.value) == (
        f"{unrelated}: exists and is not a model fused by nrt-mlx (it holds todo.txt); "
        "choose a new directory or empty it"
    )
    assert (unrelated / "todo.txt").read_text() == "keep me"
    with pytest.raises(NrtError, match="no recipe.yaml"):
        fuse_run(tmp_path, tmp_path / "x")


def test_fuse_keeps_user_files_beside_an_earlier_fuse(
    tiny_run_factory, tmp_path: Path, monkeypatch, capsys
) -> None:
    run = tiny_run_factory()
    out = fuse_run(run, tmp_path / "fused")
    (out / "notes.md").write_text("my notes on this model")
    before = snapshot(out)
    code, stdout, err = run_cli(monkeypatch, capsys, "fuse", run, out)
    assert code == 2 and stdout == ""
    assert err == (
        f"error: {out}: holds files that are not part of a model fused by nrt-mlx (notes.md); "
        "move them elsewhere or choose another output directory\n"
    )
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"]  # no temporary left
    # Moved out, the earlier fuse is replaced by the new one (a different checkpoint here).
    (out / "notes.md").unlink()
    code, _, err = run_cli(monkeypatch, capsys, "fuse", run, out, "--checkpoint", 10)
    assert code == 0, err
    assert "| Steps | 10 of 20 |" in (out / "README.md").read_text()


def test_fused_model_lists_its_files_in_a_manifest(dense_fused) -> None:
    _, out = dense_fused
    listed = manifest_files(out)
    assert set(listed) == {p.name for p in out.iterdir()} - {MANIFEST}
    assert listed["model.safetensors"] == "weights"
    assert listed["config.json"] == "config"
    assert listed["README.md"] == "model-card"
    assert listed["tokenizer.json"] == listed["tokenizer_config.json"] == "tokenizer"
    assert json.loads((out / MANIFEST).read_text())["command"] == "fuse"


def test_a_fuse_of_nrt_mlx_0_1_is_replaced_when_alone(tiny_run_factory, tmp_path: Path) -> None:
    """0.1 wrote no manifest: its model card and file names identify it."""
    run = tiny_run_factory()
    out = fuse_run(run, tmp_path / "old")
    (out / MANIFEST).unlink()
    for extra in ("train.py", "notes.txt"):
        (out / extra).write_text("mine")
        before = snapshot(out)
        with pytest.raises(NrtError) as err:
            fuse_run(run, out)
        assert str(err.value) == (
            f"{out}: holds files that are not part of a model fused by nrt-mlx ({extra}); "
            "move them elsewhere or choose another output directory"
        )
        assert snapshot(out) == before
        (out / extra).unlink()
    assert fuse_run(run, out) == out and (out / MANIFEST).is_file()


def test_fuse_does_not_replace_a_converted_model(tiny_run_factory, tmp_path: Path) -> None:
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "config.json").write_text("{}")
    files = [{"path": "config.json", "kind": "config"}]
    (converted / MANIFEST).write_text(
        json.dumps({"written_by": "nrt-mlx", "command": "convert", "files": files})
    )
    before = snapshot(converted)
    with pytest.raises(NrtError) as err:
        fuse_run(tiny_run_factory(), converted)
    assert str(err.value) == (
        f"{converted}: holds the output of 'nrt-mlx convert', which 'nrt-mlx fuse' does not "
        "replace; choose another output directory"
    )
    assert snapshot(converted) == before


def test_fused_directory_follows_the_umask(tiny_run_factory, tmp_path: Path) -> None:
    run = tiny_run_factory()
    with umask(0o002):
        out = fuse_run(run, tmp_path / "group")
    got = modes(out)
    assert got.pop(".") == 0o775
    assert "README.md" in got and set(got.values()) == {0o664}
    with umask(0o077):
        fuse_run(run, out)  # replacing an earlier fuse
    got = modes(out)
    assert got.pop(".") == 0o700 and set(got.values()) == {0o600}


def test_fuse_rejects_incomplete_adapters(tiny_run_factory, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run_factory(), run)
    weights = mx.load(str(run / "adapters" / "adapters.safetensors"))
    dropped = sorted(weights)[0]
    del weights[dropped]
    mx.save_safetensors(str(run / "adapters" / "adapters.safetensors"), weights)
    with pytest.raises(NrtError, match="adapter weights are missing") as err:
        fuse_run(run, tmp_path / "out")
    assert dropped in str(err.value) and not (tmp_path / "out").exists()


def test_gguf_export_of_dense_fused_llama(
    tiny_run_factory, tmp_path: Path, monkeypatch, capsys
) -> None:
    run = tiny_run_factory()
    out = tmp_path / "gguf"
    code, _, err = run_cli(monkeypatch, capsys, "fuse", run, out, "--dequantize", "--export-gguf")
    assert code == 0, err
    gguf = out / "model.gguf"
    assert gguf.read_bytes()[:4] == b"GGUF"
    tensors, meta = mx.load(str(gguf), return_metadata=True)
    embed = saved_weights(out)["model.embed_tokens.weight"]
    assert tensors["token_embd.weight"].shape == embed.shape
    assert mx.array_equal(tensors["token_embd.weight"], embed).item()
    assert str(meta["general.architecture"]) == "llama"
    assert "`model.gguf`" in (out / "README.md").read_text()


def test_gguf_export_of_quantized_base_needs_dequantize(
    tiny_run_factory, tmp_path: Path, monkeypatch, capsys
) -> None:
    code, _, err = run_cli(
        monkeypatch, capsys, "fuse", tiny_run_factory(quantize=4), tmp_path / "g", "--export-gguf"
    )
    assert code == 2 and err.count("\n") == 1 and "add --dequantize" in err
    assert not (tmp_path / "g").exists()


def test_finder_files_do_not_block_replacing_an_earlier_fuse(
    tiny_run_factory, tmp_path: Path
) -> None:
    run = tiny_run_factory()
    out = fuse_run(run, tmp_path / "fused")
    (out / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # Finder opened the folder
    (out / "._config.json").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble on an exFAT drive
    assert fuse_run(run, out, checkpoint=10) == out  # replaced, not refused
    (out / "notes.txt").write_text("mine")
    with pytest.raises(NrtError, match=r"notes\.txt"):
        fuse_run(run, out)  # a real user file still stops it


def test_unwritable_outputs_are_one_line_and_leave_nothing(
    tiny_run_factory, tmp_path: Path, monkeypatch
):
    run = tiny_run_factory()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NrtError, match=r"afile/out: could not write the output"):
        fuse_run(run, tmp_path / "afile" / "out")

    import mlx_lm.utils

    def full_disk(*args, **kwargs):
        raise RuntimeError("[write] Unable to write 4096 bytes to file.")

    monkeypatch.setattr(mlx_lm.utils, "save_model", full_disk)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(NrtError, match=r"out2: could not write the output \("):
        fuse_run(run, tmp_path / "out2")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporary folder left
