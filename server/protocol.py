"""StyleHEAT wire protocol, version 1: the schema shared by the server and the Blender add-on.

This module is the single source of truth for message types, fields and limits. It imports only
the standard library, ``msgpack`` and ``numpy`` (no torch, no zmq, no bpy) so that the add-on can
vendor a verbatim copy. The prose version is ``docs/protocol.md``.

Transport: a ZeroMQ DEALER (client) connects to the server's ROUTER. Every message is multipart::

    [header, part0, part1, ...]

``header`` is a msgpack map (``use_bin_type=True``); the parts are raw bytes (encoded images, PCM
samples, pixels). Pixels and other bulk data are never inside the msgpack header of a reply.

Helpers here:

* :func:`pack` / :func:`unpack` -- header + parts <-> list of frames, with strict limits.
* :func:`request` -- build a client request header (the add-on uses this).
* :func:`array_field` / :func:`decode_array` -- numpy arrays in headers (inline or by part).
* ``validate_*`` -- schema checks of every request, raising :class:`ProtocolError` with a code and
  a sentence. The server runs them; a client may run them before sending.
* :func:`decode_raw_frame` -- turn a ``frame`` reply's raw RGB8 part into an ``(H, W, 3)`` array.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

# --------------------------------------------------------------------------------------------
# Limits (the server advertises them in its hello reply; a client should respect them)
# --------------------------------------------------------------------------------------------
MiB = 1 << 20
MAX_HEADER_BYTES = 2 * MiB         # msgpack header of one message (see "Hostile input limits" below)
MAX_PART_BYTES = 96 * MiB          # one bulk part (encoded image, PCM samples)
MAX_PARTS = 4                      # bulk parts after the header
MAX_MESSAGE_BYTES = 128 * MiB      # zmq MAXMSGSIZE per frame; bigger frames drop the connection
MAX_ID_LENGTH = 64                 # request ids and identity ids
MAX_ROWS = 20_000                  # rows (frames of coefficients) in one render request
MAX_FRAMES = 20_000                # frames rendered by one request
MAX_CREDIT = 64                    # granted-but-unsent frames one request may hold
DEFAULT_CREDIT = 4                 # initial credit when a render request does not say
MAX_IMAGE_SIDE = 8192              # decoded portrait side, pixels
MIN_IMAGE_SIDE = 64
MAX_AUDIO_SAMPLES = MAX_PART_BYTES // 4
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 192_000
MAX_FPS = 240.0
MIN_AUDIO2EXP_FPS = 1.0
MAX_POSE_STYLE = 45                # Audio2Pose styles 0..45
MAX_POSE_SCALE = 10.0              # head-motion amplitude factor
MAX_SEED = 2 ** 31 - 1
MAX_BLINK_RATE = 120.0             # blinks per minute
DEFAULT_BLINK_RATE = 15.0          # a typical human rate (SadTalker's random blinks come every 0.4..2.8 s)
POSE_WIDTH = 6                     # angles 3 + translation 3
MAX_ATTRIBUTES = 64
MAX_FRAME_NUMBER = 10_000_000      # |scene frame numbers|
MAX_PATH_LENGTH = 4096             # extract: server-side video path
MAX_SMOOTH = 100.0                 # extract: curve smoothing sigma, frames
EXP_WIDTH = 64                     # expression coefficients (the first 64 of a row)
POSE_WIDTH = 6                     # pose presets: angles 3 + trans 3 (row indices 64:70)
EXTRACT_STAGES = ("landmarks", "3dmm")
CAPABILITIES = ("extract", "audio2exp", "align", "audio")

ROW_WIDTH = 73                     # exp 64 | angles 3 | trans 3 | crop 3
ROW_LAYOUT = ("exp", 64, "angle", 3, "trans", 3, "crop", 3)
ENCODINGS = ("raw", "png")
#: render qualities (models.styleheat.QUALITIES says what each computes; the hello carries those sentences)
QUALITIES = ("full", "preview")
#: render outputs (server/shots/compositing.py OUTPUT_TEXT says what each is; the hello carries those sentences):
#: the aligned crop, the crop blended back into the prepared photo at its own size, or that placement as RGBA
OUTPUTS = ("crop", "composite", "matte")

# --------------------------------------------------------------------------------------------
# Message types
# --------------------------------------------------------------------------------------------
# client -> server
HELLO = "hello"
PREPARE = "prepare"
RENDER = "render"
CREDIT = "credit"
CANCEL = "cancel"
FORGET = "forget"
HEARTBEAT = "heartbeat"
SHUTDOWN = "shutdown"
EXTRACT = "extract"                # driving video -> 3DMM rows (bake)
AUDIO2EXP = "audio2exp"            # audio -> 64 expression coefficients per frame (bake)
DUB = "dub"                        # a filmed plate + speech -> every plate frame with the face pasted back
REQUEST_TYPES = (HELLO, PREPARE, RENDER, CREDIT, CANCEL, FORGET, HEARTBEAT, SHUTDOWN, EXTRACT, AUDIO2EXP, DUB)

# server -> client (HELLO and HEARTBEAT are also replies)
PREPARED = "prepared"
ACCEPTED = "accepted"
PROGRESS = "progress"
FRAME = "frame"
DONE = "done"
FORGOTTEN = "forgotten"
BYE = "bye"
ERROR = "error"
EXTRACTED = "extracted"            # answer to extract
EXPRESSIONS = "expressions"        # answer to audio2exp
DUBBED = "dubbed"                  # the terminal reply of dub (after its frames)
REPLY_TYPES = (HELLO, PREPARED, ACCEPTED, PROGRESS, FRAME, DONE, FORGOTTEN, HEARTBEAT, BYE, ERROR,
               EXTRACTED, EXPRESSIONS, DUBBED)

# --------------------------------------------------------------------------------------------
# Error codes (``error`` replies carry ``code`` and a sentence in ``message``)
# --------------------------------------------------------------------------------------------
E_BAD_MESSAGE = "bad_message"            # not a msgpack map / garbage bytes / too many parts
E_TOO_LARGE = "too_large"                # header or part over the limits
E_VERSION = "version_mismatch"           # header "v" is not PROTOCOL_VERSION
E_UNKNOWN_TYPE = "unknown_type"          # header "type" is not a request type
E_BAD_FIELD = "bad_field"                # missing/wrong type/wrong shape/NaN/out of range
E_BAD_IMAGE = "bad_image"                # image bytes are not a decodable PNG/JPEG or bad size
E_UNKNOWN_IDENTITY = "unknown_identity"  # identity id never prepared (or forgotten)
E_UNKNOWN_REQUEST = "unknown_request"    # cancel for a request id that is not running
E_DUPLICATE = "duplicate_request"        # a request with this id is still running
E_UNSUPPORTED = "unsupported"            # e.g. audio when the server has no audio path
E_BUSY = "busy"                          # job queue full; retry later
E_OUT_OF_MEMORY = "out_of_memory"        # device OOM even at batch size 1
E_STALLED = "stalled"                    # no credit granted for too long; job dropped
E_SHUTTING_DOWN = "shutting_down"        # server is stopping
E_INTERNAL = "internal"                  # unexpected server failure (message has the reason)
E_BAD_VIDEO = "bad_video"                # extract: video unreadable, or no face in it
E_FORBIDDEN = "forbidden"                # a remote client asked for what only local clients may (shutdown)
ERROR_CODES = (E_BAD_MESSAGE, E_TOO_LARGE, E_VERSION, E_UNKNOWN_TYPE, E_BAD_FIELD, E_BAD_IMAGE,
               E_UNKNOWN_IDENTITY, E_UNKNOWN_REQUEST, E_DUPLICATE, E_UNSUPPORTED, E_BUSY,
               E_OUT_OF_MEMORY, E_STALLED, E_SHUTTING_DOWN, E_INTERNAL, E_BAD_VIDEO, E_FORBIDDEN)

# --------------------------------------------------------------------------------------------
# Field names (docs/protocol.md documents every one; tests check both ways)
# --------------------------------------------------------------------------------------------
ENVELOPE_FIELDS = ("v", "type", "id")
SERVER_ENVELOPE_FIELDS = ("tiny_random", "note")
AUDIO_FIELDS = ("samples", "sample_rate", "fps", "frame_offset")
ARRAY_FIELDS = ("dtype", "shape", "data", "part")
REQUEST_FIELDS: dict[str, tuple[str, ...]] = {
    HELLO: ("client",),
    PREPARE: ("align",),
    RENDER: ("identity", "rows", "first_frame", "frames", "size", "encoding", "credit", "attributes", "audio",
             "quality", "output"),
    CREDIT: ("frames",),
    CANCEL: (),
    FORGET: ("identity",),
    HEARTBEAT: (),
    SHUTDOWN: (),
    EXTRACT: ("video", "path", "smooth", "fps"),
    AUDIO2EXP: ("audio", "fps", "n_frames", "offset_frames", "ref_exp", "pose", "pose_style", "pose_scale", "seed",
                "ref_pose", "blinks", "blink_rate", "blink_seed"),
    DUB: ("video", "path", "audio", "output", "size", "encoding", "credit", "follow_face"),
}
REPLY_FIELDS: dict[str, tuple[str, ...]] = {
    HELLO: ("protocol", "server", "device", "model", "real_weights", "tiny_random", "sizes", "native_size",
            "attributes", "audio", "align", "encodings", "limits", "jobs", "presets", "pose_presets",
            "capabilities", "qualities", "precision", "outputs"),
    PREPARED: ("identity", "aligned", "align_note", "coefficients", "coefficient_note", "width", "height",
               "encoding", "source_width", "source_height"),
    ACCEPTED: ("total", "size", "encoding", "credit", "quality", "output"),
    PROGRESS: ("done", "total", "stage", "message", "batch_size"),
    FRAME: ("frame", "index", "total", "width", "height", "channels", "dtype", "encoding"),
    DONE: ("sent", "total", "cancelled"),
    FORGOTTEN: ("identity",),
    HEARTBEAT: (),
    BYE: (),
    ERROR: ("code", "message"),
    EXTRACTED: ("fps", "rows", "warnings"),
    EXPRESSIONS: ("rows", "pose", "blinks"),
    DUBBED: ("sent", "total", "width", "height", "fps", "output", "render_size", "identity_frame",
             "frames_without_face", "warnings"),
}
LIMIT_FIELDS = ("max_message_bytes", "max_header_bytes", "max_part_bytes", "max_parts", "max_rows", "max_frames",
                "max_credit", "default_credit", "max_image_side", "max_jobs", "max_jobs_per_client", "batch_size")
PROGRESS_STAGES = ("queued", "rendering", "oom_retry") + EXTRACT_STAGES
#: outputs of dub (the plate frame with the face pasted back, or that placement as straight-alpha RGBA)
DUB_OUTPUTS = ("composite", "matte")


class ProtocolError(Exception):
    """A request that cannot be served: ``code`` (one of ERROR_CODES) and a one-sentence ``message``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# --------------------------------------------------------------------------------------------
# Hostile input limits (docs/protocol.md, "Hostile input"): what a header may hold, what an extract
# video may be, how much of a client's text an error reply echoes
# --------------------------------------------------------------------------------------------
MAX_HEADER_ARRAY_LEN = max(MAX_ROWS, MAX_FRAMES)   # one msgpack array (rows or frames sent as lists)
MAX_HEADER_MAP_LEN = 256                           # one msgpack map (fields, attributes)
MAX_HEADER_STR_LEN = 64 * 1024                     # one msgpack string (paths, ids, names)
MAX_HEADER_CONTAINERS = MAX_HEADER_ARRAY_LEN + 1024   # arrays + maps in one header
MAX_ECHO = 64                                      # characters of a client's value quoted in an error
MAX_EXTRACT_FRAMES = 9_000                         # extract: frames of one video (5 min at 30 fps)
MAX_EXTRACT_SECONDS = 600.0                        # extract: duration of one video
MAX_EXTRACT_PIXELS = 3840 * 2160                   # extract: pixels of one video frame (4K UHD)
#: video containers extract accepts, by their first bytes (see :func:`video_container`)
VIDEO_CONTAINERS = ("mp4", "avi", "mkv")
_QT_ATOMS = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")


def _brief(value: Any, limit: int = MAX_ECHO) -> str:
    """A short quote of a client's value for an error message: never builds the repr of anything big."""
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (list, tuple, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)[:limit]
    return f"<{type(value).__name__}>"


class _TooManyContainers(Exception):
    pass


class _ContainerBudget:
    """msgpack hooks counting the arrays and maps of one header; unpacking stops past the limit, so a
    header of millions of empty containers costs milliseconds and little memory."""

    def __init__(self, limit: int = MAX_HEADER_CONTAINERS):
        self.left = limit

    def list_hook(self, value: list) -> list:
        self.left -= 1
        if self.left < 0:
            raise _TooManyContainers()
        return value

    def map_hook(self, value: dict) -> dict:
        self.left -= 1
        if self.left < 0:
            raise _TooManyContainers()
        return value


def video_container(data: bytes) -> str | None:
    """The container of uploaded video bytes by their first bytes ("mp4" for MP4/MOV/M4V/3GP, "avi",
    "mkv" for Matroska/WebM), or None: playlists (#EXTM3U), ffconcat lists, images and everything else.
    Only these are handed to the video decoder, so an upload can never make it open other files."""
    head = bytes(data[:16])
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "mkv"
    if len(head) >= 8 and head[4:8] in _QT_ATOMS:
        size = int.from_bytes(head[:4], "big")      # box size: 0 (to the end), 1 (64-bit size follows) or >= 8
        if size in (0, 1) or size >= 8:
            return "mp4"
    return None


# --------------------------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------------------------
def _as_bytes(frame: Any) -> bytes:
    """A received frame (zmq.Frame or bytes-like) as bytes."""
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def _as_buffer(frame: Any) -> Any:
    """A received frame's buffer without copying (zmq.Frame.buffer, or the bytes-like itself)."""
    return frame.buffer if hasattr(frame, "buffer") else frame


def _part_at(parts: Sequence[Any], idx: Any, name: str) -> Any:
    """``parts[idx]`` for a ``part`` index taken from a header; ProtocolError(bad_field) if it names none."""
    if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(parts):
        raise ProtocolError(E_BAD_FIELD, f"{name}: 'part' {_brief(idx)} does not name one of the "
                                         f"{len(parts)} parts of this message")
    return parts[idx]


def pack_header(header: Mapping[str, Any]) -> bytes:
    return msgpack.packb(dict(header), use_bin_type=True)


def unpack_header(data: bytes, max_bytes: int = MAX_HEADER_BYTES) -> dict:
    """Decode one msgpack header frame with strict limits; never executes anything."""
    if len(data) == 0:
        raise ProtocolError(E_BAD_MESSAGE, "the header frame is empty; send a msgpack map")
    if len(data) > max_bytes:
        raise ProtocolError(E_TOO_LARGE, f"the header is {len(data)} bytes, over the limit of "
                                         f"{max_bytes}; put bulk data in parts")
    budget = _ContainerBudget()
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, max_str_len=MAX_HEADER_STR_LEN,
            max_bin_len=max_bytes, max_array_len=MAX_HEADER_ARRAY_LEN, max_map_len=MAX_HEADER_MAP_LEN,
            max_ext_len=0, list_hook=budget.list_hook, object_hook=budget.map_hook)
    except _TooManyContainers:
        raise ProtocolError(E_TOO_LARGE, f"the header holds more than {MAX_HEADER_CONTAINERS} arrays and maps; "
                                         f"send bulk data as array maps in parts") from None
    except Exception as exc:  # msgpack raises several types for garbage
        raise ProtocolError(E_BAD_MESSAGE, f"the header is not valid msgpack ({type(exc).__name__}: "
                                           f"{_brief(str(exc))}); encode a map with msgpack, with strings "
                                           f"under {MAX_HEADER_STR_LEN} bytes and arrays under "
                                           f"{MAX_HEADER_ARRAY_LEN} items") from None
    if not isinstance(obj, dict):
        raise ProtocolError(E_BAD_MESSAGE, f"the header must be a msgpack map, got {type(obj).__name__}")
    if not all(isinstance(k, str) for k in obj):
        raise ProtocolError(E_BAD_MESSAGE, "header keys must be strings")
    return obj


def pack(header: Mapping[str, Any], parts: Sequence[Any] = ()) -> list:
    """Frames of one message: msgpack header then the raw parts (bytes-like, sent as is)."""
    return [pack_header(header), *parts]


def unpack(frames: Sequence[Any], max_parts: int = MAX_PARTS, max_part_bytes: int = MAX_PART_BYTES,
           max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[dict, list]:
    """Split received frames (without the ROUTER identity) into (header, parts), checking limits."""
    if not frames:
        raise ProtocolError(E_BAD_MESSAGE, "empty message")
    size = len(_as_buffer(frames[0]))
    if size > max_header_bytes:      # before any copy of the frame
        raise ProtocolError(E_TOO_LARGE, f"the header is {size} bytes, over the limit of "
                                         f"{max_header_bytes}; put bulk data in parts")
    header = unpack_header(_as_bytes(frames[0]), max_header_bytes)
    parts = list(frames[1:])
    if len(parts) > max_parts:
        raise ProtocolError(E_BAD_MESSAGE, f"{len(parts)} parts after the header, at most {max_parts} allowed")
    for i, p in enumerate(parts):
        n = len(_as_buffer(p))
        if n > max_part_bytes:
            raise ProtocolError(E_TOO_LARGE, f"part {i} is {n} bytes, over the limit of {max_part_bytes}")
    return header, parts


def request(type_: str, id_: str | None = None, **fields: Any) -> dict:
    """A client request header: ``{"v": 1, "type": type_, "id": id_, **fields}``."""
    h = {"v": PROTOCOL_VERSION, "type": type_}
    if id_ is not None:
        h["id"] = id_
    h.update(fields)
    return h


# --------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------
_DTYPES = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1"), "int32": np.dtype("<i4")}


def array_field(arr: np.ndarray, parts: list | None = None) -> dict:
    """Encode an array for a header: inline ``data`` bytes, or (``parts`` given) by ``part`` index.

    Only float32, uint8 and int32 travel; float arrays are sent as little-endian float32.
    """
    a = np.asarray(arr)
    if a.dtype.kind == "f":
        a = a.astype("<f4", copy=False)
        name = "float32"
    elif a.dtype == np.uint8:
        name = "uint8"
    elif a.dtype.kind in "iu":
        a = a.astype("<i4", copy=False)
        name = "int32"
    else:
        raise TypeError(f"cannot send arrays of dtype {a.dtype}")
    a = np.ascontiguousarray(a)
    out: dict[str, Any] = {"dtype": name, "shape": list(a.shape)}
    if parts is None:
        out["data"] = a.tobytes()
    else:
        out["part"] = len(parts)
        parts.append(a.tobytes())
    return out


def _shape_text(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"


def decode_array(value: Any, name: str, shape: Sequence[int | None], parts: Sequence[Any] = (),
                 dtype: str = "float32", finite: bool = True, max_elements: int | None = None) -> np.ndarray:
    """Decode and validate an array field.

    ``value`` is either an array map (``{"dtype", "shape", "data"|"part"}``) or nested lists of
    numbers. ``shape`` uses None for a free dimension. Returns a C-contiguous array of ``dtype``.
    """
    want = _DTYPES[dtype]
    if isinstance(value, dict):
        keys = set(value)
        allowed = {"dtype", "shape", "data", "part"}
        if not keys <= allowed or "dtype" not in keys or "shape" not in keys or len(keys & {"data", "part"}) != 1:
            raise ProtocolError(E_BAD_FIELD, f"{name}: an array map needs 'dtype', 'shape' and exactly one of "
                                             f"'data' or 'part' (got keys {sorted(keys)})")
        dt = value["dtype"]
        if not isinstance(dt, str) or dt not in _DTYPES:
            raise ProtocolError(E_BAD_FIELD, f"{name}: dtype {_brief(dt)} is not one of {sorted(_DTYPES)}")
        shp = value["shape"]
        if (not isinstance(shp, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                 for s in shp)):
            raise ProtocolError(E_BAD_FIELD, f"{name}: shape must be a list of non-negative integers")
        if "data" in value:
            buf = value["data"]
            if not isinstance(buf, (bytes, bytearray)):
                raise ProtocolError(E_BAD_FIELD, f"{name}: 'data' must be msgpack bin bytes")
        else:
            buf = _as_buffer(_part_at(parts, value["part"], name))
        if len(shp) != len(shape):
            raise ProtocolError(E_BAD_FIELD, f"{name}: expected shape {_shape_text(shape)}, got {tuple(shp)}")
        count = math.prod(shp)
        if max_elements is not None and count > max_elements:
            raise ProtocolError(E_TOO_LARGE, f"{name}: {count} values, at most {max_elements} allowed")
        src = _DTYPES[dt]
        if len(buf) != count * src.itemsize:
            raise ProtocolError(E_BAD_FIELD, f"{name}: {len(buf)} bytes do not hold {dt} of shape {tuple(shp)} "
                                             f"({count * src.itemsize} bytes expected)")
        if src != want and want.kind != "f":
            raise ProtocolError(E_BAD_FIELD, f"{name}: dtype must be {dtype}, got {dt}")
        # one copy, converted to ``want``: the result never aliases the message buffer
        arr = np.array(np.frombuffer(buf, dtype=src).reshape(shp), dtype=want, copy=True, order="C")
    elif isinstance(value, list):
        try:
            arr = np.asarray(value, dtype=np.float64 if want.kind == "f" else np.int64)
        except (ValueError, TypeError, OverflowError):
            raise ProtocolError(E_BAD_FIELD, f"{name}: must be a rectangular list of numbers of shape "
                                             f"{_shape_text(shape)}") from None
        if arr.dtype == object:
            raise ProtocolError(E_BAD_FIELD, f"{name}: must be a rectangular list of numbers")
        if any(isinstance(x, bool) for x in _first_items(value)):
            raise ProtocolError(E_BAD_FIELD, f"{name}: booleans are not numbers here")
        if max_elements is not None and arr.size > max_elements:
            raise ProtocolError(E_TOO_LARGE, f"{name}: {arr.size} values, at most {max_elements} allowed")
        if arr.ndim != len(shape):
            raise ProtocolError(E_BAD_FIELD, f"{name}: expected shape {_shape_text(shape)}, got {arr.shape}")
        if want.kind == "f" and np.abs(arr[np.isfinite(arr)]).max(initial=0.0) > 3.0e38:
            raise ProtocolError(E_BAD_FIELD, f"{name}: values overflow float32")
        if want.kind != "f" and arr.size and (arr.min() < np.iinfo(want).min or arr.max() > np.iinfo(want).max):
            raise ProtocolError(E_BAD_FIELD, f"{name}: values do not fit {dtype}")
        arr = np.ascontiguousarray(arr.astype(want))
    else:
        raise ProtocolError(E_BAD_FIELD, f"{name}: must be an array map or a list of numbers, "
                                         f"got {type(value).__name__}")
    for i, (got, exp) in enumerate(zip(arr.shape, shape)):
        if exp is not None and got != exp:
            raise ProtocolError(E_BAD_FIELD, f"{name}: expected shape {_shape_text(shape)}, got {tuple(arr.shape)}")
    if finite and want.kind == "f" and arr.size and not np.isfinite(arr).all():
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ProtocolError(E_BAD_FIELD, f"{name}: {bad} value(s) are NaN or infinite; send finite numbers")
    return arr


def _first_items(value: list, limit: int = 4) -> list:
    out = []
    v = value
    while isinstance(v, list) and v:
        if not isinstance(v[0], list):
            out.extend(v[:limit])
            break
        v = v[0]
    return out


# --------------------------------------------------------------------------------------------
# Scalar field checks
# --------------------------------------------------------------------------------------------
_ID_RE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,%d}$" % MAX_ID_LENGTH)
_MISSING = object()


def _get(h: Mapping, key: str, default: Any = _MISSING) -> Any:
    if key in h:
        return h[key]
    if default is _MISSING:
        raise ProtocolError(E_BAD_FIELD, f"missing field {key!r}")
    return default


def check_id(value: Any, name: str = "id") -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ProtocolError(E_BAD_FIELD, f"{name} must be a string of 1-{MAX_ID_LENGTH} characters from "
                                         f"[A-Za-z0-9._:@/+=-], got {_brief(value)}")
    return value


def check_int(value: Any, name: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(E_BAD_FIELD, f"{name} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ProtocolError(E_BAD_FIELD, f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_float(value: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(E_BAD_FIELD, f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ProtocolError(E_BAD_FIELD, f"{name} must be finite, got {v}")
    if not lo <= v <= hi:
        raise ProtocolError(E_BAD_FIELD, f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(E_BAD_FIELD, f"{name} must be true or false, got {type(value).__name__}")
    return value


def _no_extra(h: Mapping, allowed: set[str], what: str) -> None:
    extra = [k for k in h if k not in allowed]
    if extra:
        shown = ", ".join(_brief(k) for k in extra[:4]) + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")
        raise ProtocolError(E_BAD_FIELD, f"{_brief(what)}: unknown field(s) {shown}; allowed: {sorted(allowed)}")


_BASE = {"v", "type", "id"}


def check_envelope(h: Mapping) -> tuple[str, str | None]:
    """Check ``v`` and ``type`` (and ``id`` when present); returns (type, id)."""
    v = h.get("v", _MISSING)
    if v is _MISSING:
        raise ProtocolError(E_VERSION, f"the header has no 'v'; this server speaks protocol {PROTOCOL_VERSION}")
    if v != PROTOCOL_VERSION or isinstance(v, bool):
        raise ProtocolError(E_VERSION, f"protocol version {_brief(v)} is not supported; this server speaks "
                                       f"{PROTOCOL_VERSION}: update the add-on or the server")
    t = h.get("type")
    if not isinstance(t, str) or t not in REQUEST_TYPES:
        raise ProtocolError(E_UNKNOWN_TYPE, f"unknown message type {_brief(t)}; known: {list(REQUEST_TYPES)}")
    rid = h.get("id")
    if rid is not None:
        check_id(rid)
    return t, rid


# --------------------------------------------------------------------------------------------
# Requests (validated forms)
# --------------------------------------------------------------------------------------------
@dataclass
class PrepareRequest:
    id: str
    image: bytes                 # encoded PNG/JPEG bytes
    align: bool = True


@dataclass
class AudioInput:
    samples: np.ndarray          # (S,) float32 mono PCM
    sample_rate: int             # Hz
    fps: float                   # scene frames per second
    frame_offset: float          # scene frame at which samples[0] plays


@dataclass
class RenderRequest:
    id: str
    identity: str
    rows: np.ndarray             # (N, 73) float32
    first_frame: int             # scene frame of rows[0]
    frames: list[int]            # scene frame numbers to render, strictly increasing
    size: int | None = None
    encoding: str = "raw"
    credit: int = DEFAULT_CREDIT
    attributes: dict[str, np.ndarray] = field(default_factory=dict)   # name -> (N,) float32
    audio: AudioInput | None = None
    quality: str = "full"        # one of the hello's ``qualities``
    output: str = "crop"         # one of OUTPUTS (the hello's ``outputs``)

    @property
    def indices(self) -> list[int]:
        """Row indices of the requested frames."""
        return [f - self.first_frame for f in self.frames]


def validate_hello(h: Mapping, parts: Sequence = ()) -> str | None:
    _no_extra(h, _BASE | set(REQUEST_FIELDS[HELLO]), "hello")
    if "client" in h and not isinstance(h["client"], str):
        raise ProtocolError(E_BAD_FIELD, "hello: 'client' must be a string (name and version of the client)")
    return h.get("id")


def validate_prepare(h: Mapping, parts: Sequence) -> PrepareRequest:
    _no_extra(h, _BASE | set(REQUEST_FIELDS[PREPARE]), "prepare")
    rid = check_id(_get(h, "id"))
    align = check_bool(h.get("align", True), "align")
    if len(parts) != 1:
        raise ProtocolError(E_BAD_FIELD, f"prepare: send exactly one part with the PNG or JPEG bytes, "
                                         f"got {len(parts)} parts")
    data = _as_bytes(parts[0])
    if len(data) == 0:
        raise ProtocolError(E_BAD_IMAGE, "prepare: the image part is empty")
    return PrepareRequest(id=rid, image=data, align=align)


def validate_render(h: Mapping, parts: Sequence) -> RenderRequest:
    allowed = _BASE | set(REQUEST_FIELDS[RENDER])
    _no_extra(h, allowed, "render")
    rid = check_id(_get(h, "id"))
    identity = check_id(_get(h, "identity"), "identity")
    rows = decode_array(_get(h, "rows"), "rows", (None, ROW_WIDTH), parts, max_elements=MAX_ROWS * ROW_WIDTH)
    n = rows.shape[0]
    if n < 1:
        raise ProtocolError(E_BAD_FIELD, "rows: send at least one row of 73 coefficients")
    first = check_int(h.get("first_frame", 0), "first_frame", -MAX_FRAME_NUMBER, MAX_FRAME_NUMBER)
    frames_v = _get(h, "frames")
    if not isinstance(frames_v, list) or not frames_v:
        raise ProtocolError(E_BAD_FIELD, "frames must be a non-empty list of scene frame numbers")
    if len(frames_v) > MAX_FRAMES:
        raise ProtocolError(E_TOO_LARGE, f"frames: {len(frames_v)} frames, at most {MAX_FRAMES} per request")
    frames = [check_int(f, "frames[]", first, first + n - 1) for f in frames_v]
    if any(b <= a for a, b in zip(frames, frames[1:])):
        raise ProtocolError(E_BAD_FIELD, "frames must be strictly increasing (no repeats)")
    size = h.get("size")
    if size is not None:
        size = check_int(size, "size", 1, 4096)
    enc = h.get("encoding", "raw")
    if enc not in ENCODINGS:
        raise ProtocolError(E_BAD_FIELD, f"encoding must be one of {list(ENCODINGS)}, got {_brief(enc)}")
    credit = check_int(h.get("credit", DEFAULT_CREDIT), "credit", 0, MAX_CREDIT)
    attrs: dict[str, np.ndarray] = {}
    av = h.get("attributes")
    if av is not None:
        if not isinstance(av, dict) or len(av) > MAX_ATTRIBUTES:
            raise ProtocolError(E_BAD_FIELD, f"attributes must be a map name -> per-row strengths "
                                             f"(at most {MAX_ATTRIBUTES} names)")
        for k, v in av.items():
            if not isinstance(k, str) or not k or len(k) > MAX_ID_LENGTH:
                raise ProtocolError(E_BAD_FIELD, "attributes: names must be non-empty strings")
            attrs[k] = decode_array(v, f"attributes[{k!r}]", (n,), parts)
    audio = None
    if h.get("audio") is not None:
        audio = decode_audio(h["audio"], parts)
    quality = h.get("quality", "full")
    if quality not in QUALITIES:
        raise ProtocolError(E_BAD_FIELD, f"quality must be one of {list(QUALITIES)}, got {_brief(quality)}")
    output = h.get("output", "crop")
    if output not in OUTPUTS:
        raise ProtocolError(E_BAD_FIELD, f"output must be one of {list(OUTPUTS)}, got {_brief(output)}")
    return RenderRequest(id=rid, identity=identity, rows=rows, first_frame=first, frames=frames, size=size,
                         encoding=enc, credit=credit, attributes=attrs, audio=audio, quality=quality, output=output)


def decode_audio(a: Any, parts: Sequence = (), fps_required: bool = True) -> AudioInput:
    """The ``audio`` map of render and audio2exp: {samples, sample_rate, fps, frame_offset}.

    ``fps_required=False`` (audio2exp, whose request has its own ``fps``): a missing ``fps`` is
    returned as ``0.0``.
    """
    if not isinstance(a, dict):
        raise ProtocolError(E_BAD_FIELD, "audio must be a map with samples, sample_rate, fps, frame_offset")
    _no_extra(a, set(AUDIO_FIELDS), "audio")
    samples = decode_array(_get(a, "samples"), "audio.samples", (None,), parts,
                           max_elements=MAX_AUDIO_SAMPLES)
    if samples.size == 0:
        raise ProtocolError(E_BAD_FIELD, "audio.samples is empty")
    sample_rate = check_int(_get(a, "sample_rate"), "audio.sample_rate", MIN_SAMPLE_RATE, MAX_SAMPLE_RATE)
    if fps_required or a.get("fps") is not None:
        fps = check_float(_get(a, "fps"), "audio.fps", 1e-3, MAX_FPS)
    else:
        fps = 0.0
    return AudioInput(samples=samples, sample_rate=sample_rate, fps=fps,
                      frame_offset=check_float(a.get("frame_offset", 0.0), "audio.frame_offset",
                                               -MAX_FRAME_NUMBER, MAX_FRAME_NUMBER))


@dataclass
class ExtractRequest:
    id: str
    video: bytes | None          # the video file's bytes (from a part or inline), or None with ``path``
    path: str | None             # a file on the server machine (loopback servers only), or None
    smooth: float = 0.0          # Gaussian sigma of the coefficient curves, frames (0 = none)
    fps: float | None = None     # resample the rows to this rate (None: the video's own rate)


@dataclass
class Audio2ExpRequest:
    id: str
    audio: AudioInput
    fps: float                   # output frames per second
    n_frames: int                # output rows
    offset_frames: float         # output frame i shows audio time (i + offset_frames - audio.frame_offset) / fps
    ref_exp: np.ndarray          # (64,) float32: the portrait's own expression (zeros when not sent)
    motion: "MotionOptions | None" = None   # head motion and blinks (None: expressions only)

    @property
    def audio_offset_frames(self) -> float:
        """The offset in frames of ``fps`` from the first sample to output frame 0 (what
        ``server.preprocessing.audio.audio_to_expression(offset_frames=...)`` takes)."""
        return self.offset_frames - self.audio.frame_offset


def _part_bytes(value: Any, name: str, parts: Sequence) -> bytes:
    """``value``: msgpack bin bytes, or ``{"part": k}`` naming part k of the message."""
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, dict) and set(value) == {"part"}:
        data = _as_bytes(_part_at(parts, value["part"], name))
    else:
        raise ProtocolError(E_BAD_FIELD, f"{name} must be bin bytes or {{'part': k}} naming a part of the "
                                         f"message, got {type(value).__name__}")
    if not data:
        raise ProtocolError(E_BAD_VIDEO, f"{name} is empty; send the video file's bytes")
    return data


def validate_extract(h: Mapping, parts: Sequence = ()) -> ExtractRequest:
    _no_extra(h, _BASE | set(REQUEST_FIELDS[EXTRACT]), "extract")
    rid = check_id(_get(h, "id"))
    video = h.get("video")
    path = h.get("path")
    if (video is None) == (path is None):
        raise ProtocolError(E_BAD_FIELD, "extract: send exactly one of 'video' (the file's bytes, usually "
                                         "{'part': 0}) or 'path' (a file on the server machine)")
    data = None
    if video is not None:
        data = _part_bytes(video, "video", parts)
        if video_container(data) is None:
            raise ProtocolError(E_BAD_FIELD, "video: the bytes are not a video file (MP4/MOV, AVI or "
                                             "Matroska/WebM); playlists, lists of files and other formats are "
                                             "refused -- send the video file itself")
    else:
        if not isinstance(path, str) or not path or len(path) > MAX_PATH_LENGTH or "\0" in path:
            raise ProtocolError(E_BAD_FIELD, f"path must be a non-empty string of at most {MAX_PATH_LENGTH} "
                                             f"characters naming a video file on the server machine")
    smooth = check_float(h.get("smooth", 0.0), "smooth", 0.0, MAX_SMOOTH)
    fps = h.get("fps")
    if fps is not None:
        fps = check_float(fps, "fps", 1e-3, MAX_FPS)
    return ExtractRequest(id=rid, video=data, path=path, smooth=smooth, fps=fps)


@dataclass
class MotionOptions:
    """audio2exp's head-motion (SadTalker Audio2Pose) and blink options."""
    pose: bool = False               # add head motion (reply field ``pose``)
    pose_style: int = 0              # Audio2Pose style 0..45
    pose_scale: float = 1.0          # motion amplitude (0: the reference pose, 1: SadTalker's)
    seed: int = 0                    # torch seed of the Audio2Pose latent draws
    ref_pose: np.ndarray | None = None   # (6,) angles + translation of the portrait (zeros when not sent)
    blinks: bool = False             # add blinks (reply field ``blinks``: the frames with fully closed eyes)
    blink_rate: float = DEFAULT_BLINK_RATE   # blinks per minute on average
    blink_seed: int = 0


def validate_motion_options(h: Mapping, parts: Sequence = ()) -> MotionOptions | None:
    """The optional head-motion / blink fields of ``audio2exp`` (None when none is sent)."""
    names = ("pose", "pose_style", "pose_scale", "seed", "ref_pose", "blinks", "blink_rate", "blink_seed")
    if all(h.get(n) is None for n in names):
        return None
    m = MotionOptions()
    if h.get("pose") is not None:
        m.pose = check_bool(h["pose"], "pose")
    if h.get("pose_style") is not None:
        m.pose_style = check_int(h["pose_style"], "pose_style", 0, MAX_POSE_STYLE)
    if h.get("pose_scale") is not None:
        m.pose_scale = check_float(h["pose_scale"], "pose_scale", 0.0, MAX_POSE_SCALE)
    if h.get("seed") is not None:
        m.seed = check_int(h["seed"], "seed", 0, MAX_SEED)
    if h.get("ref_pose") is not None:
        m.ref_pose = decode_array(h["ref_pose"], "ref_pose", (POSE_WIDTH,), parts)
    if h.get("blinks") is not None:
        m.blinks = check_bool(h["blinks"], "blinks")
    if h.get("blink_rate") is not None:
        m.blink_rate = check_float(h["blink_rate"], "blink_rate", 0.0, MAX_BLINK_RATE)
    if h.get("blink_seed") is not None:
        m.blink_seed = check_int(h["blink_seed"], "blink_seed", 0, MAX_SEED)
    return m


def validate_audio2exp(h: Mapping, parts: Sequence = ()) -> Audio2ExpRequest:
    _no_extra(h, _BASE | set(REQUEST_FIELDS[AUDIO2EXP]), "audio2exp")
    rid = check_id(_get(h, "id"))
    audio = decode_audio(_get(h, "audio"), parts, fps_required=False)
    fps = h.get("fps")
    if fps is None:
        if not audio.fps:
            raise ProtocolError(E_BAD_FIELD, "audio2exp: missing field 'fps' (output frames per second)")
        fps = audio.fps
    # at least 1 fps: the output then spans at most MAX_ROWS seconds of audio (bounded work)
    fps = check_float(fps, "fps", MIN_AUDIO2EXP_FPS, MAX_FPS)
    if audio.fps and abs(audio.fps - fps) > 1e-9 * max(1.0, fps):
        raise ProtocolError(E_BAD_FIELD, f"audio2exp: audio.fps {audio.fps} differs from fps {fps}; "
                                         f"send one frame rate (leave audio.fps out)")
    audio.fps = fps
    n_frames = check_int(_get(h, "n_frames"), "n_frames", 1, MAX_ROWS)
    offset = check_float(h.get("offset_frames", 0.0), "offset_frames", -MAX_FRAME_NUMBER, MAX_FRAME_NUMBER)
    ref = h.get("ref_exp")
    if ref is None:
        ref_exp = np.zeros(EXP_WIDTH, np.float32)
    else:
        ref_exp = decode_array(ref, "ref_exp", (EXP_WIDTH,), parts)
    return Audio2ExpRequest(id=rid, audio=audio, fps=fps, n_frames=n_frames, offset_frames=offset,
                            ref_exp=ref_exp, motion=validate_motion_options(h, parts))


def extract_request(id_: str, video: bytes | None = None, path: str | None = None, *, smooth: float = 0.0,
                    fps: float | None = None) -> tuple[dict, list]:
    """Client side: (header, parts) of an ``extract`` request (video bytes go in part 0)."""
    parts: list = []
    fields: dict[str, Any] = {"smooth": float(smooth)}
    if video is not None:
        fields["video"] = {"part": 0}
        parts.append(bytes(video))
    if path is not None:
        fields["path"] = str(path)
    if fps is not None:
        fields["fps"] = float(fps)
    return request(EXTRACT, id_, **fields), parts


def audio2exp_request(id_: str, samples: np.ndarray, sample_rate: int, fps: float, n_frames: int, *,
                      offset_frames: float = 0.0, ref_exp: np.ndarray | None = None,
                      **motion: Any) -> tuple[dict, list]:
    """Client side: (header, parts) of an ``audio2exp`` request (PCM samples go in part 0)."""
    parts: list = []
    audio = {"samples": array_field(np.asarray(samples, dtype=np.float32).reshape(-1), parts),
             "sample_rate": int(sample_rate)}
    fields: dict[str, Any] = {"audio": audio, "fps": float(fps), "n_frames": int(n_frames),
                              "offset_frames": float(offset_frames)}
    if ref_exp is not None:
        fields["ref_exp"] = array_field(np.asarray(ref_exp, dtype=np.float32).reshape(-1))
    for k, val in motion.items():   # pose, pose_style, pose_scale, seed, ref_pose, blinks, blink_rate, blink_seed
        if k == "ref_pose" and val is not None:
            val = array_field(np.asarray(val, dtype=np.float32).reshape(-1))
        fields[k] = val
    return request(AUDIO2EXP, id_, **fields), parts


@dataclass
class DubRequest:
    id: str
    video: bytes | None          # the plate file's bytes (from a part or inline), or None with ``path``
    path: str | None             # a plate file on the server machine (loopback servers only), or None
    audio: AudioInput            # the speech; samples[0] plays with plate frame 0 (fps/frame_offset unused)
    output: str = "composite"    # one of DUB_OUTPUTS
    size: int | None = None      # render size of the face crop (None: the model's native size)
    encoding: str = "png"        # frames: "png" (PNG file bytes) or "raw" (RGB8 / RGBA8 pixels)
    credit: int = DEFAULT_CREDIT
    follow_face: bool = True     # the mask ellipse follows the face inside the fixed crop (False: centred)


def validate_dub(h: Mapping, parts: Sequence = ()) -> DubRequest:
    """``dub``: exactly one of ``video`` (the plate's bytes, usually ``{"part": 0}``) or ``path`` (a file on
    the server machine), the speech in ``audio`` as in audio2exp ({samples, sample_rate}), and options."""
    _no_extra(h, _BASE | set(REQUEST_FIELDS[DUB]), "dub")
    rid = check_id(_get(h, "id"))
    video, path = h.get("video"), h.get("path")
    if (video is None) == (path is None):
        raise ProtocolError(E_BAD_FIELD, "dub: send exactly one of 'video' (the plate file's bytes, usually "
                                         "{'part': 0}) or 'path' (a plate file on the server machine)")
    data = None
    if video is not None:
        data = _part_bytes(video, "video", parts)
        if video_container(data) is None:   # as extract: no playlists or lists that make FFmpeg open other files
            raise ProtocolError(E_BAD_FIELD, "video: the bytes are not a video file (MP4/MOV, AVI or "
                                             "Matroska/WebM); playlists, concat lists and other text are "
                                             "refused -- send the plate file itself")
    elif not isinstance(path, str) or not path or len(path) > MAX_PATH_LENGTH or "\0" in path:
        raise ProtocolError(E_BAD_FIELD, f"path must be a non-empty string of at most {MAX_PATH_LENGTH} "
                                         f"characters naming a video file on the server machine")
    if "audio" not in h:
        raise ProtocolError(E_BAD_FIELD, "dub: missing field 'audio' (the speech: {samples, sample_rate})")
    audio = decode_audio(h["audio"], parts, fps_required=False)
    output = h.get("output", "composite")
    if output not in DUB_OUTPUTS:
        raise ProtocolError(E_BAD_FIELD, f"dub: output must be one of {list(DUB_OUTPUTS)}, got {_brief(output)}")
    size = h.get("size")
    if size is not None:
        size = check_int(size, "size", 1, 4096)
    enc = h.get("encoding", "png")
    if enc not in ENCODINGS:
        raise ProtocolError(E_BAD_FIELD, f"encoding must be one of {list(ENCODINGS)}, got {_brief(enc)}")
    credit = check_int(h.get("credit", DEFAULT_CREDIT), "credit", 0, MAX_CREDIT)
    follow = check_bool(h.get("follow_face", True), "follow_face")
    return DubRequest(id=rid, video=data, path=path if data is None else None, audio=audio, output=output,
                      size=size, encoding=enc, credit=credit, follow_face=follow)


def dub_request(id_: str, samples: np.ndarray, sample_rate: int, *, video: bytes | None = None,
                path: str | None = None, output: str = "composite", size: int | None = None,
                encoding: str = "png", credit: int = DEFAULT_CREDIT,
                follow_face: bool = True) -> tuple[dict, list]:
    """Client side: (header, parts) of a ``dub`` request (the plate's bytes in part 0 when sent, then the
    speech's float32 PCM)."""
    parts: list = []
    fields: dict[str, Any] = {}
    if video is not None:
        fields["video"] = {"part": 0}
        parts.append(bytes(video))
    if path is not None:
        fields["path"] = str(path)
    fields["audio"] = {"samples": array_field(np.asarray(samples, dtype=np.float32).reshape(-1), parts),
                       "sample_rate": int(sample_rate)}
    fields.update(output=str(output), encoding=str(encoding), credit=int(credit), follow_face=bool(follow_face))
    if size is not None:
        fields["size"] = int(size)
    return request(DUB, id_, **fields), parts


def dubbed_reply(id_: str, *, sent: int, total: int, width: int, height: int, fps: float, output: str,
                 render_size: int, identity_frame: int, frames_without_face: Sequence[int],
                 warnings: Sequence[str] = ()) -> dict:
    """The terminal ``dubbed`` reply of a dub, after its ``total`` frames."""
    return reply(DUBBED, id_, sent=int(sent), total=int(total), width=int(width), height=int(height),
                 fps=float(fps), output=str(output), render_size=int(render_size),
                 identity_frame=int(identity_frame), frames_without_face=[int(i) for i in frames_without_face],
                 warnings=[str(w) for w in warnings])


def validate_credit(h: Mapping, parts: Sequence = ()) -> tuple[str, int]:
    _no_extra(h, _BASE | set(REQUEST_FIELDS[CREDIT]), "credit")
    return check_id(_get(h, "id")), check_int(_get(h, "frames"), "frames", 1, MAX_CREDIT)


def validate_cancel(h: Mapping, parts: Sequence = ()) -> str:
    _no_extra(h, _BASE, "cancel")
    return check_id(_get(h, "id"))


def validate_forget(h: Mapping, parts: Sequence = ()) -> tuple[str | None, str]:
    _no_extra(h, _BASE | set(REQUEST_FIELDS[FORGET]), "forget")
    rid = h.get("id")
    return rid, check_id(_get(h, "identity"), "identity")


def validate_simple(h: Mapping, parts: Sequence = ()) -> str | None:
    """heartbeat and shutdown: only the envelope."""
    _no_extra(h, _BASE, str(h.get("type")))
    return h.get("id")


# --------------------------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------------------------
def reply(type_: str, id_: str | None, **fields: Any) -> dict:
    h = {"v": PROTOCOL_VERSION, "type": type_, "id": id_}
    h.update(fields)
    return h


def error_reply(id_: str | None, code: str, message: str, **fields: Any) -> dict:
    return reply(ERROR, id_, code=code, message=message, **fields)


def frame_reply(id_: str, frame: int, index: int, total: int, width: int, height: int,
                encoding: str, channels: int = 3, **fields: Any) -> dict:
    """Header of a ``frame`` message; its single part holds the pixels (3 channels RGB, 4 RGBA for a matte)."""
    return reply(FRAME, id_, frame=frame, index=index, total=total, width=width, height=height,
                 channels=channels, dtype="uint8", encoding=encoding, **fields)


def decode_raw_frame(header: Mapping, part: Any) -> np.ndarray:
    """(H, W, C) uint8 RGB (C = 3) or straight-alpha RGBA (C = 4, output "matte"), top row first, from a
    ``frame`` reply with ``encoding == "raw"``."""
    if header.get("encoding") != "raw":
        raise ValueError("decode_raw_frame handles encoding 'raw' only; PNG parts are plain PNG files")
    w, hgt = int(header["width"]), int(header["height"])
    c = int(header.get("channels", 3))
    if c not in (3, 4):
        raise ValueError(f"frame has {c} channels; expected 3 (RGB) or 4 (RGBA)")
    buf = _as_buffer(part)
    if len(buf) != w * hgt * c:
        raise ValueError(f"frame part has {len(buf)} bytes, expected {w * hgt * c} for {w}x{hgt} with {c} channels")
    return np.frombuffer(buf, dtype=np.uint8).reshape(hgt, w, c)


def extracted_reply(id_: str, fps: float, rows: np.ndarray, warnings: Sequence[str] = ()) -> tuple[dict, list]:
    """(header, parts) of an ``extracted`` reply: the (N, 73) rows travel in part 0."""
    parts: list = []
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != ROW_WIDTH:
        raise ValueError(f"extracted rows must be (N, {ROW_WIDTH}), got {rows.shape}")
    h = reply(EXTRACTED, id_, fps=float(fps), rows=array_field(rows, parts), warnings=[str(w) for w in warnings])
    return h, parts


def expressions_reply(id_: str, rows: np.ndarray, pose: np.ndarray | None = None,
                      blinks: Sequence[int] | None = None) -> tuple[dict, list]:
    """(header, parts) of an ``expressions`` reply: the (n_frames, 64) rows travel in part 0, the
    (n_frames, 6) head pose (when asked for) in part 1; ``blinks``: frames with fully closed eyes."""
    parts: list = []
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != EXP_WIDTH:
        raise ValueError(f"expression rows must be (n_frames, {EXP_WIDTH}), got {rows.shape}")
    fields: dict[str, Any] = {"rows": array_field(rows, parts)}
    if pose is not None:
        pose = np.asarray(pose, dtype=np.float32)
        if pose.shape != (rows.shape[0], POSE_WIDTH):
            raise ValueError(f"pose rows must be ({rows.shape[0]}, {POSE_WIDTH}), got {pose.shape}")
        fields["pose"] = array_field(pose, parts)
    if blinks is not None:
        fields["blinks"] = [int(b) for b in blinks]
    return reply(EXPRESSIONS, id_, **fields), parts


def decode_extracted(header: Mapping, parts: Sequence = ()) -> tuple[float, np.ndarray, list[str]]:
    """Client side: (fps, rows (N, 73) float32, warnings) of an ``extracted`` reply."""
    rows = decode_array(header.get("rows"), "rows", (None, ROW_WIDTH), parts, max_elements=None)
    fps = check_float(header.get("fps"), "fps", 1e-3, MAX_FPS)
    warnings = header.get("warnings") or []
    if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
        raise ProtocolError(E_BAD_FIELD, "warnings must be a list of strings")
    return fps, rows, list(warnings)


def decode_expressions(header: Mapping, parts: Sequence = ()) -> np.ndarray:
    """Client side: the (n_frames, 64) float32 rows of an ``expressions`` reply."""
    return decode_array(header.get("rows"), "rows", (None, EXP_WIDTH), parts)


def decode_expression_motion(header: Mapping, parts: Sequence = ()) -> tuple[np.ndarray | None, list[int] | None]:
    """Client side: (pose (n_frames, 6) float32 or None, blink frames or None) of an ``expressions`` reply."""
    pose = header.get("pose")
    if pose is not None:
        pose = decode_array(pose, "pose", (None, POSE_WIDTH), parts)
    blinks = header.get("blinks")
    if blinks is not None:
        if not isinstance(blinks, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in blinks):
            raise ProtocolError(E_BAD_FIELD, "blinks must be a list of frame indices")
        blinks = list(blinks)
    return pose, blinks


def decode_presets(value: Any, width: int = EXP_WIDTH, name: str = "presets") -> dict[str, np.ndarray]:
    """``{name: [width floats]}`` (hello's ``presets`` / ``pose_presets``) -> {name: (width,) float32}.

    None or missing gives {} (an older server). Raises ProtocolError(bad_field) on a malformed map.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(E_BAD_FIELD, f"{name} must be a map name -> {width} numbers")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            raise ProtocolError(E_BAD_FIELD, f"{name}: names must be non-empty strings")
        out[k] = decode_array(v, f"{name}[{k!r}]", (width,))
    return out


# --------------------------------------------------------------------------------------------
# Per-frame input hashes (resume: the add-on's sidecar and `styleheat farm render`'s manifest)
# --------------------------------------------------------------------------------------------
FRAME_WINDOW_RADIUS = 13  # StyleHEAT's 27-frame coefficient window [i-13, i+13]


def _hash_array(h, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    h.update(str(arr.dtype).encode())
    h.update(str(arr.shape).encode())
    h.update(arr.tobytes())


def output_hash_extra(output: str | None) -> str:
    """The ``extra`` key text of a render ``output``: "" for the crop (keys of older sidecars stay valid),
    ``output=<name>`` otherwise, so changing a rig's Output renders its frames again."""
    return "" if not output or output == "crop" else f"output={output}"


def frame_hashes(identity: str, model: str, size: int, rows: np.ndarray, frames: Iterable[int],
                 audio: np.ndarray | None = None, samples_per_frame: float = 0.0,
                 attributes: Mapping[str, np.ndarray] | None = None,
                 extra: str = "") -> dict[int, str]:
    """{row: sha256 hex} of everything that decides the pixels of each frame in ``frames``.

    rows: (N, 73) clip rows (the frame's clamped 27-row window is hashed); audio: mono PCM of the
    clip (row 0 at sample 0; the samples under the frame's window are hashed, with
    ``samples_per_frame`` = sample rate / fps); attributes: per-row strengths (the window's values,
    a server may smooth them); ``identity``/``model``/``size``/``extra``: what else the caller wants
    in the key. A frame whose hash is unchanged need not be rendered again. The algorithm is fixed
    (key ``styleheat-frame/1``): the add-on's sidecars and the farm's manifests depend on it.
    """
    n = rows.shape[0]
    out: dict[int, str] = {}
    for i in frames:
        win = np.clip(np.arange(int(i) - FRAME_WINDOW_RADIUS, int(i) + FRAME_WINDOW_RADIUS + 1), 0, n - 1)
        h = hashlib.sha256()
        h.update(f"styleheat-frame/1|{identity}|{model}|{size}|{extra}".encode())
        _hash_array(h, rows[win].astype(np.float32))
        if attributes:
            for name in sorted(attributes):
                h.update(name.encode())
                _hash_array(h, np.asarray(attributes[name], dtype=np.float32)[win])
        if audio is not None and samples_per_frame > 0:
            a = int(round((i - FRAME_WINDOW_RADIUS) * samples_per_frame))
            b = int(round((i + FRAME_WINDOW_RADIUS + 1) * samples_per_frame))
            h.update(f"audio|{a}|{b}".encode())
            _hash_array(h, np.asarray(audio, dtype=np.float32)[max(a, 0):max(b, 0)])
        out[int(i)] = h.hexdigest()
    return out
