"""Medusa draft heads (plain PyTorch) and loaders for every published checkpoint format.

Head k maps the base model's last hidden state h [..., H] (after the final norm) to logits for the token k+2 steps
ahead: ``x = ResBlock^L(h)`` with ``ResBlock(x) = x + SiLU(Linear(x))`` (bias=True), then a vocab projection: the
head's own ``Linear(H, V, bias=False)`` ("v1", own_lm_head=True) or the base model's lm_head ("v2", TGI/LoRAX,
own_lm_head=False).

Checkpoint layouts accepted by :meth:`MedusaHeads.from_pretrained` (head count K and layer count L always come from
the weights; the published v1.3 configs say 2 heads while the files hold 5):

* ``fastdecoding``: ``medusa_lm_head.pt`` / ``.safetensors``, keys ``{h}.{l}.linear.weight|bias``, ``{h}.{L}.weight``
  (v2 files have no ``{h}.{L}.weight``).
* ``medusa2``: a full Medusa-2 model (``model.safetensors`` [+ ``.index.json`` shards] or ``pytorch_model.bin``) whose
  ``medusa_head.{h}.{l}.linear.*`` / ``medusa_head.{h}.{L}.weight`` tensors are read and the base weights skipped.
* ``vllm``: the old vLLM "MedusaModel" format, keys ``[medusa_heads.]blocks.{h}.layers.{l}.weight[/bias]``,
  ``lm_heads.{h}.weight`` (or one shared ``lm_heads.0.weight`` / ``lm_head.weight`` with ``original_lm_head``),
  optional ``token_map`` (truncated draft vocab). Missing biases become zeros.
* ``canonical``: what :meth:`MedusaHeads.save_pretrained` writes, ``model.safetensors`` with
  ``heads.{h}.blocks.{l}.weight|bias``, ``heads.{h}.lm_head.weight`` (or one shared ``lm_head.weight``), optional
  ``token_map``, plus a config.json carrying ``"medusa_plugin_format": 1``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
CANONICAL_WEIGHTS = "model.safetensors"
# Weight files looked for in a directory or hub repo, in priority order.
WEIGHT_FILES = (
    "medusa_lm_head.safetensors",
    "medusa_lm_head.pt",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_NAMES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}

# Per layout: regexes (fullmatch) for residual-block tensors (groups head, layer, weight|bias), per-head projections
# (group head [, layer index of the projection]), a shared projection and the token map.
_LAYOUTS: dict[str, dict[str, str]] = {
    "canonical": {"block": r"heads\.(\d+)\.blocks\.(\d+)\.(weight|bias)", "proj": r"heads\.(\d+)\.lm_head\.weight",
                  "shared": r"lm_head\.weight", "token_map": r"token_map"},
    "fastdecoding": {"block": r"(\d+)\.(\d+)\.linear\.(weight|bias)", "proj": r"(\d+)\.(\d+)\.weight"},
    "medusa2": {"block": r"medusa_head\.(\d+)\.(\d+)\.linear\.(weight|bias)", "proj": r"medusa_head\.(\d+)\.(\d+)\.weight"},
    "vllm": {"block": r"(?:medusa_heads\.)?blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)",
             "proj": r"(?:medusa_heads\.)?lm_heads\.(\d+)\.weight", "shared": r"(?:medusa_heads\.)?lm_head\.weight",
             "token_map": r"(?:medusa_heads\.)?token_map"},
}


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
    """

    def __init__(self, hidden_size: int, num_heads: int, num_layers: int = 1, vocab_size: int | None = None, *,
                 own_lm_head: bool = True, shared_lm_head: bool = False, token_map: torch.Tensor | None = None,
                 device=None, dtype=None):
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
        self.token_map: torch.Tensor | None
        tm = None if token_map is None else token_map.to(device=device, dtype=torch.long)
        self.register_buffer("token_map", tm)

    def extra_repr(self) -> str:
        kind = "own lm_head" + (" (shared)" if self.shared_lm_head else "") if self.own_lm_head else "base lm_head (v2)"
        tm = "" if self.token_map is None else f", truncated vocab {self.token_map.numel()}"
        return (f"num_heads={self.num_heads}, num_layers={self.num_layers}, hidden_size={self.hidden_size}, "
                f"vocab_size={self.vocab_size}, {kind}{tm}")

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the weights (float32 for weightless v2 heads with 0 layers)."""
        return next((p.dtype for p in self.parameters()), torch.float32)

    # ------------------------------------------------------------------ compute
    def hidden_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] (any float dtype) -> [..., K, H] in the weights' dtype, after each head's ResBlocks."""
        if hidden.shape[-1] != self.hidden_size:
            raise MedusaHeadsError(f"hidden states have size {hidden.shape[-1]} but the Medusa heads expect "
                                   f"{self.hidden_size}: feed the base model's last hidden state (after the final norm)")
        x = hidden.to(self.dtype)
        return torch.stack([blk(x) for blk in self.blocks], dim=-2)

    def forward(self, hidden: torch.Tensor, lm_head: nn.Module | torch.Tensor | None = None) -> torch.Tensor:
        """hidden [..., H] -> logits [..., K, V] in the weights' float dtype.

        ``lm_head`` (the base model's, an nn.Module or a weight [V, H]) is required for v2 heads and ignored otherwise.
        """
        hs = self.hidden_states(hidden)
        if self.own_lm_head:
            if self.shared_lm_head:
                logits = F.linear(hs, self.lm_heads[0].weight)
            else:
                logits = torch.stack([F.linear(hs[..., k, :], head.weight) for k, head in enumerate(self.lm_heads)],
                                     dim=-2)
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
                   lm_head: nn.Module | torch.Tensor | None = None, vocab_size: int | None = None) -> torch.Tensor:
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
        Returns:
            ``[B, num_heads, topk]`` int64 vocabulary ids, best first (ties as ``torch.topk``).
        Raises:
            MedusaHeadsError: wrong hidden size, ``num_heads`` / ``topk`` out of range, v2 heads without ``lm_head``.
        """
        k = self.num_heads if num_heads is None else int(num_heads)
        if not 1 <= k <= self.num_heads:
            raise MedusaHeadsError(f"num_heads={num_heads} is outside 1..{self.num_heads} (the heads loaded)")
        if hidden.dim() != 2 or hidden.shape[-1] != self.hidden_size:
            raise MedusaHeadsError(f"hidden must be [B, {self.hidden_size}] (the base model's last hidden state), "
                                   f"got shape {tuple(hidden.shape)}")
        x = hidden.to(self.dtype)
        hs = torch.stack([blk(x) for blk in self.blocks[:k]])                     # [k, B, H]
        if self.own_lm_head and not self.shared_lm_head:
            logits = torch.stack([F.linear(hs[i], self.lm_heads[i].weight) for i in range(k)])  # [k, B, V']
        else:
            if self.own_lm_head:
                proj: nn.Module | torch.Tensor = self.lm_heads[0].weight
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
        if not 1 <= topk <= logits.shape[-1]:
            raise MedusaHeadsError(f"topk={topk} is outside 1..{logits.shape[-1]} (the draft vocabulary)")
        ids = logits.topk(topk, dim=-1).indices                                   # [k, B, topk]
        if self.token_map is not None:
            ids = self.token_map[ids]
        return ids.transpose(0, 1)

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
        """Load heads from a directory, a single weights file (.pt/.bin/.safetensors/.index.json) or a hub id.

        ``base_hidden_size`` / ``base_vocab_size``: the base model's sizes, checked against the heads.
        ``dtype``: None/'auto' keeps the checkpoint dtype; else float16/bfloat16/float32 (torch dtype or name).
        """
        target_dtype = _resolve_dtype(dtype)
        src = _open_source(path_or_repo, revision)
        parts = _read_parts(src)
        heads = _assemble(cls, parts, base_hidden_size, base_vocab_size, target_dtype)
        return heads.to(device) if device is not None else heads

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write the canonical format: ``model.safetensors`` + ``config.json`` (bit-exact round trip)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for h, seq in enumerate(self.blocks):
            for l, blk in enumerate(seq):
                tensors[f"heads.{h}.blocks.{l}.weight"] = blk.linear.weight
                tensors[f"heads.{h}.blocks.{l}.bias"] = blk.linear.bias
        if self.lm_heads is not None:
            if self.shared_lm_head:
                tensors["lm_head.weight"] = self.lm_heads[0].weight
            else:
                for h, head in enumerate(self.lm_heads):
                    tensors[f"heads.{h}.lm_head.weight"] = head.weight
        if self.token_map is not None:
            tensors["token_map"] = self.token_map
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(out / CANONICAL_WEIGHTS),
                  metadata={"format": "pt"})
        config = {"medusa_plugin_format": FORMAT_VERSION, "num_heads": self.num_heads, "num_layers": self.num_layers,
                  "hidden_size": self.hidden_size, "vocab_size": self.vocab_size, "own_lm_head": self.own_lm_head,
                  "shared_lm_head": self.shared_lm_head, "torch_dtype": str(self.dtype).removeprefix("torch.")}
        if self.base_model_name_or_path:
            config["base_model_name_or_path"] = self.base_model_name_or_path
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def convert(src: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> Path:
    """Load heads in any supported format (kwargs as ``from_pretrained``) and write them in the canonical format."""
    MedusaHeads.from_pretrained(src, **kwargs).save_pretrained(out_dir)
    return Path(out_dir)


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


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    resolved = _DTYPE_NAMES.get(dtype.lower().removeprefix("torch.")) if isinstance(dtype, str) else dtype
    if resolved not in _FLOAT_DTYPES:
        raise MedusaHeadsError(f"dtype {dtype!r} cannot be used for Medusa heads: use float16, bfloat16 or float32 "
                               "(or 'auto' / None to keep the checkpoint's dtype)")
    return resolved


# ---------------------------------------------------------------------- sources (local dir, file, hub)
@dataclass
class _Source:
    desc: str                                   # for messages
    get: Callable[[str], Path | None]           # sibling file by name, or None
    weight_file: Path | None = None             # set when the user named a single file
    listing: Callable[[], list[str]] = lambda: []


def _looks_like_hub_id(s: str) -> bool:
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", s) is not None and not s.endswith(
        (".pt", ".bin", ".safetensors", ".json")) and ".." not in s)


def _open_source(path_or_repo, revision) -> _Source:
    p = Path(os.path.expanduser(str(path_or_repo)))
    if p.is_dir():
        listing = lambda: sorted(os.listdir(p))  # noqa: E731
        return _Source(str(p), lambda n: (p / n) if (p / n).is_file() else None, listing=listing)
    if p.is_file():
        return _Source(str(p), lambda n: (p.parent / n) if (p.parent / n).is_file() else None, weight_file=p)
    s = str(path_or_repo)
    if not _looks_like_hub_id(s):
        raise MedusaHeadsError(f"Medusa heads path '{s}' does not exist: pass an existing directory, a weights file "
                               f"({', '.join(WEIGHT_FILES)}) or a Hugging Face hub id such as "
                               "'FasterDecoding/medusa-vicuna-7b-v1.3'")
    return _hub_source(s, revision)


def _hub_source(repo: str, revision: str | None) -> _Source:
    """Files fetched one by one with hf_hub_download (cache, HF_HUB_OFFLINE, HF_TOKEN honored), only those needed."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    misses: list[str] = []

    def get(name: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo, name, revision=revision))
        except EntryNotFoundError as e:  # includes "not in the local cache" when offline
            misses.append(f"{name}: {type(e).__name__}")
            return None
        except Exception as e:  # repo/revision not found, auth, network, invalid id
            raise MedusaHeadsError(f"could not find Medusa heads '{repo}' locally or on the hub: "
                                   f"{type(e).__name__}: {e}") from None

    return _Source(f"hub repo '{repo}'" + (f" @ {revision}" if revision else ""), get,
                   listing=lambda: [f"(not found: {m})" for m in misses])


# ---------------------------------------------------------------------- reading tensors
@dataclass
class _Parts:
    layout: str
    origin: str                                               # file name(s) for messages
    config: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)   # only the head tensors, raw key names


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MedusaHeadsError(f"cannot read {path}: {e}; fix or remove the file") from None


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) pickle
    except Exception as e:
        raise MedusaHeadsError(f"cannot load {path} as a PyTorch state dict with weights_only=True: "
                               f"{type(e).__name__}: {e}. Re-save it as a plain state dict (or safetensors)") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MedusaHeadsError(f"{path} does not hold a state dict of tensors (got {type(sd).__name__}): "
                               "save model.state_dict(), not the module")
    return sd


class _TensorFile:
    """Lazy key listing + selective reads for one .safetensors or torch pickle file."""

    def __init__(self, path: Path):
        self.path = path
        if path.name.endswith(".safetensors"):
            from safetensors import safe_open
            try:
                with safe_open(str(path), framework="pt") as f:
                    self.keys = list(f.keys())
            except Exception as e:
                raise MedusaHeadsError(f"cannot open {path} as safetensors: {e}") from None
            self._sd = None
        else:
            self._sd = _torch_load(path)
            self.keys = list(self._sd)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        if self._sd is not None:
            return {k: self._sd[k] for k in keys}
        from safetensors import safe_open
        with safe_open(str(self.path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in keys}


def _detect_layout(keys: list[str], config: dict, origin: str) -> str:
    for name in (["canonical"] if "medusa_plugin_format" in config else []) + list(_LAYOUTS):
        pat = re.compile(_LAYOUTS[name]["block"])
        if any(pat.fullmatch(k) for k in keys):
            return name
    if "medusa_plugin_format" in config:  # canonical v2 heads with L = 0 have no block keys either
        return "canonical"
    few = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
    raise MedusaHeadsError(
        f"unknown Medusa head layout in {origin}: no key looks like a Medusa residual block (keys: {few or 'none'}). "
        "Expected FasterDecoding '{h}.{l}.linear.weight', Medusa-2 'medusa_head.{h}.{l}.linear.weight', old vLLM "
        "'blocks.{h}.layers.{l}.weight' or medusa_plugin 'heads.{h}.blocks.{l}.weight'")


def _wanted(layout: str, key: str) -> bool:
    return any(re.fullmatch(p, key) for p in _LAYOUTS[layout].values())


def _locate(src: _Source) -> tuple[dict, Path]:
    """(config.json contents or {}, the weights file to read) for a source."""
    cfg_path = src.get(CONFIG_NAME)
    config = _read_json(cfg_path) if cfg_path is not None else {}
    if config.get("medusa_plugin_format", FORMAT_VERSION) > FORMAT_VERSION:
        raise MedusaHeadsError(f"{src.desc} was written by a newer medusa_plugin (format "
                               f"{config['medusa_plugin_format']} > {FORMAT_VERSION}): upgrade medusa_plugin")
    weight = src.weight_file
    if weight is None:
        weight = next((p for p in map(src.get, WEIGHT_FILES) if p is not None), None)
    if weight is None:
        found = src.listing()
        raise MedusaHeadsError(f"no Medusa head weights in {src.desc} (found: {', '.join(found[:20]) or 'nothing'}); "
                               f"expected one of: {', '.join(WEIGHT_FILES)}")
    if not weight.name.endswith((".safetensors", ".pt", ".bin", ".pth", ".index.json")):
        raise MedusaHeadsError(f"unsupported weights file {weight}: use .safetensors, .pt, .bin or an .index.json")
    return config, weight


def _weight_map(index: Path) -> dict[str, str]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise MedusaHeadsError(f"{index} has no 'weight_map': it is not a sharded checkpoint index")
    return weight_map


def detect_format(path_or_repo: str | os.PathLike, revision: str | None = None) -> str:
    """The layout of a checkpoint: 'fastdecoding' | 'medusa2' | 'vllm' | 'canonical' (reads keys, not tensors)."""
    src = _open_source(path_or_repo, revision)
    config, weight = _locate(src)
    keys = list(_weight_map(weight)) if weight.name.endswith(".index.json") else _TensorFile(weight).keys
    return _detect_layout(keys, config, str(weight))


def _read_parts(src: _Source) -> _Parts:
    config, weight = _locate(src)
    if weight.name.endswith(".index.json"):
        weight_map = _weight_map(weight)
        keys = list(weight_map)
        layout = _detect_layout(keys, config, str(weight))
        by_shard: dict[str, list[str]] = {}
        for k in keys:
            if _wanted(layout, k):
                by_shard.setdefault(weight_map[k], []).append(k)
        tensors: dict[str, torch.Tensor] = {}
        for shard, shard_keys in by_shard.items():  # only the shards that hold head tensors
            path = src.get(shard)
            if path is None:
                raise MedusaHeadsError(f"shard '{shard}' listed in {weight} (for key '{shard_keys[0]}') is missing: "
                                       "download the complete checkpoint")
            tf = _TensorFile(path)
            absent = [k for k in shard_keys if k not in set(tf.keys)]
            if absent:
                raise MedusaHeadsError(f"{path} lacks key '{absent[0]}' that {weight.name} places there: "
                                       "the index and shards are out of sync")
            tensors.update(tf.read(shard_keys))
        return _Parts(layout, f"{weight} (+{len(by_shard)} shard(s))", config, tensors)

    tf = _TensorFile(weight)
    layout = _detect_layout(tf.keys, config, str(weight))
    return _Parts(layout, str(weight), config, tf.read([k for k in tf.keys if _wanted(layout, k)]))


# ---------------------------------------------------------------------- validation and assembly
def _check_tensor(name: str, t: torch.Tensor, origin: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise MedusaHeadsError(f"tensor '{name}' in {origin} has dtype {t.dtype}: quantized or integer Medusa heads "
                               "are not supported; dequantize them to float16/bfloat16/float32 first")
    if not torch.isfinite(t).all():
        raise MedusaHeadsError(f"tensor '{name}' in {origin} contains NaN or Inf values: the checkpoint is corrupt "
                               "(or training diverged); re-download or re-train the heads")


def _assemble(cls, parts: _Parts, base_hidden: int | None, base_vocab: int | None,
              dtype: torch.dtype | None) -> MedusaHeads:
    spec, cfg, origin = _LAYOUTS[parts.layout], parts.config, parts.origin
    blocks: dict[int, dict[int, dict[str, tuple[str, torch.Tensor]]]] = {}
    projs: dict[int, tuple[str, torch.Tensor, int | None]] = {}
    shared = token_map = None
    for key, t in parts.tensors.items():
        if m := re.fullmatch(spec["block"], key):
            blocks.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = (key, t)
        elif m := re.fullmatch(spec["proj"], key):
            projs[int(m[1])] = (key, t, int(m[2]) if m.lastindex == 2 else None)
        elif "shared" in spec and re.fullmatch(spec["shared"], key):
            shared = (key, t)
        elif "token_map" in spec and re.fullmatch(spec["token_map"], key):
            token_map = t

    # Head and layer counts from the weights.
    head_ids = sorted(set(blocks) | set(projs))
    if not head_ids and parts.layout == "canonical":
        head_ids = list(range(int(cfg.get("num_heads", 0))))
    if not head_ids:
        raise MedusaHeadsError(f"no Medusa heads found in {origin}")
    K = len(head_ids)
    if head_ids != list(range(K)):
        missing = sorted(set(range(head_ids[-1] + 1)) - set(head_ids))
        raise MedusaHeadsError(f"inconsistent heads in {origin}: head indices {head_ids} skip {missing}; "
                               "the checkpoint is incomplete")
    L = max((len(blocks.get(h, {})) for h in range(K)), default=0)
    for h in range(K):
        for l in range(L):
            entry = blocks.get(h, {}).get(l, {})
            if "weight" not in entry:
                present = sorted(blocks.get(h, {}))
                raise MedusaHeadsError(f"inconsistent heads in {origin}: head {h} has no layer {l} weight "
                                       f"(its layers: {present}, other heads have {L}); the checkpoint is incomplete")
    if parts.layout == "vllm" and cfg.get("original_lm_head") and projs:
        shared = (projs[0][0], projs[0][1])
        projs = {}
    if projs and len(projs) != K:
        raise MedusaHeadsError(f"inconsistent heads in {origin}: only heads {sorted(projs)} of {K} have a vocab "
                               "projection; the checkpoint is incomplete")
    for h, (key, _, idx) in projs.items():
        if idx is not None and idx != L:
            raise MedusaHeadsError(f"inconsistent heads in {origin}: projection '{key}' should be at index {L} "
                                   f"(after {L} residual layer(s)); the checkpoint is incomplete or mislabeled")

    # Shapes.
    first = blocks[0][0]["weight"] if L else None
    if first is not None:
        H = first[1].shape[-1]
    elif projs or shared:
        H = (projs[0][1] if projs else shared[1]).shape[-1]
    else:
        H = int(cfg.get("hidden_size", 0))
    for h in range(K):
        for l in range(L):
            for kind, (key, t) in blocks[h][l].items():
                want = (H, H) if kind == "weight" else (H,)
                if tuple(t.shape) != want:
                    raise MedusaHeadsError(f"inconsistent heads in {origin}: '{key}' has shape {tuple(t.shape)}, "
                                           f"expected {want} (hidden size {H} from the first block)")
    proj_list = [projs[h][:2] for h in range(K)] if projs else ([shared] if shared else [])
    rows = None
    for key, t in proj_list:
        if t.dim() != 2 or t.shape[1] != H or (rows is not None and t.shape[0] != rows):
            raise MedusaHeadsError(f"inconsistent heads in {origin}: projection '{key}' has shape {tuple(t.shape)}, "
                                   f"expected [{rows or 'vocab'}, {H}]")
        rows = t.shape[0]
    own = bool(proj_list)
    if own and parts.layout == "canonical" and cfg.get("own_lm_head") is False:
        own = False  # the config is authoritative for our own format only

    base_name = cfg.get("base_model_name_or_path") or cfg.get("_name_or_path")
    hint = f" (its config says base model '{base_name}')" if base_name else ""
    if base_hidden is not None and H != base_hidden:
        raise MedusaHeadsError(f"heads in {origin} were trained for hidden size {H} but the base model has "
                               f"{base_hidden}: these heads belong to another model{hint}")

    # Vocabulary (full size V; projections may hold a token_map subset).
    if token_map is not None:
        if token_map.dtype.is_floating_point or token_map.dtype == torch.bool or token_map.dim() != 1:
            raise MedusaHeadsError(f"'token_map' in {origin} must be a 1-D integer tensor, got {token_map.dtype} "
                                   f"{tuple(token_map.shape)}")
        token_map = token_map.long()
        T = token_map.numel()
        trunc = cfg.get("truncated_vocab_size")
        if trunc is not None and trunc != T:
            raise MedusaHeadsError(f"config truncated_vocab_size={trunc} but 'token_map' in {origin} has {T} entries")
        if rows is not None and rows > T:  # full-vocab projections: keep the token_map rows
            V = rows
            proj_list = [(k, t[token_map]) for k, t in proj_list]
        elif rows is None or rows == T:
            V = cfg.get("vocab_size") or base_vocab
            if not V:
                raise MedusaHeadsError(f"'token_map' in {origin} maps a truncated vocab of {T} tokens, but the full "
                                       "vocab size is unknown: pass base_vocab_size= or set vocab_size in config.json")
        else:
            raise MedusaHeadsError(f"projection rows ({rows}) in {origin} fit neither the token_map ({T}) "
                                   "nor a full vocabulary")
        if T and (int(token_map.min()) < 0 or int(token_map.max()) >= V):
            raise MedusaHeadsError(f"'token_map' in {origin} holds ids outside [0, {V}): it belongs to another vocab")
    else:
        V = rows if own else (base_vocab or cfg.get("vocab_size"))
    if base_vocab is not None and V is not None and V != base_vocab:
        raise MedusaHeadsError(f"heads in {origin} were trained for vocab size {V} but the base model has "
                               f"{base_vocab}: these heads belong to another model{hint}")

    # Values and dtype.
    named = [(k, t) for h in range(K) for l in range(L) for k, t in blocks[h][l].values()] + proj_list
    for key, t in named:
        _check_tensor(key, t, origin)
    dt = dtype or (named[0][1].dtype if named else torch.float32)

    heads = cls(H, K, L, V, own_lm_head=own, shared_lm_head=own and not projs, token_map=token_map,
                device="meta", dtype=dt)
    sd: dict[str, torch.Tensor] = {}
    for h in range(K):
        for l in range(L):
            key, w = blocks[h][l]["weight"]
            b = blocks[h][l].get("bias", (None, torch.zeros(H, dtype=w.dtype)))[1]  # old vLLM dropped biases
            sd[f"blocks.{h}.{l}.linear.weight"], sd[f"blocks.{h}.{l}.linear.bias"] = w, b
        if own:
            sd[f"lm_heads.{h}.weight"] = proj_list[h if projs else 0][1]
    sd = {k: v.to(dt).contiguous() for k, v in sd.items()}
    if token_map is not None:
        sd["token_map"] = token_map
    heads.load_state_dict(sd, assign=True)
    heads.base_model_name_or_path, heads.source_format = base_name, parts.layout
    return heads
