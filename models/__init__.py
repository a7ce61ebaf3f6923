"""StyleHEAT networks in pure PyTorch, and the pure signal/index math below them (no file I/O, no CLI).

One module per paper component; configs are dataclasses with a ``tiny()`` for tests.
``audio_features`` (the official mel spectrogram, audio input conversion) and ``windows`` (which
audio and 3DMM rows each frame sees) are numpy code shared by ``server`` and ``training``; nothing
here imports either of them (tests/test_layering.py).
"""
