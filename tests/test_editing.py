"""Latent edits (InterFaceGAN / GANSpace) and the official HFGI edit procedure."""
import pytest
import torch

from models import editing, hfgi
from models.hfgi import HFGIConfig, ResidualAligner, ResidualEncoder
from models.stylegan2 import Generator, StyleGAN2Config
from server.parity.reference import compare

STYLEGAN_FILE = "checkpoints/StyleGAN_e4e.pth"
HFGI_FILE = "checkpoints/hfgi.pth"


def _t(v, name):
    return torch.from_numpy(v[name])


def _reference_pca(v):
    return {"mean": _t(v, "in_edit_pca_mean"), "comp": _t(v, "in_edit_pca_comp"), "std": _t(v, "in_edit_pca_std")}


def _random_pca(d=8, k=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    comp = torch.randn(k, 1, d, generator=gen)
    comp = comp / comp.norm(dim=-1, keepdim=True)
    return {"mean": 0.1 * torch.randn(1, d, generator=gen), "comp": comp, "std": 1 + torch.rand(k, generator=gen)}


def test_official_directions_table():
    assert editing.GANSPACE_DIRECTIONS["beard"] == (58, 7, 9)
    assert editing.GANSPACE_DIRECTIONS["lip"] == (34, 10, 11)
    assert editing.RECOMMENDED_STRENGTH == {"young": -5.0, "old": 5.0, "beard": -20.0, "lip": 20.0}


def test_interfacegan_adds_the_direction_to_every_layer_with_per_sample_strength():
    w = torch.randn(3, 18, 8)
    d = torch.randn(1, 8)
    out = editing.interfacegan_edit(w, d, torch.tensor([0.0, 1.0, -2.5]))
    torch.testing.assert_close(out[0], w[0])
    torch.testing.assert_close(out[1], w[1] + d.expand(18, 8))
    torch.testing.assert_close(out[2], w[2] - 2.5 * d.expand(18, 8))
    torch.testing.assert_close(editing.interfacegan_edit(w, d, 1.0)[1], out[1])


def test_ganspace_sets_the_layer0_coordinate_on_the_edited_layers_only():
    pca = _random_pca()
    w = torch.randn(2, 1, 8).repeat(1, 18, 1)  # a W code: all layers equal
    direction = editing.GanspaceDirection(34, 10, 11)
    out = editing.ganspace_edit(w, pca, direction, torch.tensor([20.0, -3.0]))
    comp, std = pca["comp"][34, 0], pca["std"][34]
    coord = ((out[:, 10] - pca["mean"][0]) @ comp) / std
    torch.testing.assert_close(coord, torch.tensor([20.0, -3.0]), atol=1e-4, rtol=1e-5)
    unchanged = [i for i in range(18) if i != 10]
    torch.testing.assert_close(out[:, unchanged], w[:, unchanged], atol=0, rtol=0)
    # the coordinate is read from layer 0 only: changing another layer does not change the delta
    w2 = w.clone()
    w2[:, 10] += 5 * comp
    out2 = editing.ganspace_edit(w2, pca, direction, torch.tensor([20.0, -3.0]))
    torch.testing.assert_close(out2[:, 10] - w2[:, 10], out[:, 10] - w[:, 10], atol=1e-5, rtol=1e-5)
    w3 = w.clone()
    w3[:, 0] += comp
    out3 = editing.ganspace_edit(w3, pca, direction, torch.tensor([20.0, -3.0]))
    assert ((out3[:, 10] - w3[:, 10]) - (out[:, 10] - w[:, 10])).abs().max() > 0.5


def test_edit_latent_dispatch_and_errors():
    w = torch.randn(1, 18, 8)
    with pytest.raises(ValueError, match="age direction"):
        editing.edit_latent(w, "young", -5.0)
    with pytest.raises(ValueError, match="GANSpace PCA"):
        editing.edit_latent(w, "lip", 20.0)
    with pytest.raises(ValueError, match="unknown edit 'smile'"):
        editing.edit_latent(w, "smile", 1.0, pca=_random_pca())
    with pytest.raises(ValueError, match=r"strength must be a float or a \(2,\) tensor"):
        editing.edit_latent(w.repeat(2, 1, 1), "old", torch.ones(3), age_direction=torch.ones(8))
    per_frame = editing.edit_latent(w, "old", torch.tensor([0.0, 2.0]), age_direction=torch.ones(8))
    assert per_frame.shape == (2, 18, 8)
    torch.testing.assert_close(per_frame[1], w[0] + 2.0)
    beard = editing.edit_latent(w, "beard", -20.0, pca=_random_pca())
    assert (beard - w).abs().sum(-1).nonzero()[:, 1].tolist() == [7, 8]


def test_official_schedule_strength():
    assert [editing.official_schedule_strength(-5.0, i, 4) for i in range(4)] == [-1.25, -2.5, -3.75, -5.0]
    with pytest.raises(ValueError):
        editing.official_schedule_strength(1.0, 4, 4)


@pytest.mark.parametrize("choice,strength", [("young", -5.0), ("lip", 20.0)])
def test_edited_codes_match_reference(vectors_seed0, choice, strength):
    v = vectors_seed0
    out = editing.edit_latent(_t(v, "e4e_wx"), choice, strength, age_direction=_t(v, "in_edit_age_direction"),
                              pca=_reference_pca(v))
    result = compare(f"edit_{choice}_wx", out, v[f"edit_{choice}_wx"])
    assert result.ok, result.line()


def test_hfgi_edit_decodes_with_the_original_residual():
    torch.manual_seed(0)
    g = Generator(StyleGAN2Config.tiny()).eval()
    aligner, encoder = ResidualAligner(HFGIConfig.tiny()), ResidualEncoder(HFGIConfig.tiny())
    wx = torch.randn(1, 12, 64)
    res = 0.1 * torch.randn(1, 3, 256, 256)
    direction = torch.randn(1, 64)
    seen = {}
    hook = aligner.register_forward_hook(lambda m, args, out: seen.__setitem__("input", args[0].clone()))
    try:
        with torch.no_grad():
            out = editing.hfgi_edit(g, aligner, encoder, wx, res, "old", torch.tensor([0.5, 1.0]),
                                    age_direction=direction)
            rendered, _ = g(wx + torch.tensor([0.5, 1.0]).view(2, 1, 1) * direction)
    finally:
        hook.remove()
    assert out.wx.shape == (2, 12, 64) and out.fx.shape == (2, 32, 64, 64) and out.ix_256.shape == (2, 3, 256, 256)
    torch.testing.assert_close(out.wx, wx + torch.tensor([0.5, 1.0]).view(2, 1, 1) * direction)
    torch.testing.assert_close(seen["input"][:, :3], res.expand(2, -1, -1, -1), atol=0, rtol=0)
    torch.testing.assert_close(seen["input"][:, 3:], hfgi.resize(rendered.clamp(-1, 1), 256), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("choice,strength", [("young", -5.0), ("lip", 20.0)])
def test_hfgi_edit_parity(seeded_official, vectors_seed0, choice, strength):
    """Official HFGI.edit(x=None, factor, choice, wx=per_wx, res=per_res) from the reference encode outputs."""
    v = vectors_seed0
    g = Generator.from_state_dict(seeded_official(STYLEGAN_FILE, ""))
    aligner = ResidualAligner.from_state_dict(seeded_official(HFGI_FILE, "aligner"))
    encoder = ResidualEncoder.from_state_dict(seeded_official(HFGI_FILE, "encoder"))
    wx = _t(v, "e4e_wx")
    res = _t(v, "in_source_image") - _t(v, "e4e_ix_256")
    with torch.no_grad():
        out = editing.hfgi_edit(g, aligner, encoder, wx, res, choice, strength,
                                age_direction=_t(v, "in_edit_age_direction"), pca=_reference_pca(v))
    for name, got in ((f"edit_{choice}_wx", out.wx), (f"edit_{choice}_ix_256", out.ix_256)):
        result = compare(name, got, v[name])
        assert result.ok, result.line()
