"""``bench e2e --engine vllm``: every method's engine stays up in its own process and the runs are interleaved in
rounds, so each ratio to plain decoding pairs runs made next to each other (vllm-cpu, the tiny model)."""
from __future__ import annotations

import os
import re
import statistics
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

pytest.importorskip("torch")
pytest.importorskip("vllm")

from medusa_plugin.bench import e2e  # noqa: E402
from medusa_plugin.engine_workers import EngineWorker, EngineWorkerError  # noqa: E402
from medusa_plugin.testing.tiny import build_tiny_medusa  # noqa: E402


def _cache_dir() -> Path:  # the same cache as tests/test_vllm_engine.py, so the tiny model is built once
    return Path(os.environ.get("MEDUSA_TEST_CACHE", Path(tempfile.gettempdir()) / "medusa_plugin_test_cache"))


def test_rounds_are_interleaved_and_ratios_are_paired():
    model_dir, heads_dir = build_tiny_medusa(_cache_dir())
    lines: list[str] = []
    res = e2e(engine="vllm", model_dir=str(model_dir), heads_dir=str(heads_dir), concurrency=[1, 2], max_tokens=8,
              repeats=2, tree="chain:3", chain=2, schedule=None, log=lines.append)
    runs = [(int(m[1]), m[2], int(m[3])) for m in
            (re.search(r"round (\d+)/2 (\w+) c=(\d+)", ln) for ln in lines) if m]
    # every mode at a concurrency back to back, the order rotating from round to round
    assert runs == [(1, "plain", 1), (1, "tree", 1), (1, "chain", 1), (1, "plain", 2), (1, "tree", 2),
                    (1, "chain", 2), (2, "tree", 1), (2, "chain", 1), (2, "plain", 1), (2, "tree", 2),
                    (2, "chain", 2), (2, "plain", 2)]
    assert res["repeats"] == 2
    rows = {(r["mode"], r["concurrency"]): r for r in res["rows"]}
    for (mode, c), row in rows.items():
        base = rows[("plain", c)]
        assert len(row["elapsed_runs"]) == 2
        paired = [b / m for b, m in zip(base["elapsed_runs"], row["elapsed_runs"])]
        assert row["speedup_runs"] == pytest.approx(paired, rel=1e-3)
        assert row["speedup"] == pytest.approx(statistics.median(paired), rel=1e-3)
        assert row["matches_plain"] == 1.0  # float32 greedy: Medusa is token-identical to plain
        if mode != "plain":
            assert row["tokens_per_step"] > 1.0


def test_an_engine_that_cannot_start_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EngineWorkerError) as err:
        EngineWorker(str(tmp_path), start_timeout_s=600)
    assert "\n" not in str(err.value) and str(err.value)



def test_a_multiprocess_medusa_engine_reports_what_its_schedule_learnt():
    model_dir, heads_dir = build_tiny_medusa(_cache_dir())
    with EngineWorker(str(model_dir), medusa={"heads": str(heads_dir), "tree": "chain:2", "tree_schedule": "auto"},
                      max_model_len=256) as w:
        w.run([[1, 2, 3, 4]], 8)
        (state,) = w.collective_rpc("medusa_state")
    assert state["schedule"] and all(len(r) == 3 for r in state["schedule"])  # (from B, to B, nodes)
    assert state["accept_lengths"][0] == 1.0 and "tree steps" in state["stats"]


def test_hybrid_runs_next_to_the_scheduled_tree():
    """bench e2e --hybrid: the demo's hybrid (dynamic trees + n-gram branches) with the same tree_schedule, in the
    same interleaved rounds, token-identical to plain (float32 greedy), its ratios under hybrid_ratios."""
    from medusa_plugin.bench import BenchError

    model_dir, heads_dir = build_tiny_medusa(_cache_dir())
    with pytest.raises(BenchError, match="--hybrid"):
        e2e(engine="vllm", model_dir=str(model_dir), heads_dir=str(heads_dir), schedule=None, hybrid=True)
    res = e2e(engine="vllm", model_dir=str(model_dir), heads_dir=str(heads_dir), concurrency=[2], max_tokens=8,
              repeats=1, tree="chain:3", schedule="auto", hybrid=True, log=lambda _: None)
    rows = {r["mode"]: r for r in res["rows"]}
    assert set(rows) == {"plain", "tree", "hybrid", "ngram"}
    assert rows["hybrid"]["matches_plain"] == 1.0
    assert set(res["hybrid_ratios"]) == {"2"} and res["hybrid_ratios"]["2"] == rows["hybrid"]["speedup"]
