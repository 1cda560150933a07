"""MedusaTree: buffers against a brute-force construction, shipped sets, validation errors, build_candidates."""

import json
import random
from importlib import resources

import pytest
import torch

from medusa_plugin.core.tree import MedusaTree, MedusaTreeError, shipped_tree_names


def brute_force_buffers(choices, topk, order=None):
    """Everything from first principles: node order (upstream's, or the paths ``order`` lists), prefixes as
    ancestors."""
    paths = [tuple(p) for p in order] if order is not None else sorted((tuple(p) for p in choices),
                                                                        key=lambda p: (len(p), p))
    nodes = [()] + paths
    n1, d = len(nodes), max(len(p) for p in paths)
    idx = {p: i for i, p in enumerate(nodes)}
    depth = [len(p) for p in nodes]
    parent = [-1] + [idx[p[:-1]] for p in paths]
    anc = [[nodes[j] == nodes[i][: len(nodes[j])] for j in range(n1)] for i in range(n1)]
    tree_indices = [0] + [1 + p[-1] + topk * (len(p) - 1) for p in paths]
    leaves = [p for p in paths if not any(q != p and q[: len(p)] == p for q in paths)]
    leaves = sorted(leaves, key=lambda p: idx[p], reverse=True)  # upstream iterates the sorted choices backwards
    retrieve = [[0] + [idx[p[:k]] for k in range(1, len(p) + 1)] + [-1] * (d - len(p)) for p in leaves]
    child_index = [[-1] * topk for _ in range(n1)]
    for p in paths:
        child_index[idx[p[:-1]]][p[-1]] = idx[p]
    return dict(depth=depth, parent=parent, ancestor_mask=anc, tree_indices=tree_indices, retrieve_indices=retrieve,
                child_index=child_index, nodes_per_depth=[sum(len(p) == k for p in paths) for k in range(1, d + 1)],
                num_leaves=len(leaves))


def random_tree(rng, topk=10, max_depth=5, n_paths=20):
    s = set()
    for _ in range(n_paths):
        p = tuple(rng.randrange(topk) for _ in range(rng.randint(1, max_depth)))
        s.update(p[:k] for k in range(1, len(p) + 1))
    out = [list(p) for p in s]
    rng.shuffle(out)
    return out


def _trees():
    rng = random.Random(0)
    shipped = json.loads((resources.files("medusa_plugin") / "data/medusa_choices.json").read_text())["choices"]
    cases = [(n, shipped[n], 10) for n in shipped_tree_names()]
    for i in range(6):
        topk = rng.choice([2, 3, 10])
        cases.append((f"random{i}", random_tree(rng, topk=topk, n_paths=rng.randint(1, 30)), topk))
    cases.append(("chain", [[0] * k for k in range(1, 6)], 1))
    return cases


@pytest.mark.parametrize("name,choices,topk", _trees(), ids=[c[0] for c in _trees()])
def test_buffers_equal_brute_force(name, choices, topk):
    t = MedusaTree.from_choices(choices, topk=topk)
    ref = brute_force_buffers(choices, topk)
    for field in ("depth", "parent", "ancestor_mask", "tree_indices", "retrieve_indices", "child_index"):
        got = getattr(t, field)
        assert got.dtype == (torch.bool if field == "ancestor_mask" else torch.int64), field
        assert got.tolist() == ref[field], field
    assert t.nodes_per_depth == ref["nodes_per_depth"]
    assert t.num_leaves == ref["num_leaves"]
    assert t.num_nodes == len(choices) and t.max_depth == len(ref["nodes_per_depth"])
    assert t.retrieve_indices.tolist() == t.node_paths[t.is_leaf.nonzero().flatten().flip(0)].tolist()
    for i, kids in enumerate(t.children):
        assert kids == [j for j in range(1, t.num_nodes + 1) if ref["parent"][j] == i]
    # every prefix [0, q) of the node order is closed under parent
    parent = t.parent.tolist()
    for q in range(1, t.num_nodes + 2):
        assert all(parent[i] < q for i in range(1, q))
    # attn_bias is 0 exactly on the ancestor mask, -inf elsewhere
    bias = t.attn_bias(torch.float16)
    assert bias.dtype == torch.float16
    assert torch.equal(bias == 0, t.ancestor_mask) and torch.isneginf(bias[~t.ancestor_mask]).all()


def test_shipped_shapes():
    names = shipped_tree_names()
    assert len(names) == 9
    trees = {n: MedusaTree.from_name(n) for n in names}
    mc = trees["mc_sim_7b_63"]
    assert (mc.num_nodes, mc.max_depth, mc.nodes_per_depth, mc.num_leaves) == (63, 4, [10, 28, 23, 2], 42)
    assert tuple(mc.retrieve_indices.shape) == (42, 5)
    v33 = trees["vicuna_33b_stage1"]
    assert v33.max_depth == 3 and v33.num_leaves == 46 and tuple(v33.retrieve_indices.shape) == (46, 4)
    assert all(t.num_nodes == 63 for t in trees.values())


def test_tuples_and_lists_and_order_give_same_tree():
    a = MedusaTree.from_choices([(0,), (1,), (0, 0)])
    b = MedusaTree.from_choices([[0, 0], [1], [0]])
    assert a == b and a.choices == [(0,), (1,), (0, 0)]


@pytest.mark.parametrize("choices,kw,needles", [
    ([], {}, ["empty"]),
    ([[0], [1, 0]], {}, ["[1, 0]", "prefix [1] is missing"]),
    ([[0], [0, 0], [0, 0, 0]], {"num_heads": 2},
     ["tree depth 3 needs at least 3 heads, the checkpoint has 2: use a smaller tree or more heads"]),
    ([[0], [10]], {}, ["[10]", "rank 10", "topk=10"]),
    ([[0], [3]], {"topk": 3}, ["rank 3", "topk=3"]),
    ([[0], [-1]], {}, ["negative rank -1"]),
    ([[0], [1], [0]], {}, ["[0]", "more than once"]),
    ([[0], [0.5]], {}, ["non-integer", "0.5"]),
    ([[0], ["a"]], {}, ["non-integer"]),
    ([[0], [True]], {}, ["non-integer"]),
    ([[0], []], {}, ["empty"]),
    ([0, 1], {}, ["not a list of integer ranks"]),
])
def test_validation_errors(choices, kw, needles):
    with pytest.raises(MedusaTreeError) as e:
        MedusaTree.from_choices(choices, **kw)
    assert isinstance(e.value, ValueError)
    for s in needles:
        assert s in str(e.value), (s, str(e.value))


def test_from_name_unknown_suggests():
    with pytest.raises(MedusaTreeError) as e:
        MedusaTree.from_name("mc_sim_7b_64")
    msg = str(e.value)
    assert "Did you mean 'mc_sim_7b_63'" in msg
    assert all(n in msg for n in shipped_tree_names())


def test_load_dispatch(tmp_path):
    ref = MedusaTree.from_choices([[0], [1], [0, 0]])
    (tmp_path / "t.yaml").write_text("- [0]\n- [1]\n- [0, 0]\n")
    (tmp_path / "m.yml").write_text("choices:\n  - [0]\n  - [1]\n  - [0, 0]\n")
    (tmp_path / "t.json").write_text("[[0], [1], [0, 0]]")
    for spec in [tmp_path / "t.yaml", str(tmp_path / "m.yml"), str(tmp_path / "t.json"), [[0], [1], [0, 0]],
                 "[[0], [1], [0, 0]]", "[(0,), (1,), (0, 0)]", ref]:
        assert MedusaTree.load(spec) == ref, spec
    assert MedusaTree.load("chain:3") == MedusaTree.chain(3) == MedusaTree.from_choices([[0], [0, 0], [0, 0, 0]])
    assert MedusaTree.load("zephyr_stage2") == MedusaTree.from_name("zephyr_stage2")
    with pytest.raises(MedusaTreeError, match="needs at least 4 heads, the checkpoint has 3"):
        MedusaTree.load("mc_sim_7b_63", num_heads=3)
    with pytest.raises(MedusaTreeError, match="chain:K"):
        MedusaTree.load("chain:x")
    with pytest.raises(MedusaTreeError, match=">= 1"):
        MedusaTree.chain(0)
    with pytest.raises(MedusaTreeError, match="not a valid Python list literal"):
        MedusaTree.load("[[0], [1")


def test_from_yaml_errors(tmp_path):
    with pytest.raises(MedusaTreeError, match="not found"):
        MedusaTree.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- [0\n- : :")
    with pytest.raises(MedusaTreeError, match="not valid YAML"):
        MedusaTree.from_yaml(bad)
    nokey = tmp_path / "nokey.yaml"
    nokey.write_text("tree: [[0]]\n")
    with pytest.raises(MedusaTreeError, match="'choices'"):
        MedusaTree.from_yaml(nokey)
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("- [0]\n- [2, 1]\n")
    with pytest.raises(MedusaTreeError, match=r"invalid.yaml.*prefix \[2\] is missing"):
        MedusaTree.from_yaml(invalid)


@pytest.mark.parametrize("name,k", [("mc_sim_7b_63", 5), ("vicuna_33b_stage1", 3), ("random", 6)])
def test_build_candidates_matches_loop(name, k):
    g = torch.Generator().manual_seed(1)
    if name == "random":
        t = MedusaTree.from_choices(random_tree(random.Random(3), topk=4, max_depth=4), topk=4)
    else:
        t = MedusaTree.from_name(name)
    B, V = 3, 50
    roots = torch.randint(0, V, (B,), generator=g)
    logits = torch.randn(B, k, V, generator=g)
    got = t.build_candidates(roots, logits)
    assert got.shape == (B, t.num_nodes + 1) and got.dtype == torch.int64
    for b in range(B):
        assert got[b, 0] == roots[b]
        for i, path in enumerate(t.choices, start=1):
            head = len(path) - 1
            order = sorted(range(V), key=lambda v: -logits[b, head, v].item())
            assert got[b, i].item() == order[path[-1]]


def test_build_candidates_errors():
    t = MedusaTree.from_name("mc_sim_7b_63")
    with pytest.raises(MedusaTreeError, match="needs at least 4 heads"):
        t.build_candidates(torch.zeros(2, dtype=torch.long), torch.randn(2, 3, 100))
    with pytest.raises(MedusaTreeError, match="vocabulary size 5"):
        t.build_candidates(torch.zeros(2, dtype=torch.long), torch.randn(2, 4, 5))


def test_describe_and_to():
    t = MedusaTree.from_name("mc_sim_7b_63")
    text = t.describe()
    lines = text.splitlines()
    assert "63 draft nodes" in lines[0] and "depth 4" in lines[0]
    assert "10, 28, 23, 2" in text and "leaves (root-to-leaf paths): 42" in text
    assert sum("── " in ln for ln in lines) == 63
    assert "├── 0  (node 1: head 0 rank 0)" in text and "0.0.0.1  (node 63: head 3 rank 1)" in text
    t2 = t.to("cpu")
    assert t2 == t and torch.equal(t2.retrieve_indices, t.retrieve_indices)


def _random_topological_order(rng, choices):
    """The paths in a random order in which every parent precedes its children."""
    left, placed, out = [tuple(p) for p in choices], set(), []
    while left:
        ready = [p for p in left if len(p) == 1 or p[:-1] in placed]
        p = rng.choice(ready)
        left.remove(p)
        placed.add(p)
        out.append(p)
    return out


@pytest.mark.parametrize("name,choices,topk", _trees(), ids=[c[0] for c in _trees()])
def test_keep_order_buffers_equal_brute_force(name, choices, topk):
    rng = random.Random(name)
    order = _random_topological_order(rng, choices)
    t = MedusaTree(order, topk=topk, keep_order=True)
    ref = brute_force_buffers(choices, topk, order=order)
    assert t.choices == order
    for field in ("depth", "parent", "ancestor_mask", "tree_indices", "retrieve_indices", "child_index"):
        assert getattr(t, field).tolist() == ref[field], field
    assert t.prefix_depth == [max([0] + [len(p) for p in order[:n]]) for n in range(len(order) + 1)]
    # candidates of each prefix = the first columns of the full tree's
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, t.max_depth, max(topk, 12), generator=g)
    root = torch.tensor([1, 2, 3])
    full = t.build_candidates(root, logits)
    top = logits.topk(topk, dim=-1).indices
    for n in range(t.num_nodes + 1):
        assert torch.equal(t.candidates_from_topk(root, top[:, : t.prefix_depth[n]], n), full[:, : n + 1])
        # the host lookup of the proposer: the same drafts, without the root
        assert t.candidates_from_topk_host(top[:, : t.prefix_depth[n]].tolist(), n) == full[:, 1: n + 1].tolist()


def test_keep_order_refuses_a_child_before_its_parent():
    with pytest.raises(MedusaTreeError, match=r"tree path \[0, 1\] comes before its parent \[0\]"):
        MedusaTree([[1], [0, 1], [0]], keep_order=True)


def _best_closed_subset_sum(paths, prob, n):
    """Brute force: the largest total probability of ``n`` nodes that form a tree (every parent included)."""
    import itertools

    best = 0.0
    for sub in itertools.combinations(range(len(paths)), n):
        chosen = {paths[i] for i in sub}
        if all(len(p) == 1 or p[:-1] in chosen for p in chosen):
            best = max(best, sum(prob[i] for i in sub))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_acceptance_order_prefixes_are_the_best_trees_of_their_size(seed):
    rng = random.Random(seed)
    topk = 3
    choices = random_tree(rng, topk=topk, max_depth=4, n_paths=5)[:10]
    choices = [p for p in choices if all(p[:k] in choices for k in range(1, len(p)))] or [[0]]
    acc = [[rng.random() * 0.6 for _ in range(topk)] for _ in range(4)]
    if seed == 0:
        acc[1] = [0.0] * topk  # ties at probability 0: parents still first
    t = MedusaTree(choices, topk=topk)
    ordered = t.in_acceptance_order(acc)
    assert sorted(ordered.choices) == sorted(t.choices)
    parent = ordered.parent.tolist()
    assert all(parent[i] < i for i in range(1, ordered.num_nodes + 1))
    prob = ordered.path_probabilities(acc)
    assert prob == sorted(prob, reverse=True)
    for n in range(1, ordered.num_nodes + 1):
        assert sum(prob[:n]) == pytest.approx(_best_closed_subset_sum(ordered.choices, prob, n))


def test_acceptance_order_puts_the_chain_before_the_second_rank():
    acc = [[0.48, 0.10, 0.05], [0.29, 0.08, 0.04], [0.2, 0.07, 0.03]]
    t = MedusaTree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]], topk=3)
    assert t.choices[:2] == [(0,), (1,)]  # upstream order: breadth first
    ordered = t.in_acceptance_order(acc)
    assert ordered.choices[:3] == [(0,), (0, 0), (1,)]  # 0.48, 0.139, 0.10
    assert ordered.prefix_depth[:4] == [0, 1, 2, 2]
