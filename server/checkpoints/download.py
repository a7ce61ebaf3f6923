"""Fetch the release assets of :mod:`server.checkpoints.assets` into a checkpoint directory.

Guarantees:

* bytes are written to ``TARGET.part`` and moved to the final name with ``os.replace`` only
  once the transfer is complete (length checked against ``Content-Length`` / ``Content-Range``
  and the registry's size and sha256 when it has them), so no final name ever holds a
  half-written file;
* an interrupted transfer resumes from the ``.part`` file with an HTTP ``Range`` request, on
  the next attempt of the same run or on a later run; a server that ignores ``Range`` (answers
  200) makes the download restart from zero;
* zip archives are checked (CRC of every member) and unpacked into a staging folder first,
  refusing absolute paths, ``..`` components and links; only a fully unpacked archive is moved
  into place, then the archive itself is deleted;
* ``manifest.json`` in the checkpoint directory records url, size, sha256 and fetch time of
  every downloaded asset.

Errors are :class:`DownloadError` with a one-line message that says what happened and what to
do.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

from server.checkpoints.assets import Asset

MANIFEST = "manifest.json"
PART_SUFFIX = ".part"
CHUNK = 1 << 20
USER_AGENT = "styleheat-blender-downloader/0.1"
MAX_UNPACKED_BYTES = 8 << 30  # refuse archives that claim to unpack to more than this


class DownloadError(Exception):
    """A failed download; ``str(err)`` is a one-line message for the user."""


class _Retryable(DownloadError):
    """A failure worth another attempt (network trouble, truncated body, server error)."""


@dataclass
class Result:
    asset: str
    status: str                      # "downloaded" | "skipped" | "failed"
    message: str = ""
    entry: dict | None = None        # the manifest entry, when downloaded
    files: list[str] = field(default_factory=list)


def part_path(final: Path) -> Path:
    return final.with_name(final.name + PART_SUFFIX)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- manifest

def read_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: start a new one
        return {"format": 1, "assets": {}}
    if not isinstance(data, dict) or not isinstance(data.get("assets"), dict):
        return {"format": 1, "assets": {}}
    return data


def _write_manifest(root: Path, data: dict) -> None:
    path = Path(root) / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def record(root: Path, asset_name: str, entry: dict) -> None:
    data = read_manifest(root)
    data["assets"][asset_name] = entry
    _write_manifest(root, data)


# --------------------------------------------------------------------------- HTTP

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.I)
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)", re.I)


def _host(url: str) -> str:
    return urllib.request.urlparse(url).netloc or url


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    return urllib.request.urlopen(req, timeout=timeout)  # follows the release redirects


def _http_error(err: urllib.error.HTTPError, url: str, name: str) -> DownloadError:
    if err.code == 404:
        return DownloadError(
            f"{name}: not found (HTTP 404) at {url}; the release asset may have moved -- "
            "check the URL or use --mirror with a server that has the file")
    if err.code in (401, 403):
        return DownloadError(
            f"{name}: access refused (HTTP {err.code}) at {url}; the host may be rate-limiting "
            "or blocking you -- wait and retry, or use --mirror")
    msg = f"{name}: server answered HTTP {err.code} {err.reason} for {url}"
    if err.code >= 500 or err.code == 429:
        return _Retryable(msg + "; try again later")
    return DownloadError(msg)


def _fetch_once(url: str, part: Path, name: str, timeout: float,
                progress: bool, label: str) -> int:
    """One attempt: continue ``part`` from its current size; return the total size in bytes.

    Raises ``_Retryable`` when another attempt can make progress.
    """
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, offset, timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            m = _UNSATISFIED_RANGE.search(err.headers.get("Content-Range", "") or "")
            if m and int(m.group(1)) == offset:
                return offset  # the .part already holds the whole file
            part.unlink(missing_ok=True)  # stale .part larger than the file: start over
            raise _Retryable(f"{name}: partial file did not match the server's copy; restarting") from None
        raise _http_error(err, url, name) from None
    except urllib.error.URLError as err:
        reason = getattr(err, "reason", err)
        raise _Retryable(f"{name}: cannot reach {_host(url)} ({reason}); check your network "
                         "connection or proxy, or use --mirror") from None
    except (TimeoutError, socket.timeout):
        raise _Retryable(f"{name}: {_host(url)} did not answer within {timeout:g} s; check your "
                         "network connection and run the command again") from None
    except (ConnectionError, http.client.HTTPException, OSError) as err:
        raise _Retryable(f"{name}: connection to {_host(url)} failed ({err}); run the command "
                         "again to resume") from None

    with resp:
        status = resp.status
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if status == 206:
            m = _CONTENT_RANGE.search(resp.headers.get("Content-Range", "") or "")
            if not m or int(m.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise _Retryable(f"{name}: server sent an unexpected byte range; restarting")
            total = int(m.group(3)) if m.group(3) != "*" else (offset + length if length is not None else None)
            mode = "ab"
        else:  # 200: whole file (a server that ignores Range lands here too)
            offset = 0
            total = length
            mode = "wb"
        _check_space(part.parent, (total - offset) if total is not None else None, name)

        bar = _progress_bar(progress, label, total, offset)
        received = offset
        try:
            with open(part, mode) as out:
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except (TimeoutError, socket.timeout):
                        raise _Retryable(f"{name}: transfer stalled (no data for {timeout:g} s) at "
                                         f"{received} bytes; run the command again to resume") from None
                    except (ConnectionError, http.client.HTTPException, OSError) as err:
                        raise _Retryable(f"{name}: connection lost at {received} bytes ({err}); "
                                         "run the command again to resume") from None
                    if not block:
                        break
                    out.write(block)
                    received += len(block)
                    if bar is not None:
                        bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()
    if total is not None and received < total:
        raise _Retryable(f"{name}: transfer cut short: got {received} of {total} bytes; "
                         "run the command again to resume")
    if total is not None and received > total:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{name}: server sent {received} bytes but announced {total}; "
                            "the download was discarded -- try again or use --mirror")
    return received


def _progress_bar(enabled: bool, label: str, total: int | None, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=label, leave=True, dynamic_ncols=True)


def _check_space(folder: Path, needed: int | None, name: str) -> None:
    if not needed:
        return
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed:
        raise DownloadError(f"{name}: not enough disk space in {folder}: need {needed / 1e6:.0f} MB, "
                            f"{free / 1e6:.0f} MB free -- free some space or choose another --dir")


def fetch(url: str, final: Path, *, name: str | None = None, retries: int = 3,
          backoff: float = 2.0, timeout: float = 60.0, progress: bool = True,
          expected_size: int | None = None, expected_sha256: str | None = None) -> dict:
    """Download ``url`` to ``final`` through ``final.part``; return ``{url, size, sha256}``.

    ``retries`` extra attempts follow a retryable failure, each resuming the ``.part`` file.
    Nothing is ever written under ``final`` before the content is complete and verified.
    """
    final = Path(final)
    name = name or final.name
    final.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(final)
    attempt = 0
    free_attempts = 20  # with retries > 0, attempts that made progress do not use one up (up to 20)
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            size = _fetch_once(url, part, name, timeout, progress, final.name)
            break
        except _Retryable as err:
            grew = part.exists() and part.stat().st_size > before
            if grew and retries > 0 and free_attempts > 0:
                free_attempts -= 1
                continue
            if attempt >= retries:
                raise DownloadError(str(err)) from None
            attempt += 1
            if backoff:
                time.sleep(backoff * attempt)
    if expected_size is not None and size != expected_size:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{name}: downloaded {size} bytes but the release file has {expected_size}; "
                            "the download was discarded -- run the command again")
    digest = sha256_file(part)
    if expected_sha256 and digest.lower() != expected_sha256.lower():
        part.unlink(missing_ok=True)
        raise DownloadError(f"{name}: checksum mismatch (sha256 {digest[:12]}..., expected "
                            f"{expected_sha256[:12]}...); the download was discarded -- run the command again")
    return {"url": url, "size": size, "sha256": digest, "part": str(part)}


# --------------------------------------------------------------------------- zip

def _member_target(info: zipfile.ZipInfo, strip: str) -> PurePosixPath | None:
    """Relative destination of one archive member, ``None`` to skip it; raises on unsafe names."""
    raw = info.filename.replace("\\", "/")
    if info.is_dir() or raw.startswith("__MACOSX/") or PurePosixPath(raw).name.startswith("._"):
        return None
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise DownloadError(f"archive member {info.filename!r} is a symbolic link; refusing to unpack")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise DownloadError(f"archive member {info.filename!r} has an absolute path; refusing to unpack")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DownloadError(f"archive member {info.filename!r} points outside the target folder; "
                            "refusing to unpack")
    strip_parts = [p for p in strip.split("/") if p]
    if strip_parts and parts[:len(strip_parts)] == strip_parts:
        parts = parts[len(strip_parts):]
    if not parts:
        return None
    return PurePosixPath(*parts)


def unpack(archive: Path, root: Path, *, into: str = "", strip: str = "",
           required: Iterable[str] = (), name: str | None = None) -> list[str]:
    """Unpack ``archive`` under ``root/into``; return the written paths relative to ``root``.

    All members are checked and written to a staging folder inside ``root`` first; only when
    every one is intact (and every ``required`` path, relative to ``root``, is among them) are
    they moved to their final names. On any failure nothing is placed and the staging folder
    is removed.
    """
    root = Path(root)
    name = name or archive.name
    root.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise DownloadError(f"{name}: the downloaded archive is corrupted ({err}); it was deleted -- "
                            "run the command again") from None
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
    try:
        with zf:
            plan: list[tuple[zipfile.ZipInfo, str]] = []
            total = 0
            for info in zf.infolist():
                try:
                    rel = _member_target(info, strip)
                except DownloadError as err:
                    raise DownloadError(f"{name}: {err}") from None
                if rel is None:
                    continue
                rel_root = str(PurePosixPath(into, rel)) if into else str(rel)
                plan.append((info, rel_root))
                total += info.file_size
            if total > MAX_UNPACKED_BYTES:
                raise DownloadError(f"{name}: archive claims to unpack to {total / 1e9:.1f} GB; refusing")
            missing = [r for r in required if r not in {p for _, p in plan}]
            if missing:
                raise DownloadError(f"{name}: the archive does not contain {', '.join(missing)}; "
                                    "it is not the expected release file -- check the URL or mirror")
            for info, rel in plan:
                dest = staging / rel
                if staging.resolve() not in dest.resolve().parents:
                    raise DownloadError(f"{name}: archive member {info.filename!r} points outside "
                                        "the target folder; refusing to unpack")
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
                except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                    raise DownloadError(f"{name}: the downloaded archive is corrupted (member "
                                        f"{info.filename!r}: {err}); it was deleted -- run the "
                                        "command again") from None
        placed = []
        for _, rel in plan:
            final = root / rel
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, final)
            placed.append(rel)
        return placed
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- assets

def installed(asset: Asset, root: Path) -> bool:
    return all((Path(root) / p).is_file() for p in asset.paths)


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def download_asset(asset: Asset, root: Path, *, force: bool = False, retries: int = 3,
                   backoff: float = 2.0, timeout: float = 60.0, progress: bool = True) -> Result:
    """Fetch (and for archives unpack) one asset; record it in the manifest.

    Returns a :class:`Result`; raises :class:`DownloadError` on failure.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if not force and installed(asset, root):
        return Result(asset.name, "skipped", "already present", files=list(asset.paths))
    final = root / asset.target
    if force:
        part_path(final).unlink(missing_ok=True)
    info = fetch(asset.url, final, name=asset.name, retries=retries, backoff=backoff,
                 timeout=timeout, progress=progress, expected_size=asset.size,
                 expected_sha256=asset.sha256)
    part = Path(info.pop("part"))
    if asset.archive:
        try:
            files = unpack(part, root, into=asset.zip_into, strip=asset.zip_strip,
                           required=asset.paths, name=asset.name)
        except DownloadError:
            part.unlink(missing_ok=True)  # resuming a complete-but-bad archive cannot help
            raise
        part.unlink(missing_ok=True)
    else:
        os.replace(part, final)
        files = [asset.target]
    entry = {**info, "file": asset.filename, "fetched_at": _now(), "files": sorted(files)}
    record(root, asset.name, entry)
    return Result(asset.name, "downloaded", f"{info['size']} bytes", entry=entry, files=sorted(files))


def download_all(assets: Iterable[Asset], root: Path, *, force: bool = False, retries: int = 3,
                 backoff: float = 2.0, timeout: float = 60.0, progress: bool = True,
                 report: Callable[[Result], None] | None = None) -> list[Result]:
    """Fetch every asset, continuing past failures; one :class:`Result` per asset."""
    results = []
    for asset in assets:
        try:
            res = download_asset(asset, root, force=force, retries=retries, backoff=backoff,
                                 timeout=timeout, progress=progress)
        except DownloadError as err:
            res = Result(asset.name, "failed", str(err))
        except OSError as err:  # disk full, permissions, ...
            res = Result(asset.name, "failed", f"{asset.name}: cannot write to {root} ({err.strerror or err})")
        results.append(res)
        if report:
            report(res)
    return results
