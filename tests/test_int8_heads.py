"""Int8 weight-only copies of the heads (core.int8_heads) and the proposer's choice of them (int8_drafting)."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from medusa_plugin.core.config import MedusaConfig, MedusaConfigError
from medusa_plugin.core.heads import MedusaHeads, MedusaHeadsError
from medusa_plugin.core.int8_heads import Int8Linear, int8_heads, int8_matmul_available

from conftest import int8_kernel_runs  # noqa: E402

pytestmark = pytest.mark.skipif(not (int8_kernel_runs() and int8_matmul_available(torch.bfloat16)),
                                reason="no working int8 weight-only matmul on this machine")


def _heads(hidden=64, shared=True, root=True, dtype=torch.bfloat16, vocab=300, token_map=True):
    torch.manual_seed(0)
    tm = torch.randperm(vocab)[: vocab // 2].sort().values if token_map else None
    h = MedusaHeads(hidden, 3, 1, vocab, shared_lm_head=shared, token_map=tm, root_input=root, dtype=dtype).eval()
    with torch.no_grad():
        for p in h.parameters():
            p.normal_(0, 0.2)
    return h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_the_matmul_with_rowwise_dequantized_weights(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 37, bias=True).to(dtype)
    q = Int8Linear(lin)
    assert q.qweight.dtype == torch.int8 and q.scales.dtype == dtype and not hasattr(q, "weight")
    deq = q.qweight.float() * q.scales.float()[:, None]
    # rounding to the nearest of 255 levels per row: at most half a step from the float weight (a little more for
    # a row's largest weight where a half-precision scale rounded down and 127 clips it)
    assert ((deq - lin.weight.float()).abs() <= q.scales.float()[:, None] * 0.51 + 1e-6).all()
    x = torch.randn(2, 5, 64).to(dtype)
    want = F.linear(x.float(), deq, lin.bias.float())
    got = q(x)
    assert got.shape == (2, 5, 37) and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 5e-2 * want.abs().max().item()
    assert (got.float() - want).abs().max().item() <= tol


def test_int8_heads_keep_the_interface_sharing_and_token_map_and_mostly_the_drafts():
    h = _heads()
    before = {k: v.clone() for k, v in h.state_dict().items()}
    q = int8_heads(h)
    assert q is not h and isinstance(h.lm_heads[0], torch.nn.Linear)  # the float heads are untouched
    assert all(torch.equal(v, before[k]) for k, v in h.state_dict().items())
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())  # no float weights kept in the copy
    assert all(m is q.lm_heads[0] for m in q.lm_heads) and isinstance(q.lm_heads[0], Int8Linear)
    assert isinstance(q.root_proj, Int8Linear) and isinstance(q.blocks[0][0].linear, Int8Linear)
    assert torch.equal(q.token_map, h.token_map) and q.dtype == torch.bfloat16
    x = torch.randn(256, 64).to(torch.bfloat16)
    e = torch.randn(256, 64).to(torch.bfloat16)
    want = h.draft_topk(x, 3, root_embeds=e)
    got = q.draft_topk(x, 3, root_embeds=e)
    assert got.shape == want.shape == (256, 3, 3)
    assert set(got.unique().tolist()) <= set(h.token_map.tolist())  # vocabulary ids, not projection rows
    agree = (got[..., 0] == want[..., 0]).float().mean().item()
    assert agree >= 0.9, agree  # int8 rounding moves near-ties only
    assert q(x, root_embeds=e).shape == h(x, root_embeds=e).shape == (256, 3, 300)


def test_float32_heads_draft_through_a_bf16_int8_copy():
    h = _heads(dtype=torch.float32)
    q = int8_heads(h, torch.bfloat16)
    assert q.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in q.parameters())
    x = torch.randn(128, 64)  # float32 hidden states, as a float32 engine passes them
    e = torch.randn(128, 64)
    got, want = q.draft_topk(x, 3, root_embeds=e), h.draft_topk(x, 3, root_embeds=e)
    assert (got[..., 0] == want[..., 0]).float().mean().item() >= 0.9
    probs, ids = q.draft_topk_probs(x, 3, root_embeds=e)
    assert probs.dtype == torch.float32 and torch.equal(ids, got)


def test_int8_heads_with_one_projection_per_head():
    h = _heads(shared=False, root=False, token_map=False)
    q = int8_heads(h)
    assert len({id(m) for m in q.lm_heads}) == 3
    x = torch.randn(64, 64).to(torch.bfloat16)
    assert (q.draft_topk(x, 1)[..., 0] == h.draft_topk(x, 1)[..., 0]).float().mean().item() >= 0.9


def test_int8_heads_refuse_what_they_cannot_run():
    v2 = MedusaHeads(64, 2, 1, 300, own_lm_head=False)
    with pytest.raises(MedusaHeadsError, match="v2 heads.*int8_drafting: false"):
        int8_heads(v2)
    with pytest.raises(MedusaHeadsError, match="multiple of 32.*have 48.*int8_drafting: false"):
        int8_heads(_heads(hidden=48))


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_int8_drafting_setting_is_auto_true_or_false(value):
    assert MedusaConfig(heads="h", int8_drafting=True).int8_drafting is True
    with pytest.raises(MedusaConfigError, match="'int8_drafting' must be auto, true or false"):
        MedusaConfig(heads="h", int8_drafting=value)


def _proposer(heads_dir, dtype, mode, monkeypatch, native=True):
    from medusa_plugin.vllm_ext.proposer import MedusaTreeProposer

    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: native, raising=False)
    h = MedusaHeads.from_pretrained(heads_dir)
    cfg = SimpleNamespace(
        additional_config={"medusa": {"heads": str(heads_dir), "tree": "chain:3", "int8_drafting": mode}},
        speculative_config=SimpleNamespace(num_speculative_tokens=3),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1),
        model_config=SimpleNamespace(get_vocab_size=lambda: h.vocab_size, get_hidden_size=lambda: h.hidden_size))
    p = MedusaTreeProposer(cfg)
    target = torch.nn.Linear(2, 2).to(dtype)  # the proposer reads the target's device and dtype only
    p.load_model(target)
    return p


@pytest.mark.parametrize("dtype,mode,native,int8", [
    (torch.bfloat16, "auto", True, torch.bfloat16), (torch.bfloat16, "auto", False, None),
    (torch.float32, "auto", True, torch.bfloat16), (torch.float32, "auto", False, None),
    (torch.float32, True, False, torch.float32), (torch.float32, True, True, torch.bfloat16),
    (torch.bfloat16, False, True, None)])
def test_proposer_drafts_with_the_int8_copy_up_to_its_row_limit(tmp_path, monkeypatch, dtype, mode, native, int8):
    """``int8``: the dtype the copy runs in (bf16 wherever the CPU multiplies bf16 natively), None: no copy."""
    _heads(root=False).save_pretrained(tmp_path)
    p = _proposer(tmp_path, dtype, mode, monkeypatch, native)
    small, large = p.heads_for(p.INT8_MAX_ROWS), p.heads_for(p.INT8_MAX_ROWS + 1)
    assert isinstance(small.lm_heads[0], Int8Linear) is (int8 is not None)
    assert int8 is None or small.dtype == int8
    assert isinstance(large.lm_heads[0], torch.nn.Linear)  # float heads (or a float copy) above the limit
    # float32 heads on a CPU with native bf16 draft through a bf16 copy above it (dtype: auto)
    assert large.dtype == (torch.bfloat16 if native else torch.float32 if dtype == torch.float32 else large.dtype)
    hidden = torch.randn(2, 64).to(dtype)
    assert p.draft_topk(hidden, 3).shape == (2, 3, p.tree.topk)


def test_int8_drafting_true_names_the_reason_it_cannot_run(tmp_path, monkeypatch):
    from medusa_plugin.vllm_ext.proposer import MedusaProposerError

    _heads(hidden=48, root=False).save_pretrained(tmp_path)
    with pytest.raises(MedusaProposerError, match="multiple of 32"):
        _proposer(tmp_path, torch.bfloat16, True, monkeypatch)
    assert _proposer(tmp_path, torch.bfloat16, "auto", monkeypatch)._heads_int8 is None  # auto: float heads
