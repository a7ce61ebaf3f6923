"""Deep3DFaceRecon preprocessing and the 3DMM regressor, as StyleHEAT's ``Extract3dmm`` runs them.

Pipeline for one 256x256 RGB face image and its 68 landmarks (x right, y down, pixels)::

    lm68 --(y flip: y -> 255 - y)--> lm68 (y up) --extract_5p--> 5 points
    5 points + the BFM standard 5-point face --POS least squares--> translation t, scale s
    image --resize(int32(256 s), BICUBIC)--> --crop 224 at the projected origin--> image_224
    image_224 / 255 (no mean/std) --ReconNet--> 257 coefficients
    row_73 = [exp 80:144, angle 224:227, trans 254:257, crop = (s, t0, t1)]

``trans_params`` = [w0, h0, s, t0, t1] (float32); (t0, t1) are pixels of the 256 image, y measured
upward from the bottom row. Every step follows ``util/preprocess.py`` of Deep3DFaceRecon_pytorch (the
copy in StyleHEAT's ``third_part``) bit for bit; see the reference README (section 7). The image
resampling is Pillow's, which is what the official code calls.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.deep3d import Deep3DConfig, ReconNet
from models.ops import state_dict_mismatch

#: relative paths inside a StyleHEAT ``checkpoints`` folder
DEEP3D_CHECKPOINT = Path("Deep3D") / "epoch_20.pth"
BFM_LANDMARKS = Path("BFM") / "similarity_Lm3D_all.mat"

#: The BFM standard face's 5 landmarks (left eye, right eye, nose tip, mouth corners), 3-D, as
#: ``load_lm3d`` reduces ``similarity_Lm3D_all.mat`` (a public file of Deep3DFaceRecon_pytorch's BFM
#: folder, identical in SadTalker). Used when the .mat file is not in the checkpoints folder; a test
#: checks these values against the reference vectors' ``lm3d_std``.
STANDARD_LM5_3D = np.array([
    [-0.31148657, 0.29036078, 0.13377953],
    [0.30979887, 0.28972036, 0.13179526],
    [0.0032534988, -0.046179324, 0.55244243],
    [-0.25216928, -0.38133916, 0.22405732],
    [0.2484662, -0.38128236, 0.22235769],
], dtype=np.float32)

TARGET_SIZE = 224
RESCALE_FACTOR = 102.0
WORK_SIZE = 256  # StyleHEAT resizes every face image to 256x256 before align_img


# --------------------------------------------------------------------------------------------
# BFM standard landmarks
# --------------------------------------------------------------------------------------------

def reduce_to_5(points68: np.ndarray) -> np.ndarray:
    """68 points (iBUG order) -> 5: [left-eye centre, right-eye centre, nose tip, mouth left, mouth right].

    Eye centres are the means of the eye corners (1-based iBUG 37/40 and 43/46); nose tip 31; mouth
    corners 49 and 55. Works on 2-D or 3-D points and keeps their dtype (as ``extract_5p``/``load_lm3d``).
    """
    p = np.asarray(points68)
    if p.ndim != 2 or p.shape[0] != 68:
        raise ValueError(f"expected 68 landmarks, got array of shape {p.shape}")
    return np.stack([np.mean(p[[36, 39]], axis=0), np.mean(p[[42, 45]], axis=0), p[30], p[48], p[54]], axis=0)


def load_standard_lm5(checkpoints: str | os.PathLike | None = None) -> np.ndarray:
    """(5, 3) float32 standard landmarks from ``<checkpoints>/BFM/similarity_Lm3D_all.mat`` if present,
    else the built-in copy (:data:`STANDARD_LM5_3D`). A damaged or wrong file raises :class:`CheckpointError`."""
    if checkpoints is not None:
        path = Path(checkpoints) / BFM_LANDMARKS
        if path.is_file():
            from scipy.io import loadmat

            try:
                mat = loadmat(str(path))
            except Exception as exc:  # noqa: BLE001 - MatReadError, ValueError, ... on damaged files
                raise CheckpointError(f"{path} cannot be read as a MATLAB file ({exc}); delete it (the built-in "
                                      f"landmarks are used then) or re-download it with 'styleheat download "
                                      f"--only bfm --force'") from None
            if "lm" not in mat:
                raise CheckpointError(f"{path} has no 'lm' variable; is this Deep3DFaceRecon's "
                                      f"similarity_Lm3D_all.mat? ('styleheat download --only bfm --force')")
            lm = np.asarray(mat["lm"])
            if lm.shape != (68, 3):
                raise CheckpointError(f"{path}: 'lm' has shape {lm.shape}, expected (68, 3); "
                                      "is this Deep3DFaceRecon's similarity_Lm3D_all.mat?")
            return reduce_to_5(lm)
    return STANDARD_LM5_3D.copy()


# --------------------------------------------------------------------------------------------
# align_img
# --------------------------------------------------------------------------------------------

def pos(points2d: np.ndarray, points3d: np.ndarray) -> tuple[np.ndarray, float]:
    """Scaled-orthographic fit of 2-D points (n, 2, y up) to 3-D points (n, 3).

    Solves the 2n x 8 linear least squares [X 1 0 0; 0 0 X 1] k = (x, y) interleaved; returns
    translation t = (k[3], k[7]) and scale (|k[0:3]| + |k[4:7]|) / 2.
    """
    x2 = np.asarray(points2d)
    x3 = np.asarray(points3d)
    n = x2.shape[0]
    a = np.zeros((2 * n, 8))
    a[0::2, 0:3] = x3
    a[0::2, 3] = 1
    a[1::2, 4:7] = x3
    a[1::2, 7] = 1
    b = x2.reshape(2 * n, 1)
    k = np.linalg.lstsq(a, b, rcond=None)[0][:, 0]
    scale = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2
    return np.array([k[3], k[7]]), float(scale)


@dataclass
class AlignedFace:
    """Result of :func:`align_img`."""

    trans_params: np.ndarray  # (5,) float32 [w0, h0, s, t0, t1]
    image: np.ndarray         # (224, 224, 3) uint8 RGB
    landmarks: np.ndarray     # (68, 2) float64 in the 224 crop, y up
    lm5p: np.ndarray          # (5, 2) the fitted points (y up, source pixels)

    @property
    def crop(self) -> np.ndarray:
        """(3,) float32 [s, t0, t1]: the last three values of the 73-value row."""
        return self.trans_params[2:5].copy()


def align_img(image: np.ndarray, lm68_yup: np.ndarray, lm3d: np.ndarray | None = None) -> AlignedFace:
    """Deep3D's ``align_img`` on an RGB uint8 image with 68 landmarks in y-up pixel coordinates.

    ``lm68_yup`` may also be (5, 2) (already reduced). Pixels of the crop outside the resized image are black.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"align_img expects an (H, W, 3) uint8 RGB image, got {img.dtype} {img.shape}")
    lm = np.asarray(lm68_yup)
    if not np.all(np.isfinite(lm)):
        raise ValueError("align_img: landmarks contain NaN or inf")
    lm3d = STANDARD_LM5_3D if lm3d is None else np.asarray(lm3d)
    h0, w0 = img.shape[:2]
    lm5p = lm if lm.shape[0] == 5 else reduce_to_5(lm)
    t, s_pos = pos(lm5p, lm3d)
    s = RESCALE_FACTOR / s_pos
    # the official code does these casts with numpy int32 (truncation toward zero)
    w = int(np.int32(w0 * s))
    h = int(np.int32(h0 * s))
    left = int(np.int32(w / 2 - TARGET_SIZE / 2 + float((t[0] - w0 / 2) * s)))
    up = int(np.int32(h / 2 - TARGET_SIZE / 2 + float((h0 / 2 - t[1]) * s)))
    pil = Image.fromarray(img)
    resized = pil.resize((w, h), resample=Image.BICUBIC)
    cropped = np.asarray(resized.crop((left, up, left + TARGET_SIZE, up + TARGET_SIZE)))
    lm64 = lm.astype(np.float64)  # the official t is a (1,)-array, so this arithmetic is float64
    new_lm = np.stack([lm64[:, 0] - t[0] + w0 / 2, lm64[:, 1] - t[1] + h0 / 2], axis=1) * s
    new_lm = new_lm - np.array([w / 2 - TARGET_SIZE / 2, h / 2 - TARGET_SIZE / 2]).reshape(1, 2)
    trans = np.array([w0, h0, s, t[0], t[1]], dtype=np.float64).astype(np.float32)
    return AlignedFace(trans, np.ascontiguousarray(cropped, dtype=np.uint8), new_lm, lm5p)


def flip_y(lm68: np.ndarray, height: int = WORK_SIZE) -> np.ndarray:
    """y-down landmarks -> y-up (``y -> height - 1 - y``), as a new array (the official code does it in place)."""
    out = np.array(lm68, copy=True)
    out[:, -1] = height - 1 - out[:, -1]
    return out


def resize_nearest_256(image: np.ndarray) -> np.ndarray:
    """StyleHEAT's ``image.resize((256, 256))`` with Pillow's NEAREST (the pinned Pillow's default)."""
    img = np.asarray(image)
    if img.shape[:2] == (WORK_SIZE, WORK_SIZE):
        return np.ascontiguousarray(img)
    return np.asarray(Image.fromarray(img).resize((WORK_SIZE, WORK_SIZE), resample=Image.NEAREST))


def network_input(images_224: np.ndarray) -> torch.Tensor:
    """(N, 224, 224, 3) or (224, 224, 3) uint8 -> (N, 3, 224, 224) float32 in [0, 1]."""
    arr = np.asarray(images_224)
    if arr.ndim == 3:
        arr = arr[None]
    return torch.tensor(arr / 255.0, dtype=torch.float32).permute(0, 3, 1, 2).contiguous()


def row73(coeff_257: np.ndarray, crop: np.ndarray) -> np.ndarray:
    """(N, 257) coefficients + (N, 3) crop -> (N, 73) float32 [exp 64 | angle 3 | trans 3 | crop 3]."""
    c = np.asarray(coeff_257, dtype=np.float32).reshape(-1, 257)
    cr = np.asarray(crop, dtype=np.float32).reshape(-1, 3)
    if len(cr) != len(c):
        raise ValueError(f"row73: {len(c)} coefficient rows but {len(cr)} crop rows")
    return np.concatenate([c[:, 80:144], c[:, 224:227], c[:, 254:257], cr], axis=1)


# --------------------------------------------------------------------------------------------
# Regressor loading
# --------------------------------------------------------------------------------------------

class CheckpointError(ValueError):
    """A Deep3D checkpoint is missing, unreadable or does not have the official layout."""


def load_net_recon_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``net_recon`` state dict of an official ``epoch_20.pth`` (weights only, no code executed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Deep3D checkpoint not found: {path}. Download Deep3DFaceRecon's epoch_20.pth "
                              f"(StyleHEAT's checkpoints/Deep3D/epoch_20.pth) and put it there.")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - reported with the file name
        raise CheckpointError(f"cannot read Deep3D checkpoint {path}: {exc}") from exc
    if isinstance(ckpt, dict) and "net_recon" in ckpt:
        state = ckpt["net_recon"]
    elif isinstance(ckpt, dict) and any(str(k).startswith("backbone.") for k in ckpt):
        state = ckpt  # a bare state dict (e.g. extracted by hand)
    else:
        keys = list(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} has no 'net_recon' entry (top-level keys: {keys}); "
                              "expected Deep3DFaceRecon's epoch_20.pth")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'net_recon' is a {type(state).__name__}, not a state dict; "
                              "expected Deep3DFaceRecon's epoch_20.pth")
    return dict(state)


def build_regressor(state: dict[str, torch.Tensor], *, source: str = "state dict",
                    config: Deep3DConfig | None = None) -> ReconNet:
    """ReconNet with ``state`` loaded strictly; a mismatch raises :class:`CheckpointError` naming the keys."""
    net = ReconNet(config)
    mismatch = state_dict_mismatch(net, state)
    if mismatch:
        missing, unexpected = mismatch.missing, mismatch.unexpected
        wrong = [f"{k} {got} != {want}" for k, got, want in mismatch.misshaped]
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape (e.g. {wrong[:2]})")
        raise CheckpointError(f"{source} does not match Deep3D's ReconNet (ResNet-50, 257 outputs): "
                              + "; ".join(parts))
    net.load_state_dict(state, strict=True)
    return net.eval()


class Deep3DExtractor:
    """Regressor + preprocessing: 256x256 face images and landmarks -> 73-value rows."""

    def __init__(self, net: ReconNet, lm3d: np.ndarray | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 16):
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.lm3d = STANDARD_LM5_3D if lm3d is None else np.asarray(lm3d)
        self.batch_size = batch_size

    @classmethod
    def from_checkpoints(cls, checkpoints: str | os.PathLike, device: str | torch.device = "cpu") -> "Deep3DExtractor":
        """Load ``<checkpoints>/Deep3D/epoch_20.pth`` (and ``BFM/similarity_Lm3D_all.mat`` if present)."""
        path = Path(checkpoints) / DEEP3D_CHECKPOINT
        net = build_regressor(load_net_recon_state(path), source=str(path))
        return cls(net, load_standard_lm5(checkpoints), device)

    def align(self, image_256: np.ndarray, lm68_ydown: np.ndarray) -> AlignedFace:
        """One 256x256 image and its y-down landmarks -> the 224 crop."""
        img = np.asarray(image_256)
        if img.shape[:2] != (WORK_SIZE, WORK_SIZE):
            raise ValueError(f"Deep3D preprocessing expects a 256x256 image, got {img.shape}")
        return align_img(img, flip_y(lm68_ydown, WORK_SIZE), self.lm3d)

    @torch.no_grad()
    def coefficients(self, images_224: np.ndarray) -> np.ndarray:
        """(N, 224, 224, 3) uint8 -> (N, 257) float32, in batches."""
        out = []
        for i in range(0, len(images_224), self.batch_size):
            x = network_input(images_224[i:i + self.batch_size]).to(self.device)
            out.append(self.net(x).float().cpu().numpy())
        return np.concatenate(out, 0) if out else np.zeros((0, 257), np.float32)

    def rows(self, images_256: list[np.ndarray] | np.ndarray, lm68_ydown: np.ndarray) -> np.ndarray:
        """N 256x256 images + (N, 68, 2) y-down landmarks -> (N, 73) rows."""
        aligned = [self.align(im, lm) for im, lm in zip(images_256, lm68_ydown)]
        coeffs = self.coefficients(np.stack([a.image for a in aligned]))
        return row73(coeffs, np.stack([a.crop for a in aligned]))
