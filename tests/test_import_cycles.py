"""cafe_core.gate and cafe_core.registry do not import each other: both build on cafe_core.records, and the
gate is handed the champion by its caller (`decide(cfg, store, registry.champion_metrics(cfg, store))`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "cafe_core"


def source_of(module: str) -> str:
    return (PACKAGE / (module.split(".", 1)[1].replace(".", "/") + ".py")).read_text()


def imports_in(source: str, package: str = "cafe_core") -> set[str]:
    """Every module an import statement anywhere in `source` names (inside functions too), relative
    imports resolved against `package`; `from a import b` yields both a and a.b (b may be a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def imports(module: str, other: str) -> bool:
    return any(m == other or m.startswith(other + ".") for m in imports_in(source_of(module)))


GATE, REGISTRY, RECORDS = "cafe_core.gate", "cafe_core.registry", "cafe_core.records"


@pytest.mark.parametrize("module,other", [(GATE, REGISTRY), (REGISTRY, GATE), (RECORDS, GATE), (RECORDS, REGISTRY)])
def test_no_import_statement(module, other):
    assert not imports(module, other), f"{module} imports {other}"


@pytest.mark.parametrize("module,other", [(GATE, REGISTRY), (REGISTRY, GATE)])
def test_not_named_at_all(module, other):
    """Nor through importlib or a string: the module's text does not name the other one."""
    assert other not in source_of(module)


def test_both_build_on_records():
    assert imports(GATE, RECORDS) and imports(REGISTRY, RECORDS)


@pytest.mark.parametrize("module,other", [(GATE, REGISTRY), (REGISTRY, GATE)])
def test_importing_one_does_not_load_the_other(module, other):
    code = f"import sys, {module}; print({other!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.strip()
    assert out == "False", f"importing {module} (in a fresh interpreter) loaded {other}"


@pytest.mark.parametrize("snippet", [
    "def decide():\n    from cafe_core.registry import champion\n",  # the old cycle: a lazy import
    "from . import registry\n",
    "import cafe_core.registry as r\n",
])
def test_the_scan_sees_every_form(snippet):
    assert any(m == REGISTRY or m.startswith(REGISTRY + ".") for m in imports_in(snippet))
