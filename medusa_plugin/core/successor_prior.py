"""How often the target's own text continues ``..., a, b`` with ``c``: token bigram and trigram counts, binned into a
few *successor levels*, as a second acceptance feature of dynamic-tree nodes.

Medusa heads do not see the draft path: head ``k`` scores its tokens for position ``t+k+2`` from the hidden state at
``t`` alone, the same under every parent. The target's text does depend on the parent. On SmolLM2-135M's shipped
heads (held-out chat prompts), a head-1 token whose bigram after its parent token never occurs in 123k tokens of the
model's own answers was accepted at 0.3-0.47x its head probability, and one that follows its parent at least 10 % of
the time at 1.7-3.5x. Re-scoring the lattice with a per-level multiplier
(:class:`~medusa_plugin.core.calibration.AcceptanceCalibration`) raised the accepted length of dynamic trees from
1.09x to 1.16x the fitted static tree's at 8 nodes and from 1.06x to 1.12x at 16, measured offline over every position
of 32 held-out answers (a trigram with a bigram back-off; a bigram alone gave 1.14x and 1.10x).

Levels: the trigram ``(a, b) -> c`` when the context ``(a, b)`` was seen, else the bigram ``b -> c`` when ``b`` was
seen, else none. Its frequency ``x = count / (context count + 1)`` falls in bin ``0`` when ``x = 0`` and
``1 + min(5, floor(-ln x / ln 3))`` otherwise, so::

    level 0            no context seen
    level 1 + bin      bigram back-off (bins 0..6)
    level 8 + bin      trigram (bins 0..6)

The counts come from the target's own continuations of training-side prompts (the chat recipe writes
``successors.safetensors`` next to the heads). Plain Python and safetensors; no engine import.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["SuccessorPriorError", "SuccessorCounts", "NUM_LEVELS", "FILE_NAME"]

NUM_LEVELS = 15
FILE_NAME = "successors.safetensors"
_LOG3 = math.log(3.0)


class SuccessorPriorError(ValueError):
    """A successor-count file that cannot be read, or bad input; the message names the file and the fix."""


def _bin(x: float) -> int:
    return 0 if x <= 0.0 else 1 + min(5, int(-math.log(x) / _LOG3))


class SuccessorCounts:
    """Bigram and trigram counts of token sequences, and the successor level of a candidate token.

    Attributes:
        tokens: tokens counted (the sum of the sequence lengths).
    """

    def __init__(self) -> None:
        self._bi: dict[int, dict[int, float]] = defaultdict(dict)
        self._bi_tot: dict[int, float] = defaultdict(float)
        self._tri: dict[tuple[int, int], dict[int, float]] = defaultdict(dict)
        self._tri_tot: dict[tuple[int, int], float] = defaultdict(float)
        self.tokens = 0

    @classmethod
    def from_sequences(cls, sequences: Iterable[Sequence[int]]) -> "SuccessorCounts":
        """Counts of every bigram and trigram inside each sequence (token-id lists, e.g. prompt + answer)."""
        out = cls()
        for seq in sequences:
            out.add(seq)
        return out

    def add(self, tokens: Sequence[int], weight: float = 1.0) -> None:
        """Count the bigrams and trigrams of ``tokens`` (``weight`` each)."""
        toks = [int(t) for t in tokens]
        self.tokens += len(toks)
        for i in range(1, len(toks)):
            b, c = toks[i - 1], toks[i]
            row = self._bi[b]
            row[c] = row.get(c, 0.0) + weight
            self._bi_tot[b] += weight
            if i >= 2:
                key = (toks[i - 2], b)
                row = self._tri[key]
                row[c] = row.get(c, 0.0) + weight
                self._tri_tot[key] += weight

    def level(self, prev2: int | None, prev1: int, token: int) -> int:
        """The successor level (0..14, see the module docstring) of ``token`` after ``prev2, prev1``
        (``prev2`` None: bigram only)."""
        if prev2 is not None:
            n = self._tri_tot.get((prev2, prev1))
            if n:
                return 8 + _bin(self._tri[(prev2, prev1)].get(token, 0.0) / (n + 1.0))
        n = self._bi_tot.get(prev1)
        if n:
            return 1 + _bin(self._bi[prev1].get(token, 0.0) / (n + 1.0))
        return 0

    def levels(self, prev2: int | None, prev1: int, tokens: Sequence[int]) -> list[int]:
        """:meth:`level` of each of ``tokens`` after the same ``prev2, prev1`` (one lookup of the context)."""
        if prev2 is not None:
            n = self._tri_tot.get((prev2, prev1))
            if n:
                row = self._tri[(prev2, prev1)]
                return [8 + _bin(row.get(t, 0.0) / (n + 1.0)) for t in tokens]
        n = self._bi_tot.get(prev1)
        if n:
            row = self._bi[prev1]
            return [1 + _bin(row.get(t, 0.0) / (n + 1.0)) for t in tokens]
        return [0] * len(tokens)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write the counts as safetensors (int32 token ids, float32 counts); returns the path."""
        import torch
        from safetensors.torch import save_file

        bi = [(b, c, n) for b, row in self._bi.items() for c, n in row.items()]
        tri = [(a, b, c, n) for (a, b), row in self._tri.items() for c, n in row.items()]
        t = {"bigram_tokens": torch.tensor([[b, c] for b, c, _ in bi], dtype=torch.int32).reshape(-1, 2),
             "bigram_counts": torch.tensor([n for *_, n in bi], dtype=torch.float32),
             "trigram_tokens": torch.tensor([[a, b, c] for a, b, c, _ in tri], dtype=torch.int32).reshape(-1, 3),
             "trigram_counts": torch.tensor([n for *_, n in tri], dtype=torch.float32)}
        path = Path(path)
        save_file(t, str(path), metadata={"format": "medusa_plugin successor counts", "tokens": str(self.tokens)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SuccessorCounts":
        """Read :meth:`save`'s file. Raises :class:`SuccessorPriorError` naming the file when it is missing or
        not such a file."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise SuccessorPriorError(f"successor counts not found: {path} (write them with `medusa-plugin train "
                                      f"--recipe chat`, or set `successors: off`)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}
            bt, bn, tt, tn = t["bigram_tokens"], t["bigram_counts"], t["trigram_tokens"], t["trigram_counts"]
            if bt.dim() != 2 or bt.shape[1:] != (2,) or tt.dim() != 2 or tt.shape[1:] != (3,) \
                    or bn.shape[0] != bt.shape[0] or tn.shape[0] != tt.shape[0]:
                raise ValueError("shapes")
        except Exception as e:  # noqa: BLE001 - any unreadable file is one line
            raise SuccessorPriorError(f"{path} is not a successor-count file ({type(e).__name__}: {e}); rewrite it "
                                      f"with `medusa-plugin train --recipe chat` or remove it") from None
        out = cls()
        out.tokens = int(meta.get("tokens", 0))
        for (b, c), n in zip(bt.tolist(), bn.tolist()):
            out._bi[b][c] = n
            out._bi_tot[b] += n
        for (a, b, c), n in zip(tt.tolist(), tn.tolist()):
            out._tri[(a, b)][c] = n
            out._tri_tot[(a, b)] += n
        return out
