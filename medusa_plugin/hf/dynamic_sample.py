"""One sampled dynamic tree, for ``medusa-plugin tree dynamic``: from a model's heads on a prompt, or from synthetic
head probabilities when no model is given."""
from __future__ import annotations

from typing import Callable

import torch

from ..core.dynamic_tree import DynamicTree, DynamicTreeSpec


def synthetic_dynamic_tree(spec: DynamicTreeSpec, *, num_heads: int = 4, vocab: int = 64,
                           seed: int = 0) -> DynamicTree:
    """A dynamic tree from random head logits (head ``k`` flatter than head ``k-1``, as trained heads are) and, with
    n-gram branches, a random context that repeats its opening tokens (so a prompt-lookup match exists).

    Returns the :class:`DynamicTree` (token ids are synthetic, ``0..vocab-1``).
    """
    g = torch.Generator().manual_seed(seed)
    k = spec.num_heads or num_heads
    scale = torch.tensor([3.0 / (1 + 0.5 * d) for d in range(k)]).view(1, k, 1)
    logits = torch.randn(1, k, vocab, generator=g) * scale
    context = torch.randint(0, vocab, (12,), generator=g).tolist()
    context = context + context[:3]
    return spec.build(torch.tensor([context[-1]]), logits, [context])[0]


@torch.inference_mode()
def model_dynamic_tree(spec: DynamicTreeSpec, model_dir: str, heads_dir: str,
                       prompt: str) -> tuple[DynamicTree, Callable[[int], str], str]:
    """The tree the heads propose after the first answer token of ``prompt`` (chat template applied), scored as a
    server scores it: with the heads' acceptance model, successor counts and calibration prior when they are next to
    the heads.

    Returns ``(tree, decode, how)`` where ``decode(token_id) -> str`` and ``how`` names what scored the nodes. The
    model runs in float32 on the CPU.
    """
    from pathlib import Path

    from ..core.acceptance_model import acceptance_model_for
    from ..core.calibration import calibration_for
    from ..core.successor_prior import FILE_NAME as SUCCESSORS_FILE
    from ..core.successor_prior import SuccessorCounts

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..core.heads import MedusaHeads
    from .base_model import root_embeds_of
    from .chat_prompts import chat_prompt_ids

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    heads = MedusaHeads.from_pretrained(heads_dir, dtype=torch.float32).eval()
    ids = chat_prompt_ids(tok, prompt)
    hidden = model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[:, -1]  # [1, H]
    lm_head = model.get_output_embeddings()
    root = lm_head(hidden).argmax(-1)
    here = Path(heads_dir)
    succ = SuccessorCounts.load(here / SUCCESSORS_FILE) if (here / SUCCESSORS_FILE).is_file() else None
    scorer, _ = acceptance_model_for(heads_dir, heads.num_heads, succ)
    cal, how = calibration_for(heads_dir, heads.num_heads)
    how = "the acceptance model next to the heads" if scorer is not None else f"calibration {how}"
    tree = spec.build(root, heads(hidden, lm_head, root_embeds_of(model, heads)(root)), [ids + [int(root)]],
                      calibration=cal, successors=succ, acceptance_model=scorer)[0]
    return tree, lambda t: tok.decode([t]), how
