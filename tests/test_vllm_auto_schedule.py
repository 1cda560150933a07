"""``tree_schedule: auto`` on a CPU: the step cost is measured inside the engine at start-up and cached, the
schedule follows the acceptance observed in serving, and greedy output stays token-identical to plain decoding."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest.importorskip("torch")
pytest.importorskip("vllm")

from medusa_plugin.core.schedule import TreeSchedule  # noqa: E402
from medusa_plugin.core.step_time_fit import StepTimeFit  # noqa: E402
from medusa_plugin.testing.tiny import build_tiny_medusa, tiny_prompts  # noqa: E402

TREE = "mc_sim_7b_63"
MAX_TOKENS = 24


def _cache_dir() -> Path:  # the same cache as tests/test_vllm_engine.py, so the tiny model is built once
    return Path(os.environ.get("MEDUSA_TEST_CACHE", Path(tempfile.gettempdir()) / "medusa_plugin_test_cache"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from transformers import AutoTokenizer

    from medusa_plugin.vllm_ext import offline
    from medusa_plugin.vllm_ext.profiling import runner_of

    model_dir, heads_dir = build_tiny_medusa(_cache_dir())
    prompts = tiny_prompts(AutoTokenizer.from_pretrained(model_dir), 2, seed=0)
    cache = tmp_path_factory.mktemp("medusa_cache")
    out: dict = {"cache": cache}
    llm = offline.build_llm(str(model_dir), max_model_len=256, max_num_seqs=4)
    try:
        out["plain"] = {b: offline.run(llm, prompts[:b], MAX_TOKENS, ignore_eos=True) for b in (1, 2)}
    finally:
        offline.shutdown(llm)
        del llm
    old = os.environ.get("MEDUSA_PLUGIN_CACHE")
    os.environ["MEDUSA_PLUGIN_CACHE"] = str(cache)
    try:
        llm = offline.build_llm(str(model_dir), max_model_len=256, max_num_seqs=4,
                                medusa={"heads": str(heads_dir), "tree": TREE, "tree_schedule": "auto"})
        try:
            proposer = runner_of(llm).drafter
            out["initial"] = proposer.schedule
            # From here on, costs that make speculation pay at every size (the measured ones are machine-dependent),
            # so that tree steps happen and the observed acceptance must reach the schedule.
            from medusa_plugin.vllm_ext import calibrate
            flat = dict(proposer._step_cost, forward_ms={"1": 1.0, "4096": 1.0}, tree_attention_ms={},
                        draft_ms={k: [0.0] * len(v) for k, v in proposer._step_cost["draft_ms"].items()})
            proposer._step_cost, proposer.REFRESH_EVERY = flat, 4
            # and no learnt per-step / per-row time on top (it would price the tree steps of this machine again)
            proposer.step_time = StepTimeFit(min_steps=10**9)
            proposer.schedule = calibrate.schedule_from(flat, proposer, proposer.acceptance.accept_lengths())
            out["medusa"] = {b: offline.run(llm, prompts[:b], MAX_TOKENS, ignore_eos=True) for b in (1, 2)}
            out["observed"] = proposer.acceptance.observed
            out["accept_lengths"] = proposer.acceptance.accept_lengths()
            out["final"] = proposer.schedule
        finally:
            offline.shutdown(llm)
            del llm
    finally:
        if old is None:
            os.environ.pop("MEDUSA_PLUGIN_CACHE", None)
        else:
            os.environ["MEDUSA_PLUGIN_CACHE"] = old
    return out


def test_auto_measures_in_the_engine_and_caches(runs):
    files = list((runs["cache"] / "step_cost").glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["max_num_seqs"] == 4 and data["batch_sizes"] == [1, 2, 4]
    assert int(min(data["forward_ms"], key=int)) == 1 and all(v > 0 for v in data["forward_ms"].values())
    # the vocabulary projection is timed over the same rows and counted in the forward (tree rows are all scored)
    assert set(data["logits_ms"]) == set(data["forward_ms"])
    assert all(data["forward_ms"][r] >= data["logits_ms"][r] > 0 for r in data["forward_ms"])
    assert set(data["draft_ms"]) == {"1", "2", "4"} and all(len(v) == 4 for v in data["draft_ms"].values())
    # the tree-attention path, timed on the engine's own KV cache: per batch size, for query lengths up to the tree
    attn = data["tree_attention_ms"]
    assert set(attn) == {"1", "2", "4"} and all(max(map(int, row)) == 64 for row in attn.values())
    assert all(v > 0 for row in attn.values() for v in row.values())
    assert attn["4"]["64"] > attn["1"]["2"]
    sched = runs["initial"]
    assert isinstance(sched, TreeSchedule) and "measured in the engine" in sched.meta["source"]
    assert sched.max_batch_size == 4


def test_auto_schedule_output_identical_to_plain(runs):
    for b in (1, 2):
        assert runs["medusa"][b].token_ids == runs["plain"][b].token_ids


def test_observed_acceptance_feeds_the_schedule(runs):
    assert runs["observed"] > 0
    el = runs["accept_lengths"]
    assert runs["final"].accept_lengths == pytest.approx(el, abs=0.2)  # refreshed from the estimator
    assert runs["final"].accept_lengths != pytest.approx(runs["initial"].accept_lengths, abs=0.05)  # not the prior
