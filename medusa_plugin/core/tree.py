"""Medusa candidate trees: validation, loading, and the index buffers used by drafting, attention and acceptance.

A tree is a set of *paths*; a path ``(r0, r1, ..., r_{d-1})`` is the node reached by taking rank ``r0`` of head 0,
then rank ``r1`` of head 1, ... (ranks are positions in each head's top-k). Node order is upstream Medusa's:
``sorted(choices, key=lambda p: (len(p), p))``; node 0 is the root (the last emitted token), node ``i >= 1`` is
``choices[i - 1]``. Every ancestor precedes its descendants, so any prefix ``[0, q)`` of the node order is a tree.

A batch-aware schedule verifies such prefixes, and a breadth-first prefix is a poor one: its first two nodes are
ranks 0 and 1 of head 0, never the chain ``[0], [0, 0]`` that usually accepts more. :meth:`MedusaTree.
in_acceptance_order` puts the nodes in order of expected acceptance instead (still ancestors first), so every
prefix is the best tree of its size under the independence model; ``keep_order=True`` builds a tree in a given
ancestor-closed order.
"""

from __future__ import annotations

import ast
import copy
import difflib
import functools
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

DEFAULT_TOPK = 10
_TENSOR_FIELDS = (
    "depth", "parent", "rank", "ancestor_mask", "tree_indices", "retrieve_indices", "node_paths", "child_index",
    "is_leaf",
)


class MedusaTreeError(ValueError):
    """A tree specification is invalid; the message names the offending path/spec and the fix."""


def _shipped() -> dict[str, list]:
    text = resources.files("medusa_plugin").joinpath("data/medusa_choices.json").read_text()
    return json.loads(text)["choices"]


def shipped_tree_names() -> list[str]:
    """Names of the 9 upstream Medusa choice sets shipped with the package (e.g. ``mc_sim_7b_63``)."""
    return list(_shipped())


def _fmt(path: Sequence[int]) -> str:
    return "[" + ", ".join(str(r) for r in path) + "]"


def _normalise(choices: Any, topk: int) -> list[tuple[int, ...]]:
    """Validate a list of paths and return them as tuples (input order). Raises MedusaTreeError."""
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence):
        raise MedusaTreeError(
            f"a tree must be a list of paths such as [[0], [1], [0, 0]], got {type(choices).__name__}")
    if len(choices) == 0:
        raise MedusaTreeError("the tree is empty: give at least one path, e.g. [[0]] (a chain of one draft token)")
    if not isinstance(topk, int) or topk < 1:
        raise MedusaTreeError(f"topk must be a positive integer, got {topk!r}")
    paths: list[tuple[int, ...]] = []
    for raw in choices:
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
            raise MedusaTreeError(f"tree path {raw!r} is not a list of integer ranks, e.g. [0, 1]")
        if len(raw) == 0:
            raise MedusaTreeError("tree path [] is empty: the root is implicit, list only draft nodes such as [0]")
        for r in raw:
            if isinstance(r, bool) or not isinstance(r, int):
                raise MedusaTreeError(f"tree path {list(raw)!r} has a non-integer entry {r!r}: ranks are integers >= 0")
            if r < 0:
                raise MedusaTreeError(f"tree path {_fmt(raw)} has a negative rank {r}: ranks are integers >= 0")
            if r >= topk:
                raise MedusaTreeError(
                    f"tree path {_fmt(raw)} uses rank {r} but topk={topk}: ranks must be < topk "
                    f"(raise topk to at least {r + 1} or drop the path)")
        paths.append(tuple(raw))
    seen: set[tuple[int, ...]] = set()
    for p in paths:
        if p in seen:
            raise MedusaTreeError(f"tree path {_fmt(p)} appears more than once: remove the duplicate")
        seen.add(p)
    for p in sorted(paths, key=lambda p: (len(p), p)):
        for d in range(1, len(p)):
            if p[:d] not in seen:
                raise MedusaTreeError(
                    f"tree path {_fmt(p)} has no parent: its prefix {_fmt(p[:d])} is missing (add it to the tree)")
    return paths


class MedusaTree:
    """An immutable Medusa tree with its index buffers (all int64 / bool tensors, see the attribute list).

    Attributes (``N`` draft nodes, ``D`` max depth, ``L`` leaves):
        choices: list[tuple[int, ...]], the N paths in node order.
        num_nodes (N), max_depth (D), topk, num_leaves (L), nodes_per_depth: list[int] of length D.
        depth: [N+1] int64, depth[0] = 0.
        parent: [N+1] int64, parent[0] = -1.
        rank: [N+1] int64, the head rank of each node (path[-1]); rank[0] = -1.
        ancestor_mask: [N+1, N+1] bool, [i, j] = j is i or an ancestor of i.
        tree_indices: [N+1] int64 into the flat ``[root, topk(head0), topk(head1), ...]`` candidate vector.
        retrieve_indices: [L, D+1] int64 root->leaf node indices, padded with -1; rows in upstream order
            (leaves in reverse node order).
        node_paths: [N+1, D+1] int64, row i = root..i node indices padded with -1 (``retrieve_indices`` rows are
            ``node_paths[leaf]``).
        children: list[list[int]], children of each node in node order (= increasing rank in upstream order).
        child_index: [N+1, topk] int64, (node, rank) -> child node or -1.
        is_leaf: [N+1] bool.
        prefix_depth: N+1 ints, the depth of the prefix ``[0, n]`` of node order (the heads it needs).
        chain_prefix: the largest ``c`` whose prefix ``[0, c]`` is a chain (node ``i``'s parent is ``i - 1``).
    """

    def __init__(self, choices: Sequence[Sequence[int]], *, num_heads: int | None = None, topk: int = DEFAULT_TOPK,
                 keep_order: bool = False):
        """``keep_order``: node order is the order of ``choices`` (every parent must come before its children;
        MedusaTreeError otherwise) instead of upstream's (depth, path) order."""
        paths = _normalise(choices, topk)
        if keep_order:
            seen: set[tuple[int, ...]] = set()
            for p in paths:
                if len(p) > 1 and p[:-1] not in seen:
                    raise MedusaTreeError(f"tree path {_fmt(p)} comes before its parent {_fmt(p[:-1])}: with "
                                          f"keep_order every parent must be listed before its children")
                seen.add(p)
        else:
            paths = sorted(paths, key=lambda p: (len(p), p))
        max_depth = max(map(len, paths))
        if num_heads is not None and max_depth > num_heads:
            raise MedusaTreeError(
                f"tree depth {max_depth} needs at least {max_depth} heads, the checkpoint has {num_heads}: "
                f"use a smaller tree or more heads")
        n = len(paths)
        index = {p: i + 1 for i, p in enumerate(paths)}
        self.choices = paths
        self.num_nodes = n
        self.max_depth = max_depth
        self.topk = topk

        depth = [0] + [len(p) for p in paths]
        parent = [-1] + [index.get(p[:-1], 0) for p in paths]
        rank = [-1] + [p[-1] for p in paths]
        children: list[list[int]] = [[] for _ in range(n + 1)]
        for i in range(1, n + 1):
            children[parent[i]].append(i)
        node_paths = [[0] + [index[p[:d]] for d in range(1, len(p) + 1)] for p in [()] + paths]
        node_paths = [row + [-1] * (max_depth + 1 - len(row)) for row in node_paths]
        leaves = [i for i in range(n, 0, -1) if not children[i]]  # upstream: reverse node order

        self.children = children
        self.nodes_per_depth = [sum(1 for p in paths if len(p) == d) for d in range(1, max_depth + 1)]
        self.num_leaves = len(leaves)
        # built in numpy and wrapped (torch.from_numpy): a dynamic tree is built per request and step, and a dozen
        # small PyTorch ops cost more than the tree's few nodes (0.12 -> 0.05 ms for 8 nodes)
        t = torch.from_numpy
        parent_np = np.asarray(parent, dtype=np.int64)
        rank_np = np.asarray(rank, dtype=np.int64)
        paths_np = np.asarray(node_paths, dtype=np.int64)
        self.depth = t(np.asarray(depth, dtype=np.int64))
        self.parent = t(parent_np)
        self.rank = t(rank_np)
        self.node_paths = t(paths_np)
        self.retrieve_indices = t(paths_np[leaves].reshape(len(leaves), max_depth + 1))
        mask = np.zeros((n + 1, n + 1), dtype=bool)
        rows, cols = np.nonzero(paths_np >= 0)
        mask[rows, paths_np[rows, cols]] = True
        self.ancestor_mask = t(mask)
        self.tree_indices = t(np.asarray([0] + [1 + p[-1] + topk * (len(p) - 1) for p in paths], dtype=np.int64))
        child_index = np.full((n + 1, topk), -1, dtype=np.int64)
        child_index[parent_np[1:], rank_np[1:]] = np.arange(1, n + 1)
        self.child_index = t(child_index)
        self.is_leaf = t(np.asarray([not c for c in children], dtype=bool))
        # prefix_depth[n]: depth of the prefix [0, n] of node order: the heads it needs.
        self.prefix_depth = [0] + np.maximum.accumulate([len(p) for p in paths]).tolist()
        # chain_prefix: the longest prefix [0, c] that is a chain (node i's parent is i - 1): verifying it needs no
        # tree mask, no moved positions and no KV compaction
        c = 0
        while c < n and parent[c + 1] == c:
            c += 1
        self.chain_prefix = c

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_choices(cls, choices: Sequence[Sequence[int]], *, num_heads: int | None = None,
                     topk: int = DEFAULT_TOPK) -> "MedusaTree":
        """Build from a list (or tuple) of rank paths, e.g. ``[[0], [1], [0, 0]]``; any input order."""
        return cls(choices, num_heads=num_heads, topk=topk)

    @classmethod
    def from_name(cls, name: str, **kw) -> "MedusaTree":
        """One of the shipped upstream choice sets (see :func:`shipped_tree_names`)."""
        sets = _shipped()
        if name not in sets:
            close = difflib.get_close_matches(name, list(sets), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise MedusaTreeError(
                f"unknown tree name {name!r}.{hint} Shipped trees: {', '.join(sets)}; or give a .yaml/.json file, "
                f"a list literal such as '[[0], [0, 0]]', or 'chain:K'")
        return cls(sets[name], **kw)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **kw) -> "MedusaTree":
        """Read a YAML (or JSON) file holding a list of paths, or a mapping with a ``choices`` key."""
        p = Path(path)
        if not p.is_file():
            raise MedusaTreeError(f"tree file {str(p)!r} not found: give an existing .yaml/.yml/.json file")
        text = p.read_text()
        try:
            if p.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml
                data = yaml.safe_load(text)
        except Exception as e:  # yaml.YAMLError / json.JSONDecodeError
            raise MedusaTreeError(f"tree file {str(p)!r} is not valid {p.suffix.lstrip('.').upper() or 'YAML'}: {e}") from None
        if isinstance(data, dict):
            if "choices" not in data:
                raise MedusaTreeError(
                    f"tree file {str(p)!r} is a mapping without a 'choices' key: write 'choices: [[0], [0, 0], ...]' "
                    f"or a bare list of paths")
            data = data["choices"]
        try:
            return cls(data, **kw)
        except MedusaTreeError as e:
            raise MedusaTreeError(f"tree file {str(p)!r}: {e}") from None

    @classmethod
    def chain(cls, length: int, **kw) -> "MedusaTree":
        """A chain of ``length`` top-1 drafts: ``[[0], [0, 0], ...]``."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise MedusaTreeError(f"chain length must be an integer >= 1, got {length!r}")
        return cls([(0,) * d for d in range(1, length + 1)], **kw)

    @classmethod
    def load(cls, spec: Any, **kw) -> "MedusaTree":
        """Dispatch on ``spec``: a MedusaTree, a shipped name, a .yaml/.yml/.json path, a list of paths,
        ``"chain:K"``, or a string holding a Python list literal."""
        if isinstance(spec, MedusaTree):
            return spec
        if isinstance(spec, os.PathLike):
            return cls.from_yaml(spec, **kw)
        if not isinstance(spec, str):
            return cls(spec, **kw)
        s = spec.strip()
        if s.lower().startswith("chain:"):
            arg = s.split(":", 1)[1].strip()
            if not arg.isdigit():
                raise MedusaTreeError(f"tree spec {spec!r}: write 'chain:K' with an integer K >= 1, e.g. 'chain:4'")
            return cls.chain(int(arg), **kw)
        if s.startswith(("[", "(")):
            try:
                value = ast.literal_eval(s)
            except (ValueError, SyntaxError) as e:
                raise MedusaTreeError(f"tree spec {spec!r} is not a valid Python list literal: {e}") from None
            return cls(value, **kw)
        if s in _shipped():
            return cls.from_name(s, **kw)
        if s.lower().endswith((".yaml", ".yml", ".json")) or os.path.sep in s or Path(s).is_file():
            return cls.from_yaml(s, **kw)
        return cls.from_name(s, **kw)

    # ---------------------------------------------------------------- acceptance order
    def path_probabilities(self, accuracy: Sequence[Sequence[float]]) -> list[float]:
        """Independence model (upstream Medusa's tree construction): ``N`` floats, node ``i``'s probability of being
        on the accepted path, ``prod_d accuracy[d][path_i[d]]``.

        Args:
            accuracy: ``[K][R]`` marginal accuracy, ``accuracy[k][r]`` = P(rank ``r`` of head ``k`` is the target's
                token); heads and ranks outside the table count as never right.
        """
        out = []
        for path in self.choices:
            p = 1.0
            for k, r in enumerate(path):
                p *= float(accuracy[k][r]) if k < len(accuracy) and r < len(accuracy[k]) else 0.0
            out.append(p)
        return out

    def in_acceptance_order(self, accuracy: Sequence[Sequence[float]]) -> "MedusaTree":
        """The same paths in order of decreasing :meth:`path_probabilities` (ties: upstream order), so each prefix
        ``[0, n]`` holds the ``n`` nodes most likely to be accepted. Ancestors still come first: a node's probability
        never exceeds its parent's, and on a tie the shallower node wins."""
        prob = self.path_probabilities(accuracy)
        order = sorted(range(self.num_nodes), key=lambda i: (-prob[i], len(self.choices[i]), self.choices[i]))
        return MedusaTree([self.choices[i] for i in order], topk=self.topk, keep_order=True)

    # ---------------------------------------------------------------- tensors
    def to(self, device: torch.device | str) -> "MedusaTree":
        """A copy whose tensors live on ``device`` (python-side fields are shared)."""
        out = copy.copy(self)
        for name in _TENSOR_FIELDS:
            setattr(out, name, getattr(self, name).to(device))
        return out

    @functools.cached_property
    def host_index(self) -> dict[str, np.ndarray]:
        """numpy copies of the index buffers for acceptance on the host (``core.greedy_host``), built on first use
        (dynamic trees are built every step and most never need them): ``parent`` [N+1] (root's clamped to 0),
        ``depth`` [N+1], ``ancestor_t`` [N+1, N+1] int32 (``ancestor_mask.T``), ``node_paths`` [N+1, D+1]."""
        return {"parent": self.parent.clamp(min=0).cpu().numpy(), "depth": self.depth.cpu().numpy(),
                "ancestor_t": np.ascontiguousarray(self.ancestor_mask.cpu().numpy().T.astype(np.int32)),
                "node_paths": self.node_paths.cpu().numpy()}

    @functools.cached_property
    def host_children(self) -> tuple[tuple[int, ...], ...]:
        """Python tuples: the children of every node in node order (``core.greedy_host``'s walk for few rows)."""
        children: list[list[int]] = [[] for _ in range(self.num_nodes + 1)]
        for i, p in enumerate(self.parent.tolist()):
            if i:
                children[p].append(i)
        return tuple(map(tuple, children))

    @functools.cached_property
    def host_head_rank(self) -> tuple[tuple[int, int], ...]:
        """Python tuples: ``(head, rank)`` of nodes ``1..N`` (node ``i``'s draft token is rank ``rank`` of head
        ``head``), for :meth:`candidates_from_topk_host`."""
        return tuple(divmod(int(i) - 1, self.topk) for i in self.tree_indices[1:].tolist())

    def candidates_from_topk_host(self, top_ids: list, num_nodes: int) -> list[list[int]]:
        """The drafts of :meth:`candidates_from_topk` without the root, from the top-k ids as Python lists
        (``top_ids.tolist()``, ``[B][K][topk]``): ``B`` lists of ``num_nodes`` token ids. For the decode step's few
        rows a dozen PyTorch calls cost more than the lookup (0.04 ms of a chain:1 step on a 2-core CPU).

        Raises:
            MedusaTreeError: ``num_nodes`` out of range, or fewer heads than the prefix reaches.
        """
        if not 0 <= num_nodes <= self.num_nodes:
            raise MedusaTreeError(f"num_nodes={num_nodes} is outside 0..{self.num_nodes}")
        if top_ids and len(top_ids[0]) < self.prefix_depth[num_nodes]:
            raise MedusaTreeError(f"the first {num_nodes} nodes reach depth {self.prefix_depth[num_nodes]} but "
                                  f"top_ids has {len(top_ids[0])} heads: run at least {self.prefix_depth[num_nodes]} "
                                  "heads")
        where = self.host_head_rank[:num_nodes]
        return [[t[h][r] for h, r in where] for t in top_ids]

    @property
    def device(self) -> torch.device:
        return self.depth.device

    def attn_bias(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
        """[N+1, N+1] additive attention bias: 0 where ``ancestor_mask`` else -inf."""
        mask = self.ancestor_mask.to(device) if device is not None else self.ancestor_mask
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return bias.masked_fill_(~mask, float("-inf"))

    def build_candidates(self, root_tokens: Tensor, head_logits: Tensor) -> Tensor:
        """Draft tokens for every tree node.

        Args:
            root_tokens: [B] int64, the last emitted token of each request.
            head_logits: [B, K, V] float, Medusa head logits (K >= max_depth; extra heads are ignored).
        Returns:
            tree_tokens: [B, N+1] int64; column 0 = root, column i = rank ``rank[i]`` of head ``depth[i]-1``.
        """
        if head_logits.dim() != 3:
            raise MedusaTreeError(f"head_logits must be [B, K, V], got shape {tuple(head_logits.shape)}")
        b, k, v = head_logits.shape
        if root_tokens.shape != (b,):
            raise MedusaTreeError(f"root_tokens must be [B]={b}, got shape {tuple(root_tokens.shape)}")
        if k < self.max_depth:
            raise MedusaTreeError(
                f"tree depth {self.max_depth} needs at least {self.max_depth} heads, the head logits have {k}: "
                f"use a smaller tree or more heads")
        if v < self.topk:
            raise MedusaTreeError(f"topk={self.topk} exceeds the vocabulary size {v}: use a smaller topk")
        top = head_logits[:, : self.max_depth].topk(self.topk, dim=-1).indices  # [B, D, topk]
        flat = torch.cat([root_tokens.to(torch.int64).unsqueeze(1), top.reshape(b, -1)], dim=1)
        return flat[:, self.tree_indices.to(flat.device)]

    def candidates_from_topk(self, root_tokens: Tensor, top_ids: Tensor, num_nodes: int | None = None) -> Tensor:
        """Draft tokens of the first ``num_nodes`` nodes from each head's top-k ids (the fast draft path).

        Args:
            root_tokens: [B] int64, the last emitted token of each request.
            top_ids: [B, K, topk] int64 token ids, best first (``MedusaHeads.draft_topk``); ``K >=
                prefix_depth[num_nodes]`` (the heads the prefix needs), extra heads are ignored.
            num_nodes: n in 0..N (default N).
        Returns:
            [B, n+1] int64: column 0 = root, column i = ``top_ids[:, depth[i]-1, rank[i]]`` — the first n+1 columns of
            ``build_candidates(root_tokens, logits)`` when ``top_ids`` are the top-k of those logits.
        Raises:
            MedusaTreeError: bad shapes, too few heads or ranks for the prefix, n out of range.
        """
        n = self.num_nodes if num_nodes is None else int(num_nodes)
        if not 0 <= n <= self.num_nodes:
            raise MedusaTreeError(f"num_nodes={num_nodes} is outside 0..{self.num_nodes}")
        if top_ids.dim() != 3 or top_ids.shape[2] != self.topk or root_tokens.shape != top_ids.shape[:1]:
            raise MedusaTreeError(f"top_ids must be [B, K, topk={self.topk}] with root_tokens [B], got "
                                  f"{tuple(top_ids.shape)} and {tuple(root_tokens.shape)}")
        if top_ids.shape[1] < self.prefix_depth[n]:
            raise MedusaTreeError(f"the first {n} nodes reach depth {self.prefix_depth[n]} but top_ids has "
                                  f"{top_ids.shape[1]} heads: run at least {self.prefix_depth[n]} heads")
        b = top_ids.shape[0]
        flat = torch.cat([root_tokens.to(torch.int64).unsqueeze(1), top_ids.reshape(b, -1).to(torch.int64)], dim=1)
        return flat[:, self.tree_indices[: n + 1].to(flat.device)]

    # ---------------------------------------------------------------- text
    def describe(self) -> str:
        """Multi-line summary plus an ASCII drawing (one line per node, labelled with its rank path)."""
        lines = [
            f"Medusa tree: {self.num_nodes} draft nodes (+ root = {self.num_nodes + 1} query tokens per step), "
            f"depth {self.max_depth}, topk {self.topk}",
            f"nodes per depth: {', '.join(map(str, self.nodes_per_depth))}",
            f"leaves (root-to-leaf paths): {self.num_leaves}",
            "root (node 0: last emitted token)",
        ]

        def walk(node: int, prefix: str) -> None:
            kids = self.children[node]
            for j, c in enumerate(kids):
                last = j == len(kids) - 1
                path = self.choices[c - 1]
                lines.append(f"{prefix}{'└── ' if last else '├── '}{'.'.join(map(str, path))}  "
                             f"(node {c}: head {len(path) - 1} rank {path[-1]})")
                walk(c, prefix + ("    " if last else "│   "))

        walk(0, "")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"MedusaTree(num_nodes={self.num_nodes}, max_depth={self.max_depth}, topk={self.topk})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MedusaTree) and self.choices == other.choices and self.topk == other.topk

    def __hash__(self) -> int:
        return hash((tuple(self.choices), self.topk))
