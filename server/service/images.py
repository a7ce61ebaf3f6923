"""Image bytes in and out of the server: PNG/JPEG decoding with size checks before decoding, PNG encoding."""
from __future__ import annotations

import numpy as np

from server import protocol as P

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
    """(width, height) from a PNG IHDR or a JPEG SOF header, without decoding; None if not found."""
    if data.startswith(PNG_MAGIC):
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if length < 2:
            return None
        i += 2 + length
    return None


def decode_image(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB from PNG/JPEG bytes; ProtocolError(bad_image) otherwise."""
    if not (data.startswith(PNG_MAGIC) or data.startswith(JPEG_MAGIC)):
        raise P.ProtocolError(P.E_BAD_IMAGE, "the image part is neither PNG nor JPEG; send the file bytes "
                                             "of a .png or .jpg portrait")
    dims = image_size(data)
    if dims is not None and max(dims) > P.MAX_IMAGE_SIDE:
        raise P.ProtocolError(P.E_BAD_IMAGE, f"the image is {dims[0]}x{dims[1]}; sides must be at most "
                                             f"{P.MAX_IMAGE_SIDE} pixels (downscale the portrait)")
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

