"""Reference Medusa tree decoding on any Hugging Face causal LM (the correctness oracle for the vLLM path).

One step for a batch of B running requests (``N`` tree nodes, depth ``D``, ``K`` heads):

1. heads(h_last) -> [B, K, V] head logits; ``tree.build_candidates`` -> tree_tokens [B, N+1] (root = last emitted).
2. One forward of the N+1 tree tokens per request on top of the KV cache, with a 4D additive mask (the past keys
   valid for that request + the tree's ancestor mask) and depth-based positions ``cache_len[b] + depth[i]``.
3. ``core.acceptance`` picks the accepted path root=p_0..p_L and the bonus token.
4. KV compaction: the keys/values of p_0..p_L are gathered from the tree slots and scattered to positions
   ``cache_len[b] + j``; ``cache_len[b] += L + 1``. The last hidden state at p_L feeds the heads next step
   (so the verify pass doubles as the head pass: no extra forward).

KV layout: every row of the ``DynamicCache`` has the same physical length T (right padding); request b owns slots
``[0, cache_len[b])`` and the rest is masked out. Finished requests leave the batch (rows are dropped from the cache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from ..core.acceptance import accept, probs_from_logits
from ..core.acceptance_model import NodeAcceptanceModel
from ..core.calibration import AcceptanceCalibration
from ..core.successor_prior import SuccessorCounts
from ..core.dynamic_tree import DynamicTreeSpec, observe_step
from ..core.heads import MedusaHeads
from .base_model import root_embeds_of
from ..core.tree import MedusaTree
from ..core.tree_list import accept_each, stack_attn_bias, stack_depth


class MedusaGenerateError(ValueError):
    """Bad input to :func:`medusa_generate` / :func:`baseline_generate`."""


@dataclass
class MedusaStats:
    """Counters of one :func:`medusa_generate` call.

    steps: batched verify forwards. request_steps: sum over requests of the steps they took part in.
    tokens: new tokens returned (all requests, after eos / max_new_tokens truncation, including the prefill token).
    mean_accepted_tokens_per_step: mean over request-steps of L+1 (accepted drafts + bonus), before truncation.
    acceptance_per_depth: [D] fraction of request-steps that accepted a node at depth d+1 (non-increasing).
    step_tokens: per request, tokens emitted by each verify step (L+1, before truncation); the prefill token is not
        counted, so ``1 + sum(step_tokens[b]) >= len(sequences[b])``.
    wall_s: wall-clock seconds of the call.
    """
    steps: int = 0
    request_steps: int = 0
    tokens: int = 0
    mean_accepted_tokens_per_step: float = 0.0
    acceptance_per_depth: list[float] = field(default_factory=list)
    step_tokens: list[list[int]] = field(default_factory=list)
    wall_s: float = 0.0


@dataclass
class MedusaGenerateOutput:
    sequences: list[list[int]]  # new tokens per request (prompt excluded)
    stats: MedusaStats


def _as_prompts(input_ids) -> list[list[int]]:
    if isinstance(input_ids, Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise MedusaGenerateError(f"input_ids tensor must be [B, T], got shape {tuple(input_ids.shape)}")
        prompts = input_ids.tolist()
    elif isinstance(input_ids, Sequence) and input_ids and all(isinstance(t, int) for t in input_ids):
        prompts = [list(input_ids)]
    else:
        prompts = [list(p) for p in input_ids]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MedusaGenerateError("input_ids must hold at least one request and every prompt at least one token")
    return prompts


def _neg(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def _layers(cache) -> list:
    """The DynamicCache layers holding ``keys`` / ``values`` [B, Hkv, T, Dh]."""
    return list(cache.layers)


def _compact(cache, src: Tensor, dst: Tensor) -> None:
    """For every layer and row b: kv[b, :, dst[b, j]] = kv[b, :, src[b, j]] (all gathers before any scatter)."""
    for layer in _layers(cache):
        for name in ("keys", "values"):
            t = getattr(layer, name)
            hkv, dh = t.shape[1], t.shape[3]
            s = src.view(src.shape[0], 1, -1, 1).expand(-1, hkv, -1, dh)
            d = dst.view(dst.shape[0], 1, -1, 1).expand(-1, hkv, -1, dh)
            t.scatter_(2, d, t.gather(2, s))


def _reshape_cache(cache, rows: Tensor | None, length: int) -> None:
    """Keep only batch ``rows`` (None = all) and the first ``length`` slots of every layer."""
    for layer in _layers(cache):
        for name in ("keys", "values"):
            t = getattr(layer, name)
            if rows is not None:
                t = t.index_select(0, rows)
            setattr(layer, name, t[:, :, :length].contiguous())


def _first_token(rule: str, logits: Tensor, temperature, top_p, top_k, generator) -> Tensor:
    if rule == "greedy":
        return logits.argmax(-1)
    probs = probs_from_logits(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.inference_mode()
def medusa_generate(model, heads: MedusaHeads, tree, input_ids, *, max_new_tokens: int, rule: str = "greedy",
                    temperature=0.0, top_p=None, top_k=None, posterior_threshold: float = 0.09,
                    posterior_alpha: float = 0.3, eos_token_id: int | None = None,
                    generator: torch.Generator | None = None,
                    calibration: AcceptanceCalibration | None = None,
                    successors: SuccessorCounts | None = None,
                    acceptance_model: NodeAcceptanceModel | None = None) -> MedusaGenerateOutput:
    """Medusa tree decoding with ``model`` (a transformers causal LM) and ``heads``.

    Args:
        model: ``AutoModelForCausalLM``-style model whose ``get_decoder()`` returns the base model (last hidden state
            after the final norm) and ``get_output_embeddings()`` the lm_head.
        heads: MedusaHeads reading that last hidden state ([B, H] -> [B, K, V]); K >= tree.max_depth.
        tree: a MedusaTree or any spec ``MedusaTree.load`` accepts (name, file, list, "chain:K"), or a
            ``core.dynamic_tree.DynamicTreeSpec``: then every request gets its own tree each step (dynamic, plus
            n-gram branches from its prompt and output when ``ngram_branches > 0``).
        input_ids: list of prompts (list[int], lengths may differ) or an int64 tensor [B, T] / [T].
        max_new_tokens: new tokens per request (including eos).
        rule: "greedy" (exact), "sampling" (lossless) or "typical" (lossy), see ``core.acceptance``.
        eos_token_id: a request stops after emitting it (tokens after it in an accepted path are dropped).
        calibration: dynamic trees only: head probability -> acceptance, updated online from every step's accepted
            paths (refitted every 8 steps); None: raw head probabilities.
        successors: dynamic trees only: the target text's token n-gram counts; each Medusa node's factor is
            re-scored by its successor level (``core.successor_prior``), with multipliers learnt by ``calibration``.
        acceptance_model: dynamic trees only: a learned node-acceptance model (``core.acceptance_model``) that
            scores every Medusa node instead (from its head probability, successor level and the request's context).
    Returns:
        MedusaGenerateOutput(sequences=list[list[int]] new tokens per request, stats=MedusaStats).
    """
    t0 = time.perf_counter()
    prompts = _as_prompts(input_ids)
    if max_new_tokens < 1:
        raise MedusaGenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if rule not in ("greedy", "sampling", "typical"):
        raise MedusaGenerateError(f"unknown rule {rule!r}: use 'greedy', 'sampling' or 'typical'")
    dev = next(model.parameters()).device
    spec = tree if isinstance(tree, DynamicTreeSpec) else None
    if spec is not None:
        if heads.num_heads < (spec.num_heads or 1):
            raise MedusaGenerateError(f"the dynamic tree uses {spec.num_heads} heads but there are only "
                                      f"{heads.num_heads}: set num_heads <= {heads.num_heads}")
        spec.check_heads(spec.num_heads or heads.num_heads)
        max_depth = spec.max_depth(heads.num_heads)
    else:
        tree = MedusaTree.load(tree).to(dev)
        if heads.num_heads < tree.max_depth:
            raise MedusaGenerateError(f"the tree has depth {tree.max_depth} but the heads only {heads.num_heads}: "
                                      f"use a tree of depth <= {heads.num_heads} (e.g. 'chain:{heads.num_heads}')")
        max_depth = tree.max_depth
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    root_embeds = root_embeds_of(model, heads)
    dtype = lm_head.weight.dtype
    neg = _neg(dtype)
    params = dict(temperature=temperature, top_p=top_p, top_k=top_k, posterior_threshold=posterior_threshold,
                  posterior_alpha=posterior_alpha, generator=generator)

    from transformers import DynamicCache

    b = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    width = int(lens.max())
    ids = torch.zeros(b, width, dtype=torch.int64, device=dev)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, dtype=torch.int64)

    # Prefill: right-padded prompts, causal mask restricted to each request's own tokens.
    cache = DynamicCache(config=model.config)
    ar = torch.arange(width, device=dev)
    ok = (ar.view(1, 1, width) <= ar.view(1, width, 1)) & (ar.view(1, 1, width) < lens.view(b, 1, 1))
    mask = torch.zeros(b, 1, width, width, dtype=dtype, device=dev).masked_fill_(~ok.unsqueeze(1), neg)
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=ar.expand(b, width), past_key_values=cache,
                     use_cache=True).last_hidden_state
    rows = torch.arange(b, device=dev)
    h_last = hidden[rows, lens - 1]  # [B, H]
    root = _first_token(rule, lm_head(h_last), temperature, top_p, top_k, generator)

    out: list[list[int]] = [[int(t)] for t in root.tolist()]
    step_tokens: list[list[int]] = [[] for _ in range(b)]
    per_depth = torch.zeros(max_depth, dtype=torch.int64)
    stats = MedusaStats()

    def finished(i: int) -> bool:
        return len(out[i]) >= max_new_tokens or (eos_token_id is not None and out[i][-1] == eos_token_id)

    active = [i for i in range(b) if not finished(i)]  # request index of each batch row
    keep = torch.tensor([i for i in range(b) if i in set(active)], dtype=torch.int64, device=dev)
    cache_len = lens.clone()
    if spec is None:
        n1 = tree.num_nodes + 1
        depth, tree_bias = tree.depth.view(1, -1), tree.attn_bias(dtype, dev).clamp(min=neg)
    else:
        n1 = spec.budget + 1
    while active:
        if keep.numel() != cache_len.numel():
            root, h_last, cache_len = root[keep], h_last[keep], cache_len[keep]
            _reshape_cache(cache, keep, int(cache_len.max()))
        nb = len(active)
        t_phys = cache.get_seq_length()
        if spec is None:
            tree_tokens = tree.build_candidates(root, heads(h_last, lm_head, root_embeds(root)))  # [nb, N+1]
            bias = tree_bias.expand(nb, n1, n1)
        else:  # one tree per request
            contexts = ([prompts[i] + out[i] for i in active]
                        if spec.ngram_branches or successors is not None or acceptance_model is not None else None)
            dyn = spec.build(root, heads(h_last, lm_head, root_embeds(root)), contexts, calibration=calibration,
                             successors=successors, acceptance_model=acceptance_model)
            trees = [d.tree for d in dyn]
            tree_tokens = torch.stack([d.tokens for d in dyn]).to(dev)
            bias, depth = stack_attn_bias(trees, dtype, dev).clamp(min=neg), stack_depth(trees, dev)
        past_ok = torch.arange(t_phys, device=dev).view(1, -1) < cache_len.view(-1, 1)  # [nb, T]
        mask = torch.cat([torch.zeros(nb, n1, t_phys, dtype=dtype, device=dev).masked_fill_(~past_ok.unsqueeze(1), neg),
                          bias], dim=2).unsqueeze(1)
        pos = cache_len.view(-1, 1) + depth
        hidden = decoder(input_ids=tree_tokens, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True).last_hidden_state  # [nb, N+1, H]
        if spec is None:
            res = accept(rule, tree, tree_tokens, lm_head(hidden), **params)
        else:
            res = accept_each(rule, trees, tree_tokens, lm_head(hidden), **params)
            if calibration is not None:
                observe_step(calibration, dyn, res.path_nodes)
                if stats.steps % 8 == 7:
                    calibration.refit()

        d1 = res.path_nodes.shape[1]
        j = torch.arange(d1, device=dev).view(1, -1)
        dst = cache_len.view(-1, 1) + j
        src = torch.where(j <= res.accept_len.view(-1, 1), t_phys + res.path_nodes.clamp(min=0), dst)
        _compact(cache, src, dst)
        cache_len = cache_len + res.accept_len + 1
        h_last = hidden[torch.arange(nb, device=dev), res.last_node]
        root = res.bonus_token

        stats.steps += 1
        stats.request_steps += nb
        per_depth += (torch.arange(1, max_depth + 1).view(1, -1) <= res.accept_len.cpu().view(-1, 1)).sum(0)
        emitted = res.output_tokens.tolist()
        for r, (i, n_acc) in enumerate(zip(active, res.accept_len.tolist())):
            step_tokens[i].append(n_acc + 1)
            for tok in emitted[r][: n_acc + 1]:
                out[i].append(tok)
                if finished(i):
                    break
        still = [r for r, i in enumerate(active) if not finished(i)]
        active = [active[r] for r in still]
        keep = torch.tensor(still, dtype=torch.int64, device=dev)
        if active and len(still) == nb:
            _reshape_cache(cache, None, int(cache_len.max()))

    stats.tokens = sum(len(o) for o in out)
    stats.step_tokens = step_tokens
    if stats.request_steps:
        stats.mean_accepted_tokens_per_step = sum(map(sum, step_tokens)) / stats.request_steps
        stats.acceptance_per_depth = (per_depth.double() / stats.request_steps).tolist()
    else:
        stats.acceptance_per_depth = [0.0] * max_depth
    stats.wall_s = time.perf_counter() - t0
    return MedusaGenerateOutput(out, stats)


@torch.inference_mode()
def baseline_generate(model, input_ids, max_new_tokens: int, eos_token_id: int | None = None) -> list[list[int]]:
    """Plain greedy decoding, one request at a time, via ``model.generate(do_sample=False)``.

    Returns the new tokens per request (eos included when it was produced). ``eos_token_id=None`` never stops early.
    """
    prompts = _as_prompts(input_ids)
    dev = next(model.parameters()).device
    # An empty list (not None) overrides the model's default eos: generate() falls back on it for None.
    eos = [] if eos_token_id is None else [eos_token_id]
    outs = []
    for p in prompts:
        x = torch.tensor([p], dtype=torch.int64, device=dev)
        y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                           min_new_tokens=0, eos_token_id=eos, pad_token_id=0)
        outs.append(y[0, len(p):].tolist())
    return outs
