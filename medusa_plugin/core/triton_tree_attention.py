"""Triton kernel for tree attention over vLLM's paged KV cache (same semantics as ``paged_tree_attention``).

One program per (row tile, KV head, request[, KV split]). A row tile is ``BLOCK_M`` rows of the request's
``q_b * G`` (query, q-head) pairs of one GQA group (``G = Hq / Hkv``), so a request's paged KV is streamed once for all
of its tree queries and q-heads (a 64-node tree with G <= 2 is a single tile). Keys are streamed in ``BLOCK_N`` tiles
looked up through the block table, with an online (exp2) softmax in float32:

* context keys (``pos < seq_len - q_b``) need no mask: they are processed in a mask-free loop;
* only the last ``q_b`` keys are masked, by ``tree_mask`` (int8 ``[N+1, N+1]``) for tree rows and causally otherwise.

With few programs (small batch, long context) the keys are split into ``num_splits`` ranges (flash-decoding); the
partial results are merged with their log-sum-exp in torch.

Causal rows (prefill / extend) are supported with the same kernel, but it is tuned for short query rows (tree rows,
<= 65 queries); callers with long prefill rows should route those to the engine's own flash kernel.

``triton`` is optional: without it ``HAS_TRITON`` is False and the wrapper raises. The kernel is jitted lazily on first
use, so importing this module compiles nothing. Triton's CPU interpreter (``TRITON_INTERPRET=1``, tests only) must be
switched on before ``triton`` is first imported, because Triton's own library functions are jitted at import.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .paged_attention import PagedAttentionError, _check_inputs

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only without triton
    triton = tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "triton_paged_tree_attention"]

_LOG2E = 1.4426950408889634


def _tree_attention_kernel(
    Q, K, V, Out, PartAcc, PartLse, BlockTables, SeqLens, QStart, TreeMask, IsTree,
    stride_qt, stride_qh, stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
    stride_ot, stride_oh, stride_bt, stride_tm, stride_ps, stride_pt, stride_ph, stride_ls, stride_lt,
    qk_scale, tree_n,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    req = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS

    q_start = tl.load(QStart + req).to(tl.int64)
    q_len = (tl.load(QStart + req + 1) - q_start).to(tl.int32)
    if tile * BLOCK_M >= q_len * GROUP:
        return
    seq_len = tl.load(SeqLens + req).to(tl.int32)
    ctx = seq_len - q_len
    tree_n_row = tl.load(IsTree + req).to(tl.int32) * tree_n   # N+1 for tree rows, 0 for causal rows

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = rows // GROUP                       # query index within the request
    head = kvh * GROUP + rows % GROUP        # q-head
    row_ok = qi < q_len
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + (q_start + qi)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # Triton's CPU interpreter computes bf16 tl.dot wrongly: do the interpreter's math in fp32
        q = q.to(tl.float32)

    # Keys this program reads: tree rows see every key; causal rows stop after this tile's last query.
    kv_end = tl.where(tree_n_row > 0, seq_len, tl.minimum(seq_len, ctx + (tile * BLOCK_M + BLOCK_M - 1) // GROUP + 1))
    chunk = ((kv_end + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, kv_end)
    ctx_full = tl.minimum((ctx // BLOCK_N) * BLOCK_N, hi)   # keys [lo, ctx_full) are all context: no mask

    # finite "-inf" for the running max, so fully masked tiles give exp2(-inf) = 0, never NaN
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = BlockTables + req.to(tl.int64) * stride_bt
    offs_n = tl.arange(0, BLOCK_N)

    for start in range(lo, ctx_full, BLOCK_N):
        pos = start + offs_n
        blk = tl.load(bt_row + pos // BLOCK_SIZE).to(tl.int64)
        off = pos % BLOCK_SIZE
        k = tl.load(K + blk[None, :] * stride_kb + off[None, :] * stride_ko + kvh * stride_kh + d[:, None],
                    mask=d_ok[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + blk[:, None] * stride_vb + off[:, None] * stride_vo + kvh * stride_vh + d[None, :],
                    mask=d_ok[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    for start in range(tl.maximum(lo, ctx_full), hi, BLOCK_N):
        pos = start + offs_n
        key_ok = pos < hi
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        off = pos % BLOCK_SIZE
        k = tl.load(K + blk[None, :] * stride_kb + off[None, :] * stride_ko + kvh * stride_kh + d[:, None],
                    mask=d_ok[:, None] & key_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        rel = pos - ctx                      # tree node index of a new key
        new_key = rel >= 0
        tm = tl.load(TreeMask + qi[:, None] * stride_tm + rel[None, :],
                     mask=row_ok[:, None] & (qi[:, None] < tree_n_row) & new_key[None, :]
                     & (rel[None, :] < tree_n_row) & key_ok[None, :], other=0) != 0
        causal = (pos[None, :] <= (ctx + qi)[:, None]) & (tree_n_row == 0)
        allowed = key_ok[None, :] & (~new_key[None, :] | tm | causal)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + blk[:, None] * stride_vb + off[:, None] * stride_vo + kvh * stride_vh + d[None, :],
                    mask=d_ok[None, :] & key_ok[:, None], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    t = q_start + qi
    out_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        tl.store(Out + t[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 acc.to(Out.dtype.element_ty), mask=out_mask)
    else:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))   # base-2 log-sum-exp of this split
        tl.store(PartAcc + split * stride_ps + t[:, None] * stride_pt + head[:, None] * stride_ph + d[None, :],
                 acc, mask=out_mask)
        tl.store(PartLse + split * stride_ls + t * stride_lt + head, lse, mask=row_ok)


_KERNELS: dict = {}


def _kernel():
    """The jitted kernel, built on first use for the current TRITON_INTERPRET mode."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpret not in _KERNELS:
        _KERNELS[interpret] = triton.jit(_tree_attention_kernel)
    return _KERNELS[interpret]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _pick_num_splits(device, programs: int, max_seq_len: int, block_n: int) -> int:
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    # Enough programs to fill the GPU twice, with at least 4 key tiles per split.
    return max(1, min(math.ceil(2 * sms / programs), max_seq_len // (4 * block_n), 64))


def triton_paged_tree_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, block_tables: Tensor,
                                seq_lens: Tensor, query_start_loc: Tensor, tree_mask: Tensor, is_tree: Tensor,
                                scale: float, out: Tensor | None = None, *, max_query_len: int | None = None,
                                max_seq_len: int | None = None, num_splits: int | None = None) -> Tensor:
    """Triton version of :func:`medusa_plugin.core.paged_attention.paged_tree_attention` (same arguments/result).

    Extra keyword arguments: ``max_query_len`` / ``max_seq_len`` (host ints; pass them, as vLLM's metadata has them,
    to avoid a device sync), ``num_splits`` (KV splits per request; default: chosen from the SM count).
    Supports fp32/fp16/bf16, any block size and head dim (padded to a power of two >= 16). Tensors must be on a
    CUDA device, or on CPU with ``TRITON_INTERPRET=1`` (Triton's interpreter, slow: tests only).
    """
    if not HAS_TRITON:
        raise PagedAttentionError("triton is not installed; use paged_tree_attention (the torch reference)")
    _check_inputs(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, tree_mask, is_tree)
    if query.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise PagedAttentionError(
            f"triton_paged_tree_attention needs CUDA tensors (got {query.device}); on CPU use paged_tree_attention "
            "or set TRITON_INTERPRET=1 (interpreter, for tests)")
    if key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        raise PagedAttentionError(
            f"query and KV cache dtypes must match, got {query.dtype} / {key_cache.dtype} / {value_cache.dtype}")
    if key_cache.stride(3) != 1 or value_cache.stride(3) != 1 or query.stride(2) != 1:
        raise PagedAttentionError("query and KV caches must be contiguous in head_dim")
    num_tokens, hq, dh = query.shape
    block_size, hkv = key_cache.shape[1], key_cache.shape[2]
    group = hq // hkv
    batch = block_tables.shape[0]
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.stride(2) != 1:
        raise PagedAttentionError(f"out must be a [T, Hq, Dh] = {tuple(query.shape)} tensor contiguous in Dh")
    if batch == 0 or num_tokens == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())

    block_m = min(128, max(16, _next_pow2(max_query_len * group)))
    block_n = 64 if dh <= 64 or block_m <= 64 else 32
    block_d = max(16, _next_pow2(dh))
    tiles = math.ceil(max_query_len * group / block_m)
    if num_splits is None:
        num_splits = _pick_num_splits(query.device, tiles * hkv * batch, max_seq_len, block_n)

    dev = query.device
    tm = tree_mask.to(device=dev, dtype=torch.int8).contiguous()
    flags = is_tree.to(device=dev, dtype=torch.int8)
    bt = block_tables.to(dev)
    if bt.stride(1) != 1:
        bt = bt.contiguous()
    if num_splits > 1:
        part_acc = torch.empty(num_splits, num_tokens, hq, dh, device=dev, dtype=torch.float32)
        part_lse = torch.empty(num_splits, num_tokens, hq, device=dev, dtype=torch.float32)
    else:
        part_acc = part_lse = out  # unused
    fp32 = query.dtype == torch.float32
    _kernel()[(tiles, hkv, batch * num_splits)](
        query, key_cache, value_cache, out, part_acc, part_lse, bt, seq_lens.to(dev),
        query_start_loc.to(dev), tm, flags,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), out.stride(0), out.stride(1),
        bt.stride(0), tm.stride(0), part_acc.stride(0), part_acc.stride(1), part_acc.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        scale * _LOG2E, tm.shape[0],
        BLOCK_SIZE=block_size, GROUP=group, HEAD_DIM=dh, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, DOT_PRECISION="ieee" if fp32 else "tf32",
        UPCAST=query.dtype == torch.bfloat16 and query.device.type != "cuda",
        num_warps=8 if block_m * block_d >= 128 * 128 else 4, num_stages=2,
    )
    if num_splits > 1:
        # Merge splits: out = sum_s 2^(lse_s - lse) * acc_s. Empty splits have lse = -inf and weight 0.
        weights = torch.softmax(part_lse * math.log(2.0), dim=0).nan_to_num_(0.0)
        out.copy_((weights.unsqueeze(-1) * part_acc).sum(0))
    return out
