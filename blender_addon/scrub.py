"""Live scrub preview: the preview image follows the current frame while the animator scrubs.

With a rig's Live Preview on, each frame change asks the server for that frame at the rig's preview size and
quality (by default the server's cheap preview quality, whose frames it caches, so scrubbing back costs
nothing), without blocking Blender:

* :func:`on_frame_change` (the ``frame_change_post`` handler) only records the frame wanted and makes sure the
  timer runs;
* :func:`tick` (the timer body) receives what has arrived, shows it, and asks for the latest wanted frame,
  cancelling a request still in flight for an older one: fast scrubbing renders only where the playhead
  rests, never a queue of stale frames.

It never blocks on the portrait's inversion (a rig whose portrait was never prepared gets a hint in
:data:`state` instead), and it ignores frame changes made by the add-on's own sampling
(``rig.sample_frames``), by playback, and while a render or bake runs. Timers never fire in bpy-as-a-module,
so the tests call :func:`tick` directly.
"""
from __future__ import annotations

import bpy
from bpy.app.handlers import persistent

from . import connection, preferences, render as R, rig as rig_mod
from .client import ClientError
from .errors import UserError

INTERVAL = 0.05        # seconds between timer ticks while a preview is wanted or in flight

#: ``wanted``: (scene, rig, frame) asked for by the last frame change and not requested yet; ``session``: the
#: request in flight and ``key`` what it is for; ``text``: what the panel shows (empty when all is well);
#: ``requested``: every frame requested, in order (the panel's and the tests' record); ``shown``: the frame in
#: the preview image.
state: dict = {"wanted": None, "session": None, "key": None, "text": "", "requested": [], "shown": None}


def reset() -> None:
    """Forget everything (add-on unregister, tests); cancels a request in flight."""
    if state["session"] is not None:
        state["session"].cancel()
    state.update(wanted=None, session=None, key=None, text="", requested=[], shown=None)


def live_rig(scene):
    """The rig to preview: the active object when it is a rig with Live Preview on, else the first such rig."""
    obj = getattr(bpy.context, "active_object", None)
    if rig_mod.is_rig(obj) and obj.styleheat.live_preview and scene.objects.get(obj.name) is obj:
        return obj
    return next((o for o in scene.objects if rig_mod.is_rig(o) and o.styleheat.live_preview), None)


def _busy() -> str:
    """Why the live preview stands aside now ('' when it need not)."""
    if rig_mod.is_sampling():
        return "sampling"
    if connection.progress.get("running"):
        return "a render or bake is running"
    screen = getattr(bpy.context, "screen", None)
    if screen is not None and getattr(screen, "is_animation_playing", False):
        return "playing back"
    return ""


@persistent
def on_frame_change(scene, depsgraph=None) -> None:
    """frame_change_post handler: remember the frame; :func:`tick` asks for it."""
    if _busy():
        return
    obj = live_rig(scene)
    if obj is None:
        return
    state["wanted"] = (scene.name, obj.name, int(scene.frame_current))
    if not bpy.app.timers.is_registered(tick):
        bpy.app.timers.register(tick, first_interval=0.0)


def _receive() -> None:
    session = state["session"]
    if session is None:
        return
    session.step(0.0)
    if not session.done:
        return
    frame = state["key"][2]
    if session.error is not None:
        state["text"] = f"Live preview: {connection.explain(session.error)}"
    elif frame in session.images:
        R.show_preview(session.images[frame])
        state["shown"], state["text"] = frame, ""
    state["session"] = state["key"] = None


def _request(key) -> None:
    scene = bpy.data.scenes.get(key[0])
    obj = scene.objects.get(key[1]) if scene is not None else None
    if obj is None or not rig_mod.is_rig(obj):
        return
    s = preferences.settings(bpy.context)
    try:
        info = connection.server_info.get(s.address) or connection.connect(s.address, s.timeout)
        session = R.start_preview(scene, obj, s.address, s.timeout, key[2], prepare=False, info=info)
    except (ClientError, UserError) as exc:
        state["text"] = f"Live preview: {connection.explain(exc)}"
        return
    state["session"], state["key"] = session, key
    state["requested"].append(key[2])
    del state["requested"][:-100]                # a record of the recent requests, not of the whole session


def tick():
    """Timer body: returns the seconds until the next call, or None when nothing is wanted or in flight."""
    _receive()
    wanted = state["wanted"]
    if wanted is not None and not _busy():
        state["wanted"] = None
        if state["session"] is not None and state["key"] != wanted:
            state["session"].cancel()            # an older frame: the playhead has moved on
            state["session"] = state["key"] = None
        if state["session"] is None:         # (the same frame again, e.g. after an edit: the cache answers)
            _request(wanted)
    return INTERVAL if (state["session"] is not None or state["wanted"] is not None) else None


def _live_preview_toggled(scene) -> None:
    """A rig's Live Preview was switched (rig.on_live_preview_toggled): preview the current frame at once."""
    on_frame_change(scene)


def register() -> None:
    if on_frame_change not in bpy.app.handlers.frame_change_post:
        bpy.app.handlers.frame_change_post.append(on_frame_change)
    if _live_preview_toggled not in rig_mod.live_preview_hooks:
        rig_mod.live_preview_hooks.append(_live_preview_toggled)


def unregister() -> None:
    while _live_preview_toggled in rig_mod.live_preview_hooks:
        rig_mod.live_preview_hooks.remove(_live_preview_toggled)
    while on_frame_change in bpy.app.handlers.frame_change_post:
        bpy.app.handlers.frame_change_post.remove(on_frame_change)
    if bpy.app.timers.is_registered(tick):
        bpy.app.timers.unregister(tick)
    reset()
