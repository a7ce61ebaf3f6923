"""The one way tests start a real ``styleheat-server`` (and the ``styleheat`` CLI) in a subprocess.

Standard library only, so the add-on tests can use it from a venv that has bpy but no torch.

Which interpreter runs the server:

* ``$STYLEHEAT_SERVER_PYTHON`` set: that Python, which must have this repository installed (e.g.
  ``/path/to/checkout/.venv/bin/python`` when the tests run from a separate bpy-only venv); the
  server runs as ``$STYLEHEAT_SERVER_PYTHON -m server.service.app`` and the CLI as ``... -m server.cli``;
* unset: the ``styleheat-server`` / ``styleheat`` scripts of the venv running the tests (next to
  ``sys.executable``; ``pip install -e .`` puts them there). If they are missing the test fails
  saying which variable to set; there is no silent fallback to another interpreter.

``ServerProcess(*args)`` starts the server with ``args`` and :meth:`ServerProcess.wait_ready` waits
for its ``listening on ENDPOINT`` line. ``block_imports=("librosa",)`` runs it with those modules
failing to import as if they were not installed (for tests of optional dependencies): the server
then runs as ``python -c`` with an import hook in front of ``server.service.app.main``.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON_ENV = "STYLEHEAT_SERVER_PYTHON"
START_TIMEOUT = 180.0       # torch import + tiny model on a loaded 2-core machine

_BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _Blocked())
sys.argv[0] = "styleheat-server"
from server.service.app import main
sys.exit(main(sys.argv[1:]))
"""


def server_python() -> str:
    """The interpreter that runs the server: ``$STYLEHEAT_SERVER_PYTHON`` or the tests' own."""
    return os.environ.get(PYTHON_ENV) or sys.executable


def _script(name: str, module: str) -> list[str]:
    if os.environ.get(PYTHON_ENV):
        return [os.environ[PYTHON_ENV], "-m", module]
    exe = Path(sys.executable).with_name(name)
    if not exe.exists():
        raise RuntimeError(f"{exe} not found: install this repository into the venv running the tests "
                           f"(pip install -e .), or set {PYTHON_ENV} to a Python that has it installed")
    return [str(exe)]


def server_command(*args: str, block_imports: tuple[str, ...] = ()) -> list[str]:
    """argv that runs ``styleheat-server *args`` (see the module docstring)."""
    if block_imports:
        return [server_python(), "-c", _BLOCKER.format(blocked=tuple(block_imports)), *args]
    return [*_script("styleheat-server", "server.service.app"), *args]


def cli_command(*args: str) -> list[str]:
    """argv that runs ``styleheat *args``."""
    return [*_script("styleheat", "server.cli"), *args]


def _die_with_parent():
    """Linux: the server gets SIGTERM if pytest dies, so no test server outlives a killed run."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


class ServerProcess:
    """A started ``styleheat-server``; ``stdout``/``stderr`` lines are collected as they come."""

    def __init__(self, *args: str, block_imports: tuple[str, ...] = (), env: dict | None = None):
        self.argv = server_command(*args, block_imports=block_imports)
        # errors="replace": the decoder libraries may log bytes of a broken upload (not UTF-8)
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     errors="replace", cwd=REPO, env=env, preexec_fn=_die_with_parent)
        self.lines: queue.Queue = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._collect, args=(self.proc.stderr,), daemon=True).start()
        self.endpoint: str | None = None

    def _pump(self, stream, q):
        for line in stream:
            self.stdout.append(line)
            q.put(line)
        q.put(None)

    def _collect(self, stream):
        for line in stream:
            self.stderr.append(line)

    def output(self) -> str:
        return "".join(self.stdout) + "".join(self.stderr)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> str:
        """The endpoint from the server's ``listening on`` line; AssertionError with its output otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            if "listening on " in line:
                self.endpoint = line.split("listening on ", 1)[1].split()[0]
                return self.endpoint
        self.stop()
        raise AssertionError(f"styleheat-server did not start ({' '.join(self.argv[:3])} ...); "
                             f"rc={self.proc.poll()} output:\n{self.output()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to clean up (crash tests)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
