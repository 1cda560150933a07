"""core/config.py: sources, aliases, round trip, and every error path with its message."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from medusa_plugin.core.config import (AcceptanceConfig, MedusaConfig, MedusaConfigError, check_tree_depth,
                                       load_config, validate)
from medusa_plugin.core.heads import MedusaHeads
from medusa_plugin.core.tree import MedusaTree

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.y*ml"))
FULL = {
    "heads": "org/heads", "tree": "vicuna_7b_stage2", "topk": 8,
    "acceptance": {"rule": "typical", "posterior_threshold": 0.2, "posterior_alpha": 0.5},
    "max_batch_size": 16, "tree_schedule": "auto", "dtype": "bfloat16", "heads_revision": "main",
}


def test_defaults():
    cfg = load_config({"heads": "org/heads"})
    assert cfg == MedusaConfig(heads="org/heads")
    assert (cfg.tree, cfg.topk, cfg.dtype, cfg.max_batch_size, cfg.tree_schedule) == ("mc_sim_7b_63", 10, "auto",
                                                                                       None, None)
    assert cfg.acceptance == AcceptanceConfig("lossless", 0.09, 0.3)


def test_sources_agree(tmp_path):
    expected = load_config(FULL)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(FULL))
    (tmp_path / "c.json").write_text(json.dumps(FULL))
    sources = [{"medusa": FULL}, {"medusa": FULL, "other_plugin": {"x": 1}}, yaml.safe_dump(FULL), json.dumps(FULL),
               str(tmp_path / "c.yaml"), tmp_path / "c.json", {"medusa": str(tmp_path / "c.yaml")}]
    for src in sources:
        assert load_config(src) == expected, src
    assert expected.acceptance.rule == "typical" and expected.topk == 8


@pytest.mark.parametrize("src", [FULL, {"heads": "./local_dir", "tree": [[0], [0, 0], [1]]},
                                 {"heads": "x/y", "tree": "chain:3", "acceptance": "sampling"}])
def test_round_trip(src):
    cfg = load_config(src)
    d = cfg.to_dict()
    assert load_config(d) == cfg
    assert load_config(yaml.safe_dump(d)) == cfg  # the dict is plain YAML data


@pytest.mark.parametrize("rule", ["greedy", "sampling", "lossless", "Greedy"])
def test_lossless_aliases(rule):
    acc = load_config({"heads": "a/b", "acceptance": {"rule": rule}}).acceptance
    assert acc.rule == "lossless" and acc.is_lossless
    # a "greedy" config never turns sampled requests greedy: T > 0 uses lossless tree sampling
    assert [acc.rule_for(t) for t in (0.0, 0.7)] == ["greedy", "sampling"]


def test_typical_rule_and_shorthand():
    acc = load_config({"heads": "a/b", "acceptance": "typical"}).acceptance
    assert acc.rule == "typical" and not acc.is_lossless
    assert [acc.rule_for(t) for t in (0.0, 1.0)] == ["greedy", "typical"]


def test_dtype_alias():
    assert load_config({"heads": "a/b", "dtype": "bf16"}).dtype == "bfloat16"


def test_relative_paths_resolve_next_to_config_file(tmp_path):
    (tmp_path / "my_tree.yaml").write_text("[[0], [1], [0, 0]]\n")
    MedusaHeads.init_from_lm_head(torch.randn(80, 8), num_heads=2).save_pretrained(tmp_path / "heads")
    (tmp_path / "c.yaml").write_text("heads: ./heads\ntree: my_tree.yaml\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert Path(cfg.heads) == tmp_path / "heads" and Path(cfg.tree) == tmp_path / "my_tree.yaml"
    tree = validate(cfg, check_files=True)
    assert tree == MedusaTree.from_choices([[0], [1], [0, 0]])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    tree = validate(cfg)
    assert cfg.heads.startswith("FasterDecoding/") or path.name.startswith("chain")
    assert cfg.acceptance.rule == "lossless"
    if not path.name.startswith("chain"):
        assert tree.num_nodes == 63 and tree == MedusaTree.from_name(cfg.tree)


def test_shipped_configs_pair_heads_with_their_trees():
    pairs = {p.name: (c.heads, c.tree) for p in CONFIGS for c in [load_config(p)]}
    assert pairs["vicuna-7b-v1.3.yaml"] == ("FasterDecoding/medusa-vicuna-7b-v1.3", "vicuna_7b_stage2")
    assert pairs["vicuna-13b-v1.3.yaml"] == ("FasterDecoding/medusa-vicuna-13b-v1.3", "vicuna_13b_stage2")
    assert pairs["vicuna-33b-v1.3.yaml"] == ("FasterDecoding/medusa-vicuna-33b-v1.3", "vicuna_33b_stage2")
    assert pairs["zephyr-7b-beta.yaml"] == ("FasterDecoding/medusa-1.0-zephyr-7b-beta", "zephyr_stage2")
    assert pairs["chain-4.yaml"][1] == "chain:4"


# ------------------------------------------------------------------------------------------ errors
def _err(src, *fragments, **kw):
    with pytest.raises(MedusaConfigError) as e:
        validate(src, **kw) if kw else load_config(src)
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))
    return str(e.value)


def test_error_file_not_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _err("nope.yaml", "not found", str(tmp_path / "nope.yaml"))


def test_error_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("heads: a/b\ntree: [0, 1\ntopk: 3\n")
    msg = _err(p, "malformed YAML", str(p), "line ")
    # the yaml error's mark: the flow sequence is found broken at line 3
    assert "line 3" in msg and "column" in msg


def test_error_malformed_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"heads": "a/b",}')
    _err(p, "malformed JSON", "line 1, column 17")


@pytest.mark.parametrize("src", ["- a\n- b\n", "[1, 2]", "42"])
def test_error_top_level_not_mapping(src):
    _err(src, "must be a mapping")


def test_error_unknown_keys_did_you_mean():
    _err({"heads": "a/b", "acceptence": {}}, "unknown key 'acceptence' in medusa config; did you mean 'acceptance'?")
    _err({"heads": "a/b", "acceptance": {"rulle": "typical"}},
         "unknown key 'rulle' in medusa config 'acceptance'; did you mean 'rule'?")
    _err({"heads": "a/b", "choices": "mc_sim_7b_63"}, "unknown key 'choices'", "did you mean 'tree'?")
    _err({"heads": "a/b", "zzz": 1}, "unknown key 'zzz'", "valid keys: heads, tree, topk")


@pytest.mark.parametrize("key,value,fragment", [
    ("topk", "ten", "'topk' must be an integer, got str 'ten'"),
    ("topk", True, "'topk' must be an integer, got bool True"),
    ("topk", 2.5, "'topk' must be an integer, got float 2.5"),
    ("max_batch_size", "8", "'max_batch_size' must be an integer or null, got str '8'"),
    ("tree", 5, "'tree' must be a name, a file, 'chain:K' or a list of paths, got int 5"),
    ("tree", [[0], ["a"]], "list of paths of integer ranks"),
    ("dtype", "int8", "'dtype' must be one of auto, float16, bfloat16, float32, got 'int8'"),
    ("heads_revision", 3, "'heads_revision' must be a string"),
    ("tree_schedule", 4, "'tree_schedule' must be null, 'auto' or a path"),
    ("acceptance", 3, "'acceptance' must be a mapping"),
])
def test_error_wrong_types(key, value, fragment):
    _err({"heads": "a/b", key: value}, fragment)


@pytest.mark.parametrize("key,value,fragment", [
    ("topk", 0, "'topk' must be >= 1, got 0"),
    ("max_batch_size", 0, "'max_batch_size' must be >= 1"),
    ("acceptance", {"posterior_threshold": 0.0}, "'acceptance.posterior_threshold' must be in (0, 1], got 0.0"),
    ("acceptance", {"posterior_alpha": 1.5}, "'acceptance.posterior_alpha' must be in (0, 1], got 1.5"),
    ("acceptance", {"posterior_alpha": "x"}, "'acceptance.posterior_alpha' must be a number in (0, 1], got str 'x'"),
    ("acceptance", {"rule": "typicall"}, "did you mean 'typical'?"),
])
def test_error_out_of_range(key, value, fragment):
    _err({"heads": "a/b", key: value}, fragment)


def test_error_missing_heads():
    _err({"tree": "chain:2"}, "missing required key 'heads'", "FasterDecoding/medusa-vicuna-7b-v1.3")
    _err("heads: ''\n", "'heads' must be a non-empty string")


def test_direct_construction_is_checked():
    with pytest.raises(MedusaConfigError, match="'topk' must be >= 1"):
        MedusaConfig(heads="a/b", topk=0)


def test_validate_tree_errors_become_config_errors(tmp_path):
    _err({"heads": "a/b", "tree": "mc_sim_7b_6"}, "invalid 'tree' (mc_sim_7b_6)", "mc_sim_7b_63", check_files=False)
    # rank 9 is not available with topk 5
    _err({"heads": "a/b", "tree": "mc_sim_7b_63", "topk": 5}, "invalid 'tree'", check_files=False)
    _err({"heads": "a/b", "tree": str(tmp_path / "t.yaml")}, "invalid 'tree'", "t.yaml", check_files=False)


def test_validate_check_files(tmp_path):
    missing = tmp_path / "no_heads"
    cfg = load_config({"heads": str(missing)})
    validate(cfg)  # files are not checked by default
    _err(cfg, "'heads' path does not exist", str(missing), check_files=True)
    validate({"heads": "org/repo"}, check_files=True)  # hub ids are not checked
    _err({"heads": "org/repo", "tree_schedule": str(tmp_path / "s.yaml")}, "'tree_schedule' file not found",
         check_files=True)


def test_validate_check_files_refuses_a_tree_deeper_than_the_heads(tmp_path):
    MedusaHeads.init_from_lm_head(torch.randn(80, 8), num_heads=3).save_pretrained(tmp_path / "heads")
    ok = validate({"heads": str(tmp_path / "heads"), "tree": "chain:3"}, check_files=True)
    assert ok.max_depth == 3
    deep = {"heads": str(tmp_path / "heads"), "tree": "mc_sim_7b_63"}
    validate(deep)  # the heads are only read with check_files
    with pytest.raises(MedusaConfigError) as e:
        validate(deep, check_files=True)
    with pytest.raises(MedusaConfigError) as direct:  # the check the proposer shares
        check_tree_depth(MedusaTree.from_name("mc_sim_7b_63"), 3, tree_name="mc_sim_7b_63",
                         heads=str(tmp_path / "heads"))
    assert str(e.value) == str(direct.value)
    assert "'mc_sim_7b_63' is 4 deep but the heads at" in str(e.value) and "have only 3" in str(e.value)
    assert "choose a tree of depth <= 3" in str(e.value)


def test_check_tree_depth_accepts_trees_up_to_the_head_count():
    tree = MedusaTree.from_name("mc_sim_7b_63")
    for num_heads in (tree.max_depth, tree.max_depth + 1):
        check_tree_depth(tree, num_heads, tree_name="t", heads="h")
    with pytest.raises(MedusaConfigError, match="is 4 deep.*have only 3"):
        check_tree_depth(tree, tree.max_depth - 1, tree_name="t", heads="h")
