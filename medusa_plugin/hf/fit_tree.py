"""Measure Medusa head accuracy on a Hugging Face model and fit a tree to it (``medusa-plugin fit-tree``).

Accuracy is measured the way upstream's ``heads_accuracy.py`` does, teacher-forced on the model's own greedy output:
for every position ``t`` whose next token ``t+1`` is generated (``t`` from the last prompt token on), rank ``r`` of
head ``k`` at ``t`` is a hit when it equals the generated token ``t+k+2``; a step of Medusa decoding sees exactly
these hidden states when every earlier draft was accepted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from medusa_plugin.core.tree_fit import TreeFitError, accuracy_from_topk, expected_accept_length, fit_tree
from medusa_plugin.hf.base_model import (DTYPES, last_hidden_state, lm_head_of, load_model, resolve_device,
                                         root_embeds_of)
from medusa_plugin.hf.distill import self_distill
from medusa_plugin.hf.errors import TrainError
from medusa_plugin.hf.samples import distill_prompts, load_samples, read_jsonl

TABLE_BUDGETS = (8, 16, 32, 64)


@torch.no_grad()
def measure_head_accuracy(model: nn.Module, heads: nn.Module, prompts: list[list[int]], *, max_new_tokens: int = 64,
                          topk: int = 10, batch_size: int = 8) -> Tensor:
    """Marginal per-rank head accuracy [K, topk] float64: ``acc[k, r]`` = fraction of positions where the rank-``r``
    token of head ``k`` equals the token the model emitted ``k+2`` positions later (greedy, teacher-forced on the
    model's own continuation of each prompt). ``acc.cumsum(-1)`` is the usual top-k accuracy. Heads that never
    had a target (continuations shorter than ``k+2`` tokens) get zeros."""
    vocab = lm_head_of(model).weight.shape[0]
    if not 1 <= topk <= vocab:
        raise TrainError(f"topk={topk}: must be between 1 and the vocabulary size {vocab}")
    heads.eval()
    seqs = self_distill(model, prompts, max_new_tokens, batch_size=batch_size)
    K = heads.num_heads
    hits = torch.zeros(K, topk, dtype=torch.float64)
    counts = torch.zeros(K, dtype=torch.float64)
    device = next(model.parameters()).device
    lm_head = None if heads.own_lm_head else lm_head_of(model)
    root_embeds = root_embeds_of(model, heads)
    for prompt, seq in zip(prompts, seqs):
        n, start = len(seq), len(prompt) - 1
        ids = torch.tensor([seq], device=device)
        # position t's root is token t+1, so the last position (no root) is left out
        logits = heads(last_hidden_state(model, ids)[0, :-1], lm_head=lm_head,
                       root_embeds=root_embeds(ids[0, 1:]))  # [n-1, K, V]
        for k in range(K):
            stop = n - k - 2  # hidden positions t in [start, stop) have a target t+k+2 < n
            if stop <= start:
                continue
            top = logits[start:stop, k].float().topk(topk, dim=-1).indices  # [m, topk]
            target = ids[0, start + k + 2:]
            hits[k] += (top == target[:, None]).sum(0).double().cpu()
            counts[k] += stop - start
    return hits / counts.clamp(min=1)[:, None]


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model: Hugging Face hub id or local directory")
    p.add_argument("--heads", help="Medusa heads: local dir/file or hub id (any supported format)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="prompt file: JSONL ('prompt', 'text' or 'conversations' per line, or a JSON "
                                       "string) or plain text, one prompt per line")
    src.add_argument("--data", help="training-style data (see `medusa-plugin train --data`); prompts = the samples' "
                                    "prompts, or the first --prompt-tokens tokens of every 128-token chunk")
    src.add_argument("--accuracy-json", help="fit from published numbers instead of measuring: JSON with cumulative "
                                             "top-k accuracies {'models': {KEY: {'head0': [top1, top2, ...], ...}}}")
    p.add_argument("--accuracy-key", help="model key inside --accuracy-json (e.g. vicuna-7b-v1.3)")
    p.add_argument("--budget", type=int, default=32, help="tree nodes (default 32)")
    p.add_argument("--max-depth", type=int, default=None, help="at most this many levels (default: number of heads)")
    p.add_argument("--topk", type=int, default=10, help="ranks per head measured and usable by the tree (default 10)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens generated per prompt")
    p.add_argument("--max-prompts", type=int, default=None, help="use at most this many prompts")
    p.add_argument("--prompt-tokens", type=int, default=64, help="with --data: tokens per prompt for plain text")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="base model weights; auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--out", default="tree.yaml", help="output YAML (a list of paths, usable as `tree:`)")
    p.add_argument("--save-accuracy", help="also write the measured cumulative top-k accuracies as JSON "
                                           "(the --accuracy-json format) to refit later without the model")


def _read_prompts(path: Path, tokenizer) -> list[list[int]]:
    """One prompt per non-empty line: JSONL records (their prompt, else their whole text) or plain text lines."""
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    if path.suffix in (".jsonl", ".json"):
        return [prompt or ids for prompt, ids in read_jsonl(path, tokenizer)]
    return [tokenizer(line)["input_ids"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_accuracy_json(path: str | Path, key: str | None) -> tuple[list[list[float]], str]:
    """Marginal accuracies [K, R] and a source label from a cumulative top-k JSON (``head_accuracy.json`` format,
    or a bare ``{'head0': [...]}`` / ``[[...], ...]``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--accuracy-json {path}: no such file")
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "models" in data:
        models = data["models"]
        if key is None:
            if len(models) != 1:
                raise TreeFitError(f"{path} holds several models; pick one with --accuracy-key "
                                   f"({', '.join(sorted(models))})")
            key = next(iter(models))
        if key not in models:
            raise TreeFitError(f"--accuracy-key {key!r} is not in {path}; choose one of {', '.join(sorted(models))}")
        data = models[key]
    return accuracy_from_topk(data), f"{path}" + (f" [{key}]" if key else "")


def _tree_yaml(choices, acc, source: str, expected: float) -> str:
    depth = max(map(len, choices))
    lines = [f"# Medusa tree fitted by `medusa-plugin fit-tree`: {len(choices)} nodes, depth {depth}, "
             f"{expected:.3f} expected tokens/step (independence model)",
             f"# head accuracy (marginal per rank, top-1 first; cumulative in brackets) from {source}:"]
    for k, row in enumerate(acc):
        cum = torch.tensor(row).cumsum(0).tolist()
        lines.append(f"#   head{k}: " + " ".join(f"{a:.4f}" for a in row) + f"   [top-1 {cum[0]:.4f}, "
                     f"top-{len(cum)} {cum[-1]:.4f}]")
    lines += [f"- [{', '.join(map(str, p))}]" for p in choices]
    return "\n".join(lines) + "\n"


def _measure(args: argparse.Namespace) -> tuple[list[list[float]], str]:
    from medusa_plugin.core.heads import MedusaHeads

    if not args.model or not args.heads or not (args.prompts or args.data):
        raise TrainError("give --model, --heads and --prompts (or --data) to measure accuracies, "
                         "or --accuracy-json to fit from published numbers")
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, device, args.dtype)
    vocab, hidden = lm_head_of(model).weight.shape
    heads = MedusaHeads.from_pretrained(args.heads, base_hidden_size=hidden, base_vocab_size=vocab, device=device)
    if args.prompts:
        prompts = _read_prompts(Path(args.prompts), tokenizer)
    else:
        prompts = distill_prompts(load_samples(args.data, tokenizer), prompt_tokens=args.prompt_tokens,
                                  chunk_tokens=128)
    prompts = [p for p in prompts if p][:args.max_prompts]
    if not prompts:
        raise TrainError("no prompts found; check --prompts / --data")
    print(f"measuring {heads.num_heads} heads on {len(prompts)} prompts x {args.max_new_tokens} greedy tokens")
    acc = measure_head_accuracy(model, heads, prompts, max_new_tokens=args.max_new_tokens, topk=args.topk,
                                batch_size=args.batch_size)
    source = f"{len(prompts)} prompts, {args.heads} on {args.model}"
    if args.save_accuracy:
        cum = acc.cumsum(-1)
        doc = {"source": f"medusa-plugin fit-tree: {source}",
               "models": {Path(str(args.heads)).name or "heads": {f"head{k}": [round(x, 6) for x in cum[k].tolist()]
                                                                   for k in range(cum.shape[0])}}}
        Path(args.save_accuracy).write_text(json.dumps(doc, indent=1) + "\n")
    return acc.tolist(), source


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (TrainError, TreeFitError) as e:
        print(f"medusa-plugin fit-tree: error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.budget < 1:
        raise TreeFitError(f"--budget must be >= 1 (got {args.budget})")
    if args.accuracy_json:
        acc, source = load_accuracy_json(args.accuracy_json, args.accuracy_key)
    else:
        acc, source = _measure(args)
    fit = lambda b: fit_tree(acc, b, max_depth=args.max_depth, max_children=args.topk)  # noqa: E731
    print("top-1 accuracy per head: " + " ".join(f"{row[0]:.3f}" for row in acc))
    print(f"{'budget':>8} {'nodes':>6} {'depth':>6} {'tokens/step':>12}")
    for b in sorted(set(TABLE_BUDGETS) | {args.budget}):
        tree = fit(b)
        mark = "  <- chosen" if b == args.budget else ""
        print(f"{b:>8} {len(tree):>6} {max(map(len, tree), default=0):>6} "
              f"{expected_accept_length(tree, acc):>12.3f}{mark}")
    from medusa_plugin.core.tree import MedusaTree

    shipped = MedusaTree.from_name("mc_sim_7b_63").choices
    print(f"for comparison, shipped mc_sim_7b_63: {len(shipped)} nodes, depth {max(map(len, shipped))}, "
          f"{expected_accept_length(shipped, acc):.3f} tokens/step")
    choices = fit(args.budget)
    if not choices:
        raise TreeFitError("every head accuracy is 0: no node would ever be accepted; train the heads longer or "
                           "check that --heads belong to --model")
    Path(args.out).write_text(_tree_yaml(choices, acc, source, expected_accept_length(choices, acc)))
    print(f"wrote {args.out} ({len(choices)} nodes); use it with `tree: {args.out}`")
    return 0
