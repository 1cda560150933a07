"""The proposer's schedule loop without an engine: observed acceptance re-derives the tree size, a stopped schedule
probes one node now and then, and the step's fixed time is learnt from the time between drafting calls."""
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from medusa_plugin.core.schedule import TreeSchedule, measured_overhead  # noqa: E402
from medusa_plugin.vllm_ext import calibrate  # noqa: E402
from medusa_plugin.vllm_ext.proposer import MedusaTreeProposer  # noqa: E402

STEP_COST = {"forward_ms": {"1": 10.0, "5": 11.0, "20": 14.0, "80": 40.0}, "batch_sizes": [1, 2, 4],
             "draft_ms": {"1": [0.1, 0.2, 0.3, 0.4], "2": [0.1, 0.2, 0.3, 0.4], "4": [0.2, 0.3, 0.4, 0.5]},
             "machine": "test", "model": "m", "dtype": "float32", "time": "t"}


def _proposer(heads: str = "unused"):
    cfg = SimpleNamespace(
        additional_config={"medusa": {"heads": heads, "tree": "chain:4", "tree_schedule": "auto"}},
        speculative_config=SimpleNamespace(num_speculative_tokens=4),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1),
        model_config=SimpleNamespace(get_vocab_size=lambda: 100))
    p = MedusaTreeProposer(cfg)
    assert p.needs_calibration and p.schedule is None  # CPU: measured in the engine, not shipped
    p._step_cost = STEP_COST
    p.schedule = calibrate.schedule_from(STEP_COST, p, [1.0, 1.6, 2.0, 2.2, 2.3])
    return p


def test_prior_acceptance_is_the_heads_recorded_accuracy(tmp_path):
    import json

    from medusa_plugin.core.schedule import prefix_accept_lengths

    acc = [[0.3, 0.1], [0.2, 0.05], [0.1, 0.0], [0.05, 0.0]]
    (tmp_path / "recipe.json").write_text(json.dumps({"accuracy": acc}))
    got = MedusaTreeProposer(_proposer(str(tmp_path)).vllm_config).acceptance.accept_lengths()
    assert got == pytest.approx(prefix_accept_lengths("chain:4", acc))  # 1, 1.3, 1.36, 1.366, 1.3663
    default = prefix_accept_lengths("chain:4")
    (tmp_path / "recipe.json").write_text('{"accuracy": [[1.5]]}')  # not probabilities: ignored, not fatal
    assert MedusaTreeProposer(_proposer(str(tmp_path)).vllm_config).acceptance.accept_lengths() == \
        pytest.approx(default)
    assert _proposer().acceptance.accept_lengths() == pytest.approx(default)  # no such directory


def test_schedule_follows_observed_acceptance_then_probes():
    import torch

    p = _proposer()
    assert p.num_nodes_for(1) > 0
    for _ in range(p.REFRESH_EVERY * 4):  # heads that are never right
        p.observe(torch.zeros(1, dtype=torch.int64), torch.tensor([4]))
    assert p.schedule.num_nodes(1) == 0
    got = [p.num_nodes_for(1) for _ in range(p.PROBE_EVERY)]
    assert got[:-1] == [0] * (p.PROBE_EVERY - 1) and got[-1] == 1  # one single-node probe


def test_fixed_step_time_is_learnt_and_lowers_the_overhead(monkeypatch):
    import torch

    p = _proposer()
    clock = iter(range(0, 10_000, 30))  # one engine step every 30 ms
    monkeypatch.setattr("medusa_plugin.vllm_ext.proposer.time.perf_counter", lambda: next(clock) / 1e3)
    before = p.schedule.cost(1, 4)
    for _ in range(p.REFRESH_EVERY):
        p._time_step(1, 4, p.tree.prefix_depth[4])
        p.observe(torch.tensor([4]), torch.tensor([4]))
    expected = 30.0 - calibrate.predicted_ms(STEP_COST, p.tree, 1, 4)
    assert p.step_fixed_ms == pytest.approx(expected)
    assert p.schedule.cost(1, 4) < before  # the fixed part is paid by plain steps too
    fwd = {int(k): v for k, v in STEP_COST["forward_ms"].items()}
    draft = {int(k): v for k, v in STEP_COST["draft_ms"].items()}
    assert p.schedule.overhead == measured_overhead(fwd, [1, 2, 4], list(range(1, 6)), draft, p.tree,
                                                    step_fixed_ms=expected)


def test_underpriced_draft_rows_are_learnt_and_shrink_the_tree(monkeypatch):
    """Steps whose draft rows cost more than the table says (tree attention, bookkeeping): the per-row time is fitted
    from speculative steps and the plain probes between them, and the schedule drafts fewer nodes."""
    import torch

    from medusa_plugin.core.observed_step_cost import ObservedStepCost

    p = _proposer()
    p.observed_cost = ObservedStepCost(min_steps=10**6)  # the per-row fit alone (the observed ratio: below)
    p.schedule = calibrate.schedule_from(STEP_COST, p, [1.0, 1.9, 2.2, 2.3, 2.35])
    n0 = p.schedule.num_nodes(1)
    assert n0 > 0
    now = [0.0]
    monkeypatch.setattr("medusa_plugin.vllm_ext.proposer.time.perf_counter", lambda: now[0] / 1e3)
    chosen = []
    for _ in range(p.PROBE_EVERY * 3):
        n = p.num_nodes_for(1)
        chosen.append(n)
        p._time_step(1, n, p.tree.prefix_depth[n] if n else 0)
        # the real step: the table's forward + 2 ms fixed + 8 ms per draft row
        now[0] += calibrate.predicted_ms(STEP_COST, p.tree, 1, n) + 2.0 + 8.0 * n
        p.observe(torch.tensor([min(n, 1)]), torch.tensor([n]))
    assert 0 in chosen[: p.PROBE_EVERY]  # a plain probe while speculating
    assert p.step_time.tree_row_ms == pytest.approx(8.0, abs=0.5)
    assert p.step_time.fixed_ms == pytest.approx(2.0, abs=0.5)
    assert p.schedule.num_nodes(1) < n0


def test_a_schedule_stopped_by_a_noisy_row_cost_resumes_on_plain_steps(monkeypatch):
    """A per-row time learnt too high stops speculation; the plain steps and probes that follow show rows are cheap,
    and the schedule resumes without waiting for REFRESH_EVERY observed tree steps (about 1000 steps of probes)."""
    import torch

    p = _proposer()
    p.schedule = calibrate.schedule_from(STEP_COST, p, [1.0, 1.6, 2.0, 2.2, 2.3])
    now = [0.0]
    monkeypatch.setattr("medusa_plugin.vllm_ext.proposer.time.perf_counter", lambda: now[0] / 1e3)

    def run(steps: int, row_ms: float) -> list[int]:
        chosen = []
        for _ in range(steps):
            n = p.num_nodes_for(1)
            chosen.append(n)
            p._time_step(1, n, p.tree.prefix_depth[n] if n else 0)
            now[0] += calibrate.predicted_ms(STEP_COST, p.tree, 1, n) + 2.0 + row_ms * n
            if n:  # as the runner: only steps with drafts are observed
                p.observe(torch.tensor([1]), torch.tensor([n]))
        return chosen

    run(p.PROBE_EVERY * 2, row_ms=40.0)  # rows that seem to cost 4x a plain step: speculation stops
    assert p.schedule.num_nodes(1) == 0
    later = run(p.PROBE_EVERY * 4, row_ms=0.5)  # then cheap rows, seen on the probes
    assert sum(n > 0 for n in later[-p.PROBE_EVERY:]) > p.PROBE_EVERY // 2  # speculating again


def _dynamic_proposer(cost_per_row: float):
    import torch

    from medusa_plugin.core.calibration import AcceptanceCalibration
    from medusa_plugin.core.heads import MedusaHeads

    cfg = SimpleNamespace(
        additional_config={"medusa": {"heads": "unused", "tree": "dynamic", "budget": 4, "topk": 3,
                                      "tree_schedule": "auto"}},
        speculative_config=SimpleNamespace(num_speculative_tokens=4),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1),
        model_config=SimpleNamespace(get_vocab_size=lambda: 20))
    p = MedusaTreeProposer(cfg)
    assert p.needs_calibration and p.schedule is None
    torch.manual_seed(0)
    p.heads = MedusaHeads(8, 2, 1, 20, own_lm_head=True).eval()
    p.calibration = AcceptanceCalibration(2)
    # a slow step (1 s): the drafting measured on any machine stays small next to it
    p._step_cost = {"forward_ms": {"1": 1000.0, "64": 1000.0 + 63 * cost_per_row}, "batch_sizes": [1, 2],
                    "draft_ms": {"1": [0.0, 0.0], "2": [0.0, 0.0]}}
    calls = []
    draft = p.heads.draft_topk_probs
    p.heads.draft_topk_probs = lambda *a, **k: calls.append(1) or draft(*a, **k)
    return p, calls


def test_dynamic_auto_drafts_what_pays_and_rests_the_heads_when_nothing_does():
    import torch

    hidden = torch.randn(2, 8)
    cheap, _ = _dynamic_proposer(cost_per_row=0.0)  # free rows: every request keeps its whole budget
    out = cheap.propose_dynamic(hidden, [1, 2], ["a", "b"], [None, None])
    assert [len(o) for o in out] == [4, 4] and set(cheap.trees) == {"a", "b"}
    dear, calls = _dynamic_proposer(cost_per_row=1e5)  # no node is worth its row
    dear.CHEAP_DRAFT = 0.0  # drafting never counts as cheap: the rest starts at RECHECK_EVERY
    outs = [dear.propose_dynamic(hidden, [1, 2], ["a", "b"], [None, None]) for _ in range(2 * dear.RECHECK_EVERY)]
    assert all(o == [[], []] for o in outs) and not dear.trees
    assert len(calls) == 2  # the heads ran at the first step and at the recheck, not in between


def test_dynamic_auto_rests_the_heads_longer_after_each_fruitless_recheck_and_probes_every_64_steps():
    import torch

    hidden = torch.randn(2, 8)
    p, calls = _dynamic_proposer(cost_per_row=1e5)
    p.CHEAP_DRAFT = 0.0
    outs = [p.propose_dynamic(hidden, [1, 2], ["a", "b"], [None, None]) for _ in range(200)]
    # heads at steps 0, 8, 24, 56, 120, 184: rests of 8, 16, 32, then 64 (RECHECK_MAX)
    assert len(calls) == 6 and p._recheck == p.RECHECK_MAX
    # one node per request every PROBE_EVERY steps without speculation, on a heads run
    assert [i for i, o in enumerate(outs) if o != [[], []]] == [56, 120, 184]
    from medusa_plugin.core.observed_step_cost import ObservedStepCost

    # rows become free (and the microsecond steps this loop timed are forgotten): the next recheck drafts, the
    # rest ends
    p._step_cost["forward_ms"]["64"] = 1000.0
    p.observed_cost = ObservedStepCost()
    before, step = len(calls), 200
    while [len(x) for x in p.propose_dynamic(hidden, [1, 2], ["a", "b"], [None, None])] != [4, 4]:
        step += 1
        assert step < 300
    assert step == 248 and len(calls) == before + 1 and p._recheck == p.RECHECK_EVERY
    p.propose_dynamic(hidden, [1, 2], ["a", "b"], [None, None])
    assert len(calls) == before + 2  # no rest after a step that drafted


def test_dynamic_auto_rechecks_at_once_while_drafting_is_cheap_next_to_a_step():
    """Drafting measured far below a plain step (here microseconds against 1 s): the first rest is one step, then
    it doubles as before; dear drafting (CHEAP_DRAFT = 0) keeps the rest of RECHECK_EVERY."""
    import torch

    hidden = torch.randn(2, 8)
    p, calls = _dynamic_proposer(cost_per_row=1e5)
    assert p.dynamic_draft_ms.get(2) is None and p._first_rest(2) == p.RECHECK_EVERY  # nothing measured yet
    outs = [p.propose_dynamic(hidden, [1, 2], ["a", "b"], [None, None]) for _ in range(100)]
    assert all(o == [[], []] for o in outs[:56])
    assert p._first_rest(2) == 1 and p.dynamic_draft_ms[2] < p.CHEAP_DRAFT * p.dynamic_step_ms(2)(0)
    # heads at steps 0, 1, 3, 7, 15, 31, 63: rests of 1, 2, 4, 8, 16, 32, 64
    assert len(calls) == 7 and p._recheck == p.RECHECK_MAX
    p.CHEAP_DRAFT = 0.0
    assert p._first_rest(2) == p.RECHECK_EVERY


def test_dynamic_auto_charges_the_measured_drafting_time():
    import torch

    hidden = torch.randn(2, 8)
    p, _ = _dynamic_proposer(cost_per_row=0.0)
    assert [len(o) for o in p.propose_dynamic(hidden, [1, 2], ["a", "b"], [None, None])] == [4, 4]
    assert p.dynamic_draft_ms[2] > 0.0  # measured at batch size 2
    p.dynamic_draft_ms[2] = 1e6  # heads + trees dearer than anything the nodes can win: no nodes, however cheap
    assert p.propose_dynamic(hidden, [1, 2], ["a", "b"], [None, None]) == [[], []] and not p.trees


class _Target(__import__("torch").nn.Module):
    """A stand-in target model with what the proposer reads: parameters (device, dtype) and model.embed_tokens."""

    def __init__(self, vocab: int, hidden: int):
        import torch

        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(vocab, hidden)


@pytest.mark.parametrize("native", [False, True])
def test_half_heads_get_a_float32_copy_for_many_rows_on_a_cpu_without_native_half_matmul(monkeypatch, native):
    import torch

    from medusa_plugin.core.heads import MedusaHeads
    from medusa_plugin.demo import shipped_heads_dir

    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: native, raising=False)
    heads_dir = str(shipped_heads_dir())
    cfg = SimpleNamespace(
        additional_config={"medusa": {"heads": heads_dir, "tree": "chain:4", "int8_drafting": False}},
        speculative_config=SimpleNamespace(num_speculative_tokens=4),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1),
        model_config=SimpleNamespace(get_vocab_size=lambda: 49152, get_hidden_size=lambda: 576))
    p = MedusaTreeProposer(cfg)
    target = _Target(49152, 576).to(torch.bfloat16)
    p.load_model(target)
    assert p.heads_for(1).dtype == torch.bfloat16 and p.heads_for(p.FP32_HEAD_ROWS - 1) is p.heads
    assert p.heads_for(p.FP32_HEAD_ROWS).dtype == (torch.bfloat16 if native else torch.float32)
    hidden = torch.randn(2, 576, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    roots = torch.tensor([7, 1000])
    want = MedusaHeads.from_pretrained(heads_dir, base_hidden_size=576, base_vocab_size=49152,
                                       dtype=torch.bfloat16 if native else torch.float32)
    assert torch.equal(p.draft_topk(hidden, 4, roots), want.draft_topk(
        hidden, 10, 4, vocab_size=49152, root_embeds=target.model.embed_tokens.weight[roots]))


@pytest.mark.parametrize("tree", ["chain:2", "dynamic"])
def test_root_input_heads_get_the_embedding_of_each_requests_root(tmp_path, tree):
    import torch

    from medusa_plugin.core.heads import MedusaHeads

    torch.manual_seed(0)
    heads = MedusaHeads(16, 2, 1, 40, root_input=True).eval()
    for q in heads.parameters():
        torch.nn.init.normal_(q, std=0.5)
    heads.save_pretrained(tmp_path)
    medusa = {"heads": str(tmp_path), "tree": tree, **({"budget": 2, "topk": 1} if tree == "dynamic" else {})}
    cfg = SimpleNamespace(additional_config={"medusa": medusa},
                          speculative_config=SimpleNamespace(num_speculative_tokens=2),
                          parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1),
                          model_config=SimpleNamespace(get_vocab_size=lambda: 40, get_hidden_size=lambda: 16))
    p = MedusaTreeProposer(cfg)
    target = _Target(40, 16)
    p.load_model(target)
    hidden, roots = torch.randn(3, 16), [5, 17, 5]
    want = heads.draft_topk(hidden, 1, 2, root_embeds=target.model.embed_tokens.weight[roots])[..., 0].tolist()
    if tree == "dynamic":
        got = p.propose_dynamic(hidden, roots, ["a", "b", "c"], [None] * 3)
    else:
        got = p.propose_tree(hidden, roots)
    assert got == want  # a chain of each head's top-1, computed from the root's embedding row
    assert got != heads.draft_topk(hidden, 1, 2, root_embeds=torch.zeros(3, 16))[..., 0].tolist()
    with pytest.raises(Exception, match="input-embedding table"):
        p.load_model(torch.nn.Linear(2, 2))


def test_drafting_that_the_engine_runs_dear_at_one_batch_size_stops_there_only(monkeypatch):
    """The table prices draft rows cheap at every batch size; the engine's steps at 4 requests cost twice a plain
    step with drafts. The observed step-time ratio (plain probes come fast while it is unknown) stops drafting at 4
    requests and leaves 1 request drafting. The per-row fit is switched off, so only the observed ratio can act."""
    import torch

    from medusa_plugin.core.step_time_fit import StepTimeFit

    p = _proposer()
    p.step_time = StepTimeFit(min_steps=10**9)
    p.schedule = calibrate.schedule_from(STEP_COST, p, [1.0, 1.9, 2.2, 2.3, 2.35])
    assert p.schedule.num_nodes(1) > 0 and p.schedule.num_nodes(4) > 0
    now = [0.0]
    monkeypatch.setattr("medusa_plugin.vllm_ext.proposer.time.perf_counter", lambda: now[0] / 1e3)
    chosen = []
    for _ in range(p.PROBE_EVERY):
        n = p.num_nodes_for(4)
        chosen.append(n)
        p._time_step(4, 4 * n, p.tree.prefix_depth[n] if n else 0)
        now[0] += 20.0 * (2.0 if n else 1.0)
        if n:
            p.observe(torch.tensor([1] * 4), torch.tensor([n] * 4))
    assert 0 in chosen[: 2 * p.PROBE_FAST]  # plain probes come fast while the ratio is unobserved
    assert p.observed_cost.ratio(4, chosen[0]) == pytest.approx(2.0)
    assert p.schedule.num_nodes(4) == 0 and p.schedule.num_nodes(1) > 0
    assert "observed in serving B=4" in p.schedule.meta["source"]


def test_dynamic_auto_follows_the_observed_step_time_ratio(monkeypatch):
    """Rows priced free by the table, but the engine's steps with drafts take 3x a plain one at this batch size:
    once both are observed (plain probes while it speculates), the allocation drafts nothing at that batch size."""
    import torch

    from medusa_plugin.core.step_time_fit import StepTimeFit

    p, _ = _dynamic_proposer(cost_per_row=0.0)
    p.step_time = StepTimeFit(min_steps=10**9)
    hidden = torch.randn(2, 8)
    now = [0.0]
    monkeypatch.setattr("medusa_plugin.vllm_ext.proposer.time.perf_counter", lambda: now[0] / 1e3)
    sizes = []
    for _ in range(6 * p.PROBE_FAST):
        out = p.propose_dynamic(hidden, [1, 2], ["a", "b"], [None, None])
        drafted = sum(map(len, out))
        sizes.append(drafted)
        now[0] += 3000.0 if drafted else 1000.0
    assert sizes[0] == 8  # the table: free rows, the whole budget
    assert p.observed_cost.ratio(2, 4) is not None and p.observed_cost.ratio(2, 4) > 2.5
    assert p.dynamic_step_ms(2)(8) > 2.5 * p.dynamic_step_ms(2)(0)
    assert sizes[-1] == 0  # no node is worth a 3x step
