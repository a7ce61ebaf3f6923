"""Rendering through a real tiny-random server on 127.0.0.1 from real bpy (fresh subprocess per test)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from test_addon_helpers import BPY_PY, PY, Server, blender_env, build_staged, build_zip, require_audio, run_bpy

pytestmark = pytest.mark.blender


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def addon_zip(tmp_path_factory) -> Path:
    return build_zip(tmp_path_factory.mktemp("dist"))


def scene_setup(fixtures_dir, start: int, end: int, blend: Path) -> str:
    """bpy code: a saved .blend with a rig on the fixture portrait, tiny size 64."""
    return f"""
        scene = bpy.context.scene
        scene.frame_start, scene.frame_end = {start}, {end}
        bpy.ops.wm.save_as_mainfile(filepath={str(blend)!r})
        bpy.ops.styleheat.add_rig(portrait={str(fixtures_dir / 'portrait_100.jpg')!r})
        obj = bpy.context.active_object
        obj.styleheat.align = False          # the fixture is already FFHQ-aligned
        obj.styleheat.size = 64
        render = sub("render"); rig_mod = sub("rig"); compat = sub("compat")
        outdir = os.path.join(os.path.dirname({str(blend)!r}), "styleheat", bpy.path.clean_name(obj.name))
        def files():
            return sorted(f for f in os.listdir(outdir)) if os.path.isdir(outdir) else []
        def strip_info():
            s = [x for x in compat.all_strips(scene) if x.type == "IMAGE"]
            return [(x.name, x.frame_final_start, x.frame_final_duration, x.channel, len(x.elements),
                     bpy.path.abspath(x.directory)) for x in s]
    """


def _png_ok(path: Path) -> bool:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return img is not None and img.shape == (64, 64, 3)


def test_render_ten_frames_into_image_strip(tmp_path, addon_zip, server, fixtures_dir):
    blend = tmp_path / "shot.blend"
    out = run_bpy(tmp_path, scene_setup(fixtures_dir, 5, 14, blend) + """
        strips = compat.top_strips(scene)
        for ch in (1, 2):   # occupy channels 1-2 over the range so the strip must go to channel 3
            strips.new_image(f"bg{ch}", os.path.join(os.path.dirname(bpy.data.filepath), "bg.png"), ch, 1)
            strips[f"bg{ch}"].frame_final_duration = 30
        OUT["connect"] = sorted(bpy.ops.styleheat.connect())
        OUT["attributes"] = sorted(a.name for a in obj.styleheat.attributes)
        OUT["render"] = sorted(bpy.ops.styleheat.render())
        OUT["files"] = files()
        OUT["strips"] = strip_info()
        OUT["outdir"] = outdir
        OUT["status"] = sub("connection").status
        obj.styleheat.preview_size = 50     # -> the smallest advertised size >= 50: 64
        OUT["preview"] = sorted(bpy.ops.styleheat.preview())
        OUT["preview_size"] = list(bpy.data.images[render.PREVIEW_IMAGE].size)
        # the Preview button's two qualities at frame 5 (64 px, the rendered size): "Full" is exactly the
        # rendered frame, "Fast" (the default) is the server's cheaper preview and differs from it
        obj.styleheat.preview_size = 64
        def preview_pixels():
            img = bpy.data.images[render.PREVIEW_IMAGE]
            px = np.empty(len(img.pixels), np.float32)
            img.pixels.foreach_get(px)
            return (px.reshape(64, 64, 4)[::-1, :, :3] * 255).round().astype(np.uint8).tolist()
        scene.frame_set(5)
        OUT["default_quality"] = obj.styleheat.preview_quality
        bpy.ops.styleheat.preview()
        OUT["fast_pixels"] = preview_pixels()
        obj.styleheat.preview_quality = "FULL"
        bpy.ops.styleheat.preview()
        OUT["full_pixels"] = preview_pixels()
        OUT["torch"] = "torch" in sys.modules
    """, addon_zip, server.address)
    assert out["connect"] == ["FINISHED"] and out["render"] == ["FINISHED"]
    assert out["attributes"] == ["age", "beard", "lip", "pose"]          # what the server reports
    pngs = [f for f in out["files"] if f.endswith(".png")]
    assert pngs == [f"StyleHEAT_Face_{f:04d}.png" for f in range(5, 15)]
    assert "styleheat_frames.json" in out["files"]
    assert all(_png_ok(Path(out["outdir"]) / f) for f in pngs)
    image_strips = [s for s in out["strips"] if s[0] == "StyleHEAT Face"]
    assert len(image_strips) == 1
    name, start, duration, channel, elements, directory = image_strips[0]
    assert (start, duration, elements, channel) == (5, 10, 10, 3)
    assert os.path.samefile(directory, out["outdir"])
    assert out["status"]["state"] == "ok" and out["status"]["device"] == "cpu"
    assert "tiny-random" in out["status"]["model"]
    assert out["preview"] == ["FINISHED"] and out["preview_size"] == [64, 64]
    assert out["default_quality"] == "PREVIEW"
    rendered = cv2.imread(str(Path(out["outdir"]) / "StyleHEAT_Face_0005.png"))[..., ::-1]
    full, fast = np.array(out["full_pixels"]), np.array(out["fast_pixels"])
    assert np.abs(full.astype(int) - rendered.astype(int)).max() <= 1
    assert np.abs(fast.astype(int) - rendered.astype(int)).max() > 8
    assert out["torch"] is False


def test_cancel_after_four_frames_keeps_four_valid_files(tmp_path, addon_zip, server, fixtures_dir):
    blend = tmp_path / "shot.blend"
    out = run_bpy(tmp_path, scene_setup(fixtures_dir, 1, 10, blend) + """
        # the modal operator's body, driven the way its timer/Esc events would drive it
        ops = sub("operators"); prefs_mod = sub("preferences")
        s = ops.start_session(bpy.context, obj, prefs_mod.settings())
        OUT["progress"] = [sub("connection").progress["text"]]
        def esc_after_four(session, frame):                  # Esc pressed right after frame 4 arrived
            if len(session.written) == 4:
                session.cancel()
        s.on_frame = esc_after_four
        while ops.step_session(bpy.context, s, 0.05):
            if sub("connection").progress["text"] != OUT["progress"][-1]:
                OUT["progress"].append(sub("connection").progress["text"])
        OUT["finish_error"] = repr(ops.finish_session(bpy.context, s))
        OUT["cancelled"] = s.cancelled
        OUT["written"] = s.written
        OUT["files"] = files()
        OUT["strips"] = strip_info()
        OUT["outdir"] = outdir
        OUT["sidecar"] = sorted(json.load(open(os.path.join(outdir, "styleheat_frames.json")))["frames"])
        s2 = render.render_range(scene, obj, ADDRESS, 10.0)      # resume: only the missing frames
        OUT["resumed"] = s2.written
        OUT["strips2"] = strip_info()
    """, addon_zip, server.address)
    assert out["cancelled"] is True and out["written"] == [1, 2, 3, 4]
    assert out["finish_error"] == "None"
    counts = [int(p.split()[1].split("/")[0]) for p in out["progress"]]
    assert out["progress"][0] == "Frame 0/10" and counts == sorted(counts) and counts[-1] <= 4
    assert all(p.endswith("/10") for p in out["progress"])
    assert out["files"] == [f"StyleHEAT_Face_{f:04d}.png" for f in range(1, 5)] + ["styleheat_frames.json"]
    assert all(_png_ok(Path(out["outdir"]) / f) for f in out["files"][:4])
    assert out["sidecar"] == ["1", "2", "3", "4"]
    assert [(s[1], s[2], s[4]) for s in out["strips"]] == [(1, 4, 4)]     # start, duration, elements
    assert out["resumed"] == [5, 6, 7, 8, 9, 10]
    assert [s[2] for s in out["strips2"]] == [10]


def test_changed_key_rerenders_only_affected_frames(tmp_path, addon_zip, server, fixtures_dir):
    """Keys at 1, 15, 16 on one expression coefficient; changing the key at 16 changes row 16 only,
    so exactly the frames whose 27-frame window reaches frame 16 (3..16) are rendered again."""
    blend = tmp_path / "shot.blend"
    out = run_bpy(tmp_path, scene_setup(fixtures_dir, 1, 16, blend) + """
        def key(frame, value):
            buf = [0.0] * 64; buf[5] = value
            obj.styleheat.expression.foreach_set(buf)
            obj.keyframe_insert("styleheat.expression", index=5, frame=frame)
        key(1, 0.0); key(15, 0.5); key(16, 0.5)
        for fc in compat.fcurves_for(obj):
            for kp in fc.keyframe_points:
                kp.interpolation = "LINEAR"
        first = render.render_range(scene, obj, ADDRESS, 10.0)
        mtimes = {f: os.stat(os.path.join(outdir, f)).st_mtime_ns for f in files()}
        unchanged_run = render.render_range(scene, obj, ADDRESS, 10.0)
        key(16, 1.5)
        second = render.render_range(scene, obj, ADDRESS, 10.0)
        OUT["first"] = first.written
        OUT["unchanged_run"] = unchanged_run.written
        OUT["second"] = second.written
        OUT["touched"] = sorted(f for f in files() if f.endswith(".png")
                                and os.stat(os.path.join(outdir, f)).st_mtime_ns != mtimes[f])
    """, addon_zip, server.address)
    assert out["first"] == list(range(1, 17))
    assert out["unchanged_run"] == []
    radius = 13
    affected = [f for f in range(1, 17) if f + radius >= 16]
    assert out["second"] == affected == list(range(3, 17))
    assert out["touched"] == [f"StyleHEAT_Face_{f:04d}.png" for f in affected]


def test_headless_entry_point_renders_saved_blend(tmp_path, addon_zip, server, fixtures_dir):
    blend = tmp_path / "farm.blend"
    run_bpy(tmp_path, scene_setup(fixtures_dir, 3, 5, blend) + """
        obj.rotation_euler[2] = 0.3
        obj.keyframe_insert("rotation_euler", frame=3)
        bpy.ops.wm.save_mainfile()
    """, addon_zip, "")
    staged = build_staged(tmp_path / "pkg")
    env = blender_env(tmp_path / "headless")
    env["PYTHONPATH"] = str(staged.parent)
    # python -m, with the bpy module
    r = subprocess.run([BPY_PY, "-m", "styleheat.headless", str(blend), "--server", server.address],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rendered 3" in r.stdout
    outdir = tmp_path / "styleheat" / "StyleHEAT_Face"
    assert sorted(p.name for p in outdir.glob("*.png")) == [f"StyleHEAT_Face_{f:04d}.png" for f in (3, 4, 5)]
    # the .blend was saved with the strip; a second run (as `blender -b x.blend --python-expr ...` does
    # it: the file already open, main() reading args after "--") has nothing left to render
    code = ("import bpy, sys; bpy.ops.wm.open_mainfile(filepath=%r); "
            "sys.argv = ['blender', '--', '--server', %r]; import styleheat.headless as h; "
            "code = h.main(); import styleheat.compat as c; "
            "print('STRIPS', [(s.name, s.frame_final_start, len(s.elements)) for s in c.all_strips(bpy.context.scene)]); "
            "sys.exit(code)") % (str(blend), server.address)
    r = subprocess.run([BPY_PY, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rendered 0, unchanged 3" in r.stdout
    assert "STRIPS [('StyleHEAT Face', 3, 3)]" in r.stdout
    # as a plain script path (what `blender -b x.blend --python .../styleheat/headless.py -- ...` runs)
    script_env = dict(env)
    script_env.pop("PYTHONPATH")
    r = subprocess.run([BPY_PY, str(staged / "headless.py"), str(blend), "--server", server.address],
                       env=script_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rendered 0, unchanged 3" in r.stdout
    # a bad server address fails with exit code 1 and a sentence
    r = subprocess.run([BPY_PY, "-m", "styleheat.headless", str(blend), "--server", "tcp://127.0.0.1:9",
                        "--timeout", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "No StyleHEAT server answered" in r.stderr


def test_sound_strip_drives_the_render_and_its_changes_rerender(tmp_path, addon_zip, server, fixtures_dir):
    """The server accepts the mixed-down PCM; muting the strip changes the audio of every frame
    (re-rendered), moving nothing else changes nothing (not re-rendered)."""
    require_audio()
    import wave

    rate = 16000
    t = np.arange(rate * 2) / rate
    pcm = np.round(0.5 * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2")
    with wave.open(str(tmp_path / "line.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate), w.writeframes(pcm.tobytes())
    blend = tmp_path / "talk.blend"
    out = run_bpy(tmp_path, scene_setup(fixtures_dir, 1, 4, blend) + f"""
        strip = compat.top_strips(scene).new_sound("line", {str(tmp_path / 'line.wav')!r}, channel=1, frame_start=2)
        info = sub("connection").connect(ADDRESS, 10.0)
        OUT["server_audio"] = info["audio"]
        first = render.render_range(scene, obj, ADDRESS, 10.0)
        OUT["first"] = first.written
        OUT["sent_audio"] = first.plan.audio is not None and float(np.abs(first.plan.audio["samples"]).max())
        OUT["frame_offset"] = first.plan.audio["frame_offset"]
        OUT["again"] = render.render_range(scene, obj, ADDRESS, 10.0).written
        strip.mute = True
        muted = render.render_range(scene, obj, ADDRESS, 10.0)
        OUT["muted"] = muted.written
        OUT["muted_audio"] = muted.plan.audio is None
    """, addon_zip, server.address)
    assert out["server_audio"] is True
    assert out["first"] == [1, 2, 3, 4]
    assert 0.45 < out["sent_audio"] < 0.55 and out["frame_offset"] == 1.0
    assert out["again"] == []
    assert out["muted"] == [1, 2, 3, 4] and out["muted_audio"] is True


def test_start_and_stop_local_server_from_blender(tmp_path, addon_zip, fixtures_dir):
    """Preferences > Start Local Server runs the server as a subprocess; connect shows its device
    and model. SIGKILLed during a render stream, it is reported dead within 15 s with an offer to restart
    it (this Blender started it); Restart Local Server brings it back on the same address (a new pid);
    Stop ends exactly that process."""
    import shlex

    from server_launch import server_command
    from test_addon_helpers import free_port

    argv = server_command("--tiny-random")
    address = f"tcp://127.0.0.1:{free_port()}"
    out = run_bpy(tmp_path, f"""
        import time
        prefs.server_command = {shlex.join(argv)!r}
        prefs.device = "cpu"
        local = sub("localserver")
        OUT["argv"] = local.build_command(command=prefs.server_command, bind=ADDRESS, device="cpu")
        OUT["start"] = sorted(bpy.ops.styleheat.server_start())
        pid = local.pid()
        OUT["running"] = local.running()
        deadline = time.monotonic() + 120
        while True:
            try:
                OUT["connect"] = sorted(bpy.ops.styleheat.connect())
                break
            except RuntimeError as exc:
                if time.monotonic() > deadline or not local.running():
                    OUT["connect"] = str(exc) + local.log_tail()
                    break
                time.sleep(1.0)
        OUT["status"] = dict(sub("connection").status)
        try:
            bpy.ops.styleheat.server_start()
            OUT["second_start"] = "no error"
        except RuntimeError as exc:
            OUT["second_start"] = str(exc)
        import signal
        conn = sub("connection"); ops = sub("operators")
        client = conn.get_client(ADDRESS, 10.0)
        ident = client.prepare(open({str(fixtures_dir / 'portrait_100.jpg')!r}, "rb").read(), align=False)["identity"]
        stream = client.render(ident, np.zeros((50, 73), np.float32), 0, list(range(50)), size=64, credit=1)
        OUT["first_frame"] = stream.next(timeout=120).frame
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        try:
            while stream.next(timeout=0.5) is not None or not stream.finished:
                assert time.monotonic() - t_kill < 60, "no error 60 s after the kill"
            OUT["dead"] = "stream ended without an error"
        except Exception as exc:
            OUT["dead"] = [type(exc).__name__, time.monotonic() - t_kill, ops.fail_text(exc)]
        OUT["dead_status"] = conn.status["dead"]
        OUT["restart"] = sorted(bpy.ops.styleheat.server_restart())
        pid2 = local.pid()
        OUT["new_pid"] = pid2 is not None and pid2 != pid
        deadline = time.monotonic() + 120
        while True:
            try:
                OUT["reconnect"] = sorted(bpy.ops.styleheat.connect())
                break
            except RuntimeError as exc:
                if time.monotonic() > deadline or not local.running():
                    OUT["reconnect"] = str(exc) + local.log_tail()
                    break
                time.sleep(1.0)
        OUT["dead_after_reconnect"] = conn.status["dead"]
        pid = pid2
        OUT["stop"] = sorted(bpy.ops.styleheat.server_stop())
        OUT["running_after"] = local.running()
        try:
            os.kill(pid, 0)
            OUT["pid_alive"] = True
        except OSError:
            OUT["pid_alive"] = False
    """, addon_zip, address, timeout=300)
    assert out["argv"] == [*argv, "--bind", address, "--device", "cpu"]
    assert out["start"] == ["FINISHED"] and out["running"] is True
    assert out["connect"] == ["FINISHED"], out["connect"]
    assert out["status"]["state"] == "ok" and out["status"]["device"] == "cpu"
    assert "tiny-random" in out["status"]["model"]
    assert "already running" in out["second_start"]
    assert out["first_frame"] == 0
    kind, noticed, message = out["dead"]
    print(f"local server reported dead {noticed:.1f} s after the SIGKILL")
    assert kind == "ServerDead" and noticed < 15.0, out["dead"]
    assert message.startswith(f"The StyleHEAT server at {address} stopped answering (no reply for 10 s)")
    assert "exited with code -9" in message and "press Restart Local Server" in message, message
    assert out["dead_status"] == address
    assert out["restart"] == ["FINISHED"] and out["new_pid"] is True
    assert out["reconnect"] == ["FINISHED"], out["reconnect"]
    assert out["dead_after_reconnect"] == ""
    assert out["stop"] == ["FINISHED"] and out["running_after"] is False and out["pid_alive"] is False


def test_render_after_the_server_forgot_the_portrait_prepares_it_again(tmp_path, addon_zip, server, fixtures_dir):
    """A server that lost the portrait (restart) answers unknown_identity: the render prepares it again
    and retries once, with the same options (Re-render All still renders every frame)."""
    blend = tmp_path / "shot.blend"
    out = run_bpy(tmp_path, scene_setup(fixtures_dir, 1, 3, blend) + """
        OUT["first"] = render.render_range(scene, obj, ADDRESS, 10.0).written
        sub("connection").get_client(ADDRESS, 10.0).forget(obj.styleheat.identity)
        OUT["again"] = render.render_range(scene, obj, ADDRESS, 10.0, force=True).written
        OUT["files"] = files()
    """, addon_zip, server.address)
    assert out["first"] == [1, 2, 3]
    assert out["again"] == [1, 2, 3]
    assert out["files"] == [f"StyleHEAT_Face_{f:04d}.png" for f in range(1, 4)] + ["styleheat_frames.json"]


def test_live_preview_follows_scrubbing_without_blocking(tmp_path, addon_zip, server, fixtures_dir):
    """Live Preview: frame changes only record the wanted frame; the timer body (called here, timers never fire
    headless) asks for the latest one, so a fast scrub renders where the playhead rests; never prepares."""
    blend = tmp_path / "shot.blend"
    out = run_bpy(tmp_path, scene_setup(fixtures_dir, 1, 10, blend) + f"""
        import time
        scrub = sub("scrub")
        OUT["handler_registered"] = scrub.on_frame_change in bpy.app.handlers.frame_change_post
        rig = obj.styleheat
        rig.preview_size = 64
        for f, v in ((1, -0.6), (10, 0.6)):          # keyed head turn: every frame is a different face
            obj.rotation_euler = (0.0, v, 0.0)
            obj.keyframe_insert('rotation_euler', frame=f)
        bpy.ops.styleheat.connect()
        OUT["prepare"] = sorted(bpy.ops.styleheat.prepare_portrait())
        def pixels():
            img = bpy.data.images[render.PREVIEW_IMAGE]
            px = np.empty(len(img.pixels), np.float32)
            img.pixels.foreach_get(px)
            return (px.reshape(64, 64, 4)[::-1, :, :3] * 255).round().astype(np.uint8)
        def settle():
            t0 = time.monotonic()
            while scrub.tick() is not None:
                assert time.monotonic() - t0 < 60, "live preview never settled"
                time.sleep(0.01)
        scene.frame_set(3)                             # Live Preview off: nothing wanted
        OUT["wanted_when_off"] = scrub.state["wanted"]
        rig.live_preview = True                        # turning it on asks for the current frame (3) at once
        OUT["wanted"] = list(scrub.state["wanted"])
        settle()
        OUT["after_first"] = [list(scrub.state["requested"]), scrub.state["shown"], scrub.state["text"]]
        p3 = pixels()
        for f in (4, 5, 6, 7, 8):                      # a fast scrub: only where it stops is rendered
            scene.frame_set(f)
        settle()
        OUT["after_scrub"] = [list(scrub.state["requested"]), scrub.state["shown"]]
        p8 = pixels()
        scene.frame_set(2)
        scrub.tick()                                   # the request for frame 2 is sent ...
        scene.frame_set(9)                             # ... and the playhead moves on before it is shown
        settle()
        OUT["after_move"] = [list(scrub.state["requested"]), scrub.state["shown"]]
        p9 = pixels()
        same = []                                      # each live image is exactly the Preview button's frame
        for f, live in ((3, p3), (8, p8), (9, p9)):
            render.preview_frame(scene, obj, ADDRESS, 10.0, frame=f)
            same.append(bool(np.array_equal(pixels(), live)))
        OUT["same_as_button"] = same
        scrub.reset()
        OUT["source_before"] = rig.identity_source
        rig.portrait = {str(fixtures_dir / 'portrait_40.jpg')!r}   # not prepared: a hint, no upload, no request
        scene.frame_set(5)
        settle()
        OUT["unprepared"] = [list(scrub.state["requested"]), scrub.state["text"], rig.identity_source]
        bpy.ops.preferences.addon_disable(module=MOD)
        OUT["handler_after_disable"] = any(getattr(h, "__module__", "").startswith(MOD)
                                           for h in bpy.app.handlers.frame_change_post)
    """, addon_zip, server.address)
    assert out["handler_registered"] is True and out["prepare"] == ["FINISHED"]
    assert out["wanted_when_off"] is None
    assert out["wanted"][2] == 3
    assert out["after_first"] == [[3], 3, ""]
    assert out["after_scrub"] == [[3, 8], 8]
    requested, shown = out["after_move"]
    assert requested[:2] == [3, 8] and requested[-1] == 9 and shown == 9
    assert set(requested[2:-1]) <= {2}
    assert out["same_as_button"] == [True, True, True]
    unprepared_requested, text, source = out["unprepared"]
    assert unprepared_requested == [] and "not prepared" in text
    assert source == out["source_before"]                 # nothing was uploaded or prepared
    assert out["handler_after_disable"] is False
