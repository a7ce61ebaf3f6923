"""Audio features for StyleHEAT: the official mel spectrogram, per-frame mel windows, audio -> expression.

Two audio paths are provided (reference: ``shared/reference/README_audio_3dmm.md``):

* **Paper path (AudioWarper).** :func:`audio_windows_for_frames` gives one (80, 32) mel window
  per scene frame, cut the way StyleHEAT's ``AudioDataset.transform_audio`` cuts them, for the
  engine's ``render(..., audio=...)``.
* **Released-weights path (SadTalker Audio2Exp).** :func:`audio_to_expression` turns audio into
  64 expression coefficients per frame with SadTalker's Audio2Exp network
  (:class:`models.audio2exp.Audio2Exp`, weights read by :func:`load_audio2exp`).

The mel spectrogram is SadTalker/Wav2Lip's ``audio.melspectrogram`` (16 kHz; pre-emphasis 0.97;
|STFT| with n_fft = win = 800, hop 200, periodic Hann, centred frames padded with **zeros** (the
librosa >= 0.9 behaviour the reference uses); Slaney mel filter bank, 80 bands 55..7600 Hz;
``20 log10(max(1e-5, m)) - 20`` dB; ``clip(8 (S + 100) / 100 - 4, -4, 4)``). Mel frame ``k`` is
centred on sample ``200 k``: 80 mel frames per second. Digital silence is exactly -4.

Audio input everywhere: ``samples`` as a numpy array, 1-D (mono) or 2-D (n_samples, n_channels)
like soundfile / Blender's ``aud`` return it (a (n_channels, n_samples) array with at most 16
channels is also accepted); float in [-1, 1], or integer PCM (int16 / int32 / uint8, scaled as
librosa/soundfile do: int16 / 32768). Channels are averaged to mono (librosa's mix-down); any
other sample rate is resampled to 16 kHz with librosa (``soxr_hq``; SadTalker's pinned librosa
0.9.2 used ``kaiser_best``, so resampled input differs from the official run by resampler noise;
16 kHz input is identical). Raw PCM bytes (what Blender can send) go through :func:`pcm_to_samples`.
"""
from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = [
    "AudioError", "SAMPLE_RATE", "MEL_FPS", "TRAIN_FPS", "SILENCE",
    "read_audio", "pcm_to_samples", "to_mono_16k", "mel_basis", "mel_frames", "melspectrogram",
    "sadtalker_num_frames", "sadtalker_window_starts", "sadtalker_mel_windows", "blink_sequence",
    "styleheat_window_start", "styleheat_cut", "audio_windows_for_frames", "frame_times",
    "audio2exp_state_dict", "load_audio2exp", "expression_25fps", "audio_to_expression",
]

SAMPLE_RATE = 16000          # Hz, what every network here was trained on
N_FFT = 800
WIN_LENGTH = 800
HOP = 200
N_MELS = 80
FMIN, FMAX = 55.0, 7600.0
PREEMPHASIS = 0.97
REF_LEVEL_DB = 20.0
MIN_LEVEL_DB = -100.0
MAX_ABS = 4.0
MEL_FPS = SAMPLE_RATE // HOP  # 80 mel frames per second
TRAIN_FPS = 25                # the video frame rate both SadTalker and StyleHEAT were trained at
SILENCE = -MAX_ABS            # normalised mel value of digital silence
SAD_WINDOW = 16               # SadTalker Audio2Exp window (mel steps, 0.2 s)
AW_WINDOW = 32                # StyleHEAT AudioWarper window (mel steps, 0.4 s)
# StyleHEAT transform_audio: step -> frames the window start lags the frame (max(0, i - lag))
_STYLEHEAT_LAG = {16: 2, 32: 4, 48: 7, 80: 12}
_MAX_CHANNELS = 16


class AudioError(ValueError):
    """Audio input that cannot be used; the message says what was wrong and what to do."""


# --------------------------------------------------------------------------------------------
# Reading and normalising audio
# --------------------------------------------------------------------------------------------

def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read an audio file -> (samples float32 (n,) or (n, channels), sample rate).

    Uses soundfile (WAV, FLAC, OGG, MP3 with libsndfile >= 1.1, ...), then librosa's audioread
    fallback for anything else. Unreadable files raise :class:`AudioError`.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: audio file not found; check the path")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, expected an audio file (WAV, FLAC, OGG, MP3)")
    import soundfile

    try:
        data, sr = soundfile.read(str(path), dtype="float32", always_2d=False)
        return np.asarray(data, dtype=np.float32), int(sr)
    except Exception as first_error:  # noqa: BLE001 - libsndfile raises several types
        try:
            import warnings

            import librosa

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data, sr = librosa.load(str(path), sr=None, mono=False)
        except Exception:  # noqa: BLE001
            raise AudioError(f"{path}: cannot read this audio file ({first_error}); convert it to a "
                             f"WAV or FLAC file (e.g. with ffmpeg -i IN -ac 1 -ar 16000 OUT.wav)") from None
        data = np.asarray(data, dtype=np.float32)
        return (data.T if data.ndim == 2 else data), int(sr)


def pcm_to_samples(buffer: bytes | bytearray | memoryview, dtype: str = "int16", channels: int = 1) -> np.ndarray:
    """Raw interleaved little-endian PCM bytes (e.g. sent by Blender) -> (n, channels) or (n,) array.

    ``dtype``: 'int16', 'int32', 'uint8', 'float32' or 'float64'. Pass the result to the functions
    below together with its sample rate; integer samples are scaled there.
    """
    allowed = {"int16": "<i2", "int32": "<i4", "uint8": "u1", "float32": "<f4", "float64": "<f8"}
    if dtype not in allowed:
        raise AudioError(f"PCM sample type {dtype!r} is not supported; use one of {sorted(allowed)}")
    if not isinstance(channels, int) or not 1 <= channels <= _MAX_CHANNELS:
        raise AudioError(f"PCM channel count must be an integer from 1 to {_MAX_CHANNELS}, got {channels!r}")
    item = np.dtype(allowed[dtype]).itemsize
    if len(buffer) % (item * channels):
        raise AudioError(f"PCM buffer of {len(buffer)} bytes is not a whole number of {channels}-channel "
                         f"{dtype} frames ({item * channels} bytes each); was the sample type or channel count wrong?")
    arr = np.frombuffer(buffer, dtype=allowed[dtype])
    return arr if channels == 1 else arr.reshape(-1, channels)


def _to_float(samples: Any) -> np.ndarray:
    arr = np.asarray(samples)
    if arr.dtype == np.int16:
        return arr.astype(np.float32) / 32768.0
    if arr.dtype == np.int32:
        return (arr.astype(np.float64) / 2147483648.0).astype(np.float32)
    if arr.dtype == np.uint8:
        return (arr.astype(np.float32) - 128.0) / 128.0
    if arr.dtype.kind == "f":
        return arr.astype(np.float32, copy=False)
    if arr.dtype.kind in "iu":
        raise AudioError(f"integer audio samples of type {arr.dtype} are not supported; use int16, int32, "
                         f"uint8 or float samples in [-1, 1]")
    raise AudioError(f"audio samples must be a numeric array, got dtype {arr.dtype}")


def to_mono_16k(samples: Any, sample_rate: float) -> np.ndarray:
    """Any audio array + its sample rate -> mono float32 (n,) at 16 kHz (see the module docstring)."""
    try:
        sr = float(sample_rate)
    except (TypeError, ValueError):
        raise AudioError(f"sample rate must be a number of samples per second, got {sample_rate!r}") from None
    if not math.isfinite(sr) or sr < 1000 or sr > 1_000_000:
        raise AudioError(f"sample rate {sample_rate!r} Hz is not usable; give the audio's real rate "
                         f"(1000 .. 1000000 Hz, typically 16000, 44100 or 48000)")
    x = _to_float(samples)
    if x.ndim == 2:
        if x.shape[1] > _MAX_CHANNELS and x.shape[0] <= _MAX_CHANNELS:
            x = x.T  # (channels, n) as librosa returns it
        if x.shape[1] > _MAX_CHANNELS:
            raise AudioError(f"audio array of shape {x.shape} has more than {_MAX_CHANNELS} channels; "
                             f"pass (n_samples, n_channels) or a 1-D mono array")
        x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    elif x.ndim != 1:
        raise AudioError(f"audio must be 1-D (mono) or 2-D (n_samples, n_channels), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise AudioError("audio contains NaN or infinite samples; the file or buffer is corrupt")
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > 64.0:
        raise AudioError(f"float audio samples reach {peak:.0f}; float audio must lie in [-1, 1] (integer PCM "
                         f"stored as float? divide by 32768, or pass the int16 array itself)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if abs(sr - SAMPLE_RATE) > 1e-9 and x.size:
        import librosa

        x = librosa.resample(x, orig_sr=sr, target_sr=SAMPLE_RATE, res_type="soxr_hq").astype(np.float32)
    return x


# --------------------------------------------------------------------------------------------
# The official mel spectrogram
# --------------------------------------------------------------------------------------------

_MEL_BASIS: np.ndarray | None = None


def mel_basis() -> np.ndarray:
    """(80, 401) float32 Slaney mel filter bank (``librosa.filters.mel``, 55..7600 Hz), cached."""
    global _MEL_BASIS
    if _MEL_BASIS is None:
        import librosa

        _MEL_BASIS = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX)
        _MEL_BASIS.setflags(write=False)
    return _MEL_BASIS


def mel_frames(wav16k: np.ndarray, first: int, count: int) -> np.ndarray:
    """Mel frames ``first .. first+count-1`` (80 per second, frame k centred on sample 200 k) of
    the 16 kHz mono clip -> (count, 80) float64, computing only the frames asked for.

    ``first`` may be negative and the range may run past the end: the pre-emphasised clip is
    continued with zeros on both sides, which is exactly what the official centred STFT with zero
    padding sees, so frames 0 .. len//200 equal the official ``melspectrogram(wav).T`` and frames
    further out are silence (-4).
    """
    import librosa
    from scipy import signal

    if count <= 0:
        return np.zeros((0, N_MELS), dtype=np.float64)
    wav = np.asarray(wav16k)
    a = HOP * first - N_FFT // 2                   # first sample the frames need
    b = HOP * (first + count - 1) + N_FFT // 2     # one past the last sample
    pre = np.zeros(b - a, dtype=np.float64)       # pre-emphasised clip, zeros outside (as the centred,
    lo, hi = max(a, 0), min(b, wav.shape[0])      # zero-padded official STFT sees it)
    if hi > lo:
        memory = 1 if lo > 0 else 0                # the sample before lo feeds y[lo] = x[lo] - 0.97 x[lo-1]
        chunk = signal.lfilter([1, -PREEMPHASIS], [1], np.asarray(wav[lo - memory:hi], dtype=np.float64))
        pre[lo - a:hi - a] = chunk[memory:]
    spec = librosa.stft(y=pre, n_fft=N_FFT, hop_length=HOP, win_length=WIN_LENGTH, window="hann", center=False)
    mel = np.dot(mel_basis(), np.abs(spec))
    min_level = np.exp(MIN_LEVEL_DB / 20 * np.log(10))
    s = 20 * np.log10(np.maximum(min_level, mel)) - REF_LEVEL_DB
    s = np.clip((2 * MAX_ABS) * ((s - MIN_LEVEL_DB) / (-MIN_LEVEL_DB)) - MAX_ABS, -MAX_ABS, MAX_ABS)
    return np.ascontiguousarray(s.T)


def melspectrogram(wav16k: np.ndarray) -> np.ndarray:
    """The official ``audio.melspectrogram(wav).T``: (1 + len // 200, 80) float64."""
    wav = np.asarray(wav16k)
    return mel_frames(wav, 0, 1 + wav.shape[0] // HOP)


# --------------------------------------------------------------------------------------------
# SadTalker's per-frame windows (Audio2Exp input), 25 fps
# --------------------------------------------------------------------------------------------

def sadtalker_num_frames(n_samples_16k: int) -> int:
    """T = int(len / 640): the number of 25 fps frames SadTalker makes from a 16 kHz clip."""
    return int(n_samples_16k / (SAMPLE_RATE / TRAIN_FPS))


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
    if step not in _STYLEHEAT_LAG:
        raise ValueError(f"StyleHEAT cuts windows of 16, 32, 48 or 80 mel steps, not {step}")
    return int(80.0 * max(0, int(frame_index) - _STYLEHEAT_LAG[step]) / 25.0)


def styleheat_cut(mel: np.ndarray, frame_index: int, step: int = AW_WINDOW) -> np.ndarray:
    """Official cut ``mel[start:start+step].T`` -> (80, <= step) float64 (shorter at the clip end)."""
    start = styleheat_window_start(frame_index, step)
    return np.ascontiguousarray(mel[start:start + step].T)


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


def _grid_position(t: np.ndarray, rate: float) -> np.ndarray:
    """t (s) -> position on a grid of ``rate`` per second, snapped to integers within 1e-6."""
    pos = t * rate
    near = np.abs(pos - np.round(pos)) < 1e-6
    return np.where(near, np.round(pos), pos)


def audio_windows_for_frames(samples: Any, sample_rate: float, fps: float, n_frames: int,
                             offset_seconds: float = 0.0, *, offset_frames: float | None = None,
                             official_start_clamp: bool = False) -> np.ndarray:
    """One AudioWarper mel window per output frame -> (n_frames, 80, 32) float32.

    **What the offset means.** Output frame ``i`` shows the moment ``t_i = offset_seconds + i / fps``
    of the audio, measured from the audio's first sample (``offset_frames`` = the same in frames of
    ``fps``). For a Blender sound strip starting at scene frame ``S`` (strip sound offset ``o``
    seconds into the file) and a render starting at scene frame ``F``: ``offset_seconds =
    (F - S) / fps + o``. Negative offsets (frames before the sound starts) are fine.

    **The cut.** StyleHEAT's ``transform_audio`` (step 32) gives frame ``i`` (25 fps) the mel steps
    ``int(80 max(0, i - 4) / 25) .. + 32``: 0.4 s from 0.16 s before the frame. Here the start is
    ``floor(80 t_i - 12.8)`` (identical to the official one for every frame at or after 0.16 s at
    25 fps), taken from the mel of the whole audio continued by silence on both sides, so every
    window has its full 32 steps: windows reaching before the audio start or past its end are
    completed with what silence gives (-4), where the official dataset clamps the first four
    frames to window 0 (``official_start_clamp=True`` reproduces that clamp) and returns shorter
    windows at the end.

    **Other frame rates.** The networks were trained at 25 fps; following the reference README's
    recommendation, a frame at any fps gets the window the 25 fps training grid gives at its own
    time ``t_i`` (same 0.4 s length, no stretching), i.e. the 25 fps curve resampled at ``t_i``.
    """
    times = frame_times(fps, n_frames, offset_seconds, offset_frames=offset_frames)
    wav = to_mono_16k(samples, sample_rate)
    if n_frames == 0:
        return np.zeros((0, N_MELS, AW_WINDOW), dtype=np.float32)
    j = _grid_position(times, TRAIN_FPS)                      # position on the 25 fps grid
    lag = _STYLEHEAT_LAG[AW_WINDOW]
    if official_start_clamp:
        j = np.where(j >= 0, np.maximum(j, lag), j)
    starts = np.floor(80.0 * (j - lag) / 25.0 + 1e-9).astype(np.int64)
    first, last = int(starts.min()), int(starts.max()) + AW_WINDOW
    # the mel is computed once for the frames' span (huge spans: per frame, to bound memory)
    if last - first <= 64 * AW_WINDOW + n_frames * AW_WINDOW:
        mel = mel_frames(wav, first, last - first)
        idx = (starts - first)[:, None] + np.arange(AW_WINDOW)[None, :]
        out = mel[idx]
    else:
        out = np.stack([mel_frames(wav, int(s), AW_WINDOW) for s in starts])
    return np.ascontiguousarray(out.transpose(0, 2, 1)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Audio2Exp weights
# --------------------------------------------------------------------------------------------

def audio2exp_state_dict(checkpoint: Mapping[str, Any], what: str = "checkpoint") -> dict:
    """The Audio2Exp state dict inside any of SadTalker's layouts:

    * the safetensors bundle (``SadTalker_V0.0.2_256/512.safetensors``): every key *containing*
      ``audio2exp`` with ``audio2exp.`` removed (SadTalker's ``load_x_from_safetensor``);
    * the old ``auido2exp_00300-model.pth``: ``checkpoint['model']``;
    * a bare state dict (``audio_encoder.*``, ``mapping1.*``).
    """
    if not isinstance(checkpoint, Mapping):
        raise AudioError(f"{what}: expected a dictionary of tensors, got {type(checkpoint).__name__}")
    keys = [k for k in checkpoint if isinstance(k, str)]
    if any("audio2exp" in k for k in keys):
        return {k.replace("audio2exp.", ""): checkpoint[k] for k in keys if "audio2exp" in k}
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        return dict(checkpoint["model"])
    if any(k.startswith(("audio_encoder.", "mapping1.")) for k in keys):
        return dict(checkpoint)
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping) and \
            any("audio_encoder" in str(k) for k in checkpoint["state_dict"]):
        raise AudioError(f"{what} looks like wav2lip.pth: it holds only a pretrained audio encoder, which "
                         f"SadTalker's Audio2Exp never reads. Pass auido2exp_00300-model.pth or "
                         f"SadTalker_V0.0.2_256.safetensors (SadTalker's checkpoints) instead")
    shown = ", ".join(map(str, keys[:8])) + (" ..." if len(keys) > 8 else "")
    raise AudioError(f"{what} is not an Audio2Exp checkpoint (top-level keys: {shown or 'none'}); pass "
                     f"SadTalker's auido2exp_00300-model.pth or SadTalker_V0.0.2_256/512.safetensors")


def _find_checkpoint(directory: Path) -> Path:
    for name in ("SadTalker_V0.0.2_256.safetensors", "SadTalker_V0.0.2_512.safetensors",
                 "auido2exp_00300-model.pth", "audio2exp_00300-model.pth"):
        for cand in (directory / name, directory / "checkpoints" / name):
            if cand.is_file():
                return cand
    raise AudioError(f"{directory}: no SadTalker Audio2Exp checkpoint found there (looked for "
                     f"SadTalker_V0.0.2_256.safetensors, SadTalker_V0.0.2_512.safetensors and "
                     f"auido2exp_00300-model.pth); download SadTalker's checkpoints or pass the file itself")


def _config_from_state(sd: Mapping[str, Any]):
    from models.audio2exp import Audio2ExpConfig

    try:
        widths = tuple(int(sd[f"audio_encoder.{i}.conv_block.0.weight"].shape[0]) for i in (0, 3, 6, 9, 11))
        exp_dim = int(sd["mapping1.weight"].shape[0])
    except (KeyError, AttributeError, IndexError):
        return Audio2ExpConfig()  # strict loading reports what is wrong
    return Audio2ExpConfig(widths=widths, exp_dim=exp_dim)


def load_audio2exp(path: str | os.PathLike, device: str = "cpu"):
    """Build :class:`models.audio2exp.Audio2Exp` from a SadTalker checkpoint file (or a directory
    holding one), strictly: any missing / unexpected / mis-shaped key -> one error listing them.

    ``.safetensors``: only the ``audio2exp`` tensors are read. Other files: ``torch.load(...,
    map_location='cpu', weights_only=True)`` (no code is ever loaded from a checkpoint).
    """
    import torch

    from models.audio2exp import Audio2Exp, load_state_dict_strict

    path = Path(path)
    if path.is_dir():
        path = _find_checkpoint(path)
    if not path.is_file():
        raise AudioError(f"{path}: Audio2Exp checkpoint not found; check the path")
    what = str(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                names = list(f.keys())
                wanted = [k for k in names if "audio2exp" in k]
                raw = {k: f.get_tensor(k) for k in (wanted or names)}
        except Exception as e:  # noqa: BLE001
            raise AudioError(f"{what}: not a readable safetensors file ({e})") from None
    else:
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise AudioError(f"{what}: cannot load it as a PyTorch checkpoint with weights_only=True ({e}); "
                             f"is it a SadTalker .pth file, complete and undamaged?") from None
    sd = audio2exp_state_dict(raw, what)
    model = Audio2Exp(_config_from_state(sd))
    load_state_dict_strict(model, sd, what)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# Audio -> expression
# --------------------------------------------------------------------------------------------

def expression_25fps(model, wav16k: np.ndarray, frames: np.ndarray, ref_exp: np.ndarray,
                     ratio: np.ndarray, *, batch_size: int = 100) -> np.ndarray:
    """Audio2Exp on the given 25 fps frame indices of a 16 kHz mono clip -> (len, 64) float32.

    Frames 0 .. T-1 (T = int(len / 640); the clip is cropped to T * 640 samples) get SadTalker's
    window (official ``get_data``); frames outside that range (before the audio starts or after it
    ends) get a silent window (all -4). ``ref_exp`` (len, 64) and ``ratio`` (len,) per frame.
    """
    import torch

    frames = np.asarray(frames, dtype=np.int64)
    n_audio = sadtalker_num_frames(wav16k.shape[0])
    inside = (frames >= 0) & (frames < n_audio)
    windows = np.full((frames.shape[0], N_MELS, SAD_WINDOW), SILENCE, dtype=np.float32)
    if inside.any():
        crop = wav16k[:n_audio * (SAMPLE_RATE // TRAIN_FPS)]
        windows[inside] = sadtalker_mel_windows(melspectrogram(crop), frames[inside])
    param = next(model.parameters())
    out = []
    with torch.inference_mode():
        for s in range(0, frames.shape[0], max(1, int(batch_size))):
            e = slice(s, s + max(1, int(batch_size)))
            mel = torch.from_numpy(windows[e]).to(param.device, param.dtype)
            ref = torch.from_numpy(np.ascontiguousarray(ref_exp[e], dtype=np.float32)).to(param.device, param.dtype)
            rat = torch.from_numpy(np.ascontiguousarray(ratio[e], dtype=np.float32)).to(param.device, param.dtype)
            out.append(model(mel, ref, rat).float().cpu().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, model.cfg.exp_dim), dtype=np.float32)


def audio_to_expression(samples: Any, sample_rate: float, fps: float, ref_exp: Any, *, model: Any,
                        n_frames: int | None = None, offset_seconds: float = 0.0,
                        offset_frames: float | None = None, blink: Any = None, seed: int = 0,
                        batch_size: int = 100, device: str = "cpu") -> np.ndarray:
    """Audio -> per-frame 64 expression coefficients with SadTalker's Audio2Exp: (n_frames, 64) float32.

    ``model``: an :class:`models.audio2exp.Audio2Exp` or a checkpoint path (:func:`load_audio2exp`).
    ``ref_exp``: the portrait's own expression, (64,) (the first 64 of its 73 coefficients), or
    (n_frames, 64) per output frame.
    ``n_frames``: default ``int(duration * fps)`` (at 25 fps SadTalker's T = int(len / 640)).
    ``offset_seconds`` / ``offset_frames``: output frame ``i`` is audio time ``offset + i / fps``,
    as in :func:`audio_windows_for_frames`.
    ``blink``: None (no blinks, SadTalker's ``still`` mode), ``"random"`` (SadTalker's random
    blinks on the 25 fps grid, ``random.seed(seed)``), or an array of per-output-frame ratios in [0, 1].

    At 25 fps with offset 0 and the default n_frames this is exactly SadTalker's ``Audio2Exp.test``
    (official windows and chunking-independent results). At other frame rates or offsets the network
    runs on the 25 fps grid it was trained on and the 64 curves are linearly interpolated at each
    output frame's time (the reference README's recommendation); frames outside the audio see silence,
    and frames after the last 25 fps frame but before the audio ends hold that frame's value.
    """
    wav = to_mono_16k(samples, sample_rate)
    if n_frames is None:
        try:
            fps_f = float(fps)
        except (TypeError, ValueError):
            raise AudioError(f"fps must be a number, got {fps!r}") from None
        n_frames = int(wav.shape[0] * fps_f / SAMPLE_RATE) if math.isfinite(fps_f) and fps_f > 0 else -1
    times = frame_times(fps, n_frames, offset_seconds, offset_frames=offset_frames)
    if isinstance(model, (str, os.PathLike)):
        model = load_audio2exp(model, device=device)
    exp_dim = model.cfg.exp_dim
    ref = np.asarray(ref_exp, dtype=np.float32)
    if ref.shape == (exp_dim,):
        ref = np.broadcast_to(ref, (n_frames, exp_dim))
    if ref.shape != (n_frames, exp_dim) or not np.all(np.isfinite(ref)):
        raise AudioError(f"ref_exp must be ({exp_dim},) or ({n_frames}, {exp_dim}) finite numbers (the "
                         f"portrait's expression coefficients), got shape {ref.shape}")
    if n_frames == 0:
        return np.zeros((0, exp_dim), dtype=np.float32)
    pos = _grid_position(times, TRAIN_FPS)
    n_audio = sadtalker_num_frames(wav.shape[0])
    # between the last 25 fps frame and the end of the audio the sound still plays: hold that frame
    pos = np.where((pos > n_audio - 1) & (pos < n_audio), float(n_audio - 1), pos)
    lo = np.floor(pos).astype(np.int64)
    frac = (pos - lo).astype(np.float32)
    grid = np.arange(int(lo.min()), int(lo.max()) + 2, dtype=np.int64)
    need = np.zeros(grid.shape[0], dtype=bool)
    need[lo - grid[0]] = True
    need[(lo + 1 - grid[0])[frac > 0]] = True
    frames25 = grid[need]
    # per-25fps-frame reference expression and blink ratio (nearest output frame's values)
    nearest = np.clip(np.searchsorted(pos, frames25, side="left"), 0, n_frames - 1)
    ref25 = ref[nearest]
    if blink is None:
        ratio25 = np.zeros(frames25.shape[0], dtype=np.float32)
    elif isinstance(blink, str):
        if blink != "random":
            raise AudioError(f"blink must be None, 'random' or an array of per-frame ratios, got {blink!r}")
        seq = blink_sequence(n_audio, seed)
        ratio25 = np.where((frames25 >= 0) & (frames25 < n_audio), seq[np.clip(frames25, 0, max(n_audio - 1, 0))]
                           if n_audio else 0.0, 0.0).astype(np.float32)
    else:
        b = np.asarray(blink, dtype=np.float32).reshape(-1)
        if b.shape != (n_frames,) or not np.all(np.isfinite(b)):
            raise AudioError(f"a blink array must hold one finite ratio per output frame ({n_frames}), got shape {b.shape}")
        ratio25 = b[nearest]
    exp25 = expression_25fps(model, wav, frames25, ref25, ratio25, batch_size=batch_size)
    index = {int(f): k for k, f in enumerate(frames25)}
    a = exp25[[index[int(f)] for f in lo]]
    out = a.copy()
    moving = frac > 0
    if moving.any():
        b = exp25[[index[int(f) + 1] for f in lo[moving]]]
        out[moving] = a[moving] + frac[moving, None] * (b - a[moving])
    return out.astype(np.float32)
