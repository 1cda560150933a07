"""Engine-level benchmarks inside vLLM: ``medusa-plugin bench overhead`` and ``bench step-cost --engine vllm``.

``overhead``: the cost of one engine step at batch 1, split into phases (:mod:`medusa_plugin.vllm_ext.profiling`),
for plain decoding, a Medusa step with one draft node (``chain1``, the first node of ``--tree``) and a step of
vLLM's own ngram proposer with one draft, all in the same run; plus step cost against rows per step for plain
(``r`` requests), ngram (``k`` drafts) and Medusa (tree prefixes of ``k`` nodes). Each configuration is its own
in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) in its own process, all alive at once and run in turn,
round after round; a run decodes ``--steps`` tokens and its step time is the median over the steps with the wanted
row count (the first, prefill, step excluded).

JSON keys: ``plain_ms``, ``chain1_ms``, ``chain1_ratio`` (= chain1_ms / plain_ms), ``ngram1_ms``,
``plugin_overhead_ms``, ``phases`` (phase -> ms of the chain1 step), ``plain_phases``, ``ngram1_phases``, ``curve``
(``{"plain"|"ngram"|"medusa": {rows: ms}}``), ``definitions``.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Sequence

__all__ = ["overhead", "format_overhead", "plot_overhead", "engine_step_cost", "BenchEngineError"]


class BenchEngineError(RuntimeError):
    """A benchmark engine failed to start or to run (one line naming the engine and the error)."""


_NGRAM = {"method": "ngram", "prompt_lookup_max": 4, "prompt_lookup_min": 1}

DEFINITIONS = {
    "step": "wall time of one EngineCore step (schedule + model runner + output update), median over steps",
    "model_forward": "the target model's forward + compute_logits over the step's rows, without attention",
    "attention": "vLLM's CPU attention kernel (all layers)",
    "plugin_overhead_ms": "sum of the chain1 step's phases other than model_forward and attention, minus the same "
                          "for the plain step (medians per phase; robust to noise in the forward): what the plugin "
                          "adds beyond the model's own work on the extra row",
    "chain1_ratio": "chain1_ms / plain_ms: a Medusa step verifying one draft node against a plain decode step",
}


class _FixedNodes:
    """A stand-in schedule that drafts exactly ``n`` nodes at every batch size (benchmarks only)."""

    def __init__(self, n: int):
        self.n, self.max_batch_size, self.meta = n, 1 << 30, {}

    def num_nodes(self, batch_size: int) -> int:
        return self.n

    def with_accept_lengths(self, *_a, **_k) -> "_FixedNodes":
        return self


def _reference_topk(proposer, hidden, roots=None):
    """v0.1's draft path: all heads, full-vocabulary logits (``MedusaHeads.forward``), top-k of each."""
    logits = proposer.heads(hidden, lm_head=proposer._lm_head,
                            root_embeds=proposer.root_embeds(roots))[..., : proposer.vocab_size]
    return logits.topk(proposer.tree.topk, dim=-1).indices


def _vocab_size(model: str) -> int:
    """``vocab_size`` of a local model directory's config.json (32000 if unreadable)."""
    import json
    from pathlib import Path

    try:
        return int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError):
        return 32000


def _prompt(tokenizer_len: int, length: int = 48) -> list[int]:
    """A prompt that repeats itself (ngram always finds a match; a fixed row count per step)."""
    base = [(1000 + 37 * i) % max(tokenizer_len - 1, 2) + 1 for i in range(16)]
    return (base * (length // len(base) + 1))[:length]


def _run_profiled(llm, prompts, steps: int, rows: int, num_reqs: int) -> dict[str, Any]:
    from .vllm_ext import offline
    from .vllm_ext.profiling import StepProfiler

    offline.run(llm, prompts[:1], 4, ignore_eos=True)  # warm-up
    with StepProfiler(llm) as prof:
        offline.run(llm, prompts, steps, ignore_eos=True)
    sel = prof.select(rows, num_reqs)
    out = StepProfiler.summary(sel)
    out["rows"] = rows
    out["all_rows"] = sorted({r.rows for r in prof.records})
    return out


def _engine_kwargs(model: str, dtype: str, rows: Sequence[int], steps: int, max_k: int, prompt) -> dict:
    return dict(dtype=dtype, max_num_seqs=max(rows), max_model_len=max(512, len(prompt) + steps + max_k + 16))


# One round of each engine, run in its worker process (``EngineWorker.call``): profiled steps by rows per step.
def _plain_round(llm, steps, rows, prompt):
    return {r: _run_profiled(llm, [prompt] * r, steps, r, r) for r in rows}


def _ngram_round(llm, steps, k, prompt):
    return _run_profiled(llm, [prompt], steps, k + 1, 1)


def _medusa_round(llm, steps, nodes, prompt):
    from .vllm_ext.profiling import runner_of

    out = {}
    proposer = runner_of(llm).drafter
    for n in nodes:
        proposer.schedule = _FixedNodes(n)
        out[n] = _run_profiled(llm, [prompt], steps, n + 1, 1)
    # plain (no drafts: n = 0) and chain1 steps alternated on this one engine: the plugin's own share of a step
    # without the model's engine-to-engine differences
    alt = {0: [], 1: []}
    for _ in range(3):
        for n in (0, 1):
            proposer.schedule = _FixedNodes(n)
            alt[n].append(_run_profiled(llm, [prompt], max(steps // 3, 4), n + 1, 1)["step_ms"])
    out["alternating"] = {"plain_ms": statistics.median(alt[0]), "chain1_ms": statistics.median(alt[1]),
                          "rounds": alt}
    # v0.1's drafting on the same engine: every head's full-vocabulary logits, then build_candidates
    proposer.schedule = _FixedNodes(1)
    fast = proposer.draft_topk
    proposer.draft_topk = lambda h, d, roots=None: _reference_topk(proposer, h, roots)
    try:
        out["reference"] = _run_profiled(llm, [prompt], steps, 2, 1)
    finally:
        proposer.draft_topk = fast
    return out


def _one_row_run(llm, steps, prompt, nodes=None):
    """One request decoding ``steps`` tokens, profiled; on a Medusa engine with ``nodes`` drafts per step."""
    if nodes is not None:
        from .vllm_ext.profiling import runner_of

        runner_of(llm).drafter.schedule = _FixedNodes(nodes)
    return _run_profiled(llm, [prompt], steps, 1 + (nodes or 0), 1)


PAIRS = 4  # short plain / chain1 runs alternated per round for the headline numbers (see overhead)


def _pair_steps(steps: int) -> int:
    """Decode steps of one of those short runs."""
    return max(steps // 3, 8)


def _median_summary(runs: list[dict]) -> dict:
    """Step summaries of several runs -> one: the median step and the median of every phase, steps summed."""
    med = lambda xs: round(statistics.median(xs), 4)  # noqa: E731
    return {"steps": sum(r["steps"] for r in runs), "step_ms": med(r["step_ms"] for r in runs),
            "phases": {p: med(r["phases"].get(p, 0.0) for r in runs) for p in runs[0]["phases"]}}


def _on_engine(name: str, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` (an engine worker's start or call), an ``EngineWorkerError`` becoming one
    :class:`BenchEngineError` line that names the engine."""
    from .engine_workers import EngineWorkerError

    try:
        return fn(*args, **kwargs)
    except EngineWorkerError as e:
        raise BenchEngineError(f"{name} engine: {e}") from None


def _non_forward(summary: dict) -> float:
    """Sum of a step summary's phase medians other than the model's own forward and attention (ms)."""
    return sum(v for k, v in summary["phases"].items() if k not in ("model_forward", "attention"))


def overhead(*, model: str, heads: str, tree: str = "chain:4", dtype: str = "bfloat16", steps: int = 48,
             rows: Sequence[int] = (1, 2, 3, 5), repeats: int = 5,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Profile plain, Medusa and ngram engine steps at batch 1 (see the module docstring). Returns the JSON dict.

    Every engine (plain, Medusa, ngram with 1 and with the curve's most drafts) is started once, each in its own
    process, and kept alive; then ``repeats`` rounds each run every engine once, in turn (the order reversed every
    other round). Every number of the result is the median over the rounds of that round's value, so a ratio is the
    median of paired ratios (``rounds`` keeps each round's headline numbers). The headline pair (``plain_ms``,
    ``chain1_ms`` and their phases) comes from :data:`PAIRS` short runs per engine at the end of each round, plain
    and Medusa alternated: on a shared 2-core CPU the machine's speed drifts by 10-20 % from one minute to the next,
    and engines run one after another catch different seconds (``chain1_ratio`` 0.88-1.32 over three rounds of fresh
    engines in session 11; 1.06-1.36 over five rounds of live engines run in turn, session 12).
    """
    # the engines run inside their worker processes, where the step profiler can reach them
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    from .core.tree import MedusaTree
    from .engine_workers import EngineWorker

    t0 = time.perf_counter()
    mtree = MedusaTree.load(tree)
    rows = sorted(set(rows) | {1, 2})
    max_k = min(max(rows) - 1, mtree.num_nodes)
    nodes = sorted({1} | {r - 1 for r in rows if 1 < r <= mtree.num_nodes + 1})
    prompt = _prompt(_vocab_size(model))
    kw = _engine_kwargs(model, dtype, rows, steps, max_k, prompt)
    # (name, engine settings, round function, its arguments); every engine in its own process, all alive at once
    jobs = [("plain", {}, _plain_round, (steps, rows, prompt)),
            ("medusa", {"medusa": {"heads": heads, "tree": tree}}, _medusa_round, (steps, nodes, prompt))]
    jobs += [(f"ngram k={k}", {"speculative_config": {**_NGRAM, "num_speculative_tokens": k}}, _ngram_round,
              (steps, k, prompt)) for k in sorted({1, max_k})]
    engines: dict[str, Any] = {}
    results = []
    try:
        for name, settings, _, _ in jobs:
            log(f"overhead: starting the {name} engine ({model}, {dtype})")
            engines[name] = _on_engine(name, EngineWorker, model, **settings, **kw)
        for i in range(repeats):
            log(f"overhead: round {i + 1}/{repeats}")
            out = {name: _on_engine(name, engines[name].call, fn, *args)
                   for name, _, fn, args in (jobs if i % 2 == 0 else jobs[::-1])}
            # the headline pair (one plain row against one chain:1 step) once more, in short runs that alternate
            # between the two engines, so both see the same seconds of the machine
            pair: dict[str, list] = {"plain": [], "medusa": []}
            for j in range(PAIRS):
                for name in (("plain", "medusa") if (i + j) % 2 == 0 else ("medusa", "plain")):
                    pair[name].append(_on_engine(name, engines[name].call, _one_row_run, _pair_steps(steps), prompt,
                                                 None if name == "plain" else 1))
            results.append(_round_result(out["plain"], out["medusa"],
                                         {k: out[f"ngram k={k}"] for k in sorted({1, max_k})}, nodes,
                                         plain=_median_summary(pair["plain"]), chain1=_median_summary(pair["medusa"])))
    finally:
        for e in engines.values():
            e.close()
    res = _median_of(results)
    res.update({"benchmark": "overhead", "model": model, "heads": heads, "tree": tree, "dtype": dtype,
                "steps": steps, "definitions": DEFINITIONS, "repeats": repeats,
                "rounds": [{k: r[k] for k in ROUND_KEYS} for r in results],
                "seconds": round(time.perf_counter() - t0, 1),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return res


ROUND_KEYS = ("plain_ms", "chain1_ms", "chain1_ratio", "ngram1_ms", "ngram1_ratio", "plugin_overhead_ms",
              "plugin_overhead_pct_of_plain")


def _median_of(results: list[dict]) -> dict:
    """Field-wise median of result dicts: a field that is a number in some rounds is the median of those rounds'
    numbers (an integer field the lower median, so counts stay integers), None if no round has one; a dict field is
    merged the same way over the union of its keys; anything else (strings, lists) is the first round's."""
    out: dict = {}
    for key in dict.fromkeys(k for r in results for k in r):
        values = [r[key] for r in results if key in r]
        if all(isinstance(v, dict) for v in values):
            out[key] = _median_of(values)
            continue
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numbers and all(v is None or v in numbers for v in values):
            out[key] = (statistics.median_low(numbers) if all(isinstance(v, int) for v in numbers)
                        else round(statistics.median(numbers), 4))
        else:
            out[key] = next((v for v in values if v is not None), None)
    return out


def _round_result(plain_runs: dict, medusa: dict, ngram: dict, nodes: Sequence[int], *, plain: dict,
                  chain1: dict) -> dict[str, Any]:
    """One round's numbers from each engine's profiles (plain by request count, Medusa by draft nodes, ngram by
    drafts: the curve); ``plain`` / ``chain1``: the headline steps, from the alternated short runs."""
    res: dict[str, Any] = {}
    ng1, ref_draft = ngram[1], medusa["reference"]
    curve = {"plain": {r: s["step_ms"] for r, s in plain_runs.items()},
             "ngram": {k + 1: s["step_ms"] for k, s in ngram.items() if s["step_ms"] is not None},
             "medusa": {n + 1: medusa[n]["step_ms"] for n in nodes}}
    res.update({
        "plain_ms": plain["step_ms"], "chain1_ms": chain1["step_ms"],
        "chain1_ratio": round(chain1["step_ms"] / plain["step_ms"], 4),
        "ngram1_ms": ng1["step_ms"],
        "ngram1_ratio": None if ng1["step_ms"] is None else round(ng1["step_ms"] / plain["step_ms"], 4),
        "chain1_reference_draft_ms": ref_draft["step_ms"],
        "chain1_reference_draft_ratio": round(ref_draft["step_ms"] / plain["step_ms"], 4),
        "reference_draft_phases": ref_draft["phases"],
        "same_engine": {**medusa.get("alternating", {}),
                        "chain1_ratio": round(medusa["alternating"]["chain1_ms"] / medusa["alternating"]["plain_ms"],
                                              4) if "alternating" in medusa else None,
                        "note": "plain (0 drafts) and chain:1 steps alternated 3x on the Medusa engine"},
        "plugin_overhead_ms": round(_non_forward(chain1) - _non_forward(plain), 4),
        "reference_draft_overhead_ms": round(_non_forward(ref_draft) - _non_forward(plain), 4),
        "phases": chain1["phases"], "plain_phases": plain["phases"], "ngram1_phases": ng1["phases"],
        "steps_measured": {"plain": plain["steps"], "chain1": chain1["steps"], "ngram1": ng1["steps"],
                           "chain1_reference_draft": ref_draft["steps"]},
        "curve": {k: {str(r): v for r, v in sorted(c.items())} for k, c in curve.items()},
    })
    res["plugin_overhead_pct_of_plain"] = round(100 * res["plugin_overhead_ms"] / res["plain_ms"], 2)
    return res


def format_overhead(res: dict[str, Any]) -> str:
    from .bench import _table
    from .vllm_ext.profiling import PHASES

    rounds = res.get("repeats", 1)
    head = (f"Engine step at batch 1 ({res['model']}, {res['dtype']}, heads {res['heads']}, tree {res['tree']}; "
            f"median of {res['steps']} decode steps per engine (plain and chain:1: of {PAIRS} alternated runs of "
            f"{_pair_steps(res['steps'])})" + (f", then of {rounds} rounds, the engines alternated)" if rounds > 1
                                              else ")"))
    cols = [("plain", res["plain_phases"]), ("medusa chain:1", res["phases"]),
            ("chain:1, v0.1 drafting", res["reference_draft_phases"]), ("ngram k=1", res["ngram1_phases"])]
    rows = [[p] + [c.get(p, 0.0) for _, c in cols] for p in PHASES]
    rows.append(["STEP (ms)", res["plain_ms"], res["chain1_ms"], res["chain1_reference_draft_ms"],
                 res["ngram1_ms"] or 0.0])
    lines = [head, _table(["phase (ms)"] + [n for n, _ in cols], rows),
             f"chain1_ratio = {res['chain1_ratio']:.3f} (v0.1 drafting: {res['chain1_reference_draft_ratio']:.3f})   "
             f"ngram1_ratio = {res['ngram1_ratio']}   "
             f"plugin_overhead = {res['plugin_overhead_ms']:.2f} ms ({res['plugin_overhead_pct_of_plain']:.1f} % of "
             f"a plain step)"]
    curve = res["curve"]
    all_rows = sorted({int(r) for c in curve.values() for r in c})
    lines.append(_table(["rows/step"] + list(curve),
                        [[r] + [curve[k].get(str(r), "-") for k in curve] for r in all_rows]))
    return "\n".join(lines)


def plot_overhead(res: dict[str, Any], path: str) -> str | None:
    """Step cost against rows per step (PNG); None if matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"plain": "plain (r requests x 1 row)", "ngram": "vLLM ngram (1 request, k drafts)",
              "medusa": "Medusa (1 request, k nodes)"}
    for key, pts in res["curve"].items():
        if pts:
            xs = sorted(int(r) for r in pts)
            ax.plot(xs, [pts[str(x)] for x in xs], marker="o", label=labels.get(key, key))
    ax.set_xlabel("rows per step (query tokens)")
    ax.set_ylabel("engine step (ms, median)")
    ax.set_title(f"Step cost, {os.path.basename(res['model'].rstrip('/'))} {res['dtype']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def engine_step_cost(*, model: str, heads: str, tree: str, dtype: str = "bfloat16", max_num_seqs: int = 16,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """The step-cost table ``tree_schedule: auto`` measures at engine start, measured now (refreshing the cache)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from .vllm_ext import calibrate, offline
    from .vllm_ext.profiling import runner_of

    llm = offline.build_llm(model, medusa={"heads": heads, "tree": tree}, dtype=dtype, max_num_seqs=max_num_seqs)
    try:
        runner = runner_of(llm)
        proposer = runner.drafter
        sched = calibrate.measured_schedule(runner, proposer, proposer.acceptance.accept_lengths(), refresh=True,
                                            log=log)
        data = sched.to_dict()
    finally:
        offline.shutdown(llm)
    return {"benchmark": "step_cost", "engine": "vllm", "model": model, "heads": heads, "tree": tree,
            "dtype": dtype, "schedule": data, "num_nodes": sched.table(), "describe": sched.describe()}
