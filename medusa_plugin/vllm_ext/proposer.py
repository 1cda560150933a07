"""``MedusaTreeProposer``: the ``custom_class`` speculative proposer that drafts a whole Medusa tree per request.

Selected with::

    speculative_config={"method": "custom_class",
                        "model": "medusa_plugin.vllm_ext.proposer.MedusaTreeProposer",
                        "num_speculative_tokens": N}          # N = number of tree nodes
    additional_config={"medusa": {"heads": DIR, "tree": NAME, ...}}

vLLM builds it in ``GPUModelRunner.__init__`` (via ``create_custom_proposer``) and calls
``load_model(target_model)`` from the runner's ``load_model`` (contracts in :mod:`.compat`). The stock ``propose()``
call does not pass hidden states, so tree mode needs the Medusa model runner (:mod:`.runner`), which calls
:meth:`MedusaTreeProposer.propose_tree` instead.
"""
from __future__ import annotations

import torch
from torch import Tensor

from medusa_plugin.core.heads import MedusaHeads
from medusa_plugin.core.schedule import TreeSchedule
from medusa_plugin.core.tree import MedusaTree

from .settings import medusa_settings

__all__ = ["MedusaTreeProposer", "MedusaProposerError"]


class MedusaProposerError(ValueError):
    """Medusa proposer misconfigured or used outside the Medusa model runner."""


class MedusaTreeProposer:
    """Drafts ``tree.num_nodes`` tokens per request from the Medusa heads, in Medusa node order.

    Attributes:
        config: the :class:`MedusaConfig`.
        tree: the :class:`MedusaTree` (on the target's device after ``load_model``).
        heads: :class:`MedusaHeads` (after ``load_model``).
        schedule: the batch-aware :class:`TreeSchedule` from the ``tree_schedule`` setting, or None (full tree at
            every batch size). With a schedule, each step drafts the first ``schedule.num_nodes(batch)`` nodes (a
            prefix of node order is itself a tree; 0 = no speculation for that step).
    """

    def __init__(self, vllm_config) -> None:
        self.vllm_config = vllm_config
        # Settings, node count, pipeline parallelism, ... were validated when the config was built
        # (settings.check_supported, run by the plugin).
        self.config = medusa_settings(vllm_config)
        self.tree = MedusaTree.load(self.config.tree, topk=self.config.topk)
        self.schedule = TreeSchedule.resolve(self.config.tree_schedule, self.tree)
        self.heads: MedusaHeads | None = None
        self._lm_head: Tensor | None = None
        self.vocab_size = vllm_config.model_config.get_vocab_size()

    # ------------------------------------------------------------------ vLLM hooks
    def load_model(self, target_model: torch.nn.Module) -> None:
        """Load the heads onto the target's device and dtype (v2 heads project with the target's lm_head)."""
        ref = next(target_model.parameters())
        dtype = ref.dtype if self.config.dtype == "auto" else getattr(torch, self.config.dtype)
        mc = self.vllm_config.model_config
        self.heads = MedusaHeads.from_pretrained(
            self.config.heads, base_hidden_size=mc.get_hidden_size(), base_vocab_size=self.vocab_size,
            dtype=dtype, device=ref.device, revision=self.config.heads_revision).eval()
        if self.heads.num_heads < self.tree.max_depth:
            raise MedusaProposerError(
                f"the tree {self.config.tree_name!r} is {self.tree.max_depth} deep but the heads at "
                f"{self.config.heads!r} have only {self.heads.num_heads}: choose a tree of depth <= "
                f"{self.heads.num_heads}")
        if not self.heads.own_lm_head:
            lm_head = getattr(target_model, "lm_head", None)
            weight = getattr(lm_head, "weight", None)
            if weight is None:
                raise MedusaProposerError("v2 Medusa heads need the target model's lm_head, which this model lacks")
            if self.vllm_config.parallel_config.tensor_parallel_size != 1:
                raise MedusaProposerError("v2 Medusa heads (no own lm_head) need tensor_parallel_size=1")
            self._lm_head = weight[: self.vocab_size]
        self.tree = self.tree.to(ref.device)

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None):
        """The stock ``custom_class`` entry point; tree mode cannot work through it (no hidden states)."""
        raise MedusaProposerError(
            "MedusaTreeProposer needs the Medusa model runner (tree positions, tree attention and tree acceptance): "
            "use worker_cls='medusa_plugin.vllm_ext.worker.MedusaCPUWorker' (--worker-cls), which the "
            "medusa_plugin vLLM plugin selects automatically when it is installed")

    # ------------------------------------------------------------------ tree drafting
    @torch.inference_mode()
    def propose_tree(self, hidden: Tensor, roots: list[int], allow: list[bool] | None = None) -> list[list[int]]:
        """Draft a tree per request.

        Args:
            hidden: ``[B, H]`` the target's last hidden state at each request's last accepted token (after the
                final norm).
            roots: ``B`` root tokens (the token just emitted, not yet in the KV cache).
            allow: optional ``B`` flags; requests with False get no drafts.
        Returns:
            ``B`` lists: ``tree.num_nodes`` draft tokens in node order (the first ``schedule.num_nodes(B)`` with a
            schedule), or ``[]``.
        """
        if self.heads is None:
            raise MedusaProposerError("propose_tree called before load_model")
        b = hidden.shape[0]
        num_nodes = self.tree.num_nodes if self.schedule is None else min(self.schedule.num_nodes(b),
                                                                           self.tree.num_nodes)
        idx = [i for i in range(b) if allow is None or allow[i]] if num_nodes > 0 else []
        out: list[list[int]] = [[] for _ in range(b)]
        if not idx:
            return out
        sel = torch.tensor(idx, device=hidden.device)
        logits = self.heads(hidden[sel], lm_head=self._lm_head)[..., : self.vocab_size]  # [b', K, V]
        root = torch.tensor([roots[i] for i in idx], dtype=torch.int64, device=hidden.device)
        tokens = self.tree.build_candidates(root, logits)[:, 1 : num_nodes + 1].tolist()
        for i, toks in zip(idx, tokens):
            out[i] = toks
        return out
