"""VideoWarper / AudioWarper: official layout, official outputs on the seed-0 weights, tiny shapes."""
from __future__ import annotations

import pytest
import torch

from models import flow
from models.warper import (AUDIO_FLOW_ZERO_ROWS, AudioWarper, VideoWarper, WarperConfig,
                           zero_upper_flow_)
from server.parity import reference

VISUAL = "checkpoints/StyleHEAT_visual.pt"


def _layout_entries(layout, part, prefix):
    spec = layout["files"][VISUAL]["parts"][part]
    return spec, [e for e in spec["entries"] if e[0].startswith(prefix)]


def _seeded_module_state(layout, part, prefix, seed=0):
    """The seed-``seed`` tensors of one sub-module of ``net_G_ema``, prefix stripped (the 1.4 GB
    generator part is never built here)."""
    return reference.seeded_part(layout, VISUAL, part, seed, prefix=prefix)


@pytest.fixture(scope="module")
def seeded_video_warper(official_layout):
    model = VideoWarper().eval()
    model.load_state_dict(_seeded_module_state(official_layout, "net_G_ema", "video_warper."), strict=True)
    return model


@pytest.fixture(scope="module")
def seeded_audio_warper(official_layout):
    model = AudioWarper().eval()
    model.load_state_dict(_seeded_module_state(official_layout, "net_G_ema[enable_audio]", "audio_warper."),
                          strict=True)
    return model


def _t(array):
    return torch.from_numpy(array)


# ----------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("cls,part,prefix", [(VideoWarper, "net_G_ema", "video_warper."),
                                             (AudioWarper, "net_G_ema[enable_audio]", "audio_warper.")])
def test_full_size_state_dict_matches_official_layout_in_order(official_layout, cls, part, prefix):
    _, entries = _layout_entries(official_layout, part, prefix)
    assert len(entries) == 166
    expected = [(key[len(prefix):], tuple(shape)) for key, shape, _, _ in entries]
    got = [(key, tuple(t.shape)) for key, t in cls().state_dict().items()]
    assert got == expected


def test_audio_keys_use_the_official_spelling():
    keys = AudioWarper(WarperConfig.tiny()).state_dict().keys()
    assert any(k.startswith("warpping_net.hourglass.") for k in keys)
    assert any(k.startswith("audio_encoder.first.0.") for k in keys)
    assert not any(k.startswith(("warping_net.", "mapping_net.")) for k in keys)


# ----------------------------------------------------------------------------------- parity


def test_video_warper_matches_official_outputs(seeded_video_warper, vectors_seed0):
    v = vectors_seed0
    with torch.no_grad():
        out = seeded_video_warper(_t(v["hfgi_ix_256"]), _t(v["in_driving_3dmm"]))
    results = [reference.compare("vw_descriptor", out["descriptor"], v["vw_descriptor"]),
               reference.compare("vw_flow_field", out["flow_field"], v["vw_flow_field"]),
               reference.compare("vw_warp_image_256", out["warp_image"], v["vw_warp_image_256"])]
    assert all(r.ok for r in results), "\n".join(r.line() for r in results)
    # the flow is not trivially small: the comparison above means something
    assert out["flow_field"].abs().max() > 1.0


def test_video_warper_flow_channels_are_x_then_y(seeded_video_warper, vectors_seed0):
    """Swapping the flow channels must break parity (guards the comparison against symmetry)."""
    v = vectors_seed0
    with torch.no_grad():
        out = seeded_video_warper(_t(v["hfgi_ix_256"]), _t(v["in_driving_3dmm"]), with_warp_image=False)
    assert "warp_image" not in out
    assert not reference.compare("swapped", out["flow_field"].flip(1), v["vw_flow_field"]).ok


def test_audio_warper_matches_official_flow(seeded_audio_warper, vectors_seed0):
    v = vectors_seed0
    with torch.no_grad():
        out = seeded_audio_warper(_t(v["aw_input_256"]), _t(v["in_audio_feature"]))
    result = reference.compare("aw_flow_field", out["flow_field"], v["aw_flow_field"])
    assert result.ok, result.line()
    # the reference is the flow *before* the top-rows zeroing, and it is non-zero there
    assert out["flow_field"][:, :, :AUDIO_FLOW_ZERO_ROWS].abs().max() > 0.1
    assert out["descriptor"].shape == (1, 256, 1)
    assert out["warp_image"].shape == (1, 3, 256, 256)


def test_audio_top_rows_zeroing_is_a_separate_in_place_helper(seeded_audio_warper, vectors_seed0):
    v = vectors_seed0
    with torch.no_grad():
        out = seeded_audio_warper(_t(v["aw_input_256"]), _t(v["in_audio_feature"]))
    raw = out["flow_field"]
    # forward did NOT zero anything (the engine applies the trick)
    assert (raw[:, :, :AUDIO_FLOW_ZERO_ROWS] != 0).float().mean() > 0.9
    before = raw.clone()
    same = zero_upper_flow_(raw)
    assert same is raw  # in place, like the official `flow[:, :, :32] = 0`
    assert AUDIO_FLOW_ZERO_ROWS == 32
    assert torch.count_nonzero(raw[:, :, :32]) == 0
    assert torch.equal(raw[:, :, 32:], before[:, :, 32:])
    # rows = height (dim 2), not width: the lower half still moves
    assert raw[:, :, 32:].abs().max() > 0.1


# ----------------------------------------------------------------------------------- tiny


@pytest.mark.parametrize("cls,signal", [(VideoWarper, (73, 27)), (AudioWarper, (80, 32))])
def test_tiny_shapes_and_batch_independence(cls, signal):
    cfg = WarperConfig.tiny()
    model = cls(cfg).eval()
    torch.manual_seed(1)
    image = torch.randn(2, 3, 256, 256).tanh()
    drive = torch.randn(2, *signal)
    with torch.no_grad():
        out = model(image, drive)
        single = model(image[1:], drive[1:])
    assert out["flow_field"].shape == (2, 2, 64, 64)
    assert out["descriptor"].shape == (2, cfg.descriptor_dim, 1)
    assert out["warp_image"].shape == (2, 3, 256, 256)
    assert cfg.flow_size == 64
    # instance norm / AdaIN are per sample: batching must not mix samples
    assert torch.allclose(out["flow_field"][1:], single["flow_field"], atol=1e-5)
    assert not torch.allclose(out["flow_field"][0], out["flow_field"][1])
    # warp_image is the input warped with the flow's deformation (grid resized 64 -> 256)
    expected = flow.warp(image, flow.flow_to_deformation(out["flow_field"]))
    assert torch.allclose(out["warp_image"], expected)


def test_tiny_descriptor_ignores_nothing_in_the_window():
    """Every frame of the 27-frame window reaches the descriptor (first, centre and last frame)."""
    model = VideoWarper(WarperConfig.tiny()).eval()
    coeffs = torch.randn(1, 73, 27)
    with torch.no_grad():
        base = model.mapping_net(coeffs)
        for frame in (0, 13, 26):
            changed = coeffs.clone()
            changed[:, :, frame] += 1.0
            assert not torch.allclose(model.mapping_net(changed), base)


def test_bad_inputs_raise_clear_errors():
    cfg = WarperConfig.tiny()
    vw, aw = VideoWarper(cfg), AudioWarper(cfg)
    image = torch.zeros(1, 3, 256, 256)
    with pytest.raises(ValueError, match=r"coeffs must have shape \(B, 73, 27\)"):
        vw(image, torch.zeros(1, 27, 73))
    with pytest.raises(ValueError, match=r"image_256 must have shape"):
        vw(torch.zeros(1, 3, 512, 512), torch.zeros(1, 73, 27))
    with pytest.raises(ValueError, match=r"mel must have shape \(B, 80, 32\)"):
        aw(image, torch.zeros(1, 80, 16))
    with pytest.raises(ValueError, match="batch"):
        vw(image, torch.zeros(2, 73, 27))
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        zero_upper_flow_(torch.zeros(1, 64, 64, 2))
