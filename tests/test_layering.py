"""The layers run one way: models/ imports neither server/ nor training/; training/ does not import server/.

A static scan of every import statement (module level and inside functions) of the package sources.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]



def _imports(path: Path) -> set[str]:
    """Absolute module names imported by ``path`` (``from server.preprocessing import audio`` -> ``server.preprocessing.audio``)."""
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
                # report the module itself (server.preprocessing.audio, not server.preprocessing.audio.read_audio)
                found.add((path.relative_to(REPO).as_posix(), ".".join(name.split(".")[:2])))
    return found


def test_models_import_neither_server_nor_training():
    assert _violations("models", ("server", "training")) == set()


def test_training_does_not_import_server():
    found = _violations("training", ("server",))
    # "server.preprocessing.tracking" is reported for both "from server.preprocessing import tracking" and its module name
    assert found == set(), "training/ imports server/: move the pure code into models/ (or pass it in)"


def test_the_scan_sees_imports_inside_functions(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from server.preprocessing import audio as au\n    import server.engine\n")
    assert {"server.preprocessing.audio", "server.engine"} <= _imports(p)
