"""Which audio and coefficient rows each video frame sees: pure index math shared by the server and
training (numpy only, no file I/O).

Reference: ``shared/reference/README_audio_3dmm.md`` sections 4.3, 4.4 and 5, re-derived from the
official sources (SadTalker ``src/generate_batch.py``, StyleHEAT ``data/audio_dataset.py``).

* **3DMM rows.** :func:`window_indices`: frame ``i`` is driven by rows ``i-13 .. i+13`` clamped to
  the clip (StyleHEAT ``obtain_seq_index`` / ``transform_semantic``).
* **SadTalker (Audio2Exp input), 25 fps.** ``T = int(len / 640)`` frames; the clip is cropped to
  ``T * 640`` samples before the mel (``parse_audio_length`` + ``crop_pad_audio``, which never pads);
  frame ``i`` gets mel steps ``int(80 ((i - 2) / 25)) .. + 16`` (truncation toward zero), each index
  clamped to the mel (:func:`sadtalker_mel_windows`).
* **StyleHEAT (AudioWarper input), 25 fps.** ``transform_audio``: ``mel[s : s + step]`` with
  ``s = int(80 max(0, i - lag) / 25)``, lag 2 / 4 / 7 / 12 for step 16 / 32 / 48 / 80; the clamp is on
  the frame index, and nothing is clamped at the end, so the last frames get shorter windows
  (:func:`styleheat_cut`, :func:`styleheat_windows`).
* **Product windows.** :func:`audio_windows_for_frames` maps output frames at any fps and offset
  onto the 25 fps grid by their time (see its docstring for exactly where that differs from the
  official cut; ``official=True`` gives the official cut itself).
"""
from __future__ import annotations

import math
import random
from typing import Any

import numpy as np

from models.audio_features import (AW_WINDOW, N_MELS, SAD_WINDOW, SAMPLE_RATE, SAMPLES_PER_FRAME, TRAIN_FPS,
                                   AudioError, mel_frames, to_mono_16k)

__all__ = [
    "window_indices", "sadtalker_num_frames", "sadtalker_crop", "sadtalker_window_starts",
    "sadtalker_mel_windows", "blink_sequence", "STYLEHEAT_LAG", "styleheat_window_start", "styleheat_cut",
    "styleheat_windows", "frame_times", "grid_position", "audio_windows_for_frames",
]

#: StyleHEAT ``transform_audio``: window length (mel steps) -> frames the start lags the frame
STYLEHEAT_LAG = {16: 2, 32: 4, 48: 7, 80: 12}


def window_indices(frame: int, num_rows: int, length: int = 27) -> np.ndarray:
    """Rows of frame ``frame``'s driving window [i - r, i + r] (r = length // 2), clamped to the clip."""
    r = length // 2
    return np.clip(np.arange(frame - r, frame + r + 1), 0, num_rows - 1)


# --------------------------------------------------------------------------------------------
# SadTalker's per-frame windows (Audio2Exp input), 25 fps
# --------------------------------------------------------------------------------------------

def sadtalker_num_frames(n_samples_16k: int) -> int:
    """T = int(len / 640): the number of 25 fps frames SadTalker makes from a 16 kHz clip."""
    return int(n_samples_16k / (SAMPLE_RATE / TRAIN_FPS))


def sadtalker_crop(wav16k: np.ndarray) -> np.ndarray:
    """The samples SadTalker's mel is computed from: the first ``T * 640`` (``parse_audio_length``
    + ``crop_pad_audio`` at 25 fps; the up to 639 samples after the last whole frame are dropped)."""
    wav = np.asarray(wav16k)
    return wav[:sadtalker_num_frames(wav.shape[0]) * SAMPLES_PER_FRAME]


def sadtalker_window_starts(frames: np.ndarray) -> np.ndarray:
    """First mel index of each 25 fps frame's 16-step window: ``int(80 (i - 2) / 25)`` (truncates
    toward zero, so frame 0 -> -6, frame 1 -> -3), before clamping."""
    frames = np.asarray(frames, dtype=np.int64)
    return np.array([int(80.0 * ((int(i) - 2) / float(TRAIN_FPS))) for i in frames], dtype=np.int64)


def sadtalker_mel_windows(mel: np.ndarray, frames: Any) -> np.ndarray:
    """``get_data``'s ``indiv_mels`` for the given 25 fps frame indices (an int count T means 0..T-1):
    (len, 80, 16) float32, mel indices clamped to [0, n_mel - 1] (edge frames repeat)."""
    frames = np.arange(frames) if np.isscalar(frames) else np.asarray(frames, dtype=np.int64)
    starts = sadtalker_window_starts(frames)
    idx = np.clip(starts[:, None] + np.arange(SAD_WINDOW)[None, :], 0, mel.shape[0] - 1)
    return np.ascontiguousarray(mel[idx].transpose(0, 2, 1)).astype(np.float32)


def blink_sequence(n_frames: int, seed: int | None) -> np.ndarray:
    """SadTalker's ``generate_blink_seq_randomly`` with ``random.seed(seed)``: (T,) float32 eye-blink
    ratios (0 = open; blinks are [0.5, 0.9, 1.0, 0.9, 0.5]). ``seed=None`` -> all zeros (no blinks).

    Uses its own ``random.Random(seed)`` (same draws as the global generator seeded the same way).
    Where the official code would crash (T = 21: an empty ``range`` for ``random.choice``) this
    returns no blinks.
    """
    ratio = np.zeros(n_frames, dtype=np.float32)
    if seed is None or n_frames <= 20:
        return ratio
    rng = random.Random(seed)
    choices = range(min(10, n_frames), min(int(n_frames / 2), 70))
    if len(choices) == 0:
        return ratio
    frame_id = 0
    while frame_id in range(n_frames):
        start = rng.choice(choices)
        if frame_id + start + 5 <= n_frames - 1:
            ratio[frame_id + start:frame_id + start + 5] = [0.5, 0.9, 1.0, 0.9, 0.5]
            frame_id = frame_id + start + 5
        else:
            break
    return ratio


# --------------------------------------------------------------------------------------------
# StyleHEAT's AudioWarper windows (paper path)
# --------------------------------------------------------------------------------------------

def styleheat_window_start(frame_index: int, step: int = AW_WINDOW) -> int:
    """Official ``AudioDataset.transform_audio`` start: ``int(80 * max(0, i - lag) / 25)`` with lag
    2, 4, 7, 12 for steps 16, 32, 48, 80 (the clamp is on the frame index)."""
    if step not in STYLEHEAT_LAG:
        raise ValueError(f"StyleHEAT cuts windows of 16, 32, 48 or 80 mel steps, not {step}")
    return int(80.0 * max(0, int(frame_index) - STYLEHEAT_LAG[step]) / 25.0)


def styleheat_cut(mel: np.ndarray, frame_index: int, step: int = AW_WINDOW) -> np.ndarray:
    """Official cut ``mel[start:start+step].T`` -> (80, <= step) float64 (shorter at the clip end)."""
    start = styleheat_window_start(frame_index, step)
    return np.ascontiguousarray(mel[start:start + step].T)


def _mel_windows(wav16k: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """(len(starts), 80, length) float64: mel frames ``s .. s+length-1`` of the clip continued by
    silence on both sides, for each start ``s`` (the mel is computed once over the starts' span;
    huge spans window by window, to bound memory)."""
    if starts.shape[0] == 0:
        return np.zeros((0, N_MELS, length), dtype=np.float64)
    first, last = int(starts.min()), int(starts.max()) + length
    if last - first <= 64 * length + starts.shape[0] * length:
        mel = mel_frames(wav16k, first, last - first)
        out = mel[(starts - first)[:, None] + np.arange(length)[None, :]]
    else:
        out = np.stack([mel_frames(wav16k, int(s), length) for s in starts])
    return np.ascontiguousarray(out.transpose(0, 2, 1))


def styleheat_windows(wav16k: np.ndarray, frames: Any, step: int = AW_WINDOW) -> np.ndarray:
    """The official-parity AudioWarper input of 25 fps frames ``frames`` (any integers) of a 16 kHz
    mono clip -> (len, 80, step) float64.

    Steps ``0 .. n-1`` of each window are exactly the official ``transform_audio(mel, i, step)`` with
    ``mel`` the official mel of the clip (``melspectrogram`` of :func:`sadtalker_crop`, the reference
    rule); ``n = len(styleheat_cut(mel, i, step))``. Where the official window is shorter (the last
    frames of a clip, frames past its end) the remaining steps are that cropped clip continued by
    silence, so every window has ``step`` steps.
    """
    frames = np.asarray(frames, dtype=np.int64).reshape(-1)
    starts = np.array([styleheat_window_start(int(i), step) for i in frames], dtype=np.int64)
    return _mel_windows(sadtalker_crop(wav16k), starts, step)


# --------------------------------------------------------------------------------------------
# Output frames at any fps -> AudioWarper windows (the product's path)
# --------------------------------------------------------------------------------------------

def frame_times(fps: float, n_frames: int, offset_seconds: float = 0.0, *,
                offset_frames: float | None = None) -> np.ndarray:
    """Audio time (seconds from the first sample) of output frames 0..n-1: ``offset + i / fps``.

    Exactly one way of giving the offset: ``offset_seconds`` or ``offset_frames`` (= offset in
    frames of ``fps``; ``offset_seconds = offset_frames / fps``).
    """
    try:
        fps = float(fps)
    except (TypeError, ValueError):
        raise AudioError(f"fps must be a number, got {fps!r}") from None
    if not math.isfinite(fps) or fps <= 0 or fps > 1000:
        raise AudioError(f"fps must be a positive frame rate (up to 1000), got {fps!r}")
    if not isinstance(n_frames, (int, np.integer)) or isinstance(n_frames, bool) or n_frames < 0:
        raise AudioError(f"n_frames must be a non-negative integer, got {n_frames!r}")
    if offset_frames is not None:
        if offset_seconds not in (0, 0.0):
            raise AudioError("give the offset either in seconds or in frames, not both")
        offset_seconds = float(offset_frames) / fps
    offset_seconds = float(offset_seconds)
    if not math.isfinite(offset_seconds):
        raise AudioError(f"the audio offset must be a finite number, got {offset_seconds!r}")
    return offset_seconds + np.arange(int(n_frames), dtype=np.float64) / fps


def grid_position(t: np.ndarray, rate: float) -> np.ndarray:
    """t (s) -> position on a grid of ``rate`` per second, snapped to integers within 1e-6."""
    pos = t * rate
    near = np.abs(pos - np.round(pos)) < 1e-6
    return np.where(near, np.round(pos), pos)


def audio_windows_for_frames(samples: Any, sample_rate: float, fps: float, n_frames: int,
                             offset_seconds: float = 0.0, *, offset_frames: float | None = None,
                             official: bool = False) -> np.ndarray:
    """One AudioWarper mel window per output frame -> (n_frames, 80, 32) float32.

    **What the offset means.** Output frame ``i`` shows the moment ``t_i = offset_seconds + i / fps``
    of the audio, measured from the audio's first sample (``offset_frames`` = the same in frames of
    ``fps``). For a Blender sound strip starting at scene frame ``S`` (strip sound offset ``o``
    seconds into the file) and a render starting at scene frame ``F``: ``offset_seconds =
    (F - S) / fps + o``. Negative offsets (frames before the sound starts) are fine.

    **The product's cut (default).** Frame ``i`` sits at position ``j = 25 t_i`` on the 25 fps grid
    the networks were trained on and gets the 32 mel steps ``floor(80 t_i - 12.8) ..`` (0.4 s from
    0.16 s before the frame, never stretched) of the mel of the *whole* audio continued by silence
    on both sides. At 25 fps with a whole-frame offset, a frame ``j >= 4`` therefore gets exactly
    the official ``transform_audio`` cut ``mel[int(80 (j - 4) / 25) :][:32]`` of the whole audio's
    mel. It differs from the official-parity windows (``official=True``) only, and deliberately:

    * frames ``j < 4`` (the first 0.16 s): the official code clamps them all to window 0; here the
      window starts 0.16 s before the frame, as for every other frame, so it begins with silence;
    * where the official window is shorter than 32 steps (it runs past the last mel frame): here it
      is completed with the audio's continuation (silence), so every window is full;
    * the official mel's last two frames, when the audio has samples after its last whole 25 fps
      frame (``len mod 640 != 0``): the official rule crops them away, here they are heard;
    * frames at other fps, at fractional offsets and before or after the audio: the official code
      has none of these (it runs at 25 fps from the first sample); here each frame gets the window
      of its own time ``t_i`` (the reference README's recommendation), silence outside the audio.

    **official=True** returns the official-parity windows (:func:`styleheat_windows`): only at
    25 fps with a whole-frame offset (any frame index ``j``, negative ones included, as
    ``transform_audio`` accepts any index); anything else is an :class:`AudioError`.
    """
    times = frame_times(fps, n_frames, offset_seconds, offset_frames=offset_frames)
    wav = to_mono_16k(samples, sample_rate)
    j = grid_position(times, TRAIN_FPS)                        # position on the 25 fps grid
    if official:
        if abs(float(fps) - TRAIN_FPS) > 1e-9 or not np.all(j == np.round(j)):
            raise AudioError(f"official=True cuts the official StyleHEAT windows, which exist only at "
                             f"{TRAIN_FPS} fps with a whole-frame offset (got fps {float(fps):g}); use the "
                             f"default (time-aligned) windows for other frame rates and offsets")
        return styleheat_windows(wav, j.astype(np.int64)).astype(np.float32)
    starts = np.floor(80.0 * (j - STYLEHEAT_LAG[AW_WINDOW]) / 25.0 + 1e-9).astype(np.int64)
    return _mel_windows(wav, starts, AW_WINDOW).astype(np.float32)
