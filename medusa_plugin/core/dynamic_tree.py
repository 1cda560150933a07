"""Dynamic draft trees: per request and per step, the ``N`` nodes with the highest path probability over the Medusa
heads' top-k lattice, optionally merged with prompt-lookup (n-gram) branches.

The lattice: a node at depth ``d`` is reached by taking rank ``r_0`` of head 0, ..., rank ``r_{d-1}`` of head
``d-1``; its *path score* is the product of the per-node acceptance estimates along the path, where a Medusa node's
estimate is its head probability (softmax of the head logits, over the draft vocabulary when the heads have a
``token_map``), optionally calibrated (:class:`~medusa_plugin.core.calibration.AcceptanceCalibration`). The tree is
the ``N`` best nodes by ``(score desc, depth asc, slot path asc)``; every factor is <= 1, so a node never ranks
above its parent and the selection is ancestor-closed. Best-first expansion from the root (a heap) finds exactly
that set (EAGLE-2: Li et al. 2024, "EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees", §4,
expansion and re-ranking by the product of confidences along the path; here over Medusa's rank lattice).

Hybrid trees: ``M`` n-gram continuations ``c_1..c_L`` of the request's own tokens
(:func:`~medusa_plugin.core.ngram_branches.ngram_continuations`) are further candidate paths under the root. The
child of a node on continuation ``c`` at depth ``d`` carries token ``c[d]`` with the n-gram acceptance of position
``d`` (with a calibration: of the continuations found by a suffix match as long as ``c``'s, which predicts much of
it); if a Medusa child of the same node carries the same token, the two are one node (the larger factor counts),
so a matching prefix is shared. Medusa children continue under n-gram nodes too (head ``d`` drafts depth ``d+1``
whatever the path), and n-gram branches may go deeper than the heads.

The result is a :class:`DynamicTree`: a :class:`~medusa_plugin.core.tree.MedusaTree` whose path entries are *child
slots* (a Medusa node's rank ``r < topk``; an n-gram-only node ``topk + j``, ``j`` its continuation's index) plus the
explicit node tokens, so ``core.acceptance`` verifies it unchanged (greedy stays exact; tree sampling stays lossless
because the children do not depend on the target's draws).
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .acceptance_model import ContextGrams, NodeAcceptanceModel
from .calibration import AcceptanceCalibration
from .ngram_branches import ngram_continuations, ngram_matches
from .successor_prior import SuccessorCounts
from .tree import MedusaTree

__all__ = ["DynamicTreeError", "DynamicTree", "DynamicTreeSpec", "NodeStream", "select_nodes", "iter_nodes",
           "build_dynamic_tree", "dynamic_node_stream", "restrict_tree", "lattice_size", "observe_step",
           "draw_dynamic_tree"]


class DynamicTreeError(ValueError):
    """Bad dynamic-tree parameters or inputs; the message names the parameter and the fix."""


@dataclass(frozen=True)
class DynamicTree:
    """One request's tree for one step (``N`` nodes, node 0 = root).

    Attributes:
        tree: MedusaTree over child-slot paths (``topk + num_branches`` slots per node), node order as always.
        tokens: ``[N+1]`` int64, node tokens; ``tokens[0]`` is the root (last emitted token).
        head: ``[N+1]`` int64, the head that drafted the node (``depth - 1``), -1 for the root and n-gram-only nodes.
        head_prob: ``[N+1]`` float64, that head's (uncalibrated) probability of the token, 0 where ``head < 0``.
        ngram_position: ``[N+1]`` int64, ``depth - 1`` if the node lies on an n-gram continuation, else -1.
        off_path: ``[N+1]`` bool, the node's parent is off the top path (the root and rank 0 of every head above it
            are the top path), so its head factor came from the off-path calibration.
        score: ``[N+1]`` float64 path score (``score[0] = 1``); ``score.sum()`` is the expected tokens per step under
            the model's independence assumption.
        level: ``[N+1]`` int64 successor level of each Medusa node (:mod:`~medusa_plugin.core.successor_prior`),
            -1 elsewhere; None when the tree was built without successor counts.
        ngram_match: ``[N+1]`` int64, for nodes on an n-gram continuation the length of the suffix match that found
            it (the first continuation through the node), -1 elsewhere; None for trees built without it.
    """

    tree: MedusaTree
    tokens: Tensor
    head: Tensor
    head_prob: Tensor
    ngram_position: Tensor
    score: Tensor
    off_path: Tensor
    level: Tensor | None = None
    ngram_match: Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return self.tree.num_nodes


def restrict_tree(dt: DynamicTree, keep: Sequence[int]) -> DynamicTree | None:
    """The sub-tree of ``dt`` made of the nodes ``keep`` (indices >= 1, ancestor-closed, e.g. from
    :func:`~medusa_plugin.core.node_allocation.allocate_nodes`), or None when ``keep`` is empty. Node order is kept
    (a subset of a node order, sorted the same way, is the sub-tree's node order).

    Raises:
        DynamicTreeError: an index out of range, the root, or a node whose parent is not kept.
    """
    kept = sorted(set(int(i) for i in keep))
    if not kept:
        return None
    if kept[0] < 1 or kept[-1] > dt.num_nodes:
        raise DynamicTreeError(f"kept nodes must be in 1..{dt.num_nodes}, got {kept}")
    parent = dt.tree.parent.tolist()
    have = set(kept) | {0}
    orphans = [i for i in kept if parent[i] not in have]
    if orphans:
        raise DynamicTreeError(f"kept nodes {orphans} lack their parent: the kept set must be ancestor-closed")
    if len(kept) == dt.num_nodes:
        return dt
    idx = torch.tensor([0] + kept, dtype=torch.int64)
    tree = MedusaTree.from_choices([dt.tree.choices[i - 1] for i in kept], topk=dt.tree.topk)
    return DynamicTree(tree, dt.tokens[idx], dt.head[idx], dt.head_prob[idx], dt.ngram_position[idx],
                       dt.score[idx], dt.off_path[idx], None if dt.level is None else dt.level[idx],
                       None if dt.ngram_match is None else dt.ngram_match[idx])


def lattice_size(num_heads: int, topk: int) -> int:
    """Nodes of the full top-k lattice of ``num_heads`` heads: ``sum_{d=1..K} topk**d``."""
    return sum(topk ** d for d in range(1, num_heads + 1))


def select_nodes(factors: Sequence[Sequence[float]], tokens: Sequence[Sequence[int]], budget: int,
                 **options) -> list[dict]:
    """The ``budget`` best nodes by path score (best-first over the lattice plus n-gram branches): the first
    ``budget`` of :func:`iter_nodes` (``options``: its keyword arguments), fewer only if the candidates run out.

    Raises:
        DynamicTreeError: ``budget < 1``, or as :func:`iter_nodes`.
    """
    if budget < 1:
        raise DynamicTreeError(f"budget must be >= 1, got {budget}")
    return list(itertools.islice(iter_nodes(factors, tokens, **options), budget))


def iter_nodes(factors: Sequence[Sequence[float]], tokens: Sequence[Sequence[int]], *,
               continuations: Sequence[Sequence[int]] = (),
               ngram_factors: Sequence[float] | Sequence[Sequence[float]] = (),
               off_factors: Sequence[Sequence[float]] | None = None,
               rescore: Callable[[int | None, int, int, bool, int], tuple[float, int]] | None = None,
               context: Sequence[int] = (),
               score_children: Callable[[int, bool, Sequence[int]], tuple[list, list]] | None = None
               ) -> Iterator[dict]:
    """The nodes by path score, best first, one at a time for as long as the caller asks (best-first over the
    lattice plus n-gram branches). A node's children are scored only when the node after it is asked for, so a
    caller that stops after ``n`` nodes pays for ``n`` expansions (:func:`select_nodes`,
    :func:`~medusa_plugin.core.node_allocation.allocate_streams`).

    Args:
        factors: ``[K][topk]`` acceptance estimate of head ``k``'s rank ``r`` (each in [0, 1]).
        tokens: ``[K][topk]`` the token of head ``k``'s rank ``r`` (distinct within a head).
        continuations: n-gram continuations (token lists) under the root.
        ngram_factors: acceptance of an n-gram node at depth ``d+1`` is ``ngram_factors[min(d, len - 1)]``; or one
            such list per continuation (a node on several continuations takes the largest factor).
        off_factors: ``[K][topk]`` the head factors for children of nodes off the top path (default ``factors``);
            the top path is the root and the chain of rank-0 Medusa nodes under it.
        rescore: ``(prev2, prev1, head, off, token) -> (multiplier, level)`` for a Medusa child after the tokens
            ``prev2, prev1`` (its grandparent's and parent's; ``prev2`` None when unknown): the head factor is
            multiplied (capped at 1) and ``level`` recorded (:mod:`~medusa_plugin.core.successor_prior`).
        context: the request's last tokens up to the root (the root last), for ``rescore`` (the last 2) and
            ``score_children`` (the last 4).
        score_children: ``(head, top, prev) -> (factors, levels)``: the acceptance factor (in [0, 1]) and successor
            level of each rank of ``head`` under a parent whose path is the top path (``top``) or not, ``prev`` the
            last (up to 4) tokens of the context and the path
            (:meth:`~medusa_plugin.core.acceptance_model.NodeAcceptanceModel.scorer`); replaces ``factors`` /
            ``off_factors`` / ``rescore`` for Medusa nodes.
    Returns:
        an iterator of dicts in selection order (best first; parents before children), each with ``slots`` (tuple,
        the child-slot path), ``tokens`` (tuple), ``score``, ``head`` (-1: n-gram only), ``ngram`` (-1 or depth -
        1), ``off`` (the parent is off the top path), ``level`` (``rescore``'s level, -1 without it), ``conts``
        (indices of the continuations through the node).
    Raises:
        DynamicTreeError: a factor outside [0, 1] (checked at the call, before the first node is drawn).
    """
    k_heads = len(factors)
    topk = len(factors[0]) if k_heads else 0
    off_factors = factors if off_factors is None else off_factors
    for row in list(factors) + list(off_factors):
        if any(not 0.0 <= f <= 1.0 for f in row):
            raise DynamicTreeError("head acceptance factors must lie in [0, 1] (probabilities)")
    if continuations and not ngram_factors:
        raise DynamicTreeError("n-gram continuations need ngram_factors")
    per_cont = bool(ngram_factors) and isinstance(ngram_factors[0], Sequence)
    if per_cont and len(ngram_factors) != len(continuations):
        raise DynamicTreeError(f"{len(ngram_factors)} lists of n-gram factors for {len(continuations)} continuations: "
                               "give one per continuation (or one list for all)")
    raw = [list(f) for f in ngram_factors] if per_cont else [list(ngram_factors)]
    if any(not all(0.0 <= g <= 1.0 for g in f) for f in raw) or (per_cont and not all(raw)):
        raise DynamicTreeError("n-gram acceptance factors must lie in [0, 1]")
    ngram_factors = raw if per_cont else raw * len(continuations)
    return _best_first(factors, off_factors, tokens, k_heads, topk, [list(c) for c in continuations], ngram_factors,
                       rescore, [int(t) for t in context[-4:]], score_children)


def _best_first(factors, off_factors, tokens, k_heads, topk, conts, ngram_factors, rescore, ctx4, score_children
                ) -> Iterator[dict]:
    ctx = ctx4[-2:]
    # heap entries: (-score, depth, slots, tokens, head, ngram, off, top, conts_on_path, level, siblings, index,
    # parent on the top path); (score, depth, slots) is unique, so the rest is never compared
    heap: list = []

    def push_children(score: float, slots: tuple, toks: tuple, on: tuple, top: bool) -> None:
        d = len(slots)
        kids: dict[int, list] = {}  # token -> [factor, slot, head, ngram, conts, level]
        table = factors if top else off_factors
        if d < k_heads:
            if score_children is not None:
                fs, lvs = score_children(d, top, (ctx4 + list(toks))[-4:])
                for r in range(topk):
                    kids[tokens[d][r]] = [min(1.0, max(0.0, fs[r])), r, d, -1, (), lvs[r]]
            elif rescore is not None and (toks or ctx):
                prev = (ctx + list(toks))[-2:]
                p2, p1 = (prev[0] if len(prev) == 2 else None), prev[-1]
                for r in range(topk):
                    m, lv = rescore(p2, p1, d, not top, tokens[d][r])
                    kids[tokens[d][r]] = [min(1.0, table[d][r] * m), r, d, -1, (), lv]
            else:
                for r in range(topk):
                    kids[tokens[d][r]] = [table[d][r], r, d, -1, (), -1]
        for j in on:
            c = conts[j]
            if d >= len(c):
                continue
            gj = ngram_factors[j]
            g = gj[min(d, len(gj) - 1)]
            kid = kids.get(c[d])
            if kid is None:
                kids[c[d]] = [g, topk + j, -1, d, (j,), -1]
            else:
                kid[0] = max(kid[0], g)
                kid[3] = d
                kid[4] = kid[4] + (j,)
        # Children enter the heap one at a time, best first (by the heap's own key: score, then slot): a sibling is
        # pushed when the one before it is popped, so the heap holds a few entries, not every scored child.
        sibs = sorted((-(score * f), slot, tok, head, ng, c_on, lv)
                      for tok, (f, slot, head, ng, c_on, lv) in kids.items())
        if sibs:
            push_sibling(sibs, 0, slots, toks, top)

    def push_sibling(sibs: list, i: int, slots: tuple, toks: tuple, top: bool) -> None:
        neg, slot, tok, head, ng, c_on, lv = sibs[i]
        heapq.heappush(heap, (neg, len(slots) + 1, slots + (slot,), toks + (tok,), head, ng, not top,
                              top and slot == 0, c_on, lv, sibs, i, top))

    push_children(1.0, (), (), tuple(range(len(conts))), True)
    while heap:
        neg, _, slots, toks, head, ng, off, top, on, lv, sibs, i, parent_top = heapq.heappop(heap)
        if i + 1 < len(sibs):
            push_sibling(sibs, i + 1, slots[:-1], toks[:-1], parent_top)
        # the children are scored only if the caller asks for another node (the last one's never are)
        yield {"slots": slots, "tokens": toks, "score": -neg, "head": head, "ngram": ng, "off": off, "level": lv,
               "conts": on}
        push_children(-neg, slots, toks, on, top)


def build_dynamic_tree(root_token: int, top_probs: Tensor, top_ids: Tensor, budget: int, *,
                       calibration: AcceptanceCalibration | None = None,
                       continuations: Sequence[Sequence[int]] = (), num_branches: int | None = None,
                       successors: SuccessorCounts | None = None, prev_token: int | None = None,
                       acceptance_model: NodeAcceptanceModel | None = None,
                       context: Sequence[int] | None = None,
                       continuation_matches: Sequence[int] | None = None) -> DynamicTree:
    """One request's dynamic (or hybrid) tree.

    Args:
        root_token: the last emitted token.
        top_probs: ``[K, topk]`` float, each head's top-k probabilities (best first).
        top_ids: ``[K, topk]`` int64, their token ids.
        budget: ``N`` nodes.
        calibration: maps head probabilities to acceptance (and gives the n-gram rates); None: raw probabilities and
            an n-gram acceptance of 0.5 per position.
        continuations: n-gram continuations (token lists) to merge in.
        num_branches: slots reserved for n-gram branches (``M``; default ``len(continuations)``), so every tree of a
            configuration has the same slot width ``topk + M``.
        successors: token n-gram counts of the target's text: each Medusa node's factor is multiplied by the
            calibration's multiplier of its successor level (:meth:`AcceptanceCalibration.level_multiplier`; 1
            without a calibration) and the level recorded in :attr:`DynamicTree.level`.
        prev_token: the token before the root (the trigram context of depth-1 nodes), if any.
        acceptance_model: a learned node-acceptance model (:mod:`~medusa_plugin.core.acceptance_model`): it gives
            every Medusa node's factor instead of the calibration and the successor multipliers (the calibration
            still gives the n-gram rates).
        context: the request's tokens so far (prompt + output, ending with the root), for ``acceptance_model``
            (default: ``[prev_token, root_token]``).
        continuation_matches: per continuation, the length of the suffix match that found it
            (:func:`~medusa_plugin.core.ngram_branches.ngram_matches`): with a calibration each continuation's nodes
            get the rates of its match length (``ngram_acceptance(match=n)``), and the tree records it
            (:attr:`DynamicTree.ngram_match`).
    Returns:
        :class:`DynamicTree` with ``min(N, candidates)`` nodes.
    Raises:
        DynamicTreeError: shapes that do not match, ``budget < 1``, an acceptance model for other heads or fitted
            with successor counts but given none.
    """
    if budget < 1:
        raise DynamicTreeError(f"budget must be >= 1, got {budget}")
    return dynamic_node_stream(root_token, top_probs, top_ids, calibration=calibration, continuations=continuations,
                               num_branches=num_branches, successors=successors, prev_token=prev_token,
                               acceptance_model=acceptance_model, context=context,
                               continuation_matches=continuation_matches).take(budget).tree(allow_empty=True)


def dynamic_node_stream(root_token: int, top_probs: Tensor, top_ids: Tensor, *,
                        calibration: AcceptanceCalibration | None = None,
                        continuations: Sequence[Sequence[int]] = (), num_branches: int | None = None,
                        successors: SuccessorCounts | None = None, prev_token: int | None = None,
                        acceptance_model: NodeAcceptanceModel | None = None,
                        context: Sequence[int] | None = None,
                        continuation_matches: Sequence[int] | None = None) -> "NodeStream":
    """The nodes of :func:`build_dynamic_tree` (same arguments, no budget) as a :class:`NodeStream`: drawn on demand,
    best first. Raises as :func:`build_dynamic_tree`."""
    if top_probs.dim() != 2 or top_ids.shape != top_probs.shape:
        raise DynamicTreeError(f"top_probs and top_ids must both be [K, topk], got {tuple(top_probs.shape)} and "
                               f"{tuple(top_ids.shape)}")
    k_heads, topk = top_probs.shape
    m = len(continuations) if num_branches is None else int(num_branches)
    if len(continuations) > m:
        raise DynamicTreeError(f"{len(continuations)} continuations but only {m} branch slots")
    if continuation_matches is not None and len(continuation_matches) != len(continuations):
        raise DynamicTreeError(f"{len(continuation_matches)} match lengths for {len(continuations)} continuations")
    if acceptance_model is not None:  # it scores every Medusa node: the calibration gives the n-gram rates only
        factors, off_factors = top_probs.to(torch.float64).clamp(0.0, 1.0).tolist(), None
        ngram_factors = calibration.ngram_acceptance() if calibration is not None else [0.5]
    elif calibration is not None:
        factors = calibration.head_acceptance(top_probs).tolist()
        off_factors = calibration.head_acceptance(top_probs, off_path=True).tolist()
        ngram_factors = calibration.ngram_acceptance()
    else:
        factors, ngram_factors = top_probs.to(torch.float64).clamp(0.0, 1.0).tolist(), [0.5]
        off_factors = None
    if calibration is not None and continuation_matches is not None and continuations:
        ngram_factors = [calibration.ngram_acceptance(match=int(n)) for n in continuation_matches]
    probs = top_probs.to(torch.float64).tolist()
    rescore = None
    if successors is not None and acceptance_model is None:
        mult = calibration.level_multipliers() if calibration is not None else None
        k_all = calibration.num_heads if calibration is not None else k_heads

        def rescore(p2, p1, head, off, token):
            lv = successors.level(p2, p1, token)
            return (1.0 if mult is None else mult[head + k_all * off][lv]), lv
    last = [int(root_token)] if prev_token is None else [int(prev_token), int(root_token)]
    score_children = None
    ids = top_ids.tolist()
    if acceptance_model is not None:
        if acceptance_model.num_heads != k_heads:
            raise DynamicTreeError(f"the acceptance model was fitted for {acceptance_model.num_heads} heads, the tree "
                                   f"uses {k_heads}: refit it for these heads (medusa-plugin fit-acceptance)")
        if successors is None and acceptance_model.uses_successors:
            raise DynamicTreeError("the acceptance model reads successor levels: pass the successor counts it was "
                                   "fitted with (successors.safetensors)")
        if context is not None and len(context) > 0:
            last = [int(t) for t in context[-4:]]
        grams = ContextGrams(last if context is None or len(context) == 0 else context)
        # a model fitted without successor levels never saw them: keep its level columns empty
        score_children = acceptance_model.scorer(probs, ids, grams,
                                                 successors if acceptance_model.uses_successors else None)
    return NodeStream(root_token, iter_nodes(factors, ids, continuations=continuations, ngram_factors=ngram_factors,
                                             off_factors=off_factors, rescore=rescore, context=last,
                                             score_children=score_children),
                      topk + m, probs, successors is not None,
                      None if continuation_matches is None else [int(n) for n in continuation_matches])


class NodeStream:
    """One request's dynamic-tree nodes drawn one at a time, best first (:func:`iter_nodes`), and the tree of those
    drawn: what :func:`build_dynamic_tree` builds with ``budget`` draws, and what the node allocation draws from
    lazily (:func:`~medusa_plugin.core.node_allocation.allocate_streams`), so the nodes no step will verify are never
    scored. Made by :func:`dynamic_node_stream` or :meth:`DynamicTreeSpec.streams_from_topk`.
    """

    def __init__(self, root_token: int, nodes: Iterator[dict], slots: int, probs: list, with_level: bool,
                 matches: list[int] | None = None) -> None:
        self.root_token = int(root_token)
        self.nodes: list[dict] = []  # drawn, best first
        self._it, self._slots, self._probs, self._with_level = nodes, slots, probs, with_level
        self._matches = matches
        self._next: dict | None = None
        self._done = False

    def peek(self) -> float | None:
        """Path score of the next node (scores its parent's children if needed), None when there is none."""
        if self._next is None and not self._done:
            self._next = next(self._it, None)
            self._done = self._next is None
        return None if self._next is None else self._next["score"]

    def pop(self) -> float:
        """Draw the next node; returns its score. Raises IndexError when there is none (see :meth:`peek`)."""
        if self.peek() is None:
            raise IndexError("no node left in this dynamic tree's lattice")
        node, self._next = self._next, None
        self.nodes.append(node)
        return node["score"]

    def take(self, n: int) -> "NodeStream":
        """Draw up to ``n`` more nodes (fewer when the lattice runs out); returns self."""
        for _ in range(n):
            if self.peek() is None:
                break
            self.pop()
        return self

    def tree(self, n: int | None = None, allow_empty: bool = False) -> DynamicTree | None:
        """The :class:`DynamicTree` of the first ``n`` nodes (default: those drawn so far; more are drawn if needed,
        fewer where the lattice runs out), ancestor-closed since they come best first; None when it would have no
        node (unless ``allow_empty``)."""
        if n is not None and n > len(self.nodes):
            self.take(n - len(self.nodes))
        nodes = self.nodes if n is None else self.nodes[:n]
        if not nodes and not allow_empty:
            return None
        return _assemble(self.root_token, nodes, self._slots, self._probs, self._with_level, self._matches)


def _assemble(root_token: int, nodes: list[dict], slots: int, probs: list, with_level: bool,
              matches: list[int] | None = None) -> DynamicTree:
    """The :class:`DynamicTree` of ``nodes`` (:func:`select_nodes` dicts) under ``root_token``, in node order."""
    tree = MedusaTree.from_choices([n["slots"] for n in nodes], topk=slots)
    index = {n["slots"]: n for n in nodes}
    n1 = tree.num_nodes + 1
    tokens = [int(root_token)] + [0] * tree.num_nodes
    head = [-1] * n1
    head_prob = [0.0] * n1
    ngram = [-1] * n1
    score = [1.0] * n1
    off = [False] * n1
    level = [-1] * n1
    match = [-1] * n1
    for i, path in enumerate(tree.choices, start=1):
        node = index[path]
        if matches is not None and node["ngram"] >= 0 and node["conts"]:
            match[i] = matches[node["conts"][0]]
        tokens[i] = node["tokens"][-1]
        head[i] = node["head"]
        if node["head"] >= 0:
            head_prob[i] = probs[node["head"]][path[-1]]
        ngram[i] = node["ngram"]
        score[i] = node["score"]
        off[i] = node["off"]
        level[i] = node["level"]
    return DynamicTree(tree, torch.tensor(tokens, dtype=torch.int64), torch.tensor(head, dtype=torch.int64),
                       torch.tensor(head_prob, dtype=torch.float64), torch.tensor(ngram, dtype=torch.int64),
                       torch.tensor(score, dtype=torch.float64), torch.tensor(off, dtype=torch.bool),
                       torch.tensor(level, dtype=torch.int64) if with_level else None,
                       torch.tensor(match, dtype=torch.int64) if matches is not None else None)


@dataclass(frozen=True)
class DynamicTreeSpec:
    """The settings of ``tree: dynamic``: budget ``N``, ranks per head, and the n-gram branches.

    Attributes:
        budget: nodes per tree (``N``, the draft tokens per request and step).
        topk: ranks per head the lattice uses.
        num_heads: heads used (the lattice depth); None: every head the checkpoint has.
        ngram_branches: ``M``, n-gram continuations merged in (0: pure dynamic tree).
        ngram_min_n, ngram_max_n, ngram_length: the prompt-lookup rule (vLLM's ``prompt_lookup_min`` / ``max`` and
            ``num_speculative_tokens``).
    Raises:
        DynamicTreeError: a value out of range, or a budget larger than the lattice.
    """

    budget: int
    topk: int = 10
    num_heads: int | None = None
    ngram_branches: int = 0
    ngram_min_n: int = 2
    ngram_max_n: int = 4
    ngram_length: int = 4

    def __post_init__(self) -> None:
        for name in ("budget", "topk", "num_heads"):
            v = getattr(self, name)
            if name == "num_heads" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DynamicTreeError(f"dynamic tree {name} must be an integer >= 1, got {v!r}")
        if self.num_heads is not None:
            self.check_heads(self.num_heads)
        ngram_continuations([], self.ngram_branches, min_n=self.ngram_min_n, max_n=self.ngram_max_n,
                            length=self.ngram_length)  # parameter checks

    def check_heads(self, num_heads: int) -> None:
        """Raise DynamicTreeError if ``num_heads`` heads x top-``topk`` ranks hold fewer nodes than the budget."""
        if self.budget > lattice_size(num_heads, self.topk):
            raise DynamicTreeError(
                f"dynamic tree budget {self.budget} exceeds the {lattice_size(num_heads, self.topk)} nodes of "
                f"{num_heads} heads x top-{self.topk}: lower the budget or raise topk")

    def max_depth(self, num_heads: int) -> int:
        """Deepest node a tree can have with ``num_heads`` heads (n-gram branches may go deeper than the heads)."""
        k = self.num_heads or num_heads
        return max(k, self.ngram_length if self.ngram_branches else 0)

    @property
    def num_nodes(self) -> int:
        """Nodes per tree (the budget): vLLM's ``num_speculative_tokens``."""
        return self.budget

    @property
    def slots(self) -> int:
        """Child slots per node: ``topk + ngram_branches``."""
        return self.topk + self.ngram_branches

    def build(self, root_tokens: Tensor, head_logits: Tensor, contexts: Sequence[Sequence[int]] | None = None, *,
              calibration: AcceptanceCalibration | None = None, successors: SuccessorCounts | None = None,
              acceptance_model: NodeAcceptanceModel | None = None) -> list[DynamicTree]:
        """One tree per request.

        Args:
            root_tokens: ``[B]`` int64, each request's last emitted token.
            head_logits: ``[B, K, V]`` float Medusa head logits (``-inf`` outside a draft vocabulary); ``K >=
                num_heads``, extra heads are ignored (all K are used when ``num_heads`` is None).
            contexts: per request, its tokens so far (prompt + output, ending with the root); required when
                ``ngram_branches > 0``.
            calibration, successors: see :func:`build_dynamic_tree` (the token before each root comes from
                ``contexts`` when given).
            acceptance_model: see :func:`build_dynamic_tree`; needs ``contexts``.
        Returns:
            ``list[DynamicTree]`` of length B, each with exactly ``budget`` nodes.
        Raises:
            DynamicTreeError: too few heads or ranks, missing contexts.
        """
        # the head count and the rest are checked by build_from_topk
        if head_logits.dim() != 3 or head_logits.shape[2] < self.topk:
            raise DynamicTreeError(f"head_logits must be [B, K, V >= topk={self.topk}], got "
                                   f"{tuple(head_logits.shape)}")
        top = head_logits[:, :self.num_heads].float().softmax(-1).topk(self.topk, dim=-1)
        return self.build_from_topk(root_tokens, top.values, top.indices, contexts, calibration=calibration,
                                    successors=successors, acceptance_model=acceptance_model)

    def build_from_topk(self, root_tokens: Tensor, probs: Tensor, ids: Tensor,
                        contexts: Sequence[Sequence[int]] | None = None, *,
                        calibration: AcceptanceCalibration | None = None,
                        successors: SuccessorCounts | None = None,
                        acceptance_model: NodeAcceptanceModel | None = None) -> list[DynamicTree]:
        """:meth:`build` from each head's top-``topk`` already taken (``MedusaHeads.draft_topk_probs``, which never
        builds the ``[B, K, V]`` logits): ``probs`` ``[B, K, >= topk]`` float probabilities, best first, ``ids`` the
        same shape int64 token ids. Same trees as :meth:`build` on the logits they come from.

        Raises:
            DynamicTreeError: too few heads or ranks, missing contexts.
        """
        return [s.take(self.budget).tree(allow_empty=True) for s in self.streams_from_topk(
            root_tokens, probs, ids, contexts, calibration=calibration, successors=successors,
            acceptance_model=acceptance_model)]

    def streams_from_topk(self, root_tokens: Tensor, probs: Tensor, ids: Tensor,
                          contexts: Sequence[Sequence[int]] | None = None, *,
                          calibration: AcceptanceCalibration | None = None,
                          successors: SuccessorCounts | None = None,
                          acceptance_model: NodeAcceptanceModel | None = None) -> list["NodeStream"]:
        """:meth:`build_from_topk` with the nodes left undrawn: one :class:`NodeStream` per request (its first
        ``budget`` draws are that request's tree). Raises as :meth:`build_from_topk`."""
        if probs.dim() != 3 or probs.shape != ids.shape or probs.shape[1] < (self.num_heads or 1):
            raise DynamicTreeError(f"probs and ids must both be [B, K >= {self.num_heads or 1}, topk], got "
                                   f"{tuple(probs.shape)} and {tuple(ids.shape)}")
        k = self.num_heads or probs.shape[1]
        self.check_heads(k)
        if probs.shape[2] < self.topk:
            raise DynamicTreeError(f"topk={self.topk} exceeds the ranks given ({probs.shape[2]})")
        if (self.ngram_branches or acceptance_model is not None) and contexts is None:
            raise DynamicTreeError("n-gram branches and an acceptance model need each request's tokens (contexts)")
        if contexts is not None and len(contexts) != probs.shape[0]:
            raise DynamicTreeError(f"{len(contexts)} contexts for {probs.shape[0]} requests: give one per request")
        values, ids = probs[:, :k, :self.topk].cpu(), ids[:, :k, :self.topk].cpu()
        roots = root_tokens.tolist()
        out = []
        for b in range(len(roots)):
            found = (ngram_matches(contexts[b], self.ngram_branches, min_n=self.ngram_min_n,
                                   max_n=self.ngram_max_n, length=self.ngram_length)
                     if self.ngram_branches else [])
            conts = [c for c, _ in found]
            prev = int(contexts[b][-2]) if (successors is not None or acceptance_model is not None) \
                and contexts is not None and len(contexts[b]) >= 2 else None
            out.append(dynamic_node_stream(roots[b], values[b], ids[b], calibration=calibration,
                                           continuations=conts, num_branches=self.ngram_branches,
                                           successors=successors, prev_token=prev, acceptance_model=acceptance_model,
                                           context=None if contexts is None else contexts[b],
                                           continuation_matches=[n for _, n in found] if found else None))
        return out

    def describe(self) -> str:
        """One line for ``medusa-plugin validate``."""
        heads = "every head" if self.num_heads is None else f"{self.num_heads} heads"
        text = (f"dynamic: the {self.budget} nodes of highest path probability per request and step, over the "
                f"top-{self.topk} of {heads}")
        if self.ngram_branches:
            text += (f", + up to {self.ngram_branches} n-gram branch(es) of {self.ngram_length} tokens "
                     f"(n = {self.ngram_min_n}..{self.ngram_max_n})")
        return text


def observe_step(calibration: AcceptanceCalibration, trees: Sequence[DynamicTree], path_nodes: Tensor) -> None:
    """Feed one step's outcome to ``calibration``: every node whose parent is on the accepted path, with whether it
    is on it too.

    Args:
        trees: the step's trees (one per request).
        path_nodes: ``[B, W]`` int64 accepted node indices per request, root first, -1 padded
            (``AcceptanceResult.path_nodes``).
    """
    heads, probs, acc, ngram, off, level, match = [], [], [], [], [], [], []
    rows = path_nodes.cpu().numpy()
    for t, row in zip(trees, rows):  # numpy: a few microseconds per tree (this runs every step)
        on = np.zeros(t.tree.num_nodes + 1, dtype=bool)
        on[row[row >= 0]] = True
        seen = on[np.maximum(t.tree.parent.numpy(), 0)]
        seen[0] = False
        heads.append(t.head.numpy()[seen])
        probs.append(t.head_prob.numpy()[seen])
        acc.append(on[seen])
        ngram.append(t.ngram_position.numpy()[seen])
        off.append(t.off_path.numpy()[seen])
        level.append(t.level.numpy()[seen] if t.level is not None else np.full(int(seen.sum()), -1, dtype=np.int64))
        match.append(t.ngram_match.numpy()[seen] if t.ngram_match is not None
                     else np.full(int(seen.sum()), -1, dtype=np.int64))
    calibration.observe(*(torch.from_numpy(np.concatenate(x)) for x in (heads, probs, acc)),
                        off_path=torch.from_numpy(np.concatenate(off)),
                        ngram_position=torch.from_numpy(np.concatenate(ngram)),
                        level=torch.from_numpy(np.concatenate(level)),
                        ngram_match=torch.from_numpy(np.concatenate(match)))


def draw_dynamic_tree(dt: DynamicTree, decode=None) -> str:
    """An ASCII drawing of one dynamic tree: per node its token (``decode(id) -> str`` if given), path score and
    source (``head k rank r``, ``n-gram``, or both when a branch shares a Medusa node).

    Returns a multi-line string; the first line sums up the tree (nodes, depth, expected tokens per step).
    """
    t = dt.tree
    show = (lambda i: repr(decode(i))) if decode is not None else str
    lines = [f"dynamic tree: {t.num_nodes} nodes, depth {t.max_depth}, nodes per depth {t.nodes_per_depth}, "
             f"expected tokens/step {float(dt.score.sum()):.2f} (sum of path scores)",
             f"root: token {show(int(dt.tokens[0]))}"]

    def walk(node: int, prefix: str) -> None:
        kids = t.children[node]
        for j, c in enumerate(kids):
            last = j == len(kids) - 1
            src = []
            if int(dt.head[c]) >= 0:
                src.append(f"head {int(dt.head[c])} rank {t.choices[c - 1][-1]}, p={float(dt.head_prob[c]):.3f}")
            if int(dt.ngram_position[c]) >= 0:
                src.append("n-gram")
            lines.append(f"{prefix}{'└── ' if last else '├── '}{show(int(dt.tokens[c]))}  "
                         f"score {float(dt.score[c]):.3f}  ({'; '.join(src)})")
            walk(c, prefix + ("    " if last else "│   "))

    walk(0, "")
    return "\n".join(lines)
