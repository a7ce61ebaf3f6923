"""pyzmq and msgpack for the add-on.

As a Blender 4.2+ extension, Blender installs the wheels listed in blender_manifest.toml. As a
legacy add-on zip nothing installs them, so :func:`ensure` unpacks the bundled wheel that fits
this platform and Python into ``_vendor/`` next to this file and puts it on ``sys.path``.
"""
from __future__ import annotations

import os
import platform
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
NEEDED = ("zmq", "msgpack")


def _platform_ok(tag: str) -> bool:
    machine = platform.machine().lower()
    arm = machine in ("arm64", "aarch64")
    if sys.platform.startswith("linux"):
        return "linux" in tag and (("aarch64" in tag) if arm else ("x86_64" in tag))
    if sys.platform == "win32":
        return tag == ("win_arm64" if arm else "win_amd64")
    if sys.platform == "darwin":
        return tag.startswith("macosx") and ("universal2" in tag or (("arm64" in tag) if arm else ("x86_64" in tag)))
    return False


def python_fits(py_tag: str, abi_tag: str, version: tuple[int, int]) -> bool:
    """Whether a wheel with these python/abi tags runs on CPython ``version``: built for it, pure
    Python, or the stable ABI (abi3) of that version or an older one (pyzmq ships cp312-abi3 for
    Blender 5.1+'s Python 3.13)."""
    tags = py_tag.split(".")
    if f"cp{version[0]}{version[1]}" in tags or py_tag in ("py3", "py2.py3"):
        return True
    return abi_tag == "abi3" and any(t.startswith("cp3") and t[3:].isdigit() and (3, int(t[3:])) <= version
                                     for t in tags)


def compatible(wheel_name: str) -> bool:
    parts = wheel_name[:-4].split("-")
    if len(parts) < 5:
        return False
    py, abi, plat = parts[-3], parts[-2], parts[-1]
    return python_fits(py, abi, sys.version_info[:2]) and (plat == "any" or any(_platform_ok(t) for t in plat.split(".")))


def missing() -> list[str]:
    import importlib.util

    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


def ensure() -> None:
    if not missing():
        return
    wheels = os.path.join(HERE, "wheels")
    target = os.path.join(HERE, "_vendor", f"py{sys.version_info.major}{sys.version_info.minor}")
    if os.path.isdir(wheels):
        for name in sorted(os.listdir(wheels)):
            if name.endswith(".whl") and compatible(name):
                with zipfile.ZipFile(os.path.join(wheels, name)) as z:
                    z.extractall(target)
    if os.path.isdir(target) and target not in sys.path:
        sys.path.insert(0, target)
    still = missing()
    if still:
        raise ImportError(f"StyleHEAT needs {', '.join(still)}: no bundled wheel fits this Blender "
                          f"({sys.platform}, {platform.machine()}, Python {sys.version_info.major}."
                          f"{sys.version_info.minor}); install the extension build for your platform")
