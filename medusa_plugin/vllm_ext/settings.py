"""Medusa settings inside a vLLM engine config, and the config-time refusal of what Medusa cannot run with.

Where the settings come from (first match wins):

1. ``additional_config["medusa"]`` (``--additional-config '{"medusa": {...}}'``): a mapping of settings
   (``heads``, ``tree``, ``acceptance``, ... see :mod:`medusa_plugin.core.config`), or ``{"config": "medusa.yaml"}``
   (a file; other keys next to ``config`` override the file's), or a path string.
2. The environment variable ``MEDUSA_PLUGIN_CONFIG``: a path to a YAML/JSON file (or a YAML string).

Medusa is selected by the speculative config ``{"method": "custom_class", "model": PROPOSER_PATH,
"num_speculative_tokens": <tree nodes>}``; :func:`is_medusa` tells whether a ``VllmConfig`` does.
:func:`check_supported` runs while vLLM builds the config (see ``plugin``) and raises
:class:`MedusaUnsupportedError` listing every unsupported setting together with its fix.

Per-request features that tree verification cannot honour exactly (structured outputs, logprobs, penalties, logit
bias, allowed token ids, bad words, min_tokens, min_p) are not refused: such requests get no drafts and are sampled
by vLLM's own sampler (:mod:`.sampling_support`, which also lifts vLLM's API refusal of min_p / logit_bias under
speculation for Medusa engines).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from medusa_plugin.core.config import MedusaConfig, MedusaConfigError, heads_is_local, load_config

__all__ = ["PROPOSER_PATH", "ENV_CONFIG", "MedusaSettingsError", "MedusaUnsupportedError", "is_medusa",
           "medusa_settings", "medusa_tree", "check_supported", "num_tree_nodes", "lora_token_budget_error"]

PROPOSER_PATH = "medusa_plugin.vllm_ext.proposer.MedusaTreeProposer"
ENV_CONFIG = "MEDUSA_PLUGIN_CONFIG"


class MedusaSettingsError(MedusaConfigError):
    """The Medusa settings are missing or invalid inside a vLLM config."""


class MedusaUnsupportedError(ValueError):
    """The vLLM config asks for something Medusa tree decoding does not support; the message lists each fix."""


def is_medusa(vllm_config: Any) -> bool:
    """True if the speculative config names the Medusa proposer (``custom_class`` + :data:`PROPOSER_PATH`)."""
    spec = getattr(vllm_config, "speculative_config", None)
    return (spec is not None and getattr(spec, "method", None) == "custom_class"
            and getattr(spec, "model", None) == PROPOSER_PATH)


def _raw_settings(vllm_config: Any) -> tuple[Any, str]:
    """-> (settings source for load_config, where it came from)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if isinstance(extra, Mapping) and extra.get("medusa") is not None:
        return extra["medusa"], "additional_config['medusa']"
    env = os.environ.get(ENV_CONFIG, "").strip()
    if env:
        return env, f"${ENV_CONFIG}"
    raise MedusaSettingsError(
        "Medusa is selected (speculative_config model " + PROPOSER_PATH + ") but no Medusa settings were given: pass "
        "--additional-config '{\"medusa\": {\"heads\": \"<heads dir or hub id>\", \"tree\": \"mc_sim_7b_63\"}}' "
        "(LLM(..., additional_config={\"medusa\": {...}})), or {\"medusa\": {\"config\": \"medusa.yaml\"}}, "
        f"or set {ENV_CONFIG}=/path/to/medusa.yaml")


def _load(src: Any, origin: str) -> MedusaConfig:
    try:
        if isinstance(src, Mapping) and "config" in src:
            path = src["config"]
            if not isinstance(path, (str, os.PathLike)):
                raise MedusaSettingsError(f"{origin}: 'config' must be a path to a .yaml/.json file, got {path!r}")
            base = load_config(Path(os.fspath(path)).expanduser())
            overrides = {k: v for k, v in src.items() if k != "config"}
            return load_config({**base.to_dict(), **overrides}) if overrides else base
        return load_config(src)
    except MedusaSettingsError:
        raise
    except MedusaConfigError as e:
        raise MedusaSettingsError(f"invalid Medusa settings in {origin}: {e}") from None


def _absolute(cfg: MedusaConfig) -> MedusaConfig:
    """Local paths made absolute, so worker processes resolve them the same way."""
    d = cfg.to_dict()
    if heads_is_local(cfg.heads) and Path(cfg.heads).expanduser().exists():
        d["heads"] = str(Path(cfg.heads).expanduser().resolve())
    if isinstance(cfg.tree, str) and Path(cfg.tree).expanduser().is_file():
        d["tree"] = str(Path(cfg.tree).expanduser().resolve())
    if cfg.tree_schedule not in (None, "auto") and Path(cfg.tree_schedule).expanduser().is_file():
        d["tree_schedule"] = str(Path(cfg.tree_schedule).expanduser().resolve())
    return load_config(d)


def medusa_settings(vllm_config: Any) -> MedusaConfig:
    """The :class:`MedusaConfig` of an engine (see the module docstring for the sources). Raises MedusaSettingsError."""
    src, origin = _raw_settings(vllm_config)
    return _load(src, origin)


def medusa_tree(cfg: MedusaConfig):
    """The ``core.tree.MedusaTree`` of validated settings, or for ``tree: dynamic`` its
    ``core.dynamic_tree.DynamicTreeSpec`` (both have ``num_nodes``); MedusaSettingsError on a bad tree."""
    from medusa_plugin.core.config import validate
    try:
        return validate(cfg)
    except MedusaConfigError as e:
        raise MedusaSettingsError(str(e)) from None


def num_tree_nodes(medusa: Mapping | MedusaConfig) -> int:
    """Number of draft nodes of the tree in these settings: the ``num_speculative_tokens`` vLLM needs."""
    cfg = medusa if isinstance(medusa, MedusaConfig) else _load(medusa, "medusa settings")
    return medusa_tree(cfg).num_nodes


def _model_problems(model_config: Any, max_model_len: int | None) -> list[str]:
    problems = []
    if model_config is None:
        return problems
    name = getattr(model_config, "model", "this model")
    if getattr(model_config, "use_mla", False):
        problems.append(f"model {name} uses multi-head latent attention (MLA); Medusa tree attention supports "
                        "standard (MHA/GQA) attention only: serve it without the Medusa speculative config")
    if getattr(model_config, "is_hybrid", False) or getattr(model_config, "is_attention_free", False):
        problems.append(f"model {name} is a hybrid / attention-free (Mamba-style) model; Medusa needs a pure "
                        "attention model: serve it without the Medusa speculative config")
    if getattr(model_config, "uses_mrope", False):
        problems.append(f"model {name} uses M-RoPE (multimodal rotary positions); Medusa tree positions support "
                        "1-D RoPE only: serve it without the Medusa speculative config")
    if getattr(model_config, "is_encoder_decoder", False):
        problems.append(f"model {name} is an encoder-decoder model; Medusa supports decoder-only models")
    hf = getattr(model_config, "hf_text_config", None)
    model_type = getattr(hf, "model_type", "")
    if getattr(hf, "attn_logit_softcapping", None):
        problems.append(f"model {name} uses attention logit soft-capping, which Medusa tree attention does not "
                        "implement: serve it without the Medusa speculative config")
    if (getattr(hf, "alibi", False) or getattr(getattr(hf, "attn_config", None), "alibi", False)
            or model_type == "bloom"):
        problems.append(f"model {name} uses ALiBi attention biases, which Medusa tree attention does not "
                        "implement: serve it without the Medusa speculative config")
    if model_type == "gpt_oss":
        problems.append(f"model {name} uses attention sinks, which Medusa tree attention does not implement: "
                        "serve it without the Medusa speculative config")
    try:
        window = model_config.get_sliding_window()
    except Exception:  # noqa: BLE001 - a model without the notion has no window
        window = None
    if window is not None and (max_model_len is None or window < max_model_len):
        problems.append(f"model {name} uses sliding-window attention (window {window} < max_model_len "
                        f"{max_model_len}); Medusa tree attention needs full attention: set --max-model-len <= "
                        f"{window} or pass --disable-sliding-window")
    return problems


def _speculative_tokens_problems(n: int, tree: Any, tree_name: str, lora: bool, max_num_batched_tokens: int | None,
                                 max_num_seqs: int | None) -> list[str]:
    """``num_speculative_tokens`` must be the tree's node count N; with LoRA, vLLM also needs
    ``max_num_batched_tokens >= max_num_seqs * (N + 1)`` (``EngineArgs.create_engine_config``, vLLM 0.32/0.33), whose
    own message says to lower num_speculative_tokens, which Medusa cannot do: say what to change instead."""
    nodes = tree.num_nodes
    budget = None
    if lora and max_num_batched_tokens is not None and max_num_seqs and max_num_batched_tokens < max_num_seqs * (
            nodes + 1):
        need = max_num_seqs * (nodes + 1)
        options = [f"raise --max-num-batched-tokens to {need}"]
        if max_num_batched_tokens // (nodes + 1) >= 1:
            options.append(f"lower --max-num-seqs to {max_num_batched_tokens // (nodes + 1)}")
        fit = max_num_batched_tokens // max_num_seqs - 1
        if fit >= 1:
            options.append(f"choose a tree of at most {fit} nodes (medusa-plugin fit-tree --budget {fit}, or "
                           f"'chain:K' with K <= {fit})")
        budget = (f"with LoRA vLLM then needs max_num_batched_tokens >= max_num_seqs x ({nodes} + 1) = "
                  f"{max_num_seqs} x {nodes + 1} = {need}, but it is {max_num_batched_tokens}: "
                  + ", or ".join(options))
    if n != nodes:
        return [f"num_speculative_tokens={n} but the Medusa tree {tree_name!r} has {nodes} nodes: set "
                f"\"num_speculative_tokens\": {nodes} in the speculative config"
                + (f" (Medusa drafts the whole tree, so it cannot be lowered), and {budget}" if budget else "")]
    if budget:
        return [f"num_speculative_tokens must stay {nodes} (the node count of the Medusa tree {tree_name!r}), and "
                + budget]
    return []


def lora_token_budget_error(engine_args: Any) -> MedusaUnsupportedError | None:
    """The Medusa fix for vLLM's LoRA token-budget refusal, for ``EngineArgs`` whose ``create_engine_config`` failed.

    vLLM refuses LoRA + speculative decoding when ``max_num_batched_tokens < max_num_seqs * (num_speculative_tokens
    + 1)`` with "Consider increasing max_num_batched_tokens or decreasing num_speculative_tokens", before the Medusa
    config check can run; Medusa cannot lower ``num_speculative_tokens`` (it is the tree's node count). Returns the
    error to raise instead (the same message :func:`check_supported` gives), or None when the condition does not hold
    or Medusa is not selected. ``engine_args``: the ``EngineArgs`` after the failed call (vLLM has resolved its
    default ``max_num_batched_tokens`` / ``max_num_seqs`` in place by then).
    """
    spec = getattr(engine_args, "speculative_config", None)
    if not (isinstance(spec, Mapping) and spec.get("method") == "custom_class" and spec.get("model") == PROPOSER_PATH
            and getattr(engine_args, "enable_lora", False)):
        return None
    tokens, seqs, n = engine_args.max_num_batched_tokens, engine_args.max_num_seqs, spec.get("num_speculative_tokens")
    if not isinstance(tokens, int) or not isinstance(seqs, int) or not isinstance(n, int) or tokens >= seqs * (n + 1):
        return None
    try:
        cfg = medusa_settings(engine_args)
        tree = medusa_tree(cfg)
    except MedusaConfigError:
        return None  # vLLM's error stands; the settings error comes once it is fixed
    problems = _speculative_tokens_problems(n, tree, cfg.tree_name, True, tokens, seqs)
    return MedusaUnsupportedError("Medusa tree speculative decoding cannot run with this vLLM config:\n  - "
                                  + "\n  - ".join(problems)) if problems else None


def check_supported(vllm_config: Any) -> MedusaConfig:
    """Validate a Medusa-selecting ``VllmConfig``; returns its settings (local paths made absolute).

    Raises MedusaSettingsError (missing/invalid settings or tree) or MedusaUnsupportedError listing every
    unsupported option with its fix: pipeline parallelism, the V2 model runner, ``num_speculative_tokens`` other
    than the tree's node count, LoRA with ``max_num_batched_tokens < max_num_seqs * (tree nodes + 1)`` (vLLM's own
    limit; :func:`lora_token_budget_error` gives the same message where vLLM refuses first), a quantized KV cache,
    MLA / hybrid / attention-free / encoder-decoder / M-RoPE / sliding-window / soft-capped / ALiBi / attention-sink
    models, dual-batch overlap and decode context parallelism.
    """
    cfg = _absolute(medusa_settings(vllm_config))
    tree = medusa_tree(cfg)
    problems: list[str] = []

    sched = getattr(vllm_config, "scheduler_config", None)
    problems += _speculative_tokens_problems(
        vllm_config.speculative_config.num_speculative_tokens, tree, cfg.tree_name,
        getattr(vllm_config, "lora_config", None) is not None, getattr(sched, "max_num_batched_tokens", None),
        getattr(sched, "max_num_seqs", None))

    par = vllm_config.parallel_config
    if getattr(par, "pipeline_parallel_size", 1) > 1:
        problems.append(f"pipeline_parallel_size={par.pipeline_parallel_size} is not supported (the drafter lives "
                        "on the last stage only and tree attention/KV compaction are per stage): use "
                        "--pipeline-parallel-size 1 (tensor parallelism is fine)")
    if getattr(par, "decode_context_parallel_size", 1) > 1:
        problems.append(f"decode_context_parallel_size={par.decode_context_parallel_size} is not supported: use 1")
    if getattr(par, "enable_dbo", False):
        problems.append("dual-batch overlap (--enable-dbo) is not supported: drop the flag")

    import vllm.envs as envs
    if getattr(envs, "VLLM_USE_V2_MODEL_RUNNER", None):
        problems.append("VLLM_USE_V2_MODEL_RUNNER=1: Medusa runs on vLLM's V1 model runner (the V2 runner has no "
                        "custom_class speculation): unset it or set VLLM_USE_V2_MODEL_RUNNER=0")

    cache_dtype = getattr(vllm_config.cache_config, "cache_dtype", "auto")
    if str(cache_dtype) != "auto":
        problems.append(f"kv_cache_dtype={cache_dtype!s} is not supported (accepted paths are copied as raw KV "
                        "and tree attention reads the unquantized cache): use --kv-cache-dtype auto")

    model_config = getattr(vllm_config, "model_config", None)
    problems += _model_problems(model_config, getattr(model_config, "max_model_len", None))

    if problems:
        raise MedusaUnsupportedError("Medusa tree speculative decoding cannot run with this vLLM config:\n  - "
                                     + "\n  - ".join(problems))
    return cfg
