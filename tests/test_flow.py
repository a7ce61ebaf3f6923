import numpy as np
import torch

from models import flow
from server.parity.reference import compare


def test_zero_flow_is_not_identity_exactly_as_official():
    ones = torch.ones(1, 1, 64, 64)
    out = flow.warp(ones, flow.flow_to_deformation(torch.zeros(1, 2, 64, 64)))[0, 0]
    assert torch.allclose(out[0, 0], torch.tensor(0.25))
    assert torch.allclose(out[0, 30], torch.tensor(0.5))
    assert torch.allclose(out[30, 30], torch.tensor(1.0))


def test_channel_zero_is_x():
    img = torch.arange(64.0).view(1, 1, 1, 64).expand(1, 1, 64, 64).contiguous()
    f = torch.zeros(1, 2, 64, 64)
    f[:, 0] = 3.0  # move the sampling point right in x: 3 px of the (n-1)-spaced grid = 3 n/(n-1) source px
    shifted = flow.warp(img, flow.flow_to_deformation(f))[0, 0, 32]
    base = flow.warp(img, flow.flow_to_deformation(torch.zeros(1, 2, 64, 64)))[0, 0, 32]
    assert torch.allclose(shifted[10:50] - base[10:50], torch.full((40,), 3.0 * 64 / 63), atol=1e-4)


def test_reference_deformation_and_warped_feature(vectors_seed0):
    v = vectors_seed0
    deformation = flow.flow_to_deformation(torch.from_numpy(v["vw_flow_field"]))
    assert compare("vw_deformation", deformation, v["vw_deformation"]).ok
    fx_warp = flow.warp(torch.from_numpy(v["hfgi_fx"]), torch.from_numpy(v["vw_deformation"]))
    assert compare("fx_warp_f16", fx_warp, v["fx_warp_f16"]).ok
    # a 64-grid deformation applied to a 256 image is resized first (warp_image of the WarpingNet)
    assert np.isfinite(flow.warp(torch.zeros(1, 3, 256, 256), deformation).numpy()).all()
