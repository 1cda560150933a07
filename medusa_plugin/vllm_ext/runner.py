"""The Medusa model runner: tree positions, tree acceptance, KV compaction and tree drafting inside vLLM's V1 runner.

:class:`MedusaRunnerMixin` is mixed in front of vLLM's ``GPUModelRunner`` or ``CPUModelRunner``
(:func:`medusa_runner_class` builds the concrete class). It is inert unless the drafter is a
:class:`~.proposer.MedusaTreeProposer`. Per step:

1. ``_prepare_inputs``: after the stock preparation, :func:`.tree_step.plan_step` lays out the requests that verify a
   tree (a :class:`~.tree_step.TreeStep`); their rows get RoPE positions ``num_computed + depth[node]`` (the slot
   mapping, already computed, stays linear) and the step is published for the attention backend.
2. ``_sample``: ``core.tree_batch`` gathers each tree request's ``[N+1]`` draft tokens and logits,
   ``core.acceptance.accept_batch`` accepts with each request's own sampling parameters and seed (when every tree
   request is greedy: ``core.greedy_host``, in numpy on the argmax ids), the accepted
   path's K/V is moved to consecutive slots in every attention layer (views owned by the layer's impl), and the
   output row is ``[accepted tokens..., bonus]`` padded with -1, so the scheduler's ``num_computed_tokens -=
   num_rejected`` leaves exactly the accepted path in the cache. Requests without drafts are sampled by vLLM's own
   sampler on their single row, as without speculation.
3. ``propose_draft_token_ids``: the proposer gets the hidden state of each request's last accepted token.

With ``tree: dynamic`` every tree request has its own tree (drafted by the proposer the step before, kept by request
id; with ``tree_schedule: auto`` it may have fewer than ``N`` nodes, padded here): positions use its depths,
attention its ancestor mask (``TreeStep.tree_mask`` ``[R, N+1, N+1]``), acceptance runs per request
(``core.tree_list.accept_batch_each``; greedy steps on the host from the argmax ids, ``core.greedy_host``) and
the accepted paths feed the proposer's calibration.

vLLM contracts used (each listed with a probe in :mod:`.compat`): ``GPUModelRunner._prepare_inputs`` (returns
``(logits_indices, spec_decode_metadata, ...)``; ``self.positions`` written before the slot mapping is computed),
``_sample``, ``propose_draft_token_ids`` (9 parameters), the runner attributes ``drafter, sampler, requests,
input_batch, positions, query_start_loc, compilation_config, kv_cache_config, uses_mrope, uses_xdrope_dim``, the
input batch's ``req_ids, temperature_cpu, top_p_cpu, top_k_cpu, sampling_metadata (all_greedy, max_num_logprobs,
generators), block_table.block_tables[g].slot_mapping, update_async_output_token_ids``, ``SpecDecodeMetadata``,
``SamplerOutput`` / ``LogprobsTensors``, and the scheduler's rollback ``num_computed_tokens -= num_rejected``.
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

from medusa_plugin.core.acceptance import AcceptanceResult, accept_batch
from medusa_plugin.core.greedy_host import GreedyStep, greedy_step_host
from medusa_plugin.core.kv_compaction import compact_paged_kv_many, compaction_slots
from medusa_plugin.core.tree_batch import gather_tree_inputs, node_rows, output_rows, sample_rows
from medusa_plugin.core.tree_list import accept_batch_each, stack_ancestor_mask, stack_depth

from . import tree_step
from .proposer import MedusaTreeProposer
from .sampling_support import install_logits_processors, request_can_draft
from .tree_attention import TreeAttentionImplMixin

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
    chain_batches: int = 0          # ... of which verified chains only (a static tree's chain prefix, or dynamic
                                    # trees that are all chains): stock attention
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
        # A chain's tree mask is the causal mask and its depths are linear positions: stock attention is exact, and
        # its accepted nodes already sit in consecutive slots (no compaction).
        self._m_dynamic = self._medusa.dynamic is not None
        self._m_is_chain = tree.chain_prefix == tree.num_nodes and not self._m_dynamic
        self._m_trees: list | None = None                 # tree: dynamic: the step's trees (one per tree request)
        self._m_step: tree_step.TreeStep | None = None   # this step's tree requests; None if no request has drafts
        self._m_chain_step = False                        # this step's drafts are all chains (no mask, no compaction)
        self._m_kv_layers: tuple | None = None           # (kv_cache_config, [(group id, K/V views)]) for compaction
        self.medusa_stats = MedusaStats(accepted_per_depth=[0] * tree.max_depth)
        self._m_last_log = time.monotonic()
        install_logits_processors(self.input_batch, vllm_config, self.device)

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        if self._medusa is not None and not self._m_is_chain:
            self._medusa_check_attention()

    def initialize_kv_cache(self, *args, **kwargs) -> None:
        super().initialize_kv_cache(*args, **kwargs)
        if self._medusa is not None:
            self._m_kv_layers = None  # views of the caches just replaced must not keep them alive
        if self._medusa is not None and not kwargs.get("is_profiling", False):
            self._medusa.calibrate(self)  # tree_schedule: auto -> step cost measured in this engine (cached)

    def _medusa_check_attention(self) -> None:
        """Tree rows need the Medusa attention impl in every decoder layer; stock attention would be silently wrong."""
        for name, layer in self.compilation_config.static_forward_context.items():
            impl = getattr(layer, "impl", None)
            if getattr(impl, "attn_type", None) == AttentionType.DECODER and not isinstance(impl,
                                                                                            TreeAttentionImplMixin):
                raise MedusaRunnerError(
                    f"attention layer {name} uses {type(impl).__name__}, not the Medusa tree attention: the "
                    "medusa_plugin vLLM plugin registers it (entry point vllm.general_plugins, or call "
                    "medusa_plugin.vllm_ext.plugin.register() before building the engine); trees cannot be verified "
                    "without it (a chain, tree 'chain:K', can)")

    # ------------------------------------------------------------------ 1. positions + tree step
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        if self._medusa is None:
            return out
        tree_step.clear()
        spec_md = out[1]
        step = None if spec_md is None else tree_step.plan_step(
            spec_md.num_draft_tokens, num_scheduled_tokens, self.query_start_loc.np, self._m_tree.ancestor_mask,
            scheduler_output.total_num_scheduled_tokens)
        self._m_step = step
        self._m_chain_step = False
        if step is None:
            return out
        stats, n1 = self.medusa_stats, self._m_tree.num_nodes + 1
        num_draft = np.asarray(spec_md.num_draft_tokens)
        stats.tree_batches += 1
        stats.mixed_batches += int(bool(np.any((num_draft == 0)
                                               & (np.asarray(num_scheduled_tokens)[:num_draft.size] > 1))))
        stats.truncated_trees += int((step.num_valid < n1).sum())
        if self._m_dynamic:
            # One tree per request: its own depths and ancestor mask.
            req_ids = self.input_batch.req_ids
            # A request without a tree of ours verifies placeholders: vLLM pads a new decode request (e.g. a prompt
            # found whole in the prefix cache) with num_speculative_tokens drafts of -1, which never match; they get
            # the chain of the budget.
            drafted = self._medusa.trees
            self._m_trees = [drafted[req_ids[r]].tree if req_ids[r] in drafted else self._m_tree
                             for r in step.rows]
            if all(int(v) - 1 <= t.chain_prefix for t, v in zip(self._m_trees, step.num_valid)):
                # Every request verifies a chain (small trees under tree_schedule: auto often are): as for a static
                # chain, linear positions, stock attention and the accepted KV already in place.
                stats.chain_batches += 1
                self._m_chain_step = True
                return out
            dev = step.token_index.device
            n = self._m_tree.num_nodes  # the budget; with tree_schedule: auto a tree may have fewer nodes
            depth = stack_depth(self._m_trees, dev, num_nodes=n)                             # [R, N+1]
            step.tree_mask = stack_ancestor_mask(self._m_trees, dev, num_nodes=n)            # [R, N+1, N+1]
            tok, node = step.token_index, step.token_node
            req = torch.from_numpy(np.repeat(np.arange(step.rows.size), step.num_valid)).to(dev)
            self.positions[tok] = self.positions[tok - node] + depth[req, node]
            tree_step.publish(step)
        elif int(step.num_valid.max()) - 1 <= self._m_tree.chain_prefix:
            # Every request verifies a chain (the whole tree is one, or the schedule's prefix is): linear positions,
            # the causal mask and in-place accepted KV are already right, so stock attention and no compaction.
            stats.chain_batches += 1
            self._m_chain_step = True
        else:
            # Root rows keep their linear position num_computed; node i moves to num_computed + depth[i].
            tok, node = step.token_index, step.token_node
            self.positions[tok] = self.positions[tok - node] + self._m_tree.depth[node]
            tree_step.publish(step)
        return out

    # ------------------------------------------------------------------ 2. acceptance + compaction
    def _sample(self, logits, spec_decode_metadata):
        tree_step.clear()
        if self._medusa is None:
            return super()._sample(logits, spec_decode_metadata)
        batch, step = self.input_batch, self._m_step
        batch.update_async_output_token_ids()
        md = batch.sampling_metadata
        if step is None:
            # No request has drafts, so each has exactly one logit row: sample it as without speculation. Not the
            # stock _sample: vLLM builds spec-decode metadata for every step once speculation is configured, and
            # its rejection sampler then applies top-k to zero draft rows (``k.max()`` of an empty tensor: a crash).
            return self.sampler(logits=logits, sampling_metadata=md)
        num_reqs = step.logit_start.size
        width = int(step.num_valid.max())  # 1 + the step's most drafts (requests without drafts have 1 row)
        # Every request verifies a tree greedily without logprobs: the sampler's tokens would all be overwritten.
        skip_sampler = step.rows.size == num_reqs and md.all_greedy and md.max_num_logprobs is None
        greedy = None
        if not batch.temperature_cpu[step.rows].any():  # greedy tree requests: accepted on the host (numpy)
            greedy = self._medusa_accept_greedy(logits, spec_decode_metadata.draft_token_ids, step, width)
            result = greedy.result
            step.sample_rows = torch.from_numpy(greedy.sample_rows).to(logits.device)
        else:
            result = self._medusa_accept(logits, spec_decode_metadata.draft_token_ids, step)
            step.sample_rows = sample_rows(torch.from_numpy(step.logit_start).to(logits.device), step.tree_reqs,
                                           result.last_node)
        base = None if skip_sampler else self.sampler(logits=logits[step.sample_rows], sampling_metadata=md)
        if base is None and greedy is not None:
            sampled = torch.from_numpy(greedy.output).to(logits.device)
        else:
            sampled = output_rows(None if base is None else base.sampled_token_ids[:, 0], step.tree_reqs,
                                  result.output_tokens.to(logits.device), num_reqs, width)
        self._medusa_compact(step, result)
        self._medusa_record(step, result)
        logprobs = None if base is None else base.logprobs_tensors
        if logprobs is not None and width > 1:  # one entry per output slot; only slot 0 of non-tree rows is real
            logprobs = LogprobsTensors(*(t.repeat_interleave(width, dim=0) for t in logprobs[:3]))
        return SamplerOutput(sampled_token_ids=sampled, logprobs_tensors=logprobs)

    def _medusa_accept_greedy(self, logits, draft_token_ids, step: tree_step.TreeStep, width: int
                              ) -> GreedyStep:
        """All tree requests greedy: the argmax over the flat logit rows (no ``[R, N+1, V]`` copy), then
        ``core.greedy_host`` on the host."""
        if logits.device.type == "cpu":
            # numpy's argmax (same first-index tie rule as torch's) is ~20x faster than torch's on a CPU: 0.26 ms vs
            # 5.1 ms over 40 rows of 49152 fp32 logits, one thread; a bf16 argmax is twice slower still
            target = logits.float().numpy().argmax(-1)
        else:
            target = logits.argmax(-1).cpu().numpy()
        trees = self._m_trees if self._m_dynamic else self._m_tree
        return greedy_step_host(trees, target, draft_token_ids.cpu().numpy(), step.logit_start, step.rows,
                                step.draft_start, step.num_valid, self._m_tree.num_nodes, width)

    def _medusa_accept(self, logits, draft_token_ids, step: tree_step.TreeStep) -> AcceptanceResult:
        """``core.acceptance.accept_batch`` over the tree requests, each with its own parameters and generator."""
        dev, rows, batch = logits.device, step.rows, self.input_batch
        where = (torch.from_numpy(step.logit_start[rows]).to(dev), torch.from_numpy(step.draft_start).to(dev),
                 torch.from_numpy(step.num_valid).to(dev), self._m_tree.num_nodes)
        temperature = batch.temperature_cpu[rows]
        tokens, tree_logits = gather_tree_inputs(logits, draft_token_ids, *where)
        generators = None
        seeded = batch.sampling_metadata.generators  # {batch row: generator}, seeded requests only
        if seeded:
            index = np.full(step.logit_start.size, -1)
            index[rows] = np.arange(rows.size)
            generators = {int(index[r]): g for r, g in seeded.items() if index[r] >= 0}
        acc = self._medusa.config.acceptance
        # one tree per request (tree: dynamic) or the static tree for all
        accept, trees, more = ((accept_batch_each, self._m_trees, {"num_nodes": self._m_tree.num_nodes})
                               if self._m_dynamic else (accept_batch, self._m_tree, {}))
        return accept(
            trees, tokens, tree_logits, temperature=torch.from_numpy(temperature),
            sampled_rule=acc.rule_for(1.0), top_k=torch.from_numpy(batch.top_k_cpu[rows].astype(np.int64)),
            top_p=torch.from_numpy(batch.top_p_cpu[rows]), generators=generators, num_valid=where[2],
            posterior_threshold=acc.posterior_threshold, posterior_alpha=acc.posterior_alpha, **more)

    def _medusa_compact(self, step: tree_step.TreeStep, result: AcceptanceResult) -> None:
        """Move each accepted path's K/V to consecutive slots in every full-attention layer."""
        if self._m_chain_step or int(result.accept_len.max()) == 0:
            return
        for gid, views in self._medusa_kv_layers():
            slot_mapping = self.input_batch.block_table.block_tables[gid].slot_mapping.gpu
            dev = slot_mapping.device
            tree_slots = slot_mapping[node_rows(torch.from_numpy(step.query_start).to(dev),
                                                torch.from_numpy(step.num_valid).to(dev), self._m_tree.num_nodes)]
            src, dst = compaction_slots(result.path_nodes.to(dev), result.accept_len.to(dev),
                                        tree_slots.to(torch.int64))
            if src.numel() == 0:
                continue
            for block_size, same in views.items():
                compact_paged_kv_many(same, src, dst, block_size=block_size, block_dim=0, offset_dim=1)

    def _medusa_kv_layers(self) -> list[tuple[int, dict[int, list[torch.Tensor]]]]:
        """Per full-attention KV cache group: its id and the K and V views of its layers by block size, each
        physical cache once (layers may share one). Built once per ``kv_cache_config`` (and again after
        ``initialize_kv_cache``)."""
        cfg = self.kv_cache_config
        if self._m_kv_layers is None or self._m_kv_layers[0] is not cfg:
            ctx = self.compilation_config.static_forward_context
            seen: set[int] = set()
            groups = []
            for gid, group in enumerate(cfg.kv_cache_groups):
                if not isinstance(group.kv_cache_spec, FullAttentionSpec):
                    continue
                layers = []
                for name in group.layer_names:
                    layer = ctx.get(name)
                    kv = getattr(layer, "kv_cache", None)
                    if isinstance(kv, torch.Tensor) and kv.numel() and kv.data_ptr() not in seen:
                        seen.add(kv.data_ptr())
                        layers.append(layer)
                views: dict[int, list[torch.Tensor]] = {}
                for layer in layers:
                    for view in layer.impl.kv_views(layer, layer.kv_cache):
                        views.setdefault(view.shape[1], []).append(view)
                groups.append((gid, views))
            self._m_kv_layers = (cfg, groups)
        return self._m_kv_layers[1]

    def _medusa_record(self, step: tree_step.TreeStep, result: AcceptanceResult) -> None:
        stats = self.medusa_stats
        if self._m_dynamic:  # accepted paths -> the calibration of the next trees
            req_ids = self.input_batch.req_ids
            drafted = self._medusa.trees
            real = [i for i, r in enumerate(step.rows) if req_ids[r] in drafted]  # not vLLM's placeholders
            if real:
                self._medusa.observe_trees([drafted[req_ids[step.rows[i]]] for i in real],
                                           result.path_nodes[torch.tensor(real, device=result.path_nodes.device)])
        else:
            self._medusa.observe(result.last_node, step.num_valid - 1)  # online acceptance -> the schedule
        acc = result.accept_len.tolist()  # Python ints: a few numpy reductions cost more on the step's few rows
        per_depth = stats.accepted_per_depth
        if acc and max(acc) > len(per_depth):  # dynamic trees: depth varies
            per_depth += [0] * (max(acc) - len(per_depth))
        stats.steps += len(acc)
        stats.accepted += sum(acc)
        stats.nodes_verified += int(step.num_valid.sum()) - len(acc)
        for a in acc:
            for d in range(a):
                per_depth[d] += 1
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
        allow = [speculate and bool(toks) and request_can_draft(self.requests[rid])
                 for rid, toks in zip(req_ids, sampled_token_ids)]
        roots = [toks[-1] if toks else 0 for toks in sampled_token_ids]
        step = self._m_step
        hidden = sample_hidden_states if step is None else sample_hidden_states[step.sample_rows]
        if self._m_dynamic:
            batch = self.input_batch  # after vLLM's bookkeeping: the sampled tokens are in token_ids_cpu
            contexts = [batch.token_ids_cpu[i, : batch.num_tokens_no_spec[i]] for i in range(len(req_ids))]
            return self._medusa.propose_dynamic(hidden, roots, list(req_ids), contexts, allow)
        return self._medusa.propose_tree(hidden, roots, allow)


def medusa_runner_class(base: type) -> type:
    """``class Medusa<base>(MedusaRunnerMixin, base)`` (cached per base)."""
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(f"Medusa{base.__name__}", (MedusaRunnerMixin, base), {"__module__": __name__})
        _CLASSES[base] = cls
    return cls


_CLASSES: dict[type, type] = {}
