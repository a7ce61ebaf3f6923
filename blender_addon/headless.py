"""Render a saved .blend's face animation with no UI (render farms, CI).

Blender binary::

    blender --background scene.blend --python-expr "import styleheat.headless as h; h.main()" -- --server tcp://gpu:5555
    blender --background scene.blend --python /path/to/styleheat/headless.py -- --server tcp://gpu:5555

(as an extension the module is ``bl_ext.user_default.styleheat.headless``). The bpy module::

    python -m styleheat.headless scene.blend --server tcp://127.0.0.1:5555 [--start 1 --end 250] [--curve-dir KEYS]

On a Ray render farm instead of one server (``styleheat farm render`` run with the server's Python;
docs/farm.md "From Blender")::

    blender -b scene.blend --python-expr "import styleheat.headless as h; h.main()" -- --farm HEAD:6379 --server-python /venv/bin/python
    ... -- --farm local        # a local Ray cluster on this machine

or from Python: ``styleheat.headless.render_blend("scene.blend", server=...)``. Exit code 0 when
every rig rendered, 1 on a user/server error (the message says what to do), 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys

if __package__ in (None, ""):  # run as a plain script: import the add-on package by its folder
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(_here))
    __package__ = os.path.basename(_here)
    importlib.import_module(__package__)


def _package():
    return importlib.import_module(__package__)


def ensure_registered() -> None:
    """Register the add-on's types if this Blender session has not (plain bpy, --python)."""
    import bpy

    if not hasattr(bpy.types.Object, "styleheat"):
        pkg = _package()
        pkg.register()
        # what register() added must be gone before the bpy module shuts down: bpy 4.2 crashes
        # (SIGSEGV) and 4.5 hangs at interpreter exit otherwise (add-ons that Blender itself
        # enabled are unregistered by Blender)
        atexit.register(pkg.unregister)


def render_blend(blend_path: str | None = None, *, server: str | None = None, rigs: list[str] | None = None,
                 start: int | None = None, end: int | None = None, force: bool = False,
                 timeout: float | None = None, curve_dir: str | None = None, farm: str | None = None,
                 server_python: str | None = None, tiny_random: bool = False, workers: int | None = None,
                 log=print) -> dict:
    """Open ``blend_path`` (None: the current file), render every face rig (or the named ones) over
    start..end (default the scene/preview range), update their image strips and save the .blend.
    Returns {rig name: number of frames rendered}. ``farm``: a Ray head address or "local": render on the farm
    (``server_python``: the Python with the server installed, default the add-on preference)."""
    import bpy

    if blend_path:
        path = os.path.abspath(blend_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no .blend at {path}")
        bpy.ops.wm.open_mainfile(filepath=path)
    ensure_registered()
    render = importlib.import_module(f"{__package__}.render")
    rig_mod = importlib.import_module(f"{__package__}.rig")
    prefs = importlib.import_module(f"{__package__}.preferences")
    connection = importlib.import_module(f"{__package__}.connection")
    s = prefs.settings()
    if curve_dir:
        connection.set_curve_keys_dir(os.path.abspath(curve_dir))
    address = server or s.address
    timeout = s.timeout if timeout is None else timeout
    scene = bpy.context.scene
    objs = [o for o in scene.objects if rig_mod.is_rig(o) and (not rigs or o.name in rigs)]
    if not objs:
        raise render.UserError(f"no StyleHEAT face rig {'named ' + ', '.join(rigs) if rigs else ''} in scene "
                               f"{scene.name!r}; add one with Add > StyleHEAT Face Rig")
    done = {}
    if farm:
        farm_mod = importlib.import_module(f"{__package__}.farm")
        for obj in objs:
            run = farm_mod.render_on_farm(scene, obj, farm, python=server_python or s.server_python,
                                          command="" if server_python else s.server_command, start=start, end=end,
                                          tiny_random=tiny_random, workers=workers,
                                          on_progress=lambda r: log(f"StyleHEAT {r.status()}"))
            done[obj.name] = len(run.written)
            for w in run.warnings:
                log(f"StyleHEAT: warning: {w}")
            log(f"StyleHEAT: {obj.name}: rendered on the farm {run.done}, imported {len(run.written)}, "
                f"unchanged {run.total - len(run.written)}")
        if bpy.data.filepath:
            bpy.ops.wm.save_mainfile()
        return done
    for obj in objs:
        session = render.render_range(scene, obj, address, timeout, start=start, end=end, force=force,
                                      frame_timeout=s.frame_timeout,
                                      on_frame=lambda sess, fr: log(f"StyleHEAT {sess.status()}"))
        done[obj.name] = len(session.written)
        for w in session.plan.warnings:
            log(f"StyleHEAT: warning: {w}")
        log(f"StyleHEAT: {obj.name}: rendered {len(session.written)}, unchanged "
            f"{len(session.plan.frames) - len(session.plan.todo)}")
    if bpy.data.filepath:
        bpy.ops.wm.save_mainfile()
    connection.close_clients()
    return done


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="styleheat.headless", description=__doc__.split("\n\n")[0])
    p.add_argument("blend", nargs="?", default=None, help=".blend to open (default: the one Blender opened)")
    p.add_argument("--server", default=None, help="server address (default: the add-on preference)")
    p.add_argument("--rig", action="append", default=None, help="render only this rig (repeatable)")
    p.add_argument("--start", type=int, default=None)
    p.add_argument("--end", type=int, default=None)
    p.add_argument("--force", action="store_true", help="re-render frames whose inputs did not change")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait for the server to answer")
    p.add_argument("--curve-dir", default=None,
                   help="CURVE keys for a remote server (server.key, client.key_secret from --make-keys)")
    p.add_argument("--farm", default=None, metavar="ADDRESS",
                   help="render on a Ray cluster with 'styleheat farm render' (ADDRESS: its head, or 'local' for a "
                        "local cluster on this machine) instead of a server")
    p.add_argument("--server-python", default=None,
                   help="with --farm: the Python where the server is installed (default: the add-on preference)")
    p.add_argument("--workers", type=int, default=None, help="with --farm: number of farm workers")
    p.add_argument("--tiny-random", action="store_true", help="with --farm: tiny random weights (tests, demos)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    try:
        args = parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    from .client import ClientError
    render = importlib.import_module(f"{__package__}.render")
    connection = importlib.import_module(f"{__package__}.connection")
    try:
        render_blend(args.blend, server=args.server, rigs=args.rig, start=args.start, end=args.end,
                     force=args.force, timeout=args.timeout, curve_dir=args.curve_dir, farm=args.farm,
                     server_python=args.server_python, tiny_random=args.tiny_random, workers=args.workers)
    except (ClientError, render.UserError, FileNotFoundError) as exc:
        print(f"styleheat: {connection.failure_text(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
