"""Fuzz styleheat-server (issue 4): thousands of malformed messages, then it must still serve.

Seeded (``FUZZ_SEED``), bounded in count (``FUZZ_COUNT``) and time (``FUZZ_SECONDS``). Kinds of
garbage: random bytes, msgpack of the wrong type, truncated msgpack, huge declared lengths (array,
map, str, bin), deep nesting, mutated requests of every type (wrong field types, missing/unknown
fields, bad array maps, part indices past the end, too many parts, over-limit parts, huge declared
shapes and counts). Afterwards: the process is alive, no message made the server fail with
``internal``, every error has a known code and a message, and hello plus a normal tiny render work.
"""
from __future__ import annotations

import os
import random
import struct
import time

import msgpack
import numpy as np
import pytest
import zmq

from server import protocol as P
from server_helpers import Client, collect_render, png_bytes, portrait, render_header, serve_tiny
from server_helpers import ctx  # noqa: F401  (fixture)

FUZZ_SEED = int(os.environ.get("STYLEHEAT_FUZZ_SEED", "20261125"))
FUZZ_COUNT = 3000
FUZZ_SECONDS = 60.0
PART_LIMIT = 1_000_000      # --max-part-bytes: over-limit parts stay cheap
N_CLIENTS = 6


@pytest.fixture(scope="module")
def server():
    yield from serve_tiny("--max-part-bytes", str(PART_LIMIT), "--max-jobs", "32", "--max-jobs-per-client", "8")


# --------------------------------------------------------------------------------------------
# generators
# --------------------------------------------------------------------------------------------
HUGE_INTS = [2**63 - 1, -2**63, 2**64 - 1, 2**31, -1, 0, 10**12]


def rand_scalar(r: random.Random):
    return r.choice([
        None, True, False, r.choice(HUGE_INTS), r.randint(-5, 100), float("nan"), float("inf"), -float("inf"),
        1e308, -0.0, r.uniform(-1e6, 1e6), "", "x" * r.randint(1, 80), "\u00e9\U0001F600", "../../etc/passwd",
        r.randbytes(r.randint(0, 64)),
    ])


def rand_value(r: random.Random, depth: int = 0):
    k = r.random()
    if depth > 2 or k < 0.55:
        return rand_scalar(r)
    if k < 0.7:
        return [rand_value(r, depth + 1) for _ in range(r.randint(0, 5))]
    if k < 0.8:
        return {str(rand_scalar(r))[:10]: rand_value(r, depth + 1) for _ in range(r.randint(0, 4))}
    return rand_array_map(r)


def rand_array_map(r: random.Random):
    """An array map that lies: wrong dtype, shape, byte count, huge declared shape, bad part index."""
    m = {"dtype": r.choice(["float32", "uint8", "int32", "float64", "", 5]),
         "shape": r.choice([[r.randint(0, 4), 73], [2**31, 73], [10**12], [-1, 73], [1, 2, 3], [], "1x73", [True]])}
    if r.random() < 0.5:
        m["data"] = r.randbytes(r.choice([0, 4, 73 * 4, 292 * 3 + 1]))
    else:
        m["part"] = r.choice([0, 1, 3, 7, -1, 2**40, "0", None])
    if r.random() < 0.1:
        m["extra"] = 1
    return m


def templates(r: random.Random) -> dict:
    """A plausible request of every type except shutdown (the fuzz must not stop the server)."""
    rows = np.random.default_rng(r.randint(0, 9)).normal(size=(4, 73)).astype(np.float32)
    parts_r: list = []
    render = P.request(P.RENDER, "r", identity="0" * 20, rows=P.array_field(rows, parts_r), frames=[0, 1],
                       first_frame=0, size=64, encoding="raw", credit=4, output=r.choice(P.OUTPUTS),
                       attributes={"age": [0.0] * 4},
                       audio={"samples": [0.0] * 160, "sample_rate": 16000, "fps": 25.0, "frame_offset": 0.0})
    a_parts: list = []
    a2e = P.request(P.AUDIO2EXP, "a", audio={"samples": P.array_field(np.zeros(1600, np.float32), a_parts),
                                             "sample_rate": 16000}, fps=25.0, n_frames=2, offset_frames=0.0,
                    ref_exp=[0.0] * 64)
    return {
        P.HELLO: (P.request(P.HELLO, "h", client="fuzz"), []),
        P.PREPARE: (P.request(P.PREPARE, "p", align=False), [r.randbytes(r.randint(1, 300))]),
        P.RENDER: (render, parts_r),
        P.CREDIT: (P.request(P.CREDIT, "r", frames=1), []),
        P.CANCEL: (P.request(P.CANCEL, "r"), []),
        P.FORGET: (P.request(P.FORGET, "f", identity="0" * 20), []),
        P.HEARTBEAT: (P.request(P.HEARTBEAT, "b"), []),
        P.EXTRACT: (P.request(P.EXTRACT, "x", video={"part": 0}, smooth=0.0), [r.randbytes(r.randint(1, 300))]),
        P.AUDIO2EXP: (a2e, a_parts),
        # random bytes as the plate: refused by the container check before anything is decoded or tracked
        P.DUB: (P.request(P.DUB, "d", video={"part": 0}, output="composite",
                          audio={"samples": [0.0] * 160, "sample_rate": 16000}), [r.randbytes(r.randint(1, 300))]),
    }


def mutate(r: random.Random, header: dict) -> dict:
    h = dict(header)
    for _ in range(r.randint(1, 3)):
        op = r.random()
        keys = [k for k in h if k not in ("v", "type")] or ["id"]
        if op < 0.45:                                   # wrong type / value for a field
            h[r.choice(keys)] = rand_value(r)
        elif op < 0.55:                                 # missing field
            h.pop(r.choice(keys), None)
        elif op < 0.62:                                 # unknown field
            h["zz" + str(r.randint(0, 9))] = rand_value(r)
        elif op < 0.70:                                 # envelope
            h[r.choice(["v", "type", "id"])] = rand_value(r)
        elif op < 0.78:                                 # type swapped to another request's
            h["type"] = r.choice([t for t in P.REQUEST_TYPES if t != P.SHUTDOWN] + ["fly", "SHUTDOWN"])
        else:                                           # nested: inside a map field
            maps = [k for k, v in h.items() if isinstance(v, dict)]
            if maps:
                k = r.choice(maps)
                inner = dict(h[k])
                ik = r.choice(list(inner) or ["x"])
                inner[ik] = rand_value(r) if r.random() < 0.7 else rand_array_map(r)
                h[k] = inner
            else:
                h[r.choice(keys)] = rand_array_map(r)
    return h


def huge_declared(r: random.Random) -> bytes:
    """msgpack that declares far more than it holds, or nests deeply."""
    big = r.choice([0xFFFFFFFF, 0x7FFFFFFF, 0x10000, 0xFFFF])
    return r.choice([
        b"\xdd" + struct.pack(">I", big) + b"\xc0" * 3,            # array32
        b"\xdf" + struct.pack(">I", big) + b"\xa1a\x01",           # map32
        b"\xdb" + struct.pack(">I", big) + b"abc",                 # str32
        b"\xc6" + struct.pack(">I", big) + b"abc",                 # bin32
        b"\x81\xa4rows\xc6" + struct.pack(">I", big) + b"\x00" * 8,
        b"\xdc" + struct.pack(">H", 0xFFFF) + b"\x01" * 10,        # array16
        b"\x91" * r.randint(100, 5000) + b"\xc0",                  # deep nesting
        b"\x81\xa1a" * r.randint(100, 3000) + b"\xc0",
        b"\xc7" + bytes([r.randint(0, 255)]) + b"\x05abc",         # ext8, short
        b"\xd9\x05ab",                                             # str8, truncated
    ])


def make_message(r: random.Random, kind: str) -> list:
    if kind == "random_bytes":
        frames = [r.randbytes(r.randint(0, 200)) for _ in range(r.randint(1, 3))]
    elif kind == "wrong_msgpack_type":
        frames = [msgpack.packb(r.choice([[1, 2], 5, "hello", None, 1.5, b"bin", [{"v": 1}], True]),
                                use_bin_type=True)]
    elif kind == "truncated":
        h, parts = templates(r)[r.choice([t for t in P.REQUEST_TYPES if t != P.SHUTDOWN])]
        packed = P.pack_header(h)
        frames = [packed[:r.randint(0, max(0, len(packed) - 1))], *parts]
    elif kind == "huge_declared":
        frames = [huge_declared(r)]
    elif kind == "truncated_multipart":
        h, parts = templates(r)[r.choice([P.RENDER, P.AUDIO2EXP, P.EXTRACT, P.PREPARE])]
        choice = r.random()
        if choice < 0.4:
            parts = []                                       # header names parts that are not there
        elif choice < 0.7:
            parts = [p[: len(p) // 2] for p in parts]        # parts shorter than declared
        else:
            parts = [r.randbytes(8)] * r.randint(P.MAX_PARTS + 1, P.MAX_PARTS + 4)  # too many parts
        frames = [P.pack_header(h), *parts]
    elif kind == "over_limit_part":
        h, _ = templates(r)[r.choice([P.PREPARE, P.EXTRACT])]
        frames = [P.pack_header(h), b"\0" * (PART_LIMIT + 1 + r.randint(0, 1000))]
    else:  # "mutated"
        t = r.choice([t for t in P.REQUEST_TYPES if t != P.SHUTDOWN])
        h, parts = templates(r)[t]
        h = mutate(r, h)
        try:
            packed = P.pack_header(h)
        except (OverflowError, TypeError, ValueError):
            packed = P.pack_header({"v": 1, "type": t, "bad": str(h)[:100]})
        frames = [packed, *parts]
    return frames


KINDS = ["mutated"] * 10 + ["random_bytes"] * 2 + ["wrong_msgpack_type", "truncated", "huge_declared",
                                                     "truncated_multipart", "truncated_multipart"]


def is_shutdown(frames: list) -> bool:
    try:
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
    except Exception:
        return False
    return isinstance(header, dict) and header.get("type") == P.SHUTDOWN


# --------------------------------------------------------------------------------------------
# the test
# --------------------------------------------------------------------------------------------
def test_fuzz_then_still_serving(server, ctx):
    r = random.Random(FUZZ_SEED)
    socks = []
    for _ in range(N_CLIENTS):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDTIMEO, 10_000)
        s.connect(server.endpoint)
        socks.append(s)
    replies: list[dict] = []
    undecodable = 0

    def drain(sock, wait_ms=0):
        nonlocal undecodable
        while sock.poll(wait_ms):
            wait_ms = 0
            frames = sock.recv_multipart()
            try:
                h, _ = P.unpack(frames)
            except P.ProtocolError:
                undecodable += 1
                continue
            replies.append(h)

    sent = over_limit = 0
    start = time.monotonic()
    try:
        while sent < FUZZ_COUNT and time.monotonic() - start < FUZZ_SECONDS:
            kind = "over_limit_part" if sent % 500 == 250 else r.choice(KINDS)
            frames = make_message(r, kind)
            if is_shutdown(frames):
                continue
            sock = socks[sent % N_CLIENTS]
            sock.send_multipart(frames)
            sent += 1
            over_limit += kind == "over_limit_part"
            if sent % 20 == 0:
                for s in socks:
                    drain(s)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:   # let queued jobs finish and their replies arrive
            before = len(replies)
            for s in socks:
                drain(s, 200)
            if len(replies) == before:
                break
    finally:
        for s in socks:
            s.close(linger=0)
    elapsed = time.monotonic() - start
    from collections import Counter

    kinds = Counter(h.get("code", h.get("type")) for h in replies)
    print(f"fuzz: {sent} messages ({over_limit} over the part limit) in {elapsed:.1f} s, {len(replies)} replies "
          f"{dict(kinds)}, seed {FUZZ_SEED}")

    assert server.proc.poll() is None, "the server died:\n" + "".join(server.stderr)[-3000:]
    assert sent >= min(FUZZ_COUNT, 500), f"only {sent} messages sent in {FUZZ_SECONDS} s"
    assert undecodable == 0
    errors = [h for h in replies if h.get("type") == P.ERROR]
    assert len(errors) >= sent // 2, (len(errors), sent)   # garbage is answered, not swallowed
    for h in errors:
        assert h["code"] in P.ERROR_CODES and isinstance(h["message"], str) and h["message"], h
    internal = [h["message"] for h in errors if h["code"] == P.E_INTERNAL]
    assert not internal, internal[:5]
    codes = {h["code"] for h in errors}
    for expected in (P.E_BAD_MESSAGE, P.E_BAD_FIELD, P.E_VERSION, P.E_UNKNOWN_TYPE, P.E_TOO_LARGE):
        assert expected in codes, (expected, sorted(codes))
    assert all(h.get("type") in P.REPLY_TYPES for h in replies)
    assert "Traceback" not in "".join(server.stderr), "".join(server.stderr)[-3000:]

    # still serving: hello and a normal tiny render on a fresh connection
    c = Client(server.endpoint, ctx)
    try:
        h, _ = c.call(P.request(P.HELLO, "after"))
        assert h["type"] == P.HELLO and h["protocol"] == 1
        h, _ = c.call(P.request(P.PREPARE, "prep", align=False), [png_bytes(portrait(2))])
        assert h["type"] == P.PREPARED, h
        parts: list = []
        c.send(render_header("ok", h["identity"], n_rows=6, frames=[100, 102, 105], parts=parts,
                             size=hello_size(c), credit=8), parts)
        _, got, _, end = collect_render(c, "ok")
        assert end["type"] == P.DONE and end["sent"] == 3 and not end["cancelled"], end
        assert [fh["frame"] for fh, _ in got] == [100, 102, 105]
        assert all(P.decode_raw_frame(fh, fp[0]).std() > 0 for fh, fp in got)
    finally:
        c.close()
    assert server.proc.poll() is None


def hello_size(c: Client) -> int:
    h, _ = c.call(P.request(P.HELLO, "size"))
    return int(h["sizes"][0])


def test_generators_are_seeded():
    a = [make_message(random.Random(5), k) for k in KINDS]
    b = [make_message(random.Random(5), k) for k in KINDS]
    assert a == b


# --------------------------------------------------------------------------------------------
# the reliability figure (docs/protocol.md): 10,000 malformed messages, one error reply each
# --------------------------------------------------------------------------------------------
#: kinds that can never be a valid request (undecodable, wrong envelope, missing or short parts,
#: too many parts, a part over --max-part-bytes): each must be answered by exactly one error
MALFORMED_KINDS = ["random_bytes", "wrong_msgpack_type", "truncated", "huge_declared", "truncated_multipart"]
MALFORMED_COUNT = 10_000


def test_ten_thousand_malformed_messages_from_several_clients_each_get_one_error(server, ctx):
    import threading

    per_client = -(-MALFORMED_COUNT // N_CLIENTS)
    results: list[dict] = [{} for _ in range(N_CLIENTS)]

    def client(i: int) -> None:
        r = random.Random(FUZZ_SEED + 1 + i)
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDTIMEO, 10_000)
        s.connect(server.endpoint)
        res = results[i]
        res.update(sent=0, errors=0, codes={}, bad=[])
        try:
            for n in range(per_client):
                kind = "over_limit_part" if n % 500 == 250 else r.choice(MALFORMED_KINDS)
                s.send_multipart(make_message(r, kind))
                res["sent"] += 1
                if not s.poll(20_000):
                    res["bad"].append(f"no reply to message {n} ({kind})")
                    return
                try:
                    h, _ = P.unpack(s.recv_multipart())
                except P.ProtocolError as exc:
                    res["bad"].append(f"undecodable reply to {kind}: {exc}")
                    continue
                if h.get("type") != P.ERROR or h.get("code") not in P.ERROR_CODES or h["code"] == P.E_INTERNAL \
                        or not h.get("message"):
                    res["bad"].append(f"{kind}: {h}")
                    continue
                res["errors"] += 1
                res["codes"][h["code"]] = res["codes"].get(h["code"], 0) + 1
            if s.poll(300):          # exactly one reply per message: nothing else may arrive
                res["bad"].append(f"an extra reply: {P.unpack(s.recv_multipart())[0]}")
        finally:
            s.close(linger=0)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(N_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    elapsed = time.monotonic() - t0
    sent = sum(x.get("sent", 0) for x in results)
    errors = sum(x.get("errors", 0) for x in results)
    bad = [b for x in results for b in x.get("bad", [])]
    codes: dict = {}
    for x in results:
        for k, v in x.get("codes", {}).items():
            codes[k] = codes.get(k, 0) + v
    print(f"malformed: {sent} messages from {N_CLIENTS} clients in {elapsed:.1f} s, {errors} error replies {codes}")
    assert not any(t.is_alive() for t in threads)
    assert server.proc.poll() is None, "the server died:\n" + "".join(server.stderr)[-3000:]
    assert not bad, bad[:5]
    assert sent >= MALFORMED_COUNT and errors == sent
    assert "Traceback" not in "".join(server.stderr), "".join(server.stderr)[-3000:]
    c = Client(server.endpoint, ctx)      # and it still answers
    try:
        h, _ = c.call(P.request(P.HELLO, "after-malformed"))
        assert h["type"] == P.HELLO
    finally:
        c.close()
