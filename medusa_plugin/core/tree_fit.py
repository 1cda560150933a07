"""Fit a Medusa tree to per-head, per-rank accuracies (upstream ``medusa/eval/gen_results.py``, paper §2.3.3).

Model: ``a[k][r]`` = probability that the rank-``r`` candidate of head ``k`` is the correct token (marginal, so
``sum_r a[k][r] <= 1``). Under independence a node ``(r_0, ..., r_d)`` is accepted with probability
``value = prod_i a[i][r_i]``, and a step emits ``1 + sum of node values`` tokens on average (the 1 is the base
model's own token). Every node is worth at most its parent, so the best tree of ``n`` nodes is simply the ``n``
highest-value paths, which a best-first search over the frontier finds (and which is always a valid, prefix-closed
tree). Plain Python: no vLLM, no torch requirement beyond accepting tensors.
"""

from __future__ import annotations

import heapq
from typing import Mapping, Sequence


class TreeFitError(ValueError):
    """Bad accuracies or fitting arguments."""


def _matrix(accuracy, what: str = "accuracy") -> list[list[float]]:
    """[K, R] nested floats from a tensor / nested sequence / {"head0": [...], ...} mapping."""
    if isinstance(accuracy, Mapping):
        keys = sorted(accuracy, key=lambda k: int("".join(ch for ch in str(k) if ch.isdigit()) or 0))
        accuracy = [accuracy[k] for k in keys]
    if hasattr(accuracy, "tolist"):
        accuracy = accuracy.tolist()
    try:
        rows = [[float(x) for x in row] for row in accuracy]
    except TypeError:
        raise TreeFitError(f"{what} must be a [num_heads, num_ranks] matrix (nested lists or a 2-D tensor)") from None
    if not rows or not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise TreeFitError(f"{what} must be a non-empty [num_heads, num_ranks] matrix with equal-length rows, "
                           f"got row lengths {[len(r) for r in rows]}")
    for k, row in enumerate(rows):
        for r, x in enumerate(row):
            if not 0.0 <= x <= 1.0:
                raise TreeFitError(f"{what}[{k}][{r}] = {x} is not a probability in [0, 1]")
    return rows


def accuracy_from_topk(cumulative_topk) -> list[list[float]]:
    """Cumulative top-k accuracies [K, R] (top-1, top-2, ... per head, e.g. ``head_accuracy.json``'s
    ``{"head0": [...], ...}``) -> marginal per-rank accuracies [K, R] (``a[k][r] = top(r+1) - top(r)``)."""
    cum = _matrix(cumulative_topk, "cumulative top-k accuracy")
    out = []
    for k, row in enumerate(cum):
        for r in range(1, len(row)):
            if row[r] < row[r - 1] - 1e-9:
                raise TreeFitError(f"cumulative top-k accuracy of head {k} decreases at rank {r} "
                                   f"({row[r - 1]} -> {row[r]}); pass cumulative (top-1, top-2, ...) values, or "
                                   f"marginal ones straight to fit_tree")
        out.append([max(0.0, row[0])] + [max(0.0, row[r] - row[r - 1]) for r in range(1, len(row))])
    return out


def path_value(path: Sequence[int], acc: list[list[float]]) -> float:
    """prod_i acc[i][path[i]]; ranks or depths beyond the matrix count as accuracy 0."""
    v = 1.0
    for depth, rank in enumerate(path):
        if depth >= len(acc) or rank >= len(acc[depth]):
            return 0.0
        v *= acc[depth][rank]
    return v


def expected_accept_length(choices: Sequence[Sequence[int]], accuracy) -> float:
    """Expected tokens emitted per step, ``1 + sum_nodes value(node)``, for a tree given as Medusa choices.

    Nodes deeper than the number of heads, or with ranks beyond the measured ones, contribute 0 (a lower bound).
    Raises if ``choices`` is not a tree (a node without its parent, a duplicate, a negative rank).
    """
    acc = _matrix(accuracy)
    paths = [tuple(int(r) for r in p) for p in choices]
    seen = set(paths)
    if len(seen) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise TreeFitError(f"tree path {list(dup)} appears twice; remove the duplicate")
    for p in paths:
        if not p or min(p) < 0:
            raise TreeFitError(f"tree path {list(p)} is invalid: paths are non-empty lists of ranks >= 0")
        if len(p) > 1 and p[:-1] not in seen:
            raise TreeFitError(f"tree path {list(p)} has no parent {list(p[:-1])} in the tree; add the parent")
    return 1.0 + sum(path_value(p, acc) for p in paths)


def fit_tree(accuracy, budget: int, *, max_depth: int | None = None,
             max_children: int | None = None) -> list[tuple[int, ...]]:
    """The tree of at most ``budget`` nodes maximising :func:`expected_accept_length` (Medusa's greedy best-first).

    ``accuracy``: marginal [K, R] (use :func:`accuracy_from_topk` for cumulative numbers). ``max_depth``: at most
    this many levels (default K). ``max_children``: only ranks ``< max_children`` per head (default R; set it to the
    runtime ``topk``). Nodes of value 0 are never added, so the tree can be smaller than ``budget``.
    Returns paths sorted by (depth, path), the upstream node order. Ties go to the shallower, then smaller path.
    """
    acc = _matrix(accuracy)
    if budget < 1:
        raise TreeFitError(f"budget={budget}: a tree needs at least one node")
    depth = len(acc) if max_depth is None else min(max_depth, len(acc))
    ranks = len(acc[0]) if max_children is None else min(max_children, len(acc[0]))
    if depth < 1 or ranks < 1:
        raise TreeFitError(f"max_depth={max_depth}, max_children={max_children}: both must be >= 1")

    frontier: list[tuple[float, int, tuple[int, ...]]] = []

    def push_children(parent: tuple[int, ...], parent_value: float) -> None:
        if len(parent) < depth:
            for r in range(ranks):
                v = parent_value * acc[len(parent)][r]
                if v > 0.0:
                    heapq.heappush(frontier, (-v, len(parent) + 1, parent + (r,)))

    push_children((), 1.0)
    chosen: list[tuple[int, ...]] = []
    while frontier and len(chosen) < budget:
        neg_v, _, path = heapq.heappop(frontier)
        chosen.append(path)
        push_children(path, -neg_v)
    return sorted(chosen, key=lambda p: (len(p), p))
