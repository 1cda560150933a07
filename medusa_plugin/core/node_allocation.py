"""How many draft nodes to verify this step, and whose: one node budget for the whole batch, priced by step time.

Each request brings a dynamic tree whose nodes carry a *path score* (the calibrated probability that the node is
accepted: :mod:`.dynamic_tree`). Verifying ``m`` draft nodes in a step of ``B`` requests emits, in expectation,
``B + S`` tokens, with ``S`` the summed scores of the nodes verified, and costs ``step_ms(m)``. The best set of ``m``
nodes is the ``m`` highest scores across the whole batch (a node's score never exceeds its parent's, so the set is
ancestor-closed within every request), and the step verifies the ``m`` that maximises tokens per millisecond::

    m* = argmax_m (B + S(m)) / (step_ms(m) + [m > 0] draft_ms),   m = 0 .. total nodes offered

where ``draft_ms`` is what drafting costs (the heads and the trees): paid by every step that speculates, saved by a
step that does not (the proposer then rests the heads).

So a confident request gets a deep tree while an unsure one in the same step gets none, and the batch as a whole
drafts less as the step cost grows with rows (large batches, slow hardware). EAGLE-2 (Li et al. 2024) ranks nodes
by the same path product inside one request with a fixed budget; here the budget is set per step from the measured
step cost and shared across the batch.

Plain PyTorch / Python, no engine import.
"""

from __future__ import annotations

import heapq
from typing import Callable, Protocol, Sequence

from torch import Tensor

__all__ = ["allocate_nodes", "allocate_streams", "ScoreStream"]


def allocate_nodes(scores: Sequence[Tensor], step_ms: Callable[[int], float], *, min_nodes: int = 0,
                   min_gain: float = 0.0, draft_ms: float = 0.0) -> list[list[int]]:
    """Choose the draft nodes each request verifies this step (see the module docstring).

    Args:
        scores: per request, ``[N_b + 1]`` float path scores of its tree's nodes (node 0 = root, ignored); a
            child's score must not exceed its parent's (true of :class:`~.dynamic_tree.DynamicTree.score`).
        step_ms: time of the step (ms, > 0) as a function of the number of draft rows ``m`` it verifies (the
            requests' root rows are included in it at ``m = 0``); should be non-decreasing in ``m``.
        min_nodes: verify at least this many nodes in total (e.g. ``B``: one per request), to keep observing the
            acceptance when the scores alone would stop speculating.
        min_gain: verify nodes only if the best rate exceeds the plain step's by more than this fraction (a margin
            for the error of the scores and the step cost).
        draft_ms: the drafting time (ms, >= 0) a speculating step pays on top of ``step_ms(m)``.
    Returns:
        per request, the kept node indices (ascending, ancestor-closed, without the root).
    Raises:
        ValueError: a score tensor that is not 1-D, ``min_nodes < 0`` or ``min_gain < 0``.
    """
    if min_nodes < 0 or min_gain < 0 or draft_ms < 0:
        raise ValueError(f"min_nodes, min_gain and draft_ms must be >= 0, got {min_nodes}, {min_gain}, {draft_ms}")
    nodes: list[tuple[float, int, int]] = []  # (score, request, node): plain Python, this runs every step
    for b, s in enumerate(scores):
        if s.dim() != 1:
            raise ValueError(f"scores[{b}] must be 1-D [N + 1] (root first), got shape {tuple(s.shape)}")
        nodes += [(v, b, i) for i, v in enumerate(s[1:].tolist(), start=1)]
    keep: list[list[int]] = [[] for _ in scores]
    # best first; ties: lower request, then lower node index (a parent precedes its children in node order)
    nodes.sort(key=lambda t: (-t[0], t[1], t[2]))
    base = float(len(scores))
    best_m, best = 0, (1.0 + min_gain) * base / step_ms(0)
    total = 0.0
    for m, (v, _, _) in enumerate(nodes, start=1):
        total += v
        rate = (base + total) / (step_ms(m) + draft_ms)
        if rate > best:
            best_m, best = m, rate
    best_m = max(best_m, min(min_nodes, len(nodes)))
    for _, b, i in nodes[:best_m]:
        keep[b].append(i)
    return [sorted(k) for k in keep]


class ScoreStream(Protocol):
    """One request's nodes in non-increasing path-score order, drawn on demand
    (:class:`~medusa_plugin.core.dynamic_tree.NodeStream`)."""

    def peek(self) -> float | None: ...  # the next node's score, None when there is none

    def pop(self) -> float: ...  # draw the next node; its score


def allocate_streams(streams: Sequence[ScoreStream], step_ms: Callable[[int], float], *, max_nodes: int,
                     min_nodes: int = 0, min_gain: float = 0.0, draft_ms: float = 0.0) -> list[int]:
    """:func:`allocate_nodes` over nodes drawn lazily: the same choice, but only the nodes that can still matter are
    drawn (and so scored), the next best across the batch each time, until no larger step could beat the best rate
    so far even if every further node scored as much as the next one. Building whole trees first cost ~1.5 ms per
    request at 16 nodes on a 2-core CPU (the acceptance model scores each expanded node's children), for steps that
    then kept 2-3 nodes per request (benchmarks/README.md, session 13).

    Args:
        streams: per request, its nodes best first (each drawn node's parent was drawn before it).
        step_ms, min_nodes, min_gain, draft_ms: as :func:`allocate_nodes`.
        max_nodes: nodes per request at most (the tree budget ``N``).
    Returns:
        per request, how many of its first nodes to verify (the streams may have drawn more).
    Raises:
        ValueError: a negative ``max_nodes``, ``min_nodes``, ``min_gain`` or ``draft_ms``.
    """
    if min(max_nodes, min_nodes) < 0 or min_gain < 0 or draft_ms < 0:
        raise ValueError(f"max_nodes, min_nodes, min_gain and draft_ms must be >= 0, got {max_nodes}, {min_nodes}, "
                         f"{min_gain}, {draft_ms}")
    costs: list[float] = []

    def cost(m: int) -> float:  # step_ms(m) + draft_ms for m > 0, each m asked once
        while len(costs) <= m:
            costs.append(step_ms(len(costs)) + (draft_ms if costs else 0.0))
        return costs[m]

    base = float(len(streams))
    best_m, best = 0, (1.0 + min_gain) * base / cost(0)
    heap = []  # (-score, request): one entry per request; ties as allocate_nodes, lower request first
    for b, st in enumerate(streams):
        v = st.peek() if max_nodes > 0 else None
        if v is not None:
            heap.append((-v, b))
    heapq.heapify(heap)
    taken = [0] * len(streams)
    order: list[int] = []
    total = 0.0

    def can_beat(v: float) -> bool:  # some m' > m whose rate beats best, every further node scoring v at most
        m = len(order)
        return any((base + total + k * v) / cost(m + k) > best for k in range(1, max_nodes * len(streams) - m + 1))

    while heap:
        v = -heap[0][0]
        if len(order) >= min_nodes and not can_beat(v):
            break
        _, b = heapq.heappop(heap)
        total += streams[b].pop()
        taken[b] += 1
        order.append(b)
        rate = (base + total) / cost(len(order))
        if rate > best:
            best_m, best = len(order), rate
        if taken[b] < max_nodes:
            nv = streams[b].peek()
            if nv is not None:
                heapq.heappush(heap, (-nv, b))
    best_m = max(best_m, min(min_nodes, len(order)))
    counts = [0] * len(streams)
    for b in order[:best_m]:
        counts[b] += 1
    return counts
