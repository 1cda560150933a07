"""``medusa-plugin fit-acceptance``: fit the learned node-acceptance model of dynamic trees
(:mod:`medusa_plugin.core.acceptance_model`) for a model and its Medusa heads, and write
``acceptance_model.safetensors`` next to the heads (``tree: dynamic`` then uses it; ``acceptance_model: false``
turns it off).

The examples are the heads' top-``topk`` lattice at every position of the target's own greedy continuations of the
prompts, teacher-forced (as ``fit-tree`` measures accuracy): a node counts when the target accepted its parent. Use
prompts the heads were **not** trained on: on their training prompts the heads are more confident than they will be
in serving, and so would the model be. ``--model smollm2`` defaults to 160 such prompts (training-topic requests the
shipped heads never saw).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from medusa_plugin.core.acceptance_model import (FILE_NAME, AcceptanceModelError, NodeAcceptanceModel,
                                                 fit_node_acceptance, training_examples)
from medusa_plugin.core.successor_prior import FILE_NAME as SUCCESSORS_FILE
from medusa_plugin.core.successor_prior import SuccessorCounts, SuccessorPriorError
from medusa_plugin.hf.base_model import DTYPES, last_hidden_state, lm_head_of, load_model, resolve_device, \
    root_embeds_of
from medusa_plugin.hf.distill import self_distill
from medusa_plugin.hf.errors import TrainError

__all__ = ["lattice_positions", "fit_acceptance_model", "unseen_training_requests", "add_arguments", "run"]


@torch.no_grad()
def lattice_positions(model, heads, prompts: list[list[int]], *, max_new_tokens: int = 64, topk: int = 20,
                      batch_size: int = 8) -> list[tuple]:
    """The heads' top-``topk`` at every generated position of the model's greedy continuations of ``prompts``.

    Returns ``[(probs [K, topk] float32 numpy, ids [K, topk] int64 numpy, truth [K] ints, context)]``: position
    ``t`` (the hidden state of token ``t``, root ``t+1``) for every ``t`` from the last prompt token on whose ``K``
    next tokens after the root were generated; ``context`` is the sequence up to the root.
    """
    heads.eval()
    k = heads.num_heads
    lm_head = None if heads.own_lm_head else lm_head_of(model)
    embeds = root_embeds_of(model, heads)
    dev = next(model.parameters()).device
    out = []
    for prompt, seq in zip(prompts, self_distill(model, prompts, max_new_tokens, batch_size=batch_size)):
        ids = torch.tensor([seq], device=dev)
        logits = heads(last_hidden_state(model, ids)[0, :-1].to(heads.dtype), lm_head=lm_head,
                       root_embeds=embeds(ids[0, 1:]))
        top = logits.float().softmax(-1).topk(topk, dim=-1)
        p, i = top.values.cpu().numpy(), top.indices.cpu().numpy()
        for t in range(len(prompt) - 1, len(seq) - k - 1):
            out.append((p[t], i[t], seq[t + 2:t + 2 + k], seq[:t + 2]))
    return out


def fit_acceptance_model(model, heads, prompts: list[list[int]], successors: SuccessorCounts | None, *,
                         max_new_tokens: int = 64, topk: int = 20, batch_size: int = 8, log=print,
                         info: dict | None = None) -> NodeAcceptanceModel:
    """Collect :func:`lattice_positions` and fit :func:`~medusa_plugin.core.acceptance_model.fit_node_acceptance`.

    Raises:
        AcceptanceModelError: no usable position (continuations shorter than the heads reach).
    """
    t0 = time.perf_counter()
    positions = lattice_positions(model, heads, prompts, max_new_tokens=max_new_tokens, topk=topk,
                                  batch_size=batch_size)
    if not positions:
        raise AcceptanceModelError(f"no position to learn from: the continuations are shorter than the "
                                   f"{heads.num_heads} heads reach; raise --max-new-tokens")
    x, y = training_examples(positions, heads.num_heads, successors)
    log(f"{len(positions)} positions of {len(prompts)} prompts, {len(x)} nodes ({int(y.sum())} accepted) in "
        f"{time.perf_counter() - t0:.0f} s")
    meta = {"successors": successors is not None, "prompts": len(prompts), "positions": len(positions),
            "max_new_tokens": max_new_tokens, "topk": topk}
    meta.update(info or {})
    return fit_node_acceptance(x, y, heads.num_heads, info=meta)


def unseen_training_requests(n: int, *, seed: int = 0, skip: int = 1600) -> list[str]:
    """``n`` chat requests on the training topics that the chat recipe with ``num_prompts = skip`` (and no
    model-written requests) never trained on: its shuffled templated requests after the first ``skip``."""
    import random

    from medusa_plugin.hf.chat_prompts import templated_requests

    pool = templated_requests()
    random.Random(seed).shuffle(pool)
    return pool[skip:skip + n]


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model: local directory, hub id, or 'smollm2' (the shipped "
                                                  "heads' SmolLM2-135M-Instruct, built from the registry package)")
    p.add_argument("--heads", help="Medusa heads directory (default for smollm2: the shipped heads)")
    p.add_argument("--prompts", help="prompt file: JSONL or plain text, one prompt per line (as `fit-tree`); use "
                                     "prompts the heads were not trained on (default for smollm2: 160 of those)")
    p.add_argument("--max-prompts", type=int, default=160, help="use at most this many prompts (default 160)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    p.add_argument("--topk", type=int, default=20, help="ranks per head (default 20, as tree: dynamic)")
    p.add_argument("--successors", help="successor counts the model will be used with (default: "
                                        "successors.safetensors next to the heads, if any)")
    p.add_argument("--no-successors", action="store_true", help="fit without successor levels (for "
                                                                "`successors: false`)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, ...")
    p.add_argument("--dtype", default="float32", choices=["auto", *DTYPES], help="base model weights (default "
                                                                                 "float32)")
    p.add_argument("--out", help=f"output file (default: HEADS/{FILE_NAME})")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (TrainError, AcceptanceModelError, SuccessorPriorError, FileNotFoundError) as e:
        print(f"medusa-plugin fit-acceptance: error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from medusa_plugin.core.heads import MedusaHeads
    from medusa_plugin.hf.fit_tree import _read_prompts

    if args.max_prompts < 1 or args.max_new_tokens < 2 or args.topk < 1 or args.batch_size < 1:
        raise TrainError("--max-prompts must be >= 1, --max-new-tokens >= 2, --topk >= 1 and --batch-size >= 1")
    if args.no_successors and args.successors:
        raise TrainError("--successors and --no-successors contradict each other: give one")
    smollm2 = args.model.lower() in ("smollm2", "smollm2-135m-instruct")
    if smollm2:
        from medusa_plugin.demo import shipped_heads_dir

        heads_dir = args.heads or str(shipped_heads_dir())
    else:
        heads_dir = args.heads
        if not heads_dir:
            raise TrainError("--heads is required with a model other than smollm2")
        if not args.prompts:
            raise TrainError("--prompts is required with a model other than smollm2 (prompts the heads were not "
                             "trained on)")
    # every input check before the model loads and the continuations are generated (minutes)
    heads_path = Path(heads_dir)
    out = Path(args.out) if args.out else heads_path / FILE_NAME
    if not args.out and not heads_path.is_dir():
        raise TrainError(f"--heads {heads_dir} is not a local directory: give --out for the model file")
    if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise TrainError(f"cannot write {out}: give --out a file path in an existing, writable directory")
    if args.prompts and not Path(args.prompts).is_file():
        raise TrainError(f"--prompts {args.prompts}: no such file")
    successors = None
    if not args.no_successors:
        path = Path(args.successors) if args.successors else heads_path / SUCCESSORS_FILE
        if args.successors or path.is_file():
            successors = SuccessorCounts.load(path)
    if smollm2:
        from medusa_plugin.hf.real_model import build_smollm2

        model_name = str(build_smollm2(dtype="float32"))
    else:
        model_name = args.model
    device = resolve_device(args.device)
    model, tokenizer = load_model(model_name, device, args.dtype)
    vocab, hidden = lm_head_of(model).weight.shape
    heads = MedusaHeads.from_pretrained(heads_dir, base_hidden_size=hidden, base_vocab_size=vocab, device=device,
                                        dtype=next(model.parameters()).dtype)
    if args.topk > heads.vocab_size:
        raise TrainError(f"--topk {args.topk} exceeds the heads' vocabulary ({heads.vocab_size})")
    if args.prompts:
        prompts = _read_prompts(Path(args.prompts), tokenizer)
    else:
        from medusa_plugin.hf.chat_prompts import chat_prompt_ids

        prompts = [chat_prompt_ids(tokenizer, r) for r in unseen_training_requests(args.max_prompts)]
    prompts = [p for p in prompts if p][:args.max_prompts]
    if not prompts:
        raise TrainError("no prompts found; check --prompts")
    print(f"fitting the acceptance model of {heads.num_heads} heads on {len(prompts)} prompts x "
          f"{args.max_new_tokens} greedy tokens (successor levels: {'yes' if successors else 'no'})")
    fitted = fit_acceptance_model(model, heads, prompts, successors, max_new_tokens=args.max_new_tokens,
                                  topk=args.topk, batch_size=args.batch_size, info={"model": Path(model_name).name})
    try:
        fitted.save(out)
    except Exception as e:  # noqa: BLE001 - the fit is done: say where it could not go, in one line
        raise TrainError(f"cannot write {out} ({type(e).__name__}: {e}); rerun with --out FILE") from None
    print(f"wrote {out}; `tree: dynamic` uses it when it lies next to the heads (acceptance_model: true)")
    return 0
