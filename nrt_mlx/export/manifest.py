"""Output directories that a rerun replaces only when they hold nothing but our own files.

``nrt-mlx fuse`` and ``nrt-mlx convert`` write a whole directory and list every file they wrote,
with its kind, in ``MANIFEST`` inside it. An existing output directory is replaced only when it is
empty or holds exactly an earlier output of the same command: the files its manifest lists and
nothing else. Anything else (a user's file beside an earlier output, a directory without a
manifest) is refused with the names of the files that are not ours, and nothing is deleted.

Outputs of nrt-mlx 0.1 have no manifest; ``OutputKind.is_legacy`` recognises them, and they are
replaced when every file has a name such an output has (``OutputKind.legacy_files``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from nrt_mlx import __version__
from nrt_mlx.errors import NrtError
from nrt_mlx.fileio import aside, atomic_dir, write_error_text

MANIFEST = ".nrt-mlx-manifest.json"
SHOWN = 3  # files named in a refusal
JUNK = {".DS_Store", "Thumbs.db", "desktop.ini"}  # files operating systems drop into folders


@dataclass(frozen=True)
class OutputKind:
    """What one command writes, and how to recognise its earlier outputs."""

    command: str  # "fuse" or "convert"
    what: str  # the output in messages: "a model fused by nrt-mlx"
    kinds: tuple[tuple[str, str], ...]  # (name pattern, kind) for the manifest; first match wins
    is_legacy: Callable[[Path], bool]  # an nrt-mlx 0.1 output (no manifest)?
    legacy_files: tuple[str, ...]  # name patterns of the files such an output holds


def kind_of(name: str, output: OutputKind) -> str:
    """The manifest kind of the file ``name`` (a path relative to the output directory)."""
    return next((kind for pattern, kind in output.kinds if fnmatchcase(name, pattern)), "other")


def write_manifest(directory: Path, output: OutputKind) -> None:
    """List every file of ``directory`` (all written by the command) in its manifest."""
    files = [{"path": name, "kind": kind_of(name, output)} for name in _walk(directory)]
    record = {"written_by": "nrt-mlx", "version": __version__, "command": output.command}
    text = json.dumps({**record, "files": files}, indent=2) + "\n"
    (directory / MANIFEST).write_text(text, encoding="utf-8")


def read_manifest(directory: Path) -> dict | None:
    """The manifest of ``directory``, or None when it has none or it is not one of ours."""
    try:
        data = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        files = data["files"]
        if data["written_by"] != "nrt-mlx" or not isinstance(data["command"], str):
            return None
        if not all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in files):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data


def check_output_dir(out: Path, output: OutputKind) -> None:
    """Raise unless ``out`` is missing, empty, or exactly an earlier output of the command."""
    if out.is_symlink():
        raise NrtError(
            f"{out}: is a symbolic link; give the directory it points to ({os.readlink(out)}) "
            "or another output directory"
        )
    if not out.exists():
        return
    if not out.is_dir():
        raise NrtError(f"{out}: exists and is not a directory; choose another output directory")
    manifest = read_manifest(out)
    if manifest is not None and manifest["command"] != output.command:
        raise NrtError(
            f"{out}: holds the output of 'nrt-mlx {manifest['command']}', which "
            f"'nrt-mlx {output.command}' does not replace; choose another output directory"
        )
    is_ours = _ours(out, output, manifest)
    foreign, more = _foreign(out, is_ours)
    if not foreign:
        return
    names = ", ".join(foreign) + (" and more" if more else "")
    if is_ours is None:
        raise NrtError(
            f"{out}: exists and is not {output.what} (it holds {names}); "
            "choose a new directory or empty it"
        )
    raise NrtError(
        f"{out}: holds files that are not part of {output.what} ({names}); "
        "move them elsewhere or choose another output directory"
    )


def write_output_dir(out: Path, output: OutputKind, fill: Callable[[Path], None]) -> Path:
    """Write a complete output folder at ``out`` through a temporary folder that ``fill`` writes
    into; a failed write (a file where a folder should be, a full disk) is one line, and leaves
    nothing behind."""
    tmp: Path | None = None
    try:
        tmp, commit = atomic_dir(out)
        fill(tmp)
        return finish_output_dir(tmp, out, output, commit)
    except (OSError, RuntimeError) as err:  # mlx's writer raises RuntimeError("[write] ...")
        if isinstance(err, RuntimeError) and "write" not in str(err).lower():
            raise
        where = out.parent if out.parent.is_dir() else Path.cwd()
        raise NrtError(
            f"{out}: could not write the output ({write_error_text(err, where)})"
        ) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def finish_output_dir(tmp: Path, out: Path, output: OutputKind, commit: Callable[[], Path]) -> Path:
    """Write the manifest and umask permissions into ``tmp``, then move it into place at ``out``.

    ``out`` is checked again (the user may have added a file while the model was written), and so
    is ``.NAME.old`` beside it (``fileio.aside``), which ``commit`` deletes when it exists.
    """
    write_manifest(tmp, output)
    apply_umask(tmp)
    check_output_dir(out, output)
    check_output_dir(aside(out), output)
    return commit()


def apply_umask(directory: Path) -> None:
    """Give ``directory`` and everything in it the permissions the user's umask gives.

    ``tempfile`` makes the directory 0700 and its files 0600, and mlx writes safetensors 0644,
    whatever the umask; a plain ``mkdir``/``open`` would give 0777/0666 less the umask. (fileio
    handles its own writes; this walk covers what other libraries wrote.)
    """
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _ours(out: Path, output: OutputKind, manifest: dict | None) -> Callable[[str], bool] | None:
    """Which entries of ``out`` an earlier output wrote, or None when ``out`` is not one."""
    if manifest is not None:
        return ({f["path"] for f in manifest["files"]} | {MANIFEST}).__contains__
    if output.is_legacy(out):
        return lambda name: (
            "/" not in name and any(fnmatchcase(name, p) for p in output.legacy_files)
        )
    return None


def _foreign(out: Path, is_ours: Callable[[str], bool] | None) -> tuple[list[str], bool]:
    """Up to ``SHOWN`` entries of ``out`` that are not ours (all are, without ``is_ours``), and
    whether there are more. Stops early: ``out`` may be a large directory given by mistake."""
    foreign: list[str] = []
    for name in _walk(out):
        if Path(name).name in JUNK or Path(name).name.startswith("._"):
            continue  # what Finder and exFAT drives leave behind is no one's work
        if is_ours is None or not is_ours(name):
            if len(foreign) == SHOWN:
                return foreign, True
            foreign.append(name if name.isprintable() else repr(name))
    return foreign, False


def _walk(directory: Path) -> Iterator[str]:
    """Relative paths of the files, links and empty directories (``name/``) under ``directory``,
    top level first, without following links. An entry that cannot be listed is an error: what
    cannot be seen cannot be known to be ours."""

    def fail(err: OSError) -> None:
        raise NrtError(
            f"{directory}: cannot list {err.filename} ({err.strerror}); "
            "fix its permissions or choose another output directory"
        )

    for root, dirs, files in os.walk(directory, onerror=fail):
        dirs.sort()
        rel = Path(root).relative_to(directory)
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        for name in sorted(files + links):
            yield (rel / name).as_posix()
        if not dirs and not files and rel != Path("."):
            yield rel.as_posix() + "/"
