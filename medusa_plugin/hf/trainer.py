"""Medusa-1 head training on a frozen Hugging Face causal LM (:class:`HeadTrainer`) and its checkpoints.

Recipe (Medusa paper §2.2.1, upstream ``medusa_model.py`` / ``train_legacy.py``): the base model is frozen; heads start
from :meth:`MedusaHeads.init_from_lm_head` (residual weight zero, projection copied from the base ``lm_head``, or the
shared base ``lm_head`` in the v2 layout); loss = sum_k ``loss_decay**k`` * CE_k; AdamW, linear warm-up then cosine.

Indexing (the part that is easy to get wrong): ``hidden[t]`` is the final-normed last-layer hidden state at position
``t`` (the input of ``lm_head``). The base ``lm_head(hidden[t])`` predicts token ``t+1``; head ``k`` (0-based) predicts
token ``t+k+2``. So head 0 guesses the token *after* the one the base model is about to emit.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base_model import _model_device, _pad_id, last_hidden_state, lm_head_of, resolve_device
from .errors import TrainError
from .windows import WindowSampler, head_targets

STATE_FILE = "training_state.pt"


def _lr_factor(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _fingerprint(sequences: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha1()
    for s in sequences:
        h.update(len(s).to_bytes(8, "little"))
        h.update(torch.as_tensor(list(s), dtype=torch.int64).numpy().tobytes())
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
    """Upstream-initialised heads for ``model`` (:meth:`MedusaHeads.init_from_lm_head`; fp32, on the lm_head's
    device). Run under ``seed`` in case the initialisation draws random numbers."""
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


def save_checkpoint(trainer: HeadTrainer, out_dir: str | os.PathLike) -> None:
    """Canonical heads (``save_pretrained``) plus ``training_state.pt`` (heads, optimizer, scheduler, step)."""
    out = Path(out_dir)
    trainer.heads.save_pretrained(out)
    tmp = out / (STATE_FILE + ".tmp")
    torch.save(trainer.state_dict(), tmp)
    os.replace(tmp, out / STATE_FILE)  # a crash mid-write never leaves a truncated state


def load_checkpoint(trainer: HeadTrainer, out_dir: str | os.PathLike) -> bool:
    """Restore ``trainer`` from ``out_dir/training_state.pt``; False when there is none."""
    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        return False
    trainer.load_state_dict(torch.load(path, map_location=trainer.device, weights_only=False))
    return True
