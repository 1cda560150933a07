"""KV compaction after tree verification, on a paged KV cache.

The N+1 tree tokens of a step are written to the slots of positions ``context_len + i`` (node order). After request
``b`` accepts the path ``root = p_0, p_1 .. p_L``, the K/V of node ``p_j`` must move to the slot of position
``context_len + j`` (j = 1..L), the paged equivalent of upstream Medusa's
``kv[..., prev:prev+n, :] = kv[..., select_indices, :]``. Since ``p_j >= j`` the copy is done as one gather of all
sources followed by one scatter to all destinations, for the whole batch at once.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["KVCompactionError", "compact_paged_kv", "compact_paged_kv_many", "compaction_slots"]


class KVCompactionError(ValueError):
    """Bad arguments to KV compaction."""


def compaction_slots(path_nodes: Tensor, accept_len: Tensor, tree_slot_mapping: Tensor) -> tuple[Tensor, Tensor]:
    """Source and destination slots of every accepted node that has to move.

    Args:
        path_nodes: ``[B, D+1]`` int64 accepted node indices root..p_L, padded with -1 (``path_nodes[:, 0] == 0``).
        accept_len: ``[B]`` int64, number of accepted draft nodes L_b (0..D).
        tree_slot_mapping: ``[B, N+1]`` int64, the KV slot of each tree node this step (node i at position
            ``context_len + i``).
    Returns:
        ``(src_slots, dst_slots)``: flat ``[M]`` int64 tensors on the input device, request-major, for all
        j = 1..L_b with ``src != dst`` (``src = tree_slot_mapping[b, p_j]``, ``dst = tree_slot_mapping[b, j]``).
    """
    if path_nodes.dim() != 2 or accept_len.shape != (path_nodes.shape[0],) or tree_slot_mapping.dim() != 2 \
            or tree_slot_mapping.shape[0] != path_nodes.shape[0]:
        raise KVCompactionError(
            "expected path_nodes [B, D+1], accept_len [B], tree_slot_mapping [B, N+1]; got "
            f"{tuple(path_nodes.shape)}, {tuple(accept_len.shape)}, {tuple(tree_slot_mapping.shape)}")
    depth = path_nodes.shape[1] - 1
    n1 = tree_slot_mapping.shape[1]
    accept_len = accept_len.to(path_nodes.device, torch.int64)
    j = torch.arange(1, depth + 1, device=path_nodes.device)
    valid = j[None, :] <= accept_len[:, None]                                     # [B, D]
    nodes = path_nodes[:, 1:].to(torch.int64)
    if bool((valid & ((nodes < j) | (nodes >= n1))).any()):
        raise KVCompactionError(
            f"accepted path nodes must satisfy j <= p_j < N+1 = {n1} (ancestors come first in node order); got "
            f"path_nodes={path_nodes.tolist()} accept_len={accept_len.tolist()}")
    slots = tree_slot_mapping.to(torch.int64)
    src = slots.gather(1, torch.where(valid, nodes, 0))
    dst = slots.gather(1, torch.where(valid, j, 0))
    keep = valid & (src != dst)
    return src[keep], dst[keep]


def _slot_index(nd: int, slots: Tensor, block_size: int, block_dim: int, offset_dim: int) -> tuple:
    index: list = [slice(None)] * nd
    index[block_dim] = slots // block_size
    index[offset_dim] = slots % block_size
    return tuple(index)


def compact_paged_kv(cache: Tensor, src_slots: Tensor, dst_slots: Tensor, *, block_size: int, block_dim: int = 0,
                     offset_dim: int = 1) -> None:
    """In place: ``cache[slot dst_slots[m]] = cache[slot src_slots[m]]`` for all m (gather all, then scatter).

    Args:
        cache: any layout in which a slot ``s`` is (block ``s // block_size`` along ``block_dim``, offset
            ``s % block_size`` along ``offset_dim``), e.g. ``[num_blocks, block_size, H, D]`` (defaults) or vLLM
            CPU's ``[num_blocks, H, block_size, D]`` (``offset_dim=2``). Call once per K and V cache (or pass a stacked
            ``[2, num_blocks, ...]`` cache with ``block_dim=1``).
        src_slots, dst_slots: ``[M]`` int slots (from :func:`compaction_slots`); destinations must be distinct.
    """
    compact_paged_kv_many([cache], src_slots, dst_slots, block_size=block_size, block_dim=block_dim,
                          offset_dim=offset_dim)


def compact_paged_kv_many(caches: Sequence[Tensor], src_slots: Tensor, dst_slots: Tensor, *, block_size: int,
                          block_dim: int = 0, offset_dim: int = 1) -> None:
    """:func:`compact_paged_kv` on several caches of one layout (e.g. the K and V views of every layer), with the
    slot checks and block/offset indices computed once. Caches must share ``dim()`` and device."""
    if not caches:
        return
    nd = caches[0].dim()
    block_dim, offset_dim = block_dim % nd, offset_dim % nd
    if block_dim == offset_dim:
        raise KVCompactionError(f"block_dim and offset_dim must differ, both are {block_dim}")
    for cache in caches:
        if cache.dim() != nd or cache.device != caches[0].device:
            raise KVCompactionError("all caches must have the same number of dims and device")
        if cache.shape[offset_dim] != block_size:
            raise KVCompactionError(
                f"cache.shape[offset_dim={offset_dim}] = {cache.shape[offset_dim]} but block_size = {block_size}; "
                "pass the dims of your cache layout (vLLM CPU: offset_dim=2)")
    if src_slots.shape != dst_slots.shape or src_slots.dim() != 1:
        raise KVCompactionError(
            f"src_slots and dst_slots must be 1-D of equal length, got {tuple(src_slots.shape)} and "
            f"{tuple(dst_slots.shape)}")
    if src_slots.numel() == 0:
        return
    num_slots = min(cache.shape[block_dim] for cache in caches) * block_size
    src = src_slots.to(caches[0].device, torch.int64)
    dst = dst_slots.to(caches[0].device, torch.int64)
    lo, hi = int(torch.minimum(src.min(), dst.min())), int(torch.maximum(src.max(), dst.max()))
    if lo < 0 or hi >= num_slots:
        raise KVCompactionError(f"slots must lie in [0, {num_slots}), got range [{lo}, {hi}]")
    src_index = _slot_index(nd, src, block_size, block_dim, offset_dim)
    dst_index = _slot_index(nd, dst, block_size, block_dim, offset_dim)
    for cache in caches:
        cache[dst_index] = cache[src_index]  # advanced indexing copies: all sources are read before any write
