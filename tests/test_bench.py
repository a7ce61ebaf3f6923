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
            "transport_overhead_pct")


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
    assert r["psnr_bf16_vs_fp32_1024"] >= BF16_MIN_PSNR_DB
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
                         (["--transport-frames", "0"], "--transport-frames"), (["--rounds", "0"], "--rounds")):
        with pytest.raises(SystemExit) as exc:
            bench.main(["--tiny", *args])
        assert exc.value.code == 2, args
        assert needle in capsys.readouterr().err, args
