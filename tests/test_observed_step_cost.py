"""ObservedStepCost: the engine's own step-time ratio (drafted / plain) per batch size, and the correction it makes to
a measured overhead table."""
import pytest

from medusa_plugin.core.observed_step_cost import MIN_SCALE, ObservedStepCost


@pytest.mark.parametrize("z", [0.0, 1.0])
def test_ratio_needs_both_sides_and_is_robust_to_a_slow_step(z):
    o = ObservedStepCost(min_steps=3, z=z)
    for t in (20.0, 21.0, 19.0):
        o.add(4, 0, t)
    assert o.ratio(4, 1) is None
    for t in (30.0, 31.0, 29.0, 300.0):  # one step with a prefill chunk or a pause
        o.add(4, 1, t)
    # median over median, raised by z robust standard errors (1.4826 * MAD / median / sqrt(n), per side)
    se = ((1.4826 * 1.0 / 20.0 / 3 ** 0.5) ** 2 + (1.4826 * 1.0 / 30.5 / 4 ** 0.5) ** 2) ** 0.5
    assert o.ratio(4, 1) == pytest.approx(30.5 / 20.0 * (1 + z * se))
    assert o.ratio(2, 1) is None and o.ratio(4, 0) is None
    assert o.ratios() == {4: {1: pytest.approx(30.5 / 20.0 * (1 + z * se))}}
    assert o.ratios_at(4) == o.ratios()[4] and o.ratios_at(2) == {}


def test_window_and_age_forget_old_steps():
    o = ObservedStepCost(window=4, min_steps=2, max_age=100)
    for _ in range(4):
        o.add(1, 0, 10.0)
        o.add(1, 2, 30.0)
    for _ in range(4):
        o.add(1, 2, 12.0)
    assert o.count(1, 2) == 4 and o.ratio(1, 2) == pytest.approx(1.2)
    for _ in range(100):  # 100 plain steps later the drafted ones are too old to price anything
        o.add(1, 0, 10.0)
    assert o.count(1, 2) == 0 and o.ratio(1, 2) is None


def test_apply_replaces_observed_points_and_scales_the_rest_of_their_batch_size():
    o = ObservedStepCost(min_steps=1)
    o.add(4, 0, 10.0)
    o.add(4, 1, 16.0)  # observed 1.6 where the table said 1.2: its extra cost is 3x the measured one
    o.add(3, 0, 10.0)  # batch size 3 maps to the table's 4 (nearest in log scale): no ratio yet, nothing changes
    batch_sizes, qs = [1, 2, 4], [1, 2, 3]
    table = [[1.0, 1.1, 1.2], [1.0, 1.15, 1.3], [1.0, 1.2, 1.4]]
    got = o.apply(batch_sizes, qs, table)
    assert got[0] == table[0] and got[1] == table[1]  # not observed: as measured
    assert got[2] == pytest.approx([1.0, 1.6, 1.0 + 0.4 * 3.0])
    assert table[2] == [1.0, 1.2, 1.4]  # a copy
    fast = ObservedStepCost(min_steps=1)
    fast.add(16, 0, 10.0)
    fast.add(16, 2, 9.0)  # faster with drafts than without (noise): taken as observed where it was observed, and
    # smaller sizes interpolated from the plain step (B=16 -> 4)
    assert fast.apply(batch_sizes, qs, table)[2] == pytest.approx([1.0, 0.95, 0.9])
    wide = [1, 3, 5, 9, 17]  # ... wider sizes keep at least MIN_SCALE of their measured extra cost: no free trees
    assert fast.apply([4], wide, [[1.0, 1.2, 1.5, 2.0, 3.0]])[0] == pytest.approx(
        [1.0, 0.9, 1.0 + 0.5 * MIN_SCALE, 1.0 + 1.0 * MIN_SCALE, 1.0 + 2.0 * MIN_SCALE])
    cheap = ObservedStepCost(min_steps=1)
    cheap.add(4, 0, 10.0)
    cheap.add(4, 1, 11.0)  # extra 0.1 where the table said 0.2: half, the floor; a quarter would not go lower
    assert cheap.apply(batch_sizes, qs, table)[2] == pytest.approx([1.0, 1.1, 1.2])
    cheaper = ObservedStepCost(min_steps=1)
    cheaper.add(4, 0, 10.0)
    cheaper.add(4, 1, 10.5)
    assert cheaper.apply(batch_sizes, qs, table)[2] == pytest.approx([1.0, 1.05, 1.2])


def test_sizes_between_observed_ones_are_interpolated():
    """Session 14's e2e run: at 8 requests a noisy one-node ratio below 1 and an observed 8-node ratio of 3.7; four
    nodes used to take the (nearer) one-node scale and look cheaper than plain."""
    o = ObservedStepCost(min_steps=1)
    o.add(8, 0, 10.0)
    o.add(8, 1, 9.64)
    o.add(8, 8, 36.86)
    o.add(8, 16, 51.0)
    qs = [1, 2, 5, 9, 13, 17, 33]
    got = o.apply([8], qs, [[1.0, 1.2, 1.6, 2.0, 2.4, 2.8, 4.4]])[0]
    assert got[:2] == pytest.approx([1.0, 0.964]) and got[3] == pytest.approx(3.686) and got[5] == pytest.approx(5.1)
    assert got[2] == pytest.approx(0.964 + (3.686 - 0.964) * 3 / 7)
    assert got[4] == pytest.approx(3.686 + (5.1 - 3.686) * 4 / 8)
    assert got[6] == pytest.approx(1.0 + 3.4 * (4.1 / 1.8))  # beyond: the widest observed size's scale


def test_bad_arguments():
    with pytest.raises(ValueError, match="window"):
        ObservedStepCost(window=0)
    with pytest.raises(ValueError, match="max_age"):
        ObservedStepCost(max_age=0)
    o = ObservedStepCost()
    with pytest.raises(ValueError, match="batch_size"):
        o.add(0, 1, 5.0)
    with pytest.raises(ValueError, match="step_ms"):
        o.add(1, 1, 0.0)


def test_a_curve_is_scaled_to_the_observed_ratio_less_the_drafting_time():
    o = ObservedStepCost(min_steps=1)
    curve = lambda m: 10.0 + 0.5 * m  # noqa: E731 - a step of 2 requests: 10 ms plain, 0.5 ms per draft row
    assert o.correct_curve(2, curve) is curve  # nothing observed
    o.add(2, 0, 10.0)
    o.add(2, 4, 21.0)  # 4 nodes each (8 rows): observed 2.1x, of which 1 ms drafting -> 10 ms for 8 rows, not 4
    got = o.correct_curve(2, curve, drafting_ms=1.0)
    assert got(0) == pytest.approx(10.0) and got(8) == pytest.approx(20.0) and got(4) == pytest.approx(15.0)
    free = o.correct_curve(2, lambda m: 10.0, drafting_ms=1.0)  # the table calls rows free: linear in rows
    assert free(8) == pytest.approx(20.0) and free(2) == pytest.approx(12.5)
    o.add(2, 0, 10.0)
    o.add(2, 0, 10.0)
    o.add(2, 4, 9.0)
    o.add(2, 4, 9.0)  # drafted steps now read cheaper than plain ones (noise): rows keep MIN_SCALE of their cost
    got = o.correct_curve(2, curve)
    assert got(8) == pytest.approx(10.0 + 4.0 * MIN_SCALE) and got(0) == pytest.approx(10.0)
