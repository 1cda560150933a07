import json
from importlib import resources

import pytest
import torch

from medusa_plugin.core.paged_attention import (PagedAttentionError, dense_tree_attention_reference,
                                                paged_tree_attention)


def brute_tree_mask(choices):
    """[N+1, N+1] bool ancestor mask in upstream node order, built with plain python."""
    nodes = [()] + sorted((tuple(c) for c in choices), key=lambda p: (len(p), p))
    n1 = len(nodes)
    mask = torch.zeros(n1, n1, dtype=torch.bool)
    for i, pi in enumerate(nodes):
        for j, pj in enumerate(nodes):
            mask[i, j] = pi[:len(pj)] == pj
    return mask


def shipped_choices(name):
    data = json.loads(resources.files("medusa_plugin").joinpath("data/medusa_choices.json").read_text())
    return data["choices"][name]


MC63 = brute_tree_mask(shipped_choices("mc_sim_7b_63"))


def make_batch(seq_lens, q_lens, *, block_size, hq, hkv, dh=8, dtype=torch.float32, seed=0, spare_blocks=3):
    """Random paged cache with shuffled, non-contiguous block tables; returns the kwargs of paged_tree_attention."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-s // block_size) for s in seq_lens]
    max_blocks = max(max(need), 1)
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g)
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        block_tables[b, :n] = perm[used:used + n].to(torch.int32)
        used += n
    kc = torch.randn(num_blocks, block_size, hkv, dh, generator=g).to(dtype)
    vc = torch.randn(num_blocks, block_size, hkv, dh, generator=g).to(dtype)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), hq, dh, generator=g).to(dtype)
    return dict(query=q, key_cache=kc, value_cache=vc, block_tables=block_tables,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32), query_start_loc=qsl)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
def test_matches_dense_mixed_batch(block_size, hq, hkv):
    # request contexts 0 / 3 / 40 / 100; full tree, truncated tree, prefill row, single-query decode row.
    q_lens = [64, 17, 9, 1]
    seq_lens = [64, 3 + 17, 40 + 9, 100 + 1]
    is_tree = torch.tensor([True, True, False, False])
    kw = make_batch(seq_lens, q_lens, block_size=block_size, hq=hq, hkv=hkv, seed=block_size + hq + hkv)
    scale = 8 ** -0.5
    got = paged_tree_attention(**kw, tree_mask=MC63, is_tree=is_tree, scale=scale)
    want = dense_tree_attention_reference(**kw, tree_mask=MC63, is_tree=is_tree, scale=scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_tree_node_equals_causal_attention_over_its_path():
    """A tree node's output is ordinary causal attention over context + its root->node path laid out linearly."""
    ctx, n_q, bs, hq, hkv = 21, 30, 16, 4, 2
    kw = make_batch([ctx + n_q], [n_q], block_size=bs, hq=hq, hkv=hkv, seed=7)
    tree = paged_tree_attention(**kw, tree_mask=MC63, is_tree=torch.tensor([True]), scale=0.3)
    kc, vc, bt = kw["key_cache"], kw["value_cache"], kw["block_tables"]
    pos = torch.arange(ctx + n_q)
    k_seq = kc[bt[0, pos // bs].long(), pos % bs]
    v_seq = vc[bt[0, pos // bs].long(), pos % bs]
    for i in [0, 1, 5, 12, 29]:
        path = [ctx + j for j in range(i + 1) if MC63[i, j]]
        keys = torch.cat([torch.arange(ctx), torch.tensor(path)])
        n = len(keys)
        # one causal request whose single block holds exactly those keys; its only query is node i.
        lin = paged_tree_attention(kw["query"][i:i + 1], k_seq[keys][None], v_seq[keys][None],
                                   torch.zeros(1, 1, dtype=torch.int64), torch.tensor([n]), torch.tensor([0, 1]),
                                   MC63, torch.tensor([False]), 0.3)
        torch.testing.assert_close(tree[i], lin[0], atol=1e-5, rtol=1e-5)


def test_chain_tree_row_equals_causal_row():
    chain = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    kw = make_batch([13, 13], [6, 6], block_size=16, hq=2, hkv=1, seed=3)
    kw["query"][6:] = kw["query"][:6]
    kw["block_tables"][1] = kw["block_tables"][0]
    out = paged_tree_attention(**kw, tree_mask=chain, is_tree=torch.tensor([True, False]), scale=0.5)
    torch.testing.assert_close(out[:6], out[6:])


def test_bf16_inputs_and_out_buffer():
    kw = make_batch([50, 70], [33, 1], block_size=16, hq=4, hkv=2, dh=16, dtype=torch.bfloat16, seed=11)
    is_tree = torch.tensor([True, True])
    out = torch.empty_like(kw["query"])
    got = paged_tree_attention(**kw, tree_mask=MC63, is_tree=is_tree, scale=0.25, out=out)
    assert got is out and got.dtype == torch.bfloat16
    want = dense_tree_attention_reference(**kw, tree_mask=MC63, is_tree=is_tree, scale=0.25)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_small_groups_give_same_result(monkeypatch):
    import medusa_plugin.core.paged_attention as pa
    kw = make_batch([30, 5, 64], [10, 5, 3], block_size=16, hq=4, hkv=2, seed=5)
    is_tree = torch.tensor([True, False, True])
    full = paged_tree_attention(**kw, tree_mask=MC63, is_tree=is_tree, scale=0.4)
    monkeypatch.setattr(pa, "_GROUP_ELEMS", 1)  # one request per group
    torch.testing.assert_close(paged_tree_attention(**kw, tree_mask=MC63, is_tree=is_tree, scale=0.4), full)


def test_brute_force_mask_equals_medusa_tree():
    from medusa_plugin.core.tree import MedusaTree

    assert torch.equal(MedusaTree.from_name("mc_sim_7b_63").ancestor_mask.cpu(), MC63)


def test_errors_are_clear():
    kw = make_batch([10], [5], block_size=16, hq=3, hkv=2, seed=1)
    with pytest.raises(PagedAttentionError, match="multiple of num_kv_heads"):
        paged_tree_attention(**kw, tree_mask=MC63, is_tree=torch.tensor([True]), scale=1.0)
    kw = make_batch([10], [5], block_size=16, hq=2, hkv=2, seed=1)
    small = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(PagedAttentionError, match="more queries than the tree has nodes"):
        paged_tree_attention(**kw, tree_mask=small, is_tree=torch.tensor([True]), scale=1.0)
    with pytest.raises(PagedAttentionError, match="seq_lens >= query lengths"):
        paged_tree_attention(**{**kw, "seq_lens": torch.tensor([4])}, tree_mask=MC63, is_tree=torch.tensor([True]),
                             scale=1.0)
    with pytest.raises(PagedAttentionError, match="block_tables capacity"):
        paged_tree_attention(**{**kw, "seq_lens": torch.tensor([40])}, tree_mask=MC63,
                             is_tree=torch.tensor([True]), scale=1.0)
    with pytest.raises(PagedAttentionError, match="bool"):
        paged_tree_attention(**kw, tree_mask=MC63.int(), is_tree=torch.tensor([True]), scale=1.0)


def test_one_plan_serves_every_layer():
    """The per-step plan (gather indices + mask) built once is reused by layers with different caches and queries."""
    from medusa_plugin.core.paged_attention import paged_tree_attention_planned, plan_paged_tree_attention

    q_lens, seq_lens = [64, 9, 1], [64 + 5, 40 + 9, 30 + 1]
    is_tree = torch.tensor([True, False, False])
    layers = [make_batch(seq_lens, q_lens, block_size=16, hq=8, hkv=2, seed=s) for s in (1, 2)]
    kw0 = layers[0]
    plan = plan_paged_tree_attention(kw0["block_tables"], kw0["seq_lens"], kw0["query_start_loc"], MC63, is_tree,
                                     num_tokens=kw0["query"].shape[0], block_size=16, num_kv_heads=2,
                                     num_q_heads=8, head_dim=8)
    for kw in layers:  # same block tables (same seeds draw the same shapes), different K/V/Q contents
        kw = dict(kw, block_tables=kw0["block_tables"], seq_lens=kw0["seq_lens"], query_start_loc=kw0["query_start_loc"])
        got = paged_tree_attention_planned(kw["query"], kw["key_cache"], kw["value_cache"], plan, 8 ** -0.5)
        want = dense_tree_attention_reference(**kw, tree_mask=MC63, is_tree=is_tree, scale=8 ** -0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_one_tree_per_request_matches_dense(monkeypatch):
    """[B, N+1, N+1] masks (dynamic trees): each request attends with its own tree, including a truncated one,
    next to a causal row; split into one-request groups too."""
    import medusa_plugin.core.paged_attention as pa
    from medusa_plugin.core.dynamic_tree import build_dynamic_tree

    g = torch.Generator().manual_seed(3)
    masks = []
    for _ in range(3):
        probs = torch.rand(3, 4, generator=g).sort(dim=-1, descending=True).values
        ids = torch.arange(12).view(3, 4)
        masks.append(build_dynamic_tree(0, probs, ids, 9).tree.ancestor_mask)
    assert not torch.equal(masks[0], masks[1]) or not torch.equal(masks[1], masks[2])
    tree_mask = torch.stack(masks)                                   # [3, 10, 10]
    q_lens = [10, 6, 10]
    seq_lens = [5 + 10, 20 + 6, 7 + 10]
    is_tree = torch.tensor([True, True, False])
    kw = make_batch(seq_lens, q_lens, block_size=16, hq=4, hkv=2, seed=11)
    got = paged_tree_attention(**kw, tree_mask=tree_mask, is_tree=is_tree, scale=0.3)
    want = dense_tree_attention_reference(**kw, tree_mask=tree_mask, is_tree=is_tree, scale=0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for b in range(2):  # each tree row equals running that request alone with its 2-D mask
        rows = slice(int(kw["query_start_loc"][b]), int(kw["query_start_loc"][b + 1]))
        one = dict(kw, query=kw["query"][rows], block_tables=kw["block_tables"][b:b + 1],
                   seq_lens=kw["seq_lens"][b:b + 1], query_start_loc=torch.tensor([0, q_lens[b]]))
        torch.testing.assert_close(got[rows], paged_tree_attention(**one, tree_mask=masks[b],
                                                                   is_tree=is_tree[b:b + 1], scale=0.3))
    with pytest.raises(PagedAttentionError, match=r"\[B=3, N\+1, N\+1\]"):
        paged_tree_attention(**kw, tree_mask=tree_mask[:2], is_tree=is_tree, scale=0.3)
    monkeypatch.setattr(pa, "_GROUP_ELEMS", 1)  # one request per group: each group slices its own masks
    torch.testing.assert_close(paged_tree_attention(**kw, tree_mask=tree_mask, is_tree=is_tree, scale=0.3), got)


@pytest.mark.parametrize("k_layout,v_layout", [("dn", "nd"), ("nd", "dn")])
def test_strided_cache_views_as_vllm_cpu_lays_them_out(k_layout, v_layout):
    """The K / V views of one ``[num_blocks, Hkv, block_size, 2*D]`` cache, K dim-major and V token-major inside a
    block (vLLM's CPU layout) or the other way round: the blocks are gathered whole, whatever the strides."""
    hkv, dh, bs = 2, 8, 16
    q_lens, seq_lens = [9, 1, 5], [40 + 9, 70 + 1, 17 + 5]
    kw = make_batch(seq_lens, q_lens, block_size=bs, hq=4, hkv=hkv, dh=dh, seed=5)
    nb = kw["key_cache"].shape[0]
    raw = torch.zeros(nb, hkv, 2, bs * dh)
    views = []
    for i, (lay, logical) in enumerate(((k_layout, kw["key_cache"]), (v_layout, kw["value_cache"]))):
        part = raw[:, :, i]
        view = (part.view(nb, hkv, bs, dh).permute(0, 2, 1, 3) if lay == "nd"
                else part.view(nb, hkv, dh, bs).permute(0, 3, 1, 2))
        view.copy_(logical)
        views.append(view)
    assert not views[0].is_contiguous() and not views[1].is_contiguous()
    is_tree = torch.tensor([True, False, True])
    mask = brute_tree_mask([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0]])
    strided = dict(kw, key_cache=views[0], value_cache=views[1])
    got = paged_tree_attention(**strided, tree_mask=mask, is_tree=is_tree, scale=0.35)
    want = dense_tree_attention_reference(**kw, tree_mask=mask, is_tree=is_tree, scale=0.35)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_an_empty_request_with_an_unpadded_block_table():
    """A request with no tokens (seq_len 0, no queries) whose block-table row holds garbage (-1): its padding reads
    block 0, not its own first entry."""
    kw = make_batch([20, 1], [3, 1], block_size=16, hq=4, hkv=2, seed=9)
    kw["block_tables"] = torch.cat([kw["block_tables"][:1], torch.full_like(kw["block_tables"][:1], -1)])
    kw["seq_lens"] = torch.tensor([20, 0], dtype=torch.int32)
    kw["query_start_loc"] = torch.tensor([0, 3, 3], dtype=torch.int32)
    kw["query"] = kw["query"][:3]
    is_tree = torch.tensor([True, False])
    mask = brute_tree_mask([[0], [1]])
    got = paged_tree_attention(**kw, tree_mask=mask, is_tree=is_tree, scale=0.3)
    want = dense_tree_attention_reference(**kw, tree_mask=mask, is_tree=is_tree, scale=0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_equal_query_lengths_read_and_write_rows_in_place(dtype, tol, monkeypatch):
    """Requests with equal query lengths (every static tree step, and dynamic trees of one size) take the path that
    reads the query rows and writes the output without a gather: the same result as the brute force, in the strided
    CPU layout and with an out buffer; one-request groups give it too."""
    import medusa_plugin.core.paged_attention as pa
    from medusa_plugin.core.paged_attention import plan_paged_tree_attention

    hkv, dh, bs = 2, 16, 16
    q_lens, seq_lens = [9, 9, 9], [40 + 9, 3 + 9, 70 + 9]
    kw = make_batch(seq_lens, q_lens, block_size=bs, hq=6, hkv=hkv, dh=dh, dtype=dtype, seed=21)
    nb = kw["key_cache"].shape[0]
    raw = torch.zeros(nb, hkv, 2, bs * dh, dtype=dtype)
    k_view = raw[:, :, 0].view(nb, hkv, dh, bs).permute(0, 3, 1, 2)  # vLLM's CPU layout: K dim-major, V token-major
    v_view = raw[:, :, 1].view(nb, hkv, bs, dh).permute(0, 2, 1, 3)
    k_view.copy_(kw["key_cache"])
    v_view.copy_(kw["value_cache"])
    mask = brute_tree_mask([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [2], [0, 0, 0, 0]])
    is_tree = torch.ones(3, dtype=torch.bool)
    plan = plan_paged_tree_attention(kw["block_tables"], kw["seq_lens"], kw["query_start_loc"], mask, is_tree,
                                     num_tokens=27, block_size=bs, num_kv_heads=hkv, num_q_heads=6, head_dim=dh)
    assert [g.dense for g in plan.groups] == [True]
    out = torch.full_like(kw["query"], float("nan"))
    got = paged_tree_attention(**dict(kw, key_cache=k_view, value_cache=v_view), tree_mask=mask, is_tree=is_tree,
                               scale=0.25, out=out)
    assert got is out
    want = dense_tree_attention_reference(**kw, tree_mask=mask, is_tree=is_tree, scale=0.25)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    monkeypatch.setattr(pa, "_GROUP_ELEMS", 1)  # three groups: not dense, gathered and scattered
    plan = plan_paged_tree_attention(kw["block_tables"], kw["seq_lens"], kw["query_start_loc"], mask, is_tree,
                                     num_tokens=27, block_size=bs, num_kv_heads=hkv, num_q_heads=6, head_dim=dh)
    assert [g.dense for g in plan.groups] == [False] * 3
    torch.testing.assert_close(paged_tree_attention(**kw, tree_mask=mask, is_tree=is_tree, scale=0.25), got)
