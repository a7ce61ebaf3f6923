"""bpy-free pieces of the render path: rig samples -> 73-value rows, windows, per-frame hashes,
the sidecar JSON, atomic PNG writes. Only numpy and the standard library (Blender ships both).

Row layout (the Deep3D 73-value descriptor StyleHEAT consumes)::

    [0:64]  expression   = e0 + raw + sum_k w_k * (P_k - e0) + b * (P_eyes - P_center)
    [64:67] angles (rad) = a0 + (rot_x, rot_z, rot_y)        Deep3D order: about x (pitch), y (yaw), z (roll)
    [67:70] translation  = t0 + (loc_x, loc_z, -loc_y)       Deep3D axes: x right, y up, z towards the camera
    [70:73] crop         = c0                                 always the portrait's own (s, t0, t1)

``e0, a0, t0, c0`` are the portrait's own coefficients (what the server measured on it), so a rig
at rest reproduces the portrait. ``P_k`` are the official intuitive-edit presets (mouth, eyebrow,
eyes, center) and ``w_k`` their keyframable weights; ``b`` is the blink weight (1 = eyes fully
closed), the server's blink offset ``w * (eyes - center)`` (``P_center`` zeros when the server has no
center preset, as the server does). The rig object's rotation is an XYZ Euler in
radians; Blender's Z is up and a face looks towards -Y, hence the axis swap.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

ROW_SIZE = 73
WINDOW_RADIUS = 13  # StyleHEAT: 27-frame window [i-13, i+13]
PRESET_NAMES = ("mouth", "eyebrow", "eyes", "center")
SIDECAR_NAME = "styleheat_frames.json"
SIDECAR_VERSION = 1


@dataclass
class RigSample:
    """What the rig says at one frame (already evaluated by Blender)."""
    rotation: Sequence[float]                # object XYZ Euler, radians
    location: Sequence[float]                # object location
    expression: Sequence[float]              # 64 raw expression offsets
    presets: Mapping[str, float] = field(default_factory=dict)     # preset weights
    attributes: Mapping[str, float] = field(default_factory=dict)  # attribute strengths
    blink: float = 0.0                       # blink weight (1 = eyes closed as the 'eyes' preset)


def rows_from_samples(samples: Sequence[RigSample], base: np.ndarray,
                      presets: Mapping[str, Sequence[float]] | None = None) -> np.ndarray:
    """(N, 73) float32 rows for N rig samples; ``base`` is the portrait's (73,) coefficients."""
    base = np.asarray(base, dtype=np.float64).reshape(-1)
    if base.shape != (ROW_SIZE,):
        raise ValueError(f"the portrait coefficients must have {ROW_SIZE} values, got {base.shape[0]}")
    presets = presets or {}
    e0 = base[0:64]
    rows = np.empty((len(samples), ROW_SIZE), dtype=np.float64)
    for i, s in enumerate(samples):
        exp = e0 + np.asarray(s.expression, dtype=np.float64).reshape(64)
        for name, weight in s.presets.items():
            if weight and name in presets:
                exp = exp + float(weight) * (np.asarray(presets[name], dtype=np.float64) - e0)
        if s.blink and "eyes" in presets:
            exp = exp + float(s.blink) * blink_direction(presets)
        rx, ry, rz = (float(v) for v in s.rotation)
        lx, ly, lz = (float(v) for v in s.location)
        rows[i, 0:64] = exp
        rows[i, 64:67] = base[64:67] + (rx, rz, ry)
        rows[i, 67:70] = base[67:70] + (lx, lz, -ly)
        rows[i, 70:73] = base[70:73]
    if not np.isfinite(rows).all():
        raise ValueError("the face rig produced a non-finite value (NaN or inf); check its keys and drivers")
    return rows.astype(np.float32)


EXPRESSION_PATH = "styleheat.expression"
BLINK_PATH = "styleheat.blink"


def blink_direction(presets: Mapping[str, Sequence[float]]) -> np.ndarray:
    """(64,) what a blink weight of 1 adds to the expression: ``P_eyes - P_center`` (the server's
    blink offset; ``P_center`` zeros when absent, as on the server)."""
    eyes = np.asarray(presets["eyes"], dtype=np.float64).reshape(64)
    center = presets.get("center")
    center = np.zeros(64) if center is None else np.asarray(center, dtype=np.float64).reshape(64)
    return eyes - center


def rig_channels_from_rows(rows: np.ndarray, base: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
    """The inverse of :func:`rows_from_samples` with the preset weights at 0: the rig values
    (F-curve data path, array index) -> (N,) values that reproduce ``rows`` (N, 73) on a rig whose
    portrait coefficients are ``base``. The crop (70:73) is not animatable and is dropped.

    expression[k] = row[k] - e0[k]; rotation (x, y, z) = (d64, d66, d65); location (x, y, z) =
    (d67, -d69, d68) with d = row - base."""
    rows = np.asarray(rows, dtype=np.float64)
    base = np.asarray(base, dtype=np.float64).reshape(-1)
    if rows.ndim != 2 or rows.shape[1] != ROW_SIZE:
        raise ValueError(f"rows must be (N, {ROW_SIZE}), got {rows.shape}")
    if base.shape != (ROW_SIZE,):
        raise ValueError(f"the portrait coefficients must have {ROW_SIZE} values, got {base.shape[0]}")
    d = rows - base[None, :]
    out: dict[tuple[str, int], np.ndarray] = {}
    for k in range(64):
        out[(EXPRESSION_PATH, k)] = d[:, k]
    out[("rotation_euler", 0)] = d[:, 64]
    out[("rotation_euler", 1)] = d[:, 66]
    out[("rotation_euler", 2)] = d[:, 65]
    out[("location", 0)] = d[:, 67]
    out[("location", 1)] = -d[:, 69]
    out[("location", 2)] = d[:, 68]
    return out


def expression_offsets(expressions: np.ndarray, e0: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Audio2Exp's absolute (N, 64) expressions -> raw rig offsets ``scale * (exp - e0)``."""
    exp = np.asarray(expressions, dtype=np.float64)
    e0 = np.asarray(e0, dtype=np.float64).reshape(64)
    if exp.ndim != 2 or exp.shape[1] != 64:
        raise ValueError(f"expressions must be (N, 64), got {exp.shape}")
    return float(scale) * (exp - e0[None, :])


def window_indices(i: int, n: int, radius: int = WINDOW_RADIUS) -> np.ndarray:
    """Row indices of the window around row i of an n-row clip, clamped to [0, n-1] (official)."""
    return np.clip(np.arange(i - radius, i + radius + 1), 0, n - 1)


def clip_range(start: int, end: int, keyed: tuple[float, float] | None,
               radius: int = WINDOW_RADIUS) -> tuple[int, int]:
    """Frames [lo, hi] to sample so every window of [start, end] sees the curves beyond the
    render range where keys exist: widened by ``radius`` but not past the first/last key."""
    if end < start:
        raise ValueError(f"empty frame range {start}..{end}")
    lo, hi = start, end
    if keyed is not None:
        k0, k1 = int(np.floor(keyed[0])), int(np.ceil(keyed[1]))
        lo = min(start, max(start - radius, k0))
        hi = max(end, min(end + radius, k1))
    return lo, hi


def _digest(h, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    h.update(str(arr.dtype).encode())
    h.update(str(arr.shape).encode())
    h.update(arr.tobytes())


def output_hash_extra(output: str | None) -> str:
    """The ``extra`` key text of a render output (``server.protocol.output_hash_extra``): "" for the face
    crop (sidecars written before outputs existed stay valid), ``output=<name>`` otherwise."""
    return "" if not output or output == "crop" else f"output={output}"


def frame_hashes(identity: str, model: str, size: int, rows: np.ndarray, frames: Iterable[int],
                 audio: np.ndarray | None = None, samples_per_frame: float = 0.0,
                 attributes: Mapping[str, np.ndarray] | None = None,
                 extra: str = "") -> dict[int, str]:
    """Per clip-row hash of everything that decides the pixels of that frame.

    rows: (N, 73) clip rows; frames: row indices to hash; audio: mono PCM of the clip (row 0 at
    sample 0) -- the slice covering the frame's 27-frame window is hashed; attributes: per-row
    strengths (the window's values are hashed, a server may smooth them).
    """
    n = rows.shape[0]
    out: dict[int, str] = {}
    for i in frames:
        win = window_indices(int(i), n)
        h = hashlib.sha256()
        h.update(f"styleheat-frame/1|{identity}|{model}|{size}|{extra}".encode())
        _digest(h, rows[win].astype(np.float32))
        if attributes:
            for name in sorted(attributes):
                h.update(name.encode())
                _digest(h, np.asarray(attributes[name], dtype=np.float32)[win])
        if audio is not None and samples_per_frame > 0:
            a = int(round((i - WINDOW_RADIUS) * samples_per_frame))
            b = int(round((i + WINDOW_RADIUS + 1) * samples_per_frame))
            h.update(f"audio|{a}|{b}".encode())
            _digest(h, np.asarray(audio, dtype=np.float32)[max(a, 0):max(b, 0)])
        out[int(i)] = h.hexdigest()
    return out


# --- sidecar -------------------------------------------------------------------------------

def load_sidecar(directory: str) -> dict[str, dict]:
    """{"<frame>": {"hash": ..., "file": ...}} of the frames already rendered in ``directory``."""
    path = os.path.join(directory, SIDECAR_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if data.get("version") != SIDECAR_VERSION or not isinstance(data.get("frames"), dict):
        return {}
    return data["frames"]


def save_sidecar(directory: str, frames: Mapping[str, dict], info: Mapping | None = None) -> None:
    path = os.path.join(directory, SIDECAR_NAME)
    payload = {"format": "styleheat-frames", "version": SIDECAR_VERSION, "info": dict(info or {}),
               "frames": dict(sorted(frames.items(), key=lambda kv: int(kv[0])))}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def is_current(sidecar: Mapping[str, dict], directory: str, frame: int, digest: str) -> bool:
    entry = sidecar.get(str(frame))
    return bool(entry and entry.get("hash") == digest
                and os.path.isfile(os.path.join(directory, entry.get("file", ""))))


# --- PNG -----------------------------------------------------------------------------------

def encode_png(rgb: np.ndarray, level: int = 3) -> bytes:
    """8-bit RGB/RGBA PNG bytes of an (H, W, 3|4) uint8 array (top row first)."""
    rgb = np.ascontiguousarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3|4) uint8 image, got {rgb.dtype} {rgb.shape}")
    h, w, c = rgb.shape
    raw = np.empty((h, 1 + w * c), dtype=np.uint8)
    raw[:, 0] = 0  # filter: none
    raw[:, 1:] = rgb.reshape(h, w * c)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 6 if c == 4 else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) + chunk(b"IEND", b""))


def write_png_atomic(path: str, rgb: np.ndarray) -> None:
    """Write through a temporary name and rename, so a file at ``path`` is always complete."""
    tmp = f"{path}.part{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(encode_png(rgb))
    os.replace(tmp, path)


def frame_filename(prefix: str, frame: int) -> str:
    return f"{prefix}_{frame:04d}.png" if frame >= 0 else f"{prefix}_-{-frame:04d}.png"
