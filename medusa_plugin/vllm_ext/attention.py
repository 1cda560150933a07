"""Tree attention for vLLM's CPU backend (CPU_ATTN), as a subclass the plugin registers in place of the stock one.

``MedusaCPUAttentionBackend`` is ``CPUAttentionBackend`` with another impl. ``MedusaCPUAttentionImpl.forward``
behaves exactly like the stock impl unless the Medusa runner published a tree step (:mod:`.tree_step`). In a tree
step whose rows all belong to tree requests the stock kernel is skipped (K/V were already written by
``do_kv_cache_update`` with the linear slot mapping); otherwise it runs for the whole batch and the rows of tree
requests are recomputed. Tree rows use ``core.paged_tree_attention`` (its plan, built once per step and shared by the
layers) over the engine's paged cache, read in place through :func:`.kv_layout.cpu_kv_views`: each tree node sees the
whole context plus itself and its ancestors, never its siblings.

vLLM contracts used (listed with probes in :mod:`.compat`): ``CPUAttentionBackend`` / ``CPUAttentionBackendImpl``
(``forward`` with 9 parameters; K/V written before it by ``do_kv_cache_update``), ``CPUAttentionMetadata`` fields
``query_start_loc, seq_lens, block_table, num_actual_tokens``, the per-layer cache ``[num_blocks, Hkv, block_size,
2*D]``, ``layer.isa`` (set by ``CPUAttentionMetadataBuilder``), ``AttentionType.DECODER``.
"""
from __future__ import annotations

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from medusa_plugin.core.paged_attention import (PagedTreePlan, paged_tree_attention_planned,
                                                plan_paged_tree_attention)

from . import tree_step
from .kv_layout import cpu_kv_layout, cpu_kv_views
from .tree_attention import TreeAttentionImplMixin, TreeAttentionUnsupported, check_tree_attention_support

__all__ = ["MedusaCPUAttentionBackend", "MedusaCPUAttentionImpl", "TreeAttentionUnsupported"]


class MedusaCPUAttentionImpl(TreeAttentionImplMixin, CPUAttentionBackendImpl):
    """Stock CPU attention plus tree-masked rows for requests that verify a Medusa tree this step."""

    def _make_kv_views(self, layer, kv_cache):
        layout = cpu_kv_layout(layer.isa, kv_cache.dtype, kv_cache.shape[2], self.head_size)
        return cpu_kv_views(kv_cache, layout)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        step = self.tree_step_for(attn_metadata)
        if step is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        n = attn_metadata.num_actual_tokens
        if not getattr(self, "_tree_supported", False):
            check_tree_attention_support(self, (("fp8 KV cache", self.is_fp8_kv_cache),))
            self._tree_supported = True
        # Every row is a tree row (token_index == arange(n)): the stock kernel's result would be overwritten.
        all_tree = step.token_index.shape[0] == n
        if not all_tree:
            output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                     output_block_scale)
        elif output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the CPU attention backend")
        key_cache, value_cache = self.kv_views(layer, kv_cache)
        plan = self._tree_plan(step, attn_metadata, key_cache, query)
        if all_tree:
            paged_tree_attention_planned(query[:n], key_cache, value_cache, plan, self.scale,
                                         out=output[:n].view(n, query.shape[1], query.shape[2]))
        else:
            tree_out = paged_tree_attention_planned(query[step.token_index], key_cache, value_cache, plan, self.scale)
            output[step.token_index] = tree_out.to(output.dtype)
        return output

    @staticmethod
    def _tree_plan(step: tree_step.TreeStep, attn_metadata, key_cache, query) -> PagedTreePlan:
        """The step's tree-attention plan, built by the first layer and reused by the others (same metadata)."""
        key = (id(attn_metadata), tuple(key_cache.shape[1:]), tuple(query.shape[1:]))
        hit = step.plans.get(key)
        if hit is not None and hit[0] is attn_metadata:
            return hit[1]
        rows = step.tree_reqs
        plan = plan_paged_tree_attention(
            attn_metadata.block_table[rows], attn_metadata.seq_lens[rows], step.sub_query_start_loc, step.tree_mask,
            torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device), num_tokens=step.token_index.shape[0],
            block_size=key_cache.shape[1], num_kv_heads=key_cache.shape[2], num_q_heads=query.shape[1],
            head_dim=query.shape[2], device=query.device)
        step.plans[key] = (attn_metadata, plan)
        return plan


class MedusaCPUAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with :class:`MedusaCPUAttentionImpl`; name, builder and cache layout unchanged."""

    @staticmethod
    def get_impl_cls() -> type[MedusaCPUAttentionImpl]:
        return MedusaCPUAttentionImpl
