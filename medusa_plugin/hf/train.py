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


# ------------------------------------------------------------------------------------------------ data
_USER_ROLES = {"human": "user", "user": "user", "system": "system"}


def _turns(conversation: list, where: str) -> list[dict]:
    msgs = []
    for turn in conversation:
        if not isinstance(turn, dict):
            raise TrainError(f"{where}: each conversation turn must be an object with 'from'/'role' and "
                             f"'value'/'content', got {turn!r:.80}")
        role = str(turn.get("role", turn.get("from", ""))).lower()
        content = turn.get("content", turn.get("value"))
        if content is None:
            raise TrainError(f"{where}: conversation turn without 'value'/'content': {turn!r:.80}")
        msgs.append({"role": _USER_ROLES.get(role, "assistant"), "content": str(content)})
    return msgs


def _tokenize_chat(tokenizer, msgs: list[dict]) -> tuple[list[int], list[int]]:
    """(prompt ids = messages up to the first user turn + generation prompt, ids of the whole conversation)."""
    first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), 0)
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        prompt = tokenizer.apply_chat_template(msgs[:first_user + 1], tokenize=False, add_generation_prompt=True)
        return (tokenizer(prompt, add_special_tokens=False)["input_ids"],
                tokenizer(full, add_special_tokens=False)["input_ids"])
    text = lambda ms: "".join(f"{m['role'].upper()}: {m['content']}\n" for m in ms)  # noqa: E731
    prompt_ids = tokenizer(text(msgs[:first_user + 1]) + "ASSISTANT:")["input_ids"]
    return prompt_ids, tokenizer(text(msgs))["input_ids"]


def record_sample(rec, tokenizer, where: str) -> tuple[list[int] | None, list[int]]:
    """One JSON record -> ``(prompt_ids or None, all_ids)`` (formats: see :func:`load_samples`)."""
    if isinstance(rec, str):
        return None, tokenizer(rec)["input_ids"]
    if not isinstance(rec, dict):
        raise TrainError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "conversations" in rec or "messages" in rec:
        return _tokenize_chat(tokenizer, _turns(rec.get("conversations", rec.get("messages")), where))
    if "prompt" in rec:
        prompt = tokenizer(str(rec["prompt"]))["input_ids"]
        resp = rec.get("response", rec.get("completion", rec.get("output", "")))
        return prompt, prompt + tokenizer(str(resp), add_special_tokens=False)["input_ids"]
    if "text" in rec:
        return None, tokenizer(str(rec["text"]))["input_ids"]
    raise TrainError(f"{where}: no known field; each line needs 'text', 'prompt' (+ 'response'), or "
                     f"'conversations' (found: {', '.join(sorted(rec)) or 'none'})")


def read_jsonl(path: Path, tokenizer) -> list[tuple[list[int] | None, list[int]]]:
    """Samples from a JSONL file, one record per non-empty line (errors name ``file:line``)."""
    samples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainError(f"{path}:{n}: not valid JSON ({e.msg}); JSONL needs one JSON object per line") from None
        samples.append(record_sample(rec, tokenizer, f"{path}:{n}"))
    return samples


def load_samples(path: str | os.PathLike, tokenizer) -> list[tuple[list[int] | None, list[int]]]:
    """Tokenised samples ``(prompt_ids or None, all_ids)`` from ``--data``.

    * ``.jsonl`` / ``.json`` (one object per line): ``{"text"}``, ``{"prompt", "response"}`` (also "completion" /
      "output") or ShareGPT ``{"conversations": [{"from", "value"}, ...]}`` / ``{"messages": [{"role", "content"}]}``
      (rendered with the tokenizer's chat template when it has one; the prompt is everything up to the first user
      turn plus the generation prompt).
    * any other file: plain text, one sample per file.
    * a directory: every non-hidden file under it (recursively, sorted), each as above.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file or directory")
    hidden = lambda p: any(part.startswith(".") for part in p.relative_to(path).parts)  # noqa: E731
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not hidden(p))
    samples: list[tuple[list[int] | None, list[int]]] = []
    for f in files:
        if f.suffix in (".jsonl", ".json"):
            samples += read_jsonl(f, tokenizer)
        else:
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                samples.append((None, tokenizer(text)["input_ids"]))
    if not samples:
        raise TrainError(f"--data {path}: no samples found (empty files?)")
    return samples


def distill_prompts(samples: list[tuple[list[int] | None, list[int]]], *, prompt_tokens: int,
                    chunk_tokens: int) -> list[list[int]]:
    """Prompts for self-distillation: a sample's own prompt when it has one; otherwise the first ``prompt_tokens``
    tokens of every ``chunk_tokens``-token chunk of its text."""
    prompts = []
    for prompt, ids in samples:
        if prompt:
            prompts.append(prompt)
        else:
            prompts += [ids[s:s + prompt_tokens] for s in range(0, len(ids), chunk_tokens) if ids[s:s + prompt_tokens]]
    return prompts


# ------------------------------------------------------------------------------------------------ checkpoints
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


# ------------------------------------------------------------------------------------------------ CLI
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model: Hugging Face hub id or local directory")
    p.add_argument("--data", required=True,
                   help="JSONL ('text', 'prompt'/'response' or 'conversations' per line), a text file, or a "
                        "directory of such files")
    p.add_argument("--out", required=True, help="output directory: canonical heads (model.safetensors + config.json) "
                                                "and training_state.pt")
    p.add_argument("--self-distill", action="store_true",
                   help="train on the base model's own greedy responses to the data's prompts (recommended)")
    p.add_argument("--distill-tokens", type=int, default=None,
                   help="tokens generated per prompt with --self-distill (default: --seq-len)")
    p.add_argument("--prompt-tokens", type=int, default=64,
                   help="for samples without a prompt field: prompt = first N tokens of every --seq-len chunk")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=1, help="ResBlocks per head")
    p.add_argument("--shared-lm-head", action="store_true",
                   help="v2 layout: heads have no projection of their own and reuse the base lm_head")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, default=None, help="optimiser updates (default: 1 epoch)")
    steps.add_argument("--epochs", type=float, default=None,
                       help="passes over the data, in tokens: steps = epochs * tokens / (batch * seq_len)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--loss-decay", type=float, default=0.8, help="loss weight of head k is loss_decay**k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="base model weights; auto = bfloat16 on CUDA, float32 on CPU (heads train in float32)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true",
                   help="continue from training_state.pt in --out (same arguments required); starts fresh if none")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) once this many steps are done in total; finish later with --resume")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_model(name: str, device: torch.device, dtype: str):
    """(causal LM in eval mode on ``device``, tokenizer); ``dtype``: "auto" (bf16 on CUDA, fp32 on CPU) or a name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = DTYPES.get(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype).to(device).eval()
    return model, tokenizer


def _read_ids_jsonl(path: Path) -> list[list[int]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except TrainError as e:
        print(f"medusa-plugin train: error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    for name in ("num_heads", "num_layers", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args.model, device, args.dtype)
    samples = load_samples(args.data, tokenizer)
    sequences = [ids for _, ids in samples]
    if args.self_distill:
        cache = out / SELF_DISTILL_FILE
        if args.resume and cache.is_file():
            sequences = _read_ids_jsonl(cache)
            print(f"self-distill: reusing {len(sequences)} sequences from {cache}")
        else:
            prompts = distill_prompts(samples, prompt_tokens=args.prompt_tokens, chunk_tokens=args.seq_len)
            print(f"self-distill: generating {len(prompts)} greedy responses with {args.model}")
            sequences = self_distill(model, prompts, args.distill_tokens or args.seq_len, batch_size=args.batch_size)
            cache.write_text("".join(json.dumps(s) + "\n" for s in sequences))
    tokens = sum(len(s) for s in sequences)
    steps = args.steps or max(1, math.ceil((args.epochs or 1.0) * tokens / (args.batch_size * args.seq_len)))

    heads = new_heads(model, num_heads=args.num_heads, num_layers=args.num_layers,
                      own_lm_head=not args.shared_lm_head, seed=args.seed)
    heads.base_model_name_or_path = args.model
    trainer = HeadTrainer(model, sequences, heads, steps=steps, lr=args.lr, batch_size=args.batch_size,
                          seq_len=args.seq_len, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                          loss_decay=args.loss_decay, device=device, seed=args.seed)
    if args.resume:
        if load_checkpoint(trainer, out):
            print(f"resuming from {out / STATE_FILE} at step {trainer.step}/{steps}")
        else:
            print(f"no {STATE_FILE} in {out}: starting from scratch")
    print(f"training {args.num_heads} heads x {args.num_layers} layer(s) "
          f"({'shared base lm_head' if args.shared_lm_head else 'own lm_head'}) on {len(sequences)} sequences "
          f"({tokens} tokens), {steps} steps, device {device}")

    def on_step(t: HeadTrainer) -> None:
        if args.save_every and t.step % args.save_every == 0 and t.step < steps:
            save_checkpoint(t, out)

    until = steps if args.stop_after is None else min(steps, args.stop_after)
    trainer.run(until, progress=not args.no_progress, on_step=on_step)
    save_checkpoint(trainer, out)
    last = trainer.history[-min(len(trainer.history), 10):]
    if last:
        loss = sum(e["loss"] for e in last) / len(last)
        accs = [sum(e["acc"][k] for e in last) / len(last) for k in range(trainer.heads.num_heads)]
        print(f"step {trainer.step}/{steps}: loss {loss:.4f}, top-1 per head "
              + " ".join(f"{a:.3f}" for a in accs) + f" (mean of last {len(last)} steps)")
    done = "saved" if trainer.step >= steps else f"checkpoint saved; continue with --resume"
    print(f"{done}: {out}")
    return 0
