"""Full-size parity on the official reference vectors (seed 0), through `styleheat verify-reference`.

The expensive part (seeded full-size weights, every stage at 1024^2) runs once per session:
server.parity.verify_styleheat caches its outputs in-process keyed by the inputs, the seed and the
layout, so the tampered-copy run only re-compares.
"""
import shutil

import numpy as np
import pytest

from server import cli
from server.parity import verify_styleheat as vs

STAGES = ["e4e_wx", "e4e_ix_256", "hfgi_ix_256", "hfgi_fx", "hfgi_inversion_condition_0_scale",
          "vw_descriptor", "vw_flow_field", "vw_warp_image_256", "vw_deformation", "fx_warp_f16",
          "refining_condition_6", "refining_condition_7", "fake_image_1024_f16", "product_path_1024", "fast_path_1024",
          "stylegan_plain_1024_f16", "aw_input_256", "aw_flow_field", "edit_young_wx", "edit_young_ix_256",
          "edit_lip_wx", "edit_lip_ix_256"]


@pytest.fixture(scope="module")
def cli_run(reference_dir):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["verify-reference", "--vectors", str(reference_dir / "vectors_seed0.npz")])
    return rc, buf.getvalue()


@pytest.mark.slow
def test_verify_reference_passes_every_stage(cli_run):
    rc, out = cli_run
    lines = out.splitlines()
    assert rc == 0, out
    assert lines[-1] == "parity: PASS"
    for stage in STAGES:
        hits = [ln for ln in lines if ln.split()[0] == stage]
        assert len(hits) == 1 and hits[0].endswith(" ok"), (stage, out)


@pytest.mark.slow
def test_official_forward_and_product_path_final_image(cli_run, reference_dir, vectors_seed0):
    from server.parity.reference import compare

    assert cli_run[0] == 0
    outputs = vs.compute_styleheat_outputs(vectors_seed0, reference_dir / vs.STYLEHEAT_LAYOUT)  # cached
    official = outputs["fake_image_1024_f16"]
    product = outputs["product_path_1024"]
    ref = vectors_seed0["fake_image_1024_f16"]
    assert official.shape == product.shape == (1, 3, 1024, 1024)
    assert compare("official_forward", official, ref).ok
    assert compare("product_path", product, ref).ok
    # the product path is the same computation without the debug passes: float32-close to official_forward
    assert float(np.abs(product - official).max()) <= 1e-4
    # and the image is not trivially close to anything: the warp + calibration matter
    assert float(np.abs(official - vectors_seed0["stylegan_plain_1024_f16"].astype(np.float32)).max()) > 0.05


@pytest.mark.slow
def test_verify_reference_fails_naming_the_tampered_stage(cli_run, reference_dir, tmp_path, capsys):
    assert cli_run[0] == 0
    v = dict(np.load(reference_dir / "vectors_seed0.npz"))
    v["vw_flow_field"] = v["vw_flow_field"] + np.float32(0.01)
    copy = tmp_path / "vectors_seed0.npz"
    np.savez(copy, **v)
    shutil.copy(reference_dir / vs.STYLEHEAT_LAYOUT, tmp_path / vs.STYLEHEAT_LAYOUT)
    rc = cli.main(["verify-reference", "--vectors", str(copy)])
    out = capsys.readouterr().out
    assert rc == 1
    assert out.splitlines()[-1] == "parity: FAIL vw_flow_field"
    assert [ln for ln in out.splitlines() if ln.startswith("vw_flow_field")][0].endswith("FAIL")
    assert [ln for ln in out.splitlines() if ln.startswith("fake_image_1024_f16")][0].endswith("ok")
