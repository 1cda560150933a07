"""Acceptance rules: brute-force references for greedy/typical, and a statistical losslessness test for sampling."""

import itertools
import math

import pytest
import torch

from medusa_plugin.core.acceptance import (AcceptanceError, AcceptanceResult, accept, accept_batch, greedy_accept,
                                           probs_from_logits, sampling_accept, typical_accept)
from medusa_plugin.core.tree import MedusaTree

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on the shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = MedusaTree.from_choices([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0]], topk=3)


def check_consistent(tree, tt, res: AcceptanceResult):
    """Structural invariants every rule's result must satisfy."""
    b = tt.shape[0]
    assert all(x.dtype == torch.int64 for x in res)
    assert res.path_nodes.shape == res.output_tokens.shape == (b, tree.max_depth + 1)
    for r in range(b):
        L, last = res.accept_len[r].item(), res.last_node[r].item()
        path = res.path_nodes[r].tolist()
        assert path[0] == 0 and path[L] == last and all(x == -1 for x in path[L + 1:])
        assert tree.depth[last].item() == L
        assert all(tree.parent[path[j]].item() == path[j - 1] for j in range(1, L + 1))
        out = res.output_tokens[r].tolist()
        assert out[:L] == [tt[r, n].item() for n in path[1:L + 1]]
        assert out[L] == res.bonus_token[r].item() >= 0 and all(x == -1 for x in out[L + 1:])


def planted_logits(tree, tt, V, gen, p_plant=0.6):
    """Random logits where, with probability p_plant, a node's token is made the argmax at its parent."""
    B = tt.shape[0]
    logits = torch.randn(B, tree.num_nodes + 1, V, generator=gen)
    plant = torch.rand(B, tree.num_nodes + 1, generator=gen) < p_plant
    for b in range(B):
        for i in range(1, tree.num_nodes + 1):
            if plant[b, i]:
                logits[b, tree.parent[i], tt[b, i]] += 6.0
    return logits


# ------------------------------------------------------------------------------------------------ greedy
def greedy_reference(tree, tt, logits, num_valid):
    """Per-request search over the retrieve_indices paths; ties -> smallest node index."""
    out = []
    for b in range(tt.shape[0]):
        best = (0, 0)  # (depth, -node)
        for row in tree.retrieve_indices.tolist():
            for j in range(1, len(row)):
                node = row[j]
                if node < 0 or node >= num_valid[b] or tt[b, node] != logits[b, row[j - 1]].argmax():
                    break
                best = max(best, (j, -node))
        last = -best[1]
        out.append((best[0], last, logits[b, last].argmax().item()))
    return out


@pytest.mark.parametrize("name", ["mc_sim_7b_63", "vicuna_33b_stage1", "small"])
def test_greedy_matches_brute_force(name):
    tree = SMALL if name == "small" else MedusaTree.from_name(name)
    gen = torch.Generator().manual_seed(0)
    B, V = 24, 12
    tt = torch.randint(0, 4, (B, tree.num_nodes + 1), generator=gen)  # tiny token range: duplicate siblings too
    logits = planted_logits(tree, tt, V, gen)
    num_valid = torch.randint(1, tree.num_nodes + 2, (B,), generator=gen)
    num_valid[: B // 2] = tree.num_nodes + 1
    for nv in (None, num_valid):
        res = greedy_accept(tree, tt, logits, num_valid=nv)
        check_consistent(tree, tt, res)
        ref = greedy_reference(tree, tt, logits, nv if nv is not None else [tree.num_nodes + 1] * B)
        assert [(a, n, t) for a, n, t in zip(res.accept_len.tolist(), res.last_node.tolist(),
                                             res.bonus_token.tolist())] == ref
        if nv is not None:
            assert (res.last_node < nv).all()
    assert res.accept_len.max() >= 2  # the planting makes the test exercise deep paths


def test_greedy_finds_planted_continuation():
    tree = MedusaTree.from_name("mc_sim_7b_63")
    gen = torch.Generator().manual_seed(1)
    B, V = 16, 40
    tt = tree.build_candidates(torch.randint(0, V, (B,), generator=gen), torch.randn(B, 5, V, generator=gen))
    logits = torch.randn(B, tree.num_nodes + 1, V, generator=gen)
    targets = torch.randint(0, tree.num_nodes + 1, (B,), generator=gen)
    expected_bonus = []
    for b in range(B):
        path = [n for n in tree.node_paths[targets[b]].tolist() if n >= 0]
        for prev, node in zip(path, path[1:]):
            logits[b, prev, tt[b, node]] = 100.0
        kid_tokens = {tt[b, c].item() for c in tree.children[path[-1]]}
        bonus = next(t for t in range(V) if t not in kid_tokens)
        logits[b, path[-1], bonus] = 100.0
        expected_bonus.append(bonus)
    res = greedy_accept(tree, tt, logits)
    check_consistent(tree, tt, res)
    assert torch.equal(res.last_node, targets)
    assert torch.equal(res.accept_len, tree.depth[targets])
    assert res.bonus_token.tolist() == expected_bonus


# ------------------------------------------------------------------------------------------------ typical
def typical_reference(tree, tt, logits, T, thr, alpha, num_valid):
    out = []
    for b in range(tt.shape[0]):
        p = torch.softmax(logits[b] / T, dim=-1)
        H = -(p * torch.log(p + 1e-5)).sum(-1)
        best = (0, 0.0, 0)  # (depth, path log p, -node)
        for row in tree.retrieve_indices.tolist():
            lp = 0.0
            for j in range(1, len(row)):
                node, par = row[j], row[j - 1]
                if node < 0 or node >= num_valid[b]:
                    break
                prob = p[par, tt[b, node]].item()
                if not prob > min(thr, alpha * math.exp(-H[par].item())):
                    break
                lp += math.log(prob)
                best = max(best, (j, lp, -node))
        out.append((best[0], -best[2]))
    return out


@pytest.mark.parametrize("T,thr,alpha", [(0.7, 0.09, 0.3), (1.0, 0.2, 0.5), (0.3, 0.09, 0.3)])
def test_typical_matches_reference(T, thr, alpha):
    tree = MedusaTree.from_name("mc_sim_7b_63")
    gen = torch.Generator().manual_seed(2)
    B, V = 20, 16
    tt = torch.randint(0, V, (B, tree.num_nodes + 1), generator=gen)
    logits = planted_logits(tree, tt, V, gen, p_plant=0.5) * 0.6
    num_valid = torch.randint(1, tree.num_nodes + 2, (B,), generator=gen)
    num_valid[: B // 2] = tree.num_nodes + 1
    res = typical_accept(tree, tt, logits, temperature=T, posterior_threshold=thr, posterior_alpha=alpha,
                         generator=gen, num_valid=num_valid)
    check_consistent(tree, tt, res)
    ref = typical_reference(tree, tt, logits, T, thr, alpha, num_valid)
    assert list(zip(res.accept_len.tolist(), res.last_node.tolist())) == ref
    assert res.accept_len.float().mean() > 0.5
    probs = torch.softmax(logits[torch.arange(B), res.last_node] / T, -1)
    assert (probs.gather(1, res.bonus_token[:, None]) > 0).all()


def test_typical_temperature_zero_rows_are_greedy():
    tree = SMALL
    gen = torch.Generator().manual_seed(3)
    B, V = 16, 6
    tt = torch.randint(0, V, (B, tree.num_nodes + 1), generator=gen)
    logits = planted_logits(tree, tt, V, gen)
    temp = torch.where(torch.arange(B) % 2 == 0, 0.0, 0.8)
    res = typical_accept(tree, tt, logits, temperature=temp, generator=gen)
    g = greedy_accept(tree, tt, logits)
    typ = typical_accept(tree, tt, logits, temperature=0.8, generator=torch.Generator().manual_seed(3))
    even = torch.arange(B) % 2 == 0
    for r, gr in zip(res, g):
        assert torch.equal(r[even], gr[even])
    for field in ("accept_len", "path_nodes", "last_node"):  # the bonus of T > 0 rows is random
        assert torch.equal(getattr(res, field)[~even], getattr(typ, field)[~even])


# ------------------------------------------------------------------------------------------------ probs helper
def probs_reference(row, T, k, p):
    if T == 0:
        out = torch.zeros_like(row)
        out[row.argmax()] = 1.0
        return out
    x = row / T
    order = sorted(range(len(row)), key=lambda i: -x[i].item())
    keep = order[:k] if 0 < k < len(row) else order
    pr = torch.softmax(x[keep], 0)
    kept, mass = [], 0.0
    for i, q in zip(keep, pr.tolist()):
        if mass >= p and p < 1:
            break
        kept.append(i)
        mass += q
    out = torch.zeros_like(row)
    out[kept] = torch.softmax(x[kept], 0)
    return out


def test_probs_from_logits_matches_reference():
    gen = torch.Generator().manual_seed(4)
    B, V = 40, 7
    logits = torch.randn(B, V, generator=gen) * 2
    T = torch.rand(B, generator=gen) * 1.5
    T[::5] = 0.0
    k = torch.randint(0, V + 2, (B,), generator=gen)
    p = torch.rand(B, generator=gen) * 0.9 + 0.1
    p[::3] = 1.0
    got = probs_from_logits(logits, T, k, p)
    for b in range(B):
        torch.testing.assert_close(got[b], probs_reference(logits[b], T[b].item(), k[b].item(), p[b].item()))
    torch.testing.assert_close(probs_from_logits(logits, 1.0), torch.softmax(logits, -1))
    with pytest.raises(AcceptanceError, match="temperature"):
        probs_from_logits(logits, -1.0)
    with pytest.raises(AcceptanceError, match="top_p"):
        probs_from_logits(logits, 1.0, top_p=0.0)


# ------------------------------------------------------------------------------------------------ losslessness
V_TOY, N_TOKENS, N_PER_VARIANT = 5, 3, 20_000
VARIANTS = [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8), (0.8, 2, 0.9), (0.0, 0, 1.0)]  # (temperature, top_k, top_p)


def _toy_setup():
    gen = torch.Generator().manual_seed(5)
    table = torch.randn(V_TOY, V_TOY, generator=gen) * 1.2  # target logits of the next token given the previous one
    n = N_PER_VARIANT
    temp = torch.tensor([v[0] for v in VARIANTS]).repeat_interleave(n)
    top_k = torch.tensor([v[1] for v in VARIANTS]).repeat_interleave(n)
    top_p = torch.tensor([v[2] for v in VARIANTS]).repeat_interleave(n)
    return table, temp, top_k, top_p


def exact_distribution(table, T, k, p):
    """[V**3] probability of the first three tokens after token 0, by enumeration."""
    q = probs_from_logits(table, torch.full((V_TOY,), T), torch.full((V_TOY,), k), torch.full((V_TOY,), p))
    dist = torch.zeros(V_TOY ** N_TOKENS, dtype=torch.float64)
    for xs in itertools.product(range(V_TOY), repeat=N_TOKENS):
        prob, prev = 1.0, 0
        for x in xs:
            prob, prev = prob * q[prev, x].item(), x
        dist[sum(x * V_TOY ** (N_TOKENS - 1 - i) for i, x in enumerate(xs))] = prob
    return dist


def simulate(rule, table, temp, top_k, top_p, seed=6):
    """Medusa decoding of B toy sequences (one batch) until each has >= N_TOKENS tokens; returns codes [B]."""
    tree = SMALL
    gen = torch.Generator().manual_seed(seed)
    B = temp.shape[0]
    rows = torch.arange(B)
    last = torch.zeros(B, dtype=torch.int64)
    emitted = torch.full((B, N_TOKENS), -1, dtype=torch.int64)
    count = torch.zeros(B, dtype=torch.int64)
    total_accepted = 0
    while (count < N_TOKENS).any():
        # arbitrary "heads": partly informed by the target, partly noise
        head_logits = table[last].unsqueeze(1) + 2.0 * torch.randn(B, tree.max_depth, V_TOY, generator=gen)
        tt = tree.build_candidates(last, head_logits)
        logits = table[tt]  # the toy target: next-token logits depend only on the node's own token
        num_valid = torch.randint(1, tree.num_nodes + 2, (B,), generator=gen)
        res = rule(tree, tt, logits, temperature=temp, top_k=top_k, top_p=top_p, generator=gen, num_valid=num_valid)
        assert (res.last_node < num_valid).all()
        total_accepted += res.accept_len.sum().item()
        for j in range(tree.max_depth + 1):
            pos = count + j
            m = (j <= res.accept_len) & (pos < N_TOKENS)
            emitted[rows[m], pos[m]] = res.output_tokens[m, j]
        count += res.accept_len + 1
        last = res.bonus_token
    assert (emitted >= 0).all()
    codes = sum(emitted[:, i] * V_TOY ** (N_TOKENS - 1 - i) for i in range(N_TOKENS))
    return codes, total_accepted / B  # accepted draft tokens per sequence


def tv_and_bound(codes, dist, gen):
    n = codes.shape[0]
    emp = torch.bincount(codes, minlength=dist.numel()).double() / n
    tv = 0.5 * (emp - dist).abs().sum().item()
    # expected TV of an iid sample of the same size from the exact distribution, by simulation
    draws = torch.multinomial(dist.float().expand(40, -1), n, replacement=True, generator=gen)
    iid = torch.stack([torch.bincount(d, minlength=dist.numel()) for d in draws]).double() / n
    expected = 0.5 * (iid - dist).abs().sum(1).mean().item()
    return tv, 3 * expected


def first_child_rule(tree, tt, logits, *, temperature, top_k, top_p, generator, num_valid):
    """WRONG: always descend into the rank-0 child, then sample the bonus at the last node."""
    B = tt.shape[0]
    cur = torch.zeros(B, dtype=torch.int64)
    for _ in range(tree.max_depth):
        kid = tree.child_index[cur, 0]
        cur = torch.where((kid >= 0) & (kid < num_valid), kid, cur)
    probs = probs_from_logits(logits[torch.arange(B), cur], temperature, top_k, top_p)
    bonus = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    from medusa_plugin.core.acceptance import _result
    return _result(tree, tt, cur, bonus)


def argmax_match_rule(tree, tt, logits, *, temperature, top_k, top_p, generator, num_valid):
    """WRONG at T > 0: greedy (argmax) verification followed by a sampled bonus token."""
    g = greedy_accept(tree, tt, logits, num_valid=num_valid)
    probs = probs_from_logits(logits[torch.arange(tt.shape[0]), g.last_node], temperature, top_k, top_p)
    bonus = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    from medusa_plugin.core.acceptance import _result
    return _result(tree, tt, g.last_node, bonus)


def test_sampling_is_lossless():
    table, temp, top_k, top_p = _toy_setup()
    codes, accepted_per_seq = simulate(sampling_accept, table, temp, top_k, top_p)
    assert accepted_per_seq > 1.0  # drafts are really accepted, so the tree path is exercised
    gen = torch.Generator().manual_seed(7)
    for i, (T, k, p) in enumerate(VARIANTS):
        dist = exact_distribution(table, T, k, p)
        tv, bound = tv_and_bound(codes[i * N_PER_VARIANT:(i + 1) * N_PER_VARIANT], dist, gen)
        assert tv <= bound, (VARIANTS[i], tv, bound)


@pytest.mark.parametrize("wrong_rule,variants", [(first_child_rule, range(len(VARIANTS))),
                                                 (argmax_match_rule, range(len(VARIANTS) - 1))])
def test_lossless_test_has_power(wrong_rule, variants):
    table, temp, top_k, top_p = _toy_setup()
    codes, _ = simulate(wrong_rule, table, temp, top_k, top_p)
    gen = torch.Generator().manual_seed(7)
    for i in variants:
        dist = exact_distribution(table, *VARIANTS[i])
        tv, bound = tv_and_bound(codes[i * N_PER_VARIANT:(i + 1) * N_PER_VARIANT], dist, gen)
        assert tv > bound, (VARIANTS[i], tv, bound)


def test_sampling_temperature_zero_equals_greedy():
    tree = MedusaTree.from_name("mc_sim_7b_63")
    gen = torch.Generator().manual_seed(8)
    B, V = 12, 10
    tt = tree.build_candidates(torch.randint(0, V, (B,), generator=gen), torch.randn(B, 4, V, generator=gen))
    logits = planted_logits(tree, tt, V, gen)
    res = sampling_accept(tree, tt, logits, temperature=0.0, generator=gen)
    check_consistent(tree, tt, res)
    g = greedy_accept(tree, tt, logits)
    # siblings carry distinct tokens (top-k), so at most one child matches the argmax at each level
    assert all(torch.equal(a, b) for a, b in zip(res, g))


# ------------------------------------------------------------------------------------------------ dispatcher
def test_accept_dispatch_and_errors():
    tree = SMALL
    gen = torch.Generator().manual_seed(9)
    B, V = 4, 6
    tt = tree.build_candidates(torch.randint(0, V, (B,), generator=gen), torch.randn(B, 3, V, generator=gen))
    logits = planted_logits(tree, tt, V, gen)
    g = accept("greedy", tree, tt, logits, temperature=0.9, top_p=0.5)  # sampling params ignored by greedy
    assert all(torch.equal(a, b) for a, b in zip(g, greedy_accept(tree, tt, logits)))
    s = accept("sampling", tree, tt, logits, temperature=0.0)
    assert torch.equal(s.last_node, g.last_node)
    with pytest.raises(AcceptanceError, match="unknown acceptance rule 'typcial'. Did you mean 'typical'"):
        accept("typcial", tree, tt, logits, temperature=1.0)
    with pytest.raises(AcceptanceError, match="unknown acceptance parameter"):
        accept("greedy", tree, tt, logits, temprature=1.0)
    with pytest.raises(AcceptanceError, match="needs a temperature"):
        accept("sampling", tree, tt, logits)
    with pytest.raises(AcceptanceError, match=r"tree_tokens must be \[B, 10\]"):
        greedy_accept(tree, tt[:, :5], logits)
    with pytest.raises(AcceptanceError, match="logits must be"):
        greedy_accept(tree, tt, logits[:, :5])
    with pytest.raises(AcceptanceError, match="temperature must be a scalar or a"):
        sampling_accept(tree, tt, logits, temperature=torch.ones(B + 1))


# ------------------------------------------------------------------------------------------------ accept_batch
def _batch_case(tree, b, V=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tt = torch.randint(0, V, (b, tree.num_nodes + 1), generator=gen)
    logits = planted_logits(tree, tt, V, gen, p_plant=0.7)
    num_valid = torch.randint(2, tree.num_nodes + 2, (b,), generator=gen)
    return tt, logits, num_valid


def test_accept_batch_rows_use_their_own_rule_parameters_and_generator():
    """Each row equals the single-rule call on that row alone: greedy rows, unseeded sampled rows (global generator,
    in row order), seeded rows (their own generator only)."""
    tree = SMALL
    tt, logits, nv = _batch_case(tree, 7)
    temp = torch.tensor([0.0, 0.7, 1.3, 0.0, 0.9, 0.5, 2.0])
    top_k = torch.tensor([0, 3, 0, 5, 2, 0, 4])
    top_p = torch.tensor([1.0, 0.8, 1.0, 1.0, 0.6, 0.9, 1.0])
    seeded = {2: 123, 5: 7, 3: 99}  # row 3 is greedy: its generator must not be touched
    gens = {r: torch.Generator().manual_seed(s) for r, s in seeded.items()}
    torch.manual_seed(42)
    got = accept_batch(tree, tt, logits, temperature=temp, top_k=top_k, top_p=top_p, generators=gens, num_valid=nv)
    check_consistent(tree, tt, got)

    def rows(res, idx):
        return [tuple(t[i].tolist() for t in res) for i in range(len(idx))]

    greedy = [0, 3]
    ref = greedy_accept(tree, tt[greedy], logits[greedy], num_valid=nv[greedy])
    assert rows(ref, greedy) == [tuple(t[i].tolist() for t in got) for i in greedy]
    unseeded = [1, 4, 6]
    torch.manual_seed(42)
    ref = sampling_accept(tree, tt[unseeded], logits[unseeded], temperature=temp[unseeded], top_k=top_k[unseeded],
                          top_p=top_p[unseeded], num_valid=nv[unseeded])
    assert rows(ref, unseeded) == [tuple(t[i].tolist() for t in got) for i in unseeded]
    for r in (2, 5):
        ref = sampling_accept(tree, tt[[r]], logits[[r]], temperature=temp[[r]], top_k=top_k[[r]], top_p=top_p[[r]],
                              generator=torch.Generator().manual_seed(seeded[r]), num_valid=nv[[r]])
        assert rows(ref, [r]) == [tuple(t[r].tolist() for t in got)]
    assert gens[3].initial_seed() == 99 and torch.equal(gens[3].get_state(),
                                                         torch.Generator().manual_seed(99).get_state())


def test_accept_batch_typical_rule_and_all_greedy_fast_path():
    tree = SMALL
    tt, logits, nv = _batch_case(tree, 5, seed=1)
    temp = torch.tensor([0.0, 0.8, 0.0, 1.0, 0.6])
    torch.manual_seed(3)
    got = accept_batch(tree, tt, logits, temperature=temp, sampled_rule="typical", num_valid=nv,
                       posterior_threshold=0.2, posterior_alpha=0.5)
    torch.manual_seed(3)
    ref = typical_accept(tree, tt, logits, temperature=temp, posterior_threshold=0.2, posterior_alpha=0.5,
                         num_valid=nv)
    for g, r in zip(got, ref):
        assert torch.equal(g[[0, 2]], r[[0, 2]])  # greedy rows; sampled rows drew in another grouping
        assert g.shape == r.shape
    check_consistent(tree, tt, got)
    zero = torch.zeros(5)
    for g, r in zip(accept_batch(tree, tt, logits, temperature=zero, num_valid=nv),
                    greedy_accept(tree, tt, logits, num_valid=nv)):
        assert torch.equal(g, r)


def test_accept_batch_errors():
    tt, logits, _ = _batch_case(SMALL, 2)
    with pytest.raises(AcceptanceError, match="sampled_rule"):
        accept_batch(SMALL, tt, logits, temperature=torch.ones(2), sampled_rule="greedy")
    with pytest.raises(AcceptanceError, match="temperature"):
        accept_batch(SMALL, tt, logits, temperature=torch.ones(3))
