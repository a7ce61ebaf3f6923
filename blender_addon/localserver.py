"""Start and stop a local StyleHEAT server as a subprocess of Blender (bpy-free).

The server is a separate process with its own Python (torch never loads inside Blender). The
user gives either the Python interpreter of an environment where ``styleheat-blender`` is
installed (the add-on runs ``python -m server.service.app``) or a full command (e.g. the
``styleheat-server`` executable).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile

_proc: subprocess.Popen | None = None
_log_path: str | None = None
_argv: list[str] | None = None      # the command of the last server started (for restart)


def build_command(interpreter: str = "", command: str = "", bind: str = "tcp://127.0.0.1:5555",
                  checkpoints: str = "", device: str = "auto", extra: str = "") -> list[str]:
    if command.strip():
        argv = shlex.split(command, posix=os.name != "nt")
    elif interpreter.strip():
        argv = [interpreter.strip(), "-m", "server.service.app"]
    else:
        raise ValueError("Set the server's Python interpreter or its command in the add-on preferences "
                         "(e.g. /path/to/venv/bin/styleheat-server).")
    argv += ["--bind", bind]
    if checkpoints.strip():
        argv += ["--checkpoints", checkpoints.strip()]
    if device.strip() and device.strip() != "auto":
        argv += ["--device", device.strip()]
    if extra.strip():
        argv += shlex.split(extra, posix=os.name != "nt")
    return argv


def start(argv: list[str]) -> subprocess.Popen:
    """Start the server (stdout+stderr into a log file); raises if one is already running."""
    global _proc, _log_path, _argv
    if running():
        raise RuntimeError(f"a local server is already running (pid {_proc.pid}); stop it first")
    fd, _log_path = tempfile.mkstemp(prefix="styleheat_server_", suffix=".log")
    log = os.fdopen(fd, "wb")
    flags = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0) if sys.platform == "win32" else 0
    try:
        _proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 creationflags=flags)
    except OSError as exc:
        log.close()
        raise RuntimeError(f"could not start the server ({' '.join(argv)}): {exc}") from None
    log.close()
    _argv = list(argv)
    return _proc


def last_command() -> list[str] | None:
    """The command of the last server this Blender started (None: none yet)."""
    return list(_argv) if _argv is not None else None


def restart(timeout: float = 5.0) -> subprocess.Popen:
    """Stop the server we started (when it still runs) and start it again with the same command."""
    argv = last_command()
    if argv is None:
        raise RuntimeError("this Blender has not started a local server yet; use Start Local Server")
    stop(timeout)
    return start(argv)


def running() -> bool:
    return _proc is not None and _proc.poll() is None


def pid() -> int | None:
    return _proc.pid if running() else None


def log_tail(n: int = 2000) -> str:
    if not _log_path or not os.path.isfile(_log_path):
        return ""
    with open(_log_path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - n))
        return f.read().decode("utf-8", "replace")


def last_log_line() -> str:
    """The server log's last non-empty line ("" when there is none), at most 300 characters."""
    lines = [ln.strip() for ln in log_tail().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def serves(address: str) -> bool:
    """True when the last server this Blender started was bound to ``address`` (its ``--bind``)."""
    argv = _argv
    if argv is None:
        return False
    for i, a in enumerate(argv):
        if a == "--bind" and i + 1 < len(argv):
            return argv[i + 1] == address
        if a.startswith("--bind="):
            return a.split("=", 1)[1] == address
    return address == "tcp://127.0.0.1:5555"      # the server's default bind


def exit_code() -> int | None:
    return None if _proc is None else _proc.poll()


def stop(timeout: float = 5.0) -> None:
    """Terminate the server we started (only that process), then kill it if it lingers."""
    global _proc
    if _proc is None:
        return
    if _proc.poll() is None:
        _proc.terminate()
        try:
            _proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _proc.kill()
            _proc.wait(timeout=timeout)
    _proc = None
