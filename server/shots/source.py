"""Any photo -> the FFHQ-aligned portrait the networks take, and where that crop sits in the photo.

``align``:
* ``"yes"``: detect the face and align (dlib landmarks, the FFHQ recipe); no face is an error;
* ``"no"``: the photo is already an FFHQ-aligned square portrait; it is its own source (identity placement);
* ``"auto"`` (default): a square photo whose face already sits where the FFHQ recipe puts it (every corner
  of its crop square within 4 % of the side from the photo's corners) is used as given; a square photo in
  which no face is found is used as given with a note (it may be a synthetic or stylised portrait the
  detector misses); anything else is aligned.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from server.shots.compositing import Placement

ALIGN_MODES = ("auto", "yes", "no")
#: how far (fraction of the side) the crop square's corners may be from the photo's to count as aligned
ALIGNED_TOLERANCE = 0.04


@dataclass
class SourcePortrait:
    portrait: np.ndarray      # (S, S, 3) uint8 RGB: what the networks invert
    placement: Placement      # where it sits in the photo
    aligned: bool             # True when this code aligned the photo (False: used as given)
    notes: list[str] = field(default_factory=list)


def _already_aligned(photo: np.ndarray, quad: np.ndarray) -> bool:
    side = photo.shape[0]
    corners = Placement.identity(side).quad
    return bool(np.abs(np.asarray(quad) - corners).max() <= ALIGNED_TOLERANCE * side)


def portrait_from_photo(photo: np.ndarray, *, align: str = "auto", name: str = "the photo") -> SourcePortrait:
    """The portrait to invert and its placement in ``photo`` ((H, W, 3) uint8 RGB); ValueError when unusable."""
    from server.preprocessing import align as al

    if align not in ALIGN_MODES:
        raise ValueError(f"align must be one of {', '.join(ALIGN_MODES)}, got {align!r}")
    h, w = photo.shape[:2]
    square = h == w
    if align == "no":
        if not square:
            raise ValueError(f"{name} is {w}x{h}, not square, and alignment is off: let the command align it "
                             f"(--align auto or yes) or pass an FFHQ-aligned square portrait")
        return SourcePortrait(photo, Placement.identity(h), False, [f"{name} used as given (--align no)"])
    if align == "auto" and square:
        det = al.detect_landmarks(photo)
        if det is None:
            return SourcePortrait(photo, Placement.identity(h), False,
                                  [f"no face found in {name}; it is used as given, as an FFHQ-aligned portrait"])
        quad, _ = al.ffhq_quad(det.landmarks)
        if _already_aligned(photo, quad):
            return SourcePortrait(photo, Placement.identity(h), False, [f"{name} is already FFHQ-aligned"])
    res = al.align_portrait(photo, source_name=name)   # NoFaceError (a ValueError) when there is no face
    return SourcePortrait(res.image, Placement(res.quad, (h, w)), True,
                          [f"{name} aligned (face box {res.face_box})", *res.warnings])
