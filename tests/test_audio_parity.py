"""Audio parity on cases made here by the reference rule, not only on the shared seed-0 example (issue 12).

``audio_reference_cases`` re-implements the official SadTalker / StyleHEAT indexing from the official
sources and builds vector files for other seeds, waveform lengths that are not multiples of the hop
(200) or of one 25 fps frame (640 samples), clips shorter than one AudioWarper window and 1-frame
clips. ``styleheat verify-reference`` must pass on all of them, and the window functions must equal
the official cut for every frame: at the start, in the middle, at the end and past the end.
"""
from __future__ import annotations

import numpy as np
import pytest

import audio_reference_cases as arc
from models import windows as W
from models.audio_features import AudioError, melspectrogram

SR = 16000

# lengths: not multiples of 200 / 640, exactly one frame, just under / over one 32-step window
# (6400 samples), a 1-frame clip, the seed-0 length and one sample more
EDGE_LENGTHS = [640, 641, 1000, 1279, 1919, 5000, 6399, 6400, 6401, 12345, 51200, 51201, 64639]


def _lengths() -> list[int]:
    rng = np.random.default_rng(12)
    return EDGE_LENGTHS + [int(n) for n in rng.integers(700, 90000, size=6)]


@pytest.mark.parametrize("n_samples", _lengths())
def test_official_windows_every_frame_any_length(n_samples):
    seed = n_samples % 7
    wav = arc.recipe_waveform(seed, n_samples).astype(np.float32) / 32768
    length, t = arc.official_length(n_samples)
    mel = arc.official_melspectrogram(arc.official_crop_pad(wav, length))
    # SadTalker: num_frames, the crop, the mel and indiv_mels of every frame
    assert W.sadtalker_num_frames(n_samples) == t
    assert np.array_equal(W.sadtalker_crop(wav), wav[:length])
    ours_mel = melspectrogram(W.sadtalker_crop(wav))
    assert ours_mel.shape == mel.shape and np.max(np.abs(ours_mel - mel)) <= 1e-9
    indiv, starts = arc.official_indiv_mels(mel, t)
    assert np.array_equal(W.sadtalker_window_starts(np.arange(t)), starts)
    assert np.max(np.abs(W.sadtalker_mel_windows(ours_mel, t) - indiv), initial=0.0) <= 1e-6
    # StyleHEAT transform_audio, step 32, frames from 3 before the clip to 6 after its last frame
    frames = np.arange(-3, t + 7)
    got = W.audio_windows_for_frames(wav, SR, 25, len(frames), offset_frames=-3, official=True)
    assert got.shape == (len(frames), 80, 32) and got.dtype == np.float32
    assert np.array_equal(got, W.styleheat_windows(wav, frames).astype(np.float32))
    for k, j in enumerate(frames):
        ref = arc.official_transform_audio(mel, int(j), 32)
        n = ref.shape[1]
        assert W.styleheat_cut(ours_mel, int(j), 32).shape[1] == n
        assert np.max(np.abs(got[k, :, :n] - ref), initial=0.0) <= 1e-6, (n_samples, j)
    for step in (16, 48, 80):
        for j in (0, 1, t // 2, t - 1, t + 2):
            ref = arc.official_transform_audio(mel, j, step)
            ours = W.styleheat_cut(ours_mel, j, step)
            assert ours.shape == ref.shape and np.max(np.abs(ours - ref), initial=0.0) <= 1e-9


@pytest.mark.parametrize("n_samples", [51201, 12345, 6401, 37777])
def test_product_windows_are_the_official_cut_of_the_whole_audio(n_samples):
    """The product's (default) windows at 25 fps: frame j >= 4 gets the official cut of the mel of the
    WHOLE audio; against the official (cropped) rule they differ only where docs say: in the official
    mel's last two frames when len % 640 != 0, and where the official window is short."""
    wav = arc.recipe_waveform(3, n_samples).astype(np.float32) / 32768
    length, t = arc.official_length(n_samples)
    full_mel = arc.official_melspectrogram(wav)
    crop_mel = arc.official_melspectrogram(wav[:length])
    product = W.audio_windows_for_frames(wav, SR, 25, t)
    official = W.audio_windows_for_frames(wav, SR, 25, t, official=True)
    last_two = crop_mel.shape[0] - 2
    differs_at_end = False
    for j in range(t):
        whole = arc.official_transform_audio(full_mel, j, 32)
        cut = arc.official_transform_audio(crop_mel, j, 32)
        if j >= 4:
            n = whole.shape[1]
            assert np.max(np.abs(product[j, :, :n] - whole)) <= 1e-6
        start = W.styleheat_window_start(j, 32)
        if j >= 4 and cut.shape[1] == 32 and start + 32 <= last_two:
            assert np.max(np.abs(product[j] - official[j])) <= 1e-6
        if cut.shape[1] and start + cut.shape[1] > last_two:
            differs_at_end |= bool(np.max(np.abs(product[j, :, :cut.shape[1]] - cut)) > 1e-3)
    assert differs_at_end    # all four lengths leave samples after the last whole frame
    # frames 0..3: the official code clamps them to window 0; the product starts 0.16 s before the frame
    assert all(np.array_equal(official[j], official[0]) for j in range(4))
    assert np.all(product[0, :, :11] == -4.0) and not np.array_equal(product[0], official[0])


def test_official_windows_exist_only_at_25fps_on_whole_frames():
    wav = arc.recipe_waveform(1, 9000).astype(np.float32) / 32768
    for kwargs in ({"fps": 24}, {"fps": 30}, {"fps": 25, "offset_frames": 0.5}, {"fps": 25, "offset_seconds": 0.01}):
        fps = kwargs.pop("fps")
        with pytest.raises(AudioError, match="official"):
            W.audio_windows_for_frames(wav, SR, fps, 5, official=True, **kwargs)
    # a whole-frame offset given in seconds is fine
    a = W.audio_windows_for_frames(wav, SR, 25, 5, offset_seconds=0.2, official=True)
    assert np.array_equal(a, W.audio_windows_for_frames(wav, SR, 25, 5, offset_frames=5, official=True))
    assert W.audio_windows_for_frames(wav[:100], SR, 25, 3, official=True).shape == (3, 80, 32)   # T = 0


def test_generator_reproduces_the_shared_seed0_file(reference_dir):
    """The case generator is the reference rule: with seed 0 and 51200 samples it rebuilds the shared file."""
    mine = arc.make_audio_vectors(reference_dir, 0, 51200)
    with np.load(reference_dir / "vectors_audio_seed0.npz") as z:
        # keys the generator adds beyond the shared file (e.g. pose_official_fails) have nothing to compare with
        ref = {k: z[k] for k in mine if k not in ("meta_json", "wave_recipe_json") and k in z.files}
    exact = [k for k in ref if ref[k].dtype.kind in "iu"] + ["waveform", "waveform_used", "indiv_mels", "ratio_gt",
                                                            "first_coeff", "ref", "mel_basis"]
    for k in exact:
        assert np.array_equal(mine[k], ref[k]), k
    assert np.max(np.abs(mine["mel"] - ref["mel"])) <= 1e-9
    spot, rspot = mine["styleheat_audio_window32_spot"], ref["styleheat_audio_window32_spot"]
    assert np.array_equal(np.isnan(spot), np.isnan(rspot)) and np.nanmax(np.abs(spot - rspot)) <= 1e-9
    for k in ("audio_emb", "exp_coeff_pred", "exp_coeff_pred_mel_zero"):
        assert np.max(np.abs(mine[k] - ref[k])) <= 1e-5 + 1e-5 * np.max(np.abs(ref[k])), k


# seed, waveform samples, spot frames (None: the reference rule's [0, 1, 4, 5, T/2, T-1])
CLI_CASES = [
    (1, 50001, None),              # T = 78, 81 samples after the last whole frame, not a multiple of 200
    (2, 37777, None),              # T = 59
    (3, 5000, None),               # T = 7: the whole clip is shorter than one 32-step window
    (4, 1000, None),               # T = 1: a 1-frame clip
    (5, 7000, [0, 2, 3, 8, 9, 10, 16]),   # T = 10, spots at and past the end (empty official windows)
]


@pytest.mark.parametrize("seed,n_samples,spots", CLI_CASES)
def test_verify_reference_passes_on_vector_files_made_by_the_rule(tmp_path, capsys, reference_dir,
                                                                  seed, n_samples, spots):
    from server import cli

    path = arc.write_audio_vectors(tmp_path / f"vectors_audio_seed{seed}.npz", reference_dir, seed, n_samples,
                                   spots)
    rc = cli.main(["verify-reference", "--vectors", str(path), "--layout", str(reference_dir)])
    out = capsys.readouterr().out
    assert rc == 0 and out.rstrip().endswith("parity: PASS"), out
    for name in ("audio.mel ", "audio.indiv_mels", "audio.exp_coeff_pred ", "audio.styleheat_window_index",
                 "audio.styleheat_audio_len32", "audio.styleheat_audio_window32_spot "):
        assert name in out


def test_verify_reference_fails_on_a_wrong_window(tmp_path, capsys, reference_dir):
    """The check can fail: one official window value changed -> parity: FAIL naming the spot windows."""
    from server import cli

    v = arc.make_audio_vectors(reference_dir, 2, 37777)
    v["styleheat_audio_window32_spot"][5, 3, 10] += 1e-4       # frame T-1, inside its (short) window
    np.savez(tmp_path / "bad.npz", **v)
    assert cli.main(["verify-reference", "--vectors", str(tmp_path / "bad.npz"), "--layout", str(reference_dir)]) == 1
    assert capsys.readouterr().out.rstrip().endswith("parity: FAIL audio.styleheat_audio_window32_spot")
