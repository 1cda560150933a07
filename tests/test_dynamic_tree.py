"""Dynamic and hybrid trees (core/dynamic_tree.py, core/ngram_branches.py, core/calibration.py, core/tree_list.py)
against brute-force references, and lossless decoding with them in the reference decoder."""

from __future__ import annotations

import ast
import importlib.util
import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from medusa_plugin.core.acceptance import accept
from medusa_plugin.core.calibration import AcceptanceCalibration, CalibrationError
from medusa_plugin.core.dynamic_tree import (DynamicTreeError, DynamicTreeSpec, build_dynamic_tree, lattice_size,
                                             observe_step, select_nodes)
from medusa_plugin.core.ngram_branches import NgramError, ngram_continuations
from medusa_plugin.core.tree import MedusaTree
from medusa_plugin.core.tree_list import TreeListError, accept_each
from medusa_plugin.hf.generate import baseline_generate, medusa_generate
from medusa_plugin.testing import tiny_prompts


def _key(path, factors, off_factors=None):
    score = 1.0
    for d, r in enumerate(path):
        on_top = all(x == 0 for x in path[:d])
        score = score * (factors if on_top or off_factors is None else off_factors)[d][r]
    return (-score, len(path), path)


def _random_lattice(rng: random.Random, k: int, topk: int, ties: bool):
    if ties:  # few distinct values (many equal scores), 1.0 included
        vals = [1.0, 0.5, 0.25]
        factors = [sorted((rng.choice(vals) for _ in range(topk)), reverse=True) for _ in range(k)]
    else:
        factors = [sorted((rng.random() for _ in range(topk)), reverse=True) for _ in range(k)]
    tokens = [rng.sample(range(50), topk) for _ in range(k)]
    return factors, tokens


# ------------------------------------------------------------------------------------------------ selection
@pytest.mark.parametrize("off", [False, True])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_select_nodes_equals_sorted_lattice(seed, ties, off):
    rng = random.Random(seed)
    k, topk = 3, 3
    factors, tokens = _random_lattice(rng, k, topk, ties)
    off_factors = [[f * rng.choice([0.5, 1.0]) for f in row] for row in factors] if off else None
    every = [p for d in range(1, k + 1) for p in itertools.product(range(topk), repeat=d)]
    ranked = sorted(every, key=lambda p: _key(p, factors, off_factors))
    for budget in range(1, lattice_size(k, topk) + 1):
        got = select_nodes(factors, tokens, budget, off_factors=off_factors)
        assert [n["slots"] for n in got] == ranked[:budget]
        # ancestor-closed, and MedusaTree accepts it (it refuses a path without its parent)
        chosen = {n["slots"] for n in got}
        assert all(p[:-1] in chosen for p in chosen if len(p) > 1)
        MedusaTree.from_choices(list(chosen), topk=topk)
        for n in got:
            assert n["tokens"] == tuple(tokens[d][r] for d, r in enumerate(n["slots"]))
            assert n["off"] == any(r != 0 for r in n["slots"][:-1])


def test_select_nodes_errors():
    with pytest.raises(DynamicTreeError, match="budget"):
        select_nodes([[0.5]], [[1]], 0)
    with pytest.raises(DynamicTreeError, match=r"\[0, 1\]"):
        select_nodes([[1.5]], [[1]], 1)


def _hybrid_bruteforce(factors, tokens, continuations, g, budget):
    """Every token path reachable by Medusa ranks or n-gram continuations, scored independently of select_nodes's
    slot bookkeeping; the ``budget`` best token paths (distinct scores assumed)."""
    k = len(factors)
    depth_max = max([k] + [len(c) for c in continuations])
    scored = {}

    def walk(path, score):
        d = len(path)
        if d >= depth_max:
            return
        options = {}
        if d < k:
            for r, t in enumerate(tokens[d]):
                options[t] = factors[d][r]
        for c in continuations:
            if len(c) > d and tuple(c[:d]) == path:
                options[c[d]] = max(options.get(c[d], 0.0), g[min(d, len(g) - 1)])
        for t, f in options.items():
            scored[path + (t,)] = score * f
            walk(path + (t,), score * f)

    walk((), 1.0)
    return {p for p, _ in sorted(scored.items(), key=lambda kv: -kv[1])[:budget]}


@pytest.mark.parametrize("seed", range(6))
def test_hybrid_selection_equals_bruteforce(seed):
    rng = random.Random(seed)
    k, topk = 2, 3
    factors, tokens = _random_lattice(rng, k, topk, ties=False)
    # continuations: one sharing head-0 rank 1's token, one of fresh tokens deeper than the heads
    conts = [[tokens[0][1], 77, 78], [90, 91, 92, 93]]
    g = [rng.uniform(0.3, 0.9) for _ in range(4)]
    for budget in (1, 3, 6, 10, 14):
        got = select_nodes(factors, tokens, budget, continuations=conts, ngram_factors=g)
        assert {n["tokens"] for n in got} == _hybrid_bruteforce(factors, tokens, conts, g, budget)


def test_hybrid_shares_prefix_and_keeps_siblings_distinct():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]])
    ids = torch.tensor([[10, 11, 12], [20, 21, 22]])
    conts = [[11, 30, 31], [40, 41]]  # the first shares head 0 rank 1 (token 11)
    dt = build_dynamic_tree(5, probs, ids, 12, continuations=conts, num_branches=2)
    t = dt.tree
    assert t.topk == 3 + 2 and t.num_nodes == 12
    paths = {p: i for i, p in enumerate(t.choices, start=1)}
    shared = paths[(1,)]
    assert dt.tokens[shared] == 11 and dt.head[shared] == 0 and dt.ngram_position[shared] == 0
    assert (1, 3) in paths and dt.tokens[paths[(1, 3)]] == 30 and dt.head[paths[(1, 3)]] == -1
    assert not any(p[0] == 3 for p in paths)  # no separate depth-1 node for continuation 0
    assert (4,) in paths and dt.tokens[paths[(4,)]] == 40
    for kids in t.children:
        toks = [int(dt.tokens[c]) for c in kids]
        assert len(toks) == len(set(toks))
    assert int(dt.tokens[0]) == 5
    assert torch.all(dt.score[1:] <= dt.score[t.parent[1:]])


def test_spec_checks():
    with pytest.raises(DynamicTreeError, match="exceeds"):
        DynamicTreeSpec(budget=7, topk=2, num_heads=2)
    with pytest.raises(DynamicTreeError, match="budget"):
        DynamicTreeSpec(budget=0)
    with pytest.raises(NgramError, match="min_n"):
        DynamicTreeSpec(budget=4, ngram_branches=1, ngram_min_n=3, ngram_max_n=2)
    spec = DynamicTreeSpec(budget=6, topk=2, num_heads=2)
    with pytest.raises(DynamicTreeError, match="contexts"):
        DynamicTreeSpec(budget=6, topk=2, num_heads=2, ngram_branches=1).build(
            torch.tensor([1]), torch.randn(1, 2, 8))
    trees = spec.build(torch.tensor([1, 2]), torch.randn(2, 3, 8))
    assert [d.num_nodes for d in trees] == [6, 6]


# ------------------------------------------------------------------------------------------------ n-gram lookup
def _naive_ngram(tokens, m, min_n, max_n, length):
    out, starts = [], set()
    total = len(tokens)
    if m == 0:
        return out
    for n in range(max_n, min_n - 1, -1):
        if n > total - 1:
            continue
        for s in range(0, total - n):
            if tokens[s:s + n] == tokens[total - n:] and s + n not in starts:
                starts.add(s + n)
                cont = tokens[s + n:s + n + length]
                if not any(p[:len(cont)] == cont for p in out):
                    out.append(cont)
                if len(out) == m:
                    return out
    return out


@pytest.mark.parametrize("seed,vocab", [(0, 4), (4, 3)])
def test_ngram_equals_naive_loop(seed, vocab):
    """ngram_continuations equals a naive loop; ngram_matches gives the same continuations, each with the length n
    of a suffix match that precedes it in the tokens (checked by brute force: the n tokens before the
    continuation's start equal the last n)."""
    from medusa_plugin.core.ngram_branches import ngram_matches

    rng = random.Random(seed)
    for _ in range(300):
        toks = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        min_n = rng.randint(1, 3)
        max_n = rng.randint(min_n, 5)
        m, length = rng.randint(0, 4), rng.randint(1, 5)
        conts = ngram_continuations(toks, m, min_n=min_n, max_n=max_n, length=length)
        assert conts == _naive_ngram(toks, m, min_n, max_n, length)
        found = ngram_matches(toks, m, min_n=min_n, max_n=max_n, length=length)
        assert [c for c, _ in found] == conts
        total = len(toks)
        for cont, n in found:
            assert min_n <= n <= max_n
            starts = [b for b in range(n, total) if toks[b - n:b] == toks[total - n:] and toks[b:b + length] == cont]
            assert starts, (toks, cont, n)


def _vllm_ngram_fn():
    """vLLM's lookup function, read from its source without importing vLLM or numba (decorators dropped)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "v1" / "spec_decode" / "ngram_proposer.py"
    if not path.is_file():
        pytest.fail(f"vLLM {path.parents[2].name} has no v1/spec_decode/ngram_proposer.py: find where its n-gram "
                    "lookup moved and point this test (and core/ngram_branches.py's docstring) there")
    tree = ast.parse(path.read_text())
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef)
               and n.name == "_find_longest_matched_ngram_and_propose_tokens"), None)
    if fn is None:
        pytest.fail("vLLM's n-gram lookup function _find_longest_matched_ngram_and_propose_tokens was renamed: "
                    "compare core/ngram_branches.py with its successor and update this test")
    fn.decorator_list = []
    ns = {"np": np}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), ns)
    return ns[fn.name]


def test_first_continuation_is_vllms_draft():
    ref = _vllm_ngram_fn()
    rng = random.Random(1)
    for _ in range(300):
        toks = [rng.randrange(3) for _ in range(rng.randrange(1, 30))]
        min_n = rng.randint(1, 3)
        max_n = rng.randint(min_n, 4)
        k = rng.randint(1, 5)
        want = ref(np.array(toks, dtype=np.int32), min_n, max_n, 10_000, k).tolist()
        got = ngram_continuations(toks, 1, min_n=min_n, max_n=max_n, length=k)
        assert (got[0] if got else []) == want, (toks, min_n, max_n, k)


def test_ngram_errors():
    with pytest.raises(NgramError, match="min_n"):
        ngram_continuations([1, 2], 1, min_n=0)
    with pytest.raises(NgramError, match="ngram_branches"):
        ngram_continuations([1, 2], -1)


# ------------------------------------------------------------------------------------------------ calibration
@pytest.mark.parametrize("scale,power", [(1.0, 0.5), (1.0, 1.0), (1.0, 2.0), (0.5, 1.0)])
def test_calibration_recovers_scale_and_exponent(scale, power):
    g = torch.Generator().manual_seed(0)
    cal = AcceptanceCalibration(2, decay=1.0)
    q = torch.rand(40000, generator=g) * 0.98 + 0.01
    acc = torch.rand(40000, generator=g) < scale * q ** power
    head = torch.randint(0, 2, (40000,), generator=g)
    cal.observe(head, q, acc)
    a = cal.refit()
    assert a.tolist() == pytest.approx([power, power, 1.0, 1.0], rel=0.15)  # nothing observed off the top path
    assert cal.scale.tolist() == pytest.approx([scale, scale, 1.0, 1.0], rel=0.15)
    cal.observe(torch.ones(40000, dtype=torch.int64), q, torch.rand(40000, generator=g) < 0.2 * q,
                off_path=torch.ones(40000, dtype=torch.bool))
    cal.refit()
    assert cal.scale[3].item() == pytest.approx(0.2, rel=0.15) and cal.exponent[3].item() == pytest.approx(1, rel=0.15)
    assert cal.scale[1].item() == pytest.approx(scale, rel=0.15)  # the top-path fit is unchanged
    out = cal.head_acceptance(torch.tensor([[0.9, 0.5], [0.4, 0.1]]))
    assert out[0, 0] > out[0, 1] and out[1, 0] > out[1, 1]


def test_calibration_ngram_rates_and_min_observations():
    cal = AcceptanceCalibration(1, ngram_prior=0.5, prior_weight=2.0, decay=1.0)
    cal.observe(torch.tensor([-1, -1, -1, -1]), torch.zeros(4), torch.tensor([True, True, False, True]),
                ngram_position=torch.tensor([0, 0, 1, 1]))
    rates = cal.ngram_acceptance()
    assert rates[0] == pytest.approx((2 + 1.0) / 4) and rates[1] == pytest.approx((1 + 1.0) / 4)
    assert cal.refit().tolist() == [1.0, 1.0]  # no head observations: stays at the prior
    with pytest.raises(CalibrationError):
        AcceptanceCalibration(0)


def test_ngram_rates_by_match_length():
    """Counts kept per suffix-match length: each length's rates shrink towards the overall ones by the prior weight,
    a length never seen reads the overall rates, unknown lengths (< 1) count only overall; saved and restored, and a
    state without these counts (written before they existed) loads with none."""
    cal = AcceptanceCalibration(1, ngram_prior=0.5, prior_weight=2.0, decay=1.0)
    acc = torch.tensor([True] * 8 + [False] * 6 + [True] * 2 + [True])
    pos = torch.zeros(17, dtype=torch.int64)
    match = torch.tensor([4] * 8 + [2] * 8 + [-1])
    cal.observe(torch.full((17,), -1), torch.zeros(17), acc, ngram_position=pos, ngram_match=match)
    overall = cal.ngram_acceptance()[0]
    assert overall == pytest.approx((11 + 1.0) / (17 + 2))
    assert cal.ngram_acceptance(match=4)[0] == pytest.approx((8 + 2 * overall) / (8 + 2))
    assert cal.ngram_acceptance(match=2)[0] == pytest.approx((2 + 2 * overall) / (8 + 2))
    assert cal.ngram_acceptance(match=3) == cal.ngram_acceptance() == cal.ngram_acceptance(match=None)
    kw = dict(ngram_prior=0.5, prior_weight=2.0, decay=1.0)
    back = AcceptanceCalibration.from_state(cal.state(), **kw)
    assert back.ngram_acceptance(match=4) == pytest.approx(cal.ngram_acceptance(match=4))
    old = {k: v for k, v in cal.state().items() if not k.startswith("ng_m_")}
    restored_old = AcceptanceCalibration.from_state(old, **kw)
    assert restored_old.ngram_acceptance(match=4) == pytest.approx(cal.ngram_acceptance())


def test_hybrid_tree_scores_each_continuation_by_its_match_length():
    """With match lengths, a continuation found by a long match outranks one found by a short match (their rates
    differ), the tree records each n-gram node's match length, and observe_step feeds it back."""
    cal = AcceptanceCalibration(2, ngram_prior=0.5, prior_weight=1.0, decay=1.0)
    cal.observe(torch.full((40,), -1), torch.zeros(40), torch.tensor([True] * 19 + [False] + [False] * 19 + [True]),
                ngram_position=torch.zeros(40, dtype=torch.int64), ngram_match=torch.tensor([4] * 20 + [2] * 20))
    probs = torch.tensor([[0.05, 0.01], [0.05, 0.01]])
    ids = torch.tensor([[90, 91], [92, 93]])
    conts = [[10, 11, 12], [20, 21, 22]]
    short_first = build_dynamic_tree(1, probs, ids, 3, calibration=cal, continuations=conts, num_branches=2,
                                     continuation_matches=[2, 4])
    assert short_first.tokens[1:].tolist() == [20, 21, 22]  # the 4-token match's branch, whole
    assert short_first.ngram_match[1:].tolist() == [4, 4, 4]
    plain = build_dynamic_tree(1, probs, ids, 3, calibration=cal, continuations=conts, num_branches=2)
    assert plain.ngram_match is None and plain.tokens[1:].tolist() == [10, 20, 11]  # one rate for both
    before = cal._ng_m_tried.clone()
    observe_step(cal, [short_first], torch.tensor([[0, 1, -1, -1]]))
    assert float((cal._ng_m_tried - before)[4].sum()) == 2  # node 1 (accepted) and its child, match length 4
    with pytest.raises(DynamicTreeError, match="match lengths"):
        build_dynamic_tree(1, probs, ids, 3, calibration=cal, continuations=conts, num_branches=2,
                           continuation_matches=[2])


def test_observe_step_counts_children_of_the_accepted_path():
    probs = torch.tensor([[0.7, 0.2], [0.6, 0.3]])
    dt = build_dynamic_tree(1, probs, torch.tensor([[3, 4], [5, 6]]), 4)
    cal = AcceptanceCalibration(2, decay=1.0)
    path_node = dt.tree.choices.index((0,)) + 1
    observe_step(cal, [dt], torch.tensor([[0, path_node, -1]]))
    # root's 2 children (one accepted) and node (0,)'s children that are in the tree
    kids = len(dt.tree.children[path_node])
    assert float(cal._tried.sum()) == 2 + kids
    assert float(cal._hits.sum()) == 1


# ------------------------------------------------------------------------------------------------ acceptance
def test_accept_each_equals_accept_per_tree():
    g = torch.Generator().manual_seed(0)
    trees = [MedusaTree.from_choices(c) for c in ([[0], [1], [0, 0]], [[0], [0, 0], [0, 0, 0]])]
    tokens = torch.randint(0, 5, (2, 4), generator=g)
    logits = torch.randn(2, 4, 5, generator=g)
    logits[0, 0, tokens[0, 1]] = 9
    logits[1, 0, tokens[1, 1]] = 9
    res = accept_each("greedy", trees, tokens, logits)
    assert res.path_nodes.shape == (2, 4)
    for r, t in enumerate(trees):
        one = accept("greedy", t, tokens[r:r + 1], logits[r:r + 1])
        assert res.accept_len[r] == one.accept_len[0] and res.bonus_token[r] == one.bonus_token[0]
        w = one.path_nodes.shape[1]
        assert res.path_nodes[r, :w].tolist() == one.path_nodes[0].tolist()
    with pytest.raises(TreeListError, match="same number"):
        accept_each("greedy", [trees[0], MedusaTree.chain(1)], tokens, logits)


# ------------------------------------------------------------------------------------------------ lossless decoding
MAX_NEW = 32


@pytest.fixture(scope="module")
def trained(tiny_medusa):
    model, tok, heads = tiny_medusa("llama")
    prompts = tiny_prompts(tok, 3)
    return model, heads, prompts, baseline_generate(model, prompts, MAX_NEW)


@pytest.mark.parametrize("budget,branches,calibrate", [(8, 0, False), (16, 0, True), (8, 2, True), (16, 3, False)])
def test_dynamic_and_hybrid_greedy_equal_plain(trained, budget, branches, calibrate):
    model, heads, prompts, ref = trained
    spec = DynamicTreeSpec(budget=budget, topk=10, num_heads=heads.num_heads, ngram_branches=branches)
    cal = AcceptanceCalibration(heads.num_heads) if calibrate else None
    out = medusa_generate(model, heads, spec, prompts, max_new_tokens=MAX_NEW, calibration=cal)
    assert out.sequences == ref
    assert out.stats.mean_accepted_tokens_per_step > 1.5, out.stats  # multi-token steps: compaction exercised
    if calibrate:
        assert float(cal._tried.sum()) > 0


def test_dynamic_eos_and_sampling_top1(trained):
    model, heads, prompts, ref = trained
    spec = DynamicTreeSpec(budget=8, num_heads=heads.num_heads, ngram_branches=1)
    eos = ref[0][5]
    out = medusa_generate(model, heads, spec, prompts, max_new_tokens=MAX_NEW, eos_token_id=eos)
    assert out.sequences == baseline_generate(model, prompts, MAX_NEW, eos_token_id=eos)
    top1 = medusa_generate(model, heads, spec, prompts, max_new_tokens=MAX_NEW, rule="sampling", temperature=1.0,
                           top_k=1, generator=torch.Generator().manual_seed(0))
    assert top1.sequences == ref


def test_accept_batch_each_equals_accept_batch_on_one_shared_tree():
    """Per-row parameters and seeded generators are split by row exactly as accept_batch groups them."""
    from medusa_plugin.core.acceptance import accept_batch
    from medusa_plugin.core.tree_list import accept_batch_each

    tree = MedusaTree.from_name("mc_sim_7b_63")
    g = torch.Generator().manual_seed(1)
    r = 4
    tokens = torch.randint(0, 6, (r, tree.num_nodes + 1), generator=g)
    logits = torch.randn(r, tree.num_nodes + 1, 6, generator=g) * 3
    kw = dict(temperature=torch.tensor([0.0, 0.7, 1.0, 0.0]), top_k=torch.tensor([0, 3, 0, 0]),
              top_p=torch.tensor([1.0, 1.0, 0.9, 1.0]), num_valid=torch.tensor([64, 20, 64, 5]))
    want = accept_batch(tree, tokens, logits, **kw, generators={1: torch.Generator().manual_seed(5),
                                                               2: torch.Generator().manual_seed(6)})
    got = accept_batch_each([tree] * r, tokens, logits, **kw, generators={1: torch.Generator().manual_seed(5),
                                                                          2: torch.Generator().manual_seed(6)})
    for a, b in zip(got, want):
        assert torch.equal(a, b)
