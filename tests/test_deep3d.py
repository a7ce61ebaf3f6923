"""Deep3D regressor and preprocessing: official layout, bit-exact align_img, seeded-weight parity."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.deep3d import COEFF_SLICES, Deep3DConfig, ReconNet
from server.preprocessing import deep3d
from server.parity.reference import load_layout, seeded_part

LAYOUT_FILE = "checkpoints/Deep3D/epoch_20.pth"


@pytest.fixture(scope="module")
def vectors(reference_dir):
    return dict(np.load(reference_dir / "vectors_deep3d_seed0.npz"))


@pytest.fixture(scope="module")
def deep3d_layout(reference_dir):
    return load_layout(reference_dir / "deep3d_checkpoints.json")


@pytest.fixture(scope="module")
def seeded_state(deep3d_layout):
    return seeded_part(deep3d_layout, LAYOUT_FILE, "net_recon", seed=0)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, seeded_state):
    """A checkpoints folder holding a seeded epoch_20.pth laid out like the official file."""
    root = tmp_path_factory.mktemp("ckpt")
    (root / "Deep3D").mkdir()
    torch.save({"net_recon": seeded_state, "opt_00": {"state": {}, "param_groups": []}},
               root / "Deep3D" / "epoch_20.pth")
    return root


def test_regressor_has_the_official_keys_and_shapes(deep3d_layout):
    entries = deep3d_layout["files"][LAYOUT_FILE]["parts"]["net_recon"]["entries"]
    ours = ReconNet().state_dict()
    assert [e[0] for e in entries] == list(ours)
    for key, shape, dtype, _ in entries:
        assert list(ours[key].shape) == shape, key
        assert str(ours[key].dtype).replace("torch.", "") == dtype, key


def test_tiny_config_runs_and_has_257_outputs():
    net = ReconNet(Deep3DConfig.tiny()).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 257)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        net(torch.rand(3, 224, 224))


@pytest.mark.parametrize("layout_arg", ["folder", "file"])
def test_reference_vectors_all_match(reference_dir, layout_arg):
    from server.parity.verify_deep3d import verify_deep3d_vectors

    layout = reference_dir if layout_arg == "folder" else reference_dir / "deep3d_checkpoints.json"
    results = verify_deep3d_vectors(reference_dir / "vectors_deep3d_seed0.npz", layout)
    names = {r.name for r in results}
    for needed in ("deep3d.trans_params", "deep3d.image_224", "deep3d.lm5p", "deep3d.coeff_257",
                   "deep3d.row_73[:70]", "deep3d.row_73[70:] (crop)", "deep3d.alt_image_224",
                   "deep3d.image_256"):
        assert needed in names
    assert "deep3d.lm68 (dlib)" in names  # dlib is a dependency: the landmarks are checked too
    bad = [r.line() for r in results if not r.ok]
    assert not bad, "\n".join(bad)


def test_verify_names_a_missing_layout(reference_dir, tmp_path):
    from server.parity.verify_deep3d import verify_deep3d_vectors

    with pytest.raises(FileNotFoundError, match="deep3d_checkpoints.json"):
        verify_deep3d_vectors(reference_dir / "vectors_deep3d_seed0.npz", tmp_path)


def test_align_img_exact_on_both_cases(vectors):
    for pre in ("", "alt_"):
        a = deep3d.align_img(vectors["image_256"], deep3d.flip_y(vectors[pre + "lm68"]), vectors["lm3d_std"])
        np.testing.assert_array_equal(a.trans_params, vectors[pre + "trans_params"])
        np.testing.assert_array_equal(a.image, vectors[pre + "image_224"])
        np.testing.assert_allclose(a.landmarks, vectors[pre + "lm68_224"], rtol=0, atol=1e-9)
    # the alt case really resamples (scale != 1): the crop differs from the plain one
    assert not np.array_equal(vectors["image_224"], vectors["alt_image_224"])


def test_flip_y_does_not_mutate_and_built_in_standard_face(vectors):
    lm = vectors["lm68"].copy()
    flipped = deep3d.flip_y(lm)
    np.testing.assert_array_equal(lm, vectors["lm68"])
    np.testing.assert_array_equal(flipped, vectors["lm68_yflip"])
    np.testing.assert_array_equal(deep3d.STANDARD_LM5_3D, vectors["lm3d_std"])


def test_load_standard_lm5_reads_a_mat_with_the_5_point_rule(tmp_path):
    from scipy.io import savemat

    lm = np.arange(68 * 3, dtype=np.float64).reshape(68, 3)
    (tmp_path / "BFM").mkdir()
    savemat(tmp_path / "BFM" / "similarity_Lm3D_all.mat", {"lm": lm})
    got = deep3d.load_standard_lm5(tmp_path)
    expected = np.stack([(lm[36] + lm[39]) / 2, (lm[42] + lm[45]) / 2, lm[30], lm[48], lm[54]])
    np.testing.assert_array_equal(got, expected)
    # no .mat -> the built-in copy
    np.testing.assert_array_equal(deep3d.load_standard_lm5(tmp_path / "nowhere"), deep3d.STANDARD_LM5_3D)
    savemat(tmp_path / "BFM" / "similarity_Lm3D_all.mat", {"lm": lm[:10]})
    with pytest.raises(deep3d.CheckpointError, match=r"expected \(68, 3\)"):
        deep3d.load_standard_lm5(tmp_path)
    # the commands and the engine catch CheckpointError: a damaged or wrong file must not escape as another error
    savemat(tmp_path / "BFM" / "similarity_Lm3D_all.mat", {"other": lm})
    with pytest.raises(deep3d.CheckpointError, match="has no 'lm' variable"):
        deep3d.load_standard_lm5(tmp_path)
    (tmp_path / "BFM" / "similarity_Lm3D_all.mat").write_bytes(b"\x00junk" * 40)
    with pytest.raises(deep3d.CheckpointError, match="cannot be read as a MATLAB file"):
        deep3d.load_standard_lm5(tmp_path)


def test_row73_takes_exp_angle_trans_and_crop():
    coeff = np.arange(257, dtype=np.float32)[None]
    crop = np.array([[1.5, 120.0, 99.0]], dtype=np.float32)
    row = deep3d.row73(coeff, crop)[0]
    np.testing.assert_array_equal(row[:64], np.arange(80, 144))
    np.testing.assert_array_equal(row[64:67], [224, 225, 226])
    np.testing.assert_array_equal(row[67:70], [254, 255, 256])
    np.testing.assert_array_equal(row[70:], crop[0])
    assert COEFF_SLICES["trans"] == slice(254, 257)


def test_checkpoint_loads_strictly_from_an_official_layout_file(checkpoint_dir, vectors):
    ext = deep3d.Deep3DExtractor.from_checkpoints(checkpoint_dir)
    with torch.no_grad():
        coeff = ext.net(torch.from_numpy(vectors["input_224"])).numpy()
    np.testing.assert_allclose(coeff, vectors["coeff_257"], rtol=1e-5, atol=1e-5)
    rows = ext.rows([vectors["image_256"]], vectors["lm68"][None])
    np.testing.assert_allclose(rows[:, :70], vectors["row_73"][:, :70], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows[:, 70:], vectors["row_73"][:, 70:], rtol=1e-6)


def test_checkpoint_errors_are_clear(tmp_path, seeded_state):
    with pytest.raises(deep3d.CheckpointError, match="epoch_20.pth"):
        deep3d.Deep3DExtractor.from_checkpoints(tmp_path)
    torch.save({"net_recon": torch.zeros(3)}, tmp_path / "odd.pth")
    with pytest.raises(deep3d.CheckpointError, match="'net_recon' is a Tensor, not a state dict"):
        deep3d.load_net_recon_state(tmp_path / "odd.pth")
    broken = dict(seeded_state)
    del broken["final_layers.3.bias"]
    broken["final_layers.9.weight"] = torch.zeros(1)
    with pytest.raises(deep3d.CheckpointError, match=r"1 missing .*final_layers.3.bias.*1 unexpected"):
        deep3d.build_regressor(broken, source="test file")
    wrong = dict(seeded_state)
    wrong["final_layers.0.weight"] = torch.zeros(81, 2048, 1, 1)
    with pytest.raises(deep3d.CheckpointError, match="wrong shape"):
        deep3d.build_regressor(wrong)
    not_tensor = dict(seeded_state)
    not_tensor["final_layers.0.weight"] = [0.0] * 80  # e.g. a hand-edited file: a message, not AttributeError
    with pytest.raises(deep3d.CheckpointError, match=r"1 with the wrong shape .*final_layers.0.weight list"):
        deep3d.build_regressor(not_tensor)
    (tmp_path / "Deep3D").mkdir()
    torch.save({"something_else": {}}, tmp_path / "Deep3D" / "epoch_20.pth")
    with pytest.raises(deep3d.CheckpointError, match="no 'net_recon' entry"):
        deep3d.Deep3DExtractor.from_checkpoints(tmp_path)
    (tmp_path / "Deep3D" / "epoch_20.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(deep3d.CheckpointError, match="cannot read"):
        deep3d.Deep3DExtractor.from_checkpoints(tmp_path)


def test_the_tracker_needs_the_weights_and_says_which(tmp_path):
    from server.preprocessing.tracking import load_tracker

    with pytest.raises(deep3d.CheckpointError, match="epoch_20.pth"):
        load_tracker(tmp_path)


def test_the_tracker_reproduces_the_official_source_row(fixtures_dir, checkpoint_dir, vectors):
    """portrait_100.jpg -> NEAREST 256 -> dlib -> align_img -> ResNet: the reference's own row_73."""
    from PIL import Image

    from server.preprocessing.tracking import load_tracker

    img = np.asarray(Image.open(fixtures_dir / "portrait_100.jpg").convert("RGB"))
    row, reason = load_tracker(checkpoint_dir).portrait_row(img)
    assert reason is None
    assert row.shape == (73,) and row.dtype == np.float32
    np.testing.assert_allclose(row[:70], vectors["row_73"][0, :70], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(row[70:], vectors["row_73"][0, 70:], rtol=1e-6)
    row, reason = load_tracker(checkpoint_dir).portrait_row(np.zeros((256, 256, 3), np.uint8))
    assert row is None and "no face" in reason


def test_meta_seed_is_zero(vectors):
    assert json.loads(str(vectors["meta_json"]))["seed"] == 0
