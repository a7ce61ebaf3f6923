"""e4e encoder and HFGI inversion: tiny-config behaviour, official layouts, seed-0 parity."""
import pytest
import torch

import torch.nn.functional as F

from models import hfgi
from models.e4e import E4EConfig, Encoder4Editing
from models.hfgi import HFGIConfig, ResidualAligner, ResidualEncoder
from models.stylegan2 import Generator, StyleGAN2Config
from server.parity import reference
from server.parity.reference import compare

E4E_FILE = "checkpoints/Encoder_e4e.pth"
HFGI_FILE = "checkpoints/hfgi.pth"
STYLEGAN_FILE = "checkpoints/StyleGAN_e4e.pth"


def _layout_entries(layout, file, part):
    return [(k, shape) for k, shape, _, _ in layout["files"][file]["parts"][part]["entries"]]


def _randomise_bn(module, seed=0):
    """Non-trivial BatchNorm running statistics so that eval mode matters."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=gen))


# ----------------------------------------------------------------------------- e4e
@pytest.fixture(scope="module")
def tiny_e4e():
    torch.manual_seed(0)
    m = Encoder4Editing(E4EConfig.tiny())
    _randomise_bn(m)
    return m.eval()


def test_e4e_tiny_shapes_and_latent_avg(tiny_e4e):
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    avg18 = torch.randn(12, 64)
    with torch.no_grad():
        codes = tiny_e4e(x)
        w18 = tiny_e4e(x, avg18)
        w1 = tiny_e4e(x, avg18[0])
    assert codes.shape == (2, 12, 64)
    torch.testing.assert_close(w18, codes + avg18, atol=0, rtol=0)
    torch.testing.assert_close(w1, codes + avg18[0], atol=0, rtol=0)
    # the first three codes read the same c3 feature with different heads: all distinct
    assert (codes[:, 1] - codes[:, 0]).abs().max() > 0 and (codes[:, 7] - codes[:, 6]).abs().max() > 0


def test_e4e_uses_running_statistics(tiny_e4e):
    """Encoding a batch equals encoding its items one by one (batch statistics would couple them)."""
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        both = tiny_e4e(x)
        one = tiny_e4e(x[:1])
    torch.testing.assert_close(both[:1], one, atol=1e-5, rtol=1e-5)


def test_e4e_bad_input_is_a_clear_error(tiny_e4e):
    with pytest.raises(ValueError, match=r"\(B, 3, 256, 256\)"):
        tiny_e4e(torch.zeros(1, 3, 512, 512))


def test_e4e_full_size_state_dict_matches_official_layout(official_layout):
    with torch.device("meta"):
        m = Encoder4Editing()
    got = [(k, list(v.shape)) for k, v in m.state_dict().items()]
    assert got == _layout_entries(official_layout, E4E_FILE, "encoder")
    assert m.config.c_indices == (6, 20, 23)


# ----------------------------------------------------------------------------- HFGI, tiny
@pytest.fixture(scope="module")
def tiny_models(tiny_e4e):
    torch.manual_seed(1)
    g = Generator(StyleGAN2Config.tiny()).eval()
    aligner, encoder = ResidualAligner(HFGIConfig.tiny()), ResidualEncoder(HFGIConfig.tiny())
    _randomise_bn(aligner, 1)
    _randomise_bn(encoder, 2)
    return tiny_e4e, aligner.eval(), encoder.eval(), g


def test_hfgi_tiny_networks_shapes(tiny_models):
    _, aligner, encoder, _ = tiny_models
    with torch.no_grad():
        aligned = aligner(torch.randn(2, 6, 256, 256))
        scale, shift = encoder(aligned)
    assert aligned.shape == (2, 3, 256, 256)
    assert scale.shape == shift.shape == (2, 32, 64, 64)
    with pytest.raises(ValueError, match="6"):
        aligner(torch.randn(1, 3, 256, 256))


def test_hfgi_encode_clamps_before_resizing(tiny_models):
    e4e, _, _, g = tiny_models
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    avg = 0.1 * torch.randn(12, 64)
    with torch.no_grad():
        wx, ix, res = hfgi.encode(e4e, g, x, avg)
        torch.testing.assert_close(wx, e4e(x, avg), atol=0, rtol=0)
        rendered, _ = g(wx)
    assert rendered.shape[-1] == 128 and rendered.abs().max() > 1  # tiny G: upsampled, and clamping matters
    clamp_then_resize = F.interpolate(rendered.clamp(-1, 1), size=(256, 256), mode="bilinear", align_corners=False)
    resize_then_clamp = F.interpolate(rendered, size=(256, 256), mode="bilinear", align_corners=False).clamp(-1, 1)
    torch.testing.assert_close(ix, clamp_then_resize, atol=0, rtol=0)
    assert (ix - resize_then_clamp).abs().max() > 1e-3
    torch.testing.assert_close(res, x - ix, atol=0, rtol=0)


def test_hfgi_decode_feeds_res_first_and_conditions_the_generator(tiny_models):
    e4e, aligner, encoder, g = tiny_models
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    seen = {}
    hook = aligner.register_forward_hook(lambda m, args, out: seen.__setitem__("input", args[0].clone()))
    try:
        with torch.no_grad():
            enc = hfgi.encode(e4e, g, x, None)
            inv = hfgi.decode(aligner, encoder, g, enc.wx, enc.ix_256, enc.res)
            fx_manual, _ = g.synthesize_to_64(enc.wx, inversion_condition=inv.inversion_condition)
            image, _ = g(enc.wx, inversion_condition=inv.inversion_condition)
            inv2 = hfgi.inverse(e4e, aligner, encoder, g, x, None)
    finally:
        hook.remove()
    torch.testing.assert_close(seen["input"][:, :3], enc.res, atol=0, rtol=0)
    torch.testing.assert_close(seen["input"][:, 3:], enc.ix_256, atol=0, rtol=0)
    assert inv.wx is enc.wx and inv.fx.shape == (1, 32, 64, 64) and inv.ix_256.shape == (1, 3, 256, 256)
    torch.testing.assert_close(inv.fx, fx_manual, atol=0, rtol=0)
    torch.testing.assert_close(inv.ix_256, hfgi.resize(image.clamp(-1, 1), 256), atol=0, rtol=0)
    for a, b in zip(inv2, inv):
        if isinstance(a, list):
            a, b = torch.stack(a), torch.stack(b)
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("part,cls", [("aligner", ResidualAligner), ("encoder", ResidualEncoder)])
def test_hfgi_full_size_state_dicts_match_official_layout(official_layout, part, cls):
    with torch.device("meta"):
        m = cls()
    got = [(k, list(v.shape)) for k, v in m.state_dict().items()]
    assert got == _layout_entries(official_layout, HFGI_FILE, part)


# ----------------------------------------------------------------------------- full size, seed-0 parity
@pytest.fixture(scope="module")
def official_e4e(official_layout):
    """Seed-0 e4e (1 GB). Built here rather than through the session-cached ``seeded_official`` so the
    tensors are freed when this module's tests are done."""
    model = Encoder4Editing.from_state_dict(reference.seeded_part(official_layout, E4E_FILE, "encoder", seed=0))
    yield model
    del model


@pytest.fixture(scope="module")
def official_models(official_e4e, seeded_official):
    return dict(e4e=official_e4e, latent_avg=seeded_official(E4E_FILE, "latent_avg"),
                generator=Generator.from_state_dict(seeded_official(STYLEGAN_FILE, "")),
                aligner=ResidualAligner.from_state_dict(seeded_official(HFGI_FILE, "aligner")),
                encoder=ResidualEncoder.from_state_dict(seeded_official(HFGI_FILE, "encoder")))


@pytest.fixture(scope="module")
def official_encoded(official_models, vectors_seed0):
    m = official_models
    with torch.no_grad():
        return hfgi.encode(m["e4e"], m["generator"], torch.from_numpy(vectors_seed0["in_source_image"]),
                           m["latent_avg"])


@pytest.mark.slow
def test_e4e_parity(official_encoded, vectors_seed0):
    for name, got in (("e4e_wx", official_encoded.wx), ("e4e_ix_256", official_encoded.ix_256)):
        result = compare(name, got, vectors_seed0[name])
        assert result.ok, result.line()


@pytest.mark.slow
def test_hfgi_inversion_parity(official_models, official_encoded, vectors_seed0):
    m = official_models
    with torch.no_grad():
        inv = hfgi.decode(m["aligner"], m["encoder"], m["generator"], *official_encoded)
    for name, got in (("hfgi_wx", inv.wx), ("hfgi_fx", inv.fx), ("hfgi_ix_256", inv.ix_256),
                      ("hfgi_inversion_condition_0_scale", inv.inversion_condition[0]),
                      ("hfgi_inversion_condition_1_shift", inv.inversion_condition[1])):
        result = compare(name, got, vectors_seed0[name])
        assert result.ok, result.line()
