"""`styleheat verify-reference`: recompute the official reference vectors and compare (parity check).

The vector file's arrays say what it holds: StyleHEAT vectors (``vectors_seed*.npz``: has ``e4e_wx``)
go to :mod:`server.parity.verify_styleheat`, audio (SadTalker) and Deep3D vector files to
:mod:`server.parity.verify_audio` / :mod:`server.parity.verify_deep3d`. This module parses the
arguments and prints one line per compared array (server.parity.reference.Comparison.line), then
``parity: PASS`` or ``parity: FAIL <first failing array>``; exit status 0 only on PASS.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from server.parity.verify_styleheat import STYLEHEAT_LAYOUT, verify_styleheat_vectors

NAME = "verify-reference"
HELP = "recompute the official reference vectors with seeded weights and report parity"
DESCRIPTION = ("Rebuild the seeded weights of a reference vector file, run its stored inputs through this "
               "project's networks and compare every stage with the official outputs. Prints one line per "
               "array and 'parity: PASS' or 'parity: FAIL <array>'; exit status 0 only on PASS.")

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vectors", required=True, metavar="FILE.npz",
                        help="reference vector file (vectors_seed0.npz, vectors_audio_seed0.npz, vectors_deep3d_seed0.npz)")
    parser.add_argument("--layout", metavar="JSON",
                        help="checkpoint layout JSON (default: the matching layout next to the vectors file)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def run(args) -> int:
    vectors = Path(args.vectors)
    if not vectors.is_file():
        print(f"styleheat verify-reference: {vectors} not found", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        z = np.load(vectors)  # allow_pickle stays False: a pickle is refused, never run
    except (OSError, ValueError) as e:
        z, why = None, str(e)
    else:
        why = "a single .npy array"
    if not isinstance(z, np.lib.npyio.NpzFile):
        print(f"styleheat verify-reference: {vectors} is not a .npz reference vector file ({why}); pass one "
              f"of the files in shared/reference (vectors_seed0.npz, ...)", file=sys.stderr)
        return 2
    with z:
        keys = set(z.files)
    kind, fn = _dispatch(keys)
    if fn is None and kind == "unknown":
        print(f"styleheat verify-reference: cannot verify {vectors}: its arrays ({', '.join(sorted(keys)[:6])}) "
              f"are not those of a StyleHEAT, audio or Deep3D reference vector file", file=sys.stderr)
        return 2
    if fn is None:
        print(f"styleheat verify-reference: {vectors} holds {kind} vectors, which this installation cannot "
              f"verify yet ({_MISSING[kind]} is not available)", file=sys.stderr)
        return 2
    if kind == "styleheat":
        layout = Path(args.layout) if args.layout else vectors.parent / STYLEHEAT_LAYOUT
        if not layout.is_file():
            print(f"styleheat verify-reference: layout {layout} not found; pass --layout", file=sys.stderr)
            return 2
        target = layout
    else:
        target = Path(args.layout) if args.layout else vectors.parent
    t0 = time.time()
    try:
        comparisons = fn(vectors, target)
    except KeyError as e:
        print(f"styleheat verify-reference: {vectors} lacks the entry {e.args[0]!r}; is it an unmodified "
              f"{kind} reference vector file?", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"styleheat verify-reference: {e}", file=sys.stderr)
        return 2
    for c in comparisons:
        print(c.line())
    failed = [c for c in comparisons if not c.ok]
    print(f"({len(comparisons)} arrays compared in {time.time() - t0:.1f} s)")
    if not comparisons:
        print("parity: FAIL (nothing compared)")
        return 1
    if failed:
        print(f"parity: FAIL {failed[0].name}")
        return 1
    print("parity: PASS")
    return 0


_MISSING = {"audio": "server.parity.verify_audio.verify_audio_vectors",
            "deep3d": "server.parity.verify_deep3d.verify_deep3d_vectors", "unknown": "a verifier for these keys"}


def _dispatch(keys: set[str]) -> tuple[str, Callable | None]:
    if "e4e_wx" in keys and "in_source_image" in keys:
        return "styleheat", verify_styleheat_vectors
    if "coeff_257" in keys or "lm68" in keys:
        try:
            from server.parity.verify_deep3d import verify_deep3d_vectors
        except ImportError:
            return "deep3d", None
        return "deep3d", verify_deep3d_vectors
    if "mel_basis" in keys or "indiv_mels" in keys:
        try:
            from server.parity.verify_audio import verify_audio_vectors
        except ImportError:
            return "audio", None
        return "audio", verify_audio_vectors
    return "unknown", None
