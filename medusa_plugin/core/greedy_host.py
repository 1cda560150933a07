"""Greedy verification of one engine step on the host (numpy): from the target's argmax per logit row and the
step's draft tokens to the accepted paths, each request's next hidden-state row and the engine's output rows.

The same results as :func:`~medusa_plugin.core.tree_batch.gather_tree_inputs` +
:func:`~medusa_plugin.core.acceptance.greedy_accept_targets` (or
:func:`~medusa_plugin.core.tree_list.greedy_accept_targets_each`) + :func:`~.tree_batch.sample_rows` +
:func:`~.tree_batch.output_rows`, which the tests check. Why a second implementation: at batch 1 those are some 40
PyTorch calls on tensors of a few elements, about 1 ms of dispatch on a 2-core CPU (2 % of a 48 ms plain step of
SmolLM2-135M), while the same work in numpy takes tens of microseconds. A GPU step pays one device-to-host copy of
the ``[T]`` argmax ids (the acceptance length is needed on the host anyway, for the KV compaction).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from .acceptance import AcceptanceResult
from .tree import MedusaTree

__all__ = ["GreedyStep", "greedy_step_host"]


class GreedyStep(NamedTuple):
    result: AcceptanceResult  # CPU tensors, as core.acceptance returns them
    sample_rows: np.ndarray   # [B] int64: logit row of each request's last accepted token (its only row otherwise)
    output: np.ndarray        # [B, width] int32: [accepted tokens..., bonus] per tree request, -1 padded


def _accept_rows(tree: MedusaTree, tokens: np.ndarray, target: np.ndarray, valid: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Rows verified against one tree (``valid [R, >= N+1]``: the node exists): (last accepted node [R], path nodes
    [R, D+1] root first, -1 padded)."""
    h = tree.host_index
    n1 = tree.num_nodes + 1
    ok = tokens[:, :n1] == target[:, h["parent"]]
    ok[:, 0] = True
    ok &= valid[:, :n1]
    accepted = ((~ok).view(np.int8).astype(np.int32) @ h["ancestor_t"]) == 0  # ok at the node and every ancestor
    last = np.where(accepted, h["depth"], -1).argmax(1)                          # first deepest = first in node order
    return last, h["node_paths"][last]


# Up to this many tree requests a step is verified by walking each tree in Python (:func:`_walk_step`): measured in
# a bf16 SmolLM2-135M engine at batch 1 on a 2-core EPYC, the numpy path took 0.14 ms per step (its ~30 numpy calls
# run with cold caches right after the forward; 0.023 ms in a loop) and the walk far less. Same results.
WALK_MAX_ROWS = 2


def _walk_step(trees, target, draft_token_ids, logit_start, rows, draft_start, num_valid, width) -> GreedyStep:
    """:func:`greedy_step_host` for few requests, in plain Python: from the root, every child whose draft token equals
    the target's argmax at its parent is accepted; the request's last node is the first deepest accepted one (node
    order), as in the numpy path."""
    r = rows.size
    shared = isinstance(trees, MedusaTree)
    tgt_all, drafts = target.tolist(), draft_token_ids.tolist()
    starts, nvalid = logit_start.tolist(), num_valid.tolist()
    lasts, plist = [], []
    for i, row in enumerate(rows.tolist()):
        tree = trees if shared else trees[i]
        children, depth = tree.host_children, tree.host_index["depth"]
        t0, d0, nv = starts[row], int(draft_start[i]) - 1, nvalid[i]
        last, best, stack = 0, 0, [0]
        while stack:
            node = stack.pop()
            want = tgt_all[t0 + node]
            for c in children[node]:
                if c < nv and drafts[d0 + c] == want:
                    stack.append(c)
                    dc = int(depth[c])
                    if dc > best or (dc == best and c < last):
                        last, best = c, dc
        lasts.append(last)
        plist.append(tree.host_index["node_paths"][last])
    wide = max(p.shape[0] for p in plist) if not shared else plist[0].shape[0]
    paths = np.full((r, wide), -1, dtype=np.int64)
    out = np.full((r, wide), -1, dtype=np.int64)
    sample = logit_start.astype(np.int64)  # a copy
    output = np.full((logit_start.size, width), -1, dtype=np.int32)
    accept_len = np.empty(r, dtype=np.int64)
    bonus = np.empty(r, dtype=np.int64)
    for i, row in enumerate(rows.tolist()):
        p, last = plist[i], lasts[i]
        paths[i, : p.shape[0]] = p
        d = int((p >= 0).sum()) - 1  # the depth of the last accepted node
        accept_len[i] = d
        d0 = int(draft_start[i]) - 1
        toks = [drafts[d0 + int(n)] for n in p[1: d + 1]] + [tgt_all[starts[row] + last]]
        bonus[i] = toks[-1]
        out[i, : d + 1] = toks
        sample[row] += last
        c = min(wide, width)
        output[row, :c] = out[i, :c]
    t = torch.from_numpy
    return GreedyStep(AcceptanceResult(t(accept_len), t(paths), t(out), t(bonus), t(np.asarray(lasts, dtype=np.int64))),
                      sample, output)


def greedy_step_host(trees: MedusaTree | Sequence[MedusaTree], target: np.ndarray, draft_token_ids: np.ndarray,
                     logit_start: np.ndarray, rows: np.ndarray, draft_start: np.ndarray, num_valid: np.ndarray,
                     num_nodes: int, width: int) -> GreedyStep:
    """Greedy (exact) verification of a step's tree requests.

    Args:
        trees: one tree for every tree request, or ``R`` trees (one per tree request, up to ``num_nodes`` nodes).
        target: ``[T]`` int, the target's argmax of every logit row of the step (``1 + drafts`` rows per request,
            request-major).
        draft_token_ids: ``[T_d]`` int, every request's drafts end to end.
        logit_start: ``[B]`` int64, first logit row of every request of the step.
        rows: ``[R]`` int64, batch rows of the tree requests (R >= 1). draft_start: ``[R]`` int64, offset of their
            first draft in ``draft_token_ids``. num_valid: ``[R]`` int64, ``1 + drafts`` each (2..N+1).
        num_nodes: ``N``. width: columns of the output (``1 + the step's most drafts``).
    Returns:
        :class:`GreedyStep`; ``result`` has width ``max depth + 1`` (-1 padded).
    """
    if rows.size <= WALK_MAX_ROWS:
        return _walk_step(trees, target, draft_token_ids, logit_start, rows, draft_start, num_valid, width)
    r = rows.size
    node = np.arange(num_nodes + 1)
    last_valid = (num_valid - 1)[:, None]
    clipped = np.minimum(node, last_valid)                                      # [R, N+1] row offsets
    tgt = target[logit_start[rows][:, None] + clipped]
    # node i >= 1 is draft i - 1 (clipped keeps it inside the request's drafts; the root reads draft 0, unused)
    tokens = draft_token_ids[np.maximum(draft_start[:, None] - 1 + clipped, 0)]
    valid = node <= last_valid
    if isinstance(trees, MedusaTree):
        last, paths = _accept_rows(trees, tokens, tgt, valid)
        accept_len = trees.host_index["depth"][last]
    else:
        per = [_accept_rows(t, tokens[i:i + 1], tgt[i:i + 1], valid[i:i + 1]) for i, t in enumerate(trees)]
        last = np.concatenate([p[0] for p in per])
        paths = np.full((r, max(p[1].shape[1] for p in per)), -1, dtype=np.int64)
        for i, (_, p) in enumerate(per):
            paths[i, : p.shape[1]] = p[0]
        accept_len = (paths >= 0).sum(1) - 1
    ar = np.arange(r)
    bonus = tgt[ar, last].astype(np.int64)
    path_tokens = tokens[ar[:, None], np.maximum(paths[:, 1:], 0)].astype(np.int64)  # tokens of p_1..p_D
    out = np.full(paths.shape, -1, dtype=np.int64)
    out[:, :-1] = np.where(np.arange(paths.shape[1] - 1) < accept_len[:, None], path_tokens, -1)
    out[ar, accept_len] = bonus
    sample = logit_start.astype(np.int64)  # a copy
    sample[rows] += last
    output = np.full((logit_start.size, width), -1, dtype=np.int32)
    c = min(out.shape[1], width)
    output[rows, :c] = out[:, :c]
    t = torch.from_numpy
    return GreedyStep(AcceptanceResult(t(accept_len), t(paths), t(out), t(bonus), t(last)), sample, output)
