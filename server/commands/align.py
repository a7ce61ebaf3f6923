"""`styleheat align`: FFHQ-align a portrait photo (the crop StyleHEAT's encoders expect)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from server.commands._output import reject_output_file

NAME = "align"
HELP = "detect the face in a photo and write the FFHQ-aligned 1024x1024 portrait (PNG)"
DESCRIPTION = (
    "Detect the face (dlib; the largest one if there are several), find its 68 landmarks and apply "
    "the FFHQ crop/rotation StyleHEAT was trained on. Writes a square PNG (default 1024x1024). "
    "Areas of the crop outside the photo are black, as in the official pipeline, unless --pad is given."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", required=True, metavar="FILE", help="portrait photo (PNG, JPEG, ...)")
    parser.add_argument("--out", required=True, metavar="FILE", help="output PNG")
    parser.add_argument("--size", type=int, default=1024, help="output side in pixels (16-1024, default 1024)")
    parser.add_argument("--pad", action="store_true",
                        help="fill crop areas outside the photo by blurred reflection instead of black")
    parser.add_argument("--landmarks", metavar="JSON", default=None,
                        help="also write the 68 landmarks (source and aligned pixels) to this JSON file")


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from server.preprocessing.align import NoFaceError, align_portrait, read_image

    out = Path(args.out)
    if reject_output_file(NAME, out, ".png"):
        return 2
    if args.landmarks and reject_output_file(NAME, args.landmarks, None, option="--landmarks"):
        return 2
    try:
        image = read_image(args.image)
        result = align_portrait(image, size=args.size, pad=args.pad, source_name=str(args.image))
    except (FileNotFoundError, NoFaceError, ValueError, RuntimeError) as exc:
        print(f"styleheat align: {exc}", file=sys.stderr)
        return 1
    Image.fromarray(result.image).save(out)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"{args.image}: {result.faces_found} face(s) found, face box {result.face_box}; "
          f"wrote {out} ({args.size}x{args.size})")
    if args.landmarks:
        Path(args.landmarks).write_text(json.dumps({
            "image": str(args.image), "aligned": str(out), "size": args.size,
            "faces_found": result.faces_found, "face_box": list(result.face_box),
            "source_landmarks": result.source_landmarks.tolist(),
            "aligned_landmarks": result.landmarks.tolist(), "quad": result.quad.tolist(),
        }), encoding="utf-8")
    return 0
