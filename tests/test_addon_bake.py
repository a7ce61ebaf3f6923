"""Baking from real bpy against a real tiny-random server with presets: bake from video (extract),
bake audio to expression (audio2exp), and the intuitive-edit presets stored in the .blend.

One bpy subprocess per scenario; one server for the module (``--presets`` the shared fixture)."""
from __future__ import annotations

import json
import textwrap
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest

from test_addon_helpers import Server, bpy_build, build_zip, require_audio, run_bpy

pytestmark = pytest.mark.blender

VIDEO_SIDE = 320


@pytest.fixture(scope="module")
def server(tmp_path_factory, fixtures_dir):
    s = Server(tmp_path_factory.mktemp("server"), extra=("--presets", str(fixtures_dir / "expression_presets.json")))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def addon_zip(tmp_path_factory) -> Path:
    return build_zip(tmp_path_factory.mktemp("dist"))


def make_video(path: Path, portrait: Path, shifts: list[int], fps: float = 25.0) -> Path:
    """An MJPG AVI: the fixture portrait shifted right by ``shifts[i]`` pixels in frame i."""
    base = cv2.resize(cv2.imread(str(portrait)), (VIDEO_SIDE, VIDEO_SIDE), interpolation=cv2.INTER_AREA)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (VIDEO_SIDE, VIDEO_SIDE))
    assert writer.isOpened()
    for dx in shifts:
        m = np.float32([[1, 0, dx], [0, 1, 0]])
        writer.write(cv2.warpAffine(base, m, (VIDEO_SIDE, VIDEO_SIDE), borderMode=cv2.BORDER_REFLECT101))
    writer.release()
    return path


BASE = np.random.default_rng(7).normal(0, 0.3, 73).round(4).tolist()

RIG_SETUP = """
        scene = bpy.context.scene
        scene.render.fps, scene.render.fps_base = 25, 1.0
        bpy.ops.styleheat.add_rig(portrait={portrait!r})
        obj = bpy.context.active_object
        obj.styleheat.align = False          # the fixture is already FFHQ-aligned
        compat = sub("compat"); bake = sub("bake"); rig_mod = sub("rig"); render = sub("render"); ops = sub("operators")
        rig_mod.set_base(obj.styleheat, {base!r})    # the portrait's coefficients (as prepare would store)
        def keys():
            return {{f"{{fc.data_path}}[{{fc.array_index}}]": [[kp.co[0], kp.co[1]] for kp in fc.keyframe_points]
                    for fc in compat.fcurves_for(obj)}}
"""


def test_bake_from_video_then_rebake_a_shorter_range(tmp_path, addon_zip, server, fixtures_dir):
    """6 video frames baked from frame 10 give keys 10..15 on rotation, location and the 64
    expression channels whose values reproduce the extracted rows; a 3-frame re-bake from 12
    replaces 12..14 only; keys outside the baked ranges (1, 30) stay; Esc leaves the keys alone."""
    portrait = fixtures_dir / "portrait_100.jpg"
    long = make_video(tmp_path / "long.avi", portrait, [0, 3, 6, 9, 12, 15])
    short = make_video(tmp_path / "short.avi", portrait, [15, 10, 5])
    fast = make_video(tmp_path / "fast.avi", portrait, [0, 2, 4, 6, 8, 10], fps=50.0)
    out = run_bpy(tmp_path, RIG_SETUP.format(portrait=str(portrait), base=BASE) + f"""
        obj.rotation_euler[2] = 0.5
        obj.keyframe_insert("rotation_euler", index=2, frame=1)
        obj.keyframe_insert("rotation_euler", index=2, frame=30)
        buf = [0.0] * 64; buf[3] = 0.7; obj.styleheat.expression.foreach_set(buf)
        obj.keyframe_insert("styleheat.expression", index=3, frame=12)     # inside the first bake: replaced
        obj.keyframe_insert("styleheat.expression", index=3, frame=40)     # outside: stays
        prefs_mod = sub("preferences")
        # the modal operator's body, driven the way its timer events would drive it
        b = ops.start_video_bake(bpy.context, obj, prefs_mod.settings(), filepath={str(long)!r}, start_frame=10,
                                 layer=None)
        OUT["progress"] = [sub("connection").progress["text"]]
        running = True
        while running:   # record after every step, the last included (it may handle progress and result)
            running = ops.step_video_bake(bpy.context, b, 0.05)
            if sub("connection").progress["text"] != OUT["progress"][-1]:
                OUT["progress"].append(sub("connection").progress["text"])
        OUT["finish_error"] = repr(ops.finish_video_bake(bpy.context, b))
        OUT["keyed"] = list(b.keyed)
        OUT["rows"] = b.job.result["rows"].tolist()
        OUT["fps"] = b.job.result["fps"]
        OUT["base"] = rig_mod.base_coefficients(obj.styleheat).tolist()
        OUT["keys1"] = keys()
        c = rig_mod.sample_clip(scene, obj, 10, 15, {{}})
        OUT["sampled"] = c.rows[c.index(10):c.index(15) + 1].tolist()
        # re-bake a shorter clip from frame 12 (blocking helper)
        b2 = bake.bake_video(scene, obj, ADDRESS, 10.0, filepath={str(short)!r}, start_frame=12, layer=None)
        OUT["keyed2"] = list(b2.keyed)
        OUT["rows2"] = b2.job.result["rows"].tolist()
        OUT["keys2"] = keys()
        # Esc right after the start: nothing is written
        b3 = ops.start_video_bake(bpy.context, obj, prefs_mod.settings(), filepath={str(long)!r}, start_frame=100,
                                  layer=None)
        b3.cancel()
        OUT["cancel_error"] = repr(ops.finish_video_bake(bpy.context, b3))
        OUT["keys3"] = keys()
        # from a 50 fps movie strip at frame 50 whose first frame is trimmed: Blender shows one movie
        # frame per scene frame, so rows at the movie's rate, keys 51..55 only
        ms = compat.top_strips(scene).new_movie("drive", {str(fast)!r}, channel=2, frame_start=50)
        ms.frame_offset_start = 1
        OUT["movie_strip"] = [ms.frame_final_start, ms.frame_final_end]
        b4 = bake.bake_video(scene, obj, ADDRESS, 10.0, strip="drive", layer=None)
        OUT["keyed4"] = list(b4.keyed)
        OUT["rows4"] = b4.job.result["rows"].tolist()
        OUT["keys4"] = keys()
        # the operator (blocking in the background) from a file at a custom start frame
        OUT["op_video"] = sorted(bpy.ops.styleheat.bake_video(filepath={str(short)!r}, use_start_frame=True,
                                                               start_frame=200, target="ACTION"))
        OUT["op_keys"] = [x for x, _ in keys()["location[0]"] if x >= 200]
        try:
            bake.bake_video(scene, obj, ADDRESS, 10.0, filepath={str(tmp_path / 'missing.avi')!r})
        except render.UserError as exc:
            OUT["missing"] = str(exc)
    """, addon_zip, server.address)
    assert out["finish_error"] == "None"
    rows = np.asarray(out["rows"])
    assert rows.shape == (6, 73) and np.isfinite(rows).all() and out["fps"] == pytest.approx(25.0)
    assert out["keyed"] == [10, 15]
    # progress "n/N" from the server's stages (landmarks, then 3DMM) while it runs, then the result
    staged = [p for p in out["progress"] if p.startswith(("Landmarks", "3DMM"))]
    assert staged and all(p.split()[-1].endswith("/6") for p in staged), out["progress"]
    assert staged[-1] == "3DMM 6/6" or out["progress"][-1] == "Extracted 6 frames", out["progress"]
    assert out["progress"][-1] in ("Extracted 6 frames", "3DMM 6/6"), out["progress"]
    base = np.asarray(out["base"])
    np.testing.assert_allclose(base, BASE, atol=1e-6)
    keys1 = out["keys1"]
    channels = ([f"rotation_euler[{i}]" for i in range(3)] + [f"location[{i}]" for i in range(3)]
                + [f"styleheat.expression[{k}]" for k in range(64)])
    for name in channels:
        frames = [x for x, _ in keys1[name]]
        expect = list(range(10, 16))
        if name == "rotation_euler[2]":
            expect = [1] + expect + [30]
        if name == "styleheat.expression[3]":
            expect = expect + [40]
        assert frames == expect, name
    # the keyed values are the documented inverse mapping of the rows
    d = rows - base
    val = {n: np.asarray([y for x, y in keys1[n] if 10 <= x <= 15]) for n in channels}
    np.testing.assert_allclose(val["rotation_euler[0]"], d[:, 64], atol=1e-5)
    np.testing.assert_allclose(val["rotation_euler[1]"], d[:, 66], atol=1e-5)
    np.testing.assert_allclose(val["rotation_euler[2]"], d[:, 65], atol=1e-5)
    np.testing.assert_allclose(val["location[0]"], d[:, 67], atol=1e-5)
    np.testing.assert_allclose(val["location[1]"], -d[:, 69], atol=1e-5)
    np.testing.assert_allclose(val["location[2]"], d[:, 68], atol=1e-5)
    np.testing.assert_allclose(np.stack([val[f"styleheat.expression[{k}]"] for k in range(64)], 1), d[:, :64],
                               atol=1e-5)
    # ... so the rows a render sends reproduce the video's (crop stays the portrait's)
    sampled = np.asarray(out["sampled"])
    np.testing.assert_allclose(sampled[:, :70], rows[:, :70], atol=1e-4)
    np.testing.assert_allclose(sampled[:, 70:], np.broadcast_to(base[70:], (6, 3)), atol=1e-6)
    # re-bake: 12..14 replaced with the short clip's rows, 10, 11, 15 and the outside keys untouched
    assert out["keyed2"] == [12, 14]
    rows2 = np.asarray(out["rows2"])
    keys2 = out["keys2"]
    for name in channels:
        before = {x: y for x, y in keys1[name]}
        after = {x: y for x, y in keys2[name]}
        assert sorted(after) == sorted(before), name
        for x in before:
            if not 12 <= x <= 14:
                assert after[x] == before[x], (name, x)
    d2 = rows2 - base
    np.testing.assert_allclose([y for x, y in keys2["rotation_euler[2]"] if 12 <= x <= 14], d2[:, 65], atol=1e-5)
    np.testing.assert_allclose([y for x, y in keys2["styleheat.expression[7]"] if 12 <= x <= 14], d2[:, 7],
                               atol=1e-5)
    assert not np.allclose(rows2[0], rows[2])           # the re-bake really wrote other values
    # cancelled: no keys changed, no error
    assert out["cancel_error"] == "None" and out["keys3"] == keys2
    assert "does not exist" in out["missing"]
    assert out["op_video"] == ["FINISHED"] and out["op_keys"] == [200, 201, 202]
    # movie strip: row i at 50 + i, only over the frames the trimmed strip shows
    assert out["movie_strip"] == [51, 56] and out["keyed4"] == [51, 55]
    rows4 = np.asarray(out["rows4"])
    assert rows4.shape == (6, 73)                       # not resampled to 25 fps (that would be 3)
    for name, col, sign in (("location[0]", 67, 1), ("location[1]", 69, -1), ("styleheat.expression[5]", 5, 1)):
        got = {x: y for x, y in out["keys4"][name] if x >= 45}
        assert sorted(got) == [51, 52, 53, 54, 55], name
        np.testing.assert_allclose([got[f] for f in range(51, 56)], sign * (rows4[1:, col] - base[col]), atol=1e-5)


def _speech_like(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)                   # syllable-rate loudness
    rng = np.random.default_rng(11)
    return (env * (0.3 * np.sin(2 * np.pi * 180 * t) + 0.15 * np.sin(2 * np.pi * 720 * t)
                   + 0.05 * rng.normal(size=t.size))).astype(np.float64)


def test_bake_audio_over_exactly_the_strip_frames(tmp_path, addon_zip, server, fixtures_dir):
    """A sound strip at frame 20 with its last 5 frames trimmed plays 20..39: expression keys land
    on exactly those frames; the server received the PCM of exactly those frames (its expressions
    equal server.preprocessing.audio.audio_to_expression run here on that PCM with the same seeded tiny model);
    scale and blend behave as documented and later renders' rows carry the keys."""
    require_audio()
    rate = 16000
    pcm = _speech_like(1.0, rate)
    wav = tmp_path / "line.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(np.round(pcm * 32767).astype("<i2").tobytes())
    out = run_bpy(tmp_path, RIG_SETUP.format(portrait=str(fixtures_dir / "portrait_100.jpg"), base=BASE) + f"""
        strip = compat.top_strips(scene).new_sound("line", {str(wav)!r}, channel=1, frame_start=20)
        strip.frame_offset_end = 5
        OUT["strip"] = [strip.frame_final_start, strip.frame_final_end]
        buf = [0.0] * 64; buf[0] = 0.3; obj.styleheat.expression.foreach_set(buf)
        for f in (5, 30, 50):                                  # 30 is inside the strip: replaced
            obj.keyframe_insert("styleheat.expression", index=0, frame=f)
        r = bake.bake_audio(scene, obj, ADDRESS, 10.0, strip="line", scale=0.5, layer=None)
        OUT["range"] = [r.first, r.last]
        OUT["samples"] = r.samples.tolist()
        OUT["expressions"] = r.expressions.tolist()
        OUT["base"] = rig_mod.base_coefficients(obj.styleheat).tolist()
        OUT["keys1"] = keys()
        r2 = bake.bake_audio(scene, obj, ADDRESS, 10.0, scale=1.0, blend=True, layer=None)     # all unmuted strips
        OUT["expressions2"] = r2.expressions.tolist()
        OUT["keys2"] = keys()
        c = rig_mod.sample_clip(scene, obj, 20, 39, {{}})
        OUT["rows"] = c.rows[c.index(20):c.index(39) + 1].tolist()
        OUT["op_audio"] = sorted(bpy.ops.styleheat.bake_audio(strip="line", scale=0.0, target="ACTION"))   # the operator
        OUT["op_keys"] = [y for x, y in keys()["styleheat.expression[9]"] if 20 <= x <= 39]
        strip.mute = True
        try:
            bake.bake_audio(scene, obj, ADDRESS, 10.0)
        except render.UserError as exc:
            OUT["no_sound"] = str(exc)
    """, addon_zip, server.address)
    assert out["strip"] == [20, 40]
    first, last = out["range"]
    assert (first, last) == (20, 39)
    n = last - first + 1
    samples = np.asarray(out["samples"], dtype=np.float32)
    assert samples.shape == (n * rate // 25,)
    # what was mixed is the WAV from its start (the strip starts at the first baked frame)
    np.testing.assert_allclose(samples, pcm[:samples.size], atol=2e-4)
    exp = np.asarray(out["expressions"])
    base = np.asarray(out["base"])
    e0 = base[:64]
    # the server computed its rows from those samples for exactly frames 20..39
    from server.preprocessing.audio import audio_to_expression
    model = tiny_audio2exp()
    expected = audio_to_expression(samples, rate, 25.0, e0, model=model, n_frames=n, offset_frames=0.0)
    np.testing.assert_allclose(exp, expected, atol=1e-4)
    keys1 = out["keys1"]
    for k in range(64):
        frames = [x for x, _ in keys1[f"styleheat.expression[{k}]"]]
        assert frames == ([5.0] if k == 0 else []) + list(range(20, 40)) + ([50.0] if k == 0 else []), k
        vals = [y for x, y in keys1[f"styleheat.expression[{k}]"] if 20 <= x <= 39]
        np.testing.assert_allclose(vals, 0.5 * (exp[:, k] - e0[k]), atol=1e-5)
    assert dict(keys1["styleheat.expression[0]"])[5.0] == pytest.approx(0.3)
    # blend: the second bake adds its (scale 1) offsets to the keys there
    np.testing.assert_allclose(out["expressions2"], exp, atol=1e-6)
    for k in (0, 17, 63):
        v1 = np.asarray([y for x, y in keys1[f"styleheat.expression[{k}]"] if 20 <= x <= 39])
        v2 = np.asarray([y for x, y in out["keys2"][f"styleheat.expression[{k}]"] if 20 <= x <= 39])
        np.testing.assert_allclose(v2, v1 + (exp[:, k] - e0[k]), atol=1e-5)
    # rows of a later render carry them: exp row = e0 + keyed offset
    rows = np.asarray(out["rows"])
    keyed = np.stack([[y for x, y in out["keys2"][f"styleheat.expression[{k}]"] if 20 <= x <= 39]
                      for k in range(64)], 1)
    np.testing.assert_allclose(rows[:, :64], e0 + keyed, atol=1e-4)
    assert "no unmuted sound strip" in out["no_sound"]
    assert out["op_audio"] == ["FINISHED"] and out["op_keys"] == [0.0] * 20      # scale 0, replace: flat


def test_presets_from_the_server_move_rows_and_stay_in_the_blend(tmp_path, addon_zip, server, fixtures_dir):
    """hello's presets (the server's --presets file) are stored in the scene; keyed preset weights
    move the expression rows as exp = e0 + sum_k w_k (P_k - e0); after saving and reopening the
    .blend the rows are the same without any server."""
    presets = json.loads((fixtures_dir / "expression_presets.json").read_text())["presets"]
    blend = tmp_path / "presets.blend"
    out = run_bpy(tmp_path, RIG_SETUP.format(portrait=str(fixtures_dir / "portrait_100.jpg"), base=BASE) + f"""
        OUT["before"] = sorted(rig_mod.stored_presets(scene))
        OUT["connect"] = sorted(bpy.ops.styleheat.connect())
        OUT["hello_presets"] = {{k: list(map(float, v)) for k, v in sub("connection").server_info[ADDRESS]["presets"].items()}}
        OUT["stored"] = {{k: v.tolist() for k, v in rig_mod.stored_presets(scene).items()}}
        for name, pts in (("mouth", [(1, 0.0), (5, 1.0)]), ("eyebrow", [(1, 0.5), (5, 0.0)]), ("center", [(3, 0.25)])):
            for f, v in pts:
                setattr(obj.styleheat, name, v); obj.keyframe_insert("styleheat." + name, frame=f)
        for fc in compat.fcurves_for(obj):
            for kp in fc.keyframe_points:
                kp.interpolation = "LINEAR"
        OUT["base"] = rig_mod.base_coefficients(obj.styleheat).tolist()
        plan = render.plan_render(scene, obj, "id", sub("connection").server_info[ADDRESS], 1, 5, None)
        OUT["rows"] = plan.clip.rows.tolist()
        name = obj.name
        bpy.ops.wm.save_as_mainfile(filepath={str(blend)!r})
        bpy.ops.wm.read_homefile(use_empty=True)
        bpy.ops.wm.open_mainfile(filepath={str(blend)!r})
        scene = bpy.context.scene; obj = scene.objects[name]
        # offline: no server info at all, the rows come from what the .blend holds
        OUT["offline"] = render.plan_render(scene, obj, "offline", {{}}, 1, 5, None).clip.rows.tolist()
    """, addon_zip, server.address)
    assert out["before"] == []
    assert out["connect"] == ["FINISHED"]
    assert sorted(out["hello_presets"]) == sorted(presets)
    for name in presets:
        np.testing.assert_allclose(out["hello_presets"][name], presets[name], atol=1e-6)
        np.testing.assert_allclose(out["stored"][name], presets[name], atol=1e-6)
    base = np.asarray(out["base"])
    e0 = base[:64]
    rows = np.asarray(out["rows"])
    weights = {"mouth": np.interp(range(1, 6), [1, 5], [0, 1]), "eyebrow": np.interp(range(1, 6), [1, 5], [0.5, 0]),
               "center": np.full(5, 0.25)}
    for i in range(5):
        expected = e0 + sum(weights[n][i] * (np.asarray(presets[n]) - e0) for n in weights)
        np.testing.assert_allclose(rows[i, :64], expected, atol=1e-5, err_msg=f"frame {i + 1}")
    assert np.abs(rows[4, :64] - rows[0, :64]).max() > 0.05        # the presets really move the rows
    np.testing.assert_allclose(out["offline"], rows, atol=1e-6)


def tiny_audio2exp():
    """The seeded tiny Audio2Exp a ``styleheat-server --tiny-random`` (seed 0) serves."""
    from server.service.bake_models import tiny_audio2exp as make   # built by the server the same way

    return make(seed=0)


def test_bake_on_a_server_without_bake_models_is_a_clear_error(tmp_path, addon_zip, fixtures_dir):
    """A server started with --no-bake-models says so in its capabilities: both bakes stop with the
    advice to fix it, before anything is sent, and no key is written. An object that is no face rig
    (render and bake) and a rig not in XYZ Euler (bake) are clear errors too."""
    audio = bpy_build()["audio"]
    bare = Server(tmp_path, extra=("--no-bake-models",))
    try:
        movie = make_video(tmp_path / "clip.avi", fixtures_dir / "portrait_100.jpg", [0, 2, 4])
        wav = tmp_path / "line.wav"
        with wave.open(str(wav), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
            w.writeframes(np.round(_speech_like(0.4, 16000) * 32767).astype("<i2").tobytes())
        body = textwrap.indent(textwrap.dedent(f"""
            if {audio!r}:                   # a bpy without Audaspace has no sound strips
                compat.top_strips(scene).new_sound("line", {str(wav)!r}, channel=1, frame_start=1)
            OUT["caps"] = sub("connection").info_field(sub("connection").connect(ADDRESS, 10.0), "capabilities", None)
            plain = bpy.data.objects.new("Plain", None)
            scene.collection.objects.link(plain)
            def quat_rig():
                obj.rotation_mode = "QUATERNION"
                try:
                    bake.bake_audio(scene, obj, ADDRESS, 10.0, strip="line")
                finally:
                    obj.rotation_mode = "XYZ"
            for name, call in (("video", lambda: bake.bake_video(scene, obj, ADDRESS, 10.0, filepath={str(movie)!r})),
                               ("audio", lambda: bake.bake_audio(scene, obj, ADDRESS, 10.0, strip="line")),
                               ("render_plain", lambda: render.render_range(scene, plain, ADDRESS, 10.0)),
                               ("bake_plain", lambda: bake.bake_audio(scene, plain, ADDRESS, 10.0, strip="line")),
                               ("bake_quat", quat_rig)):
                try:
                    call()
                    OUT[name] = "no error"
                except render.UserError as exc:
                    OUT[name] = str(exc)
            OUT["keys"] = keys()
        """), " " * 8)                     # RIG_SETUP's indentation
        out = run_bpy(tmp_path, RIG_SETUP.format(portrait=str(fixtures_dir / "portrait_100.jpg"), base=BASE) + body,
                      addon_zip, bare.address)
    finally:
        bare.stop()
    assert out["caps"]["extract"] is False and out["caps"]["audio2exp"] is False
    assert out["video"].startswith("This StyleHEAT server cannot extract motion from video")
    if audio:
        assert out["audio"].startswith("This StyleHEAT server has no Audio2Exp network")
    else:   # nothing is sent either: the add-on says this Blender cannot mix sound down
        assert out["audio"].startswith("This Blender was built without audio support")
    for name in ("render_plain", "bake_plain"):
        assert out[name] == "Plain is not a StyleHEAT face rig; add one with Add > StyleHEAT Face Rig."
    assert out["bake_quat"].endswith("set Rotation Mode to XYZ Euler before baking (the bake keys rotation_euler)")
    assert out["keys"] == {}
