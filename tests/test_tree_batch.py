"""core.tree_batch: the step's flat tensors <-> per-tree-request [R, N+1] tensors, against per-request loops."""

import pytest
import torch

from medusa_plugin.core.tree_batch import gather_tree_inputs, node_rows, output_rows, sample_rows

N, V = 6, 11


def _step(num_draft):
    """A flat step: request b has 1 + num_draft[b] logit rows and num_draft[b] drafts (values encode their origin)."""
    num_draft = torch.tensor(num_draft)
    per_req = num_draft + 1
    logit_start = torch.cumsum(per_req, 0) - per_req
    draft_start = torch.cumsum(num_draft, 0) - num_draft
    logits = torch.randn(int(per_req.sum()), V, generator=torch.Generator().manual_seed(0))
    drafts = torch.arange(100, 100 + int(num_draft.sum()), dtype=torch.int32)
    return num_draft, logit_start, draft_start, logits, drafts


def test_gather_tree_inputs_matches_per_request_loop():
    # requests 1 and 3 have no drafts (prefill / no-draft decode), request 2 is truncated, 0 and 4 are full trees
    num_draft, logit_start, draft_start, logits, drafts = _step([N, 0, 3, 0, N])
    rows = torch.nonzero(num_draft > 0).flatten()
    nv = num_draft[rows] + 1
    tokens, tree_logits = gather_tree_inputs(logits, drafts, logit_start[rows], draft_start[rows], nv, N)
    assert tokens.shape == (3, N + 1) and tokens.dtype == torch.int64 and tree_logits.shape == (3, N + 1, V)
    for j, b in enumerate(rows.tolist()):
        q = int(nv[j])
        for i in range(N + 1):
            src = int(logit_start[b]) + min(i, q - 1)
            assert torch.equal(tree_logits[j, i], logits[src])
            want = int(drafts[int(draft_start[b]) + i - 1]) if 1 <= i < q else 0
            assert tokens[j, i].item() == want


def test_greedy_acceptance_from_flat_argmax_equals_acceptance_from_tree_logits():
    # the engine's greedy path: argmax over the step's flat rows, then ids in tree shape (no [R, N+1, V] copy)
    from medusa_plugin.core.acceptance import AcceptanceError, greedy_accept, greedy_accept_targets
    from medusa_plugin.core.tree import MedusaTree

    tree = MedusaTree.from_choices([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    n = tree.num_nodes
    g = torch.Generator().manual_seed(3)
    num_draft = torch.tensor([n, 0, 2, n, 1])
    logit_start = torch.cumsum(num_draft + 1, 0) - (num_draft + 1)
    draft_start = torch.cumsum(num_draft, 0) - num_draft
    logits = torch.randn(int((num_draft + 1).sum()), 7, generator=g)
    drafts = logits.argmax(-1)[torch.randint(0, logits.shape[0], (int(num_draft.sum()),), generator=g)]
    rows = torch.nonzero(num_draft > 0).flatten()
    where = (logit_start[rows], draft_start[rows], num_draft[rows] + 1, n)
    tokens, tree_logits = gather_tree_inputs(logits, drafts, *where)
    ids_tokens, target = gather_tree_inputs(logits.argmax(-1), drafts, *where)
    assert torch.equal(ids_tokens, tokens)
    want = greedy_accept(tree, tokens, tree_logits, num_valid=where[2])
    got = greedy_accept_targets(tree, ids_tokens, target, num_valid=where[2])
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with pytest.raises(AcceptanceError, match=r"must both be \[B, 7\]"):
        greedy_accept_targets(tree, tokens, target[:, :3])


def test_node_rows_repeat_the_last_valid_row():
    got = node_rows(torch.tensor([10, 0]), torch.tensor([3, N + 1]), N)
    assert got.tolist() == [[10, 11, 12, 12, 12, 12, 12], list(range(N + 1))]


def test_sample_rows_and_output_rows():
    num_draft, logit_start, *_ = _step([N, 0, 3])
    rows = torch.tensor([0, 2])
    assert sample_rows(logit_start, rows, torch.tensor([4, 2])).tolist() == [4, 7, 10]
    out_tokens = torch.tensor([[5, 6, 7, -1], [8, -1, -1, -1]])
    got = output_rows(torch.tensor([1, 2, 3]), rows, out_tokens, 3, width=N + 1)
    assert got.dtype == torch.int32
    assert got.tolist() == [[5, 6, 7, -1, -1, -1, -1], [2] + [-1] * N, [8] + [-1] * N]
    assert output_rows(None, rows, out_tokens, 3, width=3).tolist() == [[5, 6, 7], [-1] * 3, [8, -1, -1]]
