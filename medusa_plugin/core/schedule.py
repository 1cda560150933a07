"""Batch-aware tree sizes: how many tree nodes to verify per request at a given batch size.

A verification step with ``q`` query tokens per request (``q = n + 1``: the root plus the first ``n`` tree nodes in
node order; ``q = 1`` is a plain decode step) costs ``overhead[B, q]`` plain decode steps at batch size ``B``. While
decoding is memory-bound this ratio is ~1 and the whole tree is free; once ``B * q`` passes the GPU's ridge point
(~226-295 tokens on an H100) the ratio grows ~linearly and a big tree makes decoding *slower*. Drafting (the Medusa
heads, run only when speculating) adds ``draft_overhead[B]`` plain steps.

With ``E[L](n)`` the expected tokens emitted per step when verifying the prefix ``[0, n]`` of the tree (``E[L](0) =
1``), the schedule picks, for every batch size, the ``n`` maximising the expected tokens per unit time::

    speed(B, n) = E[L](n) / cost(B, n),   cost(B, 0) = 1,   cost(B, n) = overhead(B, n + 1) + draft_overhead(B)

Candidates are ``n = 0`` (no speculation) and the prefixes of node order (a prefix is always a valid tree, and it is
what vLLM can truncate drafts to); ties go to the smaller ``n``. ``speed(B, 0) = 1`` is a candidate, so the schedule
never picks a size the table predicts to be slower than plain decoding. The choice is precomputed for every batch size
``1 .. max(batch_sizes)`` (``num_nodes(B)`` is a list index); above the table's largest batch size it is 0 (no data:
no speculation).

Between tabulated batch sizes the overhead is interpolated linearly in ``B``; between tabulated query counts linearly
in ``q``, except that ``1 < q < q_1`` (``q_1`` the smallest tabulated count above 1) uses the ``q_1`` column: the
``q = 1`` column is the plain decode path, a different (cheaper) code path than any tree step.

Sources of the overhead table: the roofline model (:meth:`TreeSchedule.roofline`, the shipped defaults
``data/schedule_h100.yaml`` / ``schedule_h200.yaml``), or a measurement (``medusa-plugin bench step-cost
--schedule-out``). Sources of ``E[L](n)``: :func:`prefix_accept_lengths` from per-head accuracies (independence
model, as upstream Medusa's tree construction), or measured acceptance.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml

__all__ = ["TreeSchedule", "TreeScheduleError", "RooflineParams", "GPU_SPECS", "prefix_accept_lengths",
           "AcceptanceEstimator", "interpolate_ms", "measured_overhead", "tree_attention_cost",
           "VICUNA_7B_TOPK_ACCURACY", "default_accuracy", "normalise_gpu_name"]

SCHEDULE_VERSION = 1
# Published teacher-forced top-1..top-5 accuracy of the 5 Medusa-1 heads of Vicuna-7B v1.3 (FasterDecoding/Medusa
# assets/medusa_acc.csv): the accuracy behind the upstream ``mc_sim_7b_63`` tree; the default E[L] model.
VICUNA_7B_TOPK_ACCURACY = (
    (0.5604, 0.6717, 0.7271, 0.7599, 0.7799),
    (0.3164, 0.4236, 0.4851, 0.5282, 0.5625),
    (0.2010, 0.2879, 0.3475, 0.3834, 0.4169),
    (0.1474, 0.2250, 0.2737, 0.3109, 0.3397),
    (0.1175, 0.1866, 0.2346, 0.2721, 0.2998),
)
DEFAULT_TREE = "mc_sim_7b_63"
# Peak dense bf16 FLOP/s and HBM bandwidth (SXM parts).
GPU_SPECS: dict[str, dict[str, float]] = {
    "h100": {"flops": 989e12, "bandwidth": 3.35e12, "memory": 80e9},
    "h200": {"flops": 989e12, "bandwidth": 4.8e12, "memory": 141e9},
}
ROOFLINE_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
ROOFLINE_QUERY_TOKENS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64)
_KEYS = ("schedule_version", "source", "gpu", "model", "notes", "batch_sizes", "query_tokens", "overhead",
         "draft_overhead", "tree", "accept_lengths")


class TreeScheduleError(ValueError):
    """A malformed schedule table or bad arguments; the message names the field and the fix."""


def normalise_gpu_name(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``; raises TreeScheduleError for GPUs without a shipped table."""
    low = str(name).lower().replace("-", " ")
    for key in GPU_SPECS:
        if key in low.split() or key in low.replace(" ", ""):
            return key
    raise TreeScheduleError(
        f"no shipped tree schedule for GPU {name!r} (shipped: {', '.join(GPU_SPECS)}): measure one with "
        f"`medusa-plugin bench step-cost --schedule-out schedule.yaml` and set `tree_schedule: schedule.yaml`")


def default_accuracy() -> list[list[float]]:
    """Per-(head, rank) marginal accuracy [5, 5] from :data:`VICUNA_7B_TOPK_ACCURACY` (top-k differences)."""
    return [[row[0]] + [row[r] - row[r - 1] for r in range(1, len(row))] for row in VICUNA_7B_TOPK_ACCURACY]


def prefix_accept_lengths(tree, accuracy: Sequence[Sequence[float]] | None = None) -> list[float]:
    """E[L](n) for every prefix ``[0, n]`` of ``tree``'s node order, n = 0..N, under the independence model.

    Args:
        tree: a ``MedusaTree`` or any spec ``MedusaTree.load`` accepts.
        accuracy: [K, R] marginal accuracy, ``accuracy[k][r]`` = P(rank ``r`` of head ``k`` is the target's next
            token); ranks/heads outside it count as never right. Default: :func:`default_accuracy`.
    Returns:
        list of N+1 floats, ``E[L](n) = 1 + sum_{i <= n} prod_d accuracy[d][path_i[d]]`` (non-decreasing, [0] = 1).
    """
    from .tree import MedusaTree

    tree = MedusaTree.load(tree)
    acc = [list(map(float, row)) for row in (default_accuracy() if accuracy is None else accuracy)]
    if not acc or any(not row for row in acc) or any(not (0.0 <= a <= 1.0) for row in acc for a in row):
        raise TreeScheduleError("accuracy must be a non-empty [K, R] table of probabilities in [0, 1] "
                                "(marginal per-rank accuracy; convert cumulative top-k accuracy by differencing)")
    out = [1.0]
    for p in tree.path_probabilities(acc):
        out.append(out[-1] + p)
    return out


# ------------------------------------------------------------------------------------------------ observed acceptance
class AcceptanceEstimator:
    """Online estimate of E[L](n) for every prefix of a tree from the paths accepted in serving.

    Node ``i``'s acceptance ``p_i`` (the probability that the accepted path passes through node ``i`` when ``i`` is
    verified) does not depend on which other nodes are verified with it: it needs only its ancestors, which every
    prefix of node order contains. So ``E[L](n) = 1 + sum_{i <= n} p_i`` for every prefix ``n``, from per-node counts::

        p_i = (hits_i + w * prior_i) / (tried_i + w)

    ``tried_i`` counts request-steps that verified node ``i``, ``hits_i`` those whose accepted path went through it;
    both decay by ``decay`` per request-step (a window of about ``1 / (1 - decay)`` request-steps), so the estimate
    follows the traffic. ``prior_i`` (weight ``w`` pseudo-observations) is what is assumed before a node is seen:
    the differences of ``prior_accept_lengths`` (e.g. :func:`prefix_accept_lengths` of published accuracies).

    Args:
        tree: a ``MedusaTree``.
        prior_accept_lengths: E[L](n), n = 0..N, before any observation (default: :func:`prefix_accept_lengths` with
            the Vicuna-7B head accuracies).
        prior_weight: ``w`` >= 0.
        decay: per request-step forgetting factor in (0, 1].
    Raises:
        TreeScheduleError: a prior of the wrong length, ``w < 0`` or ``decay`` outside (0, 1].
    """

    def __init__(self, tree, prior_accept_lengths: Sequence[float] | None = None, *, prior_weight: float = 4.0,
                 decay: float = 0.998):
        if prior_accept_lengths is None:
            prior_accept_lengths = prefix_accept_lengths(tree)
        n1 = tree.num_nodes + 1
        if len(prior_accept_lengths) != n1:
            raise TreeScheduleError(f"prior_accept_lengths has {len(prior_accept_lengths)} values; the tree has "
                                    f"{tree.num_nodes} nodes, so give E[L](n) for n = 0..{tree.num_nodes}")
        if prior_weight < 0 or not 0.0 < decay <= 1.0:
            raise TreeScheduleError(f"prior_weight must be >= 0 and decay in (0, 1], got {prior_weight}, {decay}")
        el = torch.tensor([float(x) for x in prior_accept_lengths], dtype=torch.float64)
        self.prior = torch.cat([torch.ones(1, dtype=torch.float64), (el[1:] - el[:-1]).clamp(0.0, 1.0)])
        self.prior_weight, self.decay = float(prior_weight), float(decay)
        self.node_paths = tree.node_paths.cpu()
        self.tried = torch.zeros(n1, dtype=torch.float64)
        self.hits = torch.zeros(n1, dtype=torch.float64)
        self.observed = 0  # request-steps seen

    def update(self, last_node, num_verified) -> None:
        """Record request-steps: ``last_node [R]`` int (the accepted path's last node, 0 = nothing accepted) and
        ``num_verified [R]`` int (draft nodes verified, i.e. the prefix ``[1, num_verified]``; query length - 1)."""
        last = torch.as_tensor(last_node, dtype=torch.int64).cpu().reshape(-1)
        nv = torch.as_tensor(num_verified, dtype=torch.int64).cpu().reshape(-1)
        r = last.numel()
        if r == 0:
            return
        n1 = self.tried.numel()
        if self.decay < 1.0:
            f = self.decay ** r
            self.tried.mul_(f)
            self.hits.mul_(f)
        # tried: node i verified iff i <= num_verified -> a histogram of num_verified, accumulated from the top
        tried = torch.bincount(nv.clamp(0, n1 - 1), minlength=n1).flip(0).cumsum(0).flip(0).to(torch.float64)
        self.tried += tried
        path = self.node_paths[last].reshape(-1)
        self.hits += torch.bincount(path[path >= 0], minlength=n1).to(torch.float64)
        self.observed += r

    def node_acceptance(self) -> torch.Tensor:
        """``[N+1]`` float64 estimated ``p_i`` (``p_0 = 1``, the root is always kept)."""
        w = self.prior_weight
        p = (self.hits + w * self.prior) / (self.tried + w).clamp_min(1e-12)
        p[0] = 1.0
        return p.clamp_(0.0, 1.0)

    def accept_lengths(self) -> list[float]:
        """E[L](n) for n = 0..N (non-decreasing, [0] = 1)."""
        p = self.node_acceptance()
        p[0] = 1.0
        return p.cumsum(0).tolist()


# ------------------------------------------------------------------------------------------------ measured tables
def interpolate_ms(points: Mapping[int, float], rows: float) -> float:
    """Piecewise-linear time at ``rows`` from measured ``{rows: ms}`` (>= 1 point); beyond the largest measured row
    count, extended along the last segment (a step grows at least linearly once compute-bound), never below the
    last point; below the smallest, its value."""
    xs = sorted(points)
    if not xs:
        raise TreeScheduleError("no measured points to interpolate")
    if rows <= xs[0]:
        return float(points[xs[0]])
    if rows >= xs[-1]:
        if len(xs) == 1:
            return float(points[xs[-1]]) * rows / xs[-1]
        x0, x1 = xs[-2], xs[-1]
        slope = max((points[x1] - points[x0]) / (x1 - x0), 0.0)
        return float(points[x1] + slope * (rows - x1))
    j = bisect.bisect_left(xs, rows)
    x0, x1 = xs[j - 1], xs[j]
    w = (rows - x0) / (x1 - x0)
    return float(points[x0] + w * (points[x1] - points[x0]))


def tree_attention_cost(table: Mapping[Any, Mapping[Any, float]], batch_size: float, query_tokens: float) -> float:
    """Time (ms) of the tree-attention path of one step from a measured ``{B: {q: ms}}`` table (keys may be
    strings, as read from JSON): interpolated in ``q`` (:func:`interpolate_ms`) at the tabulated batch sizes, then
    in ``B``; above the largest tabulated ``B``, proportional to ``B`` (one request's rows cost the same)."""
    per_b = {int(b): interpolate_ms({int(q): float(v) for q, v in row.items()}, query_tokens)
             for b, row in table.items()}
    if not per_b:
        return 0.0
    top = max(per_b)
    if batch_size > top:
        return per_b[top] * batch_size / top
    return interpolate_ms(per_b, batch_size)


def measured_overhead(forward_ms: Mapping[int, float], batch_sizes: Sequence[int], query_tokens: Sequence[int],
                      draft_ms: Mapping[int, Sequence[float]] | None = None, tree=None,
                      step_fixed_ms: float = 0.0, tree_row_ms: float = 0.0,
                      tree_attention_ms: Mapping[Any, Mapping[Any, float]] | None = None) -> list[list[float]]:
    """The ``overhead`` table of a :class:`TreeSchedule` from measured step times.

    ``overhead[B][q] = (f(B * q) + c + a * B * (q - 1) + draft(B, depth(q - 1)) + t(B, q)) / (f(B) + c)``,
    ``overhead[B][1] = 1``, with ``f`` the measured forward time over a number of rows (:func:`interpolate_ms` of
    ``forward_ms``), ``c = step_fixed_ms`` the per-step time outside the forward (same with and without a tree),
    ``a = tree_row_ms`` the extra time of a draft row beyond its forward (both learnt while serving:
    :class:`~medusa_plugin.core.step_time_fit.StepTimeFit`), and ``draft(B, d)`` the
    time of the heads a prefix of depth ``d`` needs at batch ``B`` (``draft_ms[B][d - 1]``, interpolated in ``B``;
    ``tree`` gives the depth of each prefix; 0 without ``draft_ms``). ``t(B, q)`` is the tree-attention path's
    time (:func:`tree_attention_cost` of ``tree_attention_ms``) for prefixes that are not a chain (``q - 1 >
    tree.chain_prefix``: a chain prefix is verified by the stock attention), 0 without the table. The forward times
    are first made non-decreasing in rows (``f(r) = min_{r' >= r} f(r')``: a forward over fewer rows is not slower,
    so a high point below a lower one is warm-up or noise); the heads' times likewise in depth.
    """
    xs = sorted(forward_ms)
    mono, low = {}, float("inf")
    for x in reversed(xs):
        low = min(low, float(forward_ms[x]))
        mono[x] = low
    forward_ms = mono
    if draft_ms:  # likewise: more heads are not cheaper
        draft_ms = {b: [min(v[i:]) for i in range(len(v))] for b, v in draft_ms.items()}
    out = []
    for b in batch_sizes:
        base = interpolate_ms(forward_ms, b) + step_fixed_ms
        row = []
        for q in query_tokens:
            if q == 1:
                row.append(1.0)
                continue
            t = interpolate_ms(forward_ms, b * q) + step_fixed_ms + tree_row_ms * b * (q - 1)
            if tree_attention_ms and (tree is None or q - 1 > tree.chain_prefix):
                t += tree_attention_cost(tree_attention_ms, b, q)
            if draft_ms:
                depth = tree.prefix_depth[min(q - 1, tree.num_nodes)] if tree is not None else 1
                per_b = {bb: v[min(depth, len(v)) - 1] for bb, v in draft_ms.items()}
                t += interpolate_ms(per_b, b)
            row.append(round(max(t / base, 1e-6), 5))
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------ roofline
@dataclass(frozen=True)
class RooflineParams:
    """A decoder-only transformer on a GPU, for the roofline step-time model (defaults: Llama-3-8B, H100 SXM, bf16).

    Step time with ``q`` query tokens for each of ``B`` requests at context ``c``::

        t_mem = (bytes(weights) + B * c * kv_bytes_per_token) / (bandwidth * mem_efficiency)
        t_cmp = (2 * params * B * q + 4 * layers * hidden * (c + q) * B * q) / (flops * flop_efficiency)
        t     = max(t_mem, t_cmp)

    The context is capped by the KV cache capacity, ``c = min(context_len, kv_capacity_tokens // B)`` with
    ``kv_capacity_tokens = (memory * memory_utilization - bytes(weights)) / kv_bytes_per_token``: a GPU cannot run
    more cached tokens than fit, so at very large B the step turns compute-bound and speculation stops paying.
    Drafting reads ``draft_params`` = ``draft_heads`` residual blocks (hidden^2 + hidden each) plus the base lm_head
    once more (v2 / shared-lm-head heads) and multiplies ``B`` rows by them.
    """
    name: str = "llama-3-8b"
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    intermediate_size: int = 14336
    vocab_size: int = 128256
    context_len: int = 1024
    bytes_per_param: int = 2
    gpu: str = "h100"
    flops: float = GPU_SPECS["h100"]["flops"]
    bandwidth: float = GPU_SPECS["h100"]["bandwidth"]
    memory: float = GPU_SPECS["h100"]["memory"]
    memory_utilization: float = 0.9
    mem_efficiency: float = 0.85
    flop_efficiency: float = 0.65
    draft_heads: int = 4

    @classmethod
    def for_gpu(cls, gpu: str, **kw) -> "RooflineParams":
        key = normalise_gpu_name(gpu)
        return cls(gpu=key, **GPU_SPECS[key], **kw)

    @property
    def params(self) -> int:
        """Weights read per step: attention + MLP of every layer, plus the lm_head (the embedding is a gather)."""
        d, kv = self.hidden_size, self.hidden_size // self.num_heads * self.num_kv_heads
        return self.num_layers * (2 * d * d + 2 * d * kv + 3 * d * self.intermediate_size) + self.vocab_size * d

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.hidden_size // self.num_heads * self.num_kv_heads * self.bytes_per_param

    @property
    def draft_params(self) -> int:
        return self.draft_heads * (self.hidden_size ** 2 + self.hidden_size) + self.vocab_size * self.hidden_size

    @property
    def kv_capacity_tokens(self) -> int:
        free = self.memory * self.memory_utilization - self.params * self.bytes_per_param
        if free <= 0:
            raise TreeScheduleError(f"roofline: the weights ({self.params * self.bytes_per_param / 1e9:.1f} GB) do not "
                                    f"fit in {self.memory_utilization:.0%} of {self.memory / 1e9:.0f} GB; "
                                    f"raise memory or memory_utilization")
        return int(free // self.kv_bytes_per_token)

    def _time(self, mem_bytes: float, flop: float) -> float:
        return max(mem_bytes / (self.bandwidth * self.mem_efficiency), flop / (self.flops * self.flop_efficiency))

    def step_time(self, query_tokens: int, batch_size: int) -> float:
        """Seconds of one forward with ``query_tokens`` per request for ``batch_size`` requests."""
        q, b = query_tokens, batch_size
        c = min(self.context_len, self.kv_capacity_tokens // b)
        mem = self.params * self.bytes_per_param + b * c * self.kv_bytes_per_token
        flop = 2 * self.params * b * q + 4 * self.num_layers * self.hidden_size * (c + q) * b * q
        return self._time(mem, flop)

    def draft_time(self, batch_size: int) -> float:
        return self._time(self.draft_params * self.bytes_per_param, 2 * self.draft_params * batch_size)


# ------------------------------------------------------------------------------------------------ validation
def _err(field: str, problem: str, fix: str) -> TreeScheduleError:
    return TreeScheduleError(f"tree schedule: '{field}' {problem}; {fix}")


def _int_list(value: Any, field: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise _err(field, f"must be a non-empty list of integers, got {value!r:.80}", "e.g. [1, 2, 4, 8]")
    if value[0] < 1 or any(b <= a for a, b in zip(value, value[1:])):
        raise _err(field, f"must be strictly increasing integers >= 1, got {list(value)}", "sort it, drop repeats")
    return list(value)


def _float(v: Any, field: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _err(field, f"holds {v!r}, not a finite number", "write plain numbers")
    return float(v)


# ------------------------------------------------------------------------------------------------ schedule
class TreeSchedule:
    """Per-batch-size tree sizes from an overhead table and the expected accepted tokens per tree prefix.

    Args:
        batch_sizes: tabulated batch sizes, strictly increasing (>= 1).
        query_tokens: tabulated query tokens per request, strictly increasing, starting at 1 (plain decode).
        overhead: [len(batch_sizes)][len(query_tokens)] step time / plain decode step time at the same batch size;
            the ``q = 1`` column is 1 by definition.
        accept_lengths: E[L](n) for n = 0..N (N the tree's nodes): [0] = 1, non-decreasing.
        draft_overhead: drafting cost in plain decode steps, a number or one per batch size (>= 0).
        meta: provenance written to YAML (source, gpu, model, notes, tree).
        min_gain: speculate only where the expected speed-up exceeds ``1 + min_gain`` (a margin for the error of
            measured costs and estimated acceptance: a marginal win on paper is a coin flip in the engine); >= 0.
    """

    def __init__(self, batch_sizes: Sequence[int], query_tokens: Sequence[int],
                 overhead: Sequence[Sequence[float]], accept_lengths: Sequence[float], *,
                 draft_overhead: float | Sequence[float] = 0.0, meta: Mapping[str, Any] | None = None,
                 min_gain: float = 0.0):
        self.batch_sizes = _int_list(batch_sizes, "batch_sizes")
        self.query_tokens = _int_list(query_tokens, "query_tokens")
        if self.query_tokens[0] != 1 or len(self.query_tokens) < 2:
            raise _err("query_tokens", f"must start with 1 (the plain decode step) and have at least one tree size, "
                       f"got {self.query_tokens}", "measure q = 1 as the reference column")
        if not isinstance(overhead, (list, tuple)) or len(overhead) != len(self.batch_sizes):
            raise _err("overhead", f"must have one row per batch size ({len(self.batch_sizes)} rows)",
                       "write one list per entry of 'batch_sizes'")
        self.overhead: list[list[float]] = []
        for b, row in zip(self.batch_sizes, overhead):
            where = f"overhead (row B={b})"
            if not isinstance(row, (list, tuple)) or len(row) != len(self.query_tokens):
                raise _err(where, f"must have {len(self.query_tokens)} values (one per query_tokens entry), "
                           f"got {row!r:.80}", "fix the row length")
            vals = [_float(v, where) for v in row]
            if any(v <= 0 for v in vals):
                raise _err(where, f"holds a non-positive ratio {vals}", "ratios are step times / plain step time > 0")
            if abs(vals[0] - 1.0) > 1e-3:
                raise _err(where, f"starts with {vals[0]}, but the q = 1 column is the plain decode step itself",
                           "divide the row by its first entry")
            self.overhead.append(vals)
        if isinstance(draft_overhead, (list, tuple)):
            if len(draft_overhead) != len(self.batch_sizes):
                raise _err("draft_overhead", f"has {len(draft_overhead)} values for {len(self.batch_sizes)} batch "
                           f"sizes", "give one number, or one per batch size")
            self.draft_overhead = [_float(v, "draft_overhead") for v in draft_overhead]
        else:
            self.draft_overhead = [_float(draft_overhead, "draft_overhead")] * len(self.batch_sizes)
        if any(v < 0 for v in self.draft_overhead):
            raise _err("draft_overhead", f"is negative: {self.draft_overhead}", "use 0 when drafting is free")
        if not isinstance(accept_lengths, (list, tuple)) or not accept_lengths:
            raise _err("accept_lengths", "must be a non-empty list E[L](n), n = 0..N",
                       "compute it with prefix_accept_lengths(tree, accuracy)")
        el = [_float(v, "accept_lengths") for v in accept_lengths]
        if abs(el[0] - 1.0) > 1e-6 or any(b < a - 1e-9 for a, b in zip(el, el[1:])):
            raise _err("accept_lengths", f"must start at 1.0 (no speculation emits one token) and never decrease, "
                       f"got {[round(x, 4) for x in el[:8]]}{'...' if len(el) > 8 else ''}",
                       "E[L](n) is 1 + the summed acceptance probability of the first n nodes")
        self.accept_lengths = el
        self.meta = dict(meta or {})
        self.min_gain = _float(min_gain, "min_gain")
        if self.min_gain < 0:
            raise _err("min_gain", f"is negative: {self.min_gain}", "use 0 for no margin")
        self.max_nodes = min(len(el) - 1, self.query_tokens[-1] - 1)
        self._choice = self._choices()

    # ---------------------------------------------------------------- model
    def _row(self, batch_size: int) -> tuple[int, int, float]:
        """(i, j, w): batch_size sits between rows i and j with weight w on j (clamped below the first row)."""
        bs = self.batch_sizes
        if batch_size <= bs[0]:
            return 0, 0, 0.0
        j = bisect.bisect_left(bs, batch_size)
        return j - 1, j, (batch_size - bs[j - 1]) / (bs[j] - bs[j - 1])

    def _interp_q(self, row: Sequence[float], q: int) -> float:
        """A row of ``overhead`` at ``q`` query tokens (the column rule of the module docstring)."""
        qs = self.query_tokens
        if q <= 1:
            return 1.0
        if q <= qs[1]:
            return row[1]
        j = bisect.bisect_left(qs, q)
        w = (q - qs[j - 1]) / (qs[j] - qs[j - 1])
        return row[j - 1] + w * (row[j] - row[j - 1])

    def cost(self, batch_size: int, num_nodes: int) -> float:
        """Step time with ``num_nodes`` tree nodes per request, in plain decode steps at ``batch_size``."""
        if num_nodes == 0:
            return 1.0
        if not 0 < num_nodes <= self.max_nodes:
            raise TreeScheduleError(f"num_nodes={num_nodes} is outside 0..{self.max_nodes} (tree nodes covered by "
                                    f"both the table's query_tokens and accept_lengths)")
        i, j, w = self._row(batch_size)
        q = num_nodes + 1
        ovh = (1 - w) * self._interp_q(self.overhead[i], q) + w * self._interp_q(self.overhead[j], q)
        return ovh + (1 - w) * self.draft_overhead[i] + w * self.draft_overhead[j]

    def expected_speedup(self, batch_size: int, num_nodes: int | None = None) -> float:
        """E[L](n) / cost(B, n): expected tokens per unit time relative to plain decoding (n default: the choice)."""
        n = self.num_nodes(batch_size) if num_nodes is None else num_nodes
        return self.accept_lengths[n] / self.cost(batch_size, n)

    def _choices(self) -> list[int]:
        """argmax_n E[L](n) / cost(B, n) for B = 0 .. max(batch_sizes) (first maximum: ties go to the smaller n;
        n = 0 counts as ``1 + min_gain``)."""
        n_max, bmax = self.max_nodes, self.batch_sizes[-1]
        if n_max == 0:
            return [0] * (bmax + 1)
        rows = torch.tensor([[self._interp_q(row, n + 1) + d for n in range(1, n_max + 1)]
                             for row, d in zip(self.overhead, self.draft_overhead)], dtype=torch.float64)
        ij_w = [self._row(b) for b in range(1, bmax + 1)]
        i = torch.tensor([x[0] for x in ij_w])
        j = torch.tensor([x[1] for x in ij_w])
        w = torch.tensor([x[2] for x in ij_w], dtype=torch.float64).unsqueeze(1)
        cost = (1 - w) * rows[i] + w * rows[j]  # [bmax, n_max]
        el = torch.tensor(self.accept_lengths[: n_max + 1], dtype=torch.float64)
        speed = torch.cat([torch.full((bmax, 1), 1.0 + self.min_gain, dtype=torch.float64), el[1:] / cost], dim=1)
        return [0] + speed.argmax(dim=1).tolist()

    # ---------------------------------------------------------------- lookups
    def num_nodes(self, batch_size: int) -> int:
        """Tree nodes to verify per request (a prefix of node order; 0 = no speculation) at ``batch_size``."""
        if batch_size < 0:
            raise TreeScheduleError(f"batch_size must be >= 0, got {batch_size}")
        return self._choice[batch_size] if batch_size < len(self._choice) else 0

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def table(self) -> dict[int, int]:
        """{batch size: tree nodes} for 1 .. max(batch_sizes) (above: 0)."""
        return {b: self._choice[b] for b in range(1, len(self._choice))}

    def ranges(self) -> list[tuple[int, int, int]]:
        """The table as runs ``(first_batch, last_batch, num_nodes)``."""
        runs: list[list[int]] = []
        for b, n in self.table().items():
            if runs and runs[-1][2] == n:
                runs[-1][1] = b
            else:
                runs.append([b, b, n])
        return [tuple(r) for r in runs]

    def describe(self) -> str:
        lines = [f"tree schedule ({self.meta.get('source', 'unknown source')}, gpu {self.meta.get('gpu', '?')}, "
                 f"tree {self.meta.get('tree', '?')}: {len(self.accept_lengths) - 1} nodes)",
                 f"{'batch sizes':>13} {'nodes':>6} {'E[L]':>6} {'cost':>6} {'speedup':>8}"]
        for lo, hi, n in self.ranges():
            lines.append(f"{f'{lo}-{hi}' if hi > lo else str(lo):>13} {n:>6} {self.accept_lengths[n]:>6.2f} "
                         f"{self.cost(lo, n):>6.2f} {self.expected_speedup(lo, n):>7.2f}x")
        lines.append(f"{f'>{self.max_batch_size}':>13} {0:>6} (beyond the table: no speculation)")
        return "\n".join(lines)

    # ---------------------------------------------------------------- derived schedules
    def with_accept_lengths(self, accept_lengths: Sequence[float], tree: str | None = None) -> "TreeSchedule":
        """The same overhead table with another E[L](n) (e.g. measured acceptance, or another tree)."""
        meta = dict(self.meta, tree=tree if tree is not None else f"{len(accept_lengths) - 1} nodes")
        return TreeSchedule(self.batch_sizes, self.query_tokens, self.overhead, accept_lengths,
                            draft_overhead=self.draft_overhead, meta=meta, min_gain=self.min_gain)

    def for_tree(self, tree, accuracy: Sequence[Sequence[float]] | None = None) -> "TreeSchedule":
        """The same overhead table with E[L](n) of ``tree``'s prefixes from ``accuracy`` (default Vicuna-7B heads)."""
        name = tree if isinstance(tree, str) else None
        return self.with_accept_lengths(prefix_accept_lengths(tree, accuracy), tree=name)

    @classmethod
    def roofline(cls, params: RooflineParams | None = None, *, tree=DEFAULT_TREE,
                 accuracy: Sequence[Sequence[float]] | None = None, accept_lengths: Sequence[float] | None = None,
                 batch_sizes: Sequence[int] = ROOFLINE_BATCH_SIZES,
                 query_tokens: Sequence[int] = ROOFLINE_QUERY_TOKENS) -> "TreeSchedule":
        """A schedule whose overhead table comes from the roofline model ``params`` (default Llama-3-8B on H100)."""
        p = params or RooflineParams()
        overhead = [[round(p.step_time(q, b) / p.step_time(1, b), 4) for q in query_tokens] for b in batch_sizes]
        draft = [round(p.draft_time(b) / p.step_time(1, b), 4) for b in batch_sizes]
        if accept_lengths is None:
            accept_lengths = prefix_accept_lengths(tree, accuracy)
        model = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
        meta = dict(source="roofline", gpu=p.gpu, model=model,
                    tree=tree if isinstance(tree, str) else f"{len(accept_lengths) - 1} nodes",
                    notes="DERIVED FROM THE ROOFLINE MODEL (not measured); accept_lengths from the Vicuna-7B "
                          "Medusa-1 head accuracies (independence model) unless stated otherwise")
        return cls(batch_sizes, query_tokens, overhead, [round(x, 5) for x in accept_lengths],
                   draft_overhead=draft, meta=meta)

    @classmethod
    def default(cls, gpu_name: str, *, tree=None, accuracy: Sequence[Sequence[float]] | None = None
                ) -> "TreeSchedule":
        """The shipped table for ``gpu_name`` (H100 / H200, roofline-derived); ``tree``/``accuracy`` re-derive E[L]."""
        key = normalise_gpu_name(gpu_name)
        ref = resources.files("medusa_plugin") / "data" / f"schedule_{key}.yaml"
        sched = cls.from_dict(yaml.safe_load(ref.read_text()), where=f"shipped schedule_{key}.yaml")
        return sched if tree is None and accuracy is None else sched.for_tree(tree or DEFAULT_TREE, accuracy)

    @classmethod
    def resolve(cls, setting: str | os.PathLike | None, tree, *, gpu_name: str | None = None,
                accuracy: Sequence[Sequence[float]] | None = None) -> "TreeSchedule | None":
        """The schedule for a config's ``tree_schedule`` value and the configured ``tree`` (spec or MedusaTree).

        ``None`` -> None (one tree for every batch size). ``"auto"`` -> the shipped table for ``gpu_name`` (default:
        the current CUDA device), or None on a CPU or a GPU without a shipped table. A path -> that YAML. E[L] is
        re-derived for ``tree`` (from ``accuracy``) unless the table was made for a tree of the same name and size.
        """
        from .tree import MedusaTree

        if setting is None:
            return None
        if str(setting) == "auto":
            if gpu_name is None:
                if not torch.cuda.is_available():
                    return None
                gpu_name = torch.cuda.get_device_name()
            try:
                sched = cls.default(gpu_name)
            except TreeScheduleError:
                return None
        else:
            sched = cls.from_yaml(setting)
        mtree = MedusaTree.load(tree)
        same = (isinstance(tree, str) and sched.meta.get("tree") == tree
                and len(sched.accept_lengths) == mtree.num_nodes + 1)
        return sched if same and accuracy is None else sched.for_tree(mtree if not isinstance(tree, str) else tree,
                                                                      accuracy)

    # ---------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, data: Any, *, where: str = "tree schedule") -> "TreeSchedule":
        if not isinstance(data, Mapping):
            raise TreeScheduleError(f"{where}: expected a mapping with keys batch_sizes, query_tokens, overhead, "
                                    f"accept_lengths; got {type(data).__name__}")
        unknown = [k for k in data if k not in _KEYS]
        if unknown:
            raise TreeScheduleError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(_KEYS)}")
        missing = [k for k in ("batch_sizes", "query_tokens", "overhead", "accept_lengths") if k not in data]
        if missing:
            hint = (" (a measured table without heads information: add accept_lengths, or load it and call "
                    "for_tree(tree, accuracy))" if missing == ["accept_lengths"] else "")
            raise TreeScheduleError(f"{where}: missing key(s) {missing}{hint}")
        version = data.get("schedule_version", SCHEDULE_VERSION)
        if version != SCHEDULE_VERSION:
            raise TreeScheduleError(f"{where}: schedule_version {version!r} is not supported (expected "
                                    f"{SCHEDULE_VERSION}); regenerate it with `medusa-plugin bench step-cost`")
        meta = {k: data[k] for k in ("source", "gpu", "model", "notes", "tree") if k in data}
        try:
            return cls(data["batch_sizes"], data["query_tokens"], data["overhead"], data["accept_lengths"],
                       draft_overhead=data.get("draft_overhead", 0.0), meta=meta)
        except TreeScheduleError as e:
            raise TreeScheduleError(f"{where}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TreeSchedule":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tree schedule file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise TreeScheduleError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        return cls.from_dict(data, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schedule_version": SCHEDULE_VERSION, **self.meta, "batch_sizes": self.batch_sizes,
                             "query_tokens": self.query_tokens, "overhead": self.overhead}
        same = all(v == self.draft_overhead[0] for v in self.draft_overhead)
        d["draft_overhead"] = self.draft_overhead[0] if same else self.draft_overhead
        d["accept_lengths"] = self.accept_lengths
        return d

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """YAML text (header comment, data, the resulting choices as comments); also written to ``path`` if given."""
        d = self.to_dict()
        src = str(self.meta.get("source", ""))
        if src == "roofline":
            head = ["DERIVED FROM THE ROOFLINE MODEL (not measured). Replace it with a measurement on your GPU:",
                    "  medusa-plugin bench step-cost --schedule-out schedule.yaml  (then tree_schedule: schedule.yaml)",
                    "t(q, B) = max(t_mem, t_cmp) per medusa_plugin.core.schedule.RooflineParams with the 'model' "
                    "parameters below."]
        else:
            head = [f"Overhead table from: {src or 'unknown source'}."]
        lines = [f"# {h}" for h in head] + [
            "# overhead[i][j]: step time with query_tokens[j] tokens per request (root + tree prefix) at batch "
            "size batch_sizes[i], divided by a plain decode step (q = 1) at that batch size.",
            "# draft_overhead: Medusa heads cost per speculating step, in plain decode steps.",
            "# accept_lengths[n]: expected tokens emitted per step when verifying the first n tree nodes.",
        ]
        for key in ("schedule_version", "source", "gpu", "notes", "tree"):
            if key in d:
                lines.append(f"{key}: {json.dumps(d[key])}")
        if "model" in d:
            lines.append(f"model: {json.dumps(d['model'])}")
        lines.append(f"batch_sizes: {json.dumps(d['batch_sizes'])}")
        lines.append(f"query_tokens: {json.dumps(d['query_tokens'])}")
        lines.append("overhead:")
        lines += [f"  - {json.dumps(row)}  # B={b}" for b, row in zip(self.batch_sizes, self.overhead)]
        lines.append(f"draft_overhead: {json.dumps(d['draft_overhead'])}")
        lines.append(f"accept_lengths: {json.dumps(d['accept_lengths'])}")
        lines.append("# resulting tree nodes per batch size (recomputed on load; for reading only):")
        lines += [f"#   B {lo}-{hi}: {n}" if hi > lo else f"#   B {lo}: {n}" for lo, hi, n in self.ranges()]
        lines.append(f"#   B > {self.max_batch_size}: 0")
        text = "\n".join(lines) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def __repr__(self) -> str:
        runs = ", ".join(f"{lo}-{hi}:{n}" if hi > lo else f"{lo}:{n}" for lo, hi, n in self.ranges())
        return f"TreeSchedule({self.meta.get('source', '?')}, {runs})"
