"""`styleheat prepare-data`: VoxCeleb-style / HDTF-style videos -> a training dataset folder."""
from __future__ import annotations

import argparse
import sys

NAME = "prepare-data"
HELP = "build a training dataset (frames + 73-value 3DMM rows + audio) from talking-head videos"
DESCRIPTION = (
    "For each video: fix the FFHQ crop square of the first frame with a face, crop every frame with it "
    "(faces are not aligned per frame; the head moves freely in the box, as in the paper), regress the "
    "Deep3D 73-value coefficients per frame, and store frames at 256x256 (--style voxceleb) or 512x512 "
    "(--style hdtf). Audio comes from a file next to each video with the same name (.wav/.flac/.ogg/.mp3; "
    "make one with ffmpeg -i VIDEO.mp4 -ac 1 -ar 16000 VIDEO.wav). The format is described in "
    "docs/training.md. Needs checkpoints/Deep3D/epoch_20.pth."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="VIDEO_OR_DIR", help="video files or folders (searched recursively)")
    parser.add_argument("--out", required=True, metavar="DIR", help="dataset folder to create or extend")
    parser.add_argument("--style", choices=["voxceleb", "hdtf"], default="voxceleb",
                        help="voxceleb: 256x256 frames, clip ids idNNNNN#VIDEO#NNNNN; hdtf: 512x512 frames")
    parser.add_argument("--resolution", type=int, default=None, help="override the frame size of the style")
    parser.add_argument("--checkpoints", metavar="DIR", default=None, help="checkpoint folder with Deep3D/epoch_20.pth")
    parser.add_argument("--max-frames", type=int, default=None, metavar="N", help="only the first N frames of each video")
    parser.add_argument("--no-audio", action="store_true", help="ignore audio files next to the videos")
    parser.add_argument("--skip-existing", action="store_true", help="skip videos whose clip is already in the dataset")
    parser.add_argument("--device", default="cpu", help="torch device for the Deep3D regressor")
    parser.add_argument("--tiny-random", action="store_true",
                        help="a tiny Deep3D regressor with seeded random weights instead of epoch_20.pth (a weight-free "
                             "trial of the pipeline; the coefficients mean nothing)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from models.tracking import VideoError
    from server.preprocessing.deep3d import CheckpointError
    from server.checkpoints.paths import resolve_checkpoint_dir
    from server.preprocessing.tracking import load_tracker
    from training import prepare
    from training.data import DatasetError, read_meta

    if args.resolution is not None and (args.resolution < 64 or args.resolution & (args.resolution - 1)):
        print("styleheat prepare-data: --resolution must be a power of two >= 64", file=sys.stderr)
        return 2
    existing = set()
    try:
        videos = prepare.find_videos(args.inputs)
        if args.skip_existing and (Path(args.out) / "dataset.json").is_file():
            existing = {c["id"] for c in read_meta(Path(args.out)).get("clips", [])}
    except DatasetError as exc:
        print(f"styleheat prepare-data: {exc}", file=sys.stderr)
        return 2
    if args.tiny_random and args.checkpoints:
        print("styleheat prepare-data: --tiny-random takes no --checkpoints", file=sys.stderr)
        return 2
    root, origin = (None, "--tiny-random") if args.tiny_random else resolve_checkpoint_dir(
        args.checkpoints, option="--checkpoints")
    try:
        if args.tiny_random:
            from server.service.bake_models import tiny_tracker

            tracker = tiny_tracker(0, args.device)
        else:
            tracker = load_tracker(root, device=args.device)
    except (CheckpointError, RuntimeError) as exc:
        print(f"styleheat prepare-data: {exc}\n(checkpoint directory {root}, from {origin}; "
              "`styleheat download` fetches the weights)", file=sys.stderr)
        return 1
    failed = 0
    for i, video in enumerate(videos, 1):
        cid, _ = prepare.clip_identity(video, args.style)
        if cid in existing:
            print(f"[{i}/{len(videos)}] {video}: already in the dataset, skipped")
            continue
        try:
            info = prepare.prepare_video(video, args.out, tracker, style=args.style, resolution=args.resolution,
                                         max_frames=args.max_frames, audio=not args.no_audio)
        except (VideoError, DatasetError) as exc:
            print(f"[{i}/{len(videos)}] {video}: skipped: {exc}", file=sys.stderr)
            failed += 1
            continue
        for w in info["warnings"]:
            print(f"  warning: {w}", file=sys.stderr)
        print(f"[{i}/{len(videos)}] {video} -> {info['id']}: {info['frames']} frames at "
              f"{info['resolution']}^2{', audio' if info['audio'] else ''}")
    if failed == len(videos):
        print("styleheat prepare-data: no video could be prepared", file=sys.stderr)
        return 1
    return 0
