"""Image bytes in and out of the server: PNG/JPEG decoding with size checks before decoding, PNG encoding."""
from __future__ import annotations

import os

import numpy as np

from server import protocol as P

# OpenCV's own decoder cap (read on its first decode): a backstop behind image_size, so no image can
# make the decoder allocate more than a MAX_IMAGE_SIDE square
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(P.MAX_IMAGE_SIDE * P.MAX_IMAGE_SIDE))

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def encode_png(rgb: np.ndarray) -> bytes:
    """(H, W, 3) RGB or (H, W, 4) straight-alpha RGBA uint8 -> PNG bytes."""
    import cv2

    bgr = rgb[..., [2, 1, 0, 3]] if rgb.shape[2] == 4 else rgb[..., ::-1]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("OpenCV could not encode a PNG")
    return buf.tobytes()


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or a JPEG SOF header, without decoding; None if not found.

    The JPEG scan reads markers as a decoder does: bytes between segments that are not 0xFF (stray
    bytes) are skipped up to the next marker, 0xFF fill bytes are skipped, standalone markers have no
    length, and the first SOF gives the size. None when the scan reaches the scan data (SOS), the end
    (EOI) or the end of the bytes first: such an image is refused, never decoded blind.
    """
    if data.startswith(PNG_MAGIC):
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return None
    if not data.startswith(b"\xff\xd8"):
        return None
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:             # stray byte before a marker: skip to the next 0xFF
            j = data.find(b"\xff", i)
            if j < 0:
                return None
            i = j
        while i < n and data[i] == 0xFF:   # fill bytes
            i += 1
        if i >= n:
            return None
        marker = data[i]
        i += 1
        if marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD8:   # stuffed zero, TEM, RSTn, SOI
            continue
        if marker in (0xD9, 0xDA):      # EOI or the scan data before any frame header
            return None
        if i + 2 > n:
            return None
        length = int.from_bytes(data[i:i + 2], "big")
        if length < 2:
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 7 > n:
                return None
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 3:i + 5], "big")
        i += length
    return None


def check_image_size(data: bytes) -> tuple[int, int]:
    """(width, height) read from the header; ProtocolError(bad_image) when it cannot be read or is out of
    bounds. Cheap (no decoding): the server runs it before queueing a ``prepare``."""
    if not (data.startswith(PNG_MAGIC) or data.startswith(JPEG_MAGIC)):
        raise P.ProtocolError(P.E_BAD_IMAGE, "the image part is neither PNG nor JPEG; send the file bytes "
                                             "of a .png or .jpg portrait")
    dims = image_size(data)
    if dims is None:
        raise P.ProtocolError(P.E_BAD_IMAGE, "the image's size cannot be read from its header (damaged or "
                                             "unusual PNG/JPEG); re-export the portrait as a plain PNG or JPEG")
    w, h = dims
    if min(w, h) < P.MIN_IMAGE_SIDE or max(w, h) > P.MAX_IMAGE_SIDE:
        raise P.ProtocolError(P.E_BAD_IMAGE, f"the image is {w}x{h}; sides must be between {P.MIN_IMAGE_SIDE} "
                                             f"and {P.MAX_IMAGE_SIDE} pixels (downscale the portrait)")
    return w, h


def decode_image(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB from PNG/JPEG bytes; ProtocolError(bad_image) otherwise."""
    check_image_size(data)
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise P.ProtocolError(P.E_BAD_IMAGE, "OpenCV could not decode the image (truncated or corrupt "
                                             "PNG/JPEG); re-export the portrait")
    h, w = bgr.shape[:2]
    if min(h, w) < P.MIN_IMAGE_SIDE or max(h, w) > P.MAX_IMAGE_SIDE:
        raise P.ProtocolError(P.E_BAD_IMAGE, f"the image is {w}x{h}; sides must be between "
                                             f"{P.MIN_IMAGE_SIDE} and {P.MAX_IMAGE_SIDE} pixels")
    return np.ascontiguousarray(bgr[..., ::-1])

