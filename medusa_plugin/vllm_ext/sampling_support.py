"""Per-request sampling parameters on a Medusa engine: every request the engine serves without speculation is served.

How each parameter is honoured:

* temperature, top-k, top-p, seed: tree verification reproduces vLLM's sampler for them (``core.acceptance``:
  exact at temperature 0, lossless tree sampling above), so such requests get drafts.
* everything that alters logits or needs per-token state (logprobs, structured outputs, presence / frequency /
  repetition penalties, logit_bias, allowed_token_ids, bad_words, min_p, min_tokens not yet reached):
  :func:`request_can_draft` is False, the request gets no drafts, and vLLM's own sampler samples its single logit
  row exactly as without speculation.

vLLM ties two restrictions to "speculation is configured" because *its* rejection sampler cannot apply min_p and
logit_bias to draft rows. The Medusa runner never calls that sampler, so for Medusa engines they are lifted:

* :func:`allow_min_p_and_logit_bias` wraps ``SamplingParams._validate_spec_decode`` (run in the API process, refuses
  min_p / logit_bias with "not yet supported with speculative decoding") to skip that refusal when the speculative
  config is the Medusa proposer; other engines keep vLLM's check. Installed by ``plugin.register()``.
* :func:`install_logits_processors` adds vLLM's builtin ``MinPLogitsProcessor`` and ``LogitBiasLogitsProcessor`` to
  the runner's input batch (``build_logitsprocs`` builds only ``MinTokensLogitsProcessor`` under speculation).

Both are listed in :mod:`.compat` with probes; remove them when vLLM's spec-decode path applies min_p and
logit_bias itself.
"""
from __future__ import annotations

from typing import Any

from .settings import PROPOSER_PATH

__all__ = ["request_can_draft", "allow_min_p_and_logit_bias", "install_logits_processors", "is_medusa_speculation"]


def is_medusa_speculation(speculative_config: Any) -> bool:
    """True if a ``SpeculativeConfig`` selects the Medusa proposer (``custom_class`` + ``settings.PROPOSER_PATH``)."""
    return (speculative_config is not None and getattr(speculative_config, "method", None) == "custom_class"
            and getattr(speculative_config, "model", None) == PROPOSER_PATH)


def request_can_draft(req_state) -> bool:
    """Whether a running request (vLLM's ``CachedRequestState``) may verify a tree this step.

    False for the parameters tree verification does not reproduce (see the module docstring): such a request is
    decoded one token per step by vLLM's sampler.
    """
    sp = req_state.sampling_params
    if sp is None:
        return False
    return not (sp.logprobs is not None or sp.structured_outputs is not None or sp.logit_bias
                or sp.allowed_token_ids or sp.bad_words or (sp.min_p or 0.0) > 0.0
                or (sp.min_tokens or 0) > len(req_state.output_token_ids)
                or sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0 or sp.repetition_penalty != 1.0)


def allow_min_p_and_logit_bias() -> None:
    """Wrap ``SamplingParams._validate_spec_decode`` so Medusa engines accept min_p / logit_bias (idempotent)."""
    from vllm.sampling_params import SamplingParams

    original = SamplingParams._validate_spec_decode
    if getattr(original, "__medusa_wrapped__", False):
        return

    def _validate_spec_decode(self, speculative_config) -> None:
        if is_medusa_speculation(speculative_config):
            return  # served without drafts by the stock sampler (see the module docstring)
        original(self, speculative_config)

    _validate_spec_decode.__medusa_wrapped__ = True
    _validate_spec_decode.__wrapped__ = original
    SamplingParams._validate_spec_decode = _validate_spec_decode


def install_logits_processors(input_batch, vllm_config, device) -> None:
    """Add vLLM's builtin min_p and logit_bias processors to a runner's ``InputBatch`` if they are missing.

    ``InputBatch.logitsprocs`` survives the runner's re-creation of the batch (it is passed on), so once is enough.
    """
    from vllm.utils.torch_utils import PIN_MEMORY
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.logits_processor.builtin import LogitBiasLogitsProcessor, MinPLogitsProcessor

    have = list(input_batch.logitsprocs.all)
    missing = [cls for cls in (MinPLogitsProcessor, LogitBiasLogitsProcessor)
               if not any(isinstance(p, cls) for p in have)]
    if missing:
        input_batch.logitsprocs = LogitsProcessors(
            [*have, *(cls(vllm_config, device, PIN_MEMORY) for cls in missing)])
