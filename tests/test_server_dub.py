"""The ``dub`` request against a real ``styleheat-server --tiny-random`` on 127.0.0.1.

The plate is generated: the fixtures portrait moved along a known path over a gradient (160x120, MJPG AVI),
its face painted over in a few frames; the speech is a sine WAV's samples. Checked: every plate frame comes
back at the plate's size and count (credit-paced), pixels far from the face equal the plate's, the painted
frames come back unchanged and are listed in ``dubbed``; matte frames are RGBA; bad plates, a plate without a
face and 0 samples are clear errors and the server goes on serving; cancel ends the dub with ``done``.
"""
from __future__ import annotations


import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES
from server import protocol as P
from server_helpers import Client, ctx, serve_tiny  # noqa: F401
from plates import BLANK, FACE, FPS, H, N, W, decode, path, write_plate

SR = 16000


@pytest.fixture(scope="module")
def server():
    yield from serve_tiny("--presets", str(FIXTURES / "expression_presets.json"))


@pytest.fixture()
def client(server, ctx):
    c = Client(server.endpoint, ctx)
    yield c
    c.close()


def sine(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.4 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    face = np.asarray(Image.open(FIXTURES / "portrait_100.jpg").convert("RGB").resize((FACE, FACE), Image.LANCZOS))
    file = tmp_path_factory.mktemp("plate") / "plate.avi"
    write_plate(file, face)
    return file


def run_dub(client: Client, rid: str, *, video=None, path_=None, samples=None, grant=True, cancel_after=None,
            timeout=120.0, **kw):
    """(frames [(header, image)], progress headers, terminal header)."""
    header, parts = P.dub_request(rid, sine(N / FPS) if samples is None else samples, SR, video=video, path=path_,
                                  **kw)
    client.send(header, parts)
    frames, progress = [], []
    while True:
        h, p = client.recv(timeout)
        if h.get("id") != rid:
            continue
        if h["type"] == P.FRAME:
            if h["encoding"] == "png":
                img = cv2.imdecode(np.frombuffer(p[0], np.uint8), cv2.IMREAD_UNCHANGED)
                img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)
            else:
                img = P.decode_raw_frame(h, p[0]).copy()
            frames.append((h, img))
            if cancel_after is not None and len(frames) == cancel_after:
                client.send(P.request(P.CANCEL, rid))
            elif grant:
                client.send(P.request(P.CREDIT, rid, frames=1))
        elif h["type"] == P.PROGRESS:
            progress.append(h)
        else:
            return frames, progress, h


def assert_serving(client: Client) -> None:
    h, _ = client.call(P.request(P.HELLO, client.new_id("hello")))
    assert h["type"] == P.HELLO


def test_dub_uploaded_plate_every_frame_at_the_plates_size(client, plate):
    frames, progress, end = run_dub(client, "dub1", video=plate.read_bytes(), size=64, credit=2)
    assert end["type"] == P.DUBBED, end
    assert (end["sent"], end["total"], end["width"], end["height"]) == (N, N, W, H)
    assert end["fps"] == pytest.approx(FPS) and end["output"] == "composite" and end["render_size"] == 64
    assert [h["frame"] for h, _ in frames] == list(range(N))
    assert all(h["total"] == N and h["channels"] == 3 for h, _ in frames)
    assert {s["stage"] for s in progress} >= {"landmarks", "3dmm"}
    src = decode(plate)
    assert len(src) == N
    # far from the face (outside the fixed paste square) nothing changes; the face itself does
    x0 = min(path(k)[0] for k in range(N)) - 8
    x1 = max(path(k)[0] for k in range(N)) + FACE + 8
    far = np.zeros((H, W), bool)
    far[:, :max(x0, 0)] = True
    far[:, min(x1, W):] = True
    assert far.mean() > 0.1
    changed = []
    for k, (h, img) in enumerate(frames):
        assert img.shape == (H, W, 3)
        assert np.array_equal(img[far], src[k][far]), f"frame {k}: pixels far from the face changed"
        x, y = path(k)
        c = (slice(y + 35, y + 60), slice(x + 35, x + 60))
        changed.append(np.abs(img[c].astype(int) - src[k][c]).mean())
    # the painted-over frames: no face, sent unchanged and listed
    assert end["frames_without_face"] == list(BLANK)
    for k in BLANK:
        assert np.array_equal(frames[k][1], src[k])
    assert any("12-13" in w and "unchanged" in w for w in end["warnings"]), end["warnings"]
    assert min(c for k, c in enumerate(changed) if k not in BLANK) > 2.0, "the rendered face was not pasted"
    assert_serving(client)


def test_dub_matte_by_loopback_path_raw(client, plate):
    frames, _, end = run_dub(client, "dub2", path_=str(plate), output="matte", encoding="raw", size=64,
                             samples=sine(3.0))
    assert end["type"] == P.DUBBED, end
    assert end["output"] == "matte" and end["sent"] == N
    assert any("cut" in w for w in end["warnings"]), end["warnings"]      # 3 s of speech, 1.2 s of plate
    for k, (h, img) in enumerate(frames):
        assert h["channels"] == 4 and img.shape == (H, W, 4)
        assert img[:, :8, 3].max() == 0 and img[:, -8:, 3].max() == 0      # transparent far from the face
        if k not in BLANK:
            x, y = path(k)
            assert img[y + FACE // 2, x + FACE // 2, 3] == 255
        else:
            assert img[..., 3].max() == 0                                  # no face: an empty matte


def test_bad_input_is_a_clear_error_and_the_server_keeps_serving(client, plate, tmp_path):
    cases = []
    _, _, end = run_dub(client, "bad0", video=b"RIFF not a video at all" * 10)
    assert end["type"] == P.ERROR and end["code"] == P.E_BAD_FIELD and "not a video file" in end["message"], end
    _, _, end = run_dub(client, "bad1", video=b"RIFF\x00\x10\x00\x00AVI LIST" + b"\x07" * 300)  # AVI, undecodable
    cases.append(end)
    assert end["type"] == P.ERROR and end["code"] == P.E_BAD_VIDEO, end
    assert "cannot" in end["message"] and "decode" in end["message"] and "styleheat-dub-" not in end["message"]
    faceless = tmp_path / "empty.avi"
    write_plate(faceless, None, n=8)
    _, _, end = run_dub(client, "bad2", video=faceless.read_bytes())
    assert end["type"] == P.ERROR and end["code"] == P.E_BAD_VIDEO and "no face" in end["message"], end
    _, _, end = run_dub(client, "bad3", video=plate.read_bytes(), samples=np.zeros(0, np.float32))
    assert end["type"] == P.ERROR and end["code"] == P.E_BAD_FIELD and "empty" in end["message"], end
    _, _, end = run_dub(client, "bad4", path_=str(tmp_path / "missing.avi"))
    assert end["type"] == P.ERROR and end["code"] == P.E_BAD_VIDEO and "not found" in end["message"], end
    _, _, end = run_dub(client, "bad5", video=plate.read_bytes(), output="crop")
    assert end["type"] == P.ERROR and end["code"] == P.E_BAD_FIELD and "composite" in end["message"], end
    _, _, end = run_dub(client, "bad6", video=plate.read_bytes(), size=100)
    assert end["type"] == P.ERROR and end["code"] == P.E_BAD_FIELD and "size" in end["message"], end
    # a playlist naming a file on the server machine is refused as extract refuses it: the plate is never read
    playlist = b"#EXTM3U\n#EXTINF:1,\n" + str(plate).encode() + b"\n#EXT-X-ENDLIST\n"
    _, _, end = run_dub(client, "bad7", video=playlist)
    assert end["type"] == P.ERROR and end["code"] == P.E_BAD_FIELD and "not a video file" in end["message"], end
    assert_serving(client)


def test_a_plate_over_the_frame_limit_is_refused_before_work(client, tmp_path, monkeypatch):
    """The dub plate meets extract's limits (frames, duration, pixels) from its header: an MJPG .avi of
    more frames than MAX_EXTRACT_FRAMES would be refused at once -- checked here with a wide plate instead
    (over MAX_EXTRACT_PIXELS), which is cheap to make."""
    w, h = 4096, 2176
    assert w * h > P.MAX_EXTRACT_PIXELS
    big = tmp_path / "wide.avi"
    vw = cv2.VideoWriter(str(big), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (w, h))
    vw.write(np.zeros((h, w, 3), np.uint8))
    vw.release()
    _, progress, end = run_dub(client, "wide", video=big.read_bytes())
    assert end["type"] == P.ERROR and end["code"] == P.E_BAD_VIDEO and "downscale" in end["message"], end
    assert not progress            # refused before any tracking
    assert_serving(client)


def test_cancel_ends_the_dub_and_the_server_goes_on(client, plate):
    frames, _, end = run_dub(client, "dub3", video=plate.read_bytes(), size=64, credit=1, cancel_after=3)
    assert end["type"] == P.DONE and end["cancelled"] is True, end
    assert 3 <= len(frames) < N and end["sent"] == len(frames)
    frames, _, end = run_dub(client, "dub4", video=plate.read_bytes(), size=64, credit=8)
    assert end["type"] == P.DUBBED and len(frames) == N
