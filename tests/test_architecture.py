"""The folders are the architecture: no import cycles, the library never imports the UI, a small core.

Every ``import`` and ``from ... import`` in every module counts, at module level and inside
functions: an import inside a function that closes a cycle still means a lower module knows a
higher one. Relative imports are resolved against the importing module's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_TOP_LEVEL_MODULES = 8

#: The stages, lowest first: a module may import its own stage and the ones before it, never a
#: later one. ``core`` is the top-level modules of ``inspector/`` (verdict, io, paths, state, ...).
LAYERS = ("core", "security", "data", "backbones", "synth", "detectors", "deploy", "products", "eval",
          "cameras", "batch", "line", "station", "cli", "app")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for top in ("inspector", "app") for p in sorted((ROOT / top).rglob("*.py"))}


def _imported(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``name`` imports anywhere in its file, as the longest known module prefix."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets.add(mod)
            targets.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
    out = set()
    for t in targets:
        while t and t not in known:
            t = t.rpartition(".")[0]
        if t and t != name:
            out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imported(name, path, known) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    """The check itself can fail: a two-module and a three-module cycle are reported."""
    g = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(_cycles(g)) == [["a", "b"], ["c", "d", "e"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_are_edges(tmp_path):
    """An import inside a function is an edge like any other."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from inspector.station import service\n")
    assert "inspector.station.service" in _imported("inspector.x", src, {"inspector.station", "inspector.station.service"})


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def _stage(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "app":
        return "app"
    if len(parts) == 1 or (ROOT / "inspector" / f"{parts[1]}.py").is_file():
        return "core"
    return parts[1]


def _upward_imports(graph: dict[str, set[str]]) -> list[str]:
    rank = {stage: i for i, stage in enumerate(LAYERS)}
    return sorted(f"{m} ({_stage(m)}) imports {t} ({_stage(t)})" for m, ts in graph.items() for t in ts
                  if m != "inspector.__main__" and rank[_stage(t)] > rank[_stage(m)])


def test_the_layer_check_sees_an_upward_import():
    assert _upward_imports({"inspector.line.runner": {"inspector.station.service"}})
    assert not _upward_imports({"inspector.station.service": {"inspector.line.runner", "inspector.io"}})


def test_every_package_has_a_stage():
    stages = {_stage(m) for m in _modules()}
    assert stages <= set(LAYERS), stages - set(LAYERS)


def test_no_stage_imports_a_later_one():
    """Packages form layers (the data flow), not only an acyclic module graph."""
    upward = _upward_imports(_graph())
    assert not upward, "imports of a later stage:\n" + "\n".join(upward)


def test_the_library_never_imports_the_ui():
    offenders = sorted(f"{m} imports {t}" for m, ts in _graph().items() if m.startswith("inspector")
                       for t in ts if t == "app" or t.startswith("app."))
    assert not offenders, offenders


def test_a_small_core():
    top = sorted(p.name for p in (ROOT / "inspector").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


@pytest.mark.parametrize("package", sorted(p.parent.name for p in (ROOT / "inspector").glob("*/__init__.py")))
def test_every_package_says_what_it_is_for(package):
    doc = ast.get_docstring(ast.parse((ROOT / "inspector" / package / "__init__.py").read_text()))
    assert doc and len(doc.split()) >= 5, f"inspector/{package}/__init__.py needs a docstring saying what lives there"
