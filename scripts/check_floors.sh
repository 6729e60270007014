#!/usr/bin/env bash
# Check the dependency floors: install the lowest version pyproject.toml allows of each direct
# dependency (">=X" becomes "==X") into a temporary venv, print what was installed, and run a short
# subset of the tests there. Needs the package index (a few hundred MB); takes a few minutes.
#   bash scripts/check_floors.sh [pytest arguments, replacing the default subset]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="$(mktemp -d "${TMPDIR:-/tmp}/nrt-floors.XXXXXX")"
trap 'rm -rf "$VENV"' EXIT
"$PY" -m venv "$VENV"
source scripts/pip_quiet.sh
pip_install() { pip_quiet "$VENV/bin/python" install "$@"; }

# The pins, read from pyproject.toml with the markers of this platform applied.
# tomllib is Python 3.11+; requires-python allows 3.10, whose venv reads the file with tomli.
pip_install "packaging>=24" "tomli>=1.1; python_version < '3.11'"
mapfile -t PINS < <("$VENV/bin/python" - <<'EOF'
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from packaging.requirements import Requirement

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for line in project["dependencies"] + [
    r for r in project["optional-dependencies"]["dev"] if r.startswith("pytest")
]:
    req = Requirement(line)
    if req.marker and not req.marker.evaluate():
        continue
    floor = [s.version for s in req.specifier if s.operator == ">="]
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    print(f"{req.name}{extras}=={floor[0]}" if floor else f"{req.name}{extras}")
EOF
)
echo "floors: ${PINS[*]}"
pip_install "${PINS[@]}" "setuptools>=77"
pip_install --no-deps --no-build-isolation -e .
echo "installed:"
"$VENV/bin/python" -m pip list --format=freeze |
  grep -iE '^(mlx|mlx-cpu|mlx-lm|numpy|huggingface.hub|typer|rich|pyyaml|tokenizers|matplotlib|transformers|pytest)==' |
  sed 's/^/  /'

if [ "$#" -eq 0 ]; then
  set -- tests/test_vocab.py tests/test_objective.py tests/test_plot.py tests/test_hub.py \
    tests/test_train.py -k "not test_train.py or sft_baseline or fuses_into"
fi
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
