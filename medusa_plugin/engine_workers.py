"""vLLM engines kept alive side by side, one per worker process, so that benchmark runs of several methods can be
interleaved.

A benchmark that runs plain decoding for minutes and then Medusa for minutes compares two different stretches of the
machine: on a shared 2-core CPU the same plain run drifts by 10-20 % between them, which is larger than the effect
being measured. With every method's engine started once and kept waiting in its own process, the benchmark can run
plain, Medusa and ngram back to back at each concurrency, repeat the round, and take the median of the *paired*
ratios. Drift then hits the methods of a round alike.

Each worker process builds one ``vllm.LLM`` (:func:`medusa_plugin.vllm_ext.offline.build_llm`) and answers
``run(prompts, max_tokens)`` and ``call(fn, *args)`` calls over a pipe; an idle engine waits on its pipe and takes
no CPU. Engines are started one after the other (Medusa's start-up measures step costs, which another engine's
start-up would disturb).
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

__all__ = ["EngineWorkerError", "EngineWorker", "RunResult"]


class EngineWorkerError(RuntimeError):
    """An engine in a worker process failed to start or to run; the message is the worker's one-line reason."""


def _one_line(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0][:400] if text else ''}"


def _serve(conn, model_dir: str, medusa: Mapping | None, llm_kwargs: dict) -> None:
    """Worker process body: build the engine, warm it up, then answer ``(prompts, max_tokens)`` until ``None``."""
    try:
        from .vllm_ext import offline

        llm = offline.build_llm(model_dir, medusa=medusa, **llm_kwargs)
        offline.run(llm, [[1, 2, 3]], 2, ignore_eos=True)  # warm-up: the first step compiles / allocates
    except BaseException as e:  # noqa: BLE001 - reported to the parent as one line
        conn.send(("error", _one_line(e), traceback.format_exc()))
        return
    conn.send(("ready", None, None))
    try:
        while True:
            cmd = conn.recv()
            if cmd is None:
                break
            try:
                if cmd[0] == "rpc":
                    conn.send(("ok", llm.collective_rpc(cmd[1]), None))
                    continue
                if cmd[0] == "call":
                    conn.send(("ok", cmd[1](llm, *cmd[2]), None))
                    continue
                prompts, max_tokens = cmd
                out = offline.run(llm, prompts, max_tokens, ignore_eos=True)
                conn.send(("ok", (out.token_ids, out.elapsed_s, out.metrics), None))
            except Exception as e:  # noqa: BLE001
                conn.send(("error", _one_line(e), traceback.format_exc()))
    finally:
        offline.shutdown(llm)


@dataclass
class RunResult:
    """token_ids: per prompt, the generated tokens; elapsed_s: wall time of the generate call (s); metrics:
    ``offline.acceptance_metrics`` of the call (empty without speculative decoding)."""

    token_ids: list[list[int]]
    elapsed_s: float
    metrics: dict


class EngineWorker:
    """One ``vllm.LLM`` in its own (spawned) process.

    Args:
        model_dir: the target model.
        medusa: Medusa settings (as ``offline.build_llm``), or None.
        llm_kwargs: further ``vllm.LLM`` arguments (``speculative_config`` for vLLM's own methods, ``dtype``, ...).
        start_timeout_s: how long to wait for the engine to start.
    Raises:
        EngineWorkerError: the engine failed to start (message: the worker's exception in one line).
    """

    def __init__(self, model_dir: str, *, medusa: Mapping | None = None, start_timeout_s: float = 1800.0,
                 **llm_kwargs: Any) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        # not a daemon: the engine core is a child process of this one
        self._proc = ctx.Process(target=_serve, args=(child, str(model_dir), medusa, llm_kwargs), daemon=False)
        self._proc.start()
        child.close()
        self._receive(start_timeout_s, "start")

    def _receive(self, timeout_s: float | None, what: str):
        if not self._conn.poll(timeout_s):
            self.close()
            raise EngineWorkerError(f"the engine did not {what} within {timeout_s:.0f} s")
        try:
            kind, value, trace = self._conn.recv()
        except EOFError:
            self.close()
            raise EngineWorkerError(f"the engine process died during {what} (exit code {self._proc.exitcode})") \
                from None
        if kind == "error":
            self.close()
            raise EngineWorkerError(value)
        return value

    def run(self, prompts: Sequence[Sequence[int]], max_tokens: int, *, timeout_s: float | None = None) -> RunResult:
        """Generate ``max_tokens`` per prompt (greedy, eos ignored) on this engine; returns :class:`RunResult`."""
        self._conn.send(([[int(t) for t in p] for p in prompts], int(max_tokens)))
        token_ids, elapsed, metrics = self._receive(timeout_s, "run")
        return RunResult(token_ids, elapsed, metrics)

    def call(self, fn, *args, timeout_s: float | None = None):
        """``fn(llm, *args)`` in the worker process, on its engine; returns the result. ``fn`` must be picklable (a
        module-level function) and so must ``args`` and the result. With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` in the
        environment the engine runs inside the worker, so ``fn`` can reach its model runner (``bench overhead``
        profiles steps that way)."""
        self._conn.send(("call", fn, args))
        return self._receive(timeout_s, "answer")

    def collective_rpc(self, method: str, *, timeout_s: float | None = 600.0) -> list:
        """``LLM.collective_rpc(method)`` on this engine (a worker method's name, e.g. ``"medusa_state"`` of the
        Medusa workers); returns one result per worker."""
        self._conn.send(("rpc", method))
        return self._receive(timeout_s, "answer")

    def close(self) -> None:
        """Stop the engine and its process (idempotent)."""
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(120)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(10)
        self._conn.close()

    def __enter__(self) -> "EngineWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
