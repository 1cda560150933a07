"""What an engine step costs beyond the measured forward, learnt from the steps themselves.

The batch-aware schedule prices a step with ``B`` requests and ``n`` tree nodes each from a table measured once at
engine start (the model's forward over ``B * (n + 1)`` rows, its vocabulary projection and the heads). A serving
step also pays what that table cannot see: scheduling, input preparation, sampling, acceptance, KV compaction,
host syncs — and, for tree rows, the tree attention over the real context and the per-row bookkeeping. Left out,
the first makes every step look cheaper than it is (so trees look costlier, relative to a plain step, than they
are) and the second makes tree rows look cheaper (so trees win on paper and lose in the engine).

:class:`StepTimeFit` fits both from the residual of each observed step (its wall time minus the table's
prediction)::

    residual_ms = fixed_ms + tree_row_ms * (B * n)

by least squares over the last ``window`` steps, after dropping outliers (steps with a prefill chunk, a pause
between requests) beyond 3 robust deviations from the line through each row count's median residual. Separating the two needs steps with different tree-row
counts; the proposer therefore runs an occasional plain step while it speculates (and an occasional one-node step
while it does not). Until the spread of tree rows allows it, the whole residual is read as ``fixed_ms`` and
``tree_row_ms`` stays 0. Both are clamped at >= 0: a step is not cheaper than its forward.

Plain Python, no engine import; used by :class:`medusa_plugin.vllm_ext.proposer.MedusaTreeProposer`.
"""

from __future__ import annotations

import statistics
from collections import deque

__all__ = ["StepTimeFit"]


class StepTimeFit:
    """Online fit of ``residual_ms = fixed_ms + tree_row_ms * tree_rows`` (see the module docstring).

    Args:
        window: steps kept (the oldest are forgotten, so the fit follows a changing load).
        min_steps: observations needed before :attr:`fixed_ms` is reported (0.0 before).
        min_spread: distinct tree-row counts needed before :attr:`tree_row_ms` is fitted (else 0.0).
        min_group: steps a tree-row count needs before it counts towards ``min_spread``.
        refit_every: once ``window`` steps are held, the fit is redone every this many new steps, not at each (the
            proposer adds one per engine step and reads the fit at each; a refit over 128 steps costs ~0.1 ms).
    """

    def __init__(self, window: int = 128, min_steps: int = 4, min_spread: int = 2, min_group: int = 2,
                 refit_every: int = 1) -> None:
        if window < 2 or min_steps < 1 or min_spread < 2 or min_group < 1 or refit_every < 1:
            raise ValueError(f"window={window} (>= 2), min_steps={min_steps} (>= 1), min_spread={min_spread} (>= 2), "
                             f"min_group={min_group} (>= 1), refit_every={refit_every} (>= 1)")
        self._obs: deque[tuple[int, float]] = deque(maxlen=window)
        self.min_steps, self.min_spread, self.min_group = min_steps, min_spread, min_group
        self.refit_every = refit_every
        self._fit: tuple[float, float] | None = None
        self._added = 0  # steps added since the last fit

    def __len__(self) -> int:
        return len(self._obs)

    def add(self, tree_rows: int, residual_ms: float) -> None:
        """One step: ``tree_rows`` = draft rows verified (``B * n``; 0 for a plain step), ``residual_ms`` = its wall
        time minus the predicted forward + heads time (ms; may be negative)."""
        if tree_rows < 0:
            raise ValueError(f"tree_rows must be >= 0, got {tree_rows}")
        full = len(self._obs) == self._obs.maxlen  # before this step
        self._obs.append((int(tree_rows), float(residual_ms)))
        self._added += 1
        if not full or self._added >= self.refit_every:
            self._fit = None

    @staticmethod
    def _line(pts: list[tuple[int, float]]) -> tuple[float, float]:
        """Least-squares (intercept, slope) of ``pts`` (at least two distinct x)."""
        mx = statistics.fmean(x for x, _ in pts)
        my = statistics.fmean(y for _, y in pts)
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
        return my - slope * mx, slope

    def _solve(self) -> tuple[float, float]:
        if self._fit is not None:
            return self._fit
        self._added = 0
        obs = list(self._obs)
        groups: dict[int, list[float]] = {}
        for x, y in obs:
            groups.setdefault(x, []).append(y)
        # a row count seen only once has no median to speak of: one slow step there once tilted the line by
        # several ms per row and turned speculation off; such counts join the least squares, not the start
        groups = {x: ys for x, ys in groups.items() if len(ys) >= self.min_group}
        if len(obs) < self.min_steps:
            fit = (0.0, 0.0)
        elif len(groups) < self.min_spread:
            fit = (statistics.median(y for _, y in obs), 0.0)
        else:
            # robust start: the line through each row count's median; then least squares over the steps within
            # 3 robust deviations of it (a prefill chunk or a pause is far off, a plain probe among tree steps not)
            a, b = self._line([(x, statistics.median(ys)) for x, ys in groups.items()])
            res = [y - a - b * x for x, y in obs]
            med_abs = statistics.median(abs(y) for _, y in obs)
            scale = max(1.4826 * statistics.median(abs(r) for r in res), 0.05 * med_abs, 0.1)
            inliers = [pt for pt, r in zip(obs, res) if abs(r) <= 3 * scale]
            if len({x for x, _ in inliers if x in groups}) >= self.min_spread:
                a, b = self._line(inliers)
            fit = (a, b)
        self._fit = (max(0.0, fit[0]), max(0.0, fit[1]))
        return self._fit

    @property
    def fixed_ms(self) -> float:
        """Per-step time outside the measured forward + heads, paid by plain and tree steps alike (ms, >= 0)."""
        return self._solve()[0]

    @property
    def tree_row_ms(self) -> float:
        """Extra time per draft row beyond the measured forward over it (ms per row, >= 0)."""
        return self._solve()[1]
