"""Hidden states captured while vLLM generates (``vllm_ext.hidden_capture``) equal a separate transformers forward
pass over prompt + answer, row for row (vllm-cpu, in-process, fp32, the tiny model of tests/test_vllm_engine.py):
through ``batch_generate.generate``, through the chat recipe's distillation and hidden-state cache, and with
preempted (recomputed) requests."""
from __future__ import annotations

import gc
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from test_vllm_engine import _cache_dir  # noqa: E402

from medusa_plugin.testing.tiny import build_tiny_medusa, tiny_prompts  # noqa: E402

TOL = dict(rtol=2e-2, atol=2e-2)  # bf16 storage; a row one position off differs by O(1)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, _ = build_tiny_medusa(_cache_dir(), num_heads=4)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model_dir, tok, model


def _reference(model, prompts, answers):
    from medusa_plugin.hf.hidden_cache import compute_hidden_states

    ref = compute_hidden_states(model, prompts, answers, store_dtype=torch.float32, progress=False)
    return [ref.hidden[s:e] for s, e in ref.segments()]


def test_generate_captures_the_rows_a_forward_pass_computes(tiny):
    from medusa_plugin.hf.batch_generate import generate
    from medusa_plugin.vllm_ext.hidden_capture import HiddenCaptureError

    model_dir, tok, model = tiny
    prompts = tiny_prompts(tok, 10, min_len=3, max_len=60, seed=3)
    prompts.append(list(prompts[0]))  # the same prompt twice: same greedy answer, same rows
    gen = generate(model_dir, prompts, 20, engine="vllm", dtype="float32", max_model_len=256, progress=False,
                   capture_hidden=True)
    assert gen.hidden is not None and len(gen.hidden) == len(prompts)
    want = _reference(model, prompts, gen.continuations)
    for got, ref, cont in zip(gen.hidden, want, gen.continuations):
        assert got.shape == (len(cont), model.config.hidden_size)
        torch.testing.assert_close(got.float(), ref, **TOL)
    plain = generate(model_dir, prompts[:2], 20, engine="vllm", dtype="float32", max_model_len=256, progress=False)
    assert plain.hidden is None and plain.continuations == gen.continuations[:2]
    # a prompt the engine never ran: one line naming the problem
    from medusa_plugin.vllm_ext.hidden_capture import HiddenCapture
    with pytest.raises(HiddenCaptureError, match="no hidden states were captured for a prompt of 3 tokens"):
        HiddenCapture(runner=None).rows([1, 2, 3], 4)


def test_preempted_requests_are_captured_from_their_recomputation(tiny):
    from vllm import LLM, SamplingParams

    from medusa_plugin.vllm_ext.hidden_capture import capture_while

    model_dir, tok, model = tiny
    prompts = tiny_prompts(tok, 12, min_len=20, max_len=40, seed=5)
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
              num_gpu_blocks_override=16, block_size=32, disable_log_stats=False)
    try:
        with capture_while(llm) as cap:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                                SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True), use_tqdm=False)
        answers = [list(o.outputs[0].token_ids) for o in outs]
        assert sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions") > 0
        got = [cap.rows(p, len(a)) for p, a in zip(prompts, answers)]
    finally:
        del llm
        gc.collect()
    for g, ref in zip(got, _reference(model, prompts, answers)):
        torch.testing.assert_close(g.float(), ref, **TOL)


def test_recipe_distillation_skips_the_forward_pass_for_captured_answers(tiny, tmp_path, monkeypatch):
    from medusa_plugin.hf import hidden_cache as hc
    from medusa_plugin.hf.chat_recipe import distilled_chats

    model_dir, tok, model = tiny
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    captured: dict = {}
    chats, _ = distilled_chats(model_dir, tok, {"train": ["def parse(self):", "import os"], "eval": ["class A:"]},
                               tmp_path, answer_tokens=12, engine="vllm", progress=False, captured=captured)
    rows = chats["train"] + chats["eval"]
    assert set(captured) == {hc.sample_hash(r["prompt_ids"], r["answer_ids"]) for r in rows}
    monkeypatch.setattr(hc, "compute_hidden_states", lambda *a, **k: pytest.fail("recomputed a captured answer"))
    cache, _ = hc.load_or_compute(tmp_path / "h.safetensors", model, [r["prompt_ids"] for r in rows],
                                  [r["answer_ids"] for r in rows], known=captured)
    monkeypatch.undo()
    want = torch.cat(_reference(model, [r["prompt_ids"] for r in rows], [r["answer_ids"] for r in rows]))
    torch.testing.assert_close(cache.hidden.float(), want, **TOL)
    assert cache.next_token.tolist() == [t for r in rows for t in r["answer_ids"]]
