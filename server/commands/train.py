"""`styleheat train`: the paper's training stages (1a VideoWarper, 1b AudioWarper, 2 CalibrationNet)."""
from __future__ import annotations

import argparse
import sys

NAME = "train"
HELP = "train/fine-tune the motion generators and the CalibrationNet on a prepared dataset"
DESCRIPTION = (
    "Stages: video_warper (1a), audio_warper (1b), calibration (2); defaults are the paper's values "
    "(configs/<stage>.json holds them, --config reads a file). Multi-GPU: "
    "torchrun --nproc_per_node N -m server.cli train ...; --resume continues from the latest checkpoint "
    "in OUT/checkpoints. Results: OUT/export/StyleHEAT_visual.pt (official layout; put it in your "
    "checkpoints folder) and OUT/export/styleheat.safetensors (bundle). See docs/training.md."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=["video_warper", "audio_warper", "calibration"], default=None,
                        help="stage to run with its default config (ignored when --config is given)")
    parser.add_argument("--config", metavar="FILE", default=None, help="JSON stage config (configs/*.json)")
    parser.add_argument("--data", metavar="DIR", default=None, help="dataset folder (styleheat prepare-data)")
    parser.add_argument("--out", metavar="DIR", default=None, help="run folder (checkpoints, export, logs, samples)")
    parser.add_argument("--init", metavar="PATH", default=None,
                        help="official checkpoints folder or .safetensors bundle to start from")
    parser.add_argument("--warm-start", metavar="FILE", action="append", default=None,
                        help="net_G_ema file (e.g. a stage-1a export) whose parts replace the init weights; repeatable")
    parser.add_argument("--motion", choices=["video", "audio"], default=None, help="stage 2: motion generator to fine-tune")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (split over processes)")
    parser.add_argument("--model", choices=["full", "tiny"], default=None)
    parser.add_argument("--vgg19", metavar="FILE", default=None, help="torchvision vgg19 state dict")
    parser.add_argument("--syncnet", metavar="FILE", default=None, help="Wav2Lip lipsync_expert.pth")
    parser.add_argument("--discriminator", metavar="FILE", default=None, help="rosinality StyleGAN2 256 discriminator")
    parser.add_argument("--amp", choices=["auto", "off", "fp16", "bf16"], default=None)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue from CHECKPOINT, or from the latest one in OUT/checkpoints")
    parser.add_argument("--device", default=None, help="torch device (default: this process's GPU, else cpu)")


def run(args: argparse.Namespace) -> int:
    from models.weights import WeightsError
    from training.config import ConfigError, TrainConfig, defaults_for
    from training.data import DatasetError
    from training.losses import HelperWeightsError
    from training.trainer import Trainer, TrainingError

    overrides = {"data": args.data, "out": args.out, "init": args.init, "warm_start": args.warm_start,
                 "motion": args.motion, "steps": args.steps, "batch_size": args.batch_size, "model": args.model,
                 "vgg19": args.vgg19, "syncnet": args.syncnet, "discriminator": args.discriminator,
                 "amp": args.amp, "num_workers": args.num_workers}
    try:
        if args.config:
            cfg = TrainConfig.load(args.config, **overrides)
        elif args.stage:
            d = defaults_for(args.stage)
            d.update({k: v for k, v in overrides.items() if v is not None})
            cfg = TrainConfig.from_dict(d)
        else:
            print("styleheat train: give --config FILE or --stage NAME", file=sys.stderr)
            return 2
        trainer = Trainer(cfg, device=args.device)
    except (ConfigError, DatasetError, HelperWeightsError, TrainingError, WeightsError) as exc:
        print(f"styleheat train: {exc}", file=sys.stderr)     # each carries its own advice
        return 2
    try:
        trainer.run(resume=args.resume)
    except (TrainingError, DatasetError) as exc:
        print(f"styleheat train: {exc}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
    if trainer.is_main:
        print(f"done at step {trainer.step}; exported to {trainer.out / 'export'}")
    return 0
