"""The generated plate of the dub tests (server request and add-on): the fixtures portrait, shrunk to FACE px,
moved along a known path over a gradient, W x H, N frames at FPS as MJPG AVI; in the BLANK frames the face
is painted over (no face there)."""
from __future__ import annotations

import math

import cv2
import numpy as np

W, H, N, FPS = 160, 120, 30, 25.0
FACE = 96
BLANK = (12, 13)


def path(k: int) -> tuple[int, int]:
    """(x, y) of the face's top-left corner in plate frame ``k``."""
    return 32 + int(round(6 * math.sin(2 * math.pi * k / N))), 12 + int(round(3 * math.sin(4 * math.pi * k / N)))


def write_plate(file, face: np.ndarray | None, n: int = N, blank=BLANK) -> None:
    writer = cv2.VideoWriter(str(file), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
    assert writer.isOpened()
    yy, xx = np.mgrid[:H, :W]
    bg = np.stack([xx * 255 // W, yy * 255 // H, np.full_like(xx, 120)], -1).astype(np.uint8)
    for k in range(n):
        frame = bg.copy()
        if face is not None:
            x, y = path(k)
            frame[y:y + FACE, x:x + FACE] = 128 if k in blank else face
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def decode(file) -> list[np.ndarray]:
    """Every frame of a video file as RGB (at most 500)."""
    cap = cv2.VideoCapture(str(file))
    out = []
    while len(out) < 500:
        ok, f = cap.read()
        if not ok:
            break
        out.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    cap.release()
    return out
