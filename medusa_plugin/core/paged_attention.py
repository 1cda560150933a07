"""Tree attention over vLLM's paged KV cache (reference implementation, plain PyTorch, CPU and GPU).

Layout (vLLM): ``key_cache`` / ``value_cache`` are ``[num_blocks, block_size, Hkv, Dh]``; request ``b`` owns the
blocks ``block_tables[b, :ceil(seq_lens[b] / block_size)]`` and its token at position ``p`` lives in slot
``(block_tables[b, p // block_size], p % block_size)``. Queries are varlen-flattened ``[T, Hq, Dh]`` with
``query_start_loc [B+1]``; request ``b`` has ``q_b`` queries at positions ``seq_lens[b] - q_b .. seq_lens[b] - 1`` whose
K/V are already in the cache.

* tree rows (``is_tree[b]``): query ``i`` sees every context key (position ``< seq_lens[b] - q_b``) and the tree key
  ``j`` iff ``tree_mask[i, j]``. A request with ``q_b < N+1`` queries uses ``tree_mask[:q_b, :q_b]`` (a prefix of the
  node order is a subtree). With one tree per request (dynamic trees), ``tree_mask`` is ``[B, N+1, N+1]`` and
  request ``b`` uses ``tree_mask[b]``.
* causal rows: plain causal attention (prefill / extend / ordinary decode rows sharing the batch).

``paged_tree_attention`` is the vectorised reference (float32 math); ``dense_tree_attention_reference`` is a brute
force built with python loops, for tests only. The Triton kernel lives in ``triton_tree_attention.py``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["PagedAttentionError", "PagedTreePlan", "paged_tree_attention", "plan_paged_tree_attention",
           "paged_tree_attention_planned", "dense_tree_attention_reference"]

# Requests are processed in groups so that one group's padded K/V plus scores stay below about this many elements.
_GROUP_ELEMS = 1 << 26


class PagedAttentionError(ValueError):
    """Bad arguments to paged tree attention."""


def _check_inputs(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, tree_mask, is_tree):
    if query.dim() != 3:
        raise PagedAttentionError(f"query must be [T, Hq, Dh], got shape {tuple(query.shape)}")
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise PagedAttentionError(
            "key_cache and value_cache must both be [num_blocks, block_size, Hkv, Dh] (vLLM layout), got "
            f"{tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    hq, dh = query.shape[1], query.shape[2]
    hkv = key_cache.shape[2]
    if key_cache.shape[3] != dh:
        raise PagedAttentionError(f"head_dim mismatch: query has {dh}, the KV cache has {key_cache.shape[3]}")
    if hq % hkv != 0:
        raise PagedAttentionError(f"GQA needs num_q_heads ({hq}) to be a multiple of num_kv_heads ({hkv})")
    b = block_tables.shape[0] if block_tables.dim() == 2 else -1
    if block_tables.dim() != 2 or seq_lens.shape != (b,) or query_start_loc.shape != (b + 1,) or is_tree.shape != (b,):
        raise PagedAttentionError(
            "expected block_tables [B, max_blocks], seq_lens [B], query_start_loc [B+1], is_tree [B]; got "
            f"{tuple(block_tables.shape)}, {tuple(seq_lens.shape)}, {tuple(query_start_loc.shape)}, "
            f"{tuple(is_tree.shape)}")
    if (tree_mask.dim() not in (2, 3) or tree_mask.shape[-1] != tree_mask.shape[-2] or tree_mask.dtype != torch.bool
            or (tree_mask.dim() == 3 and tree_mask.shape[0] != b)):
        raise PagedAttentionError(
            f"tree_mask must be a square bool [N+1, N+1] matrix (or [B={b}, N+1, N+1], one per request), got "
            f"{tuple(tree_mask.shape)} {tree_mask.dtype}")
    if is_tree.dtype != torch.bool:
        raise PagedAttentionError(f"is_tree must be a bool tensor, got {is_tree.dtype}")


def _check_lengths(q_lens, seq_lens, is_tree, tree_n, num_tokens, max_blocks, block_size):
    """Host-side checks on the (small) length tensors."""
    if int(q_lens.sum()) != num_tokens or bool((q_lens < 0).any()):
        raise PagedAttentionError(
            f"query_start_loc must be non-decreasing from 0 to T={num_tokens}; got lengths {q_lens.tolist()}")
    if bool((seq_lens < q_lens).any()):
        raise PagedAttentionError(
            "seq_lens counts this step's queries, so seq_lens >= query lengths; got "
            f"seq_lens={seq_lens.tolist()} query lengths={q_lens.tolist()}")
    if bool((q_lens[is_tree] > tree_n).any()):
        raise PagedAttentionError(
            f"a tree row has more queries than the tree has nodes ({tree_n}); query lengths={q_lens.tolist()}")
    if bool((seq_lens > max_blocks * block_size).any()):
        raise PagedAttentionError(
            f"seq_lens {seq_lens.tolist()} exceed block_tables capacity ({max_blocks} blocks x {block_size})")


def paged_tree_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                         seq_lens: Tensor, query_start_loc: Tensor, tree_mask: Tensor, is_tree: Tensor,
                         scale: float, out: Tensor | None = None) -> Tensor:
    """Attention of varlen queries over a paged KV cache, tree-masked for tree rows and causal otherwise.

    Args:
        query: ``[T, Hq, Dh]`` float (fp32/fp16/bf16).
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, Dh]``, same dtype as ``query`` (Hq % Hkv == 0).
        block_tables: ``[B, max_blocks]`` int32/int64.
        seq_lens: ``[B]`` int, tokens in the cache per request including this step's queries.
        query_start_loc: ``[B+1]`` int, cumulative query counts (``query_start_loc[0] == 0``).
        tree_mask: ``[N+1, N+1]`` bool, ``[i, j]`` = tree node ``i`` attends to tree node ``j``; or ``[B, N+1, N+1]``,
            one tree per request.
        is_tree: ``[B]`` bool, False rows use plain causal attention.
        scale: softmax scale (usually ``Dh ** -0.5``).
        out: optional ``[T, Hq, Dh]`` output buffer.
    Returns:
        ``[T, Hq, Dh]`` in ``query.dtype`` (``out`` if given). Math is done in float32.
    """
    _check_inputs(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, tree_mask, is_tree)
    plan = plan_paged_tree_attention(block_tables, seq_lens, query_start_loc, tree_mask, is_tree,
                                     num_tokens=query.shape[0], block_size=key_cache.shape[1],
                                     num_kv_heads=key_cache.shape[2], num_q_heads=query.shape[1],
                                     head_dim=query.shape[2], device=query.device)
    return paged_tree_attention_planned(query, key_cache, value_cache, plan, scale, out)


class _GroupPlan(NamedTuple):
    blocks: Tensor    # [bsz * nbr] int64, each request's cache blocks (padded with block 0, masked)
    tok: Tensor       # [bsz, Q] int64, query row of each (padded) query
    bias: Tensor      # [bsz * Hkv, G*Q, S] float32, 0 where a query sees a key, -inf where masked (S = longest seq)
    out_rows: Tensor  # [M] int64, query rows of the valid queries (tok[q_valid])
    q_valid: Tensor   # [bsz, Q] bool
    dense: bool       # the only group, every query valid: its queries are rows 0..T-1 in order


class PagedTreePlan(NamedTuple):
    """Gather indices and masks of :func:`paged_tree_attention` for one batch, reusable across layers that share
    block tables, lengths and head shapes (built by :func:`plan_paged_tree_attention`)."""
    groups: tuple
    num_tokens: int
    block_size: int
    num_kv_heads: int
    num_q_heads: int
    head_dim: int


def plan_paged_tree_attention(block_tables: Tensor, seq_lens: Tensor, query_start_loc: Tensor, tree_mask: Tensor,
                              is_tree: Tensor, *, num_tokens: int, block_size: int, num_kv_heads: int,
                              num_q_heads: int, head_dim: int, device: torch.device | None = None) -> PagedTreePlan:
    """Validate lengths and precompute everything of :func:`paged_tree_attention` that does not depend on the
    query or the cache contents (arguments as there; ``num_tokens`` = T, the other ints are the cache / head shapes).
    """
    device = block_tables.device if device is None else device
    hq, hkv, dh = num_q_heads, num_kv_heads, head_dim
    qsl = query_start_loc.to(device=device, dtype=torch.int64)
    seq_lens = seq_lens.to(device=device, dtype=torch.int64)
    is_tree = is_tree.to(device)
    q_lens = qsl[1:] - qsl[:-1]
    _check_lengths(q_lens.cpu(), seq_lens.cpu(), is_tree.cpu(), tree_mask.shape[-1], num_tokens,
                   block_tables.shape[1], block_size)
    batch = block_tables.shape[0]
    groups = []
    if batch > 0 and num_tokens > 0:
        # Group consecutive requests so one group's padded K/V stays bounded.
        seq_host, q_host = seq_lens.tolist(), q_lens.tolist()
        tree_mask = tree_mask.to(device)
        start = 0
        while start < batch:
            end, longest, most_q = start, 0, 0
            while end < batch:
                s_next, q_next = max(longest, seq_host[end]), max(most_q, q_host[end])
                if end > start and (end + 1 - start) * s_next * (2 * hkv * dh + hq * q_next) > _GROUP_ELEMS:
                    break
                longest, most_q, end = s_next, q_next, end + 1
            groups.append(_plan_group(block_tables[start:end], seq_lens[start:end], qsl[start:end + 1],
                                      q_lens[start:end], tree_mask if tree_mask.dim() == 2 else tree_mask[start:end],
                                      is_tree[start:end], block_size, hkv,
                                      hq // hkv, max(longest, 1), max(most_q, 1)))
            start = end
        # equal query lengths: the queries are rows 0..T-1, request-major
        if len(groups) == 1 and len(set(q_host)) == 1 and int(qsl[0]) == 0:
            groups[0] = groups[0]._replace(dense=True)
    return PagedTreePlan(tuple(groups), num_tokens, block_size, hkv, hq, dh)


def paged_tree_attention_planned(query: Tensor, key_cache: Tensor, value_cache: Tensor, plan: PagedTreePlan,
                                 scale: float, out: Tensor | None = None) -> Tensor:
    """:func:`paged_tree_attention` with a precomputed :class:`PagedTreePlan` (same result)."""
    if query.dim() != 3 or key_cache.dim() != 4 or key_cache.shape != value_cache.shape or \
            (query.shape[0], key_cache.shape[1], key_cache.shape[2], query.shape[1], query.shape[2]) != \
            (plan.num_tokens, plan.block_size, plan.num_kv_heads, plan.num_q_heads, plan.head_dim) or \
            key_cache.shape[3] != plan.head_dim:
        raise PagedAttentionError(
            f"query {tuple(query.shape)} / cache {tuple(key_cache.shape)}, {tuple(value_cache.shape)} do not match "
            f"the plan (T={plan.num_tokens}, block_size={plan.block_size}, Hkv={plan.num_kv_heads}, "
            f"Hq={plan.num_q_heads}, Dh={plan.head_dim}); build the plan for these shapes")
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape:
        raise PagedAttentionError(f"out must have the query's shape {tuple(query.shape)}, got {tuple(out.shape)}")
    hkv, dh, bs = plan.num_kv_heads, plan.head_dim, plan.block_size
    group = plan.num_q_heads // hkv
    # Whole cache blocks are gathered (index_select on the block dimension) in the order [block, head, D, slot] for
    # K and [block, head, slot, D] for V: for vLLM's CPU cache (K dim-major, V token-major inside a block) these are
    # contiguous copies, several times faster than gathering every position; then one batched GEMM per product
    # over the request's keys, the mask added as a 0 / -inf bias (fused with the scale).
    k_blocks, v_blocks = key_cache.permute(0, 2, 3, 1), value_cache.permute(0, 2, 1, 3)
    f32 = torch.float32
    for g in plan.groups:
        bsz, max_q = g.tok.shape
        nbr = g.blocks.shape[0] // bsz
        gq, s_len = group * max_q, g.bias.shape[-1]
        # gathered blocks, then one copy each into the float32 layout of the products (dtype and layout at once)
        k = torch.empty(bsz, hkv, dh, nbr, bs, dtype=f32, device=query.device)
        k.copy_(k_blocks.index_select(0, g.blocks).view(bsz, nbr, hkv, dh, bs).permute(0, 2, 3, 1, 4))
        k = k.view(bsz * hkv, dh, nbr * bs)[..., :s_len]                                  # [bsz*Hkv, Dh, S]
        v = torch.empty(bsz, hkv, nbr, bs, dh, dtype=f32, device=query.device)
        v.copy_(v_blocks.index_select(0, g.blocks).view(bsz, nbr, hkv, bs, dh).permute(0, 2, 1, 3, 4))
        v = v.view(bsz * hkv, nbr * bs, dh)[:, :s_len]                                    # [bsz*Hkv, S, Dh]
        # dense: the group's queries are rows 0..T-1 of the query in order (no gather, no scatter)
        qg = query.view(bsz, max_q, hkv, group, dh) if g.dense else query[g.tok].view(bsz, max_q, hkv, group, dh)
        q = torch.empty(bsz, hkv, group, max_q, dh, dtype=f32, device=query.device)
        q.copy_(qg.permute(0, 2, 3, 1, 4))
        q = q.view(bsz * hkv, gq, dh)
        probs = torch.softmax(torch.baddbmm(g.bias, q, k, alpha=scale), dim=-1)          # [bsz*Hkv, GQ, S]
        o = torch.bmm(probs, v).view(bsz, hkv, group, max_q, dh).permute(0, 3, 1, 2, 4)  # [bsz, Q, Hkv, G, Dh]
        if g.dense:
            out.view(bsz, max_q, hkv, group, dh).copy_(o)
        else:
            out[g.out_rows] = o.reshape(bsz, max_q, hkv * group, dh)[g.q_valid].to(out.dtype)
    return out


def _plan_group(block_tables, seq_lens, qsl, q_lens, tree_mask, is_tree, block_size, hkv, group, max_s,
                max_q) -> _GroupPlan:
    device = seq_lens.device
    bsz = seq_lens.shape[0]

    # Each request's blocks ([bsz, nbr]) and key positions ([S] = nbr * block_size); padding is masked.
    nbr = -(-max_s // block_size)
    longest, max_s = max_s, nbr * block_size
    pos = torch.arange(max_s, device=device)
    key_valid = pos[None, :] < seq_lens[:, None]                                           # [bsz, S]
    blk_col = torch.arange(nbr, device=device).clamp_max(block_tables.shape[1] - 1)
    blocks = block_tables.to(device=device, dtype=torch.int64)[:, blk_col]                 # [bsz, nbr]
    blocks = torch.where(blk_col[None, :] * block_size < seq_lens[:, None], blocks, 0)  # block 0 always exists

    # Queries as [bsz, max_q].
    qi = torch.arange(max_q, device=device)
    q_valid = qi[None, :] < q_lens[:, None]                                                # [bsz, Q]
    tok = torch.where(q_valid, qsl[:-1, None] + qi[None, :], 0)

    # Mask [bsz, Q, S]: context keys always; new keys causal, or by tree_mask for tree rows.
    ctx = seq_lens - q_lens                                                                # [bsz]
    q_pos = ctx[:, None] + qi[None, :]                                                     # [bsz, Q]
    rel = pos[None, :] - ctx[:, None]                                                      # [bsz, S] tree index j
    causal = pos[None, None, :] <= q_pos[:, :, None]
    n1 = tree_mask.shape[-1]
    tm_i = qi.clamp_max(n1 - 1)
    tm_j = rel.clamp(0, n1 - 1)
    if tree_mask.dim() == 2:
        tree_ok = tree_mask[tm_i[None, :, None], tm_j[:, None, :]]                          # [bsz, Q, S]
    else:  # one tree per request
        req = torch.arange(bsz, device=device)[:, None, None]
        tree_ok = tree_mask[req, tm_i[None, :, None], tm_j[:, None, :]]
    new_key = (rel >= 0)[:, None, :]
    allowed = torch.where(is_tree[:, None, None], ~new_key | tree_ok, causal)
    allowed &= key_valid[:, None, :]
    allowed[:, :, 0] |= ~q_valid  # padded query rows attend key 0 only (discarded), so softmax never sees an empty row
    allowed = allowed[..., :longest]
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill_(~allowed, float("-inf"))
    bias = bias[:, None, None].expand(bsz, hkv, group, max_q, longest).reshape(bsz * hkv, group * max_q, longest)
    return _GroupPlan(blocks.reshape(-1).contiguous(), tok, bias, tok[q_valid], q_valid, False)


def dense_tree_attention_reference(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                                   seq_lens: Tensor, query_start_loc: Tensor, tree_mask: Tensor, is_tree: Tensor,
                                   scale: float) -> Tensor:
    """Brute force of :func:`paged_tree_attention` (python loops, float64), for tests. Same arguments and result."""
    num_tokens, hq, dh = query.shape
    block_size, hkv = key_cache.shape[1], key_cache.shape[2]
    group = hq // hkv
    out = torch.zeros(num_tokens, hq, dh, dtype=torch.float64)
    for b in range(block_tables.shape[0]):
        s_len = int(seq_lens[b])
        q0, q1 = int(query_start_loc[b]), int(query_start_loc[b + 1])
        n_q = q1 - q0
        if n_q == 0:
            continue
        ctx = s_len - n_q
        k = torch.stack([key_cache[int(block_tables[b, p // block_size]), p % block_size] for p in range(s_len)])
        v = torch.stack([value_cache[int(block_tables[b, p // block_size]), p % block_size] for p in range(s_len)])
        mask = torch.zeros(n_q, s_len, dtype=torch.bool)
        for i in range(n_q):
            for p in range(s_len):
                if p < ctx:
                    mask[i, p] = True
                elif bool(is_tree[b]):
                    mask[i, p] = bool((tree_mask[b] if tree_mask.dim() == 3 else tree_mask)[i, p - ctx])
                else:
                    mask[i, p] = p <= ctx + i
        for h in range(hq):
            q = query[q0:q1, h].double()
            kh, vh = k[:, h // group].double(), v[:, h // group].double()
            s = (q @ kh.T) * scale
            s = s.masked_fill(~mask, float("-inf"))
            out[q0:q1, h] = torch.softmax(s, dim=-1) @ vh
    return out.to(query.dtype)
