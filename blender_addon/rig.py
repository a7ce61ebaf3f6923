"""The face rig: one object whose rotation drives the head angles and whose location drives the
translation, plus ``object.styleheat`` (one PointerProperty) with the keyframable controls.

Sampling (:func:`sample_clip`) evaluates the rig per frame with ``scene.frame_set`` -- so keys,
drivers, constraints-free parenting and NLA all count exactly as the animator sees them -- and
turns the samples into 73-value rows with :func:`frames.rows_from_samples`.
"""
from __future__ import annotations

import math

import bpy
import numpy as np
from bpy.props import (BoolProperty, CollectionProperty, EnumProperty, FloatProperty, FloatVectorProperty,
                       IntProperty, PointerProperty, StringProperty)

from . import layers
from .frames import PRESET_NAMES, RigSample, clip_range, rows_from_samples

RIG_PROP = "styleheat"
ANIMATED_PREFIXES = ("rotation_euler", "rotation_quaternion", "rotation_axis_angle", "location",
                     "delta_location", "delta_rotation_euler", "styleheat.")


def _preset_prop(name: str, what: str):
    return FloatProperty(
        name=name.capitalize(), default=0.0, min=-2.0, max=2.0, soft_min=0.0, soft_max=1.0,
        description=f"{what}: 0 = the portrait's own expression, 1 = fully {what.lower()} (the server's "
                    f"'{name}' expression preset; a server without presets ignores this slider)")


#: the head controls the main panel draws: (object property, index, label, tooltip). Rotation X is the
#: head's pitch (first 3DMM angle), Z its yaw (second), Y its roll (third) -- see frames.rows_from_samples
HEAD_ROTATION = (("rotation_euler", 0, "Nod", "Nod (rotation X): tips the head up or down"),
                 ("rotation_euler", 2, "Turn", "Turn (rotation Z): the head turns left / right"),
                 ("rotation_euler", 1, "Tilt", "Tilt (rotation Y): the head leans towards a shoulder"))
HEAD_OFFSET = (("location", 0, "Sideways", "Move the face sideways (location X)"),
               ("location", 2, "Up / Down", "Move the face up or down (location Z)"),
               ("location", 1, "Away", "Move the face away from the camera (location Y; negative: closer)"))
#: what one unit of the rig's location means (the 3D face model's unit, not a metre)
OFFSET_UNIT = ("Offsets are in face-model units, not metres (Blender still shows 'm'): 1 unit is about 10 cm "
               "on a real head; 0.1 sideways moves the face by about 4.5% of the frame width")


def attribute_range_text(item) -> str:
    return f"{item.min:g}..{item.max:g}"


def _clamp_attribute(item, context) -> None:
    if item.max > item.min and not (item.min <= item.value <= item.max):
        item.value = min(max(item.value, item.min), item.max)


def _attribute_value_prop(lo: float = -5.0, hi: float = 5.0):
    return FloatProperty(
        name="Strength", default=0.0, soft_min=lo, soft_max=hi, update=_clamp_attribute,
        description=f"How strongly the server applies this edit at this frame (keyframable); 0 = unchanged. "
                    f"The connected server allows {lo:g} to {hi:g} overall; each edit's own range is shown next "
                    f"to its name and values beyond it are clamped")


#: functions called with the scene when a rig's Live Preview is switched; the live preview (scrub.py)
#: registers one that previews the current frame at once (not only at the next frame change)
live_preview_hooks: list = []


def _live_preview_toggled(rig, context) -> None:
    if context is not None and getattr(context, "scene", None) is not None:
        for hook in list(live_preview_hooks):
            hook(context.scene)


class StyleHEATAttribute(bpy.types.PropertyGroup):
    # ``name`` (inherited) is the server's attribute name (from its hello), e.g. "age", "beard"
    value: _attribute_value_prop()
    min: FloatProperty(name="Min", default=-5.0, options={"HIDDEN"})
    max: FloatProperty(name="Max", default=5.0, options={"HIDDEN"})


class StyleHEATRig(bpy.types.PropertyGroup):
    is_rig: BoolProperty(name="Is StyleHEAT Rig", default=False, options={"HIDDEN"})
    portrait: StringProperty(name="Portrait", subtype="FILE_PATH", default="",
                             description="The photo to animate (PNG or JPEG, one clearly visible face); the server "
                                         "prepares it once when you press Prepare Portrait or render")
    align: BoolProperty(name="Align Face", default=True,
                        description="Let the server find the face and crop the photo around it (off: the photo is "
                                    "already a square crop centred on the face, as the model expects)")
    identity: StringProperty(name="Identity", default="", options={"HIDDEN"},
                             description="Server identity id of the prepared portrait")
    identity_source: StringProperty(default="", options={"HIDDEN"})
    # The portrait's own coefficients (set when it is prepared; zeros/neutral otherwise).
    base_expression: FloatVectorProperty(name="Portrait Expression", size=(2, 32), default=[[0.0] * 32] * 2,
                                         options={"HIDDEN"})
    base_pose: FloatVectorProperty(name="Portrait Pose", size=9, options={"HIDDEN"},
                                   default=(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
                                   description="Portrait angles (3), translation (3), crop (3)")
    has_base: BoolProperty(default=False, options={"HIDDEN"})
    base_note: StringProperty(default="", options={"HIDDEN"},
                              description="Why the server measured no expression on the prepared portrait")
    show_coefficients: BoolProperty(name="Raw Coefficients (Expert)", default=False,
                                    description="Show the 64 raw expression numbers the sliders are built from")

    mouth: _preset_prop("mouth", "Open mouth")
    eyebrow: _preset_prop("eyebrow", "Raised eyebrows")
    eyes: _preset_prop("eyes", "Closed eyes")
    center: _preset_prop("center", "Relaxed, neutral face")

    blink: FloatProperty(
        name="Blink", default=0.0, min=-1.0, max=2.0, soft_min=0.0, soft_max=1.0,
        description="Closes the eyes without changing the rest of the face: 0 = open, 1 = fully closed (what "
                    "Bake Audio's blinks key; needs the server's expression presets)")
    expression: FloatVectorProperty(
        name="Expression Coefficients", size=(2, 32), default=[[0.0] * 32] * 2, soft_min=-3.0, soft_max=3.0,
        description="Expert: the 64 raw numbers of the face model's expression, added to the portrait's own "
                    "expression (the sliders above are combinations of them)")
    attributes: CollectionProperty(type=StyleHEATAttribute, name="Attribute Edits")
    use_audio: BoolProperty(name="Lip Sync From Sound Strips", default=True,
                            description="Send what the sequencer's sound strips play to the server to drive the lips")
    size: IntProperty(name="Size", default=0, min=0, max=4096,
                      description="Side of the rendered square frames in pixels (0 = the largest the server makes; "
                                  "larger values come out at the server's largest size, with a warning)")
    preview_size: IntProperty(name="Preview Size", default=256, min=16, max=1024,
                              description="Side of the preview image in pixels (at most the server's largest size)")
    preview_quality: EnumProperty(
        name="Preview Quality", default="PREVIEW",
        items=[("PREVIEW", "Fast", "Scrub quality: skips the final clean-up pass and reuses frames already "
                                   "seen; several times cheaper than a full frame"),
               ("FULL", "Full", "Exactly the frame a render gives (every network)")],
        description="What Preview Frame and Live Preview render")
    live_preview: BoolProperty(
        name="Live Preview", default=False, update=_live_preview_toggled,
        description="Re-render the preview image whenever the current frame changes (scrubbing), at the preview "
                    "size and quality, without blocking Blender; frames already seen come from the server's cache")
    output: EnumProperty(
        name="Output", default="CROP",
        items=[("CROP", "Face Crop", "The aligned square face crop (Size x Size)"),
               ("COMPOSITE", "Composite", "The face pasted back into the portrait photo, at the photo's own size"),
               ("MATTE", "Matte", "The face at the photo's size as an RGBA matte (straight alpha), laid over lower "
                                  "channels with Alpha Over")],
        description="What Render writes: the face crop, the face composited into the photo, or an RGBA matte "
                    "(Live Preview always shows the crop)")
    strip_channel: IntProperty(name="Strip Channel", default=0, min=0, max=128,
                               description="Sequencer channel of the rendered image strip (0 = first free)")


class StyleHEATPreset(bpy.types.PropertyGroup):
    # ``name`` (inherited): mouth, eyebrow, eyes, center
    values: FloatVectorProperty(name="Expression", size=(2, 32), default=[[0.0] * 32] * 2,
                                description="Absolute 64-d expression of this preset (from the server)")


class StyleHEATSceneData(bpy.types.PropertyGroup):
    """Scene-level data saved in the .blend: the intuitive-edit presets as last fetched from a
    server, so the rows of a rig (and their hashes) are reproducible without that server."""
    presets: CollectionProperty(type=StyleHEATPreset, name="Expression Presets")
    presets_source: StringProperty(name="Presets From", default="", options={"HIDDEN"})


CLASSES = (StyleHEATAttribute, StyleHEATRig, StyleHEATPreset, StyleHEATSceneData)


def register() -> None:
    for c in CLASSES:
        bpy.utils.register_class(c)
    bpy.types.Object.styleheat = PointerProperty(type=StyleHEATRig, name="StyleHEAT Face Rig")
    bpy.types.Scene.styleheat = PointerProperty(type=StyleHEATSceneData, name="StyleHEAT")


def unregister() -> None:
    if hasattr(bpy.types.Scene, "styleheat"):
        del bpy.types.Scene.styleheat
    if hasattr(bpy.types.Object, "styleheat"):
        del bpy.types.Object.styleheat
    for c in reversed(CLASSES):
        bpy.utils.unregister_class(c)


# --- creation ------------------------------------------------------------------------------

def create_rig(context, name: str = "StyleHEAT Face", portrait: str = "") -> bpy.types.Object:
    """An empty at the 3D cursor (XYZ Euler) flagged as a StyleHEAT rig."""
    obj = bpy.data.objects.new(name, None)
    obj.empty_display_type = "SPHERE"
    obj.empty_display_size = 0.5
    obj.rotation_mode = "XYZ"
    context.scene.collection.objects.link(obj)
    rig = obj.styleheat
    rig.is_rig = True
    rig.portrait = portrait
    return obj


def is_rig(obj) -> bool:
    return obj is not None and getattr(obj, "styleheat", None) is not None and obj.styleheat.is_rig


def find_rig(context):
    obj = getattr(context, "active_object", None)
    if is_rig(obj):
        return obj
    for o in context.scene.objects:
        if is_rig(o):
            return o
    return None


def set_base(rig, coefficients) -> None:
    """Store the portrait's own 73 coefficients (None: neutral)."""
    if coefficients is None:
        rig.base_expression.foreach_set([0.0] * 64)
        rig.base_pose = (0.0,) * 9
        rig.has_base = False
        return
    c = np.asarray(coefficients, dtype=np.float32).reshape(-1)
    if c.shape != (73,):
        raise ValueError(f"portrait coefficients must have 73 values, got {c.shape[0]}")
    rig.base_expression.foreach_set(c[:64].tolist())
    rig.base_pose = c[64:73].tolist()
    rig.has_base = True


def base_coefficients(rig) -> np.ndarray:
    buf = [0.0] * 64
    rig.base_expression.foreach_get(buf)
    return np.concatenate([np.asarray(buf, dtype=np.float32), np.asarray(rig.base_pose, dtype=np.float32)])


def ensure_attributes(rig, spec: dict) -> None:
    """Make sure the rig has one keyframable item per attribute the server reports, with the server's
    range (each item's min/max: the panel shows it, values beyond it are clamped), and the Strength
    slider's soft range set to what the server allows (:func:`apply_attribute_ranges`)."""
    for name, info in (spec or {}).items():
        item = rig.attributes.get(name)
        if item is None:
            item = rig.attributes.add()
            item.name = name
        if isinstance(info, dict):
            item.min = float(info.get("min", item.min))
            item.max = float(info.get("max", item.max))
            _clamp_attribute(item, None)
    apply_attribute_ranges(spec)


def apply_attribute_ranges(spec: dict) -> tuple[float, float] | None:
    """RNA keeps one soft range per property (not per item), so the Strength property is defined again
    with the server's overall range (lowest min .. highest max of its hello's attributes); values and
    keys stay. Returns that range (None: the server sent no ranges)."""
    lims = [(float(v["min"]), float(v["max"])) for v in (spec or {}).values()
            if isinstance(v, dict) and "min" in v and "max" in v]
    if not lims:
        return None
    lo, hi = min(a for a, _ in lims), max(b for _, b in lims)
    if hi <= lo:
        return None
    if bpy.app.version < (4, 3, 0):
        # Blender 4.2 crashes at exit (in its own teardown, after Python) once a registered property was
        # defined again at run time (seen with the bpy 4.2.23 module: headless render exit -11). There the
        # slider keeps its default range; the label shows the server's range and values are clamped to it.
        return lo, hi
    prop = StyleHEATAttribute.bl_rna.properties["value"]
    if (prop.soft_min, prop.soft_max) != (lo, hi):
        StyleHEATAttribute.value = _attribute_value_prop(lo, hi)
    return lo, hi


# --- presets (stored in the .blend) -----------------------------------------------------------

def store_presets(scene, presets: dict, source: str = "") -> None:
    """Replace the scene's stored presets by ``presets`` ({name: (64,)}); empty dicts are ignored
    (a server without presets never erases what an earlier server gave)."""
    if not presets:
        return
    data = scene.styleheat
    data.presets.clear()
    for name in sorted(presets):
        item = data.presets.add()
        item.name = name
        item.values.foreach_set([float(v) for v in np.asarray(presets[name], dtype=np.float64).reshape(64)])
    data.presets_source = source


def stored_presets(scene) -> dict[str, np.ndarray]:
    """{name: (64,) float32} as saved in the scene (empty when none were ever fetched)."""
    data = getattr(scene, "styleheat", None)
    out = {}
    for item in (data.presets if data is not None else ()):
        buf = [0.0] * 64
        item.values.foreach_get(buf)
        out[item.name] = np.asarray(buf, dtype=np.float32)
    return out


# --- sampling ------------------------------------------------------------------------------

def _rotation_xyz(obj):
    if obj.rotation_mode == "XYZ":
        return tuple(obj.rotation_euler)
    return tuple(obj.matrix_basis.to_euler("XYZ"))


def sample_now(obj) -> RigSample:
    rig = obj.styleheat
    buf = [0.0] * 64
    rig.expression.foreach_get(buf)
    return RigSample(rotation=_rotation_xyz(obj), location=tuple(obj.location), expression=buf,
                     presets={n: float(getattr(rig, n)) for n in PRESET_NAMES},
                     attributes={a.name: float(a.value) for a in rig.attributes}, blink=float(rig.blink))


def keyed_range(obj):
    """Frames the rig's animation covers: its own action's keys and its unmuted bake layers."""
    return layers.evaluated_range(obj, ANIMATED_PREFIXES)


_sampling = [0]   # > 0 while sample_frames moves the playhead (frame-change handlers ignore those changes)


def is_sampling() -> bool:
    """True while :func:`sample_frames` is stepping through frames."""
    return _sampling[0] > 0


def sample_frames(scene, obj, lo: int, hi: int) -> list[RigSample]:
    """Rig samples for scene frames lo..hi (inclusive); restores the current frame."""
    current, sub = scene.frame_current, scene.frame_subframe
    out = []
    _sampling[0] += 1
    try:
        for f in range(lo, hi + 1):
            scene.frame_set(f)
            out.append(sample_now(obj))
    finally:
        scene.frame_set(current, subframe=sub)
        _sampling[0] -= 1
    return out


class Clip:
    """What one render request needs from the rig: rows for scene frames first..last; ``used_presets``:
    the preset sliders (and "blink") that are not 0 somewhere in the clip; ``clamped``: {attribute:
    (min, max)} for attributes whose values went beyond the server's range (and were clamped)."""

    def __init__(self, first: int, rows: np.ndarray, attributes: dict[str, np.ndarray],
                 used_presets: set | None = None, clamped: dict | None = None):
        self.first = first
        self.rows = rows
        self.attributes = attributes
        self.used_presets = set(used_presets or ())
        self.clamped = dict(clamped or {})

    @property
    def last(self) -> int:
        return self.first + self.rows.shape[0] - 1

    def index(self, frame: int) -> int:
        return frame - self.first


def sample_clip(scene, obj, start: int, end: int, presets: dict | None = None) -> Clip:
    """Rows for the render range start..end, widened by the 27-frame window where keys exist."""
    lo, hi = clip_range(start, end, keyed_range(obj))
    samples = sample_frames(scene, obj, lo, hi)
    rows = rows_from_samples(samples, base_coefficients(obj.styleheat), presets)
    names = sorted({n for s in samples for n in s.attributes})
    attrs = {n: np.asarray([s.attributes.get(n, 0.0) for s in samples], dtype=np.float32) for n in names}
    clamped = {}
    for n, v in attrs.items():   # keys beyond the server's range (update callbacks do not run for animation)
        item = obj.styleheat.attributes.get(n)
        if item is not None and item.max > item.min and (v.min() < item.min or v.max() > item.max):
            clamped[n] = (item.min, item.max)
            attrs[n] = np.clip(v, item.min, item.max).astype(np.float32)
    # attributes that are 0 everywhere change nothing: leave them out of the request and the hash
    attrs = {n: v for n, v in attrs.items() if np.any(v != 0.0)}
    used = {n for s in samples for n, w in s.presets.items() if w} | ({"blink"} if any(s.blink for s in samples)
                                                                       else set())
    return Clip(lo, rows, attrs, used, clamped)


def degrees(rad: float) -> float:
    return math.degrees(rad)
