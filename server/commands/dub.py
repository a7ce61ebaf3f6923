"""`styleheat dub`: a filmed shot + new speech -> the shot's frames with the face speaking it."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from server.frame_files import write_bytes_atomic, write_png_atomic
from server.model_options import (OptionConflict, add_checkpoint_arguments, add_precision_argument,
                                  checkpoint_dir, load_engine)

NAME = "dub"
HELP = "dub a filmed shot: the plate's face and head motion, lips from new speech, pasted back into the plate"
DESCRIPTION = (
    "Track the face in the plate (the FFHQ square of the first frame with a face, fixed for the whole shot), "
    "invert that face once, and render every frame with the plate's head pose and non-speech expression "
    "(eyes, eyebrows) and the mouth driven by the new speech (Audio2Exp and the AudioWarper: the paper's joint "
    "mode). Each rendered face is pasted back into its plate frame with a soft head mask: OUT/frame_00000.png, "
    "... at the plate's size and frame count (RGBA mattes with --output matte), plus OUT/dub.json (what was "
    "done, warnings, frames without a face). Audio shorter than the plate leaves the last frames speechless "
    "(closed mouth), longer audio is cut; frames without a face stay the plate's. See docs/compositing.md.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video", required=True, metavar="PLATE", help="the filmed shot (MP4, AVI, MOV, ...)")
    parser.add_argument("--audio", required=True, metavar="SPEECH", help="the new speech (WAV, FLAC, OGG, MP3)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG frames and dub.json (created)")
    add_checkpoint_arguments(parser, bundle=True)
    parser.add_argument("--tiny-random", action="store_true",
                        help="tiny seeded random models (engine, tracker regressor, Audio2Exp): tests and demos")
    parser.add_argument("--seed", type=int, default=0, help="seed for --tiny-random (default 0)")
    parser.add_argument("--audio2exp", metavar="FILE", default=None,
                        help="SadTalker Audio2Exp checkpoint (default: found in the checkpoint folder)")
    parser.add_argument("--presets", metavar="FILE", default=None,
                        help="expression presets (expression_presets.json or the official expression.pth) for the "
                             "expression split; default: found in the checkpoint folder")
    parser.add_argument("--output", choices=("composite", "matte"), default="composite",
                        help="composite: RGB plate frames with the new face; matte: RGBA, alpha = the head mask")
    parser.add_argument("--size", type=int, default=None,
                        help="render size of the face crop (default: native 1024; 256 and 512 are cheaper)")
    parser.add_argument("--steady-mask", action="store_true",
                        help="keep the mask ellipse at the crop's centre instead of following the face")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=None, help="frames per batch (default 8 on GPU, 2 on CPU)")
    add_precision_argument(parser, tiny_random=True)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _fail(message: str, code: int = 2) -> int:
    print(f"styleheat dub: {message}", file=sys.stderr)
    return code


def _load_models(args):
    """(engine, tracker, audio2exp or None, presets {} , notes) or raise ValueError / RuntimeError."""
    notes = []
    presets: dict = {}
    engine = load_engine(args)
    if args.tiny_random:
        from server.service.bake_models import tiny_audio2exp, tiny_tracker

        tracker = tiny_tracker(args.seed, "cpu")
        a2e = tiny_audio2exp(args.seed, "cpu") if not args.audio2exp else None
        root = None
    else:
        from server.preprocessing.tracking import load_tracker

        root, _ = checkpoint_dir(args.checkpoints)   # the tracker's and Audio2Exp's folder, also with --bundle
        tracker = load_tracker(root, device=str(engine.device))
        a2e = None
    if args.audio2exp or root is not None:
        from server.preprocessing.audio import load_audio2exp
        from server.service.bake_models import find_audio2exp

        path = Path(args.audio2exp) if args.audio2exp else find_audio2exp(root)
        if path is not None:
            a2e = load_audio2exp(path, device=str(engine.device) if not args.tiny_random else "cpu")
        else:
            notes.append(f"no Audio2Exp checkpoint in {root}; pass --audio2exp PATH for Audio2Exp mouth shapes")
    from server.service.bake_models import PRESET_FILES, load_presets

    if args.presets:
        presets, _ = load_presets(args.presets)
    elif root is not None:
        for name in PRESET_FILES:
            if (root / name).is_file():
                presets, _ = load_presets(root / name)
                break
    return engine, tracker, a2e, presets, notes


def run(args: argparse.Namespace) -> int:
    from models import weights
    from server.preprocessing.deep3d import CheckpointError
    from server.shots.dub import DubError, dub, load_speech

    if args.tiny_random and (args.checkpoints or args.bundle):
        return _fail("give --tiny-random or --checkpoints/--bundle, not both")
    if args.batch_size is not None and args.batch_size < 1:
        return _fail("--batch-size must be at least 1")
    video = Path(args.video)
    if not video.is_file():
        return _fail(f"--video {video}: file not found")
    try:
        speech = load_speech(args.audio)
    except DubError as exc:
        return _fail(str(exc))
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _fail(f"cannot create output folder {out}: {exc.strerror or exc}")
    t0 = time.time()
    try:
        engine, tracker, a2e, presets, notes = _load_models(args)
    except OptionConflict as exc:
        return _fail(str(exc))
    except (weights.WeightsError, CheckpointError, ValueError, RuntimeError, OSError) as exc:
        return _fail(str(exc), 1)
    if args.size is not None and args.size not in engine.sizes:
        return _fail(f"--size {args.size} is not supported by these weights; choose one of {engine.sizes}")
    if not args.quiet:
        print(f"loaded {engine.model_name} on {engine.device} in {time.time() - t0:.1f} s", file=sys.stderr)

    bars: dict = {}

    def progress(stage: str, done: int, total: int) -> None:
        if args.quiet:
            return
        from tqdm import tqdm

        if stage not in bars:
            label = {"landmarks": "landmarks", "3dmm": "3DMM", "render": "dub"}.get(stage, stage)
            bars[stage] = tqdm(total=total or None, desc=label, unit="frame", file=sys.stderr)
        bars[stage].update(done - bars[stage].n)

    def write(index: int, image) -> None:
        write_png_atomic(out / f"frame_{index:05d}.png", image)

    t1 = time.time()
    try:
        result = dub(video, (speech[0], speech[1]), engine=engine, tracker=tracker, write=write, audio2exp=a2e,
                     presets=presets, output=args.output, size=args.size, batch_size=args.batch_size,
                     follow_face=not args.steady_mask, progress=progress)
    except ValueError as exc:  # DubError, or the engine refusing a value
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot write frames to {out} ({exc.strerror or exc}); free some space or choose another "
                     f"--out", 1)
    finally:
        for bar in bars.values():
            bar.close()
    result.audio = os.path.basename(str(args.audio))
    result.warnings = notes + result.warnings
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    write_bytes_atomic(out / "dub.json", (json.dumps(result.to_dict(), indent=1) + "\n").encode("utf-8"))
    dt = time.time() - t1
    print(f"wrote {result.frames} frames ({result.width}x{result.height}, {result.output}) and dub.json to {out} "
          f"({dt / max(result.frames, 1):.2f} s/frame)")
    return 0
