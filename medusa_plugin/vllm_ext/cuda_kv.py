"""Logical K/V views of one layer's KV cache on vLLM's CUDA attention backends (Triton / FlashAttention).

GPU counterpart of :func:`.tree_step.cpu_kv_views`. In vLLM 0.32 / 0.33 a layer's cache (``layer.kv_cache``) is the
*logical* tensor ``[num_blocks, Hkv, block_size, 2*D]`` (``v1/kv_cache_layout.py``: "logical shape is always
[L, B, H, N, C]"), whose physical stride order is any ``KVCacheLayout`` (HND, NHD, block-outermost...); the content
axis C is always innermost and holds ``[K(D) | V(D)]``. ``TritonAttentionImpl.do_kv_cache_update`` /
``forward`` read it as ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``, i.e. two ``[num_blocks, block_size,
Hkv, D]`` views into which ``triton_reshape_and_cache_flash`` writes slot ``s`` at ``[s // block_size,
s % block_size]``. This module builds the same views (no copy), whatever the strides, and checks what a plain
(unquantized, K and V of the same size) cache must look like.

No vLLM import: plain torch, usable in tests without an engine.
"""
from __future__ import annotations

from torch import Tensor

__all__ = ["CudaKVLayoutError", "split_kv_cache", "cuda_kv_views"]


class CudaKVLayoutError(ValueError):
    """A layer cache that is not the plain logical ``[num_blocks, Hkv, block_size, 2*D]`` K|V tensor."""


def split_kv_cache(kv_cache: Tensor, head_size: int) -> tuple[Tensor, Tensor]:
    """``(key, value)`` views ``[num_blocks, block_size, Hkv, D]`` of a logical ``[num_blocks, Hkv, block_size, 2*D]``
    cache (any physical stride order, any dtype); writes through either view land in ``kv_cache``.

    Raises :class:`CudaKVLayoutError` if the cache is not 4-D, its last axis is not ``2 * head_size`` (per-token-head
    quantized caches carry inline scales; K/V of different head sizes need another backend) or not contiguous.
    """
    if kv_cache.dim() != 4:
        raise CudaKVLayoutError(
            f"expected a per-layer KV cache of logical shape [num_blocks, num_kv_heads, block_size, 2*head_size] "
            f"(vLLM 0.32/0.33 CUDA backends), got shape {tuple(kv_cache.shape)}; this vLLM version lays out KV "
            "caches differently, which medusa_plugin does not support")
    if kv_cache.shape[-1] != 2 * head_size:
        raise CudaKVLayoutError(
            f"the KV cache's last axis has {kv_cache.shape[-1]} entries, expected 2 * head_size = {2 * head_size} "
            "(K then V); quantized per-token-head caches and K/V of different head sizes are not supported: "
            "use --kv-cache-dtype auto")
    if kv_cache.stride(-1) != 1:
        raise CudaKVLayoutError(
            f"the KV cache's head_size axis must be contiguous (stride 1), got strides {kv_cache.stride()}")
    key, value = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key, value


def cuda_kv_views(layer_ctx, kv: Tensor) -> tuple[Tensor, Tensor]:
    """Logical ``[num_blocks, block_size, Hkv, D]`` K and V views of one CUDA layer cache, for KV compaction.

    Args:
        layer_ctx: the layer's entry of ``compilation_config.static_forward_context`` (vLLM's ``Attention``); its
            ``head_size`` / ``head_size_v`` are used when present, else ``D = kv.shape[-1] // 2``.
        kv: that layer's ``kv_cache`` tensor, logical ``[num_blocks, Hkv, block_size, 2*D]``.
    Returns:
        ``(k_view, v_view)`` sharing ``kv``'s storage, usable by
        ``core.kv_compaction.compact_paged_kv(view, ..., block_size=view.shape[1], block_dim=0, offset_dim=1)``.
    """
    head_size = getattr(layer_ctx, "head_size", None) or kv.shape[-1] // 2
    head_size_v = getattr(layer_ctx, "head_size_v", None) or head_size
    if head_size_v != head_size:
        raise CudaKVLayoutError(
            f"layer has K head size {head_size} but V head size {head_size_v}; Medusa KV compaction supports "
            "models whose K and V head sizes are equal")
    return split_kv_cache(kv, int(head_size))
