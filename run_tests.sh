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
# Tests run in STSEG_TEST_WORKERS parallel processes (default 2; 1 = one process), one torch
# thread each so that the workers do not oversubscribe the cores; nnU-Net's own commands set
# torch to every core on the CPU, so OpenMP threads that wait sleep instead of spinning
# (OMP_WAIT_POLICY=PASSIVE: two concurrent trainings took 20.7 s spinning, 13.7 s passive).
# The stock commands run as forks of a server that imported torch and nnU-Net once
# (tests/forkserver.py; STSEG_TEST_FORKSERVER=0: real processes). tests/conftest.py puts every
# test in an xdist group (the users of one set of trained models run in one worker, which builds
# them once) and orders the groups so that the two expensive builds start first, one per worker.
# --durations lists the slowest tests at the end.
WORKERS="${STSEG_TEST_WORKERS:-2}"
PARALLEL=()
if [ "$WORKERS" -gt 1 ]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
  PARALLEL=(-n "$WORKERS" --dist loadgroup --no-loadscope-reorder)
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 ${PARALLEL[@]+"${PARALLEL[@]}"} "$@"
