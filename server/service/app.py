"""``styleheat-server``: the ZeroMQ inference server the Blender add-on talks to.

Protocol: ``docs/protocol.md`` / :mod:`server.protocol`. Threads:

* the main thread owns every socket that faces clients: a ROUTER (``ROUTER_MANDATORY``, so a
  reply to a vanished client raises instead of vanishing) and the bound end of an inproc PAIR;
  it validates requests, answers the cheap ones, and forwards what the worker produces;
* one worker thread runs the engine (prepare, render batches) and hands every outgoing message to
  the main thread through its end of the PAIR. It never touches the ROUTER.

Flow control is credit based (zguide ch. 7): a render only produces frames while the client's
granted credit exceeds what was produced, so at most one batch is ever buffered per request, and
a request waiting for credit lets other requests run (round robin between batches).

Where things are (all in :mod:`server.service`): ``curve_keys`` (loopback check, CURVE keys),
``scheduler`` (jobs, credit, round robin; no sockets), ``images`` (PNG/JPEG in and out),
``bake_models`` (aligner, audio converter, presets, Deep3D and Audio2Exp), ``worker`` (the engine
thread: batching, out-of-memory halving, sending; it gets what it needs as a ``WorkerSetup``). This
module: the :class:`Server` (sockets, the :data:`HANDLERS` table of request types), engine loading,
the command line.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import zmq

from server import protocol as P
from server.service.bake_models import BakeModels, find_aligner, find_audio_converter, load_bake_models
from server.service.curve_keys import is_loopback_address, is_loopback_endpoint, load_server_keys, make_keys
from server.service.images import check_image_size
from server.service.scheduler import Job, Scheduler
from server.service.worker import Worker, WorkerSetup, do_dub

if TYPE_CHECKING:
    from server.engine import Engine

log = logging.getLogger("styleheat.server")

SERVER_NAME = "styleheat-server 0.1.0"
DEFAULT_BIND = "tcp://127.0.0.1:5555"
HEARTBEAT_INTERVAL = 1.0
TINY_NOTE = ("this server runs --tiny-random: a tiny model with seeded random weights for tests and demos; "
             "its images are not faces")


@dataclass(frozen=True)
class ServerSettings:
    """How a :class:`Server` serves; the command line's options of the same names."""

    bind: str = DEFAULT_BIND
    tiny_random: bool = False
    curve_dir: str | os.PathLike | None = None
    batch_size: int | None = None          # None: Engine.default_batch_size (8 on CUDA, 2 on CPU)
    max_jobs: int = 16
    max_jobs_per_client: int = 8
    stall_timeout: float = 600.0
    no_credit_timeout: float = 10.0        # a render never granted credit (credit: 0) holds its slot this long
    local_trust: bool = True               # clients on this machine get detailed errors, shutdown, any forget
    max_part_bytes: int = P.MAX_PART_BYTES

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServerSettings":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


class Server:
    """The sockets and the request handlers of the main thread (see the module docstring)."""

    def __init__(self, engine, settings: ServerSettings | None = None, *, ctx: zmq.Context | None = None,
                 bake: BakeModels | None = None):
        settings = settings or ServerSettings()
        self.settings = settings
        bind, curve_dir = settings.bind, settings.curve_dir
        if not is_loopback_endpoint(bind) and curve_dir is None:
            raise ValueError(
                f"refusing to bind {bind}: it is not a loopback address, and without encryption anyone on the "
                f"network could drive this server. Pass --curve-dir DIR with CURVE keys (make them with "
                f"'styleheat-server --make-keys DIR' and give the client its client.key_secret and "
                f"server.key), or bind tcp://127.0.0.1:PORT")
        self.engine = engine
        self.tiny_random = settings.tiny_random
        self.bake = bake or BakeModels(tiny=settings.tiny_random)
        # extract's 'path' names a file on this machine: only for clients on this machine
        self.loopback_bind = is_loopback_endpoint(bind)
        self.local_trust = settings.local_trust
        self.allow_path = self.loopback_bind and self.local_trust
        self.curve = curve_dir is not None
        # the client of the message being handled (set by on_message): who it is for the per-client job
        # cap and identity ownership, and whether it is trusted (on this machine) -- see peer_of
        self.peer: bytes = b""
        self.trusted = False
        batch_size = settings.batch_size
        if batch_size is None:
            batch_size = engine.default_batch_size        # the engine's own default (server.engine)
        self.batch_size = max(1, int(batch_size))
        self.stall_timeout = settings.stall_timeout
        self.no_credit_timeout = settings.no_credit_timeout
        self.max_part_bytes = int(min(settings.max_part_bytes, P.MAX_PART_BYTES))
        self.max_header_bytes = int(min(self.max_part_bytes, P.MAX_HEADER_BYTES))
        # frames over MAXMSGSIZE drop the connection (no reply possible); between the part limit and
        # MAXMSGSIZE the client gets a 'too_large' error reply
        self.max_message_bytes = self.max_part_bytes * 4 // 3
        self.sched = Scheduler(settings.max_jobs, settings.max_jobs_per_client)
        self.aligner = find_aligner()
        self.audio_converter, self.audio_note = find_audio_converter()
        self.info = dict(engine.info())
        self.own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.auth = None
        self.stopping = False
        self.router = self.ctx.socket(zmq.ROUTER)
        r = self.router
        r.setsockopt(zmq.ROUTER_MANDATORY, 1)
        r.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        r.setsockopt(zmq.SNDHWM, 1000)
        r.setsockopt(zmq.RCVHWM, 1000)
        r.setsockopt(zmq.LINGER, 1000)
        if curve_dir is not None:
            from zmq.auth.thread import ThreadAuthenticator

            pub, sec, auth_dir = load_server_keys(curve_dir)
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=str(auth_dir))
            r.curve_secretkey = sec
            r.curve_publickey = pub
            r.curve_server = True
        try:
            r.bind(bind)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise OSError(f"cannot bind {bind}: {exc}") from None
        self.endpoint = r.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pair_endpoint = f"inproc://styleheat-worker-{id(self)}"
        self.pair = self.ctx.socket(zmq.PAIR)
        self.pair.setsockopt(zmq.LINGER, 0)
        self.pair.bind(self.pair_endpoint)
        self._pool: ThreadPoolExecutor | None = None
        setup = WorkerSetup(engine=engine, sched=self.sched, ctx=self.ctx, pair_endpoint=self.pair_endpoint,
                            decorate=self.decorate, bake=self.bake, aligner=self.aligner,
                            audio_converter=self.audio_converter, tiny_random=self.tiny_random,
                            batch_size=self.batch_size, encoder_pool=self.encoder_pool)
        self.worker = Worker(setup, {kind: h.work for kind, h in HANDLERS.items() if h.work is not None})

    def encoder_pool(self) -> ThreadPoolExecutor:
        """Threads for PNG encoding (created on first use; only the worker thread calls this)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 2) - 1)),
                                            thread_name_prefix="styleheat-png")
        return self._pool

    # ---------------------------------------------------------------------------------------
    def decorate(self, header: dict) -> dict:
        header["tiny_random"] = self.tiny_random
        if self.tiny_random:
            header["note"] = TINY_NOTE
        return header

    def hello_fields(self) -> dict:
        info = self.info
        return dict(
            protocol=P.PROTOCOL_VERSION, server=SERVER_NAME, device=str(info.get("device")),
            model=str(info.get("model")), real_weights=bool(info.get("real_weights")),
            sizes=[int(s) for s in info.get("sizes", [])], native_size=int(info.get("native_size", 0)),
            attributes={k: {kk: float(vv) for kk, vv in v.items()} for k, v in info.get("attributes", {}).items()},
            audio=self.audio_supported(), align=self.aligner is not None, encodings=list(P.ENCODINGS),
            jobs=self.sched.count(),
            presets={k: list(v) for k, v in self.bake.presets.items()},
            pose_presets={k: list(v) for k, v in self.bake.pose_presets.items()},
            capabilities=self.capabilities(),
            qualities={str(k): str(v) for k, v in info.get("qualities", {"full": "every network"}).items()},
            precision=str(info.get("precision", "float32")),
            outputs=self.outputs(),
            limits=dict(max_message_bytes=self.max_message_bytes, max_header_bytes=self.max_header_bytes,
                        max_part_bytes=self.max_part_bytes, max_parts=P.MAX_PARTS, max_rows=P.MAX_ROWS,
                        max_frames=P.MAX_FRAMES, max_credit=P.MAX_CREDIT, default_credit=P.DEFAULT_CREDIT,
                        max_image_side=P.MAX_IMAGE_SIDE, max_jobs=self.sched.max_jobs,
                        max_jobs_per_client=self.sched.max_per_client, batch_size=self.batch_size))

    def outputs(self) -> dict[str, str]:
        """The render outputs offered, each with a sentence saying what it is (composite and matte need the
        photo an identity was prepared from; every server keeps it)."""
        from server.shots.compositing import OUTPUT_TEXT

        return {name: OUTPUT_TEXT[name] for name in P.OUTPUTS}

    def capabilities(self) -> dict[str, bool]:
        return {"extract": self.bake.tracker is not None,
                "audio2exp": self.bake.audio2exp is not None,
                "align": self.aligner is not None, "audio": self.audio_supported()}

    def audio_supported(self) -> bool:
        return bool(self.info.get("audio_warper")) and self.audio_converter is not None

    # sending (main thread only) --------------------------------------------------------------
    def route(self, frames: list) -> bool:
        try:
            self.router.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as exc:
            if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                client = frames[0].bytes if hasattr(frames[0], "bytes") else bytes(frames[0])
                n = self.sched.drop_client(client)
                log.info("client %s unreachable (%s); dropped %d job(s)", client.hex(), exc.strerror, n)
                return False
            raise

    def reply_to(self, client: bytes, header: dict, parts: tuple = ()) -> bool:
        return self.route([client, P.pack_header(self.decorate(header)), *parts])

    # requests (main thread) -------------------------------------------------------------------
    def peer_of(self, client: bytes, frame) -> tuple[bytes, bool]:
        """(peer, trusted) of a message: the peer is the client's CURVE public key (stable across its
        sockets and reconnects) or, without CURVE, its socket; trusted means on this machine (a loopback
        bind, or a loopback peer address) unless --no-local-trust."""
        user = address = None
        try:
            user = frame.get("User-Id") if self.curve else None
        except (zmq.ZMQError, AttributeError, TypeError):
            user = None
        try:
            address = frame.get("Peer-Address")
        except (zmq.ZMQError, AttributeError, TypeError):
            address = None
        peer = b"curve:" + user.encode() if user else client
        trusted = self.local_trust and (self.loopback_bind or (address is not None and is_loopback_address(address)))
        return peer, trusted

    def submit(self, job: Job) -> None:
        job.peer, job.trusted = self.peer, self.trusted
        self.sched.submit(job)

    def on_message(self, frames: list) -> None:
        client = frames[0].bytes
        rid = None
        self.peer, self.trusted = self.peer_of(client, frames[1] if len(frames) > 1 else frames[0])
        try:
            header, parts = P.unpack(frames[1:], max_part_bytes=self.max_part_bytes,
                                     max_header_bytes=self.max_header_bytes)
            maybe = header.get("id")
            if isinstance(maybe, str):
                try:
                    rid = P.check_id(maybe)
                except P.ProtocolError:
                    rid = None
            kind, _ = P.check_envelope(header)
            HANDLERS[kind].accept(self, client, header, parts)
        except P.ProtocolError as exc:
            self.reply_to(client, P.error_reply(rid, exc.code, exc.message))
        except Exception as exc:
            log.exception("unexpected failure handling a message")
            detail = f" ({type(exc).__name__}: {exc})" if self.trusted else " (the details are in the server's log)"
            self.reply_to(client, P.error_reply(rid, P.E_INTERNAL, f"the server failed on this message{detail}"))

    def on_hello(self, client, header, parts):
        rid = P.validate_hello(header, parts)
        self.reply_to(client, P.reply(P.HELLO, rid, **self.hello_fields()))

    def on_heartbeat(self, client, header, parts):
        rid = P.validate_simple(header, parts)
        self.reply_to(client, P.reply(P.HEARTBEAT, rid))

    def on_prepare(self, client, header, parts):
        req = P.validate_prepare(header, parts)
        check_image_size(req.image)        # refused here, before queueing: no decoding of a bomb
        self.submit(Job(client, req.id, "prepare", req))

    def on_render(self, client, header, parts):
        req = P.validate_render(header, parts)
        if not self.sched.known_identity(req.identity):
            raise P.ProtocolError(P.E_UNKNOWN_IDENTITY,
                                  f"identity {req.identity!r} is not known to this server (never prepared here, "
                                  f"forgotten, or evicted from the cache of recent portraits); send 'prepare' first")
        qualities = self.info.get("qualities", {"full": ""})
        if req.quality not in qualities:
            raise P.ProtocolError(P.E_UNSUPPORTED, f"quality {req.quality!r} is not offered by this engine; "
                                                   f"choose one of {sorted(qualities)}")
        sizes = [int(s) for s in self.info.get("sizes", [])]
        if req.size is not None and sizes and req.size not in sizes:
            raise P.ProtocolError(P.E_BAD_FIELD, f"size {req.size} is not available; choose one of {sizes}")
        known = self.info.get("attributes", {})
        for name, values in req.attributes.items():
            if name not in known:
                raise P.ProtocolError(P.E_BAD_FIELD, f"unknown attribute {name!r}; available: {sorted(known)}")
            lo, hi = float(known[name]["min"]), float(known[name]["max"])
            if values.size and (values.min() < lo or values.max() > hi):
                raise P.ProtocolError(P.E_BAD_FIELD, f"attribute {name!r} strengths must lie in [{lo}, {hi}], "
                                                     f"got [{values.min():.3g}, {values.max():.3g}]")
        if req.audio is not None and not self.audio_supported():
            why = ("the model has no audio warper weights" if not self.info.get("audio_warper")
                   else self.audio_note)
            raise P.ProtocolError(P.E_UNSUPPORTED, f"audio-driven rendering is not available: {why}; "
                                                   f"send 3DMM rows without audio")
        self.submit(Job(client, req.id, "render", req, credit=req.credit))
        self.reply_to(client, P.reply(P.ACCEPTED, req.id, total=len(req.frames), size=req.size or
                                      int(self.info.get("native_size", 0)), encoding=req.encoding,
                                      credit=req.credit, quality=req.quality, output=req.output))

    def on_extract(self, client, header, parts):
        req = P.validate_extract(header, parts)
        if self.bake.tracker is None:
            raise P.ProtocolError(P.E_UNSUPPORTED, f"extract is not available: {self.bake.extract_note}")
        if req.path is not None:
            self.check_server_path(req.path, "extract", "video")
        self.submit(Job(client, req.id, "extract", req))

    def check_server_path(self, path: str, request: str, noun: str) -> None:
        """A video named by ``path`` (extract, dub): only on a loopback-bound server, and it must exist."""
        if not self.allow_path:
            raise P.ProtocolError(P.E_UNSUPPORTED, f"{request} by 'path' is only allowed when the server is bound "
                                                   f"to a loopback address; send the {noun}'s bytes in 'video'")
        if not os.path.isfile(path):
            raise P.ProtocolError(P.E_BAD_VIDEO, f"{noun} not found on the server machine: {P._brief(path, 300)}; "
                                                 f"give an existing file's path or send its bytes in 'video'")

    def on_audio2exp(self, client, header, parts):
        req = P.validate_audio2exp(header, parts)
        if self.bake.audio2exp is None:
            raise P.ProtocolError(P.E_UNSUPPORTED, f"audio2exp is not available: {self.bake.audio2exp_note}")
        self.submit(Job(client, req.id, "audio2exp", req))

    def on_credit(self, client, header, parts):
        rid, n = P.validate_credit(header, parts)
        self.sched.grant(client, rid, n)

    def on_cancel(self, client, header, parts):
        rid = P.validate_cancel(header, parts)
        if self.sched.cancel(client, rid) == "unknown":   # "ending": its terminal reply, on its way, answers it
            raise P.ProtocolError(P.E_UNKNOWN_REQUEST, f"no running request {rid!r} from this client to cancel")

    def on_forget(self, client, header, parts):
        rid, identity = P.validate_forget(header, parts)
        known = self.sched.known_identity(identity)
        if known and not self.trusted and not self.sched.owns(self.peer, identity):
            known = False     # the same answer as for an unknown identity: no oracle of others' portraits
        if not known:
            raise P.ProtocolError(P.E_UNKNOWN_IDENTITY, f"identity {identity!r} is not known to this server"
                                  + ("" if self.trusted else " (or was prepared by another client)"))
        self.submit(Job(client, rid or f"forget-{identity}", "forget", identity))

    def on_shutdown(self, client, header, parts):
        rid = P.validate_simple(header, parts)
        if not self.trusted:
            raise P.ProtocolError(P.E_FORBIDDEN, "only a client on the server's own machine may shut it down; "
                                                 "ask whoever runs the server to stop it")
        self.reply_to(client, P.reply(P.BYE, rid))
        log.info("shutdown requested by a client")
        self.stopping = True

    # loop ---------------------------------------------------------------------------------
    def _forward_from_worker(self, limit: int = 256) -> None:
        for _ in range(limit):
            try:
                terminal, *frames = self.pair.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.route(frames)
            if terminal.bytes:
                self.sched.reported(frames[0].bytes, terminal.bytes.decode())

    def _tick(self) -> None:
        for client in self.sched.clients():
            self.reply_to(client, P.reply(P.HEARTBEAT, None))
        self.sched.expire_stalled(self.stall_timeout, self.no_credit_timeout)

    def serve(self, ready: Callable[[str], None] | None = None) -> int:
        # everything loaded so far (models, modules) lives as long as the server: move it out of the cyclic
        # garbage collector's view, so that a collection triggered by a client's header (a flood of
        # containers) walks only young objects -- milliseconds, not the ~0.2 s of a full pass over torch
        gc.collect()
        gc.freeze()
        self.worker.start()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.pair, zmq.POLLIN)
        if ready is not None:
            ready(self.endpoint)
        next_tick = time.monotonic() + HEARTBEAT_INTERVAL
        try:
            while not self.stopping:
                timeout = max(0.0, next_tick - time.monotonic())
                events = dict(poller.poll(int(timeout * 1000) + 1))
                if self.pair in events:
                    self._forward_from_worker()
                if self.router in events:
                    for _ in range(64):
                        try:
                            frames = self.router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self.on_message(frames)
                        if self.stopping:
                            break
                if time.monotonic() >= next_tick:
                    self._tick()
                    next_tick = time.monotonic() + HEARTBEAT_INTERVAL
        finally:
            self._shutdown()
        return 0

    def _shutdown(self) -> None:
        self.sched.close()
        deadline = time.monotonic() + 60.0
        while self.worker.is_alive() and time.monotonic() < deadline:
            self.worker.join(0.05)
            self._forward_from_worker()
        self._forward_from_worker(limit=10_000)
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for name in ("pair", "router"):
            s = getattr(self, name, None)
            if s is not None and not s.closed:
                s.close(linger=1000 if name == "router" else 0)
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        if self.own_ctx:
            self.ctx.term()


def on_dub(server: Server, client: bytes, header: dict, parts: list) -> None:
    """``dub`` (main thread): validate, check what this server can do, queue it (the worker's :func:`do_dub`)."""
    req = P.validate_dub(header, parts)
    if server.bake.tracker is None:
        raise P.ProtocolError(P.E_UNSUPPORTED, f"dub is not available: it tracks the plate's face and "
                                               f"{server.bake.extract_note}")
    if not server.info.get("audio_warper") and server.bake.audio2exp is None:
        raise P.ProtocolError(P.E_UNSUPPORTED, "dub is not available: nothing can move the lips (the model has no "
                                               "audio warper and the server no Audio2Exp model)")
    sizes = [int(s) for s in server.info.get("sizes", [])]
    if req.size is not None and sizes and req.size not in sizes:
        raise P.ProtocolError(P.E_BAD_FIELD, f"size {req.size} is not available; choose one of {sizes}")
    if req.path is not None:
        server.check_server_path(req.path, "dub", "plate")
    server.sched.submit(Job(client, req.id, "dub", req, credit=req.credit))


@dataclass(frozen=True)
class Handler:
    """One request type. ``accept`` runs on the main thread: it validates the message and answers it or
    submits a :class:`Job`; ``work`` is the worker's step for that job kind (None: nothing is queued)."""

    accept: Callable[[Server, bytes, dict, list], None]
    work: Callable[[Worker, Job], None] | None = None


HANDLERS: dict[str, Handler] = {
    P.HELLO: Handler(Server.on_hello),
    P.HEARTBEAT: Handler(Server.on_heartbeat),
    P.PREPARE: Handler(Server.on_prepare, Worker.do_prepare),
    P.RENDER: Handler(Server.on_render, Worker.step_render),
    P.EXTRACT: Handler(Server.on_extract, Worker.do_extract),
    P.AUDIO2EXP: Handler(Server.on_audio2exp, Worker.do_audio2exp),
    P.CREDIT: Handler(Server.on_credit),
    P.CANCEL: Handler(Server.on_cancel),
    P.FORGET: Handler(Server.on_forget, Worker.do_forget),
    P.SHUTDOWN: Handler(Server.on_shutdown),
    P.DUB: Handler(on_dub, do_dub),
}
assert set(HANDLERS) == set(P.REQUEST_TYPES), "every request type needs a handler"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
class StartupError(Exception):
    """The server cannot start; the message (one or two sentences) says why and what to do."""


def find_model(args) -> Path | None:
    """The checkpoint folder or bundle to serve (None for --tiny-random); StartupError saying what to do."""
    if args.tiny_random:
        return None
    from server.checkpoints.paths import resolve_checkpoint_dir

    path, source = resolve_checkpoint_dir(args.checkpoints, option="--checkpoints")
    source = "--checkpoints" if source == "--dir" else source
    if not path.is_file() and not path.is_dir():
        raise StartupError(f"styleheat-server: no checkpoints at {path} (from {source}); run 'styleheat download' "
                           f"or pass --checkpoints DIR, or use --tiny-random for a demo")
    return path


def load_models(args) -> tuple["Engine", BakeModels]:
    """The engine and the bake models of the command line ``args``, sharing one tracker: the
    portraits' own 3DMM rows and ``extract`` run the same Deep3D (one ResNet-50 in memory).
    --tiny-random engines get no tracker (their portraits keep no coefficients)."""
    from server.model_options import precision_option, read_config
    from server.engine import Engine, resolve_device

    path = find_model(args)
    hint = "" if args.tiny_random else " (check the files with 'styleheat doctor', or use --tiny-random for a demo)"
    try:
        device = resolve_device(args.device)
        config = read_config(args.config)
    except ValueError as exc:
        raise StartupError(f"styleheat-server: cannot load the model: {exc}") from None
    try:
        bake = load_bake_models(args, str(device))
    except ValueError as exc:
        raise StartupError(f"styleheat-server: {exc}") from None
    shared = dict(tracker=bake.tracker, tracker_note=bake.extract_note)
    shared.update(precision_option(args))
    try:
        if path is None:
            engine = Engine.tiny_random(seed=args.seed, device=device, **precision_option(args))
        elif path.is_file():
            engine = Engine.from_bundle(path, device=device, **shared)
        else:
            engine = Engine.from_checkpoints(path, device=device, config=config, **shared)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise StartupError(f"styleheat-server: cannot load the model: {exc}{hint}") from None
    return engine, bake


def build_parser() -> argparse.ArgumentParser:
    from server.model_options import add_precision_argument

    p = argparse.ArgumentParser(
        prog="styleheat-server",
        description="Serve StyleHEAT to the Blender add-on over ZeroMQ (protocol: docs/protocol.md).")
    p.add_argument("--checkpoints", metavar="DIR",
                   help="checkpoint directory (official files) or a .safetensors bundle; default: "
                        "$STYLEHEAT_CHECKPOINTS or the per-user cache used by 'styleheat download'")
    p.add_argument("--config", metavar="JSON",
                   help="model config JSON (StyleHEATConfig.to_dict()) for checkpoints of a non-standard size "
                        "(e.g. a model trained with 'styleheat train'); default: the official full-size model")
    p.add_argument("--tiny-random", action="store_true",
                   help="serve a tiny model with seeded random weights (tests and demos; every reply says so)")
    p.add_argument("--seed", type=int, default=0, help="seed for --tiny-random (default 0)")
    p.add_argument("--bind", default=DEFAULT_BIND,
                   help=f"ZeroMQ endpoint to bind (default {DEFAULT_BIND}; port * picks a free one). "
                        f"A non-loopback address needs --curve-dir")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="torch device (default auto)")
    p.add_argument("--curve-dir", metavar="DIR",
                   help="CURVE keys: DIR/server.key_secret and DIR/authorized_clients/*.key (clients allowed)")
    p.add_argument("--make-keys", metavar="DIR",
                   help="create server and client CURVE keys in DIR (and authorize the client), then exit")
    p.add_argument("--batch-size", type=int, default=None,
                   help="frames per engine batch (default 8 on CUDA, 2 on CPU; halved on out-of-memory)")
    add_precision_argument(p, tiny_random=True)
    p.add_argument("--max-jobs", type=int, default=16, help="jobs queued or running at once, all clients")
    p.add_argument("--max-jobs-per-client", type=int, default=8, help="jobs queued or running per client")
    p.add_argument("--stall-timeout", type=float, default=600.0,
                   help="seconds a render may wait for credit before it is dropped")
    p.add_argument("--no-credit-timeout", type=float, default=10.0,
                   help="seconds a render that was never granted credit (credit 0) may hold a job slot")
    p.add_argument("--no-local-trust", dest="local_trust", action="store_false",
                   help="treat clients on this machine like remote ones (a shared machine): generic error "
                        "messages, no 'shutdown', 'forget' only of their own portraits, no extract by 'path'")
    p.add_argument("--max-part-bytes", type=int, default=P.MAX_PART_BYTES,
                   help=f"largest bulk part (image, audio) a client may send (default and maximum "
                        f"{P.MAX_PART_BYTES}); frames over 4/3 of this drop the connection")
    p.add_argument("--presets", metavar="FILE",
                   help="expression presets for the add-on's hello: a JSON {\"presets\": {name: [64]}, "
                        "\"pose_presets\": {...}} or the official docs/demo/intuitive_edit/expression.pth "
                        "(default: CHECKPOINTS/expression.pth or CHECKPOINTS/expression_presets.json)")
    p.add_argument("--audio2exp", metavar="PATH",
                   help="SadTalker Audio2Exp checkpoint for the audio2exp request (default: "
                        "CHECKPOINTS/audio2exp*.safetensors|.pth)")
    p.add_argument("--no-bake-models", action="store_true",
                   help="load no Deep3D extractor and no Audio2Exp model (extract and audio2exp answer "
                        "'unsupported'); with --tiny-random the seeded tiny ones are skipped")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s styleheat-server %(levelname)s %(message)s")
    if args.make_keys:
        try:
            made = make_keys(args.make_keys)
        except (OSError, FileExistsError) as exc:
            print(f"styleheat-server: {exc}", file=sys.stderr)
            return 1
        print(f"server keys: {made['server']} (public, give to clients), {made['server_secret']} (keep here)")
        print(f"client keys: {made['client']}, {made['client_secret']} (give both to the client machine)")
        print(f"authorized clients: {made['authorized_clients']} (add more clients' .key files there)")
        print(f"serve with: styleheat-server --bind tcp://0.0.0.0:5555 --curve-dir {args.make_keys}")
        return 0
    if not is_loopback_endpoint(args.bind) and not args.curve_dir:
        print(f"styleheat-server: refusing to bind {args.bind} without encryption: a non-loopback address "
              f"exposes the server to the network. Make keys with 'styleheat-server --make-keys DIR' and pass "
              f"--curve-dir DIR, or bind tcp://127.0.0.1:PORT", file=sys.stderr)
        return 2
    if args.curve_dir:
        try:
            load_server_keys(args.curve_dir)
        except (ValueError, OSError) as exc:
            print(f"styleheat-server: {exc}", file=sys.stderr)
            return 2
    try:
        engine, bake = load_models(args)
    except StartupError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        server = Server(engine, ServerSettings.from_args(args), bake=bake)
    except (OSError, ValueError) as exc:
        print(f"styleheat-server: {exc}", file=sys.stderr)
        return 2

    def stop(signum, frame):
        server.stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    def ready(endpoint: str) -> None:
        info = server.info
        what = "TINY RANDOM weights (not a real model)" if args.tiny_random else \
            f"model {info.get('model')}, real weights: {info.get('real_weights')}"
        caps = [k for k, v in server.capabilities().items() if v]
        print(f"styleheat-server: listening on {endpoint} (device {info.get('device')}, {what}"
              f"{', CURVE' if args.curve_dir else ''}; {len(bake.presets)} expression presets; "
              f"capabilities: {', '.join(caps) or 'none'})", flush=True)

    return server.serve(ready)


if __name__ == "__main__":
    sys.exit(main())