"""Medusa draft heads, the model (plain PyTorch).

Head k maps the base model's last hidden state h [..., H] (after the final norm) to logits for the token k+2 steps
ahead: ``x = ResBlock^L(h)`` with ``ResBlock(x) = x + SiLU(Linear(x))`` (bias=True), then a vocab projection: the
head's own ``Linear(H, V, bias=False)`` ("v1", own_lm_head=True) or the base model's lm_head ("v2", TGI/LoRAX,
own_lm_head=False). Source: Cai et al., "Medusa" (arXiv:2401.10774) §2.1.1 and FasterDecoding/Medusa
``medusa/model/medusa_model.py`` (``ResBlock``, ``MedusaModel.medusa_head``).

Reading and writing checkpoints (every published layout, hub repos) is :mod:`.head_checkpoints`;
:meth:`MedusaHeads.from_pretrained` / :meth:`MedusaHeads.save_pretrained` call it.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def native_half_matmul(dtype: torch.dtype, device) -> bool:
    """Whether ``dtype`` matmuls run natively on ``device``: True for float32, for any non-CPU device, and for
    bfloat16 / float16 on a CPU with AVX512-BF16 or AMX (AMX-FP16); False on other CPUs, where PyTorch converts to
    float32 inside every GEMM. There, measured on a 2-core AVX2 EPYC with the shipped SmolLM2 heads (576 x 4097
    projection, 2 threads), bf16 heads take 0.55-0.7 ms at 1 request and 1 head but 13-17 ms at 8 requests x 4
    heads, float32 heads 1.4-1.9 ms and 5.8-7.7 ms: float32 pays from about 8 rows (requests x heads) on.
    Unknown (the private ``torch.cpu`` probes are missing): True.
    """
    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return True
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported") if dtype == torch.bfloat16 else \
        ("_is_amx_fp16_supported",)
    try:  # private but present since torch 2.3
        return any(getattr(torch.cpu, name)() for name in probes)
    except (AttributeError, RuntimeError):
        return True


class MedusaHeadsError(ValueError):
    """A Medusa head checkpoint or call that cannot be used; the message names the file/key and the fix."""


class ResBlock(nn.Module):
    """``x + SiLU(Linear(x))`` with a biased [H, H] Linear; x [..., H] -> [..., H]."""

    def __init__(self, hidden_size: int, device=None, dtype=None):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """K Medusa heads, each L ResBlocks then a vocab projection.

    Args:
        hidden_size: H of the base model.
        num_heads: K.
        num_layers: L residual blocks per head (distinct weights; upstream shared one block, all published use L=1).
        vocab_size: V, the full vocabulary of the logits. Required when ``own_lm_head``; informational for v2.
        own_lm_head: True: per-head ``Linear(H, V, bias=False)``; False: the base lm_head is passed to ``forward``.
        shared_lm_head: one projection shared by all heads (old vLLM ``original_lm_head``).
        token_map: int64 [V'] with V' < V: projections have V' rows (a truncated vocab) whose logits are scattered
            into the full vocabulary at ``token_map``, -inf elsewhere.
        root_input: the heads also read the root token (the token the target just emitted from ``h``, the tree's
            root), as ``h + root_proj(embed(root))`` before the ResBlocks, with ``root_proj`` one bias-free
            ``Linear(H, H)`` shared by all heads and ``embed`` the target's input embedding. The caller passes
            ``root_embeds = embed(root)`` [..., H]. Plain Medusa heads guess token t+2 without knowing token t+1,
            although it is known when they run; EAGLE (Li et al. 2024, arXiv:2401.15077) feeds the sampled token with
            the feature and Hydra (Ankner et al. 2024, arXiv:2402.05109) conditions each head on the tokens before
            it. Conditioning on the root only keeps every head's guesses independent of the other heads', so trees
            and acceptance are unchanged. A zero ``root_proj`` gives plain Medusa heads.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_layers: int = 1, vocab_size: int | None = None, *,
                 own_lm_head: bool = True, shared_lm_head: bool = False, token_map: torch.Tensor | None = None,
                 root_input: bool = False, device=None, dtype=None):
        super().__init__()
        if num_heads < 1 or num_layers < 0 or hidden_size < 1:
            raise MedusaHeadsError(f"invalid head shape: num_heads={num_heads}, num_layers={num_layers}, "
                                   f"hidden_size={hidden_size} (need num_heads >= 1, num_layers >= 0)")
        if own_lm_head and not vocab_size:
            raise MedusaHeadsError("own_lm_head=True needs vocab_size")
        self.hidden_size, self.num_heads, self.num_layers = hidden_size, num_heads, num_layers
        self.vocab_size = vocab_size
        self.own_lm_head, self.shared_lm_head = own_lm_head, bool(shared_lm_head and own_lm_head)
        self.base_model_name_or_path: str | None = None
        self.source_format: str | None = None  # layout it was loaded from (see detect_format)
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden_size, device, dtype) for _ in range(num_layers)]) for _ in range(num_heads))
        self.lm_heads: nn.ModuleList | None = None
        if own_lm_head:
            rows = vocab_size if token_map is None else int(token_map.numel())
            make = lambda: nn.Linear(hidden_size, rows, bias=False, device=device, dtype=dtype)  # noqa: E731
            if self.shared_lm_head:
                self.lm_heads = nn.ModuleList([make()] * num_heads)  # one module, K references
            else:
                self.lm_heads = nn.ModuleList(make() for _ in range(num_heads))
        self.root_proj: nn.Linear | None = (nn.Linear(hidden_size, hidden_size, bias=False, device=device, dtype=dtype)
                                            if root_input else None)
        self.token_map: torch.Tensor | None
        tm = None if token_map is None else token_map.to(device=device, dtype=torch.long)
        self.register_buffer("token_map", tm)

    def extra_repr(self) -> str:
        kind = "own lm_head" + (" (shared)" if self.shared_lm_head else "") if self.own_lm_head else "base lm_head (v2)"
        tm = "" if self.token_map is None else f", truncated vocab {self.token_map.numel()}"
        root = ", root token input" if self.root_input else ""
        return (f"num_heads={self.num_heads}, num_layers={self.num_layers}, hidden_size={self.hidden_size}, "
                f"vocab_size={self.vocab_size}, {kind}{tm}{root}")

    @property
    def root_input(self) -> bool:
        """Whether the heads read the root token's embedding (``root_embeds``), see the class docstring."""
        return self.root_proj is not None

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the weights (float32 for weightless v2 heads with 0 layers)."""
        return next((p.dtype for p in self.parameters()), torch.float32)

    # ------------------------------------------------------------------ compute
    def head_input(self, hidden: torch.Tensor, root_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """What the ResBlocks read: ``hidden`` [..., H] in the weights' dtype, plus ``root_proj(root_embeds)`` for
        :attr:`root_input` heads. MedusaHeadsError if ``root_embeds`` is missing there or has the wrong shape
        (it is ignored by other heads)."""
        if hidden.shape[-1] != self.hidden_size:
            raise MedusaHeadsError(f"hidden states have size {hidden.shape[-1]} but the Medusa heads expect "
                                   f"{self.hidden_size}: feed the base model's last hidden state (after the final norm)")
        dtype = self.dtype
        x = hidden.to(dtype)
        if self.root_proj is None:
            return x
        if root_embeds is None:
            raise MedusaHeadsError("these Medusa heads read the root token (root_input): pass root_embeds, the target "
                                   "model's input embedding of the token it just emitted, [..., H]")
        if root_embeds.shape != hidden.shape:
            raise MedusaHeadsError(f"root_embeds has shape {tuple(root_embeds.shape)} but hidden has "
                                   f"{tuple(hidden.shape)}: pass one root-token embedding per hidden state")
        return x + self.root_proj(root_embeds.to(dtype))

    def hidden_states(self, hidden: torch.Tensor, root_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [..., H] (any float dtype) -> [..., K, H] in the weights' dtype, after each head's ResBlocks.
        ``root_embeds`` [..., H]: required by :attr:`root_input` heads (:meth:`head_input`)."""
        x = self.head_input(hidden, root_embeds)
        return torch.stack([blk(x) for blk in self.blocks], dim=-2)

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module | torch.Tensor | None = None,
                root_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [..., H] -> logits [..., K, V] in the weights' float dtype.

        ``lm_head`` (the base model's, an nn.Module or a weight [V, H]) is required for v2 heads and ignored otherwise.
        ``root_embeds`` [..., H] (the target's input embedding of the root token) is required by :attr:`root_input`
        heads and ignored otherwise.
        """
        hs = self.hidden_states(hidden, root_embeds)
        if self.own_lm_head:
            if self.shared_lm_head:
                logits = self.lm_heads[0](hs)
            else:
                logits = torch.stack([head(hs[..., k, :]) for k, head in enumerate(self.lm_heads)], dim=-2)
        else:
            if lm_head is None:
                raise MedusaHeadsError("these Medusa heads have no vocab projection of their own (v2 / TGI format): "
                                       "pass the base model's lm_head (module or weight [V, H]) as forward(hidden, lm_head)")
            logits = _apply_lm_head(lm_head, hs)
        if self.token_map is not None:
            full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
            logits = full.index_copy_(-1, self.token_map, logits)
        return logits

    def draft_topk(self, hidden: torch.Tensor, topk: int, num_heads: int | None = None,
                   lm_head: nn.Module | torch.Tensor | None = None, vocab_size: int | None = None,
                   root_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Top-``topk`` token ids of the first ``num_heads`` heads: the draft path of a decode step.

        Same ids as ``forward(hidden, lm_head)[..., :num_heads, :vocab_size].topk(topk).indices`` (the reference
        path), computed with less work: only the heads a tree prefix needs run (a prefix of depth d needs heads
        ``0..d-1``); a shared projection (v2 heads' base ``lm_head``, or one shared own ``lm_head``) is one GEMM over
        all ``num_heads * B`` rows, so its weight is read once; with a truncated vocabulary (``token_map``) the top-k
        runs on the ``V'`` projected logits and only the winners are mapped to vocabulary ids (the ``[.., V]``
        ``-inf``-filled logits are never built).

        Args:
            hidden: ``[B, H]`` float, the base model's last hidden state (after the final norm).
            topk: ranks per head (the tree's ``topk``), ``1 <= topk <= V'``.
            num_heads: heads to run, ``1 .. self.num_heads`` (default all).
            lm_head: the base lm_head (module or weight ``[V, H]``), required for v2 heads.
            vocab_size: keep only ids ``< vocab_size`` (e.g. an lm_head padded beyond the tokenizer); v2 / untruncated
                heads only.
            root_embeds: ``[B, H]`` the target's input embedding of each root token; :attr:`root_input` heads only.
        Returns:
            ``[B, num_heads, topk]`` int64 vocabulary ids, best first (ties as ``torch.topk``).
        Raises:
            MedusaHeadsError: wrong hidden size, ``num_heads`` / ``topk`` out of range, v2 heads without ``lm_head``,
                root-input heads without ``root_embeds``.
        """
        logits = self._draft_logits(hidden, num_heads, lm_head, vocab_size, root_embeds)  # [k, B, V']
        if not 1 <= topk <= logits.shape[-1]:
            raise MedusaHeadsError(f"topk={topk} is outside 1..{logits.shape[-1]} (the draft vocabulary)")
        ids = logits.topk(topk, dim=-1).indices                                   # [k, B, topk]
        if self.token_map is not None:
            ids = self.token_map[ids]
        return ids.transpose(0, 1)

    def draft_topk_probs(self, hidden: torch.Tensor, topk: int, num_heads: int | None = None,
                         lm_head: nn.Module | torch.Tensor | None = None, vocab_size: int | None = None,
                         root_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``topk`` most likely tokens of each head with their probabilities: what a dynamic tree is built from.

        Equal to ``forward(...)[..., :num_heads, :vocab_size].float().softmax(-1).topk(topk)``, with the work of
        :meth:`draft_topk`: with a truncated vocabulary the softmax runs over the ``V'`` projected logits (the
        ``-inf`` outside it add nothing to the normaliser), never over a ``[B, K, V]`` tensor.

        Args: as :meth:`draft_topk`.
        Returns:
            ``(probs, ids)``: ``[B, num_heads, topk]`` float32 probabilities, best first, and int64 vocabulary ids.
        Raises:
            MedusaHeadsError: as :meth:`draft_topk`.
        """
        logits = self._draft_logits(hidden, num_heads, lm_head, vocab_size, root_embeds)  # [k, B, V']
        if not 1 <= topk <= logits.shape[-1]:
            raise MedusaHeadsError(f"topk={topk} is outside 1..{logits.shape[-1]} (the draft vocabulary)")
        top = logits.float().softmax(-1).topk(topk, dim=-1)
        ids = top.indices if self.token_map is None else self.token_map[top.indices]
        return top.values.transpose(0, 1), ids.transpose(0, 1)

    def _draft_logits(self, hidden: torch.Tensor, num_heads: int | None, lm_head, vocab_size: int | None,
                      root_embeds: torch.Tensor | None) -> torch.Tensor:
        """``[k, B, V']`` logits of the first ``num_heads`` heads over the projection's rows (the draft vocabulary
        when there is a ``token_map``, else the vocabulary cut to ``vocab_size``); see :meth:`draft_topk`."""
        k = self.num_heads if num_heads is None else int(num_heads)
        if not 1 <= k <= self.num_heads:
            raise MedusaHeadsError(f"num_heads={num_heads} is outside 1..{self.num_heads} (the heads loaded)")
        if hidden.dim() != 2 or hidden.shape[-1] != self.hidden_size:
            raise MedusaHeadsError(f"hidden must be [B, {self.hidden_size}] (the base model's last hidden state), "
                                   f"got shape {tuple(hidden.shape)}")
        x = self.head_input(hidden, root_embeds)
        hs = torch.stack([blk(x) for blk in self.blocks[:k]])                     # [k, B, H]
        if self.own_lm_head and not self.shared_lm_head:
            logits = torch.stack([self.lm_heads[i](hs[i]) for i in range(k)])  # [k, B, V']
        else:
            if self.own_lm_head:
                proj: nn.Module | torch.Tensor = self.lm_heads[0]
            elif lm_head is None:
                raise MedusaHeadsError("these Medusa heads have no vocab projection of their own (v2 / TGI format): "
                                       "pass the base model's lm_head (module or weight [V, H]) as lm_head")
            else:
                proj = lm_head
            if isinstance(proj, torch.Tensor) and vocab_size is not None and self.token_map is None:
                proj = proj[:vocab_size]
            logits = _apply_lm_head(proj, hs.reshape(-1, self.hidden_size)).view(k, hs.shape[1], -1)
        if vocab_size is not None and self.token_map is None and logits.shape[-1] > vocab_size:
            logits = logits[..., :vocab_size]
        return logits

    # ------------------------------------------------------------------ construction
    @classmethod
    def init_from_lm_head(cls, lm_head_weight: torch.Tensor, num_heads: int, num_layers: int = 1,
                          own_lm_head: bool = True) -> "MedusaHeads":
        """Upstream init: ResBlock weights and biases zero, each head's projection a copy of ``lm_head_weight`` [V, H].

        dtype/device follow ``lm_head_weight``; at init every head's logits equal the base lm_head's.
        """
        if lm_head_weight.dim() != 2:
            raise MedusaHeadsError(f"lm_head_weight must be [vocab, hidden], got shape {tuple(lm_head_weight.shape)}")
        V, H = lm_head_weight.shape
        heads = cls(H, num_heads, num_layers, V, own_lm_head=own_lm_head,
                    device=lm_head_weight.device, dtype=lm_head_weight.dtype)
        with torch.no_grad():
            for seq in heads.blocks:
                for blk in seq:
                    blk.linear.weight.zero_()
                    blk.linear.bias.zero_()
            if heads.lm_heads is not None:
                for head in heads.lm_heads:
                    head.weight.copy_(lm_head_weight)
        return heads

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, *, base_hidden_size: int | None = None,
                        base_vocab_size: int | None = None, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, revision: str | None = None) -> "MedusaHeads":
        """Load heads from a directory, a weights file (.pt/.bin/.safetensors/.index.json) or a hub id.

        See :func:`medusa_plugin.core.head_checkpoints.load_heads` (layouts, vocabulary padding, errors).
        """
        from .head_checkpoints import load_heads

        return load_heads(path_or_repo, base_hidden_size=base_hidden_size, base_vocab_size=base_vocab_size,
                          dtype=dtype, device=device, revision=revision, cls=cls)

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write the canonical format: ``model.safetensors`` + ``config.json`` (bit-exact round trip)."""
        from .head_checkpoints import save_heads

        save_heads(self, out_dir)


def _apply_lm_head(lm_head: nn.Module | torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
    if isinstance(lm_head, torch.Tensor):
        weight, bias = lm_head, None
    elif isinstance(lm_head, nn.Linear):
        return lm_head(hs.to(lm_head.weight.dtype))
    elif isinstance(getattr(lm_head, "weight", None), torch.Tensor) and lm_head.weight.dim() == 2:
        # e.g. vLLM's ParallelLMHead, whose forward() refuses to run: use its weight directly.
        weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    elif isinstance(lm_head, nn.Module):
        return lm_head(hs)
    else:
        raise MedusaHeadsError(f"lm_head must be an nn.Module or a weight tensor [V, H], got {type(lm_head).__name__}")
    if weight.dim() != 2 or weight.shape[1] != hs.shape[-1]:
        raise MedusaHeadsError(f"base lm_head weight has shape {tuple(weight.shape)} but the heads produce hidden size "
                               f"{hs.shape[-1]}: pass the lm_head of the base model these heads were trained for")
    return F.linear(hs.to(weight.dtype), weight, bias)
