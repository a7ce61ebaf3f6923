"""Where StyleHEAT keeps its downloaded checkpoints.

The checkpoint directory holds the official release assets under the same relative names the
official ``checkpoints/`` folder uses (``StyleHEAT_visual.pt``, ``hfgi.pth``,
``Deep3D/epoch_20.pth``, ``BFM/...``; see :mod:`server.checkpoints.assets`), plus ``manifest.json``
written by ``styleheat download``.

Choosing the directory, first match wins:

1. an explicit ``--dir DIR`` on the command line (``styleheat download``, ``styleheat doctor``);
2. the environment variable ``STYLEHEAT_CHECKPOINTS`` (``~`` is expanded);
3. the platform's per-user cache directory, subfolder ``styleheat/checkpoints``:

   * Linux and other Unix: ``$XDG_CACHE_HOME/styleheat/checkpoints`` when ``XDG_CACHE_HOME``
     is set to an absolute path, else ``~/.cache/styleheat/checkpoints``
     (XDG Base Directory specification: relative values are ignored);
   * macOS: ``~/Library/Caches/styleheat/checkpoints``;
   * Windows: ``%LOCALAPPDATA%\\styleheat\\checkpoints``, falling back to
     ``~\\AppData\\Local\\styleheat\\checkpoints`` when ``LOCALAPPDATA`` is unset.

The weights are about 3 GB; point ``STYLEHEAT_CHECKPOINTS`` at a larger disk if the cache
location is small.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath

ENV_VAR = "STYLEHEAT_CHECKPOINTS"
APP_DIR = "styleheat"
SUBDIR = "checkpoints"


def platform_cache_dir(platform: str | None = None, environ: Mapping[str, str] | None = None,
                       home: str | os.PathLike | None = None):
    """The per-user cache directory of ``platform`` (a ``sys.platform`` value).

    Returns a ``Path`` for the running platform, a pure path (``PureWindowsPath`` /
    ``PurePosixPath``) when asked about another one.
    """
    platform = sys.platform if platform is None else platform
    environ = os.environ if environ is None else environ
    native = platform == sys.platform
    is_windows = platform.startswith("win")  # "win32"; cygwin/msys count as Unix
    kind = Path if native else (PureWindowsPath if is_windows else PurePosixPath)
    home_path = kind(home) if home is not None else kind(Path.home()) if native else None

    def need_home():
        if home_path is None:
            raise ValueError(f"home directory needed to locate the cache on {platform!r}")
        return home_path

    if is_windows:
        local = environ.get("LOCALAPPDATA", "")
        return kind(local) if local else need_home() / "AppData" / "Local"
    if platform == "darwin":
        return need_home() / "Library" / "Caches"
    xdg = environ.get("XDG_CACHE_HOME", "")
    if xdg and kind(xdg).is_absolute():
        return kind(xdg)
    return need_home() / ".cache"


def default_checkpoint_dir(platform: str | None = None, environ: Mapping[str, str] | None = None,
                           home: str | os.PathLike | None = None):
    """The checkpoint directory used when no ``--dir`` is given (see the module docstring)."""
    environ = os.environ if environ is None else environ
    override = environ.get(ENV_VAR, "").strip()
    if override:
        return Path(os.path.expanduser(override))
    return platform_cache_dir(platform, environ, home) / APP_DIR / SUBDIR


def resolve_checkpoint_dir(explicit: str | os.PathLike | None = None, option: str = "--dir") -> tuple[Path, str]:
    """``(directory, where it came from)`` for the commands: ``explicit`` (the command's ``option``,
    named as the origin) > env var > default."""
    if explicit:
        return Path(os.path.expanduser(os.fspath(explicit))), option
    if os.environ.get(ENV_VAR, "").strip():
        return default_checkpoint_dir(), f"${ENV_VAR}"
    return default_checkpoint_dir(), "platform cache default"
