"""Flow fields and warping, in the conventions of the official StyleHEAT code.

A *flow* is a displacement in pixels of its own grid, shape (B, 2, H, W), channel 0 = x (width),
channel 1 = y (height). A *deformation* is a ``grid_sample`` grid, shape (B, H, W, 2), (x, y) order.

Conventions reproduced on purpose (reference README, quirks 8 and 9):

* the identity grid uses the align_corners=True spacing ``2 i / (n - 1) - 1`` but sampling runs with
  ``grid_sample``'s defaults (align_corners=False, bilinear, zero padding), so a zero flow is *not*
  the identity warp: pixel i samples source position ``i n / (n - 1) - 1/2``;
* when a deformation and the image differ in size, the deformation (not the flow) is resized
  bilinearly with align_corners=False.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def identity_grid(batch: int, height: int, width: int, *, like: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 2) grid of ``2 i / (n - 1) - 1`` coordinates, (x, y) order, dtype/device of ``like``."""
    x = 2 * (torch.arange(width, device=like.device).to(like.dtype) / (width - 1)) - 1
    y = 2 * (torch.arange(height, device=like.device).to(like.dtype) / (height - 1)) - 1
    grid = torch.stack((x.view(1, width).expand(height, width), y.view(height, 1).expand(height, width)), dim=-1)
    return grid.unsqueeze(0).expand(batch, height, width, 2)


def flow_to_deformation(flow: torch.Tensor) -> torch.Tensor:
    """Pixel flow (B, 2, H, W) -> sampling grid (B, H, W, 2)."""
    b, c, h, w = flow.shape
    if c != 2:
        raise ValueError(f"flow must have 2 channels (x, y), got shape {tuple(flow.shape)}")
    scale = flow.new_tensor([2.0 / (w - 1), 2.0 / (h - 1)]).view(1, 2, 1, 1)
    return identity_grid(b, h, w, like=flow) + (flow * scale).permute(0, 2, 3, 1)


def warp(image: torch.Tensor, deformation: torch.Tensor) -> torch.Tensor:
    """Sample ``image`` (B, C, H, W) at ``deformation`` (B, h, w, 2); the grid is resized to (H, W) first."""
    h, w = image.shape[-2:]
    if deformation.shape[1:3] != (h, w):
        deformation = F.interpolate(deformation.permute(0, 3, 1, 2), size=(h, w), mode="bilinear",
                                    align_corners=False).permute(0, 2, 3, 1)
    return F.grid_sample(image, deformation.to(image.dtype), mode="bilinear", padding_mode="zeros",
                         align_corners=False)
