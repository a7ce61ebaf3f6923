"""`styleheat download`: fetch the official StyleHEAT release weights into the checkpoint dir."""
from __future__ import annotations

import argparse
import sys

NAME = "download"
HELP = "download the official StyleHEAT weights (about 3 GB) into the checkpoint directory"
DESCRIPTION = (
    "Download the official StyleHEAT release assets (the same files and URLs as the official "
    "bash/download.sh) into the checkpoint directory. Interrupted downloads resume where they "
    "stopped when you run the command again. Files already present are skipped unless --force. "
    "Directory: --dir, else $STYLEHEAT_CHECKPOINTS, else the per-user cache "
    "(~/.cache/styleheat/checkpoints on Linux, ~/Library/Caches/styleheat/checkpoints on macOS, "
    "%LOCALAPPDATA%\\styleheat\\checkpoints on Windows)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from server.checkpoints.assets import OFFICIAL_ASSETS

    names = ", ".join(a.name for a in OFFICIAL_ASSETS)
    parser.add_argument("--dir", metavar="DIR", default=None,
                        help="checkpoint directory (default: $STYLEHEAT_CHECKPOINTS or the user cache)")
    parser.add_argument("--only", metavar="NAME", nargs="+", default=None,
                        help=f"fetch only these assets ({names}; file names work too)")
    parser.add_argument("--force", action="store_true",
                        help="download again even if the files are present (replaces them)")
    parser.add_argument("--mirror", metavar="URL", default=None,
                        help="fetch every file as URL/<release file name> instead of the official release")
    parser.add_argument("--retries", type=int, default=3, metavar="N",
                        help="extra attempts (each resuming) after a network failure (default 3)")
    parser.add_argument("--list", action="store_true", help="list the assets and their URLs, then exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from server.checkpoints import assets as assets_mod
    from server.checkpoints.download import download_all
    from server.checkpoints.paths import resolve_checkpoint_dir

    root, origin = resolve_checkpoint_dir(args.dir)
    try:
        registry = assets_mod.registry(args.mirror)
    except ValueError as err:
        print(f"styleheat download: --mirror: {err}", file=sys.stderr)
        return 2
    try:
        chosen = assets_mod.select(registry, args.only)
    except KeyError as err:
        print(f"styleheat download: {err.args[0]}", file=sys.stderr)
        return 2
    if args.retries < 0:
        print("styleheat download: --retries must be 0 or more", file=sys.stderr)
        return 2

    if args.list:
        for a in chosen:
            print(f"{a.name:13s} {', '.join(a.paths):50s} {a.url}")
        return 0

    print(f"Checkpoint directory: {root} ({origin})")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"styleheat download: cannot create {root} ({err.strerror or err}); choose another --dir",
              file=sys.stderr)
        return 1

    def report(res) -> None:
        if res.status == "skipped":
            print(f"  present     {res.asset:13s} {', '.join(res.files)} (use --force to fetch again)")
        elif res.status == "downloaded":
            print(f"  downloaded  {res.asset:13s} {', '.join(res.files)}")
        else:
            print(f"  FAILED      {res.message}", file=sys.stderr)

    results = download_all(chosen, root, force=args.force, retries=args.retries,
                           progress=(not args.no_progress) and sys.stderr.isatty(),
                           report=report)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        names = " ".join(r.asset for r in failed)
        print(f"{len(failed)} of {len(results)} assets failed. What to do next: run "
              f"`styleheat download --dir {root} --only {names}` again (partial downloads resume).",
              file=sys.stderr)
        return 1
    print(f"All {len(results)} assets are in place. What to do next: run "
          f"`styleheat doctor --dir {root}` to check them.")
    return 0
