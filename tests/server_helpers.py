"""Shared by the styleheat-server tests: a real server process on 127.0.0.1 and real DEALER clients.

Server processes start through :mod:`server_launch` (the one launcher, also used by the add-on tests).
``serve_tiny(*extra_args)`` backs each module's ``server`` fixture (a ``--tiny-random`` CPU server on a
free loopback port); ``ctx`` and ``client`` are fixtures the test modules import (``client`` connects to
the importing module's ``server``).
"""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import zmq

from server import protocol as P
from server_launch import ServerProcess, cli_command, server_command  # noqa: F401  (re-exported)

REPLY_TIMEOUT = 60.0
TINY_SERVER_ARGS = ("--tiny-random", "--device", "cpu", "--bind", "tcp://127.0.0.1:*", "--log-level", "WARNING")


class Client:
    def __init__(self, endpoint: str, ctx: zmq.Context, curve: tuple[bytes, bytes, bytes] | None = None):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, 10_000)  # a DEALER with no usable peer would block forever
        if curve is not None:
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = curve
        self.sock.connect(endpoint)
        self.n = 0

    def new_id(self, prefix="r") -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def send(self, header: dict, parts=()) -> None:
        self.sock.send_multipart(P.pack(header, list(parts)))

    def send_raw(self, frames) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout: float = REPLY_TIMEOUT, keep_heartbeats: bool = False):
        """Next (header, parts), skipping unsolicited heartbeats; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                raise AssertionError(f"no reply within {timeout} s")
            frames = self.sock.recv_multipart()
            header, parts = P.unpack(frames)
            assert header["tiny_random"] is True and "tiny" in header["note"], header
            if header["type"] == P.HEARTBEAT and header["id"] is None and not keep_heartbeats:
                continue
            return header, parts

    def quiet(self, seconds: float, types=(P.FRAME,)) -> list:
        """Messages of ``types`` received during ``seconds`` (others are returned too, for inspection)."""
        got = []
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                return [g for g in got if g[0]["type"] in types]
            got.append(P.unpack(self.sock.recv_multipart()))

    def call(self, header: dict, parts=(), timeout: float = REPLY_TIMEOUT):
        self.send(header, parts)
        return self.recv(timeout)

    def close(self):
        self.sock.close(linger=0)


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", rgb[..., ::-1].copy())
    assert ok
    return buf.tobytes()


def portrait(seed: int = 0, side: int = 128) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    img = np.stack([xx * 255 // side, yy * 255 // side, (xx + yy) * 127 // side], -1).astype(np.uint8)
    return np.clip(img.astype(int) + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)


def rows(n: int, seed: int = 0) -> np.ndarray:
    r = np.random.default_rng(seed).normal(0, 0.3, (n, 73)).astype(np.float32)
    r[:, 70:73] = [1.0, 128.0, 128.0]  # crop params around the usual values; the tiny net does not care
    return r


def render_header(rid, identity, n_rows=8, frames=None, first=100, parts=None, **kw):
    parts = [] if parts is None else parts
    frames = list(range(first, first + n_rows)) if frames is None else frames
    return P.request(P.RENDER, rid, identity=identity, rows=P.array_field(rows(n_rows), parts),
                     first_frame=first, frames=frames, **kw)


def collect_render(client: Client, rid: str, grant_each: bool = False, timeout: float = REPLY_TIMEOUT):
    """All messages of one render up to its terminal message: (accepted, frames, progress, terminal)."""
    frames, progress, accepted = [], [], None
    while True:
        h, parts = client.recv(timeout)
        if h.get("id") != rid:
            continue
        t = h["type"]
        if t == P.ACCEPTED:
            accepted = h
        elif t == P.FRAME:
            frames.append((h, parts))
            if grant_each:
                client.send(P.request(P.CREDIT, rid, frames=1))
        elif t == P.PROGRESS:
            progress.append(h)
        else:
            assert t in (P.DONE, P.ERROR), h
            return accepted, frames, progress, h


def serve_tiny(*extra_args: str):
    """Generator for a module-scoped ``server`` fixture: a started ``--tiny-random`` server, stopped after."""
    srv = ServerProcess(*TINY_SERVER_ARGS, *extra_args)
    srv.wait_ready()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def ctx():
    c = zmq.Context()
    yield c
    c.term()


@pytest.fixture()
def client(server, ctx):
    c = Client(server.endpoint, ctx)
    yield c
    c.close()
