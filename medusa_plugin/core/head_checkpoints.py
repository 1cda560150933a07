"""Medusa head checkpoints: every published layout in, the canonical layout out.

Layouts read by :func:`load_heads` (``MedusaHeads.from_pretrained``). The head count K and layer count L always come
from the weights: the published v1.3 configs say 2 heads while the files hold 5.

* ``fastdecoding``: ``medusa_lm_head.pt`` / ``.safetensors``, keys ``{h}.{l}.linear.weight|bias``, ``{h}.{L}.weight``
  (v2 files, TGI/LoRAX, have no ``{h}.{L}.weight``: the logits come from the base model's lm_head).
* ``medusa2``: a full Medusa-2 model (``model.safetensors`` [+ ``.index.json`` shards] or ``pytorch_model.bin``) whose
  ``medusa_head.{h}.{l}.linear.*`` / ``medusa_head.{h}.{L}.weight`` tensors are read and the base weights skipped.
* ``vllm``: the old vLLM "MedusaModel" format, keys ``[medusa_heads.]blocks.{h}.layers.{l}.weight[/bias]``,
  ``lm_heads.{h}.weight`` (or one shared ``lm_heads.0.weight`` / ``lm_head.weight`` with ``original_lm_head``),
  optional ``token_map`` (truncated draft vocab). Biases are all present or all absent (``medusa_fc_bias: false``:
  zeros).
* ``canonical``: what :func:`save_heads` writes, ``model.safetensors`` with ``heads.{h}.blocks.{l}.weight|bias``,
  ``heads.{h}.lm_head.weight`` (or one shared ``lm_head.weight``), optional ``token_map``, optional
  ``root_proj.weight`` [H, H] (heads that read the root token, ``MedusaHeads(root_input=True)``; config
  ``"root_input": true``), plus a config.json carrying ``"medusa_plugin_format": 1``.

Vocabulary sizes. A base model's ``vocab_size`` is often its tokenizer's size padded for the matmul (Qwen2-7B:
151,646 tokens, vocab_size 152,064; Phi-3-mini: 32,011 and 32,064), and heads may be sized to either. Heads whose
projection is narrower than the base vocabulary load with logits -inf for the missing token ids (they never draft
those tokens; verification is unchanged, so the output is too); wider heads drop the rows of token ids the base
model does not have. A difference larger than :func:`vocab_padding_limit` is not padding: such heads are refused as
trained for another model.

Every malformed, partial or foreign checkpoint raises :class:`~.heads.MedusaHeadsError` with one line naming the file,
the key if there is one, the likely cause and the fix.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .head_files import WEIGHT_FILES, Source, TensorFile, open_source, read_json
from .heads import MedusaHeads, MedusaHeadsError

__all__ = ["load_heads", "save_heads", "convert", "detect_format", "vocab_padding_limit", "FORMAT_VERSION",
           "CONFIG_NAME", "CANONICAL_WEIGHTS", "WEIGHT_FILES"]

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
CANONICAL_WEIGHTS = "model.safetensors"
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
                  "shared": r"lm_head\.weight", "token_map": r"token_map", "root": r"root_proj\.weight"},
    "fastdecoding": {"block": r"(\d+)\.(\d+)\.linear\.(weight|bias)", "proj": r"(\d+)\.(\d+)\.weight"},
    "medusa2": {"block": r"medusa_head\.(\d+)\.(\d+)\.linear\.(weight|bias)", "proj": r"medusa_head\.(\d+)\.(\d+)\.weight"},
    "vllm": {"block": r"(?:medusa_heads\.)?blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)",
             "proj": r"(?:medusa_heads\.)?lm_heads\.(\d+)\.weight", "shared": r"(?:medusa_heads\.)?lm_head\.weight",
             "token_map": r"(?:medusa_heads\.)?token_map"},
}


# ---------------------------------------------------------------------- public API
def vocab_padding_limit(vocab_size: int) -> int:
    """The most rows by which two vocabulary sizes of the same tokenizer plausibly differ: ``max(1024, V // 32)``.

    Padding to a multiple of up to 1024 adds fewer than 1024 rows; published paddings are a few hundred rows on
    32k-150k vocabularies (see the module docstring), far below V/32. Heads for another tokenizer (Llama 2's 32,000
    vs Llama 3's 128,256) differ by far more.
    """
    return max(1024, int(vocab_size) // 32)


def load_heads(path_or_repo: str | os.PathLike, *, base_hidden_size: int | None = None,
               base_vocab_size: int | None = None, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None, revision: str | None = None,
               cls: type[MedusaHeads] = MedusaHeads) -> MedusaHeads:
    """Load heads from a directory, a single weights file (.pt/.bin/.safetensors/.index.json) or a hub id.

    ``base_hidden_size`` / ``base_vocab_size``: the base model's H and V (its config's ``vocab_size``), checked
    against the heads; the vocabulary may differ by padding (module docstring), then the heads' logits are
    ``base_vocab_size`` wide. ``dtype``: None/'auto' keeps the checkpoint dtype; else float16/bfloat16/float32 (torch
    dtype or name). Raises MedusaHeadsError.
    """
    target_dtype = _resolve_dtype(dtype)
    parts = _read_parts(open_source(path_or_repo, revision))
    heads = _assemble(cls, parts, base_hidden_size, base_vocab_size, target_dtype)
    return heads.to(device) if device is not None else heads


def save_heads(heads: MedusaHeads, out_dir: str | os.PathLike) -> None:
    """Write the canonical format: ``model.safetensors`` + ``config.json`` (bit-exact round trip)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for h, seq in enumerate(heads.blocks):
        for l, blk in enumerate(seq):
            tensors[f"heads.{h}.blocks.{l}.weight"] = blk.linear.weight
            tensors[f"heads.{h}.blocks.{l}.bias"] = blk.linear.bias
    if heads.lm_heads is not None:
        if heads.shared_lm_head:
            tensors["lm_head.weight"] = heads.lm_heads[0].weight
        else:
            for h, head in enumerate(heads.lm_heads):
                tensors[f"heads.{h}.lm_head.weight"] = head.weight
    if heads.token_map is not None:
        tensors["token_map"] = heads.token_map
    if heads.root_proj is not None:
        tensors["root_proj.weight"] = heads.root_proj.weight
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(out / CANONICAL_WEIGHTS),
              metadata={"format": "pt"})
    config = {"medusa_plugin_format": FORMAT_VERSION, "num_heads": heads.num_heads, "num_layers": heads.num_layers,
              "hidden_size": heads.hidden_size, "vocab_size": heads.vocab_size, "own_lm_head": heads.own_lm_head,
              "shared_lm_head": heads.shared_lm_head, "torch_dtype": str(heads.dtype).removeprefix("torch.")}
    if heads.root_proj is not None:
        config["root_input"] = True
    if heads.base_model_name_or_path:
        config["base_model_name_or_path"] = heads.base_model_name_or_path
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def convert(src: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> Path:
    """Load heads in any supported format (kwargs as :func:`load_heads`) and write them in the canonical format."""
    save_heads(load_heads(src, **kwargs), out_dir)
    return Path(out_dir)


def detect_format(path_or_repo: str | os.PathLike, revision: str | None = None) -> str:
    """The layout of a checkpoint: 'fastdecoding' | 'medusa2' | 'vllm' | 'canonical' (reads keys, not tensors)."""
    src = open_source(path_or_repo, revision)
    config, weight = _locate(src)
    keys = list(_weight_map(weight)) if weight.name.endswith(".index.json") else TensorFile(weight).keys
    return _detect_layout(keys, config, str(weight))


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    resolved = _DTYPE_NAMES.get(dtype.lower().removeprefix("torch.")) if isinstance(dtype, str) else dtype
    if resolved not in _FLOAT_DTYPES:
        raise MedusaHeadsError(f"dtype {dtype!r} cannot be used for Medusa heads: use float16, bfloat16 or float32 "
                               "(or 'auto' / None to keep the checkpoint's dtype)")
    return resolved


# ---------------------------------------------------------------------- reading files
@dataclass
class _Parts:
    layout: str
    origin: str                                               # file name(s) for messages
    config: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)   # only the head tensors, raw key names


def _detect_layout(keys: list[str], config: dict, origin: str) -> str:
    for name in (["canonical"] if "medusa_plugin_format" in config else []) + list(_LAYOUTS):
        pat = re.compile(_LAYOUTS[name]["block"])
        if any(pat.fullmatch(k) for k in keys):
            return name
    if "medusa_plugin_format" in config:  # canonical v2 heads with L = 0 have no block keys either
        return "canonical"
    few = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
    raise MedusaHeadsError(
        f"unknown Medusa head layout in {origin}: no key looks like a Medusa residual block (keys: {few or 'none'}); "
        "these are not Medusa heads (base-model weights?). Expected FasterDecoding '{h}.{l}.linear.weight', Medusa-2 "
        "'medusa_head.{h}.{l}.linear.weight', old vLLM 'blocks.{h}.layers.{l}.weight' or medusa_plugin "
        "'heads.{h}.blocks.{l}.weight': point 'heads' at the Medusa heads' directory or file")


def _wanted(layout: str, key: str) -> bool:
    return any(re.fullmatch(p, key) for p in _LAYOUTS[layout].values())


def _locate(src: Source) -> tuple[dict, Path]:
    """(config.json contents or {}, the weights file to read) for a source."""
    cfg_path = src.get(CONFIG_NAME)
    config = read_json(cfg_path) if cfg_path is not None else {}
    fmt = config.get("medusa_plugin_format", FORMAT_VERSION)
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise MedusaHeadsError(f"{cfg_path}: 'medusa_plugin_format' is {fmt!r}, not an integer: the config was "
                               "edited by hand; restore it from the saved heads")
    if fmt > FORMAT_VERSION:
        raise MedusaHeadsError(f"{src.desc} was written by a newer medusa_plugin (format {fmt} > {FORMAT_VERSION}): "
                               "upgrade medusa_plugin")
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
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise MedusaHeadsError(f"{index} has no 'weight_map': it is not a sharded checkpoint index; point 'heads' at "
                               "the checkpoint directory or a weights file")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise MedusaHeadsError(f"{index}: 'weight_map' entry '{key}' is {shard!r}, not a shard file name: the "
                                   "index is damaged; re-download it")
    return weight_map


def _read_parts(src: Source) -> _Parts:
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
                                       "the download is incomplete; re-download the complete checkpoint")
            tf = TensorFile(path)
            absent = [k for k in shard_keys if k not in set(tf.keys)]
            if absent:
                raise MedusaHeadsError(f"{path} lacks key '{absent[0]}' that {weight.name} places there: "
                                       "the index and shards are out of sync; re-download the checkpoint")
            tensors.update(tf.read(shard_keys))
        return _Parts(layout, f"{weight} (+{len(by_shard)} shard(s))", config, tensors)

    tf = TensorFile(weight)
    layout = _detect_layout(tf.keys, config, str(weight))
    return _Parts(layout, str(weight), config, tf.read([k for k in tf.keys if _wanted(layout, k)]))


# ---------------------------------------------------------------------- assembly
#
# _assemble turns the raw tensors of one checkpoint into MedusaHeads in five steps, each a function below:
#   _group       raw keys -> blocks[h][l]["weight"|"bias"], per-head projections, shared projection, token map
#   _structure   K and L from the keys; every head has every layer's weight, biases all there (or, old vLLM, none)
#   _shapes      H from the first block; every block [H, H] / [H]; projections [rows, H] with equal rows
#   _vocabulary  V and the token map; base-model checks (hidden size, vocabulary up to padding)
#   _build       the nn.Module on the meta device, then load_state_dict(assign=True) in the target dtype

@dataclass
class _Grouped:
    blocks: dict[int, dict[int, dict[str, tuple[str, torch.Tensor]]]]  # head -> layer -> kind -> (key, tensor)
    projs: dict[int, tuple[str, torch.Tensor, int | None]]             # head -> (key, tensor, layer index or None)
    shared: tuple[str, torch.Tensor] | None
    token_map: tuple[str, torch.Tensor] | None
    root: tuple[str, torch.Tensor] | None = None


def _like(pattern: str, example: str, *values: object) -> str:
    """``example`` (a key matching ``pattern``) with its first capture groups replaced by ``values``."""
    m = re.fullmatch(pattern, example)
    out, last = [], 0
    for i, v in zip(range(1, m.re.groups + 1), values):
        out += [example[last:m.start(i)], str(v)]
        last = m.end(i)
    return "".join(out) + example[last:]


def _group(parts: _Parts) -> _Grouped:
    spec = _LAYOUTS[parts.layout]
    g = _Grouped({}, {}, None, None)
    for key, t in parts.tensors.items():
        if m := re.fullmatch(spec["block"], key):
            g.blocks.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = (key, t)
        elif m := re.fullmatch(spec["proj"], key):
            g.projs[int(m[1])] = (key, t, int(m[2]) if m.lastindex == 2 else None)
        elif "shared" in spec and re.fullmatch(spec["shared"], key):
            g.shared = (key, t)
        elif "token_map" in spec and re.fullmatch(spec["token_map"], key):
            g.token_map = (key, t)
        elif "root" in spec and re.fullmatch(spec["root"], key):
            g.root = (key, t)
    if parts.layout == "vllm" and parts.config.get("original_lm_head") and g.projs:
        g.shared, g.projs = g.projs[0][:2], {}  # one lm_head shared by all heads, stored as lm_heads.0
    return g


def _structure(g: _Grouped, parts: _Parts) -> tuple[int, int]:
    """(K, L) from the keys; MedusaHeadsError naming the first missing key."""
    origin, block_re = parts.origin, _LAYOUTS[parts.layout]["block"]
    head_ids = sorted(set(g.blocks) | set(g.projs))
    if not head_ids and parts.layout == "canonical":
        head_ids = list(range(int(parts.config.get("num_heads", 0))))
    if not head_ids:
        raise MedusaHeadsError(f"no Medusa heads found in {origin}")
    K = len(head_ids)
    if head_ids != list(range(K)):
        missing = sorted(set(range(head_ids[-1] + 1)) - set(head_ids))
        raise MedusaHeadsError(f"{origin}: head indices {head_ids} skip {missing}: the checkpoint is incomplete "
                               "(a partial download or export?); re-download or re-export it")
    L = max((len(g.blocks.get(h, {})) for h in range(K)), default=0)
    example = next((e[0] for layers in g.blocks.values() for kinds in layers.values() for e in kinds.values()), None)
    biases = sum("bias" in g.blocks.get(h, {}).get(l, {}) for h in range(K) for l in range(L))
    biases_optional = parts.layout == "vllm" and biases == 0  # old vLLM with medusa_fc_bias: false
    for h in range(K):
        for l in range(L):
            entry = g.blocks.get(h, {}).get(l, {})
            for kind in ("weight",) if biases_optional else ("weight", "bias"):
                if kind not in entry:
                    key = _like(block_re, example, h, l, kind)
                    raise MedusaHeadsError(
                        f"{origin}: key '{key}' is missing (head {h} of {K}, layer {l} of {L}): the checkpoint is "
                        "incomplete or was edited; re-download or re-export it")
    if g.projs and len(g.projs) != K:
        h = min(set(range(K)) - set(g.projs))
        key = _like(_LAYOUTS[parts.layout]["proj"], next(iter(g.projs.values()))[0], h, L)
        raise MedusaHeadsError(f"{origin}: key '{key}' is missing (only heads {sorted(g.projs)} of {K} have a vocab "
                               "projection): the checkpoint is incomplete; re-download or re-export it")
    for h, (key, _, idx) in g.projs.items():
        if idx is not None and idx != L:
            raise MedusaHeadsError(f"{origin}: projection '{key}' should be at index {L} (after {L} residual "
                                   "layer(s)): the checkpoint is incomplete or mislabeled; re-download or re-export it")
    return K, L


def _shapes(g: _Grouped, K: int, L: int, parts: _Parts) -> tuple[int, list[tuple[str, torch.Tensor]], int | None]:
    """(H, projections in head order (one entry if shared, none for v2), their row count or None)."""
    origin = parts.origin
    if L:
        H = g.blocks[0][0]["weight"][1].shape[-1]
    elif g.projs or g.shared:
        H = (g.projs[0][1] if g.projs else g.shared[1]).shape[-1]
    else:
        H = int(parts.config.get("hidden_size", 0))
    for h in range(K):
        for l in range(L):
            for kind, (key, t) in g.blocks[h][l].items():
                want = (H, H) if kind == "weight" else (H,)
                if tuple(t.shape) != want:
                    raise MedusaHeadsError(f"{origin}: '{key}' has shape {tuple(t.shape)}, expected {want} (hidden "
                                           f"size {H} from the first block): the heads are inconsistent (mixed from "
                                           "two checkpoints?); re-download or re-export them")
    proj_list = [g.projs[h][:2] for h in range(K)] if g.projs else ([g.shared] if g.shared else [])
    rows = None
    for key, t in proj_list:
        if t.dim() != 2 or t.shape[1] != H or (rows is not None and t.shape[0] != rows):
            raise MedusaHeadsError(f"{origin}: projection '{key}' has shape {tuple(t.shape)}, expected "
                                   f"[{rows or 'vocab'}, {H}]: the heads are inconsistent (mixed from two "
                                   "checkpoints?); re-download or re-export them")
        rows = t.shape[0]
    if g.root is not None and tuple(g.root[1].shape) != (H, H):
        raise MedusaHeadsError(f"{origin}: '{g.root[0]}' has shape {tuple(g.root[1].shape)}, expected ({H}, {H}): "
                               "the checkpoint is damaged; re-download or re-export it")
    if g.root is None and parts.config.get("root_input"):
        raise MedusaHeadsError(f"{origin}: config.json says root_input but the weights lack 'root_proj.weight': the "
                               "checkpoint is incomplete; re-download or re-export it")
    return H, proj_list, rows


def _not_for_this_model(origin: str, what: str, config: dict) -> MedusaHeadsError:
    base = config.get("base_model_name_or_path") or config.get("_name_or_path")
    hint = f" (its config says base model '{base}')" if base else ""
    return MedusaHeadsError(f"heads in {origin} {what}: these heads belong to another model{hint}; use Medusa heads "
                            "trained for this base model (medusa-plugin train makes them)")


def _fit_vocab(full: int, base: int | None, origin: str, config: dict) -> int:
    """The heads' vocabulary after matching the base model's: ``base`` when the two differ by padding only."""
    if base is None or full == base:
        return full
    if abs(full - base) > vocab_padding_limit(max(full, base)):
        raise _not_for_this_model(origin, f"were trained for vocab size {full} but the base model has {base}, "
                                          f"more than vocabulary padding explains (<= "
                                          f"{vocab_padding_limit(max(full, base))} rows)", config)
    return base


def _vocabulary(g: _Grouped, own: bool, proj_list, rows: int | None, parts: _Parts, base_vocab: int | None
                ) -> tuple[int | None, torch.Tensor | None, list[tuple[str, torch.Tensor]]]:
    """(V, token_map or None, projections) with V the base model's vocabulary when known.

    A token map sends projection row i to token id ``token_map[i]``; heads narrower than V by padding get
    ``token_map = arange(rows)`` (logits -inf for the ids above), wider heads lose the rows of ids >= V.
    """
    origin, cfg = parts.origin, parts.config
    if not own:  # v2: the base model's lm_head gives the logits, so the vocabulary is the base model's
        return base_vocab or cfg.get("vocab_size"), None, proj_list
    if g.token_map is None:
        V = _fit_vocab(rows, base_vocab, origin, cfg)
        if V < rows:
            return V, None, [(k, t[:V]) for k, t in proj_list]
        return V, (torch.arange(rows) if V > rows else None), proj_list

    key, token_map = g.token_map
    if token_map.dtype.is_floating_point or token_map.dtype == torch.bool or token_map.dim() != 1:
        raise MedusaHeadsError(f"{origin}: '{key}' must be a 1-D integer tensor of token ids, got {token_map.dtype} "
                               f"{tuple(token_map.shape)}: the checkpoint is damaged; re-download or re-export it")
    token_map = token_map.long()
    T = token_map.numel()
    trunc = cfg.get("truncated_vocab_size")
    if trunc is not None and trunc != T:
        raise MedusaHeadsError(f"{origin}: config truncated_vocab_size={trunc} but '{key}' has {T} entries: the "
                               "config and weights come from different exports; re-download or re-export them")
    if rows > T:  # full-vocabulary projections: keep the token_map rows
        full = rows
        proj_list = [(k, t[token_map]) for k, t in proj_list]
    elif rows == T:
        full = cfg.get("vocab_size") or base_vocab
        if not full:
            raise MedusaHeadsError(f"{origin}: '{key}' maps a truncated vocab of {T} tokens, but the full vocab size "
                                   "is unknown: pass base_vocab_size= or set vocab_size in config.json")
    else:
        raise MedusaHeadsError(f"{origin}: projection rows ({rows}) fit neither '{key}' ({T} entries) nor a full "
                               "vocabulary: the checkpoint is damaged; re-download or re-export it")
    V = _fit_vocab(full, base_vocab, origin, cfg)
    if T and (int(token_map.min()) < 0 or int(token_map.max()) >= V):
        raise _not_for_this_model(origin, f"map draft tokens to ids outside [0, {V}) ('{key}')", cfg)
    return V, token_map, proj_list


def _check_values(name: str, t: torch.Tensor, origin: str) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise MedusaHeadsError(f"tensor '{name}' in {origin} has dtype {t.dtype}: quantized or integer Medusa heads "
                               "are not supported; dequantize them to float16/bfloat16/float32 first")
    if not torch.isfinite(t).all():
        raise MedusaHeadsError(f"tensor '{name}' in {origin} contains NaN or Inf values: the checkpoint is corrupt "
                               "(or training diverged); re-download or re-train the heads")


def _build(cls, g: _Grouped, K: int, L: int, H: int, V: int | None, own: bool, token_map, proj_list,
           parts: _Parts, dtype: torch.dtype | None) -> MedusaHeads:
    named = [(k, t) for h in range(K) for l in range(L) for k, t in g.blocks[h][l].values()] + proj_list \
        + ([g.root] if g.root is not None else [])
    for key, t in named:
        _check_values(key, t, parts.origin)
    dt = dtype or (named[0][1].dtype if named else torch.float32)
    heads = cls(H, K, L, V, own_lm_head=own, shared_lm_head=own and not g.projs, token_map=token_map,
                root_input=g.root is not None, device="meta", dtype=dt)
    sd: dict[str, torch.Tensor] = {}
    for h in range(K):
        for l in range(L):
            w = g.blocks[h][l]["weight"][1]
            b = g.blocks[h][l].get("bias", (None, torch.zeros(H, dtype=w.dtype)))[1]  # old vLLM without biases
            sd[f"blocks.{h}.{l}.linear.weight"], sd[f"blocks.{h}.{l}.linear.bias"] = w, b
        if own:
            sd[f"lm_heads.{h}.weight"] = proj_list[h if g.projs else 0][1]
    if g.root is not None:
        sd["root_proj.weight"] = g.root[1]
    sd = {k: v.to(dt).contiguous() for k, v in sd.items()}
    if token_map is not None:
        sd["token_map"] = token_map
    heads.load_state_dict(sd, assign=True)
    heads.base_model_name_or_path = parts.config.get("base_model_name_or_path") or parts.config.get("_name_or_path")
    heads.source_format = parts.layout
    return heads


def _assemble(cls, parts: _Parts, base_hidden: int | None, base_vocab: int | None,
              dtype: torch.dtype | None) -> MedusaHeads:
    """MedusaHeads from the raw tensors of one checkpoint (the steps are listed above ``_Grouped``)."""
    g = _group(parts)
    K, L = _structure(g, parts)
    H, proj_list, rows = _shapes(g, K, L, parts)
    own = bool(proj_list)
    if own and parts.layout == "canonical" and parts.config.get("own_lm_head") is False:
        own = False  # the config is authoritative for our own format only
    if base_hidden is not None and H != base_hidden:
        raise _not_for_this_model(parts.origin, f"were trained for hidden size {H} but the base model has "
                                                f"{base_hidden}", parts.config)
    V, token_map, proj_list = _vocabulary(g, own, proj_list, rows, parts, base_vocab)
    return _build(cls, g, K, L, H, V, own, token_map, proj_list, parts, dtype)
