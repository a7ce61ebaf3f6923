#!/usr/bin/env python3
"""Build the installable StyleHEAT add-on zip: ``python build_addon.py`` -> dist/styleheat-<version>.zip

The zip holds one folder ``styleheat/`` with the add-on sources from ``blender_addon/``, a copy of
``server/protocol.py`` as ``styleheat/protocol.py`` (the single source of the wire protocol: never
edit the copy), ``blender_manifest.toml`` with the bundled wheels listed, and ``wheels/`` with
pyzmq and msgpack for Blender's Pythons (3.11: Blender 4.2 .. 5.0; 3.13: 5.1+) on Linux, Windows and
macOS, downloaded unmodified
from PyPI with ``pip download --only-binary=:all:`` as Blender's extension docs prescribe. The same
zip installs as a Blender 4.2+ extension and as a legacy add-on (``bl_info``; the add-on unpacks
the matching wheel itself). The result is checked with the extension validator that ships inside
bpy (``bl_pkg/cli/blender_ext.py validate``).

Options: ``--no-wheels`` (tests; Blender's own Python must then provide pyzmq/msgpack),
``--wheel-cache DIR`` (reuse downloads), ``--output-dir DIR``, ``--no-validate``.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
from blender_addon import deps as addon_deps  # noqa: E402  (bpy-free: wheel tags)
SOURCE = REPO / "blender_addon"
PROTOCOL = REPO / "server" / "protocol.py"
PACKAGE = "styleheat"
PYTHON_VERSIONS = ("3.11", "3.13")  # Blender 4.2 .. 5.0, Blender 5.1+
# (blender platform, pip --platform tags tried in order)
PLATFORMS = (
    ("linux-x64", ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")),
    ("linux-arm64", ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")),
    ("windows-x64", ("win_amd64",)),
    ("windows-arm64", ("win_arm64",)),
    ("macos-x64", ("macosx_10_15_x86_64", "macosx_10_9_x86_64", "macosx_10_15_universal2")),
    ("macos-arm64", ("macosx_11_0_arm64", "macosx_10_15_universal2")),
)
REQUIRED_PLATFORMS = ("linux-x64", "windows-x64", "macos-x64", "macos-arm64")
EXCLUDE_DIRS = {"__pycache__", "wheels", "_vendor"}
FORBIDDEN_IMPORTS = ("torch", "cv2", "librosa", "scipy")
# the add-on's bpy-free core: importable (and tested) without Blender; they import no bpy, directly
# or through a sibling, at module level or inside a function
BPY_FREE = ("client", "connection", "deps", "errors", "frames", "localserver", "protocol")
BLENDER_MODULES = ("bpy", "bpy_extras", "mathutils", "aud", "addon_utils")


class BuildError(Exception):
    pass


def bpy_validator() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("the bpy module is not installed in this Python, so the extension validator "
                         "(bl_pkg/cli/blender_ext.py) cannot run; install bpy==5.0.1 or pass --no-validate")
    root = Path(list(spec.submodule_search_locations)[0])
    hits = sorted(root.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    if not hits:
        raise BuildError(f"no blender_ext.py under {root}; pass --no-validate")
    return hits[-1]


#: sha256 of every wheel the zip may bundle: the digests PyPI publishes for pyzmq 27.3.0 and msgpack 1.2.4 (checked
#: against its simple index when pinned). A wheel that is not listed, or whose bytes differ, is refused: a
#: changed version pin in pyproject.toml needs this table regenerated (sha256sum of the downloaded wheels,
#: compared with the registry's published hashes).
WHEEL_SHA256 = {
    "msgpack-1.2.4-cp311-cp311-macosx_10_9_x86_64.whl":
        "1095b1ebcc8c9d3e70c51240b7160d8e9da66044e0a45c3ef8403d3a9ef0c5ad",
    "msgpack-1.2.4-cp311-cp311-macosx_11_0_arm64.whl":
        "a4b47ec7422bef149223786a87df80067ac65bfc7c0565e5cf1dfbdc40acee50",
    "msgpack-1.2.4-cp311-cp311-manylinux2014_aarch64.manylinux_2_17_aarch64.manylinux_2_28_aarch64.whl":
        "0c75cfda0d3ccb1f6abc20e0608ad6b226e11f317b5ac297721504d2509e2bd9",
    "msgpack-1.2.4-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl":
        "a45ceb5f199d5e388f28b550ba881096a3740d4bda10e661d77f59d9a2e8187a",
    "msgpack-1.2.4-cp311-cp311-win_amd64.whl":
        "9db832747bd05834530189e564a3fe31e2617547dc1f3a005f835eafc2b8e048",
    "msgpack-1.2.4-cp311-cp311-win_arm64.whl":
        "deb1730c4c0c1a8c975be2f43efea6ee4834d35031a39075f78917d0ba8b3c04",
    "msgpack-1.2.4-cp313-cp313-macosx_10_13_x86_64.whl":
        "fb811ac3d463a75013b234d2aae56b9f0bdb0105caf4dd2ee65305b6a8a6078d",
    "msgpack-1.2.4-cp313-cp313-macosx_11_0_arm64.whl":
        "36258fd0909e1bf26e94604439108846432abe4ffa9a23c9dc2f6f1c60f94b60",
    "msgpack-1.2.4-cp313-cp313-manylinux2014_aarch64.manylinux_2_17_aarch64.manylinux_2_28_aarch64.whl":
        "e9c5ba0f053a7e98f013f083c9d1b2dffb26cad8c897c533d8286e44ed24c669",
    "msgpack-1.2.4-cp313-cp313-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl":
        "7fabd415c41e62006c6641fcdf5b3e866f581c4e11c58328c0d0f69584b9577d",
    "msgpack-1.2.4-cp313-cp313-win_amd64.whl":
        "318d4e634d2b320be10decd9968ad1ae0be1d80cba23b5528c37b429eeb0e3e0",
    "msgpack-1.2.4-cp313-cp313-win_arm64.whl":
        "bec3e34749b90cfcf116149aad11295c720ff4a74a7d0a35abdb968a396c1524",
    "pyzmq-27.3.0-cp311-cp311-macosx_10_15_universal2.whl":
        "86fb4408797aabb54a31e147176ae0f2474d99f1715a36a4564089eca9ef9ce8",
    "pyzmq-27.3.0-cp311-cp311-manylinux_2_26_aarch64.manylinux_2_28_aarch64.whl":
        "f3d14fc8a7b85156c67e3f6ebbe8f2af2f89da2a407997a66e2a578e1bdabf6a",
    "pyzmq-27.3.0-cp311-cp311-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl":
        "477b8ad30d66fc905c5388351e83b9ac25824b00e82c0d052b72ea6392636dfd",
    "pyzmq-27.3.0-cp311-cp311-win_amd64.whl":
        "df98c790f86b6aa2378b4bb94dec7b85b0adb195b880b41e429a4990aed2a8c9",
    "pyzmq-27.3.0-cp311-cp311-win_arm64.whl":
        "652d68fb398e714540d8a577cef81c548c61394c721bc1b996b5a4028e89f73d",
    "pyzmq-27.3.0-cp312-abi3-macosx_10_15_universal2.whl":
        "15155fd8f308d3bd47f67a8f6cc809f9db90abbf63c514c384a17622e2cf080f",
    "pyzmq-27.3.0-cp312-abi3-manylinux_2_26_aarch64.manylinux_2_28_aarch64.whl":
        "ad8b828407caee77ff3ab0bdb2984ee8d48922328b226e8fda7c84a71a55dbb4",
    "pyzmq-27.3.0-cp312-abi3-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl":
        "858fe25231e0fd8612da142efde019faa5ef63fa150a821a27870e791b38c798",
    "pyzmq-27.3.0-cp312-abi3-win_amd64.whl":
        "3ea8e8fa5c097e68fef91d70b150fda96f307758103868018fc4deeb9c214122",
    "pyzmq-27.3.0-cp312-abi3-win_arm64.whl":
        "2187a5ca80691a5edb30690f02d9fb714e2c32d3dfdeb652e159ff5da2dd4283",
}


def check_wheel(path: Path) -> None:
    """BuildError unless ``path`` is a pinned wheel with its pinned sha256 (downloaded or from --wheel-cache)."""
    import hashlib

    want = WHEEL_SHA256.get(path.name)
    if want is None:
        raise BuildError(f"{path.name} is not a pinned wheel (build_addon.WHEEL_SHA256 lists the wheels the add-on "
                         f"may bundle); if pyproject.toml's pyzmq/msgpack pins changed, regenerate that table")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != want:
        raise BuildError(f"{path} has sha256 {h.hexdigest()[:16]}..., not the pinned {want[:16]}... of "
                         f"{path.name}: the file was changed or corrupted; delete it (and the --wheel-cache copy) "
                         f"and build again")


def pinned_versions() -> dict[str, str]:
    """pyzmq and msgpack versions pinned in pyproject.toml (the tested combination)."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    out = {}
    for name in ("pyzmq", "msgpack"):
        m = re.search(rf'"{name}==([^"]+)"', text)
        if not m:
            raise BuildError(f"pyproject.toml does not pin {name}; the add-on bundles the pinned version")
        out[name] = m.group(1)
    return out


def manifest_version() -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (SOURCE / "blender_manifest.toml").read_text(encoding="utf-8"), re.M)
    if not m:
        raise BuildError("blender_addon/blender_manifest.toml has no version")
    return m.group(1)


def check_versions_agree() -> None:
    init = (SOURCE / "__init__.py").read_text(encoding="utf-8")
    m = re.search(r'"version":\s*\((\d+),\s*(\d+),\s*(\d+)\)', init)
    if not m or ".".join(m.groups()) != manifest_version():
        raise BuildError("bl_info['version'] in blender_addon/__init__.py and version in blender_manifest.toml "
                         "differ; make them equal")


def download_wheels(dest: Path, cache: Path | None) -> dict[str, list[str]]:
    """pip download the pinned wheels for every platform and every Blender Python; returns
    {blender platform: [wheel files]} (a platform counts only with wheels for all PYTHON_VERSIONS)."""
    versions = pinned_versions()
    dest.mkdir(parents=True, exist_ok=True)
    found: dict[str, list[str]] = {}
    errors = []
    first = True
    store = cache if cache is not None else Path(tempfile.mkdtemp(prefix="styleheat_whl_"))
    try:
        for bl_platform, tags in PLATFORMS:
            names: list[Path] = []
            for python in PYTHON_VERSIONS:
                got = None
                for tag in tags:
                    got = _wheels_for(tag, python, versions, cache, store, errors, first)
                    first = False
                    if got is not None:
                        break
                if got is None:
                    break
                names += got
            else:  # every Python has its wheels for this platform
                for n in names:
                    shutil.copy2(n, dest / n.name)
                found[bl_platform] = sorted({n.name for n in names})
    finally:
        if cache is None:
            shutil.rmtree(store, ignore_errors=True)
    missing = [p for p in REQUIRED_PLATFORMS if p not in found]
    if missing:
        unreachable = any("connection" in " ".join(e[3]).lower() or "resolve" in " ".join(e[3]).lower()
                          or "network" in " ".join(e[3]).lower() for e in errors)
        detail = "; ".join(f"{p}/{t}/{k}: {m[0] if m else ''}" for p, t, k, m in errors[-4:])
        if unreachable or not found:
            raise BuildError("could not download pyzmq/msgpack wheels from the package registry (is it "
                             f"reachable? pip said: {detail}). Retry online, pass --wheel-cache DIR with "
                             "downloaded wheels, or build with --no-wheels (then Blender's Python must "
                             "already have pyzmq and msgpack)")
        raise BuildError(f"no wheels for {', '.join(missing)} ({detail})")
    return found


def _wheels_for(tag: str, python: str, versions: dict[str, str], cache: Path | None, store: Path, errors: list,
                first: bool) -> list[Path] | None:
    """The pinned wheels for one pip platform tag and Python version (from the cache, or downloaded
    into ``store``), or None when one of them has no such wheel; ``first``: the very first download,
    where "no version at all" means the registry is not reachable."""
    tmp = Path(tempfile.mkdtemp(prefix="styleheat_whl_"))
    try:
        names = []
        for pkg, ver in versions.items():
            cached = _cached(cache, pkg, ver, tag, python)
            if cached is not None:
                check_wheel(cached)
                names.append(cached)
                continue
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                   "--only-binary=:all:", "--no-deps", "--python-version", python,
                   "--implementation", "cp", "--platform", tag, "--dest", str(tmp), f"{pkg}=={ver}"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                err = r.stderr.lower()
                last = r.stderr.strip().splitlines()[-1:] or [""]
                if (first and not names and "from versions: none" in err) or any(
                        s in err for s in ("connection refused", "network is unreachable",
                                           "name or service not known", "max retries")):
                    # no version at all of a pinned package that has linux-x64 wheels: no registry
                    raise BuildError("could not download pyzmq/msgpack wheels: the package registry is "
                                     f"not reachable (pip: {last[0]}). Retry online, pass --wheel-cache "
                                     "DIR with downloaded wheels, or build with --no-wheels (then "
                                     "Blender's Python must already have pyzmq and msgpack)")
                errors.append((f"py{python}", tag, pkg, last))
                return None
            got = sorted(tmp.glob(f"{pkg}-*.whl"))
            if not got:
                return None
            check_wheel(got[-1])
            store.mkdir(parents=True, exist_ok=True)
            shutil.copy2(got[-1], store / got[-1].name)
            names.append(store / got[-1].name)
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached(cache: Path | None, pkg: str, ver: str, tag: str, python: str) -> Path | None:
    if cache is None or not cache.is_dir():
        return None
    stem = pkg.replace("-", "_")
    want = tuple(int(x) for x in python.split("."))
    for p in sorted(cache.glob(f"{stem}-{ver}-*.whl")):
        py_tag, abi_tag, plat = p.name[:-4].split("-")[-3:]
        if tag in plat.split(".") and addon_deps.python_fits(py_tag, abi_tag, want):
            return p
    return None


def write_manifest(dest: Path, platform_wheels: dict[str, list[str]] | None) -> None:
    text = (SOURCE / "blender_manifest.toml").read_text(encoding="utf-8")
    if platform_wheels:
        wheels = sorted({w for ws in platform_wheels.values() for w in ws})
        lines = ["", "# generated by build_addon.py",
                 "platforms = [" + ", ".join(f'"{p}"' for p in sorted(platform_wheels)) + "]",
                 "wheels = [", *[f'  "./wheels/{w}",' for w in wheels], "]", ""]
        # top-level keys must come before the first [table]
        head, sep, tail = text.partition("\n[")
        text = head.rstrip("\n") + "\n" + "\n".join(lines) + (sep + tail if sep else "")
    (dest / "blender_manifest.toml").write_text(text, encoding="utf-8")


def check_no_heavy_imports(folder: Path) -> None:
    pat = re.compile(r"^\s*(?:import|from)\s+(" + "|".join(FORBIDDEN_IMPORTS) + r")\b", re.M)
    for py in folder.rglob("*.py"):
        if any(part in EXCLUDE_DIRS for part in py.relative_to(folder).parts):
            continue
        m = pat.search(py.read_text(encoding="utf-8"))
        if m:
            raise BuildError(f"{py.relative_to(folder)} imports {m.group(1)}; heavy ML never runs inside Blender")


def check_bpy_free(folder: Path, modules: tuple[str, ...] = BPY_FREE) -> None:
    """Each of ``modules`` (files ``folder/<name>.py``) imports no Blender module and no sibling outside
    ``modules`` (every import statement counts, function-level ones included)."""
    import ast

    for name in modules:
        py = folder / f"{name}.py"
        if not py.is_file():
            raise BuildError(f"the bpy-free module {py.name} is missing from {folder}")
        for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"), str(py))):
            found = []
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.level == 1:
                siblings = [node.module] if node.module else [a.name for a in node.names]
                bad = [m.split(".")[0] for m in siblings if m.split(".")[0] not in modules]
                if bad:
                    raise BuildError(f"{py.name} (bpy-free) imports the add-on's bpy module {bad[0]} "
                                     f"(line {node.lineno}); keep Blender code out of {', '.join(modules)}")
            for mod in found:
                if mod.split(".")[0] in BLENDER_MODULES:
                    raise BuildError(f"{py.name} (bpy-free) imports {mod} (line {node.lineno}); keep Blender "
                                     f"code out of {', '.join(modules)}")


def stage(dest: Path, wheels: bool = True, wheel_cache: Path | None = None) -> Path:
    """Assemble the add-on folder ``dest/styleheat`` (sources + protocol copy + manifest [+ wheels])."""
    if not PROTOCOL.is_file():
        raise BuildError(f"{PROTOCOL} is missing; the add-on vendors the server's protocol module from there")
    check_versions_agree()
    pkg = dest / PACKAGE
    if pkg.exists():
        shutil.rmtree(pkg)
    shutil.copytree(SOURCE, pkg, ignore=shutil.ignore_patterns(*EXCLUDE_DIRS, "*.pyc", "blender_manifest.toml",
                                                                "protocol.py"))
    shutil.copy2(PROTOCOL, pkg / "protocol.py")
    platform_wheels = download_wheels(pkg / "wheels", wheel_cache) if wheels else None
    write_manifest(pkg, platform_wheels)
    check_no_heavy_imports(pkg)
    check_bpy_free(pkg)
    return pkg


def make_zip(pkg: Path, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(pkg.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                z.write(p, f"{PACKAGE}/{p.relative_to(pkg).as_posix()}")
    os.replace(tmp, out)
    return out


def validate(zip_path: Path) -> str:
    r = subprocess.run([sys.executable, str(bpy_validator()), "validate", str(zip_path)],
                       capture_output=True, text=True)
    text = (r.stdout + r.stderr).strip()
    if r.returncode != 0 or "error" in text.lower():
        raise BuildError(f"the extension validator rejected {zip_path.name}: {text}")
    return text


def build(output_dir: Path | str = REPO / "dist", wheels: bool = True, wheel_cache: Path | str | None = None,
          run_validator: bool = True) -> Path:
    """Build (and validate) the zip; returns its path."""
    output_dir = Path(output_dir)
    with tempfile.TemporaryDirectory(prefix="styleheat_build_") as tmp:
        pkg = stage(Path(tmp), wheels=wheels, wheel_cache=Path(wheel_cache) if wheel_cache else None)
        suffix = "" if wheels else "-nowheels"
        out = make_zip(pkg, output_dir / f"{PACKAGE}-{manifest_version()}{suffix}.zip")
    if run_validator:
        try:
            validate(out)
        except BuildError:
            out.unlink(missing_ok=True)
            raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-dir", default=str(REPO / "dist"))
    ap.add_argument("--no-wheels", action="store_true", help="do not bundle pyzmq/msgpack wheels (tests)")
    ap.add_argument("--wheel-cache", default=None, help="folder to reuse/keep downloaded wheels")
    ap.add_argument("--no-validate", action="store_true", help="skip bpy's extension validator")
    a = ap.parse_args(argv)
    try:
        out = build(a.output_dir, wheels=not a.no_wheels, wheel_cache=a.wheel_cache, run_validator=not a.no_validate)
    except BuildError as exc:
        print(f"build_addon: {exc}", file=sys.stderr)
        return 1
    print(f"built {out} ({out.stat().st_size / 1e6:.1f} MB)" + ("" if a.no_validate else ", validated"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
