"""The shape of the house (ARCHITECTURE.md), read from the code without running it.

Every ``import`` of a fastflow module is an edge, at module level or inside a function (a
function-level import hides a cycle from Python, not from the design). A room is a subpackage of
fastflow (``ops``, ``models``, ...) or a top-level module (``api``, ``errors``, ...). The test
fails on an import a room may not make (the table below is ARCHITECTURE.md's), on any cycle
between rooms or between the modules of one room, and on any module over ``MAX_LINES`` lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastflow"
MAX_LINES = 500

# room -> the rooms it may import (besides itself). Lower rooms first; arrows point down only.
# "_C" is the optional compiled extension (fastflow._C), "<root>" the package's __init__.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "_C": set(),
    "kernels": {"errors"},
    "ops": {"errors", "kernels", "_C"},
    "quant": {"errors", "ops"},
    "samplers": {"errors"},
    "models": {"errors", "ops"},
    "loading": {"errors", "ops", "quant", "models"},
    "adapters": {"errors", "ops", "quant", "loading"},
    "caching": {"errors", "ops", "models", "loading"},
    "pipelines": {"errors", "ops", "samplers", "models", "caching", "adapters"},
    "parallel": {"errors", "ops", "models", "samplers", "caching", "pipelines"},
    "compile": {"errors", "ops", "quant", "caching", "pipelines"},
    "evaluation": {"errors", "pipelines"},
    "tuning": {"errors", "samplers", "caching", "evaluation", "pipelines"},
    "api": {"errors", "ops", "models", "loading", "pipelines", "parallel", "compile"},
    "<root>": {"errors", "ops", "models", "loading", "compile", "api"},
    "serve": {"errors", "ops", "loading", "pipelines", "caching", "parallel", "compile", "api", "<root>"},
    "__main__": {"cli"},
}
ALLOWED["cli"] = set(ALLOWED) - {"cli", "__main__"}  # the user's door may use every room


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """fastflow.x.y -> its file (a package is its __init__.py)."""
    names = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _targets(module: str, is_package: bool, node: ast.AST, modules: dict) -> list[str]:
    """The fastflow modules an import statement names (a ``from pkg import sub`` names pkg.sub)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join(parts + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules or a.name == "_C" else base for a in node.names]


def import_edges(package: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {imported fastflow module: line}; every import statement, wherever it stands."""
    modules = module_names(package)
    edges: dict[str, dict[str, int]] = {m: {} for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(module, path.name == "__init__.py", node, modules):
                if target == "fastflow._C":
                    edges[module].setdefault(target, node.lineno)
                    continue
                while target and target not in modules:  # an attribute of a module: the module
                    target = target.rpartition(".")[0]
                if target.startswith("fastflow") and target != module:
                    edges[module].setdefault(target, node.lineno)
    return edges


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _where(edges, pairs) -> str:
    return "; ".join(f"{a} -> {b} (line {edges[a][b]})" for a, b in pairs)


def room_graph(edges) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for a, targets in edges.items():
        for b in targets:
            if room(a) != room(b):
                graph.setdefault(room(a), set()).add(room(b))
    return graph


def room_violations(edges) -> list[str]:
    """Imports a room may not make, with the module and line of each."""
    bad = []
    for a, targets in sorted(edges.items()):
        for b in sorted(targets):
            ra, rb = room(a), room(b)
            if ra != rb and rb not in ALLOWED.get(ra, set()):
                bad.append(f"{a} -> {b} (line {targets[b]}): {ra} may not import {rb}")
    return bad


def room_cycles(edges) -> list[str]:
    """Cycles between rooms, each with the imports that close it."""
    graph = room_graph(edges)
    out = []
    for component in cycles(graph):
        inside = set(component)
        pairs = [(a, b) for a in edges for b in edges[a] if room(a) != room(b) and {room(a), room(b)} <= inside]
        out.append(f"{' <-> '.join(component)}: {_where(edges, pairs)}")
    return out


def module_cycles(edges) -> list[str]:
    """Cycles between the modules of one room (a package's __init__ counts as a module)."""
    out = []
    rooms = {room(m) for m in edges}
    for r in sorted(rooms):
        graph = {a: {b for b in t if room(b) == r} for a, t in edges.items() if room(a) == r}
        for component in cycles(graph):
            inside = set(component)
            pairs = [(a, b) for a in component for b in edges[a] if b in inside]
            out.append(f"{r}: {_where(edges, pairs)}")
    return out


def long_modules(package: Path = PACKAGE, limit: int = MAX_LINES) -> list[str]:
    return [
        f"{path.relative_to(package.parent)}: {n} lines"
        for path in sorted(package.rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > limit
    ]


@pytest.fixture(scope="module")
def edges():
    return import_edges()


def test_every_room_is_in_the_table(edges):
    unknown = sorted({room(m) for m in edges} - set(ALLOWED))
    assert not unknown, f"rooms missing from ALLOWED (and ARCHITECTURE.md): {unknown}"


def test_rooms_import_only_downward(edges):
    bad = room_violations(edges)
    assert not bad, "imports against ARCHITECTURE.md's table:\n" + "\n".join(bad)


def test_the_table_itself_has_no_cycle():
    graph = {r: {t for t in allowed if t in ALLOWED} for r, allowed in ALLOWED.items()}
    assert not cycles(graph)


def test_no_cycle_between_rooms(edges):
    found = room_cycles(edges)
    assert not found, "import cycles between rooms:\n" + "\n".join(found)


def test_no_cycle_inside_a_room(edges):
    found = module_cycles(edges)
    assert not found, "import cycles inside rooms:\n" + "\n".join(found)


def test_no_module_over_the_limit():
    found = long_modules()
    assert not found, f"modules over {MAX_LINES} lines (split them by concern):\n" + "\n".join(found)


# -- the checks themselves, on small made-up packages -------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "fastflow"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_function_level_import_is_an_edge(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "__init__.py": "",
            "ops/__init__.py": "",
            "ops/a.py": "def f():\n    from fastflow.kernels import k\n",
            "kernels/__init__.py": "",
            "kernels/k.py": "from ..ops import a\n",
        },
    )
    found = import_edges(pkg)
    assert found["fastflow.ops.a"] == {"fastflow.kernels.k": 2}
    assert found["fastflow.kernels.k"] == {"fastflow.ops.a": 1}
    assert room_cycles(found) and any("kernels may not import ops" in v for v in room_violations(found))


def test_a_cycle_inside_a_room_is_found(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "__init__.py": "",
            "models/__init__.py": "from .flux import Flux\n",
            "models/flux.py": "from .modulation import m\nclass Flux: ...\n",
            "models/modulation.py": "def m():\n    from . import flux\n",
            "models/vae.py": "from . import flux\n",  # pointing into the cycle is not a cycle
        },
    )
    found = module_cycles(import_edges(pkg))
    assert len(found) == 1 and "fastflow.models.flux -> fastflow.models.modulation" in found[0]
    assert "vae" not in found[0]


def test_a_package_init_and_its_module_can_form_a_cycle(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "__init__.py": "",
            "cli/__init__.py": "from .generate import run\n",
            "cli/generate.py": "from . import DTYPES\n",
        },
    )
    assert module_cycles(import_edges(pkg))


def test_long_modules_are_named(tmp_path):
    pkg = _package(tmp_path, {"__init__.py": "", "big.py": "x = 1\n" * 12})
    assert long_modules(pkg, limit=11) == ["fastflow/big.py: 12 lines"]
    assert long_modules(pkg, limit=12) == []
