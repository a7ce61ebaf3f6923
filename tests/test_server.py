"""styleheat-server end to end: a real server process on 127.0.0.1, real DEALER clients.

One server (``--tiny-random``) serves the whole module; shutdown, CURVE and refusal tests start
their own processes.
"""
from __future__ import annotations

import subprocess
import threading
import time

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from server import protocol as P
from server_helpers import (Client, ServerProcess, cli_command, collect_render, png_bytes, portrait, render_header,
                            rows, serve_tiny, server_command)
from server_helpers import client, ctx  # noqa: F401  (fixtures)

PART_LIMIT = 4_000_000      # --max-part-bytes of the module server (MAXMSGSIZE = 4/3 of it)
STALL = 8.0                 # --stall-timeout of the module server


# --------------------------------------------------------------------------------------------
# fixtures (ctx and client: server_helpers)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    yield from serve_tiny("--max-part-bytes", str(PART_LIMIT), "--stall-timeout", str(STALL))


@pytest.fixture(scope="module")
def hello(server, ctx):
    c = Client(server.endpoint, ctx)
    h, _ = c.call(P.request(P.HELLO, "h0"))
    c.close()
    return h


@pytest.fixture(scope="module")
def identity(server, ctx):
    c = Client(server.endpoint, ctx)
    h, parts = c.call(P.request(P.PREPARE, "p0", align=False), [png_bytes(portrait())])
    c.close()
    assert h["type"] == P.PREPARED, h
    return h["identity"]


def assert_server_ok(client: Client):
    h, _ = client.call(P.request(P.HELLO, client.new_id("ok")))
    assert h["type"] == P.HELLO, h


# --------------------------------------------------------------------------------------------
# basic requests
# --------------------------------------------------------------------------------------------
def test_hello_reports_what_is_served(hello):
    assert hello["type"] == P.HELLO and hello["id"] == "h0"
    assert hello["protocol"] == P.PROTOCOL_VERSION == 1
    assert hello["real_weights"] is False and hello["tiny_random"] is True
    assert hello["device"] == "cpu"
    assert isinstance(hello["model"], str) and hello["model"]
    assert hello["sizes"] and hello["native_size"] in hello["sizes"]
    assert hello["encodings"] == ["raw", "png"]
    assert hello["limits"]["max_part_bytes"] == PART_LIMIT
    assert hello["limits"]["max_credit"] == P.MAX_CREDIT
    for spec in hello["attributes"].values():
        assert spec["min"] <= spec["default"] <= spec["max"]


def test_hello_lists_the_qualities_with_what_they_compute(hello):
    from models.styleheat import QUALITIES
    assert set(hello["qualities"]) == set(P.QUALITIES) == set(QUALITIES)
    assert "CalibrationNet" in hello["qualities"]["preview"]
    assert hello["precision"] == "float32"                 # --tiny-random without --precision


def test_preview_render_has_the_size_asked_and_differs_from_full(client, identity, hello):
    size = hello["sizes"][0]
    images = {}
    for quality in ("full", "preview"):
        rid = f"quality-{quality}"
        parts: list = []
        client.send(render_header(rid, identity, n_rows=6, frames=[101, 102], parts=parts, size=size,
                                  credit=8, quality=quality), parts)
        accepted, got, _, end = collect_render(client, rid)
        assert end["type"] == P.DONE and end["sent"] == 2, end
        assert accepted["quality"] == quality and accepted["size"] == size
        images[quality] = [P.decode_raw_frame(h, p[0]) for h, p in got]
        assert all(img.shape == (size, size, 3) for img in images[quality])
    assert any(not np.array_equal(a, b) for a, b in zip(images["full"], images["preview"]))
    # without the field a render is full quality (older clients keep working)
    parts = []
    client.send(render_header("quality-default", identity, n_rows=6, frames=[101, 102], parts=parts, size=size,
                              credit=8), parts)
    accepted, got, _, end = collect_render(client, "quality-default")
    assert accepted["quality"] == "full"
    assert all(np.array_equal(P.decode_raw_frame(h, p[0]), f) for (h, p), f in zip(got, images["full"]))


def test_heartbeat(client):
    h, _ = client.call(P.request(P.HEARTBEAT, "hb1"))
    assert h["type"] == P.HEARTBEAT and h["id"] == "hb1"


def test_prepare_returns_identity_and_portrait(client, hello):
    img = portrait(1, 160)
    h, parts = client.call(P.request(P.PREPARE, "p1", align=False), [png_bytes(img)])
    assert h["type"] == P.PREPARED, h
    assert h["aligned"] is False and "as given" in h["align_note"]
    assert isinstance(h["identity"], str) and len(h["identity"]) >= 8
    assert len(parts) == 1 and h["encoding"] == "png"
    back = cv2.imdecode(np.frombuffer(parts[0], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    assert (h["width"], h["height"]) == (160, 160)
    np.testing.assert_array_equal(back, img)  # not aligned: the portrait used is the one sent
    assert h["coefficients"] is None or len(h["coefficients"]) == 73
    # same image, same identity (content hash); JPEG is accepted too
    h2, _ = client.call(P.request(P.PREPARE, "p2", align=False), [png_bytes(img)])
    assert h2["identity"] == h["identity"]
    ok, jpg = cv2.imencode(".jpg", img[..., ::-1].copy())
    h3, _ = client.call(P.request(P.PREPARE, "p3", align=False), [jpg.tobytes()])
    assert h3["type"] == P.PREPARED and h3["identity"] != h["identity"]


def test_prepare_with_align_on_a_real_portrait(client, hello, fixtures_dir):
    data = (fixtures_dir / "portrait_40.jpg").read_bytes()
    h, parts = client.call(P.request(P.PREPARE, "pa"), [data], timeout=180)
    assert h["type"] == P.PREPARED, h
    if hello["align"]:
        assert h["aligned"] is True and h["width"] == h["height"]
    else:  # no aligner on this server: the image is taken as already aligned, and the reply says so
        assert h["aligned"] is False and "no face aligner" in h["align_note"]
        assert (h["width"], h["height"]) == (1024, 1024)


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_render_streams_frames_in_order(client, identity, hello, encoding):
    size = hello["sizes"][0]
    frames = [100, 103, 106, 107]
    rid = f"render-{encoding}"
    parts: list = []
    client.send(render_header(rid, identity, n_rows=8, frames=frames, parts=parts, size=size,
                              encoding=encoding, credit=P.MAX_CREDIT), parts)
    accepted, got, progress, end = collect_render(client, rid)
    assert accepted == {**accepted, "total": 4, "size": size, "encoding": encoding}
    assert end["type"] == P.DONE and end["cancelled"] is False and end["sent"] == 4, end
    assert [h["frame"] for h, _ in got] == frames
    assert [h["index"] for h, _ in got] == list(range(4))
    for h, p in got:
        assert len(p) == 1 and h["encoding"] == encoding
        assert (h["width"], h["height"], h["channels"]) == (size, size, 3)
        if encoding == "raw":
            assert len(p[0]) == size * size * 3
            img = P.decode_raw_frame(h, p[0])
        else:
            assert p[0][:8] == b"\x89PNG\r\n\x1a\n"
            img = cv2.imdecode(np.frombuffer(p[0], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        assert img.shape == (size, size, 3)
        assert img.std() > 0  # a rendered image, not a blank buffer
    assert progress and all(p["total"] == 4 for p in progress)


def test_raw_and_png_carry_the_same_pixels(client, identity, hello):
    size = hello["sizes"][0]
    images = {}
    for enc in ("raw", "png"):
        rid = f"same-{enc}"
        parts: list = []
        client.send(render_header(rid, identity, n_rows=4, frames=[2], first=0, parts=parts, size=size,
                                  encoding=enc, credit=8), parts)
        _, got, _, end = collect_render(client, rid)
        assert end["type"] == P.DONE
        h, p = got[0]
        images[enc] = (P.decode_raw_frame(h, p[0]) if enc == "raw" else
                       cv2.imdecode(np.frombuffer(p[0], np.uint8), cv2.IMREAD_COLOR)[..., ::-1])
    np.testing.assert_array_equal(images["raw"], images["png"])


def test_rows_can_travel_as_a_part_or_as_lists(client, identity, hello):
    size = hello["sizes"][0]
    r = rows(3, seed=5)
    parts: list = []
    a = P.request(P.RENDER, "as-part", identity=identity, rows=P.array_field(r, parts), frames=[1], size=size)
    b = P.request(P.RENDER, "as-list", identity=identity, rows=r.tolist(), frames=[1], size=size)
    out = {}
    for h, p in ((a, parts), (b, [])):
        client.send(h, p)
        _, got, _, end = collect_render(client, h["id"])
        assert end["type"] == P.DONE, end
        out[h["id"]] = P.decode_raw_frame(got[0][0], got[0][1][0])
    np.testing.assert_array_equal(out["as-part"], out["as-list"])


def test_attributes_and_audio(client, identity, hello):
    size = hello["sizes"][0]
    parts: list = []
    h = render_header("edit", identity, n_rows=4, frames=[0, 3], first=0, parts=parts, size=size)
    if hello["attributes"]:
        name, spec = sorted(hello["attributes"].items())[0]
        # one strength for the whole clip: the engine re-inverts once per distinct (quantized) strength
        h["attributes"] = {name: P.array_field(np.full(4, 0.5 * spec["max"]))}
    samples = (0.3 * np.sin(np.arange(16000) * 2 * np.pi * 220 / 16000)).astype(np.float32)
    h["audio"] = {"samples": P.array_field(samples, parts), "sample_rate": 16000, "fps": 25.0, "frame_offset": 0.0}
    client.send(h, parts)
    _, got, _, end = collect_render(client, "edit")
    if hello["audio"]:
        assert end["type"] == P.DONE and [m[0]["frame"] for m in got] == [0, 3], end
    else:
        assert end["type"] == P.ERROR and end["code"] == P.E_UNSUPPORTED, end
        assert "audio" in end["message"]


def test_forget_then_render_is_unknown_identity(client, hello):
    h, _ = client.call(P.request(P.PREPARE, "pf", align=False), [png_bytes(portrait(9))])
    ident = h["identity"]
    h, _ = client.call(P.request(P.FORGET, "f1", identity=ident))
    assert h["type"] == P.FORGOTTEN and h["identity"] == ident
    parts: list = []
    h, _ = client.call(render_header("after-forget", ident, parts=parts), parts)
    assert h["type"] == P.ERROR and h["code"] == P.E_UNKNOWN_IDENTITY and h["id"] == "after-forget"


# --------------------------------------------------------------------------------------------
# flow control, cancel, concurrency
# --------------------------------------------------------------------------------------------
def test_credit_flow_control(client, identity, hello):
    size = hello["sizes"][0]
    parts: list = []
    client.send(render_header("cf", identity, n_rows=4, first=0, parts=parts, size=size, credit=1), parts)
    h, _ = client.recv()
    assert h["type"] == P.ACCEPTED and h["credit"] == 1
    first = client.quiet(3.0)
    assert [m[0]["frame"] for m in first] == [0], "one credit must give exactly one frame"
    client.send(P.request(P.CREDIT, "cf", frames=2))
    more = client.quiet(3.0)
    assert [m[0]["frame"] for m in more] == [1, 2], "two more credits, two more frames"
    client.send(P.request(P.CREDIT, "cf", frames=10))
    _, rest, _, end = collect_render(client, "cf")
    assert [m[0]["frame"] for m in rest] == [3]
    assert end["type"] == P.DONE and end["sent"] == 4


def test_zero_credit_then_stall_timeout(client, identity, hello):
    parts: list = []
    client.send(render_header("stall", identity, n_rows=3, first=0, parts=parts, size=hello["sizes"][0],
                              credit=0), parts)
    _, got, _, end = collect_render(client, "stall", timeout=STALL + 30)
    assert got == [] and end["type"] == P.ERROR and end["code"] == P.E_STALLED, end
    assert_server_ok(client)


def test_cancel_stops_within_a_batch(client, identity, hello):
    batch = hello["limits"]["batch_size"]
    parts: list = []
    client.send(render_header("cx", identity, n_rows=400, first=0, parts=parts, size=hello["sizes"][0],
                              credit=2), parts)
    seen = 0
    while seen < 2:
        h, _ = client.recv()
        seen += h["type"] == P.FRAME
    client.send(P.request(P.CREDIT, "cx", frames=P.MAX_CREDIT))
    client.send(P.request(P.CANCEL, "cx"))
    _, after, _, end = collect_render(client, "cx")
    assert end["type"] == P.DONE and end["cancelled"] is True, end
    assert end["total"] == 400 and end["sent"] < 400
    assert len(after) <= P.MAX_CREDIT and end["sent"] == 2 + len(after)
    assert len(after) <= 2 * batch + 1, f"cancel took {len(after)} frames to land (batch {batch})"
    h, _ = client.call(P.request(P.CANCEL, "cx"))
    assert h["type"] == P.ERROR and h["code"] == P.E_UNKNOWN_REQUEST
    assert_server_ok(client)


def test_duplicate_running_id_is_refused(client, identity, hello):
    parts: list = []
    client.send(render_header("dup", identity, n_rows=3, first=0, parts=parts, size=hello["sizes"][0],
                              credit=0), parts)
    h, _ = client.recv()
    assert h["type"] == P.ACCEPTED
    parts2: list = []
    h, _ = client.call(render_header("dup", identity, n_rows=3, first=0, parts=parts2), parts2)
    assert h["type"] == P.ERROR and h["code"] == P.E_DUPLICATE and h["id"] == "dup"
    client.send(P.request(P.CANCEL, "dup"))
    _, _, _, end = collect_render(client, "dup")
    assert end["type"] == P.DONE and end["cancelled"] is True


def test_job_queue_is_bounded_per_client(client, identity, hello):
    limit = hello["limits"]["max_jobs_per_client"]
    ids = [f"q{i}" for i in range(limit)]
    for rid in ids:
        parts: list = []
        h, _ = client.call(render_header(rid, identity, n_rows=2, first=0, parts=parts, credit=0), parts)
        assert h["type"] == P.ACCEPTED, h
    parts = []
    h, _ = client.call(render_header("one-too-many", identity, n_rows=2, first=0, parts=parts, credit=0), parts)
    assert h["type"] == P.ERROR and h["code"] == P.E_BUSY and str(limit) in h["message"], h
    for rid in ids:
        client.send(P.request(P.CANCEL, rid))
    ended = set()
    while len(ended) < limit:
        h, _ = client.recv()
        if h["type"] == P.DONE:
            assert h["cancelled"] is True
            ended.add(h["id"])
    assert ended == set(ids)
    assert_server_ok(client)


def test_two_clients_at_once_and_a_stalled_one_blocks_nobody(server, ctx, identity, hello):
    size = hello["sizes"][0]
    a, b, c = (Client(server.endpoint, ctx) for _ in range(3))
    try:
        # c holds a render with 1 credit and never grants more
        pc: list = []
        c.send(render_header("slow", identity, n_rows=20, first=0, parts=pc, size=size, credit=1), pc)
        pa: list = []
        pb: list = []
        a.send(render_header("x", identity, n_rows=3, first=0, parts=pa, size=size, credit=1), pa)
        b.send(render_header("x", identity, n_rows=3, first=50, parts=pb, size=size, credit=1), pb)
        results = {}

        def run(name, cl):
            results[name] = collect_render(cl, "x", grant_each=True)

        ta, tb = (threading.Thread(target=run, args=(n, cl)) for n, cl in (("a", a), ("b", b)))
        ta.start(), tb.start()
        ta.join(300), tb.join(300)
        assert [m[0]["frame"] for m in results["a"][1]] == list(range(0, 3))
        assert [m[0]["frame"] for m in results["b"][1]] == list(range(50, 53))
        assert results["a"][3]["type"] == results["b"][3]["type"] == P.DONE
        # the stalled client got exactly its one frame; on a loaded machine a and b can take longer than
        # STALL, so the slow render may already have ended (stalled) among the messages c has queued
        got_c = c.quiet(0.5, types=(P.FRAME, P.DONE, P.ERROR))
        assert [m[0]["frame"] for m in got_c if m[0]["type"] == P.FRAME] == [0]
        ended = [m[0] for m in got_c if m[0]["type"] != P.FRAME]
        if ended:
            end = ended[0]
        else:
            c.send(P.request(P.CANCEL, "slow"))
            end = collect_render(c, "slow")[3]  # cancelled, or dropped for lack of credit meanwhile
        assert (end["type"], end.get("cancelled"), end.get("code")) in ((P.DONE, True, None),
                                                                        (P.ERROR, None, P.E_STALLED)), end
    finally:
        for cl in (a, b, c):
            cl.close()


def test_client_vanishing_mid_render_does_not_hurt(server, ctx, identity, hello):
    size = hello["sizes"][0]
    gone = Client(server.endpoint, ctx)
    parts: list = []
    gone.send(render_header("bye", identity, n_rows=300, first=0, parts=parts, size=size,
                            credit=P.MAX_CREDIT), parts)
    n = 0
    while n < 2:
        h, _ = gone.recv()
        n += h["type"] == P.FRAME
    gone.close()
    other = Client(server.endpoint, ctx)
    try:
        t0 = time.monotonic()
        parts = []
        other.send(render_header("after", identity, n_rows=2, first=0, parts=parts, size=size), parts)
        _, got, _, end = collect_render(other, "after")
        assert end["type"] == P.DONE and len(got) == 2
        # the vanished client's render (still holding ~60 frames of credit) was dropped
        assert time.monotonic() - t0 < 45
        deadline = time.monotonic() + 5
        while True:
            h, _ = other.call(P.request(P.HELLO, other.new_id()))
            if h["jobs"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert h["jobs"] == 0, "the vanished client's job is still queued"
        assert server.proc.poll() is None
    finally:
        other.close()


# --------------------------------------------------------------------------------------------
# bad input: every class gets an error reply with a code, and the next request still works
# --------------------------------------------------------------------------------------------
def _bad_render(ident, **changes):
    parts: list = []
    h = render_header("bad", ident, n_rows=4, first=10, parts=parts)
    for k, v in changes.items():
        if v is KeyError:
            h.pop(k)
        else:
            h[k] = v
    return h, parts


def nan_rows():
    r = rows(4)
    r[2, 5] = np.nan
    return P.array_field(r)


def inf_rows():
    r = rows(4)
    r[0, 0] = np.inf
    return r.tolist()


BAD_RENDER = {
    "rows wrong width": (dict(rows=P.array_field(np.zeros((4, 72)))), P.E_BAD_FIELD, "shape"),
    "rows wrong rank": (dict(rows=P.array_field(np.zeros(73 * 4))), P.E_BAD_FIELD, "shape"),
    "rows bytes do not match shape": (dict(rows={"dtype": "float32", "shape": [4, 73], "data": b"\0" * 10}),
                                      P.E_BAD_FIELD, "bytes"),
    "rows NaN": (dict(rows="nan"), P.E_BAD_FIELD, "NaN"),
    "rows inf": (dict(rows="inf"), P.E_BAD_FIELD, "NaN or infinite"),
    "rows string": (dict(rows="text"), P.E_BAD_FIELD, "rows"),
    "rows ragged": (dict(rows=[[0.0] * 73, [0.0] * 72]), P.E_BAD_FIELD, "rows"),
    "rows part missing": (dict(rows={"dtype": "float32", "shape": [4, 73], "part": 3}), P.E_BAD_FIELD, "part"),
    "frames out of range": (dict(frames=[10, 14]), P.E_BAD_FIELD, "frames"),
    "frames not increasing": (dict(frames=[11, 10]), P.E_BAD_FIELD, "increasing"),
    "frames not ints": (dict(frames=[10.5]), P.E_BAD_FIELD, "integer"),
    "frames bool": (dict(frames=[True]), P.E_BAD_FIELD, "integer"),
    "frames missing": (dict(frames=KeyError), P.E_BAD_FIELD, "frames"),
    "size unsupported": (dict(size=4096), P.E_BAD_FIELD, "size"),
    "size negative": (dict(size=-5), P.E_BAD_FIELD, "size"),
    "size wrong type": (dict(size="big"), P.E_BAD_FIELD, "size"),
    "encoding unknown": (dict(encoding="jpeg"), P.E_BAD_FIELD, "encoding"),
    "quality unknown": (dict(quality="draft"), P.E_BAD_FIELD, "quality"),
    "quality wrong type": (dict(quality=3), P.E_BAD_FIELD, "quality"),
    "credit out of range": (dict(credit=1000), P.E_BAD_FIELD, "credit"),
    "unknown field": (dict(colour="red"), P.E_BAD_FIELD, "unknown field"),
    "unknown identity": (dict(identity="0123456789abcdef0123"), P.E_UNKNOWN_IDENTITY, "prepare"),
    "identity wrong type": (dict(identity=12), P.E_BAD_FIELD, "identity"),
    "unknown attribute": (dict(attributes={"hair_colour": [0.0] * 4}), P.E_BAD_FIELD, "attribute"),
    "attribute wrong length": (dict(attributes={"x": [0.0] * 3}), P.E_BAD_FIELD, "shape"),
    "audio NaN": (dict(audio={"samples": [float("nan")] * 100, "sample_rate": 16000, "fps": 25.0}),
                  P.E_BAD_FIELD, "audio"),
    "audio bad rate": (dict(audio={"samples": [0.0] * 100, "sample_rate": 12, "fps": 25.0}), P.E_BAD_FIELD,
                       "sample_rate"),
    "id too long": (dict(id="x" * 200), P.E_BAD_FIELD, "id"),
}


@pytest.mark.parametrize("case", sorted(BAD_RENDER))
def test_bad_render_fields_get_error_replies(client, identity, case):
    changes, code, words = BAD_RENDER[case]
    changes = dict(changes)
    if changes.get("rows") == "nan":
        changes["rows"] = nan_rows()
    elif changes.get("rows") == "inf":
        changes["rows"] = inf_rows()
    h, parts = _bad_render(identity, **changes)
    reply, _ = client.call(h, parts)
    assert reply["type"] == P.ERROR, reply
    assert reply["code"] == code, reply
    assert words.lower() in reply["message"].lower(), reply
    assert reply["message"].strip()
    if case != "id too long":
        assert reply["id"] == "bad"
    assert_server_ok(client)


def test_out_of_range_attribute_strength(client, identity, hello):
    if not hello["attributes"]:
        pytest.skip("this engine has no attribute edits")
    name, spec = sorted(hello["attributes"].items())[0]
    h, parts = _bad_render(identity, attributes={name: [spec["max"] + 1.0] * 4})
    reply, _ = client.call(h, parts)
    assert reply["type"] == P.ERROR and reply["code"] == P.E_BAD_FIELD and name in reply["message"]
    assert_server_ok(client)


BAD_MESSAGES = {
    "garbage bytes": ([b"\xc1\xff\x00garbage"], P.E_BAD_MESSAGE),
    "empty header": ([b""], P.E_BAD_MESSAGE),
    "msgpack list": ([msgpack.packb([1, 2, 3])], P.E_BAD_MESSAGE),
    "msgpack int keys": ([msgpack.packb({1: 2})], P.E_BAD_MESSAGE),
    "msgpack ext type": ([msgpack.packb({"v": msgpack.ExtType(5, b"xx")})], P.E_BAD_MESSAGE),
    "truncated msgpack": ([P.pack_header(P.request(P.HELLO, "t"))[:-2]], P.E_BAD_MESSAGE),
    "pickle": ([b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01."], P.E_BAD_MESSAGE),
    "no version": ([msgpack.packb({"type": "hello", "id": "a"})], P.E_VERSION),
    "wrong version": ([P.pack_header({"v": 99, "type": "hello", "id": "a"})], P.E_VERSION),
    "unknown type": ([P.pack_header(P.request("teleport", "a"))], P.E_UNKNOWN_TYPE),
    "type wrong type": ([P.pack_header({"v": 1, "type": 7})], P.E_UNKNOWN_TYPE),
    "too many parts": ([P.pack_header(P.request(P.HELLO, "a"))] + [b"x"] * (P.MAX_PARTS + 1), P.E_BAD_MESSAGE),
    "part over limit": ([P.pack_header(P.request(P.PREPARE, "a")), b"\0" * (PART_LIMIT + 10)], P.E_TOO_LARGE),
    "header over limit": ([P.pack_header(P.request(P.HELLO, "a", client="x" * (PART_LIMIT + 10)))], P.E_TOO_LARGE),
    "prepare no image": ([P.pack_header(P.request(P.PREPARE, "a"))], P.E_BAD_FIELD),
    "prepare not an image": ([P.pack_header(P.request(P.PREPARE, "a")), b"GIF89a not supported"], P.E_BAD_IMAGE),
    "prepare truncated png": ([P.pack_header(P.request(P.PREPARE, "a")), png_bytes(portrait())[:200]],
                              P.E_BAD_IMAGE),
    "prepare tiny image": ([P.pack_header(P.request(P.PREPARE, "a")), png_bytes(portrait(0, 16))], P.E_BAD_IMAGE),
    "prepare align wrong type": ([P.pack_header(P.request(P.PREPARE, "a", align="yes")), b"x"], P.E_BAD_FIELD),
    "credit wrong type": ([P.pack_header(P.request(P.CREDIT, "a", frames="many"))], P.E_BAD_FIELD),
    "credit zero": ([P.pack_header(P.request(P.CREDIT, "a", frames=0))], P.E_BAD_FIELD),
    "forget unknown": ([P.pack_header(P.request(P.FORGET, "a", identity="nope"))], P.E_UNKNOWN_IDENTITY),
    "cancel without id": ([P.pack_header(P.request(P.CANCEL))], P.E_BAD_FIELD),
}


@pytest.mark.parametrize("case", sorted(BAD_MESSAGES))
def test_bad_messages_get_error_replies(client, case):
    frames, code = BAD_MESSAGES[case]
    client.send_raw(frames)
    reply, _ = client.recv()
    assert reply["type"] == P.ERROR, reply
    assert reply["code"] == code, reply
    assert isinstance(reply["message"], str) and len(reply["message"]) > 10
    assert_server_ok(client)


def test_image_dimensions_are_checked_before_decoding(client):
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    bomb = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + b"\0" * 64)
    h, _ = client.call(P.request(P.PREPARE, "bomb", align=False), [bomb])
    assert h["type"] == P.ERROR and h["code"] == P.E_BAD_IMAGE and "60000x60000" in h["message"], h
    assert_server_ok(client)


def test_non_square_unaligned_portrait_is_refused(client):
    h, _ = client.call(P.request(P.PREPARE, "ns", align=False), [png_bytes(portrait(0, 128)[:, :100])])
    assert h["type"] == P.ERROR and h["code"] == P.E_BAD_IMAGE and "square" in h["message"]


def test_frame_over_maxmsgsize_drops_only_that_connection(server, ctx, client):
    rude = Client(server.endpoint, ctx)
    try:
        rude.send_raw([P.pack_header(P.request(P.PREPARE, "huge")), b"\0" * (PART_LIMIT * 2)])
        with pytest.raises(AssertionError, match="no reply"):
            rude.recv(timeout=3)
    finally:
        rude.close()
    assert_server_ok(client)
    assert server.proc.poll() is None


# --------------------------------------------------------------------------------------------
# CLI: ping, refusal, keys, CURVE, shutdown
# --------------------------------------------------------------------------------------------
def test_ping_cli(server):
    out = subprocess.run(cli_command("ping", "--server", server.endpoint), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "protocol:     1" in out.stdout
    assert "real weights: no" in out.stdout
    assert "device:       cpu" in out.stdout
    assert "tiny random" in out.stdout


def test_ping_cli_unreachable():
    out = subprocess.run(cli_command("ping", "--server", "tcp://127.0.0.1:9", "--timeout", "1"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "no reply from tcp://127.0.0.1:9" in out.stderr and "styleheat-server" in out.stderr


@pytest.mark.parametrize("server_key, client_secret, words", [
    ("garbage\n", "garbage\n", "No public key found"),
    ('public-key = "short"\n', 'public-key = "short"\nsecret-key = "short"\n', "Invalid argument"),
    (None, None, "holds no secret key"),  # client.key (public only) passed as client.key_secret
])
def test_ping_cli_bad_curve_keys_are_explained(tmp_path, server_key, client_secret, words):
    from server.service.curve_keys import make_keys

    made = make_keys(tmp_path / "keys")
    if server_key is None:
        made["client_secret"].write_bytes(made["client"].read_bytes())
    else:
        made["server"].write_text(server_key)
        made["client_secret"].write_text(client_secret)
    out = subprocess.run(cli_command("ping", "--server", "tcp://127.0.0.1:9", "--curve-dir", str(tmp_path / "keys"),
                          "--timeout", "1"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "cannot read CURVE keys" in out.stderr and words in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.1.10:5555"])
def test_non_loopback_bind_without_keys_is_refused(bind):
    out = subprocess.run(server_command("--tiny-random", "--bind", bind), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "refusing to bind" in out.stderr and "--curve-dir" in out.stderr and "--make-keys" in out.stderr


def test_missing_checkpoints_and_device_are_explained(tmp_path):
    out = subprocess.run(server_command("--checkpoints", str(tmp_path / "none"), "--bind", "tcp://127.0.0.1:*"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "no checkpoints at" in out.stderr and "styleheat download" in out.stderr
    assert "Traceback" not in out.stderr


def test_curve_dir_without_keys_is_refused(tmp_path):
    out = subprocess.run(server_command("--tiny-random", "--bind", "tcp://0.0.0.0:*", "--curve-dir", str(tmp_path)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "server.key_secret" in out.stderr


def test_curve_keys_and_encrypted_connection(tmp_path, ctx):
    import zmq.auth

    keys = tmp_path / "keys"
    out = subprocess.run(server_command("--make-keys", str(keys)), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret",
                 "authorized_clients/client.key"):
        assert (keys / name).is_file(), name
    assert (keys / "server.key_secret").stat().st_mode & 0o077 == 0
    again = subprocess.run(server_command("--make-keys", str(keys)), capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "already exists" in again.stderr

    srv = ServerProcess("--tiny-random", "--bind", "tcp://0.0.0.0:*", "--curve-dir", str(keys), "--log-level", "WARNING")
    try:
        endpoint = srv.wait_ready().replace("0.0.0.0", "127.0.0.1")
        server_pub, _ = zmq.auth.load_certificate(keys / "server.key")
        cpub, csec = zmq.auth.load_certificate(keys / "client.key_secret")
        good = Client(endpoint, ctx, curve=(server_pub, cpub, csec))
        h, _ = good.call(P.request(P.HELLO, "c1"))
        assert h["type"] == P.HELLO and h["protocol"] == 1
        good.close()
        # a key pair that is not in authorized_clients gets nothing; neither does a plain client
        spub, ssec = zmq.curve_keypair()
        stranger = Client(endpoint, ctx, curve=(server_pub, spub, ssec))
        plain = Client(endpoint, ctx)
        for cl in (stranger, plain):
            try:
                cl.send(P.request(P.HELLO, "c2"))
            except zmq.Again:
                pass  # no peer accepted the connection at all
            else:
                with pytest.raises(AssertionError, match="no reply"):
                    cl.recv(timeout=3)
            cl.close()
        ping = subprocess.run(cli_command("ping", "--server", endpoint, "--curve-dir", str(keys)),
                              capture_output=True, text=True, timeout=120)
        assert ping.returncode == 0 and "protocol:     1" in ping.stdout, ping.stderr
        from server.service.curve_keys import make_keys

        make_keys(tmp_path / "other")  # keys this server never authorized
        bad = subprocess.run(cli_command("ping", "--server", endpoint, "--curve-dir", str(tmp_path / "other"),
                              "--timeout", "3"), capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1 and "CURVE keys" in bad.stderr, (bad.stdout, bad.stderr)
    finally:
        srv.stop()


def test_shutdown_ends_running_work_and_exits_zero(ctx):
    srv = ServerProcess("--tiny-random", "--bind", "tcp://127.0.0.1:*", "--log-level", "WARNING")
    srv.wait_ready()
    worker_client = Client(srv.endpoint, ctx)
    boss = Client(srv.endpoint, ctx)
    try:
        h, _ = worker_client.call(P.request(P.PREPARE, "p", align=False), [png_bytes(portrait(3))])
        parts: list = []
        worker_client.send(render_header("long", h["identity"], n_rows=50, first=0, parts=parts, credit=0), parts)
        assert worker_client.recv()[0]["type"] == P.ACCEPTED
        h, _ = boss.call(P.request(P.SHUTDOWN, "s"))
        assert h["type"] == P.BYE and h["id"] == "s"
        _, _, _, end = collect_render(worker_client, "long")
        assert end["type"] == P.ERROR and end["code"] == P.E_SHUTTING_DOWN
        assert srv.proc.wait(60) == 0
    finally:
        worker_client.close()
        boss.close()
        srv.stop()


# --------------------------------------------------------------------------------------------
# in-process: device out-of-memory and a crashing request (a real GPU OOM cannot run in CI, so
# the real tiny engine is wrapped to raise what torch raises when a batch does not fit)
# --------------------------------------------------------------------------------------------
class FaultyEngine:
    """The real tiny engine; batches above ``fit`` raise torch's CUDA OOM error after the first batch,
    and renders of identity ``poison`` raise an unexpected error."""

    def __init__(self, engine, fit: int):
        self.engine, self.fit, self.batches, self.poison = engine, fit, [], None

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def render(self, identity_id, rows, frames, *, batch_size=None, **kw):
        import torch

        inner = self.engine.render(identity_id, rows, frames, batch_size=batch_size, **kw)
        self.batches.append(batch_size)
        poisoned = identity_id == self.poison

        def gen():
            for k, item in enumerate(inner):
                if poisoned:
                    raise KeyError("kaboom")
                if k == batch_size and batch_size > self.fit:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                yield item

        return gen()


@pytest.fixture(scope="module")
def inproc(ctx):
    from server.service.app import Server, ServerSettings
    from server.engine import Engine

    eng = FaultyEngine(Engine.tiny_random(seed=0, device="cpu"), fit=1)
    srv = Server(eng, ServerSettings(bind="tcp://127.0.0.1:*", tiny_random=True, batch_size=4), ctx=ctx)
    t = threading.Thread(target=srv.serve, daemon=True)
    t.start()
    yield srv, eng
    srv.stopping = True
    t.join(60)


def test_out_of_memory_halves_the_batch_and_finishes(inproc, ctx):
    srv, eng = inproc
    cl = Client(srv.endpoint, ctx)
    try:
        h, _ = cl.call(P.request(P.PREPARE, "p", align=False), [png_bytes(portrait(4))])
        parts: list = []
        cl.send(render_header("oom", h["identity"], n_rows=10, first=0, parts=parts, size=64, credit=P.MAX_CREDIT),
                parts)
        _, got, progress, end = collect_render(cl, "oom", timeout=300)
        assert end["type"] == P.DONE and end["sent"] == 10, end
        assert [m[0]["frame"] for m in got] == list(range(10))
        retries = [p for p in progress if p["stage"] == "oom_retry"]
        assert [p["batch_size"] for p in retries] == [2, 1], progress
        assert "out of device memory" in retries[0]["message"]
        assert eng.batches == [4, 2, 1]
        # frames after the retries equal a clean render of the same rows (nothing skipped or repeated)
        # around the two retry points: frames 3|4 (batch 4 -> 2) and 5|6 (batch 2 -> 1)
        ref = dict(eng.engine.render(h["identity"], rows(10), [3, 4, 5, 6], size=64, batch_size=4))
        for m in got[3:7]:  # batch size changes float rounding by at most one level in a few pixels
            diff = np.abs(P.decode_raw_frame(m[0], m[1][0]).astype(int) - ref[m[0]["frame"]].astype(int))
            assert diff.max() <= 1 and diff.mean() < 0.01, (m[0]["frame"], diff.max(), diff.mean())
        assert np.abs(ref[3].astype(int) - ref[4].astype(int)).mean() > 0.05  # neighbours differ more than that
    finally:
        cl.close()


def test_a_crashing_request_does_not_take_down_others(inproc, ctx):
    srv, eng = inproc
    a, b = Client(srv.endpoint, ctx), Client(srv.endpoint, ctx)
    try:
        h, _ = a.call(P.request(P.PREPARE, "p", align=False), [png_bytes(portrait(5))])
        eng.poison = h["identity"]
        h2, _ = b.call(P.request(P.PREPARE, "p", align=False), [png_bytes(portrait(6))])
        pa: list = []
        pb: list = []
        a.send(render_header("crash", h["identity"], n_rows=2, first=0, parts=pa, size=64), pa)
        b.send(render_header("fine", h2["identity"], n_rows=2, first=0, parts=pb, size=64), pb)
        end_a = collect_render(a, "crash", timeout=300)[3]
        assert end_a["type"] == P.ERROR and end_a["code"] == P.E_INTERNAL and "kaboom" in end_a["message"]
        _, got, _, end_b = collect_render(b, "fine", timeout=300)
        assert end_b["type"] == P.DONE and len(got) == 2
        assert_server_ok(a)
    finally:
        eng.poison = None
        a.close()
        b.close()


def test_a_cancel_between_the_last_frame_and_done_is_answered_by_done(ctx):
    """The worker has rendered a request's last frame and queued its ``done`` for the main thread when
    the client's cancel arrives: the client gets the frame and ``done``, no ``unknown_request`` error
    overtaking them. A real Server on loopback, its loop stepped by hand to hit that moment every time."""
    from server.service.app import Server, ServerSettings
    from server.engine import Engine

    srv = Server(Engine.tiny_random(seed=0, device="cpu"),
                 ServerSettings(bind="tcp://127.0.0.1:*", tiny_random=True, batch_size=2), ctx=ctx)
    worker = srv.worker                      # its thread is not started: the test runs its steps
    worker.out = ctx.socket(zmq.PAIR)
    worker.out.connect(srv.pair_endpoint)
    cl = Client(srv.endpoint, ctx)

    def deliver():                           # one client message through the main thread's handler
        assert srv.router.poll(30_000), "the client's message did not arrive"
        srv.on_message(srv.router.recv_multipart(copy=False))

    def work():                              # one worker step, then the main thread forwards its output
        worker.step(srv.sched.next_job(timeout=30.0))
        srv._forward_from_worker()

    try:
        cl.send(P.request(P.PREPARE, "p", align=False), [png_bytes(portrait(9))])
        deliver()
        work()
        ident = cl.recv()[0]["identity"]
        parts: list = []
        cl.send(render_header("last", ident, n_rows=2, frames=[100], first=100, parts=parts, size=64, credit=4),
                parts)
        deliver()
        worker.step(srv.sched.next_job(timeout=30.0))    # the only frame and 'done' are now queued
        cl.send(P.request(P.CANCEL, "last"))
        deliver()                                        # ... when the cancel is handled
        srv._forward_from_worker()
        got = [h for h, _ in cl.quiet(1.5, types=P.REPLY_TYPES)]
        kinds = [h["type"] for h in got if h["id"] == "last"]
        assert kinds == [P.ACCEPTED, P.PROGRESS, P.FRAME, P.DONE], got
        assert got[-1]["sent"] == 1 and got[-1]["cancelled"] is False
        # after 'done' has gone out, the id is unknown again
        cl.send(P.request(P.CANCEL, "last"))
        deliver()
        h, _ = cl.recv()
        assert h["type"] == P.ERROR and h["code"] == P.E_UNKNOWN_REQUEST and h["id"] == "last"
    finally:
        cl.close()
        worker.out.close(linger=0)
        srv._close_sockets()


KILLED_CLIENT = r"""
import sys, time
import zmq
sys.path.insert(0, sys.argv[3])
from server import protocol as P
from server_helpers import Client, render_header
c = Client(sys.argv[1], zmq.Context())
parts = []
c.send(render_header("doomed", sys.argv[2], n_rows=5000, first=0, parts=parts, size=int(sys.argv[4]),
                     credit=P.MAX_CREDIT), parts)
n = 0
while n < 2:
    h, _ = c.recv()
    n += h["type"] == P.FRAME
print("streaming", flush=True)
time.sleep(600)       # never reads again: only SIGKILL ends it
"""


def test_a_client_killed_mid_stream_frees_its_job_within_two_heartbeats(server, ctx, identity, hello):
    """Reliability figure (docs/protocol.md): a client process SIGKILLed while its render streams is
    noticed at the next unsolicited heartbeat (ROUTER_MANDATORY -> EHOSTUNREACH) and its job dropped."""
    import os
    import signal
    import sys
    from pathlib import Path

    from server.service.app import HEARTBEAT_INTERVAL

    child = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server.endpoint, identity,
                              str(Path(__file__).parent), str(hello["sizes"][0])],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher = Client(server.endpoint, ctx)
    try:
        line = child.stdout.readline()
        assert line.strip() == "streaming", child.stderr.read()
        h, _ = watcher.call(P.request(P.HELLO, watcher.new_id()))
        assert h["jobs"] >= 1, h                      # the 5000-frame render is running
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        t0 = time.monotonic()
        while True:
            h, _ = watcher.call(P.request(P.HELLO, watcher.new_id()))
            freed = time.monotonic() - t0
            if h["jobs"] == 0 or freed > 30:
                break
            time.sleep(0.05)
        print(f"killed client's job freed after {freed:.2f} s (heartbeat interval {HEARTBEAT_INTERVAL} s)")
        assert h["jobs"] == 0, f"the killed client's render still holds the server after {freed:.1f} s"
        assert freed <= 2 * HEARTBEAT_INTERVAL + 0.5, f"freed after {freed:.2f} s"
        assert_server_ok(watcher)
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
        child.stderr.close()
        watcher.close()


def test_precision_option_reaches_the_engine():
    from server.service import app as server_app
    for argv, want in (([], "float32"), (["--precision", "bfloat16"], "bfloat16"),
                       (["--precision", "float32"], "float32")):
        args = server_app.build_parser().parse_args(["--tiny-random", "--device", "cpu", *argv])
        engine, _ = server_app.load_models(args)
        assert engine.precision == want and engine.info()["precision"] == want
    with pytest.raises(SystemExit):
        server_app.build_parser().parse_args(["--tiny-random", "--precision", "fp8"])
