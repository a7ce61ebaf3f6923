"""styleheat-server bake requests (docs/protocol.md): presets, capabilities, extract, audio2exp.

Real server processes on 127.0.0.1 (``--tiny-random``: a seeded tiny Deep3D and Audio2Exp), real
DEALER clients, a real synthetic driving video made from a real portrait. Results are compared with
the same library functions run in this process on models built by the documented seeding recipe.
"""
from __future__ import annotations

import glob
import json
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from server.service import app as server_app
from server.service import bake_models as server_bake
from server import protocol as P
from server_helpers import Client, png_bytes, portrait, serve_tiny
from server_helpers import client, ctx  # noqa: F401  (fixtures)

VIDEO_SIDE = 256
VIDEO_FPS = 25.0
SHIFTS = [(2 * i, i) for i in range(8)]  # (dx, dy) px per frame: the head moves a little


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def write_video(path: Path, base: np.ndarray, shifts, fps: float = VIDEO_FPS) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (VIDEO_SIDE, VIDEO_SIDE))
    assert writer.isOpened()
    for dx, dy in shifts:
        m = np.float32([[1, 0, dx], [0, 1, dy]])
        frame = cv2.warpAffine(base, m, (VIDEO_SIDE, VIDEO_SIDE), borderMode=cv2.BORDER_REFLECT101)
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def tiny_audio2exp_by_recipe(seed: int = 0):
    """What docs/protocol.md / app.tiny_audio2exp say --tiny-random serves, built here independently."""
    from models.audio2exp import Audio2Exp, Audio2ExpConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Audio2Exp(Audio2ExpConfig.tiny())
    return model.eval()


def tiny_deep3d_by_recipe(seed: int = 0):
    from models.deep3d import Deep3DConfig, ReconNet
    from server.preprocessing.deep3d import Deep3DExtractor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ReconNet(Deep3DConfig.tiny())
    return Deep3DExtractor(net.eval(), None, "cpu")


def until_terminal(client: Client, rid: str, timeout: float = 180.0):
    """(progress messages, terminal (header, parts)) of one extract/audio2exp request."""
    progress = []
    deadline = time.monotonic() + timeout
    while True:
        h, parts = client.recv(max(1.0, deadline - time.monotonic()))
        if h.get("id") != rid:
            continue
        if h["type"] == P.PROGRESS:
            progress.append(h)
            continue
        return progress, (h, parts)


def temp_videos() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "styleheat-extract-*")))


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def presets_file(fixtures_dir) -> Path:
    return fixtures_dir / "expression_presets.json"


@pytest.fixture(scope="module")
def server(presets_file):
    yield from serve_tiny("--presets", str(presets_file))


@pytest.fixture(scope="module")
def bare_server():
    yield from serve_tiny("--no-bake-models")


@pytest.fixture(scope="module")
def base_frame(fixtures_dir) -> np.ndarray:
    img = np.asarray(Image.open(fixtures_dir / "portrait_100.jpg").convert("RGB"))
    return cv2.resize(img, (VIDEO_SIDE, VIDEO_SIDE), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def video(tmp_path_factory, base_frame) -> Path:
    return write_video(tmp_path_factory.mktemp("bake") / "drive.avi", base_frame, SHIFTS)


@pytest.fixture(scope="module")
def expected_track(video):
    """track_video in this process with the recipe's tiny Deep3D: what the server must return."""
    from server.preprocessing import tracking

    return tracking.track_video(video, tiny_deep3d_by_recipe(0))


# --------------------------------------------------------------------------------------------
# hello: presets and capabilities
# --------------------------------------------------------------------------------------------
def test_hello_serves_the_fixture_presets(client, presets_file):
    want = json.loads(presets_file.read_text())
    h, _ = client.call(P.request(P.HELLO, "h1"))
    assert h["type"] == P.HELLO
    assert set(h["presets"]) == set(want["presets"]) == {"center", "mouth", "eyebrow", "eyes"}
    for name, values in want["presets"].items():
        np.testing.assert_array_equal(np.float32(h["presets"][name]), np.float32(values))
    assert set(h["pose_presets"]) == set(want["pose_presets"])
    for name, values in want["pose_presets"].items():
        np.testing.assert_array_equal(np.float32(h["pose_presets"][name]), np.float32(values))
    got = P.decode_presets(h["presets"])
    assert all(v.shape == (64,) for v in got.values())
    caps = h["capabilities"]
    assert set(caps) == set(P.CAPABILITIES)
    assert caps["extract"] is True and caps["audio2exp"] is True
    assert caps["align"] is h["align"] and caps["audio"] is h["audio"]
    assert h["real_weights"] is False and h["tiny_random"] is True


def test_hello_without_presets_and_bake_models(bare_server, ctx):
    c = Client(bare_server.endpoint, ctx)
    try:
        h, _ = c.call(P.request(P.HELLO, "h"))
        assert h["presets"] == {} and h["pose_presets"] == {}
        assert h["capabilities"]["extract"] is False and h["capabilities"]["audio2exp"] is False
        hh, parts = P.extract_request("e", b"RIFF....AVI ")
        e, _ = c.call(hh, parts)
        assert e["type"] == P.ERROR and e["id"] == "e" and e["code"] == P.E_UNSUPPORTED
        assert "--no-bake-models" in e["message"] and "Deep3D" in e["message"]
        hh, parts = P.audio2exp_request("a", np.zeros(1600, np.float32), 16000, 25.0, 2)
        e, _ = c.call(hh, parts)
        assert e["type"] == P.ERROR and e["code"] == P.E_UNSUPPORTED and "--audio2exp" in e["message"]
        h, _ = c.call(P.request(P.HELLO, "h2"))  # still serving
        assert h["type"] == P.HELLO
    finally:
        c.close()


def test_prepared_says_why_coefficients_are_missing(client):
    img = png_bytes(portrait(7, 128))
    for rid in ("pc1", "pc2"):  # the second is a cache hit: same note
        h, _ = client.call(P.request(P.PREPARE, rid, align=False), [img])
        assert h["type"] == P.PREPARED, h
        assert h["coefficients"] is None
        assert isinstance(h["coefficient_note"], str) and "3DMM" in h["coefficient_note"]


# --------------------------------------------------------------------------------------------
# extract
# --------------------------------------------------------------------------------------------
def test_extract_video_bytes(client, video, expected_track):
    before = temp_videos()
    h, parts = P.extract_request("x1", video.read_bytes())
    client.send(h, parts)
    progress, (end, end_parts) = until_terminal(client, "x1")
    assert end["type"] == P.EXTRACTED, end
    fps, rows, warnings = P.decode_extracted(end, end_parts)
    assert rows.shape == (len(SHIFTS), 73) and rows.dtype == np.float32 and np.isfinite(rows).all()
    assert fps == pytest.approx(VIDEO_FPS)
    np.testing.assert_allclose(rows, expected_track.rows, rtol=1e-5, atol=1e-5)
    assert any("tiny random" in w for w in warnings)
    stages = [p["stage"] for p in progress]
    assert set(stages) == {"landmarks", "3dmm"} and stages.index("3dmm") > stages.index("landmarks")
    for stage in ("landmarks", "3dmm"):
        done = [p["done"] for p in progress if p["stage"] == stage]
        assert done == sorted(done) and done[-1] == len(SHIFTS)
        assert all(p["total"] == len(SHIFTS) for p in progress if p["stage"] == stage)
    assert temp_videos() <= before  # the temporary copy of the video is gone


def test_extract_by_path_with_smoothing_and_resampling(client, video, expected_track):
    from server.preprocessing import tracking

    h, parts = P.extract_request("x2", path=str(video), smooth=1.5, fps=50.0)
    client.send(h, parts)
    _, (end, end_parts) = until_terminal(client, "x2")
    assert end["type"] == P.EXTRACTED, end
    fps, rows, _ = P.decode_extracted(end, end_parts)
    want = tracking.resample_rows(tracking.smooth_curves(expected_track.rows, 1.5), VIDEO_FPS, 50.0)
    assert fps == 50.0 and rows.shape == want.shape == (2 * len(SHIFTS) - 1, 73)
    np.testing.assert_allclose(rows, want, rtol=1e-5, atol=1e-5)


def test_extract_cancel(client, tmp_path, base_frame):
    long_video = write_video(tmp_path / "long.avi", base_frame, [(i % 9, i % 5) for i in range(300)])
    before = temp_videos()
    h, parts = P.extract_request("xc", long_video.read_bytes())
    client.send(h, parts)
    first, _ = client.recv(120)
    assert first["type"] == P.PROGRESS and first["id"] == "xc", first
    client.send(P.request(P.CANCEL, "xc"))
    progress, (end, _) = until_terminal(client, "xc", timeout=120)
    assert end["type"] == P.DONE and end["cancelled"] is True, end
    assert not any(p["stage"] == "3dmm" and p["done"] == 300 for p in progress)
    assert temp_videos() <= before
    h, _ = client.call(P.request(P.HELLO, "after-cancel"))
    assert h["type"] == P.HELLO and h["jobs"] == 0


@pytest.mark.parametrize("kind", ["garbage", "broken_avi", "no_face"])
def test_bad_video_then_the_server_keeps_serving(client, tmp_path, kind, video):
    code = P.E_BAD_VIDEO
    if kind == "garbage":   # not a video container at all: refused from its first bytes, before any decoder
        data = np.random.default_rng(3).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
        words, code = "not a video file", P.E_BAD_FIELD
    elif kind == "broken_avi":   # an AVI header over garbage: the decoder cannot open it
        data = b"RIFF\x00\x10\x00\x00AVI LIST" + np.random.default_rng(4).integers(0, 256, 20_000,
                                                                                  dtype=np.uint8).tobytes()
        words = "cannot open"
    else:
        gray = np.full((VIDEO_SIDE, VIDEO_SIDE, 3), 128, np.uint8)
        data = write_video(tmp_path / "gray.avi", gray, [(0, 0)] * 3).read_bytes()
        words = "no face"
    h, parts = P.extract_request(f"bad-{kind}", data)
    client.send(h, parts)
    _, (end, _) = until_terminal(client, f"bad-{kind}")
    assert end["type"] == P.ERROR and end["code"] == code, end
    assert words in end["message"]
    h, _ = client.call(P.request(P.HELLO, f"alive-{kind}"))
    assert h["type"] == P.HELLO
    hh, parts = P.extract_request(f"good-after-{kind}", path=str(video))
    client.send(hh, parts)
    _, (end, _) = until_terminal(client, f"good-after-{kind}")
    assert end["type"] == P.EXTRACTED


def test_extract_request_errors(client, tmp_path):
    e, _ = client.call(P.request(P.EXTRACT, "xe1", path=str(tmp_path / "missing.mp4")))
    assert e["code"] == P.E_BAD_VIDEO and "not found" in e["message"]
    e, _ = client.call(P.request(P.EXTRACT, "xe2"))
    assert e["code"] == P.E_BAD_FIELD and e["id"] == "xe2"
    e, _ = client.call(P.request(P.EXTRACT, "xe3", video={"part": 0}, smooth=-1), [b"RIFF\x00\x00\x00\x00AVI "])
    assert e["code"] == P.E_BAD_FIELD and "smooth" in e["message"]


# --------------------------------------------------------------------------------------------
# audio2exp
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def speech():
    rng = np.random.default_rng(11)
    t = np.arange(int(1.3 * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) +
            0.05 * rng.normal(size=t.size)).astype(np.float32)


@pytest.mark.parametrize("rate, fps, n, offset", [(16000, 25.0, 30, 0.0), (22050, 30.0, 17, 2.5)])
def test_audio2exp_equals_the_library_call(client, speech, rate, fps, n, offset):
    from server.preprocessing.audio import audio_to_expression

    t = np.arange(int(speech.size * rate / 16000)) / rate
    samples = speech if rate == 16000 else np.interp(t, np.arange(speech.size) / 16000, speech).astype(np.float32)
    ref = np.random.default_rng(5).normal(0, 0.5, 64).astype(np.float32)
    h, parts = P.audio2exp_request(f"a{rate}", samples, rate, fps, n, offset_frames=offset, ref_exp=ref)
    client.send(h, parts)
    _, (end, end_parts) = until_terminal(client, f"a{rate}")
    assert end["type"] == P.EXPRESSIONS, end
    rows = P.decode_expressions(end, end_parts)
    assert rows.shape == (n, 64) and rows.dtype == np.float32
    want = audio_to_expression(samples, rate, fps, ref, model=tiny_audio2exp_by_recipe(0), n_frames=n,
                               offset_frames=offset)
    np.testing.assert_allclose(rows, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.diff(rows, axis=0)).max() > 0  # the audio drives it: rows differ over time


def test_audio2exp_with_renders_audio_map(client, speech):
    """render's audio map as is: frame_offset (strip start) and offset_frames (row 0's scene frame)."""
    from server.preprocessing.audio import audio_to_expression

    parts: list = []
    audio = {"samples": P.array_field(speech, parts), "sample_rate": 16000, "fps": 25.0, "frame_offset": 3.0}
    client.send(P.request(P.AUDIO2EXP, "am", audio=audio, n_frames=12, offset_frames=10.0), parts)
    _, (end, end_parts) = until_terminal(client, "am")
    assert end["type"] == P.EXPRESSIONS, end
    want = audio_to_expression(speech, 16000, 25.0, np.zeros(64, np.float32), model=tiny_audio2exp_by_recipe(0),
                               n_frames=12, offset_frames=7.0)
    np.testing.assert_allclose(P.decode_expressions(end, end_parts), want, rtol=1e-5, atol=1e-5)


def test_audio2exp_bad_fields(client):
    h, parts = P.audio2exp_request("ab", np.zeros(800, np.float32), 16000, 25.0, 3)
    h["n_frames"] = 0
    e, _ = client.call(h, parts)
    assert e["type"] == P.ERROR and e["code"] == P.E_BAD_FIELD and "n_frames" in e["message"]
    h, parts = P.audio2exp_request("ab2", np.zeros(800, np.float32), 16000, 25.0, 3)
    h["ref_exp"] = [0.0] * 73
    e, _ = client.call(h, parts)
    assert e["code"] == P.E_BAD_FIELD and "ref_exp" in e["message"]


# --------------------------------------------------------------------------------------------
# loading (in process: the real loaders on real files)
# --------------------------------------------------------------------------------------------
def test_load_presets_json_and_official_pth(tmp_path, presets_file):
    want = json.loads(presets_file.read_text())
    exp, pose = server_bake.load_presets(presets_file)
    assert exp == {k: [float(np.float32(x)) for x in v] for k, v in want["presets"].items()}
    assert set(pose) == set(want["pose_presets"])
    # the official expression.pth layout: a dict of tensors keyed expression_<name>
    official = {f"expression_{k}": torch.tensor(v, dtype=torch.float32).reshape(1, 64)
                for k, v in want["presets"].items()}
    torch.save(official, tmp_path / "expression.pth")
    exp2, pose2 = server_bake.load_presets(tmp_path / "expression.pth")
    assert exp2 == exp and pose2 == {}
    for bad, words in [({"presets": {"m": [0.0] * 63}}, "64 finite numbers"), ([1], "'presets' map"),
                       ({"presets": {"m": [0.0] * 64}, "pose_presets": {"x": [1.0]}}, "6 finite numbers")]:
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=words):
            server_bake.load_presets(tmp_path / "bad.json")
    (tmp_path / "bad.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="weights-only torch file"):
        server_bake.load_presets(tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not found"):
        server_bake.load_presets(tmp_path / "missing.json")


def test_bad_presets_option_stops_the_server(tmp_path, capsys):
    (tmp_path / "p.json").write_text("{nope")
    rc = server_app.main(["--tiny-random", "--device", "cpu", "--bind", "tcp://127.0.0.1:*",
                          "--presets", str(tmp_path / "p.json")])
    assert rc == 2 and "not readable JSON" in capsys.readouterr().err


def test_real_mode_names_missing_weights(tmp_path):
    """A checkpoint folder without Deep3D or Audio2Exp: unsupported notes name the file and the option;
    presets come from CHECKPOINTS/expression.pth."""
    import argparse

    torch.save({"expression_mouth": torch.arange(64, dtype=torch.float32)}, tmp_path / "expression.pth")
    args = argparse.Namespace(tiny_random=False, checkpoints=str(tmp_path), presets=None, audio2exp=None,
                              no_bake_models=False, seed=0)
    bake = server_bake.load_bake_models(args)
    assert bake.tracker is None and "Deep3D/epoch_20.pth" in bake.extract_note and "missing" in bake.extract_note
    assert bake.audio2exp is None and "--audio2exp PATH" in bake.audio2exp_note
    assert bake.presets == {"mouth": [float(i) for i in range(64)]} and bake.presets_source.endswith("expression.pth")
    args.audio2exp = str(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="--audio2exp"):
        server_bake.load_bake_models(args)


def test_real_mode_finds_checkpoints_and_survives_bad_deep3d(tmp_path, presets_file):
    """CHECKPOINTS/audio2exp*.pth is found and loaded (values as saved); a Deep3D file that is not the
    ResNet-50 regressor only switches extract off, with the reason; presets fall back to the JSON name."""
    import argparse
    import shutil

    a2e = tiny_audio2exp_by_recipe(3)
    torch.save({"model": a2e.state_dict()}, tmp_path / "audio2exp_tiny.pth")
    (tmp_path / "Deep3D").mkdir()
    torch.save({"net_recon": tiny_deep3d_by_recipe(0).net.state_dict()}, tmp_path / "Deep3D" / "epoch_20.pth")
    shutil.copy(presets_file, tmp_path / "expression_presets.json")  # a user's checkpoint folder, in tmp
    args = argparse.Namespace(tiny_random=False, checkpoints=str(tmp_path), presets=None, audio2exp=None,
                              no_bake_models=False, seed=0)
    bake = server_bake.load_bake_models(args)
    assert bake.audio2exp is not None and "audio2exp_tiny.pth" in bake.audio2exp_note
    for k, v in a2e.state_dict().items():
        torch.testing.assert_close(bake.audio2exp.state_dict()[k], v)
    assert bake.tracker is None and "could not be loaded" in bake.extract_note
    assert "ResNet-50" in bake.extract_note
    assert set(bake.presets) == {"center", "mouth", "eyebrow", "eyes"} and len(bake.pose_presets) == 7


def test_without_librosa_no_audio_is_advertised_and_audio_requests_say_why(ctx):
    """A real server process in which ``import librosa`` fails as if it were not installed: hello says
    no audio and no audio2exp, and an audio render or audio2exp gets 'unsupported' naming librosa (was:
    advertised, then 'internal' when the mel spectrogram was computed). Renders without audio still work."""
    from server_helpers import TINY_SERVER_ARGS, ServerProcess, collect_render, render_header

    srv = ServerProcess(*TINY_SERVER_ARGS, block_imports=("librosa",))
    srv.wait_ready()
    c = Client(srv.endpoint, ctx)
    try:
        hello, _ = c.call(P.request(P.HELLO, "h"))
        assert hello["audio"] is False, hello
        assert hello["capabilities"]["audio"] is False and hello["capabilities"]["audio2exp"] is False
        assert hello["capabilities"]["extract"] is True                 # the rest is unaffected
        prepared, _ = c.call(P.request(P.PREPARE, "p", align=False), [png_bytes(portrait(3))])
        parts: list = []
        h = render_header("a", prepared["identity"], n_rows=4, frames=[0, 1], first=0, parts=parts, size=64)
        h["audio"] = {"samples": P.array_field(np.zeros(16000, np.float32), parts), "sample_rate": 16000,
                      "fps": 25.0, "frame_offset": 0.0}
        e, _ = c.call(h, parts)
        assert e["type"] == P.ERROR and e["code"] == P.E_UNSUPPORTED and "librosa" in e["message"], e
        h, parts = P.audio2exp_request("x", np.zeros(1600, np.float32), 16000, 25.0, 2)
        e, _ = c.call(h, parts)
        assert e["type"] == P.ERROR and e["code"] == P.E_UNSUPPORTED and "librosa" in e["message"], e
        parts = []
        c.send(render_header("plain", prepared["identity"], n_rows=4, frames=[0, 1], first=0, parts=parts,
                             size=64), parts)
        _, got, _, end = collect_render(c, "plain")
        assert end["type"] == P.DONE and len(got) == 2, end
        assert srv.proc.poll() is None and "Traceback" not in "".join(srv.stderr)
    finally:
        c.close()
        srv.stop()


def test_one_deep3d_in_memory_serves_the_portraits_and_extract(tmp_path, reference_dir, fixtures_dir, video):
    """The server's loading path (app.load_models, what main() runs) on a checkpoints folder with
    StyleHEAT files and Deep3D/epoch_20.pth: the engine (portrait coefficients) and extract share one
    tracker, so exactly one ResNet-50 is loaded, even after a portrait and a video went through it.
    (Before, the bake models loaded one and the engine's first prepare loaded a second.)"""
    import gc

    from models import weights
    from models.deep3d import ReconNet
    from server.engine import Engine
    from server.parity.reference import load_layout, seeded_part

    tiny = Engine.tiny_random(seed=0).model      # tiny StyleHEAT files in the official layout
    weights.write_official(tmp_path, tiny)
    (tmp_path / "config.json").write_text(json.dumps(tiny.config.to_dict()))
    state = seeded_part(load_layout(reference_dir / "deep3d_checkpoints.json"),
                        "checkpoints/Deep3D/epoch_20.pth", "net_recon", seed=0)
    (tmp_path / "Deep3D").mkdir()
    torch.save({"net_recon": state}, tmp_path / "Deep3D" / "epoch_20.pth")

    def resnets() -> list:
        gc.collect()
        found = []
        for o in gc.get_objects():
            try:
                if type(o) is ReconNet:      # type(), not isinstance(): dead weak proxies raise on __class__
                    found.append(o)
            except ReferenceError:
                pass
        return found

    before = {id(o) for o in resnets()}          # other tests' regressors may still be alive
    args = server_app.build_parser().parse_args(["--checkpoints", str(tmp_path), "--config",
                                                 str(tmp_path / "config.json"), "--device", "cpu"])
    engine, bake = server_app.load_models(args)
    assert bake.tracker is not None and engine.tracker is bake.tracker
    portrait = np.asarray(Image.open(fixtures_dir / "portrait_100.jpg").convert("RGB"))
    info = engine.prepare_identity(portrait)
    assert info.coefficients is not None and info.coefficients.shape == (73,), info.coefficient_note
    track = bake.tracker.track(video)
    assert track.rows.shape == (len(SHIFTS), 73)
    new = [o for o in resnets() if id(o) not in before]
    assert len(new) == 1, f"{len(new)} Deep3D ResNet-50s loaded"
