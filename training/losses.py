"""Loss networks and loss terms of StyleHEAT training (paper Eqs. 5-8, 11-13).

Helper networks, written here with the key layouts of the files users already have (all loaded with
``torch.load(weights_only=True)``):

* :class:`VGG19Features` -- torchvision ``vgg19().features`` (keys ``features.N.weight/bias``; a full
  torchvision ``vgg19`` state dict loads, its ``classifier.*`` keys are ignored);
* :class:`SyncNet` -- Wav2Lip ``SyncNet_color`` (``face_encoder.N.conv_block.{0,1}.*``,
  ``audio_encoder.*``; Wav2Lip's ``lipsync_expert.pth`` keeps them under ``state_dict``);
* :class:`Discriminator` -- rosinality StyleGAN2 ``Discriminator(256, channel_multiplier=2)``
  (``convs.*``, ``final_conv.*``, ``final_linear.*``; a training checkpoint's ``d`` entry also works).

Loss terms (images in [-1, 1], NCHW):

* :class:`PerceptualLoss` -- multi-scale VGG-19 L1 over relu_1_1 .. relu_5_1, 4 scales (Eq. 5);
* :func:`masked_l1`, :func:`landmark_boxes`, :func:`box_mask`, :func:`soft_mask`;
* :func:`sync_loss` (Eq. 8), :func:`adversarial_loss` (Eq. 13, non-saturating softplus).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models import ops
from models.stylegan2 import StyleGAN2Config

# --------------------------------------------------------------------------------------------- VGG-19
#: torchvision vgg19 features: channels per conv, "M" = max pool
VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
             512, 512, 512, 512, "M")
#: layer index (in ``features``) after which each named activation is taken
VGG19_LAYERS = {"relu_1_1": 1, "relu_1_2": 3, "relu_2_1": 6, "relu_2_2": 8, "relu_3_1": 11,
                "relu_3_2": 13, "relu_3_3": 15, "relu_3_4": 17, "relu_4_1": 20, "relu_4_2": 22,
                "relu_4_3": 24, "relu_4_4": 26, "relu_5_1": 29}
DEFAULT_LAYERS = ("relu_1_1", "relu_2_1", "relu_3_1", "relu_4_1", "relu_5_1")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class HelperWeightsError(ValueError):
    """A helper network's weight file is missing or has the wrong layout."""


def load_state_file(path: str | os.PathLike, what: str, hint: str,
                    nested: Sequence[str] = ("state_dict", "model")) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) a state dict file; unwraps ``state_dict``/``model``, strips ``module.``."""
    if path is None or str(path) == "":
        raise HelperWeightsError(f"no {what} weights given; {hint}")
    if not os.path.isfile(path):
        raise HelperWeightsError(f"{what} weights not found at {path}; {hint}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise HelperWeightsError(f"{path} could not be read as a weights-only torch file ({type(e).__name__}: "
                                 f"{e}); {hint}") from None
    if isinstance(obj, Mapping):
        for key in nested:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise HelperWeightsError(f"{path} does not hold a state dict; {hint}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()
            if isinstance(v, torch.Tensor)}


def _load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], path, what: str, hint: str) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    bad = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
           if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or bad:
        raise HelperWeightsError(f"{path} is not a {what} file: " + "; ".join(
            ([f"missing {len(missing)} key(s) e.g. {missing[:3]}"] if missing else []) +
            ([f"wrong shape {bad[:3]}"] if bad else [])) + f"; {hint}")
    module.load_state_dict({k: sd[k] for k in expected}, strict=True)


class VGG19Features(nn.Module):
    """torchvision's ``vgg19().features`` (``features.N.*`` keys); ``width`` divides the channels (tests).

    forward(x (B,3,H,W) ImageNet-normalised, layers) -> {name: activation}; stops after the deepest layer.
    """

    HINT = ("pass --vgg19 PATH to a torchvision vgg19 state dict (e.g. vgg19-dcbb9e9d.pth from "
            "download.pytorch.org/models), or set vgg19 in the stage config")

    def __init__(self, width: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in VGG19_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                c = max(1, v // width)
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = c
        self.features = nn.Sequential(*layers)

    @classmethod
    def from_file(cls, path) -> "VGG19Features":
        net = cls()
        sd = load_state_file(path, "VGG-19", cls.HINT)
        _load_strict(net, {k: v for k, v in sd.items() if k.startswith("features.")}, path, "torchvision VGG-19",
                     cls.HINT)
        return net

    def forward(self, x: torch.Tensor, layers: Sequence[str] = DEFAULT_LAYERS) -> dict[str, torch.Tensor]:
        want = {VGG19_LAYERS[name]: name for name in layers}
        last = max(want)
        out = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in want:
                out[want[i]] = x
            if i == last:
                break
        return out


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> ImageNet-normalised input of VGG."""
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


class PerceptualLoss(nn.Module):
    """sum over scales s and layers l of mean |phi_l(x_s) - phi_l(y_s)| (Eq. 5), VGG-19 frozen.

    Scales: the input, then bilinear halvings (``num_scales`` = 4 as the official config). The target's
    features are detached. ``mask`` (B,1,H,W), if given, multiplies both images first (as the official
    masked terms do), so a mask of ones equals no mask and a mask of zeros gives 0.
    """

    def __init__(self, vgg: VGG19Features, layers: Sequence[str] = DEFAULT_LAYERS, num_scales: int = 4):
        super().__init__()
        self.vgg = vgg.eval()
        for p in self.vgg.parameters():
            p.requires_grad_(False)
        self.layers = tuple(layers)
        self.num_scales = int(num_scales)

    def train(self, mode: bool = True):  # the VGG stays in eval mode
        super().train(mode)
        self.vgg.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"PerceptualLoss: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
        if mask is not None:
            x, y = x * mask, y * mask
        x, y = imagenet_normalize(x.float()), imagenet_normalize(y.float())
        loss = x.new_zeros(())
        for s in range(self.num_scales):
            fx, fy = self.vgg(x, self.layers), self.vgg(y, self.layers)
            for name in self.layers:
                loss = loss + F.l1_loss(fx[name], fy[name].detach())
            if s != self.num_scales - 1:
                x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
                y = F.interpolate(y, scale_factor=0.5, mode="bilinear", align_corners=False)
        return loss


def masked_l1(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean |mask * (x - y)| over all elements (mask broadcast over channels)."""
    d = (x - y).abs()
    if mask is not None:
        d = d * mask
    return d.mean()


# --------------------------------------------------------------------------------------------- masks
#: iBUG-68 index ranges of the regions (mouth includes the inner lips; eyes include the brows)
MOUTH = tuple(range(48, 68))
LEFT_EYE = tuple(range(17, 22)) + tuple(range(36, 42))
RIGHT_EYE = tuple(range(22, 27)) + tuple(range(42, 48))


def landmark_boxes(landmarks: torch.Tensor, points: Sequence[int], margin: float = 0.25,
                   min_size: float = 4.0) -> torch.Tensor:
    """Boxes (B, 4) = (x0, y0, x1, y1) around landmarks (B, 68, 2) ``points``, grown by ``margin`` of
    their size on each side (and at least ``min_size`` pixels wide/high)."""
    p = landmarks[:, list(points)].float()
    lo, hi = p.min(dim=1).values, p.max(dim=1).values
    size = (hi - lo).clamp(min=min_size)
    centre = (lo + hi) / 2
    half = size * (0.5 + margin)
    return torch.cat([centre - half, centre + half], dim=1)


def box_mask(boxes: torch.Tensor, size: int, *, scale: float = 1.0) -> torch.Tensor:
    """(B, 4) boxes in pixels of a ``size / scale`` image -> (B, 1, size, size) float mask, 1 inside."""
    b = boxes.float() * scale
    coords = torch.arange(size, device=boxes.device, dtype=torch.float32) + 0.5
    inside_x = (coords[None] >= b[:, 0:1]) & (coords[None] < b[:, 2:3])   # (B, W)
    inside_y = (coords[None] >= b[:, 1:2]) & (coords[None] < b[:, 3:4])   # (B, H)
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()[:, None]


def region_mask(landmarks: torch.Tensor, size: int, regions: Sequence[Sequence[int]], *, scale: float = 1.0,
                margin: float = 0.25) -> torch.Tensor:
    """Union of the boxes of several landmark regions -> (B, 1, size, size) in {0, 1}."""
    m = torch.zeros(landmarks.shape[0], 1, size, size, device=landmarks.device)
    for pts in regions:
        m = torch.maximum(m, box_mask(landmark_boxes(landmarks, pts, margin), size, scale=scale))
    return m


def soft_mask(hard: torch.Tensor, floor: float, blur: int = 0) -> torch.Tensor:
    """``floor + (1 - floor) * hard`` (optionally box-blurred by ``blur`` pixels): weight 1 in the region,
    ``floor`` elsewhere (the paper's soft mask)."""
    m = hard
    if blur > 0:
        k = 2 * blur + 1
        m = F.avg_pool2d(F.pad(m, (blur,) * 4, mode="replicate"), k, stride=1)
    return floor + (1.0 - floor) * m


def crop_boxes(images: torch.Tensor, boxes: torch.Tensor, out: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear crops of ``boxes`` (B, 4) pixel (x0, y0, x1, y1) -> (B, C, oh, ow) (differentiable roi_align)."""
    oh, ow = (out, out) if isinstance(out, int) else out
    b, _, h, w = images.shape
    bx = boxes.float()
    # normalised grid coordinates (align_corners=False): pixel x -> (2x / W) - 1
    ys = torch.linspace(0, 1, oh, device=images.device)[None, :] * (bx[:, 3:4] - bx[:, 1:2]) + bx[:, 1:2]
    xs = torch.linspace(0, 1, ow, device=images.device)[None, :] * (bx[:, 2:3] - bx[:, 0:1]) + bx[:, 0:1]
    gy = (2 * ys / h - 1)[:, :, None].expand(b, oh, ow)
    gx = (2 * xs / w - 1)[:, None, :].expand(b, oh, ow)
    grid = torch.stack([gx, gy], dim=-1).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------------------------- SyncNet
class _SyncConv(nn.Module):
    """Wav2Lip ``Conv2d``: conv + BatchNorm (+ residual) + ReLU. Keys ``conv_block.0.*``, ``conv_block.1.*``."""

    def __init__(self, cin, cout, kernel, stride, padding, residual=False):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout))
        self.residual = residual

    def forward(self, x):
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return F.relu(out)


class SyncNet(nn.Module):
    """Wav2Lip ``SyncNet_color`` (lip-sync expert). ``width`` divides the channels (tests only).

    forward(mel (B,1,80,16), faces (B,15,48,96): lower halves of 5 RGB 96x96 mouth-region crops in [0,1],
    stacked on channels) -> (audio_emb, face_emb), each (B, 512/width) L2-normalised.
    """

    HINT = ("pass --syncnet PATH to Wav2Lip's lipsync_expert.pth (SyncNet_color), or set syncnet in the "
            "stage config")

    def __init__(self, width: int = 1):
        super().__init__()
        c = lambda n: max(1, n // width)  # noqa: E731
        face = [(15, c(32), 7, 1, 3, False),
                (c(32), c(64), 5, (1, 2), 1, False), (c(64), c(64), 3, 1, 1, True), (c(64), c(64), 3, 1, 1, True),
                (c(64), c(128), 3, 2, 1, False)] + [(c(128), c(128), 3, 1, 1, True)] * 3 + [
                (c(128), c(256), 3, 2, 1, False)] + [(c(256), c(256), 3, 1, 1, True)] * 2 + [
                (c(256), c(512), 3, 2, 1, False)] + [(c(512), c(512), 3, 1, 1, True)] * 2 + [
                (c(512), c(512), 3, 2, 1, False), (c(512), c(512), 3, 1, 0, False), (c(512), c(512), 1, 1, 0, False)]
        audio = [(1, c(32), 3, 1, 1, False)] + [(c(32), c(32), 3, 1, 1, True)] * 2 + [
                 (c(32), c(64), 3, (3, 1), 1, False)] + [(c(64), c(64), 3, 1, 1, True)] * 2 + [
                 (c(64), c(128), 3, 3, 1, False)] + [(c(128), c(128), 3, 1, 1, True)] * 2 + [
                 (c(128), c(256), 3, (3, 2), 1, False)] + [(c(256), c(256), 3, 1, 1, True)] * 2 + [
                 (c(256), c(512), 3, 1, 0, False), (c(512), c(512), 1, 1, 0, False)]
        self.face_encoder = nn.Sequential(*[_SyncConv(*a) for a in face])
        self.audio_encoder = nn.Sequential(*[_SyncConv(*a) for a in audio])

    @classmethod
    def from_file(cls, path) -> "SyncNet":
        net = cls()
        _load_strict(net, load_state_file(path, "SyncNet", cls.HINT), path, "Wav2Lip SyncNet_color", cls.HINT)
        return net

    def forward(self, mel: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.audio_encoder(mel).flatten(1)
        v = self.face_encoder(faces).flatten(1)
        return F.normalize(a, p=2, dim=1), F.normalize(v, p=2, dim=1)


SYNC_FACE = 96


def sync_faces(frames: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """frames (B, 5, 3, H, W) RGB in [-1, 1] and face boxes (B, 5, 4) -> SyncNet input (B, 15, 48, 96) in
    [0, 1]: 96x96 crops, lower half, BGR channel order (Wav2Lip trained on cv2.imread images), the 5 frames
    stacked on channels."""
    b, t = frames.shape[:2]
    crops = crop_boxes(frames.flatten(0, 1), boxes.flatten(0, 1), SYNC_FACE)       # (B*T, 3, 96, 96)
    crops = ((crops.flip(1) + 1) / 2).clamp(0, 1)[:, :, SYNC_FACE // 2:]
    return crops.reshape(b, t * 3, SYNC_FACE // 2, SYNC_FACE)


def sync_loss(syncnet: SyncNet, mel: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Eq. 8: BCE(cos(audio_emb, face_emb), 1) averaged over the batch (0 when perfectly in sync)."""
    a, v = syncnet(mel, faces)
    d = F.cosine_similarity(a, v).clamp(1e-7, 1.0)
    return F.binary_cross_entropy(d, torch.ones_like(d))


# --------------------------------------------------------------------------------------------- D
@dataclass(frozen=True)
class DiscriminatorConfig:
    size: int = 256
    channel_multiplier: int = 2
    max_channels: int = 512
    stddev_group: int = 4

    @classmethod
    def tiny(cls) -> "DiscriminatorConfig":
        return cls(size=64, channel_multiplier=1, max_channels=16)

    def channels(self, res: int) -> int:
        """rosinality's channel table (the generator's, :meth:`StyleGAN2Config.channels`), capped at ``max_channels``."""
        return min(StyleGAN2Config(channel_multiplier=self.channel_multiplier).channels(res), self.max_channels)


class Discriminator(nn.Module):
    """rosinality StyleGAN2 Discriminator (residual, minibatch-stddev). (B,3,S,S) -> (B,1) logits."""

    HINT = ("pass --discriminator PATH to a rosinality StyleGAN2 256x256 FFHQ discriminator state dict "
            "(the 'd' entry of a rosinality training checkpoint), or set discriminator in the stage config")

    def __init__(self, cfg: DiscriminatorConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or DiscriminatorConfig()
        log = int(math.log2(cfg.size))
        convs: list[nn.Module] = [ops.ConvLayer(3, cfg.channels(cfg.size), 1)]
        c_in = cfg.channels(cfg.size)
        for i in range(log, 2, -1):
            c_out = cfg.channels(2 ** (i - 1))
            convs.append(ops.ResBlock(c_in, c_out))
            c_in = c_out
        self.convs = nn.Sequential(*convs)
        self.stddev_feat = 1
        self.final_conv = ops.ConvLayer(c_in + 1, cfg.channels(4), 3)
        self.final_linear = nn.Sequential(ops.EqualLinear(cfg.channels(4) * 16, cfg.channels(4), activation=True),
                                          ops.EqualLinear(cfg.channels(4), 1))

    @classmethod
    def from_file(cls, path, cfg: DiscriminatorConfig | None = None) -> "Discriminator":
        net = cls(cfg)
        sd = load_state_file(path, "StyleGAN2 discriminator", cls.HINT, nested=("d", "state_dict"))
        _load_strict(net, sd, path, "rosinality StyleGAN2 Discriminator", cls.HINT)
        return net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs(x)
        b, c, h, w = out.shape
        group = min(b, self.cfg.stddev_group)
        while b % group:  # rosinality requires divisibility; fall back to a divisor of the batch
            group -= 1
        y = out.view(group, -1, self.stddev_feat, c // self.stddev_feat, h, w)
        y = torch.sqrt(y.var(0, unbiased=False) + 1e-8).mean([2, 3, 4], keepdim=True).squeeze(2)
        y = y.repeat(group, 1, h, w)
        out = self.final_conv(torch.cat([out, y], 1))
        return self.final_linear(out.flatten(1))


def adversarial_loss(disc: Discriminator, fake: torch.Tensor) -> torch.Tensor:
    """Eq. 13, generator side: mean softplus(-D(fake)) with the frozen discriminator; ``fake`` is resized
    (bilinear) to the discriminator's size like the official GANLoss."""
    s = disc.cfg.size
    if fake.shape[-1] != s:
        fake = F.interpolate(fake, size=(s, s), mode="bilinear", align_corners=False)
    return F.softplus(-disc(fake)).mean()


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
