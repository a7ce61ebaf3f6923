"""StyleHEAT for Blender: one-shot 1024x1024 talking faces rendered by a local StyleHEAT server.

Works as a Blender 4.2+ extension (blender_manifest.toml; bundled pyzmq/msgpack wheels) and as a
legacy add-on zip (bl_info). Importing this package does not import bpy, zmq or torch, so the
bpy-free modules (client, connection, frames, localserver, deps, errors, protocol) are usable anywhere; ``register()``
pulls in the Blender side.
"""
bl_info = {
    "name": "StyleHEAT Talking Faces",
    "author": "StyleHEAT for Blender contributors",
    "version": (0, 1, 0),
    "blender": (4, 2, 0),
    "location": "3D Viewport > Sidebar > StyleHEAT; Add > StyleHEAT Face Rig",
    "description": "Animate a portrait with a keyframable face rig and sound strips; a local StyleHEAT "
                   "server renders 1024x1024 frames into the sequencer",
    "category": "Animation",
    "doc_url": "",
}

_modules = None


def _load():
    from . import deps

    deps.ensure()  # legacy zip: unpack the bundled wheels for this platform when zmq is missing
    from . import farm, operators, panels, preferences, rig, scrub, shots_ui

    return (rig, preferences, operators, panels, scrub, farm, shots_ui)


def register():
    import bpy

    global _modules
    _modules = _load()
    rig, preferences, operators, panels, scrub, farm, shots_ui = _modules
    rig.register()
    for cls in preferences.CLASSES + operators.CLASSES + farm.classes() + panels.CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.VIEW3D_MT_add.append(operators.menu_add)
    scrub.register()
    shots_ui.register()


def unregister():
    import bpy

    global _modules
    if _modules is None:
        return
    rig, preferences, operators, panels, scrub, farm, shots_ui = _modules
    from . import connection

    shots_ui.unregister()
    scrub.unregister()
    connection.close_clients()
    bpy.types.VIEW3D_MT_add.remove(operators.menu_add)
    for cls in reversed(preferences.CLASSES + operators.CLASSES + farm.classes() + panels.CLASSES):
        bpy.utils.unregister_class(cls)
    rig.unregister()
    _modules = None
