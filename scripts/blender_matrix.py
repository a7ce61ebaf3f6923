#!/usr/bin/env python3
"""Run the add-on's Blender tests against the real bpy wheels of several Blender versions.

    .venv/bin/python scripts/blender_matrix.py                          # every version in MATRIX
    .venv/bin/python scripts/blender_matrix.py --versions 4.2.23 5.3.0  # some of them
    .venv/bin/python scripts/blender_matrix.py --markdown table.md --json results.json

For each version a virtual environment ``.tmp/bpy-venvs/bpy-<version>/`` gets exactly bpy, the numpy
that Blender version is built for and the pinned pyzmq/msgpack (no torch, no pytest): Blender
4.2 .. 5.0 run Python 3.11, 5.1+ run Python 3.13 (found as ``python3.13`` on PATH, under pyenv, or
given with ``--python 3.13=PATH``). A venv whose packages already match is reused. Then this
interpreter (the project's .venv: pytest, torch, the real tiny server) runs every test marked
``blender`` in the add-on test files with ``STYLEHEAT_BPY_PYTHON`` naming the venv's Python, so each
bpy scenario runs in that Blender while the server runs here. The bpy that this interpreter has
(5.0.1 in .venv) is tested in place. Prints one table row per version; exit code 1 when a version
has a failing test.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

# (bpy version, Blender's Python, note)
MATRIX = (
    ("4.2.23", "3.11", "4.2 LTS, newest"),
    ("4.3.0", "3.11", ""),
    ("4.4.0", "3.11", ""),
    ("4.5.15", "3.11", "4.5 LTS, newest"),
    ("5.0.1", "3.11", "the project's .venv"),
    ("5.2.4", "3.13", "5.2 LTS, newest"),
    ("5.3.0", "3.13", "newest 5.x"),
)
# the numpy each Blender line ships with (bpy 4.5/5.0 require numpy<2, 5.1+ numpy>=2.2)
NUMPY = {"3.11": "1.26.4", "3.13": "2.5.5"}
TEST_FILES = ("tests/test_addon_blender.py", "tests/test_addon_render.py", "tests/test_addon_bake.py",
              "tests/test_addon_layers.py",
              "tests/test_addon_matrix.py")
STAMP = "styleheat-matrix.json"


class MatrixError(Exception):
    pass


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def find_python(version: str, given: dict[str, str]) -> str:
    """An interpreter of Python ``version`` (X.Y) to create a venv from."""
    if version in given:
        return given[version]
    if "%d.%d" % sys.version_info[:2] == version:
        return getattr(sys, "_base_executable", sys.executable)
    for candidate in [shutil.which(f"python{version}"),
                      *sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python")))]:
        if candidate and subprocess.run([candidate, "-c", "import venv"], capture_output=True).returncode == 0:
            return candidate
    raise MatrixError(f"no Python {version} found (needed for its bpy wheels); install it or pass "
                      f"--python {version}=PATH")


def requirements(bpy_version: str, python: str) -> list[str]:
    import build_addon

    pins = build_addon.pinned_versions()
    return [f"bpy=={bpy_version}", f"numpy=={NUMPY[python]}", f"pyzmq=={pins['pyzmq']}",
            f"msgpack=={pins['msgpack']}"]


def ensure_venv(root: Path, bpy_version: str, python: str, given: dict[str, str], log) -> Path:
    """The venv's interpreter, created or brought to ``requirements`` (reused when it matches)."""
    venv = root / f"bpy-{bpy_version}"
    exe = venv_python(venv)
    reqs = requirements(bpy_version, python)
    stamp = venv / STAMP
    if exe.exists() and stamp.exists() and json.loads(stamp.read_text()) == reqs:
        return exe
    if not exe.exists():
        log(f"creating {venv} (Python {python})")
        subprocess.run([find_python(python, given), "-m", "venv", str(venv)], check=True)
    log(f"installing {' '.join(reqs)} into {venv}")
    r = subprocess.run([str(exe), "-m", "pip", "install", "-q", "--disable-pip-version-check", *reqs],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise MatrixError(f"pip could not install {' '.join(reqs)} for Python {python}:\n{r.stderr[-3000:]}")
    stamp.write_text(json.dumps(reqs))
    return exe


def junit_summary(xml_path: Path) -> dict:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed, reasons = [], []
    if not xml_path.exists():
        return {**counts, "failed_tests": failed, "skipped_reasons": reasons}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            counts["failed"] += 1
            failed.append(name)
        elif "error" in kinds:
            counts["errors"] += 1
            failed.append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
            reasons.append(next(c for c in case if c.tag == "skipped").get("message", ""))
        else:
            counts["passed"] += 1
    return {**counts, "failed_tests": failed, "skipped_reasons": sorted(set(reasons))}


def run_version(root: Path, results: Path, bpy_version: str, python: str, note: str, given: dict[str, str],
                extra: list[str], timeout: float, log) -> dict:
    import test_addon_helpers as H

    t0 = time.monotonic()
    row = {"bpy": bpy_version, "note": note}
    env = dict(os.environ)
    try:
        here = metadata.version("bpy")
    except metadata.PackageNotFoundError:
        here = None
    if here == bpy_version:
        exe = Path(sys.executable)
        env.pop("STYLEHEAT_BPY_PYTHON", None)
    else:
        exe = ensure_venv(root, bpy_version, python, given, log)
        env["STYLEHEAT_BPY_PYTHON"] = str(exe)
    build = H.bpy_build(str(exe))
    row.update(blender=build["version"], python=build["python"], audio=build["audio"],
               setup_s=round(time.monotonic() - t0, 1))
    out = results / bpy_version
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    xml_path = out / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "blender", "-p", "no:cacheprovider",
           f"--junitxml={xml_path}", f"--basetemp={out / 'tmp'}", *extra, *TEST_FILES]
    log(f"bpy {bpy_version} ({build['version']}, Python {build['python']}): {' '.join(cmd[1:])}")
    t1 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        (out / "pytest.log").write_text(r.stdout + r.stderr)
        rc = r.returncode
    except subprocess.TimeoutExpired as exc:
        (out / "pytest.log").write_text(str(exc.stdout or "") + str(exc.stderr or ""))
        rc = "timeout"
    row.update(junit_summary(xml_path), tests_s=round(time.monotonic() - t1, 1), rc=rc, log=str(out / "pytest.log"))
    row["ok"] = rc == 0 and row["failed"] == 0 and row["errors"] == 0 and row["passed"] > 0
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| bpy wheel | Blender | Python | audio | passed | skipped | failed | setup s | tests s | notes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['bpy']} | | | | | | | | | could not run: {r['error'].splitlines()[0]} |")
            continue
        notes = [r["note"]] if r["note"] else []
        notes += [f"skipped: {m}" for m in r["skipped_reasons"]]
        notes += [f"FAILED: {t}" for t in r["failed_tests"]]
        if r["rc"] not in (0, 1):
            notes.append(f"pytest exit {r['rc']}")
        lines.append(f"| {r['bpy']} | {r['blender']} | {r['python']} | {'yes' if r['audio'] else 'no'} | "
                     f"{r['passed']} | {r['skipped']} | {r['failed'] + r['errors']} | {r['setup_s']} | "
                     f"{r['tests_s']} | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", nargs="+", default=[v for v, _, _ in MATRIX], metavar="BPY",
                    help="bpy versions to test (default: all of %s)" % ", ".join(v for v, _, _ in MATRIX))
    ap.add_argument("--venv-root", default=str(REPO / ".tmp" / "bpy-venvs"), help="where the bpy venvs live")
    ap.add_argument("--results", default=None, help="where each version's junit.xml, pytest.log and tmp go "
                    "(default: VENV_ROOT/results)")
    ap.add_argument("--python", action="append", default=[], metavar="X.Y=PATH",
                    help="interpreter to create the Python X.Y venvs from")
    ap.add_argument("--markdown", default=None, help="also write the results table to this file")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this file")
    ap.add_argument("-k", default=None, help="only tests matching this pytest -k expression")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds for one version's tests")
    a = ap.parse_args(argv)
    known = {v: (py, note) for v, py, note in MATRIX}
    unknown = [v for v in a.versions if v not in known]
    if unknown:
        ap.error(f"unknown bpy version(s) {', '.join(unknown)}; known: {', '.join(known)} "
                 "(add a row to MATRIX with its Python)")
    try:
        given = dict(item.split("=", 1) for item in a.python)
    except ValueError:
        ap.error("--python takes X.Y=PATH, e.g. --python 3.13=/usr/bin/python3.13")
    try:
        import pytest  # noqa: F401
    except ImportError:
        ap.error(f"{sys.executable} has no pytest: run this with the project's .venv/bin/python")
    root = Path(a.venv_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    results = Path(a.results).resolve() if a.results else root / "results"

    def log(msg: str) -> None:
        print(f"[blender-matrix] {msg}", flush=True)

    rows = []
    for v in a.versions:
        py, note = known[v]
        try:
            rows.append(run_version(root, results, v, py, note, given, ["-k", a.k] if a.k else [], a.timeout, log))
        except (MatrixError, AssertionError, subprocess.CalledProcessError) as exc:
            rows.append({"bpy": v, "note": note, "error": str(exc), "ok": False})
        log(f"bpy {v}: {'ok' if rows[-1]['ok'] else 'FAILED'}")
    table = markdown(rows)
    print(table, end="")
    if a.markdown:
        Path(a.markdown).write_text(table)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
