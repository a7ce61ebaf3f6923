"""The add-on inside real bpy 5.0.1 (headless), one fresh subprocess per scenario; no server needed."""
from __future__ import annotations

import json
import math
import wave
from pathlib import Path

import numpy as np
import pytest

from test_addon_helpers import build_zip, require_audio, run_bpy

pytestmark = pytest.mark.blender


@pytest.fixture(scope="module")
def addon_zip(tmp_path_factory) -> Path:
    return build_zip(tmp_path_factory.mktemp("dist"))


def test_install_enable_register_unregister(tmp_path, addon_zip):
    out = run_bpy(tmp_path, """
        import addon_utils
        def snapshot():
            return {
                "ops": sorted(n for n in dir(bpy.ops.styleheat) if not n.startswith("_")),
                "panels": sorted(n for n in dir(bpy.types) if n.startswith("STYLEHEAT_PT_")),
                "rig_prop": hasattr(bpy.types.Object, "styleheat"),
                "prefs": MOD in bpy.context.preferences.addons,
            }
        OUT["enabled"] = snapshot()
        OUT["prefs_address"] = bpy.context.preferences.addons[MOD].preferences.server_address
        bpy.ops.preferences.addon_disable(module=MOD)
        OUT["disabled"] = snapshot()
        bpy.ops.preferences.addon_enable(module=MOD)
        OUT["reenabled"] = snapshot()
        # the rig operator creates a keyframable rig
        bpy.ops.styleheat.add_rig()
        obj = bpy.context.active_object
        obj.styleheat.mouth = 0.5
        obj.keyframe_insert("styleheat.mouth", frame=3)
        obj.keyframe_insert("styleheat.expression", index=37, frame=3)
        OUT["rig"] = [obj.styleheat.is_rig, obj.rotation_mode, len(obj.styleheat.expression),
                      len(obj.styleheat.expression[0])]
        OUT["torch_loaded"] = "torch" in sys.modules
        # uninstall the extension
        repos = bpy.context.preferences.extensions.repos
        idx = next(i for i, r in enumerate(repos) if r.module == "user_default")
        OUT["uninstall"] = sorted(bpy.ops.extensions.package_uninstall(repo_index=idx, pkg_id="styleheat"))
        OUT["after_uninstall"] = snapshot()
        # the same zip also installs as a legacy add-on (bl_info)
        OUT["legacy_install"] = sorted(bpy.ops.preferences.addon_install(filepath=ZIP, overwrite=True))
        OUT["legacy_enable"] = sorted(bpy.ops.preferences.addon_enable(module="styleheat"))
        OUT["legacy"] = {"rig_prop": hasattr(bpy.types.Object, "styleheat"),
                         "render_op": hasattr(bpy.ops.styleheat, "render"),
                         "prefs": "styleheat" in bpy.context.preferences.addons}
        bpy.ops.preferences.addon_disable(module="styleheat")
        OUT["legacy_disabled"] = hasattr(bpy.types.Object, "styleheat")
    """, addon_zip)
    expected_ops = ["add_rig", "bake_audio", "bake_video", "connect", "dub_movie_strip", "match_resolution", "open_output",
                    "prepare_portrait", "preview", "render", "render_farm", "server_restart", "server_start",
                    "server_stop"]
    expected_panels = ["STYLEHEAT_PT_advanced", "STYLEHEAT_PT_attributes", "STYLEHEAT_PT_bake",
                       "STYLEHEAT_PT_expression", "STYLEHEAT_PT_main", "STYLEHEAT_PT_output"]
    for state in ("enabled", "reenabled"):
        assert out[state]["ops"] == expected_ops
        assert out[state]["panels"] == expected_panels
        assert out[state]["rig_prop"] and out[state]["prefs"]
    assert out["disabled"] == {"ops": [], "panels": [], "rig_prop": False, "prefs": False}
    assert out["prefs_address"].startswith("tcp://")
    assert out["rig"] == [True, "XYZ", 2, 32]
    assert out["torch_loaded"] is False
    assert out["uninstall"] == ["FINISHED"]
    assert out["after_uninstall"]["rig_prop"] is False and out["after_uninstall"]["ops"] == []
    assert out["legacy_install"] == ["FINISHED"] and out["legacy_enable"] == ["FINISHED"]
    assert out["legacy"] == {"rig_prop": True, "render_op": True, "prefs": True}
    assert out["legacy_disabled"] is False


def test_keyed_rig_gives_expected_rows(tmp_path, addon_zip, fixtures_dir):
    """Rows from keyed rotation/location/presets/raw expression/attributes, checked against values
    computed here from the keys (linear interpolation) and the documented mapping."""
    presets = json.loads((fixtures_dir / "expression_presets.json").read_text())["presets"]
    base = np.random.default_rng(7).normal(0, 0.3, 73).round(4)
    keys = {  # data path, index -> [(frame, value)]
        ("rotation_euler", 0): [(1, 0.0), (21, math.radians(20))],
        ("rotation_euler", 1): [(1, math.radians(-5)), (11, math.radians(10))],
        ("rotation_euler", 2): [(5, 0.0), (15, math.radians(30))],
        ("location", 0): [(1, 0.0), (21, 0.1)],
        ("location", 1): [(1, 0.05), (21, -0.05)],
        ("location", 2): [(3, 0.0), (9, 0.02)],
        ("styleheat.mouth", 0): [(1, 0.0), (11, 1.0)],
        ("styleheat.eyes", 0): [(6, 0.5), (16, 0.0)],
        ("styleheat.expression", 37): [(1, 0.0), (21, 2.0)],
        ("styleheat.expression", 3): [(8, -1.0), (12, 1.0)],
        ('styleheat.attributes["young"].value', 0): [(1, 0.0), (21, -5.0)],
    }
    start, end = 6, 12  # render range; keys reach 1..21 so windows extend to 1..21 (6-13 < 1, 12+13 > 21)
    out = run_bpy(tmp_path, f"""
        rig_mod = sub("rig"); render = sub("render")
        bpy.ops.styleheat.add_rig()
        obj = bpy.context.active_object
        rig_mod.set_base(obj.styleheat, {base.tolist()!r})
        rig_mod.ensure_attributes(obj.styleheat, {{"young": {{"min": -5.0, "max": 5.0}}}})
        keys = {[(k[0], k[1], v) for k, v in keys.items()]!r}
        for path, index, pts in keys:
            for frame, value in pts:
                if path == "styleheat.expression":
                    buf = [0.0] * 64; obj.styleheat.expression.foreach_get(buf); buf[index] = value
                    obj.styleheat.expression.foreach_set(buf)
                    obj.keyframe_insert(path, index=index, frame=frame)
                elif path.startswith("styleheat.attributes"):
                    obj.styleheat.attributes["young"].value = value
                    obj.keyframe_insert(path, frame=frame)
                elif path.startswith("styleheat."):
                    setattr(obj.styleheat, path.split(".")[1], value)
                    obj.keyframe_insert(path, frame=frame)
                else:
                    getattr(obj, path)[index] = value
                    obj.keyframe_insert(path, index=index, frame=frame)
        compat = sub("compat")
        for fc in compat.fcurves_for(obj):
            for kp in fc.keyframe_points:
                kp.interpolation = "LINEAR"
            fc.extrapolation = "CONSTANT"
        scene = bpy.context.scene
        scene.frame_set(4)
        clip = rig_mod.sample_clip(scene, obj, {start}, {end}, {{k: v for k, v in {presets!r}.items()}})
        OUT["first"] = clip.first
        OUT["rows"] = clip.rows.tolist()
        OUT["attributes"] = {{k: v.tolist() for k, v in clip.attributes.items()}}
        OUT["frame_after"] = scene.frame_current
        OUT["fcurves"] = len(compat.fcurves_for(obj))
    """, addon_zip)

    def curve(path, index, frame):
        pts = keys.get((path, index))
        if pts is None:
            return 0.0
        xs, ys = zip(*pts)
        return float(np.interp(frame, xs, ys))

    assert out["first"] == 1 and len(out["rows"]) == 21   # 1..21: clamped to the keyed range
    assert out["frame_after"] == 4                         # sampling restores the current frame
    assert out["fcurves"] == len(keys)
    rows = np.asarray(out["rows"])
    e0 = base[:64]
    for i, f in enumerate(range(1, 22)):
        exp = e0.copy()
        exp[37] += curve("styleheat.expression", 37, f)
        exp[3] += curve("styleheat.expression", 3, f)
        exp += curve("styleheat.mouth", 0, f) * (np.asarray(presets["mouth"]) - e0)
        exp += curve("styleheat.eyes", 0, f) * (np.asarray(presets["eyes"]) - e0)
        rx, ry, rz = (curve("rotation_euler", k, f) for k in range(3))
        lx, ly, lz = (curve("location", k, f) for k in range(3))
        expected = np.concatenate([exp, base[64:67] + [rx, rz, ry], base[67:70] + [lx, lz, -ly], base[70:73]])
        np.testing.assert_allclose(rows[i], expected, atol=2e-6, err_msg=f"frame {f}")
    np.testing.assert_allclose(out["attributes"]["young"], [curve('styleheat.attributes["young"].value', 0, f)
                                                           for f in range(1, 22)], atol=1e-6)


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> np.ndarray:
    pcm = np.round(np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return pcm.astype(np.float64) / 32768.0


def test_sound_strip_offset_trim_volume_key_mute(tmp_path, addon_zip):
    """The PCM sent for a frame range is what plays there: strip offset, start trim, a keyed volume
    step and mute, compared with the source WAV written here."""
    require_audio()
    rate, fps = 16000, 25
    t = np.arange(rate * 3) / rate
    rng = np.random.default_rng(3)
    src = _write_wav(tmp_path / "voice.wav",
                     0.4 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 530 * t + 1) + 0.05 * rng.normal(size=t.size),
                     rate)
    _write_wav(tmp_path / "other.wav", 0.5 * np.ones(rate), rate)
    strip_start, trim, first, last, step = 10, 6, 12, 60, 40
    out = run_bpy(tmp_path, f"""
        audio = sub("audio"); compat = sub("compat"); render = sub("render")
        scene = bpy.context.scene
        scene.render.fps = {fps}; scene.render.fps_base = 1.0
        scene.frame_start, scene.frame_end = 1, 100
        strips = compat.top_strips(scene)
        s = strips.new_sound("voice", {str(tmp_path / 'voice.wav')!r}, channel=1, frame_start={strip_start})
        s.frame_offset_start = {trim}
        s.volume = 1.0; s.keyframe_insert("volume", frame=1)
        s.volume = 0.5; s.keyframe_insert("volume", frame={step})
        for fc in compat.fcurves_for(scene):
            for kp in fc.keyframe_points:
                kp.interpolation = "CONSTANT"
        # content trim (5.1: content_trim_start; before: animation_offset_start) through the compat helper
        c = strips.new_sound("content", {str(tmp_path / 'voice.wav')!r}, channel=3, frame_start=90)
        compat.set_sound_trim(c, 3, 0)
        OUT["trim_read"] = list(compat.sound_trim(c))
        OUT["content_at"] = [c.frame_start, c.frame_final_start]
        OUT["content"] = audio.mixdown(scene, c.frame_final_start, c.frame_final_start + 9).tolist()
        m = strips.new_sound("muted", {str(tmp_path / 'other.wav')!r}, channel=2, frame_start=1)
        m.mute = True
        pcm = audio.mixdown(scene, {first}, {last})
        OUT["pcm"] = pcm.tolist()
        OUT["range_after"] = [scene.frame_start, scene.frame_end]
        m.mute = False
        OUT["with_unmuted"] = audio.mixdown(scene, {first}, {last})[:200].tolist()
        for x in list(compat.all_strips(scene)):
            strips.remove(x)
        OUT["no_strips"] = audio.mixdown(scene, {first}, {last}) is None
    """, addon_zip)
    pcm = np.asarray(out["pcm"])
    spf = rate // fps
    n = np.arange((last - first + 1) * spf)
    frame_time = first + n / spf                       # scene frame at which each sample plays
    src_index = np.round((frame_time - strip_start) * spf).astype(int)
    audible = (frame_time >= strip_start + trim) & (src_index < src.size)
    expected = np.where(audible, src[np.clip(src_index, 0, src.size - 1)], 0.0)
    expected = expected * np.where(frame_time >= step + 1, 0.5, 1.0)
    assert pcm.shape == expected.shape
    assert out["range_after"] == [1, 100]
    # Audaspace smooths a keyed volume step over about two frames (measured: from step-0.8 to
    # step+2.2; the animation is sampled per frame, mixed per buffer); compare everything else exactly
    ramp = (frame_time >= step - 1) & (frame_time < step + 3)
    np.testing.assert_allclose(pcm[~ramp], expected[~ramp], atol=2e-4)
    # the trimmed head is silent, the tail after the volume step is at half level
    assert np.abs(pcm[frame_time < strip_start + trim]).max() < 1e-6
    late = frame_time >= step + 3
    ratio = (pcm[late] @ src[src_index[late]]) / (src[src_index[late]] @ src[src_index[late]])
    assert abs(ratio - 0.5) < 1e-3
    # the content-trimmed strip starts playing its source 3 frames in, at its first frame. Where that
    # frame is depends on the version: up to 5.0 the content slides and the strip stays at 90; from 5.1
    # on the strip's start moves to 93 and the content stays. Either way source frame 0 sits at
    # frame_start - 3.
    assert out["trim_read"] == [3.0, 0.0]
    frame_start, first_frame = out["content_at"]
    assert first_frame - (frame_start - 3) == 3 and first_frame in (90, 93)
    content = np.asarray(out["content"])
    np.testing.assert_allclose(content, src[3 * spf: 3 * spf + content.size], atol=2e-4)
    # unmuting the second strip changes what is sent; no strips -> no audio
    assert np.abs(np.asarray(out["with_unmuted"]) - pcm[:200]).max() > 0.2
    assert out["no_strips"] is True


def test_a_mixdown_that_writes_nothing_is_a_clear_error(tmp_path, addon_zip):
    """Blender's mixdown really fails here (its output path is in a folder that does not exist): the
    add-on says so instead of reading a missing file (5.2 returns FINISHED and only reports the
    failure; Audaspace aborts the process on 4.5/5.0 when it reads a file that holds no audio);
    the next mixdown works."""
    require_audio()
    _write_wav(tmp_path / "voice.wav", 0.3 * np.ones(16000), 16000)
    out = run_bpy(tmp_path, f"""
        import tempfile
        audio = sub("audio"); compat = sub("compat"); render = sub("render")
        scene = bpy.context.scene
        scene.render.fps, scene.render.fps_base = 25, 1.0
        compat.top_strips(scene).new_sound("voice", {str(tmp_path / 'voice.wav')!r}, channel=1, frame_start=1)
        real = tempfile.mkstemp
        def into_a_missing_folder(**kw):
            fd, path = real(**kw)
            return fd, os.path.join(os.path.dirname(path), "no-such-folder", os.path.basename(path))
        tempfile.mkstemp = into_a_missing_folder
        try:
            audio.mixdown(scene, 1, 10)
            OUT["error"] = None
        except render.UserError as exc:
            OUT["error"] = str(exc)
        tempfile.mkstemp = real
        OUT["range_after"] = [scene.frame_start, scene.frame_end]
        OUT["next"] = audio.mixdown(scene, 1, 10).tolist()
    """, addon_zip)
    assert out["error"] is not None and out["error"].startswith("Blender's audio mixdown")
    assert out["range_after"] == [1, 250]
    next_pcm = np.asarray(out["next"])
    assert next_pcm.shape == (6400,) and abs(float(np.median(next_pcm[100:])) - 0.3) < 1e-3


def test_server_down_gives_clear_error(tmp_path, addon_zip):
    out = run_bpy(tmp_path, """
        import time
        prefs.server_address = "tcp://127.0.0.1:9"
        prefs.timeout = 1.0
        t = time.monotonic()
        try:
            bpy.ops.styleheat.connect()
            OUT["error"] = None
        except RuntimeError as exc:
            OUT["error"] = str(exc)
        OUT["seconds"] = time.monotonic() - t
        OUT["status"] = sub("connection").status["state"]
        bpy.ops.styleheat.add_rig(portrait="//missing.png")
        try:
            bpy.ops.styleheat.render()
            OUT["render_error"] = None
        except RuntimeError as exc:
            OUT["render_error"] = str(exc)
    """, addon_zip)
    assert "No StyleHEAT server answered at tcp://127.0.0.1:9" in out["error"]
    assert "Start Local Server" in out["error"]
    assert out["seconds"] < 5
    assert out["status"] == "error"
    assert "No StyleHEAT server answered" in out["render_error"]


def test_panels_and_preferences_draw_only_existing_props_and_operators(tmp_path, addon_zip):
    """Panels cannot draw without a window here, so their draw() runs against a recording layout
    that checks every prop() names a real RNA property and every operator() a registered one."""
    out = run_bpy(tmp_path, """
        problems, seen = [], []
        class Layout:
            def __getattr__(self, name):
                if name in ("row", "column", "box", "grid_flow", "split", "column_flow"):
                    return lambda *a, **k: Layout()
                if name == "prop":
                    def prop(data, prop_name, **k):
                        seen.append(prop_name)
                        if prop_name not in data.bl_rna.properties:
                            problems.append(f"{type(data).__name__}.{prop_name}")
                    return prop
                if name == "operator":
                    def operator(idname, **k):
                        seen.append(idname)
                        cat, op = idname.split(".")
                        if not hasattr(getattr(bpy.ops, cat), op) or getattr(getattr(bpy.ops, cat), op).idname() == "":
                            problems.append(idname)
                    return operator
                if name == "label":
                    return lambda **k: None
                raise AttributeError(name)
        class Panel:
            pass
        ctx = bpy.context
        for with_rig in (False, True):
            if with_rig:
                bpy.ops.styleheat.add_rig()
                rig = ctx.active_object.styleheat
                sub("rig").ensure_attributes(rig, {"age": {"min": -10, "max": 10}})
                rig.show_coefficients = True      # the raw coefficients panel is behind this expert toggle
            for name in sorted(n for n in dir(bpy.types) if n.startswith("STYLEHEAT_PT_")):
                cls = getattr(bpy.types, name)
                OUT.setdefault("parents", {})[name] = getattr(cls, "bl_parent_id", "")
                if hasattr(cls, "poll") and not cls.poll(ctx):
                    continue
                OUT.setdefault("drawn", {}).setdefault(str(with_rig), []).append(name)
                fake = Panel(); fake.layout = Layout()
                cls.draw(fake, ctx)
        p = bpy.context.preferences.addons[MOD].preferences
        class PrefsView:                     # the preferences' draw() with the recording layout
            layout = Layout()
            def __getattr__(self, name):
                return getattr(p, name)
        type(p).draw(PrefsView(), ctx)
        OUT["problems"] = problems
        OUT["seen"] = sorted(set(seen))
    """, addon_zip)
    assert out["problems"] == []
    children = ["STYLEHEAT_PT_advanced", "STYLEHEAT_PT_attributes", "STYLEHEAT_PT_bake",
                "STYLEHEAT_PT_expression", "STYLEHEAT_PT_output"]
    assert out["parents"] == {"STYLEHEAT_PT_main": "", **{c: "STYLEHEAT_PT_main" for c in children}}
    assert out["drawn"] == {"False": ["STYLEHEAT_PT_main"], "True": sorted(children + ["STYLEHEAT_PT_main"])}
    for expected in ("styleheat.render", "styleheat.preview", "styleheat.prepare_portrait", "styleheat.add_rig",
                     "mouth", "expression", "portrait", "value", "rotation_euler", "location",
                     "server_address", "curve_dir", "styleheat.server_start", "styleheat.connect",
                     "styleheat.bake_video", "styleheat.bake_audio", "styleheat.open_output",
                     "styleheat.match_resolution", "show_coefficients", "styleheat.render_farm", "farm_address"):
        assert expected in out["seen"]


def test_operators_need_a_rig_and_no_running_job(tmp_path, addon_zip):
    """Render, bake and preview are greyed out without a face rig; render and the bakes also while a
    render or bake runs (the preview stays available)."""
    out = run_bpy(tmp_path, """
        ops = sub("operators")
        names = ("render", "bake_video", "bake_audio", "preview", "prepare_portrait")
        def polls():
            return {n: getattr(bpy.ops.styleheat, n).poll() for n in names}
        OUT["no_rig"] = polls()
        bpy.ops.styleheat.add_rig()
        OUT["rig"] = polls()
        sub("connection").progress["running"] = True
        OUT["busy"] = polls()
    """, addon_zip)
    assert out["no_rig"] == dict.fromkeys(("render", "bake_video", "bake_audio", "preview", "prepare_portrait"), False)
    assert out["rig"] == {"render": True, "bake_video": True, "bake_audio": True, "preview": True,
                          "prepare_portrait": True}
    assert out["busy"] == {"render": False, "bake_video": False, "bake_audio": False, "preview": True,
                           "prepare_portrait": True}
