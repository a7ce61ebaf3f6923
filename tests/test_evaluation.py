"""styleheat evaluate: each metric against a closed form or an independent formula, the networks on
seeded random weights laid out like the real files, and the command end to end (tiny random model)."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from server.cli import main
from server.evaluation import metrics as M
from server.evaluation import networks as N
from server.parity.reference import load_layout, seeded_part

RNG = np.random.RandomState(0)


# ----------------------------------------------------------------------------- closed forms

def test_psnr_of_a_known_error():
    a = RNG.randint(10, 240, (32, 32, 3)).astype(np.uint8)
    b = a.copy()
    b[0, 0, 0] += 5  # one pixel off by 5: MSE = 25 / (32*32*3)
    assert M.psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / (25 / (32 * 32 * 3))), rel=1e-12)
    assert M.psnr(a, a) == math.inf
    with pytest.raises(ValueError, match="one size"):
        M.psnr(a, a[:16])


def test_ssim_is_scikit_image_with_the_stated_window():
    from skimage.metrics import structural_similarity

    a = RNG.randint(0, 256, (40, 40, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + RNG.randint(-30, 30, a.shape), 0, 255).astype(np.uint8)
    assert M.ssim(a, a) == pytest.approx(1.0)
    per_channel = [structural_similarity(a[..., c], b[..., c], win_size=7, data_range=255) for c in range(3)]
    assert M.ssim(a, b) == pytest.approx(np.mean(per_channel), rel=1e-9)
    assert M.ssim(a, b) < 0.99


def test_frechet_distance_closed_forms():
    from scipy import linalg

    mu = RNG.randn(5)
    x = RNG.randn(5, 5)
    s = x @ x.T + np.eye(5)
    assert M.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8)
    # diagonal covariances: sum (m1-m2)^2 + sum (sqrt(v1) - sqrt(v2))^2
    v1, v2 = RNG.rand(5) + 0.1, RNG.rand(5) + 0.1
    mu2 = mu + RNG.randn(5)
    want = ((mu - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert M.frechet_distance(mu, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-9)
    # the general formula with scipy's sqrtm
    y = RNG.randn(5, 5)
    s2 = y @ y.T + 0.5 * np.eye(5)
    want = ((mu - mu2) ** 2).sum() + np.trace(s + s2 - 2 * np.real(linalg.sqrtm(s @ s2)))
    assert M.frechet_distance(mu, s, mu2, s2) == pytest.approx(want, rel=1e-9)
    f = RNG.randn(50, 4)
    assert M.fid_from_features(f, f.copy()) == pytest.approx(0.0, abs=1e-8)
    # fewer samples than dimensions: the low-rank path equals scipy's sqrtm formula
    a, b = RNG.randn(6, 20), RNG.randn(7, 20) + 0.3
    full = M.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert M.fid_from_features(a, b) == pytest.approx(full, rel=1e-6)


def test_cosine_and_motion_distances():
    e = RNG.randn(3, 512)
    np.testing.assert_allclose(M.cosine_similarity(e, e), 1.0, rtol=1e-12)
    np.testing.assert_allclose(M.cosine_similarity(e, -2 * e), -1.0, rtol=1e-12)
    rows = RNG.randn(4, 73)
    np.testing.assert_array_equal(M.aed(rows, rows), 0)
    np.testing.assert_array_equal(M.apd(rows, rows), 0)
    moved = rows.copy()
    moved[:, :64] += 0.25          # every expression coefficient off by 0.25
    moved[:, 64:70] -= 0.01        # every pose value off by 0.01
    moved[:, 70:] += 9             # crop columns are not pose
    np.testing.assert_allclose(M.aed(moved, rows), 0.25)
    np.testing.assert_allclose(M.apd(moved, rows), 0.01)
    np.testing.assert_allclose(M.aed(moved, rows, "l2"), 0.25 * 8)  # sqrt(64 * 0.25^2)
    np.testing.assert_allclose(M.apd(moved, rows, "l2"), 0.01 * math.sqrt(6))
    with pytest.raises(ValueError, match="l1"):
        M.aed(rows, rows, "cosine")


# ----------------------------------------------------------------------------- networks, seeded files

def _seeded(module: torch.nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if k.endswith("num_batches_tracked"):
            out[k] = v
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(v.shape, generator=g) * 0.1
    return out


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalweights")
    alex = {f"features.{k}": v for k, v in _seeded(N.alexnet_features(), 1).items()}
    alex["classifier.1.weight"] = torch.zeros(8, 4)  # torchvision's file also has the classifier
    torch.save(alex, d / "alexnet-owt-7be5be79.pth")
    g = torch.Generator().manual_seed(2)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(N.ALEX_CHANNELS)},
               d / "lpips_alex_v0.1.pth")
    inc = _seeded(N.FIDInception(), 3)
    inc = {k: v for k, v in inc.items() if not k.endswith("num_batches_tracked")}
    inc["fc.weight"], inc["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # as the real file
    torch.save(inc, d / "pt_inception-2015-12-05-6726825d.pth")
    torch.save(_seeded(N.ArcFaceIRSE50(), 4), d / "model_ir_se50.pth")
    return d


def _lpips_by_formula(alex_sd, heads_sd, a, b):
    """LPIPS written out with functional ops from the two files (independent of LPIPSAlex)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(x):
        x = (x - shift) / scale
        w = lambda i: (alex_sd[f"features.{i}.weight"], alex_sd[f"features.{i}.bias"])  # noqa: E731
        r1 = F.relu(F.conv2d(x, *w(0), stride=4, padding=2))
        r2 = F.relu(F.conv2d(F.max_pool2d(r1, 3, 2), *w(3), padding=2))
        r3 = F.relu(F.conv2d(F.max_pool2d(r2, 3, 2), *w(6), padding=1))
        r4 = F.relu(F.conv2d(r3, *w(8), padding=1))
        r5 = F.relu(F.conv2d(r4, *w(10), padding=1))
        return [r1, r2, r3, r4, r5]

    total = torch.zeros(a.shape[0], dtype=torch.float64)
    for i, (x, y) in enumerate(zip(feats(a), feats(b))):
        x = x.double() / (x.double().norm(dim=1, keepdim=True) + 1e-10)
        y = y.double() / (y.double().norm(dim=1, keepdim=True) + 1e-10)
        wlin = heads_sd[f"lin{i}.model.1.weight"].double().view(1, -1, 1, 1)
        total += ((x - y) ** 2 * wlin).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_matches_the_formula_on_seeded_files(weight_files):
    net = N.LPIPSAlex.from_files(weight_files / "alexnet-owt-7be5be79.pth", weight_files / "lpips_alex_v0.1.pth")
    a = torch.rand(2, 3, 80, 80) * 2 - 1
    b = torch.rand(2, 3, 80, 80) * 2 - 1
    ref = _lpips_by_formula(torch.load(weight_files / "alexnet-owt-7be5be79.pth", weights_only=True),
                            torch.load(weight_files / "lpips_alex_v0.1.pth", weights_only=True), a, b)
    got = net(a, b).double()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert (got > 0).all()
    assert net(a, a).abs().max() < 1e-6


def test_inception_and_arcface_load_seeded_files(weight_files):
    inc = N.FIDInception.from_file(weight_files / "pt_inception-2015-12-05-6726825d.pth")
    imgs = RNG.randint(0, 256, (3, 64, 64, 3)).astype(np.uint8)
    f = inc.features(imgs)
    assert f.shape == (3, 2048) and np.isfinite(f).all() and (f >= 0).all()  # after ReLU + average pool
    np.testing.assert_allclose(inc.features(imgs[:1]), f[:1], rtol=1e-5, atol=1e-6)  # batch-independent (eval BN)
    arc = N.ArcFaceIRSE50.from_file(weight_files / "model_ir_se50.pth")
    e = arc.embed(RNG.randint(0, 256, (2, 128, 128, 3)).astype(np.uint8))
    assert e.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(M.cosine_similarity(e, e), 1.0, rtol=1e-9)  # CSIM(x, x) = 1


def test_missing_and_wrong_weight_files_name_the_file(weight_files, tmp_path):
    with pytest.raises(N.WeightsFileError, match=r"--inception-weights .*nope\.pth: file not found.*pt_inception"):
        N.FIDInception.from_file(tmp_path / "nope.pth")
    with pytest.raises(N.WeightsFileError, match=r"CSIM needs --arcface-weights FILE: model_ir_se50\.pth"):
        N.ArcFaceIRSE50.from_file(None)
    # a real checkpoint of the wrong network
    with pytest.raises(N.WeightsFileError, match=r"--arcface-weights .*alexnet-owt.*wrong file.*model_ir_se50"):
        N.ArcFaceIRSE50.from_file(weight_files / "alexnet-owt-7be5be79.pth")
    bad = tmp_path / "damaged.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(N.WeightsFileError, match=r"--alexnet-weights .*damaged\.pth: cannot be loaded"):
        N.LPIPSAlex.from_files(bad, weight_files / "lpips_alex_v0.1.pth")
    sd = torch.load(weight_files / "lpips_alex_v0.1.pth", weights_only=True)
    sd["lin2.model.1.weight"] = torch.zeros(1, 7, 1, 1)
    torch.save(sd, tmp_path / "heads.pth")
    with pytest.raises(N.WeightsFileError, match=r"--lpips-heads .*heads\.pth: wrong file.*shape \(1, 7, 1, 1\)"):
        N.LPIPSAlex.from_files(weight_files / "alexnet-owt-7be5be79.pth", tmp_path / "heads.pth")


# ----------------------------------------------------------------------------- end to end

SIZE = 192
PATH = [(0, 0), (3, 1), (6, 2), (8, 4), (10, 5)]  # (dx, dy) per frame: the face moves along a path


def _video(path, base, offsets):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (SIZE, SIZE))
    assert writer.isOpened()
    for dx, dy in offsets:
        m = np.float32([[1, 0, dx], [0, 1, dy]])
        frame = cv2.warpAffine(base, m, (SIZE, SIZE), borderMode=cv2.BORDER_REFLECT101)
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fixtures_dir, reference_dir, weight_files):
    root = tmp_path_factory.mktemp("eval")
    videos = root / "videos"
    videos.mkdir()
    for name, fixture, offsets in (("a.avi", "portrait_100.jpg", PATH), ("b.avi", "portrait_40.jpg", PATH[::-1])):
        base = np.asarray(Image.open(fixtures_dir / fixture).convert("RGB").resize((SIZE, SIZE)))
        _video(videos / name, base, offsets)
    ckpt = root / "ckpt"
    (ckpt / "Deep3D").mkdir(parents=True)
    state = seeded_part(load_layout(reference_dir / "deep3d_checkpoints.json"), "checkpoints/Deep3D/epoch_20.pth",
                        "net_recon", seed=0)
    torch.save({"net_recon": state}, ckpt / "Deep3D" / "epoch_20.pth")
    return {"videos": videos, "ckpt": ckpt, "weights": weight_files, "root": root}


def _evaluate(setup, out, *extra):
    return main(["evaluate", "same-id", "--videos", str(setup["videos"]), "--frames", "3", "--size", "64",
                 "--tiny-random", "--checkpoints", str(setup["ckpt"]), "--eval-weights", str(setup["weights"]),
                 "--out", str(out), "--quiet", *extra])


def test_same_id_end_to_end_and_resume(setup, capsys):
    full = setup["root"] / "full"
    assert _evaluate(setup, full) == 0
    doc = json.loads((full / "metrics.json").read_text())
    assert set(doc["summary"]) == {"psnr", "ssim", "lpips", "fid", "csim", "aed", "apd"}
    assert all(v is not None and math.isfinite(v) for v in doc["summary"].values()), doc["summary"]
    assert doc["frames_total"] == 6 and len(doc["pairs"]) == 2
    assert len(doc["pairs"][0]["psnr_per_frame"]) == 3
    report = (full / "report.md").read_text()
    assert "| StyleHEAT (paper, Table 2) | 18.02 | 0.1729 | 31.21 |" in report
    assert "Tiny random model" in report
    png = cv2.imread(str(full / "report.png"))
    assert png is not None and png.shape[0] > 100

    # interrupted run: only the first video finished, then the run is started again over both
    part = setup["root"] / "part"
    assert _evaluate(setup, part, "--num-videos", "1") == 0
    first = sorted((part / "cache").glob("a-*.npz"))
    assert len(first) == 1
    mtime = first[0].stat().st_mtime_ns
    assert _evaluate(setup, part) == 0
    assert first[0].stat().st_mtime_ns == mtime  # reused from the cache, not recomputed
    resumed = json.loads((part / "metrics.json").read_text())
    for k, v in doc["summary"].items():
        assert resumed["summary"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    # a different option is a different cache entry
    assert _evaluate(setup, part, "--metrics", "psnr,aed", "--num-videos", "1") == 0
    assert len(list((part / "cache").glob("a-*.npz"))) == 2
    capsys.readouterr()


def test_evaluate_errors_name_what_is_wrong(setup, tmp_path, capsys):
    rc = _evaluate(setup, tmp_path / "o", "--metrics", "csim", "--arcface-weights", str(tmp_path / "missing.pth"))
    err = capsys.readouterr().err
    assert rc == 1 and "missing.pth: file not found" in err and "model_ir_se50.pth" in err
    rc = _evaluate(setup, tmp_path / "o", "--metrics", "psnr,bogus")
    assert rc == 2 and "unknown bogus" in capsys.readouterr().err
    rc = main(["evaluate", "same-id", "--videos", str(tmp_path), "--out", str(tmp_path / "o"), "--tiny-random",
               "--checkpoints", str(setup["ckpt"])])
    assert rc == 2 and "no videos in it" in capsys.readouterr().err
    rc = _evaluate(setup, tmp_path / "o", "--frames", "40")
    assert rc == 2 and "only 5 frames" in capsys.readouterr().err
    # without weight files the default metrics are those that need none, and the skipped ones are named
    rc = main(["evaluate", "same-id", "--videos", str(setup["videos"]), "--frames", "2", "--size", "64",
               "--num-videos", "1", "--tiny-random", "--checkpoints", str(setup["ckpt"]),
               "--eval-weights", str(tmp_path), "--out", str(tmp_path / "o2"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0 and "FID skipped" in err and "--inception-weights" in err
    assert set(json.loads((tmp_path / "o2" / "metrics.json").read_text())["summary"]) <= {
        "psnr", "ssim", "aed", "apd", "lpips"}
