"""``tree_schedule: auto`` where no shipped table fits (every CPU, any GPU but H100/H200): measure the step cost
inside the engine once per model, dtype and machine, cache it, and build the :class:`TreeSchedule` from it.

Measured at engine start (after the KV cache exists, before the first request), in a few seconds:

* the target model's forward over ``r`` rows, for the row counts a step can have (``1 .. max_num_seqs * (N+1)``,
  capped by ``max_num_batched_tokens``; a log-spaced grid, linear in between) — vLLM's own dummy batch
  (``GPUModelRunner._dummy_run(num_tokens)``), best of ``repeats`` — plus ``model.compute_logits`` over the same
  rows (the dummy batch stops at the hidden states, but every tree row is scored: on SmolLM2-135M the vocabulary
  projection is a fifth of a row's weights);
* the Medusa heads (``MedusaTreeProposer.draft_topk``) for each batch size and number of heads;
* on a CPU, the tree-attention path a step takes when its drafts are not a chain (``core.paged_attention`` on this
  engine's own KV cache, one layer timed and multiplied by the number of attention layers, plus the per-step plan;
  ``TREE_ATTENTION_CONTEXT`` context tokens per request) for batch sizes up to 16 and a few query lengths: the
  dummy batch runs the stock attention only, and on SmolLM2-135M (fp32, 2 cores) the tree path added 10-14 ms to a
  90 ms step, so without it the schedule chose trees where the tree's own chain prefix was faster.

``overhead[B][q] = (f(B*q) + draft(B, depth) + tree attention) / f(B)``
(:func:`~medusa_plugin.core.schedule.measured_overhead`).
The cache file is ``<cache>/step_cost/<key>.json`` with ``<cache>`` = ``$MEDUSA_PLUGIN_CACHE`` or
``$XDG_CACHE_HOME|~/.cache/medusa_plugin``; the key hashes the model path, dtype, heads, tree, max_num_seqs, CPU
model / GPU name, thread count, and the torch / vLLM versions. ``medusa-plugin bench step-cost --engine vllm``
writes the same table on demand.

vLLM internals used: ``GPUModelRunner._dummy_run(num_tokens)`` (``v1/worker/gpu_model_runner.py:5508``),
``GPUModelRunner.get_model()`` and the model's ``compute_logits(hidden_states)``,
``runner.vllm_config`` / ``scheduler_config.max_num_seqs`` / ``max_num_batched_tokens``, ``model_config.model`` /
``.dtype``, ``vllm.__version__``.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from medusa_plugin.core.schedule import TreeSchedule, measured_overhead

__all__ = ["cache_dir", "machine_id", "measure", "measured_schedule", "load_or_measure", "schedule_from",
           "predicted_ms", "predicted_rows_ms", "row_grid", "MIN_GAIN"]

# Speculate only where the expected speed-up exceeds 3 %: measured costs and observed acceptance carry a few per
# cent of error, and a marginal predicted win lost about as often as it won in the engine (demo, 8 at once).
MIN_GAIN = 0.03
MEASURE_VERSION = 5  # 3: forward_ms includes compute_logits; 4: tree_attention_ms; 5: int8 / bf16 head copies
TREE_ATTENTION_CONTEXT = 256  # context tokens per request of the tree-attention timing (chat turns: 100-500)


def cache_dir() -> Path:
    env = os.environ.get("MEDUSA_PLUGIN_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medusa_plugin"


def machine_id(device: torch.device) -> str:
    """CPU model and thread count, or the GPU name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def row_grid(max_rows: int) -> list[int]:
    """Row counts measured: 1..8, then about x1.5 apart, then ``max_rows``."""
    rows, r = [], 1
    while r < max_rows:
        rows.append(r)
        r = r + 1 if r < 8 else int(r * 1.5)
    rows.append(max_rows)
    return rows


def _batch_grid(max_seqs: int) -> list[int]:
    out, b = [], 1
    while b < max_seqs:
        out.append(b)
        b *= 2
    out.append(max_seqs)
    return out


LONG_CALL_MS = 250.0  # a call this slow is timed once after its warm-up (bf16 forwards over 100+ rows on a CPU)


def _best_ms(fn, repeats: int) -> float:
    """Best of ``repeats`` timed calls after one warm-up call; of one when the warm-up took over LONG_CALL_MS (the
    relative noise of a long call is small, and the bf16 table of a 2-core CPU took 2 minutes with 3 repeats)."""
    t0 = time.perf_counter()
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if (time.perf_counter() - t0) * 1e3 > LONG_CALL_MS:
        repeats = 1
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _key(runner, proposer) -> dict[str, Any]:
    import vllm

    cfg = runner.vllm_config
    return {"version": MEASURE_VERSION, "model": str(cfg.model_config.model),
            "dtype": str(cfg.model_config.dtype).removeprefix("torch."), "heads": str(proposer.config.heads),
            "tree": proposer.config.tree_name, "nodes": proposer.tree.num_nodes,
            "int8_drafting": getattr(proposer, "_heads_int8", None) is not None,
            "max_num_seqs": int(cfg.scheduler_config.max_num_seqs),
            "max_num_batched_tokens": int(cfg.scheduler_config.max_num_batched_tokens),
            "machine": machine_id(runner.device), "torch": torch.__version__,
            "vllm": getattr(vllm, "__version__", "?")}


def _logits_ms(runner, grid: list[int], repeats: int) -> dict[int, float]:
    """``model.compute_logits`` over ``r`` hidden rows, for each ``r`` in ``grid`` (ms, best of ``repeats``)."""
    model = runner.get_model()
    mc = runner.vllm_config.model_config
    ref = next(model.parameters())
    h = torch.randn(max(grid), mc.get_hidden_size(), device=ref.device, dtype=ref.dtype)
    with torch.inference_mode():
        return {r: _best_ms(lambda r=r: model.compute_logits(h[:r]), repeats) for r in grid}


def _tree_attention_ms(runner, proposer, batch_sizes: list[int], repeats: int) -> dict[int, dict[int, float]]:
    """``{B: {q: ms}}``: the tree-attention path of one step (plan + every attention layer) with ``B`` requests of
    ``q`` query rows each over :data:`TREE_ATTENTION_CONTEXT` cached tokens. Empty where steps never take it (a
    chain tree) or off the CPU (the CUDA path is experimental)."""
    from medusa_plugin.core.paged_attention import paged_tree_attention_planned, plan_paged_tree_attention

    from .tree_attention import TreeAttentionImplMixin

    tree = proposer.tree
    if runner.device.type != "cpu" or (proposer.dynamic is None and tree.chain_prefix >= tree.num_nodes):
        return {}
    layers = [layer for layer in runner.compilation_config.static_forward_context.values()
              if isinstance(getattr(layer, "impl", None), TreeAttentionImplMixin)
              and isinstance(getattr(layer, "kv_cache", None), torch.Tensor) and layer.kv_cache.numel()]
    if not layers:
        return {}
    layer = layers[0]
    key_cache, value_cache = layer.impl.kv_views(layer, layer.kv_cache)
    num_blocks, block_size, hkv, dh = key_cache.shape
    cfg = runner.vllm_config
    hq = cfg.model_config.get_num_attention_heads(cfg.parallel_config)
    n1 = tree.num_nodes + 1
    qs = sorted({q for q in (2, 3, 5, 9, 17) if q < n1} | {n1})
    out: dict[int, dict[int, float]] = {}
    for b in [b for b in batch_sizes if b <= 16]:
        out[b] = {}
        for q in qs:
            ctx = max(1, min(TREE_ATTENTION_CONTEXT, cfg.model_config.max_model_len - q))
            per_req = -(-(ctx + q) // block_size)
            table = (torch.arange(b * per_req, dtype=torch.int32) % num_blocks).view(b, per_req)
            seq = torch.full((b,), ctx + q, dtype=torch.int32)
            qsl = torch.arange(b + 1, dtype=torch.int32) * q
            mask = tree.ancestor_mask[:q, :q].cpu()

            def plan(table=table, seq=seq, qsl=qsl, mask=mask, b=b, q=q):
                return plan_paged_tree_attention(table, seq, qsl, mask, torch.ones(b, dtype=torch.bool),
                                                 num_tokens=b * q, block_size=block_size, num_kv_heads=hkv,
                                                 num_q_heads=hq, head_dim=dh)

            p = plan()
            query = torch.randn(b * q, hq, dh, dtype=key_cache.dtype)
            layer_ms = _best_ms(lambda p=p, query=query: paged_tree_attention_planned(
                query, key_cache, value_cache, p, 0.125), repeats)
            out[b][q] = round(_best_ms(plan, repeats) + len(layers) * layer_ms, 4)
    return out


def measure(runner, proposer, *, repeats: int = 3, max_rows: int | None = None) -> dict[str, Any]:
    """Time the forward over each :func:`row_grid` count and the heads per batch size and depth; returns
    ``{"forward_ms": {rows: ms}, "batch_sizes": [...], "draft_ms": {B: [ms per depth 1..D]}, ...}``."""
    cfg = runner.vllm_config
    n1 = proposer.tree.num_nodes + 1
    max_seqs = int(cfg.scheduler_config.max_num_seqs)
    cap = int(cfg.scheduler_config.max_num_batched_tokens)
    max_rows = min(max_rows or max_seqs * n1, cap)
    t0 = time.perf_counter()
    grid = row_grid(max_rows)
    dummy_ms = {r: _best_ms(lambda r=r: runner._dummy_run(r), repeats) for r in grid}
    logits_ms = _logits_ms(runner, grid, repeats)
    forward_ms = {r: round(dummy_ms[r] + logits_ms[r], 4) for r in grid}
    batch_sizes = _batch_grid(max_seqs)
    heads = proposer.heads
    ref = next(heads.parameters(), None)
    dev = ref.device if ref is not None else runner.device
    draft_ms = {}
    with torch.inference_mode():
        for b in batch_sizes:
            h = torch.randn(b, heads.hidden_size, device=dev, dtype=heads.dtype)
            roots = torch.randint(0, proposer.vocab_size, (b,), device=dev)
            draft_ms[b] = [round(_best_ms(lambda h=h, d=d: proposer.draft_topk(h, d, roots), repeats), 4)
                           for d in range(1, min(proposer.tree.max_depth, heads.num_heads) + 1)]
    with torch.inference_mode():
        tree_attention_ms = _tree_attention_ms(runner, proposer, batch_sizes, repeats)
    return {**_key(runner, proposer), "forward_ms": forward_ms,
            "logits_ms": {r: round(v, 4) for r, v in logits_ms.items()}, "batch_sizes": batch_sizes, "draft_ms": draft_ms,
            "tree_attention_ms": tree_attention_ms, "tree_attention_context": TREE_ATTENTION_CONTEXT,
            "repeats": repeats, "timing": "best of repeats after one warm-up",
            "seconds": round(time.perf_counter() - t0, 2),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def schedule_from(data: dict[str, Any], proposer, accept_lengths, step_fixed_ms: float = 0.0,
                  tree_row_ms: float = 0.0, observed=None) -> TreeSchedule:
    """The :class:`TreeSchedule` of a measurement (``overhead[B][q] = (f(B*q) + c + a*B*(q-1) + draft) / (f(B) +
    c)``, ``c = step_fixed_ms``: the engine step's time outside the forward, ``a = tree_row_ms``: a draft row's
    time beyond its forward; both learnt while serving), corrected where ``observed``
    (:class:`~medusa_plugin.core.observed_step_cost.ObservedStepCost`) has seen the engine's own step-time ratios."""
    tree = proposer.tree
    fwd = {int(k): float(v) for k, v in data["forward_ms"].items()}
    draft = {int(k): [float(x) for x in v] for k, v in data["draft_ms"].items()}
    qs = list(range(1, tree.num_nodes + 2))
    overhead = measured_overhead(fwd, data["batch_sizes"], qs, draft, tree, step_fixed_ms=step_fixed_ms,
                                 tree_row_ms=tree_row_ms, tree_attention_ms=data.get("tree_attention_ms"))
    src = (f"measured in the engine on {data['machine']} ({data['model']}, {data['dtype']}, {data['time']}); "
           f"model forward + logits via vLLM's dummy batch + Medusa heads; learnt while serving: fixed step time "
           f"{step_fixed_ms:.2f} ms, {tree_row_ms:.2f} ms per draft row")
    seen = observed.ratios() if observed is not None else {}
    if seen:
        overhead = observed.apply(data["batch_sizes"], qs, overhead)
        src += "; step-time ratios observed in serving " + ", ".join(
            f"B={b}: " + "/".join(f"{n}:{r:.2f}" for n, r in sorted(per.items())) for b, per in sorted(seen.items()))
    return TreeSchedule(data["batch_sizes"], qs, overhead, accept_lengths,
                        meta={"source": src, "gpu": data["machine"], "tree": proposer.config.tree_name},
                        min_gain=MIN_GAIN)


def predicted_ms(data: dict[str, Any], tree, batch_size: int, num_nodes: int) -> float:
    """Forward + heads (+ tree attention) time of a step with ``num_nodes`` nodes per request at ``batch_size`` (no
    fixed part)."""
    n = min(num_nodes, tree.num_nodes)
    depth = tree.prefix_depth[n] if num_nodes > 0 else 0
    return predicted_rows_ms(data, batch_size, batch_size * num_nodes, depth, tree_step=n > tree.chain_prefix)


def predicted_rows_ms(data: dict[str, Any], batch_size: int, draft_rows: int, depth: int,
                      tree_step: bool = False) -> float:
    """Forward + heads time of a step of ``batch_size`` requests verifying ``draft_rows`` draft nodes in all, whose
    drafting ran heads ``0..depth-1`` (``depth`` 0: none; capped at the heads measured), plus the measured
    tree-attention path when ``tree_step`` (drafts that are not a chain). No fixed part."""
    from medusa_plugin.core.schedule import interpolate_ms, tree_attention_cost

    fwd = {int(k): float(v) for k, v in data["forward_ms"].items()}
    t = interpolate_ms(fwd, batch_size + draft_rows)
    if depth > 0:
        per_b = {int(k): float(v[min(depth, len(v)) - 1]) for k, v in data["draft_ms"].items()}
        t += interpolate_ms(per_b, batch_size)
    if tree_step and draft_rows > 0 and data.get("tree_attention_ms"):
        t += tree_attention_cost(data["tree_attention_ms"], batch_size, 1 + draft_rows / batch_size)
    return t


def load_or_measure(runner, proposer, *, refresh: bool = False, log=None) -> dict[str, Any]:
    """The cached measurement of this engine (see the module docstring), measuring and caching it first if needed."""
    key = _key(runner, proposer)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "step_cost" / f"{digest}.json"
    data = None
    if path.is_file() and not refresh:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None
    if data is None:
        data = measure(runner, proposer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)
        if log:
            log(f"Medusa: measured step cost in {data['seconds']} s, cached at {path}")
    elif log:
        log(f"Medusa: step cost from {path}")
    return data


def measured_schedule(runner, proposer, accept_lengths, *, refresh: bool = False, log=None) -> TreeSchedule:
    """:func:`schedule_from` of :func:`load_or_measure`."""
    return schedule_from(load_or_measure(runner, proposer, refresh=refresh, log=log), proposer, accept_lengths)
