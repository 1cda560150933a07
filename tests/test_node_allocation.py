"""One node budget per step across the batch (core/node_allocation.py) against a brute force over every
ancestor-closed choice of nodes, and restricting a dynamic tree to the chosen nodes (core/dynamic_tree.py)."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from medusa_plugin.core.acceptance import greedy_accept
from medusa_plugin.core.dynamic_tree import DynamicTreeError, build_dynamic_tree, restrict_tree
from medusa_plugin.core.node_allocation import allocate_nodes, allocate_streams


def _random_tree(rng: random.Random, k: int = 2, topk: int = 3):
    probs = torch.tensor([sorted((rng.random() for _ in range(topk)), reverse=True) for _ in range(k)])
    ids = torch.tensor([rng.sample(range(50), topk) for _ in range(k)])
    return build_dynamic_tree(rng.randrange(50), probs, ids, rng.randint(1, 4))


def _closed_subsets(dt):
    parent = dt.tree.parent.tolist()
    n = dt.num_nodes
    for bits in itertools.product([0, 1], repeat=n):
        s = {i + 1 for i, b in enumerate(bits) if b}
        if all(parent[i] == 0 or parent[i] in s for i in s):
            yield s


@pytest.mark.parametrize("seed", range(12))
def test_allocation_maximises_tokens_per_ms_like_brute_force(seed):
    rng = random.Random(seed)
    trees = [_random_tree(rng) for _ in range(rng.randint(1, 3))]
    scores = [t.score for t in trees]
    base, per_row, curve = rng.uniform(5, 20), rng.uniform(0.1, 6), rng.uniform(0, 0.3)
    draft = rng.choice([0.0, rng.uniform(0, base)])  # drafting paid only by a step that verifies nodes

    def step_ms(m):
        return base + per_row * m + curve * m * m

    def rate(sets):
        m = sum(len(s) for s in sets)
        return ((len(trees) + sum(float(t.score[i]) for t, s in zip(trees, sets) for i in s))
                / (step_ms(m) + (draft if m else 0.0)))

    best = max(rate(c) for c in itertools.product(*[list(_closed_subsets(t)) for t in trees]))
    keep = allocate_nodes(scores, step_ms, draft_ms=draft)
    assert rate([set(k) for k in keep]) == pytest.approx(best, rel=1e-12)
    for t, k in zip(trees, keep):  # ancestor-closed, ascending, no root
        parent = t.tree.parent.tolist()
        assert k == sorted(k) and all(i >= 1 and (parent[i] == 0 or parent[i] in k) for i in k)


def test_cheap_rows_keep_everything_costly_rows_nothing_and_min_nodes():
    rng = random.Random(0)
    trees = [_random_tree(rng) for _ in range(3)]
    scores = [t.score for t in trees]
    assert allocate_nodes(scores, lambda m: 10.0) == [list(range(1, t.num_nodes + 1)) for t in trees]
    assert allocate_nodes(scores, lambda m: 10.0 + 100.0 * m) == [[], [], []]
    forced = allocate_nodes(scores, lambda m: 10.0 + 100.0 * m, min_nodes=2)
    assert sum(map(len, forced)) == 2
    # a margin: nodes only when they beat the plain step by more than min_gain
    def cost(m):
        return 10.0 + 0.5 * m

    free = allocate_nodes(scores, cost)
    n = sum(map(len, free))
    assert n > 0
    gain = (3 + sum(float(t.score[i]) for t, k in zip(trees, free) for i in k)) / cost(n) / (3 / cost(0)) - 1
    assert allocate_nodes(scores, cost, min_gain=gain + 1e-9) == [[], [], []]
    assert allocate_nodes(scores, cost, min_gain=gain - 1e-6) == free
    # drafting dearer than any gain: no nodes (the heads rest); free drafting: the same choice as without
    assert allocate_nodes(scores, cost, draft_ms=1e6) == [[], [], []]
    assert allocate_nodes(scores, cost, draft_ms=0.0) == free
    with pytest.raises(ValueError, match="min_gain"):
        allocate_nodes(scores, cost, min_gain=-1.0)
    with pytest.raises(ValueError, match="draft_ms"):
        allocate_nodes(scores, cost, draft_ms=-1.0)
    with pytest.raises(ValueError, match="1-D"):
        allocate_nodes([torch.zeros(2, 2)], lambda m: 1.0)


def test_restricted_tree_verifies_like_the_kept_nodes():
    rng = random.Random(3)
    dt = _random_tree(rng, k=3, topk=3)
    while dt.num_nodes < 3:
        dt = _random_tree(rng, k=3, topk=3)
    keep = allocate_nodes([dt.score], lambda m: 10.0 + 0.0 * m)[0][:2]  # the two best nodes
    sub = restrict_tree(dt, keep)
    assert sub.num_nodes == 2
    assert sub.tokens.tolist() == dt.tokens[[0] + keep].tolist()
    assert [dt.tree.choices[i - 1] for i in keep] == sub.tree.choices
    # greedy verification on the sub-tree accepts exactly what the full tree accepts within the kept nodes
    V = 50
    logits = torch.full((1, dt.num_nodes + 1, V), -1.0)
    for i in range(dt.num_nodes + 1):  # the target agrees with every kept child
        kids = [j for j in keep if dt.tree.parent[j] == i]
        logits[0, i, int(dt.tokens[kids[0]]) if kids else 0] = 5.0
    sub_logits = logits[:, [0] + keep]
    res = greedy_accept(sub.tree, sub.tokens.unsqueeze(0), sub_logits)
    assert int(res.accept_len[0]) == max(len(sub.tree.choices[i]) for i in range(2))
    assert restrict_tree(dt, []) is None
    assert restrict_tree(dt, range(1, dt.num_nodes + 1)) is dt
    orphan = [i for i in range(1, dt.num_nodes + 1) if int(dt.tree.parent[i]) != 0]
    if orphan:
        with pytest.raises(DynamicTreeError, match="ancestor-closed"):
            restrict_tree(dt, [orphan[0]])
    with pytest.raises(DynamicTreeError, match="kept nodes must be in"):
        restrict_tree(dt, [0])


class _CountingStream:
    """A NodeStream over a list of scores (best first) that counts the nodes drawn."""

    def __init__(self, scores):
        self.scores, self.drawn = list(scores), 0

    def peek(self):
        return self.scores[self.drawn] if self.drawn < len(self.scores) else None

    def pop(self):
        self.drawn += 1
        return self.scores[self.drawn - 1]


@pytest.mark.parametrize("seed", range(40))
def test_lazy_allocation_chooses_as_the_full_one_and_draws_less(seed):
    """allocate_streams keeps, per request, as many nodes as allocate_nodes keeps from whole trees (the same nodes:
    the first ones, best first), with step costs that are linear, convex, flat then steep, or cheaper at 2 rows than
    at 1 (oneDNN's M=2 shape on a 2-core CPU); it never draws more than every request's budget."""
    rng = random.Random(seed)
    n_req, budget = rng.randint(1, 6), rng.randint(1, 8)
    lists = []
    for _ in range(n_req):
        s = sorted((rng.random() ** rng.choice([0.5, 1, 3]) for _ in range(rng.randint(0, budget))), reverse=True)
        lists.append(s)
    base, per_row = rng.uniform(5, 20), rng.uniform(0.05, 4)
    kind = seed % 4
    table = [base + per_row * m + (0.3 * m * m if kind == 1 else 0) + (20 * max(0, m - 6) if kind == 2 else 0)
             - (per_row * 1.5 if kind == 3 and m == 2 else 0) for m in range(n_req * budget + 1)]
    step_ms = table.__getitem__
    draft = rng.choice([0.0, rng.uniform(0, base / 2)])
    gain, floor = rng.choice([0.0, 0.05]), rng.choice([0, 0, n_req])
    want = allocate_nodes([torch.tensor([1.0] + s) for s in lists], step_ms, min_nodes=floor, min_gain=gain,
                          draft_ms=draft)
    streams = [_CountingStream(s) for s in lists]
    got = allocate_streams(streams, step_ms, max_nodes=budget, min_nodes=floor, min_gain=gain, draft_ms=draft)
    assert got == [len(k) for k in want]
    assert all(k == list(range(1, len(k) + 1)) for k in want)  # whole-tree allocation kept the first nodes too
    assert all(c <= st.drawn <= len(s) for c, st, s in zip(got, streams, lists))


def test_lazy_allocation_stops_early_when_rows_are_dear():
    """With dear rows only the first node of each request is drawn (to see it does not pay), not whole trees."""
    streams = [_CountingStream([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]) for _ in range(4)]
    assert allocate_streams(streams, lambda m: 10.0 + 20.0 * m, max_nodes=8) == [0, 0, 0, 0]
    assert [s.drawn for s in streams] == [0, 0, 0, 0]  # peeked, never drawn
    streams = [_CountingStream([0.9, 0.8, 0.1, 0.05]) for _ in range(2)]
    assert allocate_streams(streams, lambda m: 10.0 + 1.0 * m, max_nodes=4) == [2, 2]
    assert max(s.drawn for s in streams) <= 3
    with pytest.raises(ValueError, match="max_nodes"):
        allocate_streams(streams, lambda m: 1.0, max_nodes=-1)


def test_node_stream_tree_equals_the_built_tree():
    """A NodeStream's first n nodes make the tree build_dynamic_tree builds with budget n (n = 1..all)."""
    from medusa_plugin.core.dynamic_tree import dynamic_node_stream

    rng = random.Random(3)
    probs = torch.tensor([sorted((rng.random() for _ in range(4)), reverse=True) for _ in range(3)])
    ids = torch.tensor([rng.sample(range(90), 4) for _ in range(3)])
    for n in range(1, 12):
        stream = dynamic_node_stream(7, probs, ids, continuations=[[5, 6, 8]], num_branches=1)
        got, want = stream.tree(n), build_dynamic_tree(7, probs, ids, n, continuations=[[5, 6, 8]], num_branches=1)
        assert got.tree.choices == want.tree.choices and torch.equal(got.tokens, want.tokens)
        assert torch.equal(got.score, want.score) and len(stream.nodes) == n
    assert dynamic_node_stream(7, probs, ids).tree() is None  # nothing drawn yet


def test_node_stream_runs_out_cleanly():
    """A lattice of 2 heads x 1 rank has 2 nodes: take() stops there, peek() then says None and pop() raises."""
    from medusa_plugin.core.dynamic_tree import dynamic_node_stream

    stream = dynamic_node_stream(1, torch.tensor([[0.9], [0.8]]), torch.tensor([[5], [6]]))
    assert stream.take(10).tree().num_nodes == 2 and stream.peek() is None
    with pytest.raises(IndexError, match="no node left"):
        stream.pop()
