"""The fp32 guarantee on a model shaped like a real one: greedy Medusa output equals plain batch-1 decoding.

The model has the layout of a small chat model (SmolLM2-135M: 30 layers, 9 query heads sharing 3 KV heads (GQA 3:1),
head_dim 64, tied input/output embeddings) with random weights, a small vocabulary and a narrow MLP to stay cheap.
Its Medusa heads are upstream's initialisation (every head a copy of the tied ``lm_head``): the drafts are mostly
wrong, which exercises rejection and KV compaction at every depth, and some are right (repetitive random-model
output), which exercises acceptance. Plain decoding runs one prompt at a time; Medusa runs the prompts as one batch,
so the test covers both tree verification and batch composition. (bf16 is not covered: see the README's guarantee.)
"""
from __future__ import annotations

import gc
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

PROPOSER = "medusa_plugin.vllm_ext.proposer.MedusaTreeProposer"
TREE = "mc_sim_7b_63"
SHAPE = dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_size=576,
             intermediate_size=256, tie_word_embeddings=True)
MAX_TOKENS = 12


def _build(root):
    """Tokenizer + random tied-embedding Llama of :data:`SHAPE` + upstream-initialised heads (cached in ``root``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from medusa_plugin.core.heads import MedusaHeads
    from medusa_plugin.testing.tiny import build_tokenizer

    model_dir, heads_dir = root / "model", root / "heads"
    if (heads_dir / "config.json").is_file():
        return model_dir, heads_dir
    tok = build_tokenizer(model_dir, vocab_size=256)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0,
                      bos_token_id=0, eos_token_id=1, pad_token_id=3, initializer_range=0.02, **SHAPE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    model.save_pretrained(model_dir, safe_serialization=True)
    MedusaHeads.init_from_lm_head(model.lm_head.weight.detach().clone(), num_heads=4).save_pretrained(heads_dir)
    return model_dir, heads_dir


def _generate(model_dir, heads_dir, prompts, medusa: bool):
    from vllm import LLM, SamplingParams

    kw = {}
    if medusa:
        from medusa_plugin.vllm_ext.plugin import register
        register()
        kw = dict(speculative_config={"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": 63},
                  additional_config={"medusa": {"heads": str(heads_dir), "tree": TREE}})
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8, seed=0,
              **kw)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        batches = [prompts] if medusa else [[p] for p in prompts]
        tokens = [list(o.outputs[0].token_ids) for batch in batches
                  for o in llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)]
        stats = llm.collective_rpc(lambda self: self.model_runner.medusa_stats)[0] if medusa else None
        return tokens, (stats.steps, stats.accepted) if stats else None
    finally:
        del llm
        gc.collect()


def test_fp32_greedy_medusa_equals_plain_batch1_on_a_30_layer_gqa_tied_model(tiny_cache_dir):
    from transformers import AutoTokenizer

    from medusa_plugin.testing.tiny import tiny_prompts

    model_dir, heads_dir = _build(tiny_cache_dir / "fp32_identity_30L_gqa3_tied")
    prompts = tiny_prompts(AutoTokenizer.from_pretrained(model_dir), 3, min_len=3, max_len=24, seed=3)
    plain, _ = _generate(model_dir, heads_dir, prompts, medusa=False)
    got, (steps, accepted) = _generate(model_dir, heads_dir, prompts, medusa=True)
    assert steps > 0 and accepted > 0, f"trees verified {steps} times, {accepted} drafts accepted"
    assert got == plain
