"""Audio2Exp (models/audio2exp.py), its checkpoint loader and audio_to_expression (server/preprocessing/audio.py),
and the `styleheat audio2exp` command."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.audio2exp import Audio2Exp, Audio2ExpConfig, load_state_dict_strict
from server.parity import reference
from server.preprocessing import audio

SR = 16000
PTH = "checkpoints/auido2exp_00300-model.pth"
BUNDLE = "checkpoints/SadTalker_V0.0.2_256.safetensors"


@pytest.fixture(scope="module")
def vec(reference_dir):
    return dict(np.load(reference_dir / "vectors_audio_seed0.npz"))


@pytest.fixture(scope="module")
def sad_layout(reference_dir):
    return reference.load_layout(reference_dir / "sadtalker_checkpoints.json")


@pytest.fixture(scope="module")
def seeded_sd(sad_layout):
    return reference.seeded_part(sad_layout, PTH, "model", seed=0)


@pytest.fixture(scope="module")
def seeded_net(seeded_sd):
    net = Audio2Exp()
    load_state_dict_strict(net, seeded_sd, "seeded")
    return net


def tiny_net(seed=0):
    torch.manual_seed(seed)
    net = Audio2Exp(Audio2ExpConfig.tiny())
    with torch.no_grad():   # non-trivial BatchNorm statistics
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def speech_like(seconds=2.0, seed=0):
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * (120 * t + 40 * t ** 2)) * np.sin(np.pi * 4 * t) ** 2
    return (x + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


# ------------------------------------------------------------------ network
def test_layout_keys_and_shapes_match_sadtalker(sad_layout):
    entries = sad_layout["files"][PTH]["parts"]["model"]["entries"]
    model_sd = Audio2Exp().state_dict()
    assert [k for k, *_ in entries] == list(model_sd)
    assert all(list(model_sd[k].shape) == shape for k, shape, *_ in entries)


def test_tiny_shapes():
    net = tiny_net()
    mel = torch.randn(7, 80, 16)
    emb = net.encode(mel)
    assert emb.shape == (7, 16) and (emb >= 0).all()
    out = net(mel, torch.randn(7, 64), torch.rand(7))
    assert out.shape == (7, 64)
    with pytest.raises(ValueError, match="80, 16"):
        net(torch.randn(7, 80, 32), torch.randn(7, 64), torch.rand(7))
    with pytest.raises(ValueError, match=r"ref_exp \(N, 64\) and ratio \(N,\) for N = 7"):
        net(mel, torch.randn(7 * 64 - 1), torch.rand(7))    # not a whole number of values per window
    with pytest.raises(ValueError, match=r"got \(7, 64\) and \(6,\)"):
        net(mel, torch.randn(7, 64), torch.rand(6))


def test_seeded_parity_embedding_and_expression(vec, seeded_net):
    mels = torch.from_numpy(vec["indiv_mels"])
    with torch.inference_mode():
        emb = seeded_net.encode(mels).numpy()
    ref = vec["audio_emb"]
    assert np.max(np.abs(emb - ref)) <= 1e-5 + 1e-5 * np.abs(ref).max()
    exp = audio.audio_to_expression(vec["waveform"], SR, 25, vec["first_coeff"][0, :64], model=seeded_net,
                                    blink="random", seed=int(vec["python_random_seed"]))
    ref = vec["exp_coeff_pred"]
    assert exp.shape == (80, 64) and exp.dtype == np.float32
    assert np.max(np.abs(exp - ref)) <= 1e-5 + 1e-5 * np.abs(ref).max()
    # chunk size does not matter (BatchNorm in eval mode)
    exp7 = audio.audio_to_expression(vec["waveform"], SR, 25, vec["first_coeff"][0, :64], model=seeded_net,
                                     blink="random", seed=int(vec["python_random_seed"]), batch_size=7)
    assert np.max(np.abs(exp7 - exp)) <= 1e-5
    # the blinks are an input: leaving them out changes the blink frames
    still = audio.audio_to_expression(vec["waveform"], SR, 25, vec["first_coeff"][0, :64], model=seeded_net)
    blinking = vec["ratio_gt"][:, 0] > 0
    assert np.abs(still - exp)[blinking].max() > 1e-3 and np.abs(still - exp)[~blinking].max() <= 1e-5


# ------------------------------------------------------------------ loading checkpoints
def test_load_pth_safetensors_and_directory(tmp_path, sad_layout, seeded_net, vec):
    from safetensors.torch import save_file

    pth = tmp_path / "auido2exp_00300-model.pth"
    torch.save({"model": reference.seeded_part(sad_layout, PTH, "model", seed=0), "epoch": 300}, pth)
    bundle_dir = tmp_path / "sad"
    bundle_dir.mkdir()
    save_file(reference.seeded_part(sad_layout, BUNDLE, "", seed=0), bundle_dir / "SadTalker_V0.0.2_256.safetensors")
    mels = torch.from_numpy(vec["indiv_mels"][:12])
    with torch.inference_mode():
        want = seeded_net.encode(mels)
        for source in (pth, bundle_dir / "SadTalker_V0.0.2_256.safetensors", bundle_dir, tmp_path):
            got = audio.load_audio2exp(source).encode(mels)
            assert torch.equal(got, want), source


def test_strict_loading_lists_every_problem(tmp_path, seeded_sd):
    sd = dict(seeded_sd)
    del sd["audio_encoder.4.conv_block.1.running_var"]
    sd["audio_encoder.99.extra"] = torch.zeros(3)
    sd["mapping1.weight"] = torch.zeros(64, 576)
    path = tmp_path / "broken.pth"
    torch.save({"model": sd, "epoch": 1}, path)
    with pytest.raises(ValueError) as info:
        audio.load_audio2exp(path)
    msg = str(info.value)
    assert "missing keys (1): audio_encoder.4.conv_block.1.running_var" in msg
    assert "unexpected keys (1): audio_encoder.99.extra" in msg
    assert "mapping1.weight: checkpoint (64, 576) vs model (64, 577)" in msg
    assert str(path) in msg


def test_wrong_files_give_clear_errors(tmp_path, sad_layout):
    w2l = tmp_path / "wav2lip.pth"
    torch.save({"state_dict": reference.seeded_part(sad_layout, "checkpoints/wav2lip.pth", "state_dict", 0)}, w2l)
    with pytest.raises(audio.AudioError, match="wav2lip"):
        audio.load_audio2exp(w2l)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x04 this is not a checkpoint")
    with pytest.raises(audio.AudioError, match="weights_only"):
        audio.load_audio2exp(junk)
    other = tmp_path / "other.pth"
    torch.save({"net_G_ema": {"x": torch.zeros(1)}}, other)
    with pytest.raises(audio.AudioError, match="not an Audio2Exp checkpoint"):
        audio.load_audio2exp(other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(audio.AudioError, match="no SadTalker Audio2Exp checkpoint"):
        audio.load_audio2exp(tmp_path / "empty")


def test_tiny_checkpoint_round_trip_infers_the_config(tmp_path):
    net = tiny_net(3)
    path = tmp_path / "tiny.pth"
    torch.save({"model": net.state_dict(), "epoch": 0}, path)
    loaded = audio.load_audio2exp(path)
    assert loaded.cfg.widths == net.cfg.widths
    x = torch.randn(3, 80, 16)
    assert torch.equal(loaded.encode(x), net.encode(x))


# ------------------------------------------------------------------ frame rates, offsets, edges
def test_other_fps_resample_the_25fps_curve():
    net = tiny_net(1)
    x = speech_like()
    ref = np.linspace(-0.5, 0.5, 64).astype(np.float32)
    e25 = audio.audio_to_expression(x, SR, 25, ref, model=net)
    assert e25.shape == (50, 64)
    e50 = audio.audio_to_expression(x, SR, 50, ref, model=net)
    assert e50.shape == (100, 64)
    assert np.max(np.abs(e50[0::2] - e25)) <= 1e-6                         # on the grid: the 25 fps value
    assert np.max(np.abs(e50[1:-2:2] - 0.5 * (e25[:49] + e25[1:50]))) <= 1e-5  # between: linear
    assert np.max(np.abs(e50[-1] - e25[-1])) <= 1e-6                       # audio still playing: held
    e30 = audio.audio_to_expression(x, SR, 30, ref, model=net)
    assert e30.shape == (60, 64)
    assert np.max(np.abs(e30[6] - e25[5])) <= 1e-6 and np.max(np.abs(e30[36] - e25[30])) <= 1e-6
    k = 7                                          # t = 7/30 s = 5.833 frames at 25 fps
    assert np.max(np.abs(e30[k] - (e25[5] + (5.0 / 6.0) * (e25[6] - e25[5])))) <= 1e-5
    e24 = audio.audio_to_expression(x, SR, 24, ref, model=net)
    assert e24.shape == (48, 64) and np.max(np.abs(e24[24] - e25[25])) <= 1e-6


def test_offsets_and_frames_outside_the_audio():
    net = tiny_net(2)
    x = speech_like(seconds=1.2)
    ref = np.zeros(64, np.float32)
    base = audio.audio_to_expression(x, SR, 25, ref, model=net)
    assert base.shape == (30, 64)
    shifted = audio.audio_to_expression(x, SR, 25, ref, model=net, n_frames=10, offset_frames=12)
    assert np.max(np.abs(shifted - base[12:22])) <= 1e-6
    assert np.array_equal(shifted, audio.audio_to_expression(x, SR, 25, ref, model=net, n_frames=10,
                                                             offset_seconds=12 / 25))
    long = audio.audio_to_expression(x, SR, 25, ref, model=net, n_frames=50, offset_frames=-10)
    with torch.inference_mode():
        silent = net(torch.full((1, 80, 16), -4.0), torch.zeros(1, 64), torch.zeros(1)).numpy()[0]
    assert np.max(np.abs(long[:10] - silent)) <= 1e-6                    # before the sound: silence
    assert np.max(np.abs(long[40:] - silent)) <= 1e-6                    # after it ended
    assert np.max(np.abs(long[10:40] - base)) <= 1e-6
    tiny_clip = audio.audio_to_expression(x[:300], SR, 25, ref, model=net)
    assert tiny_clip.shape == (0, 64)


def test_stereo_other_rate_and_reference_forms():
    net = tiny_net(4)
    x = speech_like(seconds=1.0)
    ref = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    mono = audio.audio_to_expression(x, SR, 25, ref, model=net)
    stereo = audio.audio_to_expression(np.stack([x, x], 1), SR, 25, ref, model=net)
    assert np.array_equal(mono, stereo)
    per_frame = audio.audio_to_expression(x, SR, 25, np.tile(ref, (25, 1)), model=net)
    assert np.array_equal(per_frame, mono)
    import librosa
    x48 = librosa.resample(x, orig_sr=SR, target_sr=48000)
    e48 = audio.audio_to_expression(x48, 48000, 25, ref, model=net)
    assert e48.shape == mono.shape and np.max(np.abs(e48 - mono)) < 0.05 * (np.abs(mono).max() + 1e-3) + 1e-3
    with pytest.raises(audio.AudioError, match="ref_exp"):
        audio.audio_to_expression(x, SR, 25, ref[:60], model=net)
    with pytest.raises(audio.AudioError, match="blink"):
        audio.audio_to_expression(x, SR, 25, ref, model=net, blink="sometimes")
    blinks = np.zeros(25, np.float32)
    blinks[10:15] = [0.5, 0.9, 1.0, 0.9, 0.5]
    eb = audio.audio_to_expression(x, SR, 25, ref, model=net, blink=blinks)
    assert np.abs(eb - mono)[10:15].max() > 0 and np.array_equal(eb[:10], mono[:10])


# ------------------------------------------------------------------ the command
def test_audio2exp_command_writes_a_motion_file(tmp_path):
    import soundfile

    from server.cli import main
    from server.preprocessing.motion import read_motion, write_motion

    net = tiny_net(5)
    ckpt = tmp_path / "auido2exp_00300-model.pth"
    torch.save({"model": net.state_dict(), "epoch": 300}, ckpt)
    x = speech_like(seconds=1.0)
    stereo44 = np.stack([x, x], 1)
    import librosa
    wav = tmp_path / "speech.wav"
    soundfile.write(wav, librosa.resample(stereo44.T, orig_sr=SR, target_sr=44100).T, 44100, subtype="FLOAT")
    row = np.zeros(73, np.float32)
    row[:64] = 0.1
    row[64:70] = [0.05, -0.1, 0.02, 0.1, -0.2, 0.3]
    row[70:] = [1.01, 127.0, 99.0]
    refm = tmp_path / "portrait.json"
    write_motion(refm, row[None, :], fps=25)
    out = tmp_path / "motion.json"
    rc = main(["audio2exp", "--audio", str(wav), "--fps", "30", "--checkpoint", str(ckpt), "--out", str(out),
               "--reference", str(refm), "--first-frame", "12"])
    assert rc == 0
    m = read_motion(out)
    assert m.rows.shape == (30, 73) and m.fps == 30 and m.first_frame == 12
    samples, sr = audio.read_audio(wav)
    want = audio.audio_to_expression(samples, sr, 30, row[:64], model=net)
    assert np.max(np.abs(m.rows[:, :64] - want)) <= 1e-6
    assert np.allclose(m.rows[:, 64:], row[64:])
    assert json.loads(out.read_text())["source"]["tool"] == "styleheat audio2exp"
    # no reference: zero pose, typical FFHQ crop
    rc = main(["audio2exp", "--audio", str(wav), "--checkpoint", str(ckpt), "--out", str(out), "--frames", "40"])
    assert rc == 0
    m = read_motion(out)
    assert m.rows.shape == (40, 73) and np.all(m.rows[:, 64:70] == 0) and np.allclose(m.rows[0, 70:], [1.0, 128.5, 101.8])


def test_audio2exp_command_errors(tmp_path, capsys):
    from server.cli import main

    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"nope" * 100)
    ckpt = tmp_path / "c.pth"
    torch.save({"model": tiny_net().state_dict(), "epoch": 0}, ckpt)
    rc = main(["audio2exp", "--audio", str(bad), "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.json")])
    assert rc == 1 and "cannot read this audio file" in capsys.readouterr().err
    rc = main(["audio2exp", "--audio", str(bad), "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.txt")])
    assert rc == 2 and ".json" in capsys.readouterr().err
    import soundfile
    short = tmp_path / "short.wav"
    soundfile.write(short, np.zeros(100, np.float32), SR)
    rc = main(["audio2exp", "--audio", str(short), "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.json")])
    assert rc == 1 and "shorter than one frame" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_read_reference_formats_and_errors(tmp_path):
    from scipy.io import savemat

    from server.preprocessing.audio import AudioError
    from server.commands.audio import DEFAULT_CROP, read_reference
    from server.preprocessing.motion import write_motion

    full = np.arange(73, dtype=np.float32) / 100
    write_motion(tmp_path / "r.json", full[None, :], fps=25)
    np.testing.assert_array_equal(read_reference(tmp_path / "r.json"), full)
    for n in (64, 70, 73):
        np.save(tmp_path / f"r{n}.npy", full[:n][None, :])  # (1, n) rows are accepted too
        row = read_reference(tmp_path / f"r{n}.npy")
        assert row.shape == (73,) and row.dtype == np.float32
        np.testing.assert_array_equal(row[:n], full[:n])
        if n < 73:
            np.testing.assert_allclose(row[70:], DEFAULT_CROP)
            assert np.all(row[n:70] == 0)
    savemat(tmp_path / "first.mat", {"coeff_3dmm": np.tile(np.arange(73.0), (3, 1))})
    row = read_reference(tmp_path / "first.mat")
    np.testing.assert_array_equal(row[:70], np.arange(70.0))
    np.testing.assert_allclose(row[70:], DEFAULT_CROP)

    savemat(tmp_path / "other.mat", {"x": np.zeros(3)})
    np.save(tmp_path / "words.npy", np.array(["a"] * 64))
    np.save(tmp_path / "short.npy", np.zeros(10))
    np.save(tmp_path / "nan.npy", np.full(64, np.nan))
    (tmp_path / "r.txt").write_text("1 2 3")
    for name, msg in (("missing.npy", "not found"), ("other.mat", "no 'coeff_3dmm' variable"),
                      ("words.npy", "got values of type <U1"), ("short.npy", r"got shape \(10,\)"),
                      ("nan.npy", "64, 70 or 73 finite"), ("r.txt", "must be a motion .json")):
        with pytest.raises(AudioError, match=msg) as info:
            read_reference(tmp_path / name)
        assert name in str(info.value)
