"""The chat recipe's pieces: prompt synthesis, batch generation, hidden-state cache, draft vocabulary, training on
cached states, and the recipe end to end at a tiny size (transformers generation; the vLLM path is in the demo test)."""

import json

import pytest
import torch

from medusa_plugin.hf import chat_prompts as C
from medusa_plugin.hf.draft_vocab import coverage, frequent_token_map, inverse_map
from medusa_plugin.hf.errors import TrainError
from medusa_plugin.hf.hidden_cache import HiddenStateCache, compute_hidden_states
from medusa_plugin.hf.state_trainer import draft_logits, head_accuracy_on_states, train_on_states

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def test_held_out_prompts_never_use_training_topics():
    lists = C.prompt_lists()
    assert not set(lists["topics"]) & set(lists["held_out_topics"])
    held = C.held_out_requests(20)
    assert len(set(held)) == 20
    assert all(any(t in r for t in lists["held_out_topics"]) for r in held)
    assert not any(t in r for r in held for t in lists["topics"] if len(t) > 6)
    assert len(C.templated_requests()) == len(lists["topics"]) * len(lists["tasks"]) >= 2000
    with pytest.raises(TrainError, match="at most"):
        C.held_out_requests(10 ** 6)


def test_clean_request_and_dedupe():
    assert C.clean_request('A curious person might ask: "How hot is lava inside a volcano?"') == \
        "How hot is lava inside a volcano?"
    assert C.clean_request("Volcano.") is None  # too short
    assert C.clean_request("How do bees make honey and why do they need so much of it") is None  # no sentence end
    assert C.dedupe(["How do bees fly?", "how do bees fly", "Why?"]) == ["How do bees fly?", "Why?"]


def test_draft_vocab_picks_most_frequent_and_always():
    seqs = [[5, 5, 5, 7, 7, 9], [7, 3]]
    tm = frequent_token_map(seqs, 20, 2, always=[19])
    assert tm.tolist() == [5, 7, 19]
    assert frequent_token_map(seqs, 20, 2).tolist() == [5, 7]
    assert coverage(frequent_token_map(seqs, 20, 2), seqs) == pytest.approx(6 / 8)
    inv = inverse_map(tm, 20)
    assert inv[7] == 1 and inv[3] == -1
    with pytest.raises(TrainError, match="outside"):
        frequent_token_map([[25]], 20, 2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from medusa_plugin.testing.tiny import build_tiny_model, load_tiny_model

    d = build_tiny_model(tmp_path_factory.mktemp("chat"), hidden_size=64, num_attention_heads=1,
                         num_key_value_heads=1, head_dim=64, intermediate_size=128, tokenizer_vocab_size=300)
    model, tok = load_tiny_model(d)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(d)
    return d, model, tok


def test_hidden_cache_keeps_answer_rows(tiny):
    from medusa_plugin.hf.base_model import last_hidden_state

    _, model, _ = tiny
    prompts, answers = [[4, 5, 6], [7, 8]], [[9, 10, 11, 12], [13, 14, 15]]
    cache = compute_hidden_states(model, prompts, answers, store_dtype=torch.float32, max_batch_tokens=8,
                                  progress=False)
    assert len(cache) == 7 and cache.next_token.tolist() == [9, 10, 11, 12, 13, 14, 15]
    assert cache.segment_end.tolist() == [4] * 4 + [7] * 3
    with torch.no_grad():
        full = last_hidden_state(model, torch.tensor([prompts[1] + answers[1]]))[0]
    torch.testing.assert_close(cache.hidden[4:], full[1:4], rtol=1e-4, atol=1e-4)  # hidden before each answer token
    assert cache.valid_rows(1).tolist() == [True, True, False, False, True, False, False]


def periodic_cache(h=32, vocab=100, seed=0):
    """Answers that cycle through 9 tokens; the hidden state of a row identifies its next token (a stand-in for a
    model whose state knows what comes next)."""
    g = torch.Generator().manual_seed(seed)
    cycle = [5, 17, 9, 33, 41, 2, 60, 70, 7]
    answers = [[cycle[(i + s) % 9] for i in range(30)] for s in range(9)]
    emb = torch.randn(vocab, h, generator=g)
    lengths = torch.tensor([len(a) for a in answers])
    return (HiddenStateCache(torch.cat([emb[torch.tensor(a)] for a in answers]),
                             torch.cat([torch.tensor(a) for a in answers]),
                             torch.repeat_interleave(lengths.cumsum(0), lengths)), answers, emb)


@pytest.mark.parametrize("kl_weight", [0.0, 0.5])
def test_train_on_states_learns_offsets_and_round_trips(tmp_path, kl_weight):
    from medusa_plugin.core.heads import MedusaHeads

    cache, answers, emb = periodic_cache()
    lm = 3 * emb  # a target model whose distribution at a row peaks at that row's next token (soft targets agree)
    tm = frequent_token_map(answers, 100, 12)
    fresh = head_accuracy_on_states(train_on_states(cache, lm, tm, num_heads=3, steps=1, lr=1e-9,
                                                    progress=False).heads, cache, topk=1)
    res = train_on_states(cache, lm, tm, num_heads=3, steps=120, batch_size=64, lr=1e-2, kl_weight=kl_weight,
                          progress=False)
    acc = head_accuracy_on_states(res.heads, cache, topk=2)
    assert acc[:, 0].tolist() == [1.0, 1.0, 1.0] and fresh[:, 0].max() < 0.5
    res.heads.save_pretrained(tmp_path)
    loaded = MedusaHeads.from_pretrained(tmp_path)
    assert torch.equal(loaded.token_map, tm)
    drafted = tm[draft_logits(loaded, cache.hidden[:10], 0).argmax(-1)]  # draft index -> full id
    assert torch.equal(drafted, cache.next_token[1:11])  # head 0: the token after the next one


def test_transformers_generation_is_greedy(tiny):
    from medusa_plugin.hf.batch_generate import generate
    from medusa_plugin.hf.distill import self_distill

    d, model, _ = tiny
    prompts = [[4, 5, 6], [7, 8, 9, 10, 11]]
    gen = generate(d, prompts, 6, engine="transformers", dtype="float32", progress=False)
    assert [p + c for p, c in zip(prompts, gen.continuations)] == self_distill(model, prompts, 6)
    assert gen.engine == "transformers" and gen.num_tokens == sum(map(len, gen.continuations))
    with pytest.raises(TrainError, match="engine"):
        generate(d, prompts, 6, engine="nope")


def test_chat_recipe_end_to_end_tiny(tiny, tmp_path, capsys):
    from medusa_plugin.cli import main
    from medusa_plugin.core.heads import MedusaHeads
    from medusa_plugin.core.tree import MedusaTree

    d, _, _ = tiny
    out = tmp_path / "heads"
    assert main(["train", "--recipe", "chat", "--model", str(d), "--out", str(out), "--num-prompts", "12",
                 "--eval-prompts", "4", "--answer-tokens", "12", "--vocab-size", "64", "--steps", "5",
                 "--num-heads", "2", "--tree-budget", "4", "--gen-engine", "transformers", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "held-out top-1 per head" in text
    heads = MedusaHeads.from_pretrained(out)
    assert heads.num_heads == 2 and heads.token_map.numel() <= 65 and heads.dtype == torch.bfloat16
    rep = json.loads((out / "recipe.json").read_text())
    assert rep["data"]["train_prompts"] == 12 and rep["data"]["eval_prompts"] == 4
    assert len(rep["head_top1"]) == 2 and rep["timings_s"]["total"] > 0
    tree = MedusaTree.from_choices(json.loads((out / "tree.json").read_text()))
    assert 1 <= tree.num_nodes <= 4 and tree.max_depth <= 2
    # what dynamic trees start from; the acceptance model learnt on requests the heads never trained on
    from medusa_plugin.core.acceptance_model import NodeAcceptanceModel

    model = NodeAcceptanceModel.load(out / "acceptance_model.safetensors", 2)
    assert model.uses_successors and rep["data"]["dynamic_priors"]["acceptance_model_prompts"] == 160
    assert (out / "successors.safetensors").is_file() and (out / "calibration.json").is_file()
    train_requests = [json.loads(line)["request"] for line in (out / "work" / "train.jsonl").read_text().splitlines()]
    eval_requests = [json.loads(line)["request"] for line in (out / "work" / "eval.jsonl").read_text().splitlines()]
    assert not set(train_requests) & set(eval_requests)
    # bad input: one line naming the problem
    assert main(["train", "--recipe", "chat", "--model", str(d), "--out", str(out), "--data", "x.jsonl"]) == 1
    assert "drop --data" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["frozen", "shared", "per-head"])
def test_projection_modes_train_what_they_say(mode):
    from medusa_plugin.hf.state_trainer import new_truncated_heads

    cache, answers, emb = periodic_cache()
    tm = frequent_token_map(answers, 100, 12)
    res = train_on_states(cache, 3 * emb, tm, num_heads=3, steps=5, batch_size=16, lr=1e-2,
                          train_projection=mode, progress=False)
    heads = res.heads
    moved = not torch.equal(heads.lm_heads[0].weight, (3 * emb).float()[tm])
    assert moved == (mode != "frozen")  # only the frozen projection keeps the target's rows
    assert heads.shared_lm_head == (mode != "per-head")
    fresh = new_truncated_heads(3 * emb, tm, num_heads=3, train_projection=True)  # bool: per-head (Medusa-1)
    assert not fresh.shared_lm_head
    with pytest.raises(TrainError, match="train_projection must be one of frozen, shared, per-head"):
        new_truncated_heads(3 * emb, tm, num_heads=3, train_projection="all")


def test_hidden_cache_reuses_the_rows_of_chats_it_has_and_never_stale_ones(tiny, tmp_path, monkeypatch):
    from medusa_plugin.hf import hidden_cache as hc

    _, model, _ = tiny
    computed = []
    real = hc.compute_hidden_states
    monkeypatch.setattr(hc, "compute_hidden_states",
                        lambda m, p, a, **kw: computed.append(list(p)) or real(m, p, a, **kw))
    prompts, answers = [[4, 5, 6], [7, 8], [9, 10, 11, 12]], [[13, 14], [15, 16, 17], [18, 19]]
    path = tmp_path / "h.safetensors"
    hc.load_or_compute(path, model, prompts[:2], answers[:2], store_dtype=torch.float32, progress=False)
    assert computed == [prompts[:2]]
    # a third chat: only it is computed, the result equals a fresh computation of all three, in the asked order
    got, _ = hc.load_or_compute(path, model, prompts[::-1], answers[::-1], store_dtype=torch.float32, progress=False)
    assert computed[1:] == [[prompts[2]]]
    want = real(model, prompts[::-1], answers[::-1], store_dtype=torch.float32, progress=False)
    torch.testing.assert_close(got.hidden, want.hidden, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.next_token, want.next_token) and torch.equal(got.segment_end, want.segment_end)
    assert hc.load_or_compute(path, model, prompts[::-1], answers[::-1], progress=False)[1] == 0.0  # all cached
    # same prompt, another answer: another chat, recomputed (a cache never serves rows of other tokens)
    hc.load_or_compute(path, model, [prompts[0]], [[20, 21]], store_dtype=torch.float32, progress=False)
    assert computed[-1] == [prompts[0]]


def test_distillation_generates_only_requests_it_has_not_answered(tiny, tmp_path, monkeypatch):
    from medusa_plugin.hf import batch_generate
    from medusa_plugin.hf.chat_recipe import distilled_chats

    d, _, tok = tiny
    asked = []
    real = batch_generate.generate
    monkeypatch.setattr(batch_generate, "generate", lambda m, p, n, **kw: asked.append(len(p)) or real(m, p, n, **kw))
    kw = dict(answer_tokens=6, engine="transformers", progress=False)
    first, _ = distilled_chats(d, tok, {"train": ["Why is the sky blue?", "Name a fruit."]}, tmp_path, **kw)
    more, _ = distilled_chats(d, tok, {"train": ["Name a fruit.", "Why is the sky blue?", "Count to three."],
                                       "eval": ["Name a fruit."]}, tmp_path, **kw)
    assert asked == [2, 1]  # only "Count to three." was new
    assert more["train"][1] == first["train"][0] and more["eval"][0]["answer_ids"] == first["train"][1]["answer_ids"]
    distilled_chats(d, tok, {"train": ["Name a fruit."]}, tmp_path, **{**kw, "answer_tokens": 8})
    assert asked[-1] == 1  # another length limit: generated again
