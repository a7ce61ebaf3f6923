"""Training (issue 9): loss terms with known answers, helper-network layouts, each stage on a tiny synthetic
dataset (loss goes down), checkpoint/resume, export loadable by the inference path, distributed (gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training import data as D
from training import losses as L
from training.config import ConfigError, TrainConfig, defaults_for
from training.trainer import Trainer, read_scalars

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- synthetic data
def make_dataset(root: Path, res: int, *, clips: int = 1, frames: int = 2, audio: bool = False, seed: int = 0) -> Path:
    """Frames of a textured blob that moves; coefficients record the motion; mouth landmarks follow it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res] / res
    for c in range(clips):
        imgs, rows, lms = [], [], []
        for i in range(frames):
            dx, dy = 0.08 * np.sin(1.7 * i + c), 0.06 * np.cos(1.3 * i + c)
            tex = np.stack([np.sin(9 * (xx - dx) + k) * np.cos(7 * (yy - dy) * (k + 1)) for k in range(3)], -1)
            blob = np.exp(-((xx - 0.5 - dx) ** 2 + (yy - 0.55 - dy) ** 2) / 0.03)[..., None]
            imgs.append(np.clip((0.4 * tex + 0.9 * blob - 0.3 + 1) * 127.5, 0, 255).astype(np.uint8))
            row = np.zeros(73, np.float32)
            row[:64] = rng.normal(size=64) * 0.2
            row[64:67] = [dy * 3, dx * 3, 0.0]
            row[67:70] = [dx * 10, dy * 10, 0.0]
            row[70:73] = [1.0, 128.0, 128.0]
            rows.append(row)
            lm = rng.uniform(0.3, 0.7, size=(68, 2)) * res
            lm[48:68] = (np.array([0.5 + dx, 0.72 + dy]) + rng.normal(size=(20, 2)) * 0.03) * res
            lms.append(lm)
        kw = {}
        if audio:
            n = int(16000 * frames / 25)
            t = np.arange(n) / 16000
            kw["wav16k"] = (0.2 * np.sin(2 * np.pi * (200 + 80 * c) * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
        D.write_clip(root, f"id{c:05d}#vid#{c:03d}", np.stack(imgs), np.stack(rows), np.stack(lms).astype(np.float32), **kw)
    return root


def tiny_cfg(stage: str, data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(stage=stage, data=str(data), out=str(out), model="tiny", steps=3, batch_size=1, lr=2e-3,
                lr_finetune=2e-3, random_helpers=True, helper_width=16, samples_per_epoch=1, num_workers=0,
                log_every=1, sample_every=1000, checkpoint_every=1000, discriminator_size=64,
                perceptual_layers=["relu_1_1", "relu_2_1", "relu_3_1"], perceptual_scales=2, amp="off")
    base.update(kw)
    return TrainConfig(**base)


def fixed_batch(trainer: Trainer) -> dict:
    """The one item a samples_per_epoch=1 run trains on at every step (so the loss must go down on it)."""
    items = [trainer.dataset[0]]
    return {k: v.to(trainer.device) for k, v in D.collate(items).items()}


def eval_loss(trainer: Trainer, batch) -> float:
    with torch.no_grad():
        total, _, _ = trainer.compute(batch)
    return float(total)


@pytest.fixture(scope="module")
def ds256(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds256"), 256)


@pytest.fixture(scope="module")
def ds256_audio(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds256a"), 256, frames=6, audio=True)


@pytest.fixture(scope="module")
def ds128(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds128"), 128)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A tiny StyleHEAT with demo-random weights (server.engine's) saved as a bundle and as official files."""
    from models import weights
    from server.engine import Engine

    eng = Engine.tiny_random(seed=0, audio=False, edits=False)
    d = tmp_path_factory.mktemp("init")
    weights.save_bundle(d / "init.safetensors", eng.model)
    model = eng.model
    weights.write_official(d / "official", model)
    return d / "init.safetensors", d / "official", model


# ------------------------------------------------------------------------------------------- losses
def test_perceptual_known_answers():
    torch.manual_seed(0)
    p = L.PerceptualLoss(L.VGG19Features(width=16), num_scales=2)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = torch.rand(2, 3, 64, 64) * 2 - 1
    assert float(p(x, x)) == 0.0
    assert float(p(x, y)) > 0.0
    assert float(p(x, y, torch.zeros(2, 1, 64, 64))) == 0.0             # mask covering nothing -> 0
    assert torch.allclose(p(x, y, torch.ones(2, 1, 64, 64)), p(x, y))    # mask covering all -> unmasked
    half = torch.zeros(2, 1, 64, 64)
    half[..., :32] = 1
    y2 = x.clone()
    y2[..., 32:] = y[..., 32:]                                          # differs only where the mask is 0
    assert float(p(x, y2, half)) == 0.0
    assert float(p(x, y2)) > 0.0


def test_masked_l1_and_masks():
    x, y = torch.ones(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    assert float(L.masked_l1(x, x)) == 0.0
    assert float(L.masked_l1(x, y)) == 1.0
    m = L.box_mask(torch.tensor([[2.0, 3.0, 6.0, 5.0]]), 8)
    assert m.shape == (1, 1, 8, 8) and float(m.sum()) == 8.0               # x 2..5, y 3..4
    assert float(m[0, 0, 3, 2]) == 1.0 and float(m[0, 0, 5, 2]) == 0.0 and float(m[0, 0, 3, 6]) == 0.0
    assert float(L.masked_l1(x, y, m)) == pytest.approx(8 / 64)
    # landmarks far outside the image: the region mask is empty, the complement term is the plain one
    lms = torch.full((1, 68, 2), -1000.0)
    hard = L.region_mask(lms, 8, [L.MOUTH, L.LEFT_EYE])
    assert float(hard.sum()) == 0.0
    assert torch.equal(L.soft_mask(hard, 0.05), torch.full_like(hard, 0.05))
    assert float(L.masked_l1(x, y, 1 - hard)) == 1.0
    # a box scaled from a 512 frame to a 256 image
    lms = torch.zeros(1, 68, 2)
    lms[0, 48:68] = torch.tensor([[200.0, 300.0], [260.0, 340.0]]).repeat(10, 1)
    b = L.landmark_boxes(lms, L.MOUTH, margin=0.0)
    assert b.tolist() == [[200.0, 300.0, 260.0, 340.0]]
    assert float(L.box_mask(b, 256, scale=0.5).sum()) == 30 * 20


def test_sync_and_adversarial_known_answers():
    torch.manual_seed(0)
    net = L.freeze(L.SyncNet(width=16))
    mel, faces = torch.randn(2, 1, 80, 16), torch.rand(2, 15, 48, 96)
    a, v = net(mel, faces)
    assert a.shape == v.shape == (2, 32)
    cos = torch.nn.functional.cosine_similarity(a, v).clamp(1e-7, 1)
    assert float(L.sync_loss(net, mel, faces)) == pytest.approx(float(-torch.log(cos).mean()), rel=1e-5)
    # the crop helper: 5 frames -> (B, 15, 48, 96) lower halves in [0, 1]
    frames = torch.zeros(1, 5, 3, 64, 64)
    frames[..., 32:, :] = 1.0        # lower half white
    boxes = torch.tensor([0.0, 0.0, 64.0, 64.0]).repeat(1, 5, 1)
    f = L.sync_faces(frames, boxes)
    assert f.shape == (1, 15, 48, 96) and float(f.min()) > 0.9
    # D that outputs 0 -> softplus(0) = log 2
    d = L.freeze(L.Discriminator(L.DiscriminatorConfig.tiny()))
    with torch.no_grad():
        d.final_linear[1].weight.zero_()
        d.final_linear[1].bias.zero_()
    assert float(L.adversarial_loss(d, torch.randn(2, 3, 128, 128))) == pytest.approx(float(np.log(2.0)))


def test_helper_layouts_and_loading(tmp_path):
    vgg = L.VGG19Features()
    convs = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
    assert list(vgg.state_dict()) == [f"features.{i}.{w}" for i in convs for w in ("weight", "bias")]
    assert vgg.state_dict()["features.28.weight"].shape == (512, 512, 3, 3)
    sd = {k: torch.randn_like(v) for k, v in vgg.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(4096, 25088 // 64)  # a torchvision file also has the classifier
    torch.save(sd, tmp_path / "vgg19.pth")
    loaded = L.VGG19Features.from_file(tmp_path / "vgg19.pth")
    assert torch.equal(loaded.features[28].weight, sd["features.28.weight"])
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(L.HelperWeightsError, match="not a torchvision VGG-19"):
        L.VGG19Features.from_file(tmp_path / "bad.pth")
    with pytest.raises(L.HelperWeightsError, match="not found"):
        L.VGG19Features.from_file(tmp_path / "missing.pth")

    sync = L.SyncNet()
    keys = list(sync.state_dict())
    assert len(keys) == 31 * 7 and keys[0] == "face_encoder.0.conv_block.0.weight"
    assert sync.state_dict()["face_encoder.0.conv_block.0.weight"].shape == (32, 15, 7, 7)
    assert sync.state_dict()["audio_encoder.13.conv_block.0.weight"].shape == (512, 512, 1, 1)
    torch.save({"state_dict": {"module." + k: v for k, v in sync.state_dict().items()}, "global_step": 5},
               tmp_path / "lipsync_expert.pth")
    L.SyncNet.from_file(tmp_path / "lipsync_expert.pth")

    disc = L.Discriminator()
    dsd = disc.state_dict()
    assert len(dsd) == 50 and list(dsd)[:3] == ["convs.0.0.weight", "convs.0.1.bias", "convs.1.conv1.0.weight"]
    assert dsd["convs.0.0.weight"].shape == (128, 3, 1, 1)
    assert dsd["final_linear.0.weight"].shape == (512, 512 * 16)
    torch.save({"d": dsd, "g": {}}, tmp_path / "rosinality.pt")
    L.Discriminator.from_file(tmp_path / "rosinality.pt")


def test_config_and_dataset_errors(tmp_path, ds256):
    with pytest.raises(ConfigError, match="unknown config field"):
        TrainConfig.from_dict({"stage": "video_warper", "lrr": 1})
    with pytest.raises(ConfigError, match="stage must be"):
        TrainConfig(stage="nope", data="x").validate()
    with pytest.raises(ConfigError, match="needs pre-trained weights"):
        TrainConfig(stage="calibration", data="x").validate()
    with pytest.raises(ConfigError, match="perceptual_layers must be"):
        TrainConfig(data="x", perceptual_layers=["relu_1_1", "relu_9_9"]).validate()
    with pytest.raises(ConfigError, match="perceptual_scales must be"):
        TrainConfig(data="x", perceptual_scales=0).validate()
    with pytest.raises(ConfigError, match="mask_floor must be"):
        TrainConfig(data="x", mask_floor=[]).validate()
    with pytest.raises(ConfigError, match="num_workers must be"):
        TrainConfig(data="x", num_workers=-1).validate()
    with pytest.raises(ConfigError, match="discriminator_size must be"):
        TrainConfig(data="x", discriminator_size=300).validate()
    with pytest.raises(D.DatasetError, match="prepare-data"):
        D.ClipStore(tmp_path)
    with pytest.raises(D.DatasetError, match="no clip with audio"):
        D.ClipStore(ds256, need_audio=True)
    for name in ("video_warper", "audio_warper", "calibration"):   # shipped configs parse, paper values
        cfg = TrainConfig.load(REPO / "configs" / f"{name}.json", data="x")
        assert cfg.stage == name and cfg.batch_size == 20 and tuple(cfg.adam_betas) == (0.5, 0.999)
        assert (cfg.lambda_l1, cfg.lambda_r, cfg.lambda_s, cfg.lambda_d, cfg.lambda_adv) == (10, 0.1, 1, 0.01, 0.1)
    assert TrainConfig.load(REPO / "configs" / "calibration.json", data="x").lr_finetune == 2e-5
    # `styleheat train --stage NAME` (defaults_for) and configs/NAME.json agree on everything but the run
    # folder and calibration's init
    for name in ("video_warper", "audio_warper", "calibration"):
        shipped = json.loads((REPO / "configs" / f"{name}.json").read_text())
        differ = {k for k, v in defaults_for(name).items() if shipped[k] != v}
        assert differ == ({"out", "init"} if name == "calibration" else {"out"}), (name, differ)


def test_dataset_roundtrip(ds256_audio):
    store = D.ClipStore(ds256_audio, need_audio=True)
    clip = store.clips[0]
    assert store.resolution == 256 and clip.frames == 6 and clip.audio
    assert clip.window(0).shape == (73, 27)
    assert torch.equal(clip.window(0)[:, 0], clip.window(0)[:, 13])             # clamped at the start
    assert clip.audio_windows.shape == (6, 80, 32) and clip.sync_mel(1, 25.0).shape == (1, 80, 16)
    item = D.SyncDataset(store, 4)[0]
    assert item["targets"].shape == (5, 3, 256, 256) and item["target_audio"].shape == (5, 80, 32)
    assert -1.0 <= float(item["source"].min()) and float(item["source"].max()) <= 1.0


# ------------------------------------------------------------------------------------------- stages
def test_stage1a_loss_down_checkpoint_resume(tmp_path, ds256):
    a = Trainer(tiny_cfg("video_warper", ds256, tmp_path / "a", steps=3, checkpoint_every=2))
    a.run()
    logs = read_scalars(tmp_path / "a")
    # every step trains on the one item; step 1's logged loss is its loss before any update
    assert eval_loss(a, fixed_batch(a)) < logs[0]["loss/total"]
    assert [r["step"] for r in logs] == [1, 2, 3] and "loss/warp_perceptual" in logs[0]
    assert (tmp_path / "a" / "samples" / "step_0000003.png").is_file()
    ck2 = tmp_path / "a" / "checkpoints" / "step_0000002.pt"
    assert ck2.is_file() and (tmp_path / "a" / "export" / "video_warper.pt").is_file()

    b = Trainer(tiny_cfg("video_warper", ds256, tmp_path / "b", steps=3, checkpoint_every=2))
    b.load_checkpoint(ck2)
    saved = torch.load(ck2, map_location="cpu", weights_only=True)
    assert b.step == 2
    for sa, sb in zip(saved["optimizer"]["state"].values(), b.optimizer.state_dict()["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    b.run()
    assert b.step == 3
    for (k, pa), pb in zip(a.parts["video_warper"].state_dict().items(), b.parts["video_warper"].state_dict().values()):
        assert torch.allclose(pa, pb, atol=1e-6), k
    for ka, kb in zip(a.ema["video_warper"].state_dict().values(), b.ema["video_warper"].state_dict().values()):
        assert torch.allclose(ka, kb, atol=1e-6)


def test_stage2_loss_down_export_loads_into_engine(tmp_path, ds128, tiny_bundle):
    from models import weights
    from server.engine import Engine
    from models.styleheat import StyleHEATConfig

    bundle, official, init_model = tiny_bundle
    tr = Trainer(tiny_cfg("calibration", ds128, tmp_path / "run", init=str(bundle), steps=2))
    last = tr.run()
    assert eval_loss(tr, fixed_batch(tr)) < read_scalars(tmp_path / "run")[0]["loss/total"]
    assert {"loss/target_perceptual", "loss/target_l1", "loss/domain", "loss/adversarial"} <= set(last)
    # frozen parts did not move
    assert torch.equal(tr.model.generator.state_dict()["conv1.conv.weight"],
                       init_model.generator.state_dict()["conv1.conv.weight"].to(tr.device))
    exp = tmp_path / "run" / "export"
    # 1) the official layout, loaded by models.weights next to the other official files
    net = torch.load(exp / "StyleHEAT_visual.pt", map_location="cpu", weights_only=True)["net_G_ema"]
    official_keys = weights.official_files(init_model)[weights.VISUAL][weights.NET]
    assert list(net) == list(official_keys)                     # the official key layout, in order
    assert all(net[k].shape == official_keys[k].shape for k in net)
    (official / "StyleHEAT_visual.pt").write_bytes((exp / "StyleHEAT_visual.pt").read_bytes())
    model, _ = weights.load_official(official, config=StyleHEATConfig.tiny())
    for k, v in tr.ema["calibrator"].state_dict().items():
        assert torch.equal(model.calibrator.state_dict()[k], v.cpu()), k
    # 2) the bundle, rendered by the engine
    eng = Engine.from_bundle(exp / "styleheat.safetensors", device="cpu")
    live, ema = tr.parts["calibrator"].state_dict(), tr.ema["calibrator"].state_dict()
    assert all(torch.equal(eng.model.calibrator.state_dict()[k], ema[k].cpu()) for k in ema)   # EMA exported
    assert any(not torch.equal(live[k], ema[k]) for k in ema)                                 # live restored
    img = ((np.stack(np.meshgrid(np.arange(128), np.arange(128)), -1).sum(-1) % 255)[..., None]
           .repeat(3, -1)).astype(np.uint8)
    ident = eng.prepare_identity(img)
    rows = np.zeros((3, 73), np.float32)
    frames = list(eng.render(ident.id, rows, [0, 2], size=eng.info()["native_size"]))
    assert [i for i, _ in frames] == [0, 2] and frames[0][1].dtype == np.uint8
    assert frames[0][1].shape[2] == 3 and frames[0][1].std() > 0


def test_stage1b_audio_warper_loss_down_then_stage2_keeps_it(tmp_path, ds256_audio, ds128, tiny_bundle):
    bundle, _, _ = tiny_bundle
    tr = Trainer(tiny_cfg("audio_warper", ds256_audio, tmp_path / "run", init=str(bundle), steps=3,
                          mask_floor=[[0, 0.1]]))
    last = tr.run()
    assert {"loss/mouth_perceptual", "loss/mouth_l1", "loss/nonmouth_reg", "loss/sync"} <= set(last)
    assert eval_loss(tr, fixed_batch(tr)) < read_scalars(tmp_path / "run")[0]["loss/total"]
    exported = tmp_path / "run" / "export" / "StyleHEAT_visual.pt"
    net = torch.load(exported, weights_only=True)["net_G_ema"]
    assert any(k.startswith("audio_warper.warpping_net.") for k in net)
    # chain: stage 2 (video motion) warm-started from this export carries the trained AudioWarper along
    s2 = Trainer(tiny_cfg("calibration", ds128, tmp_path / "s2", init=str(bundle), warm_start=[str(exported)], steps=1))
    s2.run()
    net2 = torch.load(tmp_path / "s2" / "export" / "StyleHEAT_visual.pt", weights_only=True)["net_G_ema"]
    aw = [k for k in net if k.startswith("audio_warper.")]
    assert aw and all(torch.equal(net2[k], net[k]) for k in aw)
    assert any(not torch.equal(net2[k], net[k]) for k in net if k.startswith("calibrator."))


def test_distributed_gloo_two_processes_match_one(tmp_path, ds256):
    """torchrun with 2 CPU processes (gloo): the global batch is split, gradients averaged, and the logged
    loss of step 1 equals the single-process loss of the same global batch; only rank 0 writes."""
    cfg = tiny_cfg("video_warper", ds256, tmp_path / "ddp", steps=1, batch_size=2, samples_per_epoch=2)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "server.cli", "train", "--config", str(path), "--device", "cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ddp = read_scalars(tmp_path / "ddp")
    assert len(ddp) == 1 and ddp[0]["step"] == 1                     # rank 0 alone logged
    assert (tmp_path / "ddp" / "export" / "video_warper.pt").is_file()

    single = Trainer(tiny_cfg("video_warper", ds256, tmp_path / "one", steps=1, batch_size=2, samples_per_epoch=2))
    last = single.run()
    assert ddp[0]["loss/total"] == pytest.approx(last["loss/total"], rel=1e-4)
    # Adam's first moment after one step is (1 - beta1) * gradient: the averaged gradients must agree
    ck = "checkpoints/step_0000001.pt"
    a = torch.load(tmp_path / "ddp" / ck, weights_only=True)["optimizer"]["state"]
    b = torch.load(tmp_path / "one" / ck, weights_only=True)["optimizer"]["state"]
    assert a.keys() == b.keys() and len(a) == len(list(single.parts["video_warper"].parameters()))
    ga = torch.cat([a[k]["exp_avg"].flatten() for k in a])
    gb = torch.cat([b[k]["exp_avg"].flatten() for k in b])
    assert float(gb.abs().max()) > 0
    assert torch.allclose(ga, gb, rtol=1e-3, atol=1e-5 * float(gb.abs().max()))


def test_prepare_data_voxceleb_style(tmp_path, fixtures_dir, reference_dir):
    """A moving portrait video (+ sidecar wav) -> one 256^2 clip: fixed crop box (the face moves in it),
    Deep3D rows (seeded weights), landmarks in frame pixels, audio windows."""
    import cv2
    from PIL import Image

    from server.preprocessing.audio import read_audio
    from server.cli import main
    from server.parity.reference import load_layout, seeded_part

    ck = tmp_path / "ckpt"
    (ck / "Deep3D").mkdir(parents=True)
    layout = load_layout(reference_dir / "deep3d_checkpoints.json")
    torch.save({"net_recon": seeded_part(layout, "checkpoints/Deep3D/epoch_20.pth", "net_recon", seed=0)},
               ck / "Deep3D" / "epoch_20.pth")
    size = 320
    base = cv2.resize(np.asarray(Image.open(fixtures_dir / "portrait_100.jpg").convert("RGB")), (size, size),
                      interpolation=cv2.INTER_AREA)
    vdir = tmp_path / "vox" / "id00007" / "vidA"
    vdir.mkdir(parents=True)
    writer = cv2.VideoWriter(str(vdir / "00001.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (size, size))
    for dx in (0, 6, 12):
        m = np.float32([[1, 0, dx], [0, 1, 0]])
        writer.write(cv2.cvtColor(cv2.warpAffine(base, m, (size, size), borderMode=cv2.BORDER_REFLECT101),
                                  cv2.COLOR_RGB2BGR))
    writer.release()
    import soundfile
    soundfile.write(str(vdir / "00001.wav"), 0.1 * np.sin(np.arange(4000) / 10.0), 16000)

    rc = main(["prepare-data", str(tmp_path / "vox"), "--out", str(tmp_path / "ds"), "--checkpoints", str(ck)])
    assert rc == 0
    store = D.ClipStore(tmp_path / "ds")
    clip = store.clips[0]
    assert clip.audio and store.resolution == 256 and clip.id == "id00007#vidA#00001" and clip.person == "id00007"
    assert clip.frames == 3 and clip.coeffs.shape == (3, 73) and np.isfinite(clip.coeffs).all()
    assert clip.audio_windows.shape == (3, 80, 32)
    lm = np.asarray(clip.landmarks)
    assert (lm > 0).all() and (lm < 256).all()
    assert lm[0, 48:68, 1].mean() > lm[0, 36:48, 1].mean()                 # mouth below the eyes
    shift = lm[2, :, 0].mean() - lm[0, :, 0].mean()                        # the face moves in the fixed box
    assert shift > 3.0 and abs(lm[2, :, 1].mean() - lm[0, :, 1].mean()) < 3.0
    img = clip.image(0, 256)
    assert img.shape == (3, 256, 256) and float(img.std()) > 0.1
    wav, sr = read_audio(clip.path / "audio.wav")
    assert sr == 16000 and len(wav) == 4000
    # HDTF-style: 512^2 frames of the same fixed box, landmarks scaled with them
    assert main(["prepare-data", str(vdir / "00001.avi"), "--style", "hdtf", "--max-frames", "1", "--no-audio",
                 "--out", str(tmp_path / "hd"), "--checkpoints", str(ck)]) == 0
    hd = D.ClipStore(tmp_path / "hd")
    assert hd.resolution == 512 and hd.clips[0].id == "00001" and not hd.clips[0].audio
    # (the 3-frame clip's landmarks are smoothed over time, the 1-frame one's are not: a few pixels apart)
    assert np.abs(np.asarray(hd.clips[0].landmarks[0]) - 2 * lm[0]).mean() < 4.0
    assert hd.clips[0].image(0, 512).shape == (3, 512, 512)
    # bad input: a folder without videos
    (tmp_path / "empty").mkdir()
    assert main(["prepare-data", str(tmp_path / "empty"), "--out", str(tmp_path / "ds2"), "--checkpoints", str(ck)]) == 2


def test_stage2_audio_motion_smoke(tmp_path, ds256_audio, tiny_bundle):
    """Stage 2 with the AudioWarper as motion generator (added fresh to a visual-only init):
    one step runs, only the calibrator and the AudioWarper move, the export holds both."""
    import shutil

    bundle, _, init_model = tiny_bundle
    data = tmp_path / "ds128"
    shutil.copytree(ds256_audio, data)                      # 256 frames are resized to the 128 generator
    meta = json.loads((data / "dataset.json").read_text())
    meta["resolution"] = 128
    (data / "dataset.json").write_text(json.dumps(meta))
    tr = Trainer(tiny_cfg("calibration", data, tmp_path / "run", init=str(bundle), motion="audio", steps=1))
    assert tr.model.audio_warper is not None and set(tr.train_parts) == {"calibrator", "audio_warper"}
    before = {n: {k: v.clone() for k, v in tr.parts[n].state_dict().items()} for n in tr.parts}
    last = tr.run()
    assert np.isfinite(last["loss/total"])
    changed = {n: any(not torch.equal(v, tr.parts[n].state_dict()[k]) for k, v in sd.items())
               for n, sd in before.items()}
    assert changed == {"video_warper": False, "audio_warper": True, "calibrator": True}
    net = torch.load(tmp_path / "run" / "export" / "StyleHEAT_visual.pt", weights_only=True)["net_G_ema"]
    assert {k.split(".")[0] for k in net} == {"video_warper", "calibrator", "audio_warper"}


def test_train_command_errors(tmp_path, capsys, ds256):
    from server.cli import main

    assert main(["train", "--config", str(tmp_path / "nope.json")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train", "--stage", "calibration", "--data", str(ds256)]) == 2
    assert "needs pre-trained weights" in capsys.readouterr().err
    assert main(["train", "--stage", "video_warper", "--data", str(tmp_path)]) == 2
    assert "prepare-data" in capsys.readouterr().err
    assert main(["train", "--stage", "video_warper", "--data", str(ds256), "--vgg19", str(tmp_path / "v.pth")]) == 2
    assert "VGG-19 weights not found" in capsys.readouterr().err
    assert main(["train"]) == 2


def test_proxy_coefficients():
    from training.trainer import proxy_coeffs

    src, drv = torch.randn(2, 73, 27), torch.randn(2, 73, 27)
    out = proxy_coeffs(src, drv)
    assert torch.equal(out[:, :64], src[:, :64]) and torch.equal(out[:, 64:], drv[:, 64:])
    assert not torch.equal(drv[:, :64], out[:, :64])                 # the driving input is not modified


def test_bf16_autocast_step(tmp_path, ds256):
    tr = Trainer(tiny_cfg("video_warper", ds256, tmp_path / "run", steps=1, amp="bf16"))
    assert tr.amp_dtype == torch.bfloat16 and not tr.scaler.is_enabled()
    last = tr.run()
    assert np.isfinite(last["loss/total"]) and last["loss/total"] > 0


def test_train_command_resume(tmp_path, capsys, ds256):
    from server.cli import main

    cfg = tiny_cfg("video_warper", ds256, tmp_path / "run", steps=1)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert main(["train", "--config", str(path), "--device", "cpu"]) == 0
    assert main(["train", "--config", str(path), "--device", "cpu", "--steps", "2", "--resume"]) == 0
    assert [r["step"] for r in read_scalars(tmp_path / "run")] == [1, 2]
    assert main(["train", "--config", str(path), "--device", "cpu", "--resume", str(tmp_path / "nope.pt")]) == 1
    assert "checkpoint " + str(tmp_path / "nope.pt") + " not found" in capsys.readouterr().err
    ck = torch.load(tmp_path / "run" / "checkpoints" / "step_0000002.pt", weights_only=True)
    assert ck["step"] == 2 and ck["optimizer"]["state"][0]["step"] == 2


def test_prepare_data_skip_existing_with_a_broken_dataset_json(tmp_path, capsys):
    from server.cli import main

    (tmp_path / "v.mp4").write_bytes(b"not read: the dataset.json is checked first")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset.json").write_text("{broken")
    assert main(["prepare-data", str(tmp_path / "v.mp4"), "--out", str(tmp_path / "ds"), "--skip-existing"]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
