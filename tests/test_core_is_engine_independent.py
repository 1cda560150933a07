"""The core must stay engine-independent: no module under medusa_plugin/core may import vLLM."""

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "medusa_plugin" / "core"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_sources_never_import_vllm():
    files = sorted(CORE.rglob("*.py"))
    assert files, f"no python files found under {CORE}"
    offenders = {
        str(f.relative_to(CORE)): sorted(m for m in _imported_modules(f) if m == "vllm" or m.startswith("vllm."))
        for f in files
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"core modules import vLLM: {offenders}"


def test_importing_every_core_module_does_not_load_vllm():
    modules = [f"medusa_plugin.core.{f.stem}" for f in sorted(CORE.glob("*.py")) if f.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "loaded = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.'))\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the core loaded vLLM modules: {out.stdout.strip()}"
