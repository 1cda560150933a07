"""A truncated draft vocabulary: the ``N`` most frequent tokens of the distilled answers, as a ``token_map``.

Heads that score only these tokens are cheaper to train and to run (SmolLM2's 49152-token projection per head weighs
as much as the rest of the model). ``token_map[i]`` is the full-vocabulary id of draft index ``i`` (the old vLLM
``MedusaModel`` convention the head loader reads). A token outside the map is never drafted; the target model still
verifies every draft, so output stays lossless, only acceptance can drop (see :func:`coverage`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

from .errors import TrainError


def token_counts(sequences: Iterable[Sequence[int]], vocab_size: int) -> Tensor:
    """Occurrences of every token id in ``sequences``: int64 [vocab_size]. Raises TrainError on ids out of range."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for s in sequences:
        if len(s):
            t = torch.as_tensor(list(s), dtype=torch.int64)
            if int(t.min()) < 0 or int(t.max()) >= vocab_size:
                raise TrainError(f"token ids outside [0, {vocab_size}) in the data: is it tokenised for this model?")
            counts += torch.bincount(t, minlength=vocab_size)
    return counts


def frequent_token_map(sequences: Iterable[Sequence[int]], vocab_size: int, size: int,
                       always: Sequence[int] = ()) -> Tensor:
    """The ``size`` most frequent token ids (ties: lower id first), plus ``always`` (e.g. EOS), sorted ascending:
    int64 [min(size, vocab_size)]. ``size`` >= vocab_size gives every id."""
    if size < 1:
        raise TrainError(f"draft vocabulary size {size}: must be >= 1")
    if size >= vocab_size:
        return torch.arange(vocab_size, dtype=torch.int64)
    counts = token_counts(sequences, vocab_size)
    extra = torch.as_tensor(sorted(set(always)), dtype=torch.int64)
    counts[extra] = -1  # added below, not counted against size
    order = torch.argsort(-counts, stable=True)  # by count descending, ties: lower id first
    return torch.unique(torch.cat([order[:size], extra]))


def coverage(token_map: Tensor, sequences: Iterable[Sequence[int]]) -> float:
    """Fraction of the tokens in ``sequences`` that the map contains (the ceiling of any head's accuracy)."""
    inside = total = 0
    allowed = set(token_map.tolist())
    for s in sequences:
        total += len(s)
        inside += sum(1 for t in s if t in allowed)
    return inside / max(total, 1)


def inverse_map(token_map: Tensor, vocab_size: int) -> Tensor:
    """Full id -> draft index (-1 when not in the map): int64 [vocab_size]."""
    inv = torch.full((vocab_size,), -1, dtype=torch.int64)
    inv[token_map] = torch.arange(token_map.numel(), dtype=torch.int64)
    return inv
