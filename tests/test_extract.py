"""Driving-video tracking: a synthetic video made from a real portrait, moved/scaled/rotated over frames.

With seeded Deep3D weights the regressed angles are meaningless, so the tests check what the geometry
fixes exactly: the fixed FFHQ crop, the tracked landmarks and the crop parameters (scale, t0, t1) of
the 73-value rows, and the `styleheat extract` command end to end.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import dlib  # noqa: E402,F401  (a pinned dependency: a missing dlib must fail these tests)

from server.preprocessing import tracking  # noqa: E402
from server.cli import main  # noqa: E402
from server.preprocessing.deep3d import Deep3DExtractor  # noqa: E402
from server.preprocessing.motion import read_motion  # noqa: E402
from server.parity.reference import load_layout, seeded_part  # noqa: E402

SIZE = 320  # video frame side
# per frame: (dx, dy, scale, angle in degrees, counter-clockwise)
MOTION = ([(dx, 0.0, 1.0, 0.0) for dx in (0, 4, 8, 12, 16)]
          + [(16.0, dy, 1.0, 0.0) for dy in (4, 8, 12)]
          + [(16.0, 12.0, s, 0.0) for s in (1.05, 1.10, 1.15)]
          + [(16.0, 12.0, 1.15, a) for a in (4, 8, 12)])


def frame_at(base, dx, dy, scale, angle):
    m = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), angle, scale)
    m[:, 2] += (dx, dy)
    return cv2.warpAffine(base, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)


@pytest.fixture(scope="module")
def video(tmp_path_factory, fixtures_dir):
    base = np.asarray(Image.open(fixtures_dir / "portrait_100.jpg").convert("RGB"))
    base = cv2.resize(base, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    path = tmp_path_factory.mktemp("video") / "drive.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (SIZE, SIZE))
    assert writer.isOpened()
    for dx, dy, s, a in MOTION:
        writer.write(cv2.cvtColor(frame_at(base, dx, dy, s, a), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture(scope="module")
def seeded_state(reference_dir):
    layout = load_layout(reference_dir / "deep3d_checkpoints.json")
    return seeded_part(layout, "checkpoints/Deep3D/epoch_20.pth", "net_recon", seed=0)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, seeded_state):
    root = tmp_path_factory.mktemp("ckpt")
    (root / "Deep3D").mkdir()
    torch.save({"net_recon": seeded_state}, root / "Deep3D" / "epoch_20.pth")
    return root


@pytest.fixture(scope="module")
def tracked(video, checkpoint_dir):
    ext = Deep3DExtractor.from_checkpoints(checkpoint_dir)
    stages = []
    res = tracking.track_video(video, ext, landmark_sigma=0.0,
                               progress=lambda stage, done, total: stages.append((stage, done, total)))
    res.stages = stages
    return res


def test_decoding_and_progress(video, tracked):
    info = tracking.probe_video(video)
    assert info.fps == pytest.approx(25.0)
    assert (info.width, info.height) == (SIZE, SIZE)
    assert tracked.num_frames == len(MOTION)
    assert tracked.rows.shape == (len(MOTION), 73) and tracked.rows.dtype == np.float32
    assert np.all(np.isfinite(tracked.rows))
    assert tracked.face_found.all()
    assert tracked.crop.frame_index == 0
    assert ("landmarks", len(MOTION), len(MOTION)) in tracked.stages
    assert ("3dmm", len(MOTION), len(MOTION)) in tracked.stages


def test_crop_is_fixed_by_the_first_frame(video, tracked):
    """Every frame is cropped with frame 0's FFHQ square, so motion stays visible in the crops."""
    frames = list(tracking.iter_frames(video))
    c0 = tracked.crop.crop(frames[0])
    assert c0.shape == (256, 256, 3)
    # the crop square of an already FFHQ-aligned portrait covers about the whole frame
    assert tracked.crop.qsize == pytest.approx(SIZE, rel=0.15)
    # the translated frames are *not* re-centred: the landmarks in the crops move
    k = 256.0 / tracked.crop.qsize
    shift = tracked.raw_landmarks[4].mean(0) - tracked.raw_landmarks[0].mean(0)
    assert shift[0] == pytest.approx(16 * k, abs=1.5) and abs(shift[1]) < 1.5


def crop_params(res):
    return res.rows[:, 70], res.rows[:, 71], res.rows[:, 72]  # s, t0 (x), t1 (y up)


def test_translation_moves_t0_and_t1(tracked):
    s, t0, t1 = crop_params(tracked)
    k = 256.0 / tracked.crop.qsize
    dxs = np.array([m[0] for m in MOTION[:5]])
    # x to the right: t0 grows by the applied shift (in crop pixels), t1 and the scale stay
    slope = np.polyfit(dxs * k, t0[:5], 1)[0]
    assert slope == pytest.approx(1.0, abs=0.12)
    assert np.ptp(t1[:5]) < 1.5 and np.ptp(s[:5]) < 0.02
    # y down in the video: t1 (measured upward) decreases by the shift
    dys = np.array([0.0] + [m[1] for m in MOTION[5:8]])
    slope_y = np.polyfit(dys * k, t1[[4, 5, 6, 7]], 1)[0]
    assert slope_y == pytest.approx(-1.0, abs=0.12)


def test_scale_changes_the_crop_scale_inversely(tracked):
    s, _, _ = crop_params(tracked)
    ratios = s[8:11] / s[7]
    expected = 1.0 / np.array([1.05, 1.10, 1.15])
    np.testing.assert_allclose(ratios, expected, atol=0.02)


def test_roll_follows_the_rotation(tracked):
    lm = tracked.raw_landmarks
    def roll(l):
        d = l[42:48].mean(0) - l[36:42].mean(0)
        return math.degrees(math.atan2(d[1], d[0]))
    base = roll(lm[10])
    # a counter-clockwise rotation on screen lifts the right eye: the y-down eye-line angle decreases
    for i, (_, _, _, a) in zip(range(11, 14), MOTION[11:14]):
        assert roll(lm[i]) - base == pytest.approx(-a, abs=2.0)


def test_landmark_smoothing_and_missing_frames():
    rng = np.random.default_rng(0)
    clean = np.linspace(0, 20, 50)[:, None, None] + np.zeros((50, 68, 2))
    noisy = clean + rng.normal(0, 1.0, clean.shape)
    smooth = tracking.smooth_along_time(noisy, 2.0)
    assert np.abs(np.diff(smooth, axis=0)).mean() < 0.5 * np.abs(np.diff(noisy, axis=0)).mean()
    assert np.abs(smooth - clean)[5:-5].mean() < np.abs(noisy - clean).mean()
    np.testing.assert_array_equal(tracking.smooth_along_time(noisy, 0), noisy)
    found = np.ones(50, bool)
    found[[0, 1, 20]] = False
    filled = tracking.fill_missing(noisy, found)
    np.testing.assert_array_equal(filled[0], noisy[2])
    np.testing.assert_array_equal(filled[20], noisy[19])
    with pytest.raises(tracking.VideoError, match="no face"):
        tracking.fill_missing(noisy, np.zeros(50, bool))
    rows = np.cumsum(rng.normal(0, 1, (40, 73)), axis=0).astype(np.float32)
    sm = tracking.smooth_curves(rows, 1.5)
    assert sm.shape == rows.shape and sm.dtype == np.float32
    assert np.abs(np.diff(sm, 2, axis=0)).mean() < np.abs(np.diff(rows, 2, axis=0)).mean()


def test_extract_command_end_to_end(video, checkpoint_dir, tracked, tmp_path, capsys):
    out = tmp_path / "motion.json"
    code = main(["extract", "--video", str(video), "--out", str(out), "--checkpoints", str(checkpoint_dir),
                 "--landmark-sigma", "0", "--quiet"])
    assert code == 0, capsys.readouterr().err
    motion = read_motion(out)
    assert motion.num_frames == len(MOTION)
    assert motion.fps == pytest.approx(25.0)
    np.testing.assert_allclose(motion.rows, tracked.rows, rtol=1e-6, atol=1e-6)
    assert motion.source["frames"] == len(MOTION)
    # smoothing: same length, smoother crop curves
    out2 = tmp_path / "smooth.json"
    assert main(["extract", "--video", str(video), "--out", str(out2), "--checkpoints", str(checkpoint_dir),
                 "--smooth", "--max-frames", "8", "--quiet"]) == 0
    sm = read_motion(out2)
    assert sm.num_frames == 8 and sm.source["curve_sigma"] == 1.5
    # resampling to half the rate keeps every other row
    out3 = tmp_path / "half.json"
    assert main(["extract", "--video", str(video), "--out", str(out3), "--checkpoints", str(checkpoint_dir),
                 "--landmark-sigma", "0", "--fps", "12.5", "--quiet"]) == 0
    half = read_motion(out3)
    assert half.fps == 12.5 and half.num_frames == (len(MOTION) - 1) // 2 + 1
    np.testing.assert_allclose(half.rows, tracked.rows[::2], rtol=1e-6, atol=1e-6)


def test_resample_rows():
    t = np.arange(31) / 30.0  # 1 s at 30 fps
    rows = np.stack([np.sin(t * 3 + j) for j in range(73)], axis=1).astype(np.float32)
    out = tracking.resample_rows(rows, 30.0, 25.0)
    assert out.shape == (26, 73) and out.dtype == np.float32
    t25 = np.arange(26) / 25.0
    expected = np.stack([np.sin(t25 * 3 + j) for j in range(73)], axis=1)
    assert np.abs(out - expected).max() < 2e-3  # linear interpolation error of a smooth curve
    np.testing.assert_array_equal(out[[0, 5, 25]], rows[[0, 6, 30]])  # shared instants are exact
    np.testing.assert_array_equal(tracking.resample_rows(rows, 30.0, 30.0), rows)
    with pytest.raises(ValueError, match="positive"):
        tracking.resample_rows(rows, 0.0, 25.0)


def test_extract_command_errors(video, checkpoint_dir, tmp_path, capsys):
    assert main(["extract", "--video", str(tmp_path / "none.mp4"), "--out", str(tmp_path / "m.json"),
                 "--checkpoints", str(checkpoint_dir)]) == 1
    assert "video not found" in capsys.readouterr().err
    assert main(["extract", "--video", str(video), "--out", str(tmp_path / "m.json"),
                 "--checkpoints", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "epoch_20.pth" in err and "from --checkpoints" in err  # the option the user gave, not --dir
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    assert main(["extract", "--video", str(bad), "--out", str(tmp_path / "m.json"),
                 "--checkpoints", str(checkpoint_dir)]) == 1
    assert "cannot open" in capsys.readouterr().err
    assert main(["extract", "--video", str(video), "--out", str(tmp_path / "m.txt")]) == 2
    for flag, value in (("--smooth", "nan"), ("--smooth", "inf"), ("--landmark-sigma", "-1")):
        assert main(["extract", "--video", str(video), "--out", str(tmp_path / "m.json"), flag, value]) == 2
        assert "must be finite numbers >= 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="finite number of frames"):
        tracking.smooth_along_time(np.zeros((4, 2)), float("nan"))


def test_video_without_a_face(tmp_path, checkpoint_dir):
    path = tmp_path / "wall.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (128, 128))
    for i in range(3):
        writer.write(np.full((128, 128, 3), 60 + 10 * i, np.uint8))
    writer.release()
    ext = Deep3DExtractor(torch.nn.Identity())  # never reached
    with pytest.raises(tracking.VideoError, match="no face found in any frame"):
        tracking.track_video(path, ext)


def test_tracking_can_be_cancelled(video):
    ext = Deep3DExtractor(torch.nn.Identity())  # never reached
    with pytest.raises(tracking.Cancelled):
        tracking.track_video(video, ext, should_stop=lambda: True)
