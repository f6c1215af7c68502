#!/usr/bin/env bash
# Install nnunet-stseg with its test extras into ./.venv (created when missing) and run the tests.
# Extra arguments go to pytest, e.g. ./run_tests.sh -m "not slow" for the fast unit tests only.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
export nnUNet_compile="${nnUNet_compile:-f}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
