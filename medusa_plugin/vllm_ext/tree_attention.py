"""What every Medusa tree-attention impl shares, whatever the vLLM backend it extends (CPU ``attention``, CUDA
``cuda_attention``): the check of the layer features tree attention supports, the tree-step lookup, and ownership of
the layer's logical K/V views (used by the impl itself and, through :meth:`TreeAttentionImplMixin.kv_views`, by the
runner's KV compaction).

A backend module subclasses ``(TreeAttentionImplMixin, <stock impl>)``, implements :meth:`_make_kv_views` (with
:mod:`.kv_layout`) and calls :func:`check_tree_attention_support` with its own extra features before its first tree
step.
"""
from __future__ import annotations

from torch import Tensor
from vllm.v1.attention.backend import AttentionType

from . import tree_step

__all__ = ["TreeAttentionUnsupported", "TreeAttentionImplMixin", "check_tree_attention_support"]


class TreeAttentionUnsupported(ValueError):
    """A layer feature tree attention does not implement (sliding window, ALiBi, soft-cap, sinks, quantized KV...)."""


def check_tree_attention_support(impl, extra: tuple[tuple[str, bool], ...] = (), hint: str = "") -> None:
    """Raise :class:`TreeAttentionUnsupported` naming every feature of attention ``impl`` (a vLLM ``AttentionImpl``)
    that the tree path does not implement: the ones every backend shares, plus the backend's own ``extra``
    ``(name, in_use)`` pairs."""
    window = getattr(impl, "sliding_window", None)
    common = (("sliding window", window not in (None, -1, (-1, -1))),
              ("ALiBi", getattr(impl, "alibi_slopes", None) is not None),
              ("logits soft-cap", bool(getattr(impl, "logits_soft_cap", 0))),
              ("attention sinks", getattr(impl, "sinks", None) is not None))
    bad = [name for name, on in common + tuple(extra) if on]
    if bad:
        raise TreeAttentionUnsupported(
            f"Medusa tree attention does not support {', '.join(bad)} (this model's attention uses it); "
            f"run this model without the Medusa proposer{hint}")


class TreeAttentionImplMixin:
    """Mixed in front of a stock vLLM ``AttentionImpl``; inert outside tree steps."""

    def _make_kv_views(self, layer, kv_cache: Tensor) -> tuple[Tensor, Tensor]:
        """Logical ``[num_blocks, block_size, Hkv, D]`` K and V views of this backend's layer cache."""
        raise NotImplementedError

    def kv_views(self, layer, kv_cache: Tensor) -> tuple[Tensor, Tensor]:
        """This layer's K and V views (built once; rebuilt if the engine hands over another cache tensor).

        Args:
            layer: the vLLM ``Attention`` layer this impl belongs to (``static_forward_context[name]``).
            kv_cache: its cache tensor, as the backend allocated it.
        Returns:
            ``(key, value)``, each ``[num_blocks, block_size, Hkv, D]``, sharing ``kv_cache``'s storage.
        """
        ident = (kv_cache.data_ptr(), tuple(kv_cache.shape), tuple(kv_cache.stride()), kv_cache.dtype)
        cached = getattr(self, "_medusa_kv_views", None)
        if cached is None or cached[0] != ident:
            cached = (ident, self._make_kv_views(layer, kv_cache))
            self._medusa_kv_views = cached
        return cached[1]

    def tree_step_for(self, attn_metadata) -> tree_step.TreeStep | None:
        """The published tree step this layer must honour, or None (stock attention)."""
        return tree_step.for_layer(self.attn_type == AttentionType.DECODER, attn_metadata)
