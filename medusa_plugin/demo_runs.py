"""The engine runs behind ``medusa-plugin demo``: one vLLM engine per method, timed at batch 1 and 8 requests at once.

:func:`demo_methods` is the one place that says how each method is configured (the lead switches the Medusa rows'
``tree_schedule`` here). Engines start in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``); their start-up is not
timed; a short warm-up request runs before the timed ones.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Sequence

# vLLM's own n-gram (prompt lookup) proposer, as measured in the issue (k=4).
NGRAM_CONFIG = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
# Batch-aware tree schedule for the fitted-tree row. "auto" picks a shipped GPU table and means "one tree for every
# batch size" on a CPU with this version of core/schedule.py; set a measured YAML here to use one on CPU.
MEDUSA_TREE_SCHEDULE: str | None = "auto"
CHAIN_LENGTH = 2  # the Medusa chain row: chain:K (heads 0..K-1, top-1 each)
HYBRID_SETTINGS = {"tree": "dynamic", "budget": 16, "ngram_branches": 2}
HYBRID_NAME = "Medusa hybrid (dynamic+ngram)"


@dataclass
class Method:
    """name: row label. engine_kwargs: extra ``vllm.LLM`` arguments (speculative_config, additional_config)."""

    name: str
    engine_kwargs: dict = field(default_factory=dict)
    is_medusa: bool = False


@dataclass
class RunResult:
    """One method at one concurrency: generated tokens per prompt (prompt order), wall seconds of the timed
    requests, and spec-decode acceptance (``vllm_ext.offline.acceptance_metrics``; empty without drafts)."""

    method: str
    concurrency: int
    token_ids: list[list[int]]
    seconds: float
    metrics: dict

    @property
    def tokens(self) -> int:
        return sum(map(len, self.token_ids))

    @property
    def tok_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def tokens_per_step(self) -> float:
        return float(self.metrics.get("mean_tokens_per_step", 1.0))


def demo_methods(heads_dir: str, tree: Sequence[Sequence[int]], *, chain_length: int = CHAIN_LENGTH,
                 tree_schedule: str | None = MEDUSA_TREE_SCHEDULE) -> list[Method]:
    """plain, vLLM ngram, Medusa chain, Medusa fitted tree (+ batch-aware schedule), Medusa hybrid (dynamic trees
    + n-gram branches, nodes chosen per step from the measured step cost), in that order."""
    from medusa_plugin.vllm_ext.offline import medusa_engine_kwargs

    fitted = {"heads": str(heads_dir), "tree": [list(p) for p in tree]}
    if tree_schedule is not None:
        fitted["tree_schedule"] = tree_schedule
    return [
        Method("plain"),
        Method("vLLM ngram (k=4)", {"speculative_config": dict(NGRAM_CONFIG)}),
        Method(f"Medusa chain:{chain_length}",
               medusa_engine_kwargs({"heads": str(heads_dir), "tree": f"chain:{chain_length}"}), True),
        Method(f"Medusa tree ({len(tree)} nodes)", medusa_engine_kwargs(fitted), True),
        Method(HYBRID_NAME, medusa_engine_kwargs({"heads": str(heads_dir), **HYBRID_SETTINGS,
                                                  **({"tree_schedule": tree_schedule} if tree_schedule else {})}),
               True),
    ]


def run_order(methods: Sequence[Method]) -> list[Method]:
    """The order to start the engines in: vLLM's ngram proposer last. Its engine imports numba, after which vLLM
    0.32's start-up scan of ``sys.modules`` (``triton_utils.dispatcher._rebind_kernels``) fails on an llvmlite
    object, so no engine can start in that process afterwards."""
    return sorted(methods, key=lambda m: m.engine_kwargs.get("speculative_config", {}).get("method") == "ngram")


def run_method(model_dir: str, method: Method, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
               dtype: str, concurrencies: Sequence[int] = (1, 8)) -> list[RunResult]:
    """One engine for ``method``; for each concurrency c, all prompts in waves of c requests at once (c = 1: one
    request at a time). Greedy, stops at EOS or ``max_new_tokens``."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import SamplingParams

    from medusa_plugin.vllm_ext import offline

    # max_num_seqs = the largest wave: also bounds what tree_schedule: auto measures at engine start.
    llm = offline.build_llm(model_dir, dtype=dtype, max_model_len=1024, max_num_seqs=max(concurrencies),
                            **method.engine_kwargs)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    results = []
    try:
        llm.generate([{"prompt_token_ids": list(prompts[0])}], SamplingParams(max_tokens=8), use_tqdm=False)
        for c in concurrencies:
            before = offline.spec_decode_counters(llm)
            out: list[list[int]] = []
            t0 = time.perf_counter()
            for s in range(0, len(prompts), c):
                wave = [{"prompt_token_ids": list(p)} for p in prompts[s:s + c]]
                out += [list(o.outputs[0].token_ids) for o in llm.generate(wave, params, use_tqdm=False)]
            seconds = time.perf_counter() - t0
            metrics = offline.acceptance_metrics(before, offline.spec_decode_counters(llm))
            results.append(RunResult(method.name, c, out, seconds, metrics))
    finally:
        offline.shutdown(llm)
    return results


def agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> int:
    """Number of prompts whose token lists are equal."""
    return sum(1 for x, y in zip(a, b) if list(x) == list(y))
