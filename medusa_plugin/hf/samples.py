"""Training data from files: JSONL records (text, prompt/response, ShareGPT/messages chats), text files, directories.

Chat records are rendered with the tokenizer's chat template; each sample is ``(prompt_ids or None, all_ids)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import TrainError


_USER_ROLES = {"human": "user", "user": "user", "system": "system"}


def _turns(conversation: list, where: str) -> list[dict]:
    msgs = []
    for turn in conversation:
        if not isinstance(turn, dict):
            raise TrainError(f"{where}: each conversation turn must be an object with 'from'/'role' and "
                             f"'value'/'content', got {turn!r:.80}")
        role = str(turn.get("role", turn.get("from", ""))).lower()
        content = turn.get("content", turn.get("value"))
        if content is None:
            raise TrainError(f"{where}: conversation turn without 'value'/'content': {turn!r:.80}")
        msgs.append({"role": _USER_ROLES.get(role, "assistant"), "content": str(content)})
    return msgs


def _tokenize_chat(tokenizer, msgs: list[dict]) -> tuple[list[int], list[int]]:
    """(prompt ids = messages up to the first user turn + generation prompt, ids of the whole conversation)."""
    first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), 0)
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        prompt = tokenizer.apply_chat_template(msgs[:first_user + 1], tokenize=False, add_generation_prompt=True)
        return (tokenizer(prompt, add_special_tokens=False)["input_ids"],
                tokenizer(full, add_special_tokens=False)["input_ids"])
    text = lambda ms: "".join(f"{m['role'].upper()}: {m['content']}\n" for m in ms)  # noqa: E731
    prompt_ids = tokenizer(text(msgs[:first_user + 1]) + "ASSISTANT:")["input_ids"]
    return prompt_ids, tokenizer(text(msgs))["input_ids"]


def record_sample(rec, tokenizer, where: str) -> tuple[list[int] | None, list[int]]:
    """One JSON record -> ``(prompt_ids or None, all_ids)`` (formats: see :func:`load_samples`)."""
    if isinstance(rec, str):
        return None, tokenizer(rec)["input_ids"]
    if not isinstance(rec, dict):
        raise TrainError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "conversations" in rec or "messages" in rec:
        return _tokenize_chat(tokenizer, _turns(rec.get("conversations", rec.get("messages")), where))
    if "prompt" in rec:
        prompt = tokenizer(str(rec["prompt"]))["input_ids"]
        resp = rec.get("response", rec.get("completion", rec.get("output", "")))
        return prompt, prompt + tokenizer(str(resp), add_special_tokens=False)["input_ids"]
    if "text" in rec:
        return None, tokenizer(str(rec["text"]))["input_ids"]
    raise TrainError(f"{where}: no known field; each line needs 'text', 'prompt' (+ 'response'), or "
                     f"'conversations' (found: {', '.join(sorted(rec)) or 'none'})")


def read_jsonl(path: Path, tokenizer) -> list[tuple[list[int] | None, list[int]]]:
    """Samples from a JSONL file, one record per non-empty line (errors name ``file:line``)."""
    samples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainError(f"{path}:{n}: not valid JSON ({e.msg}); JSONL needs one JSON object per line") from None
        samples.append(record_sample(rec, tokenizer, f"{path}:{n}"))
    return samples


def load_samples(path: str | os.PathLike, tokenizer) -> list[tuple[list[int] | None, list[int]]]:
    """Tokenised samples ``(prompt_ids or None, all_ids)`` from ``--data``.

    * ``.jsonl`` / ``.json`` (one object per line): ``{"text"}``, ``{"prompt", "response"}`` (also "completion" /
      "output") or ShareGPT ``{"conversations": [{"from", "value"}, ...]}`` / ``{"messages": [{"role", "content"}]}``
      (rendered with the tokenizer's chat template when it has one; the prompt is everything up to the first user
      turn plus the generation prompt).
    * any other file: plain text, one sample per file.
    * a directory: every non-hidden file under it (recursively, sorted), each as above.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file or directory")
    hidden = lambda p: any(part.startswith(".") for part in p.relative_to(path).parts)  # noqa: E731
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not hidden(p))
    samples: list[tuple[list[int] | None, list[int]]] = []
    for f in files:
        if f.suffix in (".jsonl", ".json"):
            samples += read_jsonl(f, tokenizer)
        else:
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                samples.append((None, tokenizer(text)["input_ids"]))
    if not samples:
        raise TrainError(f"--data {path}: no samples found (empty files?)")
    return samples


def distill_prompts(samples: list[tuple[list[int] | None, list[int]]], *, prompt_tokens: int,
                    chunk_tokens: int) -> list[list[int]]:
    """Prompts for self-distillation: a sample's own prompt when it has one; otherwise the first ``prompt_tokens``
    tokens of every ``chunk_tokens``-token chunk of its text."""
    prompts = []
    for prompt, ids in samples:
        if prompt:
            prompts.append(prompt)
        else:
            prompts += [ids[s:s + prompt_tokens] for s in range(0, len(ids), chunk_tokens) if ids[s:s + prompt_tokens]]
    return prompts
