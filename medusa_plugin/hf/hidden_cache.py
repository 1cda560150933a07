"""The frozen target model's hidden states over distilled chats, computed once and reused every epoch.

Heads read only the final-normed last hidden state, and the target model is frozen, so one forward pass per
(prompt + answer) gives everything head training needs; recomputing it every epoch is what made training slow.

Only the positions that matter for decoding are kept: for a sample with prompt ``p`` (``P`` tokens) and answer
``a`` (``m`` tokens), positions ``t = P-1 .. P+m-2``, i.e. the hidden state *before* each answer token. Cached
row ``j`` of that sample holds ``hidden[P-1+j]`` and ``next_token = a[j]`` (the token the model emitted there).
Head ``k`` at row ``j`` predicts ``a[j+k+1]`` (the token ``k+2`` positions after ``t``, the Medusa offset); the
target model's own distribution of that token is ``lm_head(hidden of row j+k+1)`` (Medusa-2 self-distillation).
Prompt and chat-template tokens never become targets: the loss is on the assistant's tokens only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from .errors import TrainError


def sample_hash(prompt: Sequence[int], answer: Sequence[int]) -> int:
    """A stable 63-bit key of one (prompt, answer) pair: which cached rows belong to which chat."""
    import hashlib

    data = ",".join(map(str, prompt)) + "|" + ",".join(map(str, answer))
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "little") >> 1


@dataclass
class HiddenStateCache:
    """hidden [M, H] (float32 or bfloat16); next_token [M] int64; segment_end [M] int64 = one past the sample's last
    row (rows ``j .. segment_end[j]-1`` belong to the same answer); sample_keys [S] int64 (optional): the
    :func:`sample_hash` of each sample, in row order, so a later run can reuse the rows of the samples it shares."""

    hidden: Tensor
    next_token: Tensor
    segment_end: Tensor
    sample_keys: Tensor | None = None

    def segments(self) -> list[tuple[int, int]]:
        """(first row, one past the last row) of each sample, in order."""
        ends = torch.unique_consecutive(self.segment_end).tolist()
        return list(zip([0] + ends[:-1], ends))

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def valid_rows(self, k: int) -> Tensor:
        """Rows where head ``k`` has a target (``j + k + 1`` inside the same answer): bool [M]."""
        return torch.arange(len(self)) + k + 1 < self.segment_end

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        tensors = {"hidden": self.hidden.contiguous(), "next_token": self.next_token, "segment_end": self.segment_end}
        if self.sample_keys is not None:
            tensors["sample_keys"] = self.sample_keys
        save_file(tensors, str(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HiddenStateCache":
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(t["hidden"], t["next_token"], t["segment_end"], t.get("sample_keys"))


@torch.inference_mode()
def compute_hidden_states(model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], *,
                          store_dtype: torch.dtype = torch.bfloat16, max_batch_tokens: int = 2048,
                          progress: bool = True) -> HiddenStateCache:
    """Run ``model`` (a transformers causal LM, frozen) over every ``prompt + answer`` and keep the answer rows.

    Args:
        prompts, answers: token-id lists, pairwise (answers with fewer than 1 token are skipped).
        store_dtype: dtype of the cached states (bf16 halves the memory; the heads train in fp32 anyway).
        max_batch_tokens: samples of similar length are batched (right padding) up to this many tokens.
    Returns:
        :class:`HiddenStateCache`. Progress: a tqdm bar with tokens/s.
    """
    from tqdm.auto import tqdm

    from .base_model import _model_device, last_hidden_state

    if len(prompts) != len(answers):
        raise TrainError(f"{len(prompts)} prompts but {len(answers)} answers: they must pair up")
    items = [(list(p), list(a)) for p, a in zip(prompts, answers) if len(p) and len(a)]
    if not items:
        raise TrainError("no sample has both a prompt and an answer token")
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
    dev = _model_device(model)
    rows: list[Tensor | None] = [None] * len(items)
    total = sum(len(p) + len(a) for p, a in items)
    bar = tqdm(total=total, desc="hidden states", unit="tok", unit_scale=True, disable=not progress,
               dynamic_ncols=True)
    s = 0
    while s < len(order):
        width = len(items[order[s]][0]) + len(items[order[s]][1])
        e = s + 1
        while e < len(order) and (e - s + 1) * (len(items[order[e]][0]) + len(items[order[e]][1])) <= max_batch_tokens:
            e += 1
        idx = order[s:e]
        width = max(len(items[i][0]) + len(items[i][1]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            seq = items[i][0] + items[i][1]
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
        h = last_hidden_state(model, ids.to(dev), mask.to(dev))
        for r, i in enumerate(idx):
            P, m = len(items[i][0]), len(items[i][1])
            rows[i] = h[r, P - 1:P - 1 + m].to("cpu", store_dtype)
        bar.update(int(mask.sum()))
        s = e
    bar.close()
    return _assemble(list(rows), [a for _, a in items], [sample_hash(p, a) for p, a in items])


def _assemble(rows: list[Tensor], answers: list[list[int]], keys: list[int]) -> HiddenStateCache:
    next_token = torch.cat([torch.tensor(a, dtype=torch.int64) for a in answers])
    lengths = torch.tensor([len(a) for a in answers])
    segment_end = torch.repeat_interleave(lengths.cumsum(0), lengths)
    return HiddenStateCache(torch.cat(rows), next_token, segment_end, torch.tensor(keys, dtype=torch.int64))


def _rows_by_key(cache: HiddenStateCache, items: list[tuple[list[int], list[int]]], keys: list[int]
                 ) -> dict[int, Tensor]:
    """The cached rows of each sample, by :func:`sample_hash`. A cache written without keys is matched to ``items``
    (with their ``keys``) only when its tokens are exactly theirs (then it was computed from them)."""
    segs = cache.segments()
    if cache.sample_keys is not None and cache.sample_keys.numel() == len(segs):
        keys = cache.sample_keys.tolist()
    elif not (len(items) == len(segs) and cache.next_token.tolist() == [t for _, a in items for t in a]):
        return {}
    return {k: cache.hidden[s:e] for k, (s, e) in zip(keys, segs)}


def load_or_compute(path: Path, model, prompts, answers, *, known: dict[int, Tensor] | None = None,
                    **kw) -> tuple[HiddenStateCache, float]:
    """The hidden states of ``prompts``/``answers`` (as :func:`compute_hidden_states`), reusing the rows of every
    sample already cached at ``path`` (matched by :func:`sample_hash`, so a run with more prompts computes only the
    new ones, and a stale cache is never used for other chats) or given in ``known`` ({:func:`sample_hash`:
    ``[len(answer), H]`` rows}, e.g. captured while vLLM generated the answers); the result is saved to ``path``.
    Returns (cache, seconds spent computing)."""
    items = [(list(p), list(a)) for p, a in zip(prompts, answers) if len(p) and len(a)]
    if not items:
        raise TrainError("no sample has both a prompt and an answer token")
    old = HiddenStateCache.load(path) if path.is_file() else None
    keys = [sample_hash(p, a) for p, a in items]
    if old is not None and old.sample_keys is not None and old.sample_keys.tolist() == keys:
        return old, 0.0
    given = known or {}
    for k, (_, a) in zip(keys, items):
        if k in given and given[k].shape[0] != len(a):
            raise TrainError(f"{given[k].shape[0]} hidden-state rows given for an answer of {len(a)} tokens")
    rows = {**given, **(_rows_by_key(old, items, keys) if old is not None else {})}
    missing = [i for i, k in enumerate(keys) if k not in rows]
    t0 = time.perf_counter()
    if missing:
        new = compute_hidden_states(model, [items[i][0] for i in missing], [items[i][1] for i in missing], **kw)
        for k, (s, e) in zip(new.sample_keys.tolist(), new.segments()):
            rows[k] = new.hidden[s:e]
    cache = _assemble([rows[k] for k in keys], [a for _, a in items], keys)
    cache.save(path)
    return cache, time.perf_counter() - t0
