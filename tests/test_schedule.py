import itertools

import pytest
import torch
import yaml

from medusa_plugin.core import tree_fit
from medusa_plugin.core.schedule import (RooflineParams, TreeSchedule, TreeScheduleError, default_accuracy,
                                         prefix_accept_lengths)
from medusa_plugin.core.tree import MedusaTree


def _random_schedule(seed: int, max_batch: int = 8, num_nodes: int = 12) -> TreeSchedule:
    """A table with every batch size 1..max_batch and every query count 1..num_nodes+1 (no interpolation)."""
    g = torch.Generator().manual_seed(seed)
    qs = list(range(1, num_nodes + 2))
    overhead = []
    for _ in range(max_batch):
        steps = torch.rand(num_nodes, generator=g, dtype=torch.float64) * 0.4
        overhead.append([1.0] + (1.0 + steps.cumsum(0)).tolist())
    probs = torch.rand(num_nodes, generator=g, dtype=torch.float64) * 0.5
    accept = [1.0] + (1.0 + probs.cumsum(0)).tolist()
    draft = (torch.rand(max_batch, generator=g, dtype=torch.float64) * 0.2).tolist()
    return TreeSchedule(list(range(1, max_batch + 1)), qs, overhead, accept, draft_overhead=draft)


# ------------------------------------------------------------------------------------------------ roofline tables
@pytest.mark.parametrize("gpu", ["h100", "h200"])
def test_roofline_table_full_tree_at_b1_then_shrinks_to_zero(gpu):
    sched = TreeSchedule.roofline(RooflineParams.for_gpu(gpu))
    tree = MedusaTree.from_name("mc_sim_7b_63")
    table = sched.table()
    assert table[1] == tree.num_nodes
    sizes = [table[b] for b in sorted(table)]
    assert all(b <= a for a, b in zip(sizes, sizes[1:])), "tree size must not grow with the batch size"
    assert sizes[-1] == 0 and sched.num_nodes(sched.max_batch_size) == 0
    assert 0 < table[16] < tree.num_nodes  # shrunk but still speculating in between
    assert sched.num_nodes(sched.max_batch_size + 1) == 0  # beyond the table: no data, no speculation


@pytest.mark.parametrize("gpu", ["NVIDIA H100 80GB HBM3", "NVIDIA H200"])
def test_shipped_tables_match_the_roofline_and_say_so(gpu):
    shipped = TreeSchedule.default(gpu)
    key = "h100" if "H100" in gpu else "h200"
    fresh = TreeSchedule.roofline(RooflineParams.for_gpu(key))
    assert shipped.table() == fresh.table()
    assert shipped.overhead == fresh.overhead and shipped.accept_lengths == fresh.accept_lengths
    from importlib import resources
    text = (resources.files("medusa_plugin") / "data" / f"schedule_{key}.yaml").read_text()
    assert text.startswith("# DERIVED FROM THE ROOFLINE MODEL (not measured)")
    assert "bench step-cost" in text.splitlines()[1]


def test_unknown_gpu_points_to_the_benchmark():
    with pytest.raises(TreeScheduleError, match="bench step-cost"):
        TreeSchedule.default("NVIDIA A100-SXM4-80GB")


def test_roofline_memory_bound_steps_cost_nothing():
    p = RooflineParams()
    assert p.step_time(64, 1) == pytest.approx(p.step_time(1, 1))  # B*q = 64 << ridge point
    assert p.step_time(64, 64) > 8 * p.step_time(1, 64)  # B*q = 4096 >> ridge point: compute-bound
    assert p.kv_bytes_per_token == 128 * 1024  # Llama-3-8B GQA: 32 layers * 8 KV heads * 128 * 2 (K, V) * 2 bytes


# ------------------------------------------------------------------------------------------------ the objective
@pytest.mark.parametrize("seed", range(6))
def test_choice_is_the_brute_force_argmax(seed):
    sched = _random_schedule(seed)
    for b in range(1, 9):
        i = b - 1
        speeds = [1.0] + [sched.accept_lengths[n] / (sched.overhead[i][n] + sched.draft_overhead[i])
                          for n in range(1, 13)]
        best = max(speeds)
        assert sched.num_nodes(b) == speeds.index(best)  # the first (smallest) maximiser
        assert sched.expected_speedup(b) == pytest.approx(best) and best >= 1.0


@pytest.mark.parametrize("seed", range(4))
def test_min_gain_speculates_only_beyond_the_margin(seed):
    base = _random_schedule(seed)
    sched = TreeSchedule(base.batch_sizes, base.query_tokens, base.overhead, base.accept_lengths,
                         draft_overhead=base.draft_overhead, min_gain=0.1)
    assert sched.with_accept_lengths(sched.accept_lengths).min_gain == 0.1
    for b in range(1, 9):
        best = max(base.expected_speedup(b, n) for n in range(1, 13))
        if best > 1.1:
            assert sched.num_nodes(b) == base.num_nodes(b)  # the margin does not move a clear choice
        else:
            assert sched.num_nodes(b) == 0
    with pytest.raises(TreeScheduleError, match="min_gain"):
        TreeSchedule(base.batch_sizes, base.query_tokens, base.overhead, base.accept_lengths, min_gain=-0.1)


@pytest.mark.parametrize("seed", range(4))
def test_precomputed_lookup_agrees_with_cost_between_rows(seed):
    g = torch.Generator().manual_seed(100 + seed)
    base = _random_schedule(seed, max_batch=4, num_nodes=10)
    # sparse rows (interpolated in B) and sparse columns (interpolated in q)
    qs = [1, 3, 6, 11]
    rows = [[1.0] + sorted((1 + torch.rand(3, generator=g, dtype=torch.float64)).tolist()) for _ in range(3)]
    sched = TreeSchedule([1, 7, 20], qs, rows, base.accept_lengths, draft_overhead=[0.0, 0.05, 0.1])
    for b in range(1, 21):
        speeds = [sched.accept_lengths[n] / sched.cost(b, n) for n in range(0, 11)]
        assert sched.num_nodes(b) == speeds.index(max(speeds))


def test_interpolation_rule():
    sched = TreeSchedule([2, 6], [1, 5, 9], [[1.0, 1.2, 2.0], [1.0, 2.0, 4.0]], [1.0 + 0.1 * n for n in range(9)],
                         draft_overhead=[0.0, 0.4])
    assert sched.cost(2, 0) == 1.0
    assert sched.cost(2, 1) == pytest.approx(1.2)  # q = 2 < 5: the first tree column, not 1 -> 1.2 interpolation
    assert sched.cost(2, 6) == pytest.approx(1.2 + 0.5 * 0.8)  # q = 7 halfway between 5 and 9
    assert sched.cost(4, 4) == pytest.approx(0.5 * 1.2 + 0.5 * 2.0 + 0.5 * 0.4)  # B = 4 halfway between rows
    assert sched.cost(1, 8) == pytest.approx(2.0)  # below the first row: clamped to it
    with pytest.raises(TreeScheduleError, match="outside 0..8"):
        sched.cost(2, 9)


def test_never_slower_than_plain_decoding():
    accept = prefix_accept_lengths("mc_sim_7b_63")
    costly = [[1.0] + [accept[-1] + 0.5] * 3 for _ in range(3)]  # every tree step costs more than it can emit
    sched = TreeSchedule([1, 2, 4], [1, 2, 32, 64], costly, accept)
    assert set(sched.table().values()) == {0}
    for seed in range(4):
        s = _random_schedule(seed)
        assert all(s.expected_speedup(b) >= 1.0 for b in range(1, 9))


def test_num_nodes_arguments():
    sched = _random_schedule(0)
    assert sched.num_nodes(0) == 0
    with pytest.raises(TreeScheduleError, match="batch_size must be >= 0"):
        sched.num_nodes(-1)


def test_for_tree_uses_the_given_tree():
    sched = TreeSchedule.default("h100").for_tree("chain:4")
    assert len(sched.accept_lengths) == 5 and sched.num_nodes(1) == 4 and sched.meta["tree"] == "chain:4"


# ------------------------------------------------------------------------------------------------ E[L](n)
def _brute_force_accept_length(tree: MedusaTree, acc) -> float:
    """Enumerate which rank (or none) of every head is right; E[1 + longest accepted path]."""
    per_head = [list(enumerate(row)) + [(None, 1.0 - sum(row))] for row in acc]
    paths = set(tree.choices)
    total = 0.0
    for outcome in itertools.product(*per_head):
        p = 1.0
        for _, q in outcome:
            p *= q
        length = 0
        while length < len(outcome) and outcome[length][0] is not None and \
                tuple(r for r, _ in outcome[: length + 1]) in paths:
            length += 1
        total += p * (1 + length)
    return total


def test_prefix_accept_lengths_equal_brute_force():
    acc = [[0.5, 0.2, 0.1], [0.4, 0.3], [0.3, 0.1]]
    tree = MedusaTree.from_choices([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 1]])
    el = prefix_accept_lengths(tree, acc)
    assert len(el) == tree.num_nodes + 1 and el[0] == 1.0
    for n in range(tree.num_nodes + 1):
        prefix = MedusaTree.from_choices(tree.choices[:n]) if n else None
        expected = _brute_force_accept_length(prefix, acc) if prefix else 1.0
        assert el[n] == pytest.approx(expected)


def test_prefix_accept_lengths_match_the_published_estimate():
    assert prefix_accept_lengths("mc_sim_7b_63")[-1] == pytest.approx(2.34, abs=0.005)  # anchors §1.10
    assert prefix_accept_lengths("chain:5")[-1] == pytest.approx(1.78, abs=0.005)
    assert default_accuracy()[0][0] == pytest.approx(0.5604)


def test_prefix_accept_lengths_agree_with_tree_fit():
    tree = MedusaTree.from_name("mc_sim_7b_63")
    el = prefix_accept_lengths(tree)
    for n in (1, 10, 30, 63):
        assert tree_fit.expected_accept_length(tree.choices[:n], default_accuracy()) == pytest.approx(el[n])


def test_prefix_accept_lengths_bad_accuracy():
    with pytest.raises(TreeScheduleError, match="probabilities"):
        prefix_accept_lengths("chain:2", [[1.5]])


# ------------------------------------------------------------------------------------------------ YAML
def test_yaml_round_trip(tmp_path):
    sched = _random_schedule(3)
    sched.meta.update(source="measured", gpu="cpu", tree="12 nodes")
    path = tmp_path / "s.yaml"
    text = sched.to_yaml(path)
    back = TreeSchedule.from_yaml(path)
    assert back.to_dict() == sched.to_dict() and back.table() == sched.table()
    assert back.to_yaml() == text
    roof = TreeSchedule.roofline()
    roof.to_yaml(path)
    assert TreeSchedule.from_yaml(path).table() == roof.table()


def _good() -> dict:
    return dict(batch_sizes=[1, 4], query_tokens=[1, 5], overhead=[[1.0, 1.1], [1.0, 1.6]],
                accept_lengths=[1.0, 1.5, 1.7, 1.8, 1.85])


@pytest.mark.parametrize("change, match", [
    (dict(batch_sizes=[4, 1]), "batch_sizes.*strictly increasing"),
    (dict(batch_sizes=[0, 1]), "batch_sizes"),
    (dict(query_tokens=[2, 5]), "query_tokens.*start with 1"),
    (dict(overhead=[[1.0, 1.1]]), "one row per batch size"),
    (dict(overhead=[[1.0, 1.1], [1.0]]), r"row B=4.*2 values"),
    (dict(overhead=[[1.0, 1.1], [2.0, 1.6]]), r"row B=4.*plain decode step"),
    (dict(overhead=[[1.0, "x"], [1.0, 1.6]]), "not a finite number"),
    (dict(overhead=[[1.0, -1.0], [1.0, 1.6]]), "non-positive"),
    (dict(accept_lengths=[1.0, 1.5, 1.2]), "never decrease"),
    (dict(accept_lengths=[2.0, 2.5]), "start at 1.0"),
    (dict(draft_overhead=[0.1]), "one per batch size"),
    (dict(draft_overhead=-0.1), "negative"),
    (dict(schedule_version=7), "schedule_version"),
    (dict(overheads=[]), "unknown key.*overheads"),
])
def test_malformed_tables(tmp_path, change, match):
    data = {**_good(), **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(TreeScheduleError, match=match) as info:
        TreeSchedule.from_yaml(path)
    assert str(path) in str(info.value)


def test_malformed_files(tmp_path):
    TreeSchedule.from_dict(_good())  # the base case is valid
    data = _good()
    del data["accept_lengths"]
    with pytest.raises(TreeScheduleError, match="missing.*accept_lengths.*for_tree"):
        TreeSchedule.from_dict(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_sizes: [1, 2\n")
    with pytest.raises(TreeScheduleError, match="not valid YAML"):
        TreeSchedule.from_yaml(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(TreeScheduleError, match="expected a mapping"):
        TreeSchedule.from_yaml(bad)
    with pytest.raises(FileNotFoundError):
        TreeSchedule.from_yaml(tmp_path / "missing.yaml")


def test_resolve_config_setting(tmp_path):
    assert TreeSchedule.resolve(None, "mc_sim_7b_63") is None
    assert TreeSchedule.resolve("auto", "mc_sim_7b_63", gpu_name="NVIDIA A100") is None  # no shipped table
    auto = TreeSchedule.resolve("auto", "mc_sim_7b_63", gpu_name="NVIDIA H100 80GB HBM3")
    assert auto.table() == TreeSchedule.default("h100").table()
    chain = TreeSchedule.resolve("auto", "chain:3", gpu_name="h200")
    assert chain.accept_lengths == pytest.approx(prefix_accept_lengths("chain:3")) and chain.num_nodes(1) == 3
    path = tmp_path / "s.yaml"
    _random_schedule(1).to_yaml(path)
    from_file = TreeSchedule.resolve(path, MedusaTree.chain(2))  # re-derived for the configured tree
    assert len(from_file.accept_lengths) == 3 and from_file.overhead == _random_schedule(1).overhead


# ------------------------------------------------------------------------------------------------ online acceptance
def _simulate_paths(tree, cond, steps, num_verified, g):
    """Accepted paths of a tree whose node i is accepted with probability cond[i] once its parent is (a verified
    prefix [1, num_verified]); returns last nodes [steps]."""
    last = torch.zeros(steps, dtype=torch.int64)
    for s in range(steps):
        node = 0
        while True:
            kids = [c for c in tree.children[node] if c <= num_verified]
            nxt = 0
            for c in kids:  # at most one child is the target's token: try them in rank order
                if torch.rand((), generator=g) < cond[c]:
                    nxt = c
                    break
            if nxt == 0:
                break
            node = nxt
        last[s] = node
    return last


def test_estimator_recovers_expected_accept_lengths_of_every_prefix():
    from medusa_plugin.core.schedule import AcceptanceEstimator

    tree = MedusaTree.from_choices([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    g = torch.Generator().manual_seed(0)
    cond = torch.tensor([1.0, 0.6, 0.5, 0.7, 0.4, 0.3, 0.5])
    # exact marginals: p_i = P(path passes i); siblings tried in rank order
    p = torch.zeros(tree.num_nodes + 1)
    p[0] = 1.0
    for i in range(1, tree.num_nodes + 1):
        par = int(tree.parent[i])
        earlier = [c for c in tree.children[par] if c < i]
        p[i] = p[par] * cond[i] * torch.prod(torch.tensor([1 - float(cond[c]) for c in earlier] or [1.0]))
    exact = torch.cumsum(p, 0)
    est = AcceptanceEstimator(tree, [1.0] * (tree.num_nodes + 1), prior_weight=0.0, decay=1.0)
    last = _simulate_paths(tree, cond, 4000, tree.num_nodes, g)
    est.update(last, torch.full((4000,), tree.num_nodes))
    got = torch.tensor(est.accept_lengths())
    assert torch.allclose(got, exact, atol=0.05), (got, exact)
    assert est.observed == 4000


def test_estimator_keeps_the_prior_for_unverified_nodes_and_forgets_old_traffic():
    from medusa_plugin.core.schedule import AcceptanceEstimator

    tree = MedusaTree.load("chain:3")
    prior = [1.0, 1.5, 1.75, 1.875]
    est = AcceptanceEstimator(tree, prior, prior_weight=2.0, decay=0.9)
    # only node 1 verified, always accepted
    est.update(torch.ones(50, dtype=torch.int64), torch.ones(50, dtype=torch.int64))
    el = est.accept_lengths()
    assert el[1] > 1.95  # observed: ~1
    assert el[2] - el[1] == pytest.approx(0.25) and el[3] - el[2] == pytest.approx(0.125)  # prior untouched
    # then node 1 always rejected: with decay 0.9 the old hits fade quickly
    est.update(torch.zeros(50, dtype=torch.int64), torch.ones(50, dtype=torch.int64))
    assert est.accept_lengths()[1] < 1.1


def test_schedule_follows_observed_acceptance():
    """A measured-cost schedule with good acceptance speculates at batch 1; after the heads turn useless it stops."""
    from medusa_plugin.core.schedule import AcceptanceEstimator, measured_overhead

    tree = MedusaTree.load("chain:4")
    fwd = {1: 10.0, 4: 11.0, 16: 14.0, 64: 40.0, 256: 160.0}
    qs = list(range(1, 6))
    sched = TreeSchedule([1, 2, 4, 8, 16], qs, measured_overhead(fwd, [1, 2, 4, 8, 16], qs), [1.0, 1.8, 2.4, 2.8, 3.0])
    assert sched.num_nodes(1) > 0
    est = AcceptanceEstimator(tree, sched.accept_lengths, prior_weight=1.0, decay=1.0)
    est.update(torch.zeros(200, dtype=torch.int64), torch.full((200,), 4))
    assert sched.with_accept_lengths(est.accept_lengths()).num_nodes(1) == 0


# ------------------------------------------------------------------------------------------------ measured tables
def test_interpolate_ms_linear_between_and_along_the_last_segment():
    from medusa_plugin.core.schedule import interpolate_ms

    pts = {1: 10.0, 3: 12.0, 7: 20.0}
    assert interpolate_ms(pts, 2) == pytest.approx(11.0)
    assert interpolate_ms(pts, 0.5) == 10.0
    assert interpolate_ms(pts, 11) == pytest.approx(28.0)


def test_measured_table_schedule_is_the_brute_force_argmax():
    from medusa_plugin.core.schedule import interpolate_ms, measured_overhead

    tree = MedusaTree.load("mc_sim_7b_63")
    fwd = {1: 20.0, 2: 20.5, 4: 21.0, 8: 23.0, 16: 27.0, 32: 36.0, 64: 60.0, 128: 110.0, 256: 215.0}
    draft = {1: [0.5, 0.7, 0.9, 1.1], 16: [2.0, 3.0, 4.0, 5.0]}
    bs, qs = [1, 2, 4, 8, 16], list(range(1, tree.num_nodes + 2))
    el = prefix_accept_lengths(tree)
    sched = TreeSchedule(bs, qs, measured_overhead(fwd, bs, qs, draft, tree), el)
    for b in bs:
        def cost(n):
            if n == 0:
                return 1.0
            d = tree.prefix_depth[n]
            dr = interpolate_ms({k: v[d - 1] for k, v in draft.items()}, b)
            return (interpolate_ms(fwd, b * (n + 1)) + dr) / interpolate_ms(fwd, b)
        speeds = [el[n] / cost(n) for n in range(tree.num_nodes + 1)]
        best = max(range(len(speeds)), key=lambda n: (speeds[n], -n))
        assert sched.num_nodes(b) == best
        assert speeds[best] >= 1.0


def test_measured_overhead_ignores_a_slow_outlier_below_faster_bigger_forwards():
    from medusa_plugin.core.schedule import measured_overhead

    clean = measured_overhead({1: 10.0, 2: 10.5, 4: 11.0}, [1, 2], [1, 2])
    noisy = measured_overhead({1: 30.0, 2: 10.5, 4: 11.0}, [1, 2], [1, 2])  # first (cold) forward was slow
    assert noisy[1] == clean[1] and noisy[0][1] == pytest.approx(1.0)


def test_tree_attention_is_charged_beyond_the_chain_prefix_only():
    from medusa_plugin.core.schedule import measured_overhead, tree_attention_cost
    from medusa_plugin.core.tree import MedusaTree

    # [0], [0, 0] (a chain prefix of 2), then [1]: from 3 nodes on the step takes the tree-attention path
    tree = MedusaTree([[0], [0, 0], [1], [0, 1]], keep_order=True)
    assert tree.chain_prefix == 2
    fwd, qs = {1: 10.0, 64: 10.0}, [1, 2, 3, 4, 5]
    attn = {"1": {"2": 1.0, "5": 4.0}, "4": {"2": 4.0, "5": 16.0}}  # as read from JSON: string keys
    assert tree_attention_cost(attn, 1, 3) == pytest.approx(2.0)             # linear in q
    assert tree_attention_cost(attn, 2, 2) == pytest.approx(2.0)             # linear in B
    assert tree_attention_cost(attn, 8, 5) == pytest.approx(32.0)            # proportional above the table
    plain = measured_overhead(fwd, [1, 4], qs, tree=tree)
    charged = measured_overhead(fwd, [1, 4], qs, tree=tree, tree_attention_ms=attn)
    assert charged[0][:3] == plain[0][:3] == [1.0, 1.0, 1.0]                 # q <= 3: plain, 1 node, the chain
    assert charged[0][3] == pytest.approx(plain[0][3] + tree_attention_cost(attn, 1, 4) / 10.0)
    assert charged[1][4] == pytest.approx(plain[1][4] + 16.0 / 10.0)
