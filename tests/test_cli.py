"""The `medusa-plugin` command, run in-process through cli.main (plus one console-script check)."""

import argparse
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medusa_plugin import cli
from medusa_plugin.core.config import load_config, validate
from medusa_plugin.core.heads import MedusaHeads
from medusa_plugin.core.tree import MedusaTree, shipped_tree_names

ROOT = Path(__file__).resolve().parent.parent


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_validate_ok(capsys):
    rc, out, err = run(capsys, "validate", str(ROOT / "configs" / "vicuna-7b-v1.3.yaml"))
    assert rc == 0 and err == ""
    tree = MedusaTree.from_name("vicuna_7b_stage2")
    assert "FasterDecoding/medusa-vicuna-7b-v1.3" in out
    assert f"vicuna_7b_stage2: {tree.num_nodes} nodes" in out and f"{tree.num_leaves} leaves" in out
    assert str(tree.nodes_per_depth) in out and "lossless" in out
    assert "int8_drafting:  auto (int8 weight-only copy" in out


def test_validate_explains_int8_drafting_off(tmp_path, capsys):
    p = tmp_path / "m.yaml"
    p.write_text("heads: a/b\nint8_drafting: false\n")
    rc, out, _ = run(capsys, "validate", str(p))
    assert rc == 0 and "int8_drafting:  false (drafting always with the heads' own weights)" in out


@pytest.mark.parametrize("text,fragment", [
    ("heads: a/b\nacceptence: {rule: typical}\n", "did you mean 'acceptance'?"),
    ("heads: a/b\ntree: nope_tree\n", "invalid 'tree' (nope_tree)"),
    ("heads: a/b\ntopk: ten\n", "'topk' must be an integer, got str 'ten'"),
    ("heads: a/b\nint8_drafting: maybe\n", "'int8_drafting' must be auto, true or false"),
])
def test_validate_bad(tmp_path, capsys, text, fragment):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    rc, out, err = run(capsys, "validate", str(p))
    assert rc == 1 and out == ""
    assert err.startswith("medusa-plugin validate: error: ") and fragment in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_validate_missing_file(tmp_path, capsys):
    rc, _, err = run(capsys, "validate", str(tmp_path / "missing.yaml"))
    assert rc == 1 and str(tmp_path / "missing.yaml") in err


def test_validate_check_files(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("heads: ./my_heads\n")
    assert run(capsys, "validate", str(p))[0] == 0
    rc, _, err = run(capsys, "validate", "--check-files", str(p))
    assert rc == 1 and "'heads' path does not exist" in err


def test_validate_check_files_reads_the_heads(tmp_path, capsys):
    MedusaHeads.init_from_lm_head(torch.randn(80, 8), num_heads=2).save_pretrained(tmp_path / "heads")
    p = tmp_path / "c.yaml"
    p.write_text("heads: ./heads\ntree: chain:2\n")
    rc, out, err = run(capsys, "validate", "--check-files", str(p))
    assert rc == 0 and err == ""
    assert "2 heads x 1 layer(s), hidden 8, vocab 80, own lm_head, canonical format" in out


def test_validate_check_files_refuses_a_tree_deeper_than_the_heads(tmp_path, capsys):
    """The engine refuses such a tree when it loads the heads; validate says so first, with the same message."""
    from medusa_plugin.core.config import MedusaConfigError, check_tree_depth

    MedusaHeads.init_from_lm_head(torch.randn(80, 8), num_heads=2).save_pretrained(tmp_path / "heads")
    p = tmp_path / "c.yaml"
    p.write_text(f"heads: {tmp_path / 'heads'}\ntree: vicuna_7b_stage2\n")
    assert run(capsys, "validate", str(p))[0] == 0
    rc, out, err = run(capsys, "validate", "--check-files", str(p))
    assert rc == 1 and out == "" and err.count("\n") == 1
    with pytest.raises(MedusaConfigError) as e:
        check_tree_depth(MedusaTree.from_name("vicuna_7b_stage2"), 2, tree_name="vicuna_7b_stage2",
                         heads=str(tmp_path / "heads"))
    assert err == f"medusa-plugin validate: error: {e.value}\n"
    assert "choose a tree of depth <= 2" in err


def test_tree_name(capsys):
    rc, out, _ = run(capsys, "tree", "mc_sim_7b_63")
    assert rc == 0 and out.strip() == MedusaTree.from_name("mc_sim_7b_63").describe()


def test_tree_chain(capsys):
    rc, out, _ = run(capsys, "tree", "chain:3")
    assert rc == 0 and out.strip() == MedusaTree.chain(3).describe()


def test_tree_list(capsys):
    rc, out, _ = run(capsys, "tree", "--list")
    assert rc == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert list(rows) == shipped_tree_names()
    for name, row in rows.items():
        t = MedusaTree.from_name(name)
        assert row[1:4] == [str(t.num_nodes), str(t.max_depth), str(t.num_leaves)]


@pytest.mark.parametrize("spec", ["zephyr_stage2", "[[0], [1], [0, 0], [0, 1]]"])
def test_tree_yaml_is_usable_in_a_config(capsys, spec):
    rc, out, _ = run(capsys, "tree", spec, "--yaml")
    assert rc == 0
    cfg = load_config({"heads": "a/b", **yaml.safe_load(out)})
    assert validate(cfg) == MedusaTree.load(spec)


def test_tree_yaml_file_round_trip(tmp_path, capsys):
    p = tmp_path / "t.yaml"
    p.write_text("[[0], [0, 0], [2]]\n")
    rc, out, _ = run(capsys, "tree", str(p))
    assert rc == 0 and out.strip() == MedusaTree.from_choices([[0], [0, 0], [2]]).describe()


def test_tree_bad(capsys):
    rc, out, err = run(capsys, "tree", "vicuna_7b_stage3")
    assert rc == 1 and out == "" and "unknown tree name" in err and "vicuna_7b_stage2" in err
    rc, _, err = run(capsys, "tree", "--topk", "3", "mc_sim_7b_63")
    assert rc == 1 and "topk" in err and "Traceback" not in err


def test_tree_needs_a_spec(capsys):
    rc, _, err = run(capsys, "tree")
    assert rc == 2 and "--list" in err


def _write_fastdecoding_v1(d: Path, K=3, L=2, H=8, V=16, seed=0):
    """A tiny FasterDecoding v1 heads-only checkpoint (medusa_lm_head.pt + config.json)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for h in range(K):
        for l in range(L):
            sd[f"{h}.{l}.linear.weight"] = torch.randn(H, H, generator=g)
            sd[f"{h}.{l}.linear.bias"] = torch.randn(H, generator=g)
        sd[f"{h}.{L}.weight"] = torch.randn(V, H, generator=g)
    d.mkdir(parents=True)
    torch.save(sd, d / "medusa_lm_head.pt")
    # upstream's configs under-report the head count; the weights are authoritative
    (d / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": L,
                                               "base_model_name_or_path": "tiny/base"}))
    return sd


def test_convert_fastdecoding_v1(tmp_path, capsys):
    sd = _write_fastdecoding_v1(tmp_path / "src", K=3, L=2, H=8, V=16)
    rc, out, err = run(capsys, "convert", str(tmp_path / "src"), str(tmp_path / "out"))
    assert rc == 0, err
    fields = dict(line.strip().split(":", 1) for line in out.splitlines()[1:])
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert fields["format"] == "fastdecoding"
    assert (fields["heads (K)"], fields["layers (L)"], fields["hidden"], fields["vocab"]) == ("3", "2", "8", "16")
    heads = MedusaHeads.from_pretrained(tmp_path / "out")
    assert torch.equal(heads.blocks[1][1].linear.weight, sd["1.1.linear.weight"])
    assert torch.equal(heads.lm_heads[2].weight, sd["2.2.weight"])


def test_convert_bad_source(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    torch.save({"foo.weight": torch.zeros(2, 2)}, tmp_path / "src" / "medusa_lm_head.pt")
    rc, out, err = run(capsys, "convert", str(tmp_path / "src"), str(tmp_path / "out"))
    assert rc == 1 and err.startswith("medusa-plugin convert: error: ") and "Traceback" not in err


# ------------------------------------------------------------------------------------------ external commands
def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for name in ["validate", "tree", "convert", *cli.EXTERNAL_COMMANDS]:
        assert f"    {name}" in out


def test_missing_external_module_gives_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "bench", ("medusa_plugin.no_such_module", "bench"))
    rc, _, err = run(capsys, "bench", "--anything")
    assert rc == 1 and "not available" in err and "medusa_plugin.no_such_module" in err


def test_external_module_import_bug_is_not_hidden(tmp_path, monkeypatch, capsys):
    (tmp_path / "medusa_cli_fake_ext.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "bench", ("medusa_cli_fake_ext", "bench"))
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed"):
        cli.main(["bench"])


def test_external_module_is_dispatched(tmp_path, monkeypatch, capsys):
    (tmp_path / "medusa_cli_fake_ext2.py").write_text(
        "def add_arguments(p):\n    p.add_argument('--n', type=int, default=1)\n"
        "def run(args):\n    print('ran', args.n)\n    return 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "demo", ("medusa_cli_fake_ext2", "demo"))
    rc, out, _ = run(capsys, "demo", "--n", "5")
    assert rc == 7 and out == "ran 5\n"


def test_external_module_errors(tmp_path, monkeypatch, capsys):
    (tmp_path / "medusa_cli_fake_ext3.py").write_text(
        "from medusa_plugin.core.config import MedusaConfigError\n"
        "def add_arguments(p):\n    p.add_argument('--bug', action='store_true')\n"
        "def run(args):\n    raise (ValueError('internal bug') if args.bug else MedusaConfigError('bad heads x'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.EXTERNAL_COMMANDS, "demo", ("medusa_cli_fake_ext3", "demo"))
    rc, _, err = run(capsys, "demo")
    assert rc == 1 and err == "medusa-plugin demo: error: bad heads x\n"
    with pytest.raises(ValueError, match="internal bug"):  # not a user error: keeps its traceback
        cli.main(["demo", "--bug"])


def test_external_commands_have_the_contract():
    """Each external module that exists defines add_arguments(parser) and run(args)."""
    for name, (module_name, _) in cli.EXTERNAL_COMMANDS.items():
        try:
            module = __import__(module_name, fromlist=["run"])
        except ModuleNotFoundError as e:
            if e.name is not None and module_name.startswith(e.name):
                continue  # not written yet
            raise
        assert callable(module.add_arguments) and callable(module.run), module_name
        module.add_arguments(argparse.ArgumentParser())


def test_help_does_not_import_torch():
    code = ("import sys; from medusa_plugin import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'medusa-plugin --help imported torch'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr


def test_console_script(tmp_path):
    try:
        importlib.metadata.distribution("medusa_plugin")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("medusa_plugin is not pip-installed in this environment")
    exe = Path(sys.executable).parent / "medusa-plugin"
    if not exe.exists():
        pytest.skip("no medusa-plugin console script next to the interpreter")
    r = subprocess.run([str(exe), "validate", str(ROOT / "configs" / "chain-4.yaml")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "chain:4: 4 nodes" in r.stdout, r.stderr
    r = subprocess.run([str(exe), "tree", "no_such_tree"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "unknown tree name" in r.stderr and "Traceback" not in r.stderr
