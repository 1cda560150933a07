"""The vLLM plugin plumbing, without starting an engine: entry point, register(), version guard, Medusa settings in
a vLLM config, automatic worker selection and the config-time refusal of unsupported options (real VllmConfigs
built with EngineArgs(...).create_engine_config() on a tiny local model)."""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
from types import SimpleNamespace

import pytest
import yaml

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
vllm = pytest.importorskip("vllm")

from medusa_plugin.core.config import MedusaConfig  # noqa: E402
from medusa_plugin.vllm_ext import compat, plugin, settings  # noqa: E402
from medusa_plugin.vllm_ext.settings import (  # noqa: E402
    ENV_CONFIG, PROPOSER_PATH, MedusaSettingsError, MedusaUnsupportedError, medusa_settings)

pytestmark = pytest.mark.vllm
SPEC63 = {"method": "custom_class", "model": PROPOSER_PATH, "num_speculative_tokens": 63}


# ------------------------------------------------------------------------------------------ entry point, register
def test_entry_point_is_discoverable_and_loads_register():
    try:
        md.distribution("medusa_plugin")
    except md.PackageNotFoundError:
        pytest.skip("medusa_plugin is not pip-installed (pip install -e .)")
    eps = {ep.name: ep for ep in md.entry_points(group="vllm.general_plugins")}
    assert eps["medusa_plugin"].value == "medusa_plugin.vllm_ext.plugin:register"
    assert eps["medusa_plugin"].load() is plugin.register
    from vllm.plugins import load_plugins_by_group
    assert load_plugins_by_group("vllm.general_plugins")["medusa_plugin"] is plugin.register


def _wrapped_depth(platform_cls) -> int:
    fn, depth = platform_cls.check_and_update_config.__func__, 0
    while getattr(fn, "__medusa_wrapped__", False):
        depth += 1
        fn = fn.__wrapped__.__func__
    return depth


def test_register_is_idempotent(monkeypatch):
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    plugin.register()
    monkeypatch.setattr(plugin, "_registered", False)  # as if vLLM called it again in a fresh plugin state
    plugin.register()
    assert _wrapped_depth(type(current_platform)) == 1
    assert AttentionBackendEnum.CPU_ATTN.get_path() == plugin.ATTENTION_BACKEND
    from medusa_plugin.vllm_ext.attention import MedusaCPUAttentionBackend
    assert AttentionBackendEnum.CPU_ATTN.get_class() is MedusaCPUAttentionBackend


def test_disable_env_makes_register_a_no_op(monkeypatch):
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setenv(plugin.ENV_DISABLE, "1")
    monkeypatch.setattr(plugin, "check_version", lambda: pytest.fail("register() must do nothing when disabled"))
    plugin.register()
    assert plugin._registered is False


# ------------------------------------------------------------------------------------------ version guard
@pytest.mark.parametrize("version, series", [("0.32.0", (0, 32)), ("0.33.1+cpu", (0, 33)), ("v0.33.0rc1", (0, 33)),
                                             ("0.32.1.dev12+g1234abc", (0, 32)), ("1.0.0", (1, 0)),
                                             ("garbage", None), (None, None)])
def test_parse_version(version, series):
    assert compat.parse_version(version) == series
    assert compat.is_supported_version(version) == (series in ((0, 32), (0, 33)))


def test_vllm_version_does_not_need_package_metadata(monkeypatch):
    real = vllm.__version__
    monkeypatch.setattr(md, "version", lambda name: (_ for _ in ()).throw(md.PackageNotFoundError(name)))
    assert compat.vllm_version() == real
    monkeypatch.delattr(vllm, "__version__")
    assert compat.vllm_version() == real  # from vllm.version / vllm._version


@pytest.mark.parametrize("found", ["0.31.2", "0.34.0", None])
def test_unsupported_version_is_refused_with_the_fix(monkeypatch, found):
    monkeypatch.delenv(plugin.ENV_SKIP_VERSION_CHECK, raising=False)
    monkeypatch.setattr(compat, "vllm_version", lambda: found)
    with pytest.raises(compat.VersionError) as e:
        plugin.check_version()
    msg = str(e.value)
    assert "0.32.x, 0.33.x" in msg and f"found {found or 'an unknown version'}" in msg
    assert "MEDUSA_PLUGIN_SKIP_VERSION_CHECK=1" in msg and "compat.py" in msg
    monkeypatch.setattr(plugin, "_registered", False)
    with pytest.raises(compat.VersionError):
        plugin.register()


def test_skip_env_turns_the_version_error_into_a_warning(monkeypatch):
    monkeypatch.setattr(compat, "vllm_version", lambda: "0.40.0")
    monkeypatch.setenv(plugin.ENV_SKIP_VERSION_CHECK, "1")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    plugin.logger.addHandler(handler)
    try:
        assert plugin.check_version() == "0.40.0"
    finally:
        plugin.logger.removeHandler(handler)
    assert any(r.levelno == logging.WARNING and "found 0.40.0" in r.getMessage() for r in records)


def test_supported_version_passes(monkeypatch):
    monkeypatch.delenv(plugin.ENV_SKIP_VERSION_CHECK, raising=False)
    monkeypatch.setattr(compat, "vllm_version", lambda: "0.33.2")
    assert plugin.check_version() == "0.33.2"


# ------------------------------------------------------------------------------------------ settings parsing
def _cfg(additional_config=None):
    return SimpleNamespace(additional_config=additional_config)


@pytest.fixture
def medusa_yaml(tmp_path):
    path = tmp_path / "medusa.yaml"
    path.write_text(yaml.safe_dump({"heads": "org/heads", "tree": "chain:3", "acceptance": "typical"}))
    return path


def test_settings_from_a_dict():
    cfg = medusa_settings(_cfg({"medusa": {"heads": "org/heads", "tree": "mc_sim_7b_63", "max_batch_size": 8}}))
    assert isinstance(cfg, MedusaConfig)
    assert (cfg.heads, cfg.tree, cfg.max_batch_size, cfg.acceptance.rule) == ("org/heads", "mc_sim_7b_63", 8,
                                                                             "lossless")


def test_settings_from_a_config_file_with_overrides(medusa_yaml):
    cfg = medusa_settings(_cfg({"medusa": {"config": str(medusa_yaml)}}))
    assert (cfg.heads, cfg.tree, cfg.acceptance.rule) == ("org/heads", "chain:3", "typical")
    cfg = medusa_settings(_cfg({"medusa": {"config": str(medusa_yaml), "tree": "chain:2"}}))
    assert (cfg.heads, cfg.tree, cfg.acceptance.rule) == ("org/heads", "chain:2", "typical")
    assert medusa_settings(_cfg({"medusa": str(medusa_yaml)})).tree == "chain:3"


def test_settings_from_the_env_var_and_precedence(monkeypatch, medusa_yaml):
    monkeypatch.setenv(ENV_CONFIG, str(medusa_yaml))
    assert medusa_settings(_cfg({})).tree == "chain:3"
    assert medusa_settings(_cfg(None)).tree == "chain:3"
    assert medusa_settings(_cfg({"medusa": {"heads": "a/b", "tree": "chain:1"}})).tree == "chain:1"


def test_missing_settings_say_how_to_pass_them(monkeypatch):
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    with pytest.raises(MedusaSettingsError, match="--additional-config") as e:
        medusa_settings(_cfg({"other": 1}))
    assert ENV_CONFIG in str(e.value) and '"config"' in str(e.value)


@pytest.mark.parametrize("medusa, match", [
    ({"heads": "a/b", "choices": "mc_sim_7b_63"}, "unknown key 'choices'.*did you mean 'tree'"),
    ({"config": 5}, "'config' must be a path"),
    ({"config": "/no/such/medusa.yaml"}, "not found"),
    ({"tree": "mc_sim_7b_63"}, "missing required key 'heads'"),
])
def test_invalid_settings_are_refused_with_the_key(monkeypatch, medusa, match):
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    with pytest.raises(MedusaSettingsError, match=match):
        medusa_settings(_cfg({"medusa": medusa}))


def test_num_tree_nodes():
    assert settings.num_tree_nodes({"heads": "a/b", "tree": "mc_sim_7b_63"}) == 63
    assert settings.num_tree_nodes({"heads": "a/b", "tree": "chain:5"}) == 5


@pytest.mark.parametrize("model, match", [
    (dict(use_mla=True), "multi-head latent attention"),
    (dict(is_hybrid=True), "hybrid"),
    (dict(is_attention_free=True), "attention-free"),
    (dict(window=128), r"sliding-window attention \(window 128 < max_model_len 512\).*--disable-sliding-window"),
    (dict(uses_mrope=True), "M-RoPE"),
    (dict(is_encoder_decoder=True), "encoder-decoder"),
    (dict(hf_text_config=SimpleNamespace(model_type="gemma2", attn_logit_softcapping=50.0)), "soft-capping"),
    (dict(hf_text_config=SimpleNamespace(model_type="bloom")), "ALiBi"),
    (dict(hf_text_config=SimpleNamespace(model_type="mpt", attn_config=SimpleNamespace(alibi=True))), "ALiBi"),
    (dict(hf_text_config=SimpleNamespace(model_type="gpt_oss")), "attention sinks"),
])
def test_unsupported_model_kinds_are_refused(model, match):
    with pytest.raises(MedusaUnsupportedError, match=match):
        settings.check_supported(_fake_vllm_config(**model))


def _fake_vllm_config(window=None, **model):
    mc = SimpleNamespace(**{"model": "m", "max_model_len": 512, "use_mla": False, "is_hybrid": False,
                            "is_attention_free": False, "get_sliding_window": lambda: window,
                            "hf_text_config": SimpleNamespace(model_type="llama"), **model})
    return SimpleNamespace(additional_config={"medusa": {"heads": "a/b", "tree": "chain:3"}},
                           speculative_config=SimpleNamespace(method="custom_class", model=PROPOSER_PATH,
                                                              num_speculative_tokens=3),
                           parallel_config=SimpleNamespace(pipeline_parallel_size=1),
                           cache_config=SimpleNamespace(cache_dtype="auto"), model_config=mc)


def test_plain_attention_model_passes():
    assert settings.check_supported(_fake_vllm_config()).tree == "chain:3"
    assert settings.check_supported(_fake_vllm_config(window=1024)).tree == "chain:3"  # window >= max_model_len


def test_platform_picks_the_worker(monkeypatch):
    def platform(cpu, cuda):
        return SimpleNamespace(is_cpu=lambda: cpu, is_cuda_alike=lambda: cuda)
    assert plugin.medusa_worker_cls(platform(True, False)) == plugin.CPU_WORKER
    with pytest.raises(MedusaUnsupportedError, match="CPU and CUDA platforms"):
        plugin.medusa_worker_cls(platform(False, False))
    monkeypatch.setattr(plugin, "CUDA_READY", False)
    with pytest.raises(MedusaUnsupportedError, match="CPU backend only"):
        plugin.medusa_worker_cls(platform(False, True))
    monkeypatch.setattr(plugin, "CUDA_READY", True)
    assert plugin.medusa_worker_cls(platform(False, True)) == plugin.GPU_WORKER


# ------------------------------------------------------------------------------------------ real vLLM configs
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from medusa_plugin.testing.tiny import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def _engine_config(tiny_model, **kw):
    from vllm.engine.arg_utils import EngineArgs
    args = dict(model=str(tiny_model), dtype="float32", max_model_len=256, speculative_config=SPEC63,
                additional_config={"medusa": {"heads": "org/heads", "tree": "mc_sim_7b_63"}})
    args.update(kw)
    return EngineArgs(**args).create_engine_config()


def test_medusa_config_selects_the_medusa_worker_without_flags(tiny_model, tmp_path, monkeypatch):
    (tmp_path / "heads").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = _engine_config(tiny_model, additional_config={"medusa": {"heads": "./heads", "tree": "mc_sim_7b_63"}})
    assert cfg.parallel_config.worker_cls == plugin.CPU_WORKER
    # Workers read resolved settings: the relative heads path became absolute (they may run elsewhere).
    assert cfg.additional_config["medusa"]["heads"] == str((tmp_path / "heads").resolve())
    assert cfg.additional_config["medusa"]["tree"] == "mc_sim_7b_63"
    assert not cfg.use_v2_model_runner


def test_config_hook_is_idempotent(tiny_model):
    """vLLM re-runs VllmConfig.__post_init__ in the engine-core process; a second pass must change nothing."""
    cfg = _engine_config(tiny_model)
    before = (cfg.parallel_config.worker_cls, dict(cfg.additional_config["medusa"]))
    cfg.__post_init__()
    assert (cfg.parallel_config.worker_cls, cfg.additional_config["medusa"]) == before


def test_explicit_medusa_worker_is_kept(tiny_model):
    assert _engine_config(tiny_model, worker_cls=plugin.CPU_WORKER).parallel_config.worker_cls == plugin.CPU_WORKER


def test_plain_configs_are_untouched(tiny_model):
    cfg = _engine_config(tiny_model, speculative_config=None, additional_config={})
    assert cfg.parallel_config.worker_cls == "vllm.v1.worker.cpu_worker.CPUWorker"


def test_medusa_settings_without_the_proposer_warn(tiny_model, capfd, caplog):
    # Checked on what reaches the user, printed by vLLM's handler or (when an earlier test left vLLM's logger
    # propagating) captured at the root: vLLM re-runs logging.config.dictConfig while it builds the engine config,
    # which drops any handler a test attaches to a "vllm.*" logger beforehand.
    cfg = _engine_config(tiny_model, speculative_config=None)
    assert cfg.parallel_config.worker_cls == "vllm.v1.worker.cpu_worker.CPUWorker"
    out = capfd.readouterr()
    printed = out.out + out.err + caplog.text
    assert "Medusa is off" in printed and PROPOSER_PATH in printed


def test_user_worker_cls_is_refused_with_the_line_to_use(tiny_model):
    with pytest.raises(ValueError, match=f"pass --worker-cls {plugin.CPU_WORKER}"):
        _engine_config(tiny_model, worker_cls="vllm.v1.worker.cpu_worker.CPUWorker")


@pytest.mark.parametrize("kw, env, match", [
    (dict(speculative_config={**SPEC63, "num_speculative_tokens": 5}), {},
     r"num_speculative_tokens=5 but the Medusa tree 'mc_sim_7b_63' has 63 nodes: set \"num_speculative_tokens\": 63"),
    (dict(kv_cache_dtype="fp8"), {}, "kv_cache_dtype=fp8 is not supported.*--kv-cache-dtype auto"),
    (dict(pipeline_parallel_size=2), {}, "pipeline_parallel_size=2 is not supported.*--pipeline-parallel-size 1"),
    (dict(), {"VLLM_USE_V2_MODEL_RUNNER": "1"}, "VLLM_USE_V2_MODEL_RUNNER=1.*V1 model runner"),
    (dict(hf_overrides={"sliding_window": 64}), {}, "sliding-window attention"),
    (dict(additional_config={}), {}, "no Medusa settings were given"),
    (dict(additional_config={"medusa": {"heads": "a/b", "tree": "no_such_tree"}}), {}, "invalid 'tree'"),
])
def test_unsupported_configs_are_refused_at_config_time(tiny_model, monkeypatch, kw, env, match):
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        _engine_config(tiny_model, **kw)


def test_all_problems_are_listed_at_once(tiny_model):
    with pytest.raises(ValueError) as e:
        _engine_config(tiny_model, speculative_config={**SPEC63, "num_speculative_tokens": 4}, kv_cache_dtype="fp8")
    assert "num_speculative_tokens=4" in str(e.value) and "kv_cache_dtype=fp8" in str(e.value)


def test_changed_vllm_internals_fail_the_medusa_config(tiny_model, monkeypatch):
    monkeypatch.delenv(plugin.ENV_SKIP_VERSION_CHECK, raising=False)
    monkeypatch.setattr(compat, "check_contracts", lambda names=None: ["vllm.x.Y._sample (runner) changed: ..."])
    with pytest.raises(compat.VersionError, match=r"vllm\.x\.Y\._sample"):
        _engine_config(tiny_model)
    monkeypatch.setenv(plugin.ENV_SKIP_VERSION_CHECK, "1")
    assert _engine_config(tiny_model).parallel_config.worker_cls == plugin.CPU_WORKER
