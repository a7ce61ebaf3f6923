"""The engine thread of ``styleheat-server``: runs queued jobs one step at a time (a render step is at
most one batch and never more frames than the credit left), halves the batch on out-of-memory, and
hands every outgoing message to the main thread through an inproc PAIR (it never touches the ROUTER)."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import zmq

from models.tracking import Cancelled, VideoError
from server import protocol as P
from server.service.images import decode_image, encode_png
from server.service.scheduler import Job, Scheduler

if TYPE_CHECKING:
    from server.service.bake_models import BakeModels

log = logging.getLogger("styleheat.server")

#: the replies that end a request (everything else the worker sends is a frame or progress)
TERMINAL_TYPES = frozenset((P.DONE, P.ERROR, P.PREPARED, P.EXTRACTED, P.EXPRESSIONS, P.FORGOTTEN, P.DUBBED))

#: seconds a dub waits for the client's credit before it is dropped (as a render's --stall-timeout)
DUB_STALL_TIMEOUT = 600.0


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or a RuntimeError whose message says 'out of memory'."""
    torch = sys.modules.get("torch")
    if torch is not None:
        oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
        if oom_type is not None and isinstance(exc, oom_type):
            return True
    return isinstance(exc, (RuntimeError, MemoryError)) and "out of memory" in str(exc).lower()


def release_device_memory() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _video_suffix(data: bytes) -> str:
    """The temporary file's suffix; the bytes were checked by ``P.video_container`` (validate_extract)."""
    kind = P.video_container(data)
    if kind is None:
        raise VideoError("the bytes are not a video file (MP4/MOV, AVI or Matroska/WebM)")
    return "." + kind


# FFmpeg (behind OpenCV) may read only local files: no network protocols, whatever a container says
os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "protocol_whitelist;file")


def upload_to_temp(data: bytes, prefix: str) -> str:
    """An uploaded video's bytes in a private temporary file (named with its container's suffix); the caller
    deletes it before any reply leaves."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=_video_suffix(data))
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return tmp


def check_extract_video(path: str) -> None:
    """Refuse a video over the extract limits (frames, duration, pixels) from its container's header,
    before any frame is decoded; VideoError says which limit and what to do."""
    from server.preprocessing.tracking import probe_video

    info = probe_video(path)
    pixels = info.width * info.height
    if info.width <= 0 or info.height <= 0:
        raise VideoError("the video's frame size cannot be read; re-encode it as MP4 (H.264)")
    if pixels > P.MAX_EXTRACT_PIXELS:
        raise VideoError(f"the video is {info.width}x{info.height}, over the extract limit of "
                         f"{P.MAX_EXTRACT_PIXELS} pixels per frame; downscale it (e.g. to 1920x1080)")
    if info.frame_count > P.MAX_EXTRACT_FRAMES:
        raise VideoError(f"the video has {info.frame_count} frames, over the extract limit of "
                         f"{P.MAX_EXTRACT_FRAMES}; cut it into shorter clips")
    if info.frame_count / info.fps > P.MAX_EXTRACT_SECONDS:
        raise VideoError(f"the video lasts {info.frame_count / info.fps:.0f} s, over the extract limit of "
                         f"{P.MAX_EXTRACT_SECONDS:.0f} s; cut it into shorter clips")


#: portraits whose coefficient note the worker remembers (oldest forgotten first)
MAX_COEFFICIENT_NOTES = 256


@dataclass(frozen=True)
class WorkerSetup:
    """What the engine thread works with, handed in by the server (``server.service.app.Server``)."""

    engine: Any                                   # server.engine.Engine or a stand-in with its methods
    sched: Scheduler
    ctx: zmq.Context
    pair_endpoint: str                            # the inproc PAIR the main thread bound
    decorate: Callable[[dict], dict]              # adds the server's fields to every reply header
    bake: "BakeModels"                            # tracker (extract) and Audio2Exp (audio2exp)
    aligner: Callable | None = None               # image -> (aligned square RGB, [warnings]); None: no aligner
    audio_converter: Callable | None = None       # the converter of bake_models.find_audio_converter
    tiny_random: bool = False
    batch_size: int = 1
    encoder_pool: Callable[[], ThreadPoolExecutor] | None = None   # threads for PNG encoding


def _finisher(placer: Callable[[np.ndarray], np.ndarray] | None, png: bool):
    """rendered crop -> (shape of what is sent, bytes): placed by ``placer`` (composite/matte), PNG-encoded."""
    def finish(img: np.ndarray):
        out = placer(img) if placer is not None else img
        return out.shape, (encode_png(out) if png else memoryview(np.ascontiguousarray(out)).cast("B"))
    return finish


class SourcePhotos:
    """Per identity, the photo it was prepared from (its encoded bytes) and where the crop sits in it.

    The encoded bytes are kept (a few MB at most), and only the most recently used photo is held decoded.
    """

    def __init__(self):
        self._by_id: dict[str, tuple[bytes, tuple[int, int], np.ndarray | None]] = {}
        self._decoded: tuple[str, np.ndarray] | None = None

    def remember(self, identity: str, data: bytes, shape: tuple[int, int], quad: np.ndarray | None) -> None:
        self._by_id[identity] = (bytes(data), (int(shape[0]), int(shape[1])), quad)
        if self._decoded is not None and self._decoded[0] == identity:
            self._decoded = None

    def keep_only(self, identities) -> None:
        keep = set(identities)
        for ident in [i for i in self._by_id if i not in keep]:
            del self._by_id[ident]
        if self._decoded is not None and self._decoded[0] not in keep:
            self._decoded = None

    def placer(self, identity: str, output: str) -> Callable[[np.ndarray], np.ndarray]:
        """crop -> composite or matte frame of ``identity``; ValueError when it has no photo to go back to."""
        from server.shots.compositing import Placement, place

        if identity not in self._by_id:
            raise ValueError(f"output {output!r} needs the photo the identity was prepared from; this server "
                             f"prepared {identity!r} before it kept photos, or forgot it: send 'prepare' again")
        data, shape, quad = self._by_id[identity]
        if quad is None:   # used as given (align=false / no aligner): the crop is its own photo
            placement = Placement.identity(shape[0])
        else:
            placement = Placement(quad, shape)
        photo = None
        if output == "composite":
            if self._decoded is None or self._decoded[0] != identity:
                self._decoded = (identity, decode_image(data))
            photo = self._decoded[1]
        return lambda img: place(img, output, source=photo, placement=placement)


class Worker(threading.Thread):
    """``steps``: the step for each job kind (``server.service.app.HANDLERS``' ``work`` entries)."""

    def __init__(self, setup: WorkerSetup, steps: Mapping[str, Callable[["Worker", Job], None]]):
        super().__init__(name="styleheat-engine", daemon=True)
        self.setup = setup
        self.steps = dict(steps)
        self.engine = setup.engine
        self.sched = setup.sched
        self.out: zmq.Socket | None = None
        #: identity -> why it has no 3DMM coefficients (None: it has them), for the ``prepared`` reply
        self.coefficient_notes: dict[str, str | None] = {}
        self.sources = SourcePhotos()   # identity -> where its crop sits in the photo it was prepared from

    # every message leaves through the PAIR as [terminal id or b"", client, header, *parts]; the main
    # thread forwards [client, header, *parts] to the ROUTER and, for a request's terminal reply,
    # tells the scheduler that the request has been answered
    def send(self, client: bytes, header: dict, parts: tuple = ()) -> None:
        assert self.out is not None
        rid = header.get("id")
        terminal = rid.encode() if header["type"] in TERMINAL_TYPES and isinstance(rid, str) else b""
        self.out.send_multipart([terminal, client, P.pack_header(self.setup.decorate(header)), *parts],
                                copy=False)

    def run(self) -> None:
        self.out = self.setup.ctx.socket(zmq.PAIR)
        self.out.setsockopt(zmq.LINGER, 0)
        self.out.connect(self.setup.pair_endpoint)
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
                        detail = (f" ({type(exc).__name__}: {exc})" if job.trusted
                                  else " (the details are in the server's log)")
                        self.send(job.client, P.error_reply(job.id, P.E_INTERNAL,
                                                            f"the server failed on this request{detail}; "
                                                            f"other requests are unaffected"))
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
        else:
            self.steps[job.kind](self, job)

    # prepare -------------------------------------------------------------------------------
    def do_prepare(self, job: Job) -> None:
        req: P.PrepareRequest = job.payload
        try:
            rgb = decode_image(req.image)
            aligner = self.setup.aligner
            quad = None
            if req.align and aligner is not None:
                try:
                    aligned, warnings, quad = aligner(rgb)
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
                        "used as given: this server has no face aligner (server/preprocessing/align.py), so the image must "
                        "already be an FFHQ-aligned portrait")
            try:
                known = set(self.coefficient_notes)
                info = self.engine.prepare_identity(aligned)
                if info.id not in known:
                    note_c = info.coefficient_note
                    if note_c is None and info.coefficients is None:
                        note_c = "no 3DMM regressor produced coefficients for this portrait"
                    self.coefficient_notes[info.id] = note_c
                    while len(self.coefficient_notes) > MAX_COEFFICIENT_NOTES:
                        self.coefficient_notes.pop(next(iter(self.coefficient_notes)))
                self.sources.remember(info.id, req.image, rgb.shape[:2], quad)
                self._sync_identities()
            except ValueError as exc:
                raise P.ProtocolError(P.E_BAD_IMAGE, str(exc)) from None
            except Exception as exc:
                if is_out_of_memory(exc):
                    release_device_memory()
                    raise P.ProtocolError(P.E_OUT_OF_MEMORY, "the device ran out of memory inverting the "
                                                             "portrait; free GPU memory and retry") from None
                raise
        except P.ProtocolError as exc:
            self.sched.finish(job)
            self.send(job.client, P.error_reply(job.id, exc.code, exc.message))
            return
        self.sched.add_identity(info.id, job.peer)
        png = encode_png(aligned)
        coeffs = None if info.coefficients is None else [float(x) for x in np.asarray(info.coefficients).ravel()]
        if self._finish_or_abort(job):
            return
        self.send(job.client, P.reply(P.PREPARED, job.id, identity=info.id, aligned=did_align, align_note=note,
                                      coefficients=coeffs,
                                      coefficient_note=self.coefficient_notes.get(info.id),
                                      width=int(aligned.shape[1]),
                                      height=int(aligned.shape[0]), encoding="png",
                                      source_width=int(rgb.shape[1]), source_height=int(rgb.shape[0])), (png,))

    # extract / audio2exp ----------------------------------------------------------------------
    def _finish_or_abort(self, job: Job) -> bool:
        """Finish the job; True when it was cancelled/aborted meanwhile (and that was reported)."""
        self.sched.finish(job)
        if job.abort is None:
            return False
        self._report_abort(job)
        return True

    def do_extract(self, job: Job) -> None:
        from server.preprocessing.tracking import resample_rows

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
                    path = tmp = upload_to_temp(req.video, "styleheat-extract-")
                else:
                    path = req.path
                check_extract_video(path)
                result = self.setup.bake.tracker.track(path, curve_sigma=req.smooth, progress=progress,
                                                        max_frames=P.MAX_EXTRACT_FRAMES,
                                                        should_stop=lambda: job.abort is not None)
            finally:  # the copy is gone before any reply leaves
                if tmp is not None:
                    try:
                        os.unlink(tmp)
                    except OSError:
                        log.warning("could not delete the temporary video %s", tmp)
            rows, fps = np.asarray(result.rows, dtype=np.float32), float(result.fps)
            if req.fps is not None and abs(req.fps - fps) > 1e-6:
                rows, fps = resample_rows(rows, fps, req.fps), float(req.fps)
            if len(rows) > P.MAX_ROWS:
                raise VideoError(f"the video gives {len(rows)} rows at {fps:g} fps, over the limit of "
                                 f"{P.MAX_ROWS}; ask for a lower fps or send a shorter video")
            if not np.isfinite(rows).all():
                raise RuntimeError("the 3DMM regressor produced non-finite coefficients")
        except Cancelled:
            self._finish_or_abort(job)
            return
        except VideoError as exc:
            message = str(exc)
            if tmp is not None:   # never name the server's temporary file
                message = message.replace(tmp, "the uploaded video")
            if not self._finish_or_abort(job):
                self.send(job.client, P.error_reply(job.id, P.E_BAD_VIDEO, message))
            return
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            release_device_memory()
            if not self._finish_or_abort(job):
                self.send(job.client, P.error_reply(job.id, P.E_OUT_OF_MEMORY,
                                                    "the device ran out of memory running the 3DMM regressor; "
                                                    "free GPU memory and retry"))
            return
        if self._finish_or_abort(job):
            return
        warnings = list(result.warnings)
        if self.setup.tiny_random:
            warnings.append("tiny random Deep3D weights: these coefficients are noise, not a real 3DMM fit")
        header, parts = P.extracted_reply(job.id, fps, rows, warnings)
        self.send(job.client, header, tuple(parts))

    def do_audio2exp(self, job: Job) -> None:
        from server.preprocessing.audio import audio_to_expression

        req: P.Audio2ExpRequest = job.payload
        try:
            rows = audio_to_expression(req.audio.samples, req.audio.sample_rate, req.fps, req.ref_exp,
                                       model=self.setup.bake.audio2exp, n_frames=req.n_frames,
                                       offset_frames=req.audio_offset_frames)
        except ValueError as exc:
            if not self._finish_or_abort(job):
                self.send(job.client, P.error_reply(job.id, P.E_BAD_FIELD, f"audio2exp: {exc}"))
            return
        pose = blinks = None
        if req.motion is not None:
            try:
                rows, pose, blinks = self._audio2exp_motion(req, rows)
            except _Unsupported as exc:
                if not self._finish_or_abort(job):
                    self.send(job.client, P.error_reply(job.id, P.E_UNSUPPORTED, f"audio2exp: {exc}"))
                return
            except ValueError as exc:
                if not self._finish_or_abort(job):
                    self.send(job.client, P.error_reply(job.id, P.E_BAD_FIELD, f"audio2exp: {exc}"))
                return
        if self._finish_or_abort(job):
            return
        header, parts = P.expressions_reply(job.id, rows, pose, blinks)
        self.send(job.client, header, tuple(parts))

    def _audio2exp_motion(self, req: "P.Audio2ExpRequest", rows):
        """Head motion (Audio2Pose) and blinks (an additive offset toward the 'eyes' preset) of audio2exp."""
        from server.preprocessing import audio

        m = req.motion
        pose = blinks = None
        if m.pose:
            bake = self.setup.bake
            model = getattr(bake, "audio2pose", None)
            if model is None:
                if bake.tiny:
                    model = audio.tiny_audio2pose(0)
                else:
                    path = audio.audio2pose_near(getattr(bake.audio2exp, "source_path", None))
                    if path is None:
                        raise _Unsupported("head motion needs SadTalker's Audio2Pose weights (auido2pose_00140-"
                                           "model.pth beside the Audio2Exp .pth, or the SadTalker_V0.0.2_256."
                                           "safetensors bundle passed with --audio2exp)")
                    model = audio.load_audio2pose(path)
                bake.audio2pose = model
            ref = m.ref_pose if m.ref_pose is not None else np.zeros(6, np.float32)
            pose = audio.audio_to_pose(req.audio.samples, req.audio.sample_rate, req.fps, ref, model=model,
                                       n_frames=req.n_frames, offset_frames=req.audio_offset_frames,
                                       pose_style=m.pose_style, pose_scale=m.pose_scale, seed=m.seed)
        if m.blinks:
            presets = self.setup.bake.presets
            if "eyes" not in presets:
                raise _Unsupported("blinks need the 'eyes' expression preset; start the server with --presets "
                                   "FILE (e.g. expression_presets.json) or with expression.pth in the checkpoints")
            neutral = presets.get("center", np.zeros(P.EXP_WIDTH, np.float32))
            blinks = audio.blink_frames(req.n_frames, req.fps, m.blink_rate, m.blink_seed)
            w = audio.blink_weights(req.n_frames, req.fps, blinks)
            rows = rows + audio.blink_offset(w, presets["eyes"], neutral)
        return rows, pose, blinks

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
            held = ids()
            self.sched.set_identities(held)
            self.sources.keep_only(held)

    # render --------------------------------------------------------------------------------
    def _start(self, job: Job, indices: list[int]):
        req: P.RenderRequest = job.payload
        return iter(self.engine.render(
            req.identity, req.rows, indices, audio=job.audio, attributes=req.attributes or None,
            size=req.size, batch_size=job.batch, should_stop=lambda: job.abort is not None, quality=req.quality))

    def _progress(self, job: Job, stage: str, message: str, **extra) -> None:
        self.send(job.client, P.reply(P.PROGRESS, job.id, done=job.produced, total=len(job.indices),
                                      stage=stage, message=message, **extra))

    def step_render(self, job: Job) -> None:
        """One step of a render: at most one batch, and never more frames than the credit left."""
        req: P.RenderRequest = job.payload
        if job.gen is None and job.produced == 0:
            job.indices = req.indices
            job.batch = self.setup.batch_size
            if req.audio is not None:
                conv = self.setup.audio_converter
                a = req.audio
                try:
                    job.audio = np.asarray(conv(a.samples, a.sample_rate, a.fps, req.rows.shape[0],
                                                req.first_frame, a.frame_offset), dtype=np.float32)
                except ValueError as exc:
                    self._fail(job, P.E_BAD_FIELD, f"audio: {exc}")
                    return
            if req.output != "crop":
                try:
                    job.placer = self.sources.placer(req.identity, req.output)
                except ValueError as exc:
                    self._fail(job, P.E_BAD_FIELD, str(exc))
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
        # paste back into the source (composite/matte) and encode (PNG), in parallel threads (OpenCV releases
        # the GIL), then send in order
        placer = job.placer
        if pulled and (placer is not None or req.encoding == "png"):
            finish = _finisher(placer, req.encoding == "png")
            done = list(self._encoder_pool().map(finish, [img for _, img in pulled]))
        else:
            done = [(img.shape, memoryview(img).cast("B")) for _, img in pulled]
        for (row, _), (shape, data) in zip(pulled, done):
            hdr = P.frame_reply(job.id, frame=req.first_frame + row, index=job.produced, total=len(job.indices),
                                width=int(shape[1]), height=int(shape[0]), encoding=req.encoding,
                                channels=int(shape[2]))
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
            release_device_memory()
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

    def _encoder_pool(self) -> ThreadPoolExecutor:
        if self.setup.encoder_pool is None:
            raise RuntimeError("this worker was set up without PNG encoder threads (WorkerSetup.encoder_pool)")
        return self.setup.encoder_pool()

    def _fail(self, job: Job, code: str, message: str) -> None:
        self._close_gen(job)
        self.sched.finish(job)
        self.send(job.client, P.error_reply(job.id, code, message))


class _DubFailed(Exception):
    """A dub that ends with an error reply: ``code`` and ``message``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def do_dub(worker: "Worker", job: Job) -> None:
    """The ``dub`` request: :func:`server.shots.dub.dub` on the uploaded (or loopback path) plate and the speech,
    every plate-size frame sent as a ``frame`` message (credit-paced), then ``dubbed`` with the warnings.

    The whole dub is one worker step (like ``extract``): other requests wait until it ends. Cancel, a vanished
    client and shutdown stop it at the next tracked or written frame."""
    from server.shots.dub import DubError, dub

    req: P.DubRequest = job.payload
    setup, sched = worker.setup, worker.sched
    stop = lambda: job.abort is not None  # noqa: E731
    last = [0.0]
    frames_total = [0]             # the plate's frame count, known once tracking reports it

    def progress(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        frames_total[0] = max(frames_total[0], int(total or 0))
        if stage == "render":      # the frames themselves show how far it is
            return
        if done <= 1 or (total > 0 and done >= total) or now - last[0] >= 0.25:
            last[0] = now
            what = {"landmarks": "landmarks", "3dmm": "3DMM"}.get(stage, stage)
            worker.send(job.client, P.reply(P.PROGRESS, job.id, stage=stage, done=int(done), total=int(total),
                                            message=f"tracking the plate, {what}: {done}/{total or '?'} frames"))

    def write(index: int, image: np.ndarray) -> None:
        with sched.cv:     # credit: at most ``credit`` frames in flight, as a render
            sched.cv.wait_for(lambda: job.abort is not None or job.granted > job.produced, DUB_STALL_TIMEOUT)
            if job.abort is None and job.granted <= job.produced:
                job.abort = ("error", P.E_STALLED, f"no credit granted for {DUB_STALL_TIMEOUT:.0f} s; the dub was "
                                                   f"dropped (send 'credit' messages as frames arrive)")
        if job.abort is not None:
            raise Cancelled("dub stopped")
        img = np.ascontiguousarray(image)
        data = encode_png(img) if req.encoding == "png" else memoryview(img).cast("B")
        worker.send(job.client, P.frame_reply(job.id, frame=int(index), index=int(index), total=frames_total[0],
                                              width=int(img.shape[1]), height=int(img.shape[0]),
                                              encoding=req.encoding, channels=int(img.shape[2])), (data,))
        sched.produced_one(job)

    engine = worker.engine
    ids = getattr(engine, "identity_ids", None)
    before = set(ids()) if callable(ids) else set()
    tmp = None
    try:
        try:
            if req.video is not None:
                plate = tmp = upload_to_temp(req.video, "styleheat-dub-")
            else:
                plate = req.path
            check_extract_video(plate)   # the same frame, duration and pixel limits as extract, before any work
            report = dub(plate, (req.audio.samples, req.audio.sample_rate), engine=engine,
                         tracker=setup.bake.tracker, write=write, audio2exp=setup.bake.audio2exp,
                         presets=dict(setup.bake.presets), output=req.output, size=req.size,
                         batch_size=setup.batch_size, follow_face=req.follow_face, progress=progress,
                         should_stop=stop)
        except Cancelled:
            raise
        except DubError as exc:
            msg = str(exc).replace(str(tmp), "the uploaded plate") if tmp is not None else str(exc)
            code = (P.E_BAD_FIELD if msg.startswith("the speech") else
                    P.E_UNSUPPORTED if msg.startswith("nothing can move") else P.E_BAD_VIDEO)
            raise _DubFailed(code, f"dub: {msg}") from None
        except VideoError as exc:
            msg = str(exc).replace(str(tmp), "the uploaded plate") if tmp is not None else str(exc)
            raise _DubFailed(P.E_BAD_VIDEO, f"dub: {msg}") from None
        except ValueError as exc:   # the engine refusing a value (size, ...)
            raise _DubFailed(P.E_BAD_FIELD, f"dub: {exc}") from None
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            release_device_memory()
            raise _DubFailed(P.E_OUT_OF_MEMORY, "dub: the device ran out of memory; dub at a smaller size or "
                                                "free GPU memory") from None
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    log.warning("could not delete the temporary plate %s", tmp)
            # the plate's face was inverted as an identity of its own: do not let it push out prepared portraits
            if callable(ids):
                for ident in set(ids()) - before:
                    engine.forget_identity(ident)
                worker._sync_identities()
    except Cancelled:
        sched.finish(job)
        if job.abort == ("cancelled",):
            worker.send(job.client, P.reply(P.DONE, job.id, sent=job.produced, total=frames_total[0], cancelled=True))
        elif job.abort is not None:
            worker._report_abort(job)
        return
    except _DubFailed as exc:
        if not worker._finish_or_abort(job):
            worker.send(job.client, P.error_reply(job.id, exc.code, exc.message))
        return
    if worker._finish_or_abort(job):
        return
    warnings = list(report.warnings)
    if setup.tiny_random:
        warnings.append("tiny random weights: the pasted face is noise, not the plate's face")
    worker.send(job.client, P.dubbed_reply(
        job.id, sent=job.produced, total=report.frames, width=report.width, height=report.height, fps=report.fps,
        output=report.output, render_size=report.render_size, identity_frame=report.identity_frame,
        frames_without_face=report.frames_without_face, warnings=warnings))


class _Unsupported(Exception):
    """audio2exp asked for something this server lacks (answered ``unsupported``)."""
