"""The metric networks in pure PyTorch, loaded from weight files the user names.

torchvision 0.28.0 (the only release for torch 2.13.0) does not import beside this CPU torch build,
and ``lpips`` / ``torch-fidelity`` import torchvision, so the three networks are written here:

* :class:`LPIPSAlex` -- LPIPS v0.1 "alex" (Zhang et al. 2018): torchvision's AlexNet ``features``
  (file: ``alexnet-owt-7be5be79.pth``) + the five linear heads of the lpips package
  (``lpips/weights/v0.1/alex.pth``, keys ``lin{0..4}.model.1.weight``);
* :class:`FIDInception` -- the TF-Inception v3 of FID (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``,
  the same layout torch-fidelity loads), 2048-d pool features;
* :class:`ArcFaceIRSE50` -- the IR-SE50 ArcFace of StyleHEAT's identity loss (``model_ir_se50.pth``),
  built from the IR-SE blocks of :mod:`models.e4e`.

Every loader uses ``torch.load(weights_only=True)`` (never code) and raises :class:`WeightsFileError`
naming the file, the option and where its authors publish it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class WeightsInfo:
    key: str        # metric name
    option: str     # command-line option
    filename: str   # the file's usual name
    source: str     # where its authors publish it


WEIGHTS = {
    "alexnet": WeightsInfo("lpips", "--alexnet-weights", "alexnet-owt-7be5be79.pth",
                           "PyTorch's torchvision model zoo: https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "lpips_heads": WeightsInfo("lpips", "--lpips-heads", "alex.pth (lpips weights v0.1)",
                               "the lpips package (lpips/weights/v0.1/alex.pth; `pip install --no-deps lpips==0.1.4` "
                               "puts it in site-packages) or github.com/richzhang/PerceptualSimilarity"),
    "inception": WeightsInfo("fid", "--inception-weights", "pt_inception-2015-12-05-6726825d.pth",
                             "pytorch-fid's release 'fid_weights': https://github.com/mseitzer/pytorch-fid/releases/"
                             "download/fid_weights/pt_inception-2015-12-05-6726825d.pth (torch-fidelity's "
                             "weights-inception-2015-12-05-6726825d.pth has the same layout)"),
    "arcface": WeightsInfo("csim", "--arcface-weights", "model_ir_se50.pth",
                           "the pSp / e4e authors' IR-SE50 ArcFace (TreB1eN/InsightFace_Pytorch), linked from "
                           "github.com/eladrich/pixel2style2pixel under 'Pretrained Models'"),
}


class WeightsFileError(ValueError):
    """A metric's weight file is missing, unreadable or of the wrong layout (message names it)."""


def _where(name: str) -> str:
    info = WEIGHTS[name]
    return f"{info.filename}, from {info.source}"


def load_weights_file(path: str | Path | None, name: str) -> dict[str, torch.Tensor]:
    """A state dict of tensors from ``path`` (weights_only); WeightsFileError naming the file otherwise."""
    from models.weights import torch_load

    info = WEIGHTS[name]
    if path is None or str(path) == "":
        raise WeightsFileError(f"{info.key.upper()} needs {info.option} FILE: {_where(name)}")
    p = Path(path)
    if not p.is_file():
        raise WeightsFileError(f"{info.option} {p}: file not found (expected {_where(name)})")
    try:
        obj = torch_load(p)
    except Exception as e:  # UnpicklingError (code in the file), damaged zip, EOF, ...
        raise WeightsFileError(f"{info.option} {p}: cannot be loaded as plain PyTorch weights "
                               f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__}); "
                               f"expected {_where(name)}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsFileError(f"{info.option} {p}: not a state dict of tensors; expected {_where(name)}")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], name: str, path, *,
                 optional: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``module``; WeightsFileError on missing keys or wrong shapes."""
    info = WEIGHTS[name]
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(optional)]
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or wrong:
        what = (f"lacks {len(missing)} of {len(own)} weights (e.g. {', '.join(missing[:3])})" if missing else
                f"'{wrong[0][0]}' has shape {wrong[0][1]}, expected {wrong[0][2]}")
        raise WeightsFileError(f"{info.option} {path}: wrong file: it {what}; expected {_where(name)}")
    module.load_state_dict({k: state[k] for k in own if k in state}, strict=False)


# ------------------------------------------------------------------------------------------ LPIPS

ALEX_CHANNELS = (64, 192, 384, 256, 256)


def alexnet_features() -> nn.Sequential:
    """torchvision's AlexNet ``features`` (same indices, so ``features.N.*`` keys load)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))


class _Head(nn.Module):
    """lpips' NetLinLayer: (dropout) + 1x1 conv without bias; key ``model.1.weight``."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPSAlex(nn.Module):
    """LPIPS v0.1 with AlexNet: inputs (B, 3, H, W) in [-1, 1]; output (B,) distances."""

    TAPS = (2, 5, 8, 10, 12)  # feature index after relu1..relu5 (exclusive slice ends)
    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self):
        super().__init__()
        self.features = alexnet_features()
        self.heads = nn.ModuleList(_Head(c) for c in ALEX_CHANNELS)
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @classmethod
    def from_files(cls, alexnet_path, heads_path) -> "LPIPSAlex":
        net = cls()
        alex = load_weights_file(alexnet_path, "alexnet")
        feats = {k.removeprefix("features."): v for k, v in alex.items() if k.startswith("features.")}
        _load_strict(net.features, feats, "alexnet", alexnet_path)
        heads = load_weights_file(heads_path, "lpips_heads")
        mapped = {f"{i}.model.1.weight": heads.get(f"lin{i}.model.1.weight") for i in range(5)}
        _load_strict(net.heads, {k: v for k, v in mapped.items() if v is not None}, "lpips_heads", heads_path)
        return net

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for end in self.TAPS:
            for layer in self.features[start:end]:
                x = layer(x)
            out.append(x)
            start = end
        return out

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa = self._taps((a - self.shift) / self.scale)
        fb = self._taps((b - self.shift) / self.scale)
        total = 0.0
        for head, x, y in zip(self.heads, fa, fb):
            x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + head.model[1]((x - y) ** 2).mean(dim=(2, 3))
        return total.view(-1)


def uint8_to_pm1(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) or (H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    x = torch.from_numpy(np.array(images, dtype=np.float32))  # a copy: the input may be read-only
    if x.dim() == 3:
        x = x[None]
    return x.permute(0, 3, 1, 2) / 127.5 - 1.0


# ------------------------------------------------------------------------------------------ FID Inception

class _Conv(nn.Module):
    """conv (no bias) -> BN (eps 1e-3) -> ReLU; keys conv.weight, bn.*"""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class _BlockA(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class _BlockB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class _BlockC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        h, v = ((1, 7), (0, 3)), ((7, 1), (3, 0))
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = _Conv(cin, c7, 1), _Conv(c7, c7, h[0], padding=h[1])
        self.branch7x7_3 = _Conv(c7, 192, v[0], padding=v[1])
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, v[0], padding=v[1])
        self.branch7x7dbl_3 = _Conv(c7, c7, h[0], padding=h[1])
        self.branch7x7dbl_4 = _Conv(c7, c7, v[0], padding=v[1])
        self.branch7x7dbl_5 = _Conv(c7, 192, h[0], padding=h[1])
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class _BlockD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        d = x
        for i in range(1, 5):
            d = getattr(self, f"branch7x7x3_{i}")(d)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), d, F.max_pool2d(x, 3, 2)], 1)


class _BlockE(nn.Module):
    def __init__(self, cin, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        p = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b, d, self.branch_pool(p)], 1)


class FIDInception(nn.Module):
    """FID's TF-Inception v3 up to the 2048-d average pool. Input: (N, H, W, 3) uint8 via :meth:`features`."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _BlockA(192, 32), _BlockA(256, 64), _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b, self.Mixed_6c = _BlockC(768, 128), _BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _BlockC(768, 160), _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b, self.Mixed_7c = _BlockE(1280, max_pool=False), _BlockE(2048, max_pool=True)
        self.eval()

    @classmethod
    def from_file(cls, path) -> "FIDInception":
        net = cls()
        state = load_weights_file(path, "inception")
        _load_strict(net, state, "inception", path, optional=("num_batches_tracked",))
        return net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 299, 299) in [-1, 1] -> (N, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, 2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, 2048) float64: bilinear resize to 299 (no antialias), (x-128)/128."""
        dev = next(self.parameters()).device
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).float().permute(0, 3, 1, 2)
            x = F.interpolate(x.to(dev), size=(299, 299), mode="bilinear", align_corners=False)
            out.append(self((x - 128.0) / 128.0).double().cpu().numpy())
        return np.concatenate(out, 0) if out else np.zeros((0, 2048))


# ------------------------------------------------------------------------------------------ ArcFace

IR_SE50_STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))


class ArcFaceIRSE50(nn.Module):
    """IR-SE50 ArcFace (input 112x112 in [-1, 1]) -> 512-d embedding, as StyleHEAT's identity loss."""

    def __init__(self, stages=IR_SE50_STAGES, input_size: int = 112):
        super().__init__()
        from models.e4e import BottleneckIR, ir_stem

        self.input_layer = ir_stem(3, 64)
        units = []
        for cin, depth, n in stages:
            units.append(BottleneckIR(cin, depth, 2, se_reduction=16))
            units += [BottleneckIR(depth, depth, 1, se_reduction=16) for _ in range(n - 1)]
        self.body = nn.Sequential(*units)
        side = input_size // 16
        last = stages[-1][1]
        self.output_layer = nn.Sequential(nn.BatchNorm2d(last), nn.Dropout(0.6), nn.Flatten(),
                                          nn.Linear(last * side * side, 512), nn.BatchNorm1d(512))
        self.eval()

    @classmethod
    def from_file(cls, path) -> "ArcFaceIRSE50":
        net = cls()
        _load_strict(net, load_weights_file(path, "arcface"), "arcface", path, optional=("num_batches_tracked",))
        return net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.body(self.input_layer(x)))

    @torch.no_grad()
    def embed(self, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """(N, H, W, 3) uint8 FFHQ-aligned faces -> (N, 512) unit embeddings.

        As the official identity loss: resize to 256, keep rows 35..222 and columns 32..219 (the face),
        average-pool to 112x112.
        """
        dev = next(self.parameters()).device
        out = []
        for i in range(0, len(images), batch_size):
            x = uint8_to_pm1(images[i:i + batch_size]).to(dev)
            if x.shape[-1] != 256:
                x = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False, antialias=True)
            x = F.adaptive_avg_pool2d(x[:, :, 35:223, 32:220], (112, 112))
            e = self(x)
            out.append(F.normalize(e, dim=1).double().cpu().numpy())
        return np.concatenate(out, 0) if out else np.zeros((0, 512))
