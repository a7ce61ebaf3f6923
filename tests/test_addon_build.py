"""build_addon.py: the zip layout, the vendored protocol, the validator, the bundled wheels."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from test_addon_helpers import PY, REPO, build_zip

import build_addon


@pytest.fixture(scope="module")
def nowheels_zip(tmp_path_factory) -> Path:
    return build_zip(tmp_path_factory.mktemp("dist"))


def test_zip_layout_and_vendored_protocol(nowheels_zip):
    with zipfile.ZipFile(nowheels_zip) as z:
        names = set(z.namelist())
        assert all(n.startswith("styleheat/") for n in names), names
        for required in ("__init__.py", "blender_manifest.toml", "client.py", "protocol.py", "compat.py", "rig.py",
                         "render.py", "audio.py", "headless.py", "frames.py", "deps.py"):
            assert f"styleheat/{required}" in names
        assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
        # the protocol is a verbatim copy of the server's module, not a hand-maintained one
        assert z.read("styleheat/protocol.py") == (REPO / "server" / "protocol.py").read_bytes()
        manifest = z.read("styleheat/blender_manifest.toml").decode()
    assert 'id = "styleheat"' in manifest
    assert "wheels" not in manifest.split("[permissions]")[0].replace("fills in `wheels`", "")
    # no hand copy of the protocol lives in the source folder
    assert not (REPO / "blender_addon" / "protocol.py").exists()


def test_validator_accepts_and_rejects(tmp_path, nowheels_zip):
    # accepted (build() already validated; run it again through the CLI to be sure)
    assert "error" not in build_addon.validate(nowheels_zip).lower()
    # a broken manifest is rejected with the validator's reason
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(nowheels_zip) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("blender_manifest.toml"):
                data = data.replace(b'blender_version_min = "4.2.0"', b'blender_version_min = "four"')
            dst.writestr(item, data)
    with pytest.raises(build_addon.BuildError, match="blender_version_min"):
        build_addon.validate(bad)


def test_versions_agree():
    init = (REPO / "blender_addon" / "__init__.py").read_text()
    tree = ast.parse(init)
    bl_info = next(ast.literal_eval(n.value) for n in tree.body
                   if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "bl_info")
    assert ".".join(map(str, bl_info["version"])) == build_addon.manifest_version()
    assert bl_info["blender"] == (4, 2, 0)


def test_no_heavy_ml_in_the_addon(tmp_path):
    src = REPO / "blender_addon"
    pat = re.compile(r"^\s*(import|from)\s+(torch|cv2|librosa|scipy|server|models)\b", re.M)
    offenders = [p.name for p in src.rglob("*.py") if pat.search(p.read_text())]
    assert offenders == []
    # and the build refuses a module that imports torch
    fake = tmp_path / "styleheat"
    fake.mkdir()
    (fake / "x.py").write_text("import torch\n")
    with pytest.raises(build_addon.BuildError, match="torch"):
        build_addon.check_no_heavy_imports(fake)


def test_bpy_free_modules_import_without_bpy(tmp_path):
    """The bpy-free core (build_addon.BPY_FREE: client, connection, frames, localserver, deps, errors,
    protocol) imports in a plain Python that has no bpy, and the build's static check passes on it."""
    import test_addon_helpers as H

    assert {"client", "connection", "frames", "localserver", "deps", "errors", "protocol"} <= set(build_addon.BPY_FREE)
    pkg = H.build_staged(tmp_path)
    build_addon.check_bpy_free(pkg)
    mods = ", ".join(f"styleheat.{m}" for m in build_addon.BPY_FREE)
    code = (f"import sys; sys.modules['bpy'] = None; sys.modules['torch'] = None\nimport {mods}\n"
            "import styleheat.connection as c; assert c.status['state'] == 'unknown'\nprint('ok')")
    r = subprocess.run([PY, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_build_refuses_bpy_in_the_bpy_free_core(tmp_path):
    """The static check sees a function-level ``import bpy`` and an import of a bpy sibling (render)."""
    for i, body in enumerate(("def f():\n    import bpy\n", "from . import render as R\n",
                              "from .rig import create_rig\n", "from bpy.props import IntProperty\n")):
        pkg = tmp_path / f"p{i}"
        pkg.mkdir()
        for m in build_addon.BPY_FREE:
            (pkg / f"{m}.py").write_text("")
        (pkg / "connection.py").write_text(body)
        with pytest.raises(build_addon.BuildError, match="connection.py"):
            build_addon.check_bpy_free(pkg)


def test_wheel_selection_for_legacy_zip():
    from importlib import util
    spec = util.spec_from_file_location("deps_under_test", REPO / "blender_addon" / "deps.py")
    deps = util.module_from_spec(spec)
    spec.loader.exec_module(deps)
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert deps.compatible(f"msgpack-1.2.4-{here}-{here}-manylinux2014_x86_64.manylinux_2_17_x86_64.whl") \
        == (sys.platform.startswith("linux") and deps.platform.machine() == "x86_64")
    assert not deps.compatible("msgpack-1.2.4-cp310-cp310-manylinux2014_x86_64.whl")
    assert not deps.compatible(f"pyzmq-27.3.0-{here}-{here}-win_amd64.whl") or sys.platform == "win32"
    # the stable ABI runs on its own CPython and newer ones, never on older ones
    if sys.version_info[:2] < (3, 12):   # a legacy install on Python 3.11 must not unpack pyzmq's cp312-abi3 wheel
        assert not deps.compatible("pyzmq-27.3.0-cp312-abi3-manylinux_2_28_x86_64.whl")
    assert deps.python_fits("cp312", "abi3", (3, 13)) and deps.python_fits("cp312", "abi3", (3, 12))
    assert not deps.python_fits("cp312", "abi3", (3, 11))
    assert deps.python_fits("cp311", "cp311", (3, 11)) and not deps.python_fits("cp311", "cp311", (3, 13))
    assert deps.python_fits("py3", "none", (3, 13))


@pytest.mark.slow
def test_full_build_bundles_wheels_for_every_platform(tmp_path):
    """pip download from the registry (needs it reachable): wheels for each platform and each Blender
    Python (3.11: 4.2 .. 5.0, 3.13: 5.1+), all listed in the manifest; the validator accepts the result.
    What Blender does with them is tests/test_addon_matrix.py's installed-zip test."""
    import test_addon_helpers as H

    out = H.build_full_zip(tmp_path / "dist")
    with zipfile.ZipFile(out) as z:
        wheels = [n.split("/")[-1] for n in z.namelist() if n.endswith(".whl")]
        manifest = z.read("styleheat/blender_manifest.toml").decode()
    for pkg in ("pyzmq", "msgpack"):
        for tag in ("manylinux", "win_amd64", "macosx"):
            assert any(w.startswith(pkg) and tag in w and "-cp311-" in w for w in wheels), (pkg, tag, wheels)
            # Python 3.13 (Blender 5.1+): a cp313 wheel or the stable ABI of an older CPython
            assert any(w.startswith(pkg) and tag in w and ("-cp313-" in w or "-abi3-" in w) for w in wheels), \
                (pkg, tag, wheels)
    for w in wheels:
        assert f'"./wheels/{w}"' in manifest
    for plat in build_addon.REQUIRED_PLATFORMS:
        assert f'"{plat}"' in manifest
    # every bundled wheel is a pinned one, byte for byte
    assert set(wheels) <= set(build_addon.WHEEL_SHA256)
    with zipfile.ZipFile(out) as z:
        for n in z.namelist():
            if n.endswith(".whl"):
                p = tmp_path / n.split("/")[-1]
                p.write_bytes(z.read(n))
                build_addon.check_wheel(p)


def test_a_changed_or_unpinned_wheel_is_refused(tmp_path):
    """A wheel in --wheel-cache whose bytes differ from the pinned sha256 (a tampered or corrupted download) stops
    the build with a message naming the file; so does a wheel the table does not list. No network is used: the
    cache answers first, and the check runs before anything is copied into the add-on."""
    versions = build_addon.pinned_versions()
    cache = tmp_path / "cache"
    cache.mkdir()
    names = {"pyzmq": f"pyzmq-{versions['pyzmq']}-cp311-cp311-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl",
             "msgpack": f"msgpack-{versions['msgpack']}-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64."
                        f"manylinux_2_28_x86_64.whl"}
    for name in names.values():
        assert name in build_addon.WHEEL_SHA256
        (cache / name).write_bytes(b"PK\x03\x04 not the published wheel")
    with pytest.raises(build_addon.BuildError, match="not the pinned") as e:
        build_addon.download_wheels(tmp_path / "w", cache=cache)
    assert any(n in str(e.value) for n in names.values())
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())
    odd = tmp_path / "msgpack-9.9.9-cp311-cp311-win_amd64.whl"
    odd.write_bytes(b"x")
    with pytest.raises(build_addon.BuildError, match="not a pinned wheel"):
        build_addon.check_wheel(odd)


def test_unreachable_registry_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(build_addon.BuildError, match="registry"):
        build_addon.download_wheels(tmp_path / "w", cache=None)
