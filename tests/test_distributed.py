"""Data-parallel training under mlx.launch: 2 ranks train what 1 process trains.

Every run is a real process started as the README tells users: ``mlx.launch -n 2 --backend ring
-- nrt-mlx train recipe.yaml`` (ring backend over loopback; ``-p`` picks free ports so that
concurrent test sessions do not collide). The invariant: the same adapters as one process with the
same recipe within float32 reduction-order tolerance (the ranks' micro-batches hold other rows,
so the BLAS rounds differently: measured |diff| ~3e-7 on weights of ~0.1; asserted
|diff| <= 1e-5 + 1e-4 |w|), the same metrics.jsonl up to timing fields (rel 1e-5), the same
traces, and bit-identical weights on every rank. LoRA dropout is 0: its masks depend on the
shape of a rank's batch, so with dropout the ranks would train on other masks than one process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import tiny_recipe, write_recipe

from nrt_mlx import blas, distributed, fileio, rollout
from nrt_mlx.recipe import RolloutConfig, load_recipe, save_recipe
from nrt_mlx.vocab import Vocabulary

BIN = Path(sys.executable).parent  # the venv's mlx.launch and nrt-mlx
TIMING = {"sample_tokens_per_s", "sample_seconds", "train_tokens_per_s", "train_seconds"}
TIMING |= {"peak_memory_gb"}


def env(**extra: str) -> dict[str, str]:
    """This environment with the venv first on PATH (as after ``source .venv/bin/activate``)."""
    out = {k: v for k, v in os.environ.items() if k != fileio.FAULT_ENV}
    out["PATH"] = f"{BIN}{os.pathsep}{out.get('PATH', '')}"
    out["NRT_MLX_BLAS"] = blas.use_system_blas() or "0"  # the same BLAS in every process
    return out | extra


def free_ports(n: int) -> int:
    """A port p with p, ..., p + n - 1 free on 127.0.0.1 (mlx.launch --starting-port)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65536 and all(_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def launch(*args: object, ranks: int = 2, **extra: str) -> subprocess.CompletedProcess:
    """``mlx.launch -n RANKS --backend ring -- nrt-mlx ARGS`` (mlx.launch exits 0 whatever the
    ranks do: callers check the run directory and the output)."""
    command = ["mlx.launch", "-n", str(ranks), "--backend", "ring", "-p", str(free_ports(ranks))]
    command += ["--", "nrt-mlx", *map(str, args)]
    return subprocess.run(command, env=env(**extra), capture_output=True, text=True, timeout=120)


def nrt(*args: object, **extra: str) -> subprocess.CompletedProcess:
    """``nrt-mlx ARGS`` as one process."""
    command = ["nrt-mlx", *map(str, args)]
    return subprocess.run(command, env=env(**extra), capture_output=True, text=True, timeout=120)


def recipe_file(tmp: Path, model_dir: Path, name: str, steps: int = 3) -> Path:
    """4 questions a step in 2 mini-batches (2 updates a step: the clipped ratio is active) of
    one-question micro-batches, a checkpoint and a sample line every step."""
    recipe = tiny_recipe(
        tmp,
        model_dir,
        name,
        train={"steps": steps, "questions_per_step": 4, "mini_batches": 2},
        run={"save_every": 1, "keep_checkpoints": 0, "samples_every": 1},
    )
    recipe["train"]["micro_batch_questions"] = 1
    return write_recipe(tmp, recipe, name)


def metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]


def assert_same_run(got: Path, want: Path, from_step: int = 1) -> None:
    """Adapters, metrics and samples of ``got`` match ``want``'s (steps >= ``from_step``)."""
    a = mx.load(str(got / "adapters" / "adapters.safetensors"))
    b = mx.load(str(want / "adapters" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-4, atol=1e-5, err_msg=k)
    old, new = metrics(want), metrics(got)
    assert [m["step"] for m in new] == [m["step"] for m in old]
    for m_new, m_old in zip(new[from_step - 1 :], old[from_step - 1 :]):
        assert m_new.keys() == m_old.keys()
        for key, value in m_old.items():
            assert m_new[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (m_old["step"], key)
    samples = [
        [json.loads(x) for x in (r / "samples.jsonl").read_text().splitlines()] for r in (got, want)
    ]
    for s_new, s_old in zip(*samples):
        assert [t["text"] for t in s_new["traces"]] == [t["text"] for t in s_old["traces"]]
        assert s_new["question"] == s_old["question"]
        for t_new, t_old in zip(s_new["traces"], s_old["traces"]):
            assert t_new["reward"] == pytest.approx(t_old["reward"], rel=1e-4)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The run of one process."""
    tmp = tmp_path_factory.mktemp("single")
    proc = nrt("train", recipe_file(tmp, tiny_model_dir, "run"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"


def test_two_ranks_train_what_one_process_trains(single: Path, tiny_model_dir: Path, tmp_path):
    weights = tmp_path / "weights"
    proc = launch(
        "train", recipe_file(tmp_path, tiny_model_dir, "run"), "--quiet",
        **{distributed.RANK_WEIGHTS_ENV: str(weights)},
    )  # fmt: skip
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step_000003").is_dir(), proc.stderr
    assert_same_run(run, single)
    # The adapters moved, and every rank holds the very same weights.
    start = mx.load(str(single / "checkpoints" / "step_000001" / "adapters.safetensors"))
    rank0 = mx.load(str(weights / "rank0.safetensors"))
    rank1 = mx.load(str(weights / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and len(rank0) > 4
    assert all(mx.array_equal(rank0[k], rank1[k]).item() for k in rank0)
    final = mx.load(str(run / "adapters" / "adapters.safetensors"))
    assert all(mx.array_equal(final[k], rank0[k]).item() for k in final)
    assert any(not mx.allclose(final[k], start[k]).item() for k in final)
    # Rank 0 alone prints: one data report line, one "adapters:" line, one line per step.
    out = proc.stdout.splitlines()
    assert [x for x in out if x.startswith("adapters: ")] == [f"adapters: {run / 'adapters'}"]
    assert len([x for x in out if "examples, skipped" in x]) == 1
    assert len([x for x in proc.stderr.splitlines() if x.startswith("step ")]) == 3
    assert "warning" not in proc.stderr and "Traceback" not in proc.stderr


def test_two_ranks_resume_a_one_process_checkpoint(single: Path, tmp_path: Path):
    run = Path(shutil.copytree(single, tmp_path / "run"))
    for step in (2, 3):  # back to the checkpoint of step 1
        shutil.rmtree(run / "checkpoints" / f"step_{step:06d}")
    proc = launch("train", "--resume", run, "--quiet")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert (run / "checkpoints" / "step_000003").is_dir(), proc.stderr
    assert_same_run(run, single, from_step=2)


def test_a_rank_that_dies_ends_rank_0_with_one_line(tiny_model_dir: Path, tmp_path: Path):
    """Rank 1 is killed (SIGKILL) as step 2 starts; mlx.launch then stops rank 0, which says
    which rank went and how to continue, in one line, and exits at once."""
    recipe = recipe_file(tmp_path, tiny_model_dir, "run", steps=20)
    start = time.monotonic()
    proc = launch("train", recipe, "--quiet", **{fileio.FAULT_ENV: "rank1.step:2"})
    assert time.monotonic() - start < 60
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "rank 1" in errors[0] and f"nrt-mlx train --resume {tmp_path / 'run'}" in errors[0]
    assert "Traceback" not in proc.stderr
    assert len(metrics(tmp_path / "run")) < 20


def test_a_rank_that_hangs_ends_rank_0_after_the_timeout(tiny_model_dir: Path, tmp_path: Path):
    """Without mlx.launch to stop it, rank 0 waits at a collective for a rank that stopped
    answering (SIGSTOP: its connections stay open, as with a host that is cut off) until the
    timeout, then ends with one line naming the rank and the checkpoint to continue from."""
    recipe = recipe_file(tmp_path, tiny_model_dir, "run", steps=50)
    port = free_ports(2)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    ranks = [
        subprocess.Popen(
            ["nrt-mlx", "train", str(recipe), "--quiet"],
            env=env(MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile), NRT_MLX_DIST_TIMEOUT="3"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        assert ranks[0].stderr is not None
        while not (line := ranks[0].stderr.readline()).startswith("step 2 "):
            assert line, "rank 0 ended before step 2"
        os.kill(ranks[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        err = ranks[0].communicate(timeout=60)[1]
        waited = time.monotonic() - stopped
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    assert ranks[0].returncode == distributed.ERROR_EXIT
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.match(r"error: rank 0 waited \d+ s for rank 1 at ", errors[0]), errors[0]
    assert "the last checkpoint is" in errors[0] and "--resume" in errors[0]
    assert 3 <= waited < 20


def test_a_rank_that_cannot_connect_fails_within_the_timeout(tiny_model_dir: Path, tmp_path):
    """A rank whose peer never comes (a host that cannot be reached) stops waiting at the
    timeout with one line, instead of blocking in accept() for ever."""
    port = free_ports(2)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    recipe = recipe_file(tmp_path, tiny_model_dir, "run")
    extra = {"MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile), distributed.TIMEOUT_ENV: "2"}
    start = time.monotonic()
    proc = nrt("train", recipe, "--quiet", **extra)
    assert time.monotonic() - start < 30
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: rank 0: could not connect to the other ranks within 2 s")
    assert len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing was started


# ---- the sampler's per-row keys ---------------------------------------------------------------


def test_a_questions_traces_do_not_depend_on_the_other_rows(tiny_model_dir: Path):
    """With per-row keys a trace depends on the step's key and its row's index alone: sampling a
    subset of the questions (a rank's share) gives those questions the traces of the whole."""
    import mlx_lm

    model, tok = mlx_lm.load(str(tiny_model_dir))
    vocab = Vocabulary.of(tok)
    prompts = [tok.encode(t) for t in ("What is 2+2? Think.", "one two", "why is the sky blue")]
    cfg = RolloutConfig(samples=3, max_think_tokens=10, temperature=1.0, top_p=0.9)
    key = mx.random.key(5)

    def tokens(group):
        return [t.tokens for t in group]

    whole, _ = rollout.sample_traces(model, prompts, cfg, vocab, key, [0, 1, 2])
    assert len({len(t.tokens) for g in whole for t in g}) > 1  # rows ended at different steps
    for part in ([1], [2, 0]):
        got, _ = rollout.sample_traces(model, [prompts[i] for i in part], cfg, vocab, key, part)
        assert [tokens(g) for g in got] == [tokens(whole[i]) for i in part]
    # One key per decode step for the whole batch (sample_keys: batch) draws otherwise.
    batch, _ = rollout.sample_traces(model, [prompts[1]], cfg, vocab, key)
    assert tokens(batch[0]) != tokens(whole[1])


def test_runs_saved_before_per_row_keys_resume_with_batch_keys(tmp_path: Path):
    """recipe.yaml of a run saved before rollout.sample_keys existed keeps its sampler."""
    recipe = load_recipe(write_recipe(tmp_path, {"model": {"path": "m"}}, "new"))
    assert recipe.rollout.sample_keys == "row"
    saved = tmp_path / "saved.yaml"
    save_recipe(recipe, saved)
    lines = [x for x in saved.read_text().splitlines() if "sample_keys" not in x]
    saved.write_text("\n".join(lines) + "\n")
    assert load_recipe(saved, saved_run=True).rollout.sample_keys == "batch"
