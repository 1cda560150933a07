"""The per-step tree state: which requests verify a tree this step, where their rows are, and how they attend.

The runner builds one :class:`TreeStep` in ``_prepare_inputs`` (:func:`plan_step`) when some request verifies a
tree, publishes it for the attention layers (:func:`publish`; they read it through :func:`for_layer`) and clears
the published slot once the forward pass is over (in ``_sample``). The runner keeps its own reference until the
next step's drafts are proposed. Runner and attention run in the same worker process (one per TP rank), so a
module-level slot is enough; there is no cross-process state.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["TreeStep", "TreeStepError", "plan_step", "publish", "for_layer", "clear"]


class TreeStepError(ValueError):
    """The scheduler's step is one in which a Medusa tree cannot be verified."""


@dataclass
class TreeStep:
    """One engine step's tree verification (``B`` requests in the step, ``R`` of them verify a tree, ``M`` tree
    query rows in all, ``N`` tree nodes).

    Read by the attention layers (device tensors):
        tree_reqs: ``[R]`` int64, batch rows of the tree requests.
        token_index: ``[M]`` int64, flat query rows (into the step's ``[num_tokens, ...]`` tensors) of those
            requests, request-major, node order inside a request.
        sub_query_start_loc: ``[R+1]`` int64, offsets of each tree request inside ``token_index``.
        tree_mask: ``[N+1, N+1]`` bool ancestor mask (row i attends tree node j iff ``tree_mask[i, j]``), or
            ``[R, N+1, N+1]`` with one tree per tree request (``tree: dynamic``).
        num_tokens: total scheduled tokens of the step (a sanity check for the reader).
        plans: the attention impl's per-step cache (tree-attention plans shared by the layers).
    Read by the runner:
        token_node: ``[M]`` int64 device, tree node of each row of ``token_index`` (its RoPE position is the root's
            plus ``depth[token_node]``).
        rows: ``[R]`` int64 host copy of ``tree_reqs``.
        num_valid: ``[R]`` int64 host, query rows of each tree request = drafts + 1 (< N+1 if vLLM truncated it).
        query_start: ``[R]`` int64 host, first flat query row (and slot-mapping row) of each tree request.
        logit_start: ``[B]`` int64 host, first logit row of every request (``1 + drafts`` rows each).
        draft_start: ``[R]`` int64 host, offset of each tree request's first draft in the step's draft tokens.
        sample_rows: ``[B]`` int64 device, set by ``_sample``: the logit / hidden-state row of each request's last
            accepted token (read when proposing the next drafts).
    """
    tree_reqs: Tensor
    token_index: Tensor
    sub_query_start_loc: Tensor
    tree_mask: Tensor
    num_tokens: int
    token_node: Tensor | None = None
    rows: np.ndarray | None = None
    num_valid: np.ndarray | None = None
    query_start: np.ndarray | None = None
    logit_start: np.ndarray | None = None
    draft_start: np.ndarray | None = None
    sample_rows: Tensor | None = None
    plans: dict = field(default_factory=dict, compare=False, repr=False)


def _seg_arange(lengths: np.ndarray) -> np.ndarray:
    """[3, 2] -> [0, 1, 2, 0, 1]."""
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) - starts


def plan_step(num_draft: np.ndarray, num_scheduled: np.ndarray, query_start_loc: np.ndarray, tree_mask: Tensor,
              num_tokens: int) -> TreeStep | None:
    """The tree step of a batch, or None if no request has drafts.

    Args:
        num_draft: ``[B]`` drafts per request (``SpecDecodeMetadata.num_draft_tokens``).
        num_scheduled: ``[>= B]`` scheduled tokens per request. query_start_loc: ``[>= B+1]`` host query offsets.
        tree_mask: ``[N+1, N+1]`` bool on the device the step's tensors live on. num_tokens: scheduled tokens in all.
    Raises:
        TreeStepError: a request with drafts is not scheduled exactly drafts + 1 tokens, or has more than N drafts.
    """
    num_draft = np.asarray(num_draft, dtype=np.int64)
    rows = np.nonzero(num_draft > 0)[0]
    if rows.size == 0:
        return None
    b, n1 = num_draft.size, tree_mask.shape[-1]
    q_len = num_draft[rows] + 1
    sched = np.asarray(num_scheduled, dtype=np.int64)[rows]
    if np.any(sched != q_len) or np.any(q_len > n1):
        raise TreeStepError(
            f"a request verifying a Medusa tree must schedule exactly its drafts + 1 tokens (at most {n1}); got "
            f"scheduled={sched.tolist()} drafts+1={q_len.tolist()}")
    query_start = np.asarray(query_start_loc[:b + 1], dtype=np.int64)[rows]
    local = _seg_arange(q_len)
    dev = tree_mask.device
    sub_qsl = np.zeros(rows.size + 1, dtype=np.int64)
    sub_qsl[1:] = np.cumsum(q_len)
    per_req = num_draft + 1
    return TreeStep(
        tree_reqs=torch.from_numpy(rows).to(dev),
        token_index=torch.from_numpy(np.repeat(query_start, q_len) + local).to(dev),
        sub_query_start_loc=torch.from_numpy(sub_qsl).to(dev), tree_mask=tree_mask, num_tokens=int(num_tokens),
        token_node=torch.from_numpy(local).to(dev), rows=rows, num_valid=q_len, query_start=query_start,
        logit_start=np.cumsum(per_req) - per_req, draft_start=(np.cumsum(num_draft) - num_draft)[rows])


_CURRENT: TreeStep | None = None


def publish(step: TreeStep) -> None:
    global _CURRENT
    _CURRENT = step


def clear() -> None:
    global _CURRENT
    _CURRENT = None


def for_layer(is_decoder: bool, attn_metadata) -> TreeStep | None:
    """The tree step a decoder attention layer must honour now, or None (stock attention). Raises if the step was
    published for another token count than the layer runs on (runner and attention out of sync)."""
    step = _CURRENT
    if step is None or attn_metadata is None or not is_decoder:
        return None
    if step.num_tokens != attn_metadata.num_actual_tokens:
        raise RuntimeError(
            f"Medusa tree step was published for {step.num_tokens} tokens but attention runs on "
            f"{attn_metadata.num_actual_tokens}; the runner and attention are out of sync")
    return step
