"""Where the tree requests of one engine step sit in the step's flat tensors, and back.

An engine step lays its requests end to end: request ``b`` owns ``q_b`` consecutive query rows (``1 + drafts`` for a
request verifying a tree, in Medusa node order), the same rows of the slot mapping and ``1 + drafts`` logit rows;
its drafts sit consecutively in one flat draft-token tensor. The acceptance rules want ``[R, N+1]`` per tree request
instead. A request whose drafts the engine truncated has ``num_valid = 1 + drafts < N+1`` nodes; its missing nodes
repeat the last valid row (so every gather stays in bounds) and are masked by ``num_valid`` downstream.

Notation: ``B`` requests in the step, ``R`` of them verify a tree (batch rows ``rows``), ``N`` tree nodes, ``D`` tree
depth, ``V`` vocabulary. Plain PyTorch; works on any device.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["node_rows", "gather_tree_inputs", "sample_rows", "output_rows"]


def node_rows(first_row: Tensor, num_valid: Tensor, num_nodes: int) -> Tensor:
    """Flat row of every tree node: ``first_row[r] + min(i, num_valid[r] - 1)``.

    Args:
        first_row: ``[R]`` int64, flat row of each tree request's root (query row, logit row, ...).
        num_valid: ``[R]`` int64, nodes present per request (``1 + drafts``, 1..N+1).
        num_nodes: ``N``.
    Returns:
        ``[R, N+1]`` int64 on ``first_row``'s device.
    """
    node = torch.arange(num_nodes + 1, device=first_row.device)
    return first_row.unsqueeze(1) + torch.minimum(node.unsqueeze(0), (num_valid - 1).unsqueeze(1))


def gather_tree_inputs(logits: Tensor, draft_token_ids: Tensor, logit_start: Tensor, draft_start: Tensor,
                       num_valid: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
    """The acceptance inputs of the tree requests, from the step's flat logits and drafts.

    Args:
        logits: ``[T, V]``, ``1 + drafts`` rows per request of the step, request-major; or ``[T]`` (one value per
            row, e.g. the argmax ids): the result is then ``[R, N+1]``.
        draft_token_ids: ``[T_d]`` int, every request's drafts end to end.
        logit_start: ``[R]`` int64, first logit row of each tree request.
        draft_start: ``[R]`` int64, offset of each tree request's first draft in ``draft_token_ids``.
        num_valid: ``[R]`` int64, ``1 + drafts`` per tree request (>= 2).
        num_nodes: ``N``.
    Returns:
        ``(tree_tokens [R, N+1] int64, tree_logits [R, N+1, V])``; column 0 of ``tree_tokens`` (the root, which
        acceptance never reads) and the nodes past ``num_valid`` are 0.
    """
    dev = logits.device
    node = torch.arange(num_nodes + 1, device=dev).unsqueeze(0)
    is_draft = (node >= 1) & (node < num_valid.unsqueeze(1))
    tree_logits = logits[node_rows(logit_start, num_valid, num_nodes)]
    # Node i >= 1 is draft i - 1: the same formula one column to the left, with the root pointing at draft 0.
    draft_idx = node_rows(draft_start - 1, num_valid, num_nodes).clamp(min=0)
    tokens = draft_token_ids.to(dev, torch.int64)[draft_idx.clamp(max=max(draft_token_ids.numel() - 1, 0))]
    return torch.where(is_draft, tokens, 0), tree_logits


def sample_rows(logit_start: Tensor, rows: Tensor, last_node: Tensor) -> Tensor:
    """Logit (and hidden-state) row of each request's last accepted token: its last accepted node for a tree
    request, its only row otherwise.

    Args:
        logit_start: ``[B]`` int64, first logit row of every request. rows: ``[R]`` int64 batch rows of the tree
        requests. last_node: ``[R]`` int64, their last accepted node (``AcceptanceResult.last_node``).
    Returns:
        ``[B]`` int64 on ``logit_start``'s device (no host sync).
    """
    out = logit_start.clone()
    out[rows] += last_node.to(out.device)
    return out


def output_rows(sampled: Tensor | None, rows: Tensor, output_tokens: Tensor, num_requests: int,
                width: int) -> Tensor:
    """The step's output in the engine's format: one row per request, ``[accepted tokens..., bonus]`` padded -1.

    Args:
        sampled: ``[B]`` int, the engine sampler's token per request (the only token of a request without a tree),
            or None when every request verifies a tree.
        rows: ``[R]`` int64 batch rows of the tree requests. output_tokens: ``[R, D+1]`` int64 from acceptance
            (``L + 1`` tokens then -1).
        num_requests: ``B``. width: ``1 + max drafts`` of the step (``L + 1 <= num_valid <= width``).
    Returns:
        ``[B, width]`` int32.
    """
    out = torch.full((num_requests, width), -1, dtype=torch.int32, device=output_tokens.device)
    if sampled is not None:
        out[:, 0] = sampled.to(out.device, torch.int32)
    cols = min(output_tokens.shape[1], width)
    out[rows.to(out.device), :cols] = output_tokens[:, :cols].to(torch.int32)
    return out
