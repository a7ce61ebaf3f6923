"""models.styleheat on the tiny config: the product path equals official_forward (video and audio),
the cached inversion equals the official HFGI inverse, and the product edits' semantics."""
import pytest
import torch

from models import editing
from models.styleheat import StyleHEAT, StyleHEATConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = StyleHEAT(StyleHEATConfig.tiny(audio=True)).eval()
    m.latent_avg = 0.2 * torch.randn_like(m.latent_avg)
    d = m.config.style_dim
    comp = torch.randn(60, 1, d)
    m.set_edit_assets(age=torch.randn(1, d) / d ** 0.5, pose=torch.randn(d) / d ** 0.5,
                      pca={"mean": 0.1 * torch.randn(1, d), "comp": comp / comp.norm(dim=-1, keepdim=True),
                           "std": 1 + torch.rand(60)})
    return m


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 256, 256, generator=g) * 2 - 1
    coeffs = torch.randn(3, 73, 27, generator=g) * 0.5
    mel = torch.randn(3, 80, 32, generator=g)
    return x, coeffs, mel


def _inv_data(inv, b):
    return (inv.ix.expand(b, -1, -1, -1), inv.wx.expand(b, -1, -1), inv.fx.expand(b, -1, -1, -1),
            tuple(c.expand(b, -1, -1, -1) for c in inv.inversion_condition))


def test_prepare_equals_official_inverse(model, inputs):
    x = inputs[0]
    with torch.inference_mode():
        inv = model.prepare(x)
        ix, wx, fx, cond = model.inverse(x)
    for a, b in ((inv.ix, ix), (inv.wx, wx), (inv.fx, fx), (inv.inversion_condition[0], cond[0])):
        assert torch.equal(a, b)
    assert inv.skip32.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("audio", [False, True])
def test_product_path_equals_official_forward(model, inputs, audio):
    x, coeffs, mel = inputs
    with torch.inference_mode():
        inv = model.prepare(x)
        if audio:
            ref = model.official_forward(x, coeffs, mel, inv_data=_inv_data(inv, 3), imsize=128)
            got = model.render(inv, coeffs, mel)
        else:
            warper, model.audio_warper = model.audio_warper, None
            try:
                ref = model.official_forward(x, coeffs, inv_data=_inv_data(inv, 3), imsize=128)
                got = model.render(inv, coeffs)
            finally:
                model.audio_warper = warper
    assert (ref["audio_warp_image"] is not None) == audio
    scale = float(ref["fake_image"].abs().max())
    assert float((got - ref["fake_image"]).abs().max()) <= 1e-4 * max(1.0, scale)
    if audio:  # official_forward also inverts on its own when inv_data is None
        with torch.inference_mode():
            again = model.official_forward(x.expand(3, -1, -1, -1), coeffs, mel, imsize=128)
        assert float((again["fake_image"] - ref["fake_image"]).abs().max()) <= 1e-4 * max(1.0, scale)


def test_audio_flow_top_rows_are_zeroed_only_for_the_warp(model, inputs):
    x, coeffs, mel = inputs
    with torch.inference_mode():
        inv = model.prepare(x)
        out = model.official_forward(x, coeffs, mel, inv_data=_inv_data(inv, 3), imsize=128)
    raw = out["audio_flow_field"]
    assert raw[:, :, :32].abs().max() > 0            # returned before zeroing, as the reference stores it
    audio_def = out["deformations"][1]
    from models import flow
    zeroed = raw.clone()
    zeroed[:, :, :32] = 0
    assert torch.equal(audio_def, flow.flow_to_deformation(zeroed))


def test_preview_sizes(model, inputs):
    x, coeffs, _ = inputs
    with torch.inference_mode():
        inv = model.prepare(x)
        assert model.render(inv, coeffs[:1], out_size=64).shape == (1, 3, 64, 64)
        with pytest.raises(ValueError):
            model.render(inv, coeffs[:1], out_size=96)


def test_product_edits(model):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(2, model.config.n_latent, model.config.style_dim, generator=g) * 0.3
    a = model.edit_assets()
    pca = {"mean": a["pca_mean"], "comp": a["pca_comp"], "std": a["pca_std"]}
    # age s == the official InterFaceGAN edit with factor s ('young' = -5)
    assert torch.allclose(model.edit_wplus(w, {"age": -5.0}),
                          editing.edit_latent(w, "young", -5.0, age_direction=a["age"]))
    # 0 = no edit for every attribute
    for name in ("age", "pose", "beard", "lip"):
        assert torch.allclose(model.edit_wplus(w, {name: 0.0}), w, atol=1e-6)
    # GANSpace: an offset of the portrait's own coordinate, only on the official layers
    idx, start, end = editing.GANSPACE_DIRECTIONS["lip"]
    out = model.edit_wplus(w, {"lip": torch.tensor([3.0, -2.0])})
    changed = (out - w).abs().amax(dim=(0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == list(range(start, end))
    expected = torch.tensor([3.0, -2.0]) * pca["std"][idx]
    assert torch.allclose((out - w)[:, start] @ pca["comp"][idx].reshape(-1), expected, atol=1e-5)
    assert torch.allclose(editing.ganspace_coordinate(out, pca, idx), editing.ganspace_coordinate(w, pca, idx),
                          atol=1e-5)
    with pytest.raises(ValueError, match="unknown attribute"):
        model.edit_wplus(w, {"smile": 1.0})


def test_prepare_edit_equals_official_edit(model, inputs):
    x = inputs[0]
    with torch.inference_mode():
        wx, _, res = model.encode(x)
        base = model.prepare(x)
        edited = model.prepare_edit(base, {"age": 5.0})
        ix, wx_e, fx, _ = model.official_edit(wx, res, "old", 5.0)
    assert torch.equal(edited.wx, wx_e) and torch.equal(edited.ix, ix) and torch.equal(edited.fx, fx)
    assert not torch.equal(edited.fx, base.fx)
