"""Medusa head training: hidden-state choice, self-distillation, the t+k+2 target offset, resume, the CLI."""

import json
import math

import pytest
import torch

from medusa_plugin.hf import train as T

VOCAB = 64
PERIOD = [5, 17, 9, 33, 41, 2, 60]  # distinct tokens: token t determines every later token of the cycle


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=32, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def periodic_sequences(n=7, length=60):
    cycle = PERIOD * (length // len(PERIOD) + 2)
    return [cycle[i:i + length] for i in range(n)]


def test_last_hidden_state_is_lm_head_input(model):
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = T.last_hidden_state(model, ids)
        logits = model(ids).logits
    assert h.shape == (2, 9, 64)
    torch.testing.assert_close(model.lm_head(h), logits)


def greedy_reference(model, prompt, max_new_tokens, eos=2):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tok = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(tok)
            if tok == eos:
                break
    return ids


def test_self_distill_matches_token_by_token_greedy(model):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (4, 7, 7, 2, 5)]
    out = T.self_distill(model, prompts, max_new_tokens=6, batch_size=3)
    assert out == [greedy_reference(model, p, 6) for p in prompts]


def test_self_distill_stops_at_eos_and_rejects_empty_prompt(model):
    free = T.self_distill(model, [[5, 6, 7]], max_new_tokens=6)[0]
    # Declare a later greedy token (its first occurrence) the EOS: the continuation must end right after it.
    j = next((j for j in range(4, len(free)) if free[j] not in free[3:j]), 3)
    eos = free[j]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        out = T.self_distill(model, [[5, 6, 7]], max_new_tokens=6)
    finally:
        model.generation_config.eos_token_id = old
    assert out == [free[:j + 1]]
    with pytest.raises(T.TrainError, match="empty"):
        T.self_distill(model, [[1, 2], []], max_new_tokens=2)


def test_head_targets_offset():
    ids = torch.arange(10)[None].repeat(2, 1)
    tg, valid = T.head_targets(ids, torch.tensor([10, 6]), k=1)
    assert tg[0].tolist() == list(range(3, 10))  # hidden t -> token t+3 for head 1
    assert valid[0].all() and valid[1].tolist() == [True] * 3 + [False] * 4


def head_top1(model, heads, seq):
    """Top-1 of head k at every t against token t+k+2, computed independently of the trainer."""
    ids = torch.tensor([seq])
    with torch.no_grad():
        logits = heads(T.last_hidden_state(model, ids), lm_head=model.lm_head)  # [1, T, K, V]
    n = ids.shape[1]
    return [(logits[0, :n - k - 2, k].argmax(-1) == ids[0, k + 2:]).float().mean().item()
            for k in range(heads.num_heads)]


@pytest.mark.parametrize("own_lm_head", [True, False])
def test_heads_learn_periodic_sequence(model, own_lm_head):
    seqs = periodic_sequences()
    heads = T.train_heads(model, seqs, num_heads=3, steps=40, lr=1e-2, batch_size=8, seq_len=24, device="cpu",
                          progress=False, own_lm_head=own_lm_head)
    assert heads.own_lm_head == own_lm_head and heads.num_heads == 3
    test_seq = (PERIOD * 8)[3:40]
    fresh = T.new_heads(model, num_heads=3, own_lm_head=own_lm_head)
    assert max(head_top1(model, fresh, test_seq)) < 0.5  # untrained heads = the base lm_head: wrong offset
    assert head_top1(model, heads, test_seq) == [1.0, 1.0, 1.0]
    assert all(p.requires_grad is False for p in model.parameters())


def test_resume_equals_uninterrupted(model):
    seqs = periodic_sequences(3, 30)
    kw = dict(steps=6, lr=5e-3, batch_size=2, seq_len=12, device="cpu")

    def trainer():
        return T.HeadTrainer(model, seqs, T.new_heads(model, num_heads=2), **kw)

    full = trainer()
    full.run(progress=False)
    first = trainer()
    first.run(until=3, progress=False)
    state = first.state_dict()
    second = trainer()
    second.load_state_dict(state)
    second.run(progress=False)
    assert second.step == 6
    for (name, a), b in zip(full.heads.state_dict().items(), second.heads.state_dict().values()):
        assert torch.equal(a, b), name
    bad = T.HeadTrainer(model, seqs, T.new_heads(model, num_heads=2), **{**kw, "lr": 1e-3})
    with pytest.raises(T.TrainError, match="lr"):
        bad.load_state_dict(state)


def test_window_sampler_is_deterministic_per_step():
    s = T.WindowSampler([list(range(50)), [7, 8, 9, 10]], seq_len=8, batch_size=4, pad_id=0, seed=1)
    ids, lengths = s.batch(5)
    again, _ = T.WindowSampler([list(range(50)), [7, 8, 9, 10]], seq_len=8, batch_size=4, pad_id=0, seed=1).batch(5)
    assert torch.equal(ids, again) and ids.shape[1] <= 8
    for row, n in zip(ids.tolist(), lengths.tolist()):  # each window is a contiguous slice of a sequence
        assert row[:n] in ([7, 8, 9, 10],) or row[:n] == list(range(row[0], row[0] + n))
    with pytest.raises(T.TrainError, match="at least 3 tokens"):
        T.WindowSampler([[1, 2]], seq_len=8, batch_size=1, pad_id=0)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from medusa_plugin.testing.tiny import build_tiny_model

    texts = ["def add(a, b):\n    return a + b\n" * 4, "the quick brown fox jumps over the lazy dog. " * 6]
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=64, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=32, intermediate_size=128, tokenizer_vocab_size=96,
                            texts=texts)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"text": "def add(a, b):\n    return a + b\n" * 3},
            {"prompt": "the quick brown", "response": " fox jumps over the lazy dog."},
            {"conversations": [{"from": "human", "value": "add a and b"}, {"from": "gpt", "value": "return a + b"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli(*argv):
    from medusa_plugin.cli import main

    return main(["train", *map(str, argv)])


def saved_weights(d):
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def test_cli_train_checkpoints_and_resume_exactly(model_dir, data_file, tmp_path, capsys):
    from medusa_plugin.core.heads import MedusaHeads

    common = ["--model", model_dir, "--data", data_file, "--steps", 6, "--batch-size", 2, "--seq-len", 16,
              "--num-heads", 2, "--device", "cpu", "--no-progress", "--save-every", 2]
    assert cli(*common, "--out", tmp_path / "a") == 0
    assert "top-1 per head" in capsys.readouterr().out
    heads = MedusaHeads.from_pretrained(tmp_path / "a")
    assert heads.num_heads == 2 and heads.own_lm_head and heads.base_model_name_or_path == str(model_dir)
    assert torch.load(tmp_path / "a" / T.STATE_FILE, weights_only=False)["step"] == 6

    assert cli(*common, "--out", tmp_path / "b", "--stop-after", 3) == 0
    assert torch.load(tmp_path / "b" / T.STATE_FILE, weights_only=False)["step"] == 3
    assert cli(*common, "--out", tmp_path / "b", "--resume") == 0
    assert "resuming" in capsys.readouterr().out
    a, b = saved_weights(tmp_path / "a"), saved_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert cli(*common, "--out", tmp_path / "b", "--resume", "--lr", "0.5") == 1
    assert "cannot resume" in capsys.readouterr().err


def test_cli_self_distill_shared_lm_head(model_dir, data_file, tmp_path):
    from medusa_plugin.core.heads import MedusaHeads
    from medusa_plugin.testing.tiny import load_tiny_model

    out = tmp_path / "sd"
    assert cli("--model", model_dir, "--data", data_file, "--out", out, "--self-distill", "--distill-tokens", 5,
               "--prompt-tokens", 4, "--shared-lm-head", "--steps", 2, "--batch-size", 2, "--seq-len", 16,
               "--num-heads", 2, "--device", "cpu", "--no-progress") == 0
    model, tok = load_tiny_model(model_dir)
    samples = T.load_samples(data_file, tok)
    prompts = T.distill_prompts(samples, prompt_tokens=4, chunk_tokens=16)
    assert samples[1][0] in prompts and samples[2][0] in prompts  # prompt/response and chat rows: their own prompt
    assert prompts[0] == samples[0][1][:4] and samples[0][1][16:20] in prompts  # plain text: every 16-token chunk
    cached = [json.loads(line) for line in (out / T.SELF_DISTILL_FILE).read_text().splitlines()]
    assert cached == T.self_distill(model, prompts, 5)
    assert not MedusaHeads.from_pretrained(out).own_lm_head


def test_cli_bad_data(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "hi"}\n')
    assert cli("--model", model_dir, "--data", bad, "--out", tmp_path / "o", "--device", "cpu") == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "'text'" in err and "question" in err


def test_load_samples_directory_of_text_files(model_dir, tmp_path):
    from medusa_plugin.testing.tiny import load_tiny_model

    _, tok = load_tiny_model(model_dir)
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("the lazy dog")
    (tmp_path / "d" / "sub" / "b.md").write_text("return a + b")
    (tmp_path / "d" / ".hidden").write_text("ignored")
    (tmp_path / "d" / "empty.txt").write_text("  \n")
    assert T.load_samples(tmp_path / "d", tok) == [(None, tok("the lazy dog")["input_ids"]),
                                                   (None, tok("return a + b")["input_ids"])]
    with pytest.raises(FileNotFoundError, match="--data"):
        T.load_samples(tmp_path / "missing", tok)


def test_bf16_autocast_keeps_fp32_master_weights(model):
    trainer = T.HeadTrainer(model, periodic_sequences(3, 30), T.new_heads(model, num_heads=2), steps=3, lr=1e-2,
                            batch_size=2, seq_len=12, device="cpu", dtype=torch.bfloat16)
    trainer.run(progress=False)
    assert all(p.dtype == torch.float32 for p in trainer.heads.parameters())
    assert all(math.isfinite(e["loss"]) for e in trainer.history) and trainer.step == 3
    assert trainer.history[0]["lr"] > 0 and trainer.history[-1]["lr"] < trainer.history[1]["lr"]  # warm-up, cosine
