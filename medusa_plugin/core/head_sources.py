"""Where Medusa head files come from: a local directory, a single weights file, or a Hugging Face hub repo.

:func:`open_source` turns what the user wrote (``heads:`` in a config, ``medusa-plugin convert SRC``) into a
:class:`Source` that hands out sibling files by name; :mod:`.head_checkpoints` decides which files to ask for.
Hub files are fetched one at a time with ``huggingface_hub.hf_hub_download`` (its cache, ``HF_HUB_OFFLINE`` and
``HF_TOKEN`` are honoured), so a Medusa-2 repo's base-model shards are never downloaded.

Errors are :class:`~.heads.MedusaHeadsError`, one line each.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .heads import MedusaHeadsError

__all__ = ["Source", "open_source", "one_line", "WEIGHT_FILES"]

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
