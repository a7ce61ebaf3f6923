"""training.prepare reads a clip's sidecar audio without server/ (16 kHz mono; a clear DatasetError)."""
from __future__ import annotations

import numpy as np
import pytest

from models.audio_features import to_mono_16k
from training import prepare
from training.data import DatasetError


def test_sidecar_audio_is_read_as_16k_mono(tmp_path):
    import soundfile

    x = 0.2 * np.sin(np.arange(22050) / 7.0).astype(np.float32)
    stereo = np.stack([x, -0.5 * x], 1)
    soundfile.write(tmp_path / "clip.wav", stereo, 44100, subtype="FLOAT")
    wav = prepare.read_sidecar_audio(tmp_path / "clip.wav")
    assert wav.dtype == np.float32 and wav.shape == (8000,)
    assert np.array_equal(wav, to_mono_16k(stereo, 44100))


def test_an_unreadable_sidecar_is_a_dataset_error(tmp_path):
    bad = tmp_path / "clip.wav"
    bad.write_bytes(b"RIFF\x00\x00not a wave file" * 8)
    with pytest.raises(DatasetError, match=r"clip\.wav: cannot use this audio file .*--no-audio"):
        prepare.read_sidecar_audio(bad)
