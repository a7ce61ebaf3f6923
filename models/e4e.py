"""e4e encoder (Encoder4Editing, IR-SE-50 backbone with a feature pyramid), inference stage only.

State-dict keys equal ``Encoder_e4e.pth['encoder']`` of the official StyleHEAT release
(``Encoder4Editing(50, 'ir_se', 1024)``). ``latent_avg`` (``Encoder_e4e.pth['latent_avg']``, (18, 512)
or (512,)) is *not* a module key: pass it to :meth:`Encoder4Editing.forward`.

Inference semantics (reference README, quirks 16 and 18): BatchNorm uses running statistics (the
module is built in eval mode; keep it there), progressive stage = Inference (all 18 deltas):

* the backbone outputs c1 (end of the 128-channel stage, 64x64), c2 (256-channel stage, 32x32) and
  c3 (512-channel stage, 16x16) -- official body indices 6, 20 and 23;
* ``w[:, 0] = styles[0](c3)`` and ``w[:, i] = w[:, 0] + styles[i](f_i)`` for i >= 1 with f_i = c3 for
  i < 3, p2 = up(c3) + latlayer1(c2) for 3 <= i < 7 and p1 = up(p2) + latlayer2(c1) for i >= 7
  (``up`` = bilinear, align_corners=False, to the lateral map's size);
* GradualStyleBlock = log2(spatial) x [3x3 stride-2 conv, LeakyReLU(0.01)] then EqualLinear;
* the returned W+ code is ``codes + latent_avg``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.ops import EqualLinear, FromStateDict

COARSE_END = 3   # styles[0:3] read c3
MIDDLE_END = 7   # styles[3:7] read p2, styles[7:] read p1


@dataclass(frozen=True)
class E4EConfig:
    """Encoder4Editing hyper-parameters. Defaults = official (IR-SE-50, 1024 StyleGAN, 256^2 input).

    ``stages``: (in_channels, depth, units) per backbone stage; every stage starts with a stride-2 unit.
    The last three stages give c1, c2, c3.
    """

    stem_channels: int = 64
    stages: tuple[tuple[int, int, int], ...] = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))
    style_dim: int = 512
    n_latent: int = 18
    se: bool = True            # 'ir_se' (True) or 'ir' units
    se_reduction: int = 16
    input_size: int = 256

    def __post_init__(self):
        if len(self.stages) != 4:
            raise ValueError("E4EConfig.stages must list exactly 4 backbone stages")
        if self.input_size % 16 or self.input_size < 64:
            raise ValueError(f"E4EConfig.input_size must be a multiple of 16 >= 64, got {self.input_size}")
        if self.n_latent <= MIDDLE_END:
            raise ValueError(f"E4EConfig.n_latent must be > {MIDDLE_END}, got {self.n_latent}")

    @classmethod
    def tiny(cls) -> "E4EConfig":
        """256^2 input, one unit per stage, narrow channels, style_dim 64, n_latent 12."""
        return cls(stem_channels=8, stages=((8, 8, 1), (8, 16, 1), (16, 16, 1), (16, 32, 1)), style_dim=64,
                   n_latent=12, se=True, se_reduction=4)

    @property
    def c_indices(self) -> tuple[int, int, int]:
        """Body indices of the c1, c2, c3 taps (6, 20, 23 for IR-50)."""
        ends, total = [], 0
        for _, _, units in self.stages:
            total += units
            ends.append(total - 1)
        return ends[1], ends[2], ends[3]


class SEModule(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(fc2(relu(fc1(avgpool(x))))). Keys fc1.weight, fc2.weight."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


def ir_stem(in_channels: int, out_channels: int) -> nn.Sequential:
    """IR-network input layer: conv3x3 (no bias) -> BN -> PReLU. Keys 0.weight, 1.*, 2.weight."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.PReLU(out_channels))


class BottleneckIR(nn.Module):
    """ArcFace IR unit: BN -> conv3x3 -> PReLU -> conv3x3/stride -> BN [-> SE], plus a shortcut.

    Shortcut: subsampling (MaxPool2d(1, stride)) if in == depth, else conv1x1/stride + BN.
    (B, in, H, W) -> (B, depth, H/stride, W/stride). Keys: shortcut_layer.*, res_layer.{0..5}.*
    """

    def __init__(self, in_channels: int, depth: int, stride: int, se_reduction: int | None = None):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channels, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        layers = [nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
                  nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth)]
        if se_reduction is not None:
            layers.append(SEModule(depth, se_reduction))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class GradualStyleBlock(nn.Module):
    """(B, in_c, s, s) -> (B, out_c): log2(s) stride-2 3x3 convs with LeakyReLU(0.01), then EqualLinear."""

    def __init__(self, in_c: int, out_c: int, spatial: int):
        super().__init__()
        self.out_c = out_c
        layers: list[nn.Module] = []
        for k in range(int(math.log2(spatial))):
            layers += [nn.Conv2d(in_c if k == 0 else out_c, out_c, 3, stride=2, padding=1), nn.LeakyReLU(0.01)]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_c, out_c, lr_mul=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).reshape(-1, self.out_c))


def upsample_add(x: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of ``x`` to ``lateral``'s size, plus ``lateral``."""
    return F.interpolate(x, size=lateral.shape[-2:], mode="bilinear", align_corners=False) + lateral


class Encoder4Editing(FromStateDict, nn.Module):
    """e4e encoder: image (B, 3, 256, 256) in [-1, 1] -> W+ (B, n_latent, style_dim).

    forward(image, latent_avg=None): with ``latent_avg`` ((n_latent, style_dim) or (style_dim,)) the
    result is the official ``E4eEncoder`` output ``codes + latent_avg``; without it, the raw codes.
    """

    def __init__(self, config: E4EConfig | None = None):
        super().__init__()
        cfg = config or E4EConfig()
        self.config = cfg
        self.input_layer = ir_stem(3, cfg.stem_channels)
        se = cfg.se_reduction if cfg.se else None
        units = []
        for in_ch, depth, n in cfg.stages:
            units.append(BottleneckIR(in_ch, depth, 2, se))
            units += [BottleneckIR(depth, depth, 1, se) for _ in range(n - 1)]
        self.body = nn.Sequential(*units)
        c1_ch, c2_ch, c3_ch = (s[1] for s in cfg.stages[1:])
        s3 = cfg.input_size // 16   # c3 spatial size; p2 is twice that, p1 four times
        self.styles = nn.ModuleList(
            GradualStyleBlock(c3_ch, cfg.style_dim, s3 if i < COARSE_END else 2 * s3 if i < MIDDLE_END else 4 * s3)
            for i in range(cfg.n_latent))
        self.latlayer1 = nn.Conv2d(c2_ch, c3_ch, 1)
        self.latlayer2 = nn.Conv2d(c1_ch, c3_ch, 1)
        self.eval()  # inference only: BatchNorm must use its running statistics

    def forward(self, image: torch.Tensor, latent_avg: torch.Tensor | None = None) -> torch.Tensor:
        size = self.config.input_size
        if image.ndim != 4 or image.shape[1:] != (3, size, size):
            raise ValueError(f"e4e expects images of shape (B, 3, {size}, {size}) in [-1, 1], "
                             f"got {tuple(image.shape)}; resize first (HFGI encode does)")
        i1, i2, i3 = self.config.c_indices
        x = self.input_layer(image)
        for idx, unit in enumerate(self.body):
            x = unit(x)
            if idx == i1:
                c1 = x
            elif idx == i2:
                c2 = x
            elif idx == i3:
                c3 = x
        w0 = self.styles[0](c3)
        codes = [w0]
        features = c3
        for i in range(1, self.config.n_latent):
            if i == COARSE_END:
                p2 = upsample_add(c3, self.latlayer1(c2))
                features = p2
            elif i == MIDDLE_END:
                features = upsample_add(p2, self.latlayer2(c1))
            codes.append(w0 + self.styles[i](features))
        w = torch.stack(codes, dim=1)
        if latent_avg is not None:
            if latent_avg.shape[-1] != self.config.style_dim or latent_avg.ndim > 2:
                raise ValueError(f"latent_avg must have shape ({self.config.n_latent}, {self.config.style_dim}) "
                                 f"or ({self.config.style_dim},), got {tuple(latent_avg.shape)}")
            w = w + latent_avg.to(w.dtype)
        return w
