"""``medusa-plugin bench``: the step-cost and end-to-end benchmarks (also run by ``benchmarks/*.py``).

``step-cost``: the time of one verification step with ``q`` query tokens per request (root + the first ``q - 1``
nodes of the tree, 4D tree-attention mask, depth-based positions) as a ratio to a plain decode step at the same batch
size, on a Llama-3-8B-shaped model with random weights in transformers (``--tiny``: a tiny model, for CPU / CI).
Also times drafting (Medusa heads + candidate construction). Writes JSON and, with ``--schedule-out``, a tree
schedule YAML that ``core.schedule.TreeSchedule.from_yaml`` reads.

``e2e``: tokens per step, TPOT and output tokens/s with and without Medusa (tree and chain) at several concurrencies,
on a tiny model whose heads were really trained (``testing.tiny.build_tiny_medusa``) or a given model + heads,
through the vLLM engine (``vllm_ext.offline``) or the reference decoder (``hf.generate``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["add_arguments", "run", "main", "step_cost", "e2e", "llama3_8b_config", "tiny_config", "BenchError"]

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, rope_theta=10000.0, max_position_embeddings=1024)
STEP_COST_DEFAULTS = dict(batch_sizes=[1, 2, 4, 8, 16, 32, 64], query_tokens=[1, 5, 16, 32, 64], context=1024,
                          repeats=20, warmup=3)
STEP_COST_TINY = dict(batch_sizes=[1, 2, 4], query_tokens=[1, 5, 16], context=32, repeats=3, warmup=1)
E2E_DEFAULTS = dict(concurrency=[1, 2, 4, 8, 16], max_tokens=64, repeats=1)
E2E_VLLM_REPEATS = 3  # interleaved rounds with the vLLM engine (paired ratios; see _e2e_vllm)
E2E_TINY = dict(concurrency=[1, 4], max_tokens=16, repeats=3)
ATTENTION_NOTE = ("transformers eager forward, SDPA attention with our 4D tree mask (past keys + tree ancestor mask) "
                  "and depth-based positions; plain decode: q = 1, no mask; no CUDA graphs")


class BenchError(ValueError):
    """Bad benchmark arguments."""


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sorted(set(vals))


def _device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _device_name(dev) -> str:
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _write_json(path: str | os.PathLike, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[h for h in headers]] + [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ================================================================================================ step cost
def llama3_8b_config(**overrides):
    """A ``LlamaConfig`` with Llama-3-8B's shapes (GQA 32/8 heads, head_dim 128)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA3_8B, "tie_word_embeddings": False, "rms_norm_eps": 1e-5, **overrides})


def tiny_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY, "tie_word_embeddings": False, "rms_norm_eps": 1e-5, **overrides})


class _Timer:
    """Median wall time of a callable (CUDA events on GPU, perf_counter on CPU); ``after`` runs untimed."""

    def __init__(self, dev, warmup: int, repeats: int):
        self.dev, self.warmup, self.repeats = dev, warmup, repeats

    def __call__(self, fn: Callable[[], Any], after: Callable[[], Any] = lambda: None) -> float:
        import torch

        times = []
        for i in range(self.warmup + self.repeats):
            if self.dev.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(self.dev)
                elapsed = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - t0
            after()
            if i >= self.warmup:
                times.append(elapsed)
        return statistics.median(times)


def step_cost(*, tiny: bool = False, batch_sizes: Sequence[int] | None = None,
              query_tokens: Sequence[int] | None = None, context: int | None = None, repeats: int | None = None,
              warmup: int | None = None, tree: str = "mc_sim_7b_63", device: str | None = None,
              dtype: str | None = None, num_heads: int = 4, seed: int = 0,
              log: Callable[[str], None] = print) -> dict:
    """Measure verification-step cost ratios; returns the JSON-ready result (see ``benchmarks/README.md``).

    ``query_tokens`` q: root + the first q - 1 nodes of ``tree`` (a prefix of node order); q = 1 is the plain
    decode step (no tree mask) every ratio is divided by. Drafting: ``num_heads`` v2-style Medusa heads (residual
    blocks, base lm_head) + ``MedusaTree.build_candidates`` for the full tree, per batch size.
    """
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from .core.heads import MedusaHeads
    from .core.tree import MedusaTree

    d = STEP_COST_TINY if tiny else STEP_COST_DEFAULTS
    batch_sizes = sorted(set(batch_sizes or d["batch_sizes"]))
    query_tokens = sorted(set(query_tokens or d["query_tokens"]) | {1})
    context = context or d["context"]
    repeats, warmup = repeats or d["repeats"], d["warmup"] if warmup is None else warmup
    dev = _device(device)
    dt = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    mtree = MedusaTree.load(tree)
    if query_tokens[-1] > mtree.num_nodes + 1:
        raise BenchError(f"query tokens up to {query_tokens[-1]} need a tree of >= {query_tokens[-1] - 1} nodes; "
                         f"{tree!r} has {mtree.num_nodes}: use a bigger tree or smaller --tree-sizes")
    if mtree.max_depth > num_heads:
        raise BenchError(f"tree {tree!r} has depth {mtree.max_depth}, more than --num-heads {num_heads}")
    cfg = tiny_config() if tiny else llama3_8b_config()
    if context + query_tokens[-1] > cfg.max_position_embeddings:
        cfg.max_position_embeddings = context + query_tokens[-1]
    torch.manual_seed(seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dt).eval()
        heads = MedusaHeads(cfg.hidden_size, num_heads, 1, cfg.vocab_size, own_lm_head=False, dtype=dt).eval()
    mtree = mtree.to(dev)
    lm_head = model.get_output_embeddings()
    neg = torch.finfo(dt).min
    timer = _Timer(dev, warmup, repeats)
    shape = "tiny llama" if tiny else "llama-3-8b shape"
    log(f"step-cost: {shape} (random weights), {dt}, {_device_name(dev)}, context {context}, "
        f"tree {tree} prefixes, median of {repeats} after {warmup} warm-up")
    log(f"  {ATTENTION_NOTE}")

    step_s, draft_s = [], []
    with torch.inference_mode():
        for b in batch_sizes:
            cache = DynamicCache(config=model.config)
            ids = torch.randint(0, cfg.vocab_size, (b, context), device=dev)
            model.model(input_ids=ids, past_key_values=cache, use_cache=True)
            row = []
            for q in query_tokens:
                x = torch.randint(0, cfg.vocab_size, (b, q), device=dev)
                pos = (context + mtree.depth[:q]).expand(b, q)
                if q == 1:
                    mask = None
                else:
                    tree_bias = mtree.attn_bias(dt, dev)[:q, :q].clamp(min=neg)
                    mask = torch.cat([torch.zeros(q, context, dtype=dt, device=dev), tree_bias], 1).expand(b, 1, q, -1)

                def fwd(x=x, pos=pos, mask=mask, cache=cache):
                    return model(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                 use_cache=True, logits_to_keep=0).logits

                row.append(timer(fwd, after=lambda cache=cache, q=q: cache.crop(-q)))
            h = torch.randn(b, cfg.hidden_size, dtype=dt, device=dev)
            root = torch.randint(0, cfg.vocab_size, (b,), device=dev)
            draft_s.append(timer(lambda h=h, root=root: mtree.build_candidates(root, heads(h, lm_head))))
            step_s.append(row)
            log(f"  B={b:<4} plain {row[0] * 1e3:8.3f} ms  " + "  ".join(
                f"q={q}: {t / row[0]:.3f}" for q, t in zip(query_tokens[1:], row[1:])))
            del cache
    ratio = [[round(t / row[0], 4) for t in row] for row in step_s]
    draft = [round(t / row[0], 4) for t, row in zip(draft_s, step_s)]
    model_desc = {"shape": "tiny" if tiny else "llama-3-8b", "weights": "random",
                  **{k: getattr(cfg, k) for k in LLAMA3_8B if k != "rope_theta"},
                  "head_dim": cfg.hidden_size // cfg.num_attention_heads}
    return {"benchmark": "step_cost", "measured": True, "device": _device_name(dev),
            "dtype": str(dt).removeprefix("torch."), "model": model_desc, "attention": ATTENTION_NOTE,
            "tree": tree, "context_len": context, "warmup": warmup, "repeats": repeats, "timing": "median",
            "draft": f"{num_heads} Medusa heads (1 ResBlock, base lm_head) + build_candidates "
                     f"({mtree.num_nodes} nodes)",
            "batch_sizes": batch_sizes, "query_tokens": query_tokens,
            "step_ms": [[round(t * 1e3, 4) for t in row] for row in step_s],
            "draft_ms": [round(t * 1e3, 4) for t in draft_s], "ratio": ratio, "draft_overhead": draft,
            "torch": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def schedule_from_step_cost(result: dict, *, tree: str | None = None, accuracy=None):
    """A ``TreeSchedule`` from a :func:`step_cost` result; E[L] from ``tree`` prefixes and ``accuracy``
    (default: the result's tree and the Vicuna-7B Medusa-1 head accuracies)."""
    from .core.schedule import TreeSchedule, prefix_accept_lengths

    tree = tree or result["tree"]
    src = (f"measured by `medusa-plugin bench step-cost` on {result['device']} ({result['model']['shape']} shape, "
           f"random weights, {result['dtype']}, context {result['context_len']}, {result['time']})")
    return TreeSchedule(result["batch_sizes"], result["query_tokens"], result["ratio"],
                        prefix_accept_lengths(tree, accuracy), draft_overhead=result["draft_overhead"],
                        meta={"source": src, "gpu": result["device"], "tree": tree,
                              "notes": "accept_lengths: independence model with the Vicuna-7B Medusa-1 head "
                                       "accuracies; re-derive with TreeSchedule.for_tree(tree, accuracy)"})


def format_step_cost(result: dict) -> str:
    qs = result["query_tokens"]
    headers = ["batch", "plain ms"] + [f"q={q}" for q in qs[1:]] + ["draft"]
    rows = [[b, ms[0]] + ratio[1:] + [dr] for b, ms, ratio, dr in
            zip(result["batch_sizes"], result["step_ms"], result["ratio"], result["draft_overhead"])]
    title = (f"Verification step cost / plain decode step ({result['model']['shape']} shape, random weights, "
             f"{result['device']}, {result['dtype']}, context {result['context_len']}; {result['attention']})")
    return title + "\n" + _table(headers, rows)


# ================================================================================================ end to end
def _cache_dir() -> Path:
    return Path(os.environ.get("MEDUSA_TEST_CACHE", Path(tempfile.gettempdir()) / "medusa_plugin_test_cache"))


def plain_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Batched greedy decoding (one forward per token for all requests), right-padded prompts in a DynamicCache.

    The no-speculation baseline at the same concurrency as :func:`medusa_plugin.hf.generate.medusa_generate`.
    Returns ``max_new_tokens`` new tokens per request (no eos stop).
    """
    import torch
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    dtype = model.get_output_embeddings().weight.dtype
    neg = torch.finfo(dtype).min
    b = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    width = int(lens.max())
    ids = torch.zeros(b, width, dtype=torch.int64, device=dev)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(list(p), dtype=torch.int64)
    ar = torch.arange(width, device=dev)
    ok = (ar.view(1, 1, width) <= ar.view(1, width, 1)) & (ar.view(1, 1, width) < lens.view(b, 1, 1))
    mask = torch.zeros(b, 1, width, width, dtype=dtype, device=dev).masked_fill_(~ok.unsqueeze(1), neg)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=ar.expand(b, width), past_key_values=cache,
                       use_cache=True).logits
        tok = logits[torch.arange(b, device=dev), lens - 1].argmax(-1)
        out = [tok]
        pad_ok = ar.view(1, -1) < lens.view(-1, 1)  # [B, width] valid prompt slots
        for t in range(1, max_new_tokens):
            valid = torch.cat([pad_ok, torch.ones(b, t, dtype=torch.bool, device=dev)], 1)
            m = torch.zeros(b, 1, 1, width + t, dtype=dtype, device=dev).masked_fill_(~valid.view(b, 1, 1, -1), neg)
            logits = model(input_ids=tok.view(b, 1), attention_mask=m, position_ids=(lens + t - 1).view(b, 1),
                           past_key_values=cache, use_cache=True).logits
            tok = logits[:, -1].argmax(-1)
            out.append(tok)
    return torch.stack(out, 1).tolist()


def _depth_capped(tree: str, num_heads: int) -> tuple[Any, str]:
    """The tree's paths of depth <= num_heads (a valid tree), and a label for it."""
    from .core.tree import MedusaTree

    t = MedusaTree.load(tree)
    if t.max_depth <= num_heads:
        return t, f"{tree} ({t.num_nodes} nodes)"
    capped = MedusaTree.from_choices([p for p in t.choices if len(p) <= num_heads])
    return capped, f"{tree} depth<={num_heads} ({capped.num_nodes} nodes)"


def _tiny_model(args_cache: str | None, train_steps: int, distill_prompts: int) -> tuple[Path, Path, str]:
    from .testing.tiny import build_tiny_medusa

    model_dir, heads_dir = build_tiny_medusa(args_cache or _cache_dir(), num_heads=4, steps=train_steps,
                                             num_prompts=distill_prompts)
    return model_dir, heads_dir, (f"tiny llama (random weights) + 4 Medusa heads trained on its own greedy output "
                                  f"(testing.tiny.build_tiny_medusa, {train_steps} steps, {distill_prompts} prompts)")


def bench_prompts(tokenizer, n: int, *, seed: int = 0) -> tuple[list[list[int]], str]:
    """``n`` prompts (token id lists) for a speed benchmark and a one-line description of them.

    A chat model (its tokenizer has a chat template) gets held-out chat requests (topics no training step of the
    chat recipe saw, :func:`hf.chat_prompts.held_out_requests`) in its template, as users send them; any other
    model gets short snippets of the Python standard library (:func:`testing.tiny.tiny_prompts`)."""
    if getattr(tokenizer, "chat_template", None):
        from .hf.chat_prompts import chat_prompt_ids, held_out_requests

        return ([chat_prompt_ids(tokenizer, r) for r in held_out_requests(n, seed=seed)],
                "held-out chat requests (hf.chat_prompts.held_out_requests) in the chat template")
    from .testing.tiny import tiny_prompts

    return tiny_prompts(tokenizer, n, seed=seed), "4-12 token snippets of Python stdlib source"


def e2e(*, tiny: bool = False, concurrency: Sequence[int] | None = None, max_tokens: int | None = None,
        engine: str = "auto", tree: str = "mc_sim_7b_63", chain: int | None = None, model_dir: str | None = None,
        heads_dir: str | None = None, cache_dir: str | None = None, train_steps: int = 300,
        distill_prompts: int = 48, repeats: int | None = None, device: str | None = None, seed: int = 0,
        schedule: str | None = None, builtin_medusa: bool = False, dtype: str | None = None,
        hybrid: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run plain / Medusa tree / Medusa chain decoding at each concurrency; returns the JSON-ready result.

    engine: "vllm" (``vllm_ext.offline``), "reference" (``hf.generate`` + :func:`plain_generate`) or "auto" (vllm
    when importable). Concurrency C: C prompts submitted together, ``max_tokens`` new tokens each (eos ignored);
    each point runs ``repeats`` times (default 3 with ``tiny`` or the vLLM engine, else 1) and keeps the median time.
    With the vLLM engine every mode's engine stays up in its own process and the repeats are interleaved rounds
    (plain, Medusa, ngram back to back at each concurrency); ``speedup`` (and ``ratios``) is then the median over the
    rounds of plain's time / the mode's time in the same round (``speedup_runs`` lists them).

    With the vLLM engine and ``schedule`` (e.g. ``"auto"``) the modes are plain, Medusa with that ``tree_schedule``
    and vLLM's ngram (k=4), and the result has ``ratios`` / ``ngram_ratios``: concurrency -> output tok/s of
    Medusa / ngram over plain at that concurrency, measured in the same run. ``builtin_medusa`` adds vLLM's own
    Medusa proposer on the same heads (``convert --to vllm``) when this vLLM can run it (else a note says why).
    ``hybrid`` adds the demo's hybrid (``demo_runs.HYBRID_SETTINGS``: dynamic trees + n-gram branches) with the same
    ``tree_schedule``; its ratios are ``hybrid_ratios``.
    """
    import torch

    from .core.heads import MedusaHeads, MedusaHeadsError

    d = E2E_TINY if tiny else E2E_DEFAULTS
    concurrency = sorted(set(concurrency or d["concurrency"]))
    max_tokens = max_tokens or d["max_tokens"]
    if engine == "auto":
        try:
            import vllm  # noqa: F401
            engine = "vllm"
        except ImportError:
            engine = "reference"
    repeats = repeats or (E2E_VLLM_REPEATS if engine == "vllm" and not tiny else d["repeats"])
    if engine not in ("vllm", "reference"):
        raise BenchError(f"unknown engine {engine!r}: use vllm, reference or auto")
    if (model_dir is None) != (heads_dir is None):
        raise BenchError("give both --model-dir and --heads-dir (or neither, for the tiny trained model)")
    if hybrid and not (engine == "vllm" and schedule):
        raise BenchError("--hybrid runs next to Medusa with a tree_schedule in the vLLM engine: use --engine vllm "
                         "with --schedule (e.g. auto)")
    if model_dir is None:
        model_dir, heads_dir, model_desc = _tiny_model(cache_dir, train_steps, distill_prompts)
    else:
        model_desc = f"{model_dir} + heads {heads_dir}"
    loaded = MedusaHeads.from_pretrained(heads_dir)
    num_heads = loaded.num_heads
    if builtin_medusa and loaded.root_input:  # refused before any engine runs, not after the plain and Medusa runs
        raise MedusaHeadsError(f"--builtin-medusa: the heads in {heads_dir} read the root token (root_input), which "
                               "vLLM's built-in Medusa cannot feed them; pass heads trained with --no-root-input")
    tree_obj, tree_label = _depth_capped(tree, num_heads)
    chain = chain or num_heads
    if engine == "vllm" and schedule:
        # Medusa with the batch-aware schedule next to plain and vLLM's own ngram (and vLLM's built-in Medusa)
        # ngram last: vLLM 0.32 cannot build another engine in a process after an ngram engine
        modes = [("plain", None, "-"), ("tree", tree_obj, f"{tree_label}, tree_schedule {schedule}")]
        if hybrid:
            from .demo_runs import HYBRID_SETTINGS

            modes.append(("hybrid", "hybrid", f"dynamic {HYBRID_SETTINGS['budget']} + "
                                              f"{HYBRID_SETTINGS['ngram_branches']} n-gram branches, "
                                              f"tree_schedule {schedule}"))
        if builtin_medusa:
            modes.append(("vllm-medusa", "vllm-medusa", f"vLLM built-in Medusa chain:{num_heads}"))
        modes.append(("ngram", "ngram", f"vLLM ngram k={NGRAM_K}"))
    else:
        modes = [("plain", None, "-"), ("tree", tree_obj, tree_label), ("chain", f"chain:{chain}", f"chain:{chain}")]

    from transformers import AutoTokenizer

    prompts, prompt_desc = bench_prompts(AutoTokenizer.from_pretrained(model_dir), max(concurrency), seed=seed)
    log(f"e2e: {model_desc}; engine {engine}; concurrency {concurrency}; {max_tokens} tokens per request; "
        f"prompts: {prompt_desc}")

    runs: dict[str, dict[int, dict]] = {}
    notes: dict[str, str] = {}
    if engine == "reference":
        from transformers import AutoModelForCausalLM

        from .hf.generate import medusa_generate

        dev = _device(device)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(dev).eval()
        heads = MedusaHeads.from_pretrained(heads_dir, device=dev, dtype=model.dtype).eval()
        for mode, spec, _label in modes:
            runs[mode] = {}
            for c in concurrency:
                batch = prompts[:c]
                if spec is None:
                    plain_generate(model, batch[:1], 2)  # warm-up
                    timed = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        seqs = plain_generate(model, batch, max_tokens)
                        timed.append(time.perf_counter() - t0)
                    runs[mode][c] = dict(elapsed_s=statistics.median(timed), token_ids=seqs, tokens_per_step=1.0)
                else:
                    medusa_generate(model, heads, spec, batch[:1], max_new_tokens=2)  # warm-up
                    outs = [medusa_generate(model, heads, spec, batch, max_new_tokens=max_tokens)
                            for _ in range(repeats)]
                    runs[mode][c] = dict(elapsed_s=statistics.median(o.stats.wall_s for o in outs),
                                         token_ids=outs[0].sequences,
                                         tokens_per_step=outs[0].stats.mean_accepted_tokens_per_step)
    else:
        runs, notes = _e2e_vllm(model_dir, str(heads_dir), modes, prompts, concurrency, max_tokens, repeats,
                                schedule=schedule, dtype=dtype, log=log)
        modes = [m for m in modes if m[0] in runs]

    rows = []
    for mode, spec, label in modes:
        for c in concurrency:
            r, base = runs[mode][c], runs["plain"][c]
            n_tok = sum(len(s) for s in r["token_ids"])
            per_req = n_tok / c
            row = {
                "mode": mode, "tree": label, "concurrency": c, "requests": c, "output_tokens": n_tok,
                "elapsed_s": round(r["elapsed_s"], 4), "tokens_per_step": round(r["tokens_per_step"], 4),
                "tpot_ms": round(r["elapsed_s"] / per_req * 1e3, 4),
                "output_tokens_per_s": round(n_tok / r["elapsed_s"], 2),
                "speedup": round(base["elapsed_s"] / r["elapsed_s"], 4),
                "matches_plain": sum(a == b for a, b in zip(r["token_ids"], base["token_ids"])) / c,
            }
            if "medusa_state" in r:
                row["medusa_state"] = r["medusa_state"]
            if "elapsed_runs" in r:  # interleaved rounds: the median of each round's plain time / this time
                paired = [b / m for b, m in zip(base["elapsed_runs"], r["elapsed_runs"])]
                row.update(elapsed_runs=[round(x, 6) for x in r["elapsed_runs"]],
                           speedup_runs=[round(x, 4) for x in paired], speedup=round(statistics.median(paired), 4))
            rows.append(row)
    def ratios(mode: str) -> dict[str, float]:
        return {str(r["concurrency"]): r["speedup"] for r in rows if r["mode"] == mode}

    return {"benchmark": "e2e", "engine": engine, "model": model_desc, "device": _device_name(_device(device)),
            "ratios": ratios("tree"), "ngram_ratios": ratios("ngram"), "vllm_medusa_ratios": ratios("vllm-medusa"),
            "hybrid_ratios": ratios("hybrid"),
            "notes": notes, "max_tokens": max_tokens, "prompts": prompt_desc,
            "concurrency": concurrency, "repeats": repeats, "temperature": 0.0, "rows": rows,
            "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


NGRAM_K = 4


def _e2e_vllm(model_dir, heads_dir: str, modes, prompts, concurrency, max_tokens, repeats: int, *,
              schedule: str | None = None, dtype: str | None = None, log: Callable[[str], None] = print
              ) -> tuple[dict, dict]:
    """Every mode's engine (plain / Medusa / chain / ngram / vLLM's Medusa) started once in its own process
    (:class:`~medusa_plugin.engine_workers.EngineWorker`), then ``repeats`` rounds; each round runs every mode at
    each concurrency back to back (the mode order rotating from round to round), so the machine's drift hits the
    modes of a round alike. Greedy, eos ignored. Returns (runs, notes): ``runs[mode][c]`` holds the median
    ``elapsed_s``, every round's time in ``elapsed_runs`` (round order), the first round's ``token_ids`` and the
    mean ``tokens_per_step``; a mode whose engine cannot start (vLLM's Medusa) is left out with a note."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from .core.tree import MedusaTree
    from .engine_workers import EngineWorker, EngineWorkerError

    extra = {"dtype": dtype} if dtype else {}
    notes: dict[str, str] = {}
    workers: dict[str, EngineWorker] = {}
    spec_modes: set[str] = set()
    try:
        for mode, spec, _label in modes:
            medusa, spec_cfg, nodes = None, None, 0
            if spec == "ngram":
                spec_cfg = {"method": "ngram", "num_speculative_tokens": NGRAM_K, "prompt_lookup_max": 4,
                            "prompt_lookup_min": 2}
                nodes = NGRAM_K
            elif spec == "vllm-medusa":
                from .vllm_ext.convert import to_vllm_medusa

                vdir = Path(tempfile.mkdtemp(prefix="medusa_vllm_"))
                num_heads = to_vllm_medusa(heads_dir, vdir, base_model=str(model_dir))
                spec_cfg = {"method": "medusa", "model": str(vdir), "num_speculative_tokens": num_heads}
                nodes = num_heads
            elif spec == "hybrid":
                from .demo_runs import HYBRID_SETTINGS

                medusa = {"heads": heads_dir, **HYBRID_SETTINGS, "tree_schedule": schedule}
                nodes = HYBRID_SETTINGS["budget"]
            elif spec is not None:
                choices = [list(p) for p in spec.choices] if not isinstance(spec, str) else spec
                medusa = {"heads": heads_dir, "tree": choices}
                if schedule and mode == "tree":
                    medusa["tree_schedule"] = schedule
                nodes = MedusaTree.load(choices).num_nodes
            # room for the prompt, the output and a full tree of drafts (vLLM drops drafts that would not fit)
            max_len = max(len(p) for p in prompts) + max_tokens + nodes + 8
            kwargs = dict(max_num_seqs=max(concurrency), max_model_len=max(512, max_len), **extra)
            if spec_cfg is not None:
                kwargs["speculative_config"] = spec_cfg
            log(f"e2e: starting the {mode} engine")
            try:
                workers[mode] = EngineWorker(str(model_dir), medusa=medusa, **kwargs)
            except EngineWorkerError as e:
                if spec != "vllm-medusa":  # a peer that cannot run here is reported; our own modes must run
                    raise BenchError(f"the {mode} engine failed to start: {e}") from None
                notes[mode] = f"cannot run on this vLLM: {e}"
                log(f"e2e: {mode}: {notes[mode]}")
                continue
            if spec is not None:
                spec_modes.add(mode)
        outs: dict[str, dict[int, list]] = {m: {c: [] for c in concurrency} for m in workers}
        states: dict[int, list] = {}  # concurrency -> the Medusa proposer's state after each of its runs
        names = list(workers)
        for r in range(repeats):
            for c in concurrency:
                for mode in names[r % len(names):] + names[:r % len(names)]:
                    out = workers[mode].run(prompts[:c], max_tokens)
                    outs[mode][c].append(out)
                    log(f"e2e: round {r + 1}/{repeats} {mode} c={c}: {out.elapsed_s:.2f} s")
                    if mode == "tree" and schedule:
                        state = workers[mode].collective_rpc("medusa_state")[0]
                        states.setdefault(c, []).append(state)
                        log(f"e2e:   Medusa schedule {state['schedule']}, E[L] {state['accept_lengths'][:4]}, "
                            f"observed step-time ratios {state['observed_step_ratios']}")
    finally:
        for w in workers.values():
            w.close()
    runs: dict[str, dict[int, dict]] = {}
    for mode, per_c in outs.items():
        runs[mode] = {}
        for c, res in per_c.items():
            tps = (statistics.mean(o.metrics.get("mean_tokens_per_step", 1.0) for o in res)
                   if mode in spec_modes else 1.0)
            runs[mode][c] = dict(elapsed_s=statistics.median(o.elapsed_s for o in res),
                                 elapsed_runs=[o.elapsed_s for o in res], token_ids=res[0].token_ids,
                                 tokens_per_step=tps)
            if mode == "tree" and c in states:
                runs[mode][c]["medusa_state"] = states[c]
    return runs, notes


def format_e2e(result: dict) -> str:
    headers = ["mode", "tree", "conc", "tok/step", "TPOT ms", "out tok/s", "speedup", "same as plain"]
    rows = [[r["mode"], r["tree"], r["concurrency"], r["tokens_per_step"], r["tpot_ms"], r["output_tokens_per_s"],
             r["speedup"], f"{r['matches_plain']:.0%}"] for r in result["rows"]]
    title = (f"End to end, greedy, {result['max_tokens']} tokens per request, engine {result['engine']} "
             f"({result['device']}); model: {result['model']}")
    return title + "\n" + _table(headers, rows)


# ================================================================================================ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    sub.required = True
    p = sub.add_parser("step-cost", help="verification step cost vs plain decode (8B shape, random weights)",
                       description=step_cost.__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes (CPU, seconds)")
    p.add_argument("--batch-sizes", type=_ints, help="comma-separated (default 1,2,4,8,16,32,64)")
    p.add_argument("--tree-sizes", type=_ints, dest="query_tokens",
                   help="query tokens per request = root + tree nodes (default 1,5,16,32,64; 1 is always added)")
    p.add_argument("--context", type=int, help="tokens already in the KV cache per request (default 1024)")
    p.add_argument("--repeats", type=int, help="timed repeats per point (median; default 20)")
    p.add_argument("--warmup", type=int, help="untimed repeats per point (default 3)")
    p.add_argument("--tree", default="mc_sim_7b_63", help="tree whose node-order prefixes are measured")
    p.add_argument("--num-heads", type=int, default=4, help="Medusa heads in the drafting cost (default 4)")
    p.add_argument("--device", help="cuda | cpu | cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--json", default="benchmarks/results/step_cost.json", help="where to write the results")
    p.add_argument("--schedule-out", help="also write a tree schedule YAML (TreeSchedule.from_yaml) here")
    p.add_argument("--engine", default="transformers", choices=["transformers", "vllm"],
                   help="vllm: measure inside the engine what `tree_schedule: auto` measures at start-up (needs "
                        "--model and --heads; refreshes its cache)")
    p.add_argument("--model", help="--engine vllm: model directory")
    p.add_argument("--heads", help="--engine vllm: Medusa heads")
    p.add_argument("--max-num-seqs", type=int, default=16, help="--engine vllm: largest batch size (default 16)")
    p.set_defaults(_bench=_run_step_cost)

    p = sub.add_parser("overhead", help="one engine step at batch 1 split into phases: plain, Medusa, ngram",
                       description="Profile one vLLM engine step at batch 1 (plain, Medusa with one draft node, "
                                   "vLLM ngram with one draft) split into phases, and step cost vs rows per step")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--heads", required=True, help="Medusa heads")
    p.add_argument("--tree", default="chain:4", help="Medusa tree whose prefixes are timed (default chain:4)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=48, help="decode steps per configuration (default 48)")
    p.add_argument("--rows", type=_ints, default=[1, 2, 3, 5], help="rows per step for the curve (default 1,2,3,5)")
    p.add_argument("--repeats", type=int, default=5,
                   help="rounds, each running every engine once in turn; every number is the median over rounds "
                        "(default 5)")
    p.add_argument("--json", default="benchmarks/results/overhead.json", help="where to write the results")
    p.add_argument("--png", help="plot of step cost vs rows (default: next to --json; needs matplotlib)")
    p.set_defaults(_bench=_run_overhead)

    p = sub.add_parser("e2e", help="tokens/step, TPOT, tokens/s with and without Medusa",
                       description=e2e.__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="quick mode: concurrency 1,4 and 16 tokens")
    p.add_argument("--concurrency", type=_ints, help="comma-separated (default "
                   + ",".join(map(str, E2E_DEFAULTS["concurrency"])) + ")")
    p.add_argument("--max-tokens", type=int, help=f"new tokens per request (default {E2E_DEFAULTS['max_tokens']})")
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "reference"],
                   help="vllm: the vLLM engine with the Medusa plugin; reference: hf.generate (default: vllm if "
                        "importable)")
    p.add_argument("--tree", default="mc_sim_7b_63", help="Medusa tree (paths deeper than the heads are dropped)")
    p.add_argument("--chain", type=int, help="chain length for the chain mode (default: number of heads)")
    p.add_argument("--model-dir", help="a local model (default: the tiny model with trained heads)")
    p.add_argument("--heads-dir", help="its Medusa heads (with --model-dir)")
    p.add_argument("--cache-dir", help="where the tiny model is built/cached (default $MEDUSA_TEST_CACHE or "
                                       "<tmp>/medusa_plugin_test_cache)")
    p.add_argument("--train-steps", type=int, default=300, help="head training steps of the tiny model")
    p.add_argument("--distill-prompts", type=int, default=48, help="self-distillation prompts of the tiny model")
    p.add_argument("--repeats", type=int, help="runs per point, median time (default 1; 3 with --tiny or --engine "
                                                 "vllm, where they are interleaved rounds: see benchmarks/README.md)")
    p.add_argument("--device", help="reference engine: cuda | cpu (default: cuda if available)")
    p.add_argument("--schedule", default=None,
                   help="vllm engine: Medusa with this tree_schedule (e.g. auto) next to plain and vLLM's ngram; "
                        "writes ratios / ngram_ratios (default: auto with --engine vllm, else off; 'none' = off)")
    p.add_argument("--builtin-medusa", action="store_true",
                   help="also run vLLM's built-in Medusa proposer on the same heads (convert --to vllm)")
    p.add_argument("--hybrid", action="store_true",
                   help="vllm engine with --schedule: also run Medusa hybrid (dynamic trees + n-gram branches, the "
                        "demo's settings) with that tree_schedule; writes hybrid_ratios")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="vllm engine dtype (default float32 on CPU)")
    p.add_argument("--json", default="benchmarks/results/e2e.json", help="where to write the results")
    p.set_defaults(_bench=_run_e2e)

    from .bench_trees import add_trees_arguments, run_trees

    p = sub.add_parser("trees", help="tokens/step of the fitted static tree vs dynamic vs dynamic + n-gram trees",
                       description="tokens per step of the fitted static tree, dynamic trees and dynamic + n-gram "
                                   "trees at equal node budgets on held-out prompts (reference decoder, float32)")
    add_trees_arguments(p)
    p.set_defaults(_bench=run_trees)


def _run_overhead(args: argparse.Namespace) -> int:
    from .bench_engine import BenchEngineError, format_overhead, overhead, plot_overhead

    if args.repeats < 1:
        raise BenchError(f"--repeats must be >= 1, got {args.repeats}")
    try:
        res = overhead(model=args.model, heads=args.heads, tree=args.tree, dtype=args.dtype, steps=args.steps,
                       rows=args.rows, repeats=args.repeats, log=_log)
    except BenchEngineError as e:
        raise BenchError(str(e)) from None
    print(format_overhead(res))
    path = _write_json(args.json, res)
    png = plot_overhead(res, args.png or str(path.with_suffix(".png")))
    print(f"wrote {path}" + (f" and {png}" if png else " (no PNG: pip install matplotlib)"))
    return 0


def _run_step_cost(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        if not (args.model and args.heads):
            raise BenchError("--engine vllm needs --model and --heads")
        from .bench_engine import engine_step_cost

        res = engine_step_cost(model=args.model, heads=args.heads, tree=args.tree, dtype=args.dtype or "bfloat16",
                               max_num_seqs=args.max_num_seqs, log=_log)
        print(res["describe"])
        if args.schedule_out:
            from .core.schedule import TreeSchedule
            TreeSchedule.from_dict(res["schedule"]).to_yaml(args.schedule_out)
        print(f"wrote {_write_json(args.json, res)}" + (f" and {args.schedule_out}" if args.schedule_out else ""))
        return 0
    res = step_cost(tiny=args.tiny, batch_sizes=args.batch_sizes, query_tokens=args.query_tokens,
                    context=args.context, repeats=args.repeats, warmup=args.warmup, tree=args.tree,
                    device=args.device, dtype=args.dtype, num_heads=args.num_heads, log=_log)
    if args.schedule_out:
        sched = schedule_from_step_cost(res)
        sched.to_yaml(args.schedule_out)
        res["schedule"] = {"path": str(args.schedule_out), "num_nodes": sched.table()}
    print(format_step_cost(res))
    if args.schedule_out:
        print(sched.describe())
    print(f"wrote {_write_json(args.json, res)}" + (f" and {args.schedule_out}" if args.schedule_out else ""))
    return 0


def _run_e2e(args: argparse.Namespace) -> int:
    res = e2e(tiny=args.tiny, concurrency=args.concurrency, max_tokens=args.max_tokens, engine=args.engine,
              tree=args.tree, chain=args.chain, model_dir=args.model_dir, heads_dir=args.heads_dir,
              cache_dir=args.cache_dir, train_steps=args.train_steps, distill_prompts=args.distill_prompts,
              repeats=args.repeats, device=args.device, log=_log,
              schedule=None if args.schedule == "none" else (args.schedule or ("auto" if args.engine == "vllm"
                                                                               else None)),
              builtin_medusa=args.builtin_medusa, dtype=args.dtype, hybrid=args.hybrid)
    print(format_e2e(res))
    print(f"wrote {_write_json(args.json, res)}")
    return 0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    return args._bench(args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medusa_plugin.bench step-cost|e2e ...`` (what ``benchmarks/*.py`` call)."""
    parser = argparse.ArgumentParser(prog="medusa-plugin bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except BenchError as e:
        print(f"medusa-plugin bench: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
