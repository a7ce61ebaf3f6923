"""Attribute names in the docs and examples are the engine's own (what the server's hello lists).

A name the engine does not know (the official edit choice 'young', say) is refused at render time,
so a document that teaches one teaches a failing request.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.engine import Engine

REPO = Path(__file__).resolve().parents[1]
# every place a user or client reads attribute names from, besides hello itself
TEXTS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md", REPO / "server" / "preprocessing" / "motion.py",
                                                REPO / "blender_addon" / "rig.py"]
USES = [
    re.compile(r'"attributes":\s*\{\s*"([A-Za-z_]\w*)"'),       # JSON / msgpack examples
    re.compile(r'attributes\[\s*\\?"([A-Za-z_]\w*)\\?"\s*\]'),  # styleheat.attributes["age"] data paths
    re.compile(r"attribute name, e\.g\.\s*((?:\"\w+\",?\s*)+)"),  # the add-on rig's description
]


@pytest.fixture(scope="module")
def engine_names() -> set[str]:
    return set(Engine.tiny_random(seed=0).attributes())   # tiny weights carry every edit asset


def names_used(text: str) -> list[str]:
    out = []
    for pattern in USES:
        for m in pattern.finditer(text):
            out += re.findall(r"[A-Za-z_]\w*", m.group(1))
    return out


def test_the_engine_has_the_four_documented_edits(engine_names):
    assert engine_names == {"age", "pose", "beard", "lip"}


@pytest.mark.parametrize("path", TEXTS, ids=lambda p: p.name)
def test_documented_attribute_names_are_the_engines(path, engine_names):
    used = names_used(path.read_text(encoding="utf-8"))
    unknown = sorted(set(used) - engine_names)
    assert not unknown, f"{path.relative_to(REPO)} names attribute(s) {unknown} the engine refuses; " \
                        f"it knows {sorted(engine_names)}"


def test_the_motion_format_table_lists_exactly_the_engines_names(engine_names):
    text = (REPO / "docs" / "motion-format.md").read_text(encoding="utf-8")
    section = text.split("## Attributes", 1)[1].split("\n## ", 1)[0]
    table = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    assert set(table) == engine_names


def test_the_scan_finds_names():
    """The patterns do match what they are for (else the tests above would pass vacuously)."""
    assert names_used('"attributes": {"young": [0.0]}') == ["young"]
    assert names_used('styleheat.attributes["age"].value') == ["age"]
    assert names_used('# ``name`` (inherited) is the server\'s attribute name, e.g. "young", "beard"') == \
        ["young", "beard"]
    assert names_used(Path(REPO / "docs" / "addon.md").read_text(encoding="utf-8"))  # addon.md has one
