"""Audio -> head pose network, compatible with SadTalker's released Audio2Pose weights.

SadTalker's ``Audio2Pose`` is a conditional VAE. At inference only its decoder runs: for each chunk
of ``seq_len`` (32) frames it takes a latent ``z`` (1, 64) drawn from N(0, 1), adds the learned bias
of the chosen pose style (``classbias[pose_style]``, 46 styles), concatenates the reference pose
(angles 3 + translation 3 of the first frame) and a 6-d projection of the 512-d audio embedding of
every frame of the chunk, and decodes that into 32 frames of head *motion* (offsets from the
reference pose). Facts from SadTalker ``src/audio2pose_models/*.py`` and ``src/test_audio2coeff.py``
(reference ``shared/reference/README_audio_3dmm.md`` section 4.6).

Data flow at full size (``Audio2PoseConfig()``), one chunk, batch B::

    mel windows (B, S=32, 80, 16) -> AudioEncoder (the 13 Conv-BN blocks of Audio2Exp) -> (B, S, 512)
    linear_audio Linear(512 -> 6)                     -> (B, S, 6) -> (B, 192)
    z (B, 64) + classbias[style] (B, 64)
    MLP: Linear(6 + 64 + 192 = 262 -> 128) -> ReLU -> Linear(128 -> 192) -> Sigmoid -> (B, 1, S, 6)
    ResUnet (1 -> 32/64/128/256 channels, halving S three times, U-Net skips) -> Sigmoid -> (B, 1, S, 6)
    pose_linear Linear(6 -> 6)                         -> motion (B, S, 6)

The test-time procedure (:meth:`Audio2Pose.predict`): frame 0 is the reference (motion 0); frames
1..T-1 are split into ``(T-1) // 32`` chunks plus a remainder ``re``, which reuses the *last* 32
frames and keeps their last ``re`` outputs; one ``z`` per chunk in that order; ``pose = ref + motion``.
Clips with ``1 < T < 33`` (fewer than 32 frames after the reference) make the official code fail
(the MLP's input width no longer matches); here the one chunk is padded at its start with copies of
frame 1's window and the last ``T - 1`` outputs are kept (same rule as the remainder chunk).

:func:`savgol_smooth` is ``generate``'s Savitzky-Golay filter (window 13, order 2, scipy's ``interp``
edges; a smaller odd window ``int((T-1)/2)*2+1`` when T < 13), written out in numpy.

State-dict keys are SadTalker's (``audio_encoder.audio_encoder.*``, ``netG.encoder.*``,
``netG.decoder.*``, ``netD_motion.*``); the training-only CVAE encoder and pose discriminator are
built (strict loading needs their tensors) but never run. This module does no file I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.audio2exp import Audio2ExpConfig, ConvBNBlock

__all__ = ["Audio2PoseConfig", "Audio2Pose", "ResUnet", "PoseDecoder", "PoseEncoder", "num_chunks",
           "savgol_window", "savgol_smooth", "POSE_STYLES"]

POSE_STYLES = 46


@dataclass(frozen=True)
class Audio2PoseConfig:
    """Sizes of the Audio2Pose network. Defaults = SadTalker's released network (auido2pose.yaml)."""

    encoder_widths: tuple[int, int, int, int, int] = (32, 64, 128, 256, 512)   # audio encoder stages
    unet_filters: tuple[int, int, int, int] = (32, 64, 128, 256)
    seq_len: int = 32            # frames per chunk (divisible by 8: the ResUnet halves it three times)
    latent: int = 64             # z size
    num_classes: int = POSE_STYLES
    audio_out: int = 6           # linear_audio output per frame
    pose_dim: int = 6            # angles 3 + translation 3
    hidden: int = 128            # MLP hidden width (decoder [128, seq*6]; encoder [seq*6, 128])
    disc_widths: tuple[int, int, int] = (256, 512, 1024)

    @classmethod
    def tiny(cls) -> "Audio2PoseConfig":
        return cls(encoder_widths=(4, 8, 8, 16, 16), unet_filters=(4, 8, 8, 16), latent=8, hidden=16,
                   disc_widths=(8, 8, 8))

    @property
    def audio_config(self) -> Audio2ExpConfig:
        return Audio2ExpConfig(widths=self.encoder_widths)

    @property
    def chunk_width(self) -> int:
        return self.seq_len * self.pose_dim


class AudioEncoder(nn.Module):
    """(B, S, 80, 16) mel windows -> (B, S, 512) embeddings (keys ``audio_encoder.<i>.conv_block.*``)."""

    def __init__(self, cfg: Audio2ExpConfig):
        super().__init__()
        self.audio_encoder = nn.Sequential(*[ConvBNBlock(*spec) for spec in cfg.blocks()])

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        b, s = mels.shape[:2]
        x = mels.reshape(b * s, 1, mels.shape[-2], mels.shape[-1])
        return self.audio_encoder(x).reshape(b, s, -1)


class ResidualConv(nn.Module):
    """BN -> ReLU -> conv(stride) -> BN -> ReLU -> conv, plus a conv(stride) -> BN skip path."""

    def __init__(self, cin: int, cout: int, stride, padding: int = 1):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 3, stride, padding),
            nn.BatchNorm2d(cout), nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, 1))
        self.conv_skip = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(x) + self.conv_skip(x)


class Upsample(nn.Module):
    """Transposed conv doubling the time axis (kernel = stride = (2, 1))."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(cin, cout, (2, 1), (2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(x)


class ResUnet(nn.Module):
    """(B, 1, S, 6) -> (B, 1, S, 6) in (0, 1); time S halves at each of 3 levels, features keep 6."""

    def __init__(self, filters: tuple[int, int, int, int] = (32, 64, 128, 256)):
        super().__init__()
        f0, f1, f2, f3 = filters
        self.input_layer = nn.Sequential(nn.Conv2d(1, f0, 3, 1, 1), nn.BatchNorm2d(f0), nn.ReLU(),
                                         nn.Conv2d(f0, f0, 3, 1, 1))
        self.input_skip = nn.Sequential(nn.Conv2d(1, f0, 3, 1, 1))
        self.residual_conv_1 = ResidualConv(f0, f1, (2, 1))
        self.residual_conv_2 = ResidualConv(f1, f2, (2, 1))
        self.bridge = ResidualConv(f2, f3, (2, 1))
        self.upsample_1 = Upsample(f3, f3)
        self.up_residual_conv1 = ResidualConv(f3 + f2, f2, 1)
        self.upsample_2 = Upsample(f2, f2)
        self.up_residual_conv2 = ResidualConv(f2 + f1, f1, 1)
        self.upsample_3 = Upsample(f1, f1)
        self.up_residual_conv3 = ResidualConv(f1 + f0, f0, 1)
        self.output_layer = nn.Sequential(nn.Conv2d(f0, 1, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.input_layer(x) + self.input_skip(x)             # (B, f0, S, 6)
        x2 = self.residual_conv_1(x1)                              # (B, f1, S/2, 6)
        x3 = self.residual_conv_2(x2)                              # (B, f2, S/4, 6)
        x4 = self.bridge(x3)                                       # (B, f3, S/8, 6)
        x6 = self.up_residual_conv1(torch.cat([self.upsample_1(x4), x3], 1))   # (B, f2, S/4, 6)
        x8 = self.up_residual_conv2(torch.cat([self.upsample_2(x6), x2], 1))   # (B, f1, S/2, 6)
        x10 = self.up_residual_conv3(torch.cat([self.upsample_3(x8), x1], 1))  # (B, f0, S, 6)
        return self.output_layer(x10)                              # (B, 1, S, 6)


class PoseDecoder(nn.Module):
    """CVAE decoder: z, style, reference pose, chunk audio embedding -> motion (B, S, 6)."""

    def __init__(self, cfg: Audio2PoseConfig):
        super().__init__()
        self.cfg = cfg
        self.resunet = ResUnet(cfg.unet_filters)
        self.MLP = nn.Sequential()
        self.MLP.add_module("L0", nn.Linear(cfg.pose_dim + cfg.latent + cfg.seq_len * cfg.audio_out, cfg.hidden))
        self.MLP.add_module("A0", nn.ReLU())
        self.MLP.add_module("L1", nn.Linear(cfg.hidden, cfg.chunk_width))
        self.MLP.add_module("sigmoid", nn.Sigmoid())
        self.pose_linear = nn.Linear(cfg.pose_dim, cfg.pose_dim)
        self.linear_audio = nn.Linear(cfg.encoder_widths[-1], cfg.audio_out)
        self.classbias = nn.Parameter(torch.zeros(cfg.num_classes, cfg.latent))

    def forward(self, z: torch.Tensor, style: torch.Tensor, ref: torch.Tensor, audio_emb: torch.Tensor) -> torch.Tensor:
        """z (B, latent), style (B,) int64, ref (B, 6), audio_emb (B, S, 512) -> motion (B, S, 6)."""
        b = z.shape[0]
        audio = self.linear_audio(audio_emb).reshape(b, -1)             # (B, S*6)
        x = torch.cat([ref, z + self.classbias[style], audio], dim=-1)  # (B, 6 + latent + S*6)
        x = self.MLP(x).reshape(b, 1, self.cfg.seq_len, -1)              # (B, 1, S, 6)
        return self.pose_linear(self.resunet(x).squeeze(1))             # (B, S, 6)


class PoseEncoder(nn.Module):
    """CVAE encoder (training only; built so the released weights load strictly, never run here)."""

    def __init__(self, cfg: Audio2PoseConfig):
        super().__init__()
        self.resunet = ResUnet(cfg.unet_filters)
        self.MLP = nn.Sequential()
        self.MLP.add_module("L0", nn.Linear(cfg.chunk_width + cfg.latent + cfg.seq_len * cfg.audio_out + cfg.pose_dim,
                                            cfg.hidden))
        self.MLP.add_module("A0", nn.ReLU())
        self.linear_means = nn.Linear(cfg.hidden, cfg.latent)
        self.linear_logvar = nn.Linear(cfg.hidden, cfg.latent)
        self.linear_audio = nn.Linear(cfg.encoder_widths[-1], cfg.audio_out)
        self.classbias = nn.Parameter(torch.zeros(cfg.num_classes, cfg.latent))


class CVAE(nn.Module):
    def __init__(self, cfg: Audio2PoseConfig):
        super().__init__()
        self.encoder = PoseEncoder(cfg)
        self.decoder = PoseDecoder(cfg)


class _DiscLayer(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, bias=False)
        self.norm = nn.BatchNorm1d(cout)


class PoseDiscriminator(nn.Module):
    """Pose-sequence discriminator (training only; tensors kept for strict loading, never run here)."""

    def __init__(self, cfg: Audio2PoseConfig):
        super().__init__()
        d0, d1, d2 = cfg.disc_widths
        self.seq = nn.Sequential(_DiscLayer(cfg.pose_dim, d0, 4), _DiscLayer(d0, d1, 4), _DiscLayer(d1, d2, 3),
                                 nn.Conv1d(d2, 1, 3))


def num_chunks(n_frames: int, seq_len: int = 32) -> int:
    """How many z draws the test-time procedure makes for a T-frame clip: ceil((T-1) / seq_len)."""
    moving = max(int(n_frames) - 1, 0)
    return -(-moving // seq_len)


class Audio2Pose(nn.Module):
    """SadTalker's Audio2Pose (parameter names = the official state-dict keys)."""

    def __init__(self, cfg: Audio2PoseConfig | None = None):
        super().__init__()
        self.cfg = cfg or Audio2PoseConfig()
        self.audio_encoder = AudioEncoder(self.cfg.audio_config)
        self.netG = CVAE(self.cfg)
        self.netD_motion = PoseDiscriminator(self.cfg)
        self.eval()

    def draw_z(self, n_frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(num_chunks, latent) z, drawn like the official code: one ``randn(1, latent)`` per chunk, in order
        (``generator`` seeded with ``torch.manual_seed(seed)``'s seed gives the official draws)."""
        zs = [torch.randn(1, self.cfg.latent, generator=generator) for _ in range(num_chunks(n_frames, self.cfg.seq_len))]
        return torch.cat(zs) if zs else torch.zeros(0, self.cfg.latent)

    def predict(self, mels: torch.Tensor, ref_pose: torch.Tensor, pose_style: int, *,
                z: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw head pose before smoothing (``Audio2Pose.test``'s ``pose_pred``).

        mels (T, 80, 16): the SadTalker windows of frames 0..T-1 (frame 0's is not used);
        ref_pose (6,): angles + translation of the reference (first) frame;
        z: (num_chunks(T), latent) draws, or None to draw them from ``generator``.
        Returns (T, 6): row 0 = ref_pose, row i = ref_pose + motion_i.
        """
        c = self.cfg
        if mels.dim() != 3 or tuple(mels.shape[1:]) != (80, 16):
            raise ValueError(f"Audio2Pose expects mel windows of shape (T, 80, 16), got {tuple(mels.shape)}")
        if not 0 <= int(pose_style) < c.num_classes:
            raise ValueError(f"pose_style must be an integer in 0..{c.num_classes - 1}, got {pose_style}")
        t = mels.shape[0]
        k = num_chunks(t, c.seq_len)
        if z is None:
            z = self.draw_z(t, generator)
        if tuple(z.shape) != (k, c.latent):
            raise ValueError(f"Audio2Pose needs z of shape ({k}, {c.latent}) for {t} frames, got {tuple(z.shape)}")
        param = next(self.parameters())
        mels = mels.to(param.device, param.dtype)
        ref = ref_pose.reshape(1, c.pose_dim).to(param.device, param.dtype)
        z = z.to(param.device, param.dtype)
        style = torch.tensor([int(pose_style)], device=param.device)
        used = mels[1:]                                                  # (T-1, 80, 16)
        n = used.shape[0]
        motion = [torch.zeros(1, c.pose_dim, device=param.device, dtype=param.dtype)]
        full, rest = divmod(n, c.seq_len)
        for i in range(full):
            chunk = used[i * c.seq_len:(i + 1) * c.seq_len]
            motion.append(self._chunk(chunk, z[i:i + 1], style, ref))
        if rest:
            chunk = used[-c.seq_len:]
            if chunk.shape[0] < c.seq_len:                               # clip shorter than one chunk
                pad = chunk[:1].expand(c.seq_len - chunk.shape[0], -1, -1)
                chunk = torch.cat([pad, chunk])
            motion.append(self._chunk(chunk, z[full:full + 1], style, ref)[-rest:])
        return ref + torch.cat(motion)                                   # (T, 6)

    def _chunk(self, chunk: torch.Tensor, z: torch.Tensor, style: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        emb = self.audio_encoder(chunk.unsqueeze(0))                     # (1, S, 512)
        return self.netG.decoder(z, style, ref, emb)[0]                  # (S, 6)


def savgol_window(n_frames: int, window: int = 13) -> int:
    """The window ``generate`` uses: 13, or ``int((T-1)/2)*2+1`` (the largest odd <= T) when T < 13."""
    return window if n_frames >= window else int((n_frames - 1) / 2) * 2 + 1


def savgol_smooth(pose: np.ndarray, window: int = 13, order: int = 2) -> np.ndarray:
    """Savitzky-Golay filter along time (axis 0) with scipy's ``mode='interp'`` edges -> float64 array.

    Each output is the value at its position of the least-squares polynomial (degree ``order``)
    through the ``w`` samples around it; the first / last ``w // 2`` outputs use the polynomial of
    the first / last ``w`` samples. ``w = savgol_window(T, window)``; when ``w <= order`` (T < 3, where
    the official filter raises) the input is returned unchanged.
    """
    x = np.asarray(pose, dtype=np.float64)
    t = x.shape[0]
    w = savgol_window(t, window)
    if w <= order:
        return x.copy()
    m = w // 2
    pos = np.arange(w, dtype=np.float64) - m
    vander = pos[:, None] ** np.arange(order + 1)[None, :]             # (w, order+1)
    hat = vander @ np.linalg.pinv(vander)                              # (w, w): fitted values of a window
    out = np.empty_like(x)
    out[:m] = np.tensordot(hat[:m], x[:w], axes=(1, 0))                        # first polynomial
    out[t - m:] = np.tensordot(hat[w - m:], x[t - w:], axes=(1, 0))             # last polynomial
    windows = np.lib.stride_tricks.sliding_window_view(x, w, axis=0)           # (t-w+1, ..., w)
    out[m:t - m] = np.tensordot(windows, hat[m], axes=(-1, 0))                 # centre values
    return out
