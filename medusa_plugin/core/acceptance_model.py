"""A learned node-acceptance model for dynamic trees: the chance that the target accepts a Medusa node, given that it
accepts the node's parent, from the node's head probability *and* what the text around it says.

Medusa heads do not see the draft path, and their probabilities alone say little about a node: on SmolLM2-135M's
shipped heads a dynamic tree over the raw probabilities accepts 1.04x the tokens of the fitted static tree. What the
target will accept also shows in the text: whether the candidate continues its parent tokens in the target's own
training text (the successor level, :mod:`~medusa_plugin.core.successor_prior`) and in *this request's* prompt and
output so far (chat answers repeat their prompt and themselves). A small MLP reads these features per node:

==========================  =====================================================================================
feature                     value
==========================  =====================================================================================
head                        one-hot of the head ``k`` that drafted the node (depth ``k + 1``), ``K`` columns
top                         1 if the parent is on the top path (the root and rank 0 of every head above it)
log q                       ``ln(max(q, 1e-6)) / 5``, ``q`` the head probability of the node's token
successor level             one-hot of the level (15 columns, ``successor_prior``; all 0 without counts)
rank                        the node's rank in its head's top-k, ``/ 10``
context match >= 1, >= 2    1 if the last 1 (parent) / 2 tokens before the node, then its token, occur in the context
context count               ``ln(1 + count of token in the context) / 3``
unseen                      1 if the token does not occur in the context
repeat                      1 if the token equals its parent's token
context match >= 3, >= 4    as "context match", 3 / 4 tokens before the node
==========================  =====================================================================================

(``K + 25`` columns; "context": the request's prompt and output up to and including the root, its last
:data:`CONTEXT_WINDOW` tokens; "the tokens before the node": the context, then the node's path.)

It is fitted by logistic loss on positions of the target's own greedy continuations of prompts the heads were not
trained on (:func:`training_examples`, :func:`fit_node_acceptance`; ``medusa-plugin fit-acceptance`` and the chat
recipe write ``acceptance_model.safetensors`` next to the heads). Measured offline on 1920 positions of 32 held-out
answers (SmolLM2-135M, 4 shipped heads, top-10 lattice, fitted on 160 other prompts, before the 3- and 4-token
matches were added): dynamic trees accept 2.395 / 2.555 tokens per step at 8 / 16 nodes with it, against 2.30
/ 2.46 with the per-head calibration and successor-level multipliers (:mod:`~medusa_plugin.core.calibration`) and
1.995 / 2.210 for the fitted static tree; without the context columns it reaches 2.33 / 2.49, without the successor
levels 2.27 / 2.42.

The probabilities replace the calibrated head factor of Medusa nodes in :func:`~medusa_plugin.core.dynamic_tree.
select_nodes` (n-gram branch nodes keep the calibration's rates). Every factor is a probability, so a node never
scores above its parent and the selection stays ancestor-closed. This is EAGLE-2's re-ranking by path confidence (Li
et al. 2024, "EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees") with the confidence learnt from
more than the drafter's own probability. Inference is numpy (a few microseconds per expansion); fitting is PyTorch.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .successor_prior import NUM_LEVELS, SuccessorCounts

__all__ = ["AcceptanceModelError", "ContextGrams", "NodeAcceptanceModel", "FILE_NAME", "FEATURE_VERSION",
           "CONTEXT_WINDOW", "num_features", "node_features", "training_examples", "fit_node_acceptance",
           "acceptance_model_for"]

FILE_NAME = "acceptance_model.safetensors"
FEATURE_VERSION = 1
CONTEXT_WINDOW = 1024  # tokens of a request's context the context columns read (the last ones): bounds the per-step
# cost of long prompts; the fitting contexts (prompt + 64 answer tokens) are shorter
_FORMAT = "medusa_plugin node acceptance model"


class AcceptanceModelError(ValueError):
    """A model file that cannot be used, or bad input; the message names the file or the value and the fix."""


def num_features(num_heads: int) -> int:
    """Columns of :func:`node_features` for ``num_heads`` heads: ``num_heads + 25``."""
    return num_heads + 25


class ContextGrams:
    """One request's context (prompt + output up to the root): which tokens follow a token or a token pair in it,
    and how often each token occurs. Built once per request and step; lookups are cached.

    Args:
        context: the token ids (any int sequence or 1-D array); only the last ``window`` are read.
        window: :data:`CONTEXT_WINDOW` by default.
    """

    def __init__(self, context: Sequence[int], window: int = CONTEXT_WINDOW) -> None:
        self._ctx = np.asarray(context, dtype=np.int64).reshape(-1)[-window:]
        toks, counts = np.unique(self._ctx, return_counts=True)
        self._count = dict(zip(toks.tolist(), counts.tolist()))
        self._pos: dict[int, np.ndarray] = {}
        self._after1: dict[int, set] = {}
        self._matches: dict[tuple, dict[int, int]] = {}

    def count(self, token: int) -> int:
        """Occurrences of ``token`` in the context."""
        return self._count.get(token, 0)

    def _at(self, prev1: int) -> np.ndarray:
        """Positions ``i`` with ``context[i] == prev1`` and a token after it (cached)."""
        got = self._pos.get(prev1)
        if got is None:
            c = self._ctx
            got = self._pos[prev1] = (np.flatnonzero(c[:-1] == prev1) if self._count.get(prev1, 0)
                                      else np.empty(0, dtype=np.int64))
        return got

    def after(self, prev1: int) -> set:
        """The tokens that follow ``prev1`` somewhere in the context."""
        got = self._after1.get(prev1)
        if got is None:
            got = self._after1[prev1] = set(self._ctx[self._at(prev1) + 1].tolist())
        return got

    def match_length(self, prev: Sequence[int], token: int, max_n: int = 4) -> int:
        """The largest ``n <= min(max_n, len(prev))`` such that ``prev[-n:] + [token]`` occurs in the context, 0 if
        ``prev[-1], token`` does not (``prev``: the tokens before ``token``, the last one its parent's)."""
        return self.match_lengths(prev, max_n).get(int(token), 0)

    def match_lengths(self, prev: Sequence[int], max_n: int = 4) -> dict[int, int]:
        """:meth:`match_length` of every token that follows ``prev[-1]`` in the context, as ``{token: n}`` (tokens
        absent: 0). Vectorised over the occurrences of ``prev[-1]``; cached per ``prev[-max_n:]``."""
        key = tuple(int(t) for t in prev[-max(1, max_n):])
        got = self._matches.get(key)
        if got is None:
            at = self._at(key[-1])
            got = {}
            if at.size:
                c, n, alive = self._ctx, np.ones(at.size, dtype=np.int64), np.ones(at.size, dtype=bool)
                for j in range(1, len(key)):  # occurrence i matches j+1 tokens if c[i-j] == prev[-1-j] too
                    idx = at - j
                    alive &= idx >= 0
                    alive[alive] = c[idx[alive]] == key[-1 - j]
                    n += alive
                for t, m in zip(c[at + 1].tolist(), n.tolist()):
                    if m > got.get(t, 0):
                        got[t] = m
            self._matches[key] = got
        return got


def node_features(num_heads: int, head: int, top: bool, probs: Sequence[float], tokens: Sequence[int],
                  prev: Sequence[int], grams: ContextGrams,
                  successors: SuccessorCounts | None) -> tuple[np.ndarray, list[int]]:
    """The features (module docstring) of the candidates of one head under one parent.

    Args:
        num_heads: ``K``; head: ``k`` in ``[0, K)``; top: the parent is on the top path.
        probs, tokens: the head's top-``R`` probabilities and token ids (rank order).
        prev: the tokens before the candidates (context + path), the parent's last; the last four are read.
        grams: the request's :class:`ContextGrams`; successors: the target text's counts, or None.
    Returns:
        ``([R, K + 25] float32 features, R successor levels)`` (levels -1 without ``successors``).
    """
    return _parent_columns(_head_columns(num_heads, head, probs, tokens, grams), num_heads, top,
                           np.asarray(tokens, dtype=np.int64), prev, grams, successors)


def _head_columns(num_heads: int, head: int, probs: Sequence[float], tokens: Sequence[int],
                  grams: ContextGrams) -> np.ndarray:
    """The columns that depend on the head and rank only (head, log q, rank, context count, unseen):
    ``[R, K + 25]`` float32, the rest 0."""
    r, k = len(tokens), num_heads
    f = np.zeros((r, num_features(k)), dtype=np.float32)
    f[:, head] = 1.0
    f[:, k + 1] = np.log(np.maximum(np.asarray(probs, dtype=np.float64), 1e-6)) / 5.0
    c = k + 2 + NUM_LEVELS
    f[:, c] = np.arange(r, dtype=np.float32) / 10.0
    n = np.array([grams.count(int(t)) for t in tokens], dtype=np.float64)
    f[:, c + 3] = np.log1p(n) / 3.0
    f[:, c + 4] = n == 0
    return f


def _parent_columns(head_cols: np.ndarray, num_heads: int, top: bool, tokens: np.ndarray, prev: Sequence[int],
                    grams: ContextGrams, successors: SuccessorCounts | None) -> tuple[np.ndarray, list[int]]:
    """:func:`_head_columns` plus the columns that depend on the parent (top, successor level, context matches,
    repeat): the full features and the levels."""
    f = head_cols.copy()
    r, k = len(tokens), num_heads
    prev = [int(t) for t in prev[-4:]]
    prev2, prev1 = (prev[-2] if len(prev) >= 2 else None), prev[-1]
    f[:, k] = float(top)
    levels = [-1] * r
    if successors is not None:
        levels = successors.levels(prev2, prev1, tokens.tolist())
        f[np.arange(r), k + 2 + np.asarray(levels)] = 1.0
    c = k + 2 + NUM_LEVELS
    matches = grams.match_lengths(prev)
    m = np.array([matches.get(t, 0) for t in tokens.tolist()], dtype=np.int64) if matches else np.zeros(r, np.int64)
    f[:, c + 1] = m >= 1
    f[:, c + 2] = m >= 2
    f[:, c + 5] = tokens == prev1
    f[:, c + 6] = m >= 3
    f[:, c + 7] = m >= 4
    return f, levels


class NodeAcceptanceModel:
    """The MLP ``features -> logit`` (two SiLU hidden layers) and its metadata.

    Attributes:
        num_heads: ``K`` the features were built for. hidden: width of the hidden layers.
        weights: ``[w1 [F, H], b1 [H], w2 [H, H], b2 [H], w3 [H, 1], b3 [1]]`` float32 numpy arrays.
        info: free-form metadata (what it was fitted on).
    """

    def __init__(self, num_heads: int, weights: Sequence[np.ndarray], info: dict | None = None) -> None:
        w = [np.asarray(x, dtype=np.float32) for x in weights]
        nf = num_features(num_heads)
        if len(w) != 6 or [x.ndim for x in w] != [2, 1, 2, 1, 2, 1] or w[0].shape[0] != nf \
                or w[0].shape[1] != w[1].shape[0] or w[2].shape != (w[1].shape[0],) * 2 \
                or w[3].shape != w[1].shape or w[4].shape != (w[1].shape[0], 1) or w[5].shape != (1,):
            raise AcceptanceModelError(f"acceptance model weights do not form a {nf}-feature MLP for {num_heads} "
                                       f"heads (shapes {[tuple(x.shape) for x in w]}): refit it")
        self.num_heads, self.hidden, self.weights = num_heads, int(w[1].shape[0]), w
        self.info = dict(info or {})

    @property
    def uses_successors(self) -> bool:
        """Fitted with successor levels (then it must be used with the same successor counts)."""
        return str(self.info.get("successors")) == "True"

    def probability(self, features: np.ndarray) -> np.ndarray:
        """``[M, F]`` features -> ``[M]`` float64 acceptance probabilities in (0, 1)."""
        w1, b1, w2, b2, w3, b3 = self.weights
        h = features @ w1 + b1
        h = h / (1.0 + np.exp(-h))
        h = h @ w2 + b2
        h = h / (1.0 + np.exp(-h))
        z = (h @ w3 + b3)[:, 0].astype(np.float64)
        return 1.0 / (1.0 + np.exp(-z))

    def scorer(self, probs: Sequence[Sequence[float]], tokens: Sequence[Sequence[int]], grams: ContextGrams,
               successors: SuccessorCounts | None) -> Callable[[int, bool, Sequence[int]], tuple[list, list]]:
        """``score(head, top, prev) -> (factors, levels)`` for the ranks of ``head`` under a parent (``prev``: the
        tokens before them, the parent's last), for :func:`~medusa_plugin.core.dynamic_tree.select_nodes`
        (``probs``, ``tokens``: ``[K][R]``, one request)."""
        heads: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        def score(head: int, top: bool, prev: Sequence[int]) -> tuple[list, list]:
            got = heads.get(head)
            if got is None:
                got = heads[head] = (_head_columns(self.num_heads, head, probs[head], tokens[head], grams),
                                     np.asarray(tokens[head], dtype=np.int64))
            f, levels = _parent_columns(got[0], self.num_heads, top, got[1], prev, grams, successors)
            return self.probability(f).tolist(), levels
        return score

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write safetensors (``w1 .. b3``) with the format, feature version and heads in the metadata."""
        import torch
        from safetensors.torch import save_file

        names = ("w1", "b1", "w2", "b2", "w3", "b3")
        meta = {"format": _FORMAT, "feature_version": str(FEATURE_VERSION), "num_heads": str(self.num_heads)}
        meta.update({f"info.{k}": str(v) for k, v in self.info.items()})
        path = Path(path)
        save_file({n: torch.from_numpy(np.ascontiguousarray(w)) for n, w in zip(names, self.weights)}, str(path),
                  metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, num_heads: int | None = None) -> "NodeAcceptanceModel":
        """Read :meth:`save`'s file.

        Raises:
            AcceptanceModelError: the file is missing, not such a model, of another feature version, or made for
                another number of heads than ``num_heads`` (the message names the file and the fix).
        """
        from safetensors import safe_open

        path = Path(path)
        fix = "refit it with `medusa-plugin fit-acceptance` or delete it"
        if not path.is_file():
            raise AcceptanceModelError(f"acceptance model not found: {path} (write one with `medusa-plugin "
                                       f"fit-acceptance`, or set `acceptance_model: false`)")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                weights = [f.get_tensor(n) for n in ("w1", "b1", "w2", "b2", "w3", "b3")]
        except Exception as e:  # noqa: BLE001 - any unreadable file is one line
            raise AcceptanceModelError(f"{path} is not an acceptance model ({type(e).__name__}: {e}); {fix}") from None
        if meta.get("format") != _FORMAT:
            raise AcceptanceModelError(f"{path} is not an acceptance model (format {meta.get('format')!r}); {fix}")
        if meta.get("feature_version") != str(FEATURE_VERSION):
            raise AcceptanceModelError(f"{path} has feature version {meta.get('feature_version')}, this version "
                                       f"reads {FEATURE_VERSION}; {fix}")
        try:
            k = int(meta["num_heads"])
        except (KeyError, ValueError):
            raise AcceptanceModelError(f"{path} does not say how many heads it was fitted for (metadata "
                                       f"'num_heads' is {meta.get('num_heads')!r}); {fix}") from None
        if num_heads is not None and k != num_heads:
            raise AcceptanceModelError(f"{path} was fitted for {k} heads, the checkpoint has {num_heads}; {fix}")
        info = {key[5:]: v for key, v in meta.items() if key.startswith("info.")}
        try:
            return cls(k, weights, info)
        except AcceptanceModelError as e:
            raise AcceptanceModelError(f"{path}: {e}") from None


def training_examples(positions, num_heads: int, successors: SuccessorCounts | None) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of every node whose parent the target accepted, over the top-``R`` lattice.

    Args:
        positions: iterable of ``(probs [K, R], ids [K, R], truth [K], context)``: each head's top-``R``
            probabilities and token ids at one position, the target's next ``K`` tokens after the root, and the
            context (prompt + output, ending with the root).
        num_heads: ``K``; successors: the counts the model will be used with (None: no levels).
    Returns:
        ``(X [M, K + 25] float32, y [M] float32)`` (y = 1: the node's token is the target's).
    """
    xs, ys = [], []
    for probs, ids, truth, context in positions:
        probs, ids = np.asarray(probs, dtype=np.float64), np.asarray(ids, dtype=np.int64)
        grams = ContextGrams(context)
        prev = [int(t) for t in context[-4:]]
        top = True
        for k in range(num_heads):
            f, _ = node_features(num_heads, k, top, probs[k], ids[k], prev, grams, successors)
            xs.append(f)
            ys.append((ids[k] == int(truth[k])).astype(np.float32))
            hit = np.flatnonzero(ids[k] == int(truth[k]))
            if hit.size == 0:  # the target's token is not in the lattice: no deeper node has an accepted parent
                break
            top = top and int(hit[0]) == 0
            prev.append(int(truth[k]))
    if not xs:
        raise AcceptanceModelError("no positions to fit the acceptance model on")
    return np.concatenate(xs), np.concatenate(ys)


def fit_node_acceptance(x: np.ndarray, y: np.ndarray, num_heads: int, *, hidden: int = 32, epochs: int = 40,
                        lr: float = 3e-3, batch_size: int = 1024, seed: int = 0,
                        info: dict | None = None) -> NodeAcceptanceModel:
    """Fit the MLP by logistic loss (Adam, weight decay 1e-4; deterministic for a seed) on :func:`training_examples`.

    Raises:
        AcceptanceModelError: shapes that do not match ``num_heads``, or no positive example.
    """
    import torch

    nf = num_features(num_heads)
    if x.ndim != 2 or x.shape[1] != nf or y.shape != (x.shape[0],):
        raise AcceptanceModelError(f"expected x [M, {nf}] and y [M], got {x.shape} and {y.shape}")
    if not float(y.sum()) > 0:
        raise AcceptanceModelError("no accepted node among the examples: the heads never drafted the target's token")
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(nf, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                              torch.nn.SiLU(), torch.nn.Linear(hidden, 1))
    with torch.no_grad():
        for p in net.parameters():  # a seeded init, independent of the global RNG
            p.copy_(torch.empty_like(p).uniform_(-1, 1, generator=g) / math.sqrt(p.shape[-1]))
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch_size):
            b = perm[i:i + batch_size]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xt[b]).squeeze(-1), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    w = [t.detach().numpy().copy() for t in (net[0].weight.T, net[0].bias, net[2].weight.T, net[2].bias,
                                             net[4].weight.T, net[4].bias)]
    meta = {"examples": int(len(x)), "positives": int(y.sum()), "hidden": hidden, "epochs": epochs}
    meta.update(info or {})
    return NodeAcceptanceModel(num_heads, w, meta)


def acceptance_model_for(heads_dir, num_heads: int, successors: SuccessorCounts | None
                         ) -> tuple[NodeAcceptanceModel | None, str]:
    """The model next to the heads in ``heads_dir`` (:data:`FILE_NAME`) when there is one it can be used with
    (one fitted with successor levels needs ``successors``), and a one-line description of what was chosen.

    Raises:
        AcceptanceModelError: the file is unreadable or made for another number of heads (the message names the fix).
    """
    path = Path(str(heads_dir)) / FILE_NAME
    if not path.is_file():
        return None, "none next to the heads"
    model = NodeAcceptanceModel.load(path, num_heads)
    if model.uses_successors and successors is None:
        return None, f"{path} not used: it reads successor levels and successor counts are off"
    return model, str(path)
