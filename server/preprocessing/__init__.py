"""Turning inputs into what the engine consumes: FFHQ face alignment (align), Deep3D 3DMM coefficients
(deep3d), video tracking (tracking), audio features and Audio2Exp (audio), and the motion file format
(motion; docs/motion-format.md)."""
