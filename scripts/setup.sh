#!/usr/bin/env bash
# Set up nrt-mlx in ./.venv: on Debian/Ubuntu also the system OpenBLAS that makes MLX's CPU backend
# ~40x faster (see nrt_mlx/blas.py). Safe to run again; prints nothing new when all is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1; then
  if ! ls /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null \
      || echo "note: could not install libopenblas0-pthread; MLX will use its slow bundled BLAS" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
source scripts/pip_quiet.sh
pip_quiet .venv/bin/python install --upgrade pip
pip_quiet .venv/bin/python install -e ".[dev]"
