"""e4e encoder and HFGI inversion: tiny-config behaviour, official layouts, seed-0 parity."""
import numpy as np
import pytest
import torch

from models.e4e import E4EConfig, Encoder4Editing
from server.reference import compare

E4E_FILE = "checkpoints/Encoder_e4e.pth"


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


@pytest.fixture(scope="module")
def official_e4e(seeded_official):
    return Encoder4Editing.from_state_dict(seeded_official(E4E_FILE, "encoder"))


@pytest.mark.slow
def test_e4e_parity(official_e4e, seeded_official, vectors_seed0):
    latent_avg = seeded_official(E4E_FILE, "latent_avg")
    with torch.no_grad():
        wx = official_e4e(torch.from_numpy(vectors_seed0["in_source_image"]), latent_avg)
    result = compare("e4e_wx", wx, vectors_seed0["e4e_wx"])
    assert result.ok, result.line()
