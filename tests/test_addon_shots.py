"""Faces in shots from real bpy against a real tiny-random server on 127.0.0.1: the rig's Output (Matte strips
over a coloured strip in Blender's own sequencer render, Composite frames at the photo's size, Output in the
re-render keys) and Dub Movie Strip on a generated plate (frame count and size, pixels far from the face, the
warnings, bad input)."""
from __future__ import annotations

import wave
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from test_addon_helpers import Server, build_zip, require_audio, run_bpy
from plates import BLANK, FACE, FPS, H, N, W, decode, write_plate

pytestmark = pytest.mark.blender

PW, PH = 320, 240            # the rig's photo: a face inside a larger textured frame


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def addon_zip(tmp_path_factory) -> Path:
    return build_zip(tmp_path_factory.mktemp("dist"))


def read(path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def photo(tmp_path_factory, fixtures_dir) -> Path:
    face = np.asarray(Image.open(fixtures_dir / "portrait_100.jpg").convert("RGB").resize((170, 170), Image.LANCZOS))
    yy, xx = np.mgrid[:PH, :PW]
    img = np.stack([xx * 200 // PW + 30, yy * 180 // PH + 40, 100 + 40 * np.sin(xx / 9.0)], -1).astype(np.uint8)
    img[30:200, 90:260] = face
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(img).save(path)
    return path


def test_matte_strip_over_a_colour_strip_and_output_in_the_keys(tmp_path, addon_zip, server, photo):
    blend = tmp_path / "shot.blend"
    out = run_bpy(tmp_path, f"""
        scene = bpy.context.scene
        scene.frame_start, scene.frame_end = 1, 2
        scene.render.resolution_x, scene.render.resolution_y = {PW}, {PH}
        scene.render.resolution_percentage = 100
        bpy.ops.wm.save_as_mainfile(filepath={str(blend)!r})
        compat = sub("compat"); render = sub("render"); F = sub("frames")
        scene.sequence_editor_create()
        bg = compat.top_strips(scene).new_effect("bg", "COLOR", 1, frame_start=1, length=2)
        bg.color = (0.15, 0.55, 0.8)
        bpy.ops.styleheat.add_rig(portrait={str(photo)!r})
        obj = bpy.context.active_object
        obj.styleheat.size = 64
        obj.styleheat.output = "MATTE"
        obj.rotation_euler[2] = 0.2
        outdir = os.path.join(os.path.dirname({str(blend)!r}), "styleheat", bpy.path.clean_name(obj.name))
        def keys():
            return {{k: v["hash"] for k, v in F.load_sidecar(outdir).items()}}
        s1 = render.render_range(scene, obj, ADDRESS, 10.0)
        OUT["matte_written"] = s1.written
        OUT["matte_keys"] = keys()
        strip = next(s for s in compat.all_strips(scene) if s.type == "IMAGE")
        OUT["strip"] = [strip.name, strip.channel, strip.blend_type, strip.alpha_mode, len(strip.elements)]
        OUT["dir"] = bpy.path.abspath(strip.directory)
        OUT["files"] = [e.filename for e in strip.elements]
        import shutil
        def keep(sub_dir):   # the next render writes the same names: keep a copy of these frames
            shutil.copytree(outdir, os.path.join({str(tmp_path)!r}, sub_dir))
        keep("matte")
        r = scene.render
        r.use_sequencer = True
        compat.set_png_output(scene)
        r.image_settings.color_mode = "RGB"
        scene.view_settings.view_transform = "Standard"
        scene.view_settings.look = "None"
        r.filepath = {str(tmp_path / 'vse' / '####')!r}
        bpy.ops.render.render(animation=True)
        strip.mute = True
        r.filepath = {str(tmp_path / 'bg' / '####')!r}
        bpy.ops.render.render(animation=True)
        strip.mute = False
        OUT["again"] = render.render_range(scene, obj, ADDRESS, 10.0).written      # nothing changed
        obj.styleheat.output = "COMPOSITE"
        s2 = render.render_range(scene, obj, ADDRESS, 10.0)
        OUT["composite_written"] = s2.written
        OUT["composite_keys"] = keys()
        strip = next(s for s in compat.all_strips(scene) if s.type == "IMAGE")
        OUT["composite_strip"] = [strip.blend_type, strip.alpha_mode, len(strip.elements)]
        keep("composite")
        obj.styleheat.output = "CROP"
        s3 = render.render_range(scene, obj, ADDRESS, 10.0)
        OUT["crop_written"] = s3.written
        OUT["crop_keys"] = keys()
        # a server without 'outputs' in its hello renders the crop only: a clear error for Matte
        shots = sub("shots")
        obj.styleheat.output = "MATTE"
        try:
            shots.render_output({{"type": "hello"}}, obj.styleheat)
            OUT["old_server"] = None
        except Exception as exc:
            OUT["old_server"] = str(exc)
        OUT["extra_same"] = F.output_hash_extra("matte")
    """, addon_zip, server.address)
    assert out["matte_written"] == [1, 2]
    assert out["again"] == []
    name, channel, blend, alpha_mode, n = out["strip"]
    assert (channel, blend, alpha_mode, n) == (2, "ALPHA_OVER", "STRAIGHT", 2)
    for f, file in zip((1, 2), out["files"]):
        matte = read(tmp_path / "matte" / file)
        assert matte.shape == (PH, PW, 4)                                   # the photo's size, RGBA
        a = matte[..., 3:].astype(np.float64) / 255.0
        assert a.min() == 0.0 and a.max() == 1.0 and ((a > 0) & (a < 1)).any()   # a soft edge to get right
        bg = read(tmp_path / "bg" / f"{f:04d}.png").astype(np.float64)
        seen = read(tmp_path / "vse" / f"{f:04d}.png").astype(np.float64)
        assert bg.shape == seen.shape == (PH, PW, 3)
        assert np.ptp(bg.reshape(-1, 3), axis=0).max() <= 1               # the colour strip alone
        want = matte[..., :3] * a + bg * (1.0 - a)                          # straight-alpha over
        err = np.abs(seen - want)
        assert err.max() <= 1.0 + 1e-9, f"frame {f}: VSE differs from the over-composite by {err.max()}"
    # Output is in the keys: every change re-renders every frame, and the three key sets differ
    assert out["composite_written"] == [1, 2] and out["crop_written"] == [1, 2]
    mk, ck, xk = out["matte_keys"], out["composite_keys"], out["crop_keys"]
    assert all(len({mk[f], ck[f], xk[f]}) == 3 for f in ("1", "2"))
    assert out["composite_strip"][2] == 2 and out["composite_strip"][1] == "STRAIGHT"
    comp = read(tmp_path / "composite" / out["files"][0])
    assert comp.shape == (PH, PW, 3)                                        # the Composite has the photo's size
    src = read(photo)
    far = np.ones((PH, PW), bool)
    far[10:225, 60:290] = False
    assert np.array_equal(comp[far], src[far])
    assert read(Path(out["dir"]) / out["files"][1]).shape == (64, 64, 3)   # back to the crop
    assert "Face Crop" in out["old_server"] and "update the server" in out["old_server"]
    assert out["extra_same"] == "output=matte"


# ------------------------------------------------------------------ Dub Movie Strip
def write_sine(file, seconds: float, rate: int = 16000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    with wave.open(str(file), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(np.round(0.4 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes())


def test_dub_movie_strip(tmp_path, addon_zip, server, fixtures_dir):
    require_audio()
    face = np.asarray(Image.open(fixtures_dir / "portrait_100.jpg").convert("RGB").resize((FACE, FACE), Image.LANCZOS))
    plate = tmp_path / "plate.avi"
    write_plate(plate, face)
    faceless = tmp_path / "empty.avi"
    write_plate(faceless, None, n=8)
    wav = tmp_path / "speech.wav"
    write_sine(wav, N / FPS)
    blend = tmp_path / "dub.blend"
    out = run_bpy(tmp_path, f"""
        scene = bpy.context.scene
        scene.render.fps, scene.render.fps_base = 25, 1.0
        scene.frame_start, scene.frame_end = 1, {N}
        scene.render.resolution_x, scene.render.resolution_y = {W}, {H}
        bpy.ops.wm.save_as_mainfile(filepath={str(blend)!r})
        compat = sub("compat"); shots = sub("dubbing")
        scene.sequence_editor_create()
        strips = compat.top_strips(scene)
        movie = strips.new_movie("plate", {str(plate)!r}, 1, 1)
        sound = strips.new_sound("speech", {str(wav)!r}, 2, 1)
        OUT["movie_len"] = movie.frame_duration
        # nothing selected yet: a clear message
        for s in compat.all_strips(scene):
            s.select = False
        scene.sequence_editor.active_strip = None
        try:
            shots.dub_movie_strip(scene, ADDRESS, 10.0, size=64)
            OUT["nothing_selected"] = None
        except Exception as exc:
            OUT["nothing_selected"] = str(exc)
        movie.select = True
        scene.sequence_editor.active_strip = movie
        s = shots.dub_movie_strip(scene, ADDRESS, 10.0, output="COMPOSITE", size=64)
        OUT["written"] = s.written
        import shutil
        OUT["dir"] = os.path.join({str(tmp_path)!r}, "composite")
        shutil.copytree(s.directory, OUT["dir"])      # the next dubs write the same names
        OUT["warnings"] = s.warnings
        st = next(x for x in compat.all_strips(scene) if x.name == s.strip_name)
        OUT["strip"] = [st.name, st.channel, st.frame_final_start, st.frame_final_duration, st.blend_type,
                        len(st.elements)]
        # the operator, Matte: Alpha Over above the movie strip
        OUT["op"] = sorted(bpy.ops.styleheat.dub_movie_strip(output="MATTE", size=64))
        st = next(x for x in compat.all_strips(scene) if x.name == s.strip_name)
        shutil.copytree(bpy.path.abspath(st.directory), os.path.join({str(tmp_path)!r}, "matte"))
        OUT["matte_strip"] = [st.channel, st.blend_type, st.alpha_mode, len(st.elements),
                              os.path.join({str(tmp_path)!r}, "matte"), st.elements[0].filename]
        # a plate without any face: a clear error, and the server still dubs afterwards
        bad = strips.new_movie("empty", {str(faceless)!r}, 5, 40)
        try:
            shots.dub_movie_strip(scene, ADDRESS, 10.0, movie="empty", sound="speech", size=64)
            OUT["faceless"] = None
        except Exception as exc:
            OUT["faceless"] = str(exc)
        sound.mute = True
        try:
            shots.dub_movie_strip(scene, ADDRESS, 10.0, movie="plate", size=64)
            OUT["no_sound"] = None
        except Exception as exc:
            OUT["no_sound"] = str(exc)
        sound.mute = False
        OUT["after"] = len(shots.dub_movie_strip(scene, ADDRESS, 10.0, movie="plate", size=64).written)
    """, addon_zip, server.address)
    assert out["movie_len"] == N
    assert "Select one movie strip" in out["nothing_selected"]
    assert len(out["written"]) == N
    src = decode(plate)
    assert len(src) == N
    far = np.zeros((H, W), bool)
    far[:, :18] = True
    far[:, 142:] = True
    for k, name in enumerate(out["written"]):
        img = read(Path(out["dir"]) / name)
        assert img.shape == (H, W, 3)                                   # the plate's size
        assert np.array_equal(img[far], src[k][far]), f"frame {k}: pixels far from the face changed"
    for k in BLANK:
        assert np.array_equal(read(Path(out["dir"]) / out["written"][k]), src[k])
    assert any("12-13" in w and "unchanged" in w for w in out["warnings"]), out["warnings"]
    name, channel, start, duration, blend, n = out["strip"]
    assert (channel, start, duration, blend, n) == (3, 1, N, "REPLACE", N)   # above the movie and the sound
    assert out["op"] == ["FINISHED"]
    ch, blend, alpha_mode, n, d, first = out["matte_strip"]
    assert (ch, blend, alpha_mode, n) == (3, "ALPHA_OVER", "STRAIGHT", N)
    m = read(Path(d) / first)
    assert m.shape == (H, W, 4) and m[:, :8, 3].max() == 0
    assert "no face" in out["faceless"] and "bad_video" in out["faceless"]
    assert "No sound strip" in out["no_sound"]
    assert out["after"] == N
