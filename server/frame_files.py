"""Image files in and frame files out, shared by render, dub and the farm (no CLI code here).

* :func:`read_portrait` -- an image file as (H, W, 3) uint8 RGB, with a clear error for what is wrong;
* :func:`write_png_atomic` -- an RGB or RGBA frame as PNG under a temporary name, then renamed, so a
  cancelled or crashed render never leaves a half-written frame under a frame's name;
* :func:`write_bytes_atomic` -- the same for bytes already encoded (manifests, reports).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


#: the largest photo side read (as the server's MAX_IMAGE_SIDE): 8192 px is 8K; larger files are refused
#: from their header, before any pixel is decoded
MAX_PHOTO_SIDE = 8192


def read_portrait(path: Path, *, square: bool = True, option: str = "--source") -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file; ValueError with a clear message.

    ``square``: the image must be an FFHQ-aligned square portrait (the crop path); say how to align it.
    16-bit and CMYK files are converted to 8-bit RGB by OpenCV (16-bit: the high byte; CMYK JPEG: its
    colour conversion); a side over MAX_PHOTO_SIDE is refused from the file's header.
    """
    import cv2
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{option} {path}: file not found")
    try:
        with Image.open(path) as im:      # reads the header only
            w0, h0 = im.size
    except Exception:  # not an image PIL knows; OpenCV below says so
        w0 = h0 = 0
    if max(w0, h0) > MAX_PHOTO_SIDE:
        raise ValueError(f"{option} {path}: the image is {w0}x{h0}; sides must be at most {MAX_PHOTO_SIDE} "
                         f"pixels (scale it down: a face needs no more than about 2000 pixels a side)")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{option} {path}: not an image OpenCV can read (use PNG or JPEG)")
    h, w = bgr.shape[:2]
    if square and h != w:
        raise ValueError(f"{option} {path}: the portrait is {w}x{h}, not square; align it first "
                         f"('styleheat align --image {path} --out aligned.png')")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written leftovers next to the frames
        raise


def write_png_atomic(path: Path, image: np.ndarray) -> None:
    """(H, W, 3) RGB or (H, W, 4) RGBA uint8 -> PNG at ``path``, atomically."""
    import cv2

    path = Path(path)
    conv = cv2.COLOR_RGBA2BGRA if image.shape[2] == 4 else cv2.COLOR_RGB2BGR
    ok, data = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(image), conv))
    if not ok:
        raise OSError(f"could not encode {path.name} as PNG")
    write_bytes_atomic(path, data.tobytes())
