"""Prompt-lookup (n-gram) continuations of a request's own tokens: the n-gram branches of a hybrid tree.

Prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding", github.com/apoorvumang/prompt-lookup-decoding) drafts
the tokens that followed an earlier occurrence of the sequence's last n tokens. The lookup rule is vLLM's
``NgramProposer`` (``vllm/v1/spec_decode/ngram_proposer.py``, ``_find_longest_matched_ngram_and_propose_tokens``):
the suffix n-gram is the *longest* one with ``min_n <= n <= max_n`` that occurs earlier in the sequence (an
occurrence must end before the last token, so at least one token follows it); among the occurrences of that length
the *earliest* one is used, and up to ``length`` tokens after it are the draft (fewer at the end of the sequence).

:func:`ngram_continuations` generalises this to up to ``M`` distinct continuations: every earlier occurrence of every
suffix n-gram in ``[min_n, max_n]``, ordered by n (longest first) then by position (earliest first), so the first
continuation is exactly vLLM's draft. A continuation equal to, or a prefix of, one already chosen is skipped (the
tree would share it anyway). Plain numpy, no vLLM import.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["NgramError", "ngram_continuations", "ngram_matches"]


class NgramError(ValueError):
    """Bad n-gram lookup parameters; the message names the parameter and the allowed range."""


def _check(min_n: int, max_n: int, length: int, max_branches: int) -> None:
    for name, v in (("min_n", min_n), ("max_n", max_n), ("length", length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise NgramError(f"n-gram {name} must be an integer >= 1, got {v!r}")
    if min_n > max_n:
        raise NgramError(f"n-gram min_n={min_n} is larger than max_n={max_n}: use min_n <= max_n")
    if isinstance(max_branches, bool) or not isinstance(max_branches, int) or max_branches < 0:
        raise NgramError(f"ngram_branches must be an integer >= 0, got {max_branches!r}")


def ngram_continuations(tokens: Sequence[int] | np.ndarray, max_branches: int, *, min_n: int = 2, max_n: int = 4,
                        length: int = 4) -> list[list[int]]:
    """Up to ``max_branches`` prompt-lookup continuations of ``tokens``.

    Args:
        tokens: the request's tokens so far (prompt + output, the last one being the tree's root), 1-D ints.
        max_branches: ``M >= 0``, the most continuations returned.
        min_n, max_n: n-gram lengths tried (vLLM's ``prompt_lookup_min`` / ``prompt_lookup_max``), ``1 <= min_n <=
            max_n``.
        length: tokens per continuation (vLLM's ``num_speculative_tokens``), >= 1.
    Returns:
        ``list[list[int]]``: at most ``max_branches`` non-empty continuations, each of at most ``length`` tokens, in
        the order above (the first is what vLLM's ngram proposer drafts).
    Raises:
        NgramError: a parameter out of range.
    """
    return [c for c, _ in ngram_matches(tokens, max_branches, min_n=min_n, max_n=max_n, length=length)]


def ngram_matches(tokens: Sequence[int] | np.ndarray, max_branches: int, *, min_n: int = 2, max_n: int = 4,
                  length: int = 4) -> list[tuple[list[int], int]]:
    """:func:`ngram_continuations` (same arguments, same checks) with, for each continuation, the length ``n`` of the
    suffix match that found it (longer matches are followed more often:
    :meth:`~.calibration.AcceptanceCalibration.ngram_acceptance`). Returns ``(continuation, n)`` pairs in the same
    order."""
    _check(min_n, max_n, length, max_branches)
    seq = np.asarray(tokens, dtype=np.int64).reshape(-1)
    total = seq.shape[0]
    out: list[tuple[list[int], int]] = []
    if max_branches == 0 or total < min_n + 1:
        return out
    used_starts: set[int] = set()
    # occurrences of the suffix end at e <= total - 2 (one token at least follows them): the root's earlier
    # positions, narrowed token by token (cheaper than comparing every window; this runs per request and step)
    ends = np.flatnonzero(seq[: total - 1] == seq[total - 1])
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        e = ends[ends >= n - 1]
        for k in range(1, n):
            e = e[seq[e - k] == seq[total - 1 - k]]
        starts = e - (n - 1)
        for s in starts.tolist():
            begin = s + n
            if begin in used_starts:
                continue
            used_starts.add(begin)
            cont = seq[begin: begin + length].tolist()
            if any(prev[: len(cont)] == cont for prev, _ in out):
                continue
            out.append((cont, n))
            if len(out) == max_branches:
                return out
    return out
