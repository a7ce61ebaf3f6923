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
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from server import protocol as P

log = logging.getLogger("styleheat.server")

SERVER_NAME = "styleheat-server 0.1.0"
DEFAULT_BIND = "tcp://127.0.0.1:5555"
HEARTBEAT_INTERVAL = 1.0
TINY_NOTE = ("this server runs --tiny-random: a tiny model with seeded random weights for tests and demos; "
             "its images are not faces")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


# --------------------------------------------------------------------------------------------
# Addresses and keys
# --------------------------------------------------------------------------------------------
def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address (127.0.0.0/8, ::1, localhost)."""
    transport, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    if ";" in host:  # "source;destination" syntax is for connect; be conservative
        return False
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', 0.0.0.0-like names, interface names, host names


def make_keys(directory: str | os.PathLike) -> dict[str, Path]:
    """Create a CURVE key set: server.key(_secret), client.key(_secret), authorized_clients/client.key."""
    import zmq.auth

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in ("server", "client"):
        if (d / f"{name}.key_secret").exists():
            raise FileExistsError(f"{d / (name + '.key_secret')} already exists; use another directory "
                                  f"or delete the old keys first")
    for name in ("server", "client"):
        pub, sec = zmq.auth.create_certificates(d, name)
        os.chmod(sec, 0o600)
        out[name] = Path(pub)
        out[name + "_secret"] = Path(sec)
    auth_dir = d / "authorized_clients"
    auth_dir.mkdir(exist_ok=True)
    shutil.copy(out["client"], auth_dir / "client.key")
    out["authorized_clients"] = auth_dir
    return out


def load_server_keys(directory: str | os.PathLike) -> tuple[bytes, bytes, Path]:
    """(public, secret, authorized_clients dir) from a --curve-dir; ValueError says what is missing."""
    import zmq.auth

    d = Path(directory)
    secret_file = d / "server.key_secret"
    auth_dir = d / "authorized_clients"
    if not secret_file.is_file():
        raise ValueError(f"{secret_file} not found; create keys with 'styleheat-server --make-keys {d}'")
    if not auth_dir.is_dir() or not any(auth_dir.glob("*.key")):
        raise ValueError(f"{auth_dir} has no client public keys (*.key); copy each client's .key file there")
    pub, sec = zmq.auth.load_certificate(secret_file)
    if not sec:
        raise ValueError(f"{secret_file} holds no secret key")
    return pub, sec, auth_dir


def load_client_keys(directory: str | os.PathLike) -> tuple[bytes, bytes, bytes]:
    """(server public, client public, client secret) for a client using a --make-keys directory.

    OSError for a missing file, ValueError for a file that holds no key (or no secret key).
    """
    import zmq.auth

    d = Path(directory)
    server_pub, _ = zmq.auth.load_certificate(d / "server.key")
    cpub, csec = zmq.auth.load_certificate(d / "client.key_secret")
    if not csec:
        raise ValueError(f"{d / 'client.key_secret'} holds no secret key")
    return server_pub, cpub, csec


# --------------------------------------------------------------------------------------------
# Jobs and the scheduler (shared between the main thread and the worker, under one lock)
# --------------------------------------------------------------------------------------------
class Job:
    def __init__(self, client: bytes, rid: str, kind: str, payload: Any, credit: int = 0):
        self.client = client
        self.id = rid
        self.kind = kind              # "prepare" | "render" | "forget" | "extract" | "audio2exp"
        self.payload = payload
        self.abort: tuple | None = None   # ("cancelled",) | ("error", code, msg) | ("gone",)
        self.granted = credit
        self.produced = 0
        self.last_credit = time.monotonic()
        # worker-only state
        self.gen = None
        self.indices: list[int] = []
        self.batch = 1
        self.audio = None

    @property
    def key(self) -> tuple[bytes, str]:
        return (self.client, self.id)


class Scheduler:
    def __init__(self, max_jobs: int, max_jobs_per_client: int):
        self.cv = threading.Condition()
        self.jobs: dict[tuple[bytes, str], Job] = {}
        self.max_jobs = max_jobs
        self.max_per_client = max_jobs_per_client
        self.closed = False
        self.identities: set[str] = set()

    # main thread -------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.cv:
            if self.closed:
                raise P.ProtocolError(P.E_SHUTTING_DOWN, "the server is shutting down")
            if job.key in self.jobs:
                raise P.ProtocolError(P.E_DUPLICATE, f"request {job.id!r} is still running; use a new id")
            if len(self.jobs) >= self.max_jobs:
                raise P.ProtocolError(P.E_BUSY, f"the server already has {len(self.jobs)} jobs queued or running "
                                                f"(limit {self.max_jobs}); retry when some finish")
            mine = sum(1 for k in self.jobs if k[0] == job.client)
            if mine >= self.max_per_client:
                raise P.ProtocolError(P.E_BUSY, f"this client already has {mine} jobs queued or running "
                                                f"(limit {self.max_per_client}); wait for one to finish")
            self.jobs[job.key] = job
            self.cv.notify_all()

    def grant(self, client: bytes, rid: str, n: int) -> None:
        with self.cv:
            job = self.jobs.get((client, rid))
            if job is None or job.kind != "render":
                return
            job.granted = min(job.granted + n, job.produced + P.MAX_CREDIT)
            job.last_credit = time.monotonic()
            self.cv.notify_all()

    def cancel(self, client: bytes, rid: str) -> bool:
        with self.cv:
            job = self.jobs.get((client, rid))
            if job is None:
                return False
            if job.abort is None:
                job.abort = ("cancelled",)
            self.cv.notify_all()
            return True

    def drop_client(self, client: bytes) -> int:
        with self.cv:
            n = 0
            for job in self.jobs.values():
                if job.client == client and (job.abort is None or job.abort[0] != "gone"):
                    job.abort = ("gone",)
                    n += 1
            self.cv.notify_all()
            return n

    def expire_stalled(self, timeout: float) -> None:
        now = time.monotonic()
        with self.cv:
            for job in self.jobs.values():
                if (job.kind == "render" and job.abort is None and job.granted <= job.produced
                        and now - job.last_credit > timeout):
                    job.abort = ("error", P.E_STALLED,
                                 f"no credit granted for {timeout:.0f} s; the render was dropped "
                                 f"(send 'credit' messages as frames arrive)")
            self.cv.notify_all()

    def count(self) -> int:
        with self.cv:
            return len(self.jobs)

    def clients(self) -> set[bytes]:
        with self.cv:
            return {k[0] for k in self.jobs}

    def close(self) -> None:
        with self.cv:
            self.closed = True
            for job in self.jobs.values():
                if job.abort is None:
                    job.abort = ("error", P.E_SHUTTING_DOWN, "the server is shutting down")
            self.cv.notify_all()

    def known_identity(self, identity: str) -> bool:
        with self.cv:
            return identity in self.identities

    # worker thread -----------------------------------------------------------------------
    def _runnable(self, job: Job) -> bool:
        return job.abort is not None or job.kind != "render" or job.granted > job.produced

    def next_job(self, timeout: float) -> Job | None:
        """The next job with work to do, round robin; None on timeout."""
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                for key, job in self.jobs.items():
                    if self._runnable(job):
                        # rotate: this job goes to the back of the line
                        del self.jobs[key]
                        self.jobs[key] = job
                        return job
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cv.wait(left)

    def credit_left(self, job: Job) -> int:
        with self.cv:
            return job.granted - job.produced

    def produced_one(self, job: Job) -> None:
        with self.cv:
            job.produced += 1

    def finish(self, job: Job) -> None:
        with self.cv:
            self.jobs.pop(job.key, None)
            self.cv.notify_all()

    def add_identity(self, identity: str) -> None:
        with self.cv:
            self.identities.add(identity)

    def set_identities(self, identities) -> None:
        with self.cv:
            self.identities = set(identities)

    def remove_identity(self, identity: str) -> None:
        with self.cv:
            self.identities.discard(identity)

    def idle(self) -> bool:
        with self.cv:
            return not self.jobs


# --------------------------------------------------------------------------------------------
# Out-of-memory detection
# --------------------------------------------------------------------------------------------
def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or a RuntimeError whose message says 'out of memory'."""
    torch = sys.modules.get("torch")
    if torch is not None:
        oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
        if oom_type is not None and isinstance(exc, oom_type):
            return True
    return isinstance(exc, (RuntimeError, MemoryError)) and "out of memory" in str(exc).lower()


def _release_device_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Optional collaborators (server/align.py by FACE, server/audio.py by AUDIO)
# --------------------------------------------------------------------------------------------
def _find_aligner() -> Callable | None:
    """image (H, W, 3) uint8 RGB -> (aligned square RGB, [warnings]); None when no aligner can run here."""
    try:
        from server import align as align_mod
    except ImportError:
        return None
    fn = getattr(align_mod, "align_portrait", None)
    available = getattr(align_mod, "dlib_available", lambda: True)
    try:
        if fn is None or not available():
            return None
    except Exception:
        return None

    def aligner(rgb: np.ndarray):
        out = fn(rgb)
        image = getattr(out, "image", out)
        return np.ascontiguousarray(image, dtype=np.uint8), list(getattr(out, "warnings", []) or [])

    return aligner


def _find_audio_converter() -> Callable | None:
    """(samples, sample_rate, fps, n_rows, first_frame, frame_offset) -> (n_rows, 80, 32) float32, or None.

    Row ``i`` is scene frame ``first_frame + i``; ``samples[0]`` plays at scene frame ``frame_offset``;
    so row ``i`` shows audio time ``(first_frame + i - frame_offset) / fps``.
    """
    try:
        from server import audio as audio_mod
    except ImportError:
        return None
    fn = getattr(audio_mod, "audio_windows_for_frames", None)
    if not callable(fn):
        return None

    def convert(samples, sample_rate, fps, n_rows, first_frame, frame_offset):
        return fn(samples, sample_rate, fps, n_rows, offset_frames=float(first_frame) - float(frame_offset))

    return convert


# --------------------------------------------------------------------------------------------
# Bake models: expression presets, Deep3D extractor (extract), Audio2Exp (audio2exp)
# --------------------------------------------------------------------------------------------
DEEP3D_FILE = "Deep3D/epoch_20.pth"
PRESET_FILES = ("expression.pth", "expression_presets.json")
AUDIO2EXP_PATTERNS = ("audio2exp*.safetensors", "audio2exp*.pth", "auido2exp*.pth", "SadTalker_V0.0.2_*.safetensors")


class BakeModels:
    """What the bake requests need; ``None`` models come with a note saying why (sent as ``unsupported``)."""

    def __init__(self, *, presets: dict | None = None, pose_presets: dict | None = None,
                 presets_source: str | None = None, extractor=None,
                 extract_note: str = "this server was started without a Deep3D extractor",
                 audio2exp=None, audio2exp_note: str = "this server was started without an Audio2Exp model",
                 tiny: bool = False):
        self.presets = presets or {}
        self.pose_presets = pose_presets or {}
        self.presets_source = presets_source
        self.extractor = extractor
        self.extract_note = extract_note
        self.audio2exp = audio2exp
        self.audio2exp_note = audio2exp_note
        self.tiny = tiny


def _preset_vector(value, name: str, width: int, source: str) -> list[float]:
    try:
        arr = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: preset {name!r} is not a list of numbers") from None
    arr = arr.reshape(-1)
    if arr.shape != (width,) or not np.isfinite(arr).all():
        raise ValueError(f"{source}: preset {name!r} must be {width} finite numbers, got {arr.size} values")
    return [float(x) for x in arr.astype(np.float32)]


def load_presets(path: str | os.PathLike) -> tuple[dict, dict]:
    """(expression presets {name: [64]}, pose presets {name: [6]}) from a preset file.

    * JSON ``{"presets": {name: [64 floats]}, "pose_presets": {name: [6 floats]}}`` (pose optional),
      the shape of ``shared/fixtures/expression_presets.json``;
    * the official ``docs/demo/intuitive_edit/expression.pth`` (a dict of tensors keyed
      ``expression_center`` ...), read with ``torch.load(weights_only=True)``; the ``expression_``
      prefix is dropped, 6-value entries are pose presets.

    ValueError names the file and what is wrong.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ValueError(f"preset file {source} not found")
    if path.suffix.lower() == ".json":
        import json

        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{source} is not readable JSON ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("presets"), dict):
            raise ValueError(f"{source} must be a JSON object with a 'presets' map name -> 64 numbers "
                             f"(and optionally 'pose_presets' name -> 6 numbers)")
        pose = obj.get("pose_presets", {})
        if not isinstance(pose, dict):
            raise ValueError(f"{source}: 'pose_presets' must be a map name -> 6 numbers")
        exp = {str(k): _preset_vector(v, k, P.EXP_WIDTH, source) for k, v in obj["presets"].items()}
        return exp, {str(k): _preset_vector(v, k, P.POSE_WIDTH, source) for k, v in pose.items()}
    from server.weights import torch_load

    try:
        obj = torch_load(path)
    except Exception as exc:  # noqa: BLE001 -- any unreadable file is a clear startup error
        raise ValueError(f"{source} cannot be read as a weights-only torch file ({type(exc).__name__}: {exc})") \
            from None
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{source} must hold a dict of preset tensors (expression_center, expression_mouth, ...)")
    exp, pose = {}, {}
    for k, v in obj.items():
        name = str(k)
        n = int(np.prod(getattr(v, "shape", np.shape(v)))) if not isinstance(v, (str, bytes)) else -1
        if n == P.POSE_WIDTH:
            pose[name] = _preset_vector(v, name, P.POSE_WIDTH, source)
        else:
            exp[name[len("expression_"):] if name.startswith("expression_") else name] = \
                _preset_vector(v, name, P.EXP_WIDTH, source)
    return exp, pose


def tiny_deep3d(seed: int = 0, device: str = "cpu"):
    """The --tiny-random Deep3D extractor: ``torch.manual_seed(seed); ReconNet(Deep3DConfig.tiny())``."""
    import torch

    from models.deep3d import Deep3DConfig, ReconNet
    from server.deep3d import Deep3DExtractor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ReconNet(Deep3DConfig.tiny())
    return Deep3DExtractor(net.eval(), None, device)


def tiny_audio2exp(seed: int = 0, device: str = "cpu"):
    """The --tiny-random Audio2Exp: ``torch.manual_seed(seed); Audio2Exp(Audio2ExpConfig.tiny()).eval()``."""
    import torch

    from models.audio2exp import Audio2Exp, Audio2ExpConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Audio2Exp(Audio2ExpConfig.tiny())
    return model.to(device).eval()


def find_audio2exp(directory: Path) -> Path | None:
    for pattern in AUDIO2EXP_PATTERNS:
        for root in (directory, directory / "checkpoints"):
            hits = sorted(root.glob(pattern)) if root.is_dir() else []
            if hits:
                return hits[0]
    return None


def load_bake_models(args, engine) -> BakeModels:
    """Presets (fatal if --presets is bad), Deep3D and Audio2Exp (a failure only disables the request)."""
    presets, pose, source = {}, {}, None
    checkpoints: Path | None = None
    if not args.tiny_random:
        from server.paths import resolve_checkpoint_dir

        path, _ = resolve_checkpoint_dir(args.checkpoints, option="--checkpoints")
        checkpoints = path.parent if path.is_file() else path
    if args.presets:
        presets, pose = load_presets(args.presets)
        source = str(args.presets)
    elif checkpoints is not None:
        for name in PRESET_FILES:
            if (checkpoints / name).is_file():
                presets, pose = load_presets(checkpoints / name)
                source = str(checkpoints / name)
                break
    device = str(getattr(engine, "device", "cpu"))
    bake = BakeModels(presets=presets, pose_presets=pose, presets_source=source, tiny=args.tiny_random)
    if args.no_bake_models:
        bake.extract_note = "this server was started with --no-bake-models (no Deep3D extractor)"
        bake.audio2exp_note = ("this server was started with --no-bake-models (no Audio2Exp model); restart "
                               "it without that option, with --audio2exp PATH")
        return bake
    if args.tiny_random:
        bake.extractor = tiny_deep3d(args.seed, device)
        bake.extract_note = "tiny random Deep3D (seeded, not real weights): its coefficients are noise"
        bake.audio2exp = tiny_audio2exp(args.seed, device)
        bake.audio2exp_note = "tiny random Audio2Exp (seeded, not real weights): its expressions are noise"
        if args.audio2exp is None:
            return bake
    if not args.tiny_random:
        from server.deep3d import Deep3DExtractor

        deep3d = checkpoints / DEEP3D_FILE
        if not deep3d.is_file():
            bake.extract_note = (f"no Deep3D weights: {deep3d} is missing; run 'styleheat download' (it fetches "
                                 f"Deep3D/epoch_20.pth) or pass --checkpoints DIR holding it")
        else:
            try:
                bake.extractor = Deep3DExtractor.from_checkpoints(checkpoints, device=device)
                bake.extract_note = f"Deep3D from {deep3d}"
            except Exception as exc:  # noqa: BLE001 -- the server still renders without it
                bake.extract_note = f"the Deep3D weights {deep3d} could not be loaded ({exc}); check them with 'styleheat doctor'"
                log.warning("%s", bake.extract_note)
    a2e_path = Path(args.audio2exp) if args.audio2exp else (find_audio2exp(checkpoints) if checkpoints else None)
    if a2e_path is None:
        bake.audio2exp_note = (f"no Audio2Exp checkpoint: none of {', '.join(AUDIO2EXP_PATTERNS)} in "
                               f"{checkpoints}; pass --audio2exp PATH (SadTalker's auido2exp_00300-model.pth "
                               f"or SadTalker_V0.0.2_256.safetensors)")
    else:
        from server.audio import load_audio2exp

        try:
            bake.audio2exp = load_audio2exp(a2e_path, device=device)
            bake.audio2exp_note = f"Audio2Exp from {a2e_path}"
        except (ValueError, OSError) as exc:
            if args.audio2exp:
                raise ValueError(f"--audio2exp {args.audio2exp}: {exc}") from None
            bake.audio2exp_note = (f"the Audio2Exp checkpoint {a2e_path} could not be loaded ({exc}); pass a "
                                   f"working one with --audio2exp PATH")
            log.warning("%s", bake.audio2exp_note)
    return bake


def _video_suffix(data: bytes) -> str:
    if data[:4] == b"RIFF":
        return ".avi"
    if data[4:8] == b"ftyp":
        return ".mp4"
    if data[:4] == b"\x1aE\xdf\xa3":
        return ".mkv"
    return ".video"


def encode_png(rgb: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("OpenCV could not encode a PNG")
    return buf.tobytes()


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or a JPEG SOF header, without decoding; None if not found."""
    if data.startswith(PNG_MAGIC):
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if length < 2:
            return None
        i += 2 + length
    return None


def decode_image(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB from PNG/JPEG bytes; ProtocolError(bad_image) otherwise."""
    if not (data.startswith(PNG_MAGIC) or data.startswith(JPEG_MAGIC)):
        raise P.ProtocolError(P.E_BAD_IMAGE, "the image part is neither PNG nor JPEG; send the file bytes "
                                             "of a .png or .jpg portrait")
    dims = image_size(data)
    if dims is not None and max(dims) > P.MAX_IMAGE_SIDE:
        raise P.ProtocolError(P.E_BAD_IMAGE, f"the image is {dims[0]}x{dims[1]}; sides must be at most "
                                             f"{P.MAX_IMAGE_SIDE} pixels (downscale the portrait)")
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise P.ProtocolError(P.E_BAD_IMAGE, "OpenCV could not decode the image (truncated or corrupt "
                                             "PNG/JPEG); re-export the portrait")
    h, w = bgr.shape[:2]
    if min(h, w) < P.MIN_IMAGE_SIDE or max(h, w) > P.MAX_IMAGE_SIDE:
        raise P.ProtocolError(P.E_BAD_IMAGE, f"the image is {w}x{h}; sides must be between "
                                             f"{P.MIN_IMAGE_SIDE} and {P.MAX_IMAGE_SIDE} pixels")
    return np.ascontiguousarray(bgr[..., ::-1])


# --------------------------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------------------------
class Worker(threading.Thread):
    def __init__(self, server: "Server"):
        super().__init__(name="styleheat-engine", daemon=True)
        self.server = server
        self.engine = server.engine
        self.sched = server.sched
        self.out: zmq.Socket | None = None

    # every message leaves through the PAIR; the main thread forwards it to the ROUTER
    def send(self, client: bytes, header: dict, parts: tuple = ()) -> None:
        assert self.out is not None
        self.out.send_multipart([client, P.pack_header(self.server.decorate(header)), *parts], copy=False)

    def run(self) -> None:
        self.out = self.server.ctx.socket(zmq.PAIR)
        self.out.setsockopt(zmq.LINGER, 0)
        self.out.connect(self.server.pair_endpoint)
        try:
            while True:
                job = self.sched.next_job(timeout=0.25)
                if job is None:
                    if self.sched.closed and self.sched.idle():
                        break
                    continue
                try:
                    self.step(job)
                except Exception as exc:  # one failing request never takes the server down
                    log.exception("request %s failed", job.id)
                    self._close_gen(job)
                    self.sched.finish(job)
                    if job.abort is None or job.abort[0] != "gone":
                        self.send(job.client, P.error_reply(job.id, P.E_INTERNAL,
                                                            f"the server failed on this request "
                                                            f"({type(exc).__name__}: {exc}); other requests "
                                                            f"are unaffected"))
        finally:
            self.out.close(linger=1000)

    @staticmethod
    def _close_gen(job: Job) -> None:
        gen, job.gen = job.gen, None
        if gen is not None:
            try:
                gen.close()
            except Exception:
                pass

    def end_aborted(self, job: Job) -> None:
        self._close_gen(job)
        self.sched.finish(job)
        self._report_abort(job)

    def _report_abort(self, job: Job) -> None:
        """Tell the client how its aborted job ended: ``done`` (cancelled) or its error."""
        reason = job.abort
        if reason[0] == "cancelled":
            total = len(job.payload.frames) if job.kind == "render" else 1
            self.send(job.client, P.reply(P.DONE, job.id, sent=job.produced, total=total, cancelled=True))
        elif reason[0] == "error":
            self.send(job.client, P.error_reply(job.id, reason[1], reason[2]))
        # "gone": nobody to tell

    def step(self, job: Job) -> None:
        if job.abort is not None:
            self.end_aborted(job)
        elif job.kind == "prepare":
            self.do_prepare(job)
        elif job.kind == "forget":
            self.do_forget(job)
        elif job.kind == "extract":
            self.do_extract(job)
        elif job.kind == "audio2exp":
            self.do_audio2exp(job)
        else:
            self.step_render(job)

    # prepare -------------------------------------------------------------------------------
    def do_prepare(self, job: Job) -> None:
        req: P.PrepareRequest = job.payload
        try:
            rgb = decode_image(req.image)
            aligner = self.server.aligner
            if req.align and aligner is not None:
                try:
                    aligned, warnings = aligner(rgb)
                except ValueError as exc:
                    raise P.ProtocolError(P.E_BAD_IMAGE, f"face alignment failed: {exc}") from None
                did_align = True
                note = "aligned by the server (FFHQ alignment)" + "".join(f"; {w}" for w in warnings)
            else:
                if rgb.shape[0] != rgb.shape[1]:
                    raise P.ProtocolError(P.E_BAD_IMAGE,
                                          f"the image is {rgb.shape[1]}x{rgb.shape[0]} and the server does not "
                                          f"align it ({'align=false' if not req.align else 'no aligner installed'}); "
                                          f"send a square FFHQ-aligned portrait")
                aligned, did_align = rgb, False
                note = ("used as given (align=false): it must be an FFHQ-aligned portrait" if not req.align else
                        "used as given: this server has no face aligner (server/align.py), so the image must "
                        "already be an FFHQ-aligned portrait")
            try:
                known = set(self.server.coefficient_notes)
                info = self.engine.prepare_identity(aligned)
                if info.id not in known:
                    note_c = info.coefficient_note
                    if note_c is None and info.coefficients is None:
                        note_c = "no 3DMM regressor produced coefficients for this portrait"
                    self.server.coefficient_notes[info.id] = note_c
                    while len(self.server.coefficient_notes) > 256:
                        self.server.coefficient_notes.pop(next(iter(self.server.coefficient_notes)))
                self._sync_identities()
            except ValueError as exc:
                raise P.ProtocolError(P.E_BAD_IMAGE, str(exc)) from None
            except Exception as exc:
                if is_out_of_memory(exc):
                    _release_device_memory()
                    raise P.ProtocolError(P.E_OUT_OF_MEMORY, "the device ran out of memory inverting the "
                                                             "portrait; free GPU memory and retry") from None
                raise
        except P.ProtocolError as exc:
            self.sched.finish(job)
            self.send(job.client, P.error_reply(job.id, exc.code, exc.message))
            return
        self.sched.add_identity(info.id)
        png = encode_png(aligned)
        coeffs = None if info.coefficients is None else [float(x) for x in np.asarray(info.coefficients).ravel()]
        if self._finish_or_abort(job):
            return
        self.send(job.client, P.reply(P.PREPARED, job.id, identity=info.id, aligned=did_align, align_note=note,
                                      coefficients=coeffs,
                                      coefficient_note=self.server.coefficient_notes.get(info.id),
                                      width=int(aligned.shape[1]),
                                      height=int(aligned.shape[0]), encoding="png"), (png,))

    # extract / audio2exp ----------------------------------------------------------------------
    def _finish_or_abort(self, job: Job) -> bool:
        """Finish the job; True when it was cancelled/aborted meanwhile (and that was reported)."""
        self.sched.finish(job)
        if job.abort is None:
            return False
        self._report_abort(job)
        return True

    def do_extract(self, job: Job) -> None:
        import tempfile

        from server import tracking

        req: P.ExtractRequest = job.payload
        tmp = None
        last = [0.0]

        def progress(stage: str, done: int, total: int) -> None:
            now = time.monotonic()
            if done <= 1 or (total > 0 and done >= total) or now - last[0] >= 0.25:  # at most ~4/s
                last[0] = now
                self.send(job.client, P.reply(P.PROGRESS, job.id, stage=stage, done=int(done), total=int(total),
                                              message=f"{'landmarks' if stage == 'landmarks' else '3DMM'}: "
                                                      f"{done}/{total or '?'} frames"))

        try:
            try:
                if req.video is not None:
                    fd, tmp = tempfile.mkstemp(prefix="styleheat-extract-", suffix=_video_suffix(req.video))
                    with os.fdopen(fd, "wb") as f:
                        f.write(req.video)
                    path = tmp
                else:
                    path = req.path
                result = tracking.track_video(path, self.server.bake.extractor, curve_sigma=req.smooth,
                                              progress=progress, should_stop=lambda: job.abort is not None)
            finally:  # the copy is gone before any reply leaves
                if tmp is not None:
                    try:
                        os.unlink(tmp)
                    except OSError:
                        log.warning("could not delete the temporary video %s", tmp)
            rows, fps = result.rows, float(result.fps)
            if req.fps is not None and abs(req.fps - fps) > 1e-6:
                rows, fps = tracking.resample_rows(rows, fps, req.fps), float(req.fps)
            if not np.isfinite(rows).all():
                raise RuntimeError("the 3DMM regressor produced non-finite coefficients")
        except tracking.Cancelled:
            self._finish_or_abort(job)
            return
        except tracking.VideoError as exc:
            if not self._finish_or_abort(job):
                self.send(job.client, P.error_reply(job.id, P.E_BAD_VIDEO, str(exc)))
            return
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            _release_device_memory()
            if not self._finish_or_abort(job):
                self.send(job.client, P.error_reply(job.id, P.E_OUT_OF_MEMORY,
                                                    "the device ran out of memory running the 3DMM regressor; "
                                                    "free GPU memory and retry"))
            return
        if self._finish_or_abort(job):
            return
        warnings = list(result.warnings)
        if self.server.tiny_random:
            warnings.append("tiny random Deep3D weights: these coefficients are noise, not a real 3DMM fit")
        header, parts = P.extracted_reply(job.id, fps, rows, warnings)
        self.send(job.client, header, tuple(parts))

    def do_audio2exp(self, job: Job) -> None:
        from server.audio import audio_to_expression

        req: P.Audio2ExpRequest = job.payload
        try:
            rows = audio_to_expression(req.audio.samples, req.audio.sample_rate, req.fps, req.ref_exp,
                                       model=self.server.bake.audio2exp, n_frames=req.n_frames,
                                       offset_frames=req.audio_offset_frames)
        except ValueError as exc:
            if not self._finish_or_abort(job):
                self.send(job.client, P.error_reply(job.id, P.E_BAD_FIELD, f"audio2exp: {exc}"))
            return
        if self._finish_or_abort(job):
            return
        header, parts = P.expressions_reply(job.id, rows)
        self.send(job.client, header, tuple(parts))

    def do_forget(self, job: Job) -> None:
        identity = job.payload
        self.sched.finish(job)
        self.engine.forget_identity(identity)
        self.sched.remove_identity(identity)
        self._sync_identities()
        self.send(job.client, P.reply(P.FORGOTTEN, job.id, identity=identity))

    def _sync_identities(self) -> None:
        """The engine's cache is an LRU: mirror which identities it still holds."""
        ids = getattr(self.engine, "identity_ids", None)
        if callable(ids):
            self.sched.set_identities(ids())

    # render --------------------------------------------------------------------------------
    def _start(self, job: Job, indices: list[int]):
        req: P.RenderRequest = job.payload
        return iter(self.engine.render(
            req.identity, req.rows, indices, audio=job.audio, attributes=req.attributes or None,
            size=req.size, batch_size=job.batch, should_stop=lambda: job.abort is not None))

    def _progress(self, job: Job, stage: str, message: str, **extra) -> None:
        self.send(job.client, P.reply(P.PROGRESS, job.id, done=job.produced, total=len(job.indices),
                                      stage=stage, message=message, **extra))

    def step_render(self, job: Job) -> None:
        """One step of a render: at most one batch, and never more frames than the credit left."""
        req: P.RenderRequest = job.payload
        if job.gen is None and job.produced == 0:
            job.indices = req.indices
            job.batch = self.server.batch_size
            if req.audio is not None:
                conv = self.server.audio_converter
                a = req.audio
                try:
                    job.audio = np.asarray(conv(a.samples, a.sample_rate, a.fps, req.rows.shape[0],
                                                req.first_frame, a.frame_offset), dtype=np.float32)
                except ValueError as exc:
                    self._fail(job, P.E_BAD_FIELD, f"audio: {exc}")
                    return
            try:
                job.gen = self._start(job, job.indices)
            except ValueError as exc:
                self._sync_identities()
                code = P.E_BAD_FIELD if self.sched.known_identity(req.identity) else P.E_UNKNOWN_IDENTITY
                self._fail(job, code, str(exc))
                return
            self._progress(job, "rendering", f"rendering {len(job.indices)} frames, batch size {job.batch}",
                           batch_size=job.batch)
        want = min(job.batch, self.sched.credit_left(job))
        pulled: list[tuple[int, np.ndarray]] = []
        failure: tuple[str, str] | None = None
        oom = finished = False
        for _ in range(max(want, 0)):
            if job.abort is not None:
                break
            try:
                idx, img = next(job.gen)
            except StopIteration:
                finished = True
                break
            except ValueError as exc:
                failure = (P.E_BAD_FIELD, str(exc))
                break
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                oom = True
                break
            expected = job.indices[job.produced + len(pulled)]
            if int(idx) != expected:
                raise RuntimeError(f"engine yielded row {idx}, expected {expected}")
            img = np.ascontiguousarray(img)
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise RuntimeError(f"engine yielded an image of shape {img.shape} dtype {img.dtype}")
            if req.size is not None and img.shape[:2] != (req.size, req.size):
                raise RuntimeError(f"engine yielded {img.shape[1]}x{img.shape[0]}, requested {req.size}")
            pulled.append((expected, img))
        # encode (PNG in parallel threads: OpenCV releases the GIL) and send in order
        if req.encoding == "png" and pulled:
            datas = list(self.server.encoder_pool().map(encode_png, [img for _, img in pulled]))
        else:
            datas = [memoryview(img).cast("B") for _, img in pulled]
        for (row, img), data in zip(pulled, datas):
            hdr = P.frame_reply(job.id, frame=req.first_frame + row, index=job.produced, total=len(job.indices),
                                width=int(img.shape[1]), height=int(img.shape[0]), encoding=req.encoding)
            self.send(job.client, hdr, (data,))
            self.sched.produced_one(job)
        if pulled and job.produced < len(job.indices) and job.produced % job.batch < len(pulled):
            self._progress(job, "rendering", f"{job.produced}/{len(job.indices)} frames")
        if failure is not None:
            self._fail(job, *failure)
        elif job.abort is not None:
            self.end_aborted(job)
        elif oom:
            self._close_gen(job)
            _release_device_memory()
            if job.batch <= 1:
                self._fail(job, P.E_OUT_OF_MEMORY, "the device ran out of memory even at batch size 1; "
                                                   "render a smaller size or free GPU memory")
                return
            job.batch = max(1, job.batch // 2)
            self._progress(job, "oom_retry", f"out of device memory; retrying with batch size {job.batch}",
                           batch_size=job.batch)
            job.gen = self._start(job, job.indices[job.produced:])
        elif job.produced >= len(job.indices):
            self._close_gen(job)
            self.sched.finish(job)
            self.send(job.client, P.reply(P.DONE, job.id, sent=job.produced, total=len(job.indices),
                                          cancelled=False))
        elif finished:
            raise RuntimeError(f"the engine stopped after {job.produced} of {len(job.indices)} frames")

    def _fail(self, job: Job, code: str, message: str) -> None:
        self._close_gen(job)
        self.sched.finish(job)
        self.send(job.client, P.error_reply(job.id, code, message))


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------
class Server:
    def __init__(self, engine, bind: str = DEFAULT_BIND, *, tiny_random: bool = False,
                 curve_dir: str | os.PathLike | None = None, batch_size: int | None = None, max_jobs: int = 16,
                 max_jobs_per_client: int = 8, stall_timeout: float = 600.0,
                 max_part_bytes: int = P.MAX_PART_BYTES,
                 ctx: zmq.Context | None = None, bake: BakeModels | None = None):
        if not is_loopback_endpoint(bind) and curve_dir is None:
            raise ValueError(
                f"refusing to bind {bind}: it is not a loopback address, and without encryption anyone on the "
                f"network could drive this server. Pass --curve-dir DIR with CURVE keys (make them with "
                f"'styleheat-server --make-keys DIR' and give the client its client.key_secret and "
                f"server.key), or bind tcp://127.0.0.1:PORT")
        self.engine = engine
        self.tiny_random = tiny_random
        self.bake = bake or BakeModels(tiny=tiny_random)
        # extract's 'path' names a file on this machine: only for clients on this machine
        self.allow_path = is_loopback_endpoint(bind)
        self.coefficient_notes: dict[str, str | None] = {}
        if batch_size is None:
            batch_size = 8 if getattr(getattr(engine, "device", None), "type", "cpu") == "cuda" else 2
        self.batch_size = max(1, int(batch_size))
        self.stall_timeout = stall_timeout
        self.max_part_bytes = int(min(max_part_bytes, P.MAX_PART_BYTES))
        self.max_header_bytes = int(min(self.max_part_bytes, P.MAX_HEADER_BYTES))
        # frames over MAXMSGSIZE drop the connection (no reply possible); between the part limit and
        # MAXMSGSIZE the client gets a 'too_large' error reply
        self.max_message_bytes = self.max_part_bytes * 4 // 3
        self.sched = Scheduler(max_jobs, max_jobs_per_client)
        self.aligner = _find_aligner()
        self.audio_converter = _find_audio_converter()
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
        self.worker = Worker(self)

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
            limits=dict(max_message_bytes=self.max_message_bytes, max_header_bytes=self.max_header_bytes,
                        max_part_bytes=self.max_part_bytes, max_parts=P.MAX_PARTS, max_rows=P.MAX_ROWS,
                        max_frames=P.MAX_FRAMES, max_credit=P.MAX_CREDIT, default_credit=P.DEFAULT_CREDIT,
                        max_image_side=P.MAX_IMAGE_SIDE, max_jobs=self.sched.max_jobs,
                        max_jobs_per_client=self.sched.max_per_client, batch_size=self.batch_size))

    def capabilities(self) -> dict[str, bool]:
        return {"extract": self.bake.extractor is not None and self.aligner is not None,
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
    def on_message(self, frames: list) -> None:
        client = frames[0].bytes
        rid = None
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
            getattr(self, "on_" + kind)(client, header, parts)
        except P.ProtocolError as exc:
            self.reply_to(client, P.error_reply(rid, exc.code, exc.message))
        except Exception as exc:
            log.exception("unexpected failure handling a message")
            self.reply_to(client, P.error_reply(rid, P.E_INTERNAL, f"the server failed on this message "
                                                                  f"({type(exc).__name__}: {exc})"))

    def on_hello(self, client, header, parts):
        rid = P.validate_hello(header, parts)
        self.reply_to(client, P.reply(P.HELLO, rid, **self.hello_fields()))

    def on_heartbeat(self, client, header, parts):
        rid = P.validate_simple(header, parts)
        self.reply_to(client, P.reply(P.HEARTBEAT, rid))

    def on_prepare(self, client, header, parts):
        req = P.validate_prepare(header, parts)
        self.sched.submit(Job(client, req.id, "prepare", req))

    def on_render(self, client, header, parts):
        req = P.validate_render(header, parts)
        if not self.sched.known_identity(req.identity):
            raise P.ProtocolError(P.E_UNKNOWN_IDENTITY,
                                  f"identity {req.identity!r} is not known to this server (never prepared here, "
                                  f"forgotten, or evicted from the cache of recent portraits); send 'prepare' first")
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
                   else "the server's audio module (server/audio.py) is not installed")
            raise P.ProtocolError(P.E_UNSUPPORTED, f"audio-driven rendering is not available: {why}; "
                                                   f"send 3DMM rows without audio")
        self.sched.submit(Job(client, req.id, "render", req, credit=req.credit))
        self.reply_to(client, P.reply(P.ACCEPTED, req.id, total=len(req.frames), size=req.size or
                                      int(self.info.get("native_size", 0)), encoding=req.encoding,
                                      credit=req.credit))

    def on_extract(self, client, header, parts):
        req = P.validate_extract(header, parts)
        if self.bake.extractor is None:
            raise P.ProtocolError(P.E_UNSUPPORTED, f"extract is not available: {self.bake.extract_note}")
        if self.aligner is None:
            raise P.ProtocolError(P.E_UNSUPPORTED, "extract is not available: it needs the dlib face landmark "
                                                   "detector (pip install dlib==20.0.1 face_recognition_models==0.3.0)")
        if req.path is not None:
            if not self.allow_path:
                raise P.ProtocolError(P.E_UNSUPPORTED, "extract by 'path' is only allowed when the server is bound "
                                                       "to a loopback address; send the video bytes in 'video'")
            if not os.path.isfile(req.path):
                raise P.ProtocolError(P.E_BAD_VIDEO, f"video not found on the server machine: {req.path!r:.300}; "
                                                     f"give an existing file's path or send its bytes in 'video'")
        self.sched.submit(Job(client, req.id, "extract", req))

    def on_audio2exp(self, client, header, parts):
        req = P.validate_audio2exp(header, parts)
        if self.bake.audio2exp is None:
            raise P.ProtocolError(P.E_UNSUPPORTED, f"audio2exp is not available: {self.bake.audio2exp_note}")
        self.sched.submit(Job(client, req.id, "audio2exp", req))

    def on_credit(self, client, header, parts):
        rid, n = P.validate_credit(header, parts)
        self.sched.grant(client, rid, n)

    def on_cancel(self, client, header, parts):
        rid = P.validate_cancel(header, parts)
        if not self.sched.cancel(client, rid):
            raise P.ProtocolError(P.E_UNKNOWN_REQUEST, f"no running request {rid!r} from this client to cancel")

    def on_forget(self, client, header, parts):
        rid, identity = P.validate_forget(header, parts)
        if not self.sched.known_identity(identity):
            raise P.ProtocolError(P.E_UNKNOWN_IDENTITY, f"identity {identity!r} is not known to this server")
        self.sched.submit(Job(client, rid or f"forget-{identity}", "forget", identity))

    def on_shutdown(self, client, header, parts):
        rid = P.validate_simple(header, parts)
        self.reply_to(client, P.reply(P.BYE, rid))
        log.info("shutdown requested by a client")
        self.stopping = True

    # loop ---------------------------------------------------------------------------------
    def _forward_from_worker(self, limit: int = 256) -> None:
        for _ in range(limit):
            try:
                frames = self.pair.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.route(frames)

    def _tick(self) -> None:
        for client in self.sched.clients():
            self.reply_to(client, P.reply(P.HEARTBEAT, None))
        self.sched.expire_stalled(self.stall_timeout)

    def serve(self, ready: Callable[[str], None] | None = None) -> int:
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


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def load_engine(args):
    from server.engine import Engine

    if args.tiny_random:
        return Engine.tiny_random(seed=args.seed, device=resolve_device(args.device))
    from server.paths import resolve_checkpoint_dir

    path, source = resolve_checkpoint_dir(args.checkpoints, option="--checkpoints")
    source = "--checkpoints" if source == "--dir" else source
    if path.is_file():
        return Engine.from_bundle(path, device=args.device)
    if not path.is_dir():
        raise SystemExit(f"styleheat-server: no checkpoints at {path} (from {source}); run 'styleheat download' "
                         f"or pass --checkpoints DIR, or use --tiny-random for a demo")
    return Engine.from_checkpoints(path, device=args.device)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="styleheat-server",
        description="Serve StyleHEAT to the Blender add-on over ZeroMQ (protocol: docs/protocol.md).")
    p.add_argument("--checkpoints", metavar="DIR",
                   help="checkpoint directory (official files) or a .safetensors bundle; default: "
                        "$STYLEHEAT_CHECKPOINTS or the per-user cache used by 'styleheat download'")
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
    p.add_argument("--max-jobs", type=int, default=16, help="jobs queued or running at once, all clients")
    p.add_argument("--max-jobs-per-client", type=int, default=8, help="jobs queued or running per client")
    p.add_argument("--stall-timeout", type=float, default=600.0,
                   help="seconds a render may wait for credit before it is dropped")
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
        engine = load_engine(args)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        hint = "" if args.tiny_random else " (check the files with 'styleheat doctor', or use --tiny-random for a demo)"
        print(f"styleheat-server: cannot load the model: {exc}{hint}", file=sys.stderr)
        return 2
    try:
        bake = load_bake_models(args, engine)
    except ValueError as exc:
        print(f"styleheat-server: {exc}", file=sys.stderr)
        return 2
    try:
        server = Server(engine, args.bind, tiny_random=args.tiny_random, curve_dir=args.curve_dir,
                        batch_size=args.batch_size, max_jobs=args.max_jobs,
                        max_jobs_per_client=args.max_jobs_per_client, stall_timeout=args.stall_timeout,
                        max_part_bytes=args.max_part_bytes, bake=bake)
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
