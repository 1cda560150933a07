"""Train Medusa-1 heads on a frozen Hugging Face causal LM, and the ``medusa-plugin train`` command.

Recipe (Medusa paper §2.2.1, upstream ``medusa_model.py`` / ``train_legacy.py``): the base model is frozen; heads start
from :meth:`MedusaHeads.init_from_lm_head` (residual weight zero, projection copied from the base ``lm_head``, or the
shared base ``lm_head`` in the v2 layout); loss = sum_k ``loss_decay**k`` * CE_k; AdamW, linear warm-up then cosine.

Indexing (the part that is easy to get wrong): ``hidden[t]`` is the final-normed last-layer hidden state at position
``t`` (the input of ``lm_head``). The base ``lm_head(hidden[t])`` predicts token ``t+1``; head ``k`` (0-based) predicts
token ``t+k+2``. So head 0 guesses the token *after* the one the base model is about to emit.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import re
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STATE_FILE = "training_state.pt"
SELF_DISTILL_FILE = "self_distill.jsonl"


class TrainError(ValueError):
    """Bad training input or arguments (message names the problem and the fix)."""


# ------------------------------------------------------------------------------------------------ model helpers
def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" -> cuda if available else cpu."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def lm_head_of(model: nn.Module) -> nn.Module:
    """The base model's output projection (``Linear(hidden, vocab)``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise TrainError(f"{type(model).__name__} has no output embedding (lm_head); pass a causal LM "
                         f"(AutoModelForCausalLM), not a bare backbone")
    return head


def last_hidden_state(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Final-normed last-layer hidden states feeding ``lm_head``: input_ids [B, T] int64 -> [B, T, H] (model dtype).

    Runs the backbone only (``model.base_model``, e.g. ``LlamaModel``), whose ``last_hidden_state`` is after the
    final norm in every transformers version, so ``lm_head(result) == model(input_ids).logits``.
    """
    base = getattr(model, "base_model", model)
    if base is model:  # no separate backbone: fall back on the hidden-state tuple (final-normed in transformers 5)
        return model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                     use_cache=False).hidden_states[-1]
    return base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _eos_ids(model: nn.Module) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _pad_id(model: nn.Module) -> int:
    for src in (getattr(model, "generation_config", None), model.config):
        pad = getattr(src, "pad_token_id", None)
        if pad is not None:
            return int(pad[0] if isinstance(pad, (list, tuple)) else pad)
    eos = sorted(_eos_ids(model))
    return eos[0] if eos else 0


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def self_distill(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, *, batch_size: int = 8,
                 device: str | torch.device | None = None) -> list[list[int]]:
    """Greedy continuations of the base model: returns ``prompt + continuation`` token ids, one list per prompt.

    ``prompts``: token id lists (non-empty). The continuation stops after the first EOS (kept) or after
    ``max_new_tokens`` tokens. Prompts are batched by similar length (left padding) and returned in input order.
    """
    if max_new_tokens < 1:
        raise TrainError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise TrainError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
    if device is not None:
        model.to(resolve_device(device))
    model.eval()
    dev = _model_device(model)
    pad, eos = _pad_id(model), _eos_ids(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
        for row, i in enumerate(idx):
            cont = gen[row, width:].tolist()
            for j, tok in enumerate(cont):
                if tok in eos:
                    cont = cont[:j + 1]
                    break
            out[i] = list(prompts[i]) + cont
    return out


# ------------------------------------------------------------------------------------------------ batching
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


# ------------------------------------------------------------------------------------------------ trainer
def _lr_factor(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _fingerprint(sequences: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha1()
    for s in sequences:
        h.update(json.dumps(list(s)).encode())
        h.update(b"\n")
    return h.hexdigest()


class HeadTrainer:
    """Stateful Medusa-1 head training on a frozen base model (what :func:`train_heads` and the CLI run).

    ``step`` counts optimiser updates done; ``history`` holds ``{"step", "loss", "acc": [K] top-1}`` per update.
    :meth:`state_dict` / :meth:`load_state_dict` cover heads, optimiser, scheduler and step, so stopping after any
    step and resuming gives the same final weights as an uninterrupted run (batches depend only on seed and step).
    """

    def __init__(self, model: nn.Module, sequences: Sequence[Sequence[int]], heads: nn.Module, *, steps: int,
                 lr: float = 1e-3, batch_size: int = 8, seq_len: int = 128, warmup_ratio: float = 0.05,
                 weight_decay: float = 0.0, loss_decay: float = 0.8, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, seed: int = 0, max_grad_norm: float | None = 1.0):
        if steps < 1:
            raise TrainError(f"steps={steps}: must be >= 1")
        if not 0.0 <= warmup_ratio < 1.0:
            raise TrainError(f"warmup_ratio={warmup_ratio}: must be in [0, 1)")
        self.device = resolve_device(device)
        if _model_device(model) != self.device and not getattr(model, "hf_device_map", None):
            model.to(self.device)
        model.eval().requires_grad_(False)
        self.model, self.lm_head = model, lm_head_of(model)
        vocab, hidden = self.lm_head.weight.shape
        if heads.hidden_size != hidden or (heads.vocab_size is not None and heads.vocab_size != vocab):
            raise TrainError(f"heads are for hidden={heads.hidden_size}, vocab={heads.vocab_size} but the base model "
                             f"has hidden={hidden}, vocab={vocab}; train new heads for this base model")
        self.heads = heads.to(device=self.device, dtype=torch.float32).train()
        self.heads.requires_grad_(True)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.autocast_dtype = dtype
        self.steps, self.loss_decay, self.max_grad_norm = steps, loss_decay, max_grad_norm
        self.sampler = WindowSampler(sequences, seq_len=seq_len, batch_size=batch_size, pad_id=_pad_id(model),
                                     seed=seed)
        self.optimizer = torch.optim.AdamW(self.heads.parameters(), lr=lr, weight_decay=weight_decay)
        warmup = math.ceil(warmup_ratio * steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(_lr_factor, warmup=warmup, total=steps))
        self.step = 0
        self.history: list[dict] = []
        # What must match for a checkpoint to be resumable into this trainer.
        self.settings = dict(num_heads=heads.num_heads, num_layers=heads.num_layers, own_lm_head=heads.own_lm_head,
                             steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, warmup_ratio=warmup_ratio,
                             weight_decay=weight_decay, loss_decay=loss_decay, seed=seed,
                             data=_fingerprint(sequences))

    def _autocast(self):
        if self.autocast_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def losses(self, input_ids: Tensor, lengths: Tensor) -> tuple[Tensor, list[float]]:
        """Weighted loss (scalar, with grad) and per-head top-1 accuracy on one batch [B, T]."""
        input_ids, lengths = input_ids.to(self.device), lengths.to(self.device)
        mask = (torch.arange(input_ids.shape[1], device=self.device)[None, :] < lengths[:, None]).long()
        with torch.no_grad(), self._autocast():
            hidden = last_hidden_state(self.model, input_ids, mask)
        with self._autocast():
            logits = self.heads(hidden.float(), lm_head=None if self.heads.own_lm_head else self.lm_head)
        total = logits.new_zeros((), dtype=torch.float32)
        accs = []
        for k in range(self.heads.num_heads):
            targets, valid = head_targets(input_ids, lengths, k)
            if not valid.any():
                accs.append(float("nan"))
                continue
            lg = logits[:, :targets.shape[1], k][valid].float()
            tg = targets[valid]
            total = total + self.loss_decay ** k * F.cross_entropy(lg, tg)
            accs.append((lg.argmax(-1) == tg).float().mean().item())
        return total, accs

    def train_step(self) -> dict:
        """One optimiser update on the batch of the current step; returns its history entry."""
        ids, lengths = self.sampler.batch(self.step)
        loss, accs = self.losses(ids, lengths)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.heads.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        entry = {"step": self.step, "loss": loss.item(), "acc": accs, "lr": self.scheduler.get_last_lr()[0]}
        self.history.append(entry)
        return entry

    def run(self, until: int | None = None, *, progress: bool = True,
            on_step: Callable[["HeadTrainer"], None] | None = None) -> nn.Module:
        """Train up to step ``until`` (default: all ``steps``); ``on_step(trainer)`` runs after every update."""
        until = self.steps if until is None else min(until, self.steps)
        from tqdm.auto import tqdm

        bar = tqdm(total=self.steps, initial=self.step, disable=not progress, desc="medusa heads", dynamic_ncols=True)
        ema_loss, ema_acc = None, None
        try:
            while self.step < until:
                entry = self.train_step()
                acc = [0.0 if math.isnan(a) else a for a in entry["acc"]]
                if ema_loss is None:
                    ema_loss, ema_acc = entry["loss"], acc
                else:
                    ema_loss = 0.9 * ema_loss + 0.1 * entry["loss"]
                    ema_acc = [0.9 * e + 0.1 * a for e, a in zip(ema_acc, acc)]
                bar.update(1)
                bar.set_postfix(loss=f"{ema_loss:.3f}", top1="/".join(f"{a:.2f}" for a in ema_acc), refresh=False)
                if on_step is not None:
                    on_step(self)
        finally:
            bar.close()
        self.heads.eval()
        return self.heads

    def state_dict(self) -> dict:
        return {"step": self.step, "heads": {k: v.detach().clone() for k, v in self.heads.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "settings": dict(self.settings), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        diff = {k: (state["settings"].get(k), v) for k, v in self.settings.items() if state["settings"].get(k) != v}
        if diff:
            what = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise TrainError(f"cannot resume: the checkpoint was trained with different settings ({what}); "
                             f"rerun with the original arguments or use a new output directory")
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))


def new_heads(model: nn.Module, *, num_heads: int = 4, num_layers: int = 1, own_lm_head: bool = True,
              seed: int = 0) -> nn.Module:
    """Upstream-initialised heads for ``model`` (fp32, on the lm_head's device); seeded (ResBlock biases are random)."""
    from medusa_plugin.core.heads import MedusaHeads

    if num_heads < 1 or num_layers < 1:
        raise TrainError(f"num_heads={num_heads}, num_layers={num_layers}: both must be >= 1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        weight = lm_head_of(model).weight.detach().float()
        return MedusaHeads.init_from_lm_head(weight, num_heads, num_layers=num_layers, own_lm_head=own_lm_head)


def train_heads(model: nn.Module, sequences: list[list[int]], *, num_heads: int = 4, num_layers: int = 1,
                own_lm_head: bool = True, steps: int = 200, lr: float = 1e-3, batch_size: int = 8, seq_len: int = 128,
                warmup_ratio: float = 0.05, weight_decay: float = 0.0, loss_decay: float = 0.8,
                device: str | torch.device | None = None, dtype: torch.dtype | None = None, seed: int = 0,
                progress: bool = True, heads: nn.Module | None = None):
    """Train Medusa heads on ``sequences`` (token id lists) with ``model`` frozen; returns the trained ``MedusaHeads``
    (fp32, eval mode, on ``device``).

    ``heads``: continue training these instead of fresh upstream-initialised ones (then ``num_heads``,
    ``num_layers`` and ``own_lm_head`` are taken from them). ``dtype``: autocast compute dtype (default bf16 on CUDA,
    fp32 = no autocast on CPU); the heads' weights stay fp32. ``device``: default cuda if available else cpu
    (the model is moved there). The base model is put in eval mode with ``requires_grad_(False)``.
    """
    if heads is None:
        heads = new_heads(model, num_heads=num_heads, num_layers=num_layers, own_lm_head=own_lm_head, seed=seed)
    trainer = HeadTrainer(model, sequences, heads, steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len,
                          warmup_ratio=warmup_ratio, weight_decay=weight_decay, loss_decay=loss_decay, device=device,
                          dtype=dtype, seed=seed)
    return trainer.run(progress=progress)
