"""StyleGAN2 generator: ops against independent references, F-space hooks, split halves, official parity."""
import numpy as np
import pytest
import scipy.signal
import torch

from models import flow, ops
from models.stylegan2 import Generator, StyleGAN2Config
from server.parity.reference import compare

STYLEGAN_FILE = "checkpoints/StyleGAN_e4e.pth"


# ----------------------------------------------------------------------------- ops
def _scipy_upfirdn(x, k, up, down, pad):
    """Zero-insert, pad/crop, true 2-D convolution ('valid'), decimate -- with scipy/numpy only."""
    h, w = x.shape
    z = np.zeros((h * up, w * up))
    z[::up, ::up] = x
    p0, p1 = pad
    z = np.pad(z, ((max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0))))
    z = z[max(-p0, 0):z.shape[0] - max(-p1, 0), max(-p0, 0):z.shape[1] - max(-p1, 0)]
    return scipy.signal.convolve2d(z, k, mode="valid")[::down, ::down]


@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 2)), (2, 1, (2, 1)), (1, 2, (1, 1)), (2, 2, (-1, 3))])
def test_upfirdn2d_is_a_true_convolution(up, down, pad):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 9, 9))
    k = rng.standard_normal((4, 4))  # asymmetric: a correlation instead of a convolution would fail
    got = ops.upfirdn2d(torch.from_numpy(x).float(), torch.from_numpy(k).float(), up=up, down=down, pad=pad)
    want = np.stack([np.stack([_scipy_upfirdn(x[b, c], k, up, down, pad) for c in range(3)]) for b in range(2)])
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_fir_kernel_and_upsample_preserve_constants():
    k = ops.make_fir_kernel()
    np.testing.assert_allclose(k.numpy(), np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0, rtol=1e-7)
    up = ops.Upsample()
    out = up(torch.ones(1, 2, 8, 8))
    assert out.shape == (1, 2, 16, 16)
    np.testing.assert_allclose(out[..., 2:-2, 2:-2].numpy(), 1.0, rtol=1e-6)  # interior of a constant stays 1


def test_fused_leaky_relu_formula():
    x = torch.tensor([[-2.0, 3.0]])
    b = torch.tensor([1.0, -1.0])
    got = ops.fused_leaky_relu(x, b)
    np.testing.assert_allclose(got.numpy(), [[-0.2 * np.sqrt(2), 2 * np.sqrt(2)]], rtol=1e-6)


def test_modulated_conv_matches_per_sample_formula():
    torch.manual_seed(3)
    conv = ops.ModulatedConv2d(4, 5, 3, style_dim=6)
    x, style = torch.randn(2, 4, 7, 7), torch.randn(2, 6)
    got = conv(x, style)
    for b in range(2):
        s = conv.modulation.weight @ style[b] / np.sqrt(6) + conv.modulation.bias   # EqualLinear, lr_mul 1
        w = conv.weight[0] / np.sqrt(4 * 9) * s.view(1, 4, 1, 1)
        w = w / torch.sqrt((w ** 2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        want = torch.nn.functional.conv2d(x[b:b + 1], w, padding=1)
        torch.testing.assert_close(got[b:b + 1], want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- tiny generator
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    g = Generator(StyleGAN2Config.tiny()).eval()
    for name, p in g.named_parameters():  # non-trivial biases (zero-initialised otherwise)
        if name.endswith("bias"):
            p.data.normal_(0, 0.1)
    return g


def _wplus(g, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, g.n_latent, g.style_dim, generator=gen)


def test_tiny_shapes(tiny):
    cfg = StyleGAN2Config.tiny()
    assert cfg.n_latent == 12 and cfg.fx_channels == 32
    with torch.no_grad():
        image, fx = tiny(_wplus(tiny))
    assert image.shape == (2, 3, 128, 128)
    assert fx.shape == (2, 32, 64, 64)
    assert torch.isfinite(image).all()


def test_bad_wplus_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match=r"wplus must have shape \(B, 12, 64\)"):
        tiny(torch.zeros(1, 18, 512))


def test_single_w_is_broadcast_to_all_layers(tiny):
    w = torch.randn(1, tiny.style_dim)
    with torch.no_grad():
        a, _ = tiny(w)
        b, _ = tiny(w.unsqueeze(1).repeat(1, tiny.n_latent, 1))
    torch.testing.assert_close(a, b)


def test_noise_buffers_are_unused(tiny):
    w = _wplus(tiny, 1)
    with torch.no_grad():
        a, _ = tiny(w)
        saved = {k: v.clone() for k, v in tiny.noises.named_buffers()}
        for v in tiny.noises.buffers():
            v.normal_()
        b, _ = tiny(w)
        for k, v in tiny.noises.named_buffers():
            v.copy_(saved[k])
    assert torch.equal(a, b)


def _conditions(g, batch, seed=2):
    gen = torch.Generator().manual_seed(seed)
    c = g.config.fx_channels
    inv = (0.3 * torch.randn(batch, c, 64, 64, generator=gen), 0.3 * torch.randn(batch, c, 64, 64, generator=gen))
    fcond = torch.randn(batch, c, 64, 64, generator=gen)
    flows = [2.0 * torch.randn(batch, 2, 64, 64, generator=gen) for _ in range(2)]
    deformations = [flow.flow_to_deformation(f) for f in flows]
    rc = [0.3 * torch.randn(batch, c, 64, 64, generator=gen) for _ in range(8)]
    return inv, fcond, deformations, rc


def test_split_halves_equal_forward_plain(tiny):
    w = _wplus(tiny)
    with torch.no_grad():
        image, fx = tiny(w)
        fx2, skip32 = tiny.synthesize_to_64(w)
        image2 = tiny.synthesize_from_64(fx2, skip32, w)
    assert skip32.shape == (2, 3, 32, 32)
    torch.testing.assert_close(fx2, fx, atol=0, rtol=0)
    torch.testing.assert_close(image2, image, atol=1e-6, rtol=1e-6)


def test_split_halves_equal_forward_with_all_conditions(tiny):
    w = _wplus(tiny)
    inv, fcond, deformations, rc = _conditions(tiny, 2)
    with torch.no_grad():
        image, fx = tiny(w, inversion_condition=inv, f_condition=fcond, warping_condition=deformations,
                         refining_condition=rc)
        fx2, skip32 = tiny.synthesize_to_64(w, inversion_condition=inv)
        feat = flow.warp(flow.warp(fcond, deformations[0]), deformations[1])  # in list order
        feat = feat * (1 + rc[6]) + rc[7]
        image2 = tiny.synthesize_from_64(feat, skip32, w)
        plain_fx, _ = tiny.synthesize_to_64(w)
    # the returned fx is the w-path feature after the inversion condition, not f_condition
    torch.testing.assert_close(fx, fx2, atol=0, rtol=0)
    torch.testing.assert_close(fx, plain_fx * (1 + inv[0]) + inv[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(image2, image, atol=1e-6, rtol=1e-6)


def test_warping_condition_uses_flow_warp_and_changes_the_image(tiny):
    w = _wplus(tiny, 1)
    _, fcond, deformations, _ = _conditions(tiny, 1)
    with torch.no_grad():
        warped, _ = tiny(w, f_condition=fcond, warping_condition=[deformations[0]])
        unwarped, _ = tiny(w, f_condition=fcond)
        _, skip32 = tiny.synthesize_to_64(w)
        manual = tiny.synthesize_from_64(flow.warp(fcond, deformations[0]), skip32, w)
    torch.testing.assert_close(warped, manual, atol=1e-6, rtol=1e-6)
    assert (warped - unwarped).abs().max() > 1e-2


def test_f_condition_replaces_the_feature(tiny):
    w = _wplus(tiny, 1)
    inv, fcond, _, _ = _conditions(tiny, 1)
    with torch.no_grad():
        a, _ = tiny(w, inversion_condition=inv, f_condition=fcond)
        b, _ = tiny(w, f_condition=fcond)  # the inversion condition is overwritten at step c
        c, _ = tiny(w, inversion_condition=inv)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-2


def test_only_the_64x64_refining_pair_is_used(tiny):
    w = _wplus(tiny, 1)
    _, _, _, rc = _conditions(tiny, 1)
    with torch.no_grad():
        a, _ = tiny(w, refining_condition=rc)
        changed_low = [torch.zeros_like(t) for t in rc[:6]] + rc[6:]
        b, _ = tiny(w, refining_condition=changed_low)
        c, _ = tiny(w, refining_condition=rc[:6] + [torch.zeros_like(rc[6]), rc[7]])
        plain, _ = tiny(w)
        fx, skip32 = tiny.synthesize_to_64(w)
        manual = tiny.synthesize_from_64(fx * (1 + rc[6]) + rc[7], skip32, w)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, manual, atol=1e-6, rtol=1e-6)
    assert (a - c).abs().max() > 1e-3 and (a - plain).abs().max() > 1e-3


def test_one_shared_code_renders_like_per_sample_codes(tiny):
    """An expanded (stride-0) or batch-1 W+ takes the shared-weight path; values equal the grouped path."""
    w1 = _wplus(tiny, 1)
    _, fcond, deformations, rc = _conditions(tiny, 3)
    with torch.no_grad():
        shared, fx_shared = tiny(w1.expand(3, -1, -1), f_condition=fcond, warping_condition=deformations[:1],
                                 refining_condition=rc)
        grouped, fx_grouped = tiny(w1.repeat(3, 1, 1), f_condition=fcond, warping_condition=deformations[:1],
                                   refining_condition=rc)
        fx, skip32 = tiny.synthesize_to_64(w1)
        from_one = tiny.synthesize_from_64(fcond, skip32, w1)
        from_grouped = tiny.synthesize_from_64(fcond, skip32.repeat(3, 1, 1, 1), w1.repeat(3, 1, 1))
    assert shared.shape == grouped.shape == (3, 3, 128, 128) and fx_shared.shape == (3, 32, 64, 64)
    torch.testing.assert_close(shared, grouped, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fx_shared, fx_grouped, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_one, from_grouped, atol=1e-5, rtol=1e-5)
    assert (shared[0] - shared[1]).abs().max() > 1e-3  # the frames differ (different features)
    with pytest.raises(ValueError, match="wplus batch 2"):
        tiny.synthesize_from_64(fcond, skip32, w1.repeat(2, 1, 1))


def test_early_stop_returns_the_accumulated_skip():
    torch.manual_seed(5)
    g = Generator(StyleGAN2Config(size=256, style_dim=16, n_mlp=1, uniform_channels=8)).eval()
    w = torch.randn(1, g.n_latent, g.style_dim)
    captured = {}
    hooks = [g.to_rgbs[k].register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o.clone()))
             for k in range(len(g.to_rgbs))]
    with torch.no_grad():
        image, fx = g(w)
        fx, skip32 = g.synthesize_to_64(w)
        out64 = g.synthesize_from_64(fx, skip32, w, out_size=64)
        out128 = g.synthesize_from_64(fx, skip32, w, out_size=128)
        out256 = g.synthesize_from_64(fx, skip32, w, out_size=256)
    for h in hooks:
        h.remove()
    assert out64.shape == (1, 3, 64, 64) and out128.shape == (1, 3, 128, 128)
    torch.testing.assert_close(out64, captured[3], atol=1e-6, rtol=1e-6)    # to_rgbs[3] = 64x64 block
    torch.testing.assert_close(out128, captured[4], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(skip32, captured[2], atol=0, rtol=0)
    torch.testing.assert_close(out256, image, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="out_size"):
        g.synthesize_from_64(fx, skip32, w, out_size=96)


def test_from_state_dict_adopts_weights_strictly_in_eval_mode():
    src = Generator(StyleGAN2Config.tiny()).eval()
    sd = {k: v + 0.01 if v.is_floating_point() else v for k, v in src.state_dict().items()}
    g = Generator.from_state_dict(sd, StyleGAN2Config.tiny())
    assert isinstance(g, Generator) and not g.training
    assert all(t.device.type == "cpu" for t in g.state_dict().values())  # nothing left on the meta device
    assert g.state_dict()["input.input"].data_ptr() == sd["input.input"].data_ptr()  # adopted, not copied
    w = torch.randn(1, g.n_latent, g.style_dim)
    src.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(g(w)[0], src(w)[0], atol=0, rtol=0)
    bad = dict(sd)
    bad.pop("conv1.activate.bias")
    with pytest.raises(RuntimeError, match="conv1.activate.bias"):
        Generator.from_state_dict(bad, StyleGAN2Config.tiny())


# ----------------------------------------------------------------------------- full size
def test_full_size_state_dict_matches_official_layout(official_layout):
    with torch.device("meta"):
        g = Generator()
    entries = official_layout["files"][STYLEGAN_FILE]["parts"][""]["entries"]
    got = [(k, list(v.shape)) for k, v in g.state_dict().items()]
    assert got == [(k, shape) for k, shape, _, _ in entries]
    assert g.n_latent == 18 and g.config.fx_channels == 512


@pytest.mark.slow
def test_plain_stylegan_parity(seeded_official, vectors_seed0):
    g = Generator.from_state_dict(seeded_official(STYLEGAN_FILE, ""))
    with torch.no_grad():
        image, fx = g(torch.from_numpy(vectors_seed0["hfgi_wx"]))
    assert fx.shape == (1, 512, 64, 64)
    result = compare("stylegan_plain_1024_f16", image, vectors_seed0["stylegan_plain_1024_f16"])
    assert result.ok, result.line()
