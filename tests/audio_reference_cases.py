"""Make new audio reference vector files (``vectors_audio_seed{N}.npz``-like) by the reference rule.

The shared reference set holds one audio vector file (seed 0, exactly 80 * 640 samples). The held-out
file of the same rule has another seed, another waveform length and other spot frames. This module
builds such files from our own inputs (any seed, any length, any spot frames), with the expected
"official" arrays computed by a re-implementation of the official code written here from the
official sources, NOT by calling this project's audio functions:

* waveform and first-frame coefficients: reference README_audio_3dmm.md section 2 (recipes);
* ``parse_audio_length`` / ``crop_pad_audio`` / ``melspectrogram`` / the ``indiv_mels`` loop /
  ``generate_blink_seq_randomly``: SadTalker ``src/generate_batch.py`` and ``src/utils/audio.py``
  (the mel goes through ``librosa.stft`` with ``center=True`` as the official code calls it; the
  project computes it differently, frame range by frame range);
* ``transform_audio`` and ``obtain_seq_index``: StyleHEAT ``data/audio_dataset.py``;
* the seeded weights: the shared ``seeded_weights.py`` helper (read in place).

Audio2Pose (``pose_style``, ``cvae_z``, ``pose_pred_raw``, ``coeff_3dmm_70``): the Python-random draw of
``pose_style`` after the blinks (StyleHEAT's ``audio_reenactment``), the ``torch.manual_seed`` z draws, the
chunk loop of ``Audio2Pose.test`` and ``generate``'s ``savgol_filter`` (scipy itself) are written out here;
only the network pieces (audio encoder, CVAE decoder) come from :mod:`models.audio2pose`. For
``1 < T < 33`` the official loop fails (its one chunk is shorter than 32 frames); the file then holds
the project's documented extension (the chunk padded at its start with frame 1's window), flagged
``pose_official_fails``.

The network outputs (``audio_emb``, ``exp_coeff_pred``) run :class:`models.audio2exp.Audio2Exp`
(the network, checked separately against the official outputs of seed 0) on the windows cut here,
in the official chunks of 10 frames, so they test the project's windows end to end.
"""
from __future__ import annotations

import importlib.util
import json
import random
import warnings
import zlib
from pathlib import Path

import numpy as np

SR = 16000
FPS = 25
SAMPLES_PER_FRAME = SR // FPS          # 640
PTH_FILE = "checkpoints/auido2exp_00300-model.pth"
STYLEHEAT_LAGS = {16: 2, 32: 4, 48: 7, 80: 12}   # transform_audio: step -> frames subtracted before max(0, .)


# ----------------------------------------------------------------------------- inputs (README section 2)
def recipe_waveform(seed: int, n_samples: int, *, f0=(110.0, 220.0), am_rate=4.0, noise_std=0.01,
                    silence: tuple[float, float] | None = None) -> np.ndarray:
    """The waveform recipe for ``n_samples`` samples; ``silence`` (s0, s1) in seconds, by default at
    the same fractions of the duration as seed 0's 2.5 .. 2.75 s of 3.2 s. Returns the int16 PCM the
    WAV file would hold."""
    n = np.arange(n_samples, dtype=np.float64)
    t = n / SR
    dur = n_samples / SR
    phi = 2 * np.pi * (f0[0] * t + (f0[1] - f0[0]) * t ** 2 / (2 * dur))
    voiced = sum(np.sin(k * phi) / k for k in range(1, 7))
    env = np.sin(np.pi * am_rate * t) ** 2
    sweep = np.sin(2 * np.pi * (3000 * t - 2500 * t ** 2 / (2 * dur)))
    rng = np.random.default_rng([seed, zlib.crc32(b"a3p-waveform")])
    x = 0.3 * env * voiced + 0.06 * sweep + noise_std * rng.standard_normal(n_samples)
    s0, s1 = silence if silence is not None else (dur * 2.5 / 3.2, dur * 2.75 / 3.2)
    x[round(s0 * SR):round(s1 * SR)] = 0
    return np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)


def recipe_first_coeff(seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(b"a3p-first-coeff")])
    exp = 0.4 * rng.standard_normal(64)
    angles = 0.1 * rng.standard_normal(3)
    trans = 0.1 * rng.standard_normal(3)
    return np.concatenate([exp, angles, trans]).astype(np.float32)[None]


# ----------------------------------------------------------------------------- official code, written out
def official_length(n_samples: int) -> tuple[int, int]:
    """parse_audio_length(len, 16000, 25) -> (audio_length, num_frames)."""
    bit_per_frames = SR / FPS
    num_frames = int(n_samples / bit_per_frames)
    return int(num_frames * bit_per_frames), num_frames


def official_crop_pad(wav: np.ndarray, length: int) -> np.ndarray:
    if len(wav) > length:
        return wav[:length]
    if len(wav) < length:
        return np.pad(wav, [0, length - len(wav)], mode="constant", constant_values=0)
    return wav


def official_melspectrogram(wav: np.ndarray) -> np.ndarray:
    """audio.melspectrogram(wav).T with SadTalker's hparams -> (n_mel, 80) float64."""
    import librosa
    from scipy import signal

    pre = signal.lfilter([1, -0.97], [1], wav)
    with warnings.catch_warnings():       # librosa warns about clips shorter than n_fft (1-frame clips)
        warnings.simplefilter("ignore", UserWarning)
        stft = librosa.stft(y=pre, n_fft=800, hop_length=200, win_length=800)  # center=True, zero pad
    basis = librosa.filters.mel(sr=SR, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    mel = np.dot(basis, np.abs(stft))
    min_level = np.exp(-100 / 20 * np.log(10))
    s = 20 * np.log10(np.maximum(min_level, mel)) - 20
    return np.clip((2 * 4) * ((s - -100) / (--100)) - 4, -4, 4).T


def official_indiv_mels(orig_mel: np.ndarray, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """get_data's loop -> (indiv_mels (T, 80, 16) float32, first index of each window)."""
    mels, starts = [], []
    for i in range(num_frames):
        start_idx = int(80. * ((i - 2) / float(FPS)))
        seq = [min(max(item, 0), orig_mel.shape[0] - 1) for item in range(start_idx, start_idx + 16)]
        mels.append(orig_mel[seq, :].T)
        starts.append(start_idx)
    return np.asarray(mels).astype(np.float32), np.asarray(starts, dtype=np.int64)


def official_blinks(num_frames: int, seed: int) -> np.ndarray:
    """random.seed(seed) then generate_blink_seq_randomly(T) -> (T, 1); the global state is restored."""
    state = random.getstate()
    try:
        random.seed(seed)
        ratio = np.zeros((num_frames, 1))
        if num_frames <= 20:
            return ratio.astype(np.float32)
        frame_id = 0
        while frame_id in range(num_frames):
            start = random.choice(range(min(10, num_frames), min(int(num_frames / 2), 70)))
            if frame_id + start + 5 <= num_frames - 1:
                ratio[frame_id + start:frame_id + start + 5, 0] = [0.5, 0.9, 1.0, 0.9, 0.5]
                frame_id = frame_id + start + 5
            else:
                break
        return ratio.astype(np.float32)
    finally:
        random.setstate(state)


def official_transform_audio(mel: np.ndarray, frame_index: int, step: int) -> np.ndarray:
    """AudioDataset.transform_audio (fps 25.) -> (80, <= step) float64."""
    frame_index = max(0, frame_index - STYLEHEAT_LAGS[step])
    start_idx = int(80. * frame_index / 25.)
    return mel[start_idx:start_idx + step, :].transpose(1, 0)


def official_seq_index(index: int, num_frames: int, radius: int = 13) -> list[int]:
    return [min(max(item, 0), num_frames - 1) for item in range(index - radius, index + radius + 1)]


def official_spot_frames(num_frames: int) -> list[int]:
    return [0, 1, 4, 5, int(num_frames / 2), num_frames - 1]


# ----------------------------------------------------------------------------- the vector file
def _seeded_weights(reference_dir: Path):
    spec = importlib.util.spec_from_file_location("seeded_weights_shared", reference_dir / "seeded_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_audio_vectors(reference_dir: Path, seed: int, n_samples: int, spots: list[int] | None = None,
                       silence: tuple[float, float] | None = None) -> dict:
    """Arrays of a vector file for ``seed`` and a waveform of ``n_samples`` samples (T >= 1)."""
    import torch

    from models.audio2exp import Audio2Exp

    pcm = recipe_waveform(seed, n_samples, silence=silence)
    wav = pcm.astype(np.float32) / 32768                    # load_wav of the 16 kHz PCM file
    length, t = official_length(len(wav))
    if t < 1:
        raise ValueError(f"{n_samples} samples give no 25 fps frame; the official get_data cannot run")
    if 21 <= t and len(range(min(10, t), min(int(t / 2), 70))) == 0:
        raise ValueError(f"T = {t}: the official generate_blink_seq_randomly crashes (empty range)")
    used = official_crop_pad(wav, length)
    mel = official_melspectrogram(used)
    indiv, starts = official_indiv_mels(mel, t)
    ratio = official_blinks(t, seed)
    first = recipe_first_coeff(seed)
    spots = official_spot_frames(t) if spots is None else list(spots)

    v: dict = {
        "wave_recipe_json": json.dumps({"samples": n_samples, "seed": seed, "sr": SR}),
        "waveform_pcm16": pcm, "waveform": wav, "waveform_used": used.astype(np.float32),
        "num_frames": np.int64(t), "mel": mel,
        "mel_basis": _mel_basis(), "indiv_mels": indiv, "indiv_mel_start": starts, "ratio_gt": ratio,
        "first_coeff": first, "ref": np.repeat(first, t, axis=0), "python_random_seed": np.int64(seed),
        "styleheat_window_index": np.array([official_seq_index(i, t) for i in range(t)], dtype=np.int64),
        "styleheat_audio_spot_frames": np.asarray(spots, dtype=np.int64),
    }
    for step in STYLEHEAT_LAGS:
        v[f"styleheat_audio_start{step}"] = np.array([int(80. * max(0, i - STYLEHEAT_LAGS[step]) / 25.)
                                                      for i in range(t)], dtype=np.int64)
        v[f"styleheat_audio_len{step}"] = np.array([official_transform_audio(mel, i, step).shape[1]
                                                    for i in range(t)], dtype=np.int64)
    spot = np.full((len(spots), 80, 32), np.nan)
    for k, f in enumerate(spots):
        w = official_transform_audio(mel, f, 32)
        spot[k, :, :w.shape[1]] = w
    v["styleheat_audio_window32_spot"] = spot

    # the network on the windows cut above (Audio2Exp.test: 10 frames per call)
    sw = _seeded_weights(reference_dir)
    layout = json.loads((reference_dir / "sadtalker_checkpoints.json").read_text())
    net = Audio2Exp()
    net.load_state_dict(sw.build_file(layout, PTH_FILE, seed)["model"], strict=True)
    net.eval()
    mels = torch.from_numpy(indiv)
    ref = torch.from_numpy(np.repeat(first[:, :64], t, axis=0))
    rat = torch.from_numpy(ratio)
    emb, exp, zero = [], [], []
    with torch.inference_mode():
        for s in range(0, t, 10):
            e = slice(s, s + 10)
            emb.append(net.encode(mels[e]).numpy())
            exp.append(net(mels[e], ref[e], rat[e]).numpy())
            zero.append(net(torch.zeros_like(mels[e]), ref[e], rat[e]).numpy())
    v["audio_emb"] = np.concatenate(emb)
    v["exp_coeff_pred"] = np.concatenate(exp)
    v["exp_coeff_pred_mel_zero"] = np.concatenate(zero)
    v.update(official_pose_arrays(reference_dir, seed, indiv, first, v["exp_coeff_pred"]))
    v["meta_json"] = json.dumps({"seed": seed, "generator": "tests/audio_reference_cases.py",
                                 "samples": n_samples, "num_frames": t})
    return v


def _mel_basis() -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=SR, n_fft=800, n_mels=80, fmin=55, fmax=7600)


def write_audio_vectors(path: Path, reference_dir: Path, seed: int, n_samples: int, spots=None) -> Path:
    np.savez(path, **make_audio_vectors(reference_dir, seed, n_samples, spots))
    return path


# ----------------------------------------------------------------------------- Audio2Pose (official test + generate)
POSE_PTH_FILE = "checkpoints/auido2pose_00140-model.pth"


def official_pose_style(num_frames: int, seed: int) -> int:
    """random.seed(seed); get_data's blink draws; then random.randint(0, 45) (audio_reenactment)."""
    state = random.getstate()
    try:
        random.seed(seed)
        if num_frames > 20:
            frame_id = 0
            while frame_id in range(num_frames):
                start = random.choice(range(min(10, num_frames), min(int(num_frames / 2), 70)))
                if frame_id + start + 5 <= num_frames - 1:
                    frame_id = frame_id + start + 5
                else:
                    break
        return random.randint(0, 45)
    finally:
        random.setstate(state)


def official_pose_pred(net, indiv: np.ndarray, first: np.ndarray, pose_style: int, seed: int):
    """torch.manual_seed(seed) then Audio2Pose.test -> (cvae_z (k, 64), pose_pred (T, 6), official_fails)."""
    import torch

    gen = torch.Generator().manual_seed(seed)          # same stream as torch.manual_seed(seed)'s default generator
    mels = torch.from_numpy(indiv)[None, :, None]        # (1, T, 1, 80, 16)
    ref = torch.from_numpy(first)[:, None, :]             # (1, 1, 70)
    ref6 = ref[:, 0, -6:]
    cls = torch.LongTensor([pose_style])
    use = mels[:, 1:]
    n = indiv.shape[0] - 1
    div, re = n // 32, n % 32
    preds = [torch.zeros(1, 1, 6)]
    zs = []
    fails = 0 < n < 32

    def decode(chunk):
        z = torch.randn(1, 64, generator=gen)
        zs.append(z)
        emb = net.audio_encoder(chunk[:, :, 0])           # (1, 32, 512)
        return net.netG.decoder(z, cls, ref6, emb)        # (1, 32, 6)

    with torch.inference_mode():
        for i in range(div):
            preds.append(decode(use[:, i * 32:(i + 1) * 32]))
        if re:
            chunk = use[:, -32:]
            if chunk.shape[1] < 32:                       # official: fails; project: pad with frame 1's window
                chunk = torch.cat([chunk[:, :1].repeat(1, 32 - chunk.shape[1], 1, 1, 1), chunk], dim=1)
            preds.append(decode(chunk)[:, -re:])
        pose = ref[:, :1, -6:] + torch.cat(preds, dim=1)  # (1, T, 6)
    z = torch.cat(zs).numpy() if zs else np.zeros((0, 64), np.float32)
    return z, pose[0].numpy(), fails


def official_savgol(pose: np.ndarray) -> np.ndarray:
    """generate's filter on (T, 6) (axis 1 of the (1, T, 6) batch); T < 3 has no valid window (kept)."""
    from scipy.signal import savgol_filter

    t = pose.shape[0]
    w = 13 if t >= 13 else int((t - 1) / 2) * 2 + 1
    if w <= 2:
        return pose.copy()
    return savgol_filter(pose[None], w, 2, axis=1)[0].astype(np.float32)


def official_pose_arrays(reference_dir: Path, seed: int, indiv: np.ndarray, first: np.ndarray,
                         exp: np.ndarray) -> dict:
    from models.audio2pose import Audio2Pose

    sw = _seeded_weights(reference_dir)
    layout = json.loads((reference_dir / "sadtalker_checkpoints.json").read_text())
    net = Audio2Pose()
    net.load_state_dict(sw.build_file(layout, POSE_PTH_FILE, seed)["model"], strict=True)
    net.eval()
    t = indiv.shape[0]
    style = official_pose_style(t, seed)
    z, raw, fails = official_pose_pred(net, indiv, first, style, seed)
    return {"pose_style": np.int64(style), "cvae_z": z.astype(np.float32), "pose_pred_raw": raw.astype(np.float32),
            "coeff_3dmm_70": np.concatenate([exp, official_savgol(raw)], axis=1).astype(np.float32),
            "pose_official_fails": np.bool_(fails)}
