"""core.greedy_host: the engine's greedy step on the host (numpy, and the Python walk of steps with few requests)
equals the PyTorch path (gather_tree_inputs + greedy_accept_targets[_each] + sample_rows + output_rows), for one
static tree and for one tree per request, with truncated trees, requests without drafts and drafts that mostly
match (duplicate sibling tokens included: V is small)."""

import numpy as np
import pytest
import torch

from medusa_plugin.core.acceptance import greedy_accept_targets
from medusa_plugin.core.dynamic_tree import build_dynamic_tree
from medusa_plugin.core import greedy_host
from medusa_plugin.core.greedy_host import greedy_step_host
from medusa_plugin.core.tree import MedusaTree
from medusa_plugin.core.tree_batch import gather_tree_inputs, output_rows, sample_rows
from medusa_plugin.core.tree_list import greedy_accept_targets_each

V = 9


@pytest.fixture(autouse=True, params=["numpy", "walk"])
def host_path(request, monkeypatch):
    """Every test runs through both host paths: numpy (vectorised) and the Python walk."""
    monkeypatch.setattr(greedy_host, "WALK_MAX_ROWS", 0 if request.param == "numpy" else 1 << 30)
    return request.param


def _step(num_draft, n, seed, match=0.7):
    """A flat step whose drafts equal the target argmax of a random earlier row with probability ``match``."""
    g = np.random.default_rng(seed)
    num_draft = np.asarray(num_draft, dtype=np.int64)
    per_req = num_draft + 1
    logit_start = np.cumsum(per_req) - per_req
    draft_start_all = np.cumsum(num_draft) - num_draft
    target = g.integers(0, V, int(per_req.sum()))
    drafts = np.where(g.random(int(num_draft.sum())) < match, target[g.integers(0, target.size, num_draft.sum())],
                      g.integers(0, V, int(num_draft.sum())))
    rows = np.nonzero(num_draft > 0)[0]
    return target, drafts, logit_start, rows, draft_start_all[rows], per_req[rows]


def _torch_reference(trees, target, drafts, logit_start, rows, draft_start, num_valid, n, width):
    t = torch.from_numpy
    where = (t(logit_start[rows]), t(draft_start), t(num_valid), n)
    tokens, tgt = gather_tree_inputs(t(target), t(drafts), *where)
    if isinstance(trees, MedusaTree):
        res = greedy_accept_targets(trees, tokens, tgt, num_valid=t(num_valid))
    else:
        res = greedy_accept_targets_each(trees, tokens, tgt, num_valid=t(num_valid), num_nodes=n)
    sample = sample_rows(t(logit_start), t(rows), res.last_node)
    out = output_rows(None, t(rows), res.output_tokens, logit_start.size, width)
    return res, sample, out


def _check(trees, num_draft, n, seed):
    target, drafts, logit_start, rows, draft_start, num_valid = _step(num_draft, n, seed)
    width = int(num_valid.max())
    got = greedy_step_host(trees, target, drafts, logit_start, rows, draft_start, num_valid, n, width)
    want, sample, out = _torch_reference(trees, target, drafts, logit_start, rows, draft_start, num_valid, n, width)
    for name, a, b in zip(want._fields, got.result, want):
        assert torch.equal(a, b), name
    assert got.sample_rows.tolist() == sample.tolist()
    assert got.output.dtype == np.int32 and got.output.tolist() == out.tolist()
    return want


@pytest.mark.parametrize("seed", range(6))
def test_static_tree_matches_torch_path(seed):
    tree = MedusaTree.from_choices([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]])
    n = tree.num_nodes
    res = _check(tree, [n, 0, 4, n, 1, n, 0, n], n, seed)
    assert int(res.accept_len.max()) >= 1  # the drafts do get accepted somewhere: the comparison is not vacuous


def test_chain_matches_torch_path():
    tree = MedusaTree.chain(1)
    _check(tree, [1], 1, 0)
    _check(tree, [1, 0, 1, 1], 1, 1)
    _check(MedusaTree.chain(4), [2], 4, 2)  # a chain cut to a prefix (tree_schedule), one request


@pytest.mark.parametrize("seed", range(4))
def test_one_tree_per_request_matches_torch_path(seed):
    g = torch.Generator().manual_seed(seed)
    n, k, topk = 8, 3, 4
    trees = []
    sizes = [8, 3, 8, 5, 1]  # trees smaller than the budget: padded rows (a shared node budget)
    for size in sizes:
        probs = torch.rand(k, topk, generator=g).sort(descending=True, dim=1).values
        probs = probs / probs.sum(1, keepdim=True)
        ids = torch.stack([torch.randperm(V, generator=g)[:topk] for _ in range(k)])
        trees.append(build_dynamic_tree(0, probs, ids, size).tree)
    num_draft = [t.num_nodes for t in trees]
    num_draft[2] = 4  # vLLM cut this tree to a prefix
    _check(trees, num_draft[:2] + [0] + num_draft[2:], n, seed)  # a request without drafts between tree requests
