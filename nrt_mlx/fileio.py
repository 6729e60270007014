"""Crash-safe file writes: a crash or power loss never leaves a half-written file or directory.

Every write goes to a temporary name beside its target (``.NAME.XXXXXXXX.tmp``), is fsynced, and
is renamed into place; the directory is fsynced after the rename, so the rename itself survives a
power loss. A directory that replaces an older one is renamed over it in two steps, through
``.NAME.old``; ``recover_dir`` finishes or undoes a commit a crash interrupted, and
``remove_stale_temps`` clears the temporary names a crash left behind.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from nrt_mlx.errors import NrtError, first_line

FAULT_ENV = "NRT_MLX_FAULT"
_fault_hits: dict[str, int] = {}

# mkstemp/mkdtemp names: ".NAME." + 8 random characters + ".tmp".
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")

# Below this much free space, a write mlx reports as failed (it gives no errno) is a full disk.
_LOW_SPACE = 64 * 2**20


def fault_point(name: str) -> None:
    """TEST-ONLY hook: SIGKILL this process at a named write point.

    With ``NRT_MLX_FAULT=NAME:N`` in the environment, the N-th time (default 1) this process
    reaches write point NAME it kills itself with SIGKILL: no cleanup and no flush, as
    ``kill -9`` or the OOM killer would (what it wrote stays in the OS's cache, unlike after a
    power cut: the fsyncs are tested on their own). tests/test_faults.py uses it to check that
    every instant of a checkpoint is recoverable. Without the variable (always, outside tests) it does nothing. Names:
    ``checkpoint.adapters|optimizer|state`` (a file written into the checkpoint's temporary
    directory), ``checkpoint.synced|aside|renamed`` and ``adapters.synced|aside|renamed`` (see
    ``atomic_dir``), ``checkpoint.prune`` (an old checkpoint renamed away, not yet removed),
    ``metrics.append`` / ``samples.append`` (a log line written and fsynced) and
    ``metrics.synced`` / ``recipe.synced``... (``atomic_write_text``: the temporary file fsynced,
    not yet renamed), and ``rank{R}.step`` (rank R of a data-parallel run starts a step:
    ``NRT_MLX_FAULT=rank1.step:2`` kills rank 1 at its second step).
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want, _, count = spec.partition(":")
    if want != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(count or 1):
        _kill()


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# ---- fsync ----------------------------------------------------------------------------------------


def _sync_fd(fd: int) -> None:
    # On macOS fsync only reaches the drive's cache; F_FULLFSYNC asks the drive to write it out.
    if hasattr(fcntl, "F_FULLFSYNC"):
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError as err:
            # Not supported by this file system: fsync is the best there is. Any other error
            # (EIO, ENOSPC) is the write failing and must be reported, not swallowed.
            if err.errno not in (errno.ENOTSUP, errno.EINVAL, errno.ENOTTY):
                raise
    os.fsync(fd)


def fsync_file(path: str | Path) -> None:
    """Flush a file's data to the disk (whoever wrote it: fsync works on any descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _sync_fd(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make the entries of a directory (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _sync_fd(fd)
    except OSError as err:
        # Some file systems cannot sync a directory (EINVAL); their renames are as safe as it gets.
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file of a flat directory, then the directory itself."""
    for path in directory.iterdir():
        if path.is_file():
            fsync_file(path)
    fsync_dir(directory)


# ---- atomic writes --------------------------------------------------------------------------------


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, rename it over ``path`` and
    fsync the directory (write point ``STEM.synced`` before the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp makes the file 0600: keep the mode of the file it replaces, else the umask's.
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            _sync_fd(f.fileno())
        fault_point(f"{path.stem}.synced")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _umask() -> int:
    umask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(umask)
    return umask


def aside(final: Path) -> Path:
    """Where ``atomic_dir`` keeps the directory it replaces until the new one is in place."""
    return final.parent / f".{final.name}.old"


def atomic_dir(final: str | Path, point: str | None = None) -> tuple[Path, Callable[[], Path]]:
    """A temporary directory beside ``final`` and a function that moves it into place.

    Files are written into the temporary directory; ``commit()`` fsyncs them and the directory,
    moves an existing ``final`` aside to ``.NAME.old``, renames the new directory to ``final``,
    then removes the old one, fsyncing the parent after each rename. At every instant either
    ``final`` or ``.NAME.old`` is complete, and ``recover_dir`` brings ``final`` back. ``point``
    names the write points (``fault_point``): POINT.synced (all fsynced, nothing renamed),
    POINT.aside (the old directory moved aside, the new one not in yet; only when replacing),
    POINT.renamed (the new one in place, the old one not yet removed).
    """
    final = Path(final)
    point = point or final.name
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a plain mkdir would not

    def commit() -> Path:
        fsync_tree(tmp)
        fault_point(f"{point}.synced")
        old = aside(final)
        if final.exists():
            if old.exists():  # left by an earlier crash; ``final`` is the complete one
                shutil.rmtree(old)
            os.replace(final, old)
            fsync_dir(final.parent)
            fault_point(f"{point}.aside")
        os.replace(tmp, final)
        fsync_dir(final.parent)
        fault_point(f"{point}.renamed")
        # The new directory is in place: a leftover old one is harmless (recover_dir clears it).
        shutil.rmtree(old, ignore_errors=True)
        return final

    return tmp, commit


def recover_dir(final: Path) -> None:
    """Finish or undo a commit of ``atomic_dir`` that a crash interrupted.

    ``.NAME.old`` without ``final`` is the complete old directory (the crash fell between the
    two renames): it goes back. Beside ``final`` it is a leftover (maybe half removed): it goes.
    """
    old = aside(final)
    if not old.exists():
        return
    if final.exists():
        shutil.rmtree(old)
    else:
        os.replace(old, final)
        fsync_dir(final.parent)


def remove_stale_temps(directory: Path) -> list[Path]:
    """Remove the temporary files and directories interrupted writes left in ``directory``
    (``.NAME.XXXXXXXX.tmp``); call it only while no other process writes there. Returns them."""
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if _TEMP_NAME.match(p.name)]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return stale


def remove_dir(directory: Path, point: str | None = None) -> None:
    """Remove a directory so that a crash never leaves it half removed under its own name: it is
    renamed to a temporary name first (write point ``point``), which ``remove_stale_temps``
    clears if the crash comes before ``rmtree`` is done."""
    trash = tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp")
    os.replace(directory, trash)  # a rename onto an empty directory replaces it
    if point:
        fault_point(point)
    shutil.rmtree(trash)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it (a line is either whole or absent after a crash);
    write point ``STEM.append`` once it is on the disk."""
    path = Path(path)
    created = not path.exists()
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        _sync_fd(f.fileno())
    if created:
        fsync_dir(path.parent)
    fault_point(f"{path.stem}.append")


# ---- a full disk ----------------------------------------------------------------------------------


def free_space(directory: Path) -> int:
    """Bytes free for this user on the file system of ``directory`` (0 when unknown)."""
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 0


def size_text(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # unreachable


def is_disk_full(err: BaseException, directory: Path) -> bool:
    """Whether a failed write ran out of disk space (or quota)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    # mlx's own file writer raises RuntimeError("[write] Unable to write ...") without an errno.
    return (
        isinstance(err, RuntimeError)
        and str(err).startswith("[write]")
        and free_space(directory) < _LOW_SPACE
    )


def is_write_error(err: BaseException) -> bool:
    """An error of the file system (not of the program) while writing: OSError, or mlx's
    writer's RuntimeError."""
    return isinstance(err, OSError) or (
        isinstance(err, RuntimeError) and str(err).startswith(("[write]", "[save_safetensors]"))
    )


def write_error_text(err: BaseException, directory: Path) -> str:
    """What went wrong with a write, for a one-line message."""
    if isinstance(err, OSError) and err.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if is_disk_full(err, directory):
        return f"disk full ({size_text(free_space(directory))} free)"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return first_line(err)


# ---- locks ----------------------------------------------------------------------------------------


@contextmanager
def exclusive_lock(path: Path, busy: Callable[[str], str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` for the ``with`` block; the file holds the
    holder's pid and is removed at the end of the block.

    The lock belongs to the open file, so the OS releases it when the process ends, however it
    ends (a killed process leaves the file behind, unlocked: the next holder takes it over). A
    held lock is not waited for: it is ``NrtError(busy(pid))``, ``pid`` the holder's ("" when
    unknown).
    """
    f = _locked_file(path, busy)
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        # Unlinked while still locked: a process that opened the file in the meantime finds it
        # gone once it gets the lock, and locks a new one (_locked_file).
        with suppress(OSError):
            path.unlink()
        f.close()


def _locked_file(path: Path, busy: Callable[[str], str]) -> IO[str]:
    while True:
        try:
            f = open(path, "a+")
        except OSError as err:
            raise NrtError(f"{path}: cannot create the lock file ({err.strerror})") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise NrtError(busy(holder)) from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP):
                f.close()
                raise NrtError(f"{path}: cannot lock it ({err.strerror})") from None
            # A network or FUSE file system without locks: training there is still the user's
            # call; say what is not guarded rather than refuse.
            print(
                f"warning: {path.parent}: this file system has no locks ({err.strerror}); nothing "
                "stops a second nrt-mlx process from training this run at the same time",
                file=sys.stderr,
            )
            return f
        try:
            if os.path.samestat(os.stat(path), os.fstat(f.fileno())):
                return f
        except FileNotFoundError:
            pass
        f.close()  # the previous holder removed the file as we locked it: lock the new one
