"""Shared helpers of the add-on tests (no tests here): building the add-on, a real tiny-random
server on 127.0.0.1, and running bpy code in an isolated subprocess.

bpy runs in a fresh subprocess per scenario: its global state (registered classes, the open
file, preferences) cannot leak between tests or into other test modules, and Blender's user
state, temp files and caches go into the test's tmp dir (BLENDER_USER_RESOURCES, TMPDIR,
XDG_CACHE_HOME).
"""
from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from server_launch import ServerProcess

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable  # runs the server and plain-Python checks (this venv: torch)
# runs every bpy subprocess; scripts/blender_matrix.py points it at a bpy-only venv of another Blender
BPY_PY = os.environ.get("STYLEHEAT_BPY_PYTHON") or sys.executable
sys.path.insert(0, str(REPO))


def build_staged(dest: Path) -> Path:
    """The add-on folder as the zip holds it (sources + vendored protocol), no wheels."""
    import build_addon

    return build_addon.stage(dest, wheels=False)


def build_zip(dest: Path) -> Path:
    import build_addon

    return build_addon.build(dest, wheels=False, run_validator=True)


def build_full_zip(dest: Path) -> Path:
    """The zip users install: with the pyzmq/msgpack wheels of every platform and Blender Python
    (downloads kept in .tmp/wheel-cache); skips the test when the package registry is unreachable."""
    import build_addon

    try:
        return build_addon.build(dest, wheels=True, wheel_cache=REPO / ".tmp" / "wheel-cache")
    except build_addon.BuildError as exc:
        if "reachable" in str(exc):
            pytest.skip(f"package registry unreachable: {exc}")
        raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(ServerProcess):
    """A ``--tiny-random`` server on a free loopback port (``address``; its temporary files in ``tmp``),
    started by the one launcher (:mod:`server_launch`: ``$STYLEHEAT_SERVER_PYTHON`` picks the
    interpreter when this venv has no torch)."""

    def __init__(self, tmp: Path, extra: tuple[str, ...] = (), port: int | None = None):
        self.port = port or free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        env = dict(os.environ, TMPDIR=str(tmp))
        super().__init__("--tiny-random", "--bind", self.address, *extra, env=env)
        try:
            self.wait_ready(120.0)
        except AssertionError as exc:
            pytest.fail(str(exc))


def blender_env(tmp: Path) -> dict:
    env = dict(os.environ)
    for key, sub in (("BLENDER_USER_RESOURCES", "blender-user"), ("TMPDIR", "tmp"), ("XDG_CACHE_HOME", "cache"),
                     ("MESA_SHADER_CACHE_DIR", "mesa")):
        p = tmp / sub
        p.mkdir(parents=True, exist_ok=True)
        env[key] = str(p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@functools.lru_cache(maxsize=None)
def bpy_build(python: str = BPY_PY) -> dict:
    """Version, Python and audio support of the bpy that ``python`` runs (default: BPY_PY)."""
    import tempfile

    code = ("import bpy, json, sys; print('BUILD', json.dumps({'version': bpy.app.version_string, "
            "'python': sys.version.split()[0], 'audio': bool(bpy.app.build_options.audaspace)}))")
    with tempfile.TemporaryDirectory(prefix="styleheat_probe_") as tmp:
        r = subprocess.run([python, "-c", code], env=blender_env(Path(tmp)), capture_output=True, text=True,
                           timeout=300)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("BUILD ")), None)
    if r.returncode != 0 or line is None:
        raise AssertionError(f"{python} cannot import bpy (rc {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(line[6:])


def require_audio() -> None:
    """Skip a test that needs sound strips on a bpy built without Audaspace (the bpy 4.2 module)."""
    build = bpy_build()
    if not build["audio"]:
        pytest.skip(f"bpy {build['version']} is built without Audaspace: no sound strips, no mixdown")


PRELUDE = """
import json, os, sys, importlib
import numpy as np
import bpy, addon_utils
OUT = {}
ZIP = %(zip)r
ADDRESS = %(address)r
def install_extension():
    r = bpy.ops.extensions.package_install_files(filepath=ZIP, repo="user_default", enable_on_install=True)
    assert r == {"FINISHED"}, r
    return "bl_ext.user_default.styleheat"
MOD = install_extension() if ZIP else None
def sub(name):
    return importlib.import_module(MOD + "." + name)
if MOD:
    prefs = bpy.context.preferences.addons[MOD].preferences
    if ADDRESS:
        prefs.server_address = ADDRESS
    prefs.timeout = 10.0
"""

EPILOGUE = """
with open(%(out)r, "w") as _f:
    json.dump(OUT, _f)
"""


def run_bpy(tmp: Path, body: str, zip_path: Path | None, address: str = "", timeout: float = 600) -> dict:
    """Run ``body`` (after a prelude that installs the extension) in a fresh bpy process; returns OUT."""
    out = tmp / f"out_{time.monotonic_ns()}.json"
    script = (PRELUDE % {"zip": str(zip_path) if zip_path else "", "address": address}
              + textwrap.dedent(body) + EPILOGUE % {"out": str(out)})
    path = tmp / f"case_{time.monotonic_ns()}.py"
    path.write_text(script)
    r = subprocess.run([BPY_PY, str(path)], env=blender_env(tmp), cwd=tmp, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0 or not out.exists():
        raise AssertionError(f"bpy subprocess failed (rc {r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    return json.loads(out.read_text())
