"""Mel features, frame alignment and audio input handling (server/preprocessing/audio.py), and the audio reference vectors.

The mel is checked against an independent, straightforward numpy implementation of the recipe in
reference README_audio_3dmm.md section 4.2 (written here, no librosa), using the official filter
bank stored in the reference file; the filter bank itself is checked against a hand-written Slaney
filter bank.
"""
from __future__ import annotations

import numpy as np
import pytest

from audio_reference_cases import official_transform_audio
from server.preprocessing import audio

SR = 16000


# ------------------------------------------------------------------ the independent recipe
def recipe_mel(x: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Section 4.2, literally: pre-emphasis, centred zero-padded |STFT| (periodic Hann 800, hop 200),
    mel, dB, symmetric normalisation -> (1 + len // 200, 80) float64."""
    x = np.asarray(x, dtype=np.float64)
    y = x.copy()
    y[1:] = x[1:] - 0.97 * x[:-1]
    padded = np.concatenate([np.zeros(400), y, np.zeros(400)])
    n = 1 + len(x) // 200
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(800) / 800)
    frames = np.stack([padded[200 * k:200 * k + 800] * window for k in range(n)])
    mag = np.abs(np.fft.rfft(frames, axis=1)).T            # (401, n)
    mel = basis.astype(np.float32).astype(np.float64) @ mag
    db = 20 * np.log10(np.maximum(1e-5, mel)) - 20
    return np.clip(8 * (db + 100) / 100 - 4, -4, 4).T


def slaney_mel_basis(sr=16000, n_fft=800, n_mels=80, fmin=55.0, fmax=7600.0) -> np.ndarray:
    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        lin = f * 3.0 / 200.0
        return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), lin)

    def mel_to_hz(m):
        m = np.asarray(m, dtype=np.float64)
        return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), m * 200.0 / 3.0)

    fft_f = np.linspace(0, sr / 2, 1 + n_fft // 2)
    pts = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    w = np.zeros((n_mels, fft_f.size))
    for i in range(n_mels):
        up = (fft_f - pts[i]) / (pts[i + 1] - pts[i])
        down = (pts[i + 2] - fft_f) / (pts[i + 2] - pts[i + 1])
        w[i] = np.maximum(0, np.minimum(up, down)) * 2.0 / (pts[i + 2] - pts[i])
    return w


def sweep(seconds=2.0, f0=100.0, f1=7000.0, amp=0.5, sr=SR):
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * seconds)))).astype(np.float32)


def noise(seconds=1.3, std=0.2, seed=1):
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)) * std).astype(np.float32)


@pytest.fixture(scope="module")
def vec(reference_dir):
    return dict(np.load(reference_dir / "vectors_audio_seed0.npz"))


# ------------------------------------------------------------------ mel
def test_filter_bank_is_slaney(vec):
    mine = audio.mel_basis()
    assert mine.shape == (80, 401) and mine.dtype == np.float32
    indep = slaney_mel_basis()
    assert np.max(np.abs(mine - indep)) <= 1e-6 * np.max(indep)
    assert np.array_equal(mine, vec["mel_basis"])


@pytest.mark.parametrize("name", ["sweep", "noise", "silence", "clipped", "short", "tone_burst"])
def test_mel_matches_independent_recipe(name, vec):
    t = np.arange(SR) / SR
    signals = {
        "sweep": sweep(),
        "noise": noise(),
        "silence": np.zeros(12345, dtype=np.float32),
        "clipped": np.clip(3.0 * np.sin(2 * np.pi * 440 * t), -1, 1).astype(np.float32),
        "short": noise(seconds=0.02),   # 320 samples: shorter than one STFT window
        "tone_burst": np.where((t > 0.3) & (t < 0.55), 0.8 * np.sin(2 * np.pi * 1000 * t), 0).astype(np.float32),
    }
    x = signals[name]
    got = audio.melspectrogram(x)
    want = recipe_mel(x, vec["mel_basis"])
    assert got.shape == want.shape == (1 + len(x) // 200, 80)
    assert np.max(np.abs(got - want)) <= 1e-9
    if name == "silence":
        assert np.all(got == -4.0)


def test_mel_of_reference_waveform(vec):
    got = audio.melspectrogram(vec["waveform_used"])
    assert np.max(np.abs(got - vec["mel"])) <= 1e-9
    assert np.max(np.abs(recipe_mel(vec["waveform_used"], vec["mel_basis"]) - vec["mel"])) <= 1e-9
    # the librosa-version trap: reflect padding (librosa <= 0.8) differs at the two edge frames each side
    old = vec["mel_librosa_0_6_0"]
    assert np.max(np.abs(got[[0, 1, -2, -1]] - old[[0, 1, -2, -1]])) > 0.1
    assert np.max(np.abs(got[3:-3] - old[3:-3])) < 1e-6


def test_mel_frames_any_range_equals_full_and_is_silence_outside():
    x = sweep(seconds=1.0)
    full = audio.melspectrogram(x)                    # 81 frames
    assert np.max(np.abs(audio.mel_frames(x, 17, 40) - full[17:57])) <= 1e-12
    both = audio.mel_frames(x, -10, 110)              # 10 before, 81 inside, 19 after
    assert np.max(np.abs(both[10:91] - full)) <= 1e-12
    assert np.all(both[:9] == -4.0)                   # frames -10..-2 end before sample 0: silence
    assert np.any(both[9] > -4.0)                     # frame -1 overlaps the first 200 samples
    assert np.all(both[-18:] == -4.0)                 # frames 82.. start at or after the last sample
    assert np.any(both[-19] > -4.0)


def test_sadtalker_windows_match_reference(vec):
    mel = vec["mel"]
    starts = audio.sadtalker_window_starts(np.arange(80))
    assert np.array_equal(starts, vec["indiv_mel_start"])
    assert starts[0] == -6 and starts[1] == -3         # int() truncates toward zero
    w = audio.sadtalker_mel_windows(mel, 80)
    assert w.shape == (80, 80, 16) and w.dtype == np.float32
    assert np.max(np.abs(w - vec["indiv_mels"])) <= 1e-6
    assert audio.sadtalker_num_frames(len(vec["waveform"])) == int(vec["num_frames"])


def test_blink_sequence(vec):
    seq = audio.blink_sequence(80, int(vec["python_random_seed"]))
    assert np.array_equal(seq, vec["ratio_gt"][:, 0])
    assert not audio.blink_sequence(20, 0).any() and not audio.blink_sequence(80, None).any()
    assert not audio.blink_sequence(21, 0).any()       # the official code would crash here
    assert audio.blink_sequence(300, 5).max() == 1.0


def test_styleheat_cut_matches_reference(vec):
    mel = vec["mel"]
    for step in (16, 32, 48, 80):
        starts = [audio.styleheat_window_start(i, step) for i in range(80)]
        lens = [audio.styleheat_cut(mel, i, step).shape[1] for i in range(80)]
        assert starts == vec[f"styleheat_audio_start{step}"].tolist()
        assert lens == vec[f"styleheat_audio_len{step}"].tolist()
    with pytest.raises(ValueError):
        audio.styleheat_window_start(3, 20)


# ------------------------------------------------------------------ AudioWarper windows and alignment
def official_cut32(mel, i):
    """data/audio_dataset.py transform_audio, step 32 (written out in audio_reference_cases)."""
    return official_transform_audio(mel, i, 32)


def test_windows_at_25fps_equal_the_official_cut(vec):
    x = vec["waveform"]
    mel = audio.melspectrogram(x)
    w = audio.audio_windows_for_frames(x, SR, 25, 80)
    wc = audio.audio_windows_for_frames(x, SR, 25, 80, official=True)
    assert w.shape == (80, 80, 32) and w.dtype == np.float32
    for i in range(80):
        ref = official_cut32(mel, i)
        k = ref.shape[1]
        assert np.max(np.abs(wc[i, :, :k] - ref)) <= 1e-6
        if i >= 4:
            assert np.max(np.abs(w[i, :, :k] - ref)) <= 1e-6
        if k < 32:                                     # past the end: completed with silence
            assert np.all(w[i, :, k + 2:] == -4.0)
    # without the clamp, frame 0's window starts 0.16 s before the audio: first 12 steps are silence
    assert np.all(w[0, :, :11] == -4.0) and np.max(np.abs(w[0, :, 13:] - mel[:19].T)) <= 1e-6
    spot = vec["styleheat_audio_window32_spot"]
    for k, f in enumerate(vec["styleheat_audio_spot_frames"]):
        known = ~np.isnan(spot[k])
        assert np.max(np.abs(wc[f][known] - spot[k][known])) <= 1e-6


@pytest.mark.parametrize("fps,frame,grid_frame", [(24, 24, 25), (24, 48, 50), (30, 6, 5), (30, 36, 30),
                                                  (25, 17, 17)])
def test_frame_alignment_other_fps(fps, frame, grid_frame):
    """A frame whose time falls on the 25 fps grid gets exactly that grid frame's official window."""
    x = np.concatenate([sweep(seconds=1.5), noise(seconds=1.5)])
    mel = audio.melspectrogram(x)
    w = audio.audio_windows_for_frames(x, SR, fps, 60)
    assert np.max(np.abs(w[frame] - official_cut32(mel, grid_frame))) <= 1e-6


@pytest.mark.parametrize("fps", [24, 25, 30, 29.97])
def test_windows_are_mel_slices_at_the_frame_time(fps):
    x = np.concatenate([noise(seconds=1.0, seed=3), sweep(seconds=1.2)])
    full = audio.mel_frames(x, -200, 600)
    offset = 0.37
    w = audio.audio_windows_for_frames(x, SR, fps, 40, offset)
    flat = full.T
    last = -10 ** 9
    for i in range(40):
        t = offset + i / fps
        # find where this window sits in the mel (unique for non-silent audio)
        hits = [s for s in range(full.shape[0] - 32) if np.max(np.abs(flat[:, s:s + 32] - w[i])) <= 1e-6]
        assert len(hits) == 1
        s = hits[0] - 200
        assert abs(s - (80 * t - 12.8)) < 1.0 + 1e-9   # starts 0.16 s before the frame, within a mel step
        assert s >= last
        last = s


def test_offsets_seconds_and_frames():
    x = np.concatenate([sweep(seconds=1.0), noise(seconds=1.0)])
    base = audio.audio_windows_for_frames(x, SR, 25, 50)
    ahead = audio.audio_windows_for_frames(x, SR, 25, 30, offset_seconds=0.4)
    ahead_f = audio.audio_windows_for_frames(x, SR, 25, 30, offset_frames=10)
    assert np.array_equal(ahead, ahead_f)
    assert np.max(np.abs(ahead - base[10:40])) <= 1e-6
    late = audio.audio_windows_for_frames(x, SR, 30, 90, offset_frames=-60)   # sound starts 2 s in
    assert np.all(late[:50] == -4.0)                                           # t <= -0.34 s: silence
    assert np.max(np.abs(late[60] - base[0])) <= 1e-6                          # t = 0, no clamp in either
    with pytest.raises(audio.AudioError):
        audio.audio_windows_for_frames(x, SR, 25, 3, offset_seconds=0.1, offset_frames=2)


def test_clip_shorter_or_longer_than_the_range():
    x = sweep(seconds=0.5)
    w = audio.audio_windows_for_frames(x, SR, 25, 100)       # 4 s of frames, 0.5 s of audio
    assert w.shape == (100, 80, 32) and np.all(w[20:] == -4.0) and np.any(w[5] > -4.0)
    w2 = audio.audio_windows_for_frames(sweep(seconds=30.0), SR, 25, 10, offset_seconds=20.0)
    assert w2.shape == (10, 80, 32) and np.all(np.isfinite(w2))
    assert audio.audio_windows_for_frames(x, SR, 25, 0).shape == (0, 80, 32)
    empty = audio.audio_windows_for_frames(np.zeros(0, np.float32), SR, 25, 5)
    assert np.all(empty == -4.0)


# ------------------------------------------------------------------ input handling
def test_stereo_int_and_layouts():
    x = noise(seconds=0.5)
    mono = audio.to_mono_16k(x, SR)
    assert np.array_equal(audio.to_mono_16k(np.stack([x, x], 1), SR), mono)
    assert np.array_equal(audio.to_mono_16k(np.stack([x, x], 0), SR), mono)    # (channels, n)
    left_only = audio.to_mono_16k(np.stack([x, np.zeros_like(x)], 1), SR)
    assert np.allclose(left_only, x / 2)
    pcm = np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)
    assert np.array_equal(audio.to_mono_16k(pcm, SR), pcm.astype(np.float32) / 32768)
    raw = audio.pcm_to_samples(np.stack([pcm, pcm], 1).tobytes(), "int16", channels=2)
    assert raw.shape == (len(pcm), 2) and np.array_equal(audio.to_mono_16k(raw, SR), pcm.astype(np.float32) / 32768)
    with pytest.raises(audio.AudioError, match="whole number"):
        audio.pcm_to_samples(b"\x00\x01\x02", "int16", 1)
    with pytest.raises(audio.AudioError):
        audio.pcm_to_samples(b"", "int24", 1)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_other_sample_rates_give_the_same_mel(rate):
    seconds = 1.0
    t = np.arange(int(rate * seconds)) / rate
    tone = lambda tt: (0.4 * np.sin(2 * np.pi * 700 * tt) + 0.2 * np.sin(2 * np.pi * 2300 * tt)).astype(np.float32)
    ref = audio.melspectrogram(tone(np.arange(SR) / SR))
    got = audio.melspectrogram(audio.to_mono_16k(tone(t), rate))
    assert got.shape == ref.shape
    inner = slice(3, -3)
    bands = audio.mel_basis()[:, int(700 / 20)].argmax(), audio.mel_basis()[:, int(2300 / 20)].argmax()
    assert np.max(np.abs(got[inner][:, list(bands)] - ref[inner][:, list(bands)])) < 0.02
    if rate < 2 * 7600:   # band-limited source: nothing above its Nyquist frequency, so compare below
        keep = audio.mel_basis()[:, :int(0.45 * rate / 20)].sum(1) > 0
        assert np.max(np.abs(got[inner][:, keep][:, :40] - ref[inner][:, keep][:, :40])) < 0.05


def test_bad_input_gives_clear_errors(tmp_path):
    x = noise(seconds=0.2)
    for bad_sr in (0, -5, float("nan"), "fast", 10):
        with pytest.raises(audio.AudioError, match="sample rate"):
            audio.to_mono_16k(x, bad_sr)
    bad = x.copy()
    bad[10] = np.nan
    with pytest.raises(audio.AudioError, match="NaN"):
        audio.to_mono_16k(bad, SR)
    with pytest.raises(audio.AudioError, match="\\[-1, 1\\]"):
        audio.to_mono_16k(x * 32768, SR)
    with pytest.raises(audio.AudioError, match="1-D"):
        audio.to_mono_16k(np.zeros((2, 2, 2), np.float32), SR)
    with pytest.raises(audio.AudioError, match="fps"):
        audio.audio_windows_for_frames(x, SR, 0, 3)
    loud = np.clip(x * 50, -3, 3)                     # clipped and beyond full scale: still works
    w = audio.audio_windows_for_frames(loud, SR, 25, 5)
    assert np.all(np.isfinite(w)) and w.max() <= 4.0
    garbage = tmp_path / "speech.wav"
    garbage.write_bytes(b"RIFF\x00\x00not really a wave file" * 10)
    with pytest.raises(audio.AudioError, match="cannot read"):
        audio.read_audio(garbage)
    with pytest.raises(audio.AudioError, match="not found"):
        audio.read_audio(tmp_path / "missing.wav")


def test_read_audio_files(tmp_path):
    import soundfile

    x = noise(seconds=0.5)
    stereo = np.stack([x, -x * 0.5], 1)
    soundfile.write(tmp_path / "s.wav", stereo, 44100, subtype="PCM_16")
    soundfile.write(tmp_path / "m.flac", x, SR)
    data, sr = audio.read_audio(tmp_path / "s.wav")
    assert sr == 44100 and data.shape == stereo.shape and np.max(np.abs(data - stereo)) < 1e-4
    data, sr = audio.read_audio(tmp_path / "m.flac")
    assert sr == SR and data.shape == x.shape


# ------------------------------------------------------------------ the verifier CORE calls
def test_verify_audio_vectors_on_shipped_file(reference_dir):
    from server.parity.reference import Comparison
    from server.parity.verify_audio import verify_audio_vectors

    results = verify_audio_vectors(reference_dir / "vectors_audio_seed0.npz", reference_dir)
    assert all(isinstance(r, Comparison) for r in results)
    names = {r.name for r in results}
    assert {"audio.mel", "audio.indiv_mels", "audio.audio_emb", "audio.exp_coeff_pred",
            "audio.styleheat_audio_window32_spot"} <= names
    failed = [r.line() for r in results if not r.ok]
    assert not failed, "\n".join(failed)
