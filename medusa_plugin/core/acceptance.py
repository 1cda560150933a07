"""Batched acceptance rules for Medusa tree verification (plain PyTorch, vectorised over the batch).

Inputs shared by every rule (``N`` draft nodes, ``D`` tree depth, ``V`` vocabulary):
    tree_tokens [B, N+1] int64: column 0 = root (last emitted token), column i = draft token of node i.
    logits [B, N+1, V] float: target logits at each node, i.e. the distribution of the token *after* that node.
    num_valid [B] int64 (optional): nodes >= num_valid[b] are never accepted (drafts truncated by the engine).

Rules:
    greedy   - exact greedy equivalence: node i is accepted iff its token is argmax(logits[parent[i]]).
    sampling - lossless tree sampling: at the current node sample x ~ p; descend if x is a child's token,
               otherwise x is the bonus token. Medusa drafts are deterministic (top-k), so this emits exactly the
               target distribution (after temperature / top-k / top-p).
    typical  - Medusa's typical acceptance (lossy, opt-in).

:func:`accept_batch` runs a whole engine step: each row with its own rule (temperature 0 -> greedy, else the
configured sampled rule), parameters and seeded generator. A new rule is one function here plus its entries in
``_FNS`` / ``_PARAMS``; nothing outside this module changes.
"""

from __future__ import annotations

import difflib
from typing import Mapping, NamedTuple

import torch
from torch import Tensor

from .tree import MedusaTree

RULES = ("greedy", "sampling", "typical")


class AcceptanceError(ValueError):
    """Bad input to an acceptance rule; the message names the problem."""


class AcceptanceResult(NamedTuple):
    accept_len: Tensor     # [B] int64, accepted draft nodes L (0..D)
    path_nodes: Tensor     # [B, D+1] int64, root..p_L node indices, padded -1
    output_tokens: Tensor  # [B, D+1] int64, tokens of p_1..p_L then the bonus token, padded -1
    bonus_token: Tensor    # [B] int64, token sampled at the last accepted node
    last_node: Tensor      # [B] int64, p_L


# ------------------------------------------------------------------------------------------------ helpers
def _check(tree: MedusaTree, tree_tokens: Tensor, logits: Tensor) -> None:
    n1 = tree.num_nodes + 1
    if tree_tokens.dim() != 2 or tree_tokens.shape[1] != n1:
        raise AcceptanceError(f"tree_tokens must be [B, {n1}] for a tree of {tree.num_nodes} nodes, "
                              f"got shape {tuple(tree_tokens.shape)}")
    if logits.dim() != 3 or logits.shape[:2] != tree_tokens.shape:
        raise AcceptanceError(f"logits must be [B, {n1}, V] matching tree_tokens {tuple(tree_tokens.shape)}, "
                              f"got shape {tuple(logits.shape)}")


def _per_row(x, b: int, dtype: torch.dtype, device: torch.device, name: str) -> Tensor | None:
    """Scalar or [B] tensor -> [B] tensor (None stays None)."""
    if x is None:
        return None
    t = torch.as_tensor(x, dtype=dtype, device=device)
    if t.dim() == 0:
        return t.expand(b)
    if t.shape != (b,):
        raise AcceptanceError(f"{name} must be a scalar or a [B]={b} tensor, got shape {tuple(t.shape)}")
    return t


def _valid_nodes(tree: MedusaTree, num_valid, b: int, device: torch.device) -> Tensor:
    """[B, N+1] bool: node i exists for request b (the root always does)."""
    ar = torch.arange(tree.num_nodes + 1, device=device)
    if num_valid is None:
        return torch.ones(b, tree.num_nodes + 1, dtype=torch.bool, device=device)
    nv = _per_row(num_valid, b, torch.int64, device, "num_valid")
    return (ar.unsqueeze(0) < nv.unsqueeze(1)) | (ar == 0)


def _closed_under_ancestors(tree: MedusaTree, ok: Tensor) -> Tensor:
    """[B, N+1] bool ok per node -> accepted = ok at the node and at every ancestor."""
    anc = tree.ancestor_mask.to(ok.device)
    bad = (~ok).to(torch.float32) @ anc.T.to(torch.float32)  # number of not-ok nodes on the root..i path
    return bad == 0


def _result(tree: MedusaTree, tree_tokens: Tensor, last_node: Tensor, bonus: Tensor) -> AcceptanceResult:
    node_paths = tree.node_paths.to(tree_tokens.device)
    accept_len = tree.depth.to(tree_tokens.device)[last_node]
    path_nodes = node_paths[last_node]  # [B, D+1]
    toks = tree_tokens.gather(1, path_nodes.clamp(min=0))
    out = torch.cat([toks[:, 1:], torch.full_like(toks[:, :1], -1)], dim=1)
    cols = torch.arange(out.shape[1], device=out.device).unsqueeze(0)
    out = torch.where(cols < accept_len.unsqueeze(1), out, torch.full_like(out, -1))
    out = torch.where(cols == accept_len.unsqueeze(1), bonus.unsqueeze(1), out)
    return AcceptanceResult(accept_len, path_nodes, out, bonus, last_node)


def probs_from_logits(logits: Tensor, temperature=1.0, top_k=None, top_p=None) -> Tensor:
    """Sampling distribution after temperature, top-k, then top-p (per row).

    Args:
        logits: [B, V] float.
        temperature: scalar or [B]; 0 -> one-hot argmax.
        top_k: None, scalar or [B] int; <= 0 or >= V disables it.
        top_p: None, scalar or [B] float in (0, 1]; >= 1 disables it. Keeps the smallest set of most likely
            tokens whose probability reaches top_p.
    Returns:
        probs: [B, V] float32, rows sum to 1.
    """
    b, v = logits.shape
    dev = logits.device
    temp = _per_row(temperature, b, torch.float32, dev, "temperature")
    if (temp < 0).any():
        raise AcceptanceError("temperature must be >= 0 (0 means greedy)")
    greedy = temp == 0
    x = logits.float() / torch.where(greedy, 1.0, temp).unsqueeze(1)
    k = _per_row(top_k, b, torch.int64, dev, "top_k")
    p = _per_row(top_p, b, torch.float32, dev, "top_p")
    if k is not None or p is not None:
        sorted_x, order = x.sort(dim=-1, descending=True)
        drop = torch.zeros_like(sorted_x, dtype=torch.bool)
        pos = torch.arange(v, device=dev).unsqueeze(0)
        if k is not None:
            kk = torch.where((k <= 0) | (k > v), v, k)
            drop |= pos >= kk.unsqueeze(1)
        if p is not None:
            if ((p <= 0) | (p > 1)).any():
                raise AcceptanceError("top_p must be in (0, 1]")
            sp = sorted_x.masked_fill(drop, float("-inf")).softmax(-1)
            before = sp.cumsum(-1) - sp  # probability mass strictly before each token
            drop |= (before >= p.unsqueeze(1)) & (p < 1).unsqueeze(1)
            drop[:, 0] = False
        x = x.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))
    probs = x.softmax(-1)
    if greedy.any():
        onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy.unsqueeze(1), onehot, probs)
    return probs


# ------------------------------------------------------------------------------------------------ rules
def greedy_accept(tree: MedusaTree, tree_tokens: Tensor, logits: Tensor, *, num_valid=None) -> AcceptanceResult:
    """Exact greedy verification: the deepest node whose whole path matches the target argmax.

    Ties (only possible with duplicate sibling tokens) go to the first node in node order. The bonus token is
    argmax(logits[b, last_node]).
    """
    _check(tree, tree_tokens, logits)
    return greedy_accept_targets(tree, tree_tokens, logits.argmax(-1), num_valid=num_valid)


def greedy_accept_targets(tree: MedusaTree, tree_tokens: Tensor, target: Tensor, *, num_valid=None
                          ) -> AcceptanceResult:
    """:func:`greedy_accept` from the target's argmax per node instead of its logits.

    The engine takes the argmax over its flat ``[T, V]`` logits first and gathers only the ``[B, N+1]`` ids,
    rather than copying ``[B, N+1, V]`` logits into tree shape (at V = 49152 that copy and the argmax over absent
    nodes were most of a greedy acceptance step).

    Args:
        tree_tokens: ``[B, N+1]`` int64 draft token of each node (column 0 unused).
        target: ``[B, N+1]`` int64, argmax of the target's logits at each node.
        num_valid: ``[B]`` int64 valid nodes per row (drafts + 1), default all N+1.
    Raises:
        AcceptanceError: shapes that do not match the tree.
    """
    n1 = tree.num_nodes + 1
    if tree_tokens.dim() != 2 or tree_tokens.shape[1] != n1 or target.shape != tree_tokens.shape:
        raise AcceptanceError(f"tree_tokens and target must both be [B, {n1}] for a tree of {tree.num_nodes} "
                              f"nodes, got {tuple(tree_tokens.shape)} and {tuple(target.shape)}")
    b = tree_tokens.shape[0]
    target = target.to(torch.int64)
    parent = tree.parent.to(tree_tokens.device).clamp(min=0)
    ok = tree_tokens == target[:, parent]
    ok[:, 0] = True
    ok &= _valid_nodes(tree, num_valid, b, tree_tokens.device)
    acc = _closed_under_ancestors(tree, ok)
    depth = tree.depth.to(tree_tokens.device)
    last = torch.where(acc, depth, -1).argmax(1)  # first max = first in node order
    bonus = target.gather(1, last.unsqueeze(1)).squeeze(1)
    return _result(tree, tree_tokens, last, bonus)


def sampling_accept(tree: MedusaTree, tree_tokens: Tensor, logits: Tensor, *, temperature, top_p=None, top_k=None,
                    generator: torch.Generator | None = None, num_valid=None) -> AcceptanceResult:
    """Lossless tree sampling (exactly the target distribution after temperature / top-k / top-p).

    At the current node (start at the root) sample x ~ p(.|node); if a valid child carries token x descend into it
    (the first such child if several), else emit x as the bonus token and stop. Rows with temperature 0 reduce to
    greedy verification. Loops over depth only.
    """
    _check(tree, tree_tokens, logits)
    b, dev = tree_tokens.shape[0], tree_tokens.device
    rows = torch.arange(b, device=dev)
    child_index = tree.child_index.to(dev)
    valid = _valid_nodes(tree, num_valid, b, dev)
    cur = torch.zeros(b, dtype=torch.int64, device=dev)
    bonus = torch.full((b,), -1, dtype=torch.int64, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    for _ in range(tree.max_depth + 1):
        probs = probs_from_logits(logits[rows, cur], temperature, top_k, top_p)
        x = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        kids = child_index[cur]  # [B, topk]
        kid_ok = (kids >= 0) & valid.gather(1, kids.clamp(min=0))
        match = kid_ok & (tree_tokens.gather(1, kids.clamp(min=0)) == x.unsqueeze(1))
        descend = match.any(1) & ~done
        stop = ~match.any(1) & ~done
        bonus = torch.where(stop, x, bonus)
        cur = torch.where(descend, kids[rows, match.to(torch.int8).argmax(1)], cur)
        done |= stop
        if bool(done.all()):
            break
    return _result(tree, tree_tokens, cur, bonus)


def typical_accept(tree: MedusaTree, tree_tokens: Tensor, logits: Tensor, *, temperature, posterior_threshold=0.09,
                   posterior_alpha=0.3, generator: torch.Generator | None = None, num_valid=None) -> AcceptanceResult:
    """Medusa typical acceptance (lossy). Rows with temperature 0 use :func:`greedy_accept`.

    p = softmax(logits / T); H = -sum p log(p + 1e-5) (upstream's formula). Node i is ok iff
    p_parent(token_i) > min(posterior_threshold, posterior_alpha * exp(-H_parent)). Among the deepest accepted
    nodes the one with the largest path log-likelihood (sum of log p_parent(token) along the path) wins, as
    upstream; remaining ties go to the first in node order. The bonus is sampled from p at the last node.
    """
    _check(tree, tree_tokens, logits)
    b, dev = tree_tokens.shape[0], tree_tokens.device
    temp = _per_row(temperature, b, torch.float32, dev, "temperature")
    if (temp < 0).any():
        raise AcceptanceError("temperature must be >= 0 (0 means greedy)")
    greedy_rows = temp == 0
    logp = torch.log_softmax(logits.float() / temp.clamp(min=1e-5).view(b, 1, 1), dim=-1)  # [B, N+1, V]
    p = logp.exp()
    entropy = -(p * torch.log(p + 1e-5)).sum(-1)  # [B, N+1]
    threshold = torch.minimum(torch.full_like(entropy, posterior_threshold), posterior_alpha * torch.exp(-entropy))
    parent = tree.parent.to(dev).clamp(min=0)
    rows = torch.arange(b, device=dev)
    tok_logp = logp[rows.unsqueeze(1), parent.unsqueeze(0), tree_tokens]  # log p_parent(token_i), [B, N+1]
    tok_logp[:, 0] = 0.0
    ok = tok_logp.exp() > threshold[:, parent]
    ok[:, 0] = True
    ok &= _valid_nodes(tree, num_valid, b, dev)
    acc = _closed_under_ancestors(tree, ok)
    depth = tree.depth.to(dev)
    max_d = torch.where(acc, depth, -1).amax(1, keepdim=True)
    path_logp = tok_logp @ tree.ancestor_mask.to(dev).T.to(tok_logp.dtype)
    score = torch.where(acc & (depth == max_d), path_logp, float("-inf"))
    last = score.argmax(1)
    bonus = torch.multinomial(p[rows, last], 1, generator=generator).squeeze(1)
    res = _result(tree, tree_tokens, last, bonus)
    if greedy_rows.any():
        g = greedy_accept(tree, tree_tokens, logits, num_valid=num_valid)
        res = AcceptanceResult(*(torch.where(greedy_rows.view(-1, *([1] * (r.dim() - 1))), gr, r)
                                 for r, gr in zip(res, g)))
    return res


_PARAMS = {
    "greedy": {"num_valid"},
    "sampling": {"num_valid", "temperature", "top_p", "top_k", "generator"},
    "typical": {"num_valid", "temperature", "posterior_threshold", "posterior_alpha", "generator"},
}
_FNS = {"greedy": greedy_accept, "sampling": sampling_accept, "typical": typical_accept}


def accept(rule: str, tree: MedusaTree, tree_tokens: Tensor, logits: Tensor, **params) -> AcceptanceResult:
    """Run the named rule ("greedy" | "sampling" | "typical").

    ``params`` may hold any parameter of any rule (so callers can pass one settings dict); those the chosen rule
    does not use are ignored. An unknown rule or an unknown parameter name raises AcceptanceError.
    """
    if rule not in _FNS:
        close = difflib.get_close_matches(str(rule), RULES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise AcceptanceError(f"unknown acceptance rule {rule!r}.{hint} Choose one of: {', '.join(RULES)}")
    known = set().union(*_PARAMS.values())
    unknown = sorted(set(params) - known)
    if unknown:
        raise AcceptanceError(f"unknown acceptance parameter(s) {unknown}: known are {sorted(known)}")
    kw = {k: v for k, v in params.items() if k in _PARAMS[rule]}
    if rule in ("sampling", "typical") and "temperature" not in kw:
        raise AcceptanceError(f"the {rule!r} rule needs a temperature (0 means greedy)")
    return _FNS[rule](tree, tree_tokens, logits, **kw)


def accept_batch(tree: MedusaTree, tree_tokens: Tensor, logits: Tensor, *, temperature: Tensor,
                 sampled_rule: str = "sampling", top_k: Tensor | None = None, top_p: Tensor | None = None,
                 generators: Mapping[int, torch.Generator] | None = None, num_valid: Tensor | None = None,
                 posterior_threshold: float = 0.09, posterior_alpha: float = 0.3) -> AcceptanceResult:
    """Acceptance for a batch of rows, each with its own rule, sampling parameters and random generator.

    Row ``r`` uses ``"greedy"`` if ``temperature[r] == 0``, else ``sampled_rule`` (``"sampling"``: lossless,
    or ``"typical"``). Rows are grouped: one call for all greedy rows, one for the sampled rows without a generator,
    and one per row that has its own generator (a seeded request: its draws must come from its generator only).

    Args:
        tree_tokens: ``[R, N+1]`` int64; logits: ``[R, N+1, V]`` float (see the module docstring).
        temperature: ``[R]`` float32 CPU tensor (host values decide the grouping without a device sync).
        sampled_rule: the rule for temperature > 0 rows (a key of ``RULES`` other than "greedy").
        top_k: ``[R]`` int64 (0 or >= V: off); top_p: ``[R]`` float32 (1: off); "sampling" rows only.
        generators: ``{row: torch.Generator}`` for seeded rows (row = index into the R rows); others use the
            global generator.
        num_valid: ``[R]`` int64 valid nodes per row (drafts + 1), default all N+1.
        posterior_threshold, posterior_alpha: ``typical`` rows only (Medusa paper's epsilon and alpha).
    Returns:
        One :class:`AcceptanceResult` row per input row, in input order.
    Raises:
        AcceptanceError: unknown ``sampled_rule`` or shapes that do not match.
    """
    if sampled_rule == "greedy" or sampled_rule not in _FNS:
        raise AcceptanceError(f"sampled_rule must be one of {[r for r in RULES if r != 'greedy']}, got "
                              f"{sampled_rule!r}")
    _check(tree, tree_tokens, logits)
    b = tree_tokens.shape[0]
    temperature = _per_row(temperature, b, torch.float32, torch.device("cpu"), "temperature")
    greedy = temperature == 0
    if bool(greedy.all()):
        return greedy_accept(tree, tree_tokens, logits, num_valid=num_valid)
    seeded = torch.zeros(b, dtype=torch.bool)
    for row in (generators or {}):
        seeded[row] = True
    groups: list[tuple[str, Tensor, torch.Generator | None]] = [
        ("greedy", torch.nonzero(greedy).flatten(), None),
        (sampled_rule, torch.nonzero(~greedy & ~seeded).flatten(), None),
        *((sampled_rule, torch.tensor([row]), gen) for row, gen in (generators or {}).items() if not greedy[row])]
    groups = [g for g in groups if g[1].numel()]
    per_row = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "num_valid": num_valid}
    parts: list[tuple[Tensor, AcceptanceResult]] = []
    for rule, idx, gen in groups:
        if len(groups) == 1:  # every row: no gather
            args, kw = (tree_tokens, logits), {k: v for k, v in per_row.items() if v is not None}
        else:
            dev_idx = idx.to(tree_tokens.device)
            args = (tree_tokens[dev_idx], logits[dev_idx])
            kw = {k: v[idx.to(v.device)] for k, v in per_row.items() if v is not None}
        kw.update(generator=gen, posterior_threshold=posterior_threshold, posterior_alpha=posterior_alpha)
        parts.append((idx, accept(rule, tree, *args, **kw)))
    if len(parts) == 1:
        return parts[0][1]
    order = torch.cat([idx for idx, _ in parts])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    inverse = inverse.to(tree_tokens.device)
    return AcceptanceResult(*(torch.cat([res[k] for _, res in parts])[inverse]
                              for k in range(len(AcceptanceResult._fields))))
