"""Medusa settings: the YAML schema, its loader and its validation.

A config is a small mapping (YAML file, YAML/JSON string, or dict — also wrapped as ``{"medusa": {...}}``, the form
it takes inside vLLM's ``--additional-config``)::

    heads: FasterDecoding/medusa-vicuna-7b-v1.3   # hub id, or local dir / file (required)
    heads_revision: null                         # optional hub revision (branch, tag or commit)
    tree: vicuna_7b_stage2                       # shipped name | .yaml/.json file | "chain:K" | list literal | dynamic
    topk: 10                                     # ranks per head the tree may use (tree ranks must be < topk;
                                                 # default 10, 20 with tree: dynamic)
    budget: 16                                   # tree: dynamic only: nodes per request and step (default 16)
    ngram_branches: 0                            # tree: dynamic only: n-gram (prompt lookup) branches merged in
    successors: true                             # tree: dynamic only: re-score nodes by the successors.safetensors
                                                 # next to the heads, when there is one (core.successor_prior)
    acceptance_model: true                       # tree: dynamic only: score nodes with the acceptance_model.safetensors
                                                 # next to the heads, when there is one (core.acceptance_model)
    acceptance:
      rule: lossless                             # lossless (default) | typical
      posterior_threshold: 0.09                  # typical only
      posterior_alpha: 0.3                       # typical only
    max_batch_size: 32                           # above this many running requests: no speculation (null: always)
    tree_schedule: null                          # null | auto | path to a YAML table of batch size -> tree (dynamic: auto only)
    dtype: auto                                  # auto (the base model's) | float16 | bfloat16 | float32
    int8_drafting: auto                          # auto (a CPU with native bf16) | true | false: an int8 copy of
                                                 # the heads for drafting calls of few rows (core.int8_heads; drafts
                                                 # only, the output is unchanged)

``tree: dynamic`` builds a tree per request and step: the ``budget`` nodes of highest path probability over the
heads' top-``topk`` lattice, plus up to ``ngram_branches`` prompt-lookup continuations of the request's own tokens
(``core.dynamic_tree``). :func:`validate` returns a ``core.dynamic_tree.DynamicTreeSpec`` for it.

Acceptance rules (``acceptance.rule``; ``acceptance: typical`` is shorthand for ``acceptance: {rule: typical}``):

* ``lossless`` (default): the output distribution is exactly the base model's. Requests with temperature 0 use
  exact greedy matching (``core.acceptance.greedy_accept``); requests with temperature > 0 use lossless tree
  sampling (``sampling_accept``) with the request's temperature / top-p / top-k. ``greedy`` and ``sampling`` are
  accepted as aliases of ``lossless`` (a "greedy" config never degrades sampled requests to greedy).
* ``typical``: upstream Medusa's typical acceptance (``typical_accept``) for temperature > 0 requests: faster but
  lossy (opt-in). Temperature-0 requests still use exact greedy matching, as upstream does.

:meth:`AcceptanceConfig.rule_for` maps a request temperature to the ``core.acceptance.accept`` rule name.
Errors are :class:`MedusaConfigError` (a ``ValueError``) naming the key, the bad value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

__all__ = ["AcceptanceConfig", "MedusaConfig", "MedusaConfigError", "load_config", "validate", "heads_is_local",
           "check_tree_depth", "check_local_files", "local_heads", "DEFAULT_TREE"]

DEFAULT_TREE = "mc_sim_7b_63"
DYNAMIC_TREE = "dynamic"
DEFAULT_DYNAMIC_BUDGET = 16
DEFAULT_TOPK, DEFAULT_DYNAMIC_TOPK = 10, 20  # dynamic trees: with the acceptance model the top-20 lattice accepts
# 1-2 % more tokens per step than the top-10 (benchmarks/README.md, session 10)
MAX_NGRAM_BRANCHES = 8
ACCEPTANCE_RULES = ("lossless", "typical")
RULE_ALIASES = {"greedy": "lossless", "sampling": "lossless"}
DTYPES = ("auto", "float16", "bfloat16", "float32")
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
HEADS_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# Keys people plausibly write (from upstream Medusa / vLLM) that difflib would not map to ours.
_KEY_HINTS = {"choices": "tree", "medusa_choices": "tree", "speculative_token_tree": "tree", "rule": "acceptance",
              "revision": "heads_revision", "model": "heads", "medusa_heads": "heads", "heads_path": "heads",
              "temperature": "acceptance", "threshold": "posterior_threshold", "alpha": "posterior_alpha",
              "num_nodes": "budget", "nodes": "budget", "ngram": "ngram_branches", "prompt_lookup": "ngram_branches"}


class MedusaConfigError(ValueError):
    """Invalid Medusa settings; the message names the key, the value and the fix."""


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_keys(data: Mapping, allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key in allowed:
            continue
        if not isinstance(key, str):
            raise MedusaConfigError(f"keys in {where} must be strings, got {_describe(key)}")
        guess = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        hint = _KEY_HINTS.get(key)
        if not guess and hint in allowed:
            guess = [hint]
        fix = f"did you mean '{guess[0]}'?" if guess else f"valid keys: {', '.join(allowed)}"
        raise MedusaConfigError(f"unknown key '{key}' in {where}; {fix}")


def _check_unit_interval(name: str, v: Any) -> float:
    if not _is_number(v):
        raise MedusaConfigError(f"'{name}' must be a number in (0, 1], got {_describe(v)}")
    if not 0.0 < v <= 1.0:
        raise MedusaConfigError(f"'{name}' must be in (0, 1], got {v}")
    return float(v)


@dataclass
class AcceptanceConfig:
    """How drafted tree nodes are verified.

    rule: ``"lossless"`` (exact for temperature 0, lossless tree sampling for temperature > 0) or ``"typical"``
    (lossy typical acceptance for temperature > 0). ``"greedy"``/``"sampling"`` are normalised to ``"lossless"``.
    posterior_threshold / posterior_alpha: typical acceptance's hard threshold epsilon and entropy factor delta
    (upstream defaults 0.09 / 0.3); both in (0, 1].
    """

    rule: str = "lossless"
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3

    FIELDS = ("rule", "posterior_threshold", "posterior_alpha")

    def __post_init__(self) -> None:
        if not isinstance(self.rule, str):
            raise MedusaConfigError(f"'acceptance.rule' must be a string (lossless | typical), got {_describe(self.rule)}")
        rule = RULE_ALIASES.get(self.rule.lower(), self.rule.lower())
        if rule not in ACCEPTANCE_RULES:
            guess = difflib.get_close_matches(rule, ACCEPTANCE_RULES + tuple(RULE_ALIASES), n=1)
            hint = f"; did you mean '{guess[0]}'?" if guess else ""
            raise MedusaConfigError(
                f"'acceptance.rule' must be 'lossless' (exact; aliases 'greedy', 'sampling') or 'typical' (lossy), "
                f"got '{self.rule}'{hint}")
        self.rule = rule
        self.posterior_threshold = _check_unit_interval("acceptance.posterior_threshold", self.posterior_threshold)
        self.posterior_alpha = _check_unit_interval("acceptance.posterior_alpha", self.posterior_alpha)

    @property
    def is_lossless(self) -> bool:
        return self.rule == "lossless"

    def rule_for(self, temperature: float) -> str:
        """The ``core.acceptance.accept`` rule for a request: "greedy" | "sampling" | "typical"."""
        if temperature <= 0:
            return "greedy"
        return "sampling" if self.rule == "lossless" else "typical"

    def describe(self) -> str:
        if self.rule == "lossless":
            return "lossless (exact match at temperature 0, lossless tree sampling at temperature > 0)"
        return (f"typical (lossy at temperature > 0; posterior_threshold={self.posterior_threshold}, "
                f"posterior_alpha={self.posterior_alpha}; exact match at temperature 0)")


@dataclass
class MedusaConfig:
    """Validated Medusa settings (see the module docstring for every key).

    ``tree`` is kept as given (a spec string or a list of paths); :func:`validate` builds the ``MedusaTree``.
    Constructing one directly runs the same type/range checks as :func:`load_config`.
    """

    heads: str
    tree: str | list = DEFAULT_TREE
    topk: int | None = None
    acceptance: AcceptanceConfig = field(default_factory=AcceptanceConfig)
    max_batch_size: int | None = None
    tree_schedule: str | None = None
    dtype: str = "auto"
    heads_revision: str | None = None
    budget: int | None = None
    ngram_branches: int = 0
    successors: bool = True
    acceptance_model: bool = True
    int8_drafting: str | bool = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.heads, os.PathLike):
            self.heads = os.fspath(self.heads)
        if not isinstance(self.heads, str) or not self.heads.strip():
            raise MedusaConfigError(
                f"'heads' must be a non-empty string (a Hugging Face repo id such as "
                f"FasterDecoding/medusa-vicuna-7b-v1.3, or a local directory/file), got {_describe(self.heads)}")
        self.heads = self.heads.strip()
        self.tree = _check_tree(self.tree)
        if self.topk is None:
            self.topk = DEFAULT_DYNAMIC_TOPK if self.tree == DYNAMIC_TREE else DEFAULT_TOPK
        if not _is_int(self.topk):
            raise MedusaConfigError(f"'topk' must be an integer, got {_describe(self.topk)}")
        if self.topk < 1:
            raise MedusaConfigError(f"'topk' must be >= 1, got {self.topk}")
        if isinstance(self.acceptance, str):
            self.acceptance = AcceptanceConfig(rule=self.acceptance)
        elif isinstance(self.acceptance, Mapping):
            _check_keys(self.acceptance, AcceptanceConfig.FIELDS, "medusa config 'acceptance'")
            self.acceptance = AcceptanceConfig(**self.acceptance)
        elif not isinstance(self.acceptance, AcceptanceConfig):
            raise MedusaConfigError(
                f"'acceptance' must be a mapping (rule, posterior_threshold, posterior_alpha) or a rule name, "
                f"got {_describe(self.acceptance)}")
        if self.max_batch_size is not None:
            if not _is_int(self.max_batch_size):
                raise MedusaConfigError(
                    f"'max_batch_size' must be an integer or null, got {_describe(self.max_batch_size)}")
            if self.max_batch_size < 1:
                raise MedusaConfigError(
                    f"'max_batch_size' must be >= 1 (or null to always speculate), got {self.max_batch_size}")
        if self.tree_schedule is not None and (not isinstance(self.tree_schedule, (str, os.PathLike))
                                               or not str(self.tree_schedule).strip()):
            raise MedusaConfigError(
                f"'tree_schedule' must be null, 'auto' or a path to a YAML table, got {_describe(self.tree_schedule)}")
        if self.tree_schedule is not None:
            self.tree_schedule = os.fspath(self.tree_schedule)
        if not isinstance(self.dtype, str):
            raise MedusaConfigError(f"'dtype' must be a string ({' | '.join(DTYPES)}), got {_describe(self.dtype)}")
        dtype = DTYPE_ALIASES.get(self.dtype.lower(), self.dtype.lower())
        if dtype not in DTYPES:
            raise MedusaConfigError(f"'dtype' must be one of {', '.join(DTYPES)}, got '{self.dtype}'")
        self.dtype = dtype
        if self.heads_revision is not None and not isinstance(self.heads_revision, str):
            raise MedusaConfigError(
                f"'heads_revision' must be a string (branch, tag or commit) or null, got {_describe(self.heads_revision)}")
        if isinstance(self.tree, str) and self.tree.lower() == DYNAMIC_TREE:
            self.tree = DYNAMIC_TREE
        if self.budget is not None:
            if not self.is_dynamic:
                raise MedusaConfigError(f"'budget' applies to 'tree: dynamic' only (a static tree's size is its node "
                                        f"count): remove it or set 'tree: dynamic'")
            if not _is_int(self.budget) or self.budget < 1:
                raise MedusaConfigError(f"'budget' must be an integer >= 1 (tree nodes per request and step), "
                                        f"got {_describe(self.budget)}")
        if not _is_int(self.ngram_branches) or not 0 <= self.ngram_branches <= MAX_NGRAM_BRANCHES:
            raise MedusaConfigError(f"'ngram_branches' must be an integer in 0..{MAX_NGRAM_BRANCHES} (n-gram "
                                    f"continuations per tree), got {_describe(self.ngram_branches)}")
        if self.is_dynamic and self.tree_schedule not in (None, "auto"):
            raise MedusaConfigError("with 'tree: dynamic' only 'tree_schedule: auto' applies (each step's node count "
                                    "from the measured step cost and the trees' own path scores; a schedule table "
                                    "picks prefixes of one static tree): use 'auto' or remove 'tree_schedule'")
        if not (isinstance(self.int8_drafting, bool) or self.int8_drafting == "auto"):
            raise MedusaConfigError(f"'int8_drafting' must be auto, true or false (int8 copies of the heads for "
                                    f"drafting calls of few rows on a CPU), got {_describe(self.int8_drafting)}")
        if not isinstance(self.successors, bool):
            raise MedusaConfigError(f"'successors' must be true or false (tree: dynamic: re-score nodes by the "
                                    f"successor counts next to the heads), got {_describe(self.successors)}")
        if not isinstance(self.acceptance_model, bool):
            raise MedusaConfigError(f"'acceptance_model' must be true or false (tree: dynamic: score nodes with the "
                                    f"learned acceptance model next to the heads), got "
                                    f"{_describe(self.acceptance_model)}")
        if self.ngram_branches and not self.is_dynamic:
            raise MedusaConfigError("'ngram_branches' needs 'tree: dynamic' (n-gram branches are merged into a tree "
                                    "built per request): set 'tree: dynamic' or remove 'ngram_branches'")

    @property
    def is_dynamic(self) -> bool:
        """``tree: dynamic``: a tree per request and step (``core.dynamic_tree``)."""
        return self.tree == DYNAMIC_TREE

    def dynamic_spec(self, num_heads: int | None = None):
        """The ``core.dynamic_tree.DynamicTreeSpec`` of a ``tree: dynamic`` config (MedusaConfigError otherwise or on
        a budget larger than ``num_heads`` heads x ``topk`` ranks hold)."""
        from medusa_plugin.core.dynamic_tree import DynamicTreeError, DynamicTreeSpec

        if not self.is_dynamic:
            raise MedusaConfigError(f"the tree {self.tree_name!r} is static, not 'dynamic'")
        try:
            return DynamicTreeSpec(budget=self.budget or DEFAULT_DYNAMIC_BUDGET, topk=self.topk, num_heads=num_heads,
                                   ngram_branches=self.ngram_branches)
        except DynamicTreeError as e:
            raise MedusaConfigError(f"invalid 'tree: dynamic': {e}") from None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict:
        """Plain dict (YAML/JSON-serialisable) that :func:`load_config` turns back into an equal config."""
        d = dataclasses.asdict(self)
        if isinstance(self.tree, list):
            d["tree"] = [list(p) for p in self.tree]
        return d

    @property
    def tree_name(self) -> str:
        """A short label for the tree (the spec string, or "custom (N nodes)")."""
        return self.tree if isinstance(self.tree, str) else f"custom ({len(self.tree)} nodes)"


def _check_tree(tree: Any) -> str | list:
    if isinstance(tree, os.PathLike):
        tree = os.fspath(tree)
    if isinstance(tree, str):
        if not tree.strip():
            raise MedusaConfigError("'tree' must not be empty; use a shipped name such as 'mc_sim_7b_63', "
                                    "a .yaml/.json file, 'chain:K' or a list of paths")
        return tree.strip()
    if isinstance(tree, (list, tuple)):
        out = []
        for path in tree:
            if not isinstance(path, (list, tuple)) or not all(_is_int(r) for r in path):
                raise MedusaConfigError(
                    f"'tree' given as a list must be a list of paths of integer ranks such as [[0], [0, 0], [1]], "
                    f"got an entry {_describe(path)}")
            out.append(list(path))
        return out
    raise MedusaConfigError(
        f"'tree' must be a name, a file, 'chain:K' or a list of paths, got {_describe(tree)}")


def _read_source(src: Any) -> tuple[Any, Path | None]:
    """-> (parsed data, directory of the file it came from or None)."""
    if isinstance(src, Mapping):
        return dict(src), None
    if isinstance(src, os.PathLike) or (isinstance(src, str) and _looks_like_path(src)):
        path = Path(os.fspath(src)).expanduser()
        if not path.is_file():
            raise MedusaConfigError(f"medusa config file not found: {path.resolve()}")
        text = path.read_text()
        return _parse(text, str(path.resolve()), json_only=path.suffix.lower() == ".json"), path.resolve().parent
    if isinstance(src, str):
        return _parse(src, "<string>"), None
    raise MedusaConfigError(
        f"medusa config must be a path to a .yaml/.json file, a YAML string or a dict, got {_describe(src)}")


def _looks_like_path(src: str) -> bool:
    s = src.strip()
    if "\n" in s or ": " in s or s.startswith(("{", "[")):
        return False
    return s.lower().endswith(CONFIG_SUFFIXES) or os.path.isfile(s)


def _parse(text: str, origin: str, json_only: bool = False) -> Any:
    if json_only:
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise MedusaConfigError(f"malformed JSON in {origin} at line {e.lineno}, column {e.colno}: {e.msg}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise MedusaConfigError(f"malformed YAML in {origin}{where}: {problem}") from None


def _resolve_relative(value: str, base: Path | None) -> str:
    """A relative local path in a config file is looked up next to that file first (then in the cwd)."""
    p = Path(value).expanduser()
    if base is None or p.is_absolute() or p.exists():
        return value
    candidate = base / p
    return str(candidate) if candidate.exists() else value


def load_config(src: str | os.PathLike | Mapping) -> MedusaConfig:
    """Load and check Medusa settings.

    src: a path to a .yaml/.yml/.json file, a YAML (or JSON) string, or a dict; ``{"medusa": {...}}`` (vLLM's
    ``--additional-config`` form, other keys ignored) is unwrapped, and ``{"medusa": "file.yaml"}`` is followed.
    Raises MedusaConfigError. Does not build the tree or touch the heads: see :func:`validate`.
    """
    data, base = _read_source(src)
    if isinstance(data, Mapping) and "medusa" in data and "heads" not in data:
        inner = data["medusa"]
        data, base = _read_source(inner) if isinstance(inner, (str, os.PathLike)) else (inner, base)
    if not isinstance(data, Mapping):
        extra = ""
        if isinstance(data, str) and "\n" not in data:
            extra = f" (if it is a file path: no such file {Path(data).expanduser().resolve()})"
        raise MedusaConfigError(f"medusa config must be a mapping of settings (heads, tree, ...), "
                                f"got {_describe(data)}{extra}")
    _check_keys(data, MedusaConfig.field_names(), "medusa config")
    if data.get("heads") is None:
        raise MedusaConfigError("medusa config is missing required key 'heads' (a Hugging Face repo id such as "
                                "FasterDecoding/medusa-vicuna-7b-v1.3, or a local directory/file)")
    data = dict(data)
    if base is not None:
        if isinstance(data["heads"], str) and heads_is_local(data["heads"]):
            data["heads"] = _resolve_relative(data["heads"], base)
        if isinstance(data.get("tree"), str) and data["tree"].lower().endswith(CONFIG_SUFFIXES):
            data["tree"] = _resolve_relative(data["tree"], base)
        if isinstance(data.get("tree_schedule"), str) and data["tree_schedule"] != "auto":
            data["tree_schedule"] = _resolve_relative(data["tree_schedule"], base)
    for key in ("acceptance",):  # explicit null -> default
        if key in data and data[key] is None:
            del data[key]
    return MedusaConfig(**data)


def heads_is_local(heads: str) -> bool:
    """True if ``heads`` names a local path rather than a hub repo id ("org/name")."""
    p = Path(heads).expanduser()
    return (p.is_absolute() or heads.startswith(("./", "../", "~", ".\\")) or p.exists()
            or heads.lower().endswith(HEADS_FILE_SUFFIXES) or heads.count("/") > 1)


def check_tree_depth(tree, num_heads: int, *, tree_name: str, heads: str) -> None:
    """Refuse a tree deeper than the heads: node depth d is drafted by head d-1, so depth D needs D heads.

    Shared by ``medusa-plugin validate --check-files`` and the engine's proposer (when it loads the heads), so both
    give the same message. ``tree``: a ``core.tree.MedusaTree``. Raises MedusaConfigError.
    """
    if tree.max_depth > num_heads:
        raise MedusaConfigError(
            f"the tree {tree_name!r} is {tree.max_depth} deep but the heads at {heads!r} have only {num_heads}: "
            f"choose a tree of depth <= {num_heads} (for example 'chain:{num_heads}', or medusa-plugin fit-tree "
            f"for these heads), or heads with at least {tree.max_depth} heads")


def validate(config: MedusaConfig | str | os.PathLike | Mapping, *, check_files: bool = False):
    """Fully check a config: parse it (if needed) and build its ``MedusaTree`` (returned; for ``tree: dynamic`` the
    ``core.dynamic_tree.DynamicTreeSpec`` instead).

    With ``check_files``: a local ``heads`` path must exist and hold loadable Medusa heads with at least as many
    heads as the tree is deep (:func:`check_tree_depth`), and a ``tree_schedule`` file must exist. Hub heads are
    not downloaded. Tree and head errors are re-raised as MedusaConfigError. Returns the ``core.tree.MedusaTree``
    (CPU).
    """
    if not isinstance(config, MedusaConfig):
        config = load_config(config)
    from medusa_plugin.core.tree import MedusaTree, MedusaTreeError

    if config.is_dynamic:
        spec = config.dynamic_spec()
        if check_files:
            check_local_files(config, spec)
        return spec
    try:
        if isinstance(config.tree, list):
            tree = MedusaTree.from_choices(config.tree, topk=config.topk)
        else:
            tree = MedusaTree.load(config.tree, topk=config.topk)
    except MedusaTreeError as e:
        raise MedusaConfigError(f"invalid 'tree' ({config.tree_name}): {e}") from None
    except FileNotFoundError as e:
        raise MedusaConfigError(f"invalid 'tree' ({config.tree_name}): file not found: "
                                f"{Path(e.filename or config.tree_name).resolve()}") from None
    if check_files:
        check_local_files(config, tree)
    return tree


def check_local_files(config: MedusaConfig, tree):
    """The file checks of ``validate(..., check_files=True)``; returns the loaded heads (None for hub heads).

    A local ``heads`` path must hold loadable Medusa heads with at least as many heads as ``tree`` (a
    ``core.tree.MedusaTree``) is deep (:func:`check_tree_depth`); a ``tree_schedule`` file must exist. Hub heads
    are not downloaded. Raises MedusaConfigError.
    """
    heads = None
    if heads_is_local(config.heads):
        heads = local_heads(config)
        if config.is_dynamic:
            config.dynamic_spec(heads.num_heads)
            model = Path(config.heads).expanduser() / "acceptance_model.safetensors"
            if config.acceptance_model and model.is_file():  # the proposer loads it at engine start
                from medusa_plugin.core.acceptance_model import AcceptanceModelError, NodeAcceptanceModel

                try:
                    NodeAcceptanceModel.load(model, heads.num_heads)
                except AcceptanceModelError as e:
                    raise MedusaConfigError(str(e)) from None
        else:
            check_tree_depth(tree, heads.num_heads, tree_name=config.tree_name, heads=config.heads)
    sched = config.tree_schedule
    if sched is not None and sched != "auto" and not Path(sched).expanduser().is_file():
        raise MedusaConfigError(f"'tree_schedule' file not found: {Path(sched).expanduser().resolve()}")
    return heads


def local_heads(config: MedusaConfig):
    """The ``core.heads.MedusaHeads`` at a config's local ``heads`` path (CPU, checkpoint dtype).

    Raises MedusaConfigError when the path does not exist or the checkpoint cannot be loaded (the message of
    ``core.head_checkpoints`` names the file, the key, the cause and the fix).
    """
    path = Path(config.heads).expanduser()
    if not path.exists():
        raise MedusaConfigError(f"'heads' path does not exist: {path.resolve()} "
                                f"(give an existing directory/file or a hub repo id 'org/name')")
    from medusa_plugin.core.heads import MedusaHeads, MedusaHeadsError

    try:
        return MedusaHeads.from_pretrained(path)
    except MedusaHeadsError as e:
        raise MedusaConfigError(f"invalid 'heads': {e}") from None
