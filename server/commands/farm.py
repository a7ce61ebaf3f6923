"""`styleheat farm render`: render one clip on a Ray cluster (one worker per GPU), resumable."""
from __future__ import annotations

import argparse
import sys

NAME = "farm"
HELP = "render a clip on a Ray cluster, one worker per GPU (resumable; docs/farm.md)"
DESCRIPTION = ("Render a portrait + motion file like 'styleheat render', split into contiguous chunks over the "
               "workers of a Ray cluster: one per GPU (or --workers N CPU workers), each loading the model and "
               "inverting the portrait once. Frames go atomically into OUT (shared storage for a multi-machine "
               "cluster); OUT/styleheat_farm.json records each finished frame's input hash, so running the "
               "same command again renders only missing or changed frames. Without --address a local cluster "
               "on 127.0.0.1 is started and shut down. Setup: docs/farm.md.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # the shared model options, through render (which imports them from wherever they live)
    from server.model_options import add_checkpoint_arguments, add_precision_argument
    from server.farm.driver import DEFAULT_CHUNK
    from server.shots.compositing import OUTPUTS, SEAMS
    from server.shots.source import ALIGN_MODES

    sub = parser.add_subparsers(dest="farm_command", metavar="ACTION")
    p = sub.add_parser("render", help="render a clip on the cluster", description=DESCRIPTION)
    add_checkpoint_arguments(p, bundle=True)
    p.add_argument("--tiny-random", action="store_true",
                   help="a tiny model with seeded random weights (tests and demos; as 'styleheat render --tiny-random')")
    p.add_argument("--seed", type=int, default=0, help="seed for --tiny-random (default 0)")
    p.add_argument("--source", required=True, metavar="IMAGE",
                   help="a photo with one face (PNG/JPEG, any size), aligned as 'styleheat render' does (--align)")
    p.add_argument("--output", choices=OUTPUTS, default="crop",
                   help="crop (default), composite or matte, as 'styleheat render --output' (docs/compositing.md)")
    p.add_argument("--align", choices=ALIGN_MODES, default="auto", help="as 'styleheat render --align'")
    p.add_argument("--seam", choices=SEAMS, default="feather", help="composite only: feather or poisson")
    p.add_argument("--motion", required=True, metavar="JSON", help="styleheat-motion file")
    p.add_argument("--audio", metavar="WAV", default=None,
                   help="speech audio driving the AudioWarper (sample 0 plays at the motion's first row); the "
                        "model must have AudioWarper weights")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG frames and the manifest")
    p.add_argument("--address", metavar="HEAD", default=None,
                   help="Ray cluster to join (e.g. 10.0.0.5:6379, or 'auto'); default: a local cluster on 127.0.0.1")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, metavar="N",
                   help=f"frames per chunk handed to a worker (default {DEFAULT_CHUNK})")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="number of workers (default: one per GPU; 1 CPU worker without GPUs)")
    p.add_argument("--cpu", action="store_true", help="CPU workers even where GPUs exist")
    p.add_argument("--size", type=int, default=None, help="output side in pixels (default: native)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="frames per batch (default 8 on GPU, 2 on CPU; halved on out-of-memory)")
    add_precision_argument(p, tiny_random=True)
    p.add_argument("--max-restarts", type=int, default=2, metavar="N",
                   help="restarts of a dead worker (and retries of its chunk) before the job fails (default 2)")
    p.add_argument("--report", metavar="JSON", default=None,
                   help="write a JSON summary: planned rows, chunks, per-worker counters, cluster pids")
    p.add_argument("--start", type=int, default=None, metavar="FRAME",
                   help="first scene frame to render (the motion's first_frame + row; default: its first row); "
                        "rows outside --start..--end are only the windows' context")
    p.add_argument("--end", type=int, default=None, metavar="FRAME",
                   help="last scene frame to render (default: the motion's last row)")
    p.add_argument("--progress-json", action="store_true",
                   help="print one JSON object per line on stdout as frames finish (event start/progress/done; "
                        "for the Blender add-on)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(_farm_parser=p)
    parser.set_defaults(_farm_top=parser)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "farm_command", None) != "render":
        args._farm_top.print_help(sys.stderr)
        return 2
    from server.farm.driver import FarmOptions, run as run_farm

    opts = FarmOptions(source=args.source, motion=args.motion, out=args.out, audio=args.audio, address=args.address,
                       chunk=args.chunk, workers=args.workers, cpu=args.cpu, tiny_random=args.tiny_random,
                       seed=args.seed, checkpoints=args.checkpoints, bundle=args.bundle, config=args.config,
                       size=args.size, precision=args.precision, batch_size=args.batch_size,
                       max_restarts=args.max_restarts, quiet=args.quiet, report=args.report,
                       output=args.output, align=args.align, seam=args.seam,
                       start=args.start, end=args.end, progress_json=args.progress_json)
    return run_farm(opts)
