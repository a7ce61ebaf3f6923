"""Sidebar panels (3D Viewport > N > StyleHEAT)."""
from __future__ import annotations

import bpy

from . import connection, preferences, render as R, rig as rig_mod, scrub
from .frames import PRESET_NAMES


def draw_wrapped(layout, context, text: str, icon: str = "NONE") -> None:
    """``text`` as several labels that fit the sidebar's width (a label never wraps by itself)."""
    region = getattr(context, "region", None)
    width = getattr(region, "width", 0) or 300
    col = layout.column(align=True)
    for i, line in enumerate(connection.wrap(text, width - 40)):
        col.label(text=line, icon=icon if i == 0 else "BLANK1" if icon != "NONE" else "NONE")


def draw_progress(layout, context) -> None:
    """The job line; a failed job shows its state and the whole message in a box."""
    p = connection.progress
    if not p["text"]:
        return
    if p.get("failed"):
        box = layout.box()
        box.label(text=p["text"], icon="ERROR")
        if p.get("message"):
            draw_wrapped(box, context, p["message"])
    else:
        layout.label(text=p["text"])


def server_info(context) -> dict | None:
    return connection.server_info.get(preferences.settings(context).address)


class _Base:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "StyleHEAT"


class _RigChild(_Base):
    """A sub-panel of the main one, shown only while there is a face rig to edit."""
    bl_parent_id = "STYLEHEAT_PT_main"

    @classmethod
    def poll(cls, context):
        return rig_mod.find_rig(context) is not None


class STYLEHEAT_PT_main(_Base, bpy.types.Panel):
    bl_idname = "STYLEHEAT_PT_main"
    bl_label = "StyleHEAT"

    def draw(self, context):
        layout = self.layout
        preferences.draw_status(layout, context)
        obj = rig_mod.find_rig(context)
        if obj is None:
            layout.operator("styleheat.add_rig", icon="ADD")
            return
        rig = obj.styleheat
        layout.label(text=obj.name, icon="USER")
        layout.prop(rig, "portrait")
        row = layout.row()
        row.prop(rig, "align")
        row.operator("styleheat.prepare_portrait", icon="IMPORT")
        if rig.identity and not rig.has_base:
            draw_wrapped(layout, context, "The server measured no expression on this portrait ("
                         + (rig.base_note or "no details").rstrip(".") + "), so the sliders start from a neutral "
                         "face instead of the portrait's own.", icon="INFO")
        col = layout.column(align=True)
        col.label(text="Head Rotation (rotate the rig)")
        for prop, index, label, _tip in rig_mod.HEAD_ROTATION:
            col.prop(obj, prop, index=index, text=label)
        col = layout.column(align=True)
        col.label(text="Head Offset (move the rig, face units)")
        for prop, index, label, _tip in rig_mod.HEAD_OFFSET:
            col.prop(obj, prop, index=index, text=label)


class STYLEHEAT_PT_expression(_RigChild, bpy.types.Panel):
    bl_idname = "STYLEHEAT_PT_expression"
    bl_label = "Expression"

    def draw(self, context):
        rig = rig_mod.find_rig(context).styleheat
        col = self.layout.column(align=True)
        for name in PRESET_NAMES:
            col.prop(rig, name, slider=True)
        col.prop(rig, "blink", slider=True)
        if not rig.has_base and not rig.identity:
            draw_wrapped(self.layout, context, "Press Prepare Portrait to start the sliders from the portrait's own "
                         "expression.", icon="INFO")
        if not rig_mod.stored_presets(context.scene):
            draw_wrapped(self.layout, context, "This server sent no expression presets (the --tiny-random demo "
                         "server has none): Mouth, Eyebrow, Eyes, Center and Blink change nothing. Start the server "
                         "with --presets FILE or real weights.", icon="ERROR")
        self.layout.prop(rig, "show_coefficients")


class STYLEHEAT_PT_attributes(_RigChild, bpy.types.Panel):
    bl_idname = "STYLEHEAT_PT_attributes"
    bl_label = "Attribute Edits"

    def draw(self, context):
        rig = rig_mod.find_rig(context).styleheat
        col = self.layout.column(align=True)
        if not rig.attributes:
            col.label(text="Connect to the server to list its edits", icon="INFO")
        for item in rig.attributes:
            col.prop(item, "value", text=f"{item.name.capitalize()} ({rig_mod.attribute_range_text(item)})",
                     slider=False)


class STYLEHEAT_PT_advanced(_RigChild, bpy.types.Panel):
    """The 64 raw coefficients: only with the Expression panel's Raw Coefficients (Expert) toggle on."""
    bl_idname = "STYLEHEAT_PT_advanced"
    bl_label = "Raw Expression Coefficients"
    bl_options = {"DEFAULT_CLOSED"}

    @classmethod
    def poll(cls, context):
        obj = rig_mod.find_rig(context)
        return obj is not None and obj.styleheat.show_coefficients

    def draw(self, context):
        rig = rig_mod.find_rig(context).styleheat
        grid = self.layout.grid_flow(columns=4, align=True)
        for i in range(64):
            grid.prop(rig, "expression", index=i, text=f"Coef {i + 1}")


class STYLEHEAT_PT_bake(_RigChild, bpy.types.Panel):
    bl_idname = "STYLEHEAT_PT_bake"
    bl_label = "Bake"

    def draw(self, context):
        col = self.layout.column(align=True)
        col.operator("styleheat.bake_video", icon="FILE_MOVIE")
        col.operator("styleheat.bake_audio", icon="SPEAKER")
        ad = rig_mod.find_rig(context).animation_data
        if ad is not None and len(ad.nla_tracks):
            box = self.layout.box()
            box.label(text="Bake layers (they add up)")
            for track in reversed(list(ad.nla_tracks)):
                row = box.row(align=True)
                row.prop(track, "mute", text="", invert_checkbox=True)
                row.label(text=track.name)
        if connection.progress["text"] and (connection.progress["running"] or connection.progress.get("failed")):
            draw_progress(self.layout, context)


class STYLEHEAT_PT_output(_RigChild, bpy.types.Panel):
    bl_idname = "STYLEHEAT_PT_output"
    bl_label = "Render"

    def draw(self, context):
        rig = rig_mod.find_rig(context).styleheat
        layout = self.layout
        layout.prop(rig, "use_audio")
        layout.prop(rig, "output")
        row = layout.row()
        row.prop(rig, "size")
        row.prop(rig, "preview_size")
        info = server_info(context)
        if info:
            for want, what in ((rig.size, "Size"), (rig.preview_size, "Preview Size")):
                w = R.size_warning(info, want, what)
                if w:
                    draw_wrapped(layout, context, w[0].upper() + w[1:] + ".", icon="ERROR")
            used = {n for n in PRESET_NAMES if getattr(rig, n)} | ({"blink"} if rig.blink else set())
            w = R.presets_warning(rig_mod.stored_presets(context.scene), used)
            if w:
                draw_wrapped(layout, context, w[0].upper() + w[1:] + ".", icon="ERROR")
        layout.prop(rig, "preview_quality")
        layout.prop(rig, "live_preview")
        if rig.live_preview and scrub.state["text"]:
            layout.label(text=scrub.state["text"], icon="INFO")
        layout.prop(rig, "strip_channel")
        row = layout.row()
        row.operator("styleheat.preview", icon="IMAGE_DATA")
        row.operator("styleheat.render", icon="RENDER_ANIMATION")
        layout.operator("styleheat.render_farm", icon="NETWORK_DRIVE")
        row = layout.row()
        row.operator("styleheat.open_output", icon="FILE_FOLDER")
        row.operator("styleheat.match_resolution", icon="FULLSCREEN_ENTER")
        draw_progress(layout, context)


CLASSES = (STYLEHEAT_PT_main, STYLEHEAT_PT_expression, STYLEHEAT_PT_attributes, STYLEHEAT_PT_advanced,
           STYLEHEAT_PT_bake, STYLEHEAT_PT_output)
