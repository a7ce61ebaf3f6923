"""Dub a filmed shot: the plate's own face, its own head motion, new speech (``styleheat dub``).

The story of :func:`dub`, in order:

1. **speech**: the audio file (or samples) is read; 0 samples is an error. It is fitted to the plate's
   duration: shorter audio is padded with silence (those frames are speechless: the networks see silent
   mel windows, which closes the mouth), longer audio is cut at the plate's end; both with a warning.
2. **plate**: decoded with OpenCV (an undecodable file is an error); the FFHQ crop square of the first
   frame that shows a face is found (no face in any frame is an error naming the file) and the tracker
   (dlib landmarks + Deep3D, :mod:`server.preprocessing.tracking`) gives a 73-value row per frame, with that square
   fixed for every frame.
3. **identity**: the first frame with a face, cut with the fixed square, is inverted once. Every output
   frame is pasted back with the same :class:`~server.shots.compositing.Placement` (the fixed quad): the paste
   region never jitters; the head moves inside the crop as in the plate, which is what the rows' angles,
   translation and crop parameters reproduce.
4. **rows**: pose (angles, translation, crop) is the plate's track. The expression is split
   (:func:`nonspeech_projector`): the plate's component in the span of the non-speech presets (eyes,
   eyebrows, made orthogonal to the mouth preset) is kept; everything else comes from Audio2Exp on the
   new speech (or, without Audio2Exp, stays the identity frame's expression, and the AudioWarper alone
   moves the lips). Rows of frames where the detector found no face are interpolated from their
   neighbours so they do not disturb the 27-frame windows of the frames around them.
5. **audio windows**: when the weights have an AudioWarper (the paper's joint mode: pose from video,
   lips from audio), one mel window per plate frame at the plate's own fps.
6. **render + paste**: only frames with a face are rendered; each is composited into its plate frame
   (or turned into an RGBA matte) with the soft head ellipse, whose centre follows the face's smoothed
   position inside the crop. Frames without a face are the plate frame unchanged (an empty matte) and
   are listed in the warnings.

See docs/compositing.md ("Dubbing"). Server modules are imported inside the functions (they are being
moved into sub-packages).
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

OUTPUTS = ("composite", "matte")
#: preset names of the expression split: kept from the plate / taken from the speech / the origin
KEEP_PRESETS = ("eyes", "eyebrow")
SPEECH_PRESETS = ("mouth",)
CENTER_PRESET = "center"
#: the mask ellipse's centre may move at most this far (fraction of the crop side) from the crop's centre
MAX_MASK_SHIFT = 0.15
#: quantum of the mask centre (fraction of the crop side): keeps the per-placement caches small
MASK_STEP = 1.0 / 256.0

ProgressFn = Callable[[str, int, int], None]


class DubError(ValueError):
    """The plate or the speech cannot be dubbed; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# speech
# --------------------------------------------------------------------------------------------
def load_speech(speech: Any) -> tuple[np.ndarray, int, str]:
    """(mono-or-multichannel float32 samples, sample rate, name) of a path or a (samples, rate) pair."""
    from server.preprocessing.audio import AudioError, read_audio

    if isinstance(speech, (str, os.PathLike)):
        name = str(speech)
        try:
            samples, sr = read_audio(speech)
        except AudioError as exc:
            raise DubError(f"--audio: {exc}") from None
    else:
        samples, sr = speech
        samples, name = np.asarray(samples, dtype=np.float32), "the speech"
    if samples.ndim == 0 or samples.shape[0] == 0:
        raise DubError(f"{name} has no samples (0 s of audio); give a WAV/FLAC file with the speech to dub")
    return samples, int(sr), name


def fit_audio(samples: np.ndarray, sample_rate: int, n_frames: int, fps: float,
              name: str = "the speech") -> tuple[np.ndarray, list[str]]:
    """The speech padded with silence or cut to the plate's duration ``n_frames / fps``; warnings."""
    want = int(round(n_frames / fps * sample_rate))
    have = int(samples.shape[0])
    plate_s, audio_s = n_frames / fps, have / sample_rate
    tolerance = sample_rate / fps / 2  # half a frame either way is "the same length"
    warnings = []
    if have < want - tolerance:
        first = int(math.ceil(audio_s * fps - 1e-9))
        warnings.append(f"{name} lasts {audio_s:.2f} s, the plate {plate_s:.2f} s: frames {first}-{n_frames - 1} "
                        f"are speechless (silence: closed mouth)")
    elif have > want + tolerance:
        warnings.append(f"{name} lasts {audio_s:.2f} s, the plate {plate_s:.2f} s: the audio is cut at the "
                        f"plate's end ({audio_s - plate_s:.2f} s dropped)")
    if have >= want:
        return samples[:want], warnings
    pad = np.zeros((want - have,) + samples.shape[1:], dtype=samples.dtype)
    return np.concatenate([samples, pad], axis=0), warnings


# --------------------------------------------------------------------------------------------
# expression split
# --------------------------------------------------------------------------------------------
def nonspeech_projector(presets: dict, keep: Iterable[str] = KEEP_PRESETS, speech: Iterable[str] = SPEECH_PRESETS,
                        center: str = CENTER_PRESET) -> np.ndarray:
    """(64, 64) orthogonal projector onto the non-speech expression directions.

    Directions are presets minus the centre preset: d_k = p_k - p_center. The speech directions (mouth)
    are orthonormalised to S; the kept ones (eyes, eyebrows) have their S component removed,
    N = (I - S S^T) D_keep, and are orthonormalised to Q. The projector is P = Q Q^T: symmetric,
    idempotent, P S = 0 (it never sees the mouth direction). KeyError names a missing preset.
    """
    missing = [k for k in (center, *keep, *speech) if k not in presets]
    if missing:
        raise KeyError(f"expression presets lack {', '.join(missing)} (have: {', '.join(sorted(presets)) or 'none'})")
    c = np.asarray(presets[center], dtype=np.float64)
    d_speech = np.stack([np.asarray(presets[k], np.float64) - c for k in speech], axis=1)
    d_keep = np.stack([np.asarray(presets[k], np.float64) - c for k in keep], axis=1)
    s = _orthonormal(d_speech)
    q = _orthonormal(d_keep - s @ (s.T @ d_keep))
    return q @ q.T


def _orthonormal(m: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the column span of ``m`` (columns below 1e-6 of the largest dropped)."""
    u, sv, _ = np.linalg.svd(m, full_matrices=False)
    if sv.size == 0 or sv[0] <= 0:
        return np.zeros((m.shape[0], 0))
    return u[:, sv > sv[0] * 1e-6]


def split_expression(plate_exp: np.ndarray, speech_exp: np.ndarray, projector: np.ndarray) -> np.ndarray:
    """P e_plate + (I - P) e_speech per row: the plate's non-speech part, the speech's everything else."""
    p = np.asarray(projector, dtype=np.float64)
    a = np.asarray(plate_exp, dtype=np.float64)
    b = np.asarray(speech_exp, dtype=np.float64)
    return (b + (a - b) @ p.T).astype(np.float32)


# --------------------------------------------------------------------------------------------
# rows, mask and placement
# --------------------------------------------------------------------------------------------
def fill_rows(rows: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Rows of frames without a face, linearly interpolated from the nearest frames with one."""
    rows = np.asarray(rows, dtype=np.float64)
    found = np.asarray(found, dtype=bool)
    if found.all() or not found.any():
        return rows.astype(np.float32)
    t = np.arange(len(rows))
    out = rows.copy()
    for j in range(rows.shape[1]):
        out[~found, j] = np.interp(t[~found], t[found], rows[found, j])
    return out.astype(np.float32)


def mask_centres(landmarks: np.ndarray, ref_index: int, crop_side: float, *, sigma: float = 2.0,
                 max_shift: float = MAX_MASK_SHIFT, step: float = MASK_STEP) -> np.ndarray:
    """(N, 2) centre (cx, cy) of the mask ellipse per frame, fractions of the crop side.

    The face's position is the mean of its 68 landmarks (``landmarks`` (N, 68, 2) in a crop of side
    ``crop_side``); the mask is centred at (0.5, 0.5) plus the face's displacement from the identity frame
    ``ref_index``, Gaussian-smoothed over ``sigma`` frames (so the seam glides, never jitters), clamped to
    ``max_shift`` and rounded to ``step``.
    """
    from scipy.ndimage import gaussian_filter1d

    c = np.asarray(landmarks, dtype=np.float64).mean(axis=1) / float(crop_side)  # (N, 2)
    d = c - c[int(ref_index)]
    if sigma > 0 and len(d) > 1:
        d = gaussian_filter1d(d, sigma, axis=0, mode="nearest")
    d = np.clip(d, -max_shift, max_shift)
    centre = 0.5 + d
    if step > 0:
        centre = np.round(centre / step) * step
    return centre


def mask_spec_at(cx: float, cy: float):
    """The default head ellipse moved to (cx, cy), its radii shrunk where it would leave the crop."""
    from server.shots.compositing import DEFAULT_MASK, MaskSpec

    rx = min(DEFAULT_MASK.rx, cx, 1.0 - cx)
    ry = min(DEFAULT_MASK.ry, cy, 1.0 - cy)
    return MaskSpec(cx=float(cx), cy=float(cy), rx=float(rx), ry=float(ry), feather=DEFAULT_MASK.feather)


class _Placements:
    """One Placement per mask spec (each caches its warped mask), the 16 most recent kept."""

    def __init__(self, quad: np.ndarray, shape: tuple[int, int], capacity: int = 16):
        self.quad, self.shape, self.capacity = quad, shape, capacity
        self._items: OrderedDict = OrderedDict()

    def get(self, spec):
        from server.shots.compositing import Placement

        p = self._items.get(spec)
        if p is None:
            p = self._items[spec] = Placement(self.quad, self.shape)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        self._items.move_to_end(spec)
        return p


def frame_ranges(indices: Iterable[int]) -> str:
    """'3-7, 12, 20-21' of sorted frame indices."""
    idx = sorted(int(i) for i in indices)
    parts, start = [], None
    for k, i in enumerate(idx):
        if start is None:
            start = i
        if k + 1 == len(idx) or idx[k + 1] != i + 1:
            parts.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------
@dataclass
class DubReport:
    plate: str
    audio: str
    frames: int
    width: int
    height: int
    fps: float
    output: str
    render_size: int
    identity_frame: int
    quad: list
    frames_without_face: list[int]
    mask_centres: list
    expression: str
    audio_seconds: float
    audio_warper: bool
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"tool": "styleheat dub", "plate": self.plate, "audio": self.audio, "frames": self.frames,
                "width": self.width, "height": self.height, "fps": self.fps, "output": self.output,
                "render_size": self.render_size, "identity_frame": self.identity_frame, "quad": self.quad,
                "frames_without_face": self.frames_without_face, "mask_centres": self.mask_centres,
                "expression": self.expression, "audio_seconds": self.audio_seconds,
                "audio_warper": self.audio_warper, "warnings": self.warnings}


def dub(plate: str | os.PathLike, speech: Any, *, engine, tracker, write: Callable[[int, np.ndarray], None],
        audio2exp=None, presets: dict | None = None, output: str = "composite", size: int | None = None,
        batch_size: int | None = None, follow_face: bool = True, mask_sigma: float = 2.0,
        progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> DubReport:
    """Dub ``plate`` (a video file) with ``speech`` (audio file path or (samples, rate)); see the module docstring.

    ``engine``: :class:`server.engine.Engine`; ``tracker``: a :class:`server.preprocessing.tracking.DlibDeep3DTracker`;
    ``audio2exp``: an Audio2Exp model or None; ``presets``: expression presets {name: 64 floats} (the split
    needs center, mouth, eyes, eyebrow). ``write(index, image)`` receives every output frame in order:
    (H, W, 3) uint8 RGB for "composite", (H, W, 4) RGBA for "matte", at the plate's size. Raises
    :class:`DubError` for unusable input (the message says what to do).
    """
    from models.tracking import VideoError
    from server.preprocessing import tracking
    from server.shots import compositing

    if output not in OUTPUTS:
        raise DubError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    report = progress or (lambda stage, done, total: None)
    samples, sr, audio_name = load_speech(speech)
    if audio2exp is None and not engine.model.has_audio:
        raise DubError("nothing can move the lips: these weights have no AudioWarper and no Audio2Exp model was "
                       "given; pass --audio2exp PATH (SadTalker's Audio2Exp)")
    plate_name = str(plate)
    try:
        tracking.probe_video(plate)
        if next(tracking.iter_frames(plate, 1), None) is None:
            raise DubError(f"the plate {plate_name} cannot be decoded (OpenCV reads no frame from it); re-encode "
                           f"it (e.g. H.264 MP4 or MJPG AVI)")
        tracking.find_crop_square(plate)
    except VideoError as exc:
        msg = str(exc)
        if msg.startswith("no face found"):
            msg = (f"no face found in any frame of the plate {plate_name}; dubbing needs a shot that shows one "
                   f"face, roughly frontal")
        elif "no decodable frames" in msg or "cannot open" in msg or "not found" in msg:
            msg = f"the plate {plate_name} cannot be decoded ({msg})"
        raise DubError(msg) from None

    try:
        track = tracker.track(plate, progress=progress, should_stop=should_stop)
    except VideoError as exc:
        raise DubError(f"the plate {plate_name}: {exc}") from None
    warnings = list(track.warnings)
    n, fps = track.num_frames, float(track.fps)
    found = np.asarray(track.face_found, dtype=bool)
    quad = np.asarray(track.crop.quad, dtype=np.float64)
    ref = int(track.crop.frame_index)

    # speech fitted to the plate
    fitted, audio_warnings = fit_audio(samples, sr, n, fps, audio_name)
    warnings += audio_warnings

    # rows: the plate's pose; the expression split between plate (non-speech) and speech
    rows = fill_rows(track.rows, found)
    ref_exp = rows[ref, :64].copy()
    if audio2exp is not None:
        from server.preprocessing.audio import AudioError, audio_to_expression

        try:
            speech_exp = audio_to_expression(fitted, sr, fps, ref_exp, model=audio2exp, n_frames=n)
        except AudioError as exc:
            raise DubError(f"{audio_name}: {exc}") from None
        speech_what = "Audio2Exp of the new speech"
    else:
        speech_exp = np.broadcast_to(ref_exp, (n, 64))
        speech_what = "the identity frame's expression (no Audio2Exp: the AudioWarper alone moves the lips)"
        warnings.append("no Audio2Exp model: the plate's mouth expression is replaced by the identity frame's and "
                        "only the AudioWarper moves the lips")
    projector = None
    if presets:
        try:
            projector = nonspeech_projector(presets)
        except KeyError as exc:
            warnings.append(f"{exc.args[0]}; the whole expression comes from {speech_what}")
    else:
        warnings.append(f"no expression presets: the plate's eyes and eyebrows are not kept; the whole expression "
                        f"comes from {speech_what}")
    if projector is not None:
        rows[:, :64] = split_expression(rows[:, :64], speech_exp, projector)
        expression = (f"plate's projection onto span(eyes, eyebrow presets minus center, orthogonal to mouth) "
                      f"+ the rest from {speech_what}")
    else:
        rows[:, :64] = speech_exp
        expression = speech_what

    mel = None
    if engine.model.has_audio:
        from server.preprocessing.audio import AudioError, audio_windows_for_frames

        try:
            mel = audio_windows_for_frames(fitted, sr, fps, n)
        except AudioError as exc:
            raise DubError(f"{audio_name}: {exc}") from None

    # identity: the first frame with a face, cut with the fixed square
    ident_frame = None
    for frame in tracking.iter_frames(plate, ref + 1):
        ident_frame = frame
    if ident_frame is None:
        raise DubError(f"the plate {plate_name} could not be decoded again; re-encode it (e.g. H.264 MP4)")
    shape = (int(ident_frame.shape[0]), int(ident_frame.shape[1]))
    crop = tracking.CropSquare(quad, track.crop.qsize, ref, 1).crop(ident_frame, engine.native_size)
    ident = engine.prepare_identity(np.array(crop, dtype=np.uint8))  # a writable copy

    # mask centres (crop fractions), steady placement
    if follow_face:
        centres = mask_centres(track.landmarks, ref, tracking.WORK_SIZE, sigma=mask_sigma)
    else:
        centres = np.full((n, 2), 0.5)
    placements = _Placements(quad, shape)

    missing = [int(i) for i in np.flatnonzero(~found)]
    if missing:
        warnings.append(f"no face found in {len(missing)} of {n} frames ({frame_ranges(missing)}): those frames "
                        f"are the plate unchanged" + (" (empty matte)" if output == "matte" else ""))
    todo = [int(i) for i in np.flatnonzero(found)]
    try:
        rendered = iter(engine.render(ident.id, rows, todo, audio=mel, size=size, batch_size=batch_size,
                                      should_stop=should_stop)) if todo else iter(())
    except ValueError as exc:
        raise DubError(str(exc)) from None
    render_size = int(size or engine.native_size)

    count = 0
    for k, frame in enumerate(tracking.iter_frames(plate, n)):
        if should_stop is not None and should_stop():
            from models.tracking import Cancelled

            raise Cancelled("dub cancelled")
        if frame.shape[:2] != shape:
            raise DubError(f"the plate {plate_name} changes size at frame {k} ({frame.shape[1]}x{frame.shape[0]} "
                           f"after {shape[1]}x{shape[0]}); re-encode it at one size")
        if found[k]:
            idx, face = next(rendered)
            assert idx == k, (idx, k)
            spec = mask_spec_at(*centres[k])
            placement = placements.get(spec)
            if output == "matte":
                image = compositing.matte(face, placement, spec=spec)
            else:
                image = compositing.composite(face, frame, placement, spec=spec)
        else:
            image = (np.zeros(shape + (4,), np.uint8) if output == "matte" else frame)
        write(k, image)
        count += 1
        report("render", count, n)
    if count != n:
        raise DubError(f"the plate {plate_name}: decoding gave {n} frames while tracking and {count} while "
                       f"compositing; re-encode it (e.g. H.264 MP4) and try again")

    return DubReport(plate=os.path.basename(plate_name), audio=os.path.basename(audio_name), frames=n,
                     width=shape[1], height=shape[0], fps=fps, output=output, render_size=render_size,
                     identity_frame=ref, quad=np.round(quad, 3).tolist(), frames_without_face=missing,
                     mask_centres=np.round(centres, 5).tolist(), expression=expression,
                     audio_seconds=round(samples.shape[0] / sr, 4), audio_warper=bool(engine.model.has_audio),
                     warnings=warnings)
