"""A training run: start or resume it, run its steps, log, evaluate, checkpoint.

``train`` starts a run from a recipe, ``resume`` continues one from its newest intact checkpoint
(docs/NRT.md, "Resuming, interrupting, and what a run records"); both run ``run_training``, which
calls ``nrt_mlx.step.train_step`` once per step on a ``nrt_mlx.session.Session``. Under
``mlx.launch`` rank 0 alone logs and writes the run directory; the other ranks ``follow``.
"""

from __future__ import annotations

import copy
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from nrt_mlx import distributed
from nrt_mlx.distributed import Group
from nrt_mlx.errors import NrtError
from nrt_mlx.fileio import fault_point
from nrt_mlx.model import ADAPTER_WEIGHTS
from nrt_mlx.progress import Reporter
from nrt_mlx.recipe import Recipe, recipe_from_dict, resume_overrides, save_recipe
from nrt_mlx.rundir import RunDir
from nrt_mlx.session import Session, lr_schedule, prepare, ready_to_train, warn
from nrt_mlx.step import StepResult, train_step

# ---- the run ------------------------------------------------------------------------------------


def _sample_record(session: Session, result: StepResult, max_traces: int = 4) -> dict[str, Any]:
    """The first question of the step with a few of its traces and their trace rewards."""
    item, rewards = result.items[0], result.rewards
    traces = [
        {
            "text": session.vocab.decode(t.tokens),
            "reward": rewards[i] if i < len(rewards) else None,
            "tokens": len(t.tokens),
            "emitted_marker": t.emitted_marker,
        }
        for i, t in enumerate(result.traces[0][:max_traces])
    ]
    return {
        "step": result.metrics["step"],
        "question": item.example.question,
        "reference": item.example.answer,
        "traces": traces,
    }


def _checkpoint(session: Session, step: int) -> None:
    state = {"position": session.position, "seed": session.recipe.train.seed}
    session.run.save_checkpoint(
        step,
        session.loaded.model,
        session.optimizer,
        session.adapter_config,
        state,
        session.recipe.run.keep_checkpoints,
    )


def evaluate_valid(session: Session) -> dict[str, float]:
    """The eval figures on the valid split within the recipe's budget, keys prefixed ``eval_``."""
    from nrt_mlx.evaluate import eval_config, evaluate

    r = session.recipe
    cfg = eval_config(
        r.rollout,
        samples=r.train.eval_samples,
        seed=r.train.seed,
        max_questions=r.train.eval_questions,
        extract=r.train.eval_extract,
        generate=True,
        max_answer_tokens=min(64, r.data.max_answer_tokens),
    )
    report = evaluate(session.loaded.model, session.vocab, [e.example for e in session.valid], cfg)
    return {f"eval_{k}": v for k, v in report.summary.items() if isinstance(v, (int, float))}


def run_training(session: Session, start_step: int = 0, quiet: bool = False) -> Path:
    """Train from ``start_step`` to ``train.steps``: log, sample, evaluate, watch for collapse,
    checkpoint. Under mlx.launch every rank runs the steps (and evaluates, so that they stay in
    step); rank 0 alone judges, logs and checkpoints."""
    from nrt_mlx.collapse import CollapseMonitor
    from nrt_mlx.tracking import Trackers

    r, g = session.recipe, session.group
    sync_state(session)
    monitor = CollapseMonitor(
        r.train.collapse_fraction, traces_per_step=r.train.questions_per_step * r.rollout.samples
    )
    if g.primary:
        monitor.replay(session.run.read_metrics())  # a resumed run keeps its starting values
    reporter = Reporter(r.train.steps, start_step, quiet, r.run.log_every, silent=not g.primary)
    trackers = Trackers(reporter.warn)  # train.report_to: never stops the run
    try:
        if g.primary:
            trackers.start(r, session.run.root, start_step)
        g.set_hint(continue_hint(session))
        for step in range(start_step + 1, r.train.steps + 1):
            fault_point(f"rank{g.rank}.step")  # TEST-ONLY: NRT_MLX_FAULT=rank1.step:2
            started = time.perf_counter()
            result = train_step(session, step)
            stop = judge(session, result.metrics, monitor, reporter) if g.primary else False
            if r.train.collapse_stop:  # every rank stops where rank 0 does
                stop = g.broadcast(stop, f"the end of step {step}")
            if (
                session.valid
                and r.train.eval_every
                and (step % r.train.eval_every == 0 or step == r.train.steps)
            ):
                result.metrics.update(evaluate_valid(session))
            if g.primary:
                record(session, result, trackers, reporter, stop)
            g.note_step(time.perf_counter() - started)
            if stop:
                reporter.warn(
                    f"stopped at step {step} on policy collapse (train.collapse_stop); "
                    f"checkpoint {session.run.checkpoint_dir(step)}"
                )
                break
    except KeyboardInterrupt:
        if not g.primary:
            raise SystemExit(130) from None  # rank 0 says where to continue from
        raise Interrupted(interrupted_message(session.run, r.model.trust_remote_code)) from None
    finally:
        trackers.close()
        reporter.close()
    distributed.dump_weights(session.loaded.model, g)
    return session.run.root


def judge(session: Session, metrics: dict[str, Any], monitor: Any, reporter: Reporter) -> bool:
    """Refuse a non-finite figure, warn of policy collapse; whether the run stops here."""
    r, step = session.recipe, metrics["step"]
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise NrtError(f"step {step}: {key} is {value}; lower optimizer.learning_rate")
    warnings = monitor.update(step, metrics) if r.train.method == "nrt" else []
    for message in warnings:
        reporter.warn(message)
    if warnings:
        metrics["collapse_warning"] = " | ".join(warnings)
    return r.train.collapse_stop and monitor.collapsed


def record(
    session: Session, result: StepResult, trackers: Any, reporter: Reporter, stop: bool
) -> None:
    """Rank 0: log the step's metrics (and samples), report, checkpoint when it is due."""
    r, step, metrics = session.recipe, result.metrics["step"], result.metrics
    session.run.log_metrics(metrics)
    trackers.log(metrics)
    if r.train.method == "nrt" and r.run.samples_every:
        if step == 1 or step % r.run.samples_every == 0:
            session.run.log_sample(_sample_record(session, result))
    reporter.step(metrics)
    if stop or step % r.run.save_every == 0 or step == r.train.steps:
        _checkpoint(session, step)
        session.group.set_hint(continue_hint(session))


def sync_state(session: Session) -> None:
    """Every rank takes rank 0's trainable weights, optimizer state and data position (a resumed
    run's checkpoint is on rank 0's disk alone)."""
    g = session.group
    if g.size > 1:
        distributed.share_training_state(g, session.loaded.model, session.optimizer)
        session.position = g.broadcast(session.position, "the start (rank 0's data position)")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while training; the message says where the last checkpoint is and how to go on."""


def resume_command(run: RunDir, trust_remote_code: bool, overrides: list[str] | None) -> str:
    words = ["nrt-mlx", "train", "--resume", str(run.root)]
    words += [w for item in overrides or [] for w in ("--set", item)]
    words += ["--trust-remote-code"] if trust_remote_code else []
    return " ".join(shlex.quote(w) for w in words)


def interrupted_message(
    run: RunDir, trust_remote_code: bool, overrides: list[str] | None = None
) -> str:
    """One line: the run's last checkpoint and the command that continues it."""
    command = resume_command(run, trust_remote_code, overrides)
    step = run.latest_checkpoint()
    if step is None:
        return f"interrupted before the first checkpoint; start the run again with: {command}"
    return (
        f"interrupted; the last checkpoint is {run.checkpoint_dir(step)} (step {step}); "
        f"continue with: {command}"
    )


def continue_hint(session: Session) -> str:
    """What to do when a rank of the run is lost now (``Group.set_hint``)."""
    if not session.group.primary:
        return "rank 0 names the checkpoint to continue from"
    command = resume_command(session.run, session.recipe.model.trust_remote_code, None)
    step = session.run.latest_checkpoint()
    where = (
        "there is no checkpoint yet; start the run again"
        if step is None
        else f"the last checkpoint is {session.run.checkpoint_dir(step)} (step {step}); continue"
    )
    return f"{where} under the same mlx.launch command with: {command}"


def start_run(recipe: Recipe, group: Group | None = None) -> Session:
    """Prepare a new run and write its run directory's resolved recipe."""
    recipe.run.overrides = []  # a record of another run's resumes (e.g. a model card's recipe)
    from nrt_mlx.tracking import require

    require(recipe.train.report_to)  # a missing tracker package: before the model loads
    group = group or Group()
    lead(group, recipe, 0)
    session = prepare(recipe, group)
    session.run.root.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, session.run.recipe)
    return session


def train(
    recipe: Recipe,
    quiet: bool = False,
    trust_remote_code: bool = False,
    group: Group | None = None,
) -> Path:
    """Start a new run as the recipe says; returns the run directory. Ranks other than 0 of a
    ``group`` (``distributed.join``) train the run rank 0 leads (``follow``)."""
    if group and not group.primary:
        return follow(group, trust_remote_code)
    ready_to_train(recipe, trust_remote_code, "recipe")  # before the run directory is created
    # One process per run directory, and never over files nrt-mlx did not write (rundir.claim).
    with RunDir(Path(recipe.run.dir)).claim():
        try:
            session = start_run(recipe, group)
        except KeyboardInterrupt:
            raise Interrupted(
                "interrupted before training started: nothing to resume; run the same command again"
            ) from None
        # Even with --quiet: skipped records are never silent.
        print(session.data_report, flush=True)
        return run_training(session, 0, quiet)


def resume(
    run_dir: str | Path,
    quiet: bool = False,
    overrides: list[str] | None = None,
    trust_remote_code: bool = False,
    group: Group | None = None,
) -> Path:
    """Continue a run from its latest checkpoint (from the start when it has none yet), with the
    recipe it was started with, on one process or a ``group`` (of any size: the data order is
    the same).

    ``overrides`` (``--set``) may change any key but those of ``recipe.RESUME_FIXED``; accepted
    changes go into the run's recipe.yaml, listed in run.overrides with the first step they apply
    to. The learning-rate schedule is recomputed for the new recipe (see recipes/reference.yaml).
    A refused override, or any error before training starts, leaves the run directory untouched.
    """
    if group and not group.primary:
        return follow(group, trust_remote_code)  # the run directory is rank 0's
    run = RunDir(Path(run_dir).expanduser().absolute()).check()
    # Refusals first, before the lock and the recovery touch anything.
    _, recipe, _ = _resume_recipes(run, run.latest_checkpoint() or 0, overrides, trust_remote_code)
    from nrt_mlx.tracking import require

    require(recipe.train.report_to)  # a missing tracker package: before the model loads
    with run.lock():  # one process per run directory, released however the process ends
        return _resume_locked(run, quiet, overrides, trust_remote_code, group or Group())


def _resume_recipes(
    run: RunDir, step: int, overrides: list[str] | None, trust_remote_code: bool
) -> tuple[Recipe, Recipe, list[dict]]:
    """(saved recipe, recipe to resume with, its run.overrides entries) of resuming from ``step``;
    a refused override or a missing --trust-remote-code is a one-line error."""
    saved = run.read_recipe()
    recipe = run.read_recipe(overrides) if overrides else copy.deepcopy(saved)
    entries = resume_overrides(saved, recipe, step + 1)
    if recipe.train.steps < step:
        raise NrtError(
            f"--set train.steps={recipe.train.steps}: the run is already at step {step}; "
            f"give a number above {step}"
        )
    ready_to_train(recipe, trust_remote_code, str(run.recipe))
    recipe.run.dir = str(run.root)
    return saved, recipe, entries


def _resume_locked(
    run: RunDir, quiet: bool, overrides: list[str] | None, trust_remote_code: bool, group: Group
) -> Path:
    step = run.recover()  # the newest intact checkpoint (0: none yet), damaged ones warned of
    if step == 0 and (run.adapters / ADAPTER_WEIGHTS).exists():
        # A trained run whose checkpoints were removed: starting it over would replace its adapters.
        raise NrtError(
            f"{run.root}: has adapters/ but no checkpoint to resume from (were checkpoints/ "
            "removed?); nrt-mlx will not train over them: start a new run in another directory"
        )
    saved, recipe, entries = _resume_recipes(run, step, overrides, trust_remote_code)
    lead(group, recipe, step)
    try:
        session = prepare(recipe, group)
        if step:
            state = run.load_checkpoint(step, session.loaded.model, session.optimizer)
            session.position = state["position"]
    except KeyboardInterrupt:
        message = interrupted_message(run, trust_remote_code, overrides or [])
        raise Interrupted(message) from None
    if entries:
        earlier = [{**e, "from_step": min(e["from_step"], step + 1)} for e in saved.run.overrides]
        recipe.run.overrides = earlier + entries
        save_recipe(recipe, run.recipe)
        changes = ", ".join(f"{e['key']} {e['was']!r} -> {e['value']!r}" for e in entries)
        print(
            f"resuming at step {step + 1} with {changes} (recorded in {run.recipe})",
            file=sys.stderr,
        )
        if step:
            _reschedule(session, saved)
    run.rewind(step)  # adapters/ and the logs as of the checkpoint; damaged newer ones moved
    if step >= recipe.train.steps:
        print(
            f"{run.root} is at step {step} of {recipe.train.steps}: nothing to train "
            "(extend it with --set train.steps=N)",
            file=sys.stderr,
        )
        return run.root
    return run_training(session, step, quiet)


def _reschedule(session: Session, saved: Recipe) -> None:
    """After a resume that changed the recipe: the rate of the next update from the recomputed
    schedule (the checkpoint holds the old schedule's), and a warning when the two differ."""
    update = session.optimizer.step
    rate = lr_schedule(session.recipe)(update)
    new, old = float(rate), float(lr_schedule(saved)(update))
    session.optimizer.learning_rate = rate
    if not math.isclose(new, old, rel_tol=1e-6):
        warn(
            f"the learning-rate schedule is recomputed for the resumed recipe: the next update's "
            f"rate is {new:.3g} (the old schedule's was {old:.3g})"
        )


# ---- ranks other than 0 (mlx.launch) --------------------------------------------------------------


def lead(group: Group, recipe: Recipe, step: int) -> None:
    """Rank 0: send the run's recipe and the step it starts from to the other ranks (``follow``),
    before every rank loads the model."""
    group.broadcast({"recipe": recipe.to_dict(), "step": step}, "the start (rank 0's recipe)")


def follow(group: Group, trust_remote_code: bool) -> Path:
    """A rank other than 0: train the run rank 0 leads, with its recipe from its step (the
    weights, optimizer state and data position come in ``sync_state``). It writes nothing: the
    run directory may not exist on this machine."""
    start = group.broadcast(None, "the start (rank 0's recipe)")
    recipe = recipe_from_dict(start["recipe"], "rank 0's recipe")
    ready_to_train(recipe, trust_remote_code, "rank 0's recipe")
    session = prepare(recipe, group)
    if start["step"] >= recipe.train.steps:
        return session.run.root
    return run_training(session, start["step"], quiet=True)
