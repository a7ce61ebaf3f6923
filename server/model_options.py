"""Shared options of the commands that load the StyleHEAT model (render, convert)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_checkpoint_arguments(parser: argparse.ArgumentParser, *, bundle: bool) -> None:
    parser.add_argument("--checkpoints", metavar="DIR", default=None,
                        help="folder with the official StyleHEAT files (default: $STYLEHEAT_CHECKPOINTS, "
                             "else the folder 'styleheat download' fills)")
    if bundle:
        parser.add_argument("--bundle", metavar="FILE", default=None,
                            help="load a safetensors bundle made by 'styleheat convert' instead of --checkpoints")
    parser.add_argument("--config", metavar="JSON", default=None,
                        help="model config JSON (StyleHEATConfig.to_dict()) for non-standard sizes; "
                             "default: the official full-size model")


#: Engine precisions (server.engine.PRECISIONS; repeated here so that --help needs no torch import)
PRECISION_CHOICES = ("auto", "float32", "bfloat16")


def add_precision_argument(parser: argparse.ArgumentParser, *, tiny_random: bool = False) -> None:
    parser.add_argument(
        "--precision", default=None, choices=PRECISION_CHOICES,
        help="auto: bfloat16 where the hardware runs it natively (CUDA, AVX512-BF16/AMX CPUs; >= 40 dB PSNR "
             "against float32), else float32; float32: the reference path; default auto"
             + (" (float32 with --tiny-random)" if tiny_random else ""))


def precision_option(args: argparse.Namespace) -> dict:
    """{"precision": ...} when --precision was given, else {} (the loader's default: auto)."""
    return {"precision": args.precision} if getattr(args, "precision", None) else {}


def read_config(path: str | None):
    """The StyleHEATConfig of --config (None = official full size); ValueError with a clear message."""
    if not path:
        return None
    from models.styleheat import StyleHEATConfig

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return StyleHEATConfig.from_dict(data)
    except FileNotFoundError:
        raise ValueError(f"--config {path}: file not found") from None
    except OSError as e:  # a folder, no permission, ...
        raise ValueError(f"--config {path}: cannot be read ({e.strerror or e}); pass a JSON file") from None
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"--config {path}: not a valid StyleHEAT config ({e})") from None


def checkpoint_dir(explicit: str | None) -> tuple[Path, str]:
    from server.checkpoints.paths import resolve_checkpoint_dir

    return resolve_checkpoint_dir(explicit, option="--checkpoints")


class OptionConflict(ValueError):
    """Options that cannot go together (a usage error, exit status 2), as opposed to weights that do not load."""


def load_engine(args: argparse.Namespace):
    """The Engine the command's options name: ``--tiny-random`` (``--seed``), ``--bundle`` or ``--checkpoints``
    (with ``--config``), on ``--device`` in ``--precision``. OptionConflict for options that exclude each other;
    the loaders' WeightsError / ValueError for files that do not load."""
    from server.engine import Engine

    options = precision_option(args)
    bundle = getattr(args, "bundle", None)
    if getattr(args, "tiny_random", False):
        if bundle or args.checkpoints or args.config:
            raise OptionConflict("--tiny-random takes no --checkpoints, --bundle or --config")
        return Engine.tiny_random(seed=args.seed, device=args.device, **options)
    if bundle:
        if args.checkpoints:
            raise OptionConflict("give --checkpoints or --bundle, not both")
        return Engine.from_bundle(bundle, device=args.device, **options)
    directory, _ = checkpoint_dir(args.checkpoints)
    return Engine.from_checkpoints(directory, device=args.device, config=read_config(args.config), **options)
