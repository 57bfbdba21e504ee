#!/usr/bin/env bash
# One command on a GPU machine: a fresh venv with only fcn_jax[gpu], then bench/gpu_check.py.
#   bash bench/gpu_check.sh [--quick] [--budget SECONDS] [--json out.json]
# VENV=path reuses (or creates) that venv; PYTHON=python3.12 picks the interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fcn_jax/gpu-check-venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e "$ROOT[gpu]"
cd "$ROOT"
exec "$VENV/bin/python" bench/gpu_check.py "$@"
