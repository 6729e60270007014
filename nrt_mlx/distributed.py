"""Data-parallel training over ``mx.distributed``, started with ``mlx.launch``.

``mlx.launch -n 2 --backend ring -- nrt-mlx train recipe.yaml`` starts two processes ("ranks")
that train one run. Each samples and scores its share of every step's questions (whole questions,
``Group.share``), the gradients are summed across ranks before the one optimizer update, and rank
0 alone writes the run directory (``nrt_mlx.trainer``). This module holds the group and the few
collective operations a step needs, all built on ``all_sum`` (every backend has it):

- ``sum_tree``: the gradient all-reduce, one flat buffer per dtype;
- ``gather`` / ``broadcast``: small host values (JSON) of every rank, or of rank 0;
- ``broadcast_arrays``: rank 0's weights and optimizer state, so every rank starts identical.

A lost rank must never hang the others. MLX's ring backend has no timeout: a rank whose peer
died waits in the collective forever, and a rank waiting for a peer to connect blocks in
``accept``. So ``Watchdog`` ends the process with a one-line error when a collective waits longer
than ``NRT_MLX_DIST_TIMEOUT`` seconds (default 600, or 3x the longest step so far), and when
mlx.launch stops it (SIGTERM, which mlx.launch sends to every rank once one exits with an error).
The connection at start is bounded by the same timeout (``join``).
"""

from __future__ import annotations

import json
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from nrt_mlx.errors import NrtError, first_line

# Set by the launchers: mlx.launch (ring, jaccl, nccl) and mpirun.
RANK_VARS = ("MLX_RANK", "OMPI_COMM_WORLD_RANK")
TIMEOUT_ENV = "NRT_MLX_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 600.0  # seconds a rank may wait for the others at a collective
TIMEOUT_STEPS = 3.0  # ... or this many times the longest step so far, if that is longer
GRACE = 1.0  # seconds the main thread gets to end on a signal before the watchdog ends it
# TEST-ONLY: a directory where every rank writes its final trainable weights (rankR.safetensors).
RANK_WEIGHTS_ENV = "NRT_MLX_RANK_WEIGHTS"
ERROR_EXIT = 2  # the exit status of every nrt-mlx error


def launched_rank() -> int | None:
    """This process's rank as the launcher set it; None when no launcher started it."""
    for name in RANK_VARS:
        if os.environ.get(name, "").strip():
            try:
                return int(os.environ[name])
            except ValueError:
                raise NrtError(f"{name}={os.environ[name]!r} is not a rank number") from None
    return None


def timeout_seconds() -> float:
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise NrtError(f"{TIMEOUT_ENV}={value!r}: give the timeout in seconds, a number > 0")
    return seconds


class Stopped(NrtError):
    """Rank 0 was stopped by a signal (mlx.launch's SIGTERM when another rank exited)."""


class Watchdog:
    """Ends this process with a one-line error when it waits too long at a collective, or when it
    gets SIGTERM or SIGINT while waiting in one.

    A rank waiting in ``mx.eval`` of a collective runs no Python code (MLX releases the GIL but
    never returns), so neither a Python signal handler nor an exception can end it: a thread
    watches the deadline, and the signals through ``signal.set_wakeup_fd``. Outside collectives
    SIGTERM raises ``Stopped`` (rank 0) or ends the process silently (other ranks), and SIGINT
    raises KeyboardInterrupt as usual; the thread steps in only if the process is still there
    ``GRACE`` seconds later.
    """

    def __init__(self, rank: int, size: int, timeout: float) -> None:
        self.rank, self.size, self.timeout = rank, size, timeout
        self.hint = "nothing was trained yet; run the same command again"
        self.longest_step = 0.0
        self._deadline: float | None = None
        self._since = 0.0
        self._what = ""
        self._signals: dict[int, float] = {}
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._read = read
        signal.set_wakeup_fd(write)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        threading.Thread(target=self._watch, name="nrt-mlx-watchdog", daemon=True).start()

    def others(self) -> str:
        """The ranks this one waits for, as a message names them."""
        if self.rank == 0 and self.size > 1:
            return "rank 1" if self.size == 2 else f"one of ranks 1-{self.size - 1}"
        return "another rank"  # (the size is unknown until the ranks have connected)

    def stopped_message(self) -> str:
        return (
            f"rank 0 was stopped (SIGTERM, as mlx.launch does when a rank exits): {self.others()} "
            f"exited or could not be started (its error, if it printed one, and mlx.launch's "
            f"[WARN] line are above); {self.hint}"
        )

    def timeout_message(self, waited: float) -> str:
        return (
            f"rank {self.rank} waited {waited:.0f} s for {self.others()} at {self._what}: it "
            f"stopped or cannot be reached (check that it runs and the network between the "
            f"machines; {TIMEOUT_ENV} sets the timeout); {self.hint}"
        )

    @contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """Bound the wait of a collective operation named ``what`` (for the message)."""
        self._since, self._what = time.monotonic(), what
        self._deadline = self._since + max(self.timeout, TIMEOUT_STEPS * self.longest_step)
        try:
            yield
        finally:
            self._deadline = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.rank != 0:
            os._exit(ERROR_EXIT)  # stopped because another rank failed: its error is the news
        raise Stopped(self.stopped_message())

    def _watch(self) -> None:
        while True:
            ready, _, _ = select.select([self._read], [], [], 0.5)
            now = time.monotonic()
            if ready:
                for signum in os.read(self._read, 64):
                    self._signals.setdefault(signum, now)
            for signum, at in self._signals.items():
                if now - at > GRACE:  # the main thread could not act on it
                    if signum == signal.SIGINT:
                        self._exit(f"interrupted; {self.hint}", 130)
                    self._exit(f"error: {self.stopped_message()}" if self.rank == 0 else "")
            deadline = self._deadline
            if deadline is not None and now > deadline:
                self._exit(f"error: {self.timeout_message(now - self._since)}")

    def _exit(self, line: str, status: int = ERROR_EXIT) -> None:
        if line:
            os.write(2, f"{line}\n".encode())
        os._exit(status)


@dataclass
class Group:
    """The ranks of a run; one process (the default) is a group of one and never communicates."""

    rank: int = 0
    size: int = 1
    world: Any = None  # mx.distributed.Group
    watchdog: Watchdog | None = field(default=None, repr=False)

    @property
    def primary(self) -> bool:
        """Rank 0: the one that writes the run directory and prints."""
        return self.rank == 0

    def share(self, start: int, stop: int) -> range:
        """This rank's contiguous block of the questions [start, stop) (blocks differ in size by at
        most one, the larger first, so rank order is question order)."""
        size, extra = divmod(stop - start, self.size)
        first = start + self.rank * size + min(self.rank, extra)
        return range(first, first + size + (self.rank < extra))

    def set_hint(self, hint: str) -> None:
        """What the user can do when the run stops now (the checkpoint to continue from)."""
        if self.watchdog:
            self.watchdog.hint = hint

    def note_step(self, seconds: float) -> None:
        """A step's duration: a wait up to ``TIMEOUT_STEPS`` times the longest is not a loss."""
        if self.watchdog:
            self.watchdog.longest_step = max(self.watchdog.longest_step, seconds)

    def _sum(self, x: mx.array, what: str) -> mx.array:
        """``all_sum`` of ``x``, evaluated under the watchdog."""
        out = mx.distributed.all_sum(x, group=self.world)
        assert self.watchdog is not None
        with self.watchdog.waiting(what):
            try:
                mx.eval(out)
            except RuntimeError as err:  # the ring backend noticed a closed connection
                raise NrtError(
                    f"rank {self.rank} lost its connection to {self.watchdog.others()} at {what} "
                    f"({first_line(err)}); {self.watchdog.hint}"
                ) from None
        return out

    def sum_tree(self, tree: Any, what: str) -> Any:
        """Every rank's ``tree`` of arrays summed: one flat all_sum per dtype."""
        if self.size == 1:
            return tree
        flat = tree_flatten(tree)
        out: list[mx.array | None] = [None] * len(flat)
        for dtype in dict.fromkeys(v.dtype for _, v in flat):
            picked = [i for i, (_, v) in enumerate(flat) if v.dtype == dtype]
            summed = self._sum(mx.concatenate([flat[i][1].reshape(-1) for i in picked]), what)
            offsets = np.cumsum([0] + [flat[i][1].size for i in picked])
            for i, a, b in zip(picked, offsets[:-1], offsets[1:]):
                out[i] = summed[int(a) : int(b)].reshape(flat[i][1].shape)
        return tree_unflatten([(k, v) for (k, _), v in zip(flat, out)])

    def gather(self, value: Any, what: str) -> list[Any]:
        """Every rank's JSON-able ``value``, in rank order (on every rank)."""
        if self.size == 1:
            return [value]
        data = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
        sizes = np.zeros(self.size, dtype=np.int32)
        sizes[self.rank] = data.size
        sizes = np.array(self._sum(mx.array(sizes), what))
        buffer = np.zeros((self.size, int(sizes.max())), dtype=np.uint8)
        buffer[self.rank, : data.size] = data
        buffer = np.array(self._sum(mx.array(buffer), what))
        return [json.loads(buffer[r, : sizes[r]].tobytes()) for r in range(self.size)]

    def broadcast(self, value: Any, what: str) -> Any:
        """Rank 0's JSON-able ``value`` (the others pass anything, e.g. None)."""
        if self.size == 1:
            return value
        return self.gather(value if self.primary else None, what)[0]

    def broadcast_arrays(self, arrays: dict[str, mx.array], what: str) -> dict[str, mx.array]:
        """Rank 0's named arrays on every rank (the others pass {})."""
        if self.size == 1:
            return arrays
        names = [(k, list(v.shape), str(v.dtype).rsplit(".", 1)[-1]) for k, v in arrays.items()]
        names = self.broadcast(names, what)
        if not self.primary:
            arrays = {k: mx.zeros(shape, getattr(mx, dtype)) for k, shape, dtype in names}
        return dict(zip(arrays, self.sum_tree(list(arrays.values()), what)))


def join() -> Group:
    """The group of this process: one process unless a launcher started it, else its rank among
    the launched ones, connected within the timeout (a one-line error otherwise). Ranks other
    than 0 print nothing on stdout."""
    import sys

    rank = launched_rank()
    hostfile = Path(os.environ.get("MLX_HOSTFILE") or "/nonexistent")
    if rank is None or (hostfile.is_file() and not hostfile.read_text().strip()):
        return Group()  # not launched, or mlx.launch -n 1 (an empty hostfile)
    timeout = timeout_seconds()
    watchdog = Watchdog(rank, 0, timeout)  # before connecting: SIGTERM interrupts the wait
    # The ring backend waits for its left neighbour in accept() holding the GIL: only a signal
    # interrupts it (accept then fails and init raises).
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        world = mx.distributed.init(strict=True)
    except RuntimeError as err:
        raise NrtError(
            f"rank {rank}: could not connect to the other ranks within {timeout:.0f} s "
            f"({first_line(err)}); check that every host of the hostfile runs the command and is "
            f"reachable at its IP and port, and that no other run uses those ports "
            f"(mlx.launch --starting-port)"
        ) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    watchdog.size = world.size()
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  rank 0 alone reports
    return Group(world.rank(), world.size(), world, watchdog)


def dump_weights(model: Any, group: Group) -> None:
    """TEST-ONLY: with ``NRT_MLX_RANK_WEIGHTS=DIR``, write this rank's trainable weights to
    DIR/rankR.safetensors, so a test can check that every rank holds the same weights."""
    folder = os.environ.get(RANK_WEIGHTS_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        weights = dict(tree_flatten(model.trainable_parameters()))
        mx.save_safetensors(str(Path(folder) / f"rank{group.rank}.safetensors"), weights)


def share_training_state(group: Group, model: Any, optimizer: Any) -> None:
    """Every rank takes rank 0's trainable weights and optimizer state (bit for bit)."""
    mine: dict[str, mx.array] = {}
    if group.primary:
        mine = {f"model.{k}": v for k, v in tree_flatten(model.trainable_parameters())}
        mine |= {f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)}
    got = group.broadcast_arrays(mine, "the start (rank 0's weights)")
    if not group.primary:
        model.load_weights([(k[6:], v) for k, v in got.items() if k.startswith("model.")], False)
        state = [(k[10:], v) for k, v in got.items() if k.startswith("optimizer.")]
        optimizer.state = tree_unflatten(state)
        mx.eval(model.parameters(), optimizer.state)
