"""Nothing lost, nothing silent: a run killed at any write point of a checkpoint, a damaged
checkpoint, a full disk and a second process on the same run.

A run is killed with SIGKILL at a named write point (``NRT_MLX_FAULT``, ``fileio.fault_point``),
resumed until it is done, and must end bit-identical to an uninterrupted run: the final adapters,
checkpoint (optimizer state included), metrics.jsonl up to timing fields, and samples.jsonl.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import run_cli, tiny_recipe, write_recipe

from nrt_mlx import blas, fileio
from nrt_mlx.errors import NrtError
from nrt_mlx.rundir import LOCK_FILE, RUN_MARK, RunDir, find_adapters

STEPS = 4
TIMING = {
    "sample_tokens_per_s",
    "sample_seconds",
    "train_tokens_per_s",
    "train_seconds",
    "peak_memory_gb",
}


def fault_recipe(tmp_path: Path, model_dir: Path, name: str = "run") -> Path:
    """4 steps, a checkpoint every step, the 2 newest kept, a sample line every step."""
    recipe = tiny_recipe(
        tmp_path,
        model_dir,
        name,
        train={"steps": STEPS},
        run={"save_every": 1, "keep_checkpoints": 2, "samples_every": 1},
    )
    return write_recipe(tmp_path, recipe, name)


def nrt(*args: object, fault: str | None = None) -> subprocess.CompletedProcess:
    """``nrt-mlx ARGS`` in a real process, killed at write point ``fault`` if given."""
    env = {k: v for k, v in os.environ.items() if k != fileio.FAULT_ENV}
    # The BLAS of this process (which depends on what the test session imported first), so that
    # a run continued in this process repeats a real process's float for float.
    env["NRT_MLX_BLAS"] = blas.use_system_blas() or "0"
    if fault:
        env[fileio.FAULT_ENV] = fault
    return subprocess.run(
        [sys.executable, "-m", "nrt_mlx.cli", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def outcome(run: Path) -> dict[str, object]:
    """What a finished run must reproduce exactly: every byte of adapters/ and of the last
    checkpoint, the metrics without timing fields, the samples."""
    last = run / "checkpoints" / f"step_{STEPS:06d}"
    found: dict[str, object] = {}
    for directory in (run / "adapters", last):
        for path in sorted(directory.iterdir()):
            found[f"{directory.name}/{path.name}"] = path.read_bytes()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    found["metrics"] = [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]
    found["samples"] = (run / "samples.jsonl").read_text()
    return found


def leftovers(run: Path) -> list[str]:
    """Temporary and aside names of interrupted writes, and a lock file left behind."""
    names = [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != RUN_MARK]
    names += [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    return names


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The uninterrupted run, in a real process like the runs that are killed."""
    tmp = tmp_path_factory.mktemp("reference")
    proc = nrt("train", fault_recipe(tmp, tiny_model_dir), "--quiet")
    assert proc.returncode == 0, proc.stderr
    run = tmp / "run"
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == [
        "step_000003",
        "step_000004",
    ]
    assert leftovers(run) == []
    return run


@pytest.fixture
def copy_of(reference: Path, tmp_path: Path):
    def make() -> Path:
        return Path(shutil.copytree(reference, tmp_path / "run"))

    return make


def resume_in_process(monkeypatch, capsys, run: Path) -> str:
    """Resume ``run`` to its end in this process; returns stderr."""
    code, out, err = run_cli(monkeypatch, capsys, "train", "--resume", run, "--quiet")
    assert code == 0, err
    assert out.strip().splitlines()[-1] == f"adapters: {run / 'adapters'}"
    return err


# ---- killed at every write point ---------------------------------------------------------------

# Each case: the fault of the first run, then those of resumes that are killed too. Counts are
# per process: adapters.aside happens from step 2 on (step 1 has no adapters/ to move aside);
# with keep_checkpoints 2, step 3 removes step 1 (checkpoint.prune:1).
KILLS = [
    ("checkpoint.adapters:1",),  # before any checkpoint: the resume starts over
    ("checkpoint.adapters:2",),
    ("checkpoint.optimizer:2",),
    ("checkpoint.state:2",),
    ("checkpoint.synced:2",),  # every file fsynced, nothing renamed
    ("checkpoint.renamed:2",),  # step 2 in place, adapters/ still step 1's
    ("adapters.synced:2",),
    ("adapters.aside:1",),  # between the two renames: no adapters/ at all
    ("adapters.renamed:2",),  # the new adapters/ in, the old one not yet removed
    ("checkpoint.prune:1",),  # step 1 renamed away, not yet removed
    ("metrics.append:3",),  # step 3 logged, not yet checkpointed
    ("samples.append:3",),
    ("checkpoint.renamed:4",),  # the last checkpoint in place, adapters/ not yet: done already
    ("adapters.aside:3",),  # the last step, between the renames: done already, no adapters/
    ("adapters.aside:1", "adapters.aside:1"),  # killed again while the resume repairs adapters/
    ("metrics.append:3", "metrics.synced:1"),  # killed again while it rewrites metrics.jsonl
]


@pytest.mark.parametrize("faults", KILLS, ids=["+".join(k) for k in KILLS])
def test_killed_at_a_write_point_resumes_to_the_same_run(
    faults, tmp_path, tiny_model_dir, reference, monkeypatch, capsys
):
    recipe = fault_recipe(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    for n, fault in enumerate(faults):
        args = ["train", recipe, "--quiet"] if n == 0 else ["train", "--resume", run, "--quiet"]
        proc = nrt(*args, fault=fault)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.returncode, proc.stderr)
        with RunDir(run).lock():  # the OS released the dead process's lock
            pass
    err = resume_in_process(monkeypatch, capsys, run)
    assert "warning: " not in err  # a killed write is repaired, never reported as damage
    assert outcome(run) == outcome(reference)
    assert leftovers(run) == []
    assert not (run / "checkpoints" / "damaged").exists()


def test_resuming_a_finished_run_is_at_once_and_changes_nothing(
    copy_of, monkeypatch, capsys, reference
):
    run = copy_of()
    before = outcome(run)
    resume_in_process(monkeypatch, capsys, run)
    assert outcome(run) == before
    assert leftovers(run) == []


def test_readers_find_the_latest_adapters_while_adapters_dir_is_missing(copy_of):
    """Killed between the two renames and not resumed yet: eval, score and fuse read the newest
    checkpoint, which holds the same adapters."""
    run = copy_of()
    (run / "adapters").rename(run / ".adapters.old")
    latest = run / "checkpoints" / f"step_{STEPS:06d}"
    assert find_adapters(run).adapter_dir == latest
    assert RunDir(run).adapter_dir() == (latest, STEPS)


# ---- a damaged latest checkpoint --------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_checksums(path: Path) -> None:
    """As a checkpoint of nrt-mlx 0.1: state.json without the files' checksums."""
    state = json.loads((path / "state.json").read_text())
    del state["files"]
    (path / "state.json").write_text(json.dumps(state))


DAMAGE = [  # (file, damage, checksums in state.json, the problem the warning names)
    ("adapters.safetensors", truncate, True, "adapters.safetensors does not match its checksum"),
    ("optimizer.safetensors", truncate, True, "optimizer.safetensors does not match its checksum"),
    ("marker.safetensors", truncate, True, "marker.safetensors does not match its checksum"),
    ("state.json", truncate, True, "state.json is not valid JSON"),
    ("adapter_config.json", truncate, True, "adapter_config.json is not valid JSON"),
    ("marker.safetensors", Path.unlink, True, "marker.safetensors is missing"),
    ("optimizer.safetensors", Path.unlink, True, "optimizer.safetensors is missing"),
    # Checkpoints of nrt-mlx 0.1 have no checksums: every file must load.
    ("adapters.safetensors", truncate, False, "adapters.safetensors does not load: "),
    ("optimizer.safetensors", truncate, False, "optimizer.safetensors does not load: "),
    ("marker.safetensors", truncate, False, "marker.safetensors does not load: "),
    ("marker.safetensors", Path.unlink, False, "marker.safetensors is missing"),  # config says
    ("adapters.safetensors", Path.unlink, False, "adapters.safetensors is missing"),
]


@pytest.mark.parametrize(
    "name, damage, checksums, problem",
    DAMAGE,
    ids=[f"{n}-{d.__name__}-{'sha' if c else 'v0.1'}" for n, d, c, _ in DAMAGE],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    name, damage, checksums, problem, copy_of, reference, monkeypatch, capsys
):
    run = copy_of()
    latest = run / "checkpoints" / f"step_{STEPS:06d}"
    if not checksums:
        drop_checksums(latest)
    damage(latest / name)
    err = resume_in_process(monkeypatch, capsys, run)
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, err
    assert warnings[0].startswith(f"warning: {latest}: damaged checkpoint ({problem}")
    assert f"resuming from step {STEPS - 1}" in warnings[0]
    assert outcome(run) == outcome(reference)
    assert (run / "checkpoints" / "damaged" / latest.name).is_dir()  # kept, not deleted
    assert leftovers(run) == []


def test_no_intact_checkpoint_is_one_line_and_moves_nothing(copy_of, monkeypatch, capsys):
    run = copy_of()
    for step in (3, 4):
        truncate(run / "checkpoints" / f"step_{step:06d}" / "optimizer.safetensors")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    code, _, err = run_cli(monkeypatch, capsys, "train", "--resume", run, "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {run}: no intact checkpoint to resume from (step_000004: ")
    assert "step_000003: optimizer.safetensors does not match its checksum" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


# ---- a full disk ---------------------------------------------------------------------------------


def fail_nth(monkeypatch, owner, name: str, n: int, error: Exception, when=lambda *a: True):
    """Make ``owner.name`` raise ``error`` on its n-th call for which ``when(*args)`` holds."""
    real, seen = getattr(owner, name), []

    def failing(*args, **kwargs):
        if when(*args):
            seen.append(args)
            if len(seen) == n:
                raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return seen


ENOSPC = OSError(errno.ENOSPC, "No space left on device")
MLX_WRITE = RuntimeError("[write] Unable to write 8 bytes to file.")


def full_disk_at(where: str, monkeypatch) -> tuple[str, int]:
    """Inject a full disk; returns (what the message says was being written, the checkpoint a
    resume starts from)."""
    if where == "optimizer":  # OSError from a Python-level write
        fail_nth(
            monkeypatch, mx, "save_safetensors", 2, ENOSPC, lambda p, *_: named(p, "optimizer")
        )
        return "checkpoint step 2", 1
    if where == "mlx-writer":  # mlx's own writer: a RuntimeError without errno, a disk ~full
        fail_nth(
            monkeypatch, mx, "save_safetensors", 2, MLX_WRITE, lambda p, *_: named(p, "adapters")
        )
        monkeypatch.setattr(fileio, "free_space", lambda directory: 12_000)
        return "checkpoint step 2", 1
    if where == "fsync":  # delayed allocation: the space runs out when the data goes to disk
        fail_nth(monkeypatch, fileio, "fsync_tree", 3, ENOSPC)  # checkpoint 1, adapters 1, ckpt 2
        return "checkpoint step 2", 1
    if where == "adapters":  # the checkpoint is complete, adapters/ is not replaced
        fail_nth(monkeypatch, shutil, "copy2", 4, ENOSPC)  # the first of step 2's three files
        return "adapters/ of step 2", 2
    assert where == "metrics"
    fail_nth(monkeypatch, fileio.os, "fsync", 1, ENOSPC, lambda fd: _is_metrics(fd))
    return "metrics.jsonl", 0


def named(path: object, stem: str) -> bool:
    return Path(str(path)).name == f"{stem}.safetensors"


def _is_metrics(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl")
    except OSError:
        return False


@pytest.mark.parametrize("where", ["optimizer", "mlx-writer", "fsync", "adapters", "metrics"])
def test_a_full_disk_is_one_line_and_the_previous_checkpoint_resumes(
    where, tmp_path, tiny_model_dir, reference, monkeypatch, capsys
):
    if where == "metrics" and not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell the metrics file's descriptor")
    recipe = fault_recipe(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    what, intact = full_disk_at(where, monkeypatch)
    code, _, err = run_cli(monkeypatch, capsys, "train", recipe, "--quiet")
    monkeypatch.undo()
    lines = [line for line in err.splitlines() if not line.startswith("step ")]
    assert code == 2 and len(lines) == 1, err
    free = "12.0 KB free" if where == "mlx-writer" else "free)"
    assert lines[0].startswith(f"error: run.dir {run}: disk full (")
    assert free in lines[0] and f"while writing {what}; free some space, then " in lines[0]
    if intact:
        assert lines[0].endswith(
            f"continue from checkpoint step {intact} with 'nrt-mlx train --resume {run}'"
        )
        assert RunDir(run).checkpoint_problem(intact) is None
    else:
        assert lines[0].endswith(f"start it over with 'nrt-mlx train --resume {run}'")
    assert RunDir(run).latest_checkpoint() == (intact or None)
    assert not any(p.name.endswith(".tmp") for p in (run / "checkpoints").glob(".*"))
    resume_in_process(monkeypatch, capsys, run)
    assert outcome(run) == outcome(reference)
    assert leftovers(run) == []


# ---- one process per run, and never the user's own files ----------------------------------------


def test_a_live_run_cannot_be_trained_or_resumed_twice(copy_of, tmp_path, tiny_model_dir):
    run = copy_of()
    with RunDir(run).lock():
        pid = (run / LOCK_FILE).read_text().strip()
        assert pid == str(os.getpid())
        for args in (["train", "--resume", run], ["train", fault_recipe(tmp_path, tiny_model_dir)]):
            proc = nrt(*args, "--quiet")
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.strip() == (
                f"error: run.dir {run} is in use: another nrt-mlx process (pid {pid}) is "
                "training it; wait for it to finish (or stop it), then try again"
            )
    assert not (run / LOCK_FILE).exists()  # removed with the lock


def test_the_lock_is_taken_over_from_a_killed_process(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / LOCK_FILE).write_text("999999\n")  # left by a process killed while training
    with run.lock():
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(NrtError, match=f"pid {os.getpid()}"), run.lock():
            pass
    with run.lock():  # and released again
        pass


def test_a_new_run_never_overwrites_the_users_own_recipe(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "recipe.yaml").write_text("# my notes\n")
    recipe = tiny_recipe(tmp_path, tiny_model_dir, "mine")
    path = write_recipe(tmp_path, recipe, "other")
    code, _, err = run_cli(monkeypatch, capsys, "train", path, "--quiet")
    assert code == 2
    assert err.strip() == (
        f"error: run.dir {mine}: not empty and not created by nrt-mlx (it holds recipe.yaml); a "
        "run would overwrite them: set run.dir to a new or empty directory"
    )
    assert sorted(os.listdir(mine)) == ["recipe.yaml"]
    assert (mine / "recipe.yaml").read_text() == "# my notes\n"


def test_a_new_run_may_use_an_empty_directory_or_one_it_marked(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"")  # hidden files are no one's work
    with RunDir(empty).claim():
        assert (empty / RUN_MARK).exists()
    (empty / "recipe.yaml").write_text("written by nrt-mlx\n")
    with RunDir(empty).claim():  # a run that never saved a checkpoint starts again there
        pass
    fresh = tmp_path / "fresh"
    with pytest.raises(NrtError, match="bad recipe"), RunDir(fresh).claim():
        raise NrtError("bad recipe")
    assert not fresh.exists()  # a failed start leaves no directory behind


# ---- the write protocol, without a model ----------------------------------------------------------


class Crash(BaseException):
    """Stands in for SIGKILL in-process: nothing catches it on the way out."""


@pytest.fixture
def crash_at(monkeypatch):
    def arm(fault: str) -> None:
        monkeypatch.setenv(fileio.FAULT_ENV, fault)
        monkeypatch.setattr(fileio, "_fault_hits", {})

    def crash() -> None:
        raise Crash

    monkeypatch.setattr(fileio, "_kill", crash)
    return arm


@pytest.mark.parametrize(
    "point, survivor", [("d.synced", "old"), ("d.aside", "old"), ("d.renamed", "new")]
)
def test_a_directory_replacement_killed_anywhere_recovers_whole(
    point, survivor, tmp_path, crash_at
):
    final = tmp_path / "d"
    final.mkdir()
    (final / "a").write_text("old")
    (final / "b").write_text("old")
    crash_at(point)
    tmp, commit = fileio.atomic_dir(final, "d")
    (tmp / "a").write_text("new")
    (tmp / "b").write_text("new")
    with pytest.raises(Crash):
        commit()
    fileio.recover_dir(final)
    fileio.remove_stale_temps(tmp_path)
    assert {p.name: p.read_text() for p in final.iterdir()} == {"a": survivor, "b": survivor}
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_a_killed_removal_never_leaves_a_half_removed_directory(tmp_path, crash_at):
    doomed = tmp_path / "step_000001"
    doomed.mkdir()
    (doomed / "state.json").write_text("{}")
    crash_at("prune")
    with pytest.raises(Crash):
        fileio.remove_dir(doomed, "prune")
    assert not doomed.exists()
    assert [p.name for p in fileio.remove_stale_temps(tmp_path)][0].startswith(".step_000001.")
    assert os.listdir(tmp_path) == []


def test_the_fault_hook_counts_hits_and_ignores_other_points(tmp_path, crash_at):
    crash_at("x.append:3")
    fileio.fault_point("y.append")
    fileio.fault_point("x.append")
    fileio.fault_point("x.append")
    with pytest.raises(Crash):
        fileio.fault_point("x.append")


@pytest.fixture
def disk_events(monkeypatch) -> list[tuple[str, ...]]:
    """fsyncs (by path) and renames, in order: what a power cut could undo is what follows the
    last fsync, which a SIGKILL (the page cache survives it) cannot show."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the fsynced descriptors")
    events: list[tuple[str, ...]] = []
    sync, replace = fileio._sync_fd, os.replace

    def spy_sync(fd: int) -> None:
        events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
        sync(fd)

    def spy_replace(src, dst) -> None:
        replace(src, dst)
        events.append(("rename", str(src), str(dst)))

    monkeypatch.setattr(fileio, "_sync_fd", spy_sync)
    monkeypatch.setattr(os, "replace", spy_replace)
    return events


def test_every_file_and_directory_is_fsynced_around_each_rename(tmp_path, disk_events):
    final = tmp_path / "d"
    final.mkdir()
    (final / "a").write_text("old")
    tmp, commit = fileio.atomic_dir(final)
    (tmp / "a").write_text("new")
    (tmp / "b").write_text("new")
    commit()
    parent, old = str(tmp_path), str(fileio.aside(final))
    files = sorted(disk_events[:2])
    assert files == [("sync", str(tmp / "a")), ("sync", str(tmp / "b"))]
    assert disk_events[2:] == [
        ("sync", str(tmp)),
        ("rename", str(final), old),
        ("sync", parent),
        ("rename", str(tmp), str(final)),
        ("sync", parent),
    ]
    disk_events.clear()
    fileio.atomic_write_text(tmp_path / "f.txt", "text")
    temp = disk_events[0][1]
    assert Path(temp).name.startswith(".f.txt.")
    assert disk_events == [
        ("sync", temp),
        ("rename", temp, str(tmp_path / "f.txt")),
        ("sync", parent),
    ]
    disk_events.clear()
    fileio.append_jsonl(tmp_path / "log.jsonl", {"step": 1})
    fileio.append_jsonl(tmp_path / "log.jsonl", {"step": 2})
    log = str(tmp_path / "log.jsonl")
    assert disk_events == [("sync", log), ("sync", parent), ("sync", log)]  # new file: its dir too


@pytest.mark.parametrize("code, reported", [(errno.EIO, True), (errno.ENOTSUP, False)])
def test_a_failing_full_fsync_is_reported_unless_unsupported(tmp_path, monkeypatch, code, reported):
    """macOS's F_FULLFSYNC: a file system without it falls back to fsync; a real write error
    (EIO, ENOSPC) must reach the user, not be swallowed by the fallback."""
    import fcntl

    from nrt_mlx import fileio

    monkeypatch.setattr(fcntl, "F_FULLFSYNC", 51, raising=False)

    def full_fsync(fd, cmd, *args):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "fcntl", full_fsync)
    path = tmp_path / "f"
    path.write_text("x")
    if reported:
        with pytest.raises(OSError) as err:
            fileio.fsync_file(path)
        assert err.value.errno == code
    else:
        fileio.fsync_file(path)  # fell back to os.fsync


def test_a_file_system_without_locks_warns_and_trains(tmp_path, monkeypatch, capsys):
    """NFS without lockd, some SMB/FUSE mounts: flock fails with ENOLCK; the run goes on."""
    import fcntl

    from nrt_mlx.rundir import RunDir

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with RunDir(tmp_path / "run").claim():
        assert (tmp_path / "run").is_dir()
    err = capsys.readouterr().err
    assert "has no locks" in err and len(err.strip().splitlines()) == 1

    def broken(f, op):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(NrtError, match="cannot lock it"):
        with RunDir(tmp_path / "run").lock():
            pass
