"""`styleheat audio2exp`: speech audio -> motion file, expressions from SadTalker's Audio2Exp."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from server.commands._output import reject_output_file

NAME = "audio2exp"
HELP = "turn speech audio into a motion file (64 expression coefficients per frame, SadTalker Audio2Exp)"
DESCRIPTION = (
    "Run SadTalker's Audio2Exp network on an audio file (any sample rate, mono or stereo) and write a "
    "styleheat-motion file with one 73-value row per frame: the predicted expression (64), then the head "
    "pose (angle 3, trans 3) and crop (3) held constant from --reference (the portrait's own coefficients, "
    "e.g. a motion file whose first row describes the portrait). Without --reference the reference "
    "expression, angles and translation are 0 and the crop is that of a typical FFHQ-aligned portrait "
    "(1.0, 128.5, 101.8). At 25 fps and offset 0 this is SadTalker's computation; at other frame rates "
    "the network runs on its 25 fps grid and the curves are interpolated at each frame's time. "
    "Checkpoint: --checkpoint FILE or DIR (SadTalker_V0.0.2_256.safetensors or auido2exp_00300-model.pth), "
    "else looked for in $STYLEHEAT_CHECKPOINTS or the user cache."
)

#: crop (s, t0, t1) of a typical FFHQ-aligned 1024 portrait: align_img on shared/fixtures portrait_100
DEFAULT_CROP = (1.0, 128.5, 101.8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audio", required=True, metavar="FILE", help="speech audio (WAV, FLAC, OGG, MP3, ...)")
    parser.add_argument("--out", required=True, metavar="FILE", help="motion file to write (.json)")
    parser.add_argument("--fps", type=float, default=25.0, metavar="F", help="frame rate of the motion (default 25)")
    parser.add_argument("--checkpoint", metavar="PATH", default=None,
                        help="SadTalker checkpoint file, or a directory holding one")
    parser.add_argument("--reference", metavar="FILE", default=None,
                        help="portrait coefficients: a motion .json (first row), a .npy of 73/70/64 values, "
                             "or SadTalker's first-frame .mat (coeff_3dmm)")
    parser.add_argument("--frames", type=int, default=None, metavar="N",
                        help="number of frames (default: the audio's duration x fps)")
    parser.add_argument("--offset", type=float, default=0.0, metavar="SECONDS",
                        help="audio time of the first frame (negative: frames before the sound starts)")
    parser.add_argument("--first-frame", type=int, default=0, metavar="N",
                        help="scene frame number of the first row (written to the motion file)")
    parser.add_argument("--blink", choices=("none", "random"), default="none",
                        help="eye blinks: none, or SadTalker's random blinks (seeded by --seed)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random blinks and of the head motion's latent draws (default 0)")
    parser.add_argument("--pose", action=argparse.BooleanOptionalAction, default=False,
                        help="head motion from SadTalker's Audio2Pose (auido2pose_00140-model.pth beside the "
                             "checkpoint, or the SadTalker_V0.0.2 safetensors bundle); --no-pose: constant pose")
    parser.add_argument("--pose-style", type=int, default=0, metavar="N", help="Audio2Pose style 0..45 (default 0)")
    parser.add_argument("--pose-scale", type=float, default=1.0, metavar="S",
                        help="head-motion amplitude >= 0 (0: the reference pose, 1: SadTalker's; default 1)")
    parser.add_argument("--blinks", action="store_true",
                        help="add blinks as an offset toward the 'eyes' expression preset (needs --presets)")
    parser.add_argument("--blink-rate", type=float, default=15.0, metavar="R", help="blinks per minute (default 15)")
    parser.add_argument("--blink-seed", type=int, default=None, metavar="N", help="seed of the blink times (default --seed)")
    parser.add_argument("--presets", metavar="FILE", default=None,
                        help="expression presets (expression.pth or expression_presets.json) for --blinks")
    parser.add_argument("--tiny-random", action="store_true",
                        help="seeded tiny random Audio2Exp / Audio2Pose instead of checkpoints (tests; noise)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")


def default_reference_row() -> np.ndarray:
    """(73,) float32 reference without --reference: zero expression and pose, DEFAULT_CROP."""
    row = np.zeros(73, dtype=np.float32)
    row[70:73] = DEFAULT_CROP
    return row


def read_reference(path: str | Path) -> np.ndarray:
    """A reference file -> (73,) float32 row; a 64/70-value reference gets DEFAULT_CROP (and zero pose)."""
    from server.preprocessing.audio import AudioError
    from server.preprocessing.motion import MotionError, read_motion

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: reference file not found")
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            return read_motion(path).rows[0].astype(np.float32)
        except MotionError as e:
            raise AudioError(str(e)) from None
    if suffix == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise AudioError(f"{path}: not a readable .npy array ({e})") from None
    elif suffix == ".mat":
        from scipy.io import loadmat

        try:
            mat = loadmat(str(path))
        except Exception as e:  # noqa: BLE001
            raise AudioError(f"{path}: not a readable MATLAB file ({e})") from None
        if "coeff_3dmm" not in mat:
            raise AudioError(f"{path}: has no 'coeff_3dmm' variable (SadTalker's first-frame coefficients)")
        values = np.asarray(mat["coeff_3dmm"])[:1, :70]
    else:
        raise AudioError(f"{path}: reference must be a motion .json, a .npy or a SadTalker .mat file")
    try:
        values = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise AudioError(f"{path}: expected 64, 70 or 73 numbers (exp | angle | trans | crop), got values of "
                         f"type {np.asarray(values).dtype}") from None
    if values.ndim == 2:
        values = values[0]
    if values.ndim != 1 or values.shape[0] not in (64, 70, 73) or not np.all(np.isfinite(values)):
        raise AudioError(f"{path}: expected 64, 70 or 73 finite coefficients (exp | angle | trans | crop), "
                         f"got shape {values.shape}")
    row = default_reference_row()
    row[:values.shape[0]] = values
    return row


def run(args: argparse.Namespace) -> int:
    from server.preprocessing import audio
    from server.preprocessing.motion import write_motion
    from server.checkpoints.paths import resolve_checkpoint_dir

    out = Path(args.out)
    if reject_output_file(NAME, out, ".json", "motion file"):
        return 2
    if args.frames is not None and args.frames < 1:
        print("styleheat audio2exp: --frames must be at least 1", file=sys.stderr)
        return 2
    problem = _motion_option_problem(args)
    if problem:
        print(f"styleheat audio2exp: {problem}", file=sys.stderr)
        return 2
    try:
        ref_row = read_reference(args.reference) if args.reference else default_reference_row()
        samples, sr = audio.read_audio(args.audio)
        if args.tiny_random:
            from server.service.bake_models import tiny_audio2exp

            ckpt = "tiny-random"
            model = tiny_audio2exp(args.seed, args.device)
        else:
            if args.checkpoint:
                ckpt = Path(args.checkpoint)
            else:
                ckpt, _origin = resolve_checkpoint_dir(None)
            model = audio.load_audio2exp(ckpt, device=args.device)
        exp = audio.audio_to_expression(samples, sr, args.fps, ref_row[:64], model=model, n_frames=args.frames,
                                        offset_seconds=args.offset,
                                        blink=None if args.blink == "none" else "random", seed=args.seed)
    except ValueError as exc:  # AudioError, strict-loading errors, MotionError
        print(f"styleheat audio2exp: {exc}", file=sys.stderr)
        return 1
    if exp.shape[0] == 0:
        print(f"styleheat audio2exp: {args.audio} is shorter than one frame at {args.fps:g} fps; nothing to write "
              f"(use --frames N to render N frames anyway)", file=sys.stderr)
        return 1
    rows = np.repeat(ref_row[None, :], exp.shape[0], axis=0)
    rows[:, :64] = exp
    try:
        blinks = _add_motion(args, rows, samples, sr, ckpt)
    except ValueError as exc:
        print(f"styleheat audio2exp: {exc}", file=sys.stderr)
        return 1
    source = {"tool": "styleheat audio2exp", "audio": str(args.audio), "checkpoint": str(ckpt),
              "offset_seconds": float(args.offset), "blink": args.blink, "seed": int(args.seed),
              "reference": str(args.reference) if args.reference else None,
              "pose": ("SadTalker Audio2Pose" if args.pose else
                       "constant from the reference" if args.reference else "zero (no --reference)")}
    if args.pose:
        source.update(pose_style=args.pose_style, pose_scale=args.pose_scale)
    if blinks is not None:
        source.update(blinks=blinks, blink_rate=args.blink_rate)
    write_motion(out, rows, fps=args.fps, first_frame=args.first_frame, source=source)
    print(f"wrote {out}: {exp.shape[0]} frames at {args.fps:g} fps", file=sys.stderr)
    return 0


def _motion_option_problem(args) -> str | None:
    if not 0 <= args.pose_style <= 45:
        return f"--pose-style must be an integer in 0..45, got {args.pose_style}"
    if not np.isfinite(args.pose_scale) or args.pose_scale < 0:
        return f"--pose-scale must be a number >= 0, got {args.pose_scale}"
    if not np.isfinite(args.blink_rate) or args.blink_rate < 0:
        return f"--blink-rate must be a number >= 0 (blinks per minute), got {args.blink_rate}"
    if args.blinks and not args.presets:
        return "--blinks needs --presets FILE (the 'eyes' expression preset closes the eyes)"
    return None


def _add_motion(args, rows: np.ndarray, samples, sr, ckpt) -> list[int] | None:
    """Write head motion into rows[:, 64:70] and blink offsets into rows[:, :64] (in place); the blink frames."""
    from server.preprocessing import audio

    n = rows.shape[0]
    offset_frames = args.offset * args.fps
    if args.pose:
        if args.tiny_random:
            pose_model = audio.tiny_audio2pose(args.seed, args.device)
        else:
            path = audio.audio2pose_near(ckpt)
            if path is None:
                raise audio.AudioError(f"--pose: no Audio2Pose checkpoint beside {ckpt} (auido2pose_00140-model.pth "
                                       f"or SadTalker_V0.0.2_256.safetensors)")
            pose_model = audio.load_audio2pose(path, device=args.device)
        rows[:, 64:70] = audio.audio_to_pose(samples, sr, args.fps, rows[0, 64:70].copy(), model=pose_model,
                                             n_frames=n, offset_frames=offset_frames, pose_style=args.pose_style,
                                             pose_scale=args.pose_scale, seed=args.seed)
    if not args.blinks:
        return None
    from server.service.bake_models import load_presets

    presets, _pose = load_presets(args.presets)
    if "eyes" not in presets:
        raise audio.AudioError(f"{args.presets}: has no 'eyes' preset (needed by --blinks)")
    center = presets.get("center", np.zeros(64, np.float32))
    seed = args.seed if args.blink_seed is None else args.blink_seed
    frames = audio.blink_frames(n, args.fps, args.blink_rate, seed)
    rows[:, :64] += audio.blink_offset(audio.blink_weights(n, args.fps, frames), presets["eyes"], center)
    return frames
