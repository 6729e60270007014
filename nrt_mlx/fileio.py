"""Atomic file writes: a crash mid-write never leaves a half-written file in the run directory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nrt_mlx.errors import NrtError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_dir(final: str | Path) -> tuple[Path, Callable[[], Path]]:
    """A temporary directory beside ``final`` and a function that moves it into place.

    Files are written into the temporary directory; ``commit()`` renames it over ``final`` (an
    existing ``final`` is moved aside first and removed only after the rename succeeded).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))

    def commit() -> Path:
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return final

    return tmp, commit


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it (a line is either whole or absent after a crash)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_replaceable(out: Path, is_ours: Callable[[Path], bool], what: str) -> None:
    """Refuse to write a directory over user data: ``out`` may be missing, empty, or an earlier
    output of the same command (``is_ours``); ``what`` names that output in the error."""
    if not out.exists():
        return
    if not out.is_dir():
        raise NrtError(f"{out}: exists and is not a directory; choose another output directory")
    if any(out.iterdir()) and not is_ours(out):
        raise NrtError(f"{out}: exists and is not {what}; choose a new directory or empty it")
