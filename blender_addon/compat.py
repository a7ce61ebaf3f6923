"""Blender API differences between 4.2 LTS and 5.x, hidden behind small helpers.

Everything else in the add-on goes through these functions instead of touching the
version-specific names directly:

* 4.4 introduced slotted (layered) actions; 5.0 removed ``Action.fcurves``.
* 4.4 renamed ``SequenceEditor.sequences``/``sequences_all`` to ``strips``/``strips_all``;
  5.0 removed the old names.
* 5.1 renamed the sound-strip trims ``animation_offset_start/end`` to ``content_trim_start/end``.
* 5.0 added ``ImageFormatSettings.media_type``.
"""
from __future__ import annotations

import bpy


def blender_version() -> tuple[int, int, int]:
    return tuple(bpy.app.version)  # type: ignore[return-value]


# --- animation -----------------------------------------------------------------------------

def fcurves_for(id_data) -> list:
    """The F-curves that animate ``id_data`` through its active action (empty when none)."""
    ad = getattr(id_data, "animation_data", None)
    if ad is None or ad.action is None:
        return []
    action = ad.action
    slot = getattr(ad, "action_slot", None)
    if slot is not None and hasattr(action, "layers"):
        try:
            from bpy_extras import anim_utils
            getter = getattr(anim_utils, "action_get_channelbag_for_slot", None)
            if getter is not None:
                bag = getter(action, slot)
                return list(bag.fcurves) if bag is not None else []
        except ImportError:  # pragma: no cover - 4.2/4.3 without the helper
            pass
    legacy = getattr(action, "fcurves", None)  # 4.2 .. 4.5
    return list(legacy) if legacy is not None else []


def find_fcurve(id_data, data_path: str, index: int = 0):
    for fc in fcurves_for(id_data):
        if fc.data_path == data_path and fc.array_index == index:
            return fc
    return None


def keyed_frame_range(id_data, prefixes: tuple[str, ...] | None = None) -> tuple[float, float] | None:
    """(first, last) keyframe over the F-curves of ``id_data`` whose path starts with a prefix."""
    lo = hi = None
    for fc in fcurves_for(id_data):
        if prefixes is not None and not fc.data_path.startswith(prefixes):
            continue
        for kp in fc.keyframe_points:
            x = kp.co[0]
            lo = x if lo is None else min(lo, x)
            hi = x if hi is None else max(hi, x)
    return None if lo is None else (lo, hi)


# --- sequencer -----------------------------------------------------------------------------

def sequence_editor(scene, create: bool = False):
    if scene.sequence_editor is None and create:
        scene.sequence_editor_create()
    return scene.sequence_editor


def top_strips(scene):
    """The editable top-level strip collection (``strips`` 4.4+, ``sequences`` before)."""
    sed = sequence_editor(scene, create=True)
    return sed.strips if hasattr(sed, "strips") else sed.sequences


def all_strips(scene) -> list:
    sed = scene.sequence_editor
    if sed is None:
        return []
    coll = sed.strips_all if hasattr(sed, "strips_all") else sed.sequences_all
    return list(coll)


def sound_trim(strip) -> tuple[float, float]:
    """Content trim (start, end) of a sound strip in frames (5.1: content_trim_*)."""
    if hasattr(strip, "content_trim_start"):
        return float(strip.content_trim_start), float(strip.content_trim_end)
    return float(getattr(strip, "animation_offset_start", 0.0)), float(getattr(strip, "animation_offset_end", 0.0))


def set_sound_trim(strip, start: float, end: float) -> None:
    if hasattr(strip, "content_trim_start"):
        strip.content_trim_start, strip.content_trim_end = start, end
    else:
        strip.animation_offset_start, strip.animation_offset_end = start, end


def is_sound_strip(strip) -> bool:
    return strip.type == "SOUND"


# --- render settings -----------------------------------------------------------------------

def set_png_output(scene) -> None:
    settings = scene.render.image_settings
    if hasattr(settings, "media_type"):  # 5.0+
        settings.media_type = "IMAGE"
    settings.file_format = "PNG"


def scene_fps(scene) -> float:
    return scene.render.fps / scene.render.fps_base
