"""The add-on's bpy-free pieces: the ZeroMQ client against a real tiny-random server, the PNG
writer, windows and hashes. No Blender here."""
from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from test_addon_helpers import Server, build_staged


@pytest.fixture(scope="module")
def addon(tmp_path_factory):
    staged = build_staged(tmp_path_factory.mktemp("pkg"))
    sys.path.insert(0, str(staged.parent))
    try:
        yield importlib.import_module("styleheat")
    finally:
        sys.path.remove(str(staged.parent))
        for name in [m for m in sys.modules if m == "styleheat" or m.startswith("styleheat.")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(addon, server):
    from styleheat.client import Client

    c = Client(server.address, timeout=10.0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def identity(client, fixtures_dir):
    return client.prepare((fixtures_dir / "portrait_100.jpg").read_bytes(), align=False)["identity"]


def test_hello_reports_model_device_sizes(client):
    info = client.hello()
    assert info["type"] == "hello" and info["protocol"] == 1
    assert info["device"] == "cpu" and info["real_weights"] is False
    assert info["sizes"] and info["native_size"] in info["sizes"]


def test_render_stream_with_credit_and_cancel(client, identity):
    from styleheat import protocol as P

    rows = np.zeros((12, 73), np.float32)
    stream = client.render(identity, rows, 100, [101, 103, 105], size=64, encoding="raw", credit=1)
    frames = list(stream)
    assert [f.frame for f in frames] == [101, 103, 105]
    assert [f.index for f in frames] == [0, 1, 2]
    assert all(f.rgb().shape == (64, 64, 3) and f.rgb().dtype == np.uint8 for f in frames)
    assert stream.done["sent"] == 3 and stream.done["cancelled"] is False

    # credit flow: with credit 2 and nothing consumed, the server sends at most 2 frames
    stream = client.render(identity, rows, 0, list(range(8)), size=64, encoding="png", credit=2)
    def queued_frames():
        return [m[1].get("type") for m in list(stream._q.queue)].count("frame")
    end = time.monotonic() + 120
    while queued_frames() < 2 and time.monotonic() < end:
        time.sleep(0.2)
    time.sleep(3.0)                                    # time for more frames, if credit were ignored
    assert queued_frames() == 2                        # exactly the credit, no more
    first = stream.next(timeout=30)
    assert first.frame == 0
    png = cv2.imdecode(np.frombuffer(first.data, np.uint8), cv2.IMREAD_COLOR)
    assert png.shape == (64, 64, 3)
    stream.cancel(wait=30)
    assert stream.finished
    assert stream.received < 8
    # the connection is still usable after a cancel
    assert [f.frame for f in client.render(identity, rows, 0, [4], size=64)] == [4]
    assert P.PROTOCOL_VERSION == 1


def test_server_errors_are_clear(client, identity):
    from styleheat.client import ServerError

    with pytest.raises(ServerError) as e:
        list(client.render("not-prepared", np.zeros((3, 73), np.float32), 0, [0]))
    assert e.value.code == "unknown_identity" and "prepare" in e.value.message
    with pytest.raises(ServerError) as e:
        client.prepare(b"definitely not an image", align=False)
    assert e.value.code == "bad_image"
    with pytest.raises(ServerError) as e:
        list(client.render(identity, np.zeros((3, 73), np.float32), 0, [0], size=77))
    assert e.value.code == "bad_field" and "77" in e.value.message


def test_server_down_is_reported_within_the_timeout(addon):
    from styleheat.client import Client, ServerUnavailable

    with Client("tcp://127.0.0.1:9", timeout=0.5) as c:
        t = time.monotonic()
        with pytest.raises(ServerUnavailable, match="No StyleHEAT server answered at tcp://127.0.0.1:9"):
            c.hello()
        assert time.monotonic() - t < 3.0
    from styleheat.client import ClientError
    with pytest.raises(ClientError, match="not a ZeroMQ endpoint"):
        Client("localhost:5555")


def test_png_writer_round_trips(addon, tmp_path):
    from styleheat import frames as F

    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    F.write_png_atomic(str(path), rgb)
    back = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, rgb)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_windows_clip_range_and_hashes(addon):
    from styleheat import frames as F

    assert F.window_indices(0, 5).tolist() == [0] * 14 + [1, 2, 3, 4] + [4] * 9
    assert F.clip_range(10, 20, None) == (10, 20)
    assert F.clip_range(10, 20, (0.0, 100.0)) == (0, 33)      # widened by 13 where keys exist
    assert F.clip_range(10, 20, (8.0, 25.0)) == (8, 25)       # ... but not past the keys
    rows = np.zeros((40, 73), np.float32)
    h1 = F.frame_hashes("id", "m", 64, rows, range(40))
    rows[30, 5] = 1.0
    h2 = F.frame_hashes("id", "m", 64, rows, range(40))
    assert sorted(i for i in range(40) if h1[i] != h2[i]) == list(range(17, 40))
    assert F.frame_hashes("id", "m", 128, rows, [0])[0] != h2[0]          # size counts
    assert F.frame_hashes("other", "m", 64, rows, [0])[0] != h2[0]      # identity counts
    audio = np.zeros(40 * 640, np.float32)
    a1 = F.frame_hashes("id", "m", 64, rows, range(40), audio=audio, samples_per_frame=640)
    audio[39 * 640 + 5] = 0.5
    a2 = F.frame_hashes("id", "m", 64, rows, range(40), audio=audio, samples_per_frame=640)
    assert sorted(i for i in range(40) if a1[i] != a2[i]) == list(range(26, 40))


def test_curve_keys_for_remote_servers(addon, tmp_path):
    """A server with CURVE keys answers a client holding the keys 'styleheat-server --make-keys'
    made, and nobody else."""
    import subprocess
    from server_launch import server_command
    from styleheat.client import Client, ClientError, ServerUnavailable

    keys = tmp_path / "keys"
    r = subprocess.run(server_command("--make-keys", str(keys)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    srv = Server(tmp_path, extra=("--curve-dir", str(keys)))
    try:
        with Client(srv.address, timeout=10.0, curve_dir=str(keys)) as c:
            assert c.hello()["type"] == "hello"
        with Client(srv.address, timeout=1.0) as c:
            with pytest.raises(ServerUnavailable):
                c.hello()
        with pytest.raises(ClientError, match="client.key_secret"):
            Client(srv.address, curve_dir=str(tmp_path))
    finally:
        srv.stop()


def test_rig_channels_invert_the_row_mapping(addon):
    """Baked keys reproduce the extracted rows: rig channels from rows, then rows from those rig
    values (the documented mapping, presets at 0), equal the input except the crop (the portrait's)."""
    from styleheat import frames as F

    rng = np.random.default_rng(5)
    base = rng.normal(0, 0.3, 73)
    rows = rng.normal(0, 0.5, (6, 73)).astype(np.float32)
    ch = F.rig_channels_from_rows(rows, base)
    assert sorted({p for p, _ in ch}) == ["location", "rotation_euler", "styleheat.expression"]
    assert len(ch) == 70 and all(v.shape == (6,) for v in ch.values())
    samples = [F.RigSample(rotation=[ch[("rotation_euler", k)][i] for k in range(3)],
                           location=[ch[("location", k)][i] for k in range(3)],
                           expression=[ch[("styleheat.expression", k)][i] for k in range(64)]) for i in range(6)]
    back = F.rows_from_samples(samples, base)
    np.testing.assert_allclose(back[:, :70], rows[:, :70], atol=1e-5)
    np.testing.assert_allclose(back[:, 70:], np.broadcast_to(base[70:], (6, 3)), atol=1e-6)
    # a yaw (Deep3D angle y, row 65) is a turn about Blender Z; depth (row 69) moves along -Y
    d = np.zeros((1, 73)); d[0, 65] = 0.2; d[0, 69] = 0.1
    ch = F.rig_channels_from_rows(d, np.zeros(73))
    assert ch[("rotation_euler", 2)][0] == pytest.approx(0.2) and ch[("rotation_euler", 1)][0] == 0
    assert ch[("location", 1)][0] == pytest.approx(-0.1)
    off = F.expression_offsets(np.ones((2, 64)), np.full(64, 0.25), scale=2.0)
    np.testing.assert_allclose(off, 1.5)


def test_extract_and_audio2exp_calls(client, tmp_path, fixtures_dir):
    """extract with the video's bytes (what a remote server gets): progress n/N then (N, 73) rows at
    the requested rate; cancel stops it; bytes that are not a video container are a bad_field error, an
    undecodable video a bad_video error.
    audio2exp returns (n_frames, 64); the socket never blocks a send for longer than the timeout."""
    import zmq
    from styleheat.client import ServerError

    base = cv2.resize(cv2.imread(str(fixtures_dir / "portrait_100.jpg")), (256, 256))
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (256, 256))
    for dx in (0, 4, 8, 12):
        writer.write(cv2.warpAffine(base, np.float32([[1, 0, dx], [0, 1, 0]]), (256, 256),
                                    borderMode=cv2.BORDER_REFLECT101))
    writer.release()
    job = client.extract(video=path.read_bytes(), fps=25.0)
    seen = []

    def record():
        if job.progress and (not seen or seen[-1] != job.progress):
            seen.append(job.progress)

    while job.poll(0.1):
        record()
    record()  # the last poll may handle the final progress and the result together
    assert job.result is not None and job.result["rows"].shape == (4, 73)
    assert job.result["fps"] == pytest.approx(25.0)
    assert seen and seen[-1] == ("3dmm", 4, 4) and job.status() == "Extracted 4 frames"
    assert all(stage in ("landmarks", "3dmm") and 0 < done <= total for stage, done, total in seen)
    # resampled to 50 fps: twice the rows minus one, same duration
    assert client.extract(video=path.read_bytes(), fps=50.0).wait(60)["rows"].shape == (7, 73)
    job = client.extract(video=path.read_bytes())
    job.cancel()
    assert job.finished and job.cancelled and job.result is None
    with pytest.raises(ServerError) as e:   # not a video container: refused from its first bytes
        client.extract(video=b"not a video at all").wait(60)
    assert e.value.code == "bad_field" and "not a video file" in e.value.message
    with pytest.raises(ServerError) as e:   # an AVI header the decoder cannot open
        client.extract(video=b"RIFF\x00\x01\x00\x00AVI LIST" + b"\x05" * 500).wait(60)
    assert e.value.code == "bad_video"
    samples = np.sin(np.arange(16000) / 16000 * 2 * np.pi * 200).astype(np.float32)
    rows = client.audio2exp({"samples": samples, "sample_rate": 16000, "fps": 25.0, "frame_offset": 0.0},
                            25.0, 10, np.zeros(64, np.float32))
    assert rows.shape == (10, 64) and rows.dtype == np.float32 and np.isfinite(rows).all()
    assert client._sock.getsockopt(zmq.SNDTIMEO) == int(client.timeout * 1000)
    assert client._sock.getsockopt(zmq.LINGER) == 0


def _long_video(path: Path, fixtures_dir: Path, n: int) -> Path:
    base = cv2.resize(cv2.imread(str(fixtures_dir / "portrait_100.jpg")), (256, 256))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (256, 256))
    for i in range(n):
        writer.write(cv2.warpAffine(base, np.float32([[1, 0, i % 9], [0, 1, 0]]), (256, 256),
                                    borderMode=cv2.BORDER_REFLECT101))
    writer.release()
    return path


def test_a_busy_server_is_not_dead_a_stopped_one_is(addon, server, identity, tmp_path, fixtures_dir):
    """Liveness is judged by heartbeats, not by frames.

    Busy: another client's ``extract`` of a 60-frame video occupies the server's single worker thread for
    several seconds, so our render gets no frame for longer than our (shortened, 2 s) ``dead_after``; the
    server's router still answers heartbeats, so the render must simply arrive late, with no error. What
    this proves: a frame that takes longer than the dead limit while the server process runs is not a
    dead server. (A long frame of the real model is the same situation on the worker; the tiny model
    renders too fast to show it directly.)
    Stopped: the same server SIGSTOPped mid-render answers nothing at all; the stream raises ServerDead
    within dead_after (+1 s of polling). SIGCONT afterwards: the module's server serves the next tests."""
    import os
    import signal
    from styleheat.client import DEAD_AFTER, Client, ServerDead

    assert DEAD_AFTER == 10.0                   # the documented production value; this test shortens it
    video = _long_video(tmp_path / "long.avi", fixtures_dir, 60)
    rows = np.zeros((4, 73), np.float32)
    with Client(server.address, timeout=10.0) as other, Client(server.address, timeout=10.0, dead_after=2.0) as c:
        job = other.extract(path=str(video))
        end = time.monotonic() + 60
        while job.progress is None and time.monotonic() < end:    # the worker is now busy with it
            job.poll(0.1)
        assert job.progress is not None
        t0 = time.monotonic()
        stream = c.render(identity, rows, 0, [0, 1], size=64, encoding="raw")
        first = stream.next(timeout=120)
        waited = time.monotonic() - t0
        print(f"first frame after {waited:.1f} s behind the extract (dead_after {c.dead_after:g} s): no error")
        assert first is not None and first.frame == 0
        assert waited > 2 * c.dead_after, f"the server was not busy long enough ({waited:.1f} s) to prove anything"
        assert [f.frame for f in stream] == [1]
        assert job.wait(120)["rows"].shape == (60, 73)

        stream = c.render(identity, np.zeros((40, 73), np.float32), 0, list(range(40)), size=64, credit=1)
        assert stream.next(timeout=60).frame == 0
        os.kill(server.proc.pid, signal.SIGSTOP)
        t_stop = time.monotonic()
        try:
            with pytest.raises(ServerDead, match=r"stopped answering \(no reply for 2 s\)") as e:
                while time.monotonic() - t_stop < 30:
                    stream.next(timeout=0.5)
            noticed = time.monotonic() - t_stop
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        print(f"SIGSTOPped server declared dead after {noticed:.1f} s")
        assert e.value.address == server.address and stream.finished
        assert c.dead_after - 1.1 <= noticed < c.dead_after + 3.0   # the last message may predate the stop by <1 s
    with Client(server.address, timeout=10.0) as c:             # alive again after SIGCONT
        assert c.hello()["type"] == "hello"


def test_frames_the_render_did_not_ask_for_are_refused(addon, tmp_path):
    """A hostile (or broken) server on a real ROUTER socket answers a render with frame 999, never
    requested: the stream raises a clear error before handing the frame to anything that writes files."""
    import threading

    import zmq
    from styleheat import protocol as P
    from styleheat.client import Client, ClientError

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    got: list = []

    def serve():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not got:
            if not router.poll(100):
                continue
            ident, header, *parts = router.recv_multipart()
            h = P.unpack_header(header)
            if h["type"] != P.RENDER:
                continue
            got.append(h)
            rid = h["id"]
            router.send_multipart([ident, P.pack_header(P.reply(P.ACCEPTED, rid, total=1, size=2, encoding="raw",
                                                                credit=4, quality="full"))])
            bogus = P.frame_reply(rid, frame=999, index=0, total=1, width=2, height=2, encoding="raw")
            router.send_multipart([ident, P.pack_header(bogus), bytes(12)])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    c = Client(f"tcp://127.0.0.1:{port}", timeout=5.0)
    try:
        stream = c.render("someone", np.zeros((1, 73), np.float32), 5, [5], encoding="raw")
        with pytest.raises(ClientError, match="did not ask"):
            stream.next(timeout=10)
        assert got and got[0]["frames"] == [5]
    finally:
        c.close()
        t.join(25)
        router.close()
        ctx.term()
    assert not t.is_alive()
