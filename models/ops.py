"""StyleGAN2 building blocks in plain PyTorch (no compiled extensions; CPU and CUDA run the same code).

Parameter and buffer names follow the official StyleHEAT checkpoints (rosinality-style StyleGAN2
layers), so official state dicts load with ``strict=True``. The numerics follow the official layers
(reference README, quirk 5):

* ``upfirdn2d`` is a true 2-D convolution (kernel flipped) after zero-insertion upsampling and
  padding (negative padding crops), followed by decimation;
* ``fused_leaky_relu(x, b) = leaky_relu(x + b, 0.2) * sqrt(2)``;
* equalized-learning-rate layers scale their weights at run time by ``1 / sqrt(fan_in)``
  (times ``lr_mul`` for ``EqualLinear``, whose bias is also multiplied by ``lr_mul``);
* the modulated convolution demodulates with ``rsqrt(sum(w^2) + 1e-8)``; its upsampling variant is
  a stride-2 transposed convolution followed by a ``[1, 3, 3, 1]`` blur (kernel x 4, pad (1, 1)).

Shapes: B = batch, C = channels, H/W = spatial size; all tensors NCHW float.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Self

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)
DEFAULT_FIR = (1, 3, 3, 1)


def shape_or_type(x: object) -> tuple[int, ...] | str:
    """For error messages: the shape tuple of a tensor, else the name of the type that came instead."""
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


class FromStateDict:
    """Mixin for networks built as ``cls(config)``: :meth:`from_state_dict` builds one from weights."""

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], config=None) -> Self:
        """Build in eval mode directly from an official state dict (strict; tensors are adopted, not copied).

        The module is constructed on the meta device, so no memory is spent on initial weights.
        """
        with torch.device("meta"):
            module = cls(config)
        module.load_state_dict(state_dict, strict=True, assign=True)
        return module.eval()


class StateDictMismatch(NamedTuple):
    """How a state dict differs from a module's: key lists, and (key, got, want) for wrong shapes.

    ``got`` is the shape tuple, or the type name when the value is not a tensor.
    """

    missing: list[str]
    unexpected: list[str]
    misshaped: list[tuple[str, tuple[int, ...] | str, tuple[int, ...]]]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)


def state_dict_mismatch(module: nn.Module, state_dict: Mapping[str, object]) -> StateDictMismatch:
    """Compare ``state_dict`` with ``module.state_dict()`` (keys and shapes); falsy when they agree."""
    expected = module.state_dict()
    misshaped = []
    for k, v in expected.items():
        if k not in state_dict:
            continue
        got = state_dict[k]
        if not isinstance(got, torch.Tensor):
            misshaped.append((k, type(got).__name__, tuple(v.shape)))
        elif tuple(got.shape) != tuple(v.shape):
            misshaped.append((k, tuple(got.shape), tuple(v.shape)))
    return StateDictMismatch(missing=[k for k in expected if k not in state_dict],
                             unexpected=[k for k in state_dict if k not in expected], misshaped=misshaped)


def make_fir_kernel(taps: Sequence[float] = DEFAULT_FIR, gain: float = 1.0) -> torch.Tensor:
    """Separable FIR taps -> normalised 2-D kernel (sum = ``gain``), float32 (k, k)."""
    k = torch.as_tensor(list(taps), dtype=torch.float32)
    if k.ndim != 1:
        raise ValueError(f"FIR taps must be one-dimensional, got shape {tuple(k.shape)}")
    k2 = torch.outer(k, k)
    return k2 / k2.sum() * gain


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample (zero insertion), pad, FIR-filter and downsample every channel of ``x``.

    x (B, C, H, W); kernel (kh, kw); pad = (before, after), the same on both axes (negative crops).
    Output (B, C, (H*up + p0 + p1 - kh) // down + 1, likewise for W).
    """
    if x.ndim != 4:
        raise ValueError(f"upfirdn2d expects (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    p0, p1 = int(pad[0]), int(pad[1])
    if up > 1:
        # zero insertion: every sample followed by (up - 1) zeros along each axis
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(b, c, h * up, w * up)
    x = F.pad(x, (max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)))
    if p0 < 0 or p1 < 0:
        hh, ww = x.shape[-2:]
        x = x[:, :, max(-p0, 0):hh - max(-p1, 0), max(-p0, 0):ww - max(-p1, 0)]
    kh, kw = kernel.shape
    # true convolution: conv2d correlates, so flip the kernel; depthwise over the C channels
    weight = torch.flip(kernel, (0, 1)).to(dtype=x.dtype, device=x.device).view(1, 1, kh, kw)
    out = F.conv2d(x, weight.expand(c, 1, kh, kw), groups=c)
    if down > 1:
        out = out[:, :, ::down, ::down]
    return out


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor | None = None, negative_slope: float = 0.2,
                     scale: float = SQRT2) -> torch.Tensor:
    """``leaky_relu(x + bias, negative_slope) * scale``; bias (C,) is broadcast over dim 1 of ``x``."""
    if bias is not None:
        x = x + bias.view(1, -1, *([1] * (x.ndim - 2)))
    return F.leaky_relu(x, negative_slope).mul_(scale)  # leaky_relu's backward needs its input, not output


class FusedLeakyReLU(nn.Module):
    """Learned per-channel bias + leaky ReLU(0.2) * sqrt(2). Key: ``bias`` (C,)."""

    def __init__(self, channels: int, negative_slope: float = 0.2, scale: float = SQRT2):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)


class ScaledLeakyReLU(nn.Module):
    """leaky ReLU (default slope 0.2) times sqrt(2); no parameters."""

    def __init__(self, negative_slope: float = 0.2):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, self.negative_slope) * SQRT2


class PixelNorm(nn.Module):
    """x / sqrt(mean(x^2 over dim 1) + 1e-8)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x * x, dim=1, keepdim=True) + 1e-8)


class Blur(nn.Module):
    """FIR blur (no resampling). Buffer ``kernel`` (k, k) = normalised taps x ``upsample_factor**2``."""

    def __init__(self, taps: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", make_fir_kernel(taps, gain=float(upsample_factor ** 2)))
        self.pad = (int(pad[0]), int(pad[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """x2 (default) FIR upsampling; buffer ``kernel`` = taps x factor**2. (B,C,H,W) -> (B,C,fH,fW)."""

    def __init__(self, taps: Sequence[float] = DEFAULT_FIR, factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_fir_kernel(taps, gain=float(factor ** 2)))
        p = len(taps) - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class EqualConv2d(nn.Module):
    """Conv2d whose weight (out, in, k, k) is scaled by 1/sqrt(in*k*k) at run time. Keys: weight, bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size ** 2)
        self.stride = stride
        self.padding = padding
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, bias=self.bias, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    """Linear with run-time weight scale lr_mul/sqrt(in); optional fused leaky ReLU. Keys: weight, bias."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.activation = bool(activation)
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias)
        return F.linear(x, self.weight * self.scale, bias=bias)


def modulate_weight(weight: torch.Tensor, styles: torch.Tensor, *, demodulate: bool = True,
                    eps: float = 1e-8) -> torch.Tensor:
    """Per-sample modulated (and optionally demodulated) weights.

    weight (Cout, Cin, k, k) already multiplied by its equalized-lr scale; styles (Bs, Cin).
    Returns (Bs, Cout, Cin, k, k): ``w * s``, times ``rsqrt(sum((w * s)^2) + eps)`` per output channel.
    """
    bs, cin = styles.shape
    wts = weight.unsqueeze(0) * styles.view(bs, 1, cin, 1, 1)
    if demodulate:
        wts = wts * torch.rsqrt(wts.pow(2).sum(dim=(2, 3, 4)) + eps).view(bs, weight.shape[0], 1, 1, 1)
    return wts


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *, demodulate: bool = True,
                     upsample: bool = False, padding: int = 0, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample modulated convolution.

    x (B, Cin, H, W); weight (Cout, Cin, k, k) already multiplied by its equalized-lr scale;
    styles (B, Cin), or (1, Cin) shared by the whole batch (then one plain convolution runs over the
    batch instead of a grouped one). Returns (B, Cout, H, W), or (B, Cout, 2H+k-2, 2W+k-2) with
    ``upsample`` (stride-2 transposed convolution, before the blur).
    """
    b, cin, h, w = x.shape
    bs = styles.shape[0]
    if bs not in (1, b):
        raise ValueError(f"styles batch {bs} does not match input batch {b}")
    cout, _, kh, kw = weight.shape
    wts = modulate_weight(weight, styles, demodulate=demodulate, eps=eps)   # (Bs, Cout, Cin, k, k)
    if bs == 1:
        if upsample:
            return F.conv_transpose2d(x, wts[0].transpose(0, 1), stride=2, padding=0)
        return F.conv2d(x, wts[0], padding=padding)
    x = x.reshape(1, b * cin, h, w)
    if upsample:
        wts = wts.transpose(1, 2).reshape(b * cin, cout, kh, kw)
        out = F.conv_transpose2d(x, wts, stride=2, padding=0, groups=b)
    else:
        out = F.conv2d(x, wts.reshape(b * cout, cin, kh, kw), padding=padding, groups=b)
    return out.view(b, cout, out.shape[-2], out.shape[-1])


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated conv. Keys: weight (1, out, in, k, k), modulation.{weight,bias}, blur.kernel.

    forward(x (B, in, H, W), style (B or 1, style_dim)) -> (B, out, H, W), or (B, out, 2H, 2W) if upsample.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False, taps: Sequence[float] = DEFAULT_FIR):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.upsample = upsample
        self.demodulate = demodulate
        self.eps = 1e-8
        self.scale = 1.0 / math.sqrt(in_channels * kernel_size ** 2)
        self.padding = kernel_size // 2
        # registration order = official state_dict order: weight, blur.kernel, modulation.*
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size))
        if upsample:
            p = (len(taps) - 2) - (kernel_size - 1)
            self.blur = Blur(taps, pad=((p + 1) // 2 + 1, p // 2 + 1), upsample_factor=2)
        self.modulation = EqualLinear(style_dim, in_channels, bias_init=1.0)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        s = self.modulation(style)
        out = modulated_conv2d(x, self.weight[0] * self.scale, s, demodulate=self.demodulate,
                               upsample=self.upsample, padding=self.padding, eps=self.eps)
        if self.upsample:
            out = self.blur(out)
        return out


class NoiseInjection(nn.Module):
    """Official StyleHEAT noise injection: a no-op (quirk 1). Key ``weight`` (1,) kept for loading."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ConstantInput(nn.Module):
    """Learned constant (1, C, 4, 4) repeated over the batch. Key: ``input``."""

    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class StyledConv(nn.Module):
    """ModulatedConv2d -> (no-op noise) -> FusedLeakyReLU. Keys: conv.*, noise.weight, activate.bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int,
                 upsample: bool = False, taps: Sequence[float] = DEFAULT_FIR, demodulate: bool = True):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, kernel_size, style_dim,
                                    demodulate=demodulate, upsample=upsample, taps=taps)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, style)))


class ToRGB(nn.Module):
    """Modulated 1x1 conv to 3 channels (no demodulation) + bias, plus the upsampled previous skip.

    Keys: bias (1, 3, 1, 1), upsample.kernel (if ``upsample``), conv.*.
    forward(x (B, C, H, W), style (B, style_dim), skip (B, 3, H/2, W/2) or None) -> (B, 3, H, W).
    """

    def __init__(self, in_channels: int, style_dim: int, upsample: bool = True,
                 taps: Sequence[float] = DEFAULT_FIR):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))
        if upsample:
            self.upsample = Upsample(taps)
        self.conv = ModulatedConv2d(in_channels, 3, 1, style_dim, demodulate=False)

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


def sft_head(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """SFT scale or shift head: EqualConv2d 3x3 -> ScaledLeakyReLU(0.2) -> EqualConv2d 3x3 (keys 0.*, 2.*)."""
    return nn.Sequential(EqualConv2d(in_channels, hidden, 3, padding=1), ScaledLeakyReLU(0.2),
                         EqualConv2d(hidden, out_channels, 3, padding=1))


class ConvLayer(nn.Sequential):
    """[Blur if downsample] -> EqualConv2d -> [FusedLeakyReLU | ScaledLeakyReLU] (official key indices)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, downsample: bool = False,
                 taps: Sequence[float] = DEFAULT_FIR, bias: bool = True, activate: bool = True):
        layers: list[nn.Module] = []
        if downsample:
            p = (len(taps) - 2) + (kernel_size - 1)
            layers.append(Blur(taps, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                  bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_channels) if bias else ScaledLeakyReLU(0.2))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """Downsampling residual block: (conv3x3 -> conv3x3/2 + skip 1x1/2) / sqrt(2). (B,Ci,H,W)->(B,Co,H/2,W/2)."""

    def __init__(self, in_channels: int, out_channels: int, taps: Sequence[float] = DEFAULT_FIR):
        super().__init__()
        self.conv1 = ConvLayer(in_channels, in_channels, 3)
        self.conv2 = ConvLayer(in_channels, out_channels, 3, downsample=True, taps=taps)
        self.skip = ConvLayer(in_channels, out_channels, 1, downsample=True, activate=False, bias=False, taps=taps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT2
