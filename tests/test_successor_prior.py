"""Successor counts (bigram / trigram of the target's text) and their levels; the calibration's per-level
multipliers and its saved prior; dynamic trees re-scored by them."""
import json
import math

import pytest
import torch

from medusa_plugin.core.calibration import (CALIBRATION_FILE, AcceptanceCalibration, CalibrationError,
                                            calibration_for)
from medusa_plugin.core.dynamic_tree import build_dynamic_tree, observe_step, select_nodes
from medusa_plugin.core.successor_prior import NUM_LEVELS, SuccessorCounts, SuccessorPriorError


def _brute_level(seqs, a, b, c):
    tri = [(s[i - 2], s[i - 1], s[i]) for s in seqs for i in range(2, len(s))]
    bi = [(s[i - 1], s[i]) for s in seqs for i in range(1, len(s))]

    def bin_(x):
        return 0 if x <= 0 else 1 + min(5, int(-math.log(x) / math.log(3)))

    ctx3 = [t for t in tri if t[:2] == (a, b)]
    if a is not None and ctx3:
        return 8 + bin_(sum(t[2] == c for t in ctx3) / (len(ctx3) + 1))
    ctx2 = [t for t in bi if t[0] == b]
    if ctx2:
        return 1 + bin_(sum(t[1] == c for t in ctx2) / (len(ctx2) + 1))
    return 0


def test_levels_equal_a_brute_force_count_and_survive_a_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 6, (int(n),), generator=g).tolist() for n in torch.randint(3, 40, (30,), generator=g)]
    counts = SuccessorCounts.from_sequences(seqs)
    loaded = SuccessorCounts.load(counts.save(tmp_path / "s.safetensors"))
    assert loaded.tokens == counts.tokens == sum(map(len, seqs))
    for a in [None, 0, 1, 2, 7]:
        for b in range(8):
            for c in range(7):
                want = _brute_level(seqs, a, b, c)
                assert counts.level(a, b, c) == want == loaded.level(a, b, c), (a, b, c)
            assert counts.levels(a, b, list(range(7))) == [_brute_level(seqs, a, b, c) for c in range(7)]
    assert {counts.level(None, 9, 0), counts.level(9, 9, 0)} == {0}  # nothing ever followed 9


def test_bad_files_are_one_line(tmp_path):
    with pytest.raises(SuccessorPriorError, match="not found.*successors: off"):
        SuccessorCounts.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SuccessorPriorError, match="is not a successor-count file") as e:
        SuccessorCounts.load(bad)
    assert "\n" not in str(e.value)


def test_level_multipliers_learn_how_much_more_a_level_is_accepted():
    cal = AcceptanceCalibration(2, decay=1.0)
    n = 400
    head = torch.zeros(n, dtype=torch.int64)
    prob = torch.full((n,), 0.2, dtype=torch.float64)
    level = torch.tensor([9] * (n // 2) + [0] * (n // 2))
    acc = torch.zeros(n, dtype=torch.bool)
    acc[: n // 4] = True  # level 9: accepted half the time (2.5x its probability); level 0: never
    cal.observe(head, prob, acc, level=level)
    cal.refit()
    m = cal.level_multipliers()
    assert len(m) == 4 and len(m[0]) == NUM_LEVELS
    s, a = float(cal.scale[0]), float(cal.exponent[0])
    # the multiplier is hits / predicted, with the prediction of the observation time (s = a = 1 then)
    assert m[0][9] == pytest.approx((100 + 4) / (200 * 0.2 + 4))
    assert m[0][0] == pytest.approx(4 / (200 * 0.2 + 4))
    assert m[1] == [1.0] * NUM_LEVELS and (s, a) != (1.0, 1.0)  # head 1 unobserved; head 0's fit moved


def test_a_saved_calibration_is_the_prior_of_a_fresh_one(tmp_path):
    cal = AcceptanceCalibration(2, decay=1.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        head = torch.randint(0, 2, (20,), generator=g)
        prob = torch.rand(20, generator=g, dtype=torch.float64)
        acc = torch.rand(20, generator=g, dtype=torch.float64) < prob * 0.5
        cal.observe(head, prob, acc, off_path=torch.rand(20, generator=g) < 0.3,
                    level=torch.randint(-1, NUM_LEVELS, (20,), generator=g))
    cal.refit()
    back = AcceptanceCalibration.from_state(json.loads(json.dumps(cal.state())), max_weight=None)
    assert torch.equal(back.scale, cal.scale) and torch.equal(back.exponent, cal.exponent)
    assert torch.tensor(back.level_multipliers()).allclose(torch.tensor(cal.level_multipliers()))
    light = AcceptanceCalibration.from_state(cal.state(), max_weight=100.0)
    assert float(light._tried.sum()) == pytest.approx(100.0)
    assert torch.equal(light.scale, cal.scale)  # same proportions: the same fit
    # next to heads: loaded by calibration_for; refused for other heads or a broken file
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(cal.state()))
    got, how = calibration_for(tmp_path, 2)
    assert "prior from" in how and torch.equal(got.scale, cal.scale)
    with pytest.raises(CalibrationError, match="calibrates 2 heads, the checkpoint has 3"):
        calibration_for(tmp_path, 3)
    (tmp_path / CALIBRATION_FILE).write_text('{"format": "something else"}')
    with pytest.raises(CalibrationError, match="not a calibration state.*delete it"):
        calibration_for(tmp_path, 2)
    assert "fresh" in calibration_for(tmp_path / "none", 2)[1]


def test_rescoring_reorders_the_lattice_and_records_levels():
    factors = [[0.5, 0.3], [0.4, 0.35]]
    tokens = [[10, 11], [20, 21]]
    plain = select_nodes(factors, tokens, 3)
    assert [n["slots"] for n in plain] == [(0,), (1,), (0, 0)]

    def rescore(p2, p1, head, off, tok):  # token 21 always follows 10: 3x; 20 never does
        if head == 1 and p1 == 10:
            return (3.0, 12) if tok == 21 else (0.1, 1)
        return 1.0, 0

    got = select_nodes(factors, tokens, 3, rescore=rescore, context=[5, 7])
    assert [n["slots"] for n in got] == [(0,), (0, 1), (1,)]  # 0.5 * min(1, 0.35 * 3) = 0.5 > 0.3
    assert [n["level"] for n in got] == [0, 12, 0]
    assert got[1]["score"] == pytest.approx(0.5)


def test_dynamic_tree_levels_reach_the_calibration():
    counts = SuccessorCounts.from_sequences([[1, 2, 3, 4], [1, 2, 3, 5]])
    cal = AcceptanceCalibration(2)
    probs = torch.tensor([[0.6, 0.3], [0.5, 0.4]])
    ids = torch.tensor([[3, 6], [4, 7]])
    dt = build_dynamic_tree(2, probs, ids, 4, calibration=cal, successors=counts, prev_token=1)
    by_token = {int(dt.tokens[i]): int(dt.level[i]) for i in range(1, dt.num_nodes + 1)}
    assert by_token[3] == counts.level(1, 2, 3) >= 8  # (1, 2) -> 3 was seen: a trigram level
    assert int(dt.level[0]) == -1
    path = torch.tensor([[0, 1, -1]])  # root, then node 1 accepted
    observe_step(cal, [dt], path)
    assert float(cal._lv_pred.sum()) > 0


def test_the_successors_setting_is_a_boolean():
    from medusa_plugin.core.config import MedusaConfigError, load_config

    assert load_config({"heads": "h", "tree": "dynamic"}).successors is True
    assert load_config({"heads": "h", "tree": "dynamic", "successors": False}).successors is False
    with pytest.raises(MedusaConfigError, match="'successors' must be true or false"):
        load_config({"heads": "h", "tree": "dynamic", "successors": "yes"})
