"""The tracker seam: what the engine, the server and training need from a face tracker.

A tracker turns a driving video into per-frame 73-value 3DMM rows (exp 64 | angle 3 | trans 3 |
crop 3, the layout StyleHEAT's warpers read) and gives a portrait its own row. The shipped one is
``server.preprocessing.tracking.DlibDeep3DTracker`` (dlib 68 landmarks + Deep3DFaceRecon's ResNet-50), built by
``server.preprocessing.tracking.load_tracker``. Another tracker implements :class:`Tracker` and is passed in where
one is used: ``Engine(tracker=...)``, ``server.service.bake_models.BakeModels(tracker=...)``,
``training.prepare.prepare_video(video, out, tracker)``; nothing else has to change.

Errors a tracker raises: :class:`VideoError` (the video cannot be used; the message says why and what
to do) and :class:`Cancelled` (``should_stop()`` returned True). Pure Python, below ``server/`` and
``training/``.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Protocol

import numpy as np

ProgressFn = Callable[[str, int, int], None]   # (stage, done, total); total 0 when unknown


class VideoError(ValueError):
    """The driving video cannot be used; the message says why and what to do."""


class Cancelled(Exception):
    """``should_stop()`` returned True while a video was being tracked."""


class Track(Protocol):
    """One tracked video."""

    rows: np.ndarray        # (N, 73) float32, one row per frame
    fps: float              # of the rows (the video's rate)
    warnings: list[str]     # things the user should know (frames without a face, ...)

    def crops(self, size: int) -> Iterator[np.ndarray]:
        """The N frames as the rows describe them: (size, size, 3) uint8 RGB crops, in order."""

    def landmarks_at(self, size: int) -> np.ndarray:
        """(N, 68, 2) float landmarks (x right, y down, pixels) in the crops of :meth:`crops` at ``size``."""

    def provenance(self, video: str | os.PathLike) -> dict:
        """A JSON-able record of how the rows were made (for motion files and datasets)."""


class Tracker(Protocol):
    description: str        # one line for logs and notes, e.g. which models run inside

    def track(self, video: str | os.PathLike, *, curve_sigma: float = 0.0, max_frames: int | None = None,
              progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> Track:
        """Track a driving video file; ``curve_sigma`` > 0 Gaussian-smooths the row curves (frames)."""

    def portrait_row(self, image: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        """(73,) float32 row of an FFHQ-aligned square RGB uint8 portrait, or (None, why not)."""
