"""The shape of the code (docs/architecture.md, "The rooms"): no import cycle among the project's modules
(function-level imports included), one home for renames over files and none for branching on a phase's
name. There is no line cap: a module is split where a seam is, never to fit a count."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"bench": "bench", "models": "bench.models"}  # folder -> the package it installs as (pyproject.toml)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").parts
    parts = PACKAGES[rel[0]].split(".") + list(rel[1:])
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
            if "__pycache__" not in p.parts}


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every dotted name an import statement may refer to, made absolute."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body (functions included)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported(node, m, path.name == "__init__.py"):
                while name and name not in mods:  # "bench.sweep.multirun" -> "bench.sweep"
                    name = name.rpartition(".")[0]
                if name and name != m and not m.startswith(name + "."):  # a package's own parent: no edge
                    graph[m].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_checker_sees_function_level_imports_and_cycles():
    graph = import_graph()
    assert "bench.sweep" in graph["bench.cli"]  # imported inside cmd_train
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in _modules().values()}


def test_os_replace_only_in_rundir():
    """Every file a reader may see half-written goes through rundir.atomic_write."""
    offenders = [f for f, src in _sources().items() if "os.replace" in src and f != "bench/rundir.py"]
    assert not offenders, offenders


def test_no_branching_on_a_phase_name():
    offenders = [f for f, src in _sources().items() if "phase.name ==" in src]
    assert not offenders, offenders
