"""Training batches for heads trained through the backbone: random token windows and each head's targets."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .errors import TrainError


class WindowSampler:
    """Random windows of at most ``seq_len`` tokens, deterministic per (seed, step) so a resumed run sees the same
    batches. Window starts are uniform over all windows of all sequences (long sequences are drawn more often)."""

    def __init__(self, sequences: Sequence[Sequence[int]], *, seq_len: int, batch_size: int, pad_id: int,
                 seed: int = 0, min_len: int = 3):
        if seq_len < min_len:
            raise TrainError(f"seq_len={seq_len} is too short: a window needs at least {min_len} tokens "
                             f"(a hidden state and the token two ahead)")
        if batch_size < 1:
            raise TrainError(f"batch_size={batch_size}: must be >= 1")
        self.sequences = [torch.as_tensor(list(s), dtype=torch.long) for s in sequences if len(s) >= min_len]
        if not self.sequences:
            raise TrainError(f"no training sequence has at least {min_len} tokens ({len(sequences)} given); "
                             f"check --data (empty lines, wrong field names?)")
        self.seq_len, self.batch_size, self.pad_id, self.seed = seq_len, batch_size, pad_id, seed
        lengths = torch.tensor([len(s) for s in self.sequences], dtype=torch.float64)
        self.weights = (lengths - seq_len + 1).clamp(min=1)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """-> (input_ids [B, T] int64 right-padded with pad_id, lengths [B] int64), T <= seq_len."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        picks = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g).tolist()
        windows = []
        for i in picks:
            seq = self.sequences[i]
            start = int(torch.randint(0, max(1, len(seq) - self.seq_len + 1), (1,), generator=g))
            windows.append(seq[start:start + self.seq_len])
        lengths = torch.tensor([len(w) for w in windows])
        ids = torch.full((len(windows), int(lengths.max())), self.pad_id, dtype=torch.long)
        for row, w in enumerate(windows):
            ids[row, :len(w)] = w
        return ids, lengths


def head_targets(input_ids: Tensor, lengths: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Targets of head ``k`` for hidden positions ``t = 0..T-k-3``: (tokens ``input_ids[:, t+k+2]`` [B, T-k-2]
    int64, valid [B, T-k-2] bool = the target lies inside the unpadded window)."""
    shift = k + 2
    T = input_ids.shape[1]
    targets = input_ids[:, shift:]
    valid = (torch.arange(shift, T, device=input_ids.device)[None, :] < lengths.to(input_ids.device)[:, None])
    return targets, valid
