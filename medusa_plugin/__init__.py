"""Medusa tree speculative decoding for vLLM.

Engine-independent algorithm code lives in :mod:`medusa_plugin.core` (plain PyTorch, no vLLM import); the vLLM
glue lives in :mod:`medusa_plugin.vllm_ext`.
"""

__version__ = "0.1.0"
