"""Deep3DFaceRecon's coefficient regressor (``ReconNetWrapper('resnet50', use_last_fc=False)``).

A ResNet-50 (torchvision layout, stride on the 3x3 conv of each bottleneck) without its classifier,
followed by seven 1x1 convolutions whose outputs are concatenated into the 257 BFM coefficients::

    id 0:80 | exp 80:144 | tex 144:224 | angle 224:227 | gamma 227:254 | trans 254:257

Input: (N, 3, 224, 224) float32 RGB in [0, 1] (no mean/std normalisation), the ``align_img`` crop.
Output: (N, 257) float32.

State-dict keys match the official ``net_recon`` entry of ``checkpoints/Deep3D/epoch_20.pth``:
``backbone.conv1``, ``backbone.bn1``, ``backbone.layer{1..4}.{i}.{conv,bn}{1,2,3}``,
``backbone.layer{k}.0.downsample.{0,1}``, ``final_layers.{0..6}``. Pure PyTorch, no file I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: (name, size) of the coefficient groups, in the order of ``final_layers``.
COEFF_GROUPS: tuple[tuple[str, int], ...] = (
    ("id", 80), ("exp", 64), ("tex", 80), ("angle", 3), ("gamma", 27), ("trans_xy", 2), ("trans_z", 1),
)
#: slices of the 257-vector, by name (trans = the last 3 values).
COEFF_SLICES: dict[str, slice] = {
    "id": slice(0, 80), "exp": slice(80, 144), "tex": slice(144, 224), "angle": slice(224, 227),
    "gamma": slice(227, 254), "trans": slice(254, 257),
}
NUM_COEFFS = 257


@dataclass(frozen=True)
class Deep3DConfig:
    """ResNet depth per stage and base width. ``Deep3DConfig()`` is the official ResNet-50."""

    blocks: tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64
    outputs: tuple[int, ...] = tuple(n for _, n in COEFF_GROUPS)

    @classmethod
    def tiny(cls) -> "Deep3DConfig":
        """One bottleneck per stage, base width 8 (for fast tests; same output size 257)."""
        return cls(blocks=(1, 1, 1, 1), width=8)

    @property
    def feature_dim(self) -> int:
        return self.width * 8 * Bottleneck.expansion


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 with BatchNorm, residual, ReLU. (N, cin, H, W) -> (N, 4*planes, H/s, W/s)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + skip)


class ResNetBackbone(nn.Module):
    """ResNet trunk without the classifier: (N, 3, H, W) -> (N, feature_dim, 1, 1) (global average pool)."""

    def __init__(self, config: Deep3DConfig):
        super().__init__()
        w = config.width
        self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = w
        for stage, count in enumerate(config.blocks):
            planes = w * 2 ** stage
            blocks = []
            for i in range(count):
                stride = 2 if (i == 0 and stage > 0) else 1
                blocks.append(Bottleneck(cin, planes, stride))
                cin = planes * Bottleneck.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x)


class ReconNet(nn.Module):
    """The 3DMM coefficient regressor. forward: (N, 3, 224, 224) in [0, 1] -> (N, 257)."""

    def __init__(self, config: Deep3DConfig | None = None):
        super().__init__()
        self.config = config or Deep3DConfig()
        self.backbone = ResNetBackbone(self.config)
        self.final_layers = nn.ModuleList(
            nn.Conv2d(self.config.feature_dim, n, 1, bias=True) for n in self.config.outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Average-pooled backbone features, (N, feature_dim)."""
        return torch.flatten(self.backbone(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ReconNet expects (N, 3, H, W) images, got shape {tuple(x.shape)}")
        f = self.backbone(x)
        return torch.flatten(torch.cat([layer(f) for layer in self.final_layers], dim=1), 1)
