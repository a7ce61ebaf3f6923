"""Portrait alignment on the real FFHQ-aligned demo portraits (dlib landmarks, FFHQ quad)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

import dlib  # noqa: E402,F401  (a pinned dependency: a missing dlib must fail these tests)

from server.preprocessing import align  # noqa: E402
from server.cli import main  # noqa: E402

# FFHQ template positions in a 1024 image. The recipe fixes the crop centre c = eye_avg + 0.1 eye_to_mouth
# at the image centre and the crop half-width (512 px) at max(2 |eye_to_eye|, 1.8 |eye_to_mouth|): for
# faces of ordinary proportions the eye term wins, so the eyes are 256 px apart around x = 512 at
# y = 512 - 0.1 |eye_to_mouth| (~ 484), and the mouth centre lies on x = 512, 230-285 px below them
# (its exact height is the face's own proportion).
FFHQ_LEFT_EYE = np.array([384.0, 484.0])
FFHQ_RIGHT_EYE = np.array([640.0, 484.0])
FFHQ_MOUTH = np.array([512.0, 758.0])


def load(fixtures_dir, name):
    return np.asarray(Image.open(fixtures_dir / name).convert("RGB"))


def features(lm):
    eye_l, eye_r = lm[36:42].mean(0), lm[42:48].mean(0)
    mouth = (lm[48] + lm[54]) / 2
    return eye_l, eye_r, mouth


@pytest.fixture(scope="module")
def portraits(fixtures_dir):
    return {name: load(fixtures_dir, name) for name in ("portrait_100.jpg", "portrait_40.jpg")}


@pytest.fixture(scope="module")
def aligned(portraits):
    return {name: align.align_portrait(img, source_name=name) for name, img in portraits.items()}


@pytest.mark.parametrize("name", ["portrait_100.jpg", "portrait_40.jpg"])
def test_aligned_portrait_geometry(aligned, portraits, name):
    res = aligned[name]
    assert res.image.shape == (1024, 1024, 3) and res.image.dtype == np.uint8
    assert res.faces_found == 1 and not any("faces found" in w for w in res.warnings)
    lm = res.landmarks
    assert lm.shape == (68, 2)
    assert np.all(lm > 0) and np.all(lm < 1024)
    # landmarks lie inside the detected face region of the output (jaw to brows)
    eye_l, eye_r, mouth = features(lm)
    assert eye_l[0] < 512 < eye_r[0]
    # FFHQ template positions, within a few pixels (mouth height: within the face's own proportion)
    assert np.linalg.norm(eye_l - FFHQ_LEFT_EYE) < 6, eye_l
    assert np.linalg.norm(eye_r - FFHQ_RIGHT_EYE) < 6, eye_r
    assert abs(mouth[0] - FFHQ_MOUTH[0]) < 6 and abs(mouth[1] - FFHQ_MOUTH[1]) < 20, mouth
    # the landmarks re-detected on the output agree with the mapped ones
    det = align.detect_landmarks(res.image)
    assert det is not None
    assert np.median(np.linalg.norm(det.landmarks - lm, axis=1)) < 6


@pytest.mark.parametrize("name", ["portrait_100.jpg", "portrait_40.jpg"])
def test_already_aligned_portrait_is_nearly_unchanged(aligned, portraits, name):
    """The fixtures are FFHQ crops already: re-aligning them is close to the identity."""
    res, src = aligned[name], portraits[name]
    assert np.median(np.linalg.norm(res.landmarks - res.source_landmarks, axis=1)) < 12
    centre = (slice(256, 768), slice(256, 768))
    diff = np.abs(res.image[centre].astype(float) - src[centre].astype(float)).mean()
    assert diff < 25


def test_moved_scaled_rotated_photo_aligns_back(portraits, aligned):
    src = portraits["portrait_100.jpg"]
    # put the portrait, rotated 12 degrees, scaled 0.7, off-centre, into a larger landscape photo
    h, w = 1100, 1500
    m = cv2.getRotationMatrix2D((512, 512), 12, 0.7)
    m[:, 2] += (620 - 512, 500 - 512)
    photo = cv2.warpAffine(src, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=(128, 128, 128))
    res = align.align_portrait(photo, source_name="moved")
    assert res.faces_found == 1
    ref = aligned["portrait_100.jpg"]
    err = np.linalg.norm(res.landmarks - ref.landmarks, axis=1)
    assert np.median(err) < 5, err
    for a, b in zip(features(res.landmarks), features(ref.landmarks)):
        assert np.linalg.norm(a - b) < 8
    # the same head comes out: pixels of the central face region agree
    centre = (slice(300, 800), slice(300, 720))
    assert np.abs(res.image[centre].astype(float) - ref.image[centre].astype(float)).mean() < 10


def test_several_faces_use_the_largest_and_say_so(portraits):
    src = portraits["portrait_40.jpg"]
    big = cv2.resize(src, (600, 600), interpolation=cv2.INTER_AREA)
    small = cv2.resize(src, (300, 300), interpolation=cv2.INTER_AREA)
    canvas = np.full((700, 1000, 3), 128, np.uint8)
    canvas[50:650, 20:620] = big
    canvas[200:500, 660:960] = small
    res = align.align_portrait(canvas, source_name="group.png")
    assert res.faces_found == 2
    assert any("2 faces found in group.png" in w for w in res.warnings)
    l, t, r, b = res.face_box
    assert r < 640 and (r - l) > 150  # the big face on the left


def test_no_face_names_the_file():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    with pytest.raises(align.NoFaceError, match=r"no face found in empty\.jpg"):
        align.align_portrait(noise, source_name="empty.jpg")


def test_bad_arrays_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        align.align_portrait(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="RGB"):
        align.align_portrait(np.zeros((64, 64, 5), np.uint8))
    with pytest.raises(ValueError, match="between 16 and 1024"):
        align.align_portrait(np.zeros((64, 64, 3), np.uint8), size=2048)


def test_256_output_and_encoder_copy(portraits):
    res = align.align_portrait(portraits["portrait_40.jpg"], size=256)
    assert res.image.shape == (256, 256, 3)
    eye_l, eye_r, mouth = features(res.landmarks)
    assert np.linalg.norm(eye_l - FFHQ_LEFT_EYE / 4) < 2 and np.linalg.norm(eye_r - FFHQ_RIGHT_EYE / 4) < 2
    full = align.align_portrait(portraits["portrait_40.jpg"])
    assert full.image_256.shape == (256, 256, 3)
    assert np.abs(full.image_256.astype(float) - res.image.astype(float)).mean() < 6


def test_pad_fills_outside_areas(portraits):
    src = portraits["portrait_100.jpg"]
    # crop so that the face's FFHQ square leaves the photo on the left
    part = np.ascontiguousarray(src[:, 300:])
    black = align.align_portrait(part)
    padded = align.align_portrait(part, pad=True)
    assert any("edges" in w for w in black.warnings)
    strip = (slice(400, 600), slice(0, 40))
    assert black.image[strip].max() == 0
    assert padded.image[strip].mean() > 20


def test_align_command_writes_png(fixtures_dir, tmp_path, capsys):
    out = tmp_path / "aligned.png"
    lmk = tmp_path / "lm.json"
    code = main(["align", "--image", str(fixtures_dir / "portrait_40.jpg"), "--out", str(out),
                 "--landmarks", str(lmk)])
    assert code == 0
    img = Image.open(out)
    assert img.size == (1024, 1024) and img.mode == "RGB"
    data = json.loads(lmk.read_text())
    assert data["faces_found"] == 1 and len(data["aligned_landmarks"]) == 68
    assert "1 face(s) found" in capsys.readouterr().out


def test_align_command_errors(tmp_path, capsys):
    missing = tmp_path / "nope.jpg"
    assert main(["align", "--image", str(missing), "--out", str(tmp_path / "o.png")]) == 1
    assert "nope.jpg" in capsys.readouterr().err
    noface = tmp_path / "wall.png"
    Image.fromarray(np.full((200, 200, 3), 90, np.uint8)).save(noface)
    assert main(["align", "--image", str(noface), "--out", str(tmp_path / "o.png")]) == 1
    err = capsys.readouterr().err
    assert "no face found in" in err and "wall.png" in err
    notimg = tmp_path / "text.jpg"
    notimg.write_text("hello")
    assert main(["align", "--image", str(notimg), "--out", str(tmp_path / "o.png")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main(["align", "--image", str(noface), "--out", str(tmp_path / "o.jpg")]) == 2
    # checked before the (slow) alignment, not a traceback after the PNG was written
    assert main(["align", "--image", str(noface), "--out", str(tmp_path / "o2.png"),
                 "--landmarks", str(tmp_path / "missing" / "lm.json")]) == 2
    assert "create it first or choose another --landmarks" in capsys.readouterr().err
    assert not (tmp_path / "o2.png").exists()


def test_oversized_image_is_a_clear_error(tmp_path, monkeypatch):
    from server.preprocessing.align import read_image

    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 pixels > 2 x the limit: Pillow refuses
    with pytest.raises(ValueError, match="big.png is too large to open safely"):
        read_image(path)
