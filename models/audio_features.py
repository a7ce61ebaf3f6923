"""The official audio features, pure array code shared by the server and training (no file I/O).

Reference: ``shared/reference/README_audio_3dmm.md`` sections 4.1 and 4.2.

* **Input.** ``samples`` as a numpy array, 1-D (mono) or 2-D (n_samples, n_channels) like soundfile /
  Blender's ``aud`` return it (a (n_channels, n_samples) array with at most 16 channels is also
  accepted); float in [-1, 1], or integer PCM (int16 / int32 / uint8, scaled as librosa/soundfile
  do: int16 / 32768). Channels are averaged to mono (librosa's mix-down); any other sample rate is
  resampled to 16 kHz with librosa (``soxr_hq``; SadTalker's pinned librosa 0.9.2 used
  ``kaiser_best``, so resampled input differs from the official run by resampler noise; 16 kHz input
  is identical). Raw PCM bytes (what Blender can send) go through :func:`pcm_to_samples`.
* **Mel spectrogram.** SadTalker/Wav2Lip's ``audio.melspectrogram`` (16 kHz; pre-emphasis 0.97;
  |STFT| with n_fft = win = 800, hop 200, periodic Hann, centred frames padded with **zeros** (the
  librosa >= 0.9 behaviour the reference uses); Slaney mel filter bank, 80 bands 55..7600 Hz;
  ``20 log10(max(1e-5, m)) - 20`` dB; ``clip(8 (S + 100) / 100 - 4, -4, 4)``). Mel frame ``k`` is
  centred on sample ``200 k``: 80 mel frames per second. Digital silence is exactly -4.

How frames are mapped to mel windows is :mod:`models.windows`; reading files, checkpoints and
running the networks is ``server.preprocessing.audio``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "AudioError", "SAMPLE_RATE", "N_FFT", "WIN_LENGTH", "HOP", "N_MELS", "FMIN", "FMAX", "MEL_FPS",
    "TRAIN_FPS", "SAMPLES_PER_FRAME", "SILENCE", "SAD_WINDOW", "AW_WINDOW",
    "pcm_to_samples", "to_mono_16k", "mel_basis", "mel_frames", "melspectrogram",
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
SAMPLES_PER_FRAME = SAMPLE_RATE // TRAIN_FPS  # 640: one 25 fps frame of 16 kHz audio
_MAX_CHANNELS = 16


class AudioError(ValueError):
    """Audio input that cannot be used; the message says what was wrong and what to do."""


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
