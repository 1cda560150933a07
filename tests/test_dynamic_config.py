"""`tree: dynamic` in the config, `medusa-plugin validate` / `tree dynamic`, the engine's refusal, and
`medusa-plugin bench trees` on the toy model."""

from __future__ import annotations

import json

import pytest

from medusa_plugin import cli
from medusa_plugin.core.config import MedusaConfigError, load_config, validate
from medusa_plugin.core.dynamic_tree import DynamicTreeSpec


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_dynamic_config_defaults_and_round_trip():
    cfg = load_config({"heads": "a/b", "tree": "Dynamic", "ngram_branches": 2})
    assert cfg.is_dynamic and cfg.tree == "dynamic"
    spec = validate(cfg)
    assert isinstance(spec, DynamicTreeSpec)
    assert (spec.budget, spec.topk, spec.ngram_branches, spec.num_heads) == (16, 10, 2, None)
    again = load_config(cfg.to_dict())
    assert again == cfg
    assert validate(load_config("heads: a/b\ntree: dynamic\nbudget: 8\ntopk: 4\n")).budget == 8


@pytest.mark.parametrize("data,fragment", [
    ({"tree": "dynamic", "budget": 0}, "'budget' must be an integer >= 1"),
    ({"tree": "dynamic", "budget": True}, "'budget' must be an integer >= 1"),
    ({"tree": "dynamic", "budget": "8"}, "'budget' must be an integer >= 1"),
    ({"tree": "mc_sim_7b_63", "budget": 8}, "'budget' applies to 'tree: dynamic' only"),
    ({"tree": "mc_sim_7b_63", "ngram_branches": 1}, "'ngram_branches' needs 'tree: dynamic'"),
    ({"tree": "dynamic", "ngram_branches": 9}, "'ngram_branches' must be an integer in 0..8"),
    ({"tree": "dynamic", "ngram_branches": -1}, "'ngram_branches' must be an integer in 0..8"),
    ({"tree": "dynamic", "nodes": 8}, "did you mean 'budget'?"),
    ({"tree": "dynamic", "tree_schedule": "table.yaml"}, "only 'tree_schedule: auto' applies"),
])
def test_dynamic_config_errors(data, fragment):
    with pytest.raises(MedusaConfigError, match=fragment.replace("(", r"\(").replace("?", r"\?")) as e:
        validate(load_config({"heads": "a/b", **data}))
    assert "\n" not in str(e.value)


def test_budget_beyond_the_heads_is_refused_with_the_files(tiny_medusa, tmp_path):
    _, _, heads = tiny_medusa("llama")
    heads.save_pretrained(tmp_path / "heads")
    cfg = load_config({"heads": str(tmp_path / "heads"), "tree": "dynamic", "budget": 121, "topk": 3})
    validate(cfg)  # without the files the number of heads is unknown
    with pytest.raises(MedusaConfigError, match="budget 121 exceeds the 120 nodes of 4 heads x top-3"):
        validate(cfg, check_files=True)


def test_validate_explains_dynamic(tmp_path, capsys):
    f = tmp_path / "m.yaml"
    f.write_text("heads: a/b\ntree: dynamic\nbudget: 8\nngram_branches: 2\n")
    rc, out, err = run(capsys, "validate", str(f))
    assert rc == 0 and err == ""
    assert "dynamic: the 8 nodes of highest path probability" in out
    assert "ngram_branches: 2: prompt-lookup continuations" in out
    f.write_text("heads: a/b\ntree: dynamic\nbudget: -2\n")
    rc, out, err = run(capsys, "validate", str(f))
    assert rc == 1 and err.count("\n") == 1 and "'budget' must be an integer >= 1" in err


def test_tree_draws_a_sampled_dynamic_tree(capsys):
    rc, out, err = run(capsys, "tree", "dynamic", "--budget", "7", "--ngram-branches", "1")
    assert rc == 0, err
    assert "dynamic tree: 7 nodes" in out
    assert sum(line.lstrip("│ ").startswith(("├──", "└──")) for line in out.splitlines()) == 7
    rc, out, err = run(capsys, "tree", "dynamic", "--budget", "0")
    assert rc == 1 and "'budget' must be an integer >= 1" in err


def test_engine_node_count_of_a_dynamic_tree_is_its_budget():
    pytest.importorskip("vllm")
    from medusa_plugin.vllm_ext.settings import num_tree_nodes

    assert num_tree_nodes({"heads": "a/b", "tree": "dynamic", "budget": 8, "ngram_branches": 1}) == 8
    assert num_tree_nodes({"heads": "a/b", "tree": "dynamic"}) == 16


def test_simulated_ngram_tokens_per_step():
    from medusa_plugin.bench_trees import simulate_ngram_tokens_per_step

    # context 1 2 3 | 1 2 -> draft "3 ..." after the repeated "1 2"
    prompt = [1, 2, 3, 9, 1, 2]
    out = [3, 9, 1, 2, 3]  # out[0] from the prefill
    # step 1 (ctx ... 1 2 3): suffix "1 2 3" occurs at 0 -> draft 9 1 2 3, all accepted (the 4 tokens left)
    assert simulate_ngram_tokens_per_step([prompt], [out]) == 4.0
    # no repetition: one token per step
    assert simulate_ngram_tokens_per_step([[5, 6]], [[7, 8, 9]]) == 1.0


def test_paired_ratio_interval_against_a_direct_bootstrap():
    import numpy as np

    from medusa_plugin.bench_trees import paired_ratio_interval

    rng = np.random.default_rng(3)
    den = [(int(s * rng.uniform(1.8, 2.4)), s) for s in rng.integers(20, 40, size=12)]
    num = [(int(t * rng.uniform(1.0, 1.4)), s) for t, s in den]
    lo, hi = paired_ratio_interval(num, den, resamples=500, seed=7)
    # the same draws, one prompt list at a time
    draws = np.random.default_rng(7).integers(0, len(num), size=(500, len(num)))
    ratios = sorted((sum(num[i][0] for i in d) / sum(num[i][1] for i in d))
                    / (sum(den[i][0] for i in d) / sum(den[i][1] for i in d)) for d in draws)
    assert np.isclose(lo, np.quantile(ratios, 0.025)) and np.isclose(hi, np.quantile(ratios, 0.975))
    point = (sum(t for t, _ in num) / sum(s for _, s in num)) / (sum(t for t, _ in den) / sum(s for _, s in den))
    assert lo < point < hi
    # a method that is exactly 1.2x the other on every prompt: no spread
    assert paired_ratio_interval([(12 * s, 10 * s) for _, s in den], [(s, s) for _, s in den]) == \
        pytest.approx((1.2, 1.2))
    with pytest.raises(ValueError, match="equal"):
        paired_ratio_interval(num[:3], den)


def test_bench_trees_tiny(tmp_path, capsys, tiny_cache_dir):
    from medusa_plugin.bench import main

    out_json = tmp_path / "trees.json"
    rc = main(["trees", "--model", "tiny", "--cache-dir", str(tiny_cache_dir / "medusa"), "--budgets", "4",
               "--num-prompts", "2", "--max-new-tokens", "8", "--ngram-branches", "1", "--json", str(out_json)])
    assert rc == 0
    res = json.loads(out_json.read_text())
    for key in ("static_tokens_per_step", "dynamic_tokens_per_step", "dynamic_warm_tokens_per_step",
                "hybrid_tokens_per_step"):
        assert set(res[key]) == {"4"} and res[key]["4"] >= 1.0
    assert set(res["identical"].values()) == {2}  # lossless: every run gives plain greedy's tokens
    assert {"plain", "static_4", "dynamic_4", "dynamic_warm_4", "hybrid_4"} <= set(res["tok_s"])
    for name in ("dynamic", "hybrid"):  # the interval over prompts holds the ratio itself
        lo, hi = res[f"{name}_over_static_ci95"]["4"]
        assert lo <= res[f"{name}_over_static"]["4"] <= hi
    # the tiny heads get an acceptance model fitted once beside them, as the shipped SmolLM2 heads ship one
    assert "heads_with_acceptance_model" in res["acceptance_model"] and "dynamic_calibrated_4" in res["tok_s"]
    assert "budget   4: static" in capsys.readouterr().out
