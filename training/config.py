"""One config per training stage; defaults are the paper's / official implementation's values.

Stages (``stage`` field):

* ``video_warper``  -- 1a: VideoWarper pre-training, Eq. 5 (VoxCeleb-style data, 256^2);
* ``audio_warper``  -- 1b: AudioWarper pre-training on proxy pairs of the trained VideoWarper, Eqs. 6-8;
* ``calibration``   -- 2: CalibrationNet + one motion generator (``motion``: ``video`` or ``audio``),
  StyleGAN2 and the inversion encoders frozen, Eqs. 11-13 (HDTF-style data, 512^2).

Files are JSON (configs/*.json); unknown keys are refused with a message naming them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("video_warper", "audio_warper", "calibration")


class ConfigError(ValueError):
    """A bad training config; the message names the field and what is allowed."""


@dataclass
class TrainConfig:
    stage: str = "video_warper"
    data: str = ""                       # dataset folder (styleheat prepare-data)
    out: str = "runs/train"              # checkpoints/, export/, samples/, logs/ go here
    model: str = "full"                  # "full" (official sizes) or "tiny" (tests / smoke runs)
    # starting weights: an official checkpoints folder or a .safetensors bundle (stages 1b and 2 need the
    # VideoWarper / StyleGAN2 / inversion weights); warm_start files (net_G_ema dicts, e.g. a previous
    # stage's export/StyleHEAT_visual.pt) then override the parts they contain
    init: str = ""
    warm_start: list[str] = field(default_factory=list)
    motion: str = "video"                # stage 2: which motion generator is fine-tuned with the calibrator
    # optimisation (paper: Adam, lr 1e-4 and 2e-5, batch 20; official betas (0.5, 0.999), step decay)
    steps: int = 200000
    batch_size: int = 20                 # global batch, split evenly over the processes
    lr: float = 1e-4                     # networks trained from scratch (warper in stage 1, calibrator in 2)
    lr_finetune: float = 2e-5            # the pre-trained motion generator in stage 2
    adam_betas: tuple[float, float] = (0.5, 0.999)
    lr_step: int = 300000
    lr_gamma: float = 0.2
    ema_decay: float = 0.5 ** (32 / (10 * 1000))   # official accumulate() factor
    grad_clip: float = 0.0               # 0 = off
    amp: str = "auto"                    # auto (fp16 on CUDA, off on CPU) | off | fp16 | bf16
    # loss weights (paper)
    weight_perceptual: float = 1.0
    lambda_l1: float = 10.0              # Eqs. 6 and 12
    lambda_r: float = 0.1                # Eq. 7 non-mouth regularisation
    lambda_s: float = 1.0                # Eq. 8 lip sync
    lambda_d: float = 0.01               # Eq. 11 domain loss
    lambda_adv: float = 0.1              # Eq. 13 adversarial loss
    # soft masks: weight of the pixels outside the mouth (1b) / eye+mouth boxes (2), as [step, floor] steps
    mask_floor: list[list[float]] = field(default_factory=lambda: [[0, 0.2], [500, 0.05], [2000, 0.005]])
    mask_margin: float = 0.25
    zero_upper_flow: bool = True         # 1b / 2-audio: zero the audio flow's top rows as inference does
    perceptual_layers: list[str] = field(default_factory=lambda: ["relu_1_1", "relu_2_1", "relu_3_1",
                                                                   "relu_4_1", "relu_5_1"])
    perceptual_scales: int = 4
    # helper networks (official layouts, weights_only); *_width > 1 shrinks them for tests (random weights)
    vgg19: str = ""
    syncnet: str = ""
    discriminator: str = ""
    discriminator_size: int = 256
    helper_width: int = 1
    random_helpers: bool = False         # tests only: random VGG/SyncNet/D instead of files
    # data / bookkeeping
    samples_per_epoch: int = 100000
    num_workers: int = 2
    seed: int = 0
    log_every: int = 50
    sample_every: int = 1000
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3

    def validate(self) -> "TrainConfig":
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.model not in ("full", "tiny"):
            raise ConfigError(f"model must be 'full' or 'tiny', got {self.model!r}")
        if self.motion not in ("video", "audio"):
            raise ConfigError(f"motion must be 'video' or 'audio', got {self.motion!r}")
        if self.amp not in ("auto", "off", "fp16", "bf16"):
            raise ConfigError(f"amp must be auto, off, fp16 or bf16, got {self.amp!r}")
        for name in ("steps", "batch_size", "samples_per_epoch", "log_every", "sample_every", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.lr <= 0 or self.lr_finetune <= 0:
            raise ConfigError("learning rates must be > 0")
        from training.losses import VGG19_LAYERS

        unknown = [name for name in self.perceptual_layers if name not in VGG19_LAYERS]
        if not self.perceptual_layers or unknown:
            raise ConfigError(f"perceptual_layers must be a non-empty list of {sorted(VGG19_LAYERS)}, "
                              f"got {self.perceptual_layers!r}")
        if int(self.num_workers) < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers!r}")
        d = int(self.discriminator_size)
        if d < 4 or d > 1024 or d & (d - 1):
            raise ConfigError(f"discriminator_size must be a power of two from 4 to 1024, got {self.discriminator_size!r}")
        if int(self.perceptual_scales) < 1:
            raise ConfigError(f"perceptual_scales must be >= 1, got {self.perceptual_scales!r}")
        if not self.mask_floor or any(not isinstance(e, (list, tuple)) or len(e) != 2 for e in self.mask_floor):
            raise ConfigError(f"mask_floor must be a non-empty list of [step, value] pairs, got {self.mask_floor!r}")
        if not self.data:
            raise ConfigError("no dataset: set 'data' in the config or pass --data DIR")
        if self.stage != "video_warper" and not self.init and self.model == "full":
            raise ConfigError(f"stage {self.stage!r} needs pre-trained weights: set 'init' to an official "
                              "checkpoints folder or a .safetensors bundle (and warm_start to the stage-1a export)")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        return self

    @property
    def uses_audio(self) -> bool:
        """Whether the AudioWarper is in the run (stage 1b, or stage 2 with motion 'audio')."""
        return self.stage == "audio_warper" or (self.stage == "calibration" and self.motion == "audio")

    def floor_at(self, step: int) -> float:
        value = float(self.mask_floor[0][1])
        for s, v in self.mask_floor:
            if step >= s:
                value = float(v)
        return value

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"comment"})
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides: Any) -> "TrainConfig":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found (the stage configs are in configs/)")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON: {e}") from None
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)


def defaults_for(stage: str) -> dict[str, Any]:
    """The defaults of one stage: the values of configs/<stage>.json except ``out`` (here runs/train) and,
    for calibration, ``init`` (here empty; the file names the checkpoints folder)."""
    base = TrainConfig(stage=stage)
    if stage == "video_warper":
        base.mask_floor = [[0, 1.0]]
    elif stage == "audio_warper":
        base.mask_floor = [[0, 0.1]]
    return base.to_dict()
