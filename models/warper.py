"""Motion networks of StyleHEAT: VideoWarper (3DMM-driven) and AudioWarper (mel-driven).

Both are PIRenderer-style warpers. A 1-D temporal *mapping network* turns a window of driving
signals into a descriptor (B, D, 1); an AdaIN-conditioned hourglass (*warping network*) looks at
the 256x256 source image and predicts a flow field on a 64x64 grid, in pixels of that grid
(channel 0 = x, channel 1 = y, see :mod:`models.flow`).

Data flow at full size (``WarperConfig()``)::

    coeffs (B, 73, 27)  --MappingNet-->  descriptor (B, 256, 1)
        Conv1d k7 (27 -> 21 frames), 3 x [LeakyReLU(0.1), Conv1d k3 dilation 3, + input[3:-3]]
        (21 -> 15 -> 9 -> 3), mean over the remaining frames.
    image_256 (B, 3, 256, 256) --hourglass(descriptor)--> (B, 256, 64, 64)
        7x7 conv to 32 ch; 5 AdaIN encoder blocks 256 -> 128 -> 64 -> 32 -> 16 -> 8
        (64, 128, 256, 256, 256 ch); 3 AdaIN decoder blocks 8 -> 16 -> 32 -> 64, each followed by
        concatenation with the encoder feature of the same resolution.
    --> LayerNorm over (C, H, W), LeakyReLU(0.1), 7x7 conv -> flow_field (B, 2, 64, 64)
    warp_image = models.flow.warp(image_256, flow_to_deformation(flow_field))   (grid resized 64->256)

The AudioWarper is the same with an 80-bin x 32-step mel window instead of the 3DMM window.

State-dict keys are the official ones with the ``video_warper.`` / ``audio_warper.`` prefix
removed (``mapping_net.*`` + ``warping_net.*``; audio: ``audio_encoder.*`` + ``warpping_net.*``,
the double p is the official spelling).

The official inference zeroes the top 32 rows of the *audio* flow in place after the AudioWarper
ran (reference README quirk 15). That is not part of the network: :func:`zero_upper_flow_` does
it and the engine calls it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import flow as flow_util
from models.ops import shape_or_type

__all__ = [
    "WarperConfig",
    "MappingNet",
    "AdaIN",
    "LayerNorm2d",
    "WarpingNet",
    "VideoWarper",
    "AudioWarper",
    "zero_upper_flow_",
    "AUDIO_FLOW_ZERO_ROWS",
]

#: number of rows (from the top of the 64x64 grid) the official inference zeroes in the audio flow
AUDIO_FLOW_ZERO_ROWS = 32


@dataclass(frozen=True)
class WarperConfig:
    """Sizes of the Video/Audio warpers. Defaults = the official networks."""

    coeff_dim: int = 73          # 3DMM coefficients per frame (exp 64 | angle 3 | trans 3 | crop 3)
    coeff_window: int = 27       # frames per driving window [i-13, i+13]
    mel_bins: int = 80           # mel channels of the audio window
    mel_window: int = 32         # mel steps per audio window
    descriptor_dim: int = 256
    mapping_layers: int = 3
    image_channels: int = 3
    image_size: int = 256
    base_channels: int = 32
    max_channels: int = 256
    encoder_layers: int = 5
    decoder_layers: int = 3
    adain_hidden: int = 128
    slope: float = 0.1           # LeakyReLU slope everywhere in the warpers

    @classmethod
    def tiny(cls) -> "WarperConfig":
        """Small channels for tests; the 256 input and the 64x64 flow grid are kept."""
        return cls(descriptor_dim=32, base_channels=4, max_channels=16, adain_hidden=16)

    @property
    def flow_size(self) -> int:
        """Side of the predicted flow grid (64 at full size)."""
        return self.image_size // 2 ** (self.encoder_layers - self.decoder_layers)

    def level_channels(self, level: int) -> int:
        """Channels of the hourglass encoder output at ``level`` (0 = input layer)."""
        return min(self.base_channels * 2 ** level, self.max_channels)


class MappingNet(nn.Module):
    """Temporal encoder of a driving window: (B, in_dim, T) -> descriptor (B, D, 1).

    Each dilated layer shortens the window by 6 frames; its residual is the centre crop of its
    input. The remaining frames are averaged. Keys: ``first.0.*``, ``encoder{i}.1.*``.
    """

    def __init__(self, in_dim: int, descriptor_dim: int, layers: int, slope: float = 0.1):
        super().__init__()
        self.layers = layers
        self.first = nn.Sequential(nn.Conv1d(in_dim, descriptor_dim, kernel_size=7))
        for i in range(layers):
            self.add_module(f"encoder{i}", nn.Sequential(
                nn.LeakyReLU(slope), nn.Conv1d(descriptor_dim, descriptor_dim, kernel_size=3, dilation=3)))

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        out = self.first(window)
        for i in range(self.layers):
            out = getattr(self, f"encoder{i}")(out) + out[:, :, 3:-3]
        return out.mean(dim=2, keepdim=True)


class AdaIN(nn.Module):
    """Instance norm (no affine, eps 1e-5) modulated by a descriptor: ``x_n * (1 + gamma) + beta``.

    gamma and beta come from ``Linear(D, hidden) + ReLU`` followed by two ``Linear(hidden, C)``.
    Keys: ``mlp_shared.0.*``, ``mlp_gamma.*``, ``mlp_beta.*``.
    """

    def __init__(self, channels: int, feature_dim: int, hidden: int = 128):
        super().__init__()
        self.mlp_shared = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU())
        self.mlp_gamma = nn.Linear(hidden, channels)
        self.mlp_beta = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        normalized = F.instance_norm(x, eps=1e-5)
        shared = self.mlp_shared(feature.reshape(feature.shape[0], -1))
        gamma = self.mlp_gamma(shared)[:, :, None, None]
        beta = self.mlp_beta(shared)[:, :, None, None]
        return normalized * (1 + gamma) + beta


class LayerNorm2d(nn.Module):
    """Layer norm over (C, H, W) with a per-channel affine (weight/bias stored as (C, 1, 1))."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[1:]
        return F.layer_norm(x, shape, self.weight.expand(shape), self.bias.expand(shape))


class _EncoderBlock(nn.Module):
    """AdaIN -> act -> 4x4 stride-2 conv, AdaIN -> act -> 3x3 conv (halves the resolution)."""

    def __init__(self, in_ch: int, out_ch: int, feature_dim: int, hidden: int, slope: float):
        super().__init__()
        self.conv_0 = nn.Conv2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1)
        self.conv_1 = nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1)
        self.norm_0 = AdaIN(in_ch, feature_dim, hidden)
        self.norm_1 = AdaIN(out_ch, feature_dim, hidden)
        self.slope = slope

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_0(F.leaky_relu(self.norm_0(x, z), self.slope))
        return self.conv_1(F.leaky_relu(self.norm_1(x, z), self.slope))


class _DecoderBlock(nn.Module):
    """Residual AdaIN up-block (doubles the resolution with 3x3 stride-2 transposed convs)."""

    def __init__(self, in_ch: int, out_ch: int, feature_dim: int, hidden: int, slope: float):
        super().__init__()
        up = dict(kernel_size=3, stride=2, padding=1, output_padding=1)
        self.conv_0 = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.conv_1 = nn.ConvTranspose2d(out_ch, out_ch, **up)
        self.conv_s = nn.ConvTranspose2d(in_ch, out_ch, **up)
        self.norm_0 = AdaIN(in_ch, feature_dim, hidden)
        self.norm_1 = AdaIN(out_ch, feature_dim, hidden)
        self.norm_s = AdaIN(in_ch, feature_dim, hidden)
        self.slope = slope

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(F.leaky_relu(self.norm_s(x, z), self.slope))
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, z), self.slope))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, z), self.slope))
        return shortcut + dx


class _HourglassEncoder(nn.Module):
    def __init__(self, cfg: WarperConfig):
        super().__init__()
        self.layers = cfg.encoder_layers
        self.input_layer = nn.Conv2d(cfg.image_channels, cfg.base_channels, kernel_size=7, padding=3)
        for i in range(cfg.encoder_layers):
            self.add_module(f"encoder{i}", _EncoderBlock(
                cfg.level_channels(i), cfg.level_channels(i + 1), cfg.descriptor_dim, cfg.adain_hidden, cfg.slope))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> list[torch.Tensor]:
        out = self.input_layer(x)
        features = [out]
        for i in range(self.layers):
            out = getattr(self, f"encoder{i}")(out, z)
            features.append(out)
        return features


class _HourglassDecoder(nn.Module):
    def __init__(self, cfg: WarperConfig):
        super().__init__()
        self.levels = list(range(cfg.encoder_layers - cfg.decoder_layers, cfg.encoder_layers))[::-1]
        for i in self.levels:  # registered deepest first, as in the official module
            in_ch = cfg.level_channels(i + 1) * (1 if i == cfg.encoder_layers - 1 else 2)
            self.add_module(f"decoder{i}", _DecoderBlock(
                in_ch, cfg.level_channels(i), cfg.descriptor_dim, cfg.adain_hidden, cfg.slope))
        self.output_channels = 2 * cfg.level_channels(self.levels[-1])

    def forward(self, features: list[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        features = list(features)
        out = features.pop()
        for i in self.levels:
            out = getattr(self, f"decoder{i}")(out, z)
            out = torch.cat([out, features.pop()], dim=1)
        return out


class _Hourglass(nn.Module):
    def __init__(self, cfg: WarperConfig):
        super().__init__()
        self.encoder = _HourglassEncoder(cfg)
        self.decoder = _HourglassDecoder(cfg)
        self.output_channels = self.decoder.output_channels

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x, z), z)


class WarpingNet(nn.Module):
    """AdaIN hourglass + flow head. Keys: ``hourglass.*``, ``flow_out.{0,2}.*``."""

    def __init__(self, cfg: WarperConfig):
        super().__init__()
        self.hourglass = _Hourglass(cfg)
        c = self.hourglass.output_channels
        self.flow_out = nn.Sequential(LayerNorm2d(c), nn.LeakyReLU(cfg.slope),
                                      nn.Conv2d(c, 2, kernel_size=7, padding=3))

    def forward(self, image: torch.Tensor, descriptor: torch.Tensor, *, with_warp_image: bool = True) -> dict:
        flow_field = self.flow_out(self.hourglass(image, descriptor))
        out = {"flow_field": flow_field}
        if with_warp_image:
            out["warp_image"] = flow_util.warp(image, flow_util.flow_to_deformation(flow_field))
        return out


def _check_image(image: torch.Tensor, cfg: WarperConfig, who: str) -> None:
    want = (cfg.image_channels, cfg.image_size, cfg.image_size)
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or tuple(image.shape[1:]) != want:
        raise ValueError(f"{who}: image_256 must have shape (B, {want[0]}, {want[1]}, {want[2]}) "
                         f"(resize the portrait to {cfg.image_size}x{cfg.image_size} first), "
                         f"got {shape_or_type(image)}")


def _check_window(window: torch.Tensor, channels: int, length: int, what: str, who: str,
                  batch: int) -> None:
    if not isinstance(window, torch.Tensor) or window.dim() != 3 or tuple(window.shape[1:]) != (channels, length):
        raise ValueError(f"{who}: {what} must have shape (B, {channels}, {length}) "
                         f"(channels first, then the {length} time steps of the window), got {shape_or_type(window)}")
    if window.shape[0] != batch:
        raise ValueError(f"{who}: batch of {what} ({window.shape[0]}) differs from the image batch ({batch})")


class VideoWarper(nn.Module):
    """3DMM-driven warper.

    forward(image_256 (B, 3, 256, 256), coeffs (B, 73, 27)) -> dict(
        flow_field (B, 2, 64, 64)   pixels of the 64 grid, ch0 = x, ch1 = y,
        descriptor (B, 256, 1),
        warp_image (B, 3, 256, 256) the input warped by the flow (omitted if with_warp_image=False)).
    """

    def __init__(self, cfg: WarperConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or WarperConfig()
        self.mapping_net = MappingNet(cfg.coeff_dim, cfg.descriptor_dim, cfg.mapping_layers, cfg.slope)
        self.warping_net = WarpingNet(cfg)

    def forward(self, image_256: torch.Tensor, coeffs: torch.Tensor, *, with_warp_image: bool = True) -> dict:
        _check_image(image_256, self.cfg, "VideoWarper")
        _check_window(coeffs, self.cfg.coeff_dim, self.cfg.coeff_window, "coeffs", "VideoWarper",
                      image_256.shape[0])
        descriptor = self.mapping_net(coeffs)
        out = self.warping_net(image_256, descriptor, with_warp_image=with_warp_image)
        out["descriptor"] = descriptor
        return out


class AudioWarper(nn.Module):
    """Mel-driven warper (same warping network, driven by an 80 x 32 mel window).

    forward(image_256 (B, 3, 256, 256), mel (B, 80, 32)) -> dict(flow_field (B, 2, 64, 64),
        descriptor (B, 256, 1), warp_image (B, 3, 256, 256)).

    The returned flow is the raw network output. The official inference then zeroes its top 32
    rows in place before turning it into a deformation; call :func:`zero_upper_flow_` for that.
    """

    def __init__(self, cfg: WarperConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or WarperConfig()
        self.audio_encoder = MappingNet(cfg.mel_bins, cfg.descriptor_dim, cfg.mapping_layers, cfg.slope)
        self.warpping_net = WarpingNet(cfg)  # sic: official key spelling

    def forward(self, image_256: torch.Tensor, mel: torch.Tensor, *, with_warp_image: bool = True) -> dict:
        _check_image(image_256, self.cfg, "AudioWarper")
        _check_window(mel, self.cfg.mel_bins, self.cfg.mel_window, "mel", "AudioWarper", image_256.shape[0])
        descriptor = self.audio_encoder(mel)
        out = self.warpping_net(image_256, descriptor, with_warp_image=with_warp_image)
        out["descriptor"] = descriptor
        return out


def zero_upper_flow_(flow_field: torch.Tensor, rows: int = AUDIO_FLOW_ZERO_ROWS) -> torch.Tensor:
    """Zero the top ``rows`` rows (dim 2 = height) of a flow (B, 2, H, W) **in place**; returns it.

    This is the official inference-time trick applied to the AudioWarper flow (reference README
    quirk 15): audio may only move the lower half of the face. Apply it before
    ``flow_to_deformation``. Note that the ``warp_image`` the AudioWarper returned was computed
    from the flow *before* this zeroing, exactly as in the official code.
    """
    if flow_field.dim() != 4 or flow_field.shape[1] != 2:
        raise ValueError(f"zero_upper_flow_: flow must have shape (B, 2, H, W), got {tuple(flow_field.shape)}")
    flow_field[:, :, :rows] = 0
    return flow_field
