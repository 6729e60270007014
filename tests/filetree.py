"""Helpers for output-directory tests: what a folder holds, byte for byte, and its permissions."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

MANIFEST = ".nrt-mlx-manifest.json"  # spelled out: tests must not take it from the code under test


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder``: relative path -> file bytes (None for a directory)."""
    out: dict[str, bytes | None] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        out[rel] = None if path.is_dir() else path.read_bytes()
    return out


def modes(folder: Path) -> dict[str, int]:
    """Permission bits of ``folder`` (key ".") and of everything under it."""
    out = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        out[path.relative_to(folder).as_posix()] = stat.S_IMODE(path.lstat().st_mode)
    return out


def manifest_files(folder: Path) -> dict[str, str]:
    """The manifest's files as {path: kind}."""
    return {f["path"]: f["kind"] for f in json.loads((folder / MANIFEST).read_text())["files"]}


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Set the process umask inside a ``with`` block; the old one is restored after."""
    saved = os.umask(mask)
    try:
        yield
    finally:
        os.umask(saved)
