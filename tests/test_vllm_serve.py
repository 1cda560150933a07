"""User-facing paths on CPU in the real engine, with a tiny model: the OpenAI-compatible server started from
examples/deploy.yaml, the offline example (examples/offline_llm.py) and the offline helper (vllm_ext.offline).

Greedy output with Medusa must equal plain decoding token for token, and the spec-decode counters must show that
drafts were verified and accepted. The server boots (~1 min on 2 cores) while the in-process runs go.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
vllm = pytest.importorskip("vllm")

from medusa_plugin.vllm_ext import offline  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
TREE = "mc_sim_7b_63"        # 63 nodes, depth 4: the tiny heads have 4 heads
MAX_TOKENS = 24
SERVER_BOOT_TIMEOUT_S = 300
PROMPT_TEXTS = ["def main(argv=None):\n    ", "import os\nimport sys\n", "class Foo:\n    def __init__(self"]


def _tiny_model_and_heads(root: Path) -> tuple[Path, Path]:
    """A tiny Llama and 4 Medusa heads initialised from its lm_head (upstream's init: they predict what the base
    predicts next, which a random model's repetitive greedy output often continues)."""
    from safetensors.torch import load_file

    from medusa_plugin.core.heads import MedusaHeads
    from medusa_plugin.testing.tiny import build_tiny_model

    model_dir = build_tiny_model(root / "model")
    lm_head = load_file(str(model_dir / "model.safetensors"))["lm_head.weight"]
    MedusaHeads.init_from_lm_head(lm_head, num_heads=4).save_pretrained(root / "heads")
    return model_dir, root / "heads"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_model_and_heads(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def prompt_ids(tiny):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny[0])
    return [tok(t).input_ids for t in PROMPT_TEXTS]


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """examples/deploy.yaml with the tiny paths, served through the CLI module; started at once, waited on later."""
    model_dir, heads_dir = tiny
    conf = yaml.safe_load((REPO / "examples" / "deploy.yaml").read_text())
    port = _free_port()
    conf.update({"model": str(model_dir), "host": "127.0.0.1", "port": port, "max-model-len": 512,
                 "dtype": "float32", "enforce-eager": True})
    conf["additional-config"]["medusa"]["heads"] = str(heads_dir)
    assert conf["additional-config"]["medusa"]["tree"] == TREE
    work = tmp_path_factory.mktemp("serve")
    (work / "deploy.yaml").write_text(yaml.safe_dump(conf))
    log = open(work / "server.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--config",
                             str(work / "deploy.yaml")], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
    srv = {"proc": proc, "url": f"http://127.0.0.1:{port}", "log": work / "server.log",
           "model": conf["served-model-name"], "ready": False}
    yield srv
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
    log.close()


def _get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _ready(srv) -> dict:
    if srv["ready"]:
        return srv
    deadline = time.monotonic() + SERVER_BOOT_TIMEOUT_S
    while time.monotonic() < deadline:
        if srv["proc"].poll() is not None:
            pytest.fail(f"server exited with {srv['proc'].returncode}:\n{srv['log'].read_text()[-4000:]}")
        try:
            _get(srv["url"] + "/health", timeout=2)
            srv["ready"] = True
            return srv
        except OSError:
            time.sleep(1)
    pytest.fail(f"server not healthy after {SERVER_BOOT_TIMEOUT_S} s:\n{srv['log'].read_text()[-4000:]}")


@pytest.fixture(scope="module")
def in_process():
    """Engines of this module's offline runs live in the test process (no engine-core subprocess)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        yield


@pytest.fixture(scope="module")
def baseline(server, tiny, prompt_ids, in_process):
    """Plain greedy decoding (no speculation) of the prompts, as token ids and as texts."""
    from vllm import SamplingParams

    llm = offline.build_llm(tiny[0])
    try:
        ids = offline.run(llm, prompt_ids, MAX_TOKENS).token_ids
        texts = [o.outputs[0].text for o in llm.generate(PROMPT_TEXTS, SamplingParams(max_tokens=MAX_TOKENS,
                                                                                     temperature=0.0))]
    finally:
        offline.shutdown(llm)
    assert all(len(t) == MAX_TOKENS for t in ids)
    return {"ids": ids, "texts": texts}


def test_offline_helper_matches_plain_decoding_and_reports_acceptance(tiny, prompt_ids, baseline, in_process):
    res = offline.generate(tiny[0], prompt_ids, MAX_TOKENS, medusa={"heads": str(tiny[1]), "tree": TREE})
    assert res.token_ids == baseline["ids"]
    m = res.metrics
    assert m["num_drafts"] > 0 and m["num_draft_tokens"] > 0 and m["num_accepted_tokens"] > 0
    assert m["num_accepted_tokens"] == sum(m["accepted_per_pos"])
    assert m["mean_tokens_per_step"] == pytest.approx(1 + m["num_accepted_tokens"] / m["num_drafts"])
    per_pos = m["acceptance_per_position"]
    assert 1 <= len(per_pos) <= 4  # never deeper than the tree
    assert all(1 >= a >= b >= 0 for a, b in zip(per_pos, per_pos[1:] + [0]))


def test_offline_example_matches_plain_decoding(tiny, baseline, in_process, capsys):
    spec = importlib.util.spec_from_file_location("offline_llm_example", REPO / "examples" / "offline_llm.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    argv = [str(tiny[0]), str(tiny[1]), "--tree", TREE, "--max-tokens", str(MAX_TOKENS), "--dtype", "float32",
            "--max-model-len", "512"] + [a for t in PROMPT_TEXTS for a in ("--prompt", t)]
    texts = example.main(argv)
    assert texts == baseline["texts"]
    assert "tokens per step" in capsys.readouterr().out


def test_server_completions_match_plain_decoding(server, prompt_ids, baseline):
    srv = _ready(server)
    body = {"model": srv["model"], "max_tokens": MAX_TOKENS, "temperature": 0.0, "return_token_ids": True}
    batched = _post(srv["url"] + "/v1/completions", {**body, "prompt": prompt_ids})
    got = {c["index"]: c["token_ids"] for c in batched["choices"]}
    assert [got[i] for i in range(len(prompt_ids))] == baseline["ids"]
    single = _post(srv["url"] + "/v1/completions", {**body, "prompt": prompt_ids[0]})
    assert single["choices"][0]["token_ids"] == baseline["ids"][0]


def _prom_total(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_server_ran_medusa(server, prompt_ids):
    srv = _ready(server)
    _post(srv["url"] + "/v1/completions", {"model": srv["model"], "prompt": prompt_ids[1], "max_tokens": MAX_TOKENS,
                                           "temperature": 0.0})
    metrics = _get(srv["url"] + "/metrics")
    drafts = _prom_total(metrics, "vllm:spec_decode_num_drafts_total")
    accepted = _prom_total(metrics, "vllm:spec_decode_num_accepted_tokens_total")
    draft_tokens = _prom_total(metrics, "vllm:spec_decode_num_draft_tokens_total")
    assert drafts > 0 and accepted > 0, "no Medusa draft was verified/accepted by the server"
    assert draft_tokens <= 63 * drafts
    assert "medusa_plugin: Medusa tree decoding on" in srv["log"].read_text()
