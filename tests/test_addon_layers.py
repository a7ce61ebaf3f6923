"""Layered bakes from real bpy against a real tiny-random server (presets from the shared fixture):
a video pose layer, an audio expression + blink layer, re-bake, mute, undo; blinks and head motion
from audio; bad options. One bpy subprocess per scenario; one server for the module."""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from test_addon_bake import BASE, RIG_SETUP, _speech_like, make_video
from test_addon_helpers import Server, build_zip, require_audio, run_bpy

pytestmark = pytest.mark.blender

RATE = 16000

LAYER_HELPERS = """
        layers = sub("layers")
        def layer_keys(name):
            return {f"{fc.data_path}[{fc.array_index}]": [[kp.co[0], kp.co[1]] for kp in fc.keyframe_points]
                    for fc in layers.layer_fcurves(obj, name)}
        def tracks():
            return [[t.name, t.mute, [[s.blend_type, s.extrapolation, s.frame_start, s.frame_end, s.action.name]
                                      for s in t.strips]] for t in obj.animation_data.nla_tracks]
        def rows(lo, hi):
            c = rig_mod.sample_clip(scene, obj, lo, hi, rig_mod.stored_presets(scene))
            return c.rows[c.index(lo):c.index(hi) + 1].tolist()
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, fixtures_dir):
    s = Server(tmp_path_factory.mktemp("server"), extra=("--presets", str(fixtures_dir / "expression_presets.json")))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def addon_zip(tmp_path_factory) -> Path:
    return build_zip(tmp_path_factory.mktemp("dist"))


def _wav(path: Path, seconds: float) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(RATE)
        w.writeframes(np.round(_speech_like(seconds, RATE) * 32767).astype("<i2").tobytes())
    return path


def _curve(keys: dict, name: str, frames) -> np.ndarray:
    """Key values of one channel at ``frames`` (0 where that layer has no key: its strip does not
    extrapolate, and every bake keys every frame of its range)."""
    d = {int(x): y for x, y in keys.get(name, [])}
    return np.asarray([d.get(f, 0.0) for f in frames])


def _blink_dir(presets: dict) -> np.ndarray:
    return np.asarray(presets["eyes"], np.float64) - np.asarray(presets["center"], np.float64)


def test_video_pose_and_audio_expression_layers(tmp_path, addon_zip, server, fixtures_dir):
    """A pose-only video bake and an expression+blink audio bake land in two layers; the rows sent for
    a frame are the sum of the layers' keys and the rig's own action; a re-bake with another blink seed
    replaces only the audio layer; muting it removes its part from the rows; undo of the (operator)
    audio bake restores the state before it, redo brings it back."""
    require_audio()
    wav = _wav(tmp_path / "line.wav", 1.6)                      # frames 20..59 at 25 fps
    movie = make_video(tmp_path / "clip.avi", fixtures_dir / "portrait_100.jpg", [0, 3, 6, 9, 12, 15])
    out = run_bpy(tmp_path, RIG_SETUP.format(portrait=str(fixtures_dir / "portrait_100.jpg"), base=BASE)
                  + LAYER_HELPERS + f"""
        compat.top_strips(scene).new_sound("line", {str(wav)!r}, channel=1, frame_start=20)
        # the rig's own action keys expression[3] (flat 0.2) and location[2] (flat 0.1)
        buf = [0.0] * 64; buf[3] = 0.2; obj.styleheat.expression.foreach_set(buf)
        obj.location[2] = 0.1
        for f in (1, 80):
            obj.keyframe_insert("styleheat.expression", index=3, frame=f)
            obj.keyframe_insert("location", index=2, frame=f)
        OUT["connect"] = sorted(bpy.ops.styleheat.connect())
        OUT["presets"] = {{k: v.tolist() for k, v in rig_mod.stored_presets(scene).items()}}
        v = bake.bake_video(scene, obj, ADDRESS, 10.0, filepath={str(movie)!r}, start_frame=22,
                            groups={{"ROTATION", "LOCATION"}})
        OUT["video_layer"] = v.layer
        OUT["video_rows"] = v.job.result["rows"].tolist()
        OUT["video1"] = layer_keys(v.layer)
        OUT["own_keys"] = sorted(compat.fcurves_for(obj) and [f"{{fc.data_path}}[{{fc.array_index}}]"
                                                             for fc in compat.fcurves_for(obj)])
        OUT["undo_push"] = sorted(bpy.ops.ed.undo_push(message="before the audio bake"))
        # the operator, with an undo step as the UI makes it (bpy.ops from Python pushes none by default)
        OUT["op"] = sorted(bpy.ops.styleheat.bake_audio("EXEC_DEFAULT", True, strip="line", channels={{"EXPRESSION"}},
                                                         blinks=True, blink_rate=100.0, blink_seed=1))
        OUT["markers1"] = sorted(m.frame for m in scene.timeline_markers if m.name == "blink")
        OUT["audio1"] = layer_keys("Audio: line")
        OUT["tracks1"] = tracks()
        OUT["blend_type"] = obj.animation_data.action_blend_type
        OUT["rows1"] = rows(15, 65)
        OUT["keyed_range"] = list(rig_mod.keyed_range(obj))
        # re-bake the audio layer with another blink seed (plain function)
        r = bake.bake_audio(scene, obj, ADDRESS, 10.0, strip="line", groups={{"EXPRESSION"}}, blinks=True,
                            blink_rate=100.0, blink_seed=2)
        OUT["blinks2"] = r.blink_frames
        OUT["markers2"] = sorted(m.frame for m in scene.timeline_markers if m.name == "blink")
        OUT["audio2"] = layer_keys("Audio: line")
        OUT["video2"] = layer_keys(v.layer)
        OUT["tracks2"] = tracks()
        OUT["actions2"] = sorted(a.name for a in bpy.data.actions)
        OUT["rows2"] = rows(15, 65)
        obj.animation_data.nla_tracks["Audio: line"].mute = True
        OUT["rows_muted"] = rows(15, 65)
        obj.animation_data.nla_tracks["Audio: line"].mute = False
        obj.animation_data.nla_tracks[v.layer].mute = True
        OUT["rows_video_muted"] = rows(15, 65)
        # undo: back to the step pushed before the operator (the plain re-bake and mutes were never pushed)
        name = obj.name
        OUT["undo"] = sorted(bpy.ops.ed.undo())
        obj = bpy.data.objects[name]; scene = bpy.context.scene
        OUT["tracks_undone"] = tracks()
        OUT["video_undone"] = layer_keys(v.layer)
        OUT["rows_undone"] = rows(15, 65)
        OUT["redo"] = sorted(bpy.ops.ed.redo())
        obj = bpy.data.objects[name]; scene = bpy.context.scene
        OUT["audio_redone"] = layer_keys("Audio: line")
        OUT["tracks_redone"] = tracks()
    """, addon_zip, server.address)
    assert out["connect"] == ["FINISHED"] and out["op"] == ["FINISHED"] and out["undo_push"] == ["FINISHED"]
    presets = out["presets"]
    d_blink = _blink_dir(presets)
    base = np.asarray(BASE)
    e0 = base[:64]
    video = out["video_layer"]
    assert video == "Video: clip.avi"
    # pose only: 6 rotation/location channels over 22..27, no expression in the video layer
    assert sorted(out["video1"]) == sorted([f"rotation_euler[{i}]" for i in range(3)]
                                           + [f"location[{i}]" for i in range(3)])
    vrows = np.asarray(out["video_rows"])
    np.testing.assert_allclose(_curve(out["video1"], "location[0]", range(22, 28)), vrows[:, 67] - base[67], atol=1e-5)
    np.testing.assert_allclose(_curve(out["video1"], "rotation_euler[2]", range(22, 28)), vrows[:, 65] - base[65],
                               atol=1e-5)
    # the rig's own action was not touched by either bake
    assert out["own_keys"] == ["location[2]", "styleheat.expression[3]"]
    # two layers, both Combine, not extrapolated; the rig's action switched to Combine
    assert [t[0] for t in out["tracks1"]] == [video, "Audio: line"]
    for t in out["tracks1"]:
        assert len(t[2]) == 1 and t[2][0][:2] == ["COMBINE", "NOTHING"], t
    assert out["tracks1"][1][2][0][2:4] == [20.0, 59.0]
    assert out["blend_type"] == "COMBINE"
    assert out["keyed_range"] == [1.0, 80.0]
    audio1 = out["audio1"]
    assert sorted(audio1) == sorted([f"styleheat.expression[{k}]" for k in range(64)] + ["styleheat.blink[0]"])
    frames = range(15, 66)

    def expected_rows(video_keys, audio_keys, use_video=True, use_audio=True):
        exp = np.tile(e0, (len(frames), 1))
        exp[:, 3] += 0.2
        if use_audio:
            exp += np.stack([_curve(audio_keys, f"styleheat.expression[{k}]", frames) for k in range(64)], 1)
            exp += _curve(audio_keys, "styleheat.blink[0]", frames)[:, None] * d_blink[None, :]
        rot = np.stack([_curve(video_keys, f"rotation_euler[{i}]", frames) if use_video else np.zeros(len(frames))
                        for i in range(3)], 1)
        loc = np.stack([_curve(video_keys, f"location[{i}]", frames) if use_video else np.zeros(len(frames))
                        for i in range(3)], 1)
        loc[:, 2] += 0.1
        out_rows = np.empty((len(frames), 73))
        out_rows[:, :64] = exp
        out_rows[:, 64:67] = base[64:67] + rot[:, [0, 2, 1]]
        out_rows[:, 67:70] = base[67:70] + np.stack([loc[:, 0], loc[:, 2], -loc[:, 1]], 1)
        out_rows[:, 70:] = base[70:]
        return out_rows

    np.testing.assert_allclose(out["rows1"], expected_rows(out["video1"], audio1), atol=1e-4)
    # the layers really move the rows (pose inside 22..27 only, expression inside 20..59 only)
    rows1 = np.asarray(out["rows1"])
    assert np.abs(rows1[7:13, 64:70] - rows1[0, 64:70]).max() > 1e-3
    assert np.abs(rows1[5:45, :64] - rows1[0, :64]).max() > 1e-3
    np.testing.assert_allclose(rows1[-6:, :64], np.tile(e0 + 0.2 * np.eye(64)[3], (6, 1)), atol=1e-5)
    # re-bake with another seed: the audio layer is replaced (one track, its old action gone), the video
    # layer is not; the blink markers follow
    assert out["video2"] == out["video1"]
    assert [t[0] for t in out["tracks2"]] == [video, "Audio: line"]
    assert out["tracks2"][0] == out["tracks1"][0]
    assert sum(a.startswith("StyleHEAT Audio: line") for a in out["actions2"]) == 1
    b1 = _curve(audio1, "styleheat.blink[0]", range(20, 60))
    b2 = _curve(out["audio2"], "styleheat.blink[0]", range(20, 60))
    assert not np.allclose(b1, b2)
    assert out["markers2"] == out["blinks2"] and out["markers2"] != out["markers1"]
    for k in (0, 31, 63):   # the expression itself (Audio2Exp) does not depend on the seed
        name = f"styleheat.expression[{k}]"
        np.testing.assert_allclose(_curve(out["audio2"], name, frames), _curve(audio1, name, frames), atol=1e-6)
    np.testing.assert_allclose(out["rows2"], expected_rows(out["video2"], out["audio2"]), atol=1e-4)
    # muting a layer takes exactly its part out of the rows
    np.testing.assert_allclose(out["rows_muted"], expected_rows(out["video2"], out["audio2"], use_audio=False),
                               atol=1e-4)
    np.testing.assert_allclose(out["rows_video_muted"],
                               expected_rows(out["video2"], out["audio2"], use_video=False), atol=1e-4)
    assert not np.allclose(out["rows_muted"], out["rows2"], atol=1e-4)
    # undo: the operator's bake is gone (only the video layer, unchanged, rows without the audio)
    assert out["undo"] == ["FINISHED"]
    assert [t[0] for t in out["tracks_undone"]] == [video] and out["tracks_undone"][0][1] is False
    assert out["video_undone"] == out["video1"]
    np.testing.assert_allclose(out["rows_undone"], expected_rows(out["video1"], {}, use_audio=False), atol=1e-4)
    # redo: the operator's layer (seed 1) is back
    assert out["redo"] == ["FINISHED"]
    assert out["audio_redone"] == audio1
    assert [t[0] for t in out["tracks_redone"]] == [video, "Audio: line"]


def test_blinks_and_head_motion_from_audio(tmp_path, addon_zip, server, fixtures_dir):
    """Blinks: the Blink channel is 1 exactly at the reported frames (the server's seeded blink times),
    below 1 everywhere else; markers and the operator's report name those frames; there the rows hold
    the 'eyes' preset's eye closing. The same seeds give the same rows, others differ. Head motion keys
    the server's pose as offsets from the portrait's."""
    require_audio()
    wav = _wav(tmp_path / "talk.wav", 3.0)                       # frames 10..84
    out = run_bpy(tmp_path, RIG_SETUP.format(portrait=str(fixtures_dir / "portrait_100.jpg"), base=BASE)
                  + LAYER_HELPERS + f"""
        compat.top_strips(scene).new_sound("talk", {str(wav)!r}, channel=1, frame_start=10)
        OUT["connect"] = sorted(bpy.ops.styleheat.connect())
        OUT["presets"] = {{k: v.tolist() for k, v in rig_mod.stored_presets(scene).items()}}
        def run(layer, **kw):
            r = bake.bake_audio(scene, obj, ADDRESS, 10.0, strip="talk", layer=layer, blink_rate=60.0, **kw)
            for t in obj.animation_data.nla_tracks:
                t.mute = t.name != layer
            return r
        a = run("A", blinks=True, blink_seed=3, pose=True, pose_style=3, seed=7, pose_scale=1.5)
        OUT["blinks_a"] = a.blink_frames
        OUT["weights_a"] = a.blink_weights.tolist()
        OUT["pose_a"] = a.pose.tolist()
        OUT["keys_a"] = layer_keys("A")
        OUT["markers_a"] = sorted(m.frame for m in scene.timeline_markers if m.name == "blink")
        OUT["rows_a"] = rows(10, 84)
        run("B", blinks=True, blink_seed=3, pose=True, pose_style=3, seed=7, pose_scale=1.5)
        OUT["rows_b"] = rows(10, 84)
        c = run("C", blinks=True, blink_seed=4, pose=True, pose_style=3, seed=8, pose_scale=1.5)
        OUT["blinks_c"] = c.blink_frames
        OUT["rows_c"] = rows(10, 84)
        for t in obj.animation_data.nla_tracks:
            t.mute = True
        OUT["rows_none"] = rows(10, 84)
        # the operator reports the closed-eye frames
        OUT["op"] = sorted(bpy.ops.styleheat.bake_audio(strip="talk", layer="Op", channels={{"EXPRESSION"}},
                                                         blinks=True, blink_rate=60.0, blink_seed=3))
        OUT["op_blinks"] = sorted(m.frame for m in scene.timeline_markers if m.name == "blink")
    """, addon_zip, server.address)
    from server.preprocessing.audio import blink_frames, blink_weights
    presets = out["presets"]
    base = np.asarray(BASE)
    e0 = base[:64]
    n, first = 75, 10
    # the server's seeded blink times, as scene frames
    expect = [first + p for p in blink_frames(n, 25.0, 60.0, 3)]
    assert len(expect) >= 2 and out["blinks_a"] == expect and out["markers_a"] == expect
    w = np.asarray(out["weights_a"])
    blink_keys = _curve(out["keys_a"], "styleheat.blink[0]", range(first, first + n))
    np.testing.assert_allclose(blink_keys, w, atol=1e-6)
    np.testing.assert_allclose(w, blink_weights(n, 25.0, blink_frames(n, 25.0, 60.0, 3)), atol=1e-4)
    at = np.asarray(expect) - first
    np.testing.assert_allclose(w[at], 1.0, atol=1e-4)                        # fully closed at the reported frames
    assert np.delete(w, at).max() < 0.95                                       # and nowhere else
    # there the rows hold the preset's eye closing on top of the lips
    rows_a, rows_none = np.asarray(out["rows_a"]), np.asarray(out["rows_none"])
    exp_keys = np.stack([_curve(out["keys_a"], f"styleheat.expression[{k}]", range(first, first + n))
                         for k in range(64)], 1)
    np.testing.assert_allclose(rows_a[at, :64] - e0 - exp_keys[at], np.tile(_blink_dir(presets), (len(at), 1)),
                               atol=1e-4)
    # head motion: rotation/location keys are the server's pose minus the portrait's
    pose = np.asarray(out["pose_a"])
    assert pose.shape == (n, 6) and np.ptp(pose[:, :3], axis=0).max() > 1e-4
    rng = range(first, first + n)
    np.testing.assert_allclose(_curve(out["keys_a"], "rotation_euler[0]", rng), pose[:, 0] - base[64], atol=1e-5)
    np.testing.assert_allclose(_curve(out["keys_a"], "rotation_euler[1]", rng), pose[:, 2] - base[66], atol=1e-5)
    np.testing.assert_allclose(_curve(out["keys_a"], "location[1]", rng), -(pose[:, 5] - base[69]), atol=1e-5)
    np.testing.assert_allclose(rows_a[:, 64:70], pose, atol=1e-4)
    # same seeds: the same rows; other seeds: other blinks and other head motion
    np.testing.assert_allclose(out["rows_b"], rows_a, atol=0)
    assert out["blinks_c"] != out["blinks_a"]
    assert np.abs(np.asarray(out["rows_c"])[:, 64:70] - rows_a[:, 64:70]).max() > 1e-4
    assert out["op"] == ["FINISHED"] and out["op_blinks"] == expect


def test_bad_audio_options_are_clear_errors_and_write_nothing(tmp_path, addon_zip, server, fixtures_dir):
    """Out-of-range style, negative scales, bad seeds, no channel chosen, a strip muted or at volume 0
    over its whole range: a clear error each, no key, no layer, no marker."""
    require_audio()
    wav = _wav(tmp_path / "line.wav", 0.8)
    out = run_bpy(tmp_path, RIG_SETUP.format(portrait=str(fixtures_dir / "portrait_100.jpg"), base=BASE) + f"""
        strip = compat.top_strips(scene).new_sound("line", {str(wav)!r}, channel=1, frame_start=1)
        cases = {{"style46": dict(pose=True, pose_style=46), "style-1": dict(pose=True, pose_style=-1),
                 "scale": dict(scale=-0.5), "pose_scale": dict(pose=True, pose_scale=-1.0),
                 "blink_rate": dict(blinks=True, blink_rate=500.0), "seed": dict(pose=True, seed=-3),
                 "nothing": dict(groups={{"ROTATION"}}), "no_groups": dict(groups=set()),
                 "bad_group": dict(groups={{"MOUTH"}})}}
        for name, kw in cases.items():
            try:
                bake.bake_audio(scene, obj, ADDRESS, 10.0, strip="line", **kw)
                OUT[name] = "no error"
            except render.UserError as exc:
                OUT[name] = str(exc)
        strip.volume = 0.0
        try:
            bake.bake_audio(scene, obj, ADDRESS, 10.0, blinks=True)
            OUT["silent"] = "no error"
        except render.UserError as exc:
            OUT["silent"] = str(exc)
        strip.volume = 1.0
        strip.mute = True
        try:
            bake.bake_audio(scene, obj, ADDRESS, 10.0, strip="line")
            OUT["muted"] = "no error"
        except render.UserError as exc:
            OUT["muted"] = str(exc)
        try:
            bpy.ops.styleheat.bake_audio(strip="line")
            OUT["op_muted"] = "no error"
        except RuntimeError as exc:
            OUT["op_muted"] = str(exc)
        OUT["anim"] = obj.animation_data is not None and (len(obj.animation_data.nla_tracks), obj.animation_data.action)
        OUT["markers"] = len(scene.timeline_markers)
    """, addon_zip, server.address)
    assert out["style46"].startswith("pose style must be a whole number from 0 to 45"), out["style46"]
    assert out["style-1"].startswith("pose style must be a whole number from 0 to 45")
    assert out["scale"].startswith("scale must be a number from 0") and "negative" in out["scale"]
    assert out["pose_scale"].startswith("head motion scale must be a number from 0 to 10")
    assert out["blink_rate"].startswith("blink rate must be a number from 0 to 120")
    assert out["seed"].startswith("head motion seed must be a whole number from 0")
    assert out["nothing"].startswith("Nothing to bake")
    assert out["no_groups"].startswith("no channel group chosen")
    assert out["bad_group"].startswith("unknown channel group(s) MOUTH")
    assert out["silent"].startswith("The sound strips play only silence over frames 1..20"), out["silent"]
    assert "muted" in out["muted"] and "unmute" in out["muted"]
    assert "muted" in out["op_muted"]
    assert out["anim"] is False and out["markers"] == 0
