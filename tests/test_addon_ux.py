"""An animator's first hour (issue 27), in real bpy against a real tiny-random server on 127.0.0.1:
labels, tooltips and ranges through bpy's RNA; the no-presets and reduced-size warnings; the bad-video
and failed-render messages (and the panel's failed state); a dead local server reported at once.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from test_addon_helpers import REPO, Server, build_zip, free_port, run_bpy

pytestmark = pytest.mark.blender

JARGON = ("ffhq", "inversion", "invert", "deep3d", "intuitive-edit", "calibration", "3dmm")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def addon_zip(tmp_path_factory) -> Path:
    return build_zip(tmp_path_factory.mktemp("dist"))


def rig_setup(fixtures_dir, blend: Path, start: int = 1, end: int = 2) -> str:
    return f"""
        import signal, time
        scene = bpy.context.scene
        scene.frame_start, scene.frame_end = {start}, {end}
        bpy.ops.wm.save_as_mainfile(filepath={str(blend)!r})
        bpy.ops.styleheat.add_rig(portrait={str(fixtures_dir / 'portrait_100.jpg')!r})
        obj = bpy.context.active_object
        obj.styleheat.align = False
        render = sub("render"); rig_mod = sub("rig"); conn = sub("connection"); ops = sub("operators")
        panels = sub("panels"); prefs_mod = sub("preferences")
        def op_error(call):
            try:
                return "no error: " + str(call())
            except RuntimeError as exc:      # an ERROR report raises in background mode
                return str(exc)
    """


def test_labels_tooltips_and_ranges_from_hello(tmp_path, addon_zip, server, fixtures_dir):
    out = run_bpy(tmp_path, rig_setup(fixtures_dir, tmp_path / "a.blend") + """
        Rig = rig_mod.StyleHEATRig.bl_rna.properties
        OUT["tips"] = {k: Rig[k].description for k in ("portrait", "align", "mouth", "eyebrow", "eyes", "center",
                                                        "blink", "expression", "size", "preview_size")}
        OUT["names"] = {k: Rig[k].name for k in ("mouth", "eyebrow", "eyes", "center", "show_coefficients")}
        OUT["op_tips"] = [bpy.types.STYLEHEAT_OT_prepare_portrait.bl_rna.description]
        OUT["head"] = [list(r[:3]) for r in rig_mod.HEAD_ROTATION + rig_mod.HEAD_OFFSET]
        OUT["unit"] = rig_mod.OFFSET_UNIT
        # which row column each labelled rotation drives (frames.rows_from_samples: angles = pitch, yaw, roll)
        cols = {}
        for prop, index, label, _ in rig_mod.HEAD_ROTATION:
            obj.rotation_euler = (0.0, 0.0, 0.0)
            obj.rotation_euler[index] = 0.25
            rows = rig_mod.sample_clip(scene, obj, 1, 1).rows
            cols[label] = [int(i) for i in np.nonzero(np.abs(rows[0, 64:67]) > 1e-6)[0]]
        obj.rotation_euler = (0.0, 0.0, 0.0)
        OUT["cols"] = cols
        A = rig_mod.StyleHEATAttribute.bl_rna.properties
        OUT["soft_before"] = [A["value"].soft_min, A["value"].soft_max]
        OUT["connect"] = sorted(bpy.ops.styleheat.connect())
        hello = conn.server_info[ADDRESS]
        OUT["hello_attrs"] = conn.info_field(hello, "attributes", {})
        A = rig_mod.StyleHEATAttribute.bl_rna.properties
        OUT["soft_after"] = [A["value"].soft_min, A["value"].soft_max]
        OUT["value_tip"] = A["value"].description
        OUT["items"] = {a.name: [a.min, a.max] for a in obj.styleheat.attributes}
        first = obj.styleheat.attributes[0]
        first.value = first.max + 100.0                     # typed beyond the server's range: clamped
        OUT["clamped"] = [first.name, first.value]
        first["value"] = first.max + 100.0     # as a key would set it (no update callback): clamped in the rows
        clip = rig_mod.sample_clip(scene, obj, 1, 1)
        OUT["clip_clamped"] = {k: list(v) for k, v in clip.clamped.items()}
        OUT["adv_poll"] = [panels.STYLEHEAT_PT_advanced.poll(bpy.context)]
        obj.styleheat.show_coefficients = True
        OUT["adv_poll"].append(panels.STYLEHEAT_PT_advanced.poll(bpy.context))
        OUT["ops"] = {o: getattr(bpy.types, o).bl_label for o in
                      ("STYLEHEAT_OT_open_output", "STYLEHEAT_OT_match_resolution", "STYLEHEAT_OT_add_rig")}
        OUT["open_output"] = op_error(lambda: bpy.ops.styleheat.open_output())
        OUT["match"] = op_error(lambda: bpy.ops.styleheat.match_resolution())
        obj.styleheat.size = 64
        OUT["render"] = sorted(bpy.ops.styleheat.render())
        OUT["match2"] = sorted(bpy.ops.styleheat.match_resolution())
        r = scene.render
        OUT["resolution"] = [r.resolution_x, r.resolution_y, r.resolution_percentage]
    """, addon_zip, server.address)
    for key, tip in list(out["tips"].items()) + [("prepare", t) for t in out["op_tips"]] + [("value", out["value_tip"])]:
        assert not any(j in tip.lower() for j in JARGON), (key, tip)
    # the Eyes tooltip says what the slider does, not "eyes"
    assert "closed eyes" in out["tips"]["eyes"].lower() and "'eyes' intuitive" not in out["tips"]["eyes"]
    assert out["names"]["show_coefficients"] == "Raw Coefficients (Expert)"
    assert out["head"][:3] == [["rotation_euler", 0, "Nod"], ["rotation_euler", 2, "Turn"],
                               ["rotation_euler", 1, "Tilt"]]
    # X nods (pitch, first angle), Z turns (yaw, second), Y tilts (roll, third)
    assert out["cols"] == {"Nod": [0], "Turn": [1], "Tilt": [2]}
    assert "not metres" in out["unit"] and "10 cm" in out["unit"]
    # attribute ranges: each item has the hello's own range, the slider the hello's overall range
    hello = out["hello_attrs"]
    assert hello and out["items"] == {k: [v["min"], v["max"]] for k, v in hello.items()}
    lo, hi = min(v["min"] for v in hello.values()), max(v["max"] for v in hello.values())
    assert out["soft_after"] == pytest.approx([lo, hi])
    assert f"{lo:g} to {hi:g}" in out["value_tip"]
    name, value = out["clamped"]
    assert value == pytest.approx(hello[name]["max"])
    assert out["clip_clamped"] == {name: [hello[name]["min"], hello[name]["max"]]}
    assert out["adv_poll"] == [False, True]
    assert out["ops"] == {"STYLEHEAT_OT_open_output": "Open Output Folder",
                          "STYLEHEAT_OT_match_resolution": "Match Scene Resolution",
                          "STYLEHEAT_OT_add_rig": "StyleHEAT Face Rig"}
    assert "Nothing was rendered for StyleHEAT Face yet" in out["open_output"]
    assert "has no rendered image strip yet; press Render Face Animation first." in out["match"]
    assert out["render"] == ["FINISHED"] and out["match2"] == ["FINISHED"]
    assert out["resolution"] == [64, 64, 100]


def test_docs_use_the_panel_names():
    text = (REPO / "README.md").read_text() + (REPO / "docs" / "addon.md").read_text()
    assert "Add Face Rig" not in text
    for name in ("StyleHEAT Face Rig", "Prepare", "Render Face Animation", "Open Output Folder",
                 "Match Scene Resolution", "Raw Coefficients (Expert)", "Nod", "Turn", "Tilt"):
        assert name in text, name


def test_no_presets_and_reduced_size_are_warned(tmp_path, addon_zip, server, fixtures_dir):
    out = run_bpy(tmp_path, rig_setup(fixtures_dir, tmp_path / "b.blend") + """
        obj.styleheat.size = 1024
        obj.styleheat.preview_size = 256
        obj.styleheat.mouth = 1.0
        obj.styleheat.keyframe_insert("mouth", frame=1)
        OUT["prepare"] = sorted(bpy.ops.styleheat.prepare_portrait())
        OUT["has_base"] = obj.styleheat.has_base
        OUT["base_note"] = obj.styleheat.base_note
        OUT["presets"] = sorted(rig_mod.stored_presets(scene))
        session = render.start_render(scene, obj, ADDRESS, 10.0)
        OUT["warnings"] = list(session.plan.warnings)
        session.run()
        OUT["written"] = session.written
        outdir = render.output_dir(obj)
        OUT["png"] = os.path.join(outdir, sorted(f for f in os.listdir(outdir) if f.endswith(".png"))[0])
        preview = render.start_preview(scene, obj, ADDRESS, 10.0)
        OUT["preview_warnings"] = list(preview.plan.warnings)
        preview.run()
        OUT["preview_shape"] = [list(v.shape) for v in preview.images.values()]
        obj.styleheat.mouth = 0.0
        obj.animation_data_clear()
        obj.styleheat.size = 0
        OUT["quiet"] = list(render.start_render(scene, obj, ADDRESS, 10.0).plan.warnings)
    """, addon_zip, server.address)
    assert out["prepare"] == ["FINISHED"] and out["presets"] == []
    # tiny weights store no expression of the portrait: the rig says why (the panel shows it after Prepare)
    assert out["has_base"] is False and out["base_note"]
    top = cv2.imread(out["png"]).shape[0]
    assert top < 1024 and out["written"] == [1, 2]
    w = " | ".join(out["warnings"])
    assert f"Size 1024 is more than this server renders" in w and f"come out {top} x {top} px" in w, w
    assert "no expression presets" in w and "Mouth slider change" in w and "--presets FILE" in w, w
    pw = " | ".join(out["preview_warnings"])
    assert f"Preview Size 256 is more than this server renders" in pw and out["preview_shape"] == [[top, top, 3]]
    assert out["quiet"] == []


def _faceless_video(path: Path) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (96, 96))
    assert writer.isOpened()
    for i in range(6):
        writer.write(np.full((96, 96, 3), 40 + 20 * i, np.uint8))
    writer.release()
    return path


def test_bad_video_messages(tmp_path, addon_zip, server, fixtures_dir):
    faceless = _faceless_video(tmp_path / "wall.avi")
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("this is a shopping list, not a movie\n" * 20)
    out = run_bpy(tmp_path, rig_setup(fixtures_dir, tmp_path / "c.blend") + f"""
        OUT["faceless"] = op_error(lambda: bpy.ops.styleheat.bake_video(filepath={str(faceless)!r}))
        OUT["faceless_progress"] = dict(conn.progress)
        OUT["not_video"] = op_error(lambda: bpy.ops.styleheat.bake_video(filepath={str(not_video)!r}))
    """, addon_zip, server.address)
    face = out["faceless"]
    assert "No face was found in any frame of the movie" in face, face
    assert "portrait" not in face and "Pick a photo" not in face and "[" not in face
    assert face.count("Use a movie") == 1
    assert out["faceless_progress"]["failed"] is True and out["faceless_progress"]["message"] in face
    nv = out["not_video"]
    assert "not a movie the server can read" in nv and "portrait" not in nv, nv
    assert "styleheat-extract-" not in nv and "/tmp" not in nv and "[" not in nv


def test_failed_render_shows_failed_state(tmp_path, addon_zip, fixtures_dir):
    own = Server(tmp_path / "own-server")
    try:
        out = run_bpy(tmp_path, rig_setup(fixtures_dir, tmp_path / "d.blend", 1, 30) + f"""
            obj.styleheat.size = 64
            s = ops.start_session(bpy.context, obj, prefs_mod.settings())
            deadline = time.monotonic() + 120
            while len(s.written) < 3 and time.monotonic() < deadline and ops.step_session(bpy.context, s, 0.05):
                pass
            os.kill({own.proc.pid}, signal.SIGTERM)      # the server stops mid-render
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and ops.step_session(bpy.context, s, 0.05):
                pass
            err = ops.finish_session(bpy.context, s)
            OUT["error"] = repr(err)
            OUT["progress"] = dict(conn.progress)
            OUT["files"] = sorted(f for f in os.listdir(render.output_dir(obj)) if f.endswith(".png"))
        """.replace("\n            ", "\n        "), addon_zip, own.address)
        assert own.proc.wait(30) is not None
    finally:
        own.stop()
    p = out["progress"]
    assert p["failed"] is True, out
    m = re.fullmatch(r"Failed at (\d+)/30 \u2014 (\d+) frames? kept", p["text"])
    assert m and int(m.group(1)) == int(m.group(2)) + 1 and int(m.group(2)) == len(out["files"]) >= 3, p
    msg = p["message"]
    assert "[" not in msg and "shutting_down" not in msg, msg
    assert re.search(r"shutting down|stopped answering", msg), msg
    sentences = [x for x in re.split(r"(?<=\.) ", msg) if x]
    assert len(sentences) == len(set(sentences)), msg          # no advice twice


def test_dead_local_server_is_reported_at_once(tmp_path, addon_zip):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    out = run_bpy(tmp_path, f"""
        import time
        ls = sub("localserver")
        prefs.timeout = 5.0
        dead = ls.start([sys.executable, "-c", "import sys; print('loading'); print('boom: no model file here'); "
                         "sys.exit(3)", "--bind", ADDRESS])
        OUT["pids"] = [dead.pid]
        dead.wait(30)
        t = time.monotonic()
        try:
            bpy.ops.styleheat.connect()
            OUT["dead"] = "no error"
        except RuntimeError as exc:
            OUT["dead"] = str(exc)
        OUT["dead_s"] = time.monotonic() - t
        OUT["status"] = sub("connection").status["text"]
        ls.stop()
        prefs.timeout = 1.0
        slow = ls.start([sys.executable, "-c", "import time; print('loading the weights', flush=True); "
                         "time.sleep(60)", "--bind", ADDRESS])
        OUT["pids"].append(slow.pid)
        try:
            bpy.ops.styleheat.connect()
            OUT["starting"] = "no error"
        except RuntimeError as exc:
            OUT["starting"] = str(exc)
        ls.stop()
    """, addon_zip, address)
    dead = out["dead"]
    assert out["dead_s"] < 1.0, out
    assert "has exited (code 3)" in dead and "boom: no model file here" in dead and "Restart Local Server" in dead
    assert "Start one" not in dead and dead.count("exited") == 1, dead
    starting = out["starting"]
    assert "still starting" in starting and "loading the weights" in starting and "Start one" not in starting
    for pid in out["pids"]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
