"""Pasting a face crop back into its source: geometry, mask, seam and matte, without the generator.

The photos are made from the real FFHQ demo portraits moved into larger scenes by known similarity
transforms (rotated, scaled, off-centre); the crop is what the project's own alignment cut from them.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from server.preprocessing import align
from server.shots.compositing import (DEFAULT_MASK, MaskSpec, Placement, composite, crop_mask, matte, place)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def scene(portrait: np.ndarray, *, size_hw, angle, scale, centre) -> np.ndarray:
    """The portrait rotated/scaled about its centre and moved to ``centre`` in a textured backdrop."""
    h, w = size_hw
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    backdrop = np.stack([(xx / w) * 200 + 30, (yy / h) * 180 + 40,
                         127 + 60 * np.sin(xx / 37.0) * np.cos(yy / 53.0)], axis=2)
    m = cv2.getRotationMatrix2D((512, 512), angle, scale)
    m[:, 2] += (centre[0] - 512, centre[1] - 512)
    face = cv2.warpAffine(portrait, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    cover = cv2.warpAffine(np.ones((1024, 1024), np.float32), m, (w, h), flags=cv2.INTER_LINEAR)[:, :, None]
    return np.clip(np.rint(face * cover + backdrop * (1 - cover)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def portrait(fixtures_dir):
    return np.asarray(Image.open(fixtures_dir / "portrait_100.jpg").convert("RGB"))


CASES = {
    "rotated": dict(size_hw=(1300, 1400), angle=25.0, scale=0.9, centre=(700, 640)),
    "scaled": dict(size_hw=(1200, 1600), angle=0.0, scale=0.45, centre=(800, 600)),
    "off-centre": dict(size_hw=(1500, 2000), angle=-15.0, scale=0.6, centre=(1500, 450)),
}


@pytest.fixture(scope="module")
def aligned_scenes(portrait):
    out = {}
    for name, kw in CASES.items():
        photo = scene(portrait, **kw)
        out[name] = (photo, align.align_portrait(photo, source_name=name))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_pasting_the_aligned_crop_back_reproduces_the_photo(aligned_scenes, name):
    photo, res = aligned_scenes[name]
    placement = Placement(res.quad, photo.shape[:2])
    out = composite(res.image, photo, placement)
    roi, alpha = placement.source_alpha(1024)
    x0, y0, x1, y1 = roi
    full = np.zeros(photo.shape[:2], np.float32)
    full[y0:y1, x0:x1] = alpha
    inside = full >= 0.99
    assert inside.sum() > 10_000
    # within interpolation error (two bilinear resamplings, and a down- then up-scale for the small face)
    p = psnr(out[inside], photo[inside])
    print(f"{name}: paste-back PSNR inside the mask {p:.1f} dB over {int(inside.sum())} px")
    assert p > 30.0, p
    # and exactly the photo wherever alpha is 0
    outside = full <= 0.0
    assert np.array_equal(out[outside], photo[outside])


def test_the_mask_lands_on_the_face(aligned_scenes):
    """The crop's mask centre maps onto the face: its landmarks have alpha 1 in source space."""
    photo, res = aligned_scenes["rotated"]
    placement = Placement(res.quad, photo.shape[:2])
    roi, alpha = placement.source_alpha(1024)
    lm = np.rint(res.source_landmarks).astype(int)
    inner = lm[17:68]  # brows, nose, eyes, mouth (the jaw line reaches the feathered band)
    vals = alpha[inner[:, 1] - roi[1], inner[:, 0] - roi[0]]
    assert np.all(vals > 0.999), vals.min()


def test_crop_mask_shape_and_values():
    m = crop_mask(256)
    assert m.shape == (256, 256) and m.dtype == np.float32
    assert m[128, 128] == 1.0 and m[0, 0] == 0.0 and m[0, 128] == 0.0 and m[255, 255] == 0.0
    band = (m > 0) & (m < 1)
    assert band.sum() > 0.05 * m.size  # a real feathered band, not a hard edge
    assert np.all(np.diff(m[128, 128:]) <= 1e-6)  # falls monotonically from the centre outwards


def test_identity_placement_is_exact(portrait):
    """A crop pasted into itself with the identity placement changes nothing."""
    out = composite(portrait, portrait, Placement.identity(1024))
    assert np.array_equal(out, portrait)
    a = Placement.identity(512).crop_to_source(512)
    assert np.allclose(a, [[1, 0, 0], [0, 1, 0]])


def test_preview_sized_crop_lands_in_the_same_place(aligned_scenes):
    """A 256 preview crop of the same frame pastes to the same place as the 1024 one."""
    photo, res = aligned_scenes["scaled"]
    placement = Placement(res.quad, photo.shape[:2])
    small = cv2.resize(res.image, (256, 256), interpolation=cv2.INTER_AREA)
    a = composite(res.image, photo, placement)
    b = composite(small, photo, placement)
    roi, alpha = placement.source_alpha(1024)
    inside = np.zeros(photo.shape[:2], bool)
    inside[roi[1]:roi[3], roi[0]:roi[2]] = alpha >= 0.99
    assert psnr(a[inside], b[inside]) > 25  # the same image, only blurrier: no shift


def _band_gradient(img: np.ndarray, band: np.ndarray) -> float:
    g = img.astype(np.float32).mean(axis=2)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3) / 8
    return float(np.sqrt(gx ** 2 + gy ** 2)[band].mean())


@pytest.mark.parametrize("spec, seamless", [(DEFAULT_MASK, True), (MaskSpec(feather=0.004), False)])
def test_no_visible_seam(aligned_scenes, spec, seamless):
    """Seam measure: the mean gradient magnitude (Sobel, levels/px) over the mask boundary ring
    (pixels within 3 px of the alpha = 0.5 contour) of a composite whose crop is 24 levels brighter
    than the photo (a colour drift as the generator makes) must not exceed the photo's own gradient
    over that ring by more than 10 %. A hard-edged mask fails this (the second case): the test can fail.
    """
    photo, res = aligned_scenes["rotated"]
    placement = Placement(res.quad, photo.shape[:2])
    drifted = np.clip(res.image.astype(np.int16) + 24, 0, 255).astype(np.uint8)
    out = composite(drifted, photo, placement, spec=spec)
    roi, alpha = placement.source_alpha(1024, spec)
    full = np.zeros(photo.shape[:2], np.float32)
    full[roi[1]:roi[3], roi[0]:roi[2]] = alpha
    edge = ((full >= 0.5).astype(np.uint8))
    contour = cv2.morphologyEx(edge, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    ring = cv2.dilate(contour.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    ours, own = _band_gradient(out, ring), _band_gradient(photo, ring)
    print(f"feather={spec.feather}: ring gradient {ours:.2f} vs the photo's own {own:.2f} levels/px")
    assert (ours <= 1.10 * own) == seamless


def test_matte_is_straight_alpha_of_the_same_placement(aligned_scenes):
    photo, res = aligned_scenes["off-centre"]
    placement = Placement(res.quad, photo.shape[:2])
    rgba = matte(res.image, placement)
    assert rgba.shape == photo.shape[:2] + (4,) and rgba.dtype == np.uint8
    roi, alpha = placement.source_alpha(1024)
    a = rgba[:, :, 3]
    full = np.zeros(photo.shape[:2], np.float32)
    full[roi[1]:roi[3], roi[0]:roi[2]] = alpha
    assert np.all(a[full <= 0] == 0)
    assert np.all(a[full >= 0.999] == 255)
    # straight colour: where alpha is partial the colour is the warped crop itself, not darkened;
    # "over" the photo with this alpha gives the composite (within rounding of alpha to 8 bits)
    comp = composite(res.image, photo, placement).astype(np.float32)
    over = rgba[:, :, :3] * (a[:, :, None] / 255.0) + photo * (1 - a[:, :, None] / 255.0)
    assert np.abs(over - comp).max() <= 2.0
    partial = (a > 20) & (a < 235)
    assert partial.sum() > 1000
    assert abs(float(rgba[:, :, :3][partial].mean()) - float(photo[partial].mean())) < 20  # not dark


def test_poisson_seam_keeps_outside_pixels(aligned_scenes):
    photo, res = aligned_scenes["scaled"]
    placement = Placement(res.quad, photo.shape[:2])
    drifted = np.clip(res.image.astype(np.int16) + 30, 0, 255).astype(np.uint8)
    out = composite(drifted, photo, placement, seam="poisson")
    roi, alpha = placement.source_alpha(1024)
    full = np.zeros(photo.shape[:2], np.float32)
    full[roi[1]:roi[3], roi[0]:roi[2]] = alpha
    assert np.array_equal(out[full <= 0], photo[full <= 0])
    inside = full >= 0.99
    # seamless cloning pulls the drifted colours back towards the photo's
    plain = composite(drifted, photo, placement)
    assert abs(out[inside].mean() - photo[inside].mean()) < abs(plain[inside].mean() - photo[inside].mean())


def test_face_outside_the_photo_is_pasted_where_it_overlaps():
    photo = np.full((300, 400, 3), 90, np.uint8)
    quad = np.array([[300.0, -100.0], [300.0, 200.0], [600.0, 200.0], [600.0, -100.0]])  # hangs off the corner
    frame = np.full((256, 256, 3), 200, np.uint8)
    out = composite(frame, photo, Placement(quad, photo.shape[:2]))
    assert out.shape == photo.shape and out[:, :250].tolist() == photo[:, :250].tolist()
    assert out[50, 399].tolist() == [200, 200, 200]  # the crop's interior reached the photo's corner
    nowhere = Placement(np.array([[500.0, 500], [500, 600], [600, 600], [600, 500]]), (300, 400))
    assert np.array_equal(composite(frame, photo, nowhere), photo)
    assert not matte(frame, nowhere).any()


def test_bad_input_is_a_clear_error(portrait):
    p = Placement.identity(1024)
    with pytest.raises(ValueError, match="square"):
        composite(portrait[:, :1000], portrait, p)
    with pytest.raises(ValueError, match="placement's size"):
        composite(portrait, portrait[:500], p)
    with pytest.raises(ValueError, match="seam"):
        composite(portrait, portrait, p, seam="blur")
    with pytest.raises(ValueError, match="output"):
        place(portrait, "mask", placement=p)
    with pytest.raises(ValueError, match="placement"):
        place(portrait, "matte")
    with pytest.raises(ValueError, match="degenerate"):
        Placement(np.zeros((4, 2)), (10, 10))
    assert place(portrait, "crop") is portrait
