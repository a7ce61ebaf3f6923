"""blender_addon/ has no import circle: a static scan of every import statement of the add-on's modules
(module level and inside functions), relative imports (``from . import x``, ``from .x import y``,
``from .. import``) resolved to the package's own modules.

(A separate file from tests/test_layering.py on purpose: that file gets a generic detector in another branch.)
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_edges(package: Path, virtual: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """{module: modules of ``package`` it imports}, module names relative to the package (``render``,
    ``sub.x``); ``__init__`` stands for the package itself (or a sub-package's ``sub``). ``virtual``: modules
    that exist only in the built package (imports of them are edges to a leaf)."""
    def name_of(path: Path) -> str:
        parts = list(path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        return ".".join(parts) or "__init__"

    files = {name_of(p): p for p in sorted(package.rglob("*.py"))}
    edges: dict[str, set[str]] = {m: set() for m in list(files) + list(virtual)}
    files.update({v: None for v in virtual if v not in files})
    for mod, path in files.items():
        if path is None:
            continue
        is_pkg = path.name == "__init__.py"
        here = [] if mod == "__init__" else mod.split(".")
        base_pkg = here if is_pkg else here[:-1]          # the package this module's relative imports start from
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                up = node.level - 1
                if up > len(base_pkg):
                    continue                               # beyond the package: not ours
                anchor = base_pkg[:len(base_pkg) - up]
                stem = anchor + (node.module.split(".") if node.module else [])
                for a in node.names:
                    cand = ".".join(stem + [a.name])
                    targets.append(cand if cand in files else ".".join(stem))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package.name:
                stem = node.module.split(".")[1:]
                for a in node.names:
                    cand = ".".join(stem + [a.name])
                    targets.append(cand if cand in files else ".".join(stem))
            elif isinstance(node, ast.Import):
                targets += [".".join(a.name.split(".")[1:]) for a in node.names
                            if a.name.split(".")[0] == package.name]
            for t in targets:
                t = t or "__init__"
                if t in files and t != mod:
                    edges[mod].add(t)
    return edges


def find_circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, three colours)."""
    colour = {m: 0 for m in edges}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        colour[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if colour.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if colour.get(n) == 0:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        colour[m] = 2
        return None

    for m in sorted(edges):
        if colour[m] == 0:
            found = visit(m)
            if found:
                return found
    return None


ADDON_VIRTUAL = ("protocol",)   # build_addon.py copies server/protocol.py in


def test_blender_addon_has_no_import_circle():
    edges = module_edges(REPO / "blender_addon", ADDON_VIRTUAL)
    assert {"render", "connection", "scrub", "rig", "operators"} <= set(edges)
    assert "connection" in edges["render"]                   # the scan sees the add-on's relative imports
    circle = find_circle(edges)
    assert circle is None, "import circle in blender_addon/: " + " -> ".join(circle)


def test_the_bpy_free_core_imports_no_bpy_module():
    """connection (the session state) and its friends depend only on one another."""
    import build_addon

    edges = module_edges(REPO / "blender_addon", ADDON_VIRTUAL)
    assert {"client", "localserver", "protocol"} <= edges["connection"]
    for m in build_addon.BPY_FREE:
        if m in edges:
            assert edges[m] <= set(build_addon.BPY_FREE), (m, edges[m])


def test_the_detector_finds_a_circle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from .sub.c import thing\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("thing = 1\n")
    edges = module_edges(pkg)
    assert edges["a"] == {"b"} and edges["b"] == {"sub.c"}
    assert find_circle(edges) is None
    # a function-level import closes a -> b -> sub.c -> a
    (pkg / "sub" / "c.py").write_text("thing = 1\ndef f():\n    from .. import a\n    return a\n")
    edges = module_edges(pkg)
    assert edges["sub.c"] == {"a"}
    assert find_circle(module_edges(pkg)) == ["a", "b", "sub.c", "a"]
    # and `from .x import y` of a name (not a module) counts as importing x
    (pkg / "sub" / "c.py").write_text("thing = 1\n")
    (pkg / "b.py").write_text("from .sub.c import thing\nfrom .a import something\n")
    assert find_circle(module_edges(pkg)) == ["a", "b", "a"]
