"""VoxCeleb-style / HDTF-style talking-head videos -> clips of the training dataset (docs/training.md).

Per video, with the tracker passed in (a ``models.tracking.Tracker``; ``styleheat prepare-data`` passes
the inference path's own, ``server.preprocessing.tracking.load_tracker``: dlib + Deep3D):

1. the tracker gives 73-value rows per frame -- the shipped one fixes the FFHQ crop square of the first
   frame with a face for the whole clip and crops every frame with it: faces are NOT aligned per
   frame, the head moves freely inside the box (paper);
2. the frames are cropped again at the dataset resolution (256 for VoxCeleb-style, 512 for HDTF-style)
   (``Track.crops``) with the landmarks in those crops (``Track.landmarks_at``);
3. audio (optional): a sidecar file next to the video (same name, .wav/.flac/.ogg/.mp3) -> 16 kHz mono ->
   AudioWarper windows and mel spectrogram (``models.windows``, ``models.audio_features``). Extract it once with
   ``ffmpeg -i VIDEO.mp4 -ac 1 -ar 16000 VIDEO.wav``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from models.tracking import Tracker
from training import data as D

STYLES = {"voxceleb": 256, "hdtf": 512}
VIDEO_EXTS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")
AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3")


def find_videos(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in VIDEO_EXTS)
        elif p.is_file():
            out.append(p)
        else:
            raise D.DatasetError(f"{p}: no such video file or folder")
    if not out:
        raise D.DatasetError(f"no videos ({', '.join(VIDEO_EXTS)}) found in {[str(i) for i in inputs]}")
    return out


def clip_identity(video: Path, style: str) -> tuple[str, str]:
    """(clip id, person id). VoxCeleb-style ``.../id10001/VIDEO/00001.mp4`` -> ``id10001#VIDEO#00001``;
    otherwise (HDTF-style ``WDA_Name_000.mp4``) the file stem for both."""
    parts = video.with_suffix("").parts
    if style == "voxceleb" and len(parts) >= 3 and parts[-3].startswith("id"):
        return f"{parts[-3]}#{parts[-2]}#{parts[-1]}", parts[-3]
    stem = video.stem.replace("#", "_")
    return stem, stem


def sidecar_audio(video: Path) -> Path | None:
    for ext in AUDIO_EXTS:
        p = video.with_suffix(ext)
        if p.is_file():
            return p
    return None


def read_sidecar_audio(path: Path) -> np.ndarray:
    """A sidecar audio file -> 16 kHz mono float32 (a DatasetError naming the file when it is unusable)."""
    import soundfile

    from models.audio_features import AudioError, to_mono_16k

    try:
        samples, sr = soundfile.read(str(path), dtype="float32", always_2d=False)
        return to_mono_16k(samples, sr)
    except (soundfile.SoundFileError, RuntimeError, AudioError) as e:
        raise D.DatasetError(f"{path}: cannot use this audio file ({e}); re-extract it with "
                             f"'ffmpeg -i VIDEO -ac 1 -ar 16000 {path.with_suffix('.wav').name}' or pass "
                             f"--no-audio") from None


def prepare_video(video: str | os.PathLike, out: str | os.PathLike, tracker: Tracker, *, style: str = "voxceleb",
                  resolution: int | None = None, max_frames: int | None = None, audio: bool = True,
                  clip_id: str | None = None, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Add one video to the dataset at ``out``; returns a summary dict (id, frames, audio, warnings).

    The tracker's :class:`models.tracking.VideoError` (and the dataset's ``DatasetError``) propagate."""

    video = Path(video)
    if style not in STYLES:
        raise D.DatasetError(f"style must be one of {sorted(STYLES)}, got {style!r}")
    res = int(resolution or STYLES[style])
    track = tracker.track(video, max_frames=max_frames, progress=progress)
    n = len(track.rows)
    frames = track.crops(res)
    lms = np.asarray(track.landmarks_at(res), dtype=np.float32)
    cid, person = clip_identity(video, style)
    cid = clip_id or cid
    wav = None
    warnings = list(track.warnings)
    side = sidecar_audio(video) if audio else None
    if audio and side is None:
        warnings.append(f"no audio next to {video.name} (expected {video.with_suffix('.wav').name}); "
                        "the clip can train stages 1a and 2 (video) only")
    if side is not None:
        wav = read_sidecar_audio(side)
    if abs(track.fps - 25.0) > 0.01:
        warnings.append(f"{video.name} runs at {track.fps:.3f} fps; the networks were trained at 25 fps "
                        "(resample with ffmpeg -r 25 for best results)")
    D.write_clip(out, cid, frames, track.rows, lms, person=person, wav16k=wav, fps=track.fps)
    return {"id": cid, "frames": n, "audio": wav is not None, "resolution": res, "warnings": warnings}
