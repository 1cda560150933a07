"""``medusa-plugin bench trees``: tokens per step of the fitted static tree, dynamic trees and dynamic + n-gram
(hybrid) trees at equal node budgets, on held-out prompts, with the reference decoder (``hf.generate``) in float32
greedy (engine-independent: tokens per step depend only on the trees and the target's greedy tokens).

* static ``n``: the tree of ``n`` nodes fitted to the heads' held-out per-rank accuracy (``recipe.json``'s
  ``accuracy`` when the heads have one, else measured on training-side prompts), ``core.tree_fit.fit_tree``.
* dynamic ``n``: ``core.dynamic_tree`` with ``budget=n``, the top-20 (``--topk``), as a server runs it: starting from
  the heads' calibration prior (``calibration.json`` next to the heads, fitted on training-side prompts; else fresh)
  and re-scored by successor levels (``successors.safetensors``, ``core.successor_prior``), calibrated online from the
  accepted paths; with ``acceptance_model.safetensors`` next to the heads (``core.acceptance_model``) its learned node
  scores instead, as a server does by default. Ablations: ``dynamic_calibrated`` (the calibration and successor levels
  without the acceptance model, when there is one), ``dynamic_heads_only`` (a fresh calibration, no successor counts:
  the head probabilities alone), ``dynamic_uncalibrated`` (raw head probabilities), ``dynamic_warm`` (a fresh
  calibration that first served 16 training-side prompts, not counted, with the successor counts).
* hybrid ``n``: dynamic ``n`` plus ``--ngram-branches`` prompt-lookup branches (n = 2..4, 4 tokens, vLLM's rule).
* ngram: vLLM's ngram proposer (k=4, n = 2..4: the demo's setting) simulated on the plain greedy output (exact for
  greedy: a draft is accepted up to its first token that differs from the target's greedy token).

Every run decodes all prompts at once (batched reference decoder); ``tok_s`` is output tokens per wall second of those
runs (float32 transformers on this machine, with the reference decoder's Python overheads; not an engine
measurement). ``identical`` counts prompts whose tokens equal plain batched greedy decoding.

``--engine vllm`` adds ``engine``: the same methods through the vLLM engine (one in-process engine per method,
``demo_runs.run_method``; float32, greedy, one request at a time and 8 at once), next to plain decoding and vLLM's
ngram (k=4): tok/s, tokens per step and identity with plain decoding, per concurrency; ``dynamic_auto_n`` /
``hybrid_auto_n`` run with ``tree_schedule: auto`` (``n`` is then a cap; each step's nodes are chosen across the
batch from the measured step cost, ``core.node_allocation``); ``dynamic_calibrated_n`` (when the heads have an
acceptance model) runs ``dynamic_n`` with ``acceptance_model: false``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Sequence

__all__ = ["add_trees_arguments", "run_trees", "bench_trees", "simulate_ngram_tokens_per_step", "engine_runs",
           "paired_ratio_interval"]


def paired_ratio_interval(num: Sequence[Sequence[float]], den: Sequence[Sequence[float]], *, level: float = 0.95,
                          resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval, over prompts, of the ratio of two methods' tokens per step.

    ``num[i]`` / ``den[i]`` = ``(tokens emitted, verify steps)`` of prompt ``i`` under each method; a method's tokens
    per step is ``sum(tokens) / sum(steps)`` over the prompts (as ``MedusaStats.mean_accepted_tokens_per_step``).
    Prompts are resampled with replacement, the same draw for both methods (paired), ``resamples`` times; returns the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the ratio. It measures how much the ratio depends on
    which prompts were drawn, not the decoding (greedy decoding is deterministic). Efron & Tibshirani, *An
    Introduction to the Bootstrap* (1993), ch. 13. Raises ``ValueError`` on empty or unequal inputs.
    """
    import numpy as np

    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"need two equal [prompts, 2] arrays of (tokens, steps), got {a.shape} and {b.shape}")
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    sa, sb = a[idx].sum(axis=1), b[idx].sum(axis=1)  # [resamples, 2]
    ratio = (sa[:, 0] / sa[:, 1]) / (sb[:, 0] / sb[:, 1])
    lo, hi = np.quantile(ratio, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def simulate_ngram_tokens_per_step(prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], *, k: int = 4,
                                   min_n: int = 2, max_n: int = 4) -> float:
    """Mean tokens per step of vLLM's ngram proposer under greedy decoding, replayed on the greedy ``outputs``.

    Each step drafts ``ngram_continuations(context, 1)`` (vLLM's rule), accepts its longest prefix that matches the
    next greedy tokens, and emits that plus one token. The first output token (the prefill's) is not a step.
    """
    from .core.ngram_branches import ngram_continuations

    steps = emitted = 0
    for prompt, out in zip(prompts, outputs):
        pos = 1  # out[0] comes from the prefill
        while pos < len(out):
            ctx = list(prompt) + list(out[:pos])
            drafts = ngram_continuations(ctx, 1, min_n=min_n, max_n=max_n, length=k)
            acc = 0
            for j, t in enumerate(drafts[0] if drafts else []):
                if pos + j < len(out) and out[pos + j] == t:
                    acc += 1
                else:
                    break
            n = min(acc + 1, len(out) - pos)
            steps += 1
            emitted += n
            pos += n
    return emitted / max(steps, 1)


def _tiny_heads_with_acceptance_model(heads_dir, model, tokenizer) -> str:
    """A copy of the tiny heads with an acceptance model next to them (as the shipped SmolLM2 heads have), fitted
    once on 160 prompts cut with another seed than the heads' training prompts (0) and the held-out ones (1); cached
    beside the heads. About 12 s on 2 CPU cores."""
    import shutil

    from .core.acceptance_model import FILE_NAME
    from .core.heads import MedusaHeads
    from .hf.fit_acceptance import fit_acceptance_model
    from .testing.tiny import tiny_prompts

    out = Path(heads_dir).parent / "heads_with_acceptance_model"
    if not (out / FILE_NAME).is_file():
        shutil.copytree(heads_dir, out, dirs_exist_ok=True)
        h = MedusaHeads.from_pretrained(out).eval()
        am = fit_acceptance_model(model, h, tiny_prompts(tokenizer, 160, seed=2), None, max_new_tokens=64, topk=20,
                                  log=lambda *_: None, info={"prompts": "tiny_prompts(160, seed=2)"})
        am.save(out / FILE_NAME)
    return str(out)


def _setup(model: str, heads: str | None, num_prompts: int, cache_dir: str | None):
    """-> (model, tokenizer, heads, held-out prompts, training-side prompts or None, accuracy or None, labels)."""
    import torch

    from .core.heads import MedusaHeads
    from .testing.tiny import load_tiny_model, tiny_prompts

    if model == "tiny":
        from .bench import _cache_dir
        from .testing.tiny import build_tiny_medusa

        model_dir, heads_dir = build_tiny_medusa(Path(cache_dir) if cache_dir else _cache_dir() / "medusa")
        label = "tiny llama (random weights) + 4 heads trained on its greedy output (testing.build_tiny_medusa)"
        m, tok = load_tiny_model(model_dir)
        heads_dir = heads or _tiny_heads_with_acceptance_model(heads_dir, m, tok)
        h = MedusaHeads.from_pretrained(heads_dir).eval()
        prompts = tiny_prompts(tok, num_prompts, seed=1)  # other cuts than the training prompts (seed 0)
        return m, tok, h, prompts, tiny_prompts(tok, 16, seed=0), None, label, str(heads_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hf.chat_prompts import chat_prompt_ids, held_out_requests, templated_requests

    if model.lower() in ("smollm2", "smollm2-135m-instruct"):
        from .demo import shipped_heads_dir
        from .hf.real_model import build_smollm2

        model_dir = str(build_smollm2(dtype="float32"))
        heads = heads or str(shipped_heads_dir())
        label = "SmolLM2-135M-Instruct (float32)"
    else:
        model_dir, label = model, model
        if heads is None:
            raise ValueError("--heads is required with a model directory")
    tok = AutoTokenizer.from_pretrained(model_dir)
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    h = MedusaHeads.from_pretrained(heads, dtype=torch.float32).eval()
    prompts = [chat_prompt_ids(tok, r) for r in held_out_requests(num_prompts)]
    train_side = templated_requests()  # requests on the training topics (never the held-out ones)
    fit_prompts = [chat_prompt_ids(tok, r) for r in train_side[7::max(1, len(train_side) // 16)][:16]]
    recipe = Path(heads) / "recipe.json"
    acc = json.loads(recipe.read_text()).get("accuracy") if recipe.is_file() else None
    return m, tok, h, prompts, fit_prompts, acc, label, heads


def engine_runs(model_dir: str, heads_dir: str, prompts, static_trees: dict, budgets: Sequence[int],
                ngram_branches: int, max_new_tokens: int, *, concurrencies=(1, 8), log=print) -> dict:
    """tok/s, tokens per step and identity with plain decoding of every method through the vLLM engine.

    Returns ``{method: {str(concurrency): {"tok_s", "tokens_per_step", "identical"}}}``.
    """
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # keep the report readable
    from . import demo_runs as R
    from .core.acceptance_model import FILE_NAME as ACCEPTANCE_MODEL_FILE
    from .vllm_ext.offline import medusa_engine_kwargs

    methods = [R.Method("plain"), R.Method("vLLM ngram (k=4)", {"speculative_config": dict(R.NGRAM_CONFIG)})]
    for n in budgets:
        methods.append(R.Method(f"static_{n}", medusa_engine_kwargs(
            {"heads": heads_dir, "tree": [list(p) for p in static_trees[n]]}), True))
        methods.append(R.Method(f"dynamic_{n}", medusa_engine_kwargs(
            {"heads": heads_dir, "tree": "dynamic", "budget": n}), True))
        if (Path(heads_dir) / ACCEPTANCE_MODEL_FILE).is_file():  # the same trees scored without the learned model
            methods.append(R.Method(f"dynamic_calibrated_{n}", medusa_engine_kwargs(
                {"heads": heads_dir, "tree": "dynamic", "budget": n, "acceptance_model": False}), True))
        if ngram_branches:
            methods.append(R.Method(f"hybrid_{n}", medusa_engine_kwargs(
                {"heads": heads_dir, "tree": "dynamic", "budget": n, "ngram_branches": ngram_branches}), True))
        # the budget as a cap: each step's nodes chosen across the batch from the measured step cost
        methods.append(R.Method(f"{'hybrid' if ngram_branches else 'dynamic'}_auto_{n}", medusa_engine_kwargs(
            {"heads": heads_dir, "tree": "dynamic", "budget": n, "ngram_branches": ngram_branches,
             "tree_schedule": "auto"}), True))
    out: dict = {}
    plain: dict = {}
    for method in R.run_order(methods):
        for res in R.run_method(model_dir, method, prompts, max_new_tokens, dtype="float32",
                                concurrencies=concurrencies):
            if method.name == "plain":
                plain[res.concurrency] = res.token_ids
            out.setdefault(method.name, {})[str(res.concurrency)] = {
                "tok_s": res.tok_s, "tokens_per_step": res.tokens_per_step,
                "identical": R.agreement(res.token_ids, plain.get(res.concurrency, []))}
            log(f"engine {method.name:>18} x{res.concurrency}: {res.tok_s:.1f} tok/s, "
                f"{res.tokens_per_step:.2f} tokens/step")
    return out


def bench_trees(*, model: str = "smollm2", heads: str | None = None, budgets: Sequence[int] = (8, 16),
                num_prompts: int = 8, max_new_tokens: int = 64, ngram_branches: int = 2, topk: int = 20,
                cache_dir: str | None = None, engine: str = "reference", log=print) -> dict:
    """Run the benchmark (see the module docstring); returns the JSON-ready result."""
    import torch

    from .bench import plain_generate
    from .core.acceptance_model import acceptance_model_for
    from .core.calibration import AcceptanceCalibration, calibration_for
    from .core.dynamic_tree import DynamicTreeSpec
    from .core.successor_prior import FILE_NAME as SUCCESSORS_FILE
    from .core.successor_prior import SuccessorCounts
    from .core.tree_fit import expected_accept_length, fit_tree
    from .hf.generate import medusa_generate

    torch.manual_seed(0)
    m, tok, h, prompts, fit_prompts, acc, label, heads_dir = _setup(model, heads, num_prompts, cache_dir)
    if acc is None:
        from .hf.fit_tree import measure_head_accuracy

        acc = measure_head_accuracy(m, h, fit_prompts, max_new_tokens=max_new_tokens, topk=topk).tolist()
        acc_source = "measured on 16 training-side prompts"
    else:
        acc_source = "recipe.json (held-out accuracy of the heads' training run)"
    log(f"model {label}; {len(prompts)} held-out prompts x {max_new_tokens} tokens; heads {heads_dir}")

    t0 = time.perf_counter()
    ref = plain_generate(m, prompts, max_new_tokens)
    plain_s = time.perf_counter() - t0
    tokens = sum(map(len, ref))
    result: dict = {
        "model": label, "heads": heads_dir, "num_prompts": len(prompts), "max_new_tokens": max_new_tokens,
        "engine": "reference decoder (hf.generate, float32, greedy, all prompts batched)",
        "topk": topk, "ngram_branches": ngram_branches, "static_accuracy_source": acc_source,
        "static_tokens_per_step": {}, "static_expected_tokens_per_step": {}, "dynamic_tokens_per_step": {},
        "dynamic_uncalibrated_tokens_per_step": {}, "dynamic_warm_tokens_per_step": {}, "hybrid_tokens_per_step": {},
        "dynamic_heads_only_tokens_per_step": {}, "dynamic_calibrated_tokens_per_step": {},
        "ngram_tokens_per_step": simulate_ngram_tokens_per_step(prompts, ref),
        "tok_s": {"plain": tokens / plain_s}, "identical": {}, "calibration": {},
        "load_average": os.getloadavg()[0], "torch_threads": torch.get_num_threads(),
    }
    log(f"plain: {tokens / plain_s:.1f} tok/s; vLLM ngram (k=4, simulated) {result['ngram_tokens_per_step']:.3f} "
        f"tokens/step")

    succ_path = Path(heads_dir) / SUCCESSORS_FILE
    succ = SuccessorCounts.load(succ_path) if succ_path.is_file() else None
    result["successors"] = (f"{succ_path} ({succ.tokens} tokens)" if succ is not None else
                            "none (the heads directory has no successors.safetensors)")
    result["calibration_prior"] = calibration_for(heads_dir, h.num_heads)[1]
    acc_model, how = acceptance_model_for(heads_dir, h.num_heads, succ)
    result["acceptance_model"] = f"{how} ({acc_model.info})" if acc_model is not None else how

    per_prompt: dict[str, list[tuple[int, int]]] = {}  # method_budget -> per prompt (tokens, steps)

    def run(name: str, budget: int, tree, cal=None, warm: bool = False, successors=None, model=None) -> None:
        if warm:  # the calibration first serves the training-side prompts (a server that has seen traffic)
            medusa_generate(m, h, tree, fit_prompts, max_new_tokens=max_new_tokens, calibration=cal,
                            successors=successors)
        t = time.perf_counter()
        out = medusa_generate(m, h, tree, prompts, max_new_tokens=max_new_tokens, calibration=cal,
                              successors=successors, acceptance_model=model)
        s = time.perf_counter() - t
        tps = out.stats.mean_accepted_tokens_per_step
        per_prompt[f"{name}_{budget}"] = [(sum(t), len(t)) for t in out.stats.step_tokens]
        same = sum(a == b for a, b in zip(out.sequences, ref))
        result[f"{name}_tokens_per_step"][str(budget)] = tps
        result["tok_s"][f"{name}_{budget}"] = sum(map(len, out.sequences)) / s
        result["identical"][f"{name}_{budget}"] = same
        extra = f"; {cal.describe()}" if cal is not None else ""
        if cal is not None:
            result["calibration"][f"{name}_{budget}"] = cal.describe()
        log(f"{name:>22} {budget:>3}: {tps:.3f} tokens/step, {result['tok_s'][f'{name}_{budget}']:.1f} tok/s, "
            f"identical {same}/{len(prompts)}{extra}")

    static_trees = {}
    for n in budgets:
        paths = static_trees[n] = fit_tree(acc, n, max_depth=h.num_heads, max_children=min(topk, len(acc[0])))
        result["static_expected_tokens_per_step"][str(n)] = expected_accept_length(paths, acc)
        run("static", n, [list(p) for p in paths])
        run("dynamic_uncalibrated", n, DynamicTreeSpec(budget=n, topk=topk))
        if succ is not None:
            run("dynamic_heads_only", n, DynamicTreeSpec(budget=n, topk=topk), AcceptanceCalibration(h.num_heads))
        run("dynamic", n, DynamicTreeSpec(budget=n, topk=topk), calibration_for(heads_dir, h.num_heads)[0],
            successors=succ, model=acc_model)
        if acc_model is not None:
            run("dynamic_calibrated", n, DynamicTreeSpec(budget=n, topk=topk),
                calibration_for(heads_dir, h.num_heads)[0], successors=succ)
        run("dynamic_warm", n, DynamicTreeSpec(budget=n, topk=topk), AcceptanceCalibration(h.num_heads), warm=True,
            successors=succ)
        if ngram_branches:
            run("hybrid", n, DynamicTreeSpec(budget=n, topk=topk, ngram_branches=ngram_branches),
                calibration_for(heads_dir, h.num_heads)[0], successors=succ, model=acc_model)
    result["dynamic_over_static"] = {b: result["dynamic_tokens_per_step"][b] / result["static_tokens_per_step"][b]
                                     for b in result["static_tokens_per_step"]}
    if ngram_branches:
        result["hybrid_over_static"] = {b: result["hybrid_tokens_per_step"][b] / result["static_tokens_per_step"][b]
                                        for b in result["static_tokens_per_step"]}
    # how much each ratio depends on which held-out prompts were drawn (bootstrap over prompts, paired)
    for name in ("dynamic", "hybrid") if ngram_branches else ("dynamic",):
        result[f"{name}_over_static_ci95"] = {
            b: paired_ratio_interval(per_prompt[f"{name}_{b}"], per_prompt[f"static_{b}"])
            for b in result["static_tokens_per_step"]}
    if engine == "vllm":
        model_dir = m.name_or_path if hasattr(m, "name_or_path") else str(m.config._name_or_path)
        result["engine_runs"] = engine_runs(str(model_dir), heads_dir, prompts, static_trees, budgets,
                                            ngram_branches, max_new_tokens, log=log)
        result["engine_load_average"] = os.getloadavg()[0]
    return result


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return vals


def add_trees_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench trees`` options."""
    p.add_argument("--model", default="smollm2", help="smollm2 (default), tiny (the test models' toy model), or a "
                                                      "model directory (with --heads)")
    p.add_argument("--heads", help="Medusa heads directory (default: the shipped heads for smollm2)")
    p.add_argument("--budgets", type=_ints, default=[8, 16], help="node budgets (default 8,16)")
    p.add_argument("--num-prompts", type=int, default=8, help="held-out prompts (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    p.add_argument("--ngram-branches", type=int, default=2, help="n-gram branches of the hybrid rows (default 2)")
    p.add_argument("--topk", type=int, default=20, help="ranks per head of the dynamic lattice (default 20, as "
                                                        "tree: dynamic); the static tree uses the measured ranks")
    p.add_argument("--engine", default="reference", choices=["reference", "vllm"],
                   help="vllm: also run every method through the vLLM engine (tok/s at 1 and 8 requests at once)")
    p.add_argument("--cache-dir", help="--model tiny: where the toy model is built/cached (the tests' cache is "
                                       ".pytest_cache/d/medusa_tiny/medusa)")
    p.add_argument("--json", default="benchmarks/results/trees.json", help="where to write the results")


def run_trees(args: argparse.Namespace) -> int:
    from .bench import BenchError, _log, _write_json

    if args.num_prompts < 1 or args.max_new_tokens < 2 or args.ngram_branches < 0 or args.topk < 1:
        raise BenchError("--num-prompts must be >= 1, --max-new-tokens >= 2, --ngram-branches >= 0 and --topk >= 1")
    res = bench_trees(model=args.model, heads=args.heads, budgets=args.budgets, num_prompts=args.num_prompts,
                      max_new_tokens=args.max_new_tokens, ngram_branches=args.ngram_branches, topk=args.topk,
                      cache_dir=args.cache_dir, engine=args.engine, log=_log)
    path = _write_json(args.json, res)
    print(f"wrote {path}")
    for b in map(str, args.budgets):
        lo, hi = res["dynamic_over_static_ci95"][b]
        line = (f"budget {b:>3}: static {res['static_tokens_per_step'][b]:.3f}, dynamic "
                f"{res['dynamic_tokens_per_step'][b]:.3f} ({res['dynamic_over_static'][b]:.3f}x, 95 % over prompts "
                f"{lo:.3f}-{hi:.3f}), warm-calibrated "
                f"{res['dynamic_warm_tokens_per_step'][b]:.3f}")
        if args.ngram_branches:
            line += f", hybrid {res['hybrid_tokens_per_step'][b]:.3f} ({res['hybrid_over_static'][b]:.2f}x)"
        print(line + " tokens/step")
    print(f"vLLM ngram (k=4, simulated): {res['ngram_tokens_per_step']:.3f} tokens/step")
    return 0
