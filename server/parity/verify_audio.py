"""Check the audio stages against the official SadTalker / StyleHEAT reference vectors.

``verify_audio_vectors(npz_path, layout_dir)`` recomputes every audio array of a
``vectors_audio_seed{N}.npz`` file (reference README_audio_3dmm.md) with this project's code on
the seeded weights rebuilt from ``sadtalker_checkpoints.json`` and returns one
:class:`server.parity.reference.Comparison` per array, with the tolerances that README suggests:
mel atol 1e-9, ``indiv_mels`` atol 1e-6, network outputs atol 1e-5 + rtol 1e-5, integer
arrays (frame counts, window starts/lengths, 3DMM window rows, blink ratios) exact. The AudioWarper
window spots are float64 in the file and float32 from the official-parity path
(:func:`models.windows.audio_windows_for_frames` with ``official=True``), hence atol 1e-6; the steps
the official window lacks (NaN in the file) must be exactly those our cut of our mel lacks.
Every array is recomputed from the file's own waveform, seed and spot frames (any length, any seed:
the reference rule, not the seed-0 example). Audio2Pose (head pose): :func:`verify_pose_vectors`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from models.windows import window_indices
from server.parity.reference import Comparison, load_layout, max_abs_error, seeded_part
from server.preprocessing import audio

LAYOUT_FILE = "sadtalker_checkpoints.json"
PTH_FILE = "checkpoints/auido2exp_00300-model.pth"
BUNDLE_FILE = "checkpoints/SadTalker_V0.0.2_256.safetensors"


def _abs(name: str, got, ref, tol: float) -> Comparison:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return Comparison(f"{name} (shape {got.shape} != {ref.shape})", float("inf"), tol)
    return Comparison(name, max_abs_error(got, ref), tol)


def _net(name: str, got, ref) -> Comparison:
    ref = np.asarray(ref)
    return _abs(name, got, ref, 1e-5 + 1e-5 * float(np.max(np.abs(ref))))


def verify_audio_vectors(npz_path: str | Path, layout_dir: str | Path) -> list[Comparison]:
    """Recompute the audio reference arrays; one Comparison per array (``.ok`` tells pass/fail)."""
    import torch

    from models.audio2exp import Audio2Exp, load_state_dict_strict

    npz_path, layout_dir = Path(npz_path), Path(layout_dir)
    if not npz_path.is_file():
        raise FileNotFoundError(f"{npz_path}: reference vector file not found")
    layout_path = layout_dir / LAYOUT_FILE if layout_dir.is_dir() else layout_dir
    if not layout_path.is_file():
        raise FileNotFoundError(f"{layout_path}: {LAYOUT_FILE} not found (pass the reference folder)")
    with np.load(npz_path) as z:  # closed again (an NpzFile keeps the file open)
        v = dict(z)
    seed = int(json.loads(str(v["meta_json"]))["seed"])
    layout = load_layout(layout_path)
    out: list[Comparison] = []

    # loading: the file holds 16 kHz PCM, load_wav returns pcm / 32768 as float32
    wav = audio.to_mono_16k(v["waveform_pcm16"], audio.SAMPLE_RATE)
    out.append(_abs("audio.waveform", wav, v["waveform"], 0.0))
    n = audio.sadtalker_num_frames(wav.shape[0])
    out.append(_abs("audio.num_frames", n, v["num_frames"], 0.0))
    used = audio.sadtalker_crop(wav)
    out.append(_abs("audio.waveform_used", used, v["waveform_used"], 0.0))

    # mel and SadTalker windows
    mel = audio.melspectrogram(used)
    out.append(_abs("audio.mel_basis", audio.mel_basis(), v["mel_basis"], 1e-7))
    out.append(_abs("audio.mel", mel, v["mel"], 1e-9))
    out.append(_abs("audio.indiv_mel_start", audio.sadtalker_window_starts(np.arange(n)), v["indiv_mel_start"], 0.0))
    windows = audio.sadtalker_mel_windows(mel, n)
    out.append(_abs("audio.indiv_mels", windows, v["indiv_mels"], 1e-6))
    rng_seed = int(v["python_random_seed"])
    out.append(_abs("audio.ratio_gt", audio.blink_sequence(n, rng_seed)[:, None], v["ratio_gt"], 0.0))

    # Audio2Exp on seeded weights: the old .pth layout and the safetensors bundle layout
    pth = {"model": seeded_part(layout, PTH_FILE, "model", seed), "epoch": 300}
    net = Audio2Exp()
    load_state_dict_strict(net, audio.audio2exp_state_dict(pth, PTH_FILE), PTH_FILE)
    ref_exp = np.asarray(v["first_coeff"], dtype=np.float32)[0, :64]
    with torch.inference_mode():
        emb = net.encode(torch.from_numpy(windows)).numpy()
        zero = net(torch.zeros_like(torch.from_numpy(windows)), torch.from_numpy(np.tile(ref_exp, (n, 1))),
                   torch.from_numpy(np.asarray(v["ratio_gt"], dtype=np.float32))).numpy()
    out.append(_net("audio.audio_emb", emb, v["audio_emb"]))
    exp = audio.audio_to_expression(wav, audio.SAMPLE_RATE, 25, ref_exp, model=net, blink="random", seed=rng_seed)
    out.append(_net("audio.exp_coeff_pred", exp, v["exp_coeff_pred"]))
    out.append(_net("audio.exp_coeff_pred_mel_zero", zero, v["exp_coeff_pred_mel_zero"]))
    bundle = seeded_part(layout, BUNDLE_FILE, "", seed)
    net_b = Audio2Exp()
    load_state_dict_strict(net_b, audio.audio2exp_state_dict(bundle, BUNDLE_FILE), BUNDLE_FILE)
    exp_b = audio.audio_to_expression(wav, audio.SAMPLE_RATE, 25, ref_exp, model=net_b, blink="random", seed=rng_seed)
    out.append(_net("audio.exp_coeff_pred[safetensors]", exp_b, v["exp_coeff_pred"]))
    if "coeff_3dmm_70" in v:
        out.append(_net("audio.coeff_3dmm_70[:, :64]", exp, v["coeff_3dmm_70"][:, :64]))
    out.extend(verify_pose_vectors(v, layout, seed))

    # StyleHEAT: the 27-row 3DMM windows and the AudioDataset cut (paper path), on OUR mel
    if "styleheat_window_index" in v:
        rows = np.stack([window_indices(i, n, 27) for i in range(n)]) if n else np.zeros((0, 27), np.int64)
        out.append(_abs("audio.styleheat_window_index", rows, v["styleheat_window_index"], 0.0))
    for step in (16, 32, 48, 80):
        if f"styleheat_audio_start{step}" not in v:
            continue
        starts = [audio.styleheat_window_start(i, step) for i in range(n)]
        lengths = [audio.styleheat_cut(mel, i, step).shape[1] for i in range(n)]
        out.append(_abs(f"audio.styleheat_audio_start{step}", starts, v[f"styleheat_audio_start{step}"], 0.0))
        out.append(_abs(f"audio.styleheat_audio_len{step}", lengths, v[f"styleheat_audio_len{step}"], 0.0))
    spots = np.asarray(v["styleheat_audio_spot_frames"], dtype=np.int64).reshape(-1)
    ref_spot = np.asarray(v["styleheat_audio_window32_spot"])
    aw = np.concatenate([audio.audio_windows_for_frames(wav, audio.SAMPLE_RATE, audio.TRAIN_FPS, 1,
                                                        offset_frames=int(f), official=True) for f in spots])
    official_len = np.array([audio.styleheat_cut(mel, int(f), 32).shape[1] for f in spots], dtype=np.int64)
    missing = np.arange(32)[None, None, :] >= official_len[:, None, None]
    missing = np.broadcast_to(missing, aw.shape)
    known = ~np.isnan(ref_spot)
    if known.shape != aw.shape:
        out.append(_abs("audio.styleheat_audio_window32_spot", aw, ref_spot, 1e-6))
        return out
    out.append(_abs("audio.styleheat_audio_window32_spot[missing steps]", np.count_nonzero(missing == known), 0, 0.0))
    out.append(_abs("audio.styleheat_audio_window32_spot", aw[known & ~missing], ref_spot[known & ~missing], 1e-6))
    return out


POSE_PTH_FILE = "checkpoints/auido2pose_00140-model.pth"


def verify_pose_vectors(v: dict, layout, seed: int) -> list[Comparison]:
    """Audio2Pose on the seeded weights (old ``.pth`` layout and the safetensors bundle): ``cvae_z``
    (``torch.manual_seed(seed)``'s draws), ``pose_pred_raw`` (fed the file's ``cvae_z``, ``first_coeff``,
    ``pose_style`` and ``indiv_mels``) and the pose part of ``coeff_3dmm_70`` (after the Savitzky-Golay
    filter), the last also end to end from the waveform. Files without these keys give no comparison."""
    if "pose_pred_raw" not in v or "cvae_z" not in v:
        return []
    import torch

    from models.audio2exp import load_state_dict_strict
    from models.audio2pose import Audio2Pose, savgol_smooth

    out: list[Comparison] = []
    style = int(v["pose_style"])
    ref_pose = np.asarray(v["first_coeff"], dtype=np.float32)[0, 64:70]
    mels = torch.from_numpy(np.asarray(v["indiv_mels"], dtype=np.float32))
    for file, raw in ((POSE_PTH_FILE, {"model": seeded_part(layout, POSE_PTH_FILE, "model", seed), "epoch": 140}),
                      (BUNDLE_FILE, seeded_part(layout, BUNDLE_FILE, "", seed))):
        net = Audio2Pose()
        load_state_dict_strict(net, audio.audio2pose_state_dict(raw, file), file)
        tag = "" if file == POSE_PTH_FILE else "[safetensors]"
        with torch.inference_mode():
            z = net.draw_z(mels.shape[0], torch.Generator().manual_seed(seed)).numpy()
            pose = net.predict(mels, torch.from_numpy(ref_pose), style,
                               z=torch.from_numpy(np.asarray(v["cvae_z"], dtype=np.float32))).numpy()
        if not tag:
            out.append(_abs("audio.cvae_z", z, v["cvae_z"], 0.0))
        out.append(_net(f"audio.pose_pred_raw{tag}", pose, v["pose_pred_raw"]))
        if "coeff_3dmm_70" in v:
            out.append(_net(f"audio.coeff_3dmm_70[:, 64:]{tag}", savgol_smooth(pose).astype(np.float32),
                            v["coeff_3dmm_70"][:, 64:]))
            if not tag:
                wav = audio.to_mono_16k(v["waveform_pcm16"], audio.SAMPLE_RATE)
                n = audio.sadtalker_num_frames(wav.shape[0])
                full = audio.audio_to_pose(wav, audio.SAMPLE_RATE, 25, ref_pose, model=net, n_frames=n,
                                           pose_style=style, seed=seed)
                out.append(_net("audio.coeff_3dmm_70[:, 64:][from the waveform]", full, v["coeff_3dmm_70"][:, 64:]))
    return out
