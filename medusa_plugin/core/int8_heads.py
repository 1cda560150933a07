"""Int8 weight-only copies of Medusa heads, for drafting calls of few rows on a CPU.

Why: on a CPU the heads run right after the target's forward, which has evicted their weights from the caches, so a
call of a few rows is bound by reading the weights from memory. Measured on a 2-core AMD EPYC (AVX512-BF16, 1 thread)
with the shipped SmolLM2 heads (576 x 4097 projection, bf16), caches flushed before each call: the projection takes
0.39-0.44 ms for 1-8 rows in bf16 and 0.16-0.29 ms with int8 weights; a whole ``draft_topk`` (top-10) 0.66 / 0.40 ms
at 1 row, 1.00 / 0.60 ms at 1 request x 4 heads, 1.19 / 1.02 ms at 16 rows, 1.31 / 1.52 ms at 32 rows (hence the
proposer's ``INT8_MAX_ROWS``). With float32 or float16 activations the kernel has no fast path there: 2-8x slower
than the float heads. So the proposer's ``int8_drafting: auto`` runs the copy with bfloat16 activations, whatever
the heads' dtype, on a CPU with native bf16 matmul only.

Drafting only: the target verifies every draft token, so int8 draft weights can change which tokens are proposed
(and so the acceptance length) but never the output.

Quantization: symmetric, one scale per output row (``scale = max|w_row| / 127``), the scheme of gpt-fast's
``quantize.py`` (``WeightOnlyInt8QuantHandler``) and torchao's int8 weight-only CPU path. The matmul is
``torch.ops.aten._weight_int8pack_mm`` (ATen, CPU and CUDA, since torch 2.3), the kernel both call.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn

from .heads import MedusaHeads, MedusaHeadsError


# The kernel's bf16 path reads the inner dimension in vectors: on an AVX-512 CPU (torch 2.13) K not a multiple of
# 16 gives wrong results or a segmentation fault, which no probe could catch. Hidden sizes of real models are
# multiples of 32 or more; others keep their float heads.
K_MULTIPLE = 32


@functools.lru_cache(maxsize=None)
def int8_matmul_available(dtype: torch.dtype, device_type: str = "cpu") -> bool:
    """Whether ``_weight_int8pack_mm`` runs on this build and device type for activations of ``dtype`` and an inner
    dimension that is a multiple of :data:`K_MULTIPLE` (probed with a tiny call and checked against a float matmul;
    False where the op is missing or wrong)."""
    try:
        x = (torch.arange(128, dtype=torch.float32).view(2, K_MULTIPLE * 2) / 64 - 1).to(dtype).to(device_type)
        w = (torch.arange(3 * K_MULTIPLE * 2) % 17 - 8).to(torch.int8).view(3, K_MULTIPLE * 2).to(device_type)
        s = torch.tensor([0.5, 1.0, 2.0], dtype=dtype, device=device_type)
        y = torch.ops.aten._weight_int8pack_mm(x, w, s).cpu()
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    ref = x.float().cpu() @ (w.float().cpu() * s.float().cpu()[:, None]).T
    return y.shape == ref.shape and torch.allclose(y.float(), ref, rtol=1e-2, atol=1e-2)


class Int8Linear(nn.Module):
    """``y = x @ (qweight * scales[:, None]).T + bias``: a bias-optional Linear with int8 weights.

    ``qweight`` int8 ``[N, K]``, ``scales`` ``[N]`` in the activations' dtype (a frozen parameter, so the module's
    dtype reads as that), ``bias`` ``[N]`` or None. x ``[..., K]`` in that dtype -> ``[..., N]``. No ``weight``
    attribute on purpose: code that reads ``.weight`` to multiply by hand must not take this for a float Linear.
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype | None = None):
        super().__init__()
        w = linear.weight.detach()
        dtype = dtype or w.dtype  # the activations' dtype
        # the scales in the activations' dtype first, so the weights round against the scales the kernel applies
        scales = (w.float().abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(dtype)
        self.register_buffer("qweight", torch.round(w.float() / scales.float()[:, None]).clamp(-127, 127)
                             .to(torch.int8).contiguous())
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def int8_heads(heads: MedusaHeads, dtype: torch.dtype | None = None) -> MedusaHeads:
    """A copy of ``heads`` whose Linear layers (ResBlocks, ``root_proj``, own projections) hold int8 weights; same
    interface (``forward``, ``draft_topk``), same ``token_map``.

    ``dtype``: the activations' dtype of the copy (default the heads'). bfloat16 for float32 heads on a CPU with native
    bf16: the kernel has a fast bf16 path there and none for float32 (measured, module docstring); the copy casts its
    inputs (``MedusaHeads.head_input`` casts to the heads' dtype) and returns bf16 logits. Drafts only.

    Raises:
        MedusaHeadsError: v2 heads (no own projection: they use the target's lm_head, which stays as it is and
            dominates the call) or activations of a dtype the int8 kernel does not take on this machine.
    """
    if not heads.own_lm_head:
        raise MedusaHeadsError("int8 drafting needs heads with their own vocab projection (these are v2 heads that "
                               "use the target's lm_head): set int8_drafting: false")
    device = next((p.device for p in heads.parameters()), torch.device("cpu"))
    dtype = dtype or heads.dtype
    if not int8_matmul_available(dtype, device.type):
        raise MedusaHeadsError(f"this PyTorch build has no int8 weight-only matmul for {dtype} activations "
                               "(torch.ops.aten._weight_int8pack_mm): set int8_drafting: false")
    if heads.hidden_size % K_MULTIPLE:
        raise MedusaHeadsError(f"int8 drafting needs a hidden size that is a multiple of {K_MULTIPLE} (the int8 "
                               f"kernel's vector width), these heads have {heads.hidden_size}: set "
                               "int8_drafting: false")
    # every float Linear (a shared projection once) becomes its Int8Linear inside the copy, through deepcopy's memo:
    # the float weights are never copied
    memo = {id(m): Int8Linear(m, dtype) for m in heads.modules() if isinstance(m, nn.Linear)}
    out = copy.deepcopy(heads, memo)
    return out.to(dtype).eval()  # any parameter outside a Linear too (there is none today)
