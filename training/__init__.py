"""Training of the StyleHEAT motion generators and CalibrationNet (paper Sec. 3.4; issue 9).

* :mod:`training.data`     -- the on-disk dataset format (docs/training.md) and the PyTorch datasets;
* :mod:`training.losses`   -- VGG-19 perceptual loss, masks from landmarks, SyncNet, StyleGAN2 discriminator;
* :mod:`training.config`   -- one dataclass per stage (paper values as defaults), JSON config files;
* :mod:`training.trainer`  -- the loop: stages 1a / 1b / 2, torch.distributed, AMP, checkpoints, logs;
* :mod:`training.prepare`  -- VoxCeleb/HDTF-style video -> dataset clip (crop, 3DMM, audio).

Training works on :class:`models.styleheat.StyleHEAT` (the inference network) and writes checkpoints the
inference engine loads unchanged (official ``StyleHEAT_visual.pt`` layout and our safetensors bundle).
"""
