"""The cost of a speculative step relative to a plain one, as observed in serving, per batch size.

The batch-aware schedule prices a step with ``n`` draft nodes per request at batch size ``B`` from a table measured
at engine start (vLLM's dummy batch over ``B * (n + 1)`` rows) plus a per-row time learnt while serving
(:class:`~medusa_plugin.core.step_time_fit.StepTimeFit`, one slope for all batch sizes). On SmolLM2-135M in fp32 on a
2-core AVX-512 CPU that underpriced wide steps. At 16 requests the table put one draft node per request at 1.40x a
plain step; the engine ran `chain:1` at 0.88-0.92x of plain decoding with 1.44 tokens per step, so its steps cost
about 1.6x. At 4 requests a profile read 21.8 ms per plain step and 29.5 ms with one draft each (1.35x), where the
table said 1.12x. So the schedule drafted where it lost.

:class:`ObservedStepCost` keeps the engine steps' own wall times by ``(B, n)`` (the last ``window`` of each, none
older than ``max_age`` steps) and, where both a plain and a drafted step count have ``min_steps`` observations at
the same ``B``, reports their ratio: median over median (robust to the odd slow step) plus ``z`` robust standard
errors. With 5 steps a side, noise alone moved the plain median ratio at 16 requests between 1.33 and 1.46, around a
break-even of ~1.42, so the schedule flipped from run to run and lost 4.6 % at 16 requests in bf16 (z = 1: 0.954x;
z = 2: 1.002x). :meth:`apply` turns those ratios into a correction of a
measured ``overhead[B][q]`` table (``q = n + 1`` query tokens per request): the observed ratio where it was
observed, interpolated between observed sizes, and beyond the widest observed one the measured extra cost scaled by
the observed / measured extra cost there, but never by less than :data:`MIN_SCALE`. Batch sizes of the table
without observations keep the measured values.

Why interpolation and a floor: the rule used to be "scale by the nearest observed size". A one-node step observed at
0.96x a plain step at 8 requests (noise: a drafted step costs more than a plain one) then made every tree size free
at that batch size, the schedule verified 8 nodes per request there, and those steps cost 3.7x a plain step; with
that observed too, 4 nodes still took the one-node scale (nearer) and looked cheap (`bench e2e`, bf16, session 14:
rounds at 0.61x plain at 8 requests and 0.29x / 0.56x at 16). An observation is direct evidence for its own size;
between two of them the step cost is close to linear in rows.

The observations come for free: plain steps happen whenever the schedule does not speculate, or as the proposer's
periodic plain probe while it does; drafted steps at ``n`` whenever it speculates, or as its periodic one-node probe
while it does not. Plain Python; no engine import.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Callable, Sequence

__all__ = ["ObservedStepCost", "MIN_SCALE"]

MIN_SCALE = 0.5  # least factor an observation at one size applies to the measured extra cost of another (see above)


class ObservedStepCost:
    """Engine step wall times by (batch size, draft nodes per request).

    Args:
        window: steps kept per ``(B, n)``: the last few, so that a few probes after a change of load outvote the
            steps before it (a drafted prefix is seen only on probes while the schedule does not draft it).
        min_steps: observations each of ``(B, 0)`` and ``(B, n)`` needs before their ratio is reported.
        max_age: observations older than this many steps (of any kind) are dropped, so a prefix that stopped being
            drafted under a passing load is priced by the table again.
        z: standard errors added to a ratio (0: the plain median ratio).
    Raises:
        ValueError: ``window``, ``min_steps`` or ``max_age`` < 1.
    """

    def __init__(self, window: int = 5, min_steps: int = 3, max_age: int = 2048, z: float = 2.0) -> None:
        if window < 1 or min_steps < 1 or max_age < 1 or z < 0:
            raise ValueError(f"window={window}, min_steps={min_steps} and max_age={max_age} must all be >= 1, "
                             f"z={z} >= 0")
        self.window, self.min_steps, self.max_age, self.z = window, min_steps, max_age, float(z)
        self._steps: dict[tuple[int, int], deque[tuple[int, float]]] = {}
        self._clock = 0

    def add(self, batch_size: int, nodes: int, step_ms: float) -> None:
        """One engine step of ``batch_size`` requests, each verifying ``nodes`` draft nodes (0: a plain step), that
        took ``step_ms`` wall milliseconds. Raises ValueError for ``batch_size < 1``, ``nodes < 0`` or a time <= 0."""
        if batch_size < 1 or nodes < 0 or not step_ms > 0:
            raise ValueError(f"batch_size={batch_size} (>= 1), nodes={nodes} (>= 0), step_ms={step_ms} (> 0)")
        self._clock += 1
        self._steps.setdefault((int(batch_size), int(nodes)), deque(maxlen=self.window)).append(
            (self._clock, float(step_ms)))

    def _recent(self, batch_size: int, nodes: int) -> list[float]:
        return [ms for t, ms in self._steps.get((batch_size, nodes), ()) if t > self._clock - self.max_age]

    def count(self, batch_size: int, nodes: int) -> int:
        """Observations kept (and not too old) for ``(batch_size, nodes)``."""
        return len(self._recent(batch_size, nodes))

    def ratio(self, batch_size: int, nodes: int) -> float | None:
        """Median step time with ``nodes`` draft nodes per request over the median plain step time at
        ``batch_size``, raised by ``z`` standard errors (an upper bound: a few noisy steps must not make drafting
        look cheap where it is break-even); None until both have ``min_steps`` observations."""
        a, b = self._recent(batch_size, nodes), self._recent(batch_size, 0)
        if nodes == 0 or len(a) < self.min_steps or len(b) < self.min_steps:
            return None
        ma, mb = statistics.median(a), statistics.median(b)

        def rel_se(xs: list[float], m: float) -> float:  # robust: 1.4826 * MAD / median / sqrt(n)
            return 1.4826 * statistics.median(abs(x - m) for x in xs) / m / len(xs) ** 0.5

        return ma / mb * (1.0 + self.z * (rel_se(a, ma) ** 2 + rel_se(b, mb) ** 2) ** 0.5)

    def ratios_at(self, batch_size: int) -> dict[int, float]:
        """``{n: ratio}`` at one batch size, for every drafted count with enough observations."""
        out = {}
        for b, n in self._steps:
            if b == batch_size and n > 0:
                r = self.ratio(b, n)
                if r is not None:
                    out[n] = r
        return out

    def ratios(self) -> dict[int, dict[int, float]]:
        """``{B: {n: ratio}}`` for every pair with enough observations."""
        out: dict[int, dict[int, float]] = {}
        for b, n in self._steps:
            r = self.ratio(b, n)
            if r is not None:
                out.setdefault(b, {})[n] = r
        return out

    def apply(self, batch_sizes: Sequence[int], query_tokens: Sequence[int],
              overhead: Sequence[Sequence[float]]) -> list[list[float]]:
        """A copy of ``overhead`` (``[len(batch_sizes)][len(query_tokens)]``, ``overhead[i][j]`` = step time with
        ``query_tokens[j]`` tokens per request over a plain step at ``batch_sizes[i]``) corrected by the observed
        ratios. An observation at a batch size outside ``batch_sizes`` counts for the nearest one (in log scale).
        At a batch size with observations: an observed ``q`` takes its ratio; a ``q`` below the widest observed one
        is interpolated linearly in ``q`` between its observed neighbours (``q = 1`` is 1.0); a wider ``q`` takes
        the measured extra cost scaled by observed / measured at the widest observed ``q`` (at least
        :data:`MIN_SCALE`). Values stay >= 1e-6."""
        import math

        out = [list(map(float, row)) for row in overhead]
        qs = list(query_tokens)
        by_b: dict[int, dict[int, float]] = {}
        for b, per_n in self.ratios().items():
            i = min(range(len(batch_sizes)), key=lambda k: (abs(math.log(batch_sizes[k] / b)), k))
            for n, r in per_n.items():
                if n + 1 in qs:
                    by_b.setdefault(i, {})[n + 1] = r  # a later (nearer) B overwrites: close enough
        for i, seen in by_b.items():
            row = out[i]
            knots = [(1, 1.0)] + sorted(seen.items())  # (q, ratio): the plain step, then the observed sizes
            q_max, r_max = knots[-1]
            measured_extra = float(overhead[i][qs.index(q_max)]) - 1.0
            scale = max((r_max - 1.0) / measured_extra, MIN_SCALE) if measured_extra > 1e-9 else 1.0
            for j, q in enumerate(qs):
                if q == 1:
                    continue
                if q in seen:
                    row[j] = max(seen[q], 1e-6)
                elif q < q_max:  # between two observed sizes (or the plain step and the smallest): linear in q
                    (qa, ra), (qb, rb) = next((a, b) for a, b in zip(knots, knots[1:]) if a[0] < q < b[0])
                    row[j] = max(ra + (rb - ra) * (q - qa) / (qb - qa), 1e-6)
                else:  # wider than any observed: the measured extra cost, scaled as at the widest observed
                    row[j] = max(1.0 + (float(overhead[i][j]) - 1.0) * scale, 1e-6)
        return out

    def correct_curve(self, batch_size: int, step_ms: Callable[[int], float], *,
                      drafting_ms: float = 0.0) -> Callable[[int], float]:
        """A step-time curve (``step_ms(m)``: ms of a step of ``batch_size`` requests verifying ``m`` draft rows in
        all, drafting not included) corrected by the widest drafted count ``n`` observed at this batch size: the
        predicted extra cost of draft rows, ``step_ms(m) - step_ms(0)``, is scaled so that ``m = n * batch_size``
        costs what the engine's ratio says, less ``drafting_ms`` (the drafting those steps paid, charged apart by
        the caller). Where the curve calls rows free, the observed extra cost is spread linearly over the rows.
        The scale is at least :data:`MIN_SCALE`, as in :meth:`apply`. ``step_ms`` itself when nothing is observed at
        ``batch_size``. Used for dynamic trees, whose draft rows vary from step to step (:meth:`apply` is the
        static-tree table's version)."""
        seen = self.ratios_at(batch_size)
        if not seen:
            return step_ms
        f0 = step_ms(0)
        n, r = max(seen.items())  # the widest observed trees: the allocation's decisions are about adding rows
        observed = max(0.0, r * f0 - drafting_ms - f0)
        predicted = step_ms(n * batch_size) - f0
        if predicted > 1e-9:
            scale = max(observed / predicted, MIN_SCALE)
            return lambda m: f0 + (step_ms(m) - f0) * scale
        return lambda m: f0 + observed * m / (n * batch_size)
