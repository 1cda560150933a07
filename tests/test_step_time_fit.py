"""StepTimeFit: the per-step and per-draft-row time beyond the measured forward, recovered from noisy steps."""
import random

import pytest

from medusa_plugin.core.step_time_fit import StepTimeFit


def _steps(fit, fixed, per_row, rows, n=100, noise=0.5, seed=0):
    rng = random.Random(seed)
    for i in range(n):
        x = rows[i % len(rows)]
        fit.add(x, fixed + per_row * x + rng.uniform(-noise, noise))


def test_recovers_fixed_and_per_row_time_despite_outliers():
    fit = StepTimeFit(window=128)
    _steps(fit, fixed=6.0, per_row=1.5, rows=[0, 4, 8, 16], n=120)
    for x in (0, 8, 16):  # prefill chunks / pauses: large residuals that must not move the fit
        fit.add(x, 400.0)
    assert fit.fixed_ms == pytest.approx(6.0, abs=0.3)
    assert fit.tree_row_ms == pytest.approx(1.5, abs=0.05)


def test_one_row_count_only_is_read_as_fixed_time():
    fit = StepTimeFit()
    _steps(fit, fixed=2.0, per_row=1.0, rows=[4], n=20, noise=0.0)
    assert fit.fixed_ms == pytest.approx(6.0) and fit.tree_row_ms == 0.0


def test_window_forgets_old_load_and_fit_is_clamped():
    fit = StepTimeFit(window=32)
    _steps(fit, fixed=50.0, per_row=3.0, rows=[0, 2], n=32)
    _steps(fit, fixed=5.0, per_row=0.5, rows=[0, 2], n=32, noise=0.0)
    assert fit.fixed_ms == pytest.approx(5.0) and fit.tree_row_ms == pytest.approx(0.5)
    neg = StepTimeFit()
    _steps(neg, fixed=-3.0, per_row=-1.0, rows=[0, 5], n=10, noise=0.0)
    assert neg.fixed_ms == 0.0 and neg.tree_row_ms == 0.0


def test_too_few_steps_and_bad_arguments():
    fit = StepTimeFit(min_steps=4)
    _steps(fit, fixed=9.0, per_row=0.0, rows=[0], n=3)
    assert fit.fixed_ms == 0.0
    with pytest.raises(ValueError, match="tree_rows must be >= 0"):
        fit.add(-1, 1.0)
    with pytest.raises(ValueError, match="window"):
        StepTimeFit(window=1)


@pytest.mark.parametrize("min_group, tilted", [(2, False), (1, True)])
def test_a_rare_row_count_with_a_slow_step_does_not_tilt_the_per_row_time(min_group, tilted):
    # one slow step at a row count seen once set the line's start and read as ~4 ms per row
    fit = StepTimeFit(min_group=min_group)
    _steps(fit, fixed=4.0, per_row=0.5, rows=[2, 4], n=100)
    fit.add(16, 60.0)
    assert (fit.tree_row_ms > 1.0) is tilted
    if not tilted:
        assert fit.tree_row_ms == pytest.approx(0.5, abs=0.1) and fit.fixed_ms == pytest.approx(4.0, abs=0.4)
    with pytest.raises(ValueError, match="min_group"):
        StepTimeFit(min_group=0)


def test_refit_every_n_steps_once_the_window_is_full():
    """refit_every=8: while the window fills, every step refits; once full, the fit moves only every 8 steps, and then
    equals a fit redone at every step."""
    every, lazy = StepTimeFit(window=16), StepTimeFit(window=16, refit_every=8)
    for i in range(16):
        every.add(i % 3, 1.0 + 0.5 * (i % 3))
        lazy.add(i % 3, 1.0 + 0.5 * (i % 3))
        assert (lazy.fixed_ms, lazy.tree_row_ms) == (every.fixed_ms, every.tree_row_ms)
    before = (lazy.fixed_ms, lazy.tree_row_ms)
    for i in range(7):  # the line moves: every step refits, the lazy fit waits
        every.add(i % 3, 3.0 + 2.0 * (i % 3))
        lazy.add(i % 3, 3.0 + 2.0 * (i % 3))
        assert (lazy.fixed_ms, lazy.tree_row_ms) == before
    every.add(1, 5.0)
    lazy.add(1, 5.0)
    assert (lazy.fixed_ms, lazy.tree_row_ms) == (every.fixed_ms, every.tree_row_ms) != before
    with pytest.raises(ValueError, match="refit_every"):
        StepTimeFit(refit_every=0)
