"""Helpers shared by tests, the demo and benchmarks: tiny models built offline (see :mod:`.tiny`)."""

from .tiny import build_tiny_medusa, build_tiny_model, build_tokenizer, load_tiny_model, stdlib_texts, tiny_prompts

__all__ = ["build_tiny_medusa", "build_tiny_model", "build_tokenizer", "load_tiny_model", "stdlib_texts", "tiny_prompts"]
