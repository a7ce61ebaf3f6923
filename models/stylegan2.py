"""StyleGAN2 generator with StyleHEAT's feature-space (F-space) hooks at the 64x64 block.

State-dict keys equal the official ``checkpoints/StyleGAN_e4e.pth`` (a flat state dict of
``Generator(1024, 512, 8, channel_multiplier=2)``), including the unused mapping MLP ``style.*`` and the
unused ``noises.*`` buffers, in the official order.

Inference semantics reproduced from the official code (reference README, quirks 1-5):

* noise injection is a no-op; the input is a W+ code used directly (no mapping network);
* latent index ``i`` of the upsampling conv of each block is 1, 3, 5, 7, ... for the 8, 16, 32, 64, ...
  blocks; right after the 64x64 upsampling conv (``convs[6]``, ``wplus[:, 7]``) and before ``convs[7]``
  (``wplus[:, 8]``) and ``to_rgbs[3]`` (``wplus[:, 9]``), in this order:
  a. ``out = out * (1 + inversion_condition[0]) + inversion_condition[1]`` (if given),
  b. ``fx = out`` (returned),
  c. ``out = f_condition`` (if given),
  d. ``out = warp(out, d)`` for each deformation ``d`` in ``warping_condition``,
  e. ``out = out * (1 + rc[i - 1]) + rc[i]`` for every block ``i >= 7`` with ``i < len(rc)`` (for the
     8-entry CalibrationNet list only the 64x64 pair ``rc[6], rc[7]`` is used);
* the RGB skip accumulated below 64x64 is neither warped nor refined.

The engine computes the part below 64x64 once per identity with :meth:`Generator.synthesize_to_64`
and renders frames with :meth:`Generator.synthesize_from_64`; ``forward`` is exactly their composition
with the hooks in between.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models import flow
from models.ops import ConstantInput, EqualLinear, FromStateDict, PixelNorm, StyledConv, ToRGB

F_RES = 64          # resolution of the StyleHEAT feature space
F_INDEX = 7         # latent index of the 64x64 upsampling conv (official warping/refining index)


@dataclass(frozen=True)
class StyleGAN2Config:
    """Generator hyper-parameters. Defaults = official full size (config-f, 1024^2)."""

    size: int = 1024
    style_dim: int = 512
    n_mlp: int = 8
    channel_multiplier: int = 2
    lr_mlp: float = 0.01
    uniform_channels: int | None = None  # tests: the same channel count at every resolution

    def __post_init__(self):
        log = math.log2(self.size) if self.size > 0 else -1
        if log != int(log) or self.size < 2 * F_RES:
            raise ValueError(f"StyleGAN2Config.size must be a power of two >= {2 * F_RES}, got {self.size}")

    @classmethod
    def tiny(cls) -> "StyleGAN2Config":
        """128^2, style_dim 64, 2-layer mapping, 32 channels everywhere (fx has 32 channels; n_latent 12)."""
        return cls(size=128, style_dim=64, n_mlp=2, channel_multiplier=2, uniform_channels=32)

    @property
    def log_size(self) -> int:
        return int(math.log2(self.size))

    @property
    def n_latent(self) -> int:
        """Number of W+ entries: 18 at 1024^2."""
        return self.log_size * 2 - 2

    @property
    def num_noise_layers(self) -> int:
        return (self.log_size - 2) * 2 + 1

    def channels(self, res: int) -> int:
        """Feature channels at resolution ``res`` (official table for config-f)."""
        if self.uniform_channels is not None:
            return self.uniform_channels
        table = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * self.channel_multiplier,
                 128: 128 * self.channel_multiplier, 256: 64 * self.channel_multiplier,
                 512: 32 * self.channel_multiplier, 1024: 16 * self.channel_multiplier}
        if res not in table:
            raise ValueError(f"no channel count for resolution {res}")
        return table[res]

    @property
    def fx_channels(self) -> int:
        """Channels of the 64x64 feature ``fx`` (512 at full size)."""
        return self.channels(F_RES)


class Generator(FromStateDict, nn.Module):
    """StyleGAN2 synthesis network with StyleHEAT's F-space conditions (see module docstring).

    forward(wplus (B, n_latent, style_dim) or (B, style_dim), *, inversion_condition=None (scale, shift),
            each (B, C, 64, 64); f_condition=None (B, C, 64, 64); warping_condition=() sequence of
            deformations (B, 64, 64, 2); refining_condition=None list of tensors)
        -> (image (B, 3, size, size) not clamped, fx (B, C, 64, 64))
    """

    def __init__(self, config: StyleGAN2Config | None = None):
        super().__init__()
        cfg = config or StyleGAN2Config()
        self.config = cfg
        self.size = cfg.size
        self.style_dim = cfg.style_dim
        self.n_latent = cfg.n_latent
        # registration order = official state_dict order
        self.style = nn.Sequential(PixelNorm(), *[
            EqualLinear(cfg.style_dim, cfg.style_dim, lr_mul=cfg.lr_mlp, activation=True)
            for _ in range(cfg.n_mlp)])
        self.input = ConstantInput(cfg.channels(4))
        self.conv1 = StyledConv(cfg.channels(4), cfg.channels(4), 3, cfg.style_dim)
        self.to_rgb1 = ToRGB(cfg.channels(4), cfg.style_dim, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_ch = cfg.channels(4)
        for log_res in range(3, cfg.log_size + 1):
            out_ch = cfg.channels(2 ** log_res)
            self.convs.append(StyledConv(in_ch, out_ch, 3, cfg.style_dim, upsample=True))
            self.convs.append(StyledConv(out_ch, out_ch, 3, cfg.style_dim))
            self.to_rgbs.append(ToRGB(out_ch, cfg.style_dim))
            in_ch = out_ch
        # official fixed-noise buffers: loaded but never used (noise injection is a no-op)
        self.noises = nn.Module()
        for idx in range(cfg.num_noise_layers):
            res = 2 ** ((idx + 5) // 2)
            self.noises.register_buffer(f"noise_{idx}", torch.zeros(1, 1, res, res))

    # ------------------------------------------------------------------ helpers
    def mapping(self, z: torch.Tensor) -> torch.Tensor:
        """Mapping MLP z (B, style_dim) -> w (B, style_dim). Not used by StyleHEAT inference."""
        return self.style(z)

    def _wplus(self, wplus: torch.Tensor) -> torch.Tensor:
        if not isinstance(wplus, torch.Tensor):
            raise TypeError(f"wplus must be a tensor, got {type(wplus).__name__}")
        if wplus.ndim == 2 and wplus.shape[1] == self.style_dim:
            return wplus.unsqueeze(1).expand(-1, self.n_latent, -1)
        if wplus.ndim != 3 or wplus.shape[1:] != (self.n_latent, self.style_dim):
            raise ValueError(f"wplus must have shape (B, {self.n_latent}, {self.style_dim}) "
                             f"(or (B, {self.style_dim})), got {tuple(wplus.shape)}")
        return wplus

    @staticmethod
    def _shared(latent: torch.Tensor) -> torch.Tensor:
        """A W+ batch that is an expanded view of one code (stride 0) -> that single code (1, L, D).

        Every layer then builds its modulated weights once and runs one plain convolution over the
        batch instead of a grouped one (same values; much cheaper for frames of one identity).
        """
        if latent.shape[0] > 1 and latent.stride(0) == 0:
            return latent[:1]
        return latent

    def _check_feature(self, name: str, t: torch.Tensor, batch: int) -> None:
        want = (self.config.fx_channels, F_RES, F_RES)
        if t.ndim != 4 or tuple(t.shape[1:]) != want or t.shape[0] not in (1, batch):
            raise ValueError(f"{name} must have shape (B={batch}, {want[0]}, {F_RES}, {F_RES}), got {tuple(t.shape)}")

    def _block_index(self, res: int) -> int:
        """Index k of the block at resolution ``res`` (convs[2k], convs[2k+1], to_rgbs[k])."""
        return int(math.log2(res)) - 3

    def _check_out_size(self, out_size: int) -> None:
        ok = out_size >= F_RES and out_size <= self.size and (out_size & (out_size - 1)) == 0
        if not ok:
            raise ValueError(f"out_size must be a power of two in [{F_RES}, {self.size}], got {out_size}")

    # ------------------------------------------------------------------ split halves
    def synthesize_to_64(self, wplus: torch.Tensor,
                         inversion_condition: Sequence[torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the layers up to the 64x64 upsampling conv.

        Returns (fx (B, C, 64, 64) after the inversion condition, skip32 (B, 3, 32, 32) the accumulated
        RGB skip of resolutions 4..32).
        """
        latent = self._wplus(wplus)
        b = latent.shape[0]
        latent = self._shared(latent)
        out = self.conv1(self.input(latent.shape[0]), latent[:, 0])
        skip = self.to_rgb1(out, latent[:, 1])
        k64 = self._block_index(F_RES)
        for k in range(k64):
            i = 2 * k + 1
            out = self.convs[2 * k](out, latent[:, i])
            out = self.convs[2 * k + 1](out, latent[:, i + 1])
            skip = self.to_rgbs[k](out, latent[:, i + 2], skip)
        out = self.convs[2 * k64](out, latent[:, F_INDEX])
        if inversion_condition is not None:
            if len(inversion_condition) != 2:
                raise ValueError("inversion_condition must be a pair (scale, shift) of (B, C, 64, 64) tensors")
            scale, shift = inversion_condition
            self._check_feature("inversion_condition[0] (scale)", scale, b)
            self._check_feature("inversion_condition[1] (shift)", shift, b)
            out = out * (1 + scale) + shift
        if out.shape[0] != b:
            out = out.expand(b, -1, -1, -1)
        if skip.shape[0] != b:
            skip = skip.expand(b, -1, -1, -1)
        return out, skip

    def synthesize_from_64(self, feat64: torch.Tensor, skip32: torch.Tensor, wplus: torch.Tensor,
                           out_size: int | None = None) -> torch.Tensor:
        """Render from the (already warped / refined) 64x64 feature.

        feat64 (B, C, 64, 64), skip32 (B or 1, 3, 32, 32), wplus (B or 1, n_latent, style_dim); a W+
        batch of one code (batch 1, or an ``expand``-ed view) is rendered with shared weights (faster).
        Returns the image (B, 3, out_size, out_size); for out_size < size it stops early and returns
        the accumulated RGB skip at that resolution (what the full network adds its finer layers to).
        """
        return self._from_64(feat64, skip32, self._wplus(wplus), out_size or self.size, refining=None)

    def _from_64(self, out: torch.Tensor, skip: torch.Tensor, latent: torch.Tensor, out_size: int,
                 refining: Sequence[torch.Tensor] | None) -> torch.Tensor:
        self._check_out_size(out_size)
        b = max(out.shape[0], latent.shape[0])
        self._check_feature("feat64", out, b)
        if latent.shape[0] not in (1, b):
            raise ValueError(f"wplus batch {latent.shape[0]} does not match feat64 batch {out.shape[0]}")
        if skip.ndim != 4 or tuple(skip.shape[1:]) != (3, F_RES // 2, F_RES // 2) or skip.shape[0] not in (1, b):
            raise ValueError(f"skip32 must have shape (B={b} or 1, 3, {F_RES // 2}, {F_RES // 2}), "
                             f"got {tuple(skip.shape)}")
        latent = self._shared(latent)
        if latent.shape[0] > 1 and out.shape[0] == 1:
            out = out.expand(latent.shape[0], -1, -1, -1)
        k64 = self._block_index(F_RES)
        for k in range(k64, self._block_index(out_size) + 1):
            i = 2 * k + 1
            if k != k64:  # the 64x64 upsampling conv ran in synthesize_to_64
                out = self.convs[2 * k](out, latent[:, i])
                if refining is not None and F_INDEX <= i < len(refining):
                    out = out * (1 + refining[i - 1]) + refining[i]
            out = self.convs[2 * k + 1](out, latent[:, i + 1])
            skip = self.to_rgbs[k](out, latent[:, i + 2], skip)
        return skip if skip.shape[0] == b else skip.expand(b, -1, -1, -1)

    # ------------------------------------------------------------------ full pass
    def forward(self, wplus: torch.Tensor, *, inversion_condition: Sequence[torch.Tensor] | None = None,
                f_condition: torch.Tensor | None = None,
                warping_condition: Sequence[torch.Tensor] | torch.Tensor | None = (),
                refining_condition: Sequence[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self._wplus(wplus)
        fx, skip = self.synthesize_to_64(latent, inversion_condition)
        out = fx
        if f_condition is not None:
            self._check_feature("f_condition", f_condition, latent.shape[0])
            out = f_condition
        if warping_condition is None:
            warping_condition = ()
        elif isinstance(warping_condition, torch.Tensor):
            warping_condition = (warping_condition,)
        for deformation in warping_condition:
            if deformation.ndim != 4 or deformation.shape[-1] != 2:
                raise ValueError(f"each warping_condition entry must be a deformation (B, H, W, 2), "
                                 f"got {tuple(deformation.shape)}")
            out = flow.warp(out, deformation)
        rc = list(refining_condition) if refining_condition is not None else []
        if F_INDEX < len(rc):
            out = out * (1 + rc[F_INDEX - 1]) + rc[F_INDEX]
        image = self._from_64(out, skip, latent, self.size, refining=rc)
        return image, fx
