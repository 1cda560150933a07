"""MedusaHeads: every checkpoint layout is written here with raw key names, loaded, and compared to a direct
computation from the raw tensors."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from medusa_plugin.core.head_checkpoints import convert, detect_format
from medusa_plugin.core.heads import MedusaHeads, MedusaHeadsError

H, V = 24, 64


def raw_heads(K=5, L=1, H=H, V=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    return {"W": [[rnd(H, H) for _ in range(L)] for _ in range(K)], "b": [[rnd(H) for _ in range(L)] for _ in range(K)],
            "P": [rnd(V, H) for _ in range(K)]}


def reference(x, raw, proj=None, bias=True, token_map=None, full_vocab=None):
    """logits [..., K, V] straight from the raw tensors; proj overrides the per-head projections (list or tensor)."""
    out = []
    for k, layers in enumerate(raw["W"]):
        h = x
        for l, W in enumerate(layers):
            h = h + F.silu(h @ W.T + (raw["b"][k][l] if bias else 0))
        P = raw["P"][k] if proj is None else (proj[k] if isinstance(proj, list) else proj)
        logits = h @ P.T
        if token_map is not None:
            full = torch.full((*logits.shape[:-1], full_vocab), float("-inf"))
            full[..., token_map] = logits
            logits = full
        out.append(logits)
    return torch.stack(out, dim=-2)


def write_json(path, obj):
    path.write_text(json.dumps(obj))


def fd_state(raw, prefix="", v2=False):
    sd = {}
    for h, layers in enumerate(raw["W"]):
        for l, W in enumerate(layers):
            sd[f"{prefix}{h}.{l}.linear.weight"] = W
            sd[f"{prefix}{h}.{l}.linear.bias"] = raw["b"][h][l]
        if not v2:
            sd[f"{prefix}{h}.{len(layers)}.weight"] = raw["P"][h]
    return sd


def vllm_state(raw, bias=True, prefix="", lm_heads=True):
    sd = {}
    for h, layers in enumerate(raw["W"]):
        for l, W in enumerate(layers):
            sd[f"{prefix}blocks.{h}.layers.{l}.weight"] = W
            if bias:
                sd[f"{prefix}blocks.{h}.layers.{l}.bias"] = raw["b"][h][l]
        if lm_heads:
            sd[f"{prefix}lm_heads.{h}.weight"] = raw["P"][h]
    return sd


def base_weights(g=torch.Generator().manual_seed(7)):
    return {"model.embed_tokens.weight": torch.randn(V, H, generator=g), "model.norm.weight": torch.ones(H),
            "model.layers.0.mlp.up_proj.weight": torch.randn(2 * H, H, generator=g),
            "lm_head.weight": torch.randn(V, H, generator=g)}


X = torch.randn(3, 2, H, generator=torch.Generator().manual_seed(1))


def check(heads, raw, **kw):
    out = heads(X, kw.pop("lm_head", None))
    assert out.shape == (3, 2, len(raw["W"]), kw.get("full_vocab") or V)
    torch.testing.assert_close(out, reference(X, raw, **kw))


# ---------------------------------------------------------------------- formats
@pytest.mark.parametrize("ext", ["pt", "safetensors"])
def test_fastdecoding_v1_counts_from_weights_not_config(tmp_path, ext):
    raw = raw_heads(K=5, L=1)
    sd = fd_state(raw)
    torch.save(sd, tmp_path / "medusa_lm_head.pt") if ext == "pt" else save_file(sd, tmp_path / "medusa_lm_head.safetensors")
    write_json(tmp_path / "config.json", {"medusa_num_heads": 2, "medusa_num_layers": 1,
                                          "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"})
    heads = MedusaHeads.from_pretrained(tmp_path, base_hidden_size=H, base_vocab_size=V)
    assert (heads.num_heads, heads.num_layers, heads.hidden_size, heads.vocab_size) == (5, 1, H, V)
    assert heads.own_lm_head and heads.base_model_name_or_path == "lmsys/vicuna-7b-v1.3"
    assert heads.source_format == detect_format(tmp_path) == "fastdecoding"
    check(heads, raw)
    assert heads.hidden_states(X).shape == (3, 2, 5, H)
    # a single weights file works too
    check(MedusaHeads.from_pretrained(tmp_path / f"medusa_lm_head.{ext}"), raw)


def test_fastdecoding_two_layers(tmp_path):
    raw = raw_heads(K=3, L=2)
    save_file(fd_state(raw), tmp_path / "medusa_lm_head.safetensors")
    heads = MedusaHeads.from_pretrained(tmp_path)
    assert (heads.num_heads, heads.num_layers) == (3, 2)
    check(heads, raw)


def test_v2_uses_base_lm_head(tmp_path):
    raw = raw_heads(K=4)
    save_file(fd_state(raw, v2=True), tmp_path / "medusa_lm_head.safetensors")
    write_json(tmp_path / "config.json", {"medusa_num_heads": 4, "version": "2"})
    heads = MedusaHeads.from_pretrained(tmp_path, base_vocab_size=V)
    assert not heads.own_lm_head and heads.lm_heads is None and heads.num_heads == 4
    base = torch.nn.Linear(H, V, bias=False)
    check(heads, raw, lm_head=base.weight.detach(), proj=base.weight.detach())
    with torch.no_grad():
        check(heads, raw, lm_head=base, proj=base.weight)
    with pytest.raises(MedusaHeadsError, match="lm_head"):
        heads(X)


@pytest.mark.parametrize("container", ["safetensors", "bin"])
def test_medusa2_full_model(tmp_path, container):
    raw = raw_heads(K=4)
    sd = {**base_weights(), **fd_state(raw, prefix="medusa_head.")}
    if container == "bin":
        torch.save(sd, tmp_path / "pytorch_model.bin")
    else:
        save_file(sd, tmp_path / "model.safetensors")
    write_json(tmp_path / "config.json", {"model_type": "llama", "hidden_size": H, "vocab_size": V,
                                          "medusa_num_heads": 4, "medusa_num_layers": 1})
    heads = MedusaHeads.from_pretrained(tmp_path, base_hidden_size=H, base_vocab_size=V)
    assert heads.num_heads == 4 and heads.own_lm_head and detect_format(tmp_path) == "medusa2"
    assert {k.split(".")[0] for k in heads.state_dict()} == {"blocks", "lm_heads"}
    check(heads, raw)


def test_medusa2_sharded_reads_only_head_shards(tmp_path):
    raw = raw_heads(K=3)
    heads_sd = fd_state(raw, prefix="medusa_head.")
    half = sorted(heads_sd)[: len(heads_sd) // 2]
    shards = {"model-00001-of-00003.safetensors": base_weights(),
              "model-00002-of-00003.safetensors": {k: heads_sd[k] for k in half},
              "model-00003-of-00003.safetensors": {k: v for k, v in heads_sd.items() if k not in half}}
    for name, sd in shards.items():
        save_file(sd, tmp_path / name)
    index = {"metadata": {}, "weight_map": {k: n for n, sd in shards.items() for k in sd}}
    write_json(tmp_path / "model.safetensors.index.json", index)
    # The base shard is never opened: corrupt it to prove it.
    (tmp_path / "model-00001-of-00003.safetensors").write_bytes(b"not a safetensors file")
    check(MedusaHeads.from_pretrained(tmp_path), raw)
    assert detect_format(tmp_path / "model.safetensors.index.json") == "medusa2"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("prefix", ["", "medusa_heads."])
def test_old_vllm(tmp_path, bias, prefix):
    raw = raw_heads(K=5)
    save_file(vllm_state(raw, bias=bias, prefix=prefix), tmp_path / "model.safetensors")
    write_json(tmp_path / "config.json", {"architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": H,
                                          "num_heads": 5, "num_hidden_layers": 1, "vocab_size": V,
                                          "truncated_vocab_size": None, "medusa_fc_bias": bias})
    heads = MedusaHeads.from_pretrained(tmp_path, base_hidden_size=H, base_vocab_size=V)
    check(heads, raw, bias=bias)
    assert heads.source_format == detect_format(tmp_path) == "vllm"
    if not bias:
        assert all(blk[0].linear.bias.abs().sum() == 0 for blk in heads.blocks)


@pytest.mark.parametrize("key", ["lm_heads.0.weight", "lm_head.weight"])
def test_old_vllm_original_lm_head(tmp_path, key):
    raw = raw_heads(K=3)
    sd = vllm_state(raw, lm_heads=False)
    sd[key] = raw["P"][0]
    save_file(sd, tmp_path / "model.safetensors")
    write_json(tmp_path / "config.json", {"model_type": "medusa", "original_lm_head": True, "vocab_size": V})
    heads = MedusaHeads.from_pretrained(tmp_path)
    assert heads.shared_lm_head and heads.lm_heads[0] is heads.lm_heads[2]
    check(heads, raw, proj=raw["P"][0])


@pytest.mark.parametrize("rows", ["truncated", "full"])
def test_old_vllm_token_map(tmp_path, rows):
    raw, T = raw_heads(K=3), 20
    token_map = torch.randperm(V, generator=torch.Generator().manual_seed(3))[:T]
    sd = vllm_state(raw)
    if rows == "truncated":
        for h in range(3):
            sd[f"lm_heads.{h}.weight"] = raw["P"][h][token_map]
    sd["token_map"] = token_map
    save_file(sd, tmp_path / "model.safetensors")
    write_json(tmp_path / "config.json", {"model_type": "medusa", "vocab_size": V, "truncated_vocab_size": T})
    heads = MedusaHeads.from_pretrained(tmp_path, base_vocab_size=V)
    assert heads.vocab_size == V and heads.lm_heads[0].weight.shape == (T, H)
    check(heads, raw, proj=[p[token_map] for p in raw["P"]], token_map=token_map, full_vocab=V)
    out = heads(X)
    mask = torch.zeros(V, dtype=torch.bool)
    mask[token_map] = True
    assert torch.isinf(out[..., ~mask]).all() and torch.isfinite(out[..., mask]).all()


# ---------------------------------------------------------------------- vocabulary padding
@pytest.mark.parametrize("heads_vocab,base_vocab", [(256, 320), (320, 256), (V, V + 1)],
                         ids=["heads_tokenizer_sized", "heads_padded_base_not", "one_added_token"])
def test_vocab_differing_by_padding_loads(tmp_path, heads_vocab, base_vocab):
    """A base vocab padded for the matmul (320 for a 256-token tokenizer) and heads sized to either one: the heads'
    logits are the base vocab wide, -inf for ids the heads lack, rows for ids the base lacks are dropped."""
    raw = raw_heads(K=3, V=heads_vocab)
    save_file(fd_state(raw), tmp_path / "medusa_lm_head.safetensors")
    heads = MedusaHeads.from_pretrained(tmp_path, base_hidden_size=H, base_vocab_size=base_vocab)
    assert heads.vocab_size == base_vocab
    out, want = heads(X), reference(X, raw)
    common = min(heads_vocab, base_vocab)
    assert out.shape == (3, 2, 3, base_vocab)
    torch.testing.assert_close(out[..., :common], want[..., :common])
    assert torch.isneginf(out[..., common:]).all()
    heads.save_pretrained(tmp_path / "canonical")  # the padded heads round-trip as they are
    back = MedusaHeads.from_pretrained(tmp_path / "canonical", base_vocab_size=base_vocab)
    torch.testing.assert_close(back(X), out, rtol=0, atol=0)


def test_token_map_heads_on_a_padded_base_vocab(tmp_path):
    raw, T = raw_heads(K=3), 20
    token_map = torch.randperm(V, generator=torch.Generator().manual_seed(3))[:T]
    sd = vllm_state(raw)
    for h in range(3):
        sd[f"lm_heads.{h}.weight"] = raw["P"][h][token_map]
    sd["token_map"] = token_map
    save_file(sd, tmp_path / "model.safetensors")
    write_json(tmp_path / "config.json", {"model_type": "medusa", "vocab_size": V, "truncated_vocab_size": T})
    heads = MedusaHeads.from_pretrained(tmp_path, base_vocab_size=V + 64)
    assert heads.vocab_size == V + 64
    want = reference(X, raw, proj=[p[token_map] for p in raw["P"]], token_map=token_map, full_vocab=V + 64)
    torch.testing.assert_close(heads(X), want)
    with pytest.raises(MedusaHeadsError, match=r"map draft tokens to ids outside \[0, 48\).*another model"):
        MedusaHeads.from_pretrained(tmp_path, base_vocab_size=48)  # ids up to 63 do not exist in a 48-token vocab


@pytest.mark.parametrize("heads_vocab,base_vocab", [(32000, 128256), (V, V + 1025)])
def test_vocab_differing_by_more_than_padding_is_refused(tmp_path, heads_vocab, base_vocab):
    g = torch.Generator().manual_seed(0)
    sd = {"0.0.linear.weight": torch.zeros(4, 4), "0.0.linear.bias": torch.zeros(4),
          "0.1.weight": torch.randn(heads_vocab, 4, generator=g)}
    save_file(sd, tmp_path / "medusa_lm_head.safetensors")
    write_json(tmp_path / "config.json", {"base_model_name_or_path": "lmsys/vicuna-7b-v1.3"})
    with pytest.raises(MedusaHeadsError) as e:
        MedusaHeads.from_pretrained(tmp_path, base_vocab_size=base_vocab)
    msg = str(e.value)
    assert f"trained for vocab size {heads_vocab} but the base model has {base_vocab}" in msg
    assert "more than vocabulary padding explains" in msg and "another model" in msg and "vicuna" in msg


def test_init_from_lm_head_matches_base():
    lm = torch.randn(V, H)
    heads = MedusaHeads.init_from_lm_head(lm, num_heads=4, num_layers=2)
    assert all(torch.count_nonzero(p) == 0 for n, p in heads.named_parameters() if n.startswith("blocks"))
    torch.testing.assert_close(heads(X), (X @ lm.T).unsqueeze(-2).expand(3, 2, 4, V))
    heads.lm_heads[0].weight.data.add_(1)  # heads own independent copies
    assert not torch.equal(heads.lm_heads[1].weight, heads.lm_heads[0].weight)
    v2 = MedusaHeads.init_from_lm_head(lm, num_heads=2, own_lm_head=False)
    torch.testing.assert_close(v2(X, lm), (X @ lm.T).unsqueeze(-2).expand(3, 2, 2, V))


# ---------------------------------------------------------------------- canonical round trip
def _same(a: MedusaHeads, b: MedusaHeads):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert (a.num_heads, a.num_layers, a.hidden_size, a.vocab_size, a.own_lm_head, a.shared_lm_head) == \
           (b.num_heads, b.num_layers, b.hidden_size, b.vocab_size, b.own_lm_head, b.shared_lm_head)


@pytest.mark.parametrize("variant", ["v1_bf16", "v2", "shared_token_map"])
def test_round_trip_bit_exact(tmp_path, variant):
    raw = raw_heads(K=3, L=2)
    if variant == "v1_bf16":
        save_file(fd_state(raw), tmp_path / "medusa_lm_head.safetensors")
        src = MedusaHeads.from_pretrained(tmp_path, dtype="bfloat16")
        assert src.dtype == torch.bfloat16
    elif variant == "v2":
        save_file(fd_state(raw, v2=True), tmp_path / "medusa_lm_head.safetensors")
        src = MedusaHeads.from_pretrained(tmp_path, base_vocab_size=V)
    else:
        sd = vllm_state(raw, lm_heads=False)
        sd["lm_head.weight"], sd["token_map"] = raw["P"][0][:10], torch.arange(0, 50, 5)
        save_file(sd, tmp_path / "model.safetensors")
        write_json(tmp_path / "config.json", {"model_type": "medusa", "vocab_size": V, "original_lm_head": True})
        src = MedusaHeads.from_pretrained(tmp_path)
    src.base_model_name_or_path = "org/base"
    src.save_pretrained(tmp_path / "a")
    back = MedusaHeads.from_pretrained(tmp_path / "a")
    _same(src, back)
    assert back.source_format == detect_format(tmp_path / "a") == "canonical"
    assert back.base_model_name_or_path == "org/base"
    assert json.loads((tmp_path / "a" / "config.json").read_text())["medusa_plugin_format"] == 1
    back.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    lm = raw["P"][1]
    torch.testing.assert_close(back(X, lm), src(X, lm), rtol=0, atol=0)


def test_convert(tmp_path):
    raw = raw_heads(K=4)
    torch.save(fd_state(raw), tmp_path / "medusa_lm_head.pt")
    out = convert(tmp_path / "medusa_lm_head.pt", tmp_path / "out")
    assert (out / "model.safetensors").is_file()
    check(MedusaHeads.from_pretrained(out), raw)


# ---------------------------------------------------------------------- hub resolution (simulated, no network)
def test_hub_id_fetches_only_needed_files(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    raw = raw_heads(K=3)
    repo_dir = tmp_path / "repo"
    repo_dir.mkdir()
    save_file(base_weights(), repo_dir / "model-00001-of-00002.safetensors")
    save_file(fd_state(raw, prefix="medusa_head."), repo_dir / "model-00002-of-00002.safetensors")
    wm = {k: "model-00001-of-00002.safetensors" for k in base_weights()}
    wm.update({k: "model-00002-of-00002.safetensors" for k in fd_state(raw, prefix="medusa_head.")})
    write_json(repo_dir / "model.safetensors.index.json", {"weight_map": wm})
    asked = []

    def fake_download(repo_id, filename, revision=None, **kw):
        asked.append((repo_id, filename, revision))
        if repo_id != "org/medusa-2":
            raise OSError("Repository Not Found")
        if not (repo_dir / filename).is_file():
            raise EntryNotFoundError(f"{filename} not found")
        return str(repo_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    check(MedusaHeads.from_pretrained("org/medusa-2", revision="main"), raw)
    fetched = [f for _, f, _ in asked]
    assert "model-00002-of-00002.safetensors" in fetched and "model-00001-of-00002.safetensors" not in fetched
    assert all(r == "main" for _, _, r in asked)
    with pytest.raises(MedusaHeadsError, match="could not find Medusa heads 'org/missing' locally or on the hub"):
        MedusaHeads.from_pretrained("org/missing")


# ---------------------------------------------------------------------- errors
def test_error_path_missing(tmp_path):
    with pytest.raises(MedusaHeadsError, match="does not exist"):
        MedusaHeads.from_pretrained(tmp_path / "nope" / "heads")


def test_error_dir_without_weights_lists_files(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    (tmp_path / "adapter.gguf").write_bytes(b"x")
    with pytest.raises(MedusaHeadsError, match=r"README.md.*medusa_lm_head.pt"):
        MedusaHeads.from_pretrained(tmp_path)


def test_error_unknown_layout_shows_keys(tmp_path):
    save_file({"encoder.weird.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(MedusaHeadsError, match="unknown Medusa head layout.*encoder.weird.weight"):
        MedusaHeads.from_pretrained(tmp_path)


def test_error_head_missing_layer(tmp_path):
    sd = fd_state(raw_heads(K=5, L=2))
    del sd["3.1.linear.weight"], sd["3.1.linear.bias"]
    save_file(sd, tmp_path / "medusa_lm_head.safetensors")
    with pytest.raises(MedusaHeadsError, match=r"key '3\.1\.linear\.weight' is missing \(head 3 of 5, layer 1 of 2\)"):
        MedusaHeads.from_pretrained(tmp_path)


def test_error_head_bad_shape(tmp_path):
    sd = fd_state(raw_heads(K=3))
    sd["2.0.linear.weight"] = torch.zeros(H, H + 1)
    save_file(sd, tmp_path / "medusa_lm_head.safetensors")
    with pytest.raises(MedusaHeadsError, match=r"'2.0.linear.weight' has shape"):
        MedusaHeads.from_pretrained(tmp_path)


def test_error_wrong_base_model(tmp_path):
    save_file(fd_state(raw_heads(K=3)), tmp_path / "medusa_lm_head.safetensors")
    write_json(tmp_path / "config.json", {"base_model_name_or_path": "lmsys/vicuna-7b-v1.3"})
    with pytest.raises(MedusaHeadsError, match=f"hidden size {H} but the base model has 4096.*another model.*vicuna"):
        MedusaHeads.from_pretrained(tmp_path, base_hidden_size=4096)
    with pytest.raises(MedusaHeadsError, match=f"vocab size {V} but the base model has 32000"):
        MedusaHeads.from_pretrained(tmp_path, base_vocab_size=32000)


def test_error_nan_names_tensor(tmp_path):
    sd = fd_state(raw_heads(K=3))
    sd["1.0.linear.bias"][4] = float("nan")
    save_file(sd, tmp_path / "medusa_lm_head.safetensors")
    with pytest.raises(MedusaHeadsError, match=r"'1.0.linear.bias'.*NaN"):
        MedusaHeads.from_pretrained(tmp_path)


def test_error_dtypes(tmp_path):
    sd = fd_state(raw_heads(K=3))
    save_file(sd, tmp_path / "medusa_lm_head.safetensors")
    for bad in ("float8", torch.float8_e4m3fn, torch.int8):
        with pytest.raises(MedusaHeadsError, match="cannot be used"):
            MedusaHeads.from_pretrained(tmp_path, dtype=bad)
    sd["0.1.weight"] = (sd["0.1.weight"] * 10).to(torch.int8)
    (tmp_path / "q").mkdir()
    save_file(sd, tmp_path / "q" / "medusa_lm_head.safetensors")
    with pytest.raises(MedusaHeadsError, match=r"'0.1.weight'.*torch.int8.*dequantize"):
        MedusaHeads.from_pretrained(tmp_path / "q")


def test_error_forward_bad_hidden_size():
    heads = MedusaHeads.init_from_lm_head(torch.randn(V, H), num_heads=2)
    with pytest.raises(MedusaHeadsError, match=f"size {H + 1}.*expect {H}"):
        heads(torch.randn(2, H + 1))


def test_native_half_matmul_reads_the_cpu_probes(monkeypatch):
    from medusa_plugin.core.heads import native_half_matmul

    assert native_half_matmul(torch.float32, "cpu")
    assert native_half_matmul(torch.bfloat16, "cuda")  # only the device's type is read
    for native in (False, True):
        for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported", "_is_amx_fp16_supported"):
            monkeypatch.setattr(torch.cpu, name, lambda native=native: native, raising=False)
        assert native_half_matmul(torch.bfloat16, "cpu") == native
        assert native_half_matmul(torch.float16, "cpu") == native
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert native_half_matmul(torch.bfloat16, "cpu")  # cannot tell: assume native (keep the model's dtype)
