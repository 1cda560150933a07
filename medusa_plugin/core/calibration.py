"""From a Medusa head's probability to the chance that the target accepts the node: a per-head calibration, fitted
online from the paths the target accepts.

A node drafted by head ``k`` with head probability ``q`` (softmax of the head's logits, over the draft vocabulary
when the heads have a ``token_map``) is accepted, given that its parent is, with probability ``~ s_k * q ** a_k``.
The exponent ``a_k`` is an inverse temperature on the probability and ``s_k <= 1`` a scale (``a = s = 1``:
calibrated, the prior). Both are fitted by maximum likelihood over observations ``(k, q, accepted)`` kept as
decayed counts in log-probability bins (so the fit is cheap and follows the traffic), on a fixed grid
(deterministic). Measured on SmolLM2-135M's shipped heads, head 0 is over-confident by about a factor of two at
``q > 0.1`` (``q ~ 0.71`` -> accepted 0.37, ``q ~ 0.31`` -> 0.17), close to calibrated below: a scale, not only an
exponent.

Medusa heads do not see the path: head ``k`` predicts the token ``k+1`` places ahead assuming the tokens before it
are the likely ones. Its probability is therefore calibrated separately for nodes whose parent is on the *top path*
(the root, or rank 0 of every head above) and for the others ("off-path"); on the shipped heads, head 1 accepted 57 %
of its mean probability on the top path and 18 % off it.

With successor counts (:mod:`~medusa_plugin.core.successor_prior`) a Medusa node also has a *successor level* (how
often the target's text continues its parent tokens with it); the factor is then multiplied by a per (head, on / off
the top path, level) multiplier ``(hits + w) / (predicted + w)`` (``predicted``: the sum of ``s_k * q ** a_k`` over
the observed nodes of that cell, ``w = level_prior_weight``), i.e. how much more or less than its head probability
says such a node is accepted (1 before observations).

n-gram branch nodes have no head probability: their acceptance is a per-position rate (position ``j`` = the ``j``-th token of a continuation), ``(hits + w * prior) / (tried + w)``.

This is the calibration step of dynamic draft trees (EAGLE-2: Li et al. 2024, "EAGLE-2: Faster Inference of
Language Models with Dynamic Draft Trees", which uses the drafter's confidence as an acceptance estimate; Medusa
heads are less calibrated, hence the fitted exponent). Plain PyTorch.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from .successor_prior import NUM_LEVELS

__all__ = ["CalibrationError", "AcceptanceCalibration", "CALIBRATION_FILE", "calibration_for", "NGRAM_MATCH_MAX"]

NGRAM_MATCH_MAX = 8  # suffix-match lengths of n-gram continuations tracked apart (longer ones share the last)

CALIBRATION_FILE = "calibration.json"  # a prior next to the heads (written by the chat recipe)

_EXPONENTS = torch.exp(torch.linspace(math.log(0.5), math.log(5.0), 61, dtype=torch.float64))
_SCALES = torch.exp(torch.linspace(math.log(0.02), 0.0, 61, dtype=torch.float64))


class CalibrationError(ValueError):
    """Bad calibration parameters or observations; the message names the problem."""


class AcceptanceCalibration:
    """Per-head scale ``s_k`` and exponent ``a_k`` (head probability ``q`` -> acceptance ``s_k * q ** a_k``) and
    per-position n-gram acceptance rates.

    Args:
        num_heads: ``K >= 1``.
        ngram_positions: n-gram continuation positions tracked (later positions share the last rate).
        ngram_prior: acceptance assumed for an n-gram node before any observation, in (0, 1].
        prior_weight: pseudo-observations behind ``ngram_prior`` (>= 0).
        decay: forgetting factor per observed request-step, in (0, 1].
        bins: log-probability bins per head (``q`` in ``[1e-6, 1]``).
        min_observations: a head keeps ``a = 1`` until it has this many (decayed) observations.
        level_prior_weight: pseudo-observations behind a successor-level multiplier of 1.
    Attributes:
        exponent: ``[2K]`` float64, the current ``a``: index ``k`` for head ``k`` on the top path, ``K + k`` off it.
        scale: ``[2K]`` float64, the current ``s``, indexed the same way.
    Raises:
        CalibrationError: a parameter out of range.
    """

    def __init__(self, num_heads: int, *, ngram_positions: int = 8, ngram_prior: float = 0.5,
                 prior_weight: float = 8.0, decay: float = 0.999, bins: int = 24, min_observations: float = 64.0,
                 level_prior_weight: float = 4.0):
        if num_heads < 1 or ngram_positions < 1 or bins < 2:
            raise CalibrationError(f"num_heads, ngram_positions must be >= 1 and bins >= 2, got {num_heads}, "
                                   f"{ngram_positions}, {bins}")
        if not 0.0 < ngram_prior <= 1.0 or prior_weight < 0 or not 0.0 < decay <= 1.0:
            raise CalibrationError(f"ngram_prior must be in (0, 1], prior_weight >= 0 and decay in (0, 1], got "
                                   f"{ngram_prior}, {prior_weight}, {decay}")
        self.num_heads, self.bins, self.decay = num_heads, bins, float(decay)
        self.min_observations = float(min_observations)
        groups = 2 * num_heads  # (head, on / off the top path)
        self.exponent = torch.ones(groups, dtype=torch.float64)
        self.scale = torch.ones(groups, dtype=torch.float64)
        self._edges = torch.linspace(math.log(1e-6), 0.0, bins + 1, dtype=torch.float64)
        self._tried = torch.zeros(groups, bins, dtype=torch.float64)
        self._hits = torch.zeros(groups, bins, dtype=torch.float64)
        self._sum_logq = torch.zeros(groups, bins, dtype=torch.float64)
        self._ng_prior, self._ng_weight = float(ngram_prior), float(prior_weight)
        self._ng_tried = torch.zeros(ngram_positions, dtype=torch.float64)
        self._ng_hits = torch.zeros(ngram_positions, dtype=torch.float64)
        # the same counts by the length n of the suffix match that found the continuation (row n; the last row
        # holds n >= NGRAM_MATCH_MAX): on SmolLM2's chat answers a 4-token match's first token was right 83 % of
        # the time, a 2-token match's 39 % (benchmarks/README.md, session 13)
        self._ng_m_tried = torch.zeros(NGRAM_MATCH_MAX + 1, ngram_positions, dtype=torch.float64)
        self._ng_m_hits = torch.zeros(NGRAM_MATCH_MAX + 1, ngram_positions, dtype=torch.float64)
        self._ng_rates: list[list[float]] | None = None  # ngram_acceptance's table, rebuilt after the counts change
        self._lv_weight = float(level_prior_weight)
        self._lv_hits = torch.zeros(groups, NUM_LEVELS, dtype=torch.float64)
        self._lv_pred = torch.zeros(groups, NUM_LEVELS, dtype=torch.float64)
        self._lv_mult: list[list[float]] = [[1.0] * NUM_LEVELS for _ in range(groups)]

    # ------------------------------------------------------------------ mapping
    def head_acceptance(self, probs: Tensor, *, off_path: bool = False) -> Tensor:
        """``probs [..., K', R]`` head probabilities (head axis second to last, ``K' <= K``) of nodes on the top path
        (``off_path=False``) or off it -> the same shape,
        float64: ``s_k * probs ** a_k``, in [0, 1] and increasing in ``probs`` (rank order within a head is kept)."""
        k = probs.shape[-2]
        if k > self.num_heads:
            raise CalibrationError(f"probabilities for {k} heads, the calibration has {self.num_heads}")
        first = self.num_heads if off_path else 0
        a = self.exponent[first:first + k].to(probs.device).view(k, 1)
        s = self.scale[first:first + k].to(probs.device).view(k, 1)
        return s * probs.to(torch.float64).clamp(0.0, 1.0) ** a

    def level_multipliers(self) -> list[list[float]]:
        """``[2K][NUM_LEVELS]`` multipliers of the head factor by successor level (group index as
        :attr:`exponent`), as of the last :meth:`refit`."""
        return self._lv_mult

    def ngram_acceptance(self, match: int | None = None) -> list[float]:
        """Acceptance per n-gram continuation position (``ngram_positions`` floats in [0, 1]), over all
        continuations, or (``match``) of those found by a suffix match of ``match`` tokens: their own rates shrunk
        towards the overall ones by ``prior_weight`` pseudo-observations (the overall rates until they are seen)."""
        if self._ng_rates is None:  # every tree of a step asks, per continuation: one table until the next observe
            w = self._ng_weight
            rate = (self._ng_hits + w * self._ng_prior) / (self._ng_tried + w).clamp_min(1e-12)
            by_match = (self._ng_m_hits + w * rate) / (self._ng_m_tried + w).clamp_min(1e-12)
            by_match[0] = rate  # row 0: match length unknown
            self._ng_rates = by_match.clamp(0.0, 1.0).tolist()
        row = 0 if match is None or match < 1 else min(int(match), NGRAM_MATCH_MAX)
        return list(self._ng_rates[row])

    # ------------------------------------------------------------------ observations
    def observe(self, head: Tensor, prob: Tensor, accepted: Tensor, *, off_path: Tensor | None = None,
                ngram_position: Tensor | None = None, level: Tensor | None = None,
                ngram_match: Tensor | None = None) -> None:
        """Record verified nodes whose parent was accepted (only those say anything about the node).

        Args:
            head: ``[M]`` int64, the head that drafted each node (-1: not a Medusa node).
            prob: ``[M]`` float, its head probability (ignored where ``head < 0``).
            accepted: ``[M]`` bool, the node is on the accepted path.
            off_path: ``[M]`` bool, its parent is off the top path (default: all on it).
            ngram_position: ``[M]`` int64 position of the node in an n-gram continuation (-1: none), optional.
            level: ``[M]`` int64 successor level of each Medusa node (-1: none), optional.
            ngram_match: ``[M]`` int64, for n-gram nodes the length of the suffix match that found their
                continuation (< 1: unknown), optional.
        Call :meth:`refit` to update the exponents and the level multipliers.
        """
        self._ng_rates = None
        head = torch.as_tensor(head, dtype=torch.int64).cpu().reshape(-1)
        prob = torch.as_tensor(prob, dtype=torch.float64).cpu().reshape(-1)
        acc = torch.as_tensor(accepted, dtype=torch.float64).cpu().reshape(-1)
        if not head.numel() == prob.numel() == acc.numel():
            raise CalibrationError("head, prob and accepted must have the same length")
        if self.decay < 1.0:
            for t in (self._tried, self._hits, self._sum_logq, self._ng_tried, self._ng_hits, self._lv_hits,
                      self._lv_pred, self._ng_m_tried, self._ng_m_hits):
                t.mul_(self.decay)
        if bool((head >= self.num_heads).any()):
            raise CalibrationError(f"head index >= num_heads={self.num_heads}")
        off = (torch.zeros_like(head, dtype=torch.bool) if off_path is None
               else torch.as_tensor(off_path, dtype=torch.bool).cpu().reshape(-1))
        m = head >= 0
        if bool(m.any()):
            logq = prob[m].clamp(1e-6, 1.0).log()
            b = torch.bucketize(logq, self._edges[1:-1])
            flat = (head[m] + self.num_heads * off[m].to(torch.int64)) * self.bins + b
            n = 2 * self.num_heads * self.bins
            self._tried += torch.bincount(flat, minlength=n).view_as(self._tried).to(torch.float64)
            self._hits += torch.bincount(flat, weights=acc[m], minlength=n).view_as(self._hits)
            self._sum_logq += torch.bincount(flat, weights=logq, minlength=n).view_as(self._sum_logq)
            if level is not None:
                lv = torch.as_tensor(level, dtype=torch.int64).cpu().reshape(-1)[m]
                if bool((lv >= NUM_LEVELS).any()):
                    raise CalibrationError(f"successor level >= {NUM_LEVELS}")
                g = head[m] + self.num_heads * off[m].to(torch.int64)
                pred = self.scale[g] * prob[m].clamp(0.0, 1.0) ** self.exponent[g]
                keep = lv >= 0
                cell = (g * NUM_LEVELS + lv)[keep]
                size = 2 * self.num_heads * NUM_LEVELS
                self._lv_hits += torch.bincount(cell, weights=acc[m][keep], minlength=size).view_as(self._lv_hits)
                self._lv_pred += torch.bincount(cell, weights=pred[keep], minlength=size).view_as(self._lv_pred)
        if ngram_position is not None:
            pos = torch.as_tensor(ngram_position, dtype=torch.int64).cpu().reshape(-1)
            g = pos >= 0
            if bool(g.any()):
                p = pos[g].clamp(max=self._ng_tried.numel() - 1)
                npos = self._ng_tried.numel()
                self._ng_tried += torch.bincount(p, minlength=npos).to(torch.float64)
                self._ng_hits += torch.bincount(p, weights=acc[g], minlength=npos)
                if ngram_match is not None:
                    n = torch.as_tensor(ngram_match, dtype=torch.int64).cpu().reshape(-1)[g]
                    known = n >= 1
                    cell = (n.clamp(max=NGRAM_MATCH_MAX) * npos + p)[known]
                    size = (NGRAM_MATCH_MAX + 1) * npos
                    self._ng_m_tried += torch.bincount(cell, minlength=size).view_as(self._ng_m_tried).to(
                        torch.float64)
                    self._ng_m_hits += torch.bincount(cell, weights=acc[g][known], minlength=size).view_as(
                        self._ng_m_hits)

    def refit(self) -> Tensor:
        """Maximum-likelihood ``(s_k, a_k)`` per head on a fixed grid (``a`` in 0.5 .. 5, ``s`` in 0.02 .. 1, both
        geometric) from the binned counts; heads with fewer than ``min_observations`` keep theirs. Returns
        ``exponent`` ``[2K]``."""
        for k in range(2 * self.num_heads):
            n = self._tried[k]
            if float(n.sum()) < self.min_observations:
                continue
            used = n > 1e-9
            mean_logq = self._sum_logq[k][used] / n[used]
            hits, tried = self._hits[k][used], n[used]
            p = (_SCALES.view(-1, 1, 1) * torch.exp(_EXPONENTS.view(1, -1, 1) * mean_logq.view(1, 1, -1))
                 ).clamp(1e-9, 1 - 1e-9)  # [S, A, bins]
            ll = (hits * p.log() + (tried - hits) * (1 - p).log()).sum(-1)
            best = int(ll.argmax())
            self.scale[k] = _SCALES[best // _EXPONENTS.numel()]
            self.exponent[k] = _EXPONENTS[best % _EXPONENTS.numel()]
        w = self._lv_weight
        self._lv_mult = ((self._lv_hits + w) / (self._lv_pred + w)).tolist()
        return self.exponent

    # ------------------------------------------------------------------ prior
    _STATE = ("exponent", "scale", "_tried", "_hits", "_sum_logq", "_ng_tried", "_ng_hits", "_lv_hits", "_lv_pred",
              "_ng_m_tried", "_ng_m_hits")
    _OPTIONAL = ("_ng_m_tried", "_ng_m_hits")  # absent from states written before session 13: zero counts

    def state(self) -> dict:
        """A JSON-ready snapshot (counts, fitted values, settings) that :meth:`from_state` restores: a calibration
        fitted on training-side prompts and shipped next to the heads (``calibration.json``) is the prior of a fresh
        server, which then follows its own traffic (the counts decay)."""
        out = {"format": "medusa_plugin acceptance calibration", "num_heads": self.num_heads, "bins": self.bins,
               "levels": NUM_LEVELS, "ngram_positions": int(self._ng_tried.numel())}
        out.update({k.lstrip("_"): getattr(self, k).tolist() for k in self._STATE})
        return out

    @classmethod
    def from_state(cls, state: dict, *, max_weight: float | None = 2000.0, **kwargs) -> "AcceptanceCalibration":
        """The calibration of :meth:`state`, refitted, with its Medusa observations scaled down to at most
        ``max_weight`` (so live traffic outweighs the prior within a few hundred steps; None: as saved).
        ``kwargs``: the other :class:`AcceptanceCalibration` settings.

        Raises:
            CalibrationError: a state of another shape or format (the message names what differs).
        """
        if not isinstance(state, dict) or state.get("format") != "medusa_plugin acceptance calibration":
            raise CalibrationError("not a calibration state (expected the 'format' written by "
                                   "AcceptanceCalibration.state)")
        k = int(state.get("num_heads", 0))
        out = cls(k, ngram_positions=int(state.get("ngram_positions", 8)), bins=int(state.get("bins", 24)), **kwargs)
        if int(state.get("levels", -1)) != NUM_LEVELS:
            raise CalibrationError(f"calibration state has {state.get('levels')} successor levels, this version "
                                   f"{NUM_LEVELS}: refit it")
        for name in cls._STATE:
            cur = getattr(out, name)
            if name in cls._OPTIONAL and name.lstrip("_") not in state:
                continue
            try:
                val = torch.tensor(state[name.lstrip("_")], dtype=torch.float64)
            except (KeyError, TypeError, ValueError) as e:
                raise CalibrationError(f"calibration state: bad or missing '{name.lstrip('_')}' ({e})") from None
            if val.shape != cur.shape:
                raise CalibrationError(f"calibration state: '{name.lstrip('_')}' has shape {tuple(val.shape)}, "
                                       f"expected {tuple(cur.shape)}")
            cur.copy_(val)
        out._ng_rates = None
        total = float(out._tried.sum())
        if max_weight is not None and total > max_weight:
            f = max_weight / total
            for t in (out._tried, out._hits, out._sum_logq, out._lv_hits, out._lv_pred):
                t.mul_(f)
        out.refit()
        return out

    def describe(self) -> str:
        """One line: the scales, exponents and the n-gram rates."""
        sa = [f"{s:.2f}*q^{a:.2f}" for s, a in zip(self.scale.tolist(), self.exponent.tolist())]
        k = self.num_heads
        g = " ".join(f"{x:.2f}" for x in self.ngram_acceptance()[:4])
        return (f"head acceptance on the top path {' '.join(sa[:k])}, off it (heads 1..) {' '.join(sa[k + 1:])}; "
                f"n-gram acceptance per position {g}")


def calibration_for(heads_dir, num_heads: int, **kwargs) -> tuple[AcceptanceCalibration, str]:
    """A calibration for the heads in ``heads_dir``: their shipped prior (``calibration.json``,
    :meth:`AcceptanceCalibration.from_state`) when there is one, else a fresh one; and a one-line description.

    Raises:
        CalibrationError: the prior is unreadable or made for another number of heads (the message names the file
            and the fix).
    """
    path = Path(str(heads_dir)) / CALIBRATION_FILE
    if not path.is_file():
        return AcceptanceCalibration(num_heads, **kwargs), "fresh (no calibration.json next to the heads)"
    try:
        cal = AcceptanceCalibration.from_state(json.loads(path.read_text()), **kwargs)
    except (OSError, ValueError) as e:  # CalibrationError is a ValueError; so is bad JSON
        raise CalibrationError(f"{path}: {e}; rewrite it (medusa-plugin train --recipe chat writes it) or delete "
                               f"it") from None
    if cal.num_heads != num_heads:
        raise CalibrationError(f"{path} calibrates {cal.num_heads} heads, the checkpoint has {num_heads}: rewrite "
                               f"it for these heads or delete it")
    return cal, f"prior from {path}"
