"""HFGI high-fidelity inversion: ResidualAligner, ResidualEncoder and the official inversion procedure.

State-dict keys equal ``hfgi.pth['aligner']`` / ``hfgi.pth['encoder']`` of the official StyleHEAT release.

The procedure (official ``HFGI.encode`` / ``HFGI.decode`` / ``HFGI.inverse``; reference README quirk 7),
all resizes bilinear with align_corners=False and no antialias (quirk 17):

* :func:`encode`: ``x = resize(image, 256)``; ``wx = e4e(x) + latent_avg``;
  ``ix_256 = resize(clamp(G(wx), -1, 1), 256)`` (clamp *before* the resize); ``res = x - ix_256``.
  Returns ``Encoded(wx, ix_256, res)``.
* :func:`decode`: ``cond = ResidualEncoder(ResidualAligner(cat(res, ix_256)))`` (res first) = [scale, shift]
  at 64x64; ``image, fx = G(wx, inversion_condition=cond)``; ``ix = resize(clamp(image), output_size)``.
  Returns ``Inversion(wx, fx, ix_256, inversion_condition)`` -- the official tuple is
  ``(ix, wx, fx, inversion_condition)``; here the fields are named.
* :func:`inverse` = decode(encode(image)) (official ``HFGI.inverse``, ``output_size`` 256).

All networks run in eval mode (BatchNorm with running statistics). Call under ``torch.no_grad()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.e4e import BottleneckIR, Encoder4Editing, ir_stem
from models.ops import FromStateDict, sft_head
from models.stylegan2 import Generator

IMAGE_SIZE = 256
CONDITION_SIZE = 64


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize to size x size, align_corners=False, no antialias (torch 1.7 semantics)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class HFGIConfig:
    """ResidualAligner / ResidualEncoder widths. Defaults = official.

    aligner_channels (c1, c2, c3, c4): encoder stages at 256, 128, 64, 32; the decoder mirrors them.
    encoder_channels (e1, e2, e3): stages at 256, 128, 64; condition_channels = StyleGAN fx channels.
    """

    aligner_channels: tuple[int, int, int, int] = (16, 32, 48, 64)
    encoder_channels: tuple[int, int, int] = (32, 48, 64)
    condition_channels: int = 512
    image_size: int = IMAGE_SIZE

    @classmethod
    def tiny(cls) -> "HFGIConfig":
        """256^2 input still, narrow layers, 32 condition channels (= tiny StyleGAN fx channels)."""
        return cls(aligner_channels=(4, 8, 8, 8), encoder_channels=(4, 8, 8), condition_channels=32)


def _units(*specs: tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(*[BottleneckIR(i, o, s) for i, o, s in specs])


class ResidualAligner(FromStateDict, nn.Module):
    """HFGI ADA: cat(res, ix) (B, 6, 256, 256) -> aligned residual (B, 3, 256, 256).

    U-Net of IR units: encoder 256 -> 128 -> 64 -> 32; decoder upsamples bilinearly (align_corners=False)
    to 64, 128, 256, concatenating the encoder feature of that size after the upsampled one.
    """

    def __init__(self, config: HFGIConfig | None = None):
        super().__init__()
        cfg = config or HFGIConfig()
        self.config = cfg
        c1, c2, c3, c4 = cfg.aligner_channels
        self.conv_layer1 = ir_stem(6, c1)
        self.conv_layer2 = _units((c1, c2, 2), (c2, c2, 1), (c2, c2, 1))
        self.conv_layer3 = _units((c2, c3, 2), (c3, c3, 1), (c3, c3, 1))
        self.conv_layer4 = _units((c3, c4, 2), (c4, c4, 1), (c4, c4, 1))
        self.dconv_layer1 = _units((c4 + c3, c4, 1), (c4, c2, 1), (c2, c2, 1))
        self.dconv_layer2 = _units((c2 + c2, c2, 1), (c2, c1, 1), (c1, c1, 1))
        self.dconv_layer3 = _units((c1 + c1, c1, 1), (c1, 3, 1), (3, 3, 1))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 6:
            raise ValueError(f"ResidualAligner expects cat(res, ix) of shape (B, 6, H, W), got {tuple(x.shape)}")
        feat1 = self.conv_layer1(x)
        feat2 = self.conv_layer2(feat1)
        feat3 = self.conv_layer3(feat2)
        feat4 = self.conv_layer4(feat3)
        d = resize(feat4, feat3.shape[-1])
        d = resize(self.dconv_layer1(torch.cat((d, feat3), 1)), feat2.shape[-1])
        d = resize(self.dconv_layer2(torch.cat((d, feat2), 1)), feat1.shape[-1])
        return self.dconv_layer3(torch.cat((d, feat1), 1))


class ResidualEncoder(FromStateDict, nn.Module):
    """HFGI consultation encoder: aligned residual (B, 3, 256, 256) -> [scale, shift], each (B, C, 64, 64).

    Each head: EqualConv2d 3x3 -> ScaledLeakyReLU(0.2) -> EqualConv2d 3x3, then a bilinear resize to 64x64
    (an exact copy for 256^2 input).
    """

    def __init__(self, config: HFGIConfig | None = None):
        super().__init__()
        cfg = config or HFGIConfig()
        self.config = cfg
        e1, e2, e3 = cfg.encoder_channels
        c = cfg.condition_channels
        self.conv_layer1 = ir_stem(3, e1)
        self.conv_layer2 = _units((e1, e2, 2), (e2, e2, 1), (e2, e2, 1))
        self.conv_layer3 = _units((e2, e3, 2), (e3, e3, 1), (e3, e3, 1))
        self.condition_scale3 = sft_head(e3, c, c)
        self.condition_shift3 = sft_head(e3, c, c)
        self.eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ResidualEncoder expects an aligned residual (B, 3, H, W), got {tuple(x.shape)}")
        feat = self.conv_layer3(self.conv_layer2(self.conv_layer1(x)))
        scale = resize(self.condition_scale3(feat), CONDITION_SIZE)
        shift = resize(self.condition_shift3(feat), CONDITION_SIZE)
        return [scale, shift]


class Encoded(NamedTuple):
    """Output of :func:`encode` (official ``HFGI.encode``)."""

    wx: torch.Tensor        # (B, n_latent, style_dim) e4e W+ code incl. latent_avg
    ix_256: torch.Tensor    # (B, 3, 256, 256) clamped e4e reconstruction
    res: torch.Tensor       # (B, 3, 256, 256) input minus ix_256 (detached)


class Inversion(NamedTuple):
    """Output of :func:`decode` / :func:`inverse` (official ``HFGI.decode`` returns (ix, wx, fx, cond))."""

    wx: torch.Tensor                          # (B, n_latent, style_dim)
    fx: torch.Tensor                          # (B, C, 64, 64) feature after the inversion condition
    ix_256: torch.Tensor                      # (B, 3, S, S) clamped HFGI reconstruction, S = output_size
    inversion_condition: list[torch.Tensor]   # [scale, shift], each (B, C, 64, 64)


def reconstruct(generator: Generator, wx: torch.Tensor) -> torch.Tensor:
    """Plain StyleGAN image of the code, clamped then resized: ``resize(clamp(G(wx), -1, 1), 256)``."""
    rendered, _ = generator(wx)
    return resize(rendered.clamp(-1.0, 1.0), IMAGE_SIZE)


def inversion_condition(aligner: ResidualAligner, residual_encoder: ResidualEncoder, ix_256: torch.Tensor,
                        res: torch.Tensor) -> list[torch.Tensor]:
    """[scale, shift] (B, C, 64, 64) of the residual: ``ResidualEncoder(ResidualAligner(cat(res, ix_256)))``."""
    return residual_encoder(aligner(torch.cat((res, ix_256), 1)))


def encode(e4e: Encoder4Editing, generator: Generator, image: torch.Tensor,
           latent_avg: torch.Tensor | None) -> Encoded:
    """Official ``HFGI.encode``: image (B, 3, H, W) in [-1, 1] -> Encoded(wx, ix_256, res)."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must have shape (B, 3, H, W) with values in [-1, 1], got {tuple(image.shape)}")
    x = resize(image, IMAGE_SIZE)
    wx = e4e(x, latent_avg)
    ix = reconstruct(generator, wx)
    return Encoded(wx, ix, (x - ix).detach())


def decode(aligner: ResidualAligner, residual_encoder: ResidualEncoder, generator: Generator,
           wx: torch.Tensor, ix_256: torch.Tensor, res: torch.Tensor, output_size: int = IMAGE_SIZE) -> Inversion:
    """Official ``HFGI.decode``: residual -> inversion condition -> conditioned StyleGAN pass."""
    condition = inversion_condition(aligner, residual_encoder, ix_256, res)
    rendered, fx = generator(wx, inversion_condition=condition)
    ix = resize(rendered.clamp(-1.0, 1.0), output_size)
    return Inversion(wx, fx, ix, condition)


def inverse(e4e: Encoder4Editing, aligner: ResidualAligner, residual_encoder: ResidualEncoder,
            generator: Generator, image: torch.Tensor, latent_avg: torch.Tensor | None) -> Inversion:
    """Official ``HFGI.inverse`` = decode(encode(image)); output size 256."""
    wx, ix, res = encode(e4e, generator, image, latent_avg)
    return decode(aligner, residual_encoder, generator, wx, ix, res)
