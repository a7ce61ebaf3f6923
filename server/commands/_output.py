"""Check shared by the commands that write one output file (align, audio2exp, extract, convert)."""
from __future__ import annotations

import sys
from pathlib import Path


def output_file_problem(path: str | Path, suffix: str, what: str = "file") -> str | None:
    """Why ``path`` cannot be written as the command's ``--out`` file, or None if it can.

    ``suffix`` (e.g. ``".json"``) is compared case-insensitively; the folder must exist and ``path``
    must not be a folder itself.
    """
    out = Path(path)
    if out.suffix.lower() != suffix.lower():
        return f"--out must be a {suffix} {what}, got {out}"
    if not out.parent.is_dir():
        return f"output folder {out.parent} does not exist; create it first or choose another --out"
    if out.is_dir():
        return f"--out {out} is a folder; give a file name ending in {suffix}"
    return None


def reject_output_file(command: str, path: str | Path, suffix: str, what: str = "file") -> bool:
    """Print ``styleheat <command>: <problem>`` to stderr and return True if ``path`` is not usable."""
    problem = output_file_problem(path, suffix, what)
    if problem is not None:
        print(f"styleheat {command}: {problem}", file=sys.stderr)
    return problem is not None
