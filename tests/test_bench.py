"""benchmarks/bench_render.py --tiny: runs end to end (real server included) and prints valid JSON.

Only the structure and the correctness checks are asserted, never timings.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

from models.fastpath import BF16_MIN_PSNR_DB

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "bench_render.py"
REQUIRED = ("speedup_1024_fp32", "speedup_1024_bf16", "speedup_256_vs_official_1024", "psnr_bf16_vs_fp32_1024",
            "speedup_preview_256_vs_official_1024", "transport_overhead_pct", "kernels", "preview_quality", "render")
#: tiny random networks are ill-conditioned (the CalibrationNet amplifies bf16 rounding): the bf16 bound checked
#: here is 25 dB; the full-size seeded network meets BF16_MIN_PSNR_DB (tests/test_fast_path_full.py)
TINY_BF16_MIN_PSNR_DB = 25.0


def _run(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(BENCH), "--tiny", "--json", *args], capture_output=True, text=True,
                         cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stdout[-2000:]            # exactly one JSON object on stdout
    return json.loads(lines[0])


def test_tiny_benchmark_prints_valid_json_with_the_required_keys():
    r = _run("--batches", "1,2", "--transport-frames", "4")
    for key in REQUIRED:
        assert key in r, key
    assert "cpu" in r or "gpu" in r
    for key in ("speedup_1024_fp32", "speedup_1024_bf16", "speedup_256_vs_official_1024"):
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r[key])
    assert isinstance(r["transport_overhead_pct"], float) and math.isfinite(r["transport_overhead_pct"])
    t = r["transport"]
    assert t["engine_fps"] > 0 and t["server_fps"] > 0 and t["frames"] == 4
    # what was timed is also checked: the float32 engine frame equals the official procedure's frame
    assert r["checks"]["engine_fp32_vs_official"]["ok"], r["checks"]
    assert TINY_BF16_MIN_PSNR_DB <= r["psnr_bf16_vs_fp32_1024"] < 120.0
    assert BF16_MIN_PSNR_DB > TINY_BF16_MIN_PSNR_DB
    # which kernels ran is printed: the oneDNN convolution implementation per dtype, the Winograd blocks
    k = r["kernels"]
    assert set(k["onednn_conv"]) == {"float32", "bfloat16"} and k["onednn_conv"]["float32"]
    assert k["bf16_native"] == r["bf16_native"] and set(k["winograd_blocks"]) == {"128_fp32", "64_fp32"}
    # preview rows, stage shares that add up, and the preview's quality beside its speed
    previews = [e for e in r["engine"] if e["quality"] == "preview"]
    assert previews and all(e["stage_share"].get("calibration", 0.0) == 0.0 for e in previews)
    for e in r["engine"]:
        assert set(e["stage_share"]) >= {"warper", "warp", "synthesis", "encode"}
        assert abs(sum(e["stage_share"].values()) - 1.0) < 1e-6
        assert sum(e["stage_s_per_frame"].values()) <= e["s_per_frame"] * 1.05
    for name in ("preview_fp32", "preview_bf16", "full_synthesis_stopped_fp32"):
        q = r["preview_quality"][name]
        assert 0 < q["psnr_db"] < 100 and -1 <= q["ssim"] <= 1, (name, q)
    c = r["compositing"]                       # the 4K paste-back row, beside the frame it is compared with
    assert c["photo"] == "3840x2160" and c["composite_s"] > 0 and c["matte_s"] > 0
    assert math.isclose(c["pct_of_full_frame_fp32"], 100 * c["composite_s"] / r["official_s_per_frame"]
                        * r["speedup_1024_fp32"], rel_tol=1e-6)
    assert r["targets"]["composite_4k_pct_of_frame"]["lower_is_better"] is True
    full = r["render"]["full_128_fp32"]
    assert full["frames"] == 6 and full["fps"] > 0 and r["render"]["preview_64_fp32"]["fps"] > 0
    assert r["official_procedure"]
    sizes = {(e["size"], e["dtype"], e["batch"]) for e in r["engine"]}
    assert {(128, "fp32", 1), (128, "fp32", 2), (64, "fp32", 1), (128, "bf16", 1)} <= sizes
    for e in r["engine"]:
        assert e["s_per_frame"] > 0 and e["gflop_per_frame"] > 0


def test_benchmark_without_server_reports_null_transport():
    r = _run("--batches", "1", "--no-server")
    assert r["transport_overhead_pct"] is None and "skipped" in r["transport"]
    assert r["checks"]["engine_fp32_vs_official"]["ok"]


def test_bad_arguments_are_clear_errors(capsys):
    import importlib.util

    import pytest

    spec = importlib.util.spec_from_file_location("bench_render", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for args, needle in ((["--batches", "x"], "--batches"), (["--batches", "0,2"], "--batches"),
                         (["--transport-frames", "0"], "--transport-frames"), (["--rounds", "0"], "--rounds"),
                         (["--render-frames", "0"], "--render-frames")):
        with pytest.raises(SystemExit) as exc:
            bench.main(["--tiny", *args])
        assert exc.value.code == 2, args
        assert needle in capsys.readouterr().err, args
