"""The *Dub Movie Strip* operator (sequencer: Strip menu and the StyleHEAT sidebar tab); the work is in dubbing.py."""
from __future__ import annotations

import bpy
from bpy.props import EnumProperty, IntProperty, StringProperty

from . import connection, dubbing as S, preferences
from .client import ClientError
from .operators import _fail, _ModalJob

_OUTPUT_ITEMS = [("COMPOSITE", "Composite", "Plate frames with the new face pasted back (opaque: replaces the "
                                            "movie strip visually)"),
                 ("MATTE", "Matte", "The face alone as straight-alpha RGBA at the plate's size, laid over the movie "
                                    "strip with Alpha Over")]


class STYLEHEAT_OT_dub_movie_strip(_ModalJob, bpy.types.Operator):
    bl_idname = "styleheat.dub_movie_strip"
    bl_label = "Dub Movie Strip"
    bl_description = ("Make the face in the selected movie strip speak the sound strip over it: the server keeps the "
                      "plate's face and head motion, moves the lips with the speech and pastes the face back into "
                      "every frame; the frames go to //styleheat/dub/<strip>/ as an image strip above. Esc cancels")
    bl_options = {"REGISTER"}

    movie: StringProperty(name="Movie Strip", default="", description="The movie strip to dub (empty: the selected one)")
    sound: StringProperty(name="Sound Strip", default="",
                          description="The sound strip with the speech (empty: the selected one, or the one over "
                                      "the movie strip)")
    output: EnumProperty(name="Output", items=_OUTPUT_ITEMS, default="COMPOSITE")
    size: IntProperty(name="Face Size", default=0, min=0, max=4096,
                      description="Render size of the face crop (0 = the model's native size)")

    @classmethod
    def poll(cls, context):
        return not connection.progress["running"] and context.scene.sequence_editor is not None

    def _start(self, context):
        st = preferences.settings(context)
        return S.start_dub(context.scene, st.address, st.timeout, movie=self.movie, sound=self.sound,
                           output=self.output, size=self.size, frame_timeout=st.frame_timeout)

    def execute(self, context):
        try:
            session = self._start(context).run()
        except (ClientError, S.UserError) as exc:
            return _fail(self, exc)
        early = list(session.warnings)
        session.finish()
        session.warnings = early + session.warnings
        return self._report(session)

    def invoke(self, context, event):
        try:
            session = self._start(context)
        except (ClientError, S.UserError) as exc:
            return _fail(self, exc)
        self._early = list(session.warnings)
        self._start_modal(context, session)
        return {"RUNNING_MODAL"}

    def _step(self, context) -> bool:
        running = self.job.step(0.05)
        connection.progress["text"] = self.job.status()
        try:
            if context.area is not None:
                context.area.header_text_set(f"StyleHEAT: {self.job.status()} (Esc cancels)")
        except (AttributeError, RuntimeError):
            pass
        return running

    def _end(self, context):
        self._stop_modal(context)
        try:
            if context.area is not None:
                context.area.header_text_set(None)
        except (AttributeError, RuntimeError):
            pass
        session = self.job
        connection.progress["text"] = ""
        if session.error is not None:
            return _fail(self, session.error)
        if session.cancelled:
            self.report({"INFO"}, f"StyleHEAT: dub cancelled after {len(session.written)} frames; no strip added")
            return {"CANCELLED"}
        session.finish()
        session.warnings = self._early + session.warnings
        return self._report(session)

    def _report(self, session):
        for w in session.warnings:
            self.report({"WARNING"}, f"StyleHEAT dub: {w}")
        if session.strip_name:
            w, h = session.size or (0, 0)
            self.report({"INFO"}, f"StyleHEAT: dubbed {len(session.written)} frames ({w}x{h}) into strip "
                                  f"{session.strip_name!r}")
            return {"FINISHED"}
        return {"CANCELLED"}


class SEQUENCER_PT_styleheat_dub(bpy.types.Panel):
    bl_idname = "SEQUENCER_PT_styleheat_dub"
    bl_label = "StyleHEAT Dub"
    bl_space_type = "SEQUENCE_EDITOR"
    bl_region_type = "UI"
    bl_category = "StyleHEAT"

    def draw(self, context):
        layout = self.layout
        layout.label(text="Select a movie strip and its speech")
        layout.operator(STYLEHEAT_OT_dub_movie_strip.bl_idname, icon="SPEAKER")
        if connection.progress["running"] and connection.progress["text"]:
            layout.label(text=connection.progress["text"])


def menu_strip(self, context):
    self.layout.operator(STYLEHEAT_OT_dub_movie_strip.bl_idname, icon="SPEAKER")


CLASSES = (STYLEHEAT_OT_dub_movie_strip, SEQUENCER_PT_styleheat_dub)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    menu = getattr(bpy.types, "SEQUENCER_MT_strip", None)
    if menu is not None:
        menu.append(menu_strip)


def unregister() -> None:
    menu = getattr(bpy.types, "SEQUENCER_MT_strip", None)
    if menu is not None:
        menu.remove(menu_strip)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
