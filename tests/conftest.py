"""Shared fixtures: tiny models built offline, cached across runs in pytest's cache directory."""

from __future__ import annotations

import functools

import pytest


@pytest.fixture(scope="session")
def tiny_cache_dir(request):
    """A directory that survives between pytest runs (``.pytest_cache/d/medusa_tiny``); builders cache by arguments."""
    return request.config.cache.mkdir("medusa_tiny")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_cache_dir):
    """Directory of a tiny random Llama (hidden 128, 2 layers, head_dim 64, vocab 256) with its tokenizer."""
    from medusa_plugin.testing import build_tiny_model

    return build_tiny_model(tiny_cache_dir / "llama")


@pytest.fixture(scope="session")
def tiny_medusa(tiny_cache_dir):
    """``tiny_medusa(arch) -> (model, tokenizer, heads)``: a tiny model (float32, eval) and 4 Medusa heads trained on
    its own greedy continuations of ``tiny_prompts(tokenizer, 64)``; built once per arch and cached."""
    from medusa_plugin.core.heads import MedusaHeads
    from medusa_plugin.testing import build_tiny_medusa, load_tiny_model

    @functools.cache
    def get(arch: str = "llama"):
        model_dir, heads_dir = build_tiny_medusa(tiny_cache_dir / "medusa", arch=arch)
        model, tok = load_tiny_model(model_dir)
        return model, tok, MedusaHeads.from_pretrained(heads_dir).eval()

    return get


@functools.lru_cache(maxsize=None)
def int8_kernel_runs() -> bool:
    """Whether PyTorch's int8 weight-only matmul works here for bf16 and fp32 activations, probed first in a child
    process: a kernel that crashes on this CPU must skip the tests that use it, not end the test run."""
    import subprocess
    import sys

    code = ("import torch; from medusa_plugin.core.int8_heads import int8_matmul_available as a; "
            "raise SystemExit(0 if a(torch.bfloat16) and a(torch.float32) else 1)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300).returncode == 0
