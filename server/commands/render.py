"""`styleheat render`: one portrait + a motion file -> numbered PNG frames."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from server.frame_files import read_portrait, write_png_atomic
from server.shots.compositing import OUTPUTS, SEAMS
from server.shots.source import ALIGN_MODES
from server.model_options import OptionConflict, add_checkpoint_arguments, add_precision_argument, load_engine

NAME = "render"
HELP = "render a talking-face frame sequence from a portrait and a motion file"
DESCRIPTION = ("Align the source photo (unless it already is an FFHQ-aligned square portrait), invert the "
               "face once (e4e + HFGI), then render one frame per row of the motion file (styleheat extract / "
               "the Blender add-on write them) as OUT/frame_00000.png, frame_00001.png, ... (row index; each "
               "file is written atomically): the face crop, or with --output composite/matte the frame pasted "
               "back into the photo at its own size. Per-row attribute strengths in the motion file are applied.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser, bundle=True)
    parser.add_argument("--source", required=True, metavar="IMAGE",
                        help="a photo with one face (PNG/JPEG, any size): it is aligned here unless it already is an "
                             "FFHQ-aligned square portrait (see --align)")
    parser.add_argument("--output", choices=OUTPUTS, default="crop",
                        help="crop: the aligned square face (default); composite: each frame pasted back into the "
                             "source photo at its own size with a soft head mask; matte: the same placement as RGBA "
                             "PNGs (straight alpha) to lay over other footage (docs/compositing.md)")
    parser.add_argument("--align", choices=ALIGN_MODES, default="auto",
                        help="auto: align unless the photo already is an FFHQ-aligned square portrait (default); "
                             "yes: always align; no: use the photo as given (it must be an aligned square)")
    parser.add_argument("--seam", choices=SEAMS, default="feather",
                        help="composite only: feather (soft mask, default) or poisson (OpenCV seamless cloning: "
                             "matches colours at the seam, slower)")
    parser.add_argument("--motion", required=True, metavar="JSON", help="styleheat-motion file")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG frames (created)")
    parser.add_argument("--size", type=int, default=None,
                        help="output side in pixels (default: native 1024; 256 and 512 are cheaper previews)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=None, help="frames per batch (default 8 on GPU, 2 on CPU)")
    add_precision_argument(parser, tiny_random=True)
    parser.add_argument("--tiny-random", action="store_true",
                        help="a tiny model with seeded random weights instead of checkpoints (tests and demos; "
                             "the same engine as 'styleheat-server --tiny-random')")
    parser.add_argument("--seed", type=int, default=0, help="seed for --tiny-random (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from models import weights
    from server.preprocessing.motion import MotionError, read_motion
    from server.shots.compositing import place
    from server.shots.source import portrait_from_photo

    try:
        motion = read_motion(args.motion)
        photo = read_portrait(Path(args.source), square=False)
    except (MotionError, ValueError) as e:
        print(f"styleheat render: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"styleheat render: cannot create output folder {out}: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        engine = load_engine(args)
    except OptionConflict as e:
        print(f"styleheat render: {e}", file=sys.stderr)
        return 2
    except (weights.WeightsError, ValueError) as e:
        print(f"styleheat render: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"loaded {engine.model_name} on {engine.device} in {time.time() - t0:.1f} s", file=sys.stderr)
    n = motion.num_frames
    try:
        src = portrait_from_photo(photo, align=args.align, name=f"--source {args.source}")
        if not args.quiet:
            for note in src.notes:
                print(f"styleheat render: {note}", file=sys.stderr)
        ident = engine.prepare_identity(src.portrait)
        frames = engine.render(ident.id, motion.rows, range(n), attributes=motion.attributes or None,
                               size=args.size, batch_size=args.batch_size)
    except ValueError as e:
        print(f"styleheat render: {e}", file=sys.stderr)
        return 2
    t1 = time.time()
    bar = tqdm(total=n, unit="frame", desc="render", file=sys.stderr, disable=args.quiet)
    try:
        for index, image in frames:
            image = place(image, args.output, source=photo, placement=src.placement, seam=args.seam)
            write_png_atomic(out / f"frame_{index:05d}.png", image)
            bar.update(1)
    except OSError as e:  # disk full, folder removed, ...
        print(f"styleheat render: cannot write frames to {out} ({e.strerror or e}); free some space or "
              f"choose another --out", file=sys.stderr)
        return 1
    finally:
        bar.close()
    dt = time.time() - t1
    print(f"wrote {n} frames to {out} ({dt / max(n, 1):.2f} s/frame)")
    return 0
