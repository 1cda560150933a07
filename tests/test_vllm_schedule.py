"""The batch-aware tree schedule and ``max_batch_size`` inside a real vLLM engine (vllm-cpu, in-process).

With ``tree_schedule`` set, each step drafts the first ``schedule.num_nodes(batch)`` nodes of the tree, and above
``max_batch_size`` running requests it drafts nothing; either way the output stays token-identical to plain decoding.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest.importorskip("torch")
pytest.importorskip("vllm")

from medusa_plugin.core.schedule import TreeSchedule  # noqa: E402
from medusa_plugin.testing.tiny import build_tiny_medusa, tiny_prompts  # noqa: E402

TREE = "mc_sim_7b_63"
MAX_BATCH = 2
MAX_TOKENS = 16


def _cache_dir() -> Path:  # the same cache as tests/test_vllm_engine.py, so the tiny model is built once
    return Path(os.environ.get("MEDUSA_TEST_CACHE", Path(tempfile.gettempdir()) / "medusa_plugin_test_cache"))


def _schedule_yaml(path: Path) -> Path:
    """Overheads that make the full tree best at batch 1, a smaller prefix best at batch 2, and the full tree again
    at batch 3 (where max_batch_size must win)."""
    sched = TreeSchedule(batch_sizes=[1, 2, 3], query_tokens=[1, 16, 64],
                         overhead=[[1.0, 1.0, 1.0], [1.0, 1.0, 4.0], [1.0, 1.0, 1.0]],
                         accept_lengths=[1.0] * 64)
    sched.to_yaml(path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from transformers import AutoTokenizer

    from medusa_plugin.vllm_ext import offline

    model_dir, heads_dir = build_tiny_medusa(_cache_dir())
    prompts = tiny_prompts(AutoTokenizer.from_pretrained(model_dir), 3, seed=0)
    schedule_path = _schedule_yaml(tmp_path_factory.mktemp("sched") / "schedule.yaml")
    batches = {1: prompts[:1], 2: prompts[:2], 3: prompts[:3]}

    out: dict = {"schedule": TreeSchedule.resolve(str(schedule_path), TREE)}
    llm = offline.build_llm(str(model_dir), max_model_len=256)
    try:
        out["plain"] = {b: offline.run(llm, p, MAX_TOKENS, ignore_eos=True) for b, p in batches.items()}
    finally:
        offline.shutdown(llm)
        del llm
    medusa = {"heads": str(heads_dir), "tree": TREE, "tree_schedule": str(schedule_path), "max_batch_size": MAX_BATCH}
    llm = offline.build_llm(str(model_dir), medusa=medusa, max_model_len=256)
    try:
        out["medusa"] = {b: offline.run(llm, p, MAX_TOKENS, ignore_eos=True) for b, p in batches.items()}
    finally:
        offline.shutdown(llm)
    return out


def test_schedule_fixture_is_discriminating(runs):
    sched = runs["schedule"]
    assert sched.num_nodes(1) == 63
    assert 0 < sched.num_nodes(2) < 63
    assert sched.num_nodes(3) == 63  # only max_batch_size turns speculation off at batch 3


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_outputs_identical_to_plain_decoding(runs, batch):
    assert runs["medusa"][batch].token_ids == runs["plain"][batch].token_ids


def test_single_request_verifies_the_full_scheduled_tree(runs):
    m = runs["medusa"][1].metrics
    assert m, "no speculative step was recorded"
    assert m["num_draft_tokens"] == m["num_drafts"] * runs["schedule"].num_nodes(1)
    assert m["mean_tokens_per_step"] > 1.0


def test_two_requests_verify_the_smaller_scheduled_prefix(runs):
    m, sched = runs["medusa"][2].metrics, runs["schedule"]
    assert m, "no speculative step was recorded"
    # While both requests run, each step drafts num_nodes(2) per request; once one finishes, the other drafts
    # num_nodes(1). Plain full trees throughout would give exactly num_nodes(1) per draft.
    assert m["num_drafts"] * sched.num_nodes(2) <= m["num_draft_tokens"] < m["num_drafts"] * sched.num_nodes(1)


def test_no_speculation_above_max_batch_size(runs):
    assert runs["medusa"][3].metrics == {}
