"""Medusa head checkpoint files: where they come from, and reading one file (safetensors, torch pickle, JSON).

:func:`open_source` turns what the user wrote (``heads:`` in a config, ``medusa-plugin convert SRC``) into a
:class:`Source` that hands out sibling files by name (a local directory, a single weights file, or a Hugging Face
hub repo); :mod:`.head_checkpoints` decides which files to ask for. Hub files are fetched one at a time with
``huggingface_hub.hf_hub_download`` (its cache, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` are honoured), so a Medusa-2
repo's base-model shards are never downloaded. :class:`TensorFile` lists a weights file's keys and reads only the
tensors asked for; :func:`torch_load` never unpickles code (``weights_only=True``).

Errors are :class:`~.heads.MedusaHeadsError`, one line each naming the file, the key if any, the cause and the fix.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .heads import MedusaHeadsError

__all__ = ["Source", "open_source", "one_line", "read_json", "torch_load", "TensorFile", "WEIGHT_FILES", "RECIPE_FILE",
           "recorded_accuracy"]

# Written next to the heads by ``medusa-plugin train --recipe chat`` (settings, data sizes, held-out accuracy).
RECIPE_FILE = "recipe.json"

# Weight files looked for in a directory or hub repo, in priority order.
WEIGHT_FILES = (
    "medusa_lm_head.safetensors",
    "medusa_lm_head.pt",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RESAVE = "re-save the heads with torch.save(heads.state_dict(), path) or safetensors.torch.save_file"


def one_line(text: object, limit: int = 160) -> str:
    """The first line of a foreign error message, without terminal escape codes; its first sentence if too long."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(text)).splitlines() if ln.strip()]
    first = " ".join(lines[0].split()) if lines else ""
    if len(first) > limit and 0 < first.find(". ") < limit:
        first = first[: first.find(". ") + 1]
    return first if len(first) <= limit else first[: limit - 3] + "..."


@dataclass
class Source:
    """Files of one checkpoint. ``desc`` names it in messages; ``get(name)`` returns a sibling file or None."""

    desc: str
    get: Callable[[str], Path | None]
    weight_file: Path | None = None             # set when the user named a single file
    listing: Callable[[], list[str]] = field(default=lambda: [])


def _looks_like_hub_id(s: str) -> bool:
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", s) is not None and not s.endswith(
        (".pt", ".bin", ".safetensors", ".json")) and ".." not in s)


def open_source(path_or_repo: str | os.PathLike, revision: str | None = None) -> Source:
    """A local directory, a local weights file, or a hub repo id ("org/name"); MedusaHeadsError if none fits."""
    p = Path(os.path.expanduser(str(path_or_repo)))
    if p.is_dir():
        return Source(str(p), lambda n: (p / n) if (p / n).is_file() else None, listing=lambda: sorted(os.listdir(p)))
    if p.is_file():
        return Source(str(p), lambda n: (p.parent / n) if (p.parent / n).is_file() else None, weight_file=p)
    s = str(path_or_repo)
    if not _looks_like_hub_id(s):
        raise MedusaHeadsError(f"Medusa heads path '{s}' does not exist: pass an existing directory, a weights file "
                               f"({', '.join(WEIGHT_FILES)}) or a Hugging Face hub id such as "
                               "'FasterDecoding/medusa-vicuna-7b-v1.3'")
    return _hub_source(s, revision)


def _hub_source(repo: str, revision: str | None) -> Source:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    misses: list[str] = []

    def get(name: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo, name, revision=revision))
        except EntryNotFoundError as e:  # includes "not in the local cache" when offline
            misses.append(f"{name}: {type(e).__name__}")
            return None
        except Exception as e:  # repo/revision not found, auth, network, invalid id
            raise MedusaHeadsError(f"could not find Medusa heads '{repo}' locally or on the hub "
                                   f"({type(e).__name__}: {one_line(e)}): check the repo id and revision, "
                                   "log in with HF_TOKEN for a gated repo, or pass a local directory") from None

    return Source(f"hub repo '{repo}'" + (f" @ {revision}" if revision else ""), get,
                  listing=lambda: [f"(not found: {m})" for m in misses])


# ---------------------------------------------------------------------- reading one file
def recorded_accuracy(heads: str | os.PathLike) -> list[list[float]] | None:
    """The held-out marginal accuracy ``[K][R]`` (``acc[k][r]``: rank ``r`` of head ``k`` is the target's token)
    that ``train --recipe chat`` recorded in ``<heads>/recipe.json``, or None: not a local directory, no such file,
    or no valid ``accuracy`` table in it (a prior only, so a bad file is ignored rather than fatal)."""
    path = Path(heads) / RECIPE_FILE
    try:
        acc = json.loads(path.read_text()).get("accuracy") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    ok = (isinstance(acc, list) and acc and all(isinstance(row, list) and row for row in acc)
          and all(isinstance(a, (int, float)) and 0.0 <= a <= 1.0 for row in acc for a in row))
    return [[float(a) for a in row] for row in acc] if ok else None


def read_json(path: Path) -> dict:
    """A JSON object (config.json, an .index.json); MedusaHeadsError if unreadable, not JSON or not an object."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MedusaHeadsError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): the file is "
                               "damaged or not a config; fix it, or re-download it") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MedusaHeadsError(f"cannot read {path} ({one_line(e)}): check the file, or re-download it") from None
    if not isinstance(data, dict):
        raise MedusaHeadsError(f"{path} holds a JSON {type(data).__name__}, not an object of settings: it is not a "
                               "model config; fix it or remove it")
    return data


def torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A ``torch.save`` state dict (``weights_only=True``, memory-mapped when the file allows); MedusaHeadsError for
    an empty, truncated or corrupt file, a pickled module or object, or values that are not tensors."""
    if path.stat().st_size == 0:
        raise MedusaHeadsError(f"{path} is empty (0 bytes): the download or save was interrupted; re-download or "
                               "re-save it")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) pickle
    except Exception as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if isinstance(e, pickle.UnpicklingError) and found:  # weights_only refuses to rebuild a Python class
            raise MedusaHeadsError(f"{path} holds a pickled {found[1]}, not a state dict of tensors (a torch.save of "
                                   f"the whole module?); loading it would run its code, so it is refused: "
                                   f"{_RESAVE}") from None
        # zip/pickle framing errors: truncated, corrupt or not a torch file at all
        raise MedusaHeadsError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {one_line(e)}): the "
                               "file is truncated or corrupt, or not a torch.save file; re-download it or "
                               f"{_RESAVE}") from None
    if not isinstance(sd, dict):
        raise MedusaHeadsError(f"{path} holds a {type(sd).__name__}, not a state dict (a dict of tensors): {_RESAVE}")
    for key, value in sd.items():
        if isinstance(value, torch.Tensor):
            continue
        if isinstance(value, dict):
            raise MedusaHeadsError(f"{path}: key '{key}' holds a nested dict, not a tensor (a training checkpoint "
                                   f"wrapping the weights?): save checkpoint['{key}'] on its own, or {_RESAVE}")
        raise MedusaHeadsError(f"{path}: key '{key}' holds a {type(value).__name__}, not a tensor: the file is not a "
                               f"plain state dict; {_RESAVE}")
    return sd


class TensorFile:
    """Lazy key listing + selective reads for one .safetensors or torch pickle file."""

    def __init__(self, path: Path):
        self.path = path
        if path.name.endswith(".safetensors"):
            from safetensors import safe_open
            try:
                with safe_open(str(path), framework="pt") as f:
                    self.keys = list(f.keys())
            except Exception as e:
                raise MedusaHeadsError(f"{path} is not a valid safetensors file ({one_line(e)}): it is truncated or "
                                       "corrupt (an interrupted download?), or not safetensors; re-download or "
                                       "re-save it") from None
            self._sd = None
        else:
            self._sd = torch_load(path)
            self.keys = list(self._sd)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        if self._sd is not None:
            return {k: self._sd[k] for k in keys}
        from safetensors import safe_open
        out = {}
        with safe_open(str(self.path), framework="pt") as f:
            for k in keys:
                try:
                    out[k] = f.get_tensor(k)
                except Exception as e:
                    raise MedusaHeadsError(f"{self.path}: cannot read tensor '{k}' ({one_line(e)}): the file is "
                                           "corrupt; re-download or re-save it") from None
        return out
