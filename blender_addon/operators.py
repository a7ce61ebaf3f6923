"""Operators. The modal render keeps its body in plain functions (``RenderSession.step``) so
headless runs and tests execute the same code without an event loop."""
from __future__ import annotations

import os

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, StringProperty

from . import bake as B
from . import connection, localserver, preferences, render as R, rig as rig_mod
from .client import ClientError, ServerError

def fail_text(exc: Exception) -> str:
    """The sentence to report for ``exc``; a server error also becomes the connection status."""
    msg = connection.failure_text(exc)
    if isinstance(exc, ClientError) and not isinstance(exc, R.UserError):
        connection.set_status("error", msg)
    return msg


def _fail(op, exc: Exception):
    """Report ``exc`` once, as full sentences, in the Info log (and Blender's error popup)."""
    op.report({"ERROR"}, fail_text(exc))
    return {"CANCELLED"}


class STYLEHEAT_OT_connect(bpy.types.Operator):
    bl_idname = "styleheat.connect"
    bl_label = "Connect to Server"
    bl_description = "Ask the StyleHEAT server for its model, device and sizes"

    def execute(self, context):
        s = preferences.settings(context)
        try:
            info = connection.connect(s.address, s.timeout)
        except ClientError as exc:
            return _fail(self, exc)
        connection.set_status("ok", f"Connected to {s.address}", info)
        R.sync_presets(context.scene, info)
        rig = rig_mod.find_rig(context)
        if rig is not None:
            rig_mod.ensure_attributes(rig.styleheat, connection.info_field(info, "attributes", {}))
        return {"FINISHED"}


class STYLEHEAT_OT_server_start(bpy.types.Operator):
    bl_idname = "styleheat.server_start"
    bl_label = "Start Local Server"
    bl_description = "Start the StyleHEAT server as a subprocess of Blender (its own Python; torch stays out of Blender)"

    def execute(self, context):
        p = preferences.get_prefs(context)
        s = preferences.settings(context)
        try:
            argv = localserver.build_command(
                interpreter=bpy.path.abspath(getattr(p, "server_python", "")) if p else "",
                command=getattr(p, "server_command", "") if p else "", bind=s.address,
                checkpoints=bpy.path.abspath(getattr(p, "checkpoint_dir", "")) if p else "",
                device=getattr(p, "device", "auto") if p else "auto", extra=getattr(p, "server_args", "") if p else "")
            localserver.start(argv)
        except (ValueError, RuntimeError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        connection.set_status("unknown", "Server starting... press refresh to connect")
        self.report({"INFO"}, "StyleHEAT server started: " + " ".join(argv))
        return {"FINISHED"}


class STYLEHEAT_OT_server_restart(bpy.types.Operator):
    bl_idname = "styleheat.server_restart"
    bl_label = "Restart Local Server"
    bl_description = ("Start the server this Blender started again, with the same command (e.g. after it stopped "
                      "answering); then render again: only the missing frames are rendered")

    @classmethod
    def poll(cls, context):
        return connection.can_restart_local()

    def execute(self, context):
        connection.close_clients()
        try:
            localserver.restart()
        except (ValueError, RuntimeError) as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        connection.set_status("unknown", "Server restarting... press refresh to connect")
        connection.status["dead"] = ""
        self.report({"INFO"}, "StyleHEAT server restarted: " + " ".join(localserver.last_command() or []))
        return {"FINISHED"}


class STYLEHEAT_OT_server_stop(bpy.types.Operator):
    bl_idname = "styleheat.server_stop"
    bl_label = "Stop Local Server"
    bl_description = "Stop the server this Blender started"

    def execute(self, context):
        connection.close_clients()
        localserver.stop()
        connection.set_status("unknown", "Local server stopped")
        return {"FINISHED"}


class STYLEHEAT_OT_add_rig(bpy.types.Operator):
    bl_idname = "styleheat.add_rig"
    bl_label = "StyleHEAT Face Rig"
    bl_description = ("Add a face rig: rotate it to turn the head, move it to shift the face, key the "
                      "expression and attribute controls in the StyleHEAT panel")
    bl_options = {"REGISTER", "UNDO"}

    portrait: StringProperty(name="Portrait", subtype="FILE_PATH", default="")

    def execute(self, context):
        obj = rig_mod.create_rig(context, portrait=self.portrait)
        info = connection.server_info.get(preferences.settings(context).address)
        if info:
            rig_mod.ensure_attributes(obj.styleheat, connection.info_field(info, "attributes", {}))
        for o in context.scene.objects:
            o.select_set(False)
        obj.select_set(True)
        context.view_layer.objects.active = obj
        return {"FINISHED"}


class _NeedsRig:
    @classmethod
    def poll(cls, context):
        return rig_mod.find_rig(context) is not None


class _NeedsIdleRig(_NeedsRig):
    """A rig, and no render or bake already running (they share ``progress``)."""
    @classmethod
    def poll(cls, context):
        return not connection.progress["running"] and super().poll(context)


class _ModalJob:
    """A render or bake stepped from timer ticks: Esc cancels ``self.job``, :meth:`_step` advances
    it, :meth:`_end` (the operator's) reports once it stops."""

    def _start_modal(self, context, job) -> None:
        self.job = job
        wm = context.window_manager
        self._timer = wm.event_timer_add(0.1, window=context.window)
        wm.modal_handler_add(self)
        connection.progress["running"] = True

    def _stop_modal(self, context) -> None:
        context.window_manager.event_timer_remove(self._timer)
        connection.progress["running"] = False

    def modal(self, context, event):
        if event.type == "ESC":
            self.job.cancel()
            return self._end(context)
        if event.type == "TIMER" and not self._step(context):
            return self._end(context)
        return {"PASS_THROUGH"}


class STYLEHEAT_OT_prepare(_NeedsRig, bpy.types.Operator):
    bl_idname = "styleheat.prepare_portrait"
    bl_label = "Prepare Portrait"
    bl_description = "Send the portrait to the server once (face alignment + inversion) and read its coefficients"

    force: BoolProperty(default=True, options={"SKIP_SAVE"})
    def execute(self, context):
        s = preferences.settings(context)
        obj = rig_mod.find_rig(context)
        try:
            info = connection.connect(s.address, s.timeout)
            rig_mod.ensure_attributes(obj.styleheat, connection.info_field(info, "attributes", {}))
            R.ensure_identity(connection.get_client(s.address, s.timeout), obj, force=self.force)
        except (ClientError, R.UserError) as exc:
            return _fail(self, exc)
        self.report({"INFO"}, f"Portrait prepared ({obj.styleheat.identity})")
        if not obj.styleheat.has_base:
            self.report({"WARNING"}, "StyleHEAT: the server measured no expression on this portrait ("
                        + (obj.styleheat.base_note or "no details").rstrip(".") + "), so the sliders start from "
                        "a neutral face")
        return {"FINISHED"}


class STYLEHEAT_OT_open_output(_NeedsRig, bpy.types.Operator):
    bl_idname = "styleheat.open_output"
    bl_label = "Open Output Folder"
    bl_description = "Open the folder the rendered frames of this face rig go to (//styleheat/<rig>/) in the file browser"

    def execute(self, context):
        obj = rig_mod.find_rig(context)
        try:
            folder = R.output_dir(obj)
        except R.UserError as exc:
            return _fail(self, exc)
        if not os.path.isdir(folder):
            return _fail(self, R.UserError(f"Nothing was rendered for {obj.name} yet, so {folder} does not exist; "
                                           "press Render Face Animation first."))
        try:
            result = bpy.ops.wm.path_open(filepath=folder)
        except RuntimeError as exc:
            result = {"CANCELLED", str(exc)}
        if "FINISHED" not in result:
            return _fail(self, R.UserError(f"Blender could not open {folder}; open it in your file manager."))
        return {"FINISHED"}


class STYLEHEAT_OT_match_resolution(_NeedsRig, bpy.types.Operator):
    bl_idname = "styleheat.match_resolution"
    bl_label = "Match Scene Resolution"
    bl_description = ("Set the scene's render resolution to the size of this face rig's rendered frames (100%), so "
                      "the image strip fills the output")

    def execute(self, context):
        obj = rig_mod.find_rig(context)
        try:
            w, h = R.rendered_size(context.scene, obj)
        except R.UserError as exc:
            return _fail(self, exc)
        r = context.scene.render
        r.resolution_x, r.resolution_y, r.resolution_percentage = w, h, 100
        self.report({"INFO"}, f"StyleHEAT: scene resolution set to {w} x {h}")
        return {"FINISHED"}


class STYLEHEAT_OT_preview(_NeedsRig, bpy.types.Operator):
    bl_idname = "styleheat.preview"
    bl_label = "Preview Frame"
    bl_description = "Render the current frame at the preview size into the 'StyleHEAT Preview' image"
    def execute(self, context):
        s = preferences.settings(context)
        warnings = []
        try:
            R.preview_frame(context.scene, rig_mod.find_rig(context), s.address, s.timeout, warnings=warnings)
        except (ClientError, R.UserError) as exc:
            return _fail(self, exc)
        for w in warnings:
            self.report({"WARNING"}, f"StyleHEAT: {w}")
        return {"FINISHED"}


class STYLEHEAT_OT_render(_ModalJob, _NeedsIdleRig, bpy.types.Operator):
    bl_idname = "styleheat.render"
    bl_label = "Render Face Animation"
    bl_description = ("Render the scene (or preview) range to //styleheat/<rig>/ and show it as an image strip; "
                      "unchanged frames are kept. Esc cancels")

    force: BoolProperty(name="Re-render All", default=False, options={"SKIP_SAVE"},
                        description="Render every frame even when its inputs did not change")
    # blocking path: scripts, --background, bpy-as-a-module
    def execute(self, context):
        s = preferences.settings(context)
        obj = rig_mod.find_rig(context)
        try:
            session = start_session(context, obj, s, force=self.force)
        except (ClientError, R.UserError) as exc:
            return _fail(self, exc)
        while step_session(context, session, 0.2):
            pass
        err = finish_session(context, session)
        if isinstance(err, ServerError) and err.code == "unknown_identity" and not session.written:
            # the server restarted and forgot the portrait: prepare it again and retry once
            try:
                R.ensure_identity(connection.get_client(s.address, s.timeout), obj, force=True)
                session = start_session(context, obj, s, force=self.force)
            except (ClientError, R.UserError) as exc:
                return _fail(self, exc)
            while step_session(context, session, 0.2):
                pass
            err = finish_session(context, session)
        if err is not None:
            return _fail(self, err)
        for w in session.plan.warnings:
            self.report({"WARNING"}, f"StyleHEAT: {w}")
        self.report({"INFO"}, f"StyleHEAT: rendered {len(session.written)} frame(s), "
                              f"{len(session.plan.frames) - len(session.plan.todo)} unchanged")
        return {"FINISHED"}

    # interactive path
    def invoke(self, context, event):
        s = preferences.settings(context)
        obj = rig_mod.find_rig(context)
        try:
            session = start_session(context, obj, s, force=self.force)
        except (ClientError, R.UserError) as exc:
            return _fail(self, exc)
        if session.done:
            finish_session(context, session)
            self.report({"INFO"}, "StyleHEAT: every frame is up to date")
            return {"FINISHED"}
        self._start_modal(context, session)
        context.window_manager.progress_begin(0, max(1, session.total))
        return {"RUNNING_MODAL"}

    def _step(self, context) -> bool:
        return step_session(context, self.job, 0.05)

    def _end(self, context):
        self._stop_modal(context)
        context.window_manager.progress_end()
        session = self.job
        err = finish_session(context, session)
        if err is not None:
            return _fail(self, err)
        for w in session.plan.warnings:
            self.report({"WARNING"}, f"StyleHEAT: {w}")
        msg = "cancelled" if session.cancelled else "done"
        self.report({"INFO"}, f"StyleHEAT {msg}: {session.status()}")
        return {"FINISHED"} if not session.cancelled else {"CANCELLED"}


# plain functions behind the modal operator ---------------------------------------------------

def start_session(context, obj, s: preferences.Settings, force: bool = False) -> R.RenderSession:
    info = connection.connect(s.address, s.timeout)
    connection.set_status("ok", f"Connected to {s.address}", info)
    session = R.start_render(context.scene, obj, s.address, s.timeout, force=force, frame_timeout=s.frame_timeout,
                             info=info)
    session.scene_name = context.scene.name
    connection.set_progress(session.status())
    return session


def step_session(context, session: R.RenderSession, timeout: float = 0.0) -> bool:
    running = session.step(timeout)
    connection.progress["text"] = session.status()
    try:
        context.window_manager.progress_update(len(session.written))
        if context.area is not None:
            context.area.header_text_set(f"StyleHEAT: {session.status()} (Esc cancels)")
    except (AttributeError, RuntimeError):
        pass
    return running


def finish_session(context, session: R.RenderSession):
    try:
        if context.area is not None:
            context.area.header_text_set(None)
    except (AttributeError, RuntimeError):
        pass
    session.flush()
    scene = bpy.data.scenes.get(getattr(session, "scene_name", ""), context.scene)
    obj = bpy.data.objects.get(session.plan.obj_name)
    R.update_strip(scene, session.plan, obj.styleheat.strip_channel if obj else 0)
    if session.error is not None:
        connection.set_progress(session.status(), failed=True, message=connection.failure_text(session.error))
    else:
        connection.set_progress(("Cancelled at " if session.cancelled else "") + session.status())
    return session.error


# --- bake ----------------------------------------------------------------------------------

_GROUP_ITEMS = [("ROTATION", "Head Rotation", "Key the rig's rotation (the head angles)"),
                ("LOCATION", "Head Position", "Key the rig's location (the head translation)"),
                ("EXPRESSION", "Expression", "Key the 64 raw expression coefficients")]
_TARGET_ITEMS = [("LAYER", "Own Layer", "Write into this bake's own NLA layer (an action on a track named after the "
                                         "source, or Layer below), replacing only that layer; blends additively"),
                 ("ACTION", "Rig's Action", "Write into the rig's own action, replacing its keys in the baked range")]


def _bake_target(op):
    """``layer`` argument of the bake functions: None for the rig's own action."""
    return None if op.target == "ACTION" else op.layer


def _channels_prop(default):
    return EnumProperty(name="Channels", items=_GROUP_ITEMS, options={"ENUM_FLAG"}, default=default,
                        description="Which channel groups this bake keys (the others stay as they are)")

def _status_bar(context, text: str | None) -> None:
    try:
        if context.workspace is not None:
            context.workspace.status_text_set(text)
        if context.area is not None:
            context.area.header_text_set(text)
    except (AttributeError, RuntimeError, TypeError):
        pass


class STYLEHEAT_OT_bake_video(_ModalJob, _NeedsIdleRig, bpy.types.Operator):
    bl_idname = "styleheat.bake_video"
    bl_label = "Bake from Video"
    bl_description = ("Extract head pose and expression from a movie (a file or a movie strip) on the server and "
                      "key them on the face rig from the start frame; keys outside the baked range stay. Esc cancels")
    bl_options = {"REGISTER", "UNDO"}

    filepath: StringProperty(name="Movie", subtype="FILE_PATH", default="")
    filter_movie: BoolProperty(default=True, options={"HIDDEN", "SKIP_SAVE"})
    filter_folder: BoolProperty(default=True, options={"HIDDEN", "SKIP_SAVE"})
    strip: StringProperty(name="Movie Strip", default="",
                          description="Bake from this movie strip (keys from its start, over its visible frames)")
    use_start_frame: BoolProperty(name="Custom Start", default=False,
                                  description="Key from Start Frame (off: the strip's start, or the current frame)")
    start_frame: IntProperty(name="Start Frame", default=1, description="Scene frame of the movie's first frame")
    smooth: FloatProperty(name="Smooth", default=0.0, min=0.0, max=100.0,
                          description="Gaussian smoothing of the curves, in frames (0 = none)")
    channels: _channels_prop({"ROTATION", "LOCATION", "EXPRESSION"})
    target: EnumProperty(name="Write Into", items=_TARGET_ITEMS, default="LAYER")
    layer: StringProperty(name="Layer", default="",
                          description="Name of the layer (NLA track) to write; empty: 'Video: <movie or strip>'")

    def _start(self, context):
        s = preferences.settings(context)
        return start_video_bake(context, rig_mod.find_rig(context), s, filepath=self.filepath, strip=self.strip,
                                start_frame=self.start_frame if self.use_start_frame else None, smooth=self.smooth,
                                groups=set(self.channels), layer=_bake_target(self))

    def execute(self, context):
        if context.window is not None and not bpy.app.background:   # after the file browser: modal
            return self._begin_modal(context)
        try:                                                        # scripts, --background: blocking
            bake = self._start(context)
            bake.run()
        except (ClientError, R.UserError) as exc:
            connection.set_progress("Bake failed", failed=True, message=connection.failure_text(exc))
            return _fail(self, exc)
        return self._report(bake)

    def invoke(self, context, event):
        if not self.strip and not self.filepath:
            active = getattr(context.scene.sequence_editor, "active_strip", None) if context.scene.sequence_editor \
                else None
            if active is not None and active.type == "MOVIE":
                self.strip = active.name
            else:
                context.window_manager.fileselect_add(self)
                return {"RUNNING_MODAL"}
        return self._begin_modal(context)

    def _begin_modal(self, context):
        try:
            bake = self._start(context)
        except (ClientError, R.UserError) as exc:
            return _fail(self, exc)
        self._start_modal(context, bake)
        _status_bar(context, f"StyleHEAT bake: {bake.status()} (Esc cancels)")
        return {"RUNNING_MODAL"}

    def _step(self, context) -> bool:
        return step_video_bake(context, self.job, 0.05)

    def _end(self, context):
        self._stop_modal(context)
        err = finish_video_bake(context, self.job)
        if err is not None:
            return _fail(self, err)
        if self.job.cancelled:
            self.report({"INFO"}, "StyleHEAT: bake cancelled; no keys were changed")
            return {"CANCELLED"}
        return self._report(self.job)

    def _report(self, bake):
        for w in bake.warnings:
            self.report({"WARNING"}, f"StyleHEAT: {w}")
        if bake.keyed:
            where = f" in layer {bake.layer!r}" if bake.layer else ""
            self.report({"INFO"}, f"StyleHEAT: baked {bake.source} to frames {bake.keyed[0]}..{bake.keyed[1]}{where}")
        return {"FINISHED"}


class STYLEHEAT_OT_bake_audio(_NeedsIdleRig, bpy.types.Operator):
    bl_idname = "styleheat.bake_audio"
    bl_label = "Bake Audio to Expression"
    bl_description = ("Turn what the sound strips play into expression keys (the server's Audio2Exp) over exactly "
                      "the strip's frames")
    bl_options = {"REGISTER", "UNDO"}

    strip: StringProperty(name="Sound Strip", default="",
                          description="Bake over this sound strip's frames (empty: every unmuted sound strip)")
    scale: FloatProperty(name="Scale", default=1.0, soft_min=0.0, soft_max=2.0,
                         description="Mouth motion strength: 1 = as predicted, < 1 softer, > 1 louder")
    blend: BoolProperty(name="Blend With Existing", default=False,
                        description="Rig's Action only: add to the expression keys already there (off: replace them "
                                    "in the range); layers always add up")
    channels: _channels_prop({"ROTATION", "LOCATION", "EXPRESSION"})
    target: EnumProperty(name="Write Into", items=_TARGET_ITEMS, default="LAYER")
    layer: StringProperty(name="Layer", default="",
                          description="Name of the layer (NLA track) to write; empty: 'Audio: <strip>'")
    pose: BoolProperty(name="Head Motion", default=False,
                       description="Also key head motion predicted from the audio (SadTalker's Audio2Pose) on the "
                                   "chosen Head Rotation / Head Position channels")
    pose_style: IntProperty(name="Style", default=0, min=0, max=B.MAX_POSE_STYLE,
                            description="Audio2Pose's learned motion style (0..45)")
    pose_scale: FloatProperty(name="Motion Scale", default=1.0, min=0.0, max=B.MAX_POSE_SCALE, soft_max=2.0,
                              description="Head motion amplitude: 0 = still, 1 = as predicted")
    seed: IntProperty(name="Motion Seed", default=0, min=0, description="Picks one of the possible head motions")
    blinks: BoolProperty(name="Blinks", default=False,
                         description="Key the Blink channel (1 = eyes closed as the 'eyes' preset) at random times and "
                                     "put a 'blink' timeline marker where the eyes are fully closed")
    blink_rate: FloatProperty(name="Blinks per Minute", default=15.0, min=0.0, max=B.MAX_BLINK_RATE)
    blink_seed: IntProperty(name="Blink Seed", default=0, min=0, description="Picks one set of blink times")

    def execute(self, context):
        s = preferences.settings(context)
        try:
            result = B.bake_audio(context.scene, rig_mod.find_rig(context), s.address, s.timeout, strip=self.strip,
                                  scale=self.scale, blend=self.blend, frame_timeout=s.frame_timeout,
                                  groups=set(self.channels), layer=_bake_target(self), pose=self.pose,
                                  pose_style=self.pose_style, pose_scale=self.pose_scale, seed=self.seed,
                                  blinks=self.blinks, blink_rate=self.blink_rate, blink_seed=self.blink_seed)
        except (ClientError, R.UserError) as exc:
            return _fail(self, exc)
        where = f" in layer {result.layer!r}" if result.layer else ""
        self.report({"INFO"}, f"StyleHEAT: audio baked over frames {result.first}..{result.last}{where}")
        if self.blinks:
            self.report({"INFO"}, "StyleHEAT: eyes fully closed at frames "
                        + (", ".join(map(str, result.blink_frames)) or "none (a clip shorter than a blink gap)"))
        return {"FINISHED"}


def start_video_bake(context, obj, s: preferences.Settings, **kw) -> B.VideoBake:
    bake = B.start_video_bake(context.scene, obj, s.address, s.timeout, frame_timeout=s.frame_timeout, **kw)
    connection.set_progress(bake.status())
    return bake


def step_video_bake(context, bake: B.VideoBake, timeout: float = 0.0) -> bool:
    running = bake.step(timeout)
    connection.progress["text"] = bake.status()
    _status_bar(context, f"StyleHEAT bake: {bake.status()} (Esc cancels)")
    return running


def finish_video_bake(context, bake: B.VideoBake):
    """Write the keys (unless cancelled or failed); returns the error to report, or None."""
    _status_bar(context, None)
    if bake.error is not None:
        connection.set_progress("Bake failed", failed=True, message=connection.failure_text(bake.error))
        return bake.error
    if bake.cancelled:
        connection.progress["text"] = "Bake cancelled"
        return None
    try:
        bake.finish()
    except R.UserError as exc:
        return exc
    connection.progress["text"] = f"Baked frames {bake.keyed[0]}..{bake.keyed[1]}" if bake.keyed else ""
    return None


def menu_add(self, context):
    self.layout.operator(STYLEHEAT_OT_add_rig.bl_idname, icon="USER")


CLASSES = (STYLEHEAT_OT_connect, STYLEHEAT_OT_server_start, STYLEHEAT_OT_server_restart, STYLEHEAT_OT_server_stop, STYLEHEAT_OT_add_rig,
           STYLEHEAT_OT_prepare, STYLEHEAT_OT_preview, STYLEHEAT_OT_open_output, STYLEHEAT_OT_match_resolution, STYLEHEAT_OT_render, STYLEHEAT_OT_bake_video,
           STYLEHEAT_OT_bake_audio)
