"""`styleheat extract`: driving video -> motion file of per-frame 3DMM coefficients."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from server.commands._output import reject_output_file

NAME = "extract"
HELP = "track the face in a driving video and write its per-frame 3DMM motion file (JSON)"
DESCRIPTION = (
    "Decode the video, find the face, crop every frame with the FFHQ square of the first frame that "
    "shows a face (the official StyleHEAT crop), find 68 landmarks per frame (smoothed over time) and "
    "run Deep3DFaceRecon's regressor (checkpoints/Deep3D/epoch_20.pth) on each frame. Writes a "
    "styleheat-motion file with one 73-value row per frame (exp 64 | angle 3 | trans 3 | crop 3). "
    "Checkpoints: --checkpoints, else $STYLEHEAT_CHECKPOINTS, else the user cache (styleheat download)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video", required=True, metavar="FILE", help="driving video (MP4, AVI, MOV, ...)")
    parser.add_argument("--out", required=True, metavar="FILE", help="motion file to write (.json)")
    parser.add_argument("--checkpoints", metavar="DIR", default=None,
                        help="checkpoint directory holding Deep3D/epoch_20.pth")
    parser.add_argument("--smooth", type=float, nargs="?", const=1.5, default=0.0, metavar="SIGMA",
                        help="Gaussian-smooth the coefficient curves over time (SIGMA frames, default 1.5)")
    parser.add_argument("--landmark-sigma", type=float, default=1.0, metavar="FRAMES",
                        help="temporal smoothing of the landmarks that place the crop (0 = off, default 1.0)")
    parser.add_argument("--fps", type=float, default=None, metavar="FPS",
                        help="resample the rows to this frame rate (StyleHEAT was trained at 25; "
                             "default: keep the video's rate)")
    parser.add_argument("--max-frames", type=int, default=None, metavar="N", help="only the first N frames")
    parser.add_argument("--device", default="cpu", help="torch device for the regressor (cpu, cuda, ...)")
    parser.add_argument("--tiny-random", action="store_true",
                        help="a tiny Deep3D regressor with seeded random weights instead of epoch_20.pth (a weight-free "
                             "trial: real face tracking, meaningless coefficients; the same as the server's)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --tiny-random (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from models.tracking import VideoError
    from server.preprocessing.deep3d import CheckpointError
    from server.preprocessing.motion import write_motion
    from server.checkpoints.paths import resolve_checkpoint_dir
    from server.preprocessing.tracking import load_tracker, probe_video, resample_rows

    out = Path(args.out)
    if reject_output_file(NAME, out, ".json", "motion file"):
        return 2
    if args.max_frames is not None and args.max_frames < 1:
        print("styleheat extract: --max-frames must be at least 1", file=sys.stderr)
        return 2
    if args.fps is not None and not 0 < args.fps <= 240:
        print("styleheat extract: --fps must be between 0 and 240", file=sys.stderr)
        return 2
    if not (0 <= args.smooth < math.inf and 0 <= args.landmark_sigma < math.inf):
        print(f"styleheat extract: --smooth and --landmark-sigma must be finite numbers >= 0 (frames), got "
              f"{args.smooth:g} and {args.landmark_sigma:g}", file=sys.stderr)
        return 2
    if args.tiny_random and args.checkpoints:
        print("styleheat extract: --tiny-random takes no --checkpoints", file=sys.stderr)
        return 2
    root, origin = (None, "--tiny-random") if args.tiny_random else resolve_checkpoint_dir(
        args.checkpoints, option="--checkpoints")
    try:
        probe_video(args.video)  # fail early on a missing or undecodable file
        if args.tiny_random:
            from server.preprocessing.tracking import DlibDeep3DTracker, require_dlib
            from server.service.bake_models import tiny_deep3d

            require_dlib()
            tracker = DlibDeep3DTracker(tiny_deep3d(args.seed, args.device), landmark_sigma=args.landmark_sigma,
                                        description=f"dlib + tiny random Deep3D (seed {args.seed})")
        else:
            tracker = load_tracker(root, device=args.device, landmark_sigma=args.landmark_sigma)
    except (VideoError, CheckpointError, RuntimeError) as exc:
        print(f"styleheat extract: {exc}", file=sys.stderr)
        if isinstance(exc, CheckpointError):
            print(f"(checkpoint directory {root}, from {origin}; `styleheat download` fetches the weights)",
                  file=sys.stderr)
        return 1

    bars: dict = {}

    def progress(stage: str, done: int, total: int) -> None:
        if args.quiet:
            return
        from tqdm import tqdm

        if stage not in bars:
            label = {"landmarks": "landmarks", "3dmm": "3DMM"}.get(stage, stage)
            bars[stage] = tqdm(total=total or None, desc=label, unit="frame", file=sys.stderr)
        bar = bars[stage]
        bar.update(done - bar.n)

    try:
        result = tracker.track(args.video, curve_sigma=args.smooth, max_frames=args.max_frames, progress=progress)
    except VideoError as exc:
        print(f"styleheat extract: {exc}", file=sys.stderr)
        return 1
    finally:
        for bar in bars.values():
            bar.close()
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    source = result.provenance(args.video)
    source.update({"landmark_sigma": args.landmark_sigma, "curve_sigma": args.smooth, "video_fps": result.fps})
    rows, fps = result.rows, result.fps
    if args.fps is not None and abs(args.fps - fps) > 1e-6:
        rows, fps = resample_rows(rows, fps, args.fps), args.fps
        source["resampled_to_fps"] = fps
    write_motion(out, rows, fps=fps, source=source)
    print(f"{args.video}: {len(result.rows)} frames at {result.fps:g} fps -> {len(rows)} rows at {fps:g} fps -> {out}")
    return 0
