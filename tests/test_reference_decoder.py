"""The reference Medusa decoder (hf/generate.py) against plain greedy ``model.generate``."""

from __future__ import annotations

import functools

import pytest
import torch

from medusa_plugin.core.heads import MedusaHeads
from medusa_plugin.core.tree import MedusaTree, shipped_tree_names
from medusa_plugin.hf.generate import MedusaGenerateError, baseline_generate, medusa_generate
from medusa_plugin.testing import tiny_prompts

# "+acceptance-order": mc_sim_7b_63 in order of expected acceptance (what a scheduled proposer verifies)
TREES = shipped_tree_names() + ["chain:4", "mc_sim_7b_63+acceptance-order"]


def _tree(spec: str) -> MedusaTree:
    from medusa_plugin.core.schedule import default_accuracy

    name, _, order = spec.partition("+")
    tree = MedusaTree.load(name)
    return tree.in_acceptance_order(default_accuracy()) if order else tree
ARCHS = ["llama", "qwen2"]
MAX_NEW = 32  # trained heads (long accepted paths)
MAX_NEW_RANDOM = 16  # random heads: about one token per step, so steps are what costs


@pytest.fixture(scope="module")
def setup(tiny_medusa):
    """setup(arch, heads_kind) -> (model, heads, prompts, reference outputs); prompts have different lengths and
    are the heads' training prompts (so trained heads are right often)."""

    @functools.cache
    def get(arch: str, kind: str):
        model, tok, trained = tiny_medusa(arch)
        if kind == "trained":
            heads = trained
        else:
            torch.manual_seed(1)
            heads = MedusaHeads(model.config.hidden_size, 4, 1, model.config.vocab_size).eval()
        prompts = tiny_prompts(tok, 3)
        assert len({len(p) for p in prompts}) > 1
        return model, heads, prompts, ref(arch, tuple(map(tuple, prompts)))

    @functools.cache
    def ref(arch, prompts):
        return baseline_generate(tiny_medusa(arch)[0], [list(p) for p in prompts], MAX_NEW)

    return get


@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("kind", ["random", "trained"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_generate(setup, arch, kind, tree):
    model, heads, prompts, ref = setup(arch, kind)
    max_new = MAX_NEW if kind == "trained" else MAX_NEW_RANDOM
    out = medusa_generate(model, heads, _tree(tree), prompts, max_new_tokens=max_new)
    assert out.sequences == [r[:max_new] for r in ref]
    st = out.stats
    assert st.tokens == len(prompts) * max_new
    if kind == "trained":  # long accepted paths: KV compaction is exercised
        assert st.mean_accepted_tokens_per_step > 2, st
    assert max(max(s) for s in st.step_tokens) <= _tree(tree).max_depth + 1


def test_stats_consistent(setup):
    model, heads, prompts, _ = setup("llama", "trained")
    st = medusa_generate(model, heads, "mc_sim_7b_63", prompts, max_new_tokens=MAX_NEW).stats
    acc = st.acceptance_per_depth
    assert len(acc) == 4 and all(a >= b for a, b in zip(acc, acc[1:])) and acc[0] > 0
    # E[L + 1] = 1 + sum_d P(L >= d)
    assert st.mean_accepted_tokens_per_step == pytest.approx(1 + sum(acc))
    assert st.request_steps == sum(len(s) for s in st.step_tokens)
    assert st.steps == max(len(s) for s in st.step_tokens)


def test_eos_inside_accepted_path(setup):
    model, heads, prompts, _ = setup("llama", "trained")
    free = medusa_generate(model, heads, "mc_sim_7b_63", prompts, max_new_tokens=MAX_NEW)
    # Pick a token emitted in the middle of a multi-token step, at its first occurrence in that request's output.
    pick = None
    for b, (seq, steps) in enumerate(zip(free.sequences, free.stats.step_tokens)):
        start = 1  # the prefill token comes first
        for n in steps:
            for j in range(start, min(start + n - 1, len(seq))):
                if seq.index(seq[j]) == j and pick is None:
                    pick = b, j, seq[j]
            start += n
    assert pick is not None, "no multi-token step: the trained heads are not right often enough"
    b, j, eos = pick
    out = medusa_generate(model, heads, "mc_sim_7b_63", prompts, max_new_tokens=MAX_NEW, eos_token_id=eos)
    assert out.sequences == baseline_generate(model, prompts, MAX_NEW, eos_token_id=eos)
    assert out.sequences[b] == free.sequences[b][: j + 1]
    # the step that emitted eos had accepted tokens after it, which were dropped
    assert 1 + sum(out.stats.step_tokens[b]) > len(out.sequences[b])
    others = [i for i in range(len(prompts)) if eos not in free.sequences[i]]
    for i in others:  # requests finish independently
        assert out.sequences[i] == free.sequences[i]


def test_sampling_and_typical_reduce_to_greedy(setup):
    model, heads, prompts, ref = setup("qwen2", "trained")
    g = torch.Generator().manual_seed(0)
    top1 = medusa_generate(model, heads, "mc_sim_7b_63", prompts, max_new_tokens=MAX_NEW, rule="sampling",
                           temperature=1.0, top_k=1, generator=g)
    assert top1.sequences == ref
    typ = medusa_generate(model, heads, "mc_sim_7b_63", prompts, max_new_tokens=MAX_NEW, rule="typical",
                          temperature=0.0)
    assert typ.sequences == ref


def test_sampling_is_seeded(setup):
    model, heads, prompts, _ = setup("llama", "trained")
    run = lambda seed: medusa_generate(model, heads, "mc_sim_7b_63", prompts, max_new_tokens=12, rule="sampling",
                                       temperature=1.0, generator=torch.Generator().manual_seed(seed)).sequences
    a = run(0)
    assert a == run(0)
    assert all(len(s) == 12 for s in a)


def test_bad_input_errors(setup):
    model, heads, prompts, _ = setup("llama", "random")
    with pytest.raises(MedusaGenerateError, match="depth 5"):
        medusa_generate(model, heads, "chain:5", prompts, max_new_tokens=4)
    with pytest.raises(MedusaGenerateError, match="at least one token"):
        medusa_generate(model, heads, "chain:2", [[1, 2], []], max_new_tokens=4)
    with pytest.raises(MedusaGenerateError, match="rule"):
        medusa_generate(model, heads, "chain:2", prompts, max_new_tokens=4, rule="beam")


def test_sampling_matches_model_distribution(setup):
    """Lossless end to end: the joint law of the first 3 tokens under Medusa sampling (top-k 2, T=1) equals the
    model's, computed exactly over the 8 possible sequences (chi-square, 7 dof, fixed seed)."""
    model, heads, prompts, _ = setup("llama", "trained")
    prompt, n = prompts[0], 600

    def top2(prefix):
        with torch.no_grad():
            logits = model(torch.tensor([prefix])).logits[0, -1]
        v, i = logits.topk(2)
        return list(zip(i.tolist(), v.softmax(-1).tolist()))

    exact = {}
    for a, pa in top2(prompt):
        for b, pb in top2(prompt + [a]):
            for c, pc in top2(prompt + [a, b]):
                exact[(a, b, c)] = pa * pb * pc
    out = medusa_generate(model, heads, "mc_sim_7b_63", [prompt] * n, max_new_tokens=3, rule="sampling",
                          temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    seen = [tuple(s) for s in out.sequences]
    assert set(seen) <= set(exact)
    chi2 = sum((seen.count(k) - n * p) ** 2 / (n * p) for k, p in exact.items())
    assert chi2 < 24.3, (chi2, exact)  # p = 0.001
    assert out.stats.mean_accepted_tokens_per_step > 1  # drafts were accepted, not only bonus tokens


def test_requests_finishing_at_prefill(setup):
    model, heads, prompts, ref = setup("llama", "trained")
    assert medusa_generate(model, heads, "mc_sim_7b_63", prompts, max_new_tokens=1).sequences == [r[:1] for r in ref]
    # request 0 stops on its first token (eos), the others run on in a smaller batch
    eos = ref[0][0]
    out = medusa_generate(model, heads, "mc_sim_7b_63", prompts, max_new_tokens=MAX_NEW, eos_token_id=eos)
    assert out.sequences == baseline_generate(model, prompts, MAX_NEW, eos_token_id=eos)
    assert out.sequences[0] == [eos] and out.stats.step_tokens[0] == []
