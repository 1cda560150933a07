"""Medusa heads (any format ``MedusaHeads.from_pretrained`` reads) -> the directory vLLM's built-in Medusa proposer
loads (``speculative_config={"method": "medusa", "model": DIR, "num_speculative_tokens": K}``).

vLLM's ``MedusaModel`` (``vllm/model_executor/models/medusa.py``, config ``transformers_utils/configs/medusa.py``)
reads ``config.json`` (``architectures: ["MedusaModel"]``, ``model_type: "medusa"``, ``hidden_size``, ``vocab_size``,
``num_heads``, ``num_hidden_layers``, ``truncated_vocab_size``, ``medusa_fc_bias``, ``original_lm_head``) and
``model.safetensors`` with ``blocks.{h}.layers.{l}.weight|bias``, ``lm_heads.{h}.weight`` and an optional
``token_map``. v2 heads (projection by the base model's lm_head) get that lm_head written as one shared head
(``original_lm_head``), so ``base_model`` is needed for them. vLLM's proposer drafts a chain of each head's top-1.
Heads with a draft vocabulary (``token_map``) are written with whole-vocabulary projections when ``base_model`` is
given, because vLLM 0.32 cannot load a ``token_map`` (see the code): a frozen shared projection becomes the whole base
lm_head; trained projections keep their rows at ``token_map`` and take the base lm_head's rows elsewhere.

No vLLM import: this only writes files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["to_vllm_medusa", "base_lm_head"]


def base_lm_head(model_dir: str | os.PathLike) -> torch.Tensor:
    """The ``[V, H]`` lm_head weight of a local Hugging Face model directory (``embed_tokens`` when tied)."""
    from safetensors import safe_open

    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {d}: pass the base model directory the heads were trained on")
    found = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for key in fh.keys():
                if key in ("lm_head.weight", "model.embed_tokens.weight"):
                    found[key] = fh.get_tensor(key)
    weight = found.get("lm_head.weight", found.get("model.embed_tokens.weight"))
    if weight is None:
        raise FileNotFoundError(f"{d} has neither lm_head.weight nor model.embed_tokens.weight")
    return weight


def to_vllm_medusa(heads_src: str | os.PathLike, out_dir: str | os.PathLike, *,
                   base_model: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None) -> int:
    """Write ``heads_src`` in vLLM's Medusa format to ``out_dir``; returns the number of heads K (vLLM's
    ``num_speculative_tokens``). Raises ``MedusaHeadsError`` for unreadable heads and ``FileNotFoundError`` when v2
    heads come without a readable ``base_model``."""
    from safetensors.torch import save_file

    from medusa_plugin.core.heads import MedusaHeads, MedusaHeadsError

    heads = MedusaHeads.from_pretrained(heads_src, dtype=dtype)
    if heads.root_input:
        raise MedusaHeadsError(f"{heads_src}: these heads read the root token (root_input), which vLLM's built-in "
                               "Medusa cannot feed them; serve them with medusa_plugin, or train heads without "
                               "--root-input for vLLM")
    tensors: dict[str, torch.Tensor] = {}
    for h, seq in enumerate(heads.blocks):
        for l, blk in enumerate(seq):
            tensors[f"blocks.{h}.layers.{l}.weight"] = blk.linear.weight
            tensors[f"blocks.{h}.layers.{l}.bias"] = blk.linear.bias
    shared = heads.shared_lm_head or not heads.own_lm_head
    if heads.own_lm_head:
        for h in range(1 if shared else heads.num_heads):
            tensors[f"lm_heads.{h}.weight"] = heads.lm_heads[h].weight
    else:
        if base_model is None:
            raise MedusaHeadsError("these are v2 heads (they project with the base model's lm_head): pass the base "
                                   "model directory (--base-model) so its lm_head can be written for vLLM")
        tensors["lm_heads.0.weight"] = base_lm_head(base_model).to(heads.dtype)
    vocab = heads.vocab_size or tensors["lm_heads.0.weight"].shape[0]
    token_map = heads.token_map
    if token_map is not None and base_model is not None:
        # vLLM 0.32 cannot load a token_map (MedusaModel.load_weights never reports it as loaded, so the loader
        # stops with "weights were not initialized from checkpoint: {'token_map'}"): write whole-vocabulary
        # projections. A frozen shared projection (the base lm_head's rows of the draft vocabulary) becomes the whole
        # base lm_head; a trained one keeps its rows at token_map and takes the base lm_head's rows elsewhere (tokens
        # the heads never learnt). Same logits on the draft vocabulary; vLLM may also draft a token outside it.
        base = base_lm_head(base_model).to(heads.dtype)
        if base.shape[0] > int(token_map.max()):
            for name in [k for k in tensors if k.startswith("lm_heads.")]:
                tensors[name] = base.clone().index_copy_(0, token_map, tensors[name].to(heads.dtype))
            vocab, token_map = base.shape[0], None
    if token_map is not None:
        tensors["token_map"] = token_map
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config = {"architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": heads.hidden_size,
              "vocab_size": int(vocab), "num_heads": heads.num_heads, "num_hidden_layers": heads.num_layers,
              "truncated_vocab_size": int(token_map.numel()) if token_map is not None else int(vocab),
              "medusa_fc_bias": True, "original_lm_head": bool(shared),
              "torch_dtype": str(heads.dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return heads.num_heads
