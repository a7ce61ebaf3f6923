"""Official-parity reference data: the seeded-weight rule and the acceptance tolerances.

The reference folder (``shared/reference`` in the developers' workspace) holds the layout of
every official checkpoint (``official_checkpoints.json``) and outputs of the official
implementation on weights rebuilt from that layout by a deterministic rule. This module
re-implements that rule so that ``styleheat verify-reference`` and the tests can rebuild the
exact weights, and it holds the acceptance rule used to compare arrays.

Rule (per tensor, independent of key order)::

    seed_key = seed_prefix + key
    integer dtype          -> zeros
    std is None            -> fixed[key]                         (FIR kernels)
    otherwise              z = default_rng([seed, crc32(seed_key)]).standard_normal(shape)
                           running_var -> 1 + 0.1 |z| ; else std * z   (float32)
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

Layout = dict[str, Any]


def load_layout(path: str | Path) -> Layout:
    """Read a layout JSON (``official_checkpoints.json`` or the Deep3D / SadTalker ones)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def seeded_tensor(seed: int, seed_key: str, shape: list[int], dtype: str, std: float | None,
                  fixed: Any = None) -> torch.Tensor:
    """One tensor of the seeded-weight rule."""
    if dtype.startswith(("int", "uint", "bool")):
        return torch.zeros(tuple(shape), dtype=getattr(torch, dtype))
    if std is None:
        if fixed is None:
            raise ValueError(f"layout gives no std and no fixed value for {seed_key!r}")
        return torch.tensor(np.asarray(fixed, dtype=np.float32)).reshape(tuple(shape))
    rng = np.random.default_rng([seed, zlib.crc32(seed_key.encode("utf-8"))])
    z = rng.standard_normal(size=tuple(shape))
    if seed_key.endswith("running_var"):
        values = 1.0 + 0.1 * np.abs(z)
    else:
        values = std * z
    return torch.from_numpy(np.asarray(values, dtype=np.float32))


def seeded_part(layout: Layout, file: str, part: str, seed: int, *, prefix: str | None = None):
    """The state dict (or bare tensor, for ``kind == 'tensor'``) of one part of one file.

    ``prefix``: only the keys of one sub-module (e.g. ``"calibrator."``), returned with the prefix
    stripped; the seeds are those of the full keys, so the tensors equal the full part's. This avoids
    building the 1.5 GB visual checkpoint to get one small network.
    """
    spec = layout["files"][file]["parts"][part]
    fixed = spec.get("fixed", {})
    seed_prefix = spec.get("seed_prefix", "")
    entries = spec["entries"]
    if prefix is not None:
        entries = [e for e in entries if e[0].startswith(prefix)]
        if not entries:
            raise KeyError(f"{file} part {part!r} has no keys under {prefix!r}")
    out = {key: seeded_tensor(seed, seed_prefix + key, shape, dtype, std, fixed.get(key))
           for key, shape, dtype, std in entries}
    if prefix is not None:
        return {key[len(prefix):]: value for key, value in out.items()}
    if spec["kind"] == "tensor":
        (only,) = out.values()
        return only
    return out


def seeded_file(layout: Layout, file: str, seed: int):
    """A whole checkpoint file as the official loader sees it (extensions left out)."""
    parts = layout["files"][file]["parts"]
    if list(parts) == [""]:
        return seeded_part(layout, file, "", seed)
    return {name: seeded_part(layout, file, name, seed)
            for name, spec in parts.items() if spec["kind"] != "state_dict_extension"}


@dataclass(frozen=True)
class Comparison:
    """Result of comparing one computed array with its reference."""

    name: str
    max_abs: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs) and self.max_abs <= self.tolerance)

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return f"{self.name:<36s} max|a-b| = {self.max_abs:.3e}  tol = {self.tolerance:.3e}  {verdict}"


def max_abs_error(got: Any, ref: Any) -> float:
    """``max|got - ref|`` in float64 (0 for empty arrays; inf when ``got`` holds NaN or infinity).

    The shapes must already agree."""
    got = np.asarray(got, dtype=np.float64)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.max(np.abs(got - np.asarray(ref, dtype=np.float64)))) if got.size else 0.0


def compare(name: str, got: Any, ref: np.ndarray, *, float16_stored: bool | None = None,
            rel: float | None = None) -> Comparison:
    """Compare ``got`` with reference array ``ref`` using the reference README's acceptance rule.

    float32 arrays: ``max|a-b| <= 1e-4 * max(1, max|ref|)``; arrays stored as float16:
    ``<= 2e-3 * max(1, max|ref|)``. ``rel`` overrides the factor (e.g. audio tolerances).
    """
    if isinstance(got, torch.Tensor):
        got = got.detach().float().cpu().numpy()
    got = np.asarray(got, dtype=np.float64)
    ref64 = np.asarray(ref, dtype=np.float64)
    if got.shape != ref64.shape:
        raise ValueError(f"{name}: shape {got.shape} does not match reference {ref64.shape}")
    if float16_stored is None:
        float16_stored = np.asarray(ref).dtype == np.float16
    factor = rel if rel is not None else (2e-3 if float16_stored else 1e-4)
    scale = max(1.0, float(np.max(np.abs(ref64))) if ref64.size else 1.0)
    return Comparison(name, max_abs_error(got, ref64), factor * scale)
