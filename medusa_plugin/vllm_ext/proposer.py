"""``MedusaTreeProposer``: the ``custom_class`` speculative proposer that drafts a whole Medusa tree per request.

Selected with::

    speculative_config={"method": "custom_class",
                        "model": "medusa_plugin.vllm_ext.proposer.MedusaTreeProposer",
                        "num_speculative_tokens": N}          # N = number of tree nodes
    additional_config={"medusa": {"heads": DIR, "tree": NAME, ...}}

vLLM builds it in ``GPUModelRunner.__init__`` (via ``create_custom_proposer``) and calls
``load_model(target_model)`` from the runner's ``load_model`` (contracts in :mod:`.compat`). The stock ``propose()``
call does not pass hidden states, so tree mode needs the Medusa model runner (:mod:`.runner`), which calls
:meth:`MedusaTreeProposer.propose_tree` instead.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from medusa_plugin.core.acceptance_model import AcceptanceModelError, NodeAcceptanceModel, acceptance_model_for
from medusa_plugin.core.calibration import AcceptanceCalibration, CalibrationError, calibration_for
from medusa_plugin.core.config import MedusaConfigError, check_tree_depth
from medusa_plugin.core.dynamic_tree import DynamicTree, DynamicTreeError, NodeStream, observe_step
from medusa_plugin.core.heads import MedusaHeads, MedusaHeadsError, native_half_matmul
from medusa_plugin.core.int8_heads import int8_heads
from medusa_plugin.core.node_allocation import allocate_streams
from medusa_plugin.core.head_files import recorded_accuracy
from medusa_plugin.core.schedule import AcceptanceEstimator, TreeSchedule, default_accuracy, prefix_accept_lengths
from medusa_plugin.core.observed_step_cost import ObservedStepCost
from medusa_plugin.core.step_time_fit import StepTimeFit
from medusa_plugin.core.successor_prior import FILE_NAME as SUCCESSORS_FILE
from medusa_plugin.core.successor_prior import SuccessorCounts, SuccessorPriorError
from medusa_plugin.core.tree import MedusaTree

from .settings import medusa_settings

__all__ = ["MedusaTreeProposer", "MedusaProposerError"]


def _log_info(msg: str) -> None:
    from vllm.logger import init_logger

    init_logger("vllm.medusa_plugin.proposer").info(msg)


def _log_debug(msg: str) -> None:
    from vllm.logger import init_logger

    init_logger("vllm.medusa_plugin.proposer").debug(msg)


class MedusaProposerError(ValueError):
    """Medusa proposer misconfigured or used outside the Medusa model runner."""


class MedusaTreeProposer:
    """Drafts ``tree.num_nodes`` tokens per request from the Medusa heads, in Medusa node order.

    Attributes:
        config: the :class:`MedusaConfig`.
        tree: the :class:`MedusaTree` (on the target's device after ``load_model``).
        heads: :class:`MedusaHeads` (after ``load_model``).
        schedule: the batch-aware :class:`TreeSchedule` from the ``tree_schedule`` setting, or None (full tree at
            every batch size). With a schedule, each step drafts the first ``schedule.num_nodes(batch)`` nodes (a
            prefix of node order is itself a tree; 0 = no speculation for that step), and ``tree`` is in order of
            expected acceptance (``MedusaTree.in_acceptance_order``, the heads' recorded accuracy).
        dynamic: for ``tree: dynamic`` the :class:`~medusa_plugin.core.dynamic_tree.DynamicTreeSpec` (``tree`` is
            then a chain as long as the budget, used only for its node count), else None.
        trees: ``tree: dynamic``: the tree drafted for each request id at the last :meth:`propose_tree` call.
        calibration: ``tree: dynamic``: the online :class:`AcceptanceCalibration` (fed by :meth:`observe_trees`).
    """

    def __init__(self, vllm_config) -> None:
        self.vllm_config = vllm_config
        # Settings, node count, pipeline parallelism, ... were validated when the config was built
        # (settings.check_supported, run by the plugin).
        self.config = medusa_settings(vllm_config)
        self.dynamic = self.config.dynamic_spec() if self.config.is_dynamic else None
        self.trees: dict[str, DynamicTree] = {}
        self.calibration: AcceptanceCalibration | None = None
        self.successors: SuccessorCounts | None = None  # tree: dynamic: successor counts next to the heads
        self.acceptance_model: NodeAcceptanceModel | None = None  # tree: dynamic: the node scores next to the heads
        self._observed = 0
        self.tree = (MedusaTree.chain(self.dynamic.budget, topk=self.config.topk) if self.dynamic is not None
                     else MedusaTree.load(self.config.tree, topk=self.config.topk))
        # the heads' own held-out accuracy when their training recorded it (None: Vicuna-7B's)
        accuracy = recorded_accuracy(self.config.heads)
        if self.dynamic is None and self.config.tree_schedule is not None:
            # a schedule verifies prefixes of node order: the nodes most likely to be accepted first (a 2-node
            # prefix is then the chain [0], [0, 0] rather than ranks 0 and 1 of head 0)
            self.tree = self.tree.in_acceptance_order(accuracy or default_accuracy())
        # tree: dynamic has no table of prefixes: with tree_schedule: auto each step's node count comes from the
        # measured step cost and the trees' own path scores (propose_dynamic)
        self.schedule = (None if self.dynamic is not None
                         else TreeSchedule.resolve(self.config.tree_schedule, self.tree, accuracy=accuracy))
        # tree_schedule: auto without a shipped table for this device (every CPU): measured in the engine
        # (calibrate(), called by the runner once the KV cache exists).
        self.needs_calibration = self.config.tree_schedule == "auto" and self.schedule is None
        # E[L](n) as observed in serving (observe(), called by the runner with each step's accepted paths).
        # Before any observation: the heads' own held-out accuracy when their training recorded it, else Vicuna-7B's.
        prior = (self.schedule.accept_lengths if self.schedule is not None
                 else prefix_accept_lengths(self.tree, accuracy))
        self.acceptance = AcceptanceEstimator(self.tree, prior[: self.tree.num_nodes + 1]
                                              if len(prior) >= self.tree.num_nodes + 1
                                              else prefix_accept_lengths(self.tree))
        self._steps_since_refresh = 0
        self._pending: list[tuple] = []
        self._since_empty = -1  # tree: dynamic + auto: steps since one chose no node (-1: the last one chose some)
        self._recheck = self.RECHECK_EVERY  # tree: dynamic + auto: the heads' current rest (steps), see RECHECK_MAX
        self._dyn_idle_steps = 0  # tree: dynamic + auto: steps without speculation since the last one-node probe
        self._idle_probe = False  # tree: dynamic + auto: this step's nodes are that probe, not a choice
        self._idle_steps = 0
        # measured step cost (calibrate) and what a step costs beyond it (fixed + per draft row), learnt from the
        # time between consecutive propose_tree calls (one engine step each)
        self._step_cost: dict | None = None
        self.step_time = StepTimeFit(refit_every=8)
        self.observed_cost = ObservedStepCost()  # engine steps' own times by (batch size, nodes per request)
        self._plain_probe = False  # tree: dynamic + auto: this step's drafts were dropped for a plain probe
        self._spec_steps = 0
        self._last_call: tuple[float, int, int, int, bool] | None = None
        # tree: dynamic: drafting time (heads + trees, ms) per batch size, a moving average of the measured calls;
        # the node allocation charges it to speculating steps
        self.dynamic_draft_ms: dict[int, float] = {}
        self.heads: MedusaHeads | None = None
        self._heads_fp32: MedusaHeads | None = None
        self._heads_int8: MedusaHeads | None = None
        self._heads_bf16: MedusaHeads | None = None
        self._lm_head: Tensor | None = None
        self._embed: Tensor | None = None  # root-input heads: the target's input-embedding table [V, H]
        self.vocab_size = vllm_config.model_config.get_vocab_size()

    def _load_dynamic_priors(self) -> None:
        """``tree: dynamic``: the calibration (the heads' ``calibration.json`` prior, else fresh), with
        ``successors: true`` the successor counts (``successors.safetensors``) and with ``acceptance_model: true`` the
        learned node-acceptance model (``acceptance_model.safetensors``) of a local heads directory.

        Raises:
            AcceptanceModelError: the model file is unreadable or made for other heads (one line naming the fix).
        """
        heads_dir = Path(self.config.heads)
        local = heads_dir.is_dir()
        if local:
            self.calibration, how = calibration_for(heads_dir, self.heads.num_heads)
        else:
            self.calibration, how = AcceptanceCalibration(self.heads.num_heads), "fresh"
        path = heads_dir / SUCCESSORS_FILE
        self.successors = SuccessorCounts.load(path) if self.config.successors and local and path.is_file() else None
        self.acceptance_model, why = None, "off (acceptance_model: false)"
        if self.config.acceptance_model:
            self.acceptance_model, why = (acceptance_model_for(heads_dir, self.heads.num_heads, self.successors)
                                          if local else (None, "none (heads from the hub)"))
        _log_info(f"Medusa dynamic trees: calibration {how}; successor counts "
                  f"{f'{path} ({self.successors.tokens} tokens)' if self.successors is not None else 'off'}; "
                  f"acceptance model {why}")

    # ------------------------------------------------------------------ vLLM hooks
    def load_model(self, target_model: torch.nn.Module) -> None:
        """Load the heads onto the target's device and dtype (v2 heads project with the target's lm_head)."""
        ref = next(target_model.parameters())
        dtype = ref.dtype if self.config.dtype == "auto" else getattr(torch, self.config.dtype)
        mc = self.vllm_config.model_config
        self.heads = MedusaHeads.from_pretrained(
            self.config.heads, base_hidden_size=mc.get_hidden_size(), base_vocab_size=self.vocab_size,
            dtype=dtype, device=ref.device, revision=self.config.heads_revision).eval()
        try:  # the same check and message as `medusa-plugin validate --check-files`
            if self.dynamic is not None:
                self.dynamic.check_heads(self.heads.num_heads)
                self._load_dynamic_priors()
            else:
                check_tree_depth(self.tree, self.heads.num_heads, tree_name=self.config.tree_name,
                                 heads=self.config.heads)
        except (MedusaConfigError, DynamicTreeError, CalibrationError, SuccessorPriorError,
                AcceptanceModelError) as e:
            raise MedusaProposerError(str(e)) from None
        if not self.heads.own_lm_head:
            lm_head = getattr(target_model, "lm_head", None)
            weight = getattr(lm_head, "weight", None)
            if weight is None:
                raise MedusaProposerError("v2 Medusa heads need the target model's lm_head, which this model lacks")
            if self.vllm_config.parallel_config.tensor_parallel_size != 1:
                raise MedusaProposerError("v2 Medusa heads (no own lm_head) need tensor_parallel_size=1")
            self._lm_head = weight[: self.vocab_size]
        self._embed = None
        if self.heads.root_input:
            self._embed = self._input_embedding(target_model)
        self.tree = self.tree.to(ref.device)
        # Half heads on a CPU without native half matmul: a float32 copy for calls of many rows (FP32_HEAD_ROWS)
        self._heads_fp32 = None
        if (self.config.dtype == "auto" and self.heads.own_lm_head and not native_half_matmul(dtype, ref.device)
                and sum(p.numel() for p in self.heads.parameters()) * 4 <= self.FP32_COPY_MAX_BYTES):
            self._heads_fp32 = copy.deepcopy(self.heads).float()
        # Float32 heads on a CPU with native bf16 matmul: a bf16 copy (drafts only), 2.2-2.6x faster there (1 x 4
        # heads 2.78 -> 1.17 ms, 16 x 4 5.64 -> 2.16 ms, caches cold; benchmarks/README.md, session 9)
        self._heads_bf16 = None
        if (self.config.dtype == "auto" and self.heads.dtype == torch.float32 and ref.device.type == "cpu"
                and native_half_matmul(torch.bfloat16, ref.device)):
            self._heads_bf16 = copy.deepcopy(self.heads).to(torch.bfloat16)
        self._heads_int8 = self._int8_copy(ref.device)

    def _int8_copy(self, device: torch.device) -> MedusaHeads | None:
        """``int8_drafting``: the heads with int8 weights (``core.int8_heads``) for calls of at most
        :attr:`INT8_MAX_ROWS` rows. ``auto`` makes one on a CPU with native bfloat16 matmul, running in bfloat16
        whatever the heads' dtype (with float32 or float16 activations the kernel is 2-8x slower than the float heads
        there; drafts only, so the precision is the heads' business, not the output's); ``true`` also elsewhere (in
        the heads' dtype) or fails with the reason; ``false`` never."""
        mode = self.config.int8_drafting
        if mode is False:
            return None
        native_bf16 = device.type == "cpu" and native_half_matmul(torch.bfloat16, device)
        if mode == "auto" and not native_bf16:
            return None
        try:
            heads = int8_heads(self.heads, torch.bfloat16 if native_bf16 else None)
        except MedusaHeadsError as e:
            if mode is True:
                raise MedusaProposerError(str(e)) from None
            _log_info(f"Medusa: float heads for every drafting call ({e})")
            return None
        _log_info(f"Medusa: int8 copy of the heads for drafting calls of up to {self.INT8_MAX_ROWS} rows")
        return heads

    def _input_embedding(self, target_model: torch.nn.Module) -> Tensor:
        """The target's input-embedding table ``[V, H]`` (the rows root-input heads read, as in training:
        ``hf.base_model.root_embeds_of``): the weight of ``target_model.model.embed_tokens`` (a compat contract)."""
        if self.vllm_config.parallel_config.tensor_parallel_size != 1:
            raise MedusaProposerError("Medusa heads that read the root token (root_input) need tensor_parallel_size=1")
        weight = getattr(getattr(getattr(target_model, "model", None), "embed_tokens", None), "weight", None)
        if weight is None or weight.dim() != 2 or weight.shape[1] != self.heads.hidden_size:
            raise MedusaProposerError("these Medusa heads read the root token (root_input), but the target model has "
                                      "no input-embedding table model.embed_tokens of hidden size "
                                      f"{self.heads.hidden_size}: use heads trained without --root-input")
        return weight[: self.vocab_size]

    def root_embeds(self, roots: Tensor | None) -> Tensor | None:
        """``[B]`` root token ids -> ``[B, H]`` input-embedding rows for root-input heads; None for other heads
        (or no roots)."""
        if self._embed is None or roots is None:
            return None
        return self._embed[roots.to(self._embed.device)]

    FP32_HEAD_ROWS = 8                  # see core.heads.native_half_matmul
    FP32_COPY_MAX_BYTES = 512 * 2 ** 20
    INT8_MAX_ROWS = 16                  # see core.int8_heads: the whole draft breaks even at ~24 rows

    def heads_for(self, rows: int) -> MedusaHeads:
        """The heads to run a call of ``rows`` rows (requests x heads) with: the int8 copy up to
        :attr:`INT8_MAX_ROWS` rows where there is one, else the bf16 copy of float32 heads where there is one, else
        the float32 copy of half heads from :attr:`FP32_HEAD_ROWS` rows on where there is one, else :attr:`heads`."""
        if self._heads_int8 is not None and rows <= self.INT8_MAX_ROWS:
            return self._heads_int8
        if self._heads_bf16 is not None:
            return self._heads_bf16
        if self._heads_fp32 is not None and rows >= self.FP32_HEAD_ROWS:
            return self._heads_fp32
        return self.heads

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None):
        """The stock ``custom_class`` entry point; tree mode cannot work through it (no hidden states)."""
        raise MedusaProposerError(
            "MedusaTreeProposer needs the Medusa model runner (tree positions, tree attention and tree acceptance): "
            "use worker_cls='medusa_plugin.vllm_ext.worker.MedusaCPUWorker' (--worker-cls), which the "
            "medusa_plugin vLLM plugin selects automatically when it is installed")

    # ------------------------------------------------------------------ schedule: measured cost, observed acceptance
    REFRESH_EVERY = 16      # engine steps between re-derivations of the schedule from the observed acceptance
    PROBE_EVERY = 64        # steps without speculation between single-node probes (keeps acceptance observed)
    PROBE_FAST = 8          # ... and between probes while the step-time ratio at this batch size is still unobserved
    RECHECK_EVERY = 8       # tree: dynamic + auto: after a step with no nodes, steps until the heads run again
    RECHECK_MAX = 64        # ... doubled after every recheck that again chose nothing, up to this
    CHEAP_DRAFT = 0.2       # ... but the next step while drafting costs less than this fraction of a plain step

    def calibrate(self, runner) -> None:
        """``tree_schedule: auto`` without a shipped table: the schedule from the step cost measured in this engine
        (cached per model, dtype and machine; :mod:`.calibrate`). No-op otherwise. Called by the runner after the
        KV cache is allocated."""
        if not self.needs_calibration or self.heads is None:
            return
        from . import calibrate

        self._step_cost = calibrate.load_or_measure(runner, self, log=_log_info)
        self.needs_calibration = False
        if self.dynamic is not None:
            _log_info(f"Medusa dynamic trees: up to {self.dynamic.budget} nodes per request, the step's node count "
                      f"from the measured step cost and the trees' path scores")
            return
        self.schedule = calibrate.schedule_from(self._step_cost, self, self.acceptance.accept_lengths())
        _log_info(f"Medusa tree schedule (nodes per batch size): {self.schedule.ranges()}")

    def observe(self, last_node, num_verified) -> None:
        """Record one step's accepted paths (``last_node [R]``: last accepted node per tree request, ``num_verified
        [R]``: nodes it verified); every :attr:`REFRESH_EVERY` calls the acceptance estimate takes them in (one
        update for all: a per-step update was a fifth of the plugin's own time per step) and the schedule is
        re-derived."""
        self._pending.append((last_node, num_verified))
        self._steps_since_refresh += 1
        if self._steps_since_refresh >= self.REFRESH_EVERY:
            self._steps_since_refresh = 0
            self.acceptance.update(torch.cat([torch.as_tensor(a).reshape(-1).cpu() for a, _ in self._pending]),
                                   torch.cat([torch.as_tensor(b).reshape(-1).cpu() for _, b in self._pending]))
            self._pending.clear()
        if self.schedule is not None and self._steps_since_refresh == 0:
            if self._step_cost is not None and len(self.step_time):
                self._refresh_schedule()
            else:
                self.schedule = self.schedule.with_accept_lengths(self.acceptance.accept_lengths(),
                                                                  tree=self.schedule.meta.get("tree"))

    def _refresh_schedule(self) -> None:
        """Re-derive the schedule from the measured step cost, the learnt step time and the observed acceptance."""
        from . import calibrate

        old = self.schedule.ranges()
        self.schedule = calibrate.schedule_from(self._step_cost, self, self.acceptance.accept_lengths(),
                                                step_fixed_ms=self.step_time.fixed_ms,
                                                tree_row_ms=self.step_time.tree_row_ms, observed=self.observed_cost)
        if self.schedule.ranges() != old:
            _log_debug(f"Medusa tree schedule now {self.schedule.ranges()} (fixed step time "
                       f"{self.step_time.fixed_ms:.1f} ms, {self.step_time.tree_row_ms:.2f} ms per draft "
                       f"row, E[L] {[round(x, 2) for x in self.acceptance.accept_lengths()[:6]]})")

    @property
    def step_fixed_ms(self) -> float:
        """Engine-step time outside the model forward and the heads (ms), learnt from recent steps."""
        return self.step_time.fixed_ms

    def _time_step(self, batch_size: int, draft_rows: int, depth: int, draft_ms: float | None = None,
                   tree_step: bool = False) -> None:
        """Called once per engine step with what it drafted (``draft_rows`` nodes in all, heads ``0..depth-1``): the
        time since the previous call is one engine step of the previous call's drafts (plus this call's drafting);
        minus its predicted forward and heads it is a residual for :attr:`step_time`. ``draft_ms``: this call's
        drafting as measured (dynamic trees), instead of the measured table's heads time for ``depth``.
        ``tree_step``: the drafts are not a chain, so the step takes the tree-attention path (predicted too)."""
        now = time.perf_counter()
        last, self._last_call = self._last_call, (now, batch_size, draft_rows, depth, tree_step)
        if last is None or self._step_cost is None:
            return
        from . import calibrate

        period = (now - last[0]) * 1e3
        if draft_ms is None:
            pred = calibrate.predicted_rows_ms(self._step_cost, last[1], last[2], last[3], tree_step=last[4])
        else:
            pred = calibrate.predicted_rows_ms(self._step_cost, last[1], last[2], 0, tree_step=last[4]) + draft_ms
        if period < 4 * pred + 50:  # not an idle gap between requests
            self.step_time.add(last[2], period - pred)
            # kept by draft nodes per request; a static prefix only when every request drafted it, dynamic trees
            # (of any sizes) by the count rounded up
            if self.dynamic is not None or last[2] % last[1] == 0:
                self.observed_cost.add(last[1], -(-last[2] // last[1]), period)

    def dynamic_step_ms(self, batch_size: int) -> Callable[[int], float]:
        """``tree: dynamic`` with a measured step cost: step time (ms) of ``batch_size`` requests as a function of
        the draft rows verified (forward + logits over all rows, the measured tree-attention path, the learnt fixed
        and per-row time; drafting is charged apart, :attr:`dynamic_draft_ms`). Where :attr:`observed_cost` has the
        engine's step-time ratio at this batch size (steps kept by draft nodes per request, rounded up), the extra
        cost of draft rows is scaled to match it."""
        from medusa_plugin.core.schedule import interpolate_ms, tree_attention_cost

        fwd = {int(k): float(v) for k, v in self._step_cost["forward_ms"].items()}
        fixed, per_row = self.step_time.fixed_ms, self.step_time.tree_row_ms
        # the tree-attention curve at this batch size, once: the node allocation calls the result for every m
        attn = self._step_cost.get("tree_attention_ms") or {}
        at_b = {q: tree_attention_cost(attn, batch_size, q) for q in sorted({int(q) for r in attn.values() for q in r})}

        def step_ms(m: int) -> float:
            return (interpolate_ms(fwd, batch_size + m) + fixed + per_row * m
                    + (interpolate_ms(at_b, 1 + m / batch_size) if m > 0 and at_b else 0.0))

        return self.observed_cost.correct_curve(batch_size, step_ms,
                                                drafting_ms=self.dynamic_draft_ms.get(batch_size, 0.0))

    # ------------------------------------------------------------------ tree drafting
    def num_nodes_for(self, batch_size: int) -> int:
        """Tree nodes (a prefix of node order) to draft per request at ``batch_size``: the schedule's choice, or
        the whole tree without a schedule. While the schedule says 0 within its table, every
        :attr:`PROBE_EVERY`-th step drafts one node, so a rise in acceptance is noticed, and every
        :attr:`REFRESH_EVERY`-th step re-derives the schedule from the step time learnt meanwhile."""
        if self.schedule is None:
            return self.tree.num_nodes
        n = min(self.schedule.num_nodes(batch_size), self.tree.num_nodes)
        if n == 0 and 0 < batch_size <= self.schedule.max_batch_size:
            self._idle_steps += 1
            # observe() re-derives the schedule only after steps with drafts; without them the step time learnt
            # from plain steps must still reach it, or a noisy per-row estimate keeps speculation off for ~1000 steps
            if self._idle_steps % self.REFRESH_EVERY == 0 and self._step_cost is not None and len(self.step_time):
                self._refresh_schedule()
            if self._idle_steps % self._probe_every(batch_size, 1, 0) == 0:
                return 1
        elif n > 0 and self._step_cost is not None:
            # one plain step now and then: steps with and without draft rows separate the fixed step time from
            # the per-row time (StepTimeFit) and give the observed step-time ratio its plain steps
            self._spec_steps += 1
            if self._spec_steps % self._probe_every(batch_size, 0, n) == 0:
                return 0
        return n

    def _probe_every(self, batch_size: int, probe: int, current: int) -> int:
        """Steps between probes of ``probe`` nodes per request while the schedule drafts ``current``:
        :attr:`PROBE_FAST` while the engine's step times at this batch size are observed for ``current`` but not
        yet for ``probe`` (the observed step-time ratio needs both), else :attr:`PROBE_EVERY`."""
        o = self.observed_cost
        if self._step_cost is not None and o.count(batch_size, probe) < o.min_steps <= o.count(batch_size, current):
            return self.PROBE_FAST
        return self.PROBE_EVERY

    def draft_topk(self, hidden: Tensor, num_heads: int, roots: Tensor | None = None) -> Tensor:
        """``[B, H]`` hidden (and ``[B]`` root ids, read by root-input heads) -> ``[B, num_heads, topk]`` token ids
        (only the heads the prefix needs)."""
        heads = self.heads_for(hidden.shape[0] * num_heads)
        return heads.draft_topk(hidden, self.tree.topk, num_heads, lm_head=self._lm_head, vocab_size=self.vocab_size,
                                root_embeds=self.root_embeds(roots))

    def candidates_from_topk(self, root: Tensor, top: Tensor, num_nodes: int) -> list[list[int]]:
        """Draft tokens of the first ``num_nodes`` nodes per request (one host copy of the top-k ids)."""
        return self.tree.candidates_from_topk_host(top.tolist(), num_nodes)

    def observe_trees(self, trees: list[DynamicTree], path_nodes: Tensor) -> None:
        """``tree: dynamic``: feed one step's accepted paths (``[R, W]``, root first, -1 padded) of the requests that
        verified ``trees`` to the calibration; refitted every 8 calls."""
        observe_step(self.calibration, trees, path_nodes)
        self._observed += 1
        if self._observed % 8 == 0:
            self.calibration.refit()

    @torch.inference_mode()
    def propose_dynamic(self, hidden: Tensor, roots: list[int], req_ids: list[str], contexts: list,
                        allow: list[bool] | None = None) -> list[list[int]]:
        """``tree: dynamic``: a tree per request (``core.dynamic_tree``), kept in :attr:`trees` by request id for the
        verification step; returns its ``budget`` draft tokens in node order (``[]`` where ``allow`` is False).

        Args:
            hidden: ``[B, H]`` hidden states as in :meth:`propose_tree`; roots: ``B`` root tokens.
            req_ids: ``B`` request ids. contexts: ``B`` token sequences (prompt + output, ending with the root; numpy
                or lists), read only with n-gram branches.
        """
        if self.heads is None:
            raise MedusaProposerError("propose_dynamic called before load_model")
        self.trees = {}
        b = hidden.shape[0]
        out: list[list[int]] = [[] for _ in range(b)]
        idx = [i for i in range(b) if allow is None or allow[i]]
        # After a step that chose no node (rows too dear for these scores) the heads rest: their cost is paid before
        # the choice, so running them for nothing slows plain steps down (at 8 requests in bf16 on a 2-core CPU a
        # heads run is ~3 ms of a ~17 ms step). The rest starts at RECHECK_EVERY steps (1 where drafting is cheap next
        # to a plain step, :meth:`_first_rest`) and doubles after every recheck that again chose nothing, up to
        # RECHECK_MAX.
        self._since_empty = self._since_empty + 1 if self._since_empty >= 0 else -1
        if not idx or (self._since_empty > 0 and self._since_empty % self._recheck):
            self._time_step(b, 0, 0, draft_ms=0.0)
            return out
        t0 = time.perf_counter()
        sel = torch.tensor(idx, device=hidden.device)
        root = torch.tensor([roots[i] for i in idx], dtype=torch.int64)
        k = self.dynamic.num_heads or self.heads.num_heads
        probs, ids = self.heads_for(len(idx) * k).draft_topk_probs(
            hidden[sel], self.dynamic.topk, k, lm_head=self._lm_head, vocab_size=self.vocab_size,
            root_embeds=self.root_embeds(root))
        ctx = ([contexts[i] for i in idx] if self.dynamic.ngram_branches or self.successors is not None
               or self.acceptance_model is not None else None)
        # each request's nodes are drawn (and scored) on demand: with a measured step cost only as many as the
        # allocation across the batch can use, else the whole budget
        streams = self.dynamic.streams_from_topk(root, probs, ids, ctx, calibration=self.calibration,
                                                 successors=self.successors, acceptance_model=self.acceptance_model)
        if self._step_cost is not None:
            trees = self._allocate(b, streams)
        else:
            trees = [s.tree(self.dynamic.budget, allow_empty=True) for s in streams]
        draft_ms = (time.perf_counter() - t0) * 1e3
        prev = self.dynamic_draft_ms.get(b)
        self.dynamic_draft_ms[b] = draft_ms if prev is None else prev + 0.2 * (draft_ms - prev)
        rows = 0
        for i, t in zip(idx, trees):
            if t is None:
                continue
            self.trees[req_ids[i]] = t
            out[i] = t.tokens[1:].tolist()
            rows += len(out[i])
        if self._step_cost is not None and not self._plain_probe and (rows == 0 or self._idle_probe):
            if self._since_empty > 0:  # a recheck that found nothing again: rest longer
                self._recheck = min(2 * self._recheck, self.RECHECK_MAX)
            elif self._since_empty < 0:  # the first step without nodes after steps with some
                self._recheck = self._first_rest(b)
            self._since_empty = 0
        else:  # nodes were chosen (a plain probe may have dropped them): the heads rest from scratch next time
            self._since_empty = -1
            self._recheck, self._dyn_idle_steps = self.RECHECK_EVERY, 0
        self._plain_probe = self._idle_probe = False
        # a step whose trees are all chains verifies with stock attention (the runner): no tree-attention cost
        chains = all(t is None or t.tree.chain_prefix >= t.tree.num_nodes for t in trees)
        self._time_step(b, rows, 0, draft_ms=draft_ms, tree_step=rows > 0 and not chains)
        return out

    def _first_rest(self, batch_size: int) -> int:
        """The heads' rest after the first step that chose no node: 1 (they run again at the next step) while
        drafting at ``batch_size`` costs less than :attr:`CHEAP_DRAFT` of a plain step (both as measured), else
        :attr:`RECHECK_EVERY` steps.

        One unsure step says little about the next: at one request on a 2-core CPU (float32 SmolLM2-135M, hybrid
        trees, cap 8) drafting cost 2 ms of a 22 ms plain step and a rest of 8 steps after each empty choice left
        most steps undrafted: 58-64 tok/s, against 79-82 with a rest of 1 (fixed trees: 72-79). At 8 requests
        drafting cost 9 ms of a 25 ms step, and rechecking every step drafted where it lost (202-253 tok/s against
        236-284 with a rest of 8)."""
        draft = self.dynamic_draft_ms.get(batch_size)
        if draft is None or self._step_cost is None:
            return self.RECHECK_EVERY
        return 1 if draft < self.CHEAP_DRAFT * self.dynamic_step_ms(batch_size)(0) else self.RECHECK_EVERY

    def _allocate(self, batch_size: int, streams: list[NodeStream]) -> list[DynamicTree | None]:
        """The nodes worth verifying this step across the batch (``core.node_allocation.allocate_streams``: drawn
        from each request's stream only as far as they can pay; drafting charged at its measured average for this
        batch size, so heads that cost more than they win rest), with a plain step every :attr:`PROBE_EVERY`
        speculative steps (it separates the fixed from the per-row step time) and one node per request about every
        :attr:`PROBE_EVERY` steps without speculation (it keeps the acceptance observed)."""
        from .calibrate import MIN_GAIN

        keep = allocate_streams(streams, self.dynamic_step_ms(batch_size), max_nodes=self.dynamic.budget,
                                min_gain=MIN_GAIN, draft_ms=self.dynamic_draft_ms.get(batch_size, 0.0))
        if any(keep):
            self._spec_steps += 1
            per_request = -(-sum(keep) // batch_size)
            if self._spec_steps % self._probe_every(batch_size, 0, per_request) == 0:
                keep = [0] * len(streams)
                self._plain_probe = True  # not "nothing pays": the heads need no rest after it
        else:  # the heads run every self._recheck steps while nothing is chosen: probe every PROBE_EVERY steps
            self._dyn_idle_steps += self._recheck
            if self._dyn_idle_steps >= self.PROBE_EVERY:
                self._dyn_idle_steps = 0
                keep = [1] * len(streams)
                self._idle_probe = True  # keeps the acceptance observed; not a choice, so the heads keep resting
        return [s.tree(k) for s, k in zip(streams, keep)]

    @torch.inference_mode()
    def propose_tree(self, hidden: Tensor, roots: list[int], allow: list[bool] | None = None) -> list[list[int]]:
        """Draft a tree per request.

        Args:
            hidden: ``[B, H]`` the target's last hidden state at each request's last accepted token (after the
                final norm).
            roots: ``B`` root tokens (the token just emitted, not yet in the KV cache).
            allow: optional ``B`` flags; requests with False get no drafts.
        Returns:
            ``B`` lists: the first :meth:`num_nodes_for` ``(B)`` draft tokens of the tree in node order, or ``[]``.
            Only the heads the drafted prefix reaches run (``MedusaHeads.draft_topk``).
        """
        if self.heads is None:
            raise MedusaProposerError("propose_tree called before load_model")
        b = hidden.shape[0]
        num_nodes = self.num_nodes_for(b)
        self._time_step(b, b * num_nodes, self.tree.prefix_depth[num_nodes] if num_nodes else 0,
                        tree_step=num_nodes > self.tree.chain_prefix)
        out: list[list[int]] = [[] for _ in range(b)]
        if num_nodes <= 0:
            return out
        if allow is None or all(allow):
            idx = None
        else:
            idx = [i for i in range(b) if allow[i]]
            if not idx:
                return out
        root = torch.tensor(roots if idx is None else [roots[i] for i in idx], dtype=torch.int64,
                            device=hidden.device)
        if idx is not None:
            hidden = hidden[torch.tensor(idx, device=hidden.device)]
        top = self.draft_topk(hidden, self.tree.prefix_depth[num_nodes], root)
        tokens = self.candidates_from_topk(root, top, num_nodes)
        if idx is None:
            return tokens
        for i, toks in zip(idx, tokens):
            out[i] = toks
        return out
