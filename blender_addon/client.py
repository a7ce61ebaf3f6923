"""bpy-free client of the StyleHEAT server (ZeroMQ DEALER, protocol in ``protocol.py``).

One background thread owns the socket (zmq sockets are not thread-safe); callers talk to it
through queues, so Blender's main thread never blocks on the network for longer than it asks.

    client = Client("tcp://127.0.0.1:5555", timeout=5.0)
    info = client.hello()                              # raises ServerUnavailable when nobody answers
    ident = client.prepare(png_bytes)                  # {"identity": ..., "coefficients": ...}
    stream = client.render(ident["identity"], rows, first_frame, frames, encoding="png")
    for frame in stream:                               # Frame(frame, index, total, width, height, data)
        ...                                            # each consumed frame grants the server one credit
    stream.cancel()                                    # stops the job; frames already received stay valid

Errors: :class:`ServerUnavailable` (nobody answers), :class:`ServerDead` (a server that answered
stopped answering while a render/extract was in flight: no message for :data:`DEAD_AFTER` s),
:class:`ServerError` (the server replied with an ``error``; ``code`` is one of ``protocol.ERROR_CODES``).

Liveness: while a streamed request waits, the client pings the server (``heartbeat``) every
:data:`HEARTBEAT_EVERY` s of quiet, and the server itself sends a heartbeat every second to a client with
a job. Any message counts, so a server busy with a long frame stays alive; only a server that sends
nothing at all for :data:`DEAD_AFTER` s is declared dead. A live server that sends nothing *for this
request* for the request's ``frame_timeout`` (a stuck job) ends it with :class:`ServerUnavailable`.
"""
from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from . import protocol as P

CLIENT_NAME = "styleheat-blender-addon"

#: Seconds without any message from the server (heartbeat replies included) after which a request in
#: flight declares the server dead. The server answers a heartbeat within milliseconds even while it
#: renders, and pings a client with a job every second, so 10 s is several missed heartbeats, never a
#: slow frame.
DEAD_AFTER = 10.0
#: Seconds of quiet after which a waiting request pings the server.
HEARTBEAT_EVERY = 2.0


class ClientError(Exception):
    """Base class of the errors this client raises (their text is meant for the user)."""


class ServerUnavailable(ClientError):
    pass


class ServerDead(ServerUnavailable):
    """The server answered before, then sent nothing (not even heartbeat replies) for ``silent`` s."""

    def __init__(self, address: str, silent: float, dead_after: float = DEAD_AFTER):
        self.address, self.silent, self.dead_after = address, float(silent), float(dead_after)
        super().__init__(f"The StyleHEAT server at {address} stopped answering (no reply for {dead_after:g} s): "
                         f"it crashed, was stopped or lost the network. Frames already written are kept; "
                         f"restart the server and render again (only the missing frames are rendered).")


class ServerError(ClientError):
    def __init__(self, code: str, message: str, header: Mapping | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.header = dict(header or {})

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"


@dataclass
class Frame:
    frame: int                 # scene frame number
    index: int                 # position among the requested frames
    total: int
    width: int
    height: int
    encoding: str              # "png" (data = PNG bytes) or "raw" (data = RGB8 / RGBA8 bytes)
    data: bytes
    channels: int = 3          # 3 RGB; 4 straight-alpha RGBA (a matte)

    def rgb(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB or (H, W, 4) RGBA, top row first (raw encoding only)."""
        return P.decode_raw_frame({"encoding": self.encoding, "width": self.width, "height": self.height,
                                   "channels": self.channels}, self.data)


_ids = itertools.count(1)


def _new_id(kind: str) -> str:
    return f"{kind}-{os.getpid()}-{next(_ids)}"


class Client:
    """Connection to one server address. Thread-safe for callers; call :meth:`close` when done."""

    def __init__(self, address: str, timeout: float = 5.0, curve_dir: str | None = None,
                 dead_after: float = DEAD_AFTER):
        """``curve_dir``: a folder made by ``styleheat-server --make-keys`` (server.key and
        client.key_secret), needed for a server that is not on this machine. ``dead_after``: see
        :data:`DEAD_AFTER` (tests shorten it)."""
        import zmq  # imported here so that importing the add-on never requires zmq

        if not address or "://" not in address:
            raise ClientError(f"server address {address!r} is not a ZeroMQ endpoint; use e.g. tcp://127.0.0.1:5555")
        self.address = address
        self.timeout = float(timeout)
        self.dead_after = float(dead_after)
        self._zmq = zmq
        self._ctx = zmq.Context.instance()
        self._outbox: queue.Queue = queue.Queue()
        self._routes: dict[str, queue.Queue] = {}
        self._routes_lock = threading.Lock()
        self._stop = threading.Event()
        self.last_seen = 0.0          # time.monotonic() of the last message from the server
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)          # close() never waits for unsent messages
        # a blocking send can never hang (e.g. a server that refuses our CURVE handshake); sends here
        # are NOBLOCK anyway, this bounds any other path
        self._sock.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeout * 1000)))
        self._sock.setsockopt(zmq.IMMEDIATE, 1)      # no queueing towards a server that is not there
        self._sock.setsockopt(zmq.RCVHWM, 0)         # credit flow bounds what the server sends
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self.curve_dir = curve_dir or None
        if self.curve_dir:
            self._use_curve(self.curve_dir)
        try:
            self._sock.connect(address)
        except zmq.ZMQError as exc:
            self._sock.close(0)
            raise ClientError(f"cannot use server address {address!r}: {exc}") from None
        self._thread = threading.Thread(target=self._run, name="styleheat-client", daemon=True)
        self._thread.start()

    def _use_curve(self, directory: str) -> None:
        import zmq.auth

        server_key = os.path.join(directory, "server.key")
        client_secret = os.path.join(directory, "client.key_secret")
        for path in (server_key, client_secret):
            if not os.path.isfile(path):
                self._sock.close(0)
                raise ClientError(f"CURVE key {path} not found; copy server.key and client.key_secret from the "
                                  f"folder 'styleheat-server --make-keys DIR' created")
        server_pub, _ = zmq.auth.load_certificate(server_key)
        pub, sec = zmq.auth.load_certificate(client_secret)
        if not sec:
            self._sock.close(0)
            raise ClientError(f"{client_secret} holds no secret key")
        self._sock.curve_serverkey = server_pub
        self._sock.curve_publickey = pub
        self._sock.curve_secretkey = sec

    # -- I/O thread ------------------------------------------------------------------------
    def _run(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        pending: list[tuple[list, float, queue.Queue | None]] = []
        while not self._stop.is_set():
            while True:
                try:
                    pending.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            keep = []
            for frames, deadline, errq in pending:
                try:
                    self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    if time.monotonic() < deadline:
                        keep.append((frames, deadline, errq))
                    elif errq is not None:
                        errq.put(("unreachable", None, None))
                except zmq.ZMQError as exc:  # pragma: no cover - socket closed under us
                    if errq is not None:
                        errq.put(("unreachable", str(exc), None))
            pending = keep
            try:
                events = dict(poller.poll(10 if pending else 20))
            except zmq.ZMQError:  # pragma: no cover
                break
            if self._sock in events:
                while True:
                    try:
                        msg = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    self.last_seen = time.monotonic()
                    try:
                        header, parts = P.unpack(msg)
                    except P.ProtocolError:
                        continue
                    rid = header.get("id")
                    with self._routes_lock:
                        q = self._routes.get(rid) if isinstance(rid, str) else None
                    if q is not None:
                        q.put(("msg", header, parts))
        self._sock.close(0)

    # -- plumbing --------------------------------------------------------------------------
    def _open_route(self, rid: str) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        with self._routes_lock:
            self._routes[rid] = q
        return q

    def _close_route(self, rid: str) -> None:
        with self._routes_lock:
            self._routes.pop(rid, None)

    def _send(self, header: Mapping, parts: Sequence = (), errq: queue.Queue | None = None) -> None:
        if self._stop.is_set():
            raise ClientError("the StyleHEAT client is closed")
        self._outbox.put((P.pack(header, parts), time.monotonic() + self.timeout, errq))

    def _unavailable(self, what: str) -> ServerUnavailable:
        return ServerUnavailable(
            f"No StyleHEAT server answered at {self.address} within {self.timeout:g} s ({what}). "
            f"Start one (Preferences > Add-ons > StyleHEAT > Start Local Server, or run "
            f"'styleheat-server --bind {self.address}') or fix the server address"
            + (". A remote server needs CURVE keys (Preferences > CURVE Keys)." if not self.curve_dir and
               not any(h in self.address for h in ("127.0.0.1", "localhost", "[::1]", "ipc://")) else "."))

    def call(self, type_: str, fields: Mapping | None = None, parts: Sequence = (),
             timeout: float | None = None, expect: Sequence[str] = ()) -> tuple[dict, list]:
        """Send one request and wait for its single reply; raises on error replies and silence."""
        rid = _new_id(type_)
        q = self._open_route(rid)
        try:
            self._send(P.request(type_, rid, **dict(fields or {})), parts, errq=q)
            wait = self.timeout if timeout is None else float(timeout)
            try:
                kind, header, rparts = q.get(timeout=wait)
            except queue.Empty:
                raise self._unavailable(f"no reply to '{type_}'") from None
            if kind == "unreachable":
                raise self._unavailable("could not connect")
            if header.get("type") == P.ERROR:
                raise ServerError(str(header.get("code", P.E_INTERNAL)), str(header.get("message", "server error")),
                                  header)
            if expect and header.get("type") not in expect:
                raise ClientError(f"unexpected reply {header.get('type')!r} to '{type_}' from {self.address}")
            return header, rparts
        finally:
            self._close_route(rid)

    # -- API -------------------------------------------------------------------------------
    def hello(self) -> dict:
        """The server's hello reply (model, device, sizes, attributes, limits...)."""
        header, _ = self.call(P.HELLO, {"client": CLIENT_NAME}, expect=(P.HELLO,))
        return header

    def heartbeat(self) -> dict:
        header, _ = self.call(P.HEARTBEAT, expect=(P.HEARTBEAT,))
        return header

    def prepare(self, image: bytes, align: bool = True, timeout: float | None = None) -> dict:
        """Invert a portrait (PNG/JPEG bytes) once; returns the ``prepared`` reply header."""
        header, _ = self.call(P.PREPARE, {"align": bool(align)}, [bytes(image)],
                              timeout=timeout if timeout is not None else max(self.timeout, 300.0),
                              expect=(P.PREPARED,))
        return header

    def forget(self, identity: str) -> None:
        self.call(P.FORGET, {"identity": identity}, expect=(P.FORGOTTEN,))

    def render(self, identity: str, rows: np.ndarray, first_frame: int, frames: Sequence[int], *,
               size: int | None = None, encoding: str = "png", credit: int = P.DEFAULT_CREDIT,
               attributes: Mapping[str, np.ndarray] | None = None, audio: Mapping[str, Any] | None = None,
               frame_timeout: float = 300.0, quality: str | None = None,
               output: str | None = None) -> "RenderStream":
        """Start a render; ``audio`` is {"samples": (S,) float32, "sample_rate", "fps", "frame_offset"}.
        ``quality``: one of the hello's ``qualities`` (None: the server's default, full); ``output``: one of
        the hello's ``outputs`` (None: not sent, the face crop)."""
        rid = _new_id("render")
        parts: list = []
        fields: dict[str, Any] = {
            "identity": identity, "rows": P.array_field(np.asarray(rows, dtype=np.float32), parts),
            "first_frame": int(first_frame), "frames": [int(f) for f in frames],
            "encoding": encoding, "credit": int(credit),
        }
        if size is not None:
            fields["size"] = int(size)
        if quality is not None:
            fields["quality"] = str(quality)
        if output is not None:
            fields["output"] = str(output)
        if attributes:
            fields["attributes"] = {k: P.array_field(np.asarray(v, dtype=np.float32)) for k, v in attributes.items()}
        if audio is not None:
            fields["audio"] = _audio_field(audio, parts)
        q = self._open_route(rid)
        stream = RenderStream(self, rid, q, len(fields["frames"]), frame_timeout, requested=fields["frames"])
        self._send(P.request(P.RENDER, rid, **fields), parts, errq=q)
        return stream

    def extract(self, *, path: str | None = None, video: bytes | None = None, smooth: float = 0.0,
                fps: float | None = None, timeout: float = 300.0) -> "ExtractJob":
        """Start extracting 73-value rows from a driving video: ``path`` (a file the server can read;
        servers accept it only on loopback) or ``video`` (the file's bytes). ``fps``: resample the
        rows to this rate (None: the video's own). Returns a job to poll; Esc = ``job.cancel()``."""
        if (path is None) == (video is None):
            raise ClientError("extract needs exactly one of a video path or the video's bytes")
        rid = _new_id("extract")
        parts: list = []
        fields: dict[str, Any] = {"smooth": float(smooth), "fps": None if fps is None else float(fps)}
        if path is not None:
            fields["path"] = str(path)
        else:
            fields["video"] = {"part": 0}
            parts.append(bytes(video))
        q = self._open_route(rid)
        job = ExtractJob(self, rid, q, timeout)
        try:
            self._send(P.request(P.EXTRACT, rid, **fields), parts, errq=q)
        except ClientError:
            self._close_route(rid)
            raise
        return job

    def dub(self, samples: np.ndarray, sample_rate: int, *, path: str | None = None, video: bytes | None = None,
            output: str = "composite", size: int | None = None, credit: int = P.DEFAULT_CREDIT,
            frame_timeout: float = 300.0) -> "DubStream":
        """Dub a filmed plate (``path`` on a loopback server, or the file's ``video`` bytes) with the speech
        ``samples`` (mono float32; sample 0 plays with plate frame 0). Returns a stream of plate-size PNG
        frames; ``stream.dubbed`` holds the terminal reply (warnings, frames without a face) at the end."""
        if (path is None) == (video is None):
            raise ClientError("dub needs exactly one of a plate path or the plate's bytes")
        rid = _new_id("dub")
        header, parts = P.dub_request(rid, samples, sample_rate, video=video, path=path, output=output, size=size,
                                      encoding="png", credit=credit)
        q = self._open_route(rid)
        stream = DubStream(self, rid, q, 0, frame_timeout)
        try:
            self._send(header, parts, errq=q)
        except ClientError:
            self._close_route(rid)
            raise
        return stream

    def audio2exp(self, audio: Mapping[str, Any], fps: float, n_frames: int, ref_exp: np.ndarray,
                  offset_frames: float = 0.0, timeout: float = 300.0) -> np.ndarray:
        """Expression rows from audio (SadTalker Audio2Exp on the server): (n_frames, 64) float32.

        ``audio`` is like render's: {"samples", "sample_rate", "fps", "frame_offset"}; output frame
        ``i`` shows audio time ``(i + offset_frames) / fps`` from the first sample (docs/protocol.md)."""
        return self.audio2motion(audio, fps, n_frames, ref_exp, offset_frames, timeout)[0]

    def audio2motion(self, audio: Mapping[str, Any], fps: float, n_frames: int, ref_exp: np.ndarray,
                     offset_frames: float = 0.0, timeout: float = 300.0, **motion: Any):
        """:meth:`audio2exp` with the head-motion / blink options of the request (``pose``, ``pose_style``,
        ``pose_scale``, ``seed``, ``ref_pose`` (6,), ``blinks``, ``blink_rate``, ``blink_seed``; None values
        are left out). Returns (rows (n_frames, 64), pose (n_frames, 6) or None, blink frames or None)."""
        parts: list = []
        fields = {"audio": _audio_field(audio, parts), "fps": float(fps), "n_frames": int(n_frames),
                  "offset_frames": float(offset_frames),
                  "ref_exp": P.array_field(np.asarray(ref_exp, dtype=np.float32).reshape(64))}
        for key, val in motion.items():
            if val is None:
                continue
            if key == "ref_pose":
                val = P.array_field(np.asarray(val, dtype=np.float32).reshape(6))
            fields[key] = val
        header, rparts = self.call(P.AUDIO2EXP, fields, parts, timeout=max(self.timeout, float(timeout)),
                                   expect=(P.EXPRESSIONS,))
        rows = P.decode_array(header.get("rows"), "rows", (int(n_frames), 64), rparts)
        pose, blinks = P.decode_expression_motion(header, rparts)
        return rows, pose, blinks

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _audio_field(audio: Mapping[str, Any], parts: list) -> dict:
    return {"samples": P.array_field(np.asarray(audio["samples"], dtype=np.float32), parts),
            "sample_rate": int(audio["sample_rate"]), "fps": float(audio["fps"]),
            "frame_offset": float(audio["frame_offset"])}


class _ReplyStream:
    """Shared reply pump of one streamed request (an extract job or a render stream).

    :meth:`_next_reply` returns the next (header, parts) for this request, or None when ``deadline``
    passes; while nothing arrives it pings the server (any reply counts as liveness), raises
    :class:`ServerDead` after the client's ``dead_after`` s with no message at all, and
    :class:`ServerUnavailable` after ``silence_timeout`` s with nothing for this request (a live server
    whose job is stuck). Errors, an unreachable server and silence end the request (:meth:`_end`)."""

    def _start_stream(self, client: "Client", rid: str, q: queue.Queue) -> None:
        self.client, self.id, self._q = client, rid, q
        self._last = time.monotonic()
        self._pinged = 0.0

    def _end(self) -> None:
        raise NotImplementedError

    def _try_send(self, header: Mapping) -> None:
        """Send a message that may be lost (heartbeat, credit, cancel): a server that cannot be
        reached shows up as silence or ``unreachable`` on the stream instead."""
        try:
            self.client._send(header)
        except ClientError:
            pass

    def _next_reply(self, deadline: float | None, silence_timeout: float, what: str):
        client = self.client
        ping_every = min(HEARTBEAT_EVERY, client.dead_after / 5.0)
        while True:
            wait = 0.25 if deadline is None else max(0.0, min(0.25, deadline - time.monotonic()))
            try:
                kind, header, parts = self._q.get(timeout=wait)
            except queue.Empty:
                now = time.monotonic()
                quiet = now - max(self._last, client.last_seen)     # nothing at all from the server
                if quiet > client.dead_after:
                    self._end()
                    raise ServerDead(client.address, quiet, client.dead_after)
                idle = now - self._last                              # nothing for this request
                if idle > silence_timeout:
                    self._end()
                    raise ServerUnavailable(
                        f"The StyleHEAT server at {client.address} still answers heartbeats but sent nothing "
                        f"for this {what} in {idle:.0f} s (Frame Timeout {silence_timeout:g} s): the job seems "
                        f"stuck. Restart the server, or raise Frame Timeout in the preferences for very slow "
                        f"frames.")
                if quiet > ping_every and now - self._pinged > ping_every:   # liveness: any reply counts
                    self._pinged = now
                    self._try_send(P.request(P.HEARTBEAT, None))
                if deadline is not None and now >= deadline:
                    return None
                continue
            self._last = time.monotonic()
            if kind == "unreachable":
                self._end()
                raise self.client._unavailable("could not connect")
            if header.get("type") == P.ERROR:
                self._end()
                raise ServerError(str(header.get("code", P.E_INTERNAL)), str(header.get("message", "server error")),
                                  header)
            return header, parts


class ExtractJob(_ReplyStream):
    """One ``extract`` request: :meth:`poll` handles what arrived (progress, then ``extracted``).

    ``progress`` is (stage, done, total) of the latest ``progress`` reply; ``result`` is
    {"fps": float, "rows": (N, 73) float32, "warnings": [str]} once finished."""

    def __init__(self, client: Client, rid: str, q: queue.Queue, silence_timeout: float):
        self._start_stream(client, rid, q)
        self.silence_timeout = float(silence_timeout)
        self.progress: tuple[str, int, int] | None = None
        self.result: dict | None = None
        self.cancelled = False
        self.closed = False

    @property
    def finished(self) -> bool:
        return self.result is not None or self.closed

    def status(self) -> str:
        if self.result is not None:
            return f"Extracted {self.result['rows'].shape[0]} frames"
        if self.progress is None:
            return "Waiting for the server"
        stage, done, total = self.progress
        what = "Landmarks" if stage == "landmarks" else "3DMM" if stage == "3dmm" else stage
        return f"{what} {done}/{total}" if total else f"{what} {done}"

    def poll(self, timeout: float = 0.0) -> bool:
        """Handle the replies that arrive within ``timeout`` s; True while the job still runs.
        Raises ServerError (e.g. ``unsupported``, ``bad_video``) and ServerUnavailable (silence)."""
        deadline = time.monotonic() + max(0.0, timeout)
        while not self.finished:
            got = self._next_reply(deadline, self.silence_timeout, "extraction")
            if got is None:
                return True
            header, parts = got
            t = header.get("type")
            if t == P.PROGRESS:
                self.progress = (str(header.get("stage", "")), int(header.get("done", 0)),
                                 int(header.get("total", 0) or 0))
            elif t == P.EXTRACTED:
                self._close()
                try:
                    fps, rows, warnings = P.decode_extracted(header, parts)
                except P.ProtocolError as exc:
                    raise ClientError(f"the server's 'extracted' reply is malformed: {exc}") from None
                self.result = {"fps": fps, "rows": rows, "warnings": warnings}
            elif t == P.DONE:      # a cancelled job ends with done (or nothing)
                self._close()
        return False

    def wait(self, timeout: float | None = None, should_stop=None) -> dict | None:
        """Block until the rows arrive (None when cancelled or ``timeout`` passed)."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll(0.2):
            if should_stop is not None and should_stop(self):
                self.cancel()
                return None
            if end is not None and time.monotonic() > end:
                return None
        return self.result

    def cancel(self) -> None:
        """Ask the server to stop; no rows are written."""
        if self.finished:
            return
        self.cancelled = True
        self._try_send(P.request(P.CANCEL, self.id))
        self._close()

    def _close(self) -> None:
        self.closed = True
        self.client._close_route(self.id)

    _end = _close


class RenderStream(_ReplyStream):
    """Frames of one render request, in order. Iterate, or call :meth:`next` with a timeout."""

    def __init__(self, client: Client, rid: str, q: queue.Queue, total: int, frame_timeout: float,
                 requested: Sequence[int] | None = None):
        self._start_stream(client, rid, q)
        # the scene frames this render asked for: a frame the server sends outside them is refused
        # before anything is written for it (issue 27)
        self.requested = None if requested is None else frozenset(int(f) for f in requested)
        self.total = total
        self.frame_timeout = frame_timeout
        self.accepted: dict | None = None
        self.done: dict | None = None
        self.received = 0
        self.cancelled = False
        self.progress: dict | None = None

    @property
    def finished(self) -> bool:
        return self.done is not None

    def next(self, timeout: float | None = None) -> Frame | None:
        """The next frame; None at the end or when ``timeout`` (s) passes without one (check
        :attr:`finished`). Raises ServerError/ServerUnavailable."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            got = self._next_reply(deadline, self.frame_timeout, "render")
            if got is None:
                return None
            header, parts = got
            t = header.get("type")
            if t == P.ACCEPTED:
                self.accepted = header
            elif t == P.PROGRESS:
                self.progress = header
            elif t in (P.DONE, P.DUBBED):
                self.done = header
                self._finish()
            elif t == P.FRAME:
                if not parts:
                    raise ClientError("the server sent a frame without pixels")
                number = header.get("frame")
                if self.requested is not None and (not isinstance(number, int) or number not in self.requested):
                    self.cancel()
                    raise ClientError(f"the server sent frame {str(number)[:20]}, which this render did not ask "
                                      f"for; nothing was written for it and the render was stopped -- check "
                                      f"that the server is a StyleHEAT server of this add-on's version")
                self.received += 1
                if not self.cancelled:
                    self._try_send(P.request(P.CREDIT, self.id, frames=1))
                return Frame(int(header["frame"]), int(header.get("index", self.received - 1)),
                             int(header.get("total", self.total)), int(header["width"]), int(header["height"]),
                             str(header.get("encoding", "raw")), bytes(parts[0]), int(header.get("channels", 3)))
        return None

    def __iter__(self) -> Iterator[Frame]:
        while True:
            f = self.next()
            if f is None:
                return
            yield f

    def drain(self, handle, timeout: float = 0.0) -> None:
        """Hand every frame that arrives within ``timeout`` s to ``handle(frame)``; return when none is waiting,
        the stream has ended or the time is up (the body of a UI timer: it never blocks longer). Raises what
        :meth:`next` raises."""
        deadline = time.monotonic() + timeout
        while not self.finished:
            fr = self.next(timeout=max(0.0, deadline - time.monotonic()))
            if fr is None:
                return
            handle(fr)
            if time.monotonic() >= deadline:
                return

    def cancel(self, wait: float = 0.0) -> None:
        """Ask the server to stop; with ``wait`` > 0, drain until its ``done`` (or the wait ends)."""
        if self.finished or self.cancelled:
            return
        self.cancelled = True
        self._try_send(P.request(P.CANCEL, self.id))
        end = time.monotonic() + wait
        while wait > 0 and not self.finished and time.monotonic() < end:
            try:
                self.next(timeout=max(0.0, end - time.monotonic()))
            except ClientError:
                break
        if not self.finished:
            self._finish()

    def _finish(self) -> None:
        self.client._close_route(self.id)
        if self.done is None:
            self.done = {"type": P.DONE, "id": self.id, "incomplete": True}

    _end = _finish


class DubStream(RenderStream):
    """Frames of one ``dub`` request (every plate frame, in order); :attr:`dubbed` is its terminal ``dubbed``
    reply (None when cancelled), :attr:`progress` the latest tracking ``progress``."""

    @property
    def dubbed(self) -> dict | None:
        return self.done if self.done is not None and self.done.get("type") == P.DUBBED else None
