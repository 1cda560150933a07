"""The target model's final hidden states, captured while vLLM generates (self-distillation without a second pass).

Head training reads, for each distilled answer ``a`` (``m`` tokens) of a prompt of ``P`` tokens, the final-normed
hidden states at positions ``P-1 .. P+m-2``: the state *before* each answer token (``hf.hidden_cache``). vLLM
computes exactly these while it generates the answer (the prefill's last row, then one row per decoded token; the
last answer token is never fed back), so a forward hook on the model keeps them and the separate forward pass over
every prompt + answer disappears: on SmolLM2-135M (2 cores, fp32) that pass cost 600 s of a 38-minute recipe.

The hook runs inside the engine's own process; :func:`capture_while` therefore needs an in-process engine
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which ``hf.batch_generate`` sets). vLLM internals read here (listed in
``compat``): the runner's ``input_batch.req_ids`` and ``query_start_loc.np`` (the row layout of the step),
``requests[req_id].prompt_token_ids``, the model called with ``positions=`` (``GPUModelRunner._model_forward``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["HiddenCapture", "HiddenCaptureError", "capture_while"]


class HiddenCaptureError(RuntimeError):
    """The engine cannot be hooked (not in-process, not one worker) or a request's rows are incomplete."""


class HiddenCapture:
    """Forward hook (``register_forward_hook(..., with_kwargs=True)``) on the target model of one vLLM model runner.

    Every step it keeps, per request, the rows at positions ``>= P-1`` (``P``: the request's prompt length) as
    ``store_dtype`` on the CPU, keyed by the prompt's tokens (identical prompts decode identically under greedy
    sampling, so they share rows). A recomputed position (preemption) overwrites the earlier row.
    """

    def __init__(self, runner, store_dtype: torch.dtype = torch.bfloat16) -> None:
        self.runner = runner
        self.store_dtype = store_dtype
        self._key_of: dict[str, tuple[int, ...]] = {}
        self._chunks: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}

    def __call__(self, module, args, kwargs, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        positions = kwargs.get("positions")
        if not isinstance(hidden, Tensor) or positions is None:
            return
        runner = self.runner
        n = runner.input_batch.num_reqs
        qsl = runner.query_start_loc.np[: n + 1]
        pos = positions[: int(qsl[-1])].cpu().numpy()
        for i, rid in enumerate(runner.input_batch.req_ids[:n]):
            key = self._key_of.get(rid)
            if key is None:
                key = self._key_of[rid] = tuple(runner.requests[rid].prompt_token_ids or ())
            s, e = int(qsl[i]), int(qsl[i + 1])
            first = max(s, s + len(key) - 1 - int(pos[s])) if e > s else e
            if first < e:
                self._chunks.setdefault(key, []).append(
                    (int(pos[first]), hidden[first:e].detach().to("cpu", self.store_dtype, copy=True)))

    def rows(self, prompt: Sequence[int], answer_len: int) -> Tensor:
        """``[answer_len, H]`` rows at positions ``P-1 .. P+answer_len-2`` of the request with this prompt.

        Raises:
            HiddenCaptureError: a position was never computed (the request did not run in the captured engine).
        """
        P = len(prompt)
        chunks = self._chunks.get(tuple(int(t) for t in prompt), [])
        if not chunks:
            raise HiddenCaptureError(f"no hidden states were captured for a prompt of {P} tokens")
        width = chunks[0][1].shape[1]
        out = torch.empty(answer_len, width, dtype=self.store_dtype)
        seen = np.zeros(answer_len, dtype=bool)
        for start, h in chunks:  # in step order: a recomputed row overwrites the earlier one
            lo, hi = start - (P - 1), start - (P - 1) + h.shape[0]
            a, b = max(lo, 0), min(hi, answer_len)
            if a < b:
                out[a:b] = h[a - lo:b - lo]
                seen[a:b] = True
        if not seen.all():
            raise HiddenCaptureError(f"hidden states of {int((~seen).sum())} of {answer_len} answer positions were "
                                     f"not captured (prompt of {P} tokens)")
        return out


def _install(worker, capture_box: list, store_dtype: torch.dtype):
    runner = worker.model_runner
    cap = HiddenCapture(runner, store_dtype)
    handle = runner.get_model().register_forward_hook(cap, with_kwargs=True)
    capture_box.append((cap, handle))


@contextmanager
def capture_while(llm, store_dtype: torch.dtype = torch.bfloat16) -> Iterator[HiddenCapture]:
    """Hook the model of an in-process ``vllm.LLM`` (one worker) for the duration of the ``with`` block.

    Raises:
        HiddenCaptureError: the engine runs in another process or has more than one worker.
    """
    box: list = []
    try:
        llm.collective_rpc(lambda worker: _install(worker, box, store_dtype))
    except Exception as e:  # noqa: BLE001 - a multiprocess engine cannot pickle the closure
        raise HiddenCaptureError(f"cannot hook the engine's model ({type(e).__name__}: {e}); hidden states are "
                                 f"captured only in-process: set VLLM_ENABLE_V1_MULTIPROCESSING=0") from None
    if len(box) != 1:
        for _, h in box:
            h.remove()
        raise HiddenCaptureError(f"the engine's model was hooked in {len(box)} places: hidden states are captured "
                                 f"only from one in-process worker (VLLM_ENABLE_V1_MULTIPROCESSING=0, "
                                 f"tensor_parallel_size=1)")
    cap, handle = box[0]
    try:
        yield cap
    finally:
        handle.remove()
