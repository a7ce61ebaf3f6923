"""styleheat evaluate: each metric against a closed form or an independent formula, the networks on
seeded random weights laid out like the real files, and the command end to end (tiny random model)."""
from __future__ import annotations

import json
import math
import shutil
import sys
import types
import warnings

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


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One torch thread for this module. On a 2-core machine shared with other jobs, two OpenMP threads wait
    on each other at every layer: the whole file took 138 s with 2 threads and 19 s with 1 here (the
    numbers do not depend on the thread count). The command itself never raises the count it is given."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def test_frechet_distance_of_singular_covariances_is_quiet_and_exact():
    """scipy's sqrtm warns "Matrix is singular" on these; the distance passes no warning on and stays exact."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s, t = np.diag([1.0, 2.0, 0.0, 0.0]), np.diag([3.0, 0.0, 1.0, 0.0])
        want = (1 - math.sqrt(3)) ** 2 + (math.sqrt(2) - 0) ** 2 + (0 - 1) ** 2
        assert M.frechet_distance(np.zeros(4), s, np.zeros(4), t) == pytest.approx(want, rel=1e-9)
        # more samples than dimensions, but features that are always 0 (dead ReLUs): rank-deficient
        a, b = RNG.randn(40, 8), RNG.randn(30, 8) + 0.2
        a[:, 3] = 0
        b[:, [3, 5]] = 0
        ca, cb = a - a.mean(0), b - b.mean(0)
        tr = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / math.sqrt(39 * 29)  # Tr sqrt(S1 S2), exact
        diff = a.mean(0) - b.mean(0)
        want = diff @ diff + np.trace(np.cov(a, rowvar=False)) + np.trace(np.cov(b, rowvar=False)) - 2 * tr
        got = M.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        assert got == pytest.approx(want, rel=1e-6)


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


def _standin_torchvision(built: list):
    """Module objects to register as ``torchvision`` / ``torchvision.models``: only ``alexnet``, built with
    torch.nn layers in torchvision's AlexNet layout (``features`` 0..12, ``avgpool``, ``classifier`` 0..6),
    randomly initialised and never downloading. Each model built is appended to ``built``."""

    class AlexNet(torch.nn.Module):
        def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
            super().__init__()
            nn = torch.nn
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2))
            self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
            self.classifier = nn.Sequential(
                nn.Dropout(p=dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
                nn.Dropout(p=dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, num_classes))

    def alexnet(pretrained: bool = False, weights=None, progress: bool = True, **kwargs):
        if pretrained or weights is not None:
            raise RuntimeError("the stand-in torchvision downloads nothing; load the backbone weights yourself")
        with torch.device("meta"):  # the classifier (58M parameters) is part of the layout, unused by LPIPS
            model = AlexNet(**kwargs)
        model.features.to_empty(device="cpu")
        built.append(model)
        return model

    models = types.ModuleType("torchvision.models")
    models.alexnet = alexnet
    tv = types.ModuleType("torchvision")
    tv.models = models
    tv.__doc__ = "stand-in (tests/test_evaluation.py): torchvision 0.28.0 does not import beside this torch build"
    return tv, models


@pytest.fixture
def lpips_package():
    """The lpips package's own code (lpips==0.1.4, the test extra), imported beside the stand-in torchvision;
    sys.modules is restored afterwards. Yields (lpips module, list of AlexNets it built)."""
    from server.commands.evaluate import installed_lpips_heads

    if installed_lpips_heads() is None:
        pytest.fail("lpips==0.1.4 is not installed (test extra); `pip install --no-deps lpips==0.1.4`")
    ours = lambda k: k.split(".")[0] in ("lpips", "torchvision")  # noqa: E731
    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved:
        del sys.modules[k]
    built: list = []
    sys.modules["torchvision"], sys.modules["torchvision.models"] = _standin_torchvision(built)
    try:
        import lpips

        yield lpips, built
    finally:
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_lpips_equals_the_lpips_package(weight_files, lpips_package, fixtures_dir):
    """Our LPIPSAlex against ``lpips.LPIPS(net='alex')`` -- the lpips package's own network, scaling layer,
    normalisation, heads and averaging -- on the same weights: the linear heads the package ships
    (lpips/weights/v0.1/alex.pth, loaded by lpips itself and by us from the same file) and the seeded
    AlexNet backbone file.

    Stood in: only ``torchvision.models.alexnet``. torchvision 0.28.0 (the only release for torch 2.13.0)
    does not import beside this CPU torch build, and lpips needs nothing else from it. The stand-in
    builds torchvision's AlexNet layout from torch.nn layers without weights (``pnet_rand=True``: lpips
    asks for no pretrained download); the seeded ``features.*`` tensors are then loaded strictly into the
    model lpips built, as the real ImageNet file would be."""
    from server.commands.evaluate import installed_lpips_heads

    lpips, built = lpips_package
    ref = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)
    assert len(built) == 1
    alex = torch.load(weight_files / "alexnet-owt-7be5be79.pth", weights_only=True)
    built[0].features.load_state_dict({k.removeprefix("features."): v for k, v in alex.items()
                                       if k.startswith("features.")}, strict=True)
    # lpips' slices hold the very modules loaded above; its heads are the shipped file
    torch.testing.assert_close(ref.net.slice1[0].weight, alex["features.0.weight"], rtol=0, atol=0)
    heads_file = installed_lpips_heads()
    shipped = torch.load(heads_file, map_location="cpu", weights_only=True)
    torch.testing.assert_close(ref.lin2.model[1].weight, shipped["lin2.model.1.weight"], rtol=0, atol=0)

    ours = N.LPIPSAlex.from_files(weight_files / "alexnet-owt-7be5be79.pth", heads_file)
    face = np.asarray(Image.open(fixtures_dir / "portrait_40.jpg").convert("RGB").resize((96, 96)))
    g = torch.Generator().manual_seed(5)
    a = torch.cat([N.uint8_to_pm1(face), torch.rand(2, 3, 96, 96, generator=g) * 2 - 1])
    b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    for x, y in ((a, b), (a[:, :, :77, :90], b[:, :, :77, :90])):  # and an odd, non-square size
        want = ref(x, y).view(-1)
        got = ours(x, y)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        assert (got > 0).all()
    assert ours(a, a).abs().max() < 1e-6


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
# Kept short on purpose (2 CPU cores): 3-frame videos, 2 driving frames, 64² renders, and each command
# run once per module (the same-id run is shared by the output checks and the resume check).

SIZE = 192
PATH = [(0, 0), (4, 2), (8, 4)]  # (dx, dy) per frame: the face moves along a path
FRAMES = 2                       # driving frames (same-id: frame 0 is the source, frames 1..2 drive)


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
    videos, sources = root / "videos", root / "sources"
    videos.mkdir()
    sources.mkdir()
    for name, fixture, offsets in (("a.avi", "portrait_100.jpg", PATH), ("b.avi", "portrait_40.jpg", PATH[::-1])):
        base = np.asarray(Image.open(fixtures_dir / fixture).convert("RGB").resize((SIZE, SIZE)))
        _video(videos / name, base, offsets)
    for name, fixture in (("s1.png", "portrait_40.jpg"), ("s2.png", "portrait_100.jpg")):
        Image.open(fixtures_dir / fixture).convert("RGB").resize((96, 96)).save(sources / name)
    ckpt = root / "ckpt"
    (ckpt / "Deep3D").mkdir(parents=True)
    state = seeded_part(load_layout(reference_dir / "deep3d_checkpoints.json"), "checkpoints/Deep3D/epoch_20.pth",
                        "net_recon", seed=0)
    torch.save({"net_recon": state}, ckpt / "Deep3D" / "epoch_20.pth")
    return {"videos": videos, "sources": sources, "ckpt": ckpt, "weights": weight_files, "root": root}


def _evaluate(setup, out, *extra, protocol="same-id"):
    more = ["--sources", str(setup["sources"])] if protocol == "cross-id" else []
    return main(["evaluate", protocol, "--videos", str(setup["videos"]), *more, "--frames", str(FRAMES),
                 "--size", "64", "--tiny-random", "--checkpoints", str(setup["ckpt"]),
                 "--eval-weights", str(setup["weights"]), "--out", str(out), "--quiet", *extra])


@pytest.fixture(scope="module")
def same_id(setup):
    """One uninterrupted same-id run over both videos (all seven metrics)."""
    out = setup["root"] / "full"
    assert _evaluate(setup, out) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_same_id_end_to_end(same_id):
    out, doc = same_id
    assert set(doc["summary"]) == {"psnr", "ssim", "lpips", "fid", "csim", "aed", "apd"}
    assert all(v is not None and math.isfinite(v) for v in doc["summary"].values()), doc["summary"]
    assert doc["frames_total"] == 2 * FRAMES and [p["video"] for p in doc["pairs"]] == ["a.avi", "b.avi"]
    assert all(len(p[f"{m}_per_frame"]) == FRAMES for p in doc["pairs"] for m in ("psnr", "lpips", "csim", "aed"))
    # the summary is the mean over every frame of every pair
    psnr = [v for p in doc["pairs"] for v in p["psnr_per_frame"]]
    assert doc["summary"]["psnr"] == pytest.approx(np.mean(psnr), rel=1e-12)
    report = (out / "report.md").read_text()
    assert "| StyleHEAT (paper, Table 2) | 18.02 | 0.1729 | 31.21 |" in report
    assert "Tiny random model" in report
    png = cv2.imread(str(out / "report.png"))
    assert png is not None and png.shape[0] > 100
    assert len(list((out / "cache").glob("*.npz"))) == 2


def test_same_id_interrupted_and_resumed_gives_the_same_numbers(setup, same_id, tmp_path):
    """The cache a run killed while on video b leaves behind: a's finished entry and b's half-written
    temporary file. The resumed run reuses a's entry, computes b, and reports the uninterrupted run's numbers."""
    full, doc = same_id
    (a_entry,) = (full / "cache").glob("a-*.npz")
    (b_entry,) = (full / "cache").glob("b-*.npz")
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy2(a_entry, cache / a_entry.name)
    (cache / f".{b_entry.name}.tmp").write_bytes(b"PK\x03\x04 cut off")
    mtime = (cache / a_entry.name).stat().st_mtime_ns
    assert _evaluate(setup, tmp_path) == 0
    assert (cache / a_entry.name).stat().st_mtime_ns == mtime  # reused, not recomputed
    assert (cache / b_entry.name).is_file()                     # same key: same inputs and options
    with np.load(cache / b_entry.name) as got, np.load(b_entry) as want:
        for k in ("psnr", "ssim", "lpips", "csim", "aed", "apd", "fid_gen", "fid_real"):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-9, err_msg=k)
    resumed = json.loads((tmp_path / "metrics.json").read_text())
    for k, v in doc["summary"].items():
        assert resumed["summary"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_cache_key_follows_the_inputs_and_options(setup, tmp_path):
    from server.evaluation.protocol import Options, cache_key

    video = tmp_path / "v.avi"
    shutil.copy(setup["videos"] / "a.avi", video)
    base = Options(frames=2, size=64, metrics=("psnr", "aed"), model_id="m")
    key = cache_key("same-id", base, video)
    assert cache_key("same-id", Options(frames=2, size=64, metrics=("aed", "psnr"), model_id="m"), video) == key
    for other in (Options(frames=3, size=64, metrics=("psnr", "aed"), model_id="m"),
                  Options(frames=2, size=128, metrics=("psnr", "aed"), model_id="m"),
                  Options(frames=2, size=64, metrics=("psnr",), model_id="m"),
                  Options(frames=2, size=64, metrics=("psnr", "aed"), distance="l2", model_id="m"),
                  Options(frames=2, size=64, metrics=("psnr", "aed"), model_id="other"),
                  Options(frames=2, size=64, metrics=("psnr", "aed"), model_id="m",
                          weights={"arcface": str(setup["weights"] / "model_ir_se50.pth")})):
        assert cache_key("same-id", other, video) != key, other
    assert cache_key("cross-id", base, video) != key
    video.write_bytes(video.read_bytes() + b"\0")  # the video changed
    assert cache_key("same-id", base, video) != key


def test_cross_id_end_to_end(setup, tmp_path):
    """2 sources x 1 video: FID against the sources, CSIM against the source, AED/APD against the video."""
    from server.evaluation.protocol import read_source

    out = tmp_path / "cross"
    assert _evaluate(setup, out, "--num-videos", "1", protocol="cross-id") == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc["summary"]) == {"fid", "csim", "aed", "apd"}
    assert all(v is not None and math.isfinite(v) for v in doc["summary"].values()), doc["summary"]
    assert [(p["source"], p["video"]) for p in doc["pairs"]] == [("s1.png", "a.avi"), ("s2.png", "a.avi")]
    assert doc["frames_total"] == 2 * FRAMES and all(len(p["aed_per_frame"]) == FRAMES for p in doc["pairs"])
    assert all(-1 <= v <= 1 for p in doc["pairs"] for v in p["csim_per_frame"])
    # FID's real set is the source portraits: recompute it from the cached generated features
    entries = [out / "cache" / p["cache"] for p in doc["pairs"]]
    assert [e.name.split("-")[0] for e in entries] == ["s1__a", "s2__a"]
    gen = np.concatenate([np.load(e)["fid_gen"] for e in entries])
    inc = N.FIDInception.from_file(setup["weights"] / "pt_inception-2015-12-05-6726825d.pth")
    real = inc.features(np.stack([read_source(setup["sources"] / s, 64) for s in ("s1.png", "s2.png")]))
    assert doc["summary"]["fid"] == pytest.approx(M.fid_from_features(gen, real), rel=1e-6)
    report = (out / "report.md").read_text()
    assert "| method | ×FID↓ | ×CSIM↑ | ×AED↓ | ×APD↓ |" in report
    assert "| StyleHEAT (paper, Table 2) | 91.28 | 0.4890 | 0.2630 | 0.03484 |" in report
    assert cv2.imread(str(out / "report.png")) is not None


def test_evaluate_errors_name_what_is_wrong(setup, tmp_path, capsys):
    rc = _evaluate(setup, tmp_path / "o", "--metrics", "csim", "--arcface-weights", str(tmp_path / "missing.pth"))
    err = capsys.readouterr().err
    assert rc == 1 and "missing.pth: file not found" in err and "model_ir_se50.pth" in err
    rc = _evaluate(setup, tmp_path / "o", "--metrics", "psnr,bogus")
    assert rc == 2 and "unknown bogus" in capsys.readouterr().err
    rc = _evaluate(setup, tmp_path / "o", "--metrics", "psnr", protocol="cross-id")
    assert rc == 2 and "need ground-truth frames" in capsys.readouterr().err
    rc = main(["evaluate", "same-id", "--videos", str(tmp_path), "--out", str(tmp_path / "o"), "--tiny-random",
               "--checkpoints", str(setup["ckpt"])])
    assert rc == 2 and "no videos in it" in capsys.readouterr().err
    # without weight files the metrics needing none are chosen and the skipped ones named (before any work)
    rc = main(["evaluate", "same-id", "--videos", str(setup["videos"]), "--frames", "40", "--size", "64",
               "--num-videos", "1", "--tiny-random", "--checkpoints", str(setup["ckpt"]),
               "--eval-weights", str(tmp_path), "--out", str(tmp_path / "o2"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "only 3 frames" in err and "lower --frames" in err
    assert "FID skipped" in err and "--inception-weights" in err and "CSIM skipped" in err


def test_default_metrics_are_those_with_weights(weight_files, tmp_path):
    from server.commands.evaluate import choose_metrics

    everything = {"alexnet": 1, "lpips_heads": 1, "inception": 1, "arcface": 1}
    assert choose_metrics(None, "same-id", everything) == (["psnr", "ssim", "lpips", "fid", "csim", "aed", "apd"], [])
    assert choose_metrics(None, "cross-id", everything) == (["fid", "csim", "aed", "apd"], [])
    chosen, notes = choose_metrics(None, "same-id", {"lpips_heads": 1, "arcface": 1})
    assert chosen == ["psnr", "ssim", "csim", "aed", "apd"]
    assert [n.split(":")[0] for n in notes] == ["LPIPS skipped", "FID skipped"]
    assert "--alexnet-weights" in notes[0] and "--lpips-heads" not in notes[0]
    # an explicit list is kept (loading then names the missing file)
    assert choose_metrics("fid,psnr,fid", "same-id", {}) == (["fid", "psnr"], [])
