"""The layers run one way: models/ imports neither server/ nor training/; training/ does not import server/;
the production modules of server/ import neither its parity checks nor its command line; and no two
modules of server/ import each other, directly or around a circle.

A static scan of every import statement (module level and inside functions) of the package sources.
:func:`import_graph` and :func:`import_circles` take any package folder (e.g. ``REPO / "blender_addon"``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Absolute module names imported by ``path`` (``from server import engine`` -> ``server.engine``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _violations(package: str, forbidden: tuple[str, ...]) -> set[tuple[str, str]]:
    found = set()
    for path in sorted((REPO / package).rglob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in forbidden:
                # report the package (server.preprocessing, not server.preprocessing.audio.read_audio)
                found.add((path.relative_to(REPO).as_posix(), ".".join(name.split(".")[:2])))
    return found


def test_models_import_neither_server_nor_training():
    assert _violations("models", ("server", "training")) == set()


def test_training_does_not_import_server():
    found = _violations("training", ("server",))
    assert found == set(), "training/ imports server/: move the pure code into models/ (or pass it in)"


def test_the_scan_sees_imports_inside_functions(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from server.preprocessing import audio as au\n    import server.engine\n")
    assert {"server.preprocessing.audio", "server.engine"} <= _imports(p)


# ------------------------------------------------------------------------------------------ module graph
def module_names(package: Path) -> dict[str, Path]:
    """Dotted module name -> file for every module of the package folder ``package`` (its name is the
    top-level name: ``REPO / "server"`` gives ``server``, ``server.service.app``, ...)."""
    package = Path(package)
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = (package.name, *path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of the package that importing ``name`` runs: ``name`` itself or the longest prefix
    that is a module (``server.engine.Engine`` -> ``server.engine``); None outside the package."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _bound_names(path: Path) -> set[str]:
    """Names a module binds at its top level (definitions, assignments, imports)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (every import statement, also inside
    functions; relative imports resolved; ``from pkg import sub`` is an edge to the module ``pkg.sub``
    when that is a module, else to ``pkg`` when its ``__init__`` binds ``sub``; a submodule that is not
    in the folder, e.g. one a build copies in, is no edge). Edges to the parent packages' ``__init__``
    that Python runs implicitly are not drawn."""
    modules = module_names(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                    stem = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    stem = node.module or ""
                for alias in node.names:
                    sub = f"{stem}.{alias.name}"
                    if sub in modules:
                        targets.append(sub)
                    elif stem not in modules or alias.name in _bound_names(modules[stem]):
                        targets.append(stem)
                    # else: a submodule that is not in the folder (e.g. one a build step copies in)
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != name:
                    edges.add(resolved)
        graph[name] = edges
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` (each sorted), in no particular order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_circles(package: Path) -> list[list[str]]:
    """Every import circle among the modules of the package folder ``package``, each as the files on
    it (paths relative to the package's parent folder, e.g. ``server/service/app.py``); [] when none."""
    package = Path(package)
    modules = module_names(package)
    graph = import_graph(package)
    circles = [c for c in strongly_connected(graph) if len(c) > 1]
    return sorted([modules[m].relative_to(package.parent).as_posix() for m in c] for c in circles)


def test_no_import_circle_in_server():
    circles = import_circles(REPO / "server")
    assert circles == [], "modules of server/ import each other around a circle: " + "; ".join(
        " <-> ".join(c) for c in circles)


#: what only the command line and the parity checks may import (production code never needs them)
NOT_FOR_PRODUCTION = ("server.parity", "server.commands", "server.cli")


def _is_production(module: str) -> bool:
    return not any(module == p or module.startswith(p + ".") for p in NOT_FOR_PRODUCTION)


def test_production_modules_import_no_parity_commands_or_cli():
    graph = import_graph(REPO / "server")
    modules = module_names(REPO / "server")
    bad = sorted((modules[m].relative_to(REPO).as_posix(), target)
                 for m, targets in graph.items() if _is_production(m)
                 for target in targets if not _is_production(target))
    assert bad == [], f"production modules of server/ import the parity checks or the command line: {bad}"
    # the scan sees the modules the rule is about (a renamed folder would make it pass vacuously)
    assert {"server.service.app", "server.engine", "server.parity.reference", "server.commands.render",
            "server.cli"} <= set(modules)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / next(iter(files)).split("/")[0]


def test_the_circle_detector_finds_a_circle(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from pkg import b\n    return b\n",   # inside a function
        "pkg/b.py": "from .sub.c import g\n",                               # relative
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from ..a import f\ndef g():\n    pass\n",          # two levels up
        "pkg/d.py": "import pkg.a\nimport os\n",                             # on no circle
    })
    assert import_circles(pkg) == [["pkg/a.py", "pkg/b.py", "pkg/sub/c.py"]]
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert graph["pkg.d"] == {"pkg.a"}
    # break the circle: nothing is reported
    (pkg / "sub" / "c.py").write_text("def g():\n    pass\n")
    assert import_circles(pkg) == []


@pytest.mark.parametrize("source", ["from . import b\n", "import pkg.b.x\n", "from pkg.b import x\n",
                                    "from . import helper\n", "from pkg import helper as h\n"])
def test_the_circle_detector_resolves_every_import_form(tmp_path, source):
    pkg = _write(tmp_path, {"pkg/__init__.py": "from pkg.b import x as helper\n", "pkg/a.py": source,
                            "pkg/b.py": "from pkg import a\nx = 1\n"})
    expected = ["pkg/a.py", "pkg/b.py"] + (["pkg/__init__.py"] if "helper" in source else [])
    assert import_circles(pkg) == [sorted(expected)]


def test_a_module_missing_from_the_folder_is_no_edge(tmp_path):
    """``from . import protocol`` where a build copies protocol.py in later: not an edge to ``__init__``."""
    pkg = _write(tmp_path, {"pkg/__init__.py": "from . import a\n", "pkg/a.py": "from . import protocol\n"})
    assert import_graph(pkg)["pkg.a"] == set()
    assert import_circles(pkg) == []
