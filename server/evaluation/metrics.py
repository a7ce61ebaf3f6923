"""Closed-form metrics of Table 2: PSNR, SSIM, Frechet distance, cosine similarity, AED and APD.

Conventions (stated in docs/evaluation.md):

* images are (H, W, 3) uint8 RGB; PSNR and SSIM use ``data_range = 255``;
* SSIM is scikit-image's ``structural_similarity`` with its default 7x7 uniform window
  (``win_size=7``, ``gaussian_weights=False``, K1 0.01, K2 0.03), per channel, averaged over RGB;
* AED / APD follow PIRenderer: the mean absolute (L1) difference of Deep3D expression (64 values)
  and pose (3 angles in radians + 3 translation values) coefficients, averaged over the coefficients
  and then over frames. ``distance="l2"`` gives the per-frame Euclidean norm instead.
"""
from __future__ import annotations

import numpy as np

SSIM_WINDOW = 7
DATA_RANGE = 255.0

EXP = slice(0, 64)      # columns of a 73-value motion row
POSE = slice(64, 70)    # angle (3) + translation (3)

SQRTM_TOLERANCE = 1e-5  # relative residual ||R R - S1 S2|| / ||S1 S2|| accepted from scipy's sqrtm
REGULARISATION = 1e-6   # diagonal offset added to both covariances when it is not met


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected two (H, W, 3) images of one size, got {a.shape} and {b.shape}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels (data range 255); inf if equal."""
    a, b = _pair(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(DATA_RANGE ** 2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """scikit-image SSIM, 7x7 uniform window, data range 255, mean over the three channels."""
    from skimage.metrics import structural_similarity

    a, b = _pair(a, b)
    return float(structural_similarity(a, b, win_size=SSIM_WINDOW, gaussian_weights=False,
                                       data_range=DATA_RANGE, channel_axis=2))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D) for a covariance, got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm_checked(m: np.ndarray) -> tuple[np.ndarray, float]:
    """scipy's sqrtm of ``m`` without its warnings, and the relative residual ||R R - m|| / ||m||."""
    import warnings

    from scipy import linalg

    with warnings.catch_warnings():
        # "Matrix is singular ...": covariances of fewer samples than dimensions, or of features that are
        # always 0 (dead ReLUs), are singular; the residual below says whether the root is usable.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        root = linalg.sqrtm(m)
    if not np.isfinite(root).all():
        return root, float("inf")
    scale = max(float(np.linalg.norm(m)), 1e-300)
    return root, float(np.linalg.norm(root @ root - m) / scale)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) (Heusel et al. 2017), sqrtm from scipy.linalg.

    Singular covariances (fewer frames than feature dimensions, features that are always 0) make
    scipy warn "Matrix is singular"; that warning is not passed on. Instead the root is checked
    (relative residual of R R against S1 S2 below 1e-5) and, when it fails, computed again with a
    small diagonal offset (1e-6, as the reference implementations do). The imaginary part left by
    round-off is dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: {mu1.shape} {s1.shape} vs {mu2.shape} {s2.shape}")
    covmean, residual = _sqrtm_checked(s1 @ s2)
    if residual > SQRTM_TOLERANCE:
        eps = REGULARISATION * np.eye(s1.shape[0])
        covmean, residual = _sqrtm_checked((s1 + eps) @ (s2 + eps))
        if not np.isfinite(covmean).all():
            raise ValueError("Frechet distance: the covariance product has no usable square root even with a "
                             f"{REGULARISATION:g} diagonal offset (are the features finite?)")
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean), 0.0))


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID of two feature sets. With fewer samples than dimensions (short runs) the covariances have
    rank < D and Tr sqrtm(S1 S2) equals the sum of the singular values of A B^T / sqrt((n1-1)(n2-1))
    (A, B the centred features): exact, and seconds instead of minutes of a singular 2048x2048 sqrtm."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if min(len(a), len(b)) > a.shape[1]:
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))
    feature_statistics(a), feature_statistics(b)  # shape checks
    ca, cb = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    diff = a.mean(0) - b.mean(0)
    tr = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt(na * nb)
    return float(max(diff @ diff + (ca ** 2).sum() / na + (cb ** 2).sum() / nb - 2.0 * tr, 0.0))


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) embedding arrays (or two vectors)."""
    a, b = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in shape: {a.shape} vs {b.shape}")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(na * nb, 1e-12)


def motion_distance(pred: np.ndarray, target: np.ndarray, columns: slice, distance: str = "l1") -> np.ndarray:
    """Per-frame distance of the ``columns`` of two (N, >=70) coefficient arrays.

    ``l1``: mean absolute difference over the coefficients; ``l2``: Euclidean norm of the difference.
    """
    p, t = np.atleast_2d(np.asarray(pred, np.float64)), np.atleast_2d(np.asarray(target, np.float64))
    if p.shape != t.shape or p.shape[1] < columns.stop:
        raise ValueError(f"coefficient arrays must have one shape with >= {columns.stop} columns, "
                         f"got {p.shape} and {t.shape}")
    d = p[:, columns] - t[:, columns]
    if distance == "l1":
        return np.abs(d).mean(axis=1)
    if distance == "l2":
        return np.sqrt((d ** 2).sum(axis=1))
    raise ValueError(f"distance must be 'l1' or 'l2', got {distance!r}")


def aed(pred: np.ndarray, target: np.ndarray, distance: str = "l1") -> np.ndarray:
    """Average expression distance per frame (expression: row columns 0..63)."""
    return motion_distance(pred, target, EXP, distance)


def apd(pred: np.ndarray, target: np.ndarray, distance: str = "l1") -> np.ndarray:
    """Average pose distance per frame (pose: row columns 64..69, angles then translation)."""
    return motion_distance(pred, target, POSE, distance)
