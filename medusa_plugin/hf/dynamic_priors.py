"""The two files that make dynamic trees work from a server's first request, fitted on training-side prompts and
written next to the heads:

* ``successors.safetensors``: bigram / trigram counts of the target's own text (prompts + its answers),
  :class:`~medusa_plugin.core.successor_prior.SuccessorCounts`;
* ``calibration.json``: an :class:`~medusa_plugin.core.calibration.AcceptanceCalibration` (head probability ->
  acceptance, and the successor-level multipliers) fitted by decoding training-side prompts with dynamic trees
  (the reference decoder, greedy); a server starts from it and then follows its own traffic;
* ``acceptance_model.safetensors``: the learned node scores of dynamic trees
  (:mod:`~medusa_plugin.core.acceptance_model`), fitted on prompts the heads never trained on.

Used by the chat recipe (``medusa-plugin train --recipe chat``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..core.calibration import CALIBRATION_FILE, AcceptanceCalibration
from ..core.successor_prior import FILE_NAME as SUCCESSORS_FILE
from ..core.successor_prior import SuccessorCounts

__all__ = ["fit_calibration_prior", "write_dynamic_priors"]


def fit_calibration_prior(model, heads, prompts: Sequence[Sequence[int]], *, successors: SuccessorCounts | None,
                          budget: int = 16, topk: int = 10, max_new_tokens: int = 64) -> AcceptanceCalibration:
    """Decode ``prompts`` (token-id lists) with dynamic trees of ``budget`` nodes (greedy, reference decoder),
    calibrating online from the accepted paths; returns the calibration. ``model``: transformers causal LM (fp32
    advised), ``heads``: its :class:`~medusa_plugin.core.heads.MedusaHeads` (same dtype)."""
    from ..core.dynamic_tree import DynamicTreeSpec
    from .generate import medusa_generate

    cal = AcceptanceCalibration(heads.num_heads)
    spec = DynamicTreeSpec(budget=budget, topk=topk)
    for i in range(0, len(prompts), 8):
        medusa_generate(model, heads, spec, [list(p) for p in prompts[i:i + 8]], max_new_tokens=max_new_tokens,
                        calibration=cal, successors=successors)
    cal.refit()
    return cal


def write_dynamic_priors(out_dir: str | Path, model, heads, sequences: Sequence[Sequence[int]],
                         prompts: Sequence[Sequence[int]], *, budget: int = 16,
                         acceptance_prompts: Sequence[Sequence[int]] = (), max_new_tokens: int = 64) -> dict:
    """Write ``successors.safetensors`` (counts of ``sequences``: prompt + answer token ids), ``calibration.json``
    (:func:`fit_calibration_prior` on ``prompts``) and, given at least 16 ``acceptance_prompts`` (prompts the heads
    were not trained on), ``acceptance_model.safetensors`` (:func:`~medusa_plugin.hf.fit_acceptance.
    fit_acceptance_model`) into ``out_dir``; returns a summary for the recipe's report."""
    from ..core.acceptance_model import FILE_NAME as ACCEPTANCE_MODEL_FILE
    from .fit_acceptance import fit_acceptance_model

    out = Path(out_dir)
    succ = SuccessorCounts.from_sequences(sequences)
    succ.save(out / SUCCESSORS_FILE)
    cal = fit_calibration_prior(model, heads, prompts, successors=succ, budget=budget)
    (out / CALIBRATION_FILE).write_text(json.dumps(cal.state()) + "\n")
    summary = {"successor_tokens": succ.tokens, "calibration_prompts": len(prompts), "calibration": cal.describe(),
               "acceptance_model_prompts": 0}
    if len(acceptance_prompts) >= 16:
        fitted = fit_acceptance_model(model, heads, [list(p) for p in acceptance_prompts], succ,
                                      max_new_tokens=max_new_tokens, log=lambda *_: None)
        fitted.save(out / ACCEPTANCE_MODEL_FILE)
        summary.update(acceptance_model_prompts=len(acceptance_prompts), acceptance_model=fitted.info)
    return summary
