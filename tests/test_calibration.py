"""CalibrationNet: official layout, official refining conditions on the seed-0 weights, tiny shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models import flow
from models.calibration import CalibrationConfig, CalibrationNet
from server.parity import reference

VISUAL = "checkpoints/StyleHEAT_visual.pt"
PREFIX = "calibrator."


def _spec_and_entries(layout):
    spec = layout["files"][VISUAL]["parts"]["net_G_ema"]
    return spec, [e for e in spec["entries"] if e[0].startswith(PREFIX)]


@pytest.fixture(scope="module")
def seeded_calibrator(official_layout):
    """CalibrationNet with the seed-0 ``calibrator.*`` tensors of ``net_G_ema``.

    Same rule and seed keys as ``seeded_official(VISUAL, 'net_G_ema')``, built only for this
    sub-module so the 1.4 GB generator part is not materialised.
    """
    state = reference.seeded_part(official_layout, VISUAL, "net_G_ema", 0, prefix=PREFIX)
    model = CalibrationNet().eval()
    model.load_state_dict(state, strict=True)
    return model


def test_full_size_state_dict_matches_official_layout_in_order(official_layout):
    _, entries = _spec_and_entries(official_layout)
    assert len(entries) == 152
    expected = [(key[len(PREFIX):], tuple(shape)) for key, shape, _, _ in entries]
    got = [(key, tuple(t.shape)) for key, t in CalibrationNet().state_dict().items()]
    assert got == expected


def test_blur_kernel_buffers_equal_the_official_fixed_values(official_layout):
    spec, _ = _spec_and_entries(official_layout)
    fixed = {k[len(PREFIX):]: np.asarray(v, dtype=np.float32)
             for k, v in spec["fixed"].items() if k.startswith(PREFIX)}
    assert len(fixed) == 8  # conv2 and skip blur of the 4 down blocks
    state = CalibrationNet().state_dict()
    for key, value in fixed.items():
        np.testing.assert_allclose(state[key].numpy(), value, rtol=0, atol=1e-8, err_msg=key)


def test_refining_conditions_match_official(seeded_calibrator, vectors_seed0):
    v = vectors_seed0
    # fx_warp_f16 is stored as float16; rebuild the float32 input the official run used
    fx_warp = flow.warp(torch.from_numpy(v["hfgi_fx"]), torch.from_numpy(v["vw_deformation"]))
    with torch.no_grad():
        out = seeded_calibrator(fx_warp, torch.from_numpy(v["vw_descriptor"]))
    assert isinstance(out, list) and len(out) == 8
    results = [reference.compare(f"refining_condition_{i}", o, v[f"refining_condition_{i}"])
               for i, o in enumerate(out)]
    assert all(r.ok for r in results), "\n".join(r.line() for r in results)
    # scale and shift of a level are different maps (order [scale, shift] matters)
    assert not reference.compare("scale64 vs shift64", out[6], v["refining_condition_7"]).ok


def test_descriptor_conditions_the_output(seeded_calibrator, vectors_seed0):
    v = vectors_seed0
    fx_warp = flow.warp(torch.from_numpy(v["hfgi_fx"]), torch.from_numpy(v["vw_deformation"]))
    descriptor = torch.from_numpy(v["vw_descriptor"])
    with torch.no_grad():
        a = seeded_calibrator(fx_warp, descriptor)[7]
        b = seeded_calibrator(fx_warp, descriptor * 0.5)[7]
        c = seeded_calibrator(fx_warp, descriptor.squeeze(-1))[7]  # (B, D) is accepted too
    assert (a - b).abs().max() > 1e-2
    assert torch.equal(a, c)


def test_tiny_shapes_and_batch_independence():
    cfg = CalibrationConfig.tiny()
    model = CalibrationNet(cfg).eval()
    torch.manual_seed(3)
    fx_warp = torch.randn(2, cfg.fx_channels, 64, 64)
    descriptor = torch.randn(2, cfg.descriptor_dim, 1)
    with torch.no_grad():
        out = model(fx_warp, descriptor)
        single = model(fx_warp[1:], descriptor[1:])
        last = model(fx_warp, descriptor, last_only=True)
    assert cfg.output_sizes == [8, 16, 32, 64]
    assert [tuple(o.shape) for o in out] == [(2, 32, r, r) for r in (8, 8, 16, 16, 32, 32, 64, 64)]
    for o, s in zip(out, single):
        assert torch.allclose(o[1:], s, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out[7][0], out[7][1])
    # last_only: the 8/16/32 heads are skipped, the 64x64 pair the generator reads is bit-identical
    assert last[:6] == [None] * 6
    assert torch.equal(last[6], out[6]) and torch.equal(last[7], out[7])


def test_bad_inputs_raise_clear_errors():
    cfg = CalibrationConfig.tiny()
    model = CalibrationNet(cfg)
    with pytest.raises(ValueError, match=r"fx_warp must have shape \(B, 32, 64, 64\)"):
        model(torch.zeros(1, 32, 32, 32), torch.zeros(1, 32, 1))
    with pytest.raises(ValueError, match=r"descriptor must have shape \(B, 32, 1\)"):
        model(torch.zeros(1, 32, 64, 64), torch.zeros(1, 1, 32))
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(2, 32, 64, 64), torch.zeros(1, 32, 1))
