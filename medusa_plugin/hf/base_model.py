"""The frozen target model seen from head training: loading it, its lm_head, and its final-normed hidden states."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .errors import TrainError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def root_embeds_of(model: nn.Module, heads) -> "Callable[[Tensor], Tensor | None]":
    """For ``heads``: token ids [...] -> the ``root_embeds`` they read ([..., H], rows of ``model``'s input embedding
    table) for root-input heads (``MedusaHeads.root_input``), None for other heads."""
    if not getattr(heads, "root_input", False):
        return lambda ids: None
    weight = model.get_input_embeddings().weight
    return lambda ids: weight[ids.to(weight.device)]


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


def load_model(name: str, device: torch.device, dtype: str):
    """(causal LM in eval mode on ``device``, tokenizer); ``dtype``: "auto" (bf16 on CUDA, fp32 on CPU) or a name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = DTYPES.get(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype).to(device).eval()
    return model, tokenizer
