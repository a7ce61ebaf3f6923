"""The training loop of all stages: model set-up, losses per stage, distributed, AMP, checkpoints, logs.

Processes: started with ``torchrun`` (env ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) the trainer joins a
``torch.distributed`` group (NCCL on CUDA, gloo on CPU); parameters are broadcast from rank 0 and
gradients all-reduced (averaged) after each backward, so every rank holds identical weights. Rank 0
alone writes checkpoints, exports, logs and samples.

Checkpoint (``OUT/checkpoints/step_XXXXXXX.pt``, loadable with ``weights_only=True``)::

    {"format": "styleheat-train", "version": 1, "stage", "step", "config": {...}, "model_config": {...},
     "trainable": {part: state_dict}, "ema": {part: state_dict}, "optimizer": ..., "scaler": ...,
     "torch_rng": ByteTensor}

Export (``OUT/export/``, written at every checkpoint and at the end, from the EMA weights):
``StyleHEAT_visual.pt`` = ``{"net_G_ema": {"video_warper.*", "calibrator.*", ["audio_warper.*"]}}`` -- the
official layout ``models.weights`` loads for the engine -- and ``styleheat.safetensors`` (a bundle for
``Engine.from_bundle``) when the whole network is known (``init`` given).
"""
from __future__ import annotations

import copy
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import flow
from models.styleheat import INPUT_SIZE, StyleHEAT, StyleHEATConfig, resize
from models.warper import VideoWarper, zero_upper_flow_
from training import data as D
from training import losses as L
from training.config import TrainConfig

CHECKPOINT_FORMAT = "styleheat-train"
CHECKPOINT_VERSION = 1
NET = "net_G_ema"
PREFIX = {"video_warper": "video_warper.", "audio_warper": "audio_warper.", "calibrator": "calibrator."}


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says why and what to do."""


# ------------------------------------------------------------------------------------------- distributed
def dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


# ------------------------------------------------------------------------------------------- weights
def _load_file(path: str | os.PathLike, what: str) -> Any:
    """torch.load(weights_only=True) with a TrainingError for a missing or unreadable file."""
    if not Path(path).is_file():
        raise TrainingError(f"{what} {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise TrainingError(f"{path} cannot be read as a weights-only torch file ({type(e).__name__}: {e})") from None


def read_net_g_ema(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``net_G_ema`` dict of an exported/official StyleHEAT file (or of a training checkpoint's EMA)."""
    obj = _load_file(path, "warm_start file")
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        return {PREFIX[p] + k: v for p, sd in obj["ema"].items() for k, v in sd.items()}
    if not isinstance(obj, Mapping) or NET not in obj:
        raise TrainingError(f"{path} has no '{NET}' entry; warm_start takes StyleHEAT_visual.pt-style files "
                            "(a stage export or the released checkpoint) or training checkpoints")
    return dict(obj[NET])


def load_parts(modules: Mapping[str, nn.Module | None], net: Mapping[str, torch.Tensor], source: str) -> list[str]:
    """Load every part whose prefix occurs in ``net`` (strict per part); returns the parts loaded."""
    loaded = []
    for part, module in modules.items():
        if module is None:
            continue
        pre = PREFIX[part]
        sd = {k[len(pre):]: v for k, v in net.items() if k.startswith(pre)}
        if not sd:
            continue
        try:
            module.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise TrainingError(f"{source}: its {part} weights do not fit this model ({str(e)[:300]}); "
                                "is the config's model size (full/tiny) right?") from None
        loaded.append(part)
    return loaded


EXPRESSION_DIMS = 64


def proxy_coeffs(source: torch.Tensor, driving: torch.Tensor) -> torch.Tensor:
    """Paper Fig. 5: 3DMM windows (B, 73, T) with the source's expression (rows 0-63) and the driving
    frame's pose, translation and crop (rows 64-72); the VideoWarper turns them into the proxy image
    whose mouth the AudioWarper has to move."""
    out = driving.clone()
    out[:, :EXPRESSION_DIMS] = source[:, :EXPRESSION_DIMS]
    return out


# ------------------------------------------------------------------------------------------- images
def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_grid(path: Path, columns: list[torch.Tensor], rows: int = 4, size: int = 128) -> None:
    """PNG grid: one row per sample, one column per tensor (B,3,H,W) (each resized to ``size``)."""
    import cv2

    cols = [to_uint8(F.interpolate(c[:rows].float(), size=(size, size), mode="bilinear", align_corners=False))
            for c in columns]
    grid = np.concatenate([np.concatenate(list(c), axis=0) for c in cols], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))


class ScalarLog:
    """JSONL scalar log (``logs/scalars.jsonl``; one {"step", "time", name: value} per line), mirrored to
    TensorBoard when the ``tensorboard`` package happens to be installed."""

    def __init__(self, directory: Path, enabled: bool):
        self.enabled = enabled
        self.path = directory / "scalars.jsonl"
        self.tb = None
        if enabled:
            directory.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

                self.tb = SummaryWriter(str(directory))
            except Exception:  # noqa: BLE001
                self.tb = None

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "time": round(time.time(), 3), **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, float(v), step)
            self.tb.flush()


def read_scalars(out: str | os.PathLike) -> list[dict]:
    p = Path(out) / "logs" / "scalars.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.is_file() else []


# ------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Build with a :class:`TrainConfig`; :meth:`run` trains to ``cfg.steps`` (resuming if asked)."""

    def __init__(self, cfg: TrainConfig, *, device: str | torch.device | None = None,
                 log: Callable[[str], None] | None = None):
        self.cfg = cfg.validate()
        self.rank, self.world, self.local_rank = dist_env()
        if device is None:
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._init_dist()
        self.is_main = self.rank == 0
        self._print = log or (lambda msg: print(msg, flush=True))
        self.out = Path(cfg.out)
        if cfg.batch_size % self.world:
            raise TrainingError(f"batch_size {cfg.batch_size} does not split evenly over {self.world} processes")
        self.per_rank_batch = cfg.batch_size // self.world
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.store = D.ClipStore(cfg.data, need_audio=cfg.uses_audio)   # cheap checks first
        self._build_model()
        self._build_helpers()
        self._build_optimizer()
        self._build_data()
        self.step = 0
        self.scalars = ScalarLog(self.out / "logs", self.is_main)

    # ---------------------------------------------------------------- set-up
    def say(self, msg: str) -> None:
        if self.is_main:
            self._print(msg)

    def _init_dist(self) -> None:
        if self.world > 1 and _dist() is None:
            import torch.distributed as dist

            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")

    def _model_config(self) -> StyleHEATConfig:
        base = StyleHEATConfig.tiny() if self.cfg.model == "tiny" else StyleHEATConfig()
        return base.with_audio(self.cfg.uses_audio)

    def _build_model(self) -> None:
        cfg = self.cfg
        mcfg = self._model_config()
        warm = [(path, read_net_g_ema(path)) for path in cfg.warm_start]
        self.model: StyleHEAT | None = None
        if cfg.init:
            from models import weights

            p = Path(cfg.init)
            if p.is_file():
                model, _ = weights.load_bundle(p, device="cpu")
            else:
                model, _ = weights.load_official(p, config=mcfg.with_audio(False), device="cpu")
            warm_audio = any(k.startswith(PREFIX["audio_warper"]) for w in warm for k in w[1])
            if (mcfg.audio or warm_audio) and model.audio_warper is None:
                # a fresh AudioWarper (stage 1b trains it), or a slot for a warm-started one so the
                # export carries it along
                from models.warper import AudioWarper

                torch.manual_seed(cfg.seed)

                model.audio_warper = AudioWarper(model.config.audio_warper)
                model.config = model.config.with_audio(True)
            self.model = model
            # load_official/load_bundle freeze everything (requires_grad False); thaw what we train below
            for p_ in model.parameters():
                p_.requires_grad_(False)
        elif cfg.stage == "video_warper":
            self.model = None
        else:
            self.model = StyleHEAT(mcfg)  # tiny only (validate() demands init for full size)
        if self.model is not None:
            self.model.to(self.device).eval()
            parts = {"video_warper": self.model.video_warper, "audio_warper": self.model.audio_warper,
                     "calibrator": self.model.calibrator}
        else:
            torch.manual_seed(cfg.seed)
            parts = {"video_warper": VideoWarper(mcfg.video_warper).to(self.device), "audio_warper": None,
                     "calibrator": None}
        self.parts: dict[str, nn.Module | None] = parts
        for path, net in warm:
            got = load_parts(parts, net, str(path))
            self.say(f"warm start: {', '.join(got) or 'nothing'} <- {path}")
        # which parts are trained, with which learning rate
        if cfg.stage == "video_warper":
            self.train_parts = {"video_warper": cfg.lr}
        elif cfg.stage == "audio_warper":
            self.train_parts = {"audio_warper": cfg.lr}
        else:
            self.train_parts = {"calibrator": cfg.lr, ("video_warper" if cfg.motion == "video" else "audio_warper"):
                                cfg.lr_finetune}
        for name, module in parts.items():
            if module is None:
                continue
            trainable = name in self.train_parts
            for p_ in module.parameters():
                p_.requires_grad_(trainable)
            module.train(trainable)
        # every rank starts from rank 0's weights
        d = _dist()
        if d is not None:
            for name in self.train_parts:
                for t in list(parts[name].parameters()) + list(parts[name].buffers()):
                    d.broadcast(t.data, src=0)
        self.ema = {name: copy.deepcopy(parts[name]).eval().requires_grad_(False) for name in self.train_parts}

    def _build_helpers(self) -> None:
        cfg = self.cfg
        w = max(1, int(cfg.helper_width))
        if cfg.random_helpers:
            g = torch.random.fork_rng(devices=[])
            with g:
                torch.manual_seed(1234)
                vgg = L.VGG19Features(width=w)
                sync = L.SyncNet(width=w) if cfg.stage == "audio_warper" else None
                dcfg = L.DiscriminatorConfig(size=cfg.discriminator_size, max_channels=max(4, 512 // w))
                disc = L.Discriminator(dcfg) if cfg.stage == "calibration" else None
        else:
            vgg = L.VGG19Features.from_file(cfg.vgg19 or None)
            sync = L.SyncNet.from_file(cfg.syncnet or None) if cfg.stage == "audio_warper" else None
            disc = (L.Discriminator.from_file(cfg.discriminator or None,
                                              L.DiscriminatorConfig(size=cfg.discriminator_size))
                    if cfg.stage == "calibration" and cfg.lambda_adv > 0 else None)
        self.perceptual = L.PerceptualLoss(L.freeze(vgg), cfg.perceptual_layers, cfg.perceptual_scales).to(self.device)
        self.syncnet = L.freeze(sync).to(self.device) if sync is not None else None
        self.disc = L.freeze(disc).to(self.device) if disc is not None else None

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        groups = [{"params": [p for p in self.parts[n].parameters()], "lr": lr, "name": n}
                  for n, lr in self.train_parts.items()]
        self.optimizer = torch.optim.Adam(groups, betas=tuple(cfg.adam_betas))
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
        amp = cfg.amp
        if amp == "auto":
            amp = "fp16" if self.device.type == "cuda" else "off"
        self.amp_dtype = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _build_data(self) -> None:
        cfg = self.cfg
        if cfg.stage == "calibration":
            size = self.model.config.size
            r = self.store.resolution
            if r > size or r < 64 or r & (r - 1):
                raise TrainingError(f"dataset resolution {r} cannot be rendered by this StyleGAN2 (size {size}); "
                                    "use a power of two between 64 and the generator size (512 for HDTF-style)")
        if cfg.samples_per_epoch < cfg.batch_size:
            raise TrainingError(f"samples_per_epoch ({cfg.samples_per_epoch}) must be at least batch_size "
                                f"({cfg.batch_size})")
        dataset_cls = D.SyncDataset if cfg.stage == "audio_warper" else D.PairDataset
        self.dataset = dataset_cls(self.store, cfg.samples_per_epoch, seed=cfg.seed)
        if cfg.uses_audio and dataset_cls is D.PairDataset:
            self.dataset.with_audio = True
        self.sampler = D.ShardSampler(len(self.dataset), rank=self.rank, world=self.world, seed=cfg.seed)
        self.steps_per_epoch = D.steps_per_epoch(len(self.dataset), self.world, self.per_rank_batch)

    def _loader(self):
        from torch.utils.data import DataLoader

        return DataLoader(self.dataset, batch_size=self.per_rank_batch, sampler=self.sampler,
                          num_workers=self.cfg.num_workers, collate_fn=D.collate, drop_last=True,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    # ---------------------------------------------------------------- losses per stage
    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _perc(self, x, y, mask=None):
        return self.cfg.weight_perceptual * self.perceptual(x, y, mask)

    def losses_video_warper(self, b: Mapping[str, torch.Tensor]):
        """Eq. 5 on both directions of the pair (as the official trainer)."""
        vw = self.parts["video_warper"]
        src = resize(torch.cat([b["source"], b["target"]]), INPUT_SIZE)
        gt = resize(torch.cat([b["target"], b["source"]]), INPUT_SIZE)
        coeffs = torch.cat([b["target_coeffs"], b["source_coeffs"]])
        with self._autocast():
            out = vw(src, coeffs)
        warp = out["warp_image"].float()
        terms = {"warp_perceptual": self._perc(warp, gt)}
        return terms, [src, gt, warp]

    def _audio_warp(self, image_256, mel):
        aw = self.parts["audio_warper"]
        out = aw(image_256, mel, with_warp_image=False)
        flow_field = out["flow_field"]
        if self.cfg.zero_upper_flow:
            flow_field = flow_field.clone()
            zero_upper_flow_(flow_field)
        return flow_field

    def losses_audio_warper(self, b: Mapping[str, torch.Tensor]):
        """Eqs. 6-8 on proxy pairs: the frozen VideoWarper gives the source the driving pose (expression of
        the source); the AudioWarper must move the mouth to the driving frame's, driven by its audio."""
        cfg = self.cfg
        bs, t = b["targets"].shape[:2]
        r = self.store.resolution
        src = resize(b["source"], INPUT_SIZE).repeat_interleave(t, 0)
        gt = resize(b["targets"].flatten(0, 1), INPUT_SIZE)
        mixed = proxy_coeffs(b["source_coeffs"].repeat_interleave(t, 0), b["target_coeffs"].flatten(0, 1))
        with torch.no_grad(), self._autocast():
            proxy = self.parts["video_warper"](src, mixed)["warp_image"].float()
        with self._autocast():
            flow_field = self._audio_warp(proxy, b["target_audio"].flatten(0, 1))
        fake = flow.warp(proxy, flow.flow_to_deformation(flow_field.float()))
        lms = b["target_landmarks"].flatten(0, 1)
        hard = L.region_mask(lms, INPUT_SIZE, [L.MOUTH], scale=INPUT_SIZE / r, margin=cfg.mask_margin)
        soft = L.soft_mask(hard, cfg.floor_at(self.step))
        terms = {"mouth_perceptual": self._perc(fake, gt, soft),
                 "mouth_l1": cfg.lambda_l1 * L.masked_l1(fake, gt, soft)}
        if cfg.lambda_r > 0:
            terms["nonmouth_reg"] = cfg.lambda_r * self.perceptual(fake, proxy, 1 - hard)
        if cfg.lambda_s > 0 and self.syncnet is not None:
            boxes = L.landmark_boxes(lms * (INPUT_SIZE / r), range(68), margin=0.1).view(bs, t, 4)
            faces = L.sync_faces(fake.view(bs, t, *fake.shape[1:]), boxes)
            terms["sync"] = cfg.lambda_s * L.sync_loss(self.syncnet, b["sync_mel"], faces)
        return terms, [src, proxy, gt, fake]

    def losses_calibration(self, b: Mapping[str, torch.Tensor]):
        """Eqs. 11-13: calibrated rendering vs the driving frame inside a soft eye/mouth mask, vs the
        warped-only rendering outside the boxes, plus the frozen discriminator's adversarial term."""
        cfg, model = self.cfg, self.model
        r = self.store.resolution
        src = torch.cat([b["source"], b["target"]])
        gt = torch.cat([b["target"], b["source"]])
        coeffs = torch.cat([b["target_coeffs"], b["source_coeffs"]])
        lms = torch.cat([b["target_landmarks"], b["source_landmarks"]])
        with torch.no_grad():  # frozen inversion
            wx, ix_e4e, res = model.encode(src)
            inv = model.prepare_from_codes(wx, ix_e4e, res)
        with self._autocast():
            if cfg.motion == "audio":
                mixed = proxy_coeffs(torch.cat([b["source_coeffs"], b["target_coeffs"]]), coeffs)
                with torch.no_grad():
                    video = model.video_warper(inv.ix, mixed, with_warp_image=False)
                    fx_warp = flow.warp(inv.fx, flow.flow_to_deformation(video["flow_field"]))
                    preview = model.generator.synthesize_from_64(fx_warp, inv.skip32, inv.wx)
                audio = torch.cat([b["target_audio"], b["source_audio"]])
                af = self._audio_warp(resize(preview, INPUT_SIZE), audio)
                fx_warp = flow.warp(fx_warp, flow.flow_to_deformation(af))
            else:
                video = model.video_warper(inv.ix, coeffs, with_warp_image=False)
                fx_warp = flow.warp(inv.fx, flow.flow_to_deformation(video["flow_field"]))
            refining = model.calibrator(fx_warp, video["descriptor"])
            feat = fx_warp * (1 + refining[6]) + refining[7]
            fake = model.generator.synthesize_from_64(feat, inv.skip32, inv.wx, out_size=r)
            with torch.no_grad():
                warped_only = model.generator.synthesize_from_64(fx_warp, inv.skip32, inv.wx, out_size=r)
        fake, warped_only = fake.float(), warped_only.float()
        hard = L.region_mask(lms, r, [L.MOUTH, L.LEFT_EYE, L.RIGHT_EYE], margin=cfg.mask_margin)
        soft = L.soft_mask(hard, cfg.floor_at(self.step))
        terms = {"target_perceptual": self._perc(fake, gt, soft),
                 "target_l1": cfg.lambda_l1 * L.masked_l1(fake, gt, soft)}
        if cfg.lambda_d > 0:
            terms["domain"] = cfg.lambda_d * self.perceptual(fake, warped_only.detach(), 1 - hard)
        if cfg.lambda_adv > 0 and self.disc is not None:
            with self._autocast():
                terms["adversarial"] = cfg.lambda_adv * L.adversarial_loss(self.disc, fake).float()
        return terms, [resize(src, r), gt, warped_only, fake]

    def compute(self, batch: Mapping[str, torch.Tensor]):
        fn = {"video_warper": self.losses_video_warper, "audio_warper": self.losses_audio_warper,
              "calibration": self.losses_calibration}[self.cfg.stage]
        terms, images = fn(batch)
        total = sum(terms.values())
        return total, terms, images

    # ---------------------------------------------------------------- one step
    def train_step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        self.optimizer.zero_grad(set_to_none=True)
        total, terms, images = self.compute(batch)
        if not torch.isfinite(total):
            raise TrainingError(f"step {self.step}: the loss is {total.item()} (terms "
                                f"{ {k: float(v) for k, v in terms.items()} }); lower the learning rate or "
                                "turn amp off")
        self.scaler.scale(total).backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        d = _dist()
        if d is not None:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                d.all_reduce(p.grad)
                p.grad /= self.world
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self._update_ema()
        self.step += 1
        self._last_images = images
        out = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
        out["loss/total"] = float(total.detach())
        return out

    @torch.no_grad()
    def _update_ema(self) -> None:
        a = self.cfg.ema_decay
        for name, ema in self.ema.items():
            live = self.parts[name]
            for pe, pl in zip(ema.parameters(), live.parameters()):
                pe.mul_(a).add_(pl.detach(), alpha=1 - a)
            for be, bl in zip(ema.buffers(), live.buffers()):
                be.copy_(bl)

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_dict(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "stage": self.cfg.stage,
                "step": self.step, "config": self.cfg.to_dict(),
                "model_config": self._model_config().to_dict(),
                "trainable": {n: _cpu(self.parts[n].state_dict()) for n in self.train_parts},
                "ema": {n: _cpu(m.state_dict()) for n, m in self.ema.items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "torch_rng": torch.get_rng_state()}

    def save_checkpoint(self) -> Path | None:
        if not self.is_main:
            return None
        d = self.out / "checkpoints"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"step_{self.step:07d}.pt"
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.checkpoint_dict(), tmp)
        os.replace(tmp, path)
        olds = sorted(d.glob("step_*.pt"))[:-max(1, self.cfg.keep_checkpoints)]
        for old in olds:
            old.unlink()
        self.export()
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        ck = _load_file(path, "checkpoint")
        if not isinstance(ck, Mapping) or ck.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{path} is not a StyleHEAT training checkpoint")
        if ck["stage"] != self.cfg.stage:
            raise TrainingError(f"{path} is a {ck['stage']!r} checkpoint; this run is stage {self.cfg.stage!r} "
                                "(use warm_start to start a stage from another stage's weights)")
        try:
            for n in self.train_parts:
                self.parts[n].load_state_dict(ck["trainable"][n])
                self.ema[n].load_state_dict(ck["ema"][n])
        except (KeyError, RuntimeError) as e:
            raise TrainingError(f"{path} does not fit this run ({type(e).__name__}: {str(e)[:300]}); was it "
                                "written with the same model size and motion?") from None
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["torch_rng"])
        self.step = int(ck["step"])

    def latest_checkpoint(self) -> Path | None:
        found = sorted((self.out / "checkpoints").glob("step_*.pt"))
        return found[-1] if found else None

    def export(self) -> dict[str, Path]:
        """Write the EMA weights in the layouts the inference path loads (see module docstring)."""
        d = self.out / "export"
        d.mkdir(parents=True, exist_ok=True)
        ema_parts = {n: self.ema.get(n, m) for n, m in self.parts.items() if m is not None}
        net = {PREFIX[n] + k: v.detach().cpu().clone() for n, m in ema_parts.items() for k, v in m.state_dict().items()}
        written = {}
        # without the whole network (stage 1a from scratch) only the VideoWarper exists: video_warper.pt
        path = d / ("StyleHEAT_visual.pt" if "calibrator" in ema_parts else "video_warper.pt")
        torch.save({NET: net}, path)
        written["official"] = path
        if self.model is not None:
            from models import weights

            # swap the EMA weights in for the save (no copy of the frozen multi-GB parts), then restore
            live = {n: _cpu(self.parts[n].state_dict()) for n in self.ema}
            try:
                for n, ema in self.ema.items():
                    self.parts[n].load_state_dict(ema.state_dict())
                bundle = d / "styleheat.safetensors"
                weights.save_bundle(bundle, self.model,
                                    sources={"trained": f"styleheat train stage {self.cfg.stage}, step {self.step}"})
            finally:
                for n, sd in live.items():
                    self.parts[n].load_state_dict(sd)
            written["bundle"] = bundle
        return written

    # ---------------------------------------------------------------- loop
    def run(self, *, resume: bool | str | None = False, max_steps: int | None = None) -> dict[str, float]:
        """Train until ``cfg.steps`` (or ``max_steps`` more steps); returns the last logged scalars."""
        if resume:
            path = Path(resume) if isinstance(resume, (str, os.PathLike)) and resume is not True else self.latest_checkpoint()
            if path is None:
                self.say("resume: no checkpoint yet, starting from step 0")
            else:
                self.load_checkpoint(path)
                self.say(f"resumed from {path} at step {self.step}")
        end = self.cfg.steps if max_steps is None else min(self.cfg.steps, self.step + max_steps)
        last: dict[str, float] = {}
        acc: dict[str, list[float]] = {}
        while self.step < end:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_position(epoch, start * self.per_rank_batch)
            for batch in self._loader():
                scalars = self.train_step(batch)
                for k, v in scalars.items():
                    acc.setdefault(k, []).append(v)
                if self.step % self.cfg.log_every == 0 or self.step == end:
                    last = {k: float(np.mean(v)) for k, v in acc.items()}
                    last["lr"] = self.optimizer.param_groups[0]["lr"]
                    self._reduce_scalars(last)
                    self.scalars.write(self.step, last)
                    self.say(f"step {self.step}: " + ", ".join(f"{k[5:] if k.startswith('loss/') else k} {v:.4g}"
                                                               for k, v in last.items()))
                    acc = {}
                if self.is_main and (self.step % self.cfg.sample_every == 0 or self.step == end):
                    write_grid(self.out / "samples" / f"step_{self.step:07d}.png", self._last_images)
                if self.step % self.cfg.checkpoint_every == 0 or self.step == end:
                    self.save_checkpoint()
                if self.step >= end:
                    break
        return last

    def _reduce_scalars(self, scalars: dict[str, float]) -> None:
        d = _dist()
        if d is None:
            return
        keys = sorted(scalars)
        t = torch.tensor([scalars[k] for k in keys], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        d.all_reduce(t)
        for k, v in zip(keys, (t / self.world).tolist()):
            scalars[k] = v

    def close(self) -> None:
        d = _dist()
        if d is not None:
            d.barrier()
            d.destroy_process_group()


def _cpu(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in sd.items()}
