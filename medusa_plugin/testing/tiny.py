"""Tiny models built offline (no hub): a byte-level BPE tokenizer trained on stdlib source, random-weight causal LMs
in Llama / Qwen2 / Mistral layout, and (with :mod:`medusa_plugin.hf.train`) Medusa heads that are right often.

Everything is saved with ``save_pretrained`` (safetensors + tokenizer files) so that transformers *and* vLLM load it.
Builders are idempotent: a ``.medusa_build.json`` marker records the arguments and a second call with the same
arguments returns at once.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Sequence

import torch

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, UNK, PAD]
ARCHS = ("llama", "qwen2", "mistral")
_MARKER = ".medusa_build.json"
_MEDUSA_RECIPE = 1  # bump when build_tiny_medusa's recipe changes so cached builds are redone

# Plain-text modules every CPython install ships; used as training text (tokenizer, demo model).
STDLIB_TEXT_FILES = ("textwrap.py", "string.py", "functools.py", "shlex.py", "fnmatch.py", "bisect.py",
                     "heapq.py", "copy.py", "glob.py", "contextlib.py", "dataclasses.py", "argparse.py")


class TinyModelError(ValueError):
    """Bad arguments to a tiny-model builder."""


def stdlib_texts(names: Sequence[str] = STDLIB_TEXT_FILES, max_chars: int | None = None) -> list[str]:
    """Source text of stdlib modules read from this interpreter's stdlib directory (missing files are skipped)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for name in names:
        path = root / name
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            texts.append(text[:max_chars] if max_chars else text)
    if not texts:
        raise TinyModelError(f"no stdlib source files found under {root}; pass texts=[...] explicitly")
    return texts


def _marker_matches(out_dir: Path, key: dict) -> bool:
    marker = out_dir / _MARKER
    return marker.is_file() and json.loads(marker.read_text()) == key


def _write_marker(out_dir: Path, key: dict) -> None:
    (out_dir / _MARKER).write_text(json.dumps(key, sort_keys=True))


def build_tokenizer(out_dir: str | Path, texts: Sequence[str] | None = None, vocab_size: int = 256):
    """Train a byte-level BPE tokenizer on ``texts`` (default: stdlib source) and save it into ``out_dir``.

    Special tokens ``<s>`` (bos, id 0), ``</s>`` (eos, id 1), ``<unk>`` (2), ``<pad>`` (3). With a small
    ``vocab_size`` (< 256 + specials) only bytes seen in the texts are in the alphabet and unseen bytes map to
    ``<unk>``; with a larger one all 256 bytes are covered. Returns a ``PreTrainedTokenizerFast`` that
    ``AutoTokenizer.from_pretrained(out_dir)`` (and vLLM) load offline.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + 64:
        raise TinyModelError(f"vocab_size={vocab_size} is too small; use at least {len(SPECIAL_TOKENS) + 64}")
    texts = list(texts) if texts is not None else stdlib_texts()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    full_bytes = vocab_size >= 256 + len(SPECIAL_TOKENS) + 32
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if full_bytes else [])
    tok.train_from_iterator(texts, trainer=trainer)

    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                     pad_token=PAD, model_max_length=1 << 20)
    hf_tok.save_pretrained(out_dir)
    # Name the class every transformers version (4.x and 5.x) and vLLM resolve.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return hf_tok


def _config(arch: str, *, vocab_size: int, hidden_size: int, num_layers: int, num_attention_heads: int,
            num_key_value_heads: int, head_dim: int, intermediate_size: int, max_position_embeddings: int,
            init_std: float, dtype: torch.dtype):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    kw = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
              num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads, head_dim=head_dim,
              intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
              initializer_range=init_std, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
              pad_token_id=3, rms_norm_eps=1e-6, rope_theta=10000.0)
    if arch == "mistral":
        kw["sliding_window"] = None
    if arch == "qwen2":
        kw["use_sliding_window"] = False
    cfg = cls(**kw)
    cfg.dtype = str(dtype).removeprefix("torch.")
    return cfg


def build_tiny_model(out_dir: str | Path, *, arch: str = "llama", vocab_size: int | None = None,
                     hidden_size: int = 128, num_layers: int = 2, num_attention_heads: int = 2,
                     num_key_value_heads: int = 1, head_dim: int = 64, intermediate_size: int = 256,
                     max_position_embeddings: int = 1024, seed: int = 0, dtype: torch.dtype = torch.float32,
                     init_std: float = 0.02, tokenizer_vocab_size: int = 256,
                     texts: Sequence[str] | None = None) -> Path:
    """Build a random-weight causal LM (+ tokenizer) in ``out_dir`` and return ``out_dir``.

    ``arch``: "llama" | "qwen2" | "mistral". ``vocab_size`` defaults to the tokenizer's size (it may be larger than
    the tokenizer, never smaller). ``head_dim`` >= 64 keeps vLLM's CPU attention happy. Untied embeddings.
    Weights are saved as safetensors in ``dtype``; loadable by ``AutoModelForCausalLM`` and ``vllm.LLM``.
    """
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise TinyModelError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if num_attention_heads % num_key_value_heads:
        raise TinyModelError(f"num_attention_heads={num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={num_key_value_heads}")
    out_dir = Path(out_dir)
    key = dict(kind="tiny_model", arch=arch, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
               num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads, head_dim=head_dim,
               intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings, seed=seed,
               dtype=str(dtype), init_std=init_std, tokenizer_vocab_size=tokenizer_vocab_size,
               texts=None if texts is None else len(texts))
    if texts is None and _marker_matches(out_dir, key):
        return out_dir

    tok = build_tokenizer(out_dir, texts=texts, vocab_size=tokenizer_vocab_size)
    n_tok = len(tok)
    if vocab_size is None:
        vocab_size = n_tok
    elif vocab_size < n_tok:
        raise TinyModelError(f"vocab_size={vocab_size} is smaller than the tokenizer ({n_tok} tokens); "
                             f"leave vocab_size=None to use the tokenizer's size")

    cfg = _config(arch, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                  num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                  head_dim=head_dim, intermediate_size=intermediate_size,
                  max_position_embeddings=max_position_embeddings, init_std=init_std, dtype=dtype)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 0, 1
    model.generation_config.pad_token_id = 3
    model.save_pretrained(out_dir, safe_serialization=True)
    _write_marker(out_dir, key)
    return out_dir


def load_tiny_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a directory written by :func:`build_tiny_model`, eval mode, on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def tiny_prompts(tokenizer, n: int = 32, *, min_len: int = 4, max_len: int = 12, seed: int = 0,
                 texts: Sequence[str] | None = None) -> list[list[int]]:
    """``n`` short prompts (token id lists of ``min_len..max_len`` tokens) cut at random from stdlib source lines."""
    g = torch.Generator().manual_seed(seed)
    ids = tokenizer("\n".join(texts if texts is not None else stdlib_texts())).input_ids
    prompts = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        start = int(torch.randint(0, len(ids) - length, (1,), generator=g))
        prompts.append(ids[start:start + length])
    return prompts


def build_tiny_medusa(out_dir: str | Path, *, arch: str = "llama", num_heads: int = 4, steps: int = 300,
                      num_prompts: int = 64, distill_tokens: int = 48, seed: int = 0,
                      **model_kw) -> tuple[Path, Path]:
    """A tiny random model plus Medusa heads trained on its own greedy continuations; returns (model_dir, heads_dir).

    A random tiny model's greedy output is repetitive, so the heads learn it well: on the training prompts
    (``tiny_prompts(tokenizer, k, seed=seed)``, whose first k equal the first k of the ``num_prompts`` used here) the
    reference decoder with the 63-node tree accepts about 3 tokens per step (fewer on unseen prompts: the heads
    memorise). Cached by arguments under ``out_dir``
    (``<out_dir>/<arch>-<hash>/{model,heads}``). ``model_kw`` go to :func:`build_tiny_model`.
    """
    import hashlib
    import os
    import shutil

    from ..hf.distill import self_distill
    from ..hf.trainer import train_heads

    key = dict(kind="tiny_medusa", recipe=_MEDUSA_RECIPE, arch=arch, num_heads=num_heads, steps=steps,
               num_prompts=num_prompts, distill_tokens=distill_tokens, seed=seed,
               **{k: str(v) for k, v in sorted(model_kw.items())})
    root = Path(out_dir) / f"{arch}-{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]}"
    model_dir, heads_dir = root / "model", root / "heads"
    if _marker_matches(root, key):
        return model_dir, heads_dir
    # Build in a private directory and rename it into place, so concurrent builders never see half-written files.
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_model(tmp / "model", arch=arch, seed=seed, **model_kw)
    model, tok = load_tiny_model(tmp / "model")
    sequences = self_distill(model, tiny_prompts(tok, num_prompts, seed=seed), distill_tokens)
    with torch.random.fork_rng(devices=[]):
        heads = train_heads(model, sequences, num_heads=num_heads, steps=steps, seq_len=32, batch_size=16,
                            lr=1e-2, seed=seed, device="cpu", progress=False)
    heads.save_pretrained(tmp / "heads")
    _write_marker(tmp, key)
    if not _marker_matches(root, key):
        shutil.rmtree(root, ignore_errors=True)  # a stale or partial build
        try:
            os.replace(tmp, root)
        except OSError:
            if not _marker_matches(root, key):  # not merely another process finishing first
                raise
    shutil.rmtree(tmp, ignore_errors=True)
    return model_dir, heads_dir
