"""Which frames a farm job renders, in which chunks, and the manifest that makes re-runs resume.

The manifest (``OUT/styleheat_farm.json``) maps every finished row to the hash of its inputs
(:func:`server.protocol.frame_hashes`) and its file. Only the driver writes it, atomically, after each
finished chunk; a re-run renders the rows whose hash changed or whose file is missing.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

MANIFEST_NAME = "styleheat_farm.json"
MANIFEST_FORMAT = "styleheat-farm-manifest"
MANIFEST_VERSION = 1


def frame_file(row: int) -> str:
    """The file of clip row ``row``: the names `styleheat render` writes."""
    return f"frame_{row:05d}.png"


def portrait_identity(image: np.ndarray) -> str:
    """Content hash of the portrait pixels (the same key Engine.prepare_identity caches by)."""
    import hashlib

    image = np.ascontiguousarray(image)
    return hashlib.sha256(f"{image.shape}".encode() + image.tobytes()).hexdigest()[:20]


@dataclass
class Manifest:
    frames: dict[str, dict] = field(default_factory=dict)   # "row" -> {"hash": ..., "file": ...}
    info: dict = field(default_factory=dict)

    @classmethod
    def load(cls, out: Path) -> "Manifest":
        """The manifest in ``out``; an empty one if missing or unreadable (then every frame is re-rendered)."""
        try:
            data = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls()
        if (not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT
                or data.get("version") != MANIFEST_VERSION or not isinstance(data.get("frames"), dict)):
            return cls()
        return cls(frames=dict(data["frames"]), info=dict(data.get("info") or {}))

    def save(self, out: Path) -> None:
        """Atomic write (temporary file + os.replace): a reader never sees half a manifest."""
        payload = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "info": self.info,
                   "frames": dict(sorted(self.frames.items(), key=lambda kv: int(kv[0])))}
        path = out / MANIFEST_NAME
        tmp = out / f".{MANIFEST_NAME}.tmp"
        tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        os.replace(tmp, path)

    def record(self, rows: Iterable[int], hashes: Mapping[int, str]) -> None:
        for r in rows:
            self.frames[str(int(r))] = {"hash": hashes[int(r)], "file": frame_file(int(r))}

    def is_current(self, out: Path, row: int, digest: str) -> bool:
        entry = self.frames.get(str(row))
        return bool(isinstance(entry, dict) and entry.get("hash") == digest
                    and (out / str(entry.get("file", ""))).is_file())


def frames_to_render(manifest: Manifest, out: Path, hashes: Mapping[int, str]) -> list[int]:
    """Rows whose frame is missing or whose inputs changed since the manifest recorded it, ascending."""
    return sorted(r for r, h in hashes.items() if not manifest.is_current(out, r, h))


def make_chunks(rows: Iterable[int], chunk: int) -> list[list[int]]:
    """Contiguous runs of ``rows`` cut into chunks of at most ``chunk`` rows (a gap starts a new chunk)."""
    if chunk < 1:
        raise ValueError(f"--chunk must be at least 1, got {chunk}")
    chunks: list[list[int]] = []
    for r in sorted(set(int(x) for x in rows)):
        if chunks and chunks[-1][-1] == r - 1 and len(chunks[-1]) < chunk:
            chunks[-1].append(r)
        else:
            chunks.append([r])
    return chunks
