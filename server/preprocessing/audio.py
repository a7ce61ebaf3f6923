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


def _read_sadtalker_checkpoint(path: Path, part: str, expected: str) -> dict:
    """Tensors of a SadTalker checkpoint: from a ``.safetensors`` bundle only the keys naming ``part``
    (``audio2exp`` / ``audio2pose``), else ``torch.load(..., weights_only=True)`` (never code from a file)."""
    import torch

    what = str(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                names = list(f.keys())
                wanted = [k for k in names if part in k]
                return {k: f.get_tensor(k) for k in (wanted or names)}
        except Exception as e:  # noqa: BLE001
            raise AudioError(f"{what}: not a readable safetensors file ({e})") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise AudioError(f"{what}: cannot load it as a PyTorch checkpoint with weights_only=True ({e}); "
                         f"is it {expected}, complete and undamaged?") from None


def load_audio2exp(path: str | os.PathLike, device: str = "cpu"):
    """Build :class:`models.audio2exp.Audio2Exp` from a SadTalker checkpoint file (or a directory
    holding one), strictly: any missing / unexpected / mis-shaped key -> one error listing them.

    ``.safetensors``: only the ``audio2exp`` tensors are read. Other files: ``torch.load(...,
    map_location='cpu', weights_only=True)`` (no code is ever loaded from a checkpoint).
    """
    from models.audio2exp import Audio2Exp, load_state_dict_strict

    path = Path(path)
    if path.is_dir():
        path = _find_checkpoint(path)
    if not path.is_file():
        raise AudioError(f"{path}: Audio2Exp checkpoint not found; check the path")
    what = str(path)
    raw = _read_sadtalker_checkpoint(path, "audio2exp", "a SadTalker .pth file")
    sd = audio2exp_state_dict(raw, what)
    model = Audio2Exp(_config_from_state(sd))
    load_state_dict_strict(model, sd, what)
    model.source_path = str(path)   # where audio2pose_near() looks for the matching Audio2Pose weights
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


# --------------------------------------------------------------------------------------------
# Audio2Pose (head motion) weights and audio -> head pose
# --------------------------------------------------------------------------------------------

AUDIO2POSE_FILES = ("SadTalker_V0.0.2_256.safetensors", "SadTalker_V0.0.2_512.safetensors",
                    "auido2pose_00140-model.pth", "audio2pose_00140-model.pth")


def audio2pose_state_dict(checkpoint: Mapping[str, Any], what: str = "checkpoint") -> dict:
    """The Audio2Pose state dict inside SadTalker's layouts: the safetensors bundle (keys containing
    ``audio2pose`` with ``audio2pose.`` removed), ``auido2pose_00140-model.pth`` (``['model']``) or a
    bare state dict (``audio_encoder.*``, ``netG.*``, ``netD_motion.*``)."""
    if not isinstance(checkpoint, Mapping):
        raise AudioError(f"{what}: expected a dictionary of tensors, got {type(checkpoint).__name__}")
    keys = [k for k in checkpoint if isinstance(k, str)]
    if any("audio2pose" in k for k in keys):
        return {k.replace("audio2pose.", ""): checkpoint[k] for k in keys if "audio2pose" in k}
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        return dict(checkpoint["model"])
    if any(k.startswith("netG.") for k in keys):
        return dict(checkpoint)
    shown = ", ".join(map(str, keys[:8])) + (" ..." if len(keys) > 8 else "")
    raise AudioError(f"{what} is not an Audio2Pose checkpoint (top-level keys: {shown or 'none'}); pass "
                     f"SadTalker's auido2pose_00140-model.pth or SadTalker_V0.0.2_256/512.safetensors")


def _pose_config_from_state(sd: Mapping[str, Any]):
    from models.audio2pose import Audio2PoseConfig

    try:
        enc = tuple(int(sd[f"audio_encoder.audio_encoder.{i}.conv_block.0.weight"].shape[0]) for i in (0, 3, 6, 9, 11))
        unet = tuple(int(sd[f"netG.decoder.resunet.{n}"].shape[0]) for n in (
            "input_layer.0.weight", "residual_conv_1.conv_skip.0.weight", "residual_conv_2.conv_skip.0.weight",
            "bridge.conv_skip.0.weight"))
        latent = int(sd["netG.decoder.classbias"].shape[1])
        hidden = int(sd["netG.decoder.MLP.L0.weight"].shape[0])
        disc = tuple(int(sd[f"netD_motion.seq.{i}.conv.weight"].shape[0]) for i in range(3))
    except (KeyError, AttributeError, IndexError):
        return Audio2PoseConfig()  # strict loading reports what is wrong
    return Audio2PoseConfig(encoder_widths=enc, unet_filters=unet, latent=latent, hidden=hidden, disc_widths=disc)


def load_audio2pose(path: str | os.PathLike, device: str = "cpu"):
    """Build :class:`models.audio2pose.Audio2Pose` from a SadTalker checkpoint file (or a directory
    holding one), strictly. ``.safetensors``: only the ``audio2pose`` tensors are read; other files:
    ``torch.load(..., weights_only=True)``."""
    from models.audio2exp import load_state_dict_strict
    from models.audio2pose import Audio2Pose

    path = Path(path)
    if path.is_dir():
        found = [c for n in AUDIO2POSE_FILES for c in (path / n, path / "checkpoints" / n) if c.is_file()]
        if not found:
            raise AudioError(f"{path}: no SadTalker Audio2Pose checkpoint found there (looked for "
                             f"{', '.join(AUDIO2POSE_FILES)}); download SadTalker's checkpoints or pass the file")
        path = found[0]
    if not path.is_file():
        raise AudioError(f"{path}: Audio2Pose checkpoint not found; check the path")
    what = str(path)
    raw = _read_sadtalker_checkpoint(path, "audio2pose", "SadTalker's auido2pose_00140-model.pth")
    sd = audio2pose_state_dict(raw, what)
    model = Audio2Pose(_pose_config_from_state(sd))
    try:
        load_state_dict_strict(model, sd, what)
    except ValueError as e:
        raise AudioError(str(e).replace("auido2exp_00300-model.pth", "auido2pose_00140-model.pth")) from None
    return model.to(device).eval()


def audio2pose_near(audio2exp_path: str | os.PathLike | None) -> Path | None:
    """The Audio2Pose checkpoint that goes with an Audio2Exp one: the same safetensors bundle, or
    ``auido2pose_00140-model.pth`` beside the ``.pth``."""
    if audio2exp_path is None:
        return None
    p = Path(audio2exp_path)
    if p.suffix == ".safetensors" and p.is_file():
        return p
    folder = p if p.is_dir() else p.parent
    for name in AUDIO2POSE_FILES:
        for cand in (folder / name, folder / "checkpoints" / name):
            if cand.is_file():
                return cand
    return None


def tiny_audio2pose(seed: int = 0, device: str = "cpu"):
    """The --tiny-random Audio2Pose: ``torch.manual_seed(seed)`` then ``Audio2Pose(Audio2PoseConfig.tiny())``
    with every tensor (BatchNorm statistics and the style biases included) drawn from N(0, 0.5^2)
    around its default, so the untrained network still moves the head."""
    import torch

    from models.audio2pose import Audio2Pose, Audio2PoseConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Audio2Pose(Audio2PoseConfig.tiny())
        with torch.no_grad():
            for name, t in model.state_dict().items():
                if t.is_floating_point():
                    if name.endswith("running_var"):
                        t.copy_(1.0 + 0.1 * torch.rand_like(t))
                    elif name.endswith("classbias"):
                        t.copy_(torch.randn_like(t))
    return model.to(device).eval()


def pose_25fps(model, wav16k: np.ndarray, ref_pose: np.ndarray, pose_style: int, seed: int, *,
               z=None, smooth: bool = True) -> np.ndarray:
    """SadTalker's head pose for the 25 fps frames 0..T-1 of a 16 kHz clip (T = int(len / 640)) -> (T, 6)
    float32: ``Audio2Pose.test`` with ``torch.manual_seed(seed)``'s draws (or the given ``z``), then
    ``generate``'s Savitzky-Golay filter when ``smooth``."""
    import torch

    from models.audio2pose import savgol_smooth

    n = sadtalker_num_frames(wav16k.shape[0])
    if n == 0:
        return np.zeros((0, 6), dtype=np.float32)
    windows = sadtalker_mel_windows(melspectrogram(sadtalker_crop(wav16k)), n)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.inference_mode():
        pose = model.predict(torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)),
                             torch.as_tensor(np.asarray(ref_pose, dtype=np.float32).reshape(6)), int(pose_style),
                             z=None if z is None else torch.as_tensor(np.asarray(z, dtype=np.float32)),
                             generator=gen).float().cpu().numpy()
    return (savgol_smooth(pose) if smooth else pose).astype(np.float32)


def audio_to_pose(samples: Any, sample_rate: float, fps: float, ref_pose: Any, *, model: Any, n_frames: int,
                  offset_frames: float = 0.0, pose_style: int = 0, pose_scale: float = 1.0,
                  seed: int = 0) -> np.ndarray:
    """Audio -> (n_frames, 6) head pose (angles 3, translation 3) float32 with SadTalker's Audio2Pose.

    The network runs on the 25 fps grid (frames 0..T-1 of the clip, smoothed as ``generate`` does);
    output frame i (audio time ``(i + offset_frames) / fps``) takes the linearly interpolated motion,
    held at the first / last grid value outside the audio. ``pose_scale`` multiplies the motion
    (pose - ref_pose): 0 keeps the reference pose, 1 is SadTalker's amplitude. At 25 fps, offset 0,
    n_frames = T and scale 1 this is exactly SadTalker's smoothed pose for ``seed`` and ``pose_style``.
    """
    ref = np.asarray(ref_pose, dtype=np.float32).reshape(-1)
    if ref.shape != (6,) or not np.all(np.isfinite(ref)):
        raise AudioError(f"ref_pose must be 6 finite numbers (angles 3, translation 3), got shape {ref.shape}")
    if not math.isfinite(float(pose_scale)) or pose_scale < 0:
        raise AudioError(f"pose_scale must be a finite number >= 0, got {pose_scale!r}")
    wav = to_mono_16k(samples, sample_rate)
    grid = pose_25fps(model, wav, ref, pose_style, seed)
    if grid.shape[0] == 0 or n_frames <= 0:
        return np.repeat(ref[None], max(n_frames, 0), axis=0)
    times = frame_times(fps, n_frames, 0.0, offset_frames=offset_frames)
    pos = np.clip(grid_position(times, TRAIN_FPS), 0.0, grid.shape[0] - 1.0)
    motion = grid - ref[None]
    out = np.stack([np.interp(pos, np.arange(grid.shape[0]), motion[:, k]) for k in range(6)], axis=1)
    return (ref[None] + float(pose_scale) * out).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Blinks as an additive expression offset
# --------------------------------------------------------------------------------------------

#: the blink profile of SadTalker's generate_blink_seq_randomly, by distance (25 fps frames) from the peak
BLINK_PROFILE = (1.0, 0.9, 0.5)


def blink_frames(n_frames: int, fps: float, rate_per_minute: float, seed: int) -> list[int]:
    """Peak frames of seeded blinks at ``rate_per_minute`` on average: the gaps between blinks are drawn
    uniformly in [0.5, 1.5] x the mean gap (``random.Random(seed)``); the first blink comes after one
    drawn gap; no blink closer than 3 frames (at 25 fps) to the clip's ends. Rate 0 -> none."""
    import random

    if not math.isfinite(float(rate_per_minute)) or rate_per_minute < 0:
        raise AudioError(f"blink_rate must be a finite number >= 0 (blinks per minute), got {rate_per_minute!r}")
    if rate_per_minute == 0 or n_frames <= 0:
        return []
    rng = random.Random(int(seed))
    mean_gap = 60.0 * float(fps) / float(rate_per_minute)
    margin = max(1, math.ceil(len(BLINK_PROFILE) * float(fps) / TRAIN_FPS))
    peaks, t = [], 0.0
    while True:
        t += mean_gap * rng.uniform(0.5, 1.5)
        f = int(round(t))
        if f > n_frames - 1 - margin:
            return peaks
        if f >= margin and (not peaks or f > peaks[-1]):
            peaks.append(f)


def blink_weights(n_frames: int, fps: float, peaks: list[int]) -> np.ndarray:
    """(n_frames,) eye-closing weight: 1 exactly at the peak frames, SadTalker's 0.9 / 0.5 ramp one and
    two 25 fps frames away (linearly interpolated at other frame rates), 0 from three frames away."""
    w = np.zeros(max(n_frames, 0), dtype=np.float64)
    if not peaks:
        return w.astype(np.float32)
    idx = np.arange(n_frames, dtype=np.float64)
    prof_x = np.arange(len(BLINK_PROFILE) + 1, dtype=np.float64)
    prof_y = np.array(BLINK_PROFILE + (0.0,))
    for p in peaks:
        d = np.abs(idx - p) * TRAIN_FPS / float(fps)
        w = np.maximum(w, np.interp(d, prof_x, prof_y, right=0.0))
    w[np.asarray(peaks, dtype=np.int64)] = 1.0
    return w.astype(np.float32)


def blink_offset(weights: np.ndarray, eyes_closed: np.ndarray, neutral: np.ndarray) -> np.ndarray:
    """(n, 64) additive expression offset: ``weight * (eyes_closed - neutral)`` (the preset's eye closing)."""
    delta = np.asarray(eyes_closed, dtype=np.float32).reshape(-1) - np.asarray(neutral, dtype=np.float32).reshape(-1)
    return np.asarray(weights, dtype=np.float32)[:, None] * delta[None, :]
