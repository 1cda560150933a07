import random

import pytest
import torch

from medusa_plugin.core.kv_compaction import KVCompactionError, compact_paged_kv, compaction_slots


def random_path(rng, n1, depth, accept_len):
    """A valid accepted path root=0 < p_1 < ... with p_j >= j, padded with -1 to depth+1."""
    nodes = [0]
    for j in range(1, accept_len + 1):
        lo = max(nodes[-1] + 1, j)
        hi = n1 - (accept_len - j) - 1
        nodes.append(rng.randint(lo, hi))
    return nodes + [-1] * (depth - accept_len)


def setup_batch(accept_lens, ctx_lens, *, n1, depth, block_size, heads=2, dim=4, layout="vllm", seed=0):
    """Dense per-request caches + the same contents in a paged cache with shuffled blocks."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    bsz = len(ctx_lens)
    seq_lens = [c + n1 for c in ctx_lens]
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in need:
        tables.append(perm[used:used + n])
        used += n
    dense = [torch.randn(heads, s, dim, generator=g) for s in seq_lens]  # upstream layout [H, S, D]
    if layout == "vllm":       # [num_blocks, block_size, H, D]
        cache = torch.zeros(num_blocks, block_size, heads, dim)
        offset_dim = 1
    else:                      # vLLM CPU: [num_blocks, H, block_size, D]
        cache = torch.zeros(num_blocks, heads, block_size, dim)
        offset_dim = 2

    def slot(b, p):
        return tables[b][p // block_size] * block_size + p % block_size

    def read(b, p):
        blk, off = divmod(slot(b, p), block_size)
        return cache[blk, off] if offset_dim == 1 else cache[blk, :, off]

    for b in range(bsz):
        for p in range(seq_lens[b]):
            read(b, p).copy_(dense[b][:, p])
    paths = torch.tensor([random_path(rng, n1, depth, a) for a in accept_lens])
    tree_slots = torch.tensor([[slot(b, ctx_lens[b] + i) for i in range(n1)] for b in range(bsz)])
    return dict(cache=cache, offset_dim=offset_dim, dense=dense, paths=paths, tree_slots=tree_slots, read=read,
                seq_lens=seq_lens)


@pytest.mark.parametrize("layout", ["vllm", "vllm_cpu"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_matches_upstream_dense_compaction(layout, block_size):
    n1, depth = 26, 5
    accept_lens = [0, 5, 2, 3, 1]
    ctx_lens = [7, 0, 33, 16, 3]
    s = setup_batch(accept_lens, ctx_lens, n1=n1, depth=depth, block_size=block_size, layout=layout,
                    seed=block_size)
    src, dst = compaction_slots(s["paths"], torch.tensor(accept_lens), s["tree_slots"])
    assert src.dtype == dst.dtype == torch.int64
    compact_paged_kv(s["cache"], src, dst, block_size=block_size, offset_dim=s["offset_dim"])
    for b, (ctx, L) in enumerate(zip(ctx_lens, accept_lens)):
        want = s["dense"][b].clone()
        select = s["paths"][b, :L + 1] + ctx  # upstream: kv[:, prev:prev+n] = kv[:, select_indices]
        want[:, ctx:ctx + L + 1] = want[:, select]
        got = torch.stack([s["read"](b, p) for p in range(s["seq_lens"][b])], dim=1)
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_slots_skip_identity_moves_and_padding():
    slots = torch.arange(100, 110).view(1, 10).repeat(3, 1) + torch.tensor([[0], [50], [200]])
    paths = torch.tensor([[0, 1, 2, -1], [0, 1, 4, 9], [0, -1, -1, -1]])
    src, dst = compaction_slots(paths, torch.tensor([2, 3, 0]), slots)
    # request 0: identity path -> nothing; request 1: node 1 stays, 4->2, 9->3; request 2: nothing accepted.
    assert src.tolist() == [154, 159] and dst.tolist() == [152, 153]


def test_stacked_kv_cache_with_block_dim_1():
    cache = torch.arange(2 * 3 * 4 * 2, dtype=torch.float32).view(2, 3, 4, 2)  # [2(K/V), blocks, block_size, D]
    before = cache.clone()
    # order chosen so that a sequential copy would read slot 6 after overwriting it
    compact_paged_kv(cache, torch.tensor([11, 6]), torch.tensor([6, 5]), block_size=4, block_dim=1, offset_dim=2)
    torch.testing.assert_close(cache[:, 1, 1], before[:, 1, 2])  # slot 5 <- 6
    torch.testing.assert_close(cache[:, 1, 2], before[:, 2, 3])  # slot 6 <- 11
    assert torch.equal(cache[:, 0], before[:, 0])


def test_errors():
    cache = torch.zeros(4, 16, 2, 8)
    with pytest.raises(KVCompactionError, match="block_size"):
        compact_paged_kv(cache, torch.tensor([1]), torch.tensor([0]), block_size=8)
    with pytest.raises(KVCompactionError, match="slots must lie"):
        compact_paged_kv(cache, torch.tensor([64]), torch.tensor([0]), block_size=16)
    with pytest.raises(KVCompactionError, match="equal length"):
        compact_paged_kv(cache, torch.tensor([1, 2]), torch.tensor([0]), block_size=16)
    with pytest.raises(KVCompactionError, match="p_j"):
        compaction_slots(torch.tensor([[0, 3, 1]]), torch.tensor([2]), torch.arange(5).view(1, 5))


def test_compact_many_equals_one_call_per_cache():
    from medusa_plugin.core.kv_compaction import compact_paged_kv_many

    g = torch.Generator().manual_seed(3)
    caches = [torch.randn(6, 2, 4, 3, generator=g) for _ in range(3)]  # vLLM CPU layout [blocks, H, block_size, D]
    expected = [c.clone() for c in caches]
    src = torch.tensor([5, 9, 14, 22])
    dst = torch.tensor([4, 6, 13, 20])
    for c in expected:
        compact_paged_kv(c, src, dst, block_size=4, block_dim=0, offset_dim=2)
    compact_paged_kv_many(caches, src, dst, block_size=4, block_dim=0, offset_dim=2)
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)
    with pytest.raises(KVCompactionError, match="block_size"):
        compact_paged_kv_many(caches, src, dst, block_size=2, block_dim=0, offset_dim=2)
