"""Offline generation with ``vllm.LLM``, with or without Medusa, reporting speculative-decoding acceptance.

>>> res = generate("path/to/model", [[1, 2, 3]], 32, medusa={"heads": "path/to/heads", "tree": "mc_sim_7b_63"})
>>> res.token_ids, res.metrics["mean_tokens_per_step"]

Used by the demo, the examples and the end-to-end tests. The Medusa plugin itself is loaded by vLLM through its
entry point; :func:`build_llm` only fills the speculative config (``custom_class`` + the Medusa proposer,
``num_speculative_tokens`` = the tree's node count) and ``additional_config["medusa"]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .settings import PROPOSER_PATH, num_tree_nodes

__all__ = ["OfflineResult", "generate", "build_llm", "run", "shutdown", "spec_decode_counters", "acceptance_metrics",
           "medusa_engine_kwargs"]

_DRAFTS = "vllm:spec_decode_num_drafts"
_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
_ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


@dataclass
class OfflineResult:
    """token_ids: generated tokens per prompt (prompt excluded), in prompt order. elapsed_s: wall time of the
    generate call (engine start-up excluded). metrics: :func:`acceptance_metrics` of this call (empty dict without
    speculative decoding)."""

    token_ids: list[list[int]]
    elapsed_s: float
    metrics: dict = field(default_factory=dict)


def medusa_engine_kwargs(medusa: Mapping) -> dict:
    """``speculative_config`` + ``additional_config`` selecting Medusa with these settings (``LLM``/``EngineArgs`` kwargs)."""
    return {"speculative_config": {"method": "custom_class", "model": PROPOSER_PATH,
                                   "num_speculative_tokens": num_tree_nodes(medusa)},
            "additional_config": {"medusa": dict(medusa)}}


def build_llm(model_dir: str, *, medusa: Mapping | None = None, seed: int | None = None, **llm_kwargs):
    """A ``vllm.LLM`` for ``model_dir`` with small-machine defaults, Medusa when ``medusa`` settings are given.

    Defaults (each overridable through ``llm_kwargs``): dtype float32 on CPU ("auto" elsewhere), enforce_eager,
    max_model_len 512, stats enabled (needed by ``get_metrics``), ``seed`` (0 if None).
    """
    from vllm import LLM
    from vllm.platforms import current_platform

    kwargs: dict[str, Any] = dict(model=str(model_dir), dtype="float32" if current_platform.is_cpu() else "auto",
                                  enforce_eager=True, max_model_len=512, disable_log_stats=False,
                                  seed=0 if seed is None else seed)
    if medusa is not None:
        kwargs.update(medusa_engine_kwargs(medusa))
    kwargs.update(llm_kwargs)
    return LLM(**kwargs)


def shutdown(llm) -> None:
    """Stop the engine (its worker processes) now rather than at interpreter exit."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def spec_decode_counters(llm) -> dict[str, Any]:
    """Cumulative spec-decode counters from ``llm.get_metrics()``, summed over engines:
    ``{"num_drafts", "num_draft_tokens", "num_accepted_tokens": int, "accepted_per_pos": list[int]}``."""
    from vllm.v1.metrics.reader import Counter, Vector

    out: dict[str, Any] = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0, "accepted_per_pos": []}
    names = {_DRAFTS: "num_drafts", _DRAFT_TOKENS: "num_draft_tokens", _ACCEPTED: "num_accepted_tokens"}
    for m in llm.get_metrics():
        if isinstance(m, Counter) and m.name in names:
            out[names[m.name]] += int(m.value)
        elif isinstance(m, Vector) and m.name == _PER_POS:
            acc = out["accepted_per_pos"]
            acc.extend([0] * (len(m.values) - len(acc)))
            for i, v in enumerate(m.values):
                acc[i] += int(v)
    return out


def acceptance_metrics(before: Mapping, after: Mapping) -> dict:
    """Acceptance between two :func:`spec_decode_counters` snapshots.

    Returns ``num_drafts`` (verification steps, one per request per step), ``num_draft_tokens``,
    ``num_accepted_tokens``, ``mean_accepted_tokens`` (accepted drafts per step), ``mean_tokens_per_step``
    (1 + that: accepted + bonus), ``acceptance_per_position`` (``[i]``: fraction of steps whose accepted path
    reached depth i+1) and ``accepted_per_pos`` (raw counts). Empty dict if no step drafted.
    """
    drafts = after["num_drafts"] - before["num_drafts"]
    if drafts <= 0:
        return {}
    accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
    pos_after, pos_before = list(after["accepted_per_pos"]), list(before["accepted_per_pos"])
    pos_before += [0] * (len(pos_after) - len(pos_before))
    per_pos = [a - b for a, b in zip(pos_after, pos_before)]
    while per_pos and per_pos[-1] == 0:  # positions past the tree depth are never reached
        per_pos.pop()
    return {"num_drafts": drafts, "num_draft_tokens": after["num_draft_tokens"] - before["num_draft_tokens"],
            "num_accepted_tokens": accepted, "mean_accepted_tokens": accepted / drafts,
            "mean_tokens_per_step": 1.0 + accepted / drafts,
            "acceptance_per_position": [c / drafts for c in per_pos], "accepted_per_pos": per_pos}


def run(llm, prompts_token_ids: Sequence[Sequence[int]], max_tokens: int, *, temperature: float = 0.0,
        seed: int | None = None, ignore_eos: bool = False) -> OfflineResult:
    """Generate ``max_tokens`` per prompt (token-id lists) with an existing ``LLM``; see :class:`OfflineResult`."""
    from vllm import SamplingParams

    if not prompts_token_ids or any(not p for p in prompts_token_ids):
        raise ValueError("prompts_token_ids must be a non-empty list of non-empty token-id lists")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, ignore_eos=ignore_eos)
    prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts_token_ids]
    before = spec_decode_counters(llm)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    metrics = acceptance_metrics(before, spec_decode_counters(llm))
    return OfflineResult([list(o.outputs[0].token_ids) for o in outputs], elapsed, metrics)


def generate(model_dir: str, prompts_token_ids: Sequence[Sequence[int]], max_tokens: int, *,
             medusa: Mapping | None = None, temperature: float = 0.0, seed: int | None = None,
             ignore_eos: bool = False, **llm_kwargs) -> OfflineResult:
    """Build an ``LLM`` (:func:`build_llm`), generate, shut it down; returns tokens, time and acceptance metrics.

    medusa: Medusa settings (``heads``, ``tree``, ``acceptance``, ... as in ``core.config``) or None for plain
    decoding. temperature/seed: sampling (temperature 0: greedy). llm_kwargs: extra ``vllm.LLM`` arguments.
    """
    llm = build_llm(model_dir, medusa=medusa, seed=seed, **llm_kwargs)
    try:
        return run(llm, prompts_token_ids, max_tokens, temperature=temperature, seed=seed, ignore_eos=ignore_eos)
    finally:
        shutdown(llm)
