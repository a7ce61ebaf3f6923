"""Add-on preferences: server address, timeouts, local server start/stop; draws the connection status
(:mod:`connection` holds it)."""
from __future__ import annotations

import bpy
from bpy.props import EnumProperty, FloatProperty, StringProperty

from . import connection, localserver

ADDON_ID = __package__  # "styleheat" (legacy add-on) or "bl_ext.<repo>.styleheat" (extension)


def get_prefs(context=None):
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_ID)
    return addon.preferences if addon is not None else None


class Settings:
    """Preferences values, with defaults when the add-on was registered without its entry."""

    def __init__(self, prefs=None):
        self.address = getattr(prefs, "server_address", "tcp://127.0.0.1:5555")
        self.timeout = float(getattr(prefs, "timeout", 5.0))
        self.frame_timeout = float(getattr(prefs, "frame_timeout", 300.0))
        self.curve_dir = bpy.path.abspath(getattr(prefs, "curve_dir", "")) if getattr(prefs, "curve_dir", "") else ""
        self.server_python = getattr(prefs, "server_python", "")
        self.server_command = getattr(prefs, "server_command", "")
        self.farm_address = getattr(prefs, "farm_address", "local") or "local"
        connection.set_curve_keys_dir(self.curve_dir)


def settings(context=None) -> Settings:
    return Settings(get_prefs(context))


class StyleHEATPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    server_address: StringProperty(name="Server Address", default="tcp://127.0.0.1:5555",
                                   description="ZeroMQ endpoint of the StyleHEAT server")
    timeout: FloatProperty(name="Connect Timeout", default=5.0, min=0.1, max=600.0, unit="TIME_ABSOLUTE",
                           description="Seconds to wait for the server to answer a request")
    frame_timeout: FloatProperty(name="Frame Timeout", default=300.0, min=1.0, max=36000.0, unit="TIME_ABSOLUTE",
                                 description="Seconds a render or bake may go without a frame or progress from a "
                                             "server that still answers heartbeats (a stuck job). A server that "
                                             "answers nothing at all is declared dead after 10 s")
    curve_dir: StringProperty(name="CURVE Keys", subtype="DIR_PATH", default="",
                              description="For a server on another machine: the folder with server.key and "
                                          "client.key_secret made by 'styleheat-server --make-keys DIR'")
    server_python: StringProperty(name="Server Python", subtype="FILE_PATH", default="",
                                  description="Python interpreter of the environment where the server is installed")
    server_command: StringProperty(name="Server Command", default="",
                                   description="Full command that starts the server (overrides Server Python), "
                                               "e.g. /path/to/.venv/bin/styleheat-server")
    checkpoint_dir: StringProperty(name="Checkpoints", subtype="DIR_PATH", default="",
                                   description="Folder with the StyleHEAT weights (as 'styleheat download' leaves them)")
    device: EnumProperty(name="Device", default="auto",
                         items=[("auto", "Auto", "CUDA when available, else CPU"), ("cuda", "CUDA", "NVIDIA GPU"),
                                ("cpu", "CPU", "Processor (slow)")])
    server_args: StringProperty(name="Extra Arguments", default="",
                                description="More command-line arguments for the server")

    farm_address: StringProperty(name="Farm Address", default="local",
                                 description="Ray cluster head for Render on Farm (e.g. 10.0.0.5:6379), or 'local' "
                                             "for a local cluster on this machine (docs/farm.md)")

    def draw(self, context):
        layout = self.layout
        col = layout.column()
        col.prop(self, "server_address")
        row = col.row()
        row.prop(self, "timeout")
        row.prop(self, "frame_timeout")
        col.prop(self, "curve_dir")
        box = layout.box()
        box.label(text="Local Server")
        box.prop(self, "server_python")
        box.prop(self, "server_command")
        box.prop(self, "checkpoint_dir")
        box.prop(self, "device")
        box.prop(self, "server_args")
        layout.prop(self, "farm_address")
        row = box.row()
        if localserver.running():
            row.label(text=f"Running (pid {localserver.pid()})", icon="PLAY")
            row.operator("styleheat.server_stop", icon="PAUSE")
        else:
            code = localserver.exit_code()
            if code is not None:
                row.label(text=f"Exited with code {code}", icon="ERROR")
            row.operator("styleheat.server_start", icon="PLAY")
        draw_status(layout, context)


def draw_status(layout, context=None) -> None:
    """The connection status; a long message (an error) is split into lines that fit the region."""
    status = connection.status
    box = layout.box()
    row = box.row()
    icon = {"ok": "CHECKMARK", "error": "ERROR"}.get(status["state"], "QUESTION")
    region = getattr(context or bpy.context, "region", None)
    lines = connection.wrap(status["text"], (getattr(region, "width", 0) or 300) - 70)
    row.label(text=lines[0], icon=icon)
    row.operator("styleheat.connect", text="", icon="FILE_REFRESH")
    for line in lines[1:]:
        box.label(text=line, icon="BLANK1")
    if status["dead"] and connection.can_restart_local():
        box.operator("styleheat.server_restart", icon="FILE_REFRESH")
    if status["state"] == "ok":
        box.label(text=f"Model: {status['model']}")
        box.label(text=f"Device: {status['device']}")


CLASSES = (StyleHEATPreferences,)
