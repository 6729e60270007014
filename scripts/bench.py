"""nrt-mlx's training step against its peer (mlx-lm-lora's GRPO trainer), measured side by side.

    .venv/bin/python scripts/bench.py                 # issue 11's workload: 2 questions x K=4 x think 32
    .venv/bin/python scripts/bench.py --long          # closer to real use: K=8, think 256
    .venv/bin/python scripts/bench.py --quick         # 1 repeat of 3 steps: checks that it all runs
    options: --steps N --repeats N --skip-peer --model DIR --peer-venv DIR

Prints, from one run, as markdown tables:
(a) seconds per training step of ``nrt-mlx train`` (the default answer marker, whose trainable
    embedding row makes the backward pass go through every layer, and ``marker_rows: keep``, frozen
    rows: the backward stops at the LoRA layers) against the peer: ``train_grpo`` of mlx-lm-lora
    with beta 0 and one reward, log p(answer | prompt + completion + marker) scored by its own frozen
    copy of the model (scripts/bench_peer.py). Same model (SmolLM2-135M-Instruct fp32), questions
    (recipes/data/train.jsonl), prompt token ids (nrt-mlx's chat template), think budget, K,
    temperature, top-p, LoRA layers/rank/scale. Median over steps 2..N of every run; the runs
    alternate (nrt, nrt keep, peer; then reversed), as these shared machines are noisy;
(b) rollout tokens/s of nrt-mlx's ``sample_traces`` against ``mlx_lm.batch_generate`` on the same
    prompts x K (``rollout_throughput`` of scripts/bench_rollout.py);
(c) the update's tokens/s against this CPU's fp32 GEMM rate (numpy, [M, hidden] x [hidden,
    intermediate] with M the update's tokens per step) converted to tokens/s with the model's
    FLOPs per token (formula printed);
(d) peak memory: the largest resident set of each training process (ru_maxrss) and mlx's peak.

Every contender is a subprocess: ``.venv/bin/nrt-mlx train`` on a recipe written to a temporary
folder (what users run), and the peer in a throwaway venv (default ~/.cache/nrt-mlx/bench-peer-venv,
created with mlx-lm-lora on first use and reused). All of them get the same BLAS: the system
OpenBLAS nrt-mlx would load (nrt_mlx.blas) goes into LD_PRELOAD for every child. Speed is shown by
this script, never by a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
NRT_MLX = REPO / ".venv" / "bin" / "nrt-mlx"
DATA = REPO / "recipes" / "data" / "train.jsonl"
CACHE = Path(os.environ.get("NRT_MLX_CACHE", Path.home() / ".cache" / "nrt-mlx")).expanduser()
PEER_PACKAGES = ["mlx-lm-lora", "mlx[cpu]" if sys.platform == "linux" else "mlx"]
STEP_LINE = re.compile(r"^step (\d+) \|")  # nrt-mlx's --quiet log line, printed after each step


@dataclass
class Workload:
    name: str
    questions: int  # per step
    samples: int  # K
    think: int  # think budget in tokens
    steps: int
    repeats: int
    lora_layers: int = 8
    lora_rank: int = 8
    lora_scale: float = 20.0
    temperature: float = 1.0
    top_p: float = 1.0
    learning_rate: float = 1.0e-4
    seed: int = 0


@dataclass
class Runs:
    """One contender's steps 2..N of every run, and each run's peak memory."""

    label: str
    steps: list[dict[str, float]] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    mlx_peak_gb: list[float] = field(default_factory=list)

    def median(self, key: str) -> float:
        values = [s[key] for s in self.steps if s.get(key) is not None]
        return statistics.median(values) if values else float("nan")


# ---- children -----------------------------------------------------------------------------------


def child_env(blas: str | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if blas:
        env["LD_PRELOAD"] = blas
    return env


def run_child(cmd: list[str], env: dict[str, str]) -> tuple[list[tuple[float, str]], float]:
    """Run ``cmd``; its output lines (stdout and stderr) with their arrival times, and its peak
    resident set in MB. A failure ends the benchmark with the child's last lines."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
    )
    lines = [(time.perf_counter(), line.rstrip("\n")) for line in iter(proc.stdout.readline, "")]
    _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(line for _, line in lines[-15:])
        raise SystemExit(f"bench: {' '.join(cmd[:3])} failed (exit {proc.returncode}):\n{tail}")
    per_mb = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return lines, usage.ru_maxrss / per_mb


def records(lines: list[tuple[float, str]]) -> list[dict]:
    """The ``BENCH {json}`` records a helper child printed (tqdm's bar may precede one on its
    line: it ends its updates with a carriage return, not a newline)."""
    return [json.loads(line.split("BENCH ", 1)[1]) for _, line in lines if "BENCH " in line]


def self_child(mode: str, *args: str) -> list[str]:
    """This script run by nrt-mlx's venv in one of the ``--child`` modes."""
    return [str(VENV_PYTHON), str(Path(__file__).resolve()), "--child", mode, *args]


# ---- nrt-mlx ------------------------------------------------------------------------------------


def nrt_recipe(w: Workload, model: Path, marker_rows: str, run_dir: Path) -> dict:
    """The recipe of the workload (keys of recipes/reference.yaml; everything else default)."""
    return {
        "model": {"path": str(model), "quantize": "none"},
        # Limits that fit the bundled data (prompts <= 53 tokens, answers <= 24: nothing skipped);
        # the defaults (1024, 512) would size nrt-mlx's memory plan for rows 4x longer.
        "data": {"train": str(DATA), "max_prompt_tokens": 128, "max_answer_tokens": 64},
        "lora": {"layers": w.lora_layers, "rank": w.lora_rank, "scale": w.lora_scale},
        "rollout": {
            "samples": w.samples,
            "max_think_tokens": w.think,
            "temperature": w.temperature,
            "top_p": w.top_p,
            "marker": "auto",
            "marker_rows": marker_rows,
        },
        "optimizer": {"learning_rate": w.learning_rate},
        "train": {"steps": w.steps, "questions_per_step": w.questions, "seed": w.seed},
        # No checkpoint before the last step, whose log line comes before its checkpoint.
        "run": {"dir": str(run_dir), "save_every": w.steps, "samples_every": 0},
    }


def write_recipe(w: Workload, model: Path, marker_rows: str, tmp: Path, tag: str) -> Path:
    path = tmp / f"{tag}.yaml"
    # JSON is YAML: no YAML writer needed here.
    path.write_text(json.dumps(nrt_recipe(w, model, marker_rows, tmp / tag), indent=1))
    return path


def run_nrt(w: Workload, model: Path, marker_rows: str, tmp: Path, tag: str, env: dict) -> dict:
    """One ``nrt-mlx train`` run: each step's wall time (between its log line and the previous
    one) with metrics.jsonl's split, from step 2 on; the process's peak memory."""
    recipe = write_recipe(w, model, marker_rows, tmp, tag)
    lines, rss = run_child([str(NRT_MLX), "train", str(recipe), "--quiet"], env)
    ends = {int(m.group(1)): t for t, line in lines if (m := STEP_LINE.match(line))}
    metrics = [json.loads(x) for x in (tmp / tag / "metrics.jsonl").read_text().splitlines()]
    steps = []
    for m in metrics:
        n = m["step"]
        if n < 2 or n - 1 not in ends:
            continue
        seconds = ends[n] - ends[n - 1]
        steps.append(
            {
                "seconds": seconds,
                "sampling": m["sample_seconds"],
                "update": m["train_seconds"],
                "other": seconds - m["sample_seconds"] - m["train_seconds"],
                "update_tokens": m["train_tokens_per_s"] * m["train_seconds"],
                "update_tok_s": m["train_tokens_per_s"],
                "sample_tok_s": m.get("sample_tokens_per_s"),
                "think_tokens": m.get("trace_tokens_mean"),
            }
        )
    return {"steps": steps, "rss_mb": rss, "peak_gb": max(m["peak_memory_gb"] for m in metrics)}


# ---- the peer -----------------------------------------------------------------------------------


def peer_python(venv: Path) -> Path:
    """The peer venv's python, creating the venv and installing mlx-lm-lora when needed (never
    into nrt-mlx's own .venv)."""
    python = venv / "bin" / "python"
    if python.exists():
        probe = subprocess.run([str(python), "-c", "import mlx_lm_lora"], capture_output=True)
        if probe.returncode == 0:
            return python
    print(f"bench: creating the peer's venv {venv} ({' '.join(PEER_PACKAGES)})", file=sys.stderr)
    subprocess.run([str(VENV_PYTHON), "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return python


def run_peer(python: Path, spec: Path, env: dict) -> dict:
    lines, rss = run_child([str(python), str(SCRIPTS / "bench_peer.py"), str(spec)], env)
    found = records(lines)
    iters = [r for r in found if "step" in r]
    steps = [
        {
            "seconds": r["seconds"],
            "generation": r["generation"],
            "reward": r["reward"],
            "gradient": r["gradient"],
            "update_tokens": r["update_tokens"],
            "update_tok_s": r["update_tokens"] / r["gradient"],
            "think_tokens": r["think_tokens_mean"],
            "sample_tok_s": r["generated_tokens"] / r["generation"],
        }
        for r in iters
        if r["step"] >= 2
    ]
    versions = next(r["versions"] for r in found if "versions" in r)
    return {
        "steps": steps,
        "rss_mb": rss,
        "peak_gb": max(r["peak_memory_gb"] for r in iters),
        "versions": versions,
    }


def peer_spec(w: Workload, model: Path, prepared: dict, path: Path) -> Path:
    spec = asdict(w) | {
        "model": str(model),
        "examples": prepared["examples"],
        "marker_ids": prepared["marker_ids"],
        "marker_text": prepared["marker_text"],
    }
    path.write_text(json.dumps(spec))
    return path


# ---- child modes (run by nrt-mlx's venv) --------------------------------------------------------


def child_prepare(recipe: str, out: str) -> None:
    """The workload's prompts and answers as nrt-mlx tokenizes them, the marker, the versions."""
    from importlib.metadata import version

    from mlx_lm.utils import load_tokenizer

    import nrt_mlx  # the BLAS comes from LD_PRELOAD (child_env), whatever the import order
    from nrt_mlx import data as nrt_data
    from nrt_mlx.blas import blas_in_use
    from nrt_mlx.recipe import load_recipe
    from nrt_mlx.vocab import Vocabulary

    r = load_recipe(recipe)
    vocab = Vocabulary.of(load_tokenizer(Path(r.model.path)), r.rollout.marker)
    load = getattr(nrt_data, "load_data", None) or nrt_data.load_jsonl  # renamed in 0.2
    data = load(r.data.train, r.data)
    examples = [
        {
            "prompt": vocab.encode_prompt(ex.messages, r.rollout.think_prefix),
            "answer": vocab.encode_answer(ex.answer),
        }
        for ex in data.examples
    ]
    # nrt-mlx's own: an editable install's metadata keeps the version it was installed at.
    versions = {p: version(p) for p in ("mlx", "mlx-lm")} | {"nrt-mlx": nrt_mlx.__version__}
    Path(out).write_text(
        json.dumps(
            {
                "examples": examples,
                "marker_ids": list(vocab.marker.ids),
                "marker_text": vocab.marker.text,
                "versions": versions,
                "blas": blas_in_use(),
                "nrt_mlx": nrt_mlx.__file__,
            }
        )
    )


def gemm_rate(matmul, make, m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """FLOP/s of ``matmul`` on [m, k] x [k, n] fp32 operands: the best of ``seconds`` of repeats.
    The best, not the median: other processes only ever slow a GEMM down, and at a few hundred
    rows a shared machine spreads the times over 10x (measured: median 17, best 217 GFLOP/s)."""
    from bench_blas import best_seconds  # scripts/ is on sys.path when run as a script

    a, b = make((m, k)), make((k, n))
    return 2 * m * k * n / best_seconds(lambda: matmul(a, b), seconds=seconds)


def child_measure(spec_path: str) -> None:
    """(b) rollout tokens/s of both samplers and (c) the fp32 GEMM rates, printed as BENCH lines."""
    import mlx.core as mx
    import numpy as np

    import nrt_mlx  # noqa: F401  (the BLAS comes from LD_PRELOAD: child_env)

    spec = json.loads(Path(spec_path).read_text())
    hidden, inter, rows = spec["hidden"], spec["intermediate"], spec["gemm_rows"]
    rng = np.random.default_rng(0)

    def numpy_operand(shape):
        return rng.standard_normal(shape, dtype=np.float32)

    def mlx_operand(shape):
        x = mx.random.normal(shape)
        mx.eval(x)
        return x

    rates = {}
    for name, mul, make in (
        ("numpy", np.matmul, numpy_operand),
        ("mlx", lambda a, b: mx.eval(a @ b), mlx_operand),
    ):
        # The update's two matmul shapes: into and out of the MLP's intermediate width.
        up = gemm_rate(mul, make, rows, hidden, inter)
        down = gemm_rate(mul, make, rows, inter, hidden)
        rates[name] = statistics.mean([up, down])
    print("BENCH " + json.dumps({"gemm": rates}), flush=True)

    sys.path.insert(0, str(SCRIPTS))
    try:
        from bench_rollout import rollout_throughput
    except ImportError as err:
        print("BENCH " + json.dumps({"rollout_error": str(err)}), flush=True)
        return
    from mlx_lm import load

    model, tokenizer = load(spec["model"])
    prompts = [ex["prompt"] for ex in spec["examples"][: spec["questions"]]]
    rollout = rollout_throughput(
        model,
        tokenizer,
        prompts,
        spec["samples"],
        spec["think"],
        spec["rollout_repeats"],
        spec["temperature"],
        spec["top_p"],
    )
    print("BENCH " + json.dumps({"rollout": rollout}), flush=True)


# ---- figures ------------------------------------------------------------------------------------


def model_shape(model: Path) -> dict:
    c = json.loads((model / "config.json").read_text())
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    d = c["hidden_size"]
    attention = 2 * d * heads * head_dim + 2 * d * c.get("num_key_value_heads", heads) * head_dim
    return {
        "hidden": d,
        "intermediate": c["intermediate_size"],
        "layers": c["num_hidden_layers"],
        "layer_params": attention + 3 * d * c["intermediate_size"],  # q, k, v, o; gate, up, down
        "head_params": c["vocab_size"] * d,
    }


def flops_per_token(shape: dict, backward_layers: int) -> float:
    """Forward: 2 FLOPs per weight of every layer and of the output head. Backward: only the input
    gradient (2 per weight: the base weights are frozen, the LoRA weights are negligible) through
    the head and the ``backward_layers`` the gradient must reach. Attention's own products (about
    2 % at these lengths) are left out."""
    forward = 2 * (shape["layers"] * shape["layer_params"] + shape["head_params"])
    return forward + 2 * (backward_layers * shape["layer_params"] + shape["head_params"])


def fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


def machine_line(prepared: dict, load_before: tuple, load_after: tuple) -> str:
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in info.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    cores = os.cpu_count() or 1
    loads = f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    # Other processes on the cores slow every contender: read the ratios, not the seconds. The
    # load after includes the benchmark's own children (up to one per core).
    busy = load_before[0] > 0.5 * cores or load_after[0] > 1.5 * cores
    busy_text = " (MACHINE BUSY: compare the ratios, not the seconds)" if busy else ""
    blas = prepared["blas"]
    return f"machine: {cores} cores, {cpu}, {platform.system()}; {loads}{busy_text}; BLAS: {blas}"


def report(
    w: Workload, shape: dict, prepared: dict, runs: dict[str, Runs], measured: dict,
    peer_versions: dict | None, machine: str,
) -> str:  # fmt: skip
    out = [
        f"## nrt-mlx bench: {w.name} workload",
        "",
        f"SmolLM2-135M-Instruct fp32, LoRA last {w.lora_layers} layers rank {w.lora_rank}; "
        f"{w.questions} questions x K = {w.samples} traces x {w.think} think tokens, T = "
        f"{w.temperature}, top-p {w.top_p}; {w.steps} steps, median of steps 2-{w.steps} over "
        f"{w.repeats} alternated run(s) each.",
        machine,
        "versions: "
        + ", ".join(f"{k} {v}" for k, v in prepared["versions"].items())
        + (
            "; peer venv: " + ", ".join(f"{k} {v}" for k, v in peer_versions.items())
            if peer_versions
            else ""
        ),
        "",
        "(a) training step",
        "",
        "| | s/step | x peer | split (median s) | think tok/trace |",
        "|---|---|---|---|---|",
    ]
    peer = runs.get("peer")
    base = peer.median("seconds") if peer else float("nan")
    for key, r in runs.items():
        s = r.median("seconds")
        if key == "peer":
            parts = ["generation", "reward", "gradient"]
            split = ", ".join(
                f"{p} {fmt(r.median(p))} ({100 * r.median(p) / s:.0f} %)" for p in parts
            )
        else:
            split = " + ".join(f"{p} {fmt(r.median(p))}" for p in ("sampling", "update", "other"))
        out.append(
            f"| {r.label} | {fmt(s)} | {fmt(s / base)} | {split} | {fmt(r.median('think_tokens'), 1)} |"
        )
    out += ["", "(b) rollout tokens/s (same prompts x K, alternated in one process)", ""]
    rollout = measured.get("rollout")
    if rollout:
        nrt, mlx_lm = rollout["nrt"], rollout["batch_generate"]
        out += [
            "| nrt-mlx sample_traces | mlx_lm.batch_generate | ratio |",
            "|---|---|---|",
            f"| {nrt:.1f} | {mlx_lm:.1f} | {nrt / mlx_lm:.2f} |",
        ]
    else:
        out.append(f"not measured: {measured.get('rollout_error', 'skipped')}")
    inside = ", ".join(f"{r.label} {r.median('sample_tok_s'):.1f}" for r in runs.values())
    out += ["", f"Inside the training runs (sampled tokens / sampling s): {inside}."]
    gemm = measured["gemm"]
    out += [
        "",
        f"(c) update tokens/s against the fp32 GEMM rate (best of 1 s of repeats): numpy "
        f"{gemm['numpy'] / 1e9:.1f} GFLOP/s "
        f"(mlx {gemm['mlx'] / 1e9:.1f}) on [M, {shape['hidden']}] x [{shape['hidden']}, "
        f"{shape['intermediate']}] and back, M = {measured['gemm_rows']} (the update's tokens per "
        "step). FLOPs/token = 2 x (layers x P + H) forward + 2 x (layers the gradient passes x P "
        f"+ H) backward (input gradients only: frozen base), P = {shape['layer_params'] / 1e6:.2f}M "
        f"per layer, H = {shape['head_params'] / 1e6:.1f}M head, {shape['layers']} layers.",
        "",
        "| | tokens/step | tok/s | backward layers | GFLOP/token | GFLOP/s | of numpy GEMM | GEMM-bound tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in runs.items():
        layers = shape["layers"] if key == "nrt" else w.lora_layers
        per_token = flops_per_token(shape, layers)
        rate = r.median("update_tok_s")
        achieved = rate * per_token
        label = r.label + (" (gradient phase)" if key == "peer" else " (update)")
        out.append(
            f"| {label} | {r.median('update_tokens'):.0f} | {rate:.0f} | {layers} | "
            f"{per_token / 1e9:.3f} | {achieved / 1e9:.1f} | {100 * achieved / gemm['numpy']:.0f} % | "
            f"{gemm['numpy'] / per_token:.0f} |"
        )
    out += [
        "",
        "nrt-mlx's update takes the layers below the adapters from the rollout for its prompt and "
        "think tokens (nrt_mlx/reuse.py) instead of running them: it does fewer FLOPs per token "
        "than this count, so its GFLOP/s and share of the GEMM rate read high.",
        "",
        "(d) peak memory (largest over runs)",
        "",
        "| | process RSS MB | mlx peak GB |",
        "|---|---|---|",
    ]
    for r in runs.values():
        out.append(f"| {r.label} | {max(r.rss_mb):.0f} | {max(r.mlx_peak_gb):.3f} |")
    if peer:
        out.append("")
        out.append(
            "The peer's RSS holds two model copies (policy and the reward's frozen scorer). Its "
            "traces stop at EOS or the marker (nrt-mlx's at any special token too), and its "
            "generate_grpo decodes at most batch_size (= questions per step) rows at a time."
        )
    return "\n".join(out)


# ---- main ---------------------------------------------------------------------------------------


def workload(args: argparse.Namespace) -> Workload:
    if args.long:
        w = Workload("long", questions=2, samples=8, think=256, steps=4, repeats=2)
    else:
        w = Workload("default (issue 11)", questions=2, samples=4, think=32, steps=6, repeats=2)
    if args.quick:
        w.steps, w.repeats = 3, 1
    w.steps = args.steps or w.steps
    w.repeats = args.repeats or w.repeats
    if w.steps < 2:
        raise SystemExit("bench: --steps must be >= 2 (step 1 warms up and is not counted)")
    return w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="steps per run (default 6; --long 4)")
    parser.add_argument("--repeats", type=int, help="alternated runs of each (default 2)")
    parser.add_argument("--long", action="store_true", help="K = 8, think 256")
    parser.add_argument("--quick", action="store_true", help="1 repeat of 3 steps")
    parser.add_argument("--skip-peer", action="store_true", help="nrt-mlx only")
    parser.add_argument("--model", type=Path, default=CACHE / "SmolLM2-135M-Instruct-fp32")
    parser.add_argument("--peer-venv", type=Path, default=CACHE / "bench-peer-venv")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, *rest = args.child
        {"prepare": child_prepare, "measure": child_measure}[mode](*rest)
        return
    if not (args.model / "config.json").exists():
        raise SystemExit(
            f"bench: {args.model} is not an mlx-lm model folder; run nrt-mlx quickstart once"
        )
    from nrt_mlx.blas import find_system_blas  # stdlib only: the parent never imports mlx

    w = workload(args)
    blas = find_system_blas() if sys.platform == "linux" else None
    env = child_env(blas)
    shape = model_shape(args.model)
    load_before = os.getloadavg()
    peer_py = None if args.skip_peer else peer_python(args.peer_venv)
    with tempfile.TemporaryDirectory(prefix="nrt-bench-") as name:
        tmp = Path(name)
        prep_recipe = write_recipe(w, args.model, "eos", tmp, "prepare")
        run_child(self_child("prepare", str(prep_recipe), str(tmp / "prepared.json")), env)
        prepared = json.loads((tmp / "prepared.json").read_text())
        runs = {
            "nrt": Runs("nrt-mlx train, marker rows eos (default)"),
            "nrt_keep": Runs("nrt-mlx train, marker_rows: keep"),
        }
        if peer_py:
            runs["peer"] = Runs("mlx-lm-lora GRPO, beta 0, NRT reward (peer)")
            spec = peer_spec(w, args.model, prepared, tmp / "peer.json")
        peer_versions = None
        for repeat in range(w.repeats):
            order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
            for key in order:
                print(f"bench: run {repeat + 1}/{w.repeats}: {runs[key].label}", file=sys.stderr)
                if key == "peer":
                    result = run_peer(peer_py, spec, env)
                    peer_versions = result["versions"]
                else:
                    rows = "eos" if key == "nrt" else "keep"
                    result = run_nrt(w, args.model, rows, tmp, f"{key}-{repeat}", env)
                runs[key].steps += result["steps"]
                runs[key].rss_mb.append(result["rss_mb"])
                runs[key].mlx_peak_gb.append(result["peak_gb"])
        measure_spec = tmp / "measure.json"
        gemm_rows = round(runs["nrt"].median("update_tokens"))
        measure_spec.write_text(
            json.dumps(
                asdict(w)
                | shape
                | {
                    "model": str(args.model),
                    "examples": prepared["examples"],
                    "gemm_rows": gemm_rows,
                    "rollout_repeats": max(2, w.repeats),
                }
            )
        )
        print("bench: rollout tokens/s and GEMM rate", file=sys.stderr)
        lines, _ = run_child(self_child("measure", str(measure_spec)), env)
        measured = {k: v for r in records(lines) for k, v in r.items()} | {"gemm_rows": gemm_rows}
    machine = machine_line(prepared, load_before, os.getloadavg())
    print(report(w, shape, prepared, runs, measured, peer_versions, machine))


if __name__ == "__main__":
    main()
