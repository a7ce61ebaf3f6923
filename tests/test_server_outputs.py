"""Render outputs against a real ``styleheat-server --tiny-random`` on 127.0.0.1: crop, composite, matte.

The photo is a real FFHQ demo portrait moved, rotated and scaled into a larger textured scene; the server
aligns it itself (dlib), keeps the photo and the crop's placement, and pastes each rendered crop back.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from server import protocol as P
from server.preprocessing import align
from server.shots.compositing import Placement
from server_helpers import Client, collect_render, ctx, png_bytes, render_header, serve_tiny  # noqa: F401


@pytest.fixture(scope="module")
def server():
    yield from serve_tiny()


@pytest.fixture(scope="module")
def photo(fixtures_dir):
    face = np.asarray(Image.open(fixtures_dir / "portrait_40.jpg").convert("RGB"))
    h, w = 700, 900
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    backdrop = np.stack([xx / w * 180 + 40, yy / h * 160 + 50, 120 + 50 * np.sin(xx / 23.0)], axis=2)
    m = cv2.getRotationMatrix2D((512, 512), 14, 0.5)
    m[:, 2] += (520 - 512, 330 - 512)
    warped = cv2.warpAffine(face, m, (w, h), flags=cv2.INTER_LINEAR)
    cover = cv2.warpAffine(np.ones((1024, 1024), np.float32), m, (w, h))[:, :, None]
    return np.clip(np.rint(warped * cover + backdrop * (1 - cover)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def prepared(server, ctx, photo):
    c = Client(server.endpoint, ctx)
    try:
        hello, _ = c.call(P.request(P.HELLO, "h"))
        h, parts = c.call(P.request(P.PREPARE, "p", align=True), [png_bytes(photo)])
        assert h["type"] == P.PREPARED, h
        yield hello, h
    finally:
        c.close()


@pytest.fixture()
def client(server, ctx):
    c = Client(server.endpoint, ctx)
    yield c
    c.close()


def render(client, identity, size, output, encoding="png", rid=None):
    rid = rid or f"{output}-{encoding}"
    parts: list = []
    client.send(render_header(rid, identity, n_rows=6, frames=[1, 4], first=0, parts=parts, size=size,
                              encoding=encoding, credit=8, output=output), parts)
    accepted, frames, _, end = collect_render(client, rid)
    assert end["type"] == P.DONE, end
    assert accepted["output"] == output
    out = []
    for h, p in frames:
        if encoding == "raw":
            out.append((h, P.decode_raw_frame(h, p[0]).copy()))
        else:
            img = cv2.imdecode(np.frombuffer(p[0], np.uint8), cv2.IMREAD_UNCHANGED)
            conv = cv2.COLOR_BGRA2RGBA if img.shape[2] == 4 else cv2.COLOR_BGR2RGB
            out.append((h, cv2.cvtColor(img, conv)))
    return out


def test_hello_lists_the_outputs_with_sentences(prepared):
    hello, prep = prepared
    assert set(hello["outputs"]) == {"crop", "composite", "matte"}
    assert all(len(v) > 30 for v in hello["outputs"].values())
    assert prep["aligned"] is True
    assert (prep["source_width"], prep["source_height"]) == (900, 700)


def test_composite_and_matte_are_at_the_photo_size_and_place_the_crop(client, prepared, photo):
    hello, prep = prepared
    size = hello["sizes"][-1]
    crops = render(client, prep["identity"], size, "crop")
    comps = render(client, prep["identity"], size, "composite")
    mattes = render(client, prep["identity"], size, "matte", encoding="raw")
    # the same placement the server used: this process aligns the same photo with the same code
    placement = Placement(align.align_portrait(photo).quad, photo.shape[:2])
    roi, alpha = placement.source_alpha(size)
    full = np.zeros(photo.shape[:2], np.float32)
    full[roi[1]:roi[3], roi[0]:roi[2]] = alpha
    for (hc, crop), (h, comp), (hm, mat) in zip(crops, comps, mattes):
        assert crop.shape == (size, size, 3) and hc["channels"] == 3
        assert comp.shape == photo.shape and h["channels"] == 3 and (h["width"], h["height"]) == (900, 700)
        assert mat.shape == (700, 900, 4) and hm["channels"] == 4
        # outside the mask: the photo, bit for bit; inside: the rendered face, not the photo
        assert np.array_equal(comp[full <= 0], photo[full <= 0])
        inside = full >= 0.999
        assert inside.sum() > 5000
        assert np.abs(comp[inside].astype(int) - photo[inside]).mean() > 5
        # the composite's inside is the crop warped into place
        warped = cv2.warpAffine(crop, placement.source_to_crop(size), (900, 700),
                                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
        # (OpenCV's fixed-point bilinear over the region vs the whole photo: a level or two apart)
        d = np.abs(comp[inside].astype(int) - warped[inside])
        assert d.max() <= 2 and d.mean() < 0.1
        # the matte: alpha 0 outside, 255 inside, and "over" the photo it gives the composite
        a = mat[:, :, 3]
        assert np.all(a[full <= 0] == 0) and np.all(a[inside] == 255)
        over = mat[:, :, :3] * (a[:, :, None] / 255.0) + photo * (1 - a[:, :, None] / 255.0)
        assert np.abs(over - comp).max() <= 2.0


def test_bad_output_is_a_bad_field_and_the_server_keeps_serving(client, prepared):
    hello, prep = prepared
    parts: list = []
    client.send(render_header("bad", prep["identity"], n_rows=4, frames=[1], first=0, parts=parts,
                              output="mask"), parts)
    h, _ = client.recv()
    assert h["type"] == P.ERROR and h["code"] == P.E_BAD_FIELD and "output" in h["message"], h
    assert render(client, prep["identity"], hello["sizes"][0], "composite", rid="after")[0][1].shape[:2] == (700, 900)


def test_a_portrait_used_as_given_is_its_own_photo(client, prepared):
    hello, _ = prepared
    rng = np.random.default_rng(3)
    square = cv2.GaussianBlur(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), (0, 0), 2)
    h, _ = client.call(P.request(P.PREPARE, "given", align=False), [png_bytes(square)])
    assert h["type"] == P.PREPARED and h["aligned"] is False
    size = hello["sizes"][0]
    (hc, comp), = render(client, h["identity"], size, "composite", rid="given-c")[:1]
    assert comp.shape == (96, 96, 3)
    # the corners (outside the head ellipse) are the portrait's own pixels
    assert np.array_equal(comp[:4, :4], square[:4, :4]) and np.array_equal(comp[-4:, -4:], square[-4:, -4:])
