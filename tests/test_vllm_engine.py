"""End-to-end Medusa tree decoding inside a real vLLM engine (vllm-cpu, in-process, float32, tiny trained model).

Every engine is started once; each runs all of its workloads in :func:`_run_engine` and is shut down before the next
one starts. The tests then compare the recorded outputs with the engine without speculation:

* greedy outputs token-identical for a batch of prompts of different lengths (one near ``max_model_len``) with two
  shipped 63-node trees and a chain;
* with trained heads: > 2 tokens per tree verification, and tree > chain with the same heads;
* requests finishing inside an accepted path (``max_tokens``, stop tokens) stop exactly where plain decoding does;
* a mixed batch (requests prefilling while others verify trees) stays token-identical;
* temperature > 0 with seeds: the distribution of the first sampled tokens matches plain decoding (chi-square);
* trees cut to a prefix by the token budget, requests at max_model_len and preempted requests stay identical;
* a tree engine whose attention is not the Medusa impl refuses to start.
"""
from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from medusa_plugin.core.tree import MedusaTree  # noqa: E402
from medusa_plugin.testing.tiny import build_tiny_medusa, tiny_prompts  # noqa: E402
from conftest import int8_kernel_runs  # noqa: E402

PROPOSER = "medusa_plugin.vllm_ext.proposer.MedusaTreeProposer"
CPU_WORKER = "medusa_plugin.vllm_ext.worker.MedusaCPUWorker"
MAX_MODEL_LEN = 256
NUM_HEADS = 4
TREES = ("mc_sim_7b_63", "vicuna_7b_stage2", f"chain:{NUM_HEADS}")
NUM_SAMPLES = 300          # seeded requests per engine for the T > 0 test
LOGPROB_REQUESTS = (1, 5)  # requests asking for logprobs (decoded without drafts) next to tree requests
SAMPLING_TEMPERATURE = 0.15  # peaked enough that sampled drafts get accepted


def _cache_dir() -> Path:
    return Path(os.environ.get("MEDUSA_TEST_CACHE", Path(tempfile.gettempdir()) / "medusa_plugin_test_cache"))


def _register_backend() -> None:
    """Register the Medusa CPU attention backend (the vllm.general_plugins entry point does it when installed)."""
    try:
        from medusa_plugin.vllm_ext.plugin import register
        register()
    except ImportError:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
        register_backend(AttentionBackendEnum.CPU_ATTN, "medusa_plugin.vllm_ext.attention.MedusaCPUAttentionBackend")


def _make_llm(model_dir: Path, heads_dir: Path, tree: str | None, medusa: dict | None = None, **overrides):
    from vllm import LLM

    kw = dict(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN,
              max_num_seqs=16, max_num_batched_tokens=1000, seed=0, disable_log_stats=False, **overrides)
    if tree is not None:
        _register_backend()
        kw.update(worker_cls=CPU_WORKER,
                  speculative_config={"method": "custom_class", "model": PROPOSER,
                                      "num_speculative_tokens": MedusaTree.load(tree).num_nodes},
                  additional_config={"medusa": {"heads": str(heads_dir), "tree": tree, **(medusa or {})}})
    return LLM(**kw)


def _spec_counters(llm) -> dict[str, float]:
    out = {}
    for m in llm.get_metrics():
        if m.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_accepted_tokens"):
            out[m.name] = m.value
    return out


def _runner_stats(llm, tree):
    """A copy of the Medusa runner's counters (``MedusaStats``) of the single worker."""
    if tree is None:
        return None
    import copy
    return copy.deepcopy(llm.collective_rpc(lambda self: self.model_runner.medusa_stats)[0])


def _tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


# ------------------------------------------------------------------------------------------------ workloads
def _prompts(tokenizer) -> dict[str, list]:
    """"batch": prompts of 3..40 tokens; "long": a prompt so long that no tree fits before max_model_len;
    "accept": prompts whose greedy continuations the heads were trained on (right heads)."""
    ids = tiny_prompts(tokenizer, 16, min_len=3, max_len=40, seed=7)
    long_ids = (sum(ids, []) * 8)[: MAX_MODEL_LEN - 20]
    trained_on = tiny_prompts(tokenizer, 48, seed=0)[:8]  # build_tiny_medusa's distillation prompts (seed 0)
    return {"batch": ids, "long": long_ids, "accept": trained_on}


def _as_inputs(token_lists):
    return [{"prompt_token_ids": t} for t in token_lists]


def _run_engine(model_dir, heads_dir, tree, prompts, stop_plan=None, medusa=None) -> dict:
    from vllm import SamplingParams

    llm = _make_llm(model_dir, heads_dir, tree, medusa)
    res: dict = {}
    try:
        if tree is not None:
            res["int8_drafting"] = llm.collective_rpc(lambda self: self.model_runner.drafter._heads_int8 is not None)[0]
        greedy = SamplingParams(temperature=0.0, max_tokens=24)
        res["batch"] = _tokens(llm.generate(_as_inputs(prompts["batch"]), greedy, use_tqdm=False))
        res["near_limit"] = _tokens(llm.generate(_as_inputs([prompts["long"]]),
                                                 SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
                                                 use_tqdm=False))

        before, stats_before = _spec_counters(llm), _runner_stats(llm, tree)
        res["accept_out"] = _tokens(llm.generate(_as_inputs(prompts["accept"]),
                                                 SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True),
                                                 use_tqdm=False))
        after = _spec_counters(llm)
        res["spec"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        stats_after = _runner_stats(llm, tree)
        if tree is not None:
            res["accept_tokens_per_step"] = 1 + ((stats_after.accepted - stats_before.accepted)
                                                 / (stats_after.steps - stats_before.steps))
        if tree is None or tree == TREES[0]:
            plan = stop_plan(res) if callable(stop_plan) else stop_plan
            res["plan"] = plan
            params = [SamplingParams(temperature=0.0, max_tokens=p["max_tokens"], stop_token_ids=p["stop"])
                      for p in plan]
            res["stops"] = _tokens(llm.generate(_as_inputs([p["prompt"] for p in plan]), params, use_tqdm=False))
            res["logprobs"] = _logprob_run(llm, prompts["accept"])
            mixed_before = _runner_stats(llm, tree)
            res["mixed"] = _mixed_batch(llm, prompts)
            if tree is not None:
                res["mixed_batches"] = _runner_stats(llm, tree).mixed_batches - mixed_before.mixed_batches
            stats_before = _runner_stats(llm, tree)
            res["samples"] = _samples(llm, prompts["accept"][0])
            res["stats"] = _runner_stats(llm, tree)
            if tree is not None:
                res["sample_accepted"] = res["stats"].accepted - stats_before.accepted
    finally:
        del llm
        gc.collect()
    return res


def _logprob_run(llm, prompts) -> list[tuple[list[int], list[dict[int, float]]]]:
    """Greedy batch in which LOGPROB_REQUESTS ask for top-2 logprobs: (tokens, logprobs per token) per request."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                             logprobs=2 if i in LOGPROB_REQUESTS else None) for i in range(len(prompts))]
    outs = llm.generate(_as_inputs(prompts), params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids),
             [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs or []]) for o in outs]


def _mixed_batch(llm, prompts) -> dict[str, list[int]]:
    """Three requests start decoding; two more (one long) are added while they verify trees."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    first, later = prompts["accept"][:3], [prompts["accept"][3], prompts["long"][:150]]
    for i, p in enumerate(first):
        engine.add_request(f"m{i}", {"prompt_token_ids": p}, params)
    done: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        if steps == 3:
            for j, p in enumerate(later):
                engine.add_request(f"m{3 + j}", {"prompt_token_ids": p}, params)
    return done


def _samples(llm, prompt) -> list[list[int]]:
    from vllm import SamplingParams

    params = [SamplingParams(temperature=SAMPLING_TEMPERATURE, max_tokens=3, seed=1000 + i,
                             top_k=50, top_p=0.95, ignore_eos=True)
              for i in range(NUM_SAMPLES)]
    return _tokens(llm.generate(_as_inputs([prompt] * NUM_SAMPLES), params, use_tqdm=False))


@pytest.fixture(scope="module")
def results():
    from transformers import AutoTokenizer

    model_dir, heads_dir = build_tiny_medusa(_cache_dir(), num_heads=NUM_HEADS)
    prompts = _prompts(AutoTokenizer.from_pretrained(model_dir))
    ref = _run_engine(model_dir, heads_dir, None, prompts, stop_plan=lambda r: _stop_plan(prompts, r))
    res = {"ref": ref, "plan": ref["plan"], "prompts": prompts}
    for tree in TREES:
        res[tree] = _run_engine(model_dir, heads_dir, tree, prompts, stop_plan=ref["plan"])
    res["preempted"] = _run_preempted(model_dir, heads_dir, prompts)
    # root-input heads, drafting with their int8 copy (core.int8_heads; float32 activations, slow but exact)
    res["root_input"] = _run_engine(model_dir, _root_input_heads(heads_dir), TREES[1], prompts,
                                    medusa={"int8_drafting": True} if int8_kernel_runs() else None)
    return res


def _root_input_heads(heads_dir: Path) -> Path:
    """The trained heads plus a small random ``root_proj`` (MedusaHeads root_input): still right often."""
    import torch

    from medusa_plugin.core.heads import MedusaHeads

    out = Path(tempfile.mkdtemp(prefix="medusa_root_heads_"))
    trained = MedusaHeads.from_pretrained(heads_dir)
    heads = MedusaHeads(trained.hidden_size, trained.num_heads, trained.num_layers, trained.vocab_size,
                        root_input=True, dtype=trained.dtype)
    g = torch.Generator().manual_seed(0)
    heads.load_state_dict({**trained.state_dict(), "root_proj.weight": 0.02 * torch.randn(
        heads.hidden_size, heads.hidden_size, generator=g, dtype=trained.dtype)})
    heads.save_pretrained(out)
    return out


def _run_preempted(model_dir, heads_dir, prompts) -> dict:
    """The greedy batch with so few KV blocks that trees (64 slots per request and step) force preemptions."""
    from vllm import SamplingParams

    llm = _make_llm(model_dir, heads_dir, TREES[0], num_gpu_blocks_override=24, block_size=32)
    try:
        out = _tokens(llm.generate(_as_inputs(prompts["batch"]), SamplingParams(temperature=0.0, max_tokens=24),
                                   use_tqdm=False))
        preemptions = {m.name: m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"}
        return {"batch": out, "preemptions": preemptions["vllm:num_preemptions"]}
    finally:
        del llm
        gc.collect()


def _stop_plan(prompts, ref) -> list[dict]:
    """Half the requests stop on a small max_tokens, half on a stop token first emitted mid-output; "expect" is the
    reference output (generated with ignore_eos) cut at the first stop condition, EOS included."""
    eos = 1  # testing.tiny: </s>
    plan = []
    for i, (p, out) in enumerate(zip(prompts["accept"], ref["accept_out"])):
        end = out.index(eos) + 1 if eos in out else len(out)
        firsts = [k for k in range(3, end) if out[k] not in out[:k]]  # first occurrences before any EOS
        if i % 2 == 0 or not firsts:
            n = 3 + i
            plan.append({"prompt": p, "max_tokens": n, "stop": [], "expect": out[:min(n, end)]})
        else:
            k = firsts[min(i // 2, len(firsts) - 1)]
            plan.append({"prompt": p, "max_tokens": 48, "stop": [out[k]], "expect": out[:k + 1]})
    return plan


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("tree", TREES)
def test_greedy_outputs_identical_to_no_speculation(results, tree):
    ref, got = results["ref"], results[tree]
    assert got["batch"] == ref["batch"]
    assert got["accept_out"] == ref["accept_out"]
    assert got["near_limit"] == ref["near_limit"] and len(ref["near_limit"][0]) == MAX_MODEL_LEN - len(
        results["prompts"]["long"])  # stopped by max_model_len
    assert got["spec"]["vllm:spec_decode_num_drafts"] > 0  # trees were really verified
    if "stats" in got:  # the token budget (1000 < 16 x 64) cut some trees to a prefix subtree
        assert got["stats"].truncated_trees > 0


def test_root_input_heads_greedy_identical_and_accepting(results):
    """Root-input heads drafting with int8 weights: identical output, and the int8 drafts still right often."""
    ref, got = results["ref"], results["root_input"]
    import torch

    from medusa_plugin.core.heads import native_half_matmul

    # true: a copy everywhere the kernel works; auto: only where the CPU multiplies bf16 natively (then in bf16)
    assert got["int8_drafting"] == int8_kernel_runs()
    assert results[TREES[1]]["int8_drafting"] == native_half_matmul(torch.bfloat16, "cpu")
    assert got["batch"] == ref["batch"] and got["accept_out"] == ref["accept_out"]
    assert got["near_limit"] == ref["near_limit"]
    # still right often (without the root the proposer would raise)
    assert got["accept_tokens_per_step"] > 2.0, got["accept_tokens_per_step"]


def test_preempted_requests_resume_identically(results):
    got = results["preempted"]
    assert got["preemptions"] > 0
    assert got["batch"] == results["ref"]["batch"]


def _tokens_per_step(res) -> float:
    spec = res["spec"]
    return 1.0 + spec["vllm:spec_decode_num_accepted_tokens"] / spec["vllm:spec_decode_num_drafts"]


def test_trained_heads_accept_more_than_two_tokens_per_step_and_tree_beats_chain(results):
    tree, chain = _tokens_per_step(results[TREES[0]]), _tokens_per_step(results[TREES[2]])
    assert tree > 2.0, f"mean tokens per tree step {tree:.2f}"
    assert tree > chain, f"tree {tree:.2f} tokens/step vs chain {chain:.2f}"
    # The runner's own counters agree with vLLM's spec-decode metrics.
    assert results[TREES[0]]["accept_tokens_per_step"] == pytest.approx(tree)


def test_request_finishing_inside_an_accepted_path(results):
    ref, got, plan = results["ref"]["stops"], results[TREES[0]]["stops"], results["plan"]
    assert got == ref
    assert got == [p["expect"] for p in plan]


def test_logprob_requests_next_to_tree_requests(results):
    ref, got = results["ref"]["logprobs"], results[TREES[0]]["logprobs"]
    assert [t for t, _ in got] == [t for t, _ in ref]
    for i in LOGPROB_REQUESTS:
        (_, lp_ref), (_, lp_got) = ref[i], got[i]
        assert len(lp_got) == len(lp_ref) == 16
        for a, b in zip(lp_got, lp_ref):
            assert a.keys() == b.keys()
            assert all(abs(a[k] - b[k]) < 1e-4 for k in a)


def test_mixed_prefill_and_tree_batch(results):
    got = results[TREES[0]]
    assert got["mixed"] == results["ref"]["mixed"]
    assert len(got["mixed"]) == 5
    assert got["mixed_batches"] > 0  # a prefill shared a step with tree verification


def _chi2_pvalue(a: list[int], b: list[int]) -> float:
    """Two-sample chi-square test (equal sample sizes) on tokens, rare tokens pooled into one bin."""
    from collections import Counter

    ca, cb = Counter(a), Counter(b)
    bins, rest_a, rest_b = [], 0, 0
    for tok in set(ca) | set(cb):
        if ca[tok] + cb[tok] >= 10:
            bins.append((ca[tok], cb[tok]))
        else:
            rest_a, rest_b = rest_a + ca[tok], rest_b + cb[tok]
    if rest_a + rest_b:
        bins.append((rest_a, rest_b))
    stat = sum((x - y) ** 2 / (x + y) for x, y in bins)
    df = len(bins) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


def test_sampling_distribution_matches_no_speculation(results):
    ref, got = results["ref"]["samples"], results[TREES[0]]["samples"]
    assert len(ref) == len(got) == NUM_SAMPLES
    for pos in (1, 2):  # token 0 comes from the prefill; tokens 1 and 2 from tree verification
        p = _chi2_pvalue([s[pos] for s in ref], [s[pos] for s in got])
        assert p > 1e-3, f"token {pos}: p-value {p:.2e}"
    # The same seeds do not give the same tokens (the tree consumes randomness differently), but drafts were accepted:
    assert results[TREES[0]]["sample_accepted"] > 0


def test_cpu_kv_views_read_what_the_cpu_kernel_writes():
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from medusa_plugin.vllm_ext.kv_layout import cpu_kv_layout, cpu_kv_views

    num_blocks, heads, block_size, head_dim = 5, 2, 32, 64
    isa = _get_attn_isa(torch.float32, block_size, head_dim, "auto")
    kv = torch.zeros(num_blocks, heads, block_size, 2 * head_dim)
    key_cache, value_cache = kv.view(num_blocks, heads, 2 * block_size, head_dim).chunk(2, dim=2)  # as CPU_ATTN
    g = torch.Generator().manual_seed(0)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:70]
    key, value = torch.randn(70, heads, head_dim, generator=g), torch.randn(70, heads, head_dim, generator=g)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0,
                                   kv_cache_dtype="auto")
    k_view, v_view = cpu_kv_views(kv, cpu_kv_layout(isa, torch.float32, block_size, head_dim))
    assert torch.equal(k_view[slots // block_size, slots % block_size], key)
    assert torch.equal(v_view[slots // block_size, slots % block_size], value)


def test_tree_without_medusa_attention_is_refused_at_startup(results, monkeypatch):
    """Stock CPU attention would silently attend siblings; the runner refuses to start with it (chains are fine)."""
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends import registry

    monkeypatch.setattr(registry, "_ATTN_OVERRIDES", {})
    monkeypatch.setattr("medusa_plugin.vllm_ext.plugin._registered", True, raising=False)  # no re-registration
    selector._cached_get_attn_backend.cache_clear()
    model_dir, heads_dir = build_tiny_medusa(_cache_dir(), num_heads=NUM_HEADS)
    try:
        with pytest.raises(Exception, match="not the Medusa tree attention"):
            _make_llm(model_dir, heads_dir, "mc_sim_7b_63")
    finally:
        selector._cached_get_attn_backend.cache_clear()
        gc.collect()
