"""Audio2Pose (models/audio2pose.py), its loader and audio_to_pose (server/preprocessing/audio.py), blinks, and the
head-motion / blink options of the ``audio2exp`` request against a real server on 127.0.0.1."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from scipy.signal import savgol_filter

import audio_reference_cases as arc
from models.audio2pose import Audio2Pose, num_chunks, savgol_smooth, savgol_window
from server.preprocessing import audio
from server import protocol as P
from server.parity.reference import load_layout, seeded_part
from server.parity.verify_audio import POSE_PTH_FILE, verify_audio_vectors
from server_helpers import Client, ctx, serve_tiny  # noqa: F401  (ctx is a fixture)

POSE_KEYS = ("audio.cvae_z", "audio.pose_pred_raw", "audio.coeff_3dmm_70[:, 64:]")


@pytest.fixture(scope="module")
def vec0(reference_dir):
    with np.load(reference_dir / "vectors_audio_seed0.npz") as z:
        return dict(z)


@pytest.fixture(scope="module")
def pose_net(reference_dir):
    layout = load_layout(reference_dir / "sadtalker_checkpoints.json")
    net = Audio2Pose()
    net.load_state_dict(seeded_part(layout, POSE_PTH_FILE, "model", 0), strict=True)
    return net.eval()


def test_pose_parity_on_the_shared_vectors(vec0, pose_net):
    t = int(vec0["num_frames"])
    z = pose_net.draw_z(t, torch.Generator().manual_seed(0))
    assert np.array_equal(z.numpy(), vec0["cvae_z"])                    # torch.manual_seed(0)'s draws
    with torch.inference_mode():
        raw = pose_net.predict(torch.from_numpy(vec0["indiv_mels"]), torch.from_numpy(vec0["first_coeff"][0, 64:]),
                               int(vec0["pose_style"]), z=torch.from_numpy(vec0["cvae_z"])).numpy()
    ref = vec0["pose_pred_raw"]
    assert np.max(np.abs(raw - ref)) <= 1e-5 + 1e-5 * np.max(np.abs(ref))
    assert np.array_equal(raw[0], vec0["first_coeff"][0, 64:])          # frame 0: motion 0
    smooth = savgol_smooth(raw)
    assert np.max(np.abs(smooth - vec0["coeff_3dmm_70"][:, 64:])) <= 1e-5
    # a different z or style moves the pose: the comparison above can fail
    with torch.inference_mode():
        other = pose_net.predict(torch.from_numpy(vec0["indiv_mels"]), torch.from_numpy(vec0["first_coeff"][0, 64:]),
                                 (int(vec0["pose_style"]) + 1) % 46, z=torch.from_numpy(vec0["cvae_z"])).numpy()
    assert np.max(np.abs(other - ref)) > 1e-3


def test_audio_to_pose_end_to_end_is_sadtalkers(vec0, pose_net):
    wav = audio.to_mono_16k(vec0["waveform_pcm16"], 16000)
    t = int(vec0["num_frames"])
    pose = audio.audio_to_pose(wav, 16000, 25, vec0["first_coeff"][0, 64:], model=pose_net, n_frames=t,
                               pose_style=int(vec0["pose_style"]), seed=0)
    assert np.max(np.abs(pose - vec0["coeff_3dmm_70"][:, 64:])) <= 1e-5
    still = audio.audio_to_pose(wav, 16000, 25, vec0["first_coeff"][0, 64:], model=pose_net, n_frames=t,
                                pose_style=int(vec0["pose_style"]), seed=0, pose_scale=0.0)
    assert np.array_equal(still, np.repeat(vec0["first_coeff"][:, 64:], t, axis=0))
    double = audio.audio_to_pose(wav, 16000, 25, vec0["first_coeff"][0, 64:], model=pose_net, n_frames=t,
                                 pose_style=int(vec0["pose_style"]), seed=0, pose_scale=2.0)
    ref6 = vec0["first_coeff"][0, 64:]
    assert np.allclose(double - ref6, 2 * (pose - ref6), atol=1e-6)


@pytest.mark.parametrize("seed,n_samples", [
    (1, 640 * 45 + 300),   # one full chunk + a 12-frame remainder (reuses the last 32 frames)
    (4, 640 * 20 + 99),    # T = 20 < 33: shorter than one chunk (the official loop fails there)
    (7, 640 * 33),         # T = 33: exactly one chunk, no remainder
    (9, 640 * 2),          # T = 2: one moving frame, smoothing impossible (kept raw)
])
def test_pose_parity_on_generated_cases(tmp_path, reference_dir, seed, n_samples):
    path = tmp_path / f"vectors_audio_seed{seed}.npz"
    v = arc.make_audio_vectors(reference_dir, seed, n_samples)
    t = int(v["num_frames"])
    assert v["cvae_z"].shape == (num_chunks(t), 64)
    assert bool(v["pose_official_fails"]) == (1 < t < 33)
    np.savez(path, **v)
    got = {c.name: c for c in verify_audio_vectors(path, reference_dir)}
    for key in POSE_KEYS:
        assert key in got and got[key].ok, (key, got.get(key))
    assert all(c.ok for c in got.values()), [c for c in got.values() if not c.ok]


def test_savgol_matches_scipy_and_the_official_window_rule():
    for t in (3, 4, 7, 12, 13, 14, 100):
        x = np.random.default_rng(t).standard_normal((t, 6))
        w = savgol_window(t)
        assert w == (13 if t >= 13 else int((t - 1) / 2) * 2 + 1)
        assert np.max(np.abs(savgol_smooth(x) - savgol_filter(x, w, 2, axis=0))) < 1e-12
    one = np.ones((2, 6))
    assert np.array_equal(savgol_smooth(one), one)


def test_loader_reads_pth_and_bundle_and_names_the_file(tmp_path, reference_dir, pose_net):
    from safetensors.torch import save_file

    layout = load_layout(reference_dir / "sadtalker_checkpoints.json")
    pth = tmp_path / "auido2pose_00140-model.pth"
    torch.save({"model": seeded_part(layout, POSE_PTH_FILE, "model", 0), "epoch": 140}, pth)
    net = audio.load_audio2pose(pth)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), pose_net.state_dict().values()))
    bundle = tmp_path / "SadTalker_V0.0.2_256.safetensors"
    sd = {k: v for k, v in seeded_part(layout, "checkpoints/SadTalker_V0.0.2_256.safetensors", "", 0).items()
          if k.startswith("audio2pose.")}
    save_file(sd, str(bundle))
    net_b = audio.load_audio2pose(tmp_path)             # the directory: the bundle is found first
    assert torch.equal(net_b.netG.decoder.classbias, pose_net.netG.decoder.classbias)
    broken = dict(seeded_part(layout, POSE_PTH_FILE, "model", 0))
    broken.pop("netD_motion.seq.3.bias")
    bad = tmp_path / "bad" / "auido2pose_00140-model.pth"
    bad.parent.mkdir()
    torch.save({"model": broken, "epoch": 1}, bad)
    with pytest.raises(audio.AudioError, match="netD_motion.seq.3.bias") as e:
        audio.load_audio2pose(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(audio.AudioError, match="not found"):
        audio.load_audio2pose(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------- blinks
def test_blinks_reach_the_preset_exactly_at_the_reported_frames(fixtures_dir):
    presets = json.loads((fixtures_dir / "expression_presets.json").read_text())["presets"]
    eyes, center = np.float32(presets["eyes"]), np.float32(presets["center"])
    for fps, n, rate, seed in ((25, 750, 20.0, 3), (30, 900, 12.0, 5), (24, 500, 60.0, 0)):
        peaks = audio.blink_frames(n, fps, rate, seed)
        assert peaks == audio.blink_frames(n, fps, rate, seed)              # same seed -> same frames
        assert len(peaks) >= 2 and peaks == sorted(set(peaks))
        w = audio.blink_weights(n, fps, peaks)
        off = audio.blink_offset(w, eyes, center)
        delta = eyes - center
        full = np.all(off == delta[None], axis=1)
        assert np.array_equal(np.flatnonzero(full), np.array(peaks))       # the preset, only at the peaks
        near = np.zeros(n, bool)
        half = 3 * fps / 25
        for p in peaks:
            near[max(0, int(np.floor(p - half))):int(np.ceil(p + half)) + 1] = True
        assert np.all(off[~near] == 0)                                     # zero away from blinks
        assert np.all(w <= 1) and np.all(w >= 0)
    assert audio.blink_frames(750, 25, 20.0, 3) != audio.blink_frames(750, 25, 20.0, 4)
    assert audio.blink_frames(750, 25, 0.0, 3) == []
    w25 = audio.blink_weights(40, 25, [20])
    assert np.allclose(w25[18:23], [0.5, 0.9, 1.0, 0.9, 0.5]) and w25[:18].max() == 0 and w25[23:].max() == 0


# ---------------------------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def server(fixtures_dir):
    yield from serve_tiny("--presets", str(fixtures_dir / "expression_presets.json"))


@pytest.fixture()
def client(server, ctx):  # noqa: F811
    c = Client(server.endpoint, ctx)
    yield c
    c.close()


def _speech(seconds: float = 3.0, seed: int = 2) -> np.ndarray:
    return arc.recipe_waveform(seed, int(seconds * 16000)).astype(np.float32) / 32768


@pytest.mark.parametrize("fields,needle", [
    ({"pose": True, "pose_style": 46}, "pose_style"),
    ({"pose": True, "pose_style": -1}, "pose_style"),
    ({"pose": True, "pose_style": 3.0}, "pose_style"),
    ({"pose": True, "pose_scale": -0.5}, "pose_scale"),
    ({"pose": True, "pose_scale": float("nan")}, "pose_scale"),
    ({"pose": True, "seed": 1.5}, "seed"),
    ({"pose": True, "seed": "7"}, "seed"),
    ({"pose": "yes"}, "pose"),
    ({"blinks": 1}, "blinks"),
    ({"blinks": True, "blink_rate": -3}, "blink_rate"),
    ({"blinks": True, "blink_seed": 0.5}, "blink_seed"),
    ({"pose": True, "ref_pose": [0.0] * 5}, "ref_pose"),
])
def test_bad_motion_fields_are_bad_field(client, server, fields, needle):
    rid = client.new_id("bad")
    header, parts = P.audio2exp_request(rid, _speech(0.5), 16000, 25, 12)
    header.update(fields)
    h, _ = client.call(header, parts)
    assert h["type"] == P.ERROR and h["code"] == P.E_BAD_FIELD and h["id"] == rid, h
    assert needle in h["message"], h["message"]
    assert server.proc.poll() is None                                       # the server survives


def test_pose_and_blinks_through_the_server(client, server, fixtures_dir):
    presets = json.loads((fixtures_dir / "expression_presets.json").read_text())["presets"]
    delta = np.float32(presets["eyes"]) - np.float32(presets["center"])
    wav = _speech(4.0)
    n = 100
    ref_pose = np.float32([0.05, -0.02, 0.01, 0.1, -0.1, 0.3])

    def ask(**motion):
        header, parts = P.audio2exp_request(client.new_id("m"), wav, 16000, 25, n, **motion)
        h, p = client.call(header, parts, timeout=120)
        assert h["type"] == P.EXPRESSIONS, h
        pose, blinks = P.decode_expression_motion(h, p)
        return P.decode_expressions(h, p), pose, blinks

    plain, none_pose, none_blinks = ask()
    assert none_pose is None and none_blinks is None
    rows, pose, blinks = ask(pose=True, pose_style=5, seed=11, ref_pose=ref_pose, blinks=True,
                             blink_rate=30.0, blink_seed=2)
    assert pose.shape == (n, 6) and np.all(np.isfinite(pose))
    assert np.max(np.abs(pose - ref_pose)) > 1e-4                         # the head moves
    assert blinks and blinks == sorted(blinks)
    off = rows - plain
    full = np.all(np.abs(off - delta[None]) <= 1e-5, axis=1)
    assert np.array_equal(np.flatnonzero(full), np.array(blinks))
    again_rows, again_pose, again_blinks = ask(pose=True, pose_style=5, seed=11, ref_pose=ref_pose, blinks=True,
                                               blink_rate=30.0, blink_seed=2)
    assert np.array_equal(again_rows, rows) and np.array_equal(again_pose, pose) and again_blinks == blinks
    _, other_pose, _ = ask(pose=True, pose_style=5, seed=12, ref_pose=ref_pose)
    assert np.max(np.abs(other_pose - pose)) > 1e-6                       # the seed matters
    _, still, _ = ask(pose=True, pose_scale=0.0, ref_pose=ref_pose)
    assert np.allclose(still, ref_pose[None], atol=1e-6)
    assert server.proc.poll() is None
    pid = server.proc.pid
    server.stop()
    assert server.proc.poll() is not None and not _alive(pid)           # no process left behind


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_cli_writes_pose_and_blinks_into_the_rows(tmp_path, fixtures_dir):
    import soundfile as sf

    from server.cli import main

    wav = tmp_path / "speech.wav"
    sf.write(str(wav), arc.recipe_waveform(1, 16000 * 3), 16000)
    presets = fixtures_dir / "expression_presets.json"
    common = ["audio2exp", "--audio", str(wav), "--tiny-random", "--presets", str(presets)]
    out = tmp_path / "m.json"
    assert main(common + ["--out", str(out), "--pose", "--pose-style", "3", "--seed", "5", "--blinks",
                          "--blink-rate", "30"]) == 0
    doc = json.loads(out.read_text())
    rows = np.asarray(doc["rows"], dtype=np.float32)
    assert rows.shape == (75, 73) and np.max(np.ptp(rows[:, 64:70], axis=0)) > 1e-4
    assert doc["source"]["blinks"] and doc["source"]["pose_style"] == 3
    still = tmp_path / "s.json"
    assert main(common + ["--out", str(still), "--no-pose", "--blinks", "--blink-rate", "30", "--seed", "5"]) == 0
    srows = np.asarray(json.loads(still.read_text())["rows"], dtype=np.float32)
    assert np.ptp(srows[:, 64:70], axis=0).max() == 0
    assert main(common + ["--out", str(tmp_path / "x.json"), "--pose", "--pose-style", "46"]) == 2
    assert main(common + ["--out", str(tmp_path / "x.json"), "--pose", "--pose-scale", "-1"]) == 2
