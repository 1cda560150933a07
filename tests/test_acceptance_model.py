"""The learned node-acceptance model of dynamic trees (core/acceptance_model.py, hf/fit_acceptance.py): features
against brute-force constructions, the numpy MLP against torch, the file format and its errors, tree selection with
the model against a sorted lattice, and lossless decoding with it."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from medusa_plugin.core.acceptance_model import (FEATURE_VERSION, AcceptanceModelError, ContextGrams,
                                                 NodeAcceptanceModel, fit_node_acceptance, node_features,
                                                 num_features, training_examples)
from medusa_plugin.core.calibration import AcceptanceCalibration
from medusa_plugin.core.dynamic_tree import DynamicTreeError, DynamicTreeSpec, build_dynamic_tree
from medusa_plugin.core.successor_prior import NUM_LEVELS, SuccessorCounts


def _random_model(num_heads: int, hidden: int = 8, seed: int = 0) -> NodeAcceptanceModel:
    g = np.random.default_rng(seed)
    nf = num_features(num_heads)
    w = [g.normal(size=(nf, hidden)), g.normal(size=hidden), g.normal(size=(hidden, hidden)) / 3,
         g.normal(size=hidden), g.normal(size=(hidden, 1)), g.normal(size=1)]
    return NodeAcceptanceModel(num_heads, w, {"successors": True})


# ------------------------------------------------------------------------------------------------ features
@pytest.mark.parametrize("seed", range(3))
def test_context_grams_equal_a_scan(seed):
    rng = random.Random(seed)
    ctx = [rng.randrange(12) for _ in range(rng.randrange(1, 60))]
    grams = ContextGrams(ctx)
    for a in range(13):
        assert grams.count(a) == ctx.count(a)
        assert grams.after(a) == {ctx[i + 1] for i in range(len(ctx) - 1) if ctx[i] == a}
    for _ in range(200):  # the longest matched prefix, against a scan of every occurrence
        prev = [rng.randrange(12) for _ in range(rng.randrange(1, 6))]
        tok = rng.randrange(12)
        want = max([n for n in range(1, min(4, len(prev)) + 1) for i in range(len(ctx) - n)
                    if ctx[i:i + n] == prev[len(prev) - n:] and ctx[i + n] == tok], default=0)
        assert grams.match_length(prev, tok) == want, (prev, tok)


@pytest.mark.parametrize("seed", range(4))
def test_node_features_columns(seed):
    rng = random.Random(seed)
    k_heads, topk = 3, 6
    ctx = [rng.randrange(20) for _ in range(30)]
    ctx += ctx[:8 + seed]  # the last tokens occur before too, so 3- and 4-token matches exist
    succ = SuccessorCounts.from_sequences([[rng.randrange(20) for _ in range(80)]])
    probs = sorted((rng.random() for _ in range(topk)), reverse=True)
    tokens = rng.sample(range(20), topk)
    if ctx[8 + seed] not in tokens:  # the token after the earlier occurrence
        tokens[rng.randrange(topk)] = ctx[8 + seed]
    head, top, p2, p1 = rng.randrange(k_heads), bool(seed % 2), ctx[-2], ctx[-1]
    for prev in (ctx[-3:], ctx[-4:]):
        f, levels = node_features(k_heads, head, top, probs, tokens, prev, ContextGrams(ctx), succ)
        assert f.shape == (topk, k_heads + 25) and f.dtype == np.float32
        for r, t in enumerate(tokens):
            row = f[r].tolist()
            assert row[:k_heads] == [float(h == head) for h in range(k_heads)]
            assert row[k_heads] == float(top)
            assert row[k_heads + 1] == pytest.approx(math.log(probs[r]) / 5, abs=1e-6)
            lv = succ.level(p2, p1, t)
            assert levels[r] == lv
            assert row[k_heads + 2:k_heads + 2 + NUM_LEVELS] == [float(i == lv) for i in range(NUM_LEVELS)]
            c = k_heads + 2 + NUM_LEVELS
            assert row[c] == pytest.approx(r / 10)
            match = [n <= len(prev) and any(ctx[i:i + n + 1] == prev[len(prev) - n:] + [t]
                                            for i in range(len(ctx) - n)) for n in (1, 2, 3, 4)]
            assert row[c + 1:c + 8] == pytest.approx([float(match[0]), float(match[1]),
                                                      math.log1p(ctx.count(t)) / 3, float(t not in ctx),
                                                      float(t == p1), float(match[2]), float(match[3])])
        assert f[:, c + 7].any() == (len(prev) == 4)  # the planted repeat matches 4 tokens
    f0, levels0 = node_features(k_heads, head, top, probs, tokens, prev, ContextGrams(ctx), None)
    assert levels0 == [-1] * topk and not f0[:, k_heads + 2:k_heads + 2 + NUM_LEVELS].any()


def test_training_examples_stop_where_the_lattice_misses():
    k_heads, topk = 3, 4
    ids = np.array([[5, 6, 7, 8], [1, 2, 3, 4], [9, 10, 11, 12]])
    probs = np.full((k_heads, topk), 0.25)
    ctx = [0, 1, 2]
    # the target's tokens: rank 1 of head 0, rank 0 of head 1, then a token head 2 does not have
    x, y = training_examples([(probs, ids, [6, 1, 99], ctx)], k_heads, None)
    assert x.shape == (3 * topk, k_heads + 25)
    assert y.tolist() == [0, 1, 0, 0] + [1, 0, 0, 0] + [0, 0, 0, 0]
    assert x[:topk, k_heads].all() and not x[topk:, k_heads].any()  # head 1's parent (rank 1) is off the top path
    x, y = training_examples([(probs, ids, [42, 1, 9], ctx)], k_heads, None)  # head 0 misses: one head's rows
    assert x.shape[0] == topk and y.sum() == 0
    with pytest.raises(AcceptanceModelError, match="no positions"):
        training_examples([], k_heads, None)


# ------------------------------------------------------------------------------------------------ the MLP
def test_numpy_forward_equals_torch():
    m = _random_model(4, hidden=16)
    x = np.random.default_rng(1).normal(size=(50, num_features(4))).astype(np.float32)
    w1, b1, w2, b2, w3, b3 = (torch.from_numpy(w).double() for w in m.weights)
    h = torch.nn.functional.silu(torch.from_numpy(x).double() @ w1 + b1)
    h = torch.nn.functional.silu(h @ w2 + b2)
    ref = torch.sigmoid(h @ w3 + b3)[:, 0].numpy()
    got = m.probability(x)
    assert got.dtype == np.float64 and got.shape == (50,)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_fit_learns_the_signal_and_is_deterministic():
    rng = np.random.default_rng(0)
    k_heads = 2
    x = np.zeros((4000, num_features(k_heads)), dtype=np.float32)
    x[:, 0] = 1
    x[:, k_heads + 1] = np.log(rng.uniform(1e-3, 1, 4000)) / 5  # log q
    ctx_col = k_heads + 2 + NUM_LEVELS + 1
    x[:, ctx_col] = rng.integers(0, 2, 4000)                      # bigram in context
    p = np.where(x[:, ctx_col] > 0, 0.8, 0.1)
    y = (rng.uniform(size=4000) < p).astype(np.float32)
    m = fit_node_acceptance(x, y, k_heads, epochs=20)
    got = m.probability(x)
    assert abs(got[x[:, ctx_col] > 0].mean() - 0.8) < 0.05 and abs(got[x[:, ctx_col] == 0].mean() - 0.1) < 0.05
    again = fit_node_acceptance(x, y, k_heads, epochs=20)
    assert all(np.array_equal(a, b) for a, b in zip(m.weights, again.weights))
    with pytest.raises(AcceptanceModelError, match="expected x"):
        fit_node_acceptance(x[:, :-1], y, k_heads)
    with pytest.raises(AcceptanceModelError, match="no accepted node"):
        fit_node_acceptance(x, np.zeros_like(y), k_heads)


def test_file_round_trip_and_errors(tmp_path):
    m = _random_model(3)
    path = m.save(tmp_path / "m.safetensors")
    back = NodeAcceptanceModel.load(path, 3)
    assert back.num_heads == 3 and back.info == {"successors": "True"}
    assert all(np.array_equal(a, b) for a, b in zip(m.weights, back.weights))
    with pytest.raises(AcceptanceModelError, match="fitted for 3 heads, the checkpoint has 4"):
        NodeAcceptanceModel.load(path, 4)
    with pytest.raises(AcceptanceModelError, match="not found"):
        NodeAcceptanceModel.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(AcceptanceModelError, match="is not an acceptance model"):
        NodeAcceptanceModel.load(bad)
    from safetensors.torch import save_file

    w = {n: torch.from_numpy(np.ascontiguousarray(t)) for n, t in zip(("w1", "b1", "w2", "b2", "w3", "b3"),
                                                                       m.weights)}
    save_file(w, str(tmp_path / "v0.safetensors"), metadata={"format": "medusa_plugin node acceptance model",
                                                             "feature_version": "0", "num_heads": "3"})
    with pytest.raises(AcceptanceModelError, match=f"feature version 0, this version reads {FEATURE_VERSION}"):
        NodeAcceptanceModel.load(tmp_path / "v0.safetensors")
    save_file(w, str(tmp_path / "k5.safetensors"), metadata={"format": "medusa_plugin node acceptance model",
                                                             "feature_version": str(FEATURE_VERSION),
                                                             "num_heads": "5"})
    with pytest.raises(AcceptanceModelError, match="do not form a 30-feature MLP for 5 heads"):
        NodeAcceptanceModel.load(tmp_path / "k5.safetensors")


# ------------------------------------------------------------------------------------------------ trees
@pytest.mark.parametrize("seed", range(4))
def test_tree_is_the_best_nodes_by_model_path_score(seed):
    """Every node's score is its parent's times the model's probability for it, and the tree is the budget best
    nodes of the whole lattice by (score desc, depth asc, slot path asc)."""
    rng = random.Random(seed)
    k_heads, topk = 3, 3
    model = _random_model(k_heads, seed=seed)
    succ = SuccessorCounts.from_sequences([[rng.randrange(10) for _ in range(60)]])
    ctx = [rng.randrange(10) for _ in range(30)]
    probs = torch.tensor([sorted((rng.random() for _ in range(topk)), reverse=True) for _ in range(k_heads)])
    ids = torch.tensor([rng.sample(range(10), topk) for _ in range(k_heads)])
    grams = ContextGrams(ctx)

    def score(path):
        s, prev = 1.0, list(ctx[-4:])
        for d, r in enumerate(path):
            top = all(x == 0 for x in path[:d])
            f, _ = node_features(k_heads, d, top, probs[d].tolist(), ids[d].tolist(), prev, grams, succ)
            s *= float(model.probability(f)[r])
            prev.append(int(ids[d, r]))
        return s

    every = [p for d in range(1, k_heads + 1) for p in itertools.product(range(topk), repeat=d)]
    ranked = sorted(every, key=lambda p: (-score(p), len(p), p))
    for budget in (1, 5, 12, 39):
        dt = build_dynamic_tree(ctx[-1], probs, ids, budget, successors=succ, prev_token=ctx[-2],
                                acceptance_model=model, context=ctx)
        assert sorted(dt.tree.choices, key=lambda p: (len(p), p)) == sorted(ranked[:budget], key=lambda p: (len(p), p))
        for i, path in enumerate(dt.tree.choices, start=1):
            assert float(dt.score[i]) == pytest.approx(score(path), rel=1e-9)
            assert int(dt.tokens[i]) == int(ids[len(path) - 1, path[-1]])


def test_tree_errors_name_the_fix():
    model = _random_model(3)
    probs, ids = torch.full((2, 3), 0.3), torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(DynamicTreeError, match="fitted for 3 heads, the tree uses 2"):
        build_dynamic_tree(0, probs, ids, 4, acceptance_model=model, context=[0])
    with pytest.raises(DynamicTreeError, match="reads successor levels"):
        build_dynamic_tree(0, torch.full((3, 3), 0.3), torch.arange(9).view(3, 3), 4, acceptance_model=model,
                           context=[0])
    with pytest.raises(DynamicTreeError, match="need each request's tokens"):
        DynamicTreeSpec(budget=4, topk=3).build_from_topk(torch.tensor([0]), torch.full((1, 3, 3), 0.3),
                                                          torch.arange(9).view(1, 3, 3), acceptance_model=model)


# ------------------------------------------------------------------------------------------------ decoding
def test_fitted_model_decodes_losslessly_and_the_cli_writes_it(tiny_medusa, tmp_path):
    """fit-acceptance's functions on the tiny model; greedy decoding with the fitted model equals plain decoding."""
    from medusa_plugin.hf.fit_acceptance import fit_acceptance_model
    from medusa_plugin.hf.generate import baseline_generate, medusa_generate
    from medusa_plugin.testing import tiny_prompts

    model, tok, heads = tiny_medusa("llama")
    prompts = tiny_prompts(tok, 6)
    succ = SuccessorCounts.from_sequences(prompts)
    fitted = fit_acceptance_model(model, heads, prompts[:4], succ, max_new_tokens=24, log=lambda *_: None)
    assert fitted.info["successors"] is True and fitted.num_heads == heads.num_heads
    path = fitted.save(tmp_path / "acceptance_model.safetensors")
    loaded = NodeAcceptanceModel.load(path, heads.num_heads)
    ref = baseline_generate(model, prompts[4:], 32)
    for branches in (0, 2):  # dynamic, and hybrid (n-gram branches scored by the calibration's rates)
        spec = DynamicTreeSpec(budget=8, topk=10, ngram_branches=branches)
        out = medusa_generate(model, heads, spec, prompts[4:], max_new_tokens=32, successors=succ,
                              acceptance_model=loaded, calibration=AcceptanceCalibration(heads.num_heads))
        assert out.sequences == ref
        assert out.stats.mean_accepted_tokens_per_step > 1.5, out.stats


# ------------------------------------------------------------------------------------------------ bad input
def test_malformed_files_and_inputs_are_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    m = _random_model(3)
    w = {n: torch.from_numpy(np.ascontiguousarray(t)) for n, t in zip(("w1", "b1", "w2", "b2", "w3", "b3"),
                                                                       m.weights)}
    for heads in (None, "four"):
        meta = {"format": "medusa_plugin node acceptance model", "feature_version": str(FEATURE_VERSION)}
        if heads is not None:
            meta["num_heads"] = heads
        save_file(w, str(tmp_path / "m.safetensors"), metadata=meta)
        with pytest.raises(AcceptanceModelError, match="does not say how many heads"):
            NodeAcceptanceModel.load(tmp_path / "m.safetensors")
    with pytest.raises(AcceptanceModelError, match="do not form"):
        NodeAcceptanceModel(3, [m.weights[0][0]] + m.weights[1:])  # a 1-D w1
    probs, ids = torch.full((1, 3, 3), 0.3), torch.arange(9).view(1, 3, 3)
    with pytest.raises(DynamicTreeError, match="2 contexts for 1 requests"):
        DynamicTreeSpec(budget=4, topk=3).build_from_topk(torch.tensor([0]), probs, ids, [[0], [1]],
                                                          acceptance_model=m)


def test_a_model_fitted_without_successor_levels_ignores_them():
    rng = random.Random(0)
    m = NodeAcceptanceModel(3, _random_model(3).weights, {"successors": False})
    succ = SuccessorCounts.from_sequences([[rng.randrange(10) for _ in range(60)]])
    ctx = [rng.randrange(10) for _ in range(20)]
    probs, ids = torch.rand(3, 4).sort(-1, descending=True).values, torch.tensor([rng.sample(range(10), 4)
                                                                                  for _ in range(3)])
    a = build_dynamic_tree(ctx[-1], probs, ids, 6, successors=succ, acceptance_model=m, context=ctx)
    b = build_dynamic_tree(ctx[-1], probs, ids, 6, successors=None, acceptance_model=m, context=ctx)
    assert a.tree.choices == b.tree.choices and torch.equal(a.score, b.score)


def test_fit_acceptance_checks_its_inputs_before_loading_the_model(tmp_path, capsys):
    from medusa_plugin.cli import main

    heads = tmp_path / "heads"
    heads.mkdir()
    for argv, msg in (
            (["--heads", str(heads), "--prompts", "p.txt", "--out", str(tmp_path / "no" / "m.safetensors")],
             "cannot write"),
            (["--heads", str(heads), "--prompts", "p.txt", "--out", str(tmp_path)], "cannot write"),
            (["--heads", str(heads), "--prompts", str(tmp_path / "missing.txt")], "no such file"),
            (["--heads", str(heads), "--prompts", "p.txt", "--batch-size", "0"], "--batch-size >= 1"),
            (["--heads", str(heads), "--prompts", "p.txt", "--no-successors", "--successors", "s"], "contradict")):
        assert main(["fit-acceptance", "--model", str(tmp_path / "not_a_model"), *argv]) == 1
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err


def test_validate_check_files_loads_the_acceptance_model(tmp_path, tiny_cache_dir):
    import shutil

    from medusa_plugin.core.config import MedusaConfigError, check_local_files, load_config, validate
    from medusa_plugin.testing import build_tiny_medusa

    _, heads_dir = build_tiny_medusa(tiny_cache_dir / "medusa")
    heads = tmp_path / "heads"
    shutil.copytree(heads_dir, heads)
    (heads / "acceptance_model.safetensors").write_bytes(b"garbage")
    cfg = load_config({"heads": str(heads), "tree": "dynamic", "budget": 4})
    with pytest.raises(MedusaConfigError, match="is not an acceptance model"):
        check_local_files(cfg, validate(cfg))
    cfg = load_config({"heads": str(heads), "tree": "dynamic", "budget": 4, "acceptance_model": False})
    check_local_files(cfg, validate(cfg))


def test_numpy_contexts_as_the_engine_passes_them_build_the_same_trees():
    """The engine hands each request's tokens as a numpy array slice (input_batch.token_ids_cpu)."""
    rng = random.Random(3)
    m = _random_model(3, seed=3)
    succ = SuccessorCounts.from_sequences([[rng.randrange(10) for _ in range(60)]])
    ctxs = [[rng.randrange(10) for _ in range(n)] for n in (1, 2, 9, 30)]
    probs = torch.rand(len(ctxs), 3, 5).sort(-1, descending=True).values
    ids = torch.stack([torch.tensor([rng.sample(range(10), 5) for _ in range(3)]) for _ in ctxs])
    roots = torch.tensor([c[-1] for c in ctxs])
    spec = DynamicTreeSpec(budget=7, topk=5, ngram_branches=1)
    as_lists = spec.build_from_topk(roots, probs, ids, ctxs, successors=succ, acceptance_model=m)
    as_numpy = spec.build_from_topk(roots, probs, ids, [np.asarray(c, dtype=np.int64) for c in ctxs],
                                    successors=succ, acceptance_model=m)
    for a, b in zip(as_lists, as_numpy):
        assert a.tree.choices == b.tree.choices and torch.equal(a.tokens, b.tokens)


def test_long_contexts_read_only_the_window():
    """A context longer than CONTEXT_WINDOW scores like its last CONTEXT_WINDOW tokens (bounded cost per step)."""
    from medusa_plugin.core.acceptance_model import CONTEXT_WINDOW

    rng = random.Random(4)
    head = [rng.randrange(50) for _ in range(3000)]
    tail = [rng.randrange(50) for _ in range(CONTEXT_WINDOW)]
    grams, window = ContextGrams(head + tail), ContextGrams(tail)
    for t in range(50):
        assert grams.count(t) == window.count(t) == tail.count(t)
        assert grams.after(t) == window.after(t)
