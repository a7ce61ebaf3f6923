"""The farm's actor: one per GPU (``num_gpus=1``) or per requested CPU worker.

It builds the engine once (in the constructor, which Ray runs again only when it restarts a dead actor)
and inverts the portrait once (at its first chunk; the engine caches the inversion), then renders the chunks the driver hands it and writes each
frame atomically into the job folder (shared storage). It never writes the manifest.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

#: fault injection for tests and drills: a file of this name in the job folder makes the first worker
#: that claims it (by renaming it) exit abruptly in the middle of its chunk, once
CRASH_MARKER = ".styleheat-farm-crash-once"


def build_engine(spec: Mapping[str, Any]):
    """The Engine described by ``spec``: {"kind": "tiny", "seed"} | {"kind": "checkpoints", "path",
    "config"} | {"kind": "bundle", "path"}, plus "device" and "precision" (None = the loader's default)."""
    from server.engine import Engine

    device = spec.get("device") or "auto"
    options = {"precision": spec["precision"]} if spec.get("precision") else {}
    kind = spec["kind"]
    if kind == "tiny":
        return Engine.tiny_random(seed=int(spec.get("seed", 0)), device=device, **options)
    if kind == "bundle":
        return Engine.from_bundle(spec["path"], device=device, **options)
    if kind == "checkpoints":
        config = None
        if spec.get("config"):
            from models.styleheat import StyleHEATConfig

            config = StyleHEATConfig.from_dict(spec["config"])
        return Engine.from_checkpoints(spec["path"], device=device, config=config, **options)
    raise ValueError(f"unknown engine kind {kind!r}")


class FarmWorker:
    """Plain class; the driver turns it into a Ray actor (``ray.remote(...)(FarmWorker)``)."""

    def __init__(self, spec: Mapping[str, Any], out: str, size: int | None, batch_size: int | None):
        # only small arguments here: Ray re-runs the constructor on restart, and keeps no large ones for it
        t0 = time.time()
        self.pid = os.getpid()
        self.engine = build_engine(spec)
        self.engines_built = 1
        self.load_seconds = time.time() - t0
        self.inversions = 0
        self.identity: str | None = None
        self.out = Path(out)
        self.size = size
        self.batch = int(batch_size) if batch_size else self.engine.default_batch_size
        self.frames_written = 0
        self.chunks_done = 0
        self.oom_halvings = 0

    def prepare(self, portrait: np.ndarray) -> str:
        """Invert the portrait unless this process already did (the engine caches it by content hash)."""
        before = set(self.engine.identity_ids())
        info = self.engine.prepare_identity(portrait)
        if info.id not in before:
            self.inversions += 1
        self.identity = info.id
        return info.id

    def info(self) -> dict:
        """Counters the driver reports: pid, how often this process built the model and inverted the
        portrait, frames and chunks done, batch size now, out-of-memory halvings, device."""
        return {"pid": self.pid, "engines_built": self.engines_built, "inversions": self.inversions,
                "frames_written": self.frames_written, "chunks_done": self.chunks_done, "batch_size": self.batch,
                "oom_halvings": self.oom_halvings, "device": str(self.engine.device),
                "model": self.engine.model_name, "load_seconds": round(self.load_seconds, 2),
                "node": _node_address()}

    def render_chunk(self, frames: list[int], portrait: np.ndarray, rows: np.ndarray,
                     attributes: Mapping[str, np.ndarray] | None, mel: np.ndarray | None,
                     placing: Mapping[str, Any] | None = None) -> dict:
        """Render ``frames`` (clip rows) and write them; on out-of-memory halve the batch (as the server
        does) and go on with the frames not yet written. The clip's arrays come with every chunk as
        object-store references (no copy on the same machine; the portrait is inverted once per process).
        ``placing`` (output composite/matte): the photo, the crop's quad in it and the seam; each frame is
        pasted back before it is written. Returns {"frames": rows written, **info()}."""
        from server.frame_files import write_png_atomic
        from server.service.worker import is_out_of_memory, release_device_memory
        from server.shots.compositing import Placement, place

        finish = (lambda img: img)
        if placing:
            placement = Placement(placing["quad"], tuple(placing["shape"]))
            finish = (lambda img: place(img, placing["output"], source=placing["photo"], placement=placement,
                                        seam=placing.get("seam", "feather")))

        identity = self.prepare(portrait)
        todo = [int(f) for f in frames]
        done: list[int] = []
        while todo:
            try:
                for row, image in self.engine.render(identity, rows, todo, audio=mel,
                                                     attributes=attributes or None, size=self.size,
                                                     batch_size=self.batch):
                    write_png_atomic(self.out / f"frame_{row:05d}.png", finish(image))
                    done.append(row)
                    self.frames_written += 1
                    if len(done) == 1 and len(frames) > 1:
                        self._maybe_crash()
                todo = []
            except Exception as exc:  # noqa: BLE001 -- only out-of-memory is handled here
                if not is_out_of_memory(exc):
                    raise
                release_device_memory()
                if self.batch <= 1:
                    raise MemoryError("the device ran out of memory even at batch size 1; render a smaller "
                                      "--size or free GPU memory") from None
                self.batch = max(1, self.batch // 2)
                self.oom_halvings += 1
                finished = set(done)
                todo = [f for f in todo if f not in finished]
        self.chunks_done += 1
        return {"frames": done, **self.info()}

    def _maybe_crash(self) -> None:
        marker = self.out / CRASH_MARKER
        try:
            os.rename(marker, self.out / f"{CRASH_MARKER}.taken")   # exactly one worker wins
        except OSError:
            return
        os._exit(3)


def _node_address() -> str | None:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 -- not inside Ray
        return None
