"""Latent attribute edits (InterFaceGAN age/pose, GANSpace beard/lip) and the official HFGI edit procedure.

The edits are pure tensor functions on W+ codes (B, n_latent, style_dim). ``strength`` may be a float
or a (B,) tensor, so it can vary per frame; a single code (B = 1) with N strengths gives N codes.
Semantics of the official ``LatentEditor.edit_style_code`` (reference README quirk 19):

* InterFaceGAN ('young', 'old', 'pose'): ``w + strength * direction`` on every layer; ``direction`` is
  the official ``age.pt`` / ``pose.pt`` tensor ((512,), (1, 512) or (n_latent, 512)). Recommended
  strengths: young -5, old +5.
* GANSpace ('beard', 'lip'): with ``c = <w[0] - mean, comp[idx]> / std[idx]`` -- the coordinate of
  **layer 0** only -- add ``(strength - c) * comp[idx] * std[idx]`` to layers ``start:end``. ``strength``
  is therefore the *target* coordinate, not an increment. Official (idx, start, end): beard
  (58, 7, 9), lip (34, 10, 11); recommended strengths beard -20, lip +20. ``pca`` is the official
  ``ffhq_pca.pt`` dict {'mean', 'comp', 'std'}.

:func:`hfgi_edit` is the official ``HFGI.edit``: edit the code, render it, and decode it with the
**original** residual ``res`` of the unedited encode. The official ``inference.py attribute_edit`` uses
strength ``factor / num_batches * (batch_index + 1)`` (:func:`official_schedule_strength`) and applies
the edit computed at batch ``i`` to batch ``i + 1``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from models import hfgi
from models.stylegan2 import Generator


class GanspaceDirection(NamedTuple):
    index: int   # principal component
    start: int   # first W+ layer edited
    end: int     # one past the last layer edited


GANSPACE_DIRECTIONS: dict[str, GanspaceDirection] = {
    "beard": GanspaceDirection(58, 7, 9),
    "lip": GanspaceDirection(34, 10, 11),
}
INTERFACEGAN_CHOICES = ("young", "old", "pose")
CHOICES = ("young", "old", "pose", "beard", "lip")
RECOMMENDED_STRENGTH = {"young": -5.0, "old": 5.0, "beard": -20.0, "lip": 20.0}


def per_sample_strength(strength: float | torch.Tensor, wplus: torch.Tensor) -> torch.Tensor:
    """``strength`` as a (B,) tensor on wplus's device/dtype (B = wplus batch; or N when wplus has
    batch 1 and ``strength`` has N entries, one per frame)."""
    s = torch.as_tensor(strength, dtype=wplus.dtype, device=wplus.device)
    if s.ndim == 0:
        return s.expand(wplus.shape[0])
    if s.ndim == 1 and (wplus.shape[0] == 1 or s.shape[0] == wplus.shape[0]):
        return s
    raise ValueError(f"strength must be a float or a ({wplus.shape[0]},) tensor (one per code), "
                     f"got shape {tuple(s.shape)}")


def _broadcast(strength: float | torch.Tensor, wplus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(strength (B,), wplus (B, L, D)); a single code is expanded to N per-frame strengths."""
    s = per_sample_strength(strength, wplus)
    if s.shape[0] != wplus.shape[0]:
        wplus = wplus.expand(s.shape[0], -1, -1)
    return s, wplus


def _check_wplus(wplus: torch.Tensor) -> None:
    if not isinstance(wplus, torch.Tensor) or wplus.ndim != 3:
        raise ValueError(f"wplus must be a W+ code of shape (B, n_latent, style_dim), "
                         f"got {getattr(wplus, 'shape', type(wplus).__name__)}")


def interfacegan_edit(wplus: torch.Tensor, direction: torch.Tensor, strength: float | torch.Tensor) -> torch.Tensor:
    """``wplus + strength * direction`` (all layers). wplus (B, L, D); direction (D,), (1, D) or (L, D)."""
    _check_wplus(wplus)
    direction = direction.to(device=wplus.device, dtype=wplus.dtype)
    if direction.shape[-1] != wplus.shape[-1] or direction.ndim > 2:
        raise ValueError(f"direction must have shape ({wplus.shape[-1]},), (1, {wplus.shape[-1]}) or "
                         f"({wplus.shape[1]}, {wplus.shape[-1]}), got {tuple(direction.shape)}")
    s, wplus = _broadcast(strength, wplus)
    return wplus + s.view(-1, 1, 1) * direction


def ganspace_coordinate(wplus: torch.Tensor, pca: Mapping[str, torch.Tensor], index: int) -> torch.Tensor:
    """(B,) layer-0 GANSpace coordinate ``<w[0] - mean[0], comp[index]> / std[index]`` (official rule)."""
    kw = dict(device=wplus.device, dtype=wplus.dtype)
    mean = torch.broadcast_to(pca["mean"].to(**kw), wplus.shape[1:])
    comp = pca["comp"][index].to(**kw).reshape(-1)
    return ((wplus[:, 0] - mean[0]) * comp).sum(dim=-1) / pca["std"][index].to(**kw).reshape(())


def ganspace_edit(wplus: torch.Tensor, pca: Mapping[str, torch.Tensor], direction: GanspaceDirection,
                  strength: float | torch.Tensor) -> torch.Tensor:
    """Set the layer-0 GANSpace coordinate ``direction.index`` to ``strength`` on layers start:end.

    wplus (B, L, D); pca = {'mean': broadcastable to (L, D), 'comp': (K, 1, D) or (K, D), 'std': (K,)}.
    """
    _check_wplus(wplus)
    missing = {"mean", "comp", "std"} - set(pca)
    if missing:
        raise ValueError(f"pca must hold 'mean', 'comp' and 'std' (official ffhq_pca.pt); missing {sorted(missing)}")
    idx, start, end = direction
    if idx >= len(pca["comp"]) or not 0 <= start < end <= wplus.shape[1]:
        raise ValueError(f"GANSpace direction {tuple(direction)} does not fit pca with {len(pca['comp'])} "
                         f"components and {wplus.shape[1]} layers")
    kw = dict(device=wplus.device, dtype=wplus.dtype)
    comp = pca["comp"][idx].to(**kw).reshape(-1)           # (D,)
    std = pca["std"][idx].to(**kw).reshape(())              # scalar
    s, wplus = _broadcast(strength, wplus)
    delta = (s - ganspace_coordinate(wplus, pca, idx)).view(-1, 1) * comp * std   # (B, D)
    out = wplus.clone()
    out[:, start:end] = out[:, start:end] + delta.unsqueeze(1)
    return out


def edit_latent(wplus: torch.Tensor, choice: str, strength: float | torch.Tensor, *,
                age_direction: torch.Tensor | None = None, pose_direction: torch.Tensor | None = None,
                pca: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Official ``LatentEditor.edit_style_code``: choice in young/old (age), pose, beard/lip (GANSpace)."""
    if choice in ("young", "old"):
        if age_direction is None:
            raise ValueError(f"edit {choice!r} needs the InterFaceGAN age direction (interfacegan_directions/age.pt)")
        return interfacegan_edit(wplus, age_direction, strength)
    if choice == "pose":
        if pose_direction is None:
            raise ValueError("edit 'pose' needs the InterFaceGAN pose direction (interfacegan_directions/pose.pt)")
        return interfacegan_edit(wplus, pose_direction, strength)
    if choice in GANSPACE_DIRECTIONS:
        if pca is None:
            raise ValueError(f"edit {choice!r} needs the GANSpace PCA (ffhq_pca.pt: mean, comp, std)")
        return ganspace_edit(wplus, pca, GANSPACE_DIRECTIONS[choice], strength)
    raise ValueError(f"unknown edit {choice!r}; choose one of {', '.join(CHOICES)}")


def official_schedule_strength(factor: float, batch_index: int, num_batches: int) -> float:
    """Strength of ``inference.py attribute_edit`` at batch ``batch_index``: factor / num_batches * (i + 1)."""
    if num_batches <= 0 or not 0 <= batch_index < num_batches:
        raise ValueError(f"need 0 <= batch_index < num_batches, got {batch_index} and {num_batches}")
    return factor / num_batches * (batch_index + 1)


def hfgi_edit(generator: Generator, aligner: hfgi.ResidualAligner, residual_encoder: hfgi.ResidualEncoder,
              wx: torch.Tensor, res: torch.Tensor, choice: str, strength: float | torch.Tensor, *,
              age_direction: torch.Tensor | None = None, pose_direction: torch.Tensor | None = None,
              pca: Mapping[str, torch.Tensor] | None = None, output_size: int = hfgi.IMAGE_SIZE) -> hfgi.Inversion:
    """Official ``HFGI.edit(x=None, factor, choice, wx, res)`` given ``(wx, _, res) = hfgi.encode(...)``.

    wx_edit = edit_latent(wx); ix_edit = resize(clamp(G(wx_edit)), 256);
    returns hfgi.decode(wx_edit, ix_edit, res) -- the residual is the unedited one.
    """
    wx_edit = edit_latent(wx, choice, strength, age_direction=age_direction, pose_direction=pose_direction, pca=pca)
    ix_edit = hfgi.reconstruct(generator, wx_edit)
    if res.shape[0] != wx_edit.shape[0]:
        res = res.expand(wx_edit.shape[0], -1, -1, -1)
    return hfgi.decode(aligner, residual_encoder, generator, wx_edit, ix_edit, res, output_size)
