"""`styleheat render --tiny-random --source PHOTO --output crop|composite|matte` on real photos."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from server import cli
from server.preprocessing import align
from server.shots.compositing import Placement


@pytest.fixture(scope="module")
def inputs(fixtures_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("render-outputs")
    face = np.asarray(Image.open(fixtures_dir / "portrait_100.jpg").convert("RGB"))
    # an ordinary (non-square) photo: the portrait scaled, rotated and placed off-centre on a backdrop
    h, w = 600, 800
    m = cv2.getRotationMatrix2D((512, 512), -10, 0.45)
    m[:, 2] += (300 - 512, 280 - 512)
    photo = cv2.warpAffine(face, m, (w, h), borderValue=(90, 140, 60))
    cv2.imwrite(str(d / "photo.jpg"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 98])
    photo = cv2.cvtColor(cv2.imread(str(d / "photo.jpg")), cv2.COLOR_BGR2RGB)  # as the command reads it
    rows = np.random.default_rng(0).normal(0, 0.2, (4, 73)).round(4)
    rows[:, 70:] = [1.0, 128.0, 128.0]
    (d / "motion.json").write_text(json.dumps({"format": "styleheat-motion", "version": 1, "fps": 25.0,
                                               "rows": rows.tolist()}))
    return d, photo, face


def run(d, tmp_path, *extra):
    out = tmp_path / "frames"
    rc = cli.main(["render", "--tiny-random", "--precision", "float32", "--source", str(d / "photo.jpg"),
                   "--motion", str(d / "motion.json"), "--out", str(out), "--quiet", *extra])
    return rc, out


def test_crop_composite_and_matte_from_an_ordinary_photo(inputs, tmp_path, capsys):
    d, photo, _ = inputs
    rc, out = run(d, tmp_path / "c", "--output", "crop")
    assert rc == 0
    crop = cv2.imread(str(out / "frame_00002.png"))
    assert crop.shape[0] == crop.shape[1] != photo.shape[0]
    rc, out = run(d, tmp_path / "k", "--output", "composite")
    assert rc == 0, capsys.readouterr().err
    comp = cv2.cvtColor(cv2.imread(str(out / "frame_00002.png")), cv2.COLOR_BGR2RGB)
    assert comp.shape == photo.shape
    placement = Placement(align.align_portrait(photo).quad, photo.shape[:2])
    roi, alpha = placement.source_alpha(crop.shape[0])
    full = np.zeros(photo.shape[:2], np.float32)
    full[roi[1]:roi[3], roi[0]:roi[2]] = alpha
    assert np.array_equal(comp[full <= 0], photo[full <= 0])
    assert np.abs(comp[full >= 0.999].astype(int) - photo[full >= 0.999]).mean() > 5
    rc, out = run(d, tmp_path / "m", "--output", "matte")
    assert rc == 0
    matte = cv2.imread(str(out / "frame_00002.png"), cv2.IMREAD_UNCHANGED)
    assert matte.shape == photo.shape[:2] + (4,)
    assert np.all(matte[:, :, 3][full <= 0] == 0) and np.all(matte[:, :, 3][full >= 0.999] == 255)
    rc, out = run(d, tmp_path / "p", "--output", "composite", "--seam", "poisson")
    assert rc == 0 and cv2.imread(str(out / "frame_00000.png")).shape == photo.shape


def test_an_aligned_portrait_is_used_as_given(inputs, tmp_path, capsys):
    d, _, face = inputs
    cv2.imwrite(str(d / "aligned.png"), cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
    out = tmp_path / "a"
    rc = cli.main(["render", "--tiny-random", "--precision", "float32", "--source", str(d / "aligned.png"),
                   "--motion", str(d / "motion.json"), "--out", str(out), "--output", "composite"])
    assert rc == 0
    assert "already FFHQ-aligned" in capsys.readouterr().err
    assert cv2.imread(str(out / "frame_00000.png")).shape == face.shape


def test_a_photo_without_a_face_is_a_clear_error(tmp_path, inputs, capsys):
    d, *_ = inputs
    cv2.imwrite(str(tmp_path / "wall.png"), np.full((300, 500, 3), 128, np.uint8))
    rc = cli.main(["render", "--tiny-random", "--source", str(tmp_path / "wall.png"), "--motion",
                   str(d / "motion.json"), "--out", str(tmp_path / "o"), "--output", "composite", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no face found" in err and "wall.png" in err


def test_huge_16bit_and_cmyk_photos(inputs, tmp_path, capsys):
    """A 20000-pixel side is refused from the header (nothing decoded); 16-bit PNG and CMYK JPEG photos
    are read as the same 8-bit RGB picture (OpenCV's conversions), so they align and render like it."""
    from server.frame_files import read_portrait

    d, photo, _ = inputs
    big = tmp_path / "huge.png"
    Image.new("L", (20000, 16), 0).save(big)
    with pytest.raises(ValueError, match="20000x16; sides must be at most 8192"):
        read_portrait(big, square=False)
    rc = cli.main(["render", "--tiny-random", "--source", str(big), "--motion", str(d / "motion.json"),
                   "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "at most 8192" in capsys.readouterr().err
    deep = tmp_path / "deep.png"
    cv2.imwrite(str(deep), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    assert np.array_equal(read_portrait(deep, square=False), photo)
    cmyk = tmp_path / "cmyk.jpg"
    Image.fromarray(photo).convert("CMYK").save(cmyk, quality=98)
    got = read_portrait(cmyk, square=False)
    assert got.shape == photo.shape and np.abs(got.astype(int) - photo).mean() < 6
    out = tmp_path / "k"
    rc = cli.main(["render", "--tiny-random", "--source", str(cmyk), "--motion", str(d / "motion.json"),
                   "--out", str(out), "--output", "composite", "--quiet"])
    assert rc == 0 and cv2.imread(str(out / "frame_00000.png")).shape == photo.shape
