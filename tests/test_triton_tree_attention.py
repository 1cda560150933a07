"""Triton tree attention vs the torch reference: on CPU in Triton's interpreter (tiny sizes), on GPU when present.

Interpreter mode must be on before ``triton`` is first imported (Triton's own ``tl.max``/``tl.zeros``... are jitted at
import), so the ``test_interpreter_*`` tests run in a child pytest with ``TRITON_INTERPRET=1``
(``test_interpreter_suite_in_subprocess``) and are skipped in the parent process.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medusa_plugin.core.paged_attention import PagedAttentionError, paged_tree_attention
from test_paged_attention import MC63, make_batch

triton = pytest.importorskip("triton")
from medusa_plugin.core.triton_tree_attention import HAS_TRITON, triton_paged_tree_attention  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRET, reason="run by test_interpreter_suite_in_subprocess")


def test_interpreter_suite_in_subprocess():
    if INTERPRET:
        pytest.skip("this is the interpreter process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "interpreter and not subprocess"], env=env, capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout, res.stdout[-2000:]


def check(seq_lens, q_lens, is_tree, *, block_size, hq, hkv, dh, dtype, device="cpu", num_splits=None, seed=0,
          mask=MC63):
    kw = make_batch(seq_lens, q_lens, block_size=block_size, hq=hq, hkv=hkv, dh=dh, dtype=dtype, seed=seed)
    kw = {k: v.to(device) for k, v in kw.items()}
    is_tree = torch.tensor(is_tree, device=device)
    got = triton_paged_tree_attention(**kw, tree_mask=mask.to(device), is_tree=is_tree, scale=dh ** -0.5,
                                      num_splits=num_splits)
    want = paged_tree_attention(**kw, tree_mask=mask.to(device), is_tree=is_tree, scale=dh ** -0.5)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


# full tree / truncated tree / prefill row / one-query decode row, at contexts 0 / 3 / 40 / 100
MIXED = dict(seq_lens=[64, 20, 49, 101], q_lens=[64, 17, 9, 1], is_tree=[True, True, False, False])


@pytest.mark.parametrize("block_size,hq,hkv,dh,dtype,num_splits", [
    (16, 4, 2, 16, torch.float32, 1),
    (32, 8, 1, 32, torch.float16, 1),    # 64 queries x 8 q-heads: several row tiles per request
    (16, 2, 2, 24, torch.bfloat16, 3),   # head dim padded to 32, KV split in 3
    (64, 4, 4, 64, torch.float32, 2),
    (16, 2, 1, 128, torch.float16, 1),
])
@interpreter_only
def test_interpreter_matches_reference(block_size, hq, hkv, dh, dtype, num_splits):
    check(**MIXED, block_size=block_size, hq=hq, hkv=hkv, dh=dh, dtype=dtype, num_splits=num_splits,
          seed=block_size + dh)


@interpreter_only
def test_interpreter_65_queries_and_out_buffer():
    chain = torch.tril(torch.ones(65, 65, dtype=torch.bool))  # a 64-node chain: 65 queries
    kw = make_batch([65 + 70, 65], [65, 65], block_size=16, hq=2, hkv=2, dh=16, seed=4)
    out = torch.full_like(kw["query"], float("nan"))
    got = triton_paged_tree_attention(**kw, tree_mask=chain, is_tree=torch.tensor([True, False]), scale=0.25,
                                      out=out, max_query_len=65, max_seq_len=135)
    assert got is out
    want = paged_tree_attention(**kw, tree_mask=chain, is_tree=torch.tensor([True, False]), scale=0.25)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kw = make_batch([10], [5], block_size=16, hq=2, hkv=2, dh=16)
    with pytest.raises(PagedAttentionError, match="CUDA"):
        triton_paged_tree_attention(**kw, tree_mask=MC63, is_tree=torch.tensor([True]), scale=1.0)


def test_module_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "from medusa_plugin.core import triton_tree_attention as m\n"
            "assert not m.HAS_TRITON\n"
            "try:\n    m.triton_paged_tree_attention(*[None] * 8, scale=1.0)\nexcept ValueError as e:\n"
            "    assert 'triton is not installed' in str(e)\nelse:\n    raise SystemExit('no error')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert HAS_TRITON


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size,dh,hq,hkv", [(16, 128, 32, 8), (32, 64, 8, 8), (64, 128, 16, 2)])
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_gpu_matches_reference(dtype, block_size, dh, hq, hkv, num_splits):
    # full 63-node trees (64 rows with the root), a truncated tree, a prefill row and a decode row
    seq_lens = [64, 1000 + 64, 2048 + 17, 300 + 40, 5000 + 1]
    q_lens = [64, 64, 17, 40, 1]
    check(seq_lens, q_lens, [True, True, True, False, False], block_size=block_size, hq=hq, hkv=hkv, dh=dh,
          dtype=dtype, device="cuda", num_splits=num_splits, seed=block_size)
