"""A batch in which every request verifies its own tree (dynamic trees): the per-request tensors the reference
decoder needs and acceptance row by row.

By default every tree of a batch has the same number of nodes ``N`` (a dynamic tree with its full budget) but its
own shape: ``B`` requests, ``N+1`` nodes each, depths up to ``D_b``; ``W = max_b D_b + 1``. With ``num_nodes=N``
the trees may be smaller (a budget shared across the batch: ``core.node_allocation``): tensors are padded to
``N+1`` nodes, and a padded node (never a valid row: a request drafts as many tokens as its tree has nodes) has
depth 0 and sees only itself. Plain PyTorch.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .acceptance import AcceptanceResult, accept, accept_batch, greedy_accept_targets
from .tree import MedusaTree

__all__ = ["TreeListError", "stack_depth", "stack_attn_bias", "stack_ancestor_mask", "accept_each",
           "accept_batch_each", "greedy_accept_targets_each"]


class TreeListError(ValueError):
    """Trees of one batch that do not fit together (different node counts)."""


def _n1(trees: Sequence[MedusaTree], num_nodes: int | None = None) -> int:
    if not trees:
        raise TreeListError("no trees")
    sizes = {t.num_nodes for t in trees}
    if num_nodes is not None:
        if max(sizes) > num_nodes:
            raise TreeListError(f"a tree has {max(sizes)} nodes, more than num_nodes={num_nodes}")
        return num_nodes + 1
    if len(sizes) != 1:
        raise TreeListError(f"the trees of one batch must have the same number of nodes, got {sorted(sizes)}")
    return sizes.pop() + 1


def stack_depth(trees: Sequence[MedusaTree], device=None, num_nodes: int | None = None) -> Tensor:
    """``[B, N+1]`` int64 node depths (positions are ``context_len[b] + depth[b, i]``); ``num_nodes``: see the
    module docstring."""
    n1 = _n1(trees, num_nodes)
    return torch.stack([torch.nn.functional.pad(t.depth, (0, n1 - t.num_nodes - 1)) for t in trees]).to(device)


def stack_attn_bias(trees: Sequence[MedusaTree], dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """``[B, N+1, N+1]`` additive bias per request: 0 where node ``j`` is node ``i`` or its ancestor, else -inf."""
    _n1(trees)
    return torch.stack([t.attn_bias(dtype, device) for t in trees])


def stack_ancestor_mask(trees: Sequence[MedusaTree], device=None, num_nodes: int | None = None) -> Tensor:
    """``[B, N+1, N+1]`` bool ancestor masks (``core.paged_attention`` takes one per request); ``num_nodes``: see
    the module docstring."""
    n1 = _n1(trees, num_nodes)
    out = torch.eye(n1, dtype=torch.bool).repeat(len(trees), 1, 1)
    for b, t in enumerate(trees):
        m = t.num_nodes + 1
        out[b, :m, :m] = t.ancestor_mask
    return out.to(device)


def _stack(parts: Sequence[AcceptanceResult], width: int) -> AcceptanceResult:
    def pad(x: Tensor) -> Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=-1)

    return AcceptanceResult(torch.cat([p.accept_len for p in parts]), torch.cat([pad(p.path_nodes) for p in parts]),
                            torch.cat([pad(p.output_tokens) for p in parts]),
                            torch.cat([p.bonus_token for p in parts]), torch.cat([p.last_node for p in parts]))


def _check_rows(trees: Sequence[MedusaTree], tree_tokens: Tensor, logits: Tensor, num_nodes: int | None = None
                ) -> tuple[int, int]:
    """(B, W = max depth + 1) after checking that ``tree_tokens`` / ``logits`` are ``[B, N+1, ...]``."""
    n1 = _n1(trees, num_nodes)
    b = len(trees)
    if tree_tokens.shape[:2] != (b, n1) or logits.shape[:2] != (b, n1):
        raise TreeListError(f"tree_tokens and logits must be [{b}, {n1}, ...], got {tuple(tree_tokens.shape)} and "
                            f"{tuple(logits.shape)}")
    return b, max(t.max_depth for t in trees) + 1


def accept_batch_each(trees: Sequence[MedusaTree], tree_tokens: Tensor, logits: Tensor, *, temperature: Tensor,
                      sampled_rule: str = "sampling", top_k: Tensor | None = None, top_p: Tensor | None = None,
                      generators=None, num_valid: Tensor | None = None, posterior_threshold: float = 0.09,
                      posterior_alpha: float = 0.3, num_nodes: int | None = None) -> AcceptanceResult:
    """``core.acceptance.accept_batch`` (one engine step) with one tree per row: row ``r`` is verified against
    ``trees[r]`` with its own temperature / top-k / top-p / ``num_valid`` and, if ``generators`` has ``{r: gen}``,
    its own generator. Arguments as there (``[R, ...]`` tensors; ``temperature`` on the CPU); ``num_nodes``: trees
    of up to that many nodes, ``tree_tokens`` / ``logits`` padded to ``[R, num_nodes + 1, ...]`` (module docstring).

    Returns:
        AcceptanceResult of width ``W = max depth + 1`` (-1 padded), rows in input order.
    Raises:
        TreeListError: trees of different sizes or shapes that do not match.
    """
    _, width = _check_rows(trees, tree_tokens, logits, num_nodes)
    parts = []
    for r, t in enumerate(trees):
        def row(x):
            return None if x is None else x[r: r + 1]
        gen = (generators or {}).get(r)
        m = t.num_nodes + 1
        parts.append(accept_batch(t.to(tree_tokens.device), tree_tokens[r: r + 1, :m], logits[r: r + 1, :m],
                                  temperature=temperature[r: r + 1], sampled_rule=sampled_rule, top_k=row(top_k),
                                  top_p=row(top_p), generators=None if gen is None else {0: gen},
                                  num_valid=row(num_valid), posterior_threshold=posterior_threshold,
                                  posterior_alpha=posterior_alpha))
    return _stack(parts, width)


def greedy_accept_targets_each(trees: Sequence[MedusaTree], tree_tokens: Tensor, target: Tensor, *,
                               num_valid: Tensor | None = None, num_nodes: int | None = None) -> AcceptanceResult:
    """``core.acceptance.greedy_accept_targets`` with one tree per row: ``tree_tokens`` / ``target`` ``[R, N+1]``
    int64 (the target's argmax per node; no logits copy), ``num_valid`` ``[R]``; ``num_nodes`` as in
    :func:`accept_batch_each`. Returns an AcceptanceResult of width ``max depth + 1`` (-1 padded)."""
    _, width = _check_rows(trees, tree_tokens, target, num_nodes)
    parts = []
    for r, t in enumerate(trees):
        m = t.num_nodes + 1
        parts.append(greedy_accept_targets(t.to(tree_tokens.device), tree_tokens[r: r + 1, :m],
                                           target[r: r + 1, :m],
                                           num_valid=None if num_valid is None else num_valid[r: r + 1]))
    return _stack(parts, width)


def accept_each(rule: str, trees: Sequence[MedusaTree], tree_tokens: Tensor, logits: Tensor,
                **params) -> AcceptanceResult:
    """``core.acceptance.accept`` for each request with its own tree, results stacked.

    Args:
        rule, params: as ``accept`` (per-row tensors in ``params`` are split by row; scalars are shared; a
            ``generator`` is shared, so rows draw one after the other).
        trees: ``B`` trees with ``N`` nodes each.
        tree_tokens: ``[B, N+1]`` int64; logits: ``[B, N+1, V]``.
    Returns:
        AcceptanceResult with ``path_nodes`` / ``output_tokens`` of width ``W`` (max depth + 1), -1 padded.
    Raises:
        TreeListError: trees of different sizes or a batch size that does not match.
    """
    b, width = _check_rows(trees, tree_tokens, logits)
    parts = []
    for r, t in enumerate(trees):
        kw = {k: (v[r: r + 1] if isinstance(v, Tensor) and v.dim() == 1 and v.shape[0] == b else v)
              for k, v in params.items()}
        parts.append(accept(rule, t.to(tree_tokens.device), tree_tokens[r: r + 1], logits[r: r + 1], **kw))
    return _stack(parts, width)
