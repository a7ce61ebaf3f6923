"""Audio for StyleHEAT: reading audio files, SadTalker's Audio2Exp weights, audio -> expression.

Two audio paths are provided (reference: ``shared/reference/README_audio_3dmm.md``):

* **Paper path (AudioWarper).** :func:`audio_windows_for_frames` gives one (80, 32) mel window
  per scene frame, cut the way StyleHEAT's ``AudioDataset.transform_audio`` cuts them, for the
  engine's ``render(..., audio=...)``.
* **Released-weights path (SadTalker Audio2Exp).** :func:`audio_to_expression` turns audio into
  64 expression coefficients per frame with SadTalker's Audio2Exp network
  (:class:`models.audio2exp.Audio2Exp`, weights read by :func:`load_audio2exp`).

The pure parts live below both the server and training: the input conversion and the official mel
spectrogram in :mod:`models.audio_features`, the frame -> window index math in :mod:`models.windows`
(both re-exported here under their old names). This module adds what touches files, checkpoints and
devices.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from models.audio_features import (MEL_FPS, N_MELS, SAD_WINDOW, SAMPLE_RATE, SILENCE, TRAIN_FPS,  # noqa: F401
                                   AudioError, mel_basis, mel_frames, melspectrogram, pcm_to_samples, to_mono_16k)
from models.windows import (audio_windows_for_frames, blink_sequence, frame_times, grid_position,  # noqa: F401
                            sadtalker_crop, sadtalker_mel_windows, sadtalker_num_frames, sadtalker_window_starts,
                            styleheat_cut, styleheat_window_start, styleheat_windows)

__all__ = [
    "AudioError", "SAMPLE_RATE", "MEL_FPS", "TRAIN_FPS", "SILENCE",
    "read_audio", "pcm_to_samples", "to_mono_16k", "mel_basis", "mel_frames", "melspectrogram",
    "sadtalker_num_frames", "sadtalker_crop", "sadtalker_window_starts", "sadtalker_mel_windows",
    "blink_sequence", "styleheat_window_start", "styleheat_cut", "styleheat_windows",
    "audio_windows_for_frames", "frame_times",
    "audio2exp_state_dict", "load_audio2exp", "expression_25fps", "audio_to_expression",
]


# --------------------------------------------------------------------------------------------
# Reading audio files
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
        windows[inside] = sadtalker_mel_windows(melspectrogram(sadtalker_crop(wav16k)), frames[inside])
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
    pos = grid_position(times, TRAIN_FPS)
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
