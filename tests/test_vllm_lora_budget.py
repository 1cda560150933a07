"""LoRA + Medusa with vLLM's default limits (issue 9, item 5): vLLM refuses LoRA + speculation when
max_num_batched_tokens < max_num_seqs x (num_speculative_tokens + 1) and advises lowering num_speculative_tokens,
which Medusa refuses. The plugin's message must name changes that work; each one is applied here and must pass.
Real VllmConfigs from EngineArgs(...).create_engine_config() on a tiny local model; no engine is started."""

from __future__ import annotations

import os
import re

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
vllm = pytest.importorskip("vllm")

from medusa_plugin.vllm_ext import plugin, settings  # noqa: E402
from medusa_plugin.vllm_ext.settings import PROPOSER_PATH, MedusaUnsupportedError  # noqa: E402

pytestmark = pytest.mark.vllm
MEDUSA = {"heads": "org/heads", "tree": "mc_sim_7b_63"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from medusa_plugin.testing.tiny import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _engine_args(tiny_model, nodes=63, medusa=MEDUSA, **kw):
    from vllm.engine.arg_utils import EngineArgs

    plugin.register()
    args = dict(model=str(tiny_model), dtype="float32", max_model_len=256, enable_lora=True,
                speculative_config={"method": "custom_class", "model": PROPOSER_PATH, "num_speculative_tokens": nodes},
                additional_config={"medusa": medusa})
    args.update(kw)
    return EngineArgs(**args)


def _refusal(tiny_model, **kw) -> str:
    """The message; from the config hook it arrives wrapped in pydantic's ValidationError (a ValueError)."""
    with pytest.raises(ValueError) as e:
        _engine_args(tiny_model, **kw).create_engine_config()
    return str(e.value)


def test_default_limits_get_the_medusa_fix_not_vllms_advice(tiny_model):
    args = _engine_args(tiny_model)
    with pytest.raises(MedusaUnsupportedError) as e:
        args.create_engine_config()
    msg = str(e.value)
    tokens, seqs = args.max_num_batched_tokens, args.max_num_seqs  # vLLM's defaults, resolved in place
    assert tokens < seqs * 64
    assert "num_speculative_tokens must stay 63" in msg and "decreasing num_speculative_tokens" not in msg
    assert f"max_num_seqs x (63 + 1) = {seqs} x 64 = {seqs * 64}, but it is {tokens}" in msg
    assert f"raise --max-num-batched-tokens to {seqs * 64}" in msg
    assert f"lower --max-num-seqs to {tokens // 64}" in msg
    assert f"choose a tree of at most {tokens // seqs - 1} nodes" in msg


def test_each_suggested_change_passes(tiny_model):
    msg = _refusal(tiny_model)
    need = int(re.search(r"raise --max-num-batched-tokens to (\d+)", msg)[1])
    seqs = int(re.search(r"lower --max-num-seqs to (\d+)", msg)[1])
    nodes = int(re.search(r"a tree of at most (\d+) nodes", msg)[1])
    for cfg in (_engine_args(tiny_model, max_num_batched_tokens=need).create_engine_config(),
                _engine_args(tiny_model, max_num_seqs=seqs).create_engine_config(),
                _engine_args(tiny_model, nodes=nodes, medusa={**MEDUSA, "tree": f"chain:{nodes}"})
                .create_engine_config()):
        assert cfg.lora_config is not None and cfg.parallel_config.worker_cls == plugin.CPU_WORKER


def test_lowering_num_speculative_tokens_as_vllm_advises_names_both_changes(tiny_model):
    args = _engine_args(tiny_model)
    with pytest.raises(MedusaUnsupportedError):
        args.create_engine_config()
    fits = args.max_num_batched_tokens // args.max_num_seqs - 1  # what vLLM's advice leads to
    msg = _refusal(tiny_model, nodes=fits)
    assert f'num_speculative_tokens={fits} but the Medusa tree \'mc_sim_7b_63\' has 63 nodes: set ' \
           f'"num_speculative_tokens": 63' in msg
    assert f"raise --max-num-batched-tokens to {args.max_num_seqs * 64}" in msg


def test_check_supported_finds_the_condition_itself(tiny_model):
    """Where vLLM does not check first (a VllmConfig built or changed elsewhere), the config hook says the same."""
    cfg = _engine_args(tiny_model, max_num_batched_tokens=64 * 32, max_num_seqs=32).create_engine_config()
    cfg.scheduler_config.max_num_batched_tokens = 1024
    with pytest.raises(MedusaUnsupportedError) as e:
        settings.check_supported(cfg)
    assert "max_num_seqs x (63 + 1) = 32 x 64 = 2048, but it is 1024" in str(e.value)
    assert "lower --max-num-seqs to 16" in str(e.value) and "a tree of at most 31 nodes" in str(e.value)
    cfg.lora_config = None  # without LoRA vLLM has no such limit
    assert settings.check_supported(cfg).tree == "mc_sim_7b_63"


def test_other_speculative_methods_keep_vllms_message(tiny_model):
    from vllm.engine.arg_utils import EngineArgs

    plugin.register()
    args = EngineArgs(model=str(tiny_model), dtype="float32", max_model_len=256, enable_lora=True,
                      max_num_batched_tokens=256, max_num_seqs=64,
                      speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4})
    with pytest.raises(ValueError, match="Consider increasing max_num_batched_tokens") as e:
        args.create_engine_config()
    assert not isinstance(e.value, MedusaUnsupportedError)
