"""Malformed, partial and foreign head checkpoints: each gives ONE line naming the file, the key (if any), the cause and
the fix, through the Python API (MedusaHeadsError) and through `medusa-plugin convert` / `validate --check-files`
(exit 1, one line on stderr, no traceback)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medusa_plugin import cli
from medusa_plugin.core.heads import MedusaHeads, MedusaHeadsError

H, V, K = 8, 16, 2
FIX = ("re-download", "re-save", "re-export", "fix it", "point 'heads'", "dequantize")


def fd_state(K=K, L=1):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for h in range(K):
        for l in range(L):
            sd[f"{h}.{l}.linear.weight"] = torch.randn(H, H, generator=g)
            sd[f"{h}.{l}.linear.bias"] = torch.randn(H, generator=g)
        sd[f"{h}.{L}.weight"] = torch.randn(V, H, generator=g)
    return sd


def _st(d: Path, sd, name="medusa_lm_head.safetensors") -> Path:
    save_file(sd, d / name)
    return d / name


def _pt(d: Path, obj, name="medusa_lm_head.pt") -> Path:
    torch.save(obj, d / name)
    return d / name


def _raw(data: bytes, name: str):
    def build(d):
        (d / name).write_bytes(data)
        return d / name
    return build


def _without(key):
    def build(d):
        sd = fd_state()
        del sd[key]
        return _st(d, sd)
    return build


def _replaced(key, value, writer=_st):
    def build(d):
        sd = fd_state()
        sd[key] = value
        return writer(d, sd)
    return build


def _truncated(writer):
    def build(d):
        path = writer(d, fd_state())
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path
    return build


def _config(text):
    def build(d):
        _st(d, fd_state())
        (d / "config.json").write_text(text)
        return d / "config.json"
    return build


def _foreign(d):
    g = torch.Generator().manual_seed(1)
    return _st(d, {"model.embed_tokens.weight": torch.randn(V, H, generator=g), "model.norm.weight": torch.ones(H),
                   "lm_head.weight": torch.randn(V, H, generator=g)}, name="model.safetensors")


def _index(weight_map):
    def build(d):
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return d / "model.safetensors.index.json"
    return build


def _vllm_partial_bias(d):
    g = torch.Generator().manual_seed(2)
    sd = {f"blocks.{h}.layers.0.weight": torch.randn(H, H, generator=g) for h in range(K)}
    sd["blocks.0.layers.0.bias"] = torch.zeros(H)
    sd.update({f"lm_heads.{h}.weight": torch.randn(V, H, generator=g) for h in range(K)})
    return _st(d, sd, name="model.safetensors")


# name -> (builder(dir) -> the file the message must name, fragments the message must contain)
CASES = {
    "pickled_module_list": (lambda d: _pt(d, torch.nn.ModuleList([torch.nn.Linear(H, H)])),
                            ["pickled torch.nn.modules.container.ModuleList", "state_dict()"]),
    "pickled_medusa_heads": (lambda d: _pt(d, MedusaHeads(H, K, 1, V)),
                             ["pickled medusa_plugin.core.heads.MedusaHeads", "state_dict()"]),
    "truncated_safetensors": (_truncated(_st), ["not a valid safetensors file", "truncated"]),
    "truncated_pt": (_truncated(_pt), ["not a readable PyTorch checkpoint", "truncated"]),
    "empty_safetensors": (_raw(b"", "medusa_lm_head.safetensors"), ["not a valid safetensors file"]),
    "empty_pt": (_raw(b"", "medusa_lm_head.pt"), ["is empty (0 bytes)"]),
    "text_as_pt": (_raw(b"not a checkpoint", "medusa_lm_head.pt"), ["not a readable PyTorch checkpoint"]),
    "missing_bias": (_without("1.0.linear.bias"), ["key '1.0.linear.bias' is missing", "incomplete"]),
    "missing_weight": (_without("0.0.linear.weight"), ["key '0.0.linear.weight' is missing", "incomplete"]),
    "missing_projection": (_without("1.1.weight"), ["key '1.1.weight' is missing", "vocab projection"]),
    "old_vllm_partial_biases": (_vllm_partial_bias, ["key 'blocks.1.layers.0.bias' is missing"]),
    "wrong_block_shape": (_replaced("1.0.linear.weight", torch.zeros(H, H + 1)),
                          ["'1.0.linear.weight' has shape (8, 9), expected (8, 8)"]),
    "wrong_projection_shape": (_replaced("0.1.weight", torch.zeros(V, H - 1)),
                               ["projection '0.1.weight' has shape (16, 7)"]),
    "non_tensor_value": (_replaced("1.0.linear.bias", [0.0] * H, writer=_pt),
                         ["key '1.0.linear.bias' holds a list, not a tensor"]),
    "training_checkpoint": (lambda d: _pt(d, {"state_dict": fd_state(), "epoch": 3}),
                            ["key 'state_dict' holds a nested dict", "checkpoint['state_dict']"]),
    "integer_weights": (_replaced("0.1.weight", torch.ones(V, H, dtype=torch.int8)), ["'0.1.weight'", "int8"]),
    "nan_weights": (_replaced("1.0.linear.bias", torch.full((H,), float("nan"))), ["'1.0.linear.bias'", "NaN"]),
    "config_not_json": (_config("{heads: 5,"), ["is not valid JSON (line 1, column 2"]),
    "config_json_list": (_config("[1, 2]"), ["holds a JSON list"]),
    "foreign_model_weights": (_foreign, ["unknown Medusa head layout", "'lm_head.weight'", "not Medusa heads"]),
    "index_bad_entry": (_index({"medusa_head.0.0.linear.weight": 5}),
                        ["'weight_map' entry 'medusa_head.0.0.linear.weight' is 5"]),
    "index_missing_shard": (_index({"medusa_head.0.0.linear.weight": "model-00002-of-00002.safetensors"}),
                            ["shard 'model-00002-of-00002.safetensors'", "'medusa_head.0.0.linear.weight'"]),
    "token_map_not_ids": (lambda d: _st(d, {"blocks.0.layers.0.weight": torch.zeros(H, H),
                                            "lm_heads.0.weight": torch.zeros(4, H), "token_map": torch.zeros(4)},
                                        name="model.safetensors"), ["'token_map' must be a 1-D integer tensor"]),
}


@pytest.fixture(params=sorted(CASES))
def bad_checkpoint(request, tmp_path):
    build, fragments = CASES[request.param]
    d = tmp_path / "heads"
    d.mkdir()
    named = build(d)
    return d, named, fragments


def _check_one_line(message: str, named: Path, fragments: list[str]) -> None:
    assert "\n" not in message and "\x1b" not in message and "Traceback" not in message, message
    assert str(named) in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert any(fix in message for fix in FIX), f"no fix in: {message}"


def test_python_api_gives_one_line(bad_checkpoint):
    d, named, fragments = bad_checkpoint
    with pytest.raises(MedusaHeadsError) as e:
        MedusaHeads.from_pretrained(d)
    _check_one_line(str(e.value), named, fragments)


def test_convert_gives_one_line(bad_checkpoint, tmp_path, capsys):
    d, named, fragments = bad_checkpoint
    rc = cli.main(["convert", str(d), str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "" and err.startswith("medusa-plugin convert: error: ") and err.count("\n") == 1
    _check_one_line(err.rstrip("\n"), named, fragments)
    assert not (tmp_path / "out").exists()


def test_validate_check_files_gives_one_line(bad_checkpoint, tmp_path, capsys):
    d, named, fragments = bad_checkpoint
    cfg = tmp_path / "medusa.yaml"
    cfg.write_text(f"heads: {d}\ntree: chain:2\n")
    assert cli.main(["validate", str(cfg)]) == 0  # without --check-files the heads are not read
    capsys.readouterr()
    rc = cli.main(["validate", "--check-files", str(cfg)])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "" and err.startswith("medusa-plugin validate: error: invalid 'heads': ")
    assert err.count("\n") == 1
    _check_one_line(err.rstrip("\n"), named, fragments)


def test_a_single_named_file_is_named_too(tmp_path):
    path = _pt(tmp_path, torch.nn.ModuleList([torch.nn.Linear(H, H)]), name="heads.pt")
    with pytest.raises(MedusaHeadsError, match=r"heads\.pt holds a pickled torch\.nn\.modules\.container\.ModuleList"):
        MedusaHeads.from_pretrained(path)
