"""Heads that read the root token (``MedusaHeads(root_input=True)``): the computation, the checkpoint round trip and
its errors, training on cached states, and the reference decoder staying identical to greedy decoding."""

import json

import pytest
import torch

from medusa_plugin.core.heads import MedusaHeads, MedusaHeadsError

H, V = 32, 90


def _heads(root_input=True, token_map=None, shared=True, seed=0):
    torch.manual_seed(seed)
    heads = MedusaHeads(H, 3, 1, V, shared_lm_head=shared, token_map=token_map, root_input=root_input)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return heads.eval()


def test_root_input_is_added_before_the_resblocks():
    heads = _heads()
    x, e = torch.randn(4, H), torch.randn(4, H)
    want = []
    inp = x + e @ heads.root_proj.weight.T  # h + root_proj(embed(root)), brute force
    for k in range(3):
        blk = heads.blocks[k][0].linear
        y = inp + torch.nn.functional.silu(inp @ blk.weight.T + blk.bias)
        want.append(y @ heads.lm_heads[k].weight.T)
    torch.testing.assert_close(heads(x, root_embeds=e), torch.stack(want, 1))
    plain = MedusaHeads(H, 3, 1, V, shared_lm_head=True)  # a zero root_proj: plain Medusa heads
    plain.load_state_dict({k: v for k, v in heads.state_dict().items() if not k.startswith("root_proj")})
    with torch.no_grad():
        heads.root_proj.weight.zero_()
    assert torch.equal(heads(x, root_embeds=e), plain(x))


@pytest.mark.parametrize("truncated", [False, True])
def test_draft_topk_equals_the_reference_path(truncated):
    tm = torch.randperm(V)[:40] if truncated else None
    heads = _heads(token_map=tm, shared=not truncated)
    x, e = torch.randn(5, H), torch.randn(5, H)
    ref = heads(x, root_embeds=e).topk(4, -1).indices
    assert torch.equal(heads.draft_topk(x, 4, root_embeds=e), ref)
    assert torch.equal(heads.draft_topk(x, 4, 2, root_embeds=e), ref[:, :2])
    assert not torch.equal(heads.draft_topk(x, 4, root_embeds=torch.randn(5, H)), ref)  # the root matters


def test_missing_or_misshaped_root_embeds_are_refused():
    heads = _heads()
    with pytest.raises(MedusaHeadsError, match="pass root_embeds"):
        heads(torch.randn(2, H))
    with pytest.raises(MedusaHeadsError, match="pass root_embeds"):
        heads.draft_topk(torch.randn(2, H), 3)
    with pytest.raises(MedusaHeadsError, match="one root-token embedding per hidden state"):
        heads(torch.randn(2, H), root_embeds=torch.randn(3, H))
    _heads(root_input=False)(torch.randn(2, H), root_embeds=torch.randn(7))  # other heads ignore it


def test_checkpoint_round_trip_and_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    heads = _heads(token_map=torch.arange(50, 90))
    heads.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["root_input"] is True
    loaded = MedusaHeads.from_pretrained(tmp_path, base_vocab_size=V)
    assert loaded.root_input and "root token input" in repr(loaded)
    x, e = torch.randn(3, H), torch.randn(3, H)
    assert torch.equal(loaded(x, root_embeds=e), heads(x, root_embeds=e))
    assert MedusaHeads.from_pretrained(tmp_path, dtype="bfloat16").root_proj.weight.dtype == torch.bfloat16

    tensors = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "root_proj.weight"}, tmp_path / "model.safetensors")
    with pytest.raises(MedusaHeadsError, match="weights lack 'root_proj.weight'"):
        MedusaHeads.from_pretrained(tmp_path)
    save_file({**tensors, "root_proj.weight": torch.zeros(H, H + 1)}, tmp_path / "model.safetensors")
    with pytest.raises(MedusaHeadsError, match=r"'root_proj.weight' has shape \(32, 33\), expected \(32, 32\)"):
        MedusaHeads.from_pretrained(tmp_path)


def test_vllm_builtin_medusa_format_refuses_root_input_heads(tmp_path):
    from medusa_plugin.vllm_ext.convert import to_vllm_medusa

    _heads().save_pretrained(tmp_path / "heads")
    with pytest.raises(MedusaHeadsError, match="vLLM's built-in Medusa cannot feed them"):
        to_vllm_medusa(tmp_path / "heads", tmp_path / "out")


def test_training_on_states_learns_what_only_the_root_tells():
    """Every hidden state is the same, and the token after the root is a function of the root: plain heads cannot
    do better than the most frequent token, root-input heads learn it."""
    from medusa_plugin.hf.draft_vocab import frequent_token_map
    from medusa_plugin.hf.hidden_cache import HiddenStateCache
    from medusa_plugin.hf.state_trainer import head_accuracy_on_states, train_on_states

    g = torch.Generator().manual_seed(0)
    follow = {t: (t * 7 + 3) % 12 + 20 for t in range(20, 32)}  # root -> the token after it
    seq = [20]
    for _ in range(400):
        noise = int(torch.randint(20, 32, (1,), generator=g))
        seq.append(follow[seq[-1]] if torch.rand(1, generator=g) < 0.9 else noise)
    n = len(seq)
    cache = HiddenStateCache(torch.ones(n, H), torch.tensor(seq), torch.full((n,), n))
    emb = torch.randn(V, H, generator=g)
    tm = frequent_token_map([seq], V, 12)
    kw = dict(num_heads=1, steps=200, batch_size=64, lr=1e-2, kl_weight=0.0, progress=False)
    plain = train_on_states(cache, emb, tm, **kw).heads
    root = train_on_states(cache, emb, tm, root_input=True, embed_weight=emb, **kw).heads
    acc_plain = head_accuracy_on_states(plain, cache, topk=1)[0, 0]
    acc_root = head_accuracy_on_states(root, cache, topk=1, embed_weight=emb)[0, 0]
    assert acc_plain < 0.3 and acc_root > 0.8, (acc_plain, acc_root)
    from medusa_plugin.hf.errors import TrainError

    with pytest.raises(TrainError, match="embed_weight"):
        train_on_states(cache, emb, tm, root_input=True, **kw)


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "dynamic"])
def test_reference_decoder_with_root_input_heads_is_identical_to_greedy(tiny_medusa, tree):
    """The tiny model's trained heads plus a small random root_proj (heads still right often, so paths are long)."""
    from medusa_plugin.core.dynamic_tree import DynamicTreeSpec
    from medusa_plugin.hf.generate import baseline_generate, medusa_generate
    from medusa_plugin.testing import tiny_prompts

    model, tok, trained = tiny_medusa("llama")
    heads = MedusaHeads(trained.hidden_size, trained.num_heads, trained.num_layers, trained.vocab_size,
                        root_input=True).eval()
    heads.load_state_dict({**trained.state_dict(), "root_proj.weight": 0.02 * torch.randn(heads.hidden_size,
                                                                                           heads.hidden_size)})
    prompts = tiny_prompts(tok, 3)
    want = baseline_generate(model, prompts, 24)
    spec = DynamicTreeSpec(budget=8, ngram_branches=1) if tree == "dynamic" else tree
    out = medusa_generate(model, heads, spec, prompts, max_new_tokens=24)
    assert out.sequences == want
    assert out.stats.mean_accepted_tokens_per_step > 1.5, out.stats  # compaction exercised


def test_bench_e2e_refuses_builtin_medusa_for_root_input_heads_before_any_engine(tmp_path):
    from medusa_plugin.bench import e2e

    _heads().save_pretrained(tmp_path / "heads")
    with pytest.raises(MedusaHeadsError, match="--builtin-medusa.*--no-root-input"):
        e2e(model_dir=str(tmp_path / "no-model-needed"), heads_dir=str(tmp_path / "heads"), engine="reference",
            builtin_medusa=True)
