"""CalibrationNet of StyleHEAT: repairs the warped 64x64 StyleGAN feature with SFT scale/shift maps.

A U-Net over the warped feature ``fx_warp`` conditioned on the VideoWarper descriptor.
Data flow at full size (``CalibrationConfig()``, official ``CalibrationNet(out_size=64,
input_channel=512, channel_multiplier=2, narrow=1)``: 256 channels everywhere)::

    fx_warp (B, 512, 64, 64) --1x1 conv + fused lrelu--> (B, 256, 64, 64)
    4 x down ResBlock (blurred stride-2 convs): 64 -> 32 -> 16 -> 8 -> 4, skips kept (4, 8, 16, 32)
    final 3x3 conv at 4x4
    z = linear_3dmm(descriptor (B, 256, 1) squeezed)          Linear, LeakyReLU(0.1), Linear
    for each level k (8, 16, 32, 64):
        feat = feat + skip_k                                  (the skip of the resolution feat has)
        feat = ResUpBlock(feat)                               x2 bilinear, align_corners=False
        feat = AdaIN res block(feat, z)                       LeakyReLU slope 0.01 (nn.LeakyReLU())
        scale_k = condition_scale[k](feat), shift_k = condition_shift[k](feat)   (B, 512, r, r)
    -> [scale8, shift8, scale16, shift16, scale32, shift32, scale64, shift64]

Only the 64x64 pair is consumed by the generator (``out * (1 + scale64) + shift64``).

The StyleGAN2-style layers ("equalized": weights stored at unit scale, multiplied by
``1/sqrt(fan_in)`` at run time; blurred stride-2 down ResBlocks) are those of :mod:`models.ops`,
whose key names are the official ones. State-dict keys = official ``calibrator.*`` keys without
the prefix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.ops import SQRT2, ConvLayer, FusedLeakyReLU, ResBlock, sft_head, shape_or_type
from models.warper import AdaIN

__all__ = ["CalibrationConfig", "CalibrationNet"]


@dataclass(frozen=True)
class CalibrationConfig:
    """Sizes of the CalibrationNet. Defaults = the official network."""

    fx_channels: int = 512       # channels of the 64x64 StyleGAN feature (input and SFT output)
    channels: int = 256          # U-Net width at every resolution (512 * narrow * 0.5)
    descriptor_dim: int = 256    # VideoWarper descriptor
    out_size: int = 64           # resolution of fx_warp and of the last SFT pair
    adain_hidden: int = 128
    blur_kernel: tuple[int, ...] = (1, 3, 3, 1)

    @classmethod
    def tiny(cls) -> "CalibrationConfig":
        """fx 32 channels (= tiny StyleGAN2 fx), descriptor 32 (= tiny warper)."""
        return cls(fx_channels=32, channels=16, descriptor_dim=32, adain_hidden=16)

    @property
    def levels(self) -> int:
        """Number of down/up levels: out_size 64 -> 4 (64 -> 4 and back up to 64 from 8)."""
        return int(math.log2(self.out_size)) - 2

    @property
    def output_sizes(self) -> list[int]:
        return [2 ** (3 + k) for k in range(self.levels)]


class _UpConv(nn.Module):
    """x2 bilinear (align_corners=False) then an equalized conv; optional fused activation.

    Keys: ``weight`` and, when activated, ``activation.bias`` (no plain bias in either case used).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, activate: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.scale = 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.padding = kernel // 2
        self.activation = FusedLeakyReLU(out_ch) if activate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = F.conv2d(x, self.weight * self.scale, padding=self.padding)
        return self.activation(x) if self.activation is not None else x


class _UpResBlock(nn.Module):
    """Doubles the resolution; ``(main + skip) / sqrt(2)``."""

    def __init__(self, in_ch: int, out_ch: int, taps):
        super().__init__()
        self.conv1 = ConvLayer(in_ch, in_ch, 3, taps=taps)
        self.conv2 = _UpConv(in_ch, out_ch, 3, activate=True)
        self.skip = _UpConv(in_ch, out_ch, 1, activate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT2


class _AdaINResBlock(nn.Module):
    """``x = act(AdaIN(conv1(x))); return AdaIN(conv2(x)) + x`` (residual on the activated x).

    act = LeakyReLU(0.01) (the official block's default ``nn.LeakyReLU()``).
    """

    def __init__(self, channels: int, feature_dim: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.norm1 = AdaIN(channels, feature_dim, hidden)
        self.norm2 = AdaIN(channels, feature_dim, hidden)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.norm1(self.conv1(x), z), 0.01)
        return self.norm2(self.conv2(x), z) + x


class CalibrationNet(nn.Module):
    """SFT condition generator.

    forward(fx_warp (B, C_fx, 64, 64), descriptor (B, D, 1)) -> list of 8 tensors
        [scale8, shift8, scale16, shift16, scale32, shift32, scale64, shift64], each (B, C_fx, r, r).
    Full size: C_fx = 512, D = 256.
    """

    def __init__(self, cfg: CalibrationConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or CalibrationConfig()
        ch, taps = cfg.channels, cfg.blur_kernel
        self.conv_body_first = ConvLayer(cfg.fx_channels, ch, 1, taps=taps)
        self.conv_body_down = nn.ModuleList(ResBlock(ch, ch, taps) for _ in range(cfg.levels))
        self.final_conv = ConvLayer(ch, ch, 3, taps=taps)
        self.conv_body_up = nn.ModuleList(_UpResBlock(ch, ch, taps) for _ in range(cfg.levels))
        self.linear_3dmm = nn.Sequential(nn.Linear(cfg.descriptor_dim, ch), nn.LeakyReLU(0.1), nn.Linear(ch, ch))
        self.inject_3dmm = nn.ModuleList(_AdaINResBlock(ch, ch, cfg.adain_hidden) for _ in range(cfg.levels))
        self.condition_scale = nn.ModuleList(sft_head(ch, ch, cfg.fx_channels) for _ in range(cfg.levels))
        self.condition_shift = nn.ModuleList(sft_head(ch, ch, cfg.fx_channels) for _ in range(cfg.levels))

    def _check(self, fx_warp: torch.Tensor, descriptor: torch.Tensor) -> None:
        cfg = self.cfg
        want = (cfg.fx_channels, cfg.out_size, cfg.out_size)
        if not isinstance(fx_warp, torch.Tensor) or fx_warp.dim() != 4 or tuple(fx_warp.shape[1:]) != want:
            raise ValueError(f"CalibrationNet: fx_warp must have shape (B, {want[0]}, {want[1]}, {want[2]}) "
                             f"(the warped 64x64 StyleGAN feature), got {shape_or_type(fx_warp)}")
        ok = isinstance(descriptor, torch.Tensor) and (
            tuple(descriptor.shape[1:]) in ((cfg.descriptor_dim, 1), (cfg.descriptor_dim,)))
        if not ok:
            raise ValueError(f"CalibrationNet: descriptor must have shape (B, {cfg.descriptor_dim}, 1) "
                             f"(the VideoWarper descriptor), got {shape_or_type(descriptor)}")
        if descriptor.shape[0] != fx_warp.shape[0]:
            raise ValueError(f"CalibrationNet: descriptor batch ({descriptor.shape[0]}) differs from "
                             f"fx_warp batch ({fx_warp.shape[0]})")

    def forward(self, fx_warp: torch.Tensor, descriptor: torch.Tensor, *,
                last_only: bool = False) -> list[torch.Tensor | None]:
        """The 8 SFT maps; ``last_only=True`` skips the 8/16/32 heads (returned as None).

        The generator consumes only the 64x64 pair (reference quirk 3e), so the inference path asks for
        ``last_only`` and saves those heads' work; the 64x64 pair is computed exactly as before.
        """
        self._check(fx_warp, descriptor)
        feat = self.conv_body_first(fx_warp)
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.insert(0, feat)  # deepest (4x4) first
        feat = self.final_conv(feat)
        z = self.linear_3dmm(descriptor.reshape(descriptor.shape[0], -1))
        conditions: list[torch.Tensor] = []
        for k in range(self.cfg.levels):
            feat = self.conv_body_up[k](feat + skips[k])
            feat = self.inject_3dmm[k](feat, z)
            if last_only and k < self.cfg.levels - 1:
                conditions.extend((None, None))
                continue
            conditions.append(self.condition_scale[k](feat))
            conditions.append(self.condition_shift[k](feat))
        return conditions
