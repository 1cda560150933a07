"""``medusa-plugin demo`` end to end (quick recipe, reference engine) and its cache location."""

from __future__ import annotations

import re
from pathlib import Path

from medusa_plugin import demo
from medusa_plugin.cli import main


def test_demo_quick_reference(tmp_path, capsys):
    args = ["demo", "--quick", "--engine", "reference", "--cache-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "engine: reference decoder (transformers)" in out
    assert re.search(r"identical output:\s+yes", out), out
    tps = float(re.search(r"tokens per step:\s+([\d.]+)", out).group(1))
    assert 1.0 <= tps <= 5.0  # 4 heads: at most 4 drafts + 1 bonus
    builds = [p for p in tmp_path.iterdir() if (p / "build.json").is_file()]
    assert len(builds) == 1 and (builds[0] / "heads").is_dir() and (builds[0] / "tree.json").is_file()

    # second run: reuses the build, honours --tree
    assert main(args + ["--tree", "chain:2", "--num-prompts", "1", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "using the cached demo build" in out and "building" not in out
    assert "2 nodes, depth 2" in out and re.search(r"identical output:\s+yes", out)


def test_cache_root_honours_xdg_and_flag(tmp_path, monkeypatch):
    recipe = demo.RECIPES["quick"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = demo.cache_root(None, recipe)
    assert root.parent == tmp_path / "xdg" / "medusa_plugin" / "demo"
    assert demo.cache_root(str(tmp_path / "mine"), recipe).parent == tmp_path / "mine"
    # a different recipe builds elsewhere; generation-only settings do not change the build
    assert demo.cache_root(None, demo.RECIPES["full"]) != root
    assert demo.cache_root(None, {**recipe, "max_new_tokens": 7}) == root


def test_demo_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--quick", "--engine", "reference", "--cache-dir", str(tmp_path),
                 "--tree", "no_such_tree"]) == 1
    assert "no_such_tree" in capsys.readouterr().err
