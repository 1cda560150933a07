"""The EXPERIMENTAL CUDA glue (``vllm_ext/kv_layout.py`` CUDA views, ``vllm_ext/cuda_attention.py``), checked on CPU.

Runs under vllm-cpu 0.32 (the base env) and under vLLM 0.33 imported on CPU
(``VLLM_TARGET_DEVICE=cpu /tmp/venv-vllm033/bin/python -m pytest tests/test_vllm_cuda_glue.py``, see
``.ci/contracts_vllm033.sh``):

* KV views: layer caches are built with vLLM's own allocator helpers (``compute_layout_strides`` +
  ``create_kv_cache_views``) for every ``KVCacheLayout``; tokens are written by the stock
  ``TritonAttentionImpl.do_kv_cache_update`` (its ``triton_reshape_and_cache_flash`` replaced by a torch stand-in of
  the op's documented contract, Triton being disabled on CPU), and each element's byte address is derived from vLLM's
  byte strides. ``cuda_kv_views`` must read what the stock path wrote and write where vLLM's strides say.
* Backend: subclasses of the stock Triton backend / impl / builder, no full CUDA graphs, stock behaviour outside tree
  steps, tree rows equal to a brute-force reference (GQA, non-default scale, truncated tree, prefill row in the batch).
* GPU: token equality with the engine without speculation (skipped without CUDA).
"""
from __future__ import annotations

import gc
import inspect
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from vllm.v1.attention.backend import AttentionCGSupport  # noqa: E402
from vllm.v1.attention.backends import triton_attn  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheTensor,
    compute_layout_strides,
    create_kv_cache_views,
)
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402

from medusa_plugin.core.kv_compaction import compact_paged_kv  # noqa: E402
from medusa_plugin.core.paged_attention import dense_tree_attention_reference, paged_tree_attention  # noqa: E402
from medusa_plugin.core.tree import MedusaTree  # noqa: E402
from medusa_plugin.vllm_ext import cuda_attention, tree_step  # noqa: E402
from medusa_plugin.vllm_ext.kv_layout import CudaKVLayoutError, cuda_kv_views, split_kv_cache  # noqa: E402
from medusa_plugin.vllm_ext.plugin import CUDA_ATTENTION_BACKEND  # noqa: E402

BLOCK_SIZE, HKV, HQ, D = 16, 2, 4, 16
LAYOUTS = list(KVCacheLayout)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"   # set by test_tree_rows_with_triton_kernel_in_interpreter


# ------------------------------------------------------------------------------------------------ helpers
class LayerCaches:
    """``num_layers`` per-layer caches in one raw int8 buffer, laid out by vLLM's own helpers for ``layout``."""

    def __init__(self, layout: KVCacheLayout, num_blocks: int, num_layers: int = 2, dtype=torch.float32):
        self.spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=HKV, head_size=D, dtype=dtype)
        # byte strides in logical [L, B, H, N, C] order
        self.strides = compute_layout_strides(self.spec, num_blocks, num_layers, layout)
        self.names = [f"layer.{i}" for i in range(num_layers)]
        size = self.spec.page_size_bytes * num_blocks * num_layers
        tensor = KVCacheTensor(size=size, layers=self.names, layer_stride=self.strides[0],
                               block_stride=self.strides[1])
        self.raw = torch.zeros(size, dtype=torch.int8)
        self.views = create_kv_cache_views(self.raw, self.spec, num_blocks, layout, tensor)
        self.dtype = dtype

    def read(self, layer: int, kv: int, block: int, offset: int, head: int) -> torch.Tensor:
        """``[D]`` K (kv=0) or V (kv=1) of one (block, offset, head), from raw bytes at vLLM's strides."""
        sl, sb, sh, sn, _ = self.strides
        esize = torch.empty((), dtype=self.dtype).element_size()
        start = layer * sl + block * sb + head * sh + offset * sn + kv * D * esize
        return self.raw[start:start + D * esize].view(self.dtype)


def _stand_in_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, *args, **kwargs):
    """The contract of vLLM's ``triton_reshape_and_cache_flash`` (its docstring/signature): caches are
    ``[num_blocks, block_size, num_heads, head_size]``; token t goes to ``[slot // block_size, slot % block_size]``
    with ``block_size = key_cache.shape[1]``; negative slots are padding."""
    bs = key_cache.shape[1]
    for t, s in enumerate(slot_mapping.tolist()):
        if s >= 0:
            key_cache[s // bs, s % bs] = key[t]
            value_cache[s // bs, s % bs] = value[t]


@pytest.fixture
def stock_write(monkeypatch):
    """``stock_write(kv_cache, key, value, slots)``: the stock ``TritonAttentionImpl.do_kv_cache_update``."""
    monkeypatch.setattr(triton_attn, "triton_reshape_and_cache_flash", _stand_in_reshape_and_cache)
    impl = triton_attn.TritonAttentionImpl(num_heads=HQ, head_size=D, scale=1.0, num_kv_heads=HKV,
                                           alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto")
    layer = SimpleNamespace(_k_scale=torch.ones(()), _v_scale=torch.ones(()))

    def write(kv_cache, key, value, slots):
        impl.do_kv_cache_update(layer, key, value, kv_cache, torch.as_tensor(slots, dtype=torch.int64))
    return write


# ------------------------------------------------------------------------------------------------ (a) KV views
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.name)
def test_views_read_what_the_stock_cache_update_wrote(layout, stock_write):
    caches = LayerCaches(layout, num_blocks=5)
    g = torch.Generator().manual_seed(0)
    slots = [0, 5, 17, 31, 32, 79, 40]
    key, value = torch.randn(2, len(slots), HKV, D, generator=g).unbind(0)
    stock_write(caches.views[1], key, value, slots)
    layer = SimpleNamespace(head_size=D, head_size_v=D)
    k_view, v_view = cuda_kv_views(layer, caches.views[1])
    assert k_view.shape == v_view.shape == (5, BLOCK_SIZE, HKV, D)
    for t, s in enumerate(slots):
        torch.testing.assert_close(k_view[s // BLOCK_SIZE, s % BLOCK_SIZE], key[t], rtol=0, atol=0)
        torch.testing.assert_close(v_view[s // BLOCK_SIZE, s % BLOCK_SIZE], value[t], rtol=0, atol=0)
    # nothing else was written, and layer 0 (same buffer) is untouched
    assert int((k_view != 0).any(-1).sum()) == len(slots) * HKV
    assert not caches.views[0].any()


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.name)
def test_view_writes_land_at_vllm_byte_strides(layout):
    caches = LayerCaches(layout, num_blocks=4, num_layers=3)
    k_view, v_view = cuda_kv_views(SimpleNamespace(head_size=D), caches.views[2])
    assert k_view.data_ptr() == caches.views[2].data_ptr() and k_view.stride(-1) == 1  # a view, not a copy
    k_view[3, 7, 1] = torch.arange(D, dtype=torch.float32) + 1
    v_view[0, 15, 0] = -torch.arange(D, dtype=torch.float32) - 1
    torch.testing.assert_close(caches.read(2, 0, 3, 7, 1), torch.arange(D, dtype=torch.float32) + 1)
    torch.testing.assert_close(caches.read(2, 1, 0, 15, 0), -torch.arange(D, dtype=torch.float32) - 1)
    assert int((caches.raw.view(torch.float32) != 0).sum()) == 2 * D  # those 2 rows, nothing else


@pytest.mark.parametrize("layout", [KVCacheLayout.LBHNC, KVCacheLayout.BLNHC], ids=lambda x: x.name)
def test_compaction_through_views_moves_both_k_and_v_of_one_layer_only(layout, stock_write):
    caches = LayerCaches(layout, num_blocks=4)
    g = torch.Generator().manual_seed(1)
    slots = list(range(20, 40))
    for i in range(2):
        key, value = torch.randn(2, len(slots), HKV, D, generator=g).unbind(0)
        stock_write(caches.views[i], key, value, slots)
    before = [v.clone() for v in caches.views]
    src, dst = torch.tensor([25, 33, 38]), torch.tensor([21, 22, 23])
    for view in cuda_kv_views(SimpleNamespace(head_size=D), caches.views[0]):
        compact_paged_kv(view, src, dst, block_size=view.shape[1], block_dim=0, offset_dim=1)
    for s, d in zip(src.tolist(), dst.tolist()):
        for kv in range(2):
            for h in range(HKV):
                want = before[0][s // BLOCK_SIZE, h, s % BLOCK_SIZE, kv * D:(kv + 1) * D]
                torch.testing.assert_close(caches.read(0, kv, d // BLOCK_SIZE, d % BLOCK_SIZE, h), want)
    moved = torch.zeros(4 * BLOCK_SIZE, dtype=torch.bool)
    moved[dst] = True
    logical = caches.views[0].transpose(1, 2).reshape(4 * BLOCK_SIZE, -1)
    torch.testing.assert_close(logical[~moved], before[0].transpose(1, 2).reshape(4 * BLOCK_SIZE, -1)[~moved])
    torch.testing.assert_close(caches.views[1], before[1])


def test_bad_caches_get_clear_errors():
    with pytest.raises(CudaKVLayoutError, match="2 \\* head_size"):
        split_kv_cache(torch.zeros(2, HKV, BLOCK_SIZE, 2 * D + 8), D)     # per-token-head scales inline
    with pytest.raises(CudaKVLayoutError, match="logical shape"):
        split_kv_cache(torch.zeros(2, 2, HKV, BLOCK_SIZE, D), D)          # old [2, B, N, H, D] layout
    with pytest.raises(CudaKVLayoutError, match="V head size"):
        cuda_kv_views(SimpleNamespace(head_size=D, head_size_v=D // 2), torch.zeros(2, HKV, BLOCK_SIZE, 2 * D))


# ------------------------------------------------------------------------------------------------ (b) backend
def test_backend_subclasses_the_stock_triton_backend():
    backend = cuda_attention.MedusaTritonAttentionBackend
    assert issubclass(backend, triton_attn.TritonAttentionBackend)
    assert backend.get_name() == triton_attn.TritonAttentionBackend.get_name() == "TRITON_ATTN"
    impl, builder = backend.get_impl_cls(), backend.get_builder_cls()
    assert issubclass(impl, triton_attn.TritonAttentionImpl) and impl is not triton_attn.TritonAttentionImpl
    assert issubclass(builder, triton_attn.TritonAttentionMetadataBuilder)
    assert builder.get_cudagraph_support(None, None) == AttentionCGSupport.NEVER
    assert triton_attn.TritonAttentionMetadataBuilder.get_cudagraph_support(None, None) != AttentionCGSupport.NEVER
    assert (list(inspect.signature(impl.forward).parameters)
            == list(inspect.signature(triton_attn.TritonAttentionImpl.forward).parameters))
    from medusa_plugin.vllm_ext.compat import resolve
    assert resolve(CUDA_ATTENTION_BACKEND) is backend


def _impl(**kw):
    args = dict(num_heads=HQ, head_size=D, scale=0.37, num_kv_heads=HKV, alibi_slopes=None, sliding_window=None,
                kv_cache_dtype="auto")
    return cuda_attention.MedusaTritonAttentionImpl(**{**args, **kw})


def _stock_causal(self, layer, query, key, value, kv_cache, md, output, output_scale=None, output_block_scale=None):
    """Stands in for the stock Triton forward (Triton is off on CPU): causal attention for every row."""
    k, v = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
    n = md.query_start_loc.shape[0] - 1
    output[:md.num_actual_tokens] = paged_tree_attention(
        query[:md.num_actual_tokens], k, v, md.block_table, md.seq_lens, md.query_start_loc,
        torch.zeros(1, 1, dtype=torch.bool), torch.zeros(n, dtype=torch.bool), self.scale)
    return output


def _tree_batch(stock_write, layout):
    """Four requests: a full 64-node tree (context 21), a prefill (9 tokens, context 0), a tree truncated to 17 nodes
    (context 40), a 1-token decode (context 5). Blocks are shuffled; K/V of every position written by the stock path."""
    tree = MedusaTree.from_name("mc_sim_7b_63")
    ctx, q_lens, is_tree = [21, 0, 40, 5], [64, 9, 17, 1], [True, False, True, False]
    seq_lens = [c + q for c, q in zip(ctx, q_lens)]
    need = [-(-s // BLOCK_SIZE) for s in seq_lens]
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(sum(need) + 2, generator=g)
    caches = LayerCaches(layout, num_blocks=sum(need) + 2, num_layers=1)
    block_table = torch.zeros(4, max(need), dtype=torch.int32)
    used = 0
    k_ref = torch.zeros(sum(need) + 2, BLOCK_SIZE, HKV, D)
    v_ref = torch.zeros_like(k_ref)
    for b, n in enumerate(need):
        block_table[b, :n] = perm[used:used + n].to(torch.int32)
        used += n
        slots = [int(block_table[b, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE for p in range(seq_lens[b])]
        key, value = torch.randn(2, seq_lens[b], HKV, D, generator=g).unbind(0)
        stock_write(caches.views[0], key, value, slots)
        for t, s in enumerate(slots):
            k_ref[s // BLOCK_SIZE, s % BLOCK_SIZE], v_ref[s // BLOCK_SIZE, s % BLOCK_SIZE] = key[t], value[t]
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist())
    md = SimpleNamespace(num_actual_tokens=int(qsl[-1]), query_start_loc=qsl, seq_lens=torch.tensor(seq_lens),
                         block_table=block_table, max_seq_len=max(seq_lens), max_query_len=max(q_lens))
    rows = [b for b in range(4) if is_tree[b]]
    step = tree_step.TreeStep(
        tree_reqs=torch.tensor(rows), token_index=torch.cat([torch.arange(qsl[b], qsl[b + 1]) for b in rows]),
        sub_query_start_loc=torch.tensor([0] + torch.tensor([q_lens[b] for b in rows]).cumsum(0).tolist()),
        tree_mask=tree.ancestor_mask, num_tokens=int(qsl[-1]))
    query = torch.randn(int(qsl[-1]), HQ, D, generator=g)
    want = dense_tree_attention_reference(query, k_ref, v_ref, block_table, md.seq_lens, qsl, tree.ancestor_mask,
                                          torch.tensor(is_tree), 0.37)
    return caches.views[0], md, step, query, want


@pytest.mark.parametrize("layout", [KVCacheLayout.LBHNC, KVCacheLayout.LBNHC], ids=lambda x: x.name)
def test_tree_step_rows_match_brute_force_and_other_rows_stay_stock(layout, stock_write, monkeypatch):
    monkeypatch.setattr(triton_attn.TritonAttentionImpl, "forward", _stock_causal)
    kv_cache, md, step, query, want = _tree_batch(stock_write, layout)
    impl, layer = _impl(), SimpleNamespace()
    padded = torch.cat([query, torch.zeros(3, HQ, D)])  # the engine pads num_tokens; padding rows are left alone
    output = torch.full_like(padded, 7.0)
    tree_step.publish(step)
    try:
        out = impl.forward(layer, padded, None, None, kv_cache, md, output)
    finally:
        tree_step.clear()
    assert out is output
    kernel = cuda_attention._tree_kernel(query.device).__name__
    assert kernel == ("triton_paged_tree_attention" if INTERPRET else "reference")
    torch.testing.assert_close(out[:md.num_actual_tokens].double(), want.double(), atol=1e-5, rtol=1e-5)
    assert bool((out[md.num_actual_tokens:] == 7.0).all())

    # without a tree step: exactly the stock forward (tree rows then see their siblings: different result)
    stock = _stock_causal(impl, layer, padded, None, None, kv_cache, md, torch.full_like(padded, 7.0))
    plain = impl.forward(layer, padded, None, None, kv_cache, md, torch.full_like(padded, 7.0))
    torch.testing.assert_close(plain, stock, rtol=0, atol=0)
    assert not torch.allclose(plain[step.token_index].double(), want[step.token_index].double(), atol=1e-3)


def test_tree_rows_with_triton_kernel_in_interpreter():
    """The same check with the real Triton tree kernel (Triton's CPU interpreter, in a child process because it must
    be on before triton is imported)."""
    pytest.importorskip("triton")
    if INTERPRET:
        pytest.skip("this is the interpreter process")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "tree_step_rows_match and LBNHC"], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert "1 passed" in res.stdout, res.stdout[-2000:]


def test_tree_step_refuses_unsupported_layers_and_desync(stock_write, monkeypatch):
    monkeypatch.setattr(triton_attn.TritonAttentionImpl, "forward", _stock_causal)
    kv_cache, md, step, query, _ = _tree_batch(stock_write, KVCacheLayout.LBHNC)
    tree_step.publish(step)
    try:
        with pytest.raises(cuda_attention.TreeAttentionUnsupported, match="sliding window"):
            _impl(sliding_window=8).forward(SimpleNamespace(), query, None, None, kv_cache, md, query.clone())
        with pytest.raises(cuda_attention.TreeAttentionUnsupported, match="soft-cap"):
            _impl(logits_soft_cap=30.0).forward(SimpleNamespace(), query, None, None, kv_cache, md, query.clone())
        with pytest.raises(cuda_attention.TreeAttentionUnsupported, match="dtype"):
            _impl().forward(SimpleNamespace(), query.double(), None, None, kv_cache, md, query.double())
        md.num_actual_tokens -= 1
        with pytest.raises(RuntimeError, match="out of sync"):
            _impl().forward(SimpleNamespace(), query, None, None, kv_cache, md, query.clone())
    finally:
        tree_step.clear()


# ------------------------------------------------------------------------------------------------ plugin switch
@pytest.fixture
def plugin():
    from medusa_plugin.vllm_ext import plugin
    return plugin


def test_experimental_switch_selects_the_gpu_worker(plugin, monkeypatch):
    from medusa_plugin.vllm_ext.settings import MedusaUnsupportedError
    cuda = SimpleNamespace(is_cpu=lambda: False, is_cuda_alike=lambda: True)
    monkeypatch.setattr(plugin, "CUDA_READY", False)
    monkeypatch.delenv(plugin.ENV_EXPERIMENTAL_CUDA, raising=False)
    with pytest.raises(MedusaUnsupportedError, match=plugin.ENV_EXPERIMENTAL_CUDA):
        plugin.medusa_worker_cls(cuda)
    monkeypatch.setenv(plugin.ENV_EXPERIMENTAL_CUDA, "1")
    assert plugin.medusa_worker_cls(cuda) == plugin.GPU_WORKER
    from medusa_plugin.vllm_ext.compat import resolve
    assert resolve(plugin.CUDA_ATTENTION_BACKEND) is cuda_attention.MedusaTritonAttentionBackend


def test_medusa_on_cuda_forces_the_triton_backend(plugin):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from medusa_plugin.vllm_ext.settings import MedusaUnsupportedError
    try:
        cfg = SimpleNamespace(attention_config=SimpleNamespace(backend=None, backend_per_kind={}))
        plugin._select_cuda_attention(cfg)
        assert cfg.attention_config.backend == AttentionBackendEnum.TRITON_ATTN
        assert AttentionBackendEnum.TRITON_ATTN.get_class() is cuda_attention.MedusaTritonAttentionBackend
        plugin._select_cuda_attention(cfg)  # an explicit TRITON_ATTN is fine
        cfg.attention_config.backend = AttentionBackendEnum.FLASH_ATTN
        with pytest.raises(MedusaUnsupportedError, match="FLASH_ATTN.*--attention-backend TRITON_ATTN"):
            plugin._select_cuda_attention(cfg)
    finally:
        AttentionBackendEnum.TRITON_ATTN.clear_override()


# ------------------------------------------------------------------------------------------------ (c) GPU end to end
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (vLLM CUDA build)")
def test_gpu_greedy_tokens_identical_to_no_speculation(monkeypatch):
    """Tiny trained Medusa model on vLLM's CUDA engine with the Triton tree backend, eager and with (piecewise) CUDA
    graphs: greedy outputs equal the stock engine without speculation, and trees were really verified.

    The reference engine starts first, before the experimental switch is set and before our backend is registered,
    so it runs the stock TRITON_ATTN backend."""
    import tempfile

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from medusa_plugin.testing.tiny import build_tiny_medusa, tiny_prompts

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.delenv("MEDUSA_PLUGIN_EXPERIMENTAL_CUDA", raising=False)
    cache = Path(os.environ.get("MEDUSA_TEST_CACHE", Path(tempfile.gettempdir()) / "medusa_plugin_test_cache"))
    model_dir, heads_dir = build_tiny_medusa(cache, num_heads=4)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [{"prompt_token_ids": p} for p in tiny_prompts(tok, 48, seed=0)[:8] + tiny_prompts(tok, 4, seed=7)]
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    base = dict(model=str(model_dir), dtype="float32", max_model_len=256, max_num_seqs=8, seed=0,
                attention_backend="TRITON_ATTN", gpu_memory_utilization=0.3, disable_log_stats=False)
    medusa = {"speculative_config": {"method": "custom_class",
                                     "model": "medusa_plugin.vllm_ext.proposer.MedusaTreeProposer",
                                     "num_speculative_tokens": MedusaTree.from_name("mc_sim_7b_63").num_nodes},
              "additional_config": {"medusa": {"heads": str(heads_dir), "tree": "mc_sim_7b_63"}}}

    def run(**kw):
        llm = LLM(**base, **kw)
        try:
            out = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
            steps = (llm.collective_rpc(lambda self: self.model_runner.medusa_stats.steps)[0]
                     if "speculative_config" in kw else 0)
            return out, steps
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            torch.cuda.empty_cache()

    def drop_cached_backend_choice():  # vLLM caches the resolved backend class per (backend, layer config)
        from vllm.v1.attention import selector
        selector._cached_get_attn_backend.cache_clear()

    ref, _ = run()
    monkeypatch.setenv("MEDUSA_PLUGIN_EXPERIMENTAL_CUDA", "1")
    register_backend(AttentionBackendEnum.TRITON_ATTN, CUDA_ATTENTION_BACKEND)
    drop_cached_backend_choice()
    try:
        for eager in (True, False):
            got, steps = run(enforce_eager=eager, **medusa)
            assert got == ref, f"enforce_eager={eager}"
            assert steps > 0, f"enforce_eager={eager}: no tree was verified"
    finally:
        AttentionBackendEnum.TRITON_ATTN.clear_override()
        drop_cached_backend_choice()
