"""StyleHEAT networks in pure PyTorch (no file I/O, no CLI).

One module per paper component; configs are dataclasses with a ``tiny()`` for tests.
"""
