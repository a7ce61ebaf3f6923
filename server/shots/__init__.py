"""Faces in shots: rendered crops put back into their source photo or filmed plate.

* :mod:`server.shots.compositing` -- placement (the inverse of the FFHQ alignment), the soft head mask,
  composite and matte;
* :mod:`server.shots.dub` -- dubbing a filmed shot: the plate's own identity and head track, lips from new audio,
  every frame pasted back at the plate's size.
"""
