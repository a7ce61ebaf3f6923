"""Every command that needs weights also runs with --tiny-random (a newcomer's first try): extract,
prepare-data and convert here (render, dub, farm, audio2exp and evaluate are tested in their own files)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from server import cli


@pytest.fixture(scope="module")
def clip(fixtures_dir, tmp_path_factory):
    """A short MJPG video of the demo portrait drifting across a 320x240 frame."""
    d = tmp_path_factory.mktemp("tinyclip")
    face = np.asarray(Image.open(fixtures_dir / "portrait_100.jpg").convert("RGB"))
    path = d / "clip.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (320, 240))
    for i in range(8):
        m = cv2.getRotationMatrix2D((512, 512), 0, 0.2)
        m[:, 2] += (150 + 2 * i - 512, 120 - 512)
        frame = cv2.warpAffine(face, m, (320, 240), borderValue=(40, 60, 80))
        w.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    w.release()
    return d, path


def test_extract_tiny_random_tracks_a_real_video(clip, tmp_path):
    _, video = clip
    out = tmp_path / "motion.json"
    assert cli.main(["extract", "--tiny-random", "--video", str(video), "--out", str(out), "--quiet"]) == 0
    m = json.loads(out.read_text())
    rows = np.asarray(m["rows"], dtype=np.float32)
    assert rows.shape == (8, 73) and np.all(np.isfinite(rows))
    assert cli.main(["extract", "--tiny-random", "--checkpoints", str(tmp_path), "--video", str(video),
                     "--out", str(out)]) == 2


def test_prepare_data_tiny_random_builds_a_dataset(clip, tmp_path):
    d, _ = clip
    out = tmp_path / "dataset"
    assert cli.main(["prepare-data", str(d), "--out", str(out), "--tiny-random", "--no-audio",
                     "--max-frames", "4"]) == 0
    meta = json.loads((out / "dataset.json").read_text())
    assert len(meta["clips"]) == 1


def test_convert_tiny_random_bundle_renders_like_tiny_random(tmp_path):
    bundle = tmp_path / "tiny.safetensors"
    assert cli.main(["convert", "--tiny-random", "--out", str(bundle)]) == 0
    rng = np.random.default_rng(1)
    face = cv2.GaussianBlur(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), (0, 0), 3)
    cv2.imwrite(str(tmp_path / "face.png"), face)
    rows = rng.normal(0, 0.2, (3, 73)).round(4)
    rows[:, 70:] = [1.0, 128.0, 128.0]
    (tmp_path / "m.json").write_text(json.dumps({"format": "styleheat-motion", "version": 1, "fps": 25.0,
                                                 "rows": rows.tolist()}))
    common = ["--source", str(tmp_path / "face.png"), "--motion", str(tmp_path / "m.json"), "--quiet",
              "--precision", "float32", "--device", "cpu"]
    assert cli.main(["render", "--bundle", str(bundle), "--out", str(tmp_path / "a"), *common]) == 0
    assert cli.main(["render", "--tiny-random", "--out", str(tmp_path / "b"), *common]) == 0
    for i in range(3):
        a = cv2.imread(str(tmp_path / "a" / f"frame_{i:05d}.png"))
        b = cv2.imread(str(tmp_path / "b" / f"frame_{i:05d}.png"))
        np.testing.assert_array_equal(a, b)
