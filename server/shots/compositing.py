"""Put a rendered face crop back into the photo or plate it came from: composite and matte.

The alignment (``server/preprocessing/align.py``) maps an oriented square of the source image, the FFHQ
``quad`` [upper-left, lower-left, lower-right, upper-right], onto the S x S crop the networks see. Its
inverse places every rendered crop back where the face was: a :class:`Placement` holds the quad and the
source's size, and gives both affine maps (crop -> source and source -> crop, pixel centres at integer
coordinates, the convention of ``align.quad_to_output``).

The mask (how much of the crop replaces the source) is a soft ellipse in crop space, :class:`MaskSpec`:
alpha is exactly 1 inside ``(1 - feather)`` of the ellipse, exactly 0 outside it, and a smoothstep in
between. The default ellipse covers the face, the hair above it and the top of the neck of an FFHQ crop
(centre (0.5, 0.5), half-axes 0.37 x 0.47 of the side, outer 30 % feathered); everything outside it (the
crop's corners: background, shoulders, hair that falls past the ellipse) stays the source's own pixels.
See docs/compositing.md for what that does to hair, neck and background, and the seam options.

Seams: ``"feather"`` (default) blends across the soft band; ``"poisson"`` additionally runs OpenCV's
seamless cloning (``cv2.seamlessClone``, NORMAL_CLONE) of the masked region, which matches the crop's
colours to the source along the band at the cost of shifting the face's colours a little and of
~10x the time. A matte has no background to match and is always feathered.

All functions are pure: numpy arrays in, numpy arrays out; nothing reads or writes files.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

OUTPUTS = ("crop", "composite", "matte")
SEAMS = ("feather", "poisson")

#: what each render output is, in words (the server's hello lists these)
OUTPUT_TEXT = {
    "crop": "the aligned square face crop the networks render (today's output)",
    "composite": "the rendered crop warped back into the source photo at the photo's own size and blended in "
                 "with a soft head mask; outside the mask the photo's pixels are unchanged",
    "matte": "the same placement as composite, as RGBA at the photo's size: straight (not premultiplied) "
             "colour, alpha = the soft head mask, 0 elsewhere",
}


@dataclass(frozen=True)
class MaskSpec:
    """A soft ellipse in crop coordinates (fractions of the crop side)."""

    cx: float = 0.5
    cy: float = 0.5
    rx: float = 0.37
    ry: float = 0.47
    feather: float = 0.30  # outer fraction of the ellipse's radius over which alpha falls from 1 to 0

    def __post_init__(self):
        if not (0 < self.rx and 0 < self.ry and 0 < self.feather <= 1):
            raise ValueError(f"mask: radii must be > 0 and feather in (0, 1], got {self}")


DEFAULT_MASK = MaskSpec()


def crop_mask(size: int, spec: MaskSpec = DEFAULT_MASK) -> np.ndarray:
    """(size, size) float32 alpha in [0, 1] of the crop: 1 inside, smoothstep band, exactly 0 outside."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    x = (c[None, :] - spec.cx) / spec.rx
    y = (c[:, None] - spec.cy) / spec.ry
    d = np.sqrt(x * x + y * y)                                  # 1 on the ellipse
    t = np.clip((1.0 - d) / spec.feather, 0.0, 1.0)             # 0 outside, 1 inside the inner ellipse
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)         # smoothstep: no kink at either edge


@dataclass(frozen=True, eq=False)
class Placement:
    """Where an S x S face crop sits in its source image.

    quad: (4, 2) float64 source pixel coordinates of the crop's corners [upper-left, lower-left,
    lower-right, upper-right] (``AlignedPortrait.quad``); source_shape: (height, width) of the source.
    """

    quad: np.ndarray
    source_shape: tuple[int, int]
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        q = np.asarray(self.quad, dtype=np.float64)
        if q.shape != (4, 2) or not np.all(np.isfinite(q)):
            raise ValueError(f"placement quad must be 4 finite (x, y) corners, got shape {q.shape}")
        h, w = (int(v) for v in self.source_shape)
        if h < 1 or w < 1:
            raise ValueError(f"placement source size must be positive, got {self.source_shape}")
        side = np.hypot(*(q[3] - q[0]))
        if side < 1e-3:
            raise ValueError("placement quad is degenerate (zero size)")
        object.__setattr__(self, "quad", q)
        object.__setattr__(self, "source_shape", (h, w))

    @classmethod
    def identity(cls, size: int) -> "Placement":
        """The placement of a crop that is its own source (an already aligned portrait)."""
        s = float(size) - 0.5
        return cls(np.array([[-0.5, -0.5], [-0.5, s], [s, s], [s, -0.5]]), (size, size))

    def key(self) -> tuple:
        """Hashable value of the placement (for render keys and caches)."""
        return (tuple(np.round(self.quad, 4).ravel().tolist()), self.source_shape)

    def crop_to_source(self, size: int) -> np.ndarray:
        """(2, 3) affine: crop pixel (u, v) of an S=size crop -> source pixel (x, y)."""
        q = self.quad
        ex = (q[3] - q[0]) / size
        ey = (q[1] - q[0]) / size
        # the crop pixel (u, v) lies at q0 + (u + 0.5) ex + (v + 0.5) ey: the quad's corner q0 is the outer
        # edge of crop pixel (0, 0) (the convention of align.quad_to_output)
        origin = q[0] + 0.5 * (ex + ey)
        return np.array([[ex[0], ey[0], origin[0]], [ex[1], ey[1], origin[1]]], dtype=np.float64)

    def source_to_crop(self, size: int) -> np.ndarray:
        """(2, 3) affine: source pixel (x, y) -> crop pixel (u, v) of an S=size crop."""
        a = self.crop_to_source(size)
        m_inv = np.linalg.inv(a[:, :2])
        return np.concatenate([m_inv, -(m_inv @ a[:, 2:])], axis=1)

    def roi(self) -> tuple[int, int, int, int] | None:
        """(x0, y0, x1, y1) of the source pixels the crop can touch (clipped), or None if none."""
        h, w = self.source_shape
        lo = np.floor(self.quad.min(axis=0)).astype(int) - 1
        hi = np.ceil(self.quad.max(axis=0)).astype(int) + 2
        x0, y0 = max(int(lo[0]), 0), max(int(lo[1]), 0)
        x1, y1 = min(int(hi[0]), w), min(int(hi[1]), h)
        if x1 <= x0 or y1 <= y0:
            return None
        return x0, y0, x1, y1

    def _roi_affine(self, size: int, roi: tuple[int, int, int, int]) -> np.ndarray:
        """source_to_crop with the ROI's origin as (0, 0)."""
        key = ("affine", size, roi)
        if key not in self._cache:
            m = self.source_to_crop(size).copy()
            x0, y0 = roi[0], roi[1]
            m[:, 2] += m[:, 0] * x0 + m[:, 1] * y0
            self._cache[key] = m
        return self._cache[key]

    def source_alpha(self, size: int, spec: MaskSpec = DEFAULT_MASK) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
        """The crop mask in source space over the ROI: (roi, (h, w) float32 alpha), cached per size."""
        key = ("alpha", size, spec)
        if key not in self._cache:
            import cv2

            roi = self.roi()
            if roi is None:
                self._cache[key] = None
            else:
                m = self._roi_affine(size, roi)
                a = cv2.warpAffine(crop_mask(size, spec), m, (roi[2] - roi[0], roi[3] - roi[1]),
                                   flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                                   borderValue=0.0)
                a = np.clip(a, 0.0, 1.0)
                ys, xs = np.nonzero(a > 0)
                if len(xs) == 0:
                    self._cache[key] = None
                else:  # shrink the region to where alpha > 0: only those pixels are ever touched
                    bx0, by0, bx1, by1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
                    tight = (roi[0] + bx0, roi[1] + by0, roi[0] + bx1, roi[1] + by1)
                    self._cache[key] = (tight, np.ascontiguousarray(a[by0:by1, bx0:bx1]))
        return self._cache[key]


    def _outside(self, size: int, spec: MaskSpec) -> np.ndarray:
        key = ("outside", size, spec)
        if key not in self._cache:
            self._cache[key] = (self.source_alpha(size, spec)[1] <= 0.0)[:, :, None]
        return self._cache[key]

    def _one_minus(self, size: int, spec: MaskSpec) -> np.ndarray:
        key = ("1-alpha", size, spec)
        if key not in self._cache:
            self._cache[key] = np.ascontiguousarray(1.0 - self.source_alpha(size, spec)[1])
        return self._cache[key]


def _check_frame(frame: np.ndarray) -> int:
    f = np.asarray(frame)
    if f.ndim != 3 or f.shape[2] != 3 or f.shape[0] != f.shape[1] or f.dtype != np.uint8:
        raise ValueError(f"a rendered crop must be a square (S, S, 3) uint8 image, got {f.shape} {f.dtype}")
    return int(f.shape[0])


def _warped_roi(frame: np.ndarray, placement: Placement, roi: tuple[int, int, int, int]) -> np.ndarray:
    import cv2

    size = frame.shape[0]
    m = placement._roi_affine(size, roi)
    return cv2.warpAffine(np.ascontiguousarray(frame), m, (roi[2] - roi[0], roi[3] - roi[1]),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)


def composite(frame: np.ndarray, source: np.ndarray, placement: Placement, *, spec: MaskSpec = DEFAULT_MASK,
              seam: str = "feather") -> np.ndarray:
    """The source image with the rendered crop blended in where the mask is > 0.

    frame: (S, S, 3) uint8 RGB crop; source: (H, W, 3) uint8 RGB with (H, W) == placement.source_shape.
    Returns a new (H, W, 3) uint8 image; pixels where alpha is 0 are the source's, bit for bit.
    """
    import cv2

    size = _check_frame(frame)
    src = np.asarray(source)
    if src.dtype != np.uint8 or src.ndim != 3 or src.shape[2] != 3 or src.shape[:2] != placement.source_shape:
        raise ValueError(f"source must be (H, W, 3) uint8 of the placement's size {placement.source_shape}, "
                         f"got {src.shape} {src.dtype}")
    if seam not in SEAMS:
        raise ValueError(f"seam must be one of {', '.join(SEAMS)}, got {seam!r}")
    out = src.copy()
    got = placement.source_alpha(size, spec)
    if got is None:
        return out
    roi, alpha = got
    x0, y0, x1, y1 = roi
    warped = _warped_roi(frame, placement, roi)
    base = out[y0:y1, x0:x1]
    if seam == "poisson":
        inside = (alpha > 0.5).astype(np.uint8) * 255
        if inside.any():
            ys, xs = np.nonzero(inside)
            centre = (int((xs.min() + xs.max() + 1) // 2), int((ys.min() + ys.max() + 1) // 2))
            # seamlessClone wants the whole mask strictly inside the destination: pad by 2 px
            pad = 2
            dst = cv2.copyMakeBorder(np.ascontiguousarray(base), pad, pad, pad, pad, cv2.BORDER_REFLECT)
            srcp = cv2.copyMakeBorder(warped, pad, pad, pad, pad, cv2.BORDER_REFLECT)
            mk = cv2.copyMakeBorder(inside, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
            cloned = cv2.seamlessClone(srcp, dst, mk, (centre[0] + pad, centre[1] + pad), cv2.NORMAL_CLONE)
            warped = cloned[pad:-pad, pad:-pad]
    # (alpha * crop + (1 - alpha) * source) / (1 + 1e-5), rounded: where alpha is 0 this is the
    # source's own value (255 / 1.00001 still rounds to 255); OpenCV does it in one pass
    region = cv2.blendLinear(warped, np.ascontiguousarray(base), alpha, placement._one_minus(size, spec))
    # exactly the source where the mask is 0, whatever the rounding
    np.copyto(region, base, where=placement._outside(size, spec))
    out[y0:y1, x0:x1] = region
    return out


def matte(frame: np.ndarray, placement: Placement, *, spec: MaskSpec = DEFAULT_MASK) -> np.ndarray:
    """(H, W, 4) uint8 RGBA at the source's size: straight colour of the warped crop, alpha = the mask.

    Colour is the warped crop wherever the crop reaches (also where alpha is small, so that a
    straight-alpha "over" has no dark fringe) and 0 where it does not; alpha is 0 outside the mask.
    """
    size = _check_frame(frame)
    h, w = placement.source_shape
    out = np.zeros((h, w, 4), dtype=np.uint8)
    got = placement.source_alpha(size, spec)
    if got is None:
        return out
    roi, alpha = got
    x0, y0, x1, y1 = roi
    out[y0:y1, x0:x1, :3] = _warped_roi(frame, placement, roi)
    out[y0:y1, x0:x1, 3] = np.rint(alpha * 255.0).astype(np.uint8)
    return out


def place(frame: np.ndarray, output: str, *, source: np.ndarray | None = None, placement: Placement | None = None,
          spec: MaskSpec = DEFAULT_MASK, seam: str = "feather") -> np.ndarray:
    """One rendered crop in the requested ``output`` form ("crop", "composite" or "matte")."""
    if output == "crop":
        return frame
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if placement is None:
        raise ValueError(f"output {output!r} needs the portrait's placement in its source photo; prepare the "
                         "identity from the original photo (with alignment) first")
    if output == "matte":
        return matte(frame, placement, spec=spec)
    if source is None:
        raise ValueError("output 'composite' needs the source photo")
    return composite(frame, source, placement, spec=spec, seam=seam)
