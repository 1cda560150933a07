"""``medusa-plugin demo`` end to end through the vLLM engine, at a tiny size: a toy chat model and heads that
``train --recipe chat`` trained (the same path as ``demo --retrain``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from medusa_plugin.cli import main

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def toy_chat(tmp_path_factory):
    from medusa_plugin.testing.tiny import build_tiny_model, load_tiny_model

    root = tmp_path_factory.mktemp("demo")
    d = build_tiny_model(root / "model", hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                         intermediate_size=256, tokenizer_vocab_size=300)
    _, tok = load_tiny_model(d)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(d)
    heads = root / "heads"
    assert main(["train", "--recipe", "chat", "--model", str(d), "--out", str(heads), "--num-prompts", "16",
                 "--eval-prompts", "4", "--answer-tokens", "16", "--vocab-size", "128", "--steps", "20",
                 "--num-heads", "2", "--tree-budget", "4", "--gen-engine", "transformers", "--no-progress"]) == 0
    return d, heads


def test_demo_reports_every_method_and_fp32_identity(toy_chat, tmp_path):
    model_dir, heads = toy_chat
    out = tmp_path / "demo.json"
    # A child process, as a user runs it: after vLLM's ngram engine (the demo's last) has imported numba, vLLM 0.32
    # cannot start another engine in that process, and later tests in this one start engines.
    proc = subprocess.run(
        [sys.executable, "-m", "medusa_plugin.cli", "demo", "--model", str(model_dir), "--heads", str(heads),
         "--num-prompts", "2", "--max-new-tokens", "12", "--fp32-prompts", "2", "--fp32-tokens", "12",
         "--dtype", "bfloat16", "--json", str(out)], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    res = json.loads(out.read_text())
    for key in ("model", "model_dir", "heads_dir", "tree", "identical_fp32", "speedup_bs1", "speedup_conc8",
                "ngram_speedup_bs1", "tokens_per_step_bs1", "rows"):
        assert key in res, key
    assert res["identical_fp32"] is True and "identical" in text
    assert res["tree"] == json.loads((heads / "tree.json").read_text())
    methods = {(r["method"], r["concurrency"]) for r in res["rows"]}
    assert len(methods) == 10 and {c for _, c in methods} == {1, 8}
    plain = [r for r in res["rows"] if r["method"] == "plain"]
    assert all(r["tokens_per_step"] == 1.0 and r["acceptance_per_depth"] == [] for r in plain)
    medusa = [r for r in res["rows"] if r["method"].startswith("Medusa") and "hybrid" not in r["method"]]
    assert all(1.0 <= r["tokens_per_step"] <= 3.0 for r in medusa)  # 2 heads: at most 2 drafts + 1 bonus
    hybrid = [r for r in res["rows"] if "hybrid" in r["method"]]
    assert len(hybrid) == 2 and all(1.0 <= r["tokens_per_step"] <= 5.0 for r in hybrid)  # n-gram paths: 4 deep
    assert {"hybrid_speedup_bs1", "hybrid_speedup_conc8"} <= set(res)
    assert "not batch-invariant" in text and res["dtype"] == "bfloat16"


@pytest.mark.parametrize("native", [False, True])
def test_demo_times_fp32_on_a_cpu_without_native_bf16(monkeypatch, native):
    import torch

    from medusa_plugin.demo import resolve_dtype

    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: native, raising=False)
    assert resolve_dtype("auto")[0] == ("bfloat16" if native else "float32")
    assert resolve_dtype("bfloat16") == ("bfloat16", "as asked (--dtype)")


def test_demo_bad_arguments(toy_chat):
    model_dir, _ = toy_chat
    proc = subprocess.run([sys.executable, "-m", "medusa_plugin.cli", "demo", "--model", str(model_dir), "--heads",
                           str(model_dir)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "tree.json" in proc.stderr
