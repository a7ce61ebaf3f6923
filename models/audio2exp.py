"""Audio -> 3DMM expression network, compatible with SadTalker's released Audio2Exp weights.

SadTalker's ``SimpleWrapperV2``: a Wav2Lip-style 2-D convolutional audio encoder turns one
mel window (80 mel bins x 16 mel steps = 0.2 s around the frame) into a 512-d embedding; one
linear layer maps ``[embedding, reference expression (64), blink ratio (1)]`` to the frame's
64 expression coefficients. The output is the expression itself (no residual on the reference).

Data flow at full size (``Audio2ExpConfig()``), input (N, 1, 80, 16) = (batch, 1, mel bin, time)::

    3 blocks  32 ch  80x16   (conv 3x3 stride 1; blocks 2-3 residual)
    3 blocks  64 ch  27x16   (first conv stride (3, 1); then 2 residual)
    3 blocks 128 ch   9x6    (first conv stride 3; then 2 residual)
    2 blocks 256 ch   3x3    (first conv stride (3, 2); then 1 residual)
    1 block  512 ch   1x1    (conv 3x3, no padding)
    1 block  512 ch   1x1    (conv 1x1)
    block = Conv2d(bias) -> BatchNorm2d (eval, eps 1e-5) -> (+ block input if residual) -> ReLU
    embedding (N, 512) >= 0
    mapping1: Linear(512 + 64 + 1 -> 64) on cat[embedding, ref_exp, ratio] -> exp (N, 64)

State-dict keys are SadTalker's (``audio_encoder.<i>.conv_block.{0,1}.*``, ``mapping1.*``);
reading checkpoint files is ``server.preprocessing.audio``'s job (this module does no file I/O).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from models.ops import state_dict_mismatch

__all__ = ["Audio2ExpConfig", "ConvBNBlock", "Audio2Exp", "load_state_dict_strict"]


@dataclass(frozen=True)
class Audio2ExpConfig:
    """Sizes of the Audio2Exp network. Defaults = SadTalker's released network.

    ``widths`` are the channel counts of the five stages (80x16, 27x16, 9x6, 3x3, 1x1); the spatial
    sizes are fixed by the 80x16 input window, so only channels shrink in :meth:`tiny`.
    """

    widths: tuple[int, int, int, int, int] = (32, 64, 128, 256, 512)
    mel_bins: int = 80
    mel_steps: int = 16
    exp_dim: int = 64

    @classmethod
    def tiny(cls) -> "Audio2ExpConfig":
        return cls(widths=(4, 8, 8, 16, 16))

    @property
    def embedding_dim(self) -> int:
        return self.widths[-1]

    def blocks(self) -> list[tuple[int, int, int, tuple[int, int], int, bool]]:
        """(in, out, kernel, stride, padding, residual) of the 13 encoder blocks, in key order."""
        w0, w1, w2, w3, w4 = self.widths
        return [
            (1, w0, 3, (1, 1), 1, False), (w0, w0, 3, (1, 1), 1, True), (w0, w0, 3, (1, 1), 1, True),
            (w0, w1, 3, (3, 1), 1, False), (w1, w1, 3, (1, 1), 1, True), (w1, w1, 3, (1, 1), 1, True),
            (w1, w2, 3, (3, 3), 1, False), (w2, w2, 3, (1, 1), 1, True), (w2, w2, 3, (1, 1), 1, True),
            (w2, w3, 3, (3, 2), 1, False), (w3, w3, 3, (1, 1), 1, True),
            (w3, w4, 3, (1, 1), 0, False),
            (w4, w4, 1, (1, 1), 0, False),
        ]


class ConvBNBlock(nn.Module):
    """Conv2d -> BatchNorm2d -> optional residual add -> ReLU (keys ``conv_block.0/1``)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: tuple[int, int], padding: int,
                 residual: bool):
        super().__init__()
        if residual and (cin != cout or tuple(stride) != (1, 1)):
            raise ValueError("a residual block needs equal in/out channels and stride 1")
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_block(x)
        if self.residual:
            y = y + x
        return torch.relu(y)


class Audio2Exp(nn.Module):
    """mel windows (N, 80, 16) + reference expression (N, 64) + blink ratio (N,) -> expression (N, 64)."""

    def __init__(self, cfg: Audio2ExpConfig | None = None):
        super().__init__()
        self.cfg = cfg or Audio2ExpConfig()
        self.audio_encoder = nn.Sequential(*[ConvBNBlock(*spec) for spec in self.cfg.blocks()])
        self.mapping1 = nn.Linear(self.cfg.embedding_dim + self.cfg.exp_dim + 1, self.cfg.exp_dim)
        self.eval()

    def _mel_input(self, mel: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if mel.dim() == 3:
            mel = mel.unsqueeze(1)
        if mel.dim() != 4 or tuple(mel.shape[1:]) != (1, c.mel_bins, c.mel_steps):
            raise ValueError(f"Audio2Exp expects mel windows of shape (N, {c.mel_bins}, {c.mel_steps}) or "
                             f"(N, 1, {c.mel_bins}, {c.mel_steps}) (mel bins x time steps), got {tuple(mel.shape)}")
        return mel

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """(N, [1,] 80, 16) mel windows -> (N, 512) audio embedding (ReLU output, >= 0)."""
        mel = self._mel_input(mel)
        return self.audio_encoder(mel).flatten(1)

    def forward(self, mel: torch.Tensor, ref_exp: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        """mel (N, [1,] 80, 16), ref_exp (N, 64), ratio (N,) or (N, 1) -> exp (N, 64)."""
        emb = self.encode(mel)
        n = emb.shape[0]
        if ref_exp.numel() != n * self.cfg.exp_dim or ratio.numel() != n:   # checked before reshape can fail
            raise ValueError(f"Audio2Exp expects ref_exp (N, {self.cfg.exp_dim}) and ratio (N,) for N = {n} "
                             f"windows, got {tuple(ref_exp.shape)} and {tuple(ratio.shape)}")
        ref_exp = ref_exp.reshape(n, self.cfg.exp_dim)
        ratio = ratio.reshape(n, 1)
        return self.mapping1(torch.cat([emb, ref_exp.to(emb.dtype), ratio.to(emb.dtype)], dim=1))


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Load ``state_dict`` into ``module``; on any mismatch raise ONE ValueError listing every missing,
    unexpected and mis-shaped key (``what`` names the checkpoint in the message)."""
    mismatch = state_dict_mismatch(module, state_dict)
    if mismatch:
        missing, unexpected = mismatch.missing, mismatch.unexpected
        misshaped = [f"{k}: checkpoint {got} vs model {want}" for k, got, want in mismatch.misshaped]

        def listing(label: str, items: list[str]) -> str:
            if not items:
                return ""
            shown = ", ".join(items[:12]) + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")
            return f"\n  {label} ({len(items)}): {shown}"
        raise ValueError(f"{what} does not match the {type(module).__name__} network"
                         + listing("missing keys", missing) + listing("unexpected keys", unexpected)
                         + listing("mis-shaped keys", misshaped)
                         + "\n  Is this the right file (SadTalker's auido2exp_00300-model.pth or "
                           "SadTalker_V0.0.2_256/512.safetensors)?")
    module.load_state_dict(dict(state_dict), strict=True)
