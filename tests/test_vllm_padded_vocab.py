"""Heads sized to the tokenizer on a base model whose vocab_size is padded for the matmul (issue 9, item 3): the
engine loads them (their missing logits are -inf) and greedy output is token-identical to plain decoding.

The base is the tiny trained model (256-token tokenizer) with its embedding and lm_head padded to 320 rows, as many
published models are; its heads project to the 256 tokenizer ids. One engine with and one without Medusa, float32."""

from __future__ import annotations

import gc
import json
import os
import shutil

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from medusa_plugin.core.tree import MedusaTree  # noqa: E402
from medusa_plugin.testing.tiny import build_tiny_medusa, tiny_prompts  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]  # two engine starts, ~1 min on 2 shared cores
PADDED_VOCAB = 320
TREE = "mc_sim_7b_63"


def _pad_vocab(model_dir, out_dir, vocab: int):
    """A copy of a Hugging Face model directory with embed_tokens and lm_head zero-padded to ``vocab`` rows."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    tensors = load_file(out_dir / "model.safetensors")
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        t = tensors[key]
        tensors[key] = torch.cat([t, t.new_zeros(vocab - t.shape[0], t.shape[1])])
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps({**cfg, "vocab_size": vocab}, indent=2))
    return cfg["vocab_size"]


def _generate(model_dir, heads_dir, prompts, tree):
    from vllm import LLM, SamplingParams

    kw = dict(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8,
              seed=0, disable_log_stats=False)
    if tree is not None:
        kw.update(speculative_config={"method": "custom_class",
                                      "model": "medusa_plugin.vllm_ext.proposer.MedusaTreeProposer",
                                      "num_speculative_tokens": MedusaTree.load(tree).num_nodes},
                  additional_config={"medusa": {"heads": str(heads_dir), "tree": tree}})
    llm = LLM(**kw)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, detokenize=False)
        out = [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                                  params, use_tqdm=False)]
        drafts = sum(m.value for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_drafts")
        heads = None
        if tree is not None:
            heads = llm.collective_rpc(lambda self: (self.model_runner.drafter.heads.vocab_size,
                                                     self.model_runner.drafter.heads.token_map.numel()))[0]
        return out, drafts, heads
    finally:
        del llm
        gc.collect()


def test_tokenizer_sized_heads_on_a_padded_vocab_are_token_identical(tiny_cache_dir, tmp_path):
    from medusa_plugin.vllm_ext.plugin import register
    from transformers import AutoTokenizer

    register()  # the vllm.general_plugins entry point does it when the package is installed
    model_dir, heads_dir = build_tiny_medusa(tiny_cache_dir / "medusa")
    tokens = _pad_vocab(model_dir, tmp_path / "padded", PADDED_VOCAB)
    heads_rows = json.loads((heads_dir / "config.json").read_text())["vocab_size"]
    assert heads_rows == tokens < PADDED_VOCAB  # heads sized to the tokenizer, base vocab padded
    prompts = tiny_prompts(AutoTokenizer.from_pretrained(model_dir), 6, seed=0)  # prompts the heads were trained on

    plain, _, _ = _generate(tmp_path / "padded", None, prompts, None)
    medusa, drafts, heads = _generate(tmp_path / "padded", heads_dir, prompts, TREE)
    assert heads == (PADDED_VOCAB, heads_rows)  # logits PADDED_VOCAB wide, -inf beyond the heads' rows
    assert drafts > 0
    assert medusa == plain
