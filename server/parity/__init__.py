"""Parity with the official implementation: the seeded-weight rule and tolerances (reference) and the
recomputation of the reference vectors (styleheat, verify_audio, verify_deep3d) that
``styleheat verify-reference`` and the tests run. Production code never imports this package."""
