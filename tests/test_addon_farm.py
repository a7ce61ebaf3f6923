"""Render on Farm from real bpy: headless ``--farm local`` and the operator's plain-function body run the real
farm CLI (``python -m server.cli farm render --tiny-random``) on a real local Ray cluster on 127.0.0.1; the
result must be what a local headless render against a real tiny server gives (same PNG names and pixels, same
sidecar hashes, same strip), so a later local render finds every frame up to date. Every bpy process is
followed by pid (with the farm and cluster it starts); none may be left."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("ray")

from test_addon_helpers import BPY_PY, PY, Server, blender_env, build_staged  # noqa: E402
from test_farm import _alive, follow  # noqa: E402

pytestmark = pytest.mark.blender

SERVER_PY = os.environ.get("STYLEHEAT_SERVER_PYTHON") or PY
REPO = Path(__file__).resolve().parents[1]
START, END = 5, 9           # the render range; keys at 1 and 14: rows 1..14 go to the farm (windows' context)
RUN_TIMEOUT = 150.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    return build_staged(tmp_path_factory.mktemp("pkg"))


@pytest.fixture()
def env(tmp_path, staged):
    e = blender_env(tmp_path / "bpy")
    e["PYTHONPATH"] = os.pathsep.join([str(staged.parent), str(REPO)])   # the add-on; the server for its CLI
    e["RAY_USAGE_STATS_ENABLED"] = "0"
    e.pop("RAY_AUTH_MODE", None)
    ray_tmp = tempfile.mkdtemp(prefix="sh-ray-", dir="/tmp")   # short: Ray's unix socket paths < 108 chars
    e["RAY_TMPDIR"] = ray_tmp
    yield e
    shutil.rmtree(ray_tmp, ignore_errors=True)


def run_followed(argv: list[str], env: dict, timeout: float = RUN_TIMEOUT) -> tuple[int, str, set[int]]:
    """Run a bpy process, recording the pids of all its descendants (farm CLI, Ray cluster); fails if it overruns
    or leaves any of them (killed by pid then)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output, pids = follow(proc, "bpy run", timeout)
    return proc.returncode, output, pids


PRELUDE = """
import json, os, sys, importlib
import numpy as np
import bpy
import styleheat.headless as H
H.ensure_registered()
def sub(name):
    return importlib.import_module("styleheat." + name)
OUT = {}
"""


def bpy_script(tmp: Path, body: str, env: dict) -> tuple[dict, str, set[int]]:
    out = tmp / f"out_{time.monotonic_ns()}.json"
    path = tmp / f"case_{time.monotonic_ns()}.py"
    path.write_text(PRELUDE + textwrap.dedent(body) + f"\njson.dump(OUT, open({str(out)!r}, 'w'))\n")
    rc, output, pids = run_followed([BPY_PY, str(path)], env)
    assert rc == 0 and out.exists(), output[-6000:]
    return json.loads(out.read_text()), output, pids


def make_blends(tmp: Path, fixtures_dir: Path, server, env: dict, names: list[str]) -> list[Path]:
    """One saved .blend per name (each in its own folder): a rig on the fixture portrait, 64 px, keyed rotation at
    frames 1 and 14 around the range 5..9, the attributes the server reports (so both paths sample the same)."""
    blends = [tmp / n / "shot.blend" for n in names]
    for b in blends:
        b.parent.mkdir(parents=True)
    bpy_script(tmp, f"""
        scene = bpy.context.scene
        scene.frame_start, scene.frame_end = {START}, {END}
        bpy.ops.wm.save_as_mainfile(filepath={str(blends[0])!r})
        bpy.ops.styleheat.add_rig(portrait={str(fixtures_dir / 'portrait_100.jpg')!r})
        obj = bpy.context.active_object
        obj.styleheat.align = False
        obj.styleheat.size = 64
        for f, z in ((1, -0.2), (14, 0.3)):
            obj.rotation_euler[2] = z
            obj.keyframe_insert("rotation_euler", frame=f)
        info = sub("connection").connect({server.address!r}, 10.0)
        sub("rig").ensure_attributes(obj.styleheat, info["attributes"])
        sub("connection").close_clients()
        bpy.ops.wm.save_mainfile()
        for b in {[str(b) for b in blends[1:]]!r}:
            bpy.ops.wm.save_as_mainfile(filepath=b, copy=True)
    """, env)
    return blends


def _sidecar(folder: Path) -> dict:
    return json.loads((folder / "styleheat_frames.json").read_text())["frames"]


def _pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: cv2.imread(str(p)) for p in sorted(folder.glob("*.png"))}


STRIPS = ("print('STRIPS', json.dumps([(s.name, s.frame_final_start, len(s.elements), "
          "bpy.path.abspath(s.directory)) for s in sub('compat').all_strips(bpy.context.scene) if s.type == 'IMAGE']))")


def _strips(output: str) -> list:
    line = [ln for ln in output.splitlines() if ln.startswith("STRIPS ")][-1]
    return json.loads(line[7:])


def test_headless_farm_local_matches_a_local_render_and_stays_current(tmp_path, fixtures_dir, server, env):
    local_blend, farm_blend = make_blends(tmp_path, fixtures_dir, server, env, ["local", "farm"])
    # the local headless render against the real tiny server
    rc, output, _ = run_followed([BPY_PY, "-m", "styleheat.headless", str(local_blend), "--server", server.address],
                                 env)
    assert rc == 0 and f"rendered {END - START + 1}" in output, output[-4000:]
    # the same .blend, headless --farm local (the farm CLI with the server's Python, a local Ray cluster)
    code = (f"import bpy, sys, json; bpy.ops.wm.open_mainfile(filepath={str(farm_blend)!r}); "
            f"sys.argv = ['blender', '--', '--farm', 'local', '--tiny-random', '--workers', '1', "
            f"'--server-python', {SERVER_PY!r}]; import styleheat.headless as h; code = h.main(); "
            f"import importlib; sub = lambda n: importlib.import_module('styleheat.' + n); {STRIPS}; sys.exit(code)")
    rc, output, pids = run_followed([BPY_PY, "-c", code], env)
    assert rc == 0, output[-6000:]
    assert "imported 5" in output and "StyleHEAT Farm frame" in output, output[-4000:]
    assert any(p for p in pids), "no farm process ran"
    local_dir = local_blend.parent / "styleheat" / "StyleHEAT_Face"
    farm_dir = farm_blend.parent / "styleheat" / "StyleHEAT_Face"
    want = [f"StyleHEAT_Face_{f:04d}.png" for f in range(START, END + 1)]
    a, b = _pngs(local_dir), _pngs(farm_dir)
    assert sorted(a) == sorted(b) == want
    for name in want:   # same pixels (the farm worker and the server may use other thread counts: 1 level)
        assert np.abs(a[name].astype(int) - b[name].astype(int)).max() <= 1, name
    assert _sidecar(farm_dir) == _sidecar(local_dir)        # the same per-frame hashes and files
    motion = json.loads((farm_blend.parent / "styleheat" / "farm" / "StyleHEAT_Face" / "motion.json").read_text())
    assert motion["first_frame"] == 1 and len(motion["rows"]) == 14    # the windows' context beyond 5..9
    assert [s[:3] for s in _strips(output)] == [["StyleHEAT Face", START, END - START + 1]]
    assert os.path.samefile(_strips(output)[0][3], farm_dir)
    # a later local incremental render of the farm's .blend finds every frame up to date
    rc, output, _ = run_followed([BPY_PY, "-m", "styleheat.headless", str(farm_blend), "--server", server.address],
                                 env)
    assert rc == 0 and f"rendered 0, unchanged {END - START + 1}" in output, output[-4000:]


def test_render_on_farm_operator_body_reports_progress_and_cancel_keeps_complete_frames(tmp_path, fixtures_dir,
                                                                                        server, env):
    (blend,) = make_blends(tmp_path, fixtures_dir, server, env, ["op"])
    out, output, pids = bpy_script(tmp_path, f"""
        bpy.ops.wm.open_mainfile(filepath={str(blend)!r})
        farm = sub("farm"); connection = sub("connection"); prefs = sub("preferences")
        scene = bpy.context.scene
        scene.frame_end = 40          # 36 frames in chunks of 2: the cancel comes while work is left
        obj = scene.objects["StyleHEAT Face"]
        s = prefs.settings()
        s.server_python = {SERVER_PY!r}
        OUT["farm_address"] = s.farm_address
        OUT["registered"] = hasattr(bpy.types, "STYLEHEAT_OT_render_farm")
        run = farm.operator_start(bpy.context, obj, s, tiny_random=True, workers=1, chunk=2)
        texts = [connection.progress["text"]]
        import time
        t0 = time.monotonic()
        while farm.operator_step(bpy.context, run, 0.2):
            if connection.progress["text"] != texts[-1]:
                texts.append(connection.progress["text"])
            if run.done >= 4:                 # Esc after some chunks: the subprocess group is stopped
                run.cancel()
                break
            assert time.monotonic() - t0 < 120, "farm too slow"
        OUT["error"] = farm.operator_finish(bpy.context, run)
        OUT["texts"] = texts + [connection.progress["text"]]
        OUT["cancelled"] = run.cancelled
        OUT["written"] = run.written
        OUT["farm_pid"] = run.proc.pid
        OUT["dir"] = sub("render").output_dir(obj)
        OUT["sidecar"] = sorted(int(k) for k in sub("frames").load_sidecar(OUT["dir"]))
        OUT["strip"] = [(x.name, x.frame_final_start, len(x.elements)) for x in sub("compat").all_strips(scene)
                        if x.type == "IMAGE"]
    """, env)
    assert out["farm_address"] == "local" and out["registered"]
    assert out["error"] is None and out["cancelled"] is True
    assert out["texts"][0] == "Farm frame 0/36"
    counts = [int(t.split()[2].split("/")[0]) for t in out["texts"] if t.startswith("Farm frame")]
    assert counts == sorted(counts) and counts[-1] >= 4
    assert out["texts"][-1].startswith("Farm cancelled")
    written = out["written"]
    assert 4 <= len(written) < 36 and written == list(range(START, START + len(written)))
    assert out["sidecar"] == written
    files = sorted(p.name for p in Path(out["dir"]).glob("*.png"))
    assert files == [f"StyleHEAT_Face_{f:04d}.png" for f in written]
    for name in files:    # complete PNGs only
        img = cv2.imread(str(Path(out["dir"]) / name))
        assert img is not None and img.shape == (64, 64, 3), name
    assert out["strip"] == [["StyleHEAT Face", START, len(written)]]
    assert out["farm_pid"] in pids and not _alive(out["farm_pid"])
