"""Check shared by the commands that write output files (align, audio2exp, extract, convert)."""
from __future__ import annotations

import sys
from pathlib import Path


def output_file_problem(path: str | Path, suffix: str | None, what: str = "file",
                        option: str = "--out") -> str | None:
    """Why ``path`` cannot be written as the file of ``option``, or None if it can.

    ``suffix`` (e.g. ``".json"``; None = any) is compared case-insensitively; the folder must exist
    and ``path`` must not be a folder itself.
    """
    out = Path(path)
    if suffix is not None and out.suffix.lower() != suffix.lower():
        return f"{option} must be a {suffix} {what}, got {out}"
    if not out.parent.is_dir():
        return f"output folder {out.parent} does not exist; create it first or choose another {option}"
    if out.is_dir():
        return f"{option} {out} is a folder; give a file name" + (f" ending in {suffix}" if suffix else "")
    return None


def reject_output_file(command: str, path: str | Path, suffix: str | None, what: str = "file",
                       option: str = "--out") -> bool:
    """Print ``styleheat <command>: <problem>`` to stderr and return True if ``path`` is not usable."""
    problem = output_file_problem(path, suffix, what, option)
    if problem is not None:
        print(f"styleheat {command}: {problem}", file=sys.stderr)
    return problem is not None
