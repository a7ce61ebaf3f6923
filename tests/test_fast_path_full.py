"""Full-size (seeded reference weights) quality bounds of the two cheaper render modes:

* ``quality="preview"`` at 256^2 against the full 1024^2 frame downscaled (INTER_AREA): PSNR / SSIM above the
  bounds stated in models.styleheat (PREVIEW_MIN_PSNR_DB, PREVIEW_MIN_SSIM), and really different from it
  (it skips the CalibrationNet; a test that could not tell them apart would prove nothing);
* bfloat16 end to end (FrameNets: VideoWarper + CalibrationNet in bf16, bf16 folded synthesis) against float32 at
  256^2 (synthesis stopped there, so the emulated bf16 of AVX2-only machines stays affordable): PSNR above
  models.fastpath.BF16_MIN_PSNR_DB and not bit-identical (it really ran in bf16).

The networks and the seeded inversion come from benchmarks/bench_render.py's Setup, the same ones it times.
"""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from models.fastpath import BF16_MIN_PSNR_DB, FoldedSynthesis
from models.styleheat import FULL, PREVIEW, PREVIEW_MIN_PSNR_DB, PREVIEW_MIN_SSIM, FrameNets

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_render.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_render_full", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(bench, shared_dir):
    s = bench.Setup(False, torch.device("cpu"))
    return s, bench.styleheat_of(s)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return 10 * math.log10(4.0 / mse) if mse > 0 else float("inf")


def test_preview_256_within_its_stated_bound_of_the_full_frame(bench, setup):
    s, sh = setup
    coeffs = s.coeff_batch(2)
    full = bench.engine_runner(s, sh, FoldedSynthesis.build(s.gen, s.wx, channels_last=True))
    prev = bench.engine_runner(s, sh, FoldedSynthesis.build(s.gen, s.wx, out_size=256, channels_last=True),
                               quality=PREVIEW)
    with torch.no_grad():
        ref = torch.cat([full(coeffs[i:i + 1]) for i in range(2)])
        got = torch.cat([prev(coeffs[i:i + 1]) for i in range(2)])
        again = torch.cat([prev(coeffs[i:i + 1]) for i in range(2)])
    assert got.shape == (2, 3, 256, 256)
    q = bench.image_quality(got, ref)
    assert q["psnr_db"] >= PREVIEW_MIN_PSNR_DB and q["ssim"] >= PREVIEW_MIN_SSIM, q
    assert q["psnr_db"] < 40.0, q                   # the calibration really is skipped
    assert torch.equal(got, again)                  # deterministic: a re-scrub shows the same frame


def test_bfloat16_end_to_end_within_its_bound_of_float32(bench, setup):
    s, sh = setup
    coeffs = s.coeff_batch(1)
    nets = FrameNets.build(sh, dtype=torch.bfloat16, channels_last=True, device="cpu")
    assert nets.weight_dtypes() == {torch.bfloat16}
    f32 = bench.engine_runner(s, sh, FoldedSynthesis.build(s.gen, s.wx, out_size=256, channels_last=True))
    b16 = bench.engine_runner(s, sh, FoldedSynthesis.build(s.gen, s.wx, out_size=256, channels_last=True,
                                                           dtype=torch.bfloat16), nets=nets, quality=FULL)
    with torch.no_grad():
        a, b = f32(coeffs), b16(coeffs)
    p = _psnr(b, a)
    assert BF16_MIN_PSNR_DB <= p < 120.0, p
