"""Driving video -> per-frame 73-value 3DMM rows (StyleHEAT's ``TempVideoDataset.data_preprocess``).

Official order, reproduced here:

1. decode the frames (OpenCV, BGR -> RGB);
2. landmarks of the first frame; the FFHQ crop square (``server.preprocessing.align.ffhq_quad``) of that frame is
   fixed and applied to **every** frame (``Croper.crop``), giving 256x256 crops in which the head still
   moves -- that motion is what the 3DMM angles, translation and crop parameters record;
3. landmarks again on each 256 crop;
4. Deep3D ``align_img`` + the ResNet-50 regressor on each crop -> 257 coefficients -> 73-value row.

Deliberate differences, all in the product's favour and documented:

* the crop square is computed from and applied to the full-resolution frame (the official code first
  squashes every frame to 256x256 whatever its aspect ratio, which distorts non-square videos);
  the square is taken from the first frame *with a face*, not blindly frame 0;
* landmarks come from dlib (the official FAN weights are not available), are smoothed over time with
  a Gaussian (``landmark_sigma`` frames; 0 disables) and frames where no face is found reuse the
  landmarks of the nearest frame that had one (the official code substitutes a fixed mean face);
* optional Gaussian smoothing of the resulting coefficient curves (``curve_sigma``).

Memory stays constant in the video length: the video is decoded twice (landmarks, then crops for the
regressor) instead of holding every frame.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from models.tracking import Cancelled, ProgressFn, VideoError  # noqa: F401  (the seam's; re-exported)
from server.preprocessing import align
from server.preprocessing.deep3d import WORK_SIZE, Deep3DExtractor, resize_nearest_256, row73


@dataclass
class VideoInfo:
    path: Path
    fps: float
    frame_count: int  # as the container reports it (may be approximate)
    width: int
    height: int


def probe_video(path: str | os.PathLike) -> VideoInfo:
    import cv2

    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video not found: {path}")
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise VideoError(f"cannot open {path} as a video; use an MP4/AVI/MOV file that OpenCV can decode")
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        if not math.isfinite(fps) or fps <= 0 or fps > 1000:
            fps = 25.0
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        w = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        h = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    finally:
        cap.release()
    return VideoInfo(path, fps, max(count, 0), w, h)


def iter_frames(path: str | os.PathLike, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Frames of a video as (H, W, 3) uint8 RGB, in order."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoError(f"cannot open {path} as a video; use an MP4/AVI/MOV file that OpenCV can decode")
    try:
        n = 0
        while max_frames is None or n < max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            n += 1
    finally:
        cap.release()


def smooth_along_time(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing along axis 0 (edges: nearest). ``sigma`` <= 0 returns a copy."""
    if not math.isfinite(sigma):
        raise ValueError(f"smoothing sigma must be a finite number of frames, got {sigma!r}")
    arr = np.asarray(values, dtype=np.float64)
    if sigma <= 0 or len(arr) < 2:
        return arr.copy()
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(arr, sigma, axis=0, mode="nearest")


def fill_missing(landmarks: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Replace the landmarks of frames without a face by those of the nearest frame with one."""
    idx = np.flatnonzero(found)
    if idx.size == 0:
        raise VideoError("no face was found in any frame of the video")
    out = np.array(landmarks, copy=True)
    for i in np.flatnonzero(~found):
        out[i] = landmarks[idx[np.argmin(np.abs(idx - i))]]
    return out


@dataclass
class CropSquare:
    """The fixed FFHQ crop square of the video (first frame with a face), in full-frame pixels."""

    quad: np.ndarray  # (4, 2)
    qsize: float
    frame_index: int
    faces_found: int

    def crop(self, frame: np.ndarray, size: int = WORK_SIZE) -> np.ndarray:
        return align.warp_ffhq(frame, self.quad, self.qsize, size)


@dataclass
class TrackResult:
    rows: np.ndarray             # (N, 73) float32
    fps: float
    landmarks: np.ndarray        # (N, 68, 2) smoothed landmarks in the 256 crops (x, y down)
    raw_landmarks: np.ndarray    # (N, 68, 2) as detected (missing frames filled)
    face_found: np.ndarray       # (N,) bool
    crop: CropSquare
    coeff_257: np.ndarray        # (N, 257) float32
    trans_params: np.ndarray     # (N, 5) float32
    warnings: list[str] = field(default_factory=list)
    video: str | os.PathLike = ""

    @property
    def num_frames(self) -> int:
        return int(self.rows.shape[0])

    def crops(self, size: int) -> Iterator[np.ndarray]:
        """The frames cut with the fixed crop square at ``size`` (the video is decoded again)."""
        return (self.crop.crop(f, size) for f in iter_frames(self.video, self.num_frames))

    def landmarks_at(self, size: int) -> np.ndarray:
        return self.landmarks.astype(np.float32) * (size / WORK_SIZE)

    def provenance(self, video: str | os.PathLike) -> dict:
        return {"tool": "styleheat extract", "video": os.path.basename(str(video)),
                "frames": self.num_frames, "frames_without_face": int((~self.face_found).sum()),
                "crop_from_frame": self.crop.frame_index, "landmarks": "dlib 68 (face_recognition_models)",
                "regressor": "Deep3DFaceRecon epoch_20 (ReconNet ResNet-50)"}


def find_crop_square(path: str | os.PathLike, max_frames: int | None = None) -> CropSquare:
    """The FFHQ crop square of the first frame that shows a face."""
    for i, frame in enumerate(iter_frames(path, max_frames)):
        faces = align.detect_faces(frame)
        if faces:
            quad, qsize = align.ffhq_quad(faces[0].landmarks)
            return CropSquare(quad, qsize, i, len(faces))
    raise VideoError(f"no face found in any frame of {path}; the driving video must show one face, "
                     "roughly frontal, for most of its length")


def track_video(path: str | os.PathLike, extractor: Deep3DExtractor, *, landmark_sigma: float = 1.0,
                curve_sigma: float = 0.0, max_frames: int | None = None,
                progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> TrackResult:
    """Run the whole driving-video pipeline; see the module docstring."""
    info = probe_video(path)
    total = info.frame_count if max_frames is None else min(info.frame_count or max_frames, max_frames)
    report = progress or (lambda stage, done, tot: None)
    warnings: list[str] = []

    square = find_crop_square(path, max_frames)
    if square.faces_found > 1:
        warnings.append(f"{square.faces_found} faces in frame {square.frame_index}; tracking the largest")
    if square.frame_index > 0:
        warnings.append(f"no face in frames 0-{square.frame_index - 1}; the crop comes from frame {square.frame_index}")

    # pass 1: landmarks on the fixed 256 crops
    lms, found = [], []
    prev_box = None
    for i, frame in enumerate(iter_frames(path, max_frames)):
        if should_stop is not None and should_stop():
            raise Cancelled("tracking cancelled")
        crop = square.crop(frame)
        det = align.detect_landmarks(crop)
        if det is not None:
            lms.append(det.landmarks)
            found.append(True)
            prev_box = det.box
        elif prev_box is not None:  # the detector lost the face: track it in the last box
            lms.append(align.predict_landmarks(crop, prev_box))
            found.append(False)
        else:
            lms.append(np.zeros((68, 2)))
            found.append(False)
        report("landmarks", i + 1, total)
    if not lms:
        raise VideoError(f"{path} has no decodable frames")
    raw = np.stack(lms)
    found_arr = np.array(found, dtype=bool)
    # frames tracked in a previous box count as found for filling, but are reported as misses
    usable = found_arr | (np.abs(raw).sum(axis=(1, 2)) > 0)
    raw = fill_missing(raw, usable)
    misses = int((~found_arr).sum())
    if misses:
        warnings.append(f"the detector missed the face in {misses} of {len(raw)} frames; "
                        "their landmarks were tracked or copied from the nearest frame")
    smooth = smooth_along_time(raw, landmark_sigma)

    # pass 2: Deep3D on each crop with the smoothed landmarks
    n = len(smooth)
    coeffs, trans = [], []
    batch_imgs: list[np.ndarray] = []

    def flush():
        if batch_imgs:
            coeffs.append(extractor.coefficients(np.stack(batch_imgs)))
            batch_imgs.clear()

    for i, frame in enumerate(iter_frames(path, n)):
        if should_stop is not None and should_stop():
            raise Cancelled("tracking cancelled")
        aligned = extractor.align(square.crop(frame), smooth[i])
        batch_imgs.append(aligned.image)
        trans.append(aligned.trans_params)
        if len(batch_imgs) >= extractor.batch_size:
            flush()
        report("3dmm", i + 1, n)
    flush()
    if len(trans) != n:
        raise VideoError(f"{path}: decoding gave {n} frames the first time and {len(trans)} the second; "
                         "re-encode the video (e.g. to H.264 MP4) and try again")
    coeff = np.concatenate(coeffs, 0)
    trans_arr = np.stack(trans)
    rows = row73(coeff, trans_arr[:, 2:5])
    if curve_sigma > 0:
        rows = smooth_curves(rows, curve_sigma)
    return TrackResult(rows, info.fps, smooth, raw, found_arr, square, coeff, trans_arr, warnings, video=path)


def smooth_curves(rows: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smooth every coefficient curve of (N, 73) rows over time (``sigma`` in frames)."""
    return smooth_along_time(rows, sigma).astype(np.float32)


def resample_rows(rows: np.ndarray, src_fps: float, dst_fps: float) -> np.ndarray:
    """Linearly resample (N, 73) per-frame rows from ``src_fps`` to ``dst_fps`` (same duration).

    StyleHEAT's networks were trained on 25 fps clips (the 27-frame window spans ~1 s), so a 30 or
    60 fps video is best converted to 25 fps rows. Frame j of the output is at time j / dst_fps.
    """
    rows = np.asarray(rows, dtype=np.float64)
    if src_fps <= 0 or dst_fps <= 0:
        raise ValueError(f"frame rates must be positive, got {src_fps} -> {dst_fps}")
    n = len(rows)
    if n == 0 or src_fps == dst_fps:
        return rows.astype(np.float32)
    duration = (n - 1) / src_fps
    m = int(math.floor(duration * dst_fps + 1e-9)) + 1
    t_out = np.arange(m) / dst_fps
    t_in = np.arange(n) / src_fps
    out = np.stack([np.interp(t_out, t_in, rows[:, j]) for j in range(rows.shape[1])], axis=1)
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------
# The shipped tracker (models.tracking.Tracker)
# --------------------------------------------------------------------------------------------
class DlibDeep3DTracker:
    """dlib 68 landmarks + Deep3DFaceRecon's ResNet-50 (:class:`Deep3DExtractor`): the official
    preprocessing of driving videos (:func:`track_video`) and of the source portrait (:meth:`portrait_row`).
    One instance, so one ResNet-50 in memory, serves both the engine and the server's ``extract``."""

    def __init__(self, extractor: Deep3DExtractor, *, landmark_sigma: float = 1.0,
                 description: str = "dlib 68 landmarks + Deep3DFaceRecon (ResNet-50)"):
        self.extractor = extractor
        self.landmark_sigma = float(landmark_sigma)
        self.description = description

    def track(self, video, *, curve_sigma: float = 0.0, max_frames: int | None = None,
              progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> TrackResult:
        return track_video(video, self.extractor, landmark_sigma=self.landmark_sigma, curve_sigma=curve_sigma,
                           max_frames=max_frames, progress=progress, should_stop=should_stop)

    def portrait_row(self, image: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        """The portrait's own row as StyleHEAT's ``ImageDataset`` computes it: NEAREST to 256, dlib
        landmarks, ``align_img``, the regressor. (None, why) when no face is found or dlib is missing."""
        img256 = resize_nearest_256(image)
        try:
            found = align.detect_landmarks(img256)
        except RuntimeError as exc:  # dlib not installed
            return None, str(exc)
        if found is None:
            return None, "no face found in the portrait at 256x256 (dlib); cannot extract its 3DMM coefficients"
        return self.extractor.rows([img256], found.landmarks[None])[0], None


def require_dlib() -> None:
    """RuntimeError saying what to install when the dlib landmark detector cannot run here."""
    if not align.dlib_available():
        raise RuntimeError("the tracker needs the dlib face landmark detector: "
                           "pip install dlib==20.0.1 face_recognition_models==0.3.0")


def load_tracker(checkpoints: str | os.PathLike, device: str = "cpu", *,
                 landmark_sigma: float = 1.0) -> DlibDeep3DTracker:
    """The shipped tracker from ``<checkpoints>/Deep3D/epoch_20.pth`` (and the BFM landmarks when present).

    Raises :class:`server.preprocessing.deep3d.CheckpointError` (weights missing, unreadable, wrong layout) and
    RuntimeError when the dlib landmark detector cannot run here; both messages say what to do.
    """
    require_dlib()
    extractor = Deep3DExtractor.from_checkpoints(checkpoints, device=device)
    return DlibDeep3DTracker(extractor, landmark_sigma=landmark_sigma,
                             description=f"dlib 68 landmarks + Deep3DFaceRecon from {Path(checkpoints)}")
