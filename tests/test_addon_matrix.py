"""The zip users install, on the Blender under test, and the Blender version matrix.

``test_installed_zip_works_on_this_blender`` runs on the bpy that the add-on tests use (the main
venv's bpy 5.0.1, or the bpy venv that scripts/blender_matrix.py names in STYLEHEAT_BPY_PYTHON):
the full zip, vendored pyzmq/msgpack wheels and all, installed from disk as an extension, enabled,
three frames rendered from a real tiny server on 127.0.0.1 into an image strip that Blender's own
sequencer render shows, and an audio bake. ``test_matrix_runs_one_lts`` is how default CI covers a
second Blender: it drives scripts/blender_matrix.py for bpy 4.2 LTS (venv cached under .tmp/).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import wave
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from test_addon_helpers import BPY_PY, REPO, Server, bpy_build, build_full_zip, run_bpy


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"))
    yield s
    s.stop()


@pytest.mark.blender
def test_installed_zip_works_on_this_blender(tmp_path, server, fixtures_dir):
    build = bpy_build()
    zip_path = build_full_zip(tmp_path / "dist")
    rate = 16000
    t = np.arange(rate) / rate
    with wave.open(str(tmp_path / "line.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(np.round((0.4 * np.sin(2 * np.pi * 200 * t) * (t < 0.8)) * 32767).astype("<i2").tobytes())
    blend = tmp_path / "shot.blend"
    out = run_bpy(tmp_path, f"""
        site = os.path.join(os.environ["BLENDER_USER_RESOURCES"], "extensions", ".local", "lib",
                            f"python{{sys.version_info.major}}.{{sys.version_info.minor}}", "site-packages")
        # Blender unpacked this platform's wheels into the extension's site-packages, on sys.path (the
        # test venvs have pyzmq/msgpack of their own too, for the --no-wheels zips of the other tests)
        OUT["site"] = sorted(os.listdir(site)) if os.path.isdir(site) else []
        OUT["site_on_path"] = site in sys.path
        scene = bpy.context.scene
        scene.render.fps, scene.render.fps_base = 25, 1.0
        scene.frame_start, scene.frame_end = 1, 3
        # the output size first: Blender fits a new image strip to the render size it has then
        scene.render.resolution_x = scene.render.resolution_y = 64
        scene.render.resolution_percentage = 100
        bpy.ops.wm.save_as_mainfile(filepath={str(blend)!r})
        bpy.ops.styleheat.add_rig(portrait={str(fixtures_dir / 'portrait_100.jpg')!r})
        obj = bpy.context.active_object
        obj.styleheat.align = False
        obj.styleheat.size = 64
        compat = sub("compat")
        OUT["render"] = sorted(bpy.ops.styleheat.render())
        strip = next(s for s in compat.all_strips(scene) if s.type == "IMAGE")
        OUT["strip"] = [strip.frame_final_start, strip.frame_final_duration, len(strip.elements)]
        OUT["frames_dir"] = bpy.path.abspath(strip.directory)
        # Blender's own sequencer render shows the frames the add-on wrote
        r = scene.render
        r.use_sequencer = True
        compat.set_png_output(scene)
        scene.view_settings.view_transform = "Standard"
        r.filepath = {str(tmp_path / 'vse' / '####')!r}
        bpy.ops.render.render(animation=True)
        # bake audio: expression keys over exactly the strip's frames
        if {build["audio"]!r}:
            compat.top_strips(scene).new_sound("line", {str(tmp_path / 'line.wav')!r}, channel=1, frame_start=2)
        try:
            OUT["bake"] = sorted(bpy.ops.styleheat.bake_audio(strip="line"))
            # the bake writes its own layer (an NLA track named after the strip), not the rig's action
            layers = sub("layers")
            fc = next(f for f in layers.layer_fcurves(obj, "Audio: line")
                      if f.data_path == "styleheat.expression" and f.array_index == 0)
            OUT["keyed"] = [kp.co[0] for kp in fc.keyframe_points]
        except RuntimeError as exc:
            OUT["bake"] = str(exc)
    """, zip_path, server.address)
    assert out["site_on_path"] is True
    for pkg in ("zmq", "pyzmq-27.3.0.dist-info", "msgpack", "msgpack-1.2.4.dist-info"):
        assert pkg in out["site"], (pkg, out["site"])
    assert out["render"] == ["FINISHED"]
    assert out["strip"] == [1, 3, 3]
    for f in (1, 2, 3):
        ours = cv2.imread(str(Path(out["frames_dir"]) / f"StyleHEAT_Face_{f:04d}.png"))
        seen = cv2.imread(str(tmp_path / "vse" / f"{f:04d}.png"))
        assert ours is not None and seen is not None and seen.shape == ours.shape == (64, 64, 3)
        assert np.abs(seen.astype(int) - ours.astype(int)).max() <= 2, f"frame {f}"
    if build["audio"]:
        assert out["bake"] == ["FINISHED"]
        assert out["keyed"] == [float(f) for f in range(2, 2 + 25)]   # 1 s at 25 fps from frame 2
    else:   # the bpy 4.2 module has no Audaspace
        assert "built without audio support" in out["bake"]

    # the same zip as a legacy add-on: a Python without pyzmq/msgpack unpacks the wheel of its
    # own version and platform from the zip (cp311 for 4.2 .. 5.0, cp312-abi3 / cp313 for 5.1+)
    legacy = tmp_path / "legacy"
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(legacy)
    code = ("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]; "
            "sys.path.insert(0, %r); import importlib.util as u; "
            "assert u.find_spec('zmq') is None and u.find_spec('msgpack') is None; "
            "import styleheat.deps as d; d.ensure(); import zmq, msgpack; "
            "assert '_vendor' in zmq.__file__ and '_vendor' in msgpack.__file__, zmq.__file__; "
            "zmq.Context().term(); print('vendored', zmq.pyzmq_version(), msgpack.version)") % str(legacy)
    r = subprocess.run([BPY_PY, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "vendored 27.3.0 (1, 2, 4)" in r.stdout


CI_LTS = "4.2.23"   # the oldest supported Blender: pre-4.4 sequencer names, action.fcurves, no media_type


def test_matrix_runs_one_lts(tmp_path):
    """scripts/blender_matrix.py builds (or reuses) a bpy 4.2 LTS venv without torch and runs every
    add-on test marked ``blender`` against it; all pass (the audio ones skip: that wheel has no
    Audaspace)."""
    if os.environ.get("STYLEHEAT_BPY_PYTHON"):
        pytest.skip("already inside a matrix run")
    results = tmp_path / "results.json"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "blender_matrix.py"), "--versions", CI_LTS,
                        "--json", str(results), "--results", str(tmp_path / "runs")], capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    (row,) = json.loads(results.read_text())
    assert row["bpy"] == CI_LTS and row["blender"].startswith("4.2.") and row["python"].startswith("3.11")
    assert row["failed"] == 0 and row["errors"] == 0 and row["passed"] >= 15, row
    assert all("Audaspace" in reason for reason in row["skipped_reasons"]), row
