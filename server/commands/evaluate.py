"""`styleheat evaluate`: the paper's Table 2 (motion transfer on HDTF) as a command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.model_options import add_precision_argument

NAME = "evaluate"
HELP = "measure motion transfer as in the paper's Table 2 (same-id / cross-id: FID, LPIPS, PSNR, SSIM, CSIM, AED, APD)"
DESCRIPTION = (
    "same-id: frame 0 of each test video is the source and the next N frames drive it; cross-id: each "
    "source portrait is driven by the first N frames of each video. Writes OUT/metrics.json, OUT/report.md "
    "(Table 2 layout, the paper's StyleHEAT row beside ours) and OUT/report.png; per-pair results are cached "
    "in OUT/cache, so an interrupted run resumes. Metric weights are files you name (nothing is downloaded); "
    "see docs/evaluation.md.")

METRICS = ("psnr", "ssim", "lpips", "fid", "csim", "aed", "apd")
WEIGHT_OPTIONS = {  # name -> (option, default file name in --eval-weights)
    "alexnet": ("alexnet_weights", "alexnet-owt-7be5be79.pth"),
    "lpips_heads": ("lpips_heads", "lpips_alex_v0.1.pth"),
    "inception": ("inception_weights", "pt_inception-2015-12-05-6726825d.pth"),
    "arcface": ("arcface_weights", "model_ir_se50.pth"),
}
NEEDS = {"lpips": ("alexnet", "lpips_heads"), "fid": ("inception",), "csim": ("arcface",)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    same = sub.add_parser("same-id", help="frame 0 of each video drives... itself: reconstruction metrics")
    cross = sub.add_parser("cross-id", help="source portraits driven by the videos: FID, CSIM, AED, APD")
    cross.add_argument("--sources", required=True, metavar="DIR", help="folder of FFHQ-aligned square portraits")
    cross.add_argument("--num-sources", type=int, default=None, metavar="N", help="only the first N (sorted)")
    for p in (same, cross):
        p.add_argument("--videos", required=True, metavar="DIR", help="folder of test videos (HDTF test split)")
        p.add_argument("--num-videos", type=int, default=None, metavar="N", help="only the first N (sorted)")
        p.add_argument("--frames", type=int, default=500 if p is same else 100, metavar="N",
                       help="driving frames per video (paper: 500 same-id, 100 cross-id)")
        p.add_argument("--metrics", default=None, metavar="LIST",
                       help="comma list of psnr,ssim,lpips,fid,csim,aed,apd (default: all whose weights are present)")
        p.add_argument("--out", required=True, metavar="DIR", help="folder for metrics.json, report.md, report.png, cache/")
        p.add_argument("--size", type=int, default=512, help="render and compare at this side (paper: 512)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
        p.add_argument("--batch-size", type=int, default=None, help="frames per render batch")
        add_precision_argument(p, tiny_random=True)
        p.add_argument("--checkpoints", metavar="DIR", default=None,
                       help="StyleHEAT checkpoint folder (also holds Deep3D/epoch_20.pth for tracking and AED/APD)")
        p.add_argument("--tiny-random", action="store_true",
                       help="tiny model with seeded random weights instead of StyleHEAT (pipeline test; Deep3D "
                            "still comes from --checkpoints)")
        p.add_argument("--eval-weights", metavar="DIR", default=None,
                       help="folder of the metric weights under their usual names (default: <checkpoints>/evaluation)")
        p.add_argument("--alexnet-weights", metavar="FILE", help="LPIPS backbone: torchvision alexnet-owt-7be5be79.pth")
        p.add_argument("--lpips-heads", metavar="FILE",
                       help="LPIPS linear heads: the lpips package's weights/v0.1/alex.pth (found automatically "
                            "when lpips is installed)")
        p.add_argument("--inception-weights", metavar="FILE", help="FID: pt_inception-2015-12-05-6726825d.pth")
        p.add_argument("--arcface-weights", metavar="FILE", help="CSIM: model_ir_se50.pth (IR-SE50 ArcFace)")
        p.add_argument("--distance", choices=("l1", "l2"), default="l1",
                       help="AED/APD distance (PIRenderer: mean L1; default l1)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")


def installed_lpips_heads() -> Path | None:
    """The lpips package's shipped alex.pth, found without importing lpips (it imports torchvision)."""
    import importlib.metadata

    try:
        files = importlib.metadata.files("lpips") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).replace("\\", "/").endswith("lpips/weights/v0.1/alex.pth"):
            p = Path(f.locate())
            return p if p.is_file() else None
    return None


def weight_paths(args, root: Path | None) -> dict[str, Path | None]:
    folder = Path(args.eval_weights) if args.eval_weights else (root / "evaluation" if root else None)
    out = {}
    for name, (attr, filename) in WEIGHT_OPTIONS.items():
        given = getattr(args, attr)
        if given:
            out[name] = Path(given)
        elif folder is not None and (folder / filename).is_file():
            out[name] = folder / filename
        elif name == "lpips_heads":
            out[name] = installed_lpips_heads()
        else:
            out[name] = None
    return out


def choose_metrics(spec: str | None, kind: str, paths: dict) -> tuple[list[str], list[str]]:
    """(metrics to run, notes on those left out). Explicit metrics are kept even without weights
    (loading then names the missing file)."""
    allowed = METRICS if kind == "same-id" else ("fid", "csim", "aed", "apd")
    if spec:
        chosen = [m.strip().lower() for m in spec.split(",") if m.strip()]
        bad = [m for m in chosen if m not in METRICS]
        if bad:
            raise ValueError(f"--metrics: unknown {', '.join(bad)}; choose from {','.join(METRICS)}")
        wrong = [m for m in chosen if m not in allowed]
        if wrong:
            raise ValueError(f"--metrics: {', '.join(wrong)} need ground-truth frames, which cross-id has not; "
                             f"cross-id measures {','.join(allowed)}")
        return list(dict.fromkeys(chosen)), []
    chosen, notes = [], []
    for m in allowed:
        missing = [n for n in NEEDS.get(m, ()) if paths.get(n) is None]
        if missing:
            opts = ", ".join(f"--{WEIGHT_OPTIONS[n][0].replace('_', '-')}" for n in missing)
            notes.append(f"{m.upper()} skipped: no weights ({opts}; see docs/evaluation.md)")
        else:
            chosen.append(m)
    return chosen, notes


def run(args: argparse.Namespace) -> int:
    from server.evaluation.networks import WeightsFileError
    from server.evaluation.protocol import (IMAGE_SUFFIXES, VIDEO_SUFFIXES, EvaluationError, Options, list_files,
                                            run_protocol)
    from server.evaluation.report import write_outputs

    prog = f"styleheat evaluate {args.protocol}"
    for opt in ("frames", "num_videos", "num_sources", "size", "batch_size"):
        v = getattr(args, opt, None)
        if v is not None and v < (2 if opt == "frames" else 1):
            print(f"{prog}: --{opt.replace('_', '-')} must be at least {2 if opt == 'frames' else 1}", file=sys.stderr)
            return 2
    from server.checkpoints.paths import resolve_checkpoint_dir

    root, origin = resolve_checkpoint_dir(args.checkpoints, option="--checkpoints")
    paths = weight_paths(args, root)
    try:
        videos = list_files(args.videos, VIDEO_SUFFIXES, "videos", "--videos", args.num_videos)
        sources = (list_files(args.sources, IMAGE_SUFFIXES, "portraits", "--sources", args.num_sources)
                   if args.protocol == "cross-id" else None)
        metrics, notes = choose_metrics(args.metrics, args.protocol, paths)
    except (EvaluationError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"{prog}: cannot create output folder {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    used = {n: p for m in metrics for n in NEEDS.get(m, ()) for p in [paths.get(n)] if p is not None}
    try:
        from models import weights as W
        from server.preprocessing.deep3d import CheckpointError  # lazy: moving to server.preprocessing
        from server.engine import Engine
        from server.preprocessing.tracking import load_tracker

        tracker = load_tracker(root, device="cpu" if args.device == "auto" else args.device)
        precision = {"precision": args.precision} if args.precision else {}
        if args.tiny_random:
            engine = Engine.tiny_random(device=args.device, **({"precision": args.precision} if args.precision
                                                             else {"precision": "float32"}))
        else:
            engine = Engine.from_checkpoints(root, device=args.device, **precision)
        options = Options(frames=args.frames, size=args.size, metrics=tuple(metrics), distance=args.distance,
                          device=args.device, precision=args.precision, batch_size=args.batch_size,
                          model_id=engine.model_name if args.tiny_random else str(root.resolve()),
                          weights={k: str(v) for k, v in paths.items() if v is not None})
        if args.size not in engine.sizes:
            print(f"{prog}: --size {args.size} is not one this model renders ({', '.join(map(str, engine.sizes))})",
                  file=sys.stderr)
            return 2
        results = run_protocol(args.protocol, engine, tracker, options, out, videos, sources,
                               show_progress=not args.quiet)
    except WeightsFileError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, W.WeightsError, RuntimeError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        print(f"(checkpoint directory {root}, from {origin}; `styleheat download` fetches the StyleHEAT weights)",
              file=sys.stderr)
        return 1
    except (EvaluationError, ValueError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    settings = {"frames": args.frames, "size": args.size, "metrics": metrics, "distance": args.distance,
                "model": engine.model_name, "tiny_random": bool(args.tiny_random), "precision": args.precision,
                "device": str(engine.device), "videos": [v.name for v in videos],
                "sources": [s.name for s in sources] if sources else None,
                "weights": {k: str(v) for k, v in used.items()}, "skipped": notes}
    written = write_outputs(out, results, settings)
    s = results["summary"]
    print(f"{args.protocol}: " + ", ".join(f"{k.upper()} {v:.4g}" if v is not None else f"{k.upper()} n/a"
                                           for k, v in s.items()))
    print(f"wrote {written['json']}, {written['md']}, {written['png']}")
    return 0
