"""`styleheat dub` on a generated plate: the fixtures portrait moved along a known path inside a larger
frame (MJPG AVI), its face blanked out for a few frames, and a sine-sweep WAV, with the --tiny-random
models (engine, tracker regressor, Audio2Exp). The geometry is exact whatever the random weights draw:
frame count and size, pixels far from the face equal to the plate's, blanked frames untouched and
reported, the mask following the known path; plus the expression split's algebra and the bad inputs.
"""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import dlib  # noqa: F401  (a pinned dependency: a missing dlib must fail these tests)

from server.shots import dub as D
from server.cli import main

W, H = 480, 360
N = 100                    # frames of the main plate
FPS = 25.0
FACE = 200                 # side of the pasted portrait in the plate
BLANK = range(40, 45)      # frames whose face is painted over
AX, AY = 24, 10            # path amplitudes in plate pixels


def path(k: int, n: int = N) -> tuple[int, int]:
    """Top-left corner of the portrait in frame k (a known, smooth path)."""
    return (140 + int(round(AX * math.sin(2 * math.pi * k / n))),
            80 + int(round(AY * math.sin(4 * math.pi * k / n))))


def background() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    bg = np.empty((H, W, 3), np.uint8)
    bg[..., 0] = (xx * 255 // W).astype(np.uint8)
    bg[..., 1] = (yy * 255 // H).astype(np.uint8)
    bg[..., 2] = 120
    return bg


def write_plate(file, face: np.ndarray | None, n: int, fps: float, blank=()) -> None:
    writer = cv2.VideoWriter(str(file), cv2.VideoWriter_fourcc(*"MJPG"), fps, (W, H))
    assert writer.isOpened()
    bg = background()
    for k in range(n):
        frame = bg.copy()
        if face is not None:
            x, y = path(k, n)
            frame[y:y + FACE, x:x + FACE] = 128 if k in blank else face
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def sweep(file, seconds: float, sr: int) -> None:
    t = np.arange(int(round(seconds * sr))) / sr
    f0, f1 = 150.0, 3000.0   # linear chirp f0 -> f1 over the clip
    sf.write(str(file), (0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * seconds) * t * t))).astype(np.float32), sr)


def decode(file) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(file))
    frames = []
    while len(frames) < 1000:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


def read_png(file) -> np.ndarray:
    img = cv2.imread(str(file), cv2.IMREAD_UNCHANGED)
    assert img is not None, file
    return cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def face(fixtures_dir) -> np.ndarray:
    img = Image.open(fixtures_dir / "portrait_100.jpg").convert("RGB")
    return np.asarray(img.resize((FACE, FACE), Image.LANCZOS))


@pytest.fixture(scope="module")
def plate(tmp_path_factory, face):
    file = tmp_path_factory.mktemp("plate") / "plate.avi"
    write_plate(file, face, N, FPS, BLANK)
    return file


@pytest.fixture(scope="module")
def dubbed(tmp_path_factory, plate, fixtures_dir):
    d = tmp_path_factory.mktemp("dub")
    wav = d / "sweep.wav"
    sweep(wav, 3.0, 22050)                           # shorter than the 4 s plate
    out = d / "out"
    rc = main(["dub", "--tiny-random", "--video", str(plate), "--audio", str(wav), "--out", str(out),
               "--size", "64", "--device", "cpu", "--batch-size", "4", "--quiet",
               "--presets", str(fixtures_dir / "expression_presets.json")])
    assert rc == 0
    return out, json.loads((out / "dub.json").read_text())


# ------------------------------------------------------------------ the generated plate, end to end
def test_frame_count_and_size_equal_the_plate(dubbed):
    out, rep = dubbed
    files = sorted(out.glob("frame_*.png"))
    assert [f.name for f in files] == [f"frame_{k:05d}.png" for k in range(N)]
    assert not list(out.glob(".*.tmp"))
    for f in files[::9]:
        assert read_png(f).shape == (H, W, 3)
    assert (rep["frames"], rep["width"], rep["height"], rep["fps"]) == (N, W, H, FPS)
    assert rep["output"] == "composite" and rep["render_size"] == 64 and rep["audio_warper"]


def test_far_pixels_equal_the_plate_and_the_face_is_replaced(dubbed, plate):
    from server.shots.compositing import Placement

    out, rep = dubbed
    frames = decode(plate)
    assert len(frames) == N
    roi = Placement(np.array(rep["quad"]), (H, W)).roi()   # the fixed quad: every paste stays inside it
    x0, y0, x1, y1 = roi
    far = np.ones((H, W), bool)
    far[y0:y1, x0:x1] = False
    assert far.mean() > 0.5
    changed = []
    for k in range(N):
        got = read_png(out / f"frame_{k:05d}.png")
        assert np.array_equal(got[far], frames[k][far]), f"frame {k}: pixels far from the face changed"
        x, y = path(k)
        centre = (slice(y + 70, y + 130), slice(x + 70, x + 130))
        changed.append(np.abs(got[centre].astype(int) - frames[k][centre]).mean())
    faced = [c for k, c in enumerate(changed) if k not in BLANK]
    assert min(faced) > 3.0, "the rendered face was not pasted in"


def test_blanked_frames_stay_untouched_and_are_reported(dubbed, plate):
    out, rep = dubbed
    frames = decode(plate)
    assert rep["frames_without_face"] == list(BLANK)
    for k in BLANK:
        assert np.array_equal(read_png(out / f"frame_{k:05d}.png"), frames[k])
    assert any("40-44" in w and "unchanged" in w for w in rep["warnings"])


def test_short_speech_leaves_speechless_frames_with_a_warning(dubbed):
    _, rep = dubbed
    assert any("speechless" in w and "75-99" in w for w in rep["warnings"]), rep["warnings"]
    assert rep["audio_seconds"] == pytest.approx(3.0)
    assert rep["identity_frame"] == 0
    assert "eyes" in rep["expression"] and "Audio2Exp" in rep["expression"]


def test_mask_follows_the_known_path_smoothly(dubbed):
    _, rep = dubbed
    c = np.array(rep["mask_centres"])
    q = np.array(rep["quad"])
    side = np.hypot(*(q[3] - q[0]))
    moved = np.array([path(k) for k in range(N)], float)
    want = (moved - moved[0]) / side + 0.5     # the face's displacement in crop fractions
    keep = [k for k in range(N) if k not in BLANK]
    assert np.abs(c[keep] - want[keep]).max() < 0.025
    assert np.ptp(c[:, 0]) > 0.15               # it really moves (2 * 24 px of a ~200 px crop)
    assert np.abs(np.diff(c, axis=0)).max() <= 0.012   # no per-frame jumps of the seam


# ------------------------------------------------------------------ matte, another fps, long speech
def test_matte_at_30fps_with_speech_longer_than_the_plate(tmp_path, face, fixtures_dir):
    plate = tmp_path / "short.avi"
    n = 12
    write_plate(plate, face, n, 30.0)
    wav = tmp_path / "long.wav"
    sweep(wav, 1.5, 48000)                    # 1.5 s against 0.4 s of plate
    out = tmp_path / "matte"
    rc = main(["dub", "--tiny-random", "--video", str(plate), "--audio", str(wav), "--out", str(out),
               "--output", "matte", "--size", "64", "--device", "cpu", "--quiet",
               "--presets", str(fixtures_dir / "expression_presets.json")])
    assert rc == 0
    rep = json.loads((out / "dub.json").read_text())
    assert (rep["frames"], rep["fps"]) == (n, 30.0)
    assert any("cut" in w for w in rep["warnings"]), rep["warnings"]
    for k in range(n):
        img = read_png(out / f"frame_{k:05d}.png")
        assert img.shape == (H, W, 4)
        x, y = path(k, n)
        assert img[y + FACE // 2, x + FACE // 2, 3] == 255       # the face is opaque
        assert img[:20, :20, 3].max() == 0 and img[-20:, -20:, 3].max() == 0


# ------------------------------------------------------------------ bad input
def test_bad_inputs_are_clear_errors(tmp_path, face, capsys):
    wav = tmp_path / "ok.wav"
    sweep(wav, 1.0, 16000)
    base = ["dub", "--tiny-random", "--size", "64", "--device", "cpu", "--quiet", "--out", str(tmp_path / "o")]

    junk = tmp_path / "junk.avi"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert main(base + ["--video", str(junk), "--audio", str(wav)]) == 2
    err = capsys.readouterr().err
    assert "junk.avi" in err and "cannot be decoded" in err

    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, np.float32), 16000)
    plate = tmp_path / "p.avi"
    write_plate(plate, face, 4, FPS)
    assert main(base + ["--video", str(plate), "--audio", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "empty.wav" in err and "no samples" in err

    faceless = tmp_path / "faceless.avi"
    write_plate(faceless, None, 6, FPS)
    assert main(base + ["--video", str(faceless), "--audio", str(wav)]) == 2
    err = capsys.readouterr().err
    assert "no face found in any frame" in err and "faceless.avi" in err
    assert not list((tmp_path / "o").glob("frame_*.png"))


# ------------------------------------------------------------------ the pieces
@pytest.fixture(scope="module")
def presets(fixtures_dir) -> dict:
    return json.loads((fixtures_dir / "expression_presets.json").read_text())["presets"]


def test_projector_algebra(presets):
    p = D.nonspeech_projector(presets)
    c = np.array(presets["center"])
    mouth = np.array(presets["mouth"]) - c
    mouth /= np.linalg.norm(mouth)
    assert np.allclose(p, p.T, atol=1e-12) and np.allclose(p @ p, p, atol=1e-10)
    assert np.linalg.matrix_rank(p, tol=1e-8) == 2
    assert np.abs(p @ mouth).max() < 1e-10                   # the mouth direction is never the plate's
    for k in ("eyes", "eyebrow"):                             # the non-speech directions (minus their mouth part) are
        d = np.array(presets[k]) - c
        d -= mouth * (mouth @ d)
        assert np.allclose(p @ d, d, atol=1e-10)

    rng = np.random.default_rng(1)
    plate, speech = rng.normal(size=(7, 64)), rng.normal(size=(7, 64))
    out = D.split_expression(plate, speech, p).astype(np.float64)
    assert np.allclose(out @ p.T, plate @ p.T, atol=1e-5)     # eyes/eyebrows: the plate's
    assert np.allclose(out - out @ p.T, speech - speech @ p.T, atol=1e-5)   # everything else: the speech's
    assert np.allclose(out @ mouth, speech @ mouth, atol=1e-5)
    assert np.allclose(D.split_expression(plate, plate, p), plate, atol=1e-5)
    with pytest.raises(KeyError, match="eyebrow"):
        D.nonspeech_projector({k: v for k, v in presets.items() if k != "eyebrow"})


def test_mask_centres_are_smoothed_clamped_and_stay_in_the_crop():
    rng = np.random.default_rng(0)
    t = np.arange(200)
    shift = np.stack([0.1 * np.sin(2 * np.pi * t / 100), 0.05 * np.cos(2 * np.pi * t / 50)], 1)
    lm = rng.normal(scale=0.3, size=(1, 68, 2)) * 256 + 128   # a fixed face shape in a 256 crop
    noisy = lm + (shift * 256)[:, None, :] + rng.normal(scale=2.0, size=(200, 1, 2))
    c = D.mask_centres(noisy, 0, 256, sigma=2.0)
    want = 0.5 + shift - shift[0]
    assert np.abs(c - want).max() < 0.02
    raw = D.mask_centres(noisy, 0, 256, sigma=0.0, step=0.0)
    assert np.abs(np.diff(c, 2, axis=0)).std() < 0.3 * np.abs(np.diff(raw, 2, axis=0)).std()
    far = D.mask_centres(lm + np.linspace(0, 100, 10)[:, None, None], 0, 256, sigma=0)
    assert far.max() <= 0.5 + D.MAX_MASK_SHIFT + 1e-9
    spec = D.mask_spec_at(0.62, 0.58)
    assert spec.cx - spec.rx >= 0 and spec.cx + spec.rx <= 1 and spec.cy + spec.ry <= 1
    assert D.mask_spec_at(0.5, 0.5).rx == pytest.approx(0.37)


def test_fit_audio_pads_and_cuts():
    x = np.ones(44100, np.float32)          # 1 s at 44.1 kHz
    same, w = D.fit_audio(x, 44100, 30, 30.0)
    assert same.shape == (44100,) and not w
    padded, w = D.fit_audio(x, 44100, 45, 30.0)
    assert padded.shape == (66150,) and padded[44100:].max() == 0 and "frames 30-44 are speechless" in w[0]
    cut, w = D.fit_audio(np.ones((88200, 2), np.float32), 44100, 30, 30.0)
    assert cut.shape == (44100, 2) and "cut" in w[0]


def test_fill_rows_interpolates_frames_without_a_face():
    rows = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 73), np.float32)
    rows[3:6] = 999
    found = np.ones(10, bool)
    found[3:6] = False
    assert np.allclose(D.fill_rows(rows, found)[:, 0], np.arange(10))
    assert D.frame_ranges([7, 3, 4, 5, 9]) == "3-5, 7, 9"


def test_the_fixed_square_pastes_back_onto_the_plate(plate):
    """The identity crop (cut with the tracker's square) pasted with the dub's Placement reproduces the plate."""
    from server.preprocessing import tracking
    from server.shots.compositing import Placement, composite

    square = tracking.find_crop_square(plate, 1)
    frame = next(tracking.iter_frames(plate, 1))
    crop = square.crop(frame, 256)
    placement = Placement(square.quad, frame.shape[:2])
    pasted = composite(crop, np.zeros_like(frame), placement)
    roi, alpha = placement.source_alpha(256)
    x0, y0, x1, y1 = roi
    inside = alpha >= 1.0
    diff = pasted[y0:y1, x0:x1][inside].astype(float) - frame[y0:y1, x0:x1][inside]
    psnr = 10 * np.log10(255.0 ** 2 / np.mean(diff ** 2))
    assert psnr > 30, psnr
