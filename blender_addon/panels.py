"""Sidebar panels (3D Viewport > N > StyleHEAT)."""
from __future__ import annotations

import bpy

from . import connection, preferences, rig as rig_mod, scrub
from .frames import PRESET_NAMES


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
        preferences.draw_status(layout)
        obj = rig_mod.find_rig(context)
        if obj is None:
            layout.operator("styleheat.add_rig", icon="ADD")
            return
        rig = obj.styleheat
        layout.label(text=obj.name, icon="USER")
        layout.prop(rig, "portrait")
        row = layout.row()
        row.prop(rig, "align")
        row.operator("styleheat.prepare_portrait", text="Prepare", icon="IMPORT")
        col = layout.column(align=True)
        col.label(text="Head: rotate / move the rig object")
        col.prop(obj, "rotation_euler", text="Angles")
        col.prop(obj, "location", text="Offset")


class STYLEHEAT_PT_expression(_RigChild, bpy.types.Panel):
    bl_idname = "STYLEHEAT_PT_expression"
    bl_label = "Expression"

    def draw(self, context):
        rig = rig_mod.find_rig(context).styleheat
        col = self.layout.column(align=True)
        for name in PRESET_NAMES:
            col.prop(rig, name, slider=True)
        col.prop(rig, "blink", slider=True)
        if not rig.has_base:
            self.layout.label(text="Prepare the portrait to use its own expression", icon="INFO")
        if not rig_mod.stored_presets(context.scene):
            self.layout.label(text="No presets yet (connect to a server that has them): sliders have no effect",
                              icon="INFO")


class STYLEHEAT_PT_attributes(_RigChild, bpy.types.Panel):
    bl_idname = "STYLEHEAT_PT_attributes"
    bl_label = "Attribute Edits"

    def draw(self, context):
        rig = rig_mod.find_rig(context).styleheat
        col = self.layout.column(align=True)
        if not rig.attributes:
            col.label(text="Connect to the server to list its edits", icon="INFO")
        for item in rig.attributes:
            col.prop(item, "value", text=item.name.capitalize(), slider=False)


class STYLEHEAT_PT_advanced(_RigChild, bpy.types.Panel):
    bl_idname = "STYLEHEAT_PT_advanced"
    bl_label = "Expression Coefficients"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        rig = rig_mod.find_rig(context).styleheat
        grid = self.layout.grid_flow(columns=4, align=True)
        for r in range(2):
            for c in range(32):
                grid.prop(rig, "expression", index=r * 32 + c, text=f"{r * 32 + c}")


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
        if connection.progress["text"] and connection.progress["running"]:
            self.layout.label(text=connection.progress["text"])


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
        layout.prop(rig, "preview_quality")
        layout.prop(rig, "live_preview")
        if rig.live_preview and scrub.state["text"]:
            layout.label(text=scrub.state["text"], icon="INFO")
        layout.prop(rig, "strip_channel")
        row = layout.row()
        row.operator("styleheat.preview", icon="IMAGE_DATA")
        row.operator("styleheat.render", icon="RENDER_ANIMATION")
        if connection.progress["text"]:
            layout.label(text=connection.progress["text"])


CLASSES = (STYLEHEAT_PT_main, STYLEHEAT_PT_expression, STYLEHEAT_PT_attributes, STYLEHEAT_PT_advanced,
           STYLEHEAT_PT_bake, STYLEHEAT_PT_output)
