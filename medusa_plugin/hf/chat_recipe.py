"""The chat recipe: strong Medusa heads for a chat model, trained on a CPU (``medusa-plugin train --recipe chat``).

Stages (each cached in the work directory, so an interrupted run resumes where it stopped, and a run with more
prompts generates and embeds only the new ones):

1. requests: the target model writes user requests from the shipped topic list, plus topic x task templates
   (:mod:`.chat_prompts`); held-out topics are kept apart for evaluation.
2. self-distillation: the model's own greedy answers, through vLLM when installed (:mod:`.batch_generate`).
3. hidden states of the frozen model over prompt + answer, answer rows only (:mod:`.hidden_cache`): kept while
   vLLM generates stage 2 (``vllm_ext.hidden_capture``), else one forward pass of transformers.
4. a truncated draft vocabulary: the most frequent answer tokens (:mod:`.draft_vocab`).
5. heads trained on the cached states, hard + soft (KL) targets (:mod:`.state_trainer`); by default they also
   read the root token (``MedusaHeads`` ``root_input``).
6. evaluation on held-out prompts: per-rank accuracy, and a tree of ``tree_budget`` nodes fitted to it.

Outputs in ``out_dir``: the heads (canonical format, ``token_map``, bf16 by default), ``tree.json`` (the fitted
tree's paths), ``successors.safetensors``, ``calibration.json`` and ``acceptance_model.safetensors`` (what ``tree:
dynamic`` starts from, :mod:`.dynamic_priors`; the acceptance model is fitted on up to 160 training-topic requests
after the first ``num_prompts``, which the heads never see) and ``recipe.json`` (settings, data sizes, timings,
accuracies).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from medusa_plugin.core.head_files import RECIPE_FILE as REPORT_FILE

from .errors import TrainError

TREE_FILE = "tree.json"
ACCEPTANCE_PROMPTS = 160  # unseen training-topic requests the acceptance model of dynamic trees is fitted on


@dataclass
class ChatRecipe:
    """Settings of :func:`run_chat_recipe`. Sizes are counts of prompts / tokens / optimiser steps."""

    num_prompts: int = 2000          # training prompts (model-written first, then templated)
    written_per_topic: int = 2       # model-written requests per training topic (0: templated requests only)
    eval_prompts: int = 48           # held-out prompts (held-out topics) for accuracy and tree fitting
    answer_tokens: int = 160         # max new tokens per distilled answer
    vocab_size: int = 4096           # draft vocabulary (0 = the full vocabulary)
    num_heads: int = 4
    num_layers: int = 1
    steps: int = 1500
    batch_size: int = 512            # cached rows per step
    lr: float = 1e-3
    kl_weight: float = 0.5
    # "frozen" (False): one shared projection, the target's lm_head rows; "shared": that one trained too (same small
    # file); "per-head" (True): one trained per head (4x the file). Shared bought +0.025 held-out head-0 top-1 on
    # the 600-prompt data, per-head +0.03 (state_trainer)
    train_projection: bool | str = False
    # heads that also read the root token's embedding (MedusaHeads root_input): +0.07 held-out head-0 top-1 on the
    # 600-prompt data (state_trainer); vLLM's built-in Medusa cannot run them (convert --to vllm refuses)
    root_input: bool = True
    tree_budget: int = 16
    heads_dtype: str = "bfloat16"
    gen_engine: str = "auto"
    # Generation dtype (self-distillation and request writing). float32 by default: on CPUs without native bf16
    # (AVX2 only) vLLM's bf16 linear layers fall back to torch, and batched decoding ran 3x slower than in fp32
    # (64 chat prompts x 48 tokens: 11.7 vs 34.5 tok/s, engine start included). The answers feed a bf16 target only
    # through their tokens; hidden states are computed in fp32 either way.
    gen_dtype: str = "float32"
    seed: int = 0

    def check(self) -> None:
        if self.written_per_topic < 0:
            raise TrainError(f"--written-per-topic must be >= 0, got {self.written_per_topic}")
        for name in ("num_prompts", "eval_prompts", "answer_tokens", "num_heads", "num_layers", "steps",
                     "batch_size", "tree_budget"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.vocab_size < 0:
            raise TrainError(f"--vocab-size must be >= 0 (0 = full vocabulary), got {self.vocab_size}")
        from .state_trainer import projection_mode

        self.train_projection = projection_mode(self.train_projection)
        if self.gen_dtype not in ("float32", "bfloat16", "float16"):
            raise TrainError(f"--gen-dtype must be float32, bfloat16 or float16, got {self.gen_dtype!r}")


@dataclass
class RecipeReport:
    settings: dict
    timings_s: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    head_top1: list = field(default_factory=list)
    accuracy: list = field(default_factory=list)  # [K][10] marginal per rank, held-out
    tree: list = field(default_factory=list)
    expected_tokens_per_step: float = 0.0


def interleave(a: list, b: list) -> list:
    """a[0], b[0], a[1], b[1], ... then the rest of the longer list (model-written and templated requests mixed,
    so any prefix of the request list holds both kinds)."""
    out = [x for pair in zip(a, b) for x in pair]
    return out + a[len(b):] + b[len(a):]


def _say(msg: str) -> None:
    print(msg, flush=True)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def distilled_chats(model_dir, tokenizer, request_sets: dict[str, list[str]], work: Path, *, answer_tokens: int,
                    engine: str, dtype: str = "float32", progress: bool = True,
                    captured: dict[int, "torch.Tensor"] | None = None) -> tuple[dict[str, list[dict]], float]:
    """Greedy answers of the model to each named request list, ``{"request", "prompt_ids", "answer_tokens",
    "answer_ids"}`` per request, cached in ``work/<name>.jsonl``. Answers already in any ``work/*.jsonl`` for the
    same request, prompt tokens and length limit are reused (rows written before the limit was recorded count as
    generated with this one when they fit it); the others are generated together (one engine, one continuous
    batch). With ``captured`` (a dict) and the vLLM engine, the model's hidden states over each new answer are kept
    while it is generated (``vllm_ext.hidden_capture``) and stored in it by ``hidden_cache.sample_hash``: the
    separate hidden-state pass then skips them. Returns ({name: rows}, seconds spent generating, 0 when all were
    cached)."""
    from .batch_generate import generate
    from .chat_prompts import chat_prompt_ids

    # every answer already generated (in any list of this work directory) for the same prompt tokens and length
    # limit is reused, so a rerun with more prompts generates only the new ones
    known: dict[str, dict] = {}
    for path in sorted(work.glob("*.jsonl")):
        for row in _read_jsonl(path):
            if {"request", "prompt_ids", "answer_ids"} <= set(row) and \
                    row.get("answer_tokens", len(row["answer_ids"])) <= answer_tokens:
                known.setdefault(row["request"], row)
    prompt_ids = {name: [chat_prompt_ids(tokenizer, r) for r in reqs] for name, reqs in request_sets.items()}
    todo = [(name, i) for name, reqs in request_sets.items() for i, r in enumerate(reqs)
            if not (r in known and known[r]["prompt_ids"] == prompt_ids[name][i]
                    and known[r].get("answer_tokens", answer_tokens) == answer_tokens)]
    fresh: dict[tuple[str, int], list[int]] = {}
    seconds = 0.0
    if todo:
        prompts = [prompt_ids[name][i] for name, i in todo]
        gen = generate(model_dir, prompts, answer_tokens, engine=engine, dtype=dtype, progress=progress,
                       desc="self-distillation", capture_hidden=captured is not None)
        if captured is not None and gen.hidden is not None:
            from .hidden_cache import sample_hash

            captured.update({sample_hash(p, a): h for p, a, h in zip(prompts, gen.continuations, gen.hidden)})
        _say(f"  self-distillation: {len(todo)} new answers, {gen.num_tokens} tokens in {gen.seconds:.0f} s "
             f"({gen.tokens_per_s:.1f} tok/s, {gen.engine})")
        fresh = dict(zip(todo, gen.continuations))
        seconds = gen.seconds
    out: dict[str, list[dict]] = {}
    for name, reqs in request_sets.items():
        out[name] = [{"request": r, "prompt_ids": prompt_ids[name][i], "answer_tokens": answer_tokens,
                      "answer_ids": fresh[(name, i)] if (name, i) in fresh else known[r]["answer_ids"]}
                     for i, r in enumerate(reqs)]
        _write_jsonl(work / f"{name}.jsonl", out[name])
    return out, seconds


def run_chat_recipe(model_dir: str | os.PathLike, out_dir: str | os.PathLike, recipe: ChatRecipe, *,
                    work_dir: str | os.PathLike | None = None, progress: bool = True) -> RecipeReport:
    """Run the whole recipe (module docstring) for the chat model in ``model_dir``; returns the report (also written
    to ``out_dir/recipe.json``). ``work_dir`` (default ``out_dir/work``) keeps the stage caches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medusa_plugin.core.tree_fit import expected_accept_length, fit_tree

    from . import chat_prompts as C
    from .base_model import lm_head_of
    from .draft_vocab import coverage, frequent_token_map
    from .hidden_cache import load_or_compute
    from .state_trainer import head_accuracy_on_states, train_on_states

    recipe.check()
    out, work = Path(out_dir), Path(work_dir) if work_dir else Path(out_dir) / "work"
    work.mkdir(parents=True, exist_ok=True)
    report = RecipeReport(settings=asdict(recipe))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    t_all = time.perf_counter()

    # 1. requests
    req_path = work / "requests.json"
    if req_path.is_file():
        requests = json.loads(req_path.read_text())
    else:
        t0 = time.perf_counter()
        written = (C.synthesize_requests(model_dir, tokenizer, per_topic=recipe.written_per_topic,
                                         engine=recipe.gen_engine, dtype=recipe.gen_dtype, seed=recipe.seed,
                                         progress=progress)
                   if recipe.written_per_topic else [])
        templated = C.templated_requests()
        random.Random(recipe.seed).shuffle(templated)
        requests = C.dedupe(interleave(written, templated))
        report.timings_s["requests"] = time.perf_counter() - t0
        req_path.write_text(json.dumps(requests, indent=0))
        _say(f"  requests: {len(written)} written by the model + {len(templated)} templated -> {len(requests)} unique")
    # requests the heads never train on: what the acceptance model of dynamic trees is fitted on (step 7)
    unseen = requests[recipe.num_prompts:recipe.num_prompts + ACCEPTANCE_PROMPTS]
    requests = requests[:recipe.num_prompts]
    random.Random(recipe.seed + 1).shuffle(requests)
    held_out = C.held_out_requests(recipe.eval_prompts, seed=recipe.seed + 1)

    # 2. self-distillation of the training and the held-out prompts, in one engine run (which also keeps the hidden
    # states of stage 3 on vLLM)
    captured: dict = {}
    chats, report.timings_s["self_distillation"] = distilled_chats(
        model_dir, tokenizer, {"train": requests, "eval": held_out}, work, answer_tokens=recipe.answer_tokens,
        engine=recipe.gen_engine, dtype=recipe.gen_dtype, progress=progress, captured=captured)
    train_rows, eval_rows = chats["train"], chats["eval"]
    answers = [r["answer_ids"] for r in train_rows]
    report.data.update(train_prompts=len(train_rows), train_answer_tokens=sum(map(len, answers)),
                       eval_prompts=len(eval_rows), eval_answer_tokens=sum(len(r["answer_ids"]) for r in eval_rows))

    # 3. hidden states (bf16 storage): captured during generation on vLLM, else (and for answers generated by an
    # earlier run without them) one fp32 forward pass of transformers
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    lm_w = lm_head_of(model).weight.detach().float()
    embed_w = model.get_input_embeddings().weight.detach().float() if recipe.root_input else None
    _say(f"  hidden states of the frozen model (answer rows only; {len(captured)} answers captured while generating)")
    train_cache, s1 = load_or_compute(work / "train_hidden.safetensors", model, [r["prompt_ids"] for r in train_rows],
                                      answers, known=captured, progress=progress)
    eval_cache, s2 = load_or_compute(work / "eval_hidden.safetensors", model, [r["prompt_ids"] for r in eval_rows],
                                     [r["answer_ids"] for r in eval_rows], known=captured, progress=progress)
    report.timings_s["hidden_states"] = s1 + s2
    report.data["hidden_states_captured"] = len(captured)
    del model

    # 4. draft vocabulary
    V = lm_w.shape[0]
    eos = tokenizer.eos_token_id
    token_map = frequent_token_map(answers, V, recipe.vocab_size or V, always=[eos] if eos is not None else [])
    report.data.update(draft_vocab=int(token_map.numel()),
                       vocab_coverage_train=coverage(token_map, answers),
                       vocab_coverage_eval=coverage(token_map, [r["answer_ids"] for r in eval_rows]))
    _say(f"  draft vocabulary: {token_map.numel()} tokens, covering {report.data['vocab_coverage_eval']:.3f} of "
         f"held-out answer tokens")

    # 5. heads
    res = train_on_states(train_cache, lm_w, token_map, num_heads=recipe.num_heads, num_layers=recipe.num_layers,
                          steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, kl_weight=recipe.kl_weight,
                          train_projection=recipe.train_projection, seed=recipe.seed, root_input=recipe.root_input,
                          embed_weight=embed_w, progress=progress)
    report.timings_s["training"] = res.seconds
    heads = res.heads

    # 6. held-out accuracy and tree
    acc = head_accuracy_on_states(heads, eval_cache, topk=10, embed_weight=embed_w)
    report.accuracy = acc.tolist()
    report.head_top1 = acc[:, 0].tolist()
    report.tree = [list(c) for c in fit_tree(report.accuracy, recipe.tree_budget, max_children=10)]
    report.expected_tokens_per_step = expected_accept_length(report.tree, report.accuracy)

    heads.base_model_name_or_path = str(model_dir)
    heads.to(getattr(torch, recipe.heads_dtype)).save_pretrained(out)

    # 7. what dynamic trees start from: successor counts of the training chats, a calibration prior fitted by
    # decoding 32 training-side prompts with the saved heads, and the acceptance model fitted on requests of the
    # training topics the heads never saw
    from medusa_plugin.core.heads import MedusaHeads

    from .dynamic_priors import write_dynamic_priors

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    saved = MedusaHeads.from_pretrained(out, dtype=torch.float32).eval()
    report.data["dynamic_priors"] = write_dynamic_priors(
        out, model, saved, [r["prompt_ids"] + r["answer_ids"] for r in train_rows],
        [r["prompt_ids"] for r in train_rows[:32]], budget=recipe.tree_budget,
        acceptance_prompts=[C.chat_prompt_ids(tokenizer, r) for r in unseen],
        max_new_tokens=min(64, recipe.answer_tokens))
    del model
    report.timings_s["dynamic_priors"] = time.perf_counter() - t0
    report.timings_s["total"] = time.perf_counter() - t_all
    (out / TREE_FILE).write_text(json.dumps(report.tree) + "\n")
    (out / REPORT_FILE).write_text(json.dumps(asdict(report), indent=1) + "\n")
    return report
