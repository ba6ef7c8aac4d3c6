"""The layers point one way: the maths imports neither Lightning nor the data layer, the data does not know which
method consumes it, the methods do not import each other, and no lit_align module imports another that (directly
or not) imports it back. Checked from the source (every import statement, module level or inside a function)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lit_align"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every lit_align module and the lit_align modules it imports; importing ``a.b.c`` runs ``a.b`` first."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}
        edges = set()
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # a module and the packages above it
                candidate = ".".join(parts[:i])
                if candidate in modules and candidate != name and not name.startswith(candidate + "."):
                    edges.add(candidate)
        graph[name] = edges
    return graph


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def test_no_lit_align_module_imports_itself_back():
    graph = _imports()
    cycles = sorted(name for name in graph if name in _reaches(graph, name) and name != "lit_align")
    assert cycles == [], f"import cycles through: {cycles}"


SHARED_MODULES = {"lit_align.modules.base", "lit_align.modules.reference"}


def test_the_layers_point_one_way():
    graph = _imports()
    for maths in ("lit_align.ops", "lit_align.losses"):
        assert _reaches(graph, maths) <= {"lit_align.ops"}, maths
    for name, edges in graph.items():
        if name.startswith("lit_align.data"):
            assert not any(e.startswith(("lit_align.modules", "lit_align.rollout")) for e in edges), name
        if name.startswith("lit_align.modules."):  # the base and the shared reference policy, no method's internals
            others = {e for e in edges if e.startswith("lit_align.modules.") and e not in SHARED_MODULES}
            assert not others, f"{name} imports another method's internals: {others}"


def test_importing_the_maths_loads_neither_lightning_nor_the_data_layer():
    code = (
        "import sys, lit_align.losses, lit_align.ops; "
        "print(sorted(m for m in ('lightning', 'lit_align.data', 'transformers') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
