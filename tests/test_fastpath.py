"""models.fastpath.FoldedSynthesis against the reference Generator.synthesize_from_64 (and the official vectors)."""
import math

import numpy as np
import pytest
import torch

from models.fastpath import BF16_MIN_PSNR_DB, FoldedSynthesis, bf16_supported, synthesis_macs
from models.stylegan2 import Generator, StyleGAN2Config
from server.parity.reference import compare


def _generator(cfg: StyleGAN2Config, seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    g = Generator(cfg).eval()
    with torch.no_grad():
        for name, p in g.named_parameters():  # biases are zero-initialised: make them matter
            if name.endswith("bias") and "modulation" not in name:
                p.normal_(0, 0.2)
    return g


@pytest.fixture(scope="module")
def tiny():
    return _generator(StyleGAN2Config.tiny())


@pytest.fixture(scope="module")
def tiny256():
    """Three blocks above 64x64 (64, 128, 256), 32 channels: covers every folded layer kind."""
    return _generator(StyleGAN2Config(size=256, style_dim=64, n_mlp=2, uniform_channels=32), seed=1)


def _inputs(g: Generator, batch: int, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(1, g.n_latent, g.style_dim, generator=gen)
    with torch.no_grad():
        fx, skip = g.synthesize_to_64(w)
    # per-frame features differ (as warped/refined ones do)
    feat = fx.expand(batch, -1, -1, -1) * (1 + 0.3 * torch.randn(batch, *fx.shape[1:], generator=gen))
    return w, feat.contiguous(), skip


def _reference(g, feat, skip, w, size):
    b = feat.shape[0]
    with torch.no_grad():
        return g.synthesize_from_64(feat, skip.expand(b, -1, -1, -1), w.expand(b, -1, -1), out_size=size)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return 10 * math.log10(4.0 / mse) if mse > 0 else float("inf")   # images in [-1, 1]: peak-to-peak 2


@pytest.mark.parametrize("size", [64, 128, 256])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fp32_equals_reference_every_out_size(tiny256, size, channels_last):
    w, feat, skip = _inputs(tiny256, batch=3)
    ref = _reference(tiny256, feat, skip, w, size)
    fast = FoldedSynthesis.build(tiny256, w, out_size=size, channels_last=channels_last)
    got = fast(feat, skip)
    assert got.shape == (3, 3, size, size) and got.dtype == torch.float32
    assert float(ref.std()) > 0.05                        # a non-trivial image
    c = compare(f"folded_{size}", got, ref.numpy())
    assert c.ok, c.line()


def test_batch_frames_are_independent_and_skip_may_be_shared(tiny):
    w, feat, skip = _inputs(tiny, batch=4, seed=5)
    fast = FoldedSynthesis.build(tiny, w)
    batched = fast(feat, skip)                             # skip32 batch 1, broadcast
    batched_b = fast(feat, skip.expand(4, -1, -1, -1).contiguous())
    torch.testing.assert_close(batched, batched_b, rtol=0, atol=0)
    for i in range(4):
        one = fast(feat[i:i + 1], skip)
        assert compare(f"frame{i}", batched[i:i + 1], one.numpy()).ok
    assert float((batched[0] - batched[1]).abs().max()) > 1e-2      # frames really differ
    ref = _reference(tiny, feat, skip, w, tiny.size)
    assert compare("batched", batched, ref.numpy()).ok


def test_bf16_within_documented_bound(tiny, tiny256):
    for g, cl in ((tiny, False), (tiny256, True)):      # bf16 is emulated (slow) on CPUs without AVX512-BF16
        w, feat, skip = _inputs(g, batch=2, seed=7)
        ref = _reference(g, feat, skip, w, g.size)
        fast = FoldedSynthesis.build(g, w, dtype=torch.bfloat16, channels_last=cl)
        assert fast.conv_weight_64.dtype == torch.bfloat16
        got = fast(feat, skip)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        psnr = _psnr(got, ref)
        assert psnr >= BF16_MIN_PSNR_DB, psnr
        assert psnr < 120                                  # it really ran in bfloat16
    assert isinstance(bf16_supported("cpu"), bool)


def test_folded_module_is_independent_of_the_generator():
    g = _generator(StyleGAN2Config.tiny(), seed=3)
    w, feat, skip = _inputs(g, batch=2)
    fast = FoldedSynthesis.build(g, w)
    before = fast(feat, skip)
    with torch.no_grad():
        for p in g.parameters():
            p.mul_(0.5)
    torch.testing.assert_close(fast(feat, skip), before, rtol=0, atol=0)
    # and a different W+ gives a different image (the style is really folded in)
    other = FoldedSynthesis.build(g, w + 1.0)(feat, skip)
    assert float((other - before).abs().max()) > 1e-2


def test_bad_input_is_refused_with_a_clear_message(tiny):
    w, feat, skip = _inputs(tiny, batch=2)
    with pytest.raises(ValueError, match="wplus must have shape"):
        FoldedSynthesis.build(tiny, w.expand(2, -1, -1))
    with pytest.raises(ValueError, match="out_size must be a power of two"):
        FoldedSynthesis.build(tiny, w, out_size=96)
    with pytest.raises(ValueError, match="out_size must be a power of two"):
        FoldedSynthesis.build(tiny, w, out_size=256)
    with pytest.raises(ValueError, match="dtype must be"):
        FoldedSynthesis.build(tiny, w, dtype=torch.float16)
    with pytest.raises(ValueError, match="CUDA-only"):
        FoldedSynthesis.build(tiny, w, compile=True)
    with pytest.raises(ValueError, match="CUDA-only"):
        FoldedSynthesis.build(tiny, w, cuda_graphs=True)
    with pytest.raises(ValueError, match="NaN"):
        FoldedSynthesis.build(tiny, w * float("nan"))
    fast = FoldedSynthesis.build(tiny, w)
    with pytest.raises(ValueError, match="feat64 must have shape"):
        fast(feat[:, :16], skip)
    with pytest.raises(ValueError, match="skip32 must have shape"):
        fast(feat, torch.zeros(3, 3, 32, 32))


def test_mac_count_matches_the_architecture_arithmetic():
    # independent numbers: shared/notes/design-and-performance-anchors.md B1 (67.8 GMAC of convolutions
    # per frame from 64x64; 74.3 GMAC for a full pass from 4x4 with transposed-conv up-sampling)
    cfg = StyleGAN2Config()
    per_frame = synthesis_macs(cfg, 1024)
    full = synthesis_macs(cfg, 1024, from_res=4)
    assert abs(per_frame["conv"] / 1e9 - 67.8) < 0.1
    assert abs(per_frame["total"] / 1e9 - 68.9) < 0.1
    assert abs(full["conv"] / 1e9 - 74.3) < 0.1
    assert synthesis_macs(cfg, 256)["conv"] < synthesis_macs(cfg, 512)["conv"] < per_frame["conv"]


@pytest.mark.slow
def test_full_size_fp32_equals_reference_and_official_plain_image(seeded_official, vectors_seed0):
    """Seeded official StyleGAN weights, W+ of the official HFGI inversion: the folded 1024^2 synthesis from
    64x64 equals synthesize_from_64 (fp32 tolerance) and the official plain StyleGAN image (float16 vector)."""
    g = Generator.from_state_dict(seeded_official("checkpoints/StyleGAN_e4e.pth", ""))
    wx = torch.from_numpy(vectors_seed0["hfgi_wx"])
    with torch.no_grad():
        fx, skip = g.synthesize_to_64(wx)
        ref = g.synthesize_from_64(fx, skip, wx)
    got = FoldedSynthesis.build(g, wx, channels_last=True)(fx, skip)
    c = compare("folded_1024_vs_synthesize_from_64", got, ref.numpy())
    assert c.ok, c.line()
    c = compare("folded_1024_vs_stylegan_plain_1024_f16", got, vectors_seed0["stylegan_plain_1024_f16"])
    assert c.ok, c.line()
    assert np.isfinite(got.numpy()).all()


def test_folded_cache_builds_once_per_key_and_size_and_evicts(tiny):
    from models.fastpath import FoldedCache

    w, feat, skip = _inputs(tiny, batch=1)
    cache = FoldedCache(capacity=2)
    a = cache.get("id-a", tiny, w, out_size=128)
    assert cache.get("id-a", tiny, w, out_size=128) is a and cache.builds == 1
    b = cache.get("id-a", tiny, w, out_size=64)
    assert b is not a and b.out_size == 64 and cache.builds == 2
    cache.get("id-b", tiny, w + 1, out_size=128)          # evicts the least recently used ("id-a", 128)
    assert len(cache) == 2 and cache.builds == 3
    assert cache.get("id-a", tiny, w, out_size=128) is not a and cache.builds == 4
    cache.forget("id-a")
    assert len(cache) == 1
    with pytest.raises(ValueError, match="capacity"):
        FoldedCache(0)


def test_winograd_blocks_equal_the_direct_convolution():
    from models.fastpath import WINOGRAD_MIN_CHANNELS, winograd_available
    if not winograd_available("cpu"):
        pytest.skip("this torch has no NNPACK")
    torch.manual_seed(0)
    gen = Generator(StyleGAN2Config(size=256, style_dim=64, n_mlp=2, uniform_channels=WINOGRAD_MIN_CHANNELS)).eval()
    w = 0.5 * torch.randn(1, gen.n_latent, gen.style_dim)
    feat = torch.randn(2, gen.config.fx_channels, 64, 64)
    skip = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for size in (256, 128):
            ref = gen.synthesize_from_64(feat, skip, w.expand(2, -1, -1), out_size=size)
            wino = FoldedSynthesis.build(gen, w, out_size=size, channels_last=True, winograd=True)
            direct = FoldedSynthesis.build(gen, w, out_size=size, channels_last=True, winograd=False)
            assert wino.winograd_res and not direct.winograd_res
            a, b = wino(feat, skip), direct(feat, skip)
            scale = float(ref.abs().max())
            assert float((a - ref).abs().max()) <= 1e-5 * max(1.0, scale)
            assert float((b - ref).abs().max()) <= 1e-5 * max(1.0, scale)
    with pytest.raises(ValueError, match="winograd"):
        FoldedSynthesis.build(gen, w, dtype=torch.bfloat16, winograd=True)


def test_winograd_default_follows_the_cpu(monkeypatch):
    """NNPACK Winograd is the default only on CPUs without AVX512 (oneDNN's AVX512 convolution is faster there)."""
    from models.fastpath import winograd_available, winograd_preferred
    if not winograd_available("cpu"):
        pytest.skip("this torch has no NNPACK")
    torch.manual_seed(0)
    gen = Generator(StyleGAN2Config(size=128, style_dim=64, n_mlp=2, uniform_channels=64)).eval()
    w = 0.5 * torch.randn(1, gen.n_latent, gen.style_dim)
    for capability, on in (("AVX2", True), ("AVX512", False), ("DEFAULT", True)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert winograd_preferred("cpu") is on
        assert bool(FoldedSynthesis.build(gen, w).winograd_res) is on
        assert FoldedSynthesis.build(gen, w, winograd=True).winograd_res       # asking for it still works
    assert not winograd_preferred("meta")
