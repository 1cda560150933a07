"""The benchmark harnesses at their tiniest settings on CPU: they run, print their table, write the JSON they promise
(no timing asserts)."""
import json
import runpy
import sys
from pathlib import Path

import pytest

from medusa_plugin.cli import main as cli_main
from medusa_plugin.core.schedule import TreeSchedule

ROOT = Path(__file__).resolve().parents[1]


def test_step_cost_tiny(tmp_path, capsys):
    out, sched_path = tmp_path / "step_cost.json", tmp_path / "schedule.yaml"
    rc = cli_main(["bench", "step-cost", "--tiny", "--batch-sizes", "1,2", "--tree-sizes", "5,16", "--repeats", "1",
                   "--warmup", "0", "--json", str(out), "--schedule-out", str(sched_path)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "Verification step cost / plain decode step" in printed.out
    assert "q=5" in printed.out and "q=16" in printed.out and "random weights" in printed.out
    assert "tree schedule (measured" in printed.out  # the resulting schedule is printed too
    res = json.loads(out.read_text())
    assert res["benchmark"] == "step_cost" and res["measured"] is True
    assert res["batch_sizes"] == [1, 2] and res["query_tokens"] == [1, 5, 16]
    assert res["model"]["shape"] == "tiny" and res["model"]["weights"] == "random"
    assert "4D tree mask" in res["attention"] and "depth-based positions" in res["attention"]
    assert len(res["step_ms"]) == len(res["ratio"]) == len(res["draft_overhead"]) == 2
    for ms, ratio in zip(res["step_ms"], res["ratio"]):
        assert len(ms) == len(ratio) == 3 and min(ms) > 0 and ratio[0] == 1.0
        assert all(abs(r - t / ms[0]) < 1e-2 * r for r, t in zip(ratio[1:], ms[1:]))  # ratios of the step times
    sched = TreeSchedule.from_yaml(sched_path)
    assert sched.batch_sizes == [1, 2] and sched.query_tokens == [1, 5, 16]
    assert sched.overhead == res["ratio"] and sched.draft_overhead == res["draft_overhead"]
    assert res["schedule"]["num_nodes"] == {str(b): n for b, n in sched.table().items()}
    assert "measured by `medusa-plugin bench step-cost`" in sched_path.read_text().splitlines()[0]


def test_step_cost_script_wrapper(tmp_path, monkeypatch, capsys):
    out = tmp_path / "s.json"
    monkeypatch.setattr(sys, "argv", ["bench_step_cost.py", "--tiny", "--batch-sizes", "1", "--tree-sizes", "5",
                                      "--repeats", "1", "--warmup", "0", "--json", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "benchmarks" / "bench_step_cost.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert json.loads(out.read_text())["query_tokens"] == [1, 5]
    assert "Verification step cost" in capsys.readouterr().out


def test_step_cost_rejects_tree_sizes_beyond_the_tree(tmp_path, capsys):
    rc = cli_main(["bench", "step-cost", "--tiny", "--tree", "chain:3", "--tree-sizes", "8",
                   "--json", str(tmp_path / "x.json")])
    assert rc == 1
    assert "chain:3" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_e2e_tiny_reference(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    rc = cli_main(["bench", "e2e", "--tiny", "--engine", "reference", "--concurrency", "1,2", "--max-tokens", "6",
                   "--repeats", "1", "--train-steps", "10", "--distill-prompts", "4", "--cache-dir",
                   str(tmp_path / "cache"), "--device", "cpu", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "End to end" in printed and "tok/step" in printed and "TPOT ms" in printed
    res = json.loads(out.read_text())
    assert res["benchmark"] == "e2e" and res["engine"] == "reference" and res["concurrency"] == [1, 2]
    assert "build_tiny_medusa" in res["model"]
    rows = {(r["mode"], r["concurrency"]): r for r in res["rows"]}
    assert set(rows) == {(m, c) for m in ("plain", "tree", "chain") for c in (1, 2)}
    for (mode, c), r in rows.items():
        assert r["output_tokens"] == 6 * c
        assert r["matches_plain"] == 1.0  # greedy Medusa is exact: same tokens as plain batched decoding
        assert r["tpot_ms"] > 0 and r["output_tokens_per_s"] > 0 and r["speedup"] > 0
        assert r["tokens_per_step"] == 1.0 if mode == "plain" else 1.0 <= r["tokens_per_step"] <= 5.0
    assert rows[("chain", 1)]["tree"] == "chain:4" and "mc_sim_7b_63" in rows[("tree", 1)]["tree"]


def test_e2e_needs_both_model_and_heads(tmp_path, capsys):
    rc = cli_main(["bench", "e2e", "--engine", "reference", "--model-dir", str(tmp_path), "--json",
                   str(tmp_path / "x.json")])
    assert rc == 1 and "--heads-dir" in capsys.readouterr().err


def test_convert_to_vllm_round_trips_through_the_old_vllm_layout(tmp_path, capsys):
    """`convert --to vllm` writes what vLLM's MedusaModel loads (its key names and config fields); our loader reads
    that layout back to the same logits, truncated vocab included."""
    import json

    import torch

    from medusa_plugin.core.heads import MedusaHeads

    g = torch.Generator().manual_seed(0)
    heads = MedusaHeads(64, 3, 1, 200, own_lm_head=True, token_map=torch.arange(0, 200, 2))
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    heads.save_pretrained(tmp_path / "src")
    assert cli_main(["convert", str(tmp_path / "src"), str(tmp_path / "vllm"), "--to", "vllm"]) == 0
    assert "num_speculative_tokens\": 3" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert cfg["architectures"] == ["MedusaModel"] and cfg["num_heads"] == 3 and cfg["truncated_vocab_size"] == 100
    back = MedusaHeads.from_pretrained(tmp_path / "vllm")
    assert back.source_format == "vllm"
    h = torch.randn(2, 64, generator=g)
    assert torch.equal(back(h), heads(h))


def test_convert_to_vllm_v2_heads_need_the_base_model(tmp_path, capsys):
    import torch

    from medusa_plugin.core.heads import MedusaHeads

    MedusaHeads(64, 2, 1, 200, own_lm_head=False).save_pretrained(tmp_path / "v2")
    assert cli_main(["convert", str(tmp_path / "v2"), str(tmp_path / "out"), "--to", "vllm"]) == 1
    assert "--base-model" in capsys.readouterr().err
    from safetensors.torch import save_file
    base = tmp_path / "base"
    base.mkdir()
    save_file({"model.embed_tokens.weight": torch.randn(200, 64)}, str(base / "model.safetensors"))
    assert cli_main(["convert", str(tmp_path / "v2"), str(tmp_path / "out"), "--to", "vllm",
                     "--base-model", str(base)]) == 0


def test_convert_to_vllm_expands_a_draft_vocabulary_to_whole_vocabulary_projections(tmp_path):
    # vLLM 0.32 cannot load a token_map; heads whose shared projection is the base lm_head's rows of the draft
    # vocabulary are written with the whole lm_head: the same logits on the draft vocabulary
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from medusa_plugin.core.heads import MedusaHeads
    from medusa_plugin.vllm_ext.convert import to_vllm_medusa

    g = torch.Generator().manual_seed(0)
    lm = torch.randn(200, 64, generator=g)
    base = tmp_path / "base"
    base.mkdir()
    save_file({"model.embed_tokens.weight": lm}, str(base / "model.safetensors"))
    tm = torch.arange(0, 200, 2)
    heads = MedusaHeads(64, 2, 1, 200, own_lm_head=True, shared_lm_head=True, token_map=tm)
    with torch.no_grad():
        heads.lm_heads[0].weight.copy_(lm[tm])
    heads.save_pretrained(tmp_path / "src")
    to_vllm_medusa(tmp_path / "src", tmp_path / "out", base_model=base)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    w = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "token_map" not in w and cfg["truncated_vocab_size"] == cfg["vocab_size"] == 200
    assert torch.equal(w["lm_heads.0.weight"], lm)
    with torch.no_grad():  # a trained projection: its rows at token_map, the base lm_head's elsewhere
        heads.lm_heads[0].weight.add_(1.0)
    heads.save_pretrained(tmp_path / "src2")
    to_vllm_medusa(tmp_path / "src2", tmp_path / "out2", base_model=base)
    w2 = load_file(str(tmp_path / "out2" / "model.safetensors"))
    want = lm.clone()
    want[tm] += 1.0
    assert "token_map" not in w2 and torch.equal(w2["lm_heads.0.weight"], want)
    per_head = MedusaHeads(64, 2, 1, 200, own_lm_head=True, shared_lm_head=False, token_map=tm)  # one per head
    with torch.no_grad():
        for k, head in enumerate(per_head.lm_heads):
            head.weight.copy_(lm[tm] * (k + 2))
    per_head.save_pretrained(tmp_path / "src3")
    assert to_vllm_medusa(tmp_path / "src3", tmp_path / "out3", base_model=base) == 2
    w3 = load_file(str(tmp_path / "out3" / "model.safetensors"))
    for k in range(2):
        got = w3[f"lm_heads.{k}.weight"]
        assert got.shape == (200, 64) and torch.equal(got[tm], lm[tm] * (k + 2))
        assert torch.equal(got[1::2], lm[1::2])
    assert to_vllm_medusa(tmp_path / "src3", tmp_path / "out4") == 2  # without the base: token_map kept
    assert torch.equal(load_file(str(tmp_path / "out4" / "model.safetensors"))["token_map"], tm)


def test_bench_prompts_are_chat_requests_for_a_chat_model(tiny_model_dir):
    from transformers import AutoTokenizer

    from medusa_plugin.bench import bench_prompts
    from medusa_plugin.hf.chat_prompts import chat_prompt_ids, held_out_requests

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain, desc = bench_prompts(tok, 3)
    assert len(plain) == 3 and "stdlib" in desc
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    chat, desc = bench_prompts(tok, 3)
    assert "chat" in desc
    assert chat == [chat_prompt_ids(tok, r) for r in held_out_requests(3)]


def test_overhead_rounds_merge_as_field_wise_medians():
    """bench overhead --repeats: each number is the median over rounds of that round's value (a ratio: of the paired
    ratios, not the ratio of medians), over the rounds that measured it (None where a round did not); counts stay
    integers; nested tables merge per key over all rounds; strings and lists are the first round's."""
    from medusa_plugin.bench_engine import _median_of

    rounds = [{"plain_ms": 10.0, "chain1_ms": 12.0, "chain1_ratio": 1.2, "ngram1_ms": None, "note": "a",
               "phases": {"heads": 0.3, "model_forward": 9.0}, "rows": [1], "steps": 48, "gone": None},
              {"plain_ms": 14.0, "chain1_ms": 12.2, "chain1_ratio": 0.8714, "ngram1_ms": 11.0, "note": "b",
               "phases": {"heads": 0.5, "model_forward": 13.0, "tree": 1.0}, "rows": [2], "steps": 47, "gone": None},
              {"plain_ms": 11.0, "chain1_ms": 12.5, "chain1_ratio": 1.1364, "ngram1_ms": 12.0, "note": "c",
               "phases": {"heads": 0.4, "model_forward": 10.0}, "rows": [3], "steps": 45, "gone": None}]
    got = _median_of(rounds)
    assert got["plain_ms"] == 11.0 and got["chain1_ms"] == 12.2
    assert got["chain1_ratio"] == 1.1364 != round(got["chain1_ms"] / got["plain_ms"], 4)
    assert got["phases"] == {"heads": 0.4, "model_forward": 10.0, "tree": 1.0}
    assert got["ngram1_ms"] == 11.5 and got["gone"] is None and got["steps"] == 47
    assert got["note"] == "a" and got["rows"] == [1]


def test_overhead_rejects_zero_repeats(capsys):
    from medusa_plugin.bench import main

    assert main(["overhead", "--model", "m", "--heads", "h", "--repeats", "0"]) != 0
    assert "--repeats must be >= 1" in capsys.readouterr().err


def test_overhead_engine_that_fails_to_start_is_one_line(tmp_path, capsys):
    """bench overhead keeps each engine alive in its own process: an engine that cannot start ends the benchmark
    with one line naming the engine and the cause, and no process is left behind."""
    import multiprocessing as mp

    pytest.importorskip("vllm")
    from medusa_plugin.bench import main

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert main(["overhead", "--model", str(broken), "--heads", "h", "--repeats", "1",
                 "--json", str(tmp_path / "o.json")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("medusa-plugin bench: error:")]
    assert len(err) == 1 and err[0].startswith("medusa-plugin bench: error: plain engine: "), err
    assert not (tmp_path / "o.json").exists()
    assert not mp.active_children()
