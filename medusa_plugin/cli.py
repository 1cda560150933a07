"""The ``medusa-plugin`` command.

Subcommands implemented here: ``validate`` (check a config), ``tree`` (inspect / list / export trees), ``convert``
(normalise a heads checkpoint). Subcommands implemented elsewhere are registered lazily from a module that defines
``add_arguments(parser) -> None`` and ``run(args) -> int`` (``demo``, ``train``, ``fit-tree``, ``bench``); such a
module is only imported when its subcommand is used, so ``medusa-plugin --help`` stays fast (no torch import).
User errors (bad config, tree, heads, missing file; any ValueError subclass defined in medusa_plugin) print one line
on stderr and exit with status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

# name -> (module, one-line help)
EXTERNAL_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("medusa_plugin.demo", "Medusa vs plain decoding and vLLM ngram on SmolLM2-135M-Instruct (offline, "
                                   "vLLM engine): speed and identity"),
    "train": ("medusa_plugin.hf.train", "train Medusa heads on a Hugging Face base model"),
    "fit-tree": ("medusa_plugin.hf.fit_tree", "fit a tree to measured head accuracies"),
    "fit-acceptance": ("medusa_plugin.hf.fit_acceptance", "fit the node-acceptance model of dynamic trees for a model "
                                                          "and its heads"),
    "bench": ("medusa_plugin.bench", "benchmark Medusa against plain decoding"),
}


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad user input (imported lazily: they live in torch-importing modules)."""
    types: list[type[BaseException]] = [FileNotFoundError]
    for mod, name in (("medusa_plugin.core.config", "MedusaConfigError"), ("medusa_plugin.core.tree", "MedusaTreeError"),
                      ("medusa_plugin.core.heads", "MedusaHeadsError")):
        module = sys.modules.get(mod)
        if module is None:
            try:
                module = importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name != mod:
                    raise
                continue
        types.append(getattr(module, name))
    return tuple(types)


# ------------------------------------------------------------------------------------------------ validate
def _add_validate(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="medusa config (.yaml/.yml/.json)")
    p.add_argument("--check-files", action="store_true",
                   help="also load local 'heads' (the checkpoint must be readable and have at least as many heads "
                        "as the tree is deep) and require a 'tree_schedule' file to exist; hub heads are not fetched")


def _heads_summary(heads) -> str:
    lm = "own lm_head" if heads.own_lm_head else "base model's lm_head (v2)"
    return (f"{heads.num_heads} heads x {heads.num_layers} layer(s), hidden {heads.hidden_size}, vocab "
            f"{heads.vocab_size}, {lm}, {heads.source_format} format")


def _run_validate(args: argparse.Namespace) -> int:
    from medusa_plugin.core.config import check_local_files, heads_is_local, load_config, validate

    cfg = load_config(args.config)
    tree = validate(cfg)
    heads = check_local_files(cfg, tree) if args.check_files else None
    kind = "local path" if heads_is_local(cfg.heads) else "hub repo"
    rev = f", revision {cfg.heads_revision}" if cfg.heads_revision else ""
    if heads is not None:
        kind += ": " + _heads_summary(heads)
    elif args.check_files:
        kind += ", not fetched"
    if cfg.is_dynamic:
        tree_line = (f"  tree:           {tree.describe()}\n"
                     f"                  (EAGLE-2-style: each request's tree is rebuilt every step from the heads' own "
                     f"probabilities, calibrated online from the accepted paths)")
        if not cfg.acceptance_model:
            scores = "the calibrated head probability x the successor-level multiplier (acceptance_model: false)"
        elif cfg.successors:
            scores = ("the learned acceptance model next to the heads (acceptance_model.safetensors: head "
                      "probability, successor level and the request's own context -> acceptance), when there is "
                      "one; else the calibrated head probability x the successor-level multiplier")
        else:
            scores = ("the calibrated head probability (successors: false; an acceptance model next to the heads is "
                      "used only if it was fitted without successor levels)")
        tree_line += "\n  node scores:    " + scores
        if cfg.ngram_branches:
            tree_line += (f"\n  ngram_branches: {cfg.ngram_branches}: prompt-lookup continuations of the request's "
                          f"own tokens (vLLM's ngram rule) compete for the same budget; a shared prefix is one node")
    else:
        tree_line = (f"  tree:           {cfg.tree_name}: {tree.num_nodes} nodes (+ root), depth {tree.max_depth}, "
                     f"{tree.num_leaves} leaves, nodes per depth {tree.nodes_per_depth}, topk {cfg.topk}")
    lines = [
        f"medusa config OK: {args.config}",
        f"  heads:          {cfg.heads} ({kind}{rev})",
        tree_line,
        f"  acceptance:     {cfg.acceptance.describe()}",
        f"  max_batch_size: {cfg.max_batch_size if cfg.max_batch_size is not None else 'none (always speculate)'}",
        f"  tree_schedule:  {_schedule_line(cfg)}",
        f"  dtype:          {cfg.dtype}",
        f"  int8_drafting:  {_int8_line(cfg.int8_drafting)}",
    ]
    print("\n".join(lines))
    return 0


def _int8_line(mode) -> str:
    if mode is False:
        return "false (drafting always with the heads' own weights)"
    what = ("int8 weight-only copy of the heads for drafting calls of up to 16 rows (requests x heads); drafts only, "
            "the output is unchanged")
    return f"true ({what})" if mode is True else f"auto ({what}; on a CPU with native bf16 matmul, run in bf16)"


def _schedule_line(cfg) -> str:
    if cfg.is_dynamic:
        return ("auto (each step verifies the nodes worth their cost across the batch: measured step cost x the "
                "trees' path scores, up to 'budget' per request)" if cfg.tree_schedule == "auto"
                else "none (every request verifies its full 'budget' each step)")
    return cfg.tree_schedule or "none (one tree for every batch size)"


# ------------------------------------------------------------------------------------------------ tree
def _add_tree(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", help="shipped name, .yaml/.json file, 'chain:K', a list literal, or 'dynamic' "
                                          "(draws one sampled dynamic tree)")
    p.add_argument("--list", action="store_true", help="list the shipped trees")
    p.add_argument("--yaml", action="store_true", help="print the tree as a 'tree:' entry for a medusa config")
    p.add_argument("--topk", type=int, default=None, help="ranks per head the tree may use (default 10; 20 for "
                                                          "'dynamic', as a server)")
    g = p.add_argument_group("dynamic trees (spec 'dynamic')")
    g.add_argument("--budget", type=int, default=16, help="nodes of the dynamic tree (default 16)")
    g.add_argument("--ngram-branches", type=int, default=0, help="n-gram branches merged in (default 0)")
    g.add_argument("--model", help="model directory or 'smollm2': draw the tree its heads propose for --prompt "
                                   "(default: synthetic head probabilities)")
    g.add_argument("--heads", help="Medusa heads directory (default for smollm2: the shipped heads)")
    g.add_argument("--prompt", default="Explain how a bicycle gear works.", help="chat request for --model")
    g.add_argument("--seed", type=int, default=0, help="seed of the synthetic head probabilities")


def _run_tree(args: argparse.Namespace) -> int:
    from medusa_plugin.core.tree import MedusaTree, shipped_tree_names

    if args.list:
        rows = [f"{'name':<28} {'nodes':>5} {'depth':>5} {'leaves':>6}  nodes per depth"]
        for name in shipped_tree_names():
            t = MedusaTree.from_name(name, topk=10 if args.topk is None else args.topk)
            rows.append(f"{name:<28} {t.num_nodes:>5} {t.max_depth:>5} {t.num_leaves:>6}  {t.nodes_per_depth}")
        print("\n".join(rows))
        return 0
    if args.spec is None:
        print("medusa-plugin tree: error: give a tree (name, file, 'chain:K' or list literal) or --list",
              file=sys.stderr)
        return 2
    if args.spec.strip().lower() == "dynamic":
        return _run_dynamic_tree(args)
    tree = MedusaTree.load(args.spec, topk=10 if args.topk is None else args.topk)
    if args.yaml:
        print(f"# {args.spec}: {tree.num_nodes} nodes, depth {tree.max_depth}, nodes per depth {tree.nodes_per_depth}")
        print("tree:")
        print("\n".join(f"  - [{', '.join(map(str, p))}]" for p in tree.choices))
    else:
        print(tree.describe())
    return 0


def _run_dynamic_tree(args: argparse.Namespace) -> int:
    from medusa_plugin.core.config import load_config

    cfg = load_config({"heads": args.heads or "unused", "tree": "dynamic", "budget": args.budget, "topk": args.topk,
                       "ngram_branches": args.ngram_branches})
    spec = cfg.dynamic_spec()
    from medusa_plugin.core.dynamic_tree import draw_dynamic_tree

    if args.model is None:
        from medusa_plugin.hf.dynamic_sample import synthetic_dynamic_tree

        dt = synthetic_dynamic_tree(spec, seed=args.seed)
        print(f"one sampled dynamic tree from synthetic head probabilities (4 heads, seed {args.seed}); "
              f"pass --model/--heads to see real heads")
        print(draw_dynamic_tree(dt))
        return 0
    from medusa_plugin.hf.dynamic_sample import model_dynamic_tree

    heads = args.heads
    model_dir = args.model
    if model_dir.lower() in ("smollm2", "smollm2-135m-instruct"):
        from medusa_plugin.demo import shipped_heads_dir
        from medusa_plugin.hf.real_model import build_smollm2

        model_dir, heads = str(build_smollm2(dtype="float32")), heads or str(shipped_heads_dir())
    if heads is None:
        print("medusa-plugin tree: error: --model needs --heads (a Medusa heads directory)", file=sys.stderr)
        return 2
    dt, decode, how = model_dynamic_tree(spec, model_dir, heads, args.prompt)
    print(f"the dynamic tree the heads propose after the first answer token of {args.prompt!r} (nodes scored by "
          f"{how})")
    print(draw_dynamic_tree(dt, decode))
    return 0


# ------------------------------------------------------------------------------------------------ convert
def _add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="heads checkpoint: local dir/file or hub repo id (Medusa v1, v2, Medusa-2 or vLLM format)")
    p.add_argument("out_dir", help="output directory (model.safetensors + config.json)")
    p.add_argument("--revision", default=None, help="hub revision of SRC (branch, tag or commit)")
    p.add_argument("--dtype", default=None, help="float16 | bfloat16 | float32 (default: keep the checkpoint's)")
    p.add_argument("--to", default="canonical", choices=["canonical", "vllm"],
                   help="canonical (default) or vllm: the format of vLLM's built-in Medusa proposer "
                        "(speculative_config method 'medusa', a chain of each head's top-1)")
    p.add_argument("--base-model", help="--to vllm with v2 heads: the base model directory (its lm_head is written)")


def _run_convert(args: argparse.Namespace) -> int:
    from medusa_plugin.core.head_checkpoints import convert, detect_format
    from medusa_plugin.core.heads import MedusaHeads

    kwargs = {k: v for k, v in (("revision", args.revision), ("dtype", args.dtype)) if v is not None}
    if args.to == "vllm":
        from medusa_plugin.vllm_ext.convert import to_vllm_medusa

        k = to_vllm_medusa(args.src, args.out_dir, base_model=args.base_model, dtype=args.dtype)
        print(f"converted {args.src} -> {args.out_dir} (vLLM Medusa format, {k} heads); use speculative_config "
              f"{{\"method\": \"medusa\", \"model\": \"{args.out_dir}\", \"num_speculative_tokens\": {k}}}")
        return 0
    convert(args.src, args.out_dir, **kwargs)
    heads = MedusaHeads.from_pretrained(args.out_dir)
    print(f"converted {args.src} -> {args.out_dir}")
    print(f"  format:     {detect_format(args.src, revision=args.revision)}")
    print(f"  heads (K):  {heads.num_heads}")
    print(f"  layers (L): {heads.num_layers}")
    print(f"  hidden:     {heads.hidden_size}")
    print(f"  vocab:      {heads.vocab_size}")
    print(f"  lm_head:    {'own per-head lm_head (v1)' if heads.own_lm_head else 'base model lm_head (v2)'}")
    print(f"  dtype:      {str(heads.dtype).removeprefix('torch.')}")
    return 0


# ------------------------------------------------------------------------------------------------ parser
def _missing_command(name: str, module: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"medusa-plugin {name}: error: this command is not available in this installation "
              f"(module {module} is missing)", file=sys.stderr)
        return 1
    return run


def _add_external(sub, name: str, module_name: str, help_text: str, load: bool) -> None:
    """Register ``name``; its module is imported only when ``load`` (the user picked this subcommand)."""
    if load:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            parents = {module_name.rsplit(".", i)[0] for i in range(module_name.count("."))}
            if e.name not in parents | {module_name} or e.name == "medusa_plugin":
                raise  # a real missing dependency inside the module: do not hide it
        else:
            p = sub.add_parser(name, help=help_text, description=help_text)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
            return
    # a placeholder: its arguments are unknown until the module is imported (main() lets it take any)
    p = sub.add_parser(name, help=help_text, description=help_text, add_help=not load)
    p.set_defaults(_run=_missing_command(name, module_name) if load else None, _placeholder=True)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The full parser; only the external subcommand named first in ``argv`` (if any) gets its module imported."""
    from medusa_plugin import __version__

    parser = argparse.ArgumentParser(prog="medusa-plugin",
                                     description="Medusa tree speculative decoding for vLLM: configs, trees, heads.")
    parser.add_argument("--version", action="version", version=f"medusa-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, add, run, help_text in (
        ("validate", _add_validate, _run_validate, "check a medusa config file and print a summary"),
        ("tree", _add_tree, _run_tree, "describe, list or export Medusa trees"),
        ("convert", _add_convert, _run_convert, "convert a Medusa heads checkpoint to the canonical format"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(_run=run)
    chosen = argv[0] if argv else None
    for name, (module_name, help_text) in EXTERNAL_COMMANDS.items():
        _add_external(sub, name, module_name, help_text, load=name == chosen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_placeholder", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args._run(args) or 0)
    except Exception as e:
        # the package's own errors are all ValueError subclasses with user-facing messages (house rule)
        ours = isinstance(e, ValueError) and type(e).__module__.startswith("medusa_plugin.")
        if not (ours or isinstance(e, _user_error_types())):
            raise
        print(f"medusa-plugin {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
