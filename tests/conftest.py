"""Shared test fixtures: where ../shared lives, reference vectors, determinism."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STYLEHEAT_SHARED", REPO.parent / "shared")).resolve()
REFERENCE = SHARED / "reference"
FIXTURES = SHARED / "fixtures"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"../shared not found at {SHARED}; set STYLEHEAT_SHARED to its path")
    return SHARED


@pytest.fixture(scope="session")
def reference_dir(shared_dir) -> Path:
    return shared_dir / "reference"


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir) -> Path:
    return shared_dir / "fixtures"


@pytest.fixture(scope="session")
def official_layout(reference_dir) -> dict:
    with open(reference_dir / "official_checkpoints.json") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def vectors_seed0(reference_dir):
    import numpy as np

    return dict(np.load(reference_dir / "vectors_seed0.npz"))


@pytest.fixture(autouse=True)
def _deterministic_torch():
    try:
        import torch
    except ImportError:  # the add-on tests run without torch in principle
        yield
        return
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def seeded_official(official_layout):
    """Seed-0 official checkpoint contents, built lazily once per test session.

    ``seeded_official(file, part)`` -> state dict (or tensor); cached.
    """
    from server.parity import reference

    cache: dict = {}

    def get(file: str, part: str):
        if (file, part) not in cache:
            cache[(file, part)] = reference.seeded_part(official_layout, file, part, seed=0)
        return cache[(file, part)]

    return get
