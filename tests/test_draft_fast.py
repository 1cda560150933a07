"""The fast draft path (``MedusaHeads.draft_topk`` + ``MedusaTree.candidates_from_topk``, only the heads a tree
prefix needs, shared projection as one GEMM, top-k on the truncated vocabulary) drafts exactly the tokens of the
reference path (``MedusaHeads.forward`` -> full logits -> ``MedusaTree.build_candidates``)."""

import pytest
import torch

from medusa_plugin.core.heads import MedusaHeads, MedusaHeadsError
from medusa_plugin.core.tree import MedusaTree, MedusaTreeError

H, V, K = 32, 300, 4


def _heads(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    token_map = None
    if kind == "token_map":
        token_map = torch.randperm(V, generator=g)[:120].sort().values
    heads = MedusaHeads(H, K, 1, V, own_lm_head=kind != "v2", shared_lm_head=kind == "shared", token_map=token_map)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    base = torch.randn(V + 12, H, generator=g)  # a base lm_head padded past the vocabulary, as vLLM's
    return heads.eval(), base


@pytest.mark.parametrize("kind", ["v1", "shared", "v2", "token_map"])
@pytest.mark.parametrize("tree_name", ["mc_sim_7b_63", "chain:4", "[[0], [1], [0, 0], [1, 0], [1, 0, 2]]"])
def test_fast_candidates_equal_reference(kind, tree_name):
    heads, base = _heads(kind)
    tree = MedusaTree.load(tree_name)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, H, generator=g)
    roots = torch.randint(0, V, (5,), generator=g)
    lm_head = base if kind == "v2" else None
    ref = tree.build_candidates(roots, heads(hidden, lm_head=None if lm_head is None else lm_head[:V])[..., :V])
    for n in sorted({0, 1, 2, tree.nodes_per_depth[0], min(tree.num_nodes, 12), tree.num_nodes}):
        depth = tree.prefix_depth[n]
        top = heads.draft_topk(hidden, tree.topk, max(depth, 1), lm_head=lm_head, vocab_size=V)
        assert top.shape == (5, max(depth, 1), tree.topk) and top.dtype == torch.int64
        assert int(top.max()) < V
        fast = tree.candidates_from_topk(roots, top, n)
        assert torch.equal(fast, ref[:, : n + 1]), (kind, tree_name, n)


def test_prefix_depth_is_the_deepest_node_of_the_prefix():
    tree = MedusaTree.load("mc_sim_7b_63")
    for n in range(tree.num_nodes + 1):
        assert tree.prefix_depth[n] == int(tree.depth[: n + 1].max())


def test_only_the_needed_heads_run():
    heads, _ = _heads("v1")
    calls = []
    for k, seq in enumerate(heads.blocks):
        seq.register_forward_hook(lambda *a, k=k: calls.append(k))
    heads.draft_topk(torch.randn(2, H), 10, 2)
    assert calls == [0, 1]


def test_draft_errors():
    heads, base = _heads("v2")
    tree = MedusaTree.load("chain:4")
    with pytest.raises(MedusaHeadsError, match="lm_head"):
        heads.draft_topk(torch.randn(1, H), 10, 2)
    with pytest.raises(MedusaHeadsError, match="num_heads"):
        heads.draft_topk(torch.randn(1, H), 10, 5, lm_head=base)
    with pytest.raises(MedusaHeadsError, match="hidden"):
        heads.draft_topk(torch.randn(1, H + 1), 10, 1, lm_head=base)
    top = heads.draft_topk(torch.randn(1, H), 10, 1, lm_head=base)
    with pytest.raises(MedusaTreeError, match="depth 2"):
        tree.candidates_from_topk(torch.zeros(1, dtype=torch.int64), top, 2)
    with pytest.raises(MedusaTreeError, match="depth 2"):  # the proposer's host lookup checks the same
        tree.candidates_from_topk_host(top.tolist(), 2)
    with pytest.raises(MedusaTreeError, match="outside"):
        tree.candidates_from_topk_host(top.tolist(), 5)


@pytest.mark.parametrize("kind", ["v1", "shared", "v2", "token_map"])
def test_dynamic_trees_from_the_draft_top_k_equal_trees_from_full_logits(kind):
    """``draft_topk_probs`` (softmax over the projected rows only) + ``DynamicTreeSpec.build_from_topk`` give the
    probabilities, ids and trees of the reference ``forward`` -> ``[B, K, V]`` logits -> ``DynamicTreeSpec.build``."""
    from medusa_plugin.core.dynamic_tree import DynamicTreeSpec

    heads, base = _heads(kind)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, H, generator=g)
    roots = torch.randint(0, V, (6,), generator=g)
    lm_head = base if kind == "v2" else None
    logits = heads(hidden, lm_head=None if lm_head is None else lm_head[:V])[..., :V]
    want = logits.float().softmax(-1).topk(5, dim=-1)
    probs, ids = heads.draft_topk_probs(hidden, 5, lm_head=lm_head, vocab_size=V)
    assert probs.dtype == torch.float32 and ids.dtype == torch.int64 and probs.shape == ids.shape == (6, K, 5)
    assert torch.equal(ids, want.indices)
    torch.testing.assert_close(probs, want.values)
    spec = DynamicTreeSpec(budget=9, topk=5)
    for a, b in zip(spec.build(roots, logits), spec.build_from_topk(roots, probs, ids)):
        assert torch.equal(a.tokens, b.tokens) and a.tree.parent.tolist() == b.tree.parent.tolist()
    probs2, _ = heads.draft_topk_probs(hidden, 5, 2, lm_head=lm_head, vocab_size=V)  # only the heads asked for
    assert probs2.shape == (6, 2, 5)


def test_build_from_topk_refuses_mismatched_shapes():
    from medusa_plugin.core.dynamic_tree import DynamicTreeError, DynamicTreeSpec

    spec = DynamicTreeSpec(budget=4, topk=3)
    with pytest.raises(DynamicTreeError, match="probs and ids must both be"):
        spec.build_from_topk(torch.tensor([1]), torch.rand(1, 4, 3), torch.zeros(1, 4, 2, dtype=torch.long))
    with pytest.raises(DynamicTreeError, match="topk=3 exceeds the ranks given"):
        spec.build_from_topk(torch.tensor([1]), torch.rand(1, 4, 2), torch.zeros(1, 4, 2, dtype=torch.long))
