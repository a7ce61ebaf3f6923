"""Check the audio stages against the official SadTalker / StyleHEAT reference vectors.

``verify_audio_vectors(npz_path, layout_dir)`` recomputes every audio array of a
``vectors_audio_seed{N}.npz`` file (reference README_audio_3dmm.md) with this project's code on
the seeded weights rebuilt from ``sadtalker_checkpoints.json`` and returns one
:class:`server.reference.Comparison` per array, with the tolerances that README suggests:
mel atol 1e-9, ``indiv_mels`` atol 1e-6, network outputs atol 1e-5 + rtol 1e-5, integer
arrays (frame counts, window starts/lengths, blink ratios) exact. The AudioWarper window spots are
float64 in the file and float32 from :func:`server.audio.audio_windows_for_frames`, hence atol 1e-6.
Audio2Pose (head pose) is not implemented here and not compared.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from server import audio
from server.reference import Comparison, load_layout, max_abs_error, seeded_part

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
    used = wav[:n * (audio.SAMPLE_RATE // audio.TRAIN_FPS)]
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

    # StyleHEAT AudioDataset cut (paper path)
    ref_mel = np.asarray(v["mel"])
    for step in (16, 32, 48, 80):
        if f"styleheat_audio_start{step}" not in v:
            continue
        starts = [audio.styleheat_window_start(i, step) for i in range(n)]
        lengths = [audio.styleheat_cut(ref_mel, i, step).shape[1] for i in range(n)]
        out.append(_abs(f"audio.styleheat_audio_start{step}", starts, v[f"styleheat_audio_start{step}"], 0.0))
        out.append(_abs(f"audio.styleheat_audio_len{step}", lengths, v[f"styleheat_audio_len{step}"], 0.0))
    spots = np.asarray(v["styleheat_audio_spot_frames"], dtype=np.int64)
    ref_spot = np.asarray(v["styleheat_audio_window32_spot"])
    aw = audio.audio_windows_for_frames(wav, audio.SAMPLE_RATE, 25, n, official_start_clamp=True)[spots]
    known = ~np.isnan(ref_spot)
    out.append(_abs("audio.styleheat_audio_window32_spot", aw[known], ref_spot[known], 1e-6))
    return out
