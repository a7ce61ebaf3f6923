"""Faces in shots: the rig's Output (Face Crop / Composite / Matte). *Dub Movie Strip* is in dubbing.py (its
operator in shots_ui.py).

Output: a render asks the server for ``output`` ``composite`` (the face pasted back into the portrait photo, at
the photo's size) or ``matte`` (the same placement as straight-alpha RGBA) only when the server's hello lists
``outputs``; the output mode is part of every frame's re-render key. The image strip of a composite or a matte
shows the frames at their own pixel size (``fit_method`` ORIGINAL: the photo's size), and a matte strip is set to
Alpha Over with ``alpha_mode`` STRAIGHT: the PNGs hold straight (unpremultiplied) colour, which Blender's
sequencer premultiplies once on load, so the over-composite has no dark fringe. (PREMUL would treat the straight
colour as already multiplied by alpha: a bright fringe; premultiplying twice gives the dark one.)
"""
from __future__ import annotations

from . import frames as F
from .connection import info_field
from .errors import UserError

OUTPUTS = {"CROP": "crop", "COMPOSITE": "composite", "MATTE": "matte"}
LABELS = {"crop": "Face Crop", "composite": "Composite", "matte": "Matte"}


# --- the rig's Output ------------------------------------------------------------------------

def render_output(info: dict | None, rig) -> str | None:
    """The render's ``output`` field for the rig's Output: None for the face crop (never sent, so any server
    renders it); ``composite`` / ``matte`` when the server's hello lists it, else UserError saying what to do."""
    want = OUTPUTS.get(getattr(rig, "output", "CROP"), "crop")
    if want == "crop":
        return None
    offered = info_field(info or {}, "outputs", None) or {}
    if want not in offered:
        raise UserError(f"This StyleHEAT server renders only the Face Crop (its hello lists no '{want}' output: "
                        f"an older server). Set Output to Face Crop, or update the server to render "
                        f"{LABELS[want]} frames.")
    return want


def hash_extra(output: str | None) -> str:
    """What the output mode adds to each frame's re-render key (``frames.output_hash_extra``)."""
    return F.output_hash_extra(output)


def fit_method(output: str | None) -> str:
    """How a new image strip of ``output`` frames is fitted: the crop to the render size, a composite or a matte
    at its own pixel size (the photo's)."""
    return "FIT" if not output or output == "crop" else "ORIGINAL"


def configure_strip(strip, output: str | None) -> None:
    """Alpha handling of an image strip showing ``output`` frames: straight alpha always (the PNGs are straight);
    a matte is laid over the lower channels with Alpha Over."""
    if strip is None:
        return
    if hasattr(strip, "alpha_mode"):
        strip.alpha_mode = "STRAIGHT"
    if output == "matte":
        strip.blend_type = "ALPHA_OVER"
