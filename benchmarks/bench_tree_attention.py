"""Benchmark: tree attention over a paged KV cache vs plain decode attention vs dense masked SDPA.

For each (context, batch, tree size) it times
  * ``tree``   — ``triton_paged_tree_attention`` on GPU (``paged_tree_attention``, the torch reference, otherwise):
                 ``tree`` queries per request over the paged cache with the tree mask (a prefix of mc_sim_7b_63);
  * ``decode`` — torch SDPA with one query per request over the same K/V (pre-gathered dense), i.e. a normal
                 decode step reading the same KV bytes;
  * ``dense``  — torch SDPA with all ``tree`` queries and an explicit [tree, S] boolean mask on dense K/V.
and reports the KV bytes read / time (GB/s), on GPU also as a fraction of the device's peak memory bandwidth.

    python benchmarks/bench_tree_attention.py                  # GPU: ctx 512/2k/8k, batch 1/8/32, tree 1/16/32/64
    python benchmarks/bench_tree_attention.py --tiny           # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from medusa_plugin.core.paged_attention import paged_tree_attention
from medusa_plugin.core.triton_tree_attention import HAS_TRITON, triton_paged_tree_attention

PEAK_BW = {"H200": 4.8e12, "H100 SXM": 3.35e12}  # bytes/s, by device name


def peak_bandwidth(name: str) -> float | None:
    if "H200" in name:
        return PEAK_BW["H200"]
    if "H100" in name and ("SXM" in name or "HBM3" in name):
        return PEAK_BW["H100 SXM"]
    return None


def tree_mask_of_size(q: int) -> torch.Tensor:
    """[q, q] ancestor mask of the first q nodes (root included) of mc_sim_7b_63 (a chain beyond its 64 nodes)."""
    from importlib import resources
    choices = json.loads(resources.files("medusa_plugin").joinpath("data/medusa_choices.json").read_text())
    nodes = [()] + sorted((tuple(c) for c in choices["choices"]["mc_sim_7b_63"]), key=lambda p: (len(p), p))
    while len(nodes) < q:
        nodes.append(nodes[-1] + (0,))
    nodes = nodes[:q]
    return torch.tensor([[pi[:len(pj)] == pj for pj in nodes] for pi in nodes], dtype=torch.bool)


def timeit(fn, device, iters: int) -> float:
    """Median seconds per call."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sdpa(q, k, v, mask=None):
    try:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    except (RuntimeError, TypeError):  # older torch / kernels without GQA: expand K/V
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)


def bench_one(ctx, batch, q, *, hq, hkv, dh, block_size, dtype, device, iters, use_triton):
    seq = ctx + q
    nblk = -(-seq // block_size)
    g = torch.Generator(device="cpu").manual_seed(0)
    num_blocks = batch * nblk
    key_cache = torch.randn(num_blocks, block_size, hkv, dh, generator=g).to(device, dtype)
    value_cache = torch.randn(num_blocks, block_size, hkv, dh, generator=g).to(device, dtype)
    block_tables = torch.randperm(num_blocks, generator=g).view(batch, nblk).to(device, torch.int32)
    seq_lens = torch.full((batch,), seq, dtype=torch.int32, device=device)
    qsl = torch.arange(0, (batch + 1) * q, q, dtype=torch.int32, device=device)
    query = torch.randn(batch * q, hq, dh, generator=g).to(device, dtype)
    mask = tree_mask_of_size(q).to(device)
    is_tree = torch.ones(batch, dtype=torch.bool, device=device)
    scale = dh ** -0.5
    out = torch.empty_like(query)

    if use_triton:
        def tree_fn():
            triton_paged_tree_attention(query, key_cache, value_cache, block_tables, seq_lens, qsl, mask, is_tree,
                                        scale, out, max_query_len=q, max_seq_len=seq)
    else:
        def tree_fn():
            paged_tree_attention(query, key_cache, value_cache, block_tables, seq_lens, qsl, mask, is_tree, scale, out)

    # Dense copies of the same K/V: [B, Hkv, S, Dh].
    k_dense = key_cache[block_tables.long()].reshape(batch, nblk * block_size, hkv, dh)[:, :seq].transpose(1, 2)
    v_dense = value_cache[block_tables.long()].reshape(batch, nblk * block_size, hkv, dh)[:, :seq].transpose(1, 2)
    k_dense, v_dense = k_dense.contiguous(), v_dense.contiguous()
    q_dense = query.view(batch, q, hq, dh).transpose(1, 2)
    q_decode = q_dense[:, :, -1:].contiguous()
    full_mask = torch.ones(q, seq, dtype=torch.bool, device=device)
    full_mask[:, ctx:] = mask

    t_tree = timeit(tree_fn, device, iters)
    t_decode = timeit(lambda: sdpa(q_decode, k_dense, v_dense), device, iters)
    t_dense = timeit(lambda: sdpa(q_dense, k_dense, v_dense, full_mask), device, iters)

    tree_fn()
    dense_out = sdpa(q_dense.float(), k_dense.float(), v_dense.float(), full_mask).transpose(1, 2).reshape_as(out)
    err = (out.float() - dense_out).abs().max().item()

    kv_bytes = 2 * batch * seq * hkv * dh * key_cache.element_size()
    return dict(ctx=ctx, batch=batch, tree=q, kv_bytes=kv_bytes, tree_ms=t_tree * 1e3, decode_ms=t_decode * 1e3,
                dense_ms=t_dense * 1e3, tree_gbps=kv_bytes / t_tree / 1e9, decode_gbps=kv_bytes / t_decode / 1e9,
                dense_gbps=kv_bytes / t_dense / 1e9, tree_over_decode=t_tree / t_decode, max_abs_err=err)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small sizes for a CPU smoke run")
    p.add_argument("--ctx", type=int, nargs="*", help="context lengths (default 512 2048 8192)")
    p.add_argument("--batch", type=int, nargs="*", help="batch sizes (default 1 8 32)")
    p.add_argument("--tree", type=int, nargs="*", help="tree sizes = queries per request (default 1 16 32 64)")
    p.add_argument("--heads", type=int, nargs=2, metavar=("HQ", "HKV"), help="query / KV heads (default 32 8)")
    p.add_argument("--head-dim", type=int, help="default 128")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default bfloat16 (GPU), float32 (CPU)")
    p.add_argument("--iters", type=int, help="timed iterations per measurement")
    p.add_argument("--device", help="default cuda if available else cpu")
    p.add_argument("--out", default="benchmarks/results/tree_attention.json")
    a = p.parse_args(argv)

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = a.tiny
    ctxs = a.ctx or ([64, 256] if tiny else [512, 2048, 8192])
    batches = a.batch or ([1, 4] if tiny else [1, 8, 32])
    trees = a.tree or ([1, 16, 64] if tiny else [1, 16, 32, 64])
    hq, hkv = a.heads or ((4, 2) if tiny else (32, 8))
    dh = a.head_dim or (64 if tiny else 128)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    iters = a.iters or (3 if tiny or device.type != "cuda" else 20)
    use_triton = device.type == "cuda" and HAS_TRITON
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bandwidth(name) if device.type == "cuda" else None

    print(f"device={name} tree_impl={'triton' if use_triton else 'torch reference'} dtype={dtype} "
          f"Hq={hq} Hkv={hkv} Dh={dh} block_size={a.block_size}" + (f" peak={peak / 1e12:.2f} TB/s" if peak else ""))
    header = (f"{'ctx':>6} {'batch':>5} {'tree':>4} {'KV MB':>8} {'tree ms':>9} {'decode ms':>9} {'dense ms':>9} "
              f"{'tree GB/s':>9} {'dec GB/s':>9} {'tree/dec':>8}" + (f" {'%peak':>6}" if peak else "") + f" {'err':>8}")
    print(header)
    rows = []
    for ctx in ctxs:
        for batch in batches:
            for q in trees:
                r = bench_one(ctx, batch, q, hq=hq, hkv=hkv, dh=dh, block_size=a.block_size, dtype=dtype,
                              device=device, iters=iters, use_triton=use_triton)
                if peak:
                    r["tree_frac_peak_bw"] = r["tree_gbps"] * 1e9 / peak
                rows.append(r)
                print(f"{ctx:>6} {batch:>5} {q:>4} {r['kv_bytes'] / 1e6:>8.2f} {r['tree_ms']:>9.3f} "
                      f"{r['decode_ms']:>9.3f} {r['dense_ms']:>9.3f} {r['tree_gbps']:>9.1f} {r['decode_gbps']:>9.1f} "
                      f"{r['tree_over_decode']:>8.2f}" + (f" {100 * r['tree_frac_peak_bw']:>5.1f}%" if peak else "")
                      + f" {r['max_abs_err']:>8.1e}", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        device=name, tree_impl="triton" if use_triton else "torch_reference", dtype=str(dtype).replace("torch.", ""),
        num_q_heads=hq, num_kv_heads=hkv, head_dim=dh, block_size=a.block_size, peak_bw_bytes_per_s=peak,
        torch=torch.__version__, results=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
