# Sourced by setup.sh and check_floors.sh: `pip_quiet PYTHON ARGS...` runs `PYTHON -m pip -q ARGS`
# and hides exactly two notes that are not problems, so that what remains on screen is:
# - "WARNING: Location 'file:///...' is ignored: it is neither a file nor a directory.": a local
#   package folder named in the machine's pip configuration (find-links, extra-index-url) is absent;
# - setuptools' "Editable installation." notice, printed on every editable install of a package
#   beside the project's other folders ("be careful with folders named like your package").
pip_quiet() {
  local python="$1"
  shift
  PYTHONWARNINGS="ignore:Editable installation" PIP_DISABLE_PIP_VERSION_CHECK=1 \
    "$python" -m pip -q "$@" \
    2> >(grep -v "^WARNING: Location 'file://[^']*' is ignored: it is neither a file nor a directory\.$" >&2)
}
