"""Bake layers: every bake writes into its own action on its own NLA track of the face rig.

A layer is one NLA track named after what was baked (``Video: clip.avi``, ``Audio: line``) holding one
strip of one action whose keys sit on scene frames (the strip maps frame f of the action to scene
frame f). Strips blend with ``COMBINE`` and do not extrapolate (``NOTHING``), so a layer adds its
keyed values over its baked range only. The rig's own (active) action is switched to ``COMBINE``
too, so its keys add on top instead of replacing the layers' sum: for the rig's channels (location,
Euler rotation, the ``styleheat`` values) Combine is a plain sum, and what Blender evaluates at a frame
is ``sum over unmuted layers + the rig's action`` -- which is what :func:`rig.sample_frames`
(``scene.frame_set``) reads for the rows a render sends.

Re-baking a layer replaces its action (the track, with its mute flag and place in the stack, stays);
other layers are never touched. NLA tracks with slotted actions work the same on Blender 4.2 (plain
actions) and 4.4+ (layered actions: one slot, one layer, one keyframe strip); :func:`layer_fcurves`
reads either.
"""
from __future__ import annotations

import numpy as np

import bpy

from . import compat

ACTION_PREFIX = "StyleHEAT "
BLEND = "COMBINE"


def _animation_data(obj):
    return obj.animation_data if obj.animation_data is not None else obj.animation_data_create()


def find_track(obj, name: str):
    ad = obj.animation_data
    if ad is None:
        return None
    return next((t for t in ad.nla_tracks if t.name == name), None)


def layer_tracks(obj) -> list:
    ad = obj.animation_data
    return [] if ad is None else list(ad.nla_tracks)


def _new_action(obj, name: str):
    """(action, slot or None, fcurve factory) for a new action animating ``obj``."""
    act = bpy.data.actions.new(ACTION_PREFIX + name)
    if hasattr(act, "slots") and hasattr(act, "layers"):         # 4.4+: layered actions
        slot = act.slots.new(id_type="OBJECT", name=obj.name)
        bag = act.layers.new("Layer").strips.new(type="KEYFRAME").channelbag(slot, ensure=True)
        return act, slot, lambda path, index: bag.fcurves.new(path, index=index)
    if hasattr(act, "id_root"):
        act.id_root = "OBJECT"
    return act, None, lambda path, index: act.fcurves.new(path, index=index)


def layer_fcurves(obj, name: str) -> list:
    """The F-curves of layer ``name`` (empty when there is no such layer)."""
    track = find_track(obj, name)
    if track is None or not track.strips:
        return []
    strip = track.strips[0]
    act = strip.action
    if act is None:
        return []
    slot = getattr(strip, "action_slot", None)
    if slot is not None and hasattr(act, "layers"):
        from bpy_extras import anim_utils
        bag = anim_utils.action_get_channelbag_for_slot(act, slot)
        return list(bag.fcurves) if bag is not None else []
    return list(getattr(act, "fcurves", []) or [])


def write_layer(obj, name: str, channels: dict, first: int):
    """Replace layer ``name`` of ``obj`` by keys ``channels[(path, index)][i]`` at frame ``first + i``
    (a new action; the track keeps its place and mute flag, a new track goes on top). Returns the track."""
    channels = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in channels.items()}
    n = max((v.size for v in channels.values()), default=0)
    if n == 0:
        raise ValueError(f"nothing to write into layer {name!r}")
    ad = _animation_data(obj)
    act, slot, new_fcurve = _new_action(obj, name)
    for (path, index), values in channels.items():
        fc = new_fcurve(path, index)
        kps = fc.keyframe_points
        for i, v in enumerate(values):
            kps.insert(first + i, float(v), options={"FAST"})
        fc.update()
    track = find_track(obj, name)
    old = None
    if track is None:
        track = ad.nla_tracks.new()
        track.name = name
    else:
        for s in list(track.strips):
            old = old or s.action
            track.strips.remove(s)
    strip = track.strips.new(name, int(first), act)
    if slot is not None and hasattr(strip, "action_slot"):
        strip.action_slot = slot
    strip.blend_type = BLEND
    strip.extrapolation = "NOTHING"
    if old is not None and old.users == 0:
        bpy.data.actions.remove(old)
    if ad.action is not None:
        ad.action_blend_type = BLEND   # the rig's own keys add on top of the layers (not replace them)
    return track


def remove_layer(obj, name: str) -> bool:
    track = find_track(obj, name)
    if track is None:
        return False
    acts = [s.action for s in track.strips if s.action is not None]
    obj.animation_data.nla_tracks.remove(track)
    for a in acts:
        if a.users == 0:
            bpy.data.actions.remove(a)
    return True


def layers_frame_range(obj) -> tuple[float, float] | None:
    """(first, last) frame the unmuted layers of ``obj`` cover (None without any)."""
    lo = hi = None
    for t in layer_tracks(obj):
        if t.mute:
            continue
        for s in t.strips:
            if s.mute:
                continue
            lo = s.frame_start if lo is None else min(lo, s.frame_start)
            hi = s.frame_end if hi is None else max(hi, s.frame_end)
    return None if lo is None else (lo, hi)


def evaluated_range(obj, prefixes=None) -> tuple[float, float] | None:
    """Keys of the rig's own action and its unmuted layers together."""
    ranges = [r for r in (compat.keyed_frame_range(obj, prefixes), layers_frame_range(obj)) if r is not None]
    if not ranges:
        return None
    return min(r[0] for r in ranges), max(r[1] for r in ranges)
