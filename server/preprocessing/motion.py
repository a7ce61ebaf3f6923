"""The motion file: per-frame 3DMM driving coefficients (and optional per-frame edit strengths).

Format (JSON, documented in docs/motion-format.md)::

    {"format": "styleheat-motion", "version": 1, "fps": 25.0, "first_frame": 0,
     "layout": ["exp", 64, "angle", 3, "trans", 3, "crop", 3],
     "rows": [[73 floats], ...],                      # one row per frame of a contiguous clip
     "attributes": {"age": [one float per row], ...},     # optional: the engine's names (hello)
     "source": {...}}                                 # optional, free-form provenance

``read_motion(path)`` validates everything and returns a :class:`Motion`; ``write_motion`` writes
atomically (temporary file + rename). Every problem raises :class:`MotionError` (a ``ValueError``)
whose message names the file, the field and what to do.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

FORMAT = "styleheat-motion"
VERSION = 1
LAYOUT: tuple = ("exp", 64, "angle", 3, "trans", 3, "crop", 3)
N_COEFFS = 73
#: column slices of a row, by layout name
SLICES = {"exp": slice(0, 64), "angle": slice(64, 67), "trans": slice(67, 70), "crop": slice(70, 73)}
_KNOWN_KEYS = {"format", "version", "fps", "first_frame", "layout", "rows", "attributes", "source"}


class MotionError(ValueError):
    """A motion file or motion data is malformed; the message says what and how to fix it."""


@dataclass
class Motion:
    """A validated motion clip.

    rows: (N, 73) float32 (exp 64 | angle 3 | trans 3 | crop 3); attributes: name -> (N,) float32.
    """

    rows: np.ndarray
    fps: float = 25.0
    first_frame: int = 0
    attributes: dict[str, np.ndarray] = field(default_factory=dict)
    source: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        checked = _validate(
            {"format": FORMAT, "version": VERSION, "fps": self.fps, "first_frame": self.first_frame,
             "layout": list(LAYOUT), "rows": self.rows, "attributes": self.attributes,
             "source": self.source}, where="motion")
        self.rows, self.fps, self.first_frame = checked.rows, checked.fps, checked.first_frame
        self.attributes, self.source = checked.attributes, checked.source

    @property
    def num_frames(self) -> int:
        return int(self.rows.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dictionary of this clip (plain Python floats)."""
        out: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "fps": float(self.fps),
            "first_frame": int(self.first_frame), "layout": list(LAYOUT),
            "rows": [[float(v) for v in row] for row in self.rows],
        }
        if self.attributes:
            out["attributes"] = {k: [float(v) for v in a] for k, a in self.attributes.items()}
        if self.source is not None:
            out["source"] = self.source
        return out


def _fail(where: str, message: str) -> MotionError:
    return MotionError(f"{where}: {message}")


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(float(value))


def _as_float_array(value: Any, where: str, what: str, ndim: int) -> np.ndarray:
    if isinstance(value, np.ndarray):
        arr = value
        if arr.dtype.kind not in "fiu":
            raise _fail(where, f"{what} must hold numbers, got dtype {arr.dtype}")
    else:
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise _fail(where, f"{what} must be {'a list of lists' if ndim == 2 else 'a list'} of numbers "
                               f"(found a non-numeric or ragged entry)") from None
    if arr.ndim != ndim:
        raise _fail(where, f"{what} must be {ndim}-dimensional, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise _fail(where, f"{what} contains a non-finite value (NaN or infinity) at index {idx}; "
                           f"every value must be a finite number")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _validate(data: Any, where: str) -> Motion:
    if not isinstance(data, Mapping):
        raise _fail(where, f"expected a JSON object at the top level, got {type(data).__name__}")
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:
        raise _fail(where, f"unknown field(s) {unknown}; allowed fields are {sorted(_KNOWN_KEYS)}")
    if data.get("format") != FORMAT:
        raise _fail(where, f"'format' must be {FORMAT!r}, got {data.get('format')!r}; "
                           f"is this a StyleHEAT motion file?")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _fail(where, f"'version' must be the integer {VERSION}, got {version!r}")
    if version != VERSION:
        raise _fail(where, f"motion format version {version} is not supported (this StyleHEAT reads "
                           f"version {VERSION}); re-export the motion with a matching version")
    fps = data.get("fps", 25.0)
    if not _finite_number(fps) or float(fps) <= 0:
        raise _fail(where, f"'fps' must be a positive number, got {fps!r}")
    first = data.get("first_frame", 0)
    if isinstance(first, float) and first.is_integer():
        first = int(first)
    if not isinstance(first, (int, np.integer)) or isinstance(first, bool):
        raise _fail(where, f"'first_frame' must be an integer, got {first!r}")
    layout = data.get("layout", list(LAYOUT))
    if not isinstance(layout, (list, tuple)) or list(layout) != list(LAYOUT):
        raise _fail(where, f"'layout' must be {list(LAYOUT)} (73 coefficients: exp 64 | angle 3 | trans 3 | "
                           f"crop 3), got {layout!r}")
    if "rows" not in data:
        raise _fail(where, "missing 'rows': a list of frames, each a list of 73 numbers")
    rows_in = data["rows"]
    if not isinstance(rows_in, np.ndarray):
        if not isinstance(rows_in, (list, tuple)):
            raise _fail(where, f"'rows' must be a list of frames, got {type(rows_in).__name__}")
        if len(rows_in) == 0:
            raise _fail(where, "'rows' is empty: a motion needs at least one frame")
        for i, row in enumerate(rows_in):
            if not isinstance(row, (list, tuple)) or len(row) != N_COEFFS:
                got = f"{len(row)} values" if isinstance(row, (list, tuple)) else type(row).__name__
                raise _fail(where, f"'rows[{i}]' must be a list of {N_COEFFS} numbers "
                                   f"(exp 64 | angle 3 | trans 3 | crop 3), got {got}")
            for j, v in enumerate(row):
                if not _finite_number(v):
                    raise _fail(where, f"'rows[{i}][{j}]' must be a finite number, got {v!r}")
    elif rows_in.ndim == 2 and rows_in.shape[0] == 0:
        raise _fail(where, "'rows' is empty: a motion needs at least one frame")
    rows = _as_float_array(rows_in, where, "'rows'", 2)
    if rows.shape[0] == 0:
        raise _fail(where, "'rows' is empty: a motion needs at least one frame")
    if rows.shape[1] != N_COEFFS:
        raise _fail(where, f"'rows' must have {N_COEFFS} columns (exp 64 | angle 3 | trans 3 | crop 3), "
                           f"got shape {rows.shape}")
    n = rows.shape[0]
    attrs_in = data.get("attributes") or {}
    if not isinstance(attrs_in, Mapping):
        raise _fail(where, f"'attributes' must be an object {{name: [one number per row]}}, "
                           f"got {type(attrs_in).__name__}")
    attributes: dict[str, np.ndarray] = {}
    for name, values in attrs_in.items():
        if not isinstance(name, str) or not name:
            raise _fail(where, f"attribute names must be non-empty strings, got {name!r}")
        arr = _as_float_array(values, where, f"'attributes.{name}'", 1)
        if arr.shape[0] != n:
            raise _fail(where, f"'attributes.{name}' has {arr.shape[0]} values but there are {n} rows; "
                               f"give one strength per row")
        attributes[name] = arr
    source = data.get("source")
    if source is not None and not isinstance(source, Mapping):
        raise _fail(where, f"'source' must be an object (free-form provenance), got {type(source).__name__}")
    motion = Motion.__new__(Motion)  # already validated: skip __post_init__
    motion.rows, motion.fps, motion.first_frame = rows, float(fps), int(first)
    motion.attributes, motion.source = attributes, (dict(source) if source is not None else None)
    return motion


def motion_from_dict(data: Any, where: str = "motion") -> Motion:
    """Validate an already-parsed motion object (e.g. received over the wire)."""
    return _validate(data, where)


def read_motion(path: str | os.PathLike) -> Motion:
    """Read and validate a motion file; raises MotionError with a clear message on any problem."""
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MotionError(f"{where}: motion file not found; check the path") from None
    except IsADirectoryError:
        raise MotionError(f"{where}: is a directory, expected a motion .json file") from None
    except UnicodeDecodeError:
        raise MotionError(f"{where}: not a UTF-8 text file; a motion file is JSON") from None
    try:
        data = json.loads(text, parse_constant=lambda c: float(c))
    except json.JSONDecodeError as e:
        raise MotionError(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return _validate(data, where)


def write_motion(path: str | os.PathLike, rows: Motion | np.ndarray | Any, *, fps: float = 25.0,
                 first_frame: int = 0, attributes: Mapping[str, Any] | None = None,
                 source: Mapping[str, Any] | None = None) -> Path:
    """Validate and write a motion file atomically; ``rows`` is a Motion or an (N, 73) array.

    Returns the path written.
    """
    if isinstance(rows, Motion):
        motion = rows
    else:
        motion = _validate({"format": FORMAT, "version": VERSION, "fps": fps, "first_frame": first_frame,
                            "layout": list(LAYOUT), "rows": rows, "attributes": dict(attributes or {}),
                            "source": dict(source) if source is not None else None}, where=str(path))
    path = Path(path)
    text = json.dumps(motion.to_dict(), allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
