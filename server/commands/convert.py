"""`styleheat convert`: official checkpoint files -> one safetensors bundle (weights + config)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from server.model_options import add_checkpoint_arguments, checkpoint_dir, read_config
from server.commands._output import reject_output_file

NAME = "convert"
HELP = "convert the official StyleHEAT checkpoints into one safetensors bundle"
DESCRIPTION = ("Read StyleHEAT_visual.pt, hfgi.pth, Encoder_e4e.pth, StyleGAN_e4e.pth (and the edit "
               "directions when present) with strict key/shape checks, and write a single safetensors file "
               "holding every weight plus the model config. 'styleheat render --bundle' and the server load "
               "it without unpickling anything.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser, bundle=False)
    parser.add_argument("--out", required=True, metavar="BUNDLE", help="bundle file to write (.safetensors)")
    parser.add_argument("--tiny-random", action="store_true",
                        help="bundle the tiny seeded-random demo model instead of the official files (a weight-free "
                             "trial: 'styleheat render --bundle' then renders what '--tiny-random' renders)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --tiny-random (default 0)")


def run(args: argparse.Namespace) -> int:
    from models import weights

    out = Path(args.out)
    if reject_output_file(NAME, out, ".safetensors", "bundle file"):
        return 2
    if args.tiny_random:
        if args.checkpoints or args.config:
            print("styleheat convert: --tiny-random takes no --checkpoints or --config", file=sys.stderr)
            return 2
        from server.engine import Engine

        model = Engine.tiny_random(seed=args.seed, device="cpu", precision="float32").model
        try:
            weights.save_bundle(out, model, sources={"tiny-random": f"seed {args.seed}"})
        except OSError as e:
            print(f"styleheat convert: cannot write {out} ({e.strerror or e})", file=sys.stderr)
            return 1
        print(f"wrote {out} (tiny random model, seed {args.seed})")
        return 0
    directory, origin = checkpoint_dir(args.checkpoints)
    t0 = time.time()
    try:
        config = read_config(args.config)
        model, report = weights.load_official(directory, config)
    except (weights.WeightsError, ValueError) as e:
        print(f"styleheat convert: {e}", file=sys.stderr)
        return 1
    print(f"read {directory} ({origin}) in {time.time() - t0:.1f} s:")
    for line in report.lines():
        print(f"  {line}")
    try:
        weights.save_bundle(out, model, sources=report.sources)
    except OSError as e:  # disk full, no permission, ...
        print(f"styleheat convert: cannot write {out} ({e.strerror or e}); free some space or choose "
              f"another --out", file=sys.stderr)
        return 1
    n = sum(t.numel() for t in model.state_dict().values())
    print(f"wrote {out} ({n / 1e6:.1f} M values, {out.stat().st_size / 2**20:.0f} MiB)")
    return 0
