"""Self-distillation: the target model's own greedy continuations of prompts (transformers ``generate``)."""

from __future__ import annotations

import torch
from torch import nn

from .base_model import _eos_ids, _model_device, _pad_id, resolve_device
from .errors import TrainError


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
