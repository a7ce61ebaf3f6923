"""Downloader tests against a real HTTP server on 127.0.0.1 (no network mocks).

The server (``http.server`` in a thread) serves generated files by name, honours ``Range``
(206 + Content-Range), and on request cuts a response short, ignores ``Range``, or answers an
HTTP error. The registry's URLs point at it through ``server.checkpoints.assets.registry(mirror=...)``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import threading
import zipfile
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from server.checkpoints import assets as assets_mod
from server.checkpoints import paths
from server.checkpoints.download import DownloadError, download_all, download_asset, read_manifest, unpack

REPO = Path(__file__).resolve().parents[1]
STYLEHEAT = REPO / ".venv" / "bin" / "styleheat"


# --------------------------------------------------------------------------- test server

class FileServer:
    """What the handler serves and how it misbehaves; ``log`` records every request."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, list[int]] = {}   # name -> body sizes for the next responses
        self.cut_always: dict[str, float] = {}  # name -> fraction of the body ever sent
        self.ignore_range: set[str] = set()
        self.status: dict[str, int] = {}
        self.log: list[tuple[str, str | None, int]] = []
        self.lock = threading.Lock()


def _handler(state: FileServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: closing = end of body

        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            name = self.path.lstrip("/")
            rng = self.headers.get("Range")
            with state.lock:
                code = state.status.get(name)
                data = state.files.get(name)
                if code is None and data is None:
                    code = 404
                if code is not None:
                    state.log.append((name, rng, code))
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                status = 200
                if rng and name not in state.ignore_range:
                    m = re.fullmatch(r"bytes=(\d+)-", rng)
                    start = int(m.group(1))
                    if start >= len(data):
                        state.log.append((name, rng, 416))
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                body = data[start:]
                send = len(body)
                if state.cut.get(name):
                    send = min(send, state.cut[name].pop(0))
                elif name in state.cut_always:
                    send = int(len(body) * state.cut_always[name])
                state.log.append((name, rng, status))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))  # always the full length
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            try:
                self.wfile.write(body[:send])
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True

    return Handler


@pytest.fixture
def server():
    state = FileServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}/"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _asset(server: FileServer, name: str):
    (a,) = assets_mod.select(assets_mod.registry(mirror=server.base), [name])
    return a


def _payload(n: int, seed: int = 0) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}-{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


QUIET = dict(progress=False, backoff=0, timeout=10)


# --------------------------------------------------------------------------- registry / paths

def test_registry_matches_official_download_script():
    by_name = {a.name: a for a in assets_mod.OFFICIAL_ASSETS}
    base = "https://github.com/FeiiYin/StyleHEAT/releases/download/styleheat/"
    assert by_name["styleheat"].url == base + "StyleHEAT_visual.pt"
    assert by_name["hfgi"].paths == ("hfgi.pth",)
    assert by_name["e4e"].url == base + "Encoder_e4e.pth"
    assert by_name["stylegan"].url == base + "StyleGAN_e4e.pth"
    assert by_name["ganspace"].paths == ("ffhq_pca.pt",)
    assert by_name["interfacegan"].url == base + "interfacegan_directions-20230323T133213Z-001.zip"
    assert by_name["interfacegan"].paths == ("interfacegan_directions/age.pt", "interfacegan_directions/pose.pt")
    assert by_name["deep3d"].url == base + "epoch_20.pth"
    assert by_name["deep3d"].paths == ("Deep3D/epoch_20.pth",)
    assert by_name["bfm"].url == "https://github.com/Winfredy/SadTalker/releases/download/v0.0.1/BFM_Fitting.zip"
    assert by_name["bfm"].zip_into == "BFM" and by_name["bfm"].zip_strip == "BFM_Fitting/"
    with pytest.raises(ValueError, match="http:// or https://"):
        assets_mod.registry("mirror.example/x")
    mirrored = assets_mod.registry("http://mirror.example/x")
    assert [a.url for a in mirrored][0] == "http://mirror.example/x/StyleHEAT_visual.pt"
    assert assets_mod.select(mirrored, ["Encoder_e4e.pth", "BFM"])[0].name == "e4e"
    with pytest.raises(KeyError, match="choose from: styleheat, hfgi"):
        assets_mod.select(mirrored, ["nope"])


def test_default_checkpoint_dir_follows_platform_conventions(tmp_path):
    env = {}
    assert paths.default_checkpoint_dir("linux", env, "/home/u") == PurePosixPath("/home/u/.cache/styleheat/checkpoints")
    assert paths.default_checkpoint_dir("linux", {"XDG_CACHE_HOME": "/big/cache"}, "/home/u") == \
        PurePosixPath("/big/cache/styleheat/checkpoints")
    # a relative XDG_CACHE_HOME is invalid per the spec and ignored
    assert paths.default_checkpoint_dir("linux", {"XDG_CACHE_HOME": "rel"}, "/home/u") == \
        PurePosixPath("/home/u/.cache/styleheat/checkpoints")
    assert paths.default_checkpoint_dir("darwin", env, "/Users/u") == \
        PurePosixPath("/Users/u/Library/Caches/styleheat/checkpoints")
    assert paths.default_checkpoint_dir("win32", {"LOCALAPPDATA": r"C:\Users\u\AppData\Local"}, r"C:\Users\u") == \
        PureWindowsPath(r"C:\Users\u\AppData\Local\styleheat\checkpoints")
    assert paths.default_checkpoint_dir("win32", {}, r"C:\Users\u") == \
        PureWindowsPath(r"C:\Users\u\AppData\Local\styleheat\checkpoints")
    assert paths.default_checkpoint_dir("linux", {"STYLEHEAT_CHECKPOINTS": str(tmp_path / "w")}, "/home/u") == tmp_path / "w"
    assert paths.resolve_checkpoint_dir(str(tmp_path)) == (tmp_path, "--dir")
    assert paths.resolve_checkpoint_dir(str(tmp_path), option="--checkpoints") == (tmp_path, "--checkpoints")


# --------------------------------------------------------------------------- plain files

def test_download_writes_file_and_manifest(server, tmp_path):
    data = _payload(300_000)
    server.files["ffhq_pca.pt"] = data
    before = datetime.now(timezone.utc) - timedelta(seconds=2)
    res = download_asset(_asset(server, "ganspace"), tmp_path, **QUIET)
    assert res.status == "downloaded"
    assert (tmp_path / "ffhq_pca.pt").read_bytes() == data
    assert _tree(tmp_path) == ["ffhq_pca.pt", "manifest.json"]
    entry = json.loads((tmp_path / "manifest.json").read_text())["assets"]["ganspace"]
    assert entry["url"] == server.base + "ffhq_pca.pt"
    assert entry["size"] == len(data)
    assert entry["sha256"] == _sha(data)
    assert entry["files"] == ["ffhq_pca.pt"]
    fetched = datetime.fromisoformat(entry["fetched_at"].replace("Z", "+00:00"))
    assert before <= fetched <= datetime.now(timezone.utc) + timedelta(seconds=2)

    # present -> skipped without a request; --force -> fetched again
    n = len(server.log)
    assert download_asset(_asset(server, "ganspace"), tmp_path, **QUIET).status == "skipped"
    assert len(server.log) == n
    server.files["ffhq_pca.pt"] = data[::-1]
    assert download_asset(_asset(server, "ganspace"), tmp_path, force=True, **QUIET).status == "downloaded"
    assert (tmp_path / "ffhq_pca.pt").read_bytes() == data[::-1]
    assert read_manifest(tmp_path)["assets"]["ganspace"]["sha256"] == _sha(data[::-1])


def test_interrupted_transfer_resumes_on_next_run(server, tmp_path):
    data = _payload(500_000, seed=1)
    server.files["hfgi.pth"] = data
    server.cut["hfgi.pth"] = [123_457]
    asset = _asset(server, "hfgi")
    with pytest.raises(DownloadError) as err:
        download_asset(asset, tmp_path, retries=0, **QUIET)
    msg = str(err.value)
    assert "\n" not in msg and "cut short" in msg and "123457 of 500000" in msg and "again" in msg
    assert not (tmp_path / "hfgi.pth").exists()
    part = tmp_path / "hfgi.pth.part"
    assert part.stat().st_size == 123_457

    res = download_asset(asset, tmp_path, retries=0, **QUIET)
    assert res.status == "downloaded"
    assert server.log[-1] == ("hfgi.pth", "bytes=123457-", 206)  # resumed, not restarted
    assert not part.exists()
    final = tmp_path / "hfgi.pth"
    assert final.stat().st_size == len(data) and _sha(final.read_bytes()) == _sha(data)
    assert read_manifest(tmp_path)["assets"]["hfgi"]["sha256"] == _sha(data)


def test_retries_resume_within_one_run(server, tmp_path):
    data = _payload(400_000, seed=2)
    server.files["Encoder_e4e.pth"] = data
    server.cut["Encoder_e4e.pth"] = [100_000, 50_000]
    res = download_asset(_asset(server, "e4e"), tmp_path, retries=3, **QUIET)
    assert res.status == "downloaded"
    assert [r for _, r, _ in server.log] == [None, "bytes=100000-", "bytes=150000-"]
    assert _sha((tmp_path / "Encoder_e4e.pth").read_bytes()) == _sha(data)


def test_attempts_that_make_progress_do_not_use_up_retries(server, tmp_path):
    data = _payload(300_000, seed=12)
    server.files["hfgi.pth"] = data
    server.cut["hfgi.pth"] = [40_000] * 5  # five short responses, each one moving forward
    assert download_asset(_asset(server, "hfgi"), tmp_path, retries=1, **QUIET).status == "downloaded"
    assert len(server.log) == 6 and server.log[-1][1] == "bytes=200000-"
    assert (tmp_path / "hfgi.pth").read_bytes() == data


def test_server_ignoring_range_restarts_from_zero(server, tmp_path, capsys):
    data = _payload(200_000, seed=3)
    server.files["StyleGAN_e4e.pth"] = data
    server.ignore_range.add("StyleGAN_e4e.pth")
    (tmp_path / "StyleGAN_e4e.pth.part").write_bytes(b"stale bytes from some other file" * 100)
    res = download_asset(_asset(server, "stylegan"), tmp_path, progress=True, backoff=0, timeout=10)
    assert res.status == "downloaded"
    assert server.log[-1][1] is not None and server.log[-1][2] == 200  # asked to resume, got the whole file
    assert (tmp_path / "StyleGAN_e4e.pth").read_bytes() == data
    assert "StyleGAN_e4e.pth" in capsys.readouterr().err  # the tqdm progress bar


def test_complete_part_file_is_finished_without_refetching(server, tmp_path):
    data = _payload(50_000, seed=4)
    server.files["epoch_20.pth"] = data
    (tmp_path / "Deep3D").mkdir()
    (tmp_path / "Deep3D" / "epoch_20.pth.part").write_bytes(data)
    download_asset(_asset(server, "deep3d"), tmp_path, **QUIET)
    assert server.log == [("epoch_20.pth", "bytes=50000-", 416)]
    assert (tmp_path / "Deep3D" / "epoch_20.pth").read_bytes() == data


def test_404_gives_one_clear_line_and_no_file(server, tmp_path):
    with pytest.raises(DownloadError) as err:
        download_asset(_asset(server, "styleheat"), tmp_path, **QUIET)
    msg = str(err.value)
    assert "\n" not in msg
    assert "styleheat: not found (HTTP 404)" in msg and server.base + "StyleHEAT_visual.pt" in msg
    assert len(server.log) == 1  # a 404 is not retried
    assert _tree(tmp_path) == []


def test_server_error_is_retried_then_reported(server, tmp_path):
    server.status["hfgi.pth"] = 503
    with pytest.raises(DownloadError, match=r"HTTP 503 .*try again later"):
        download_asset(_asset(server, "hfgi"), tmp_path, retries=2, **QUIET)
    assert len(server.log) == 3
    assert _tree(tmp_path) == []


def test_truncated_body_never_reaches_final_name(server, tmp_path):
    data = _payload(80_000, seed=5)
    server.files["hfgi.pth"] = data
    server.cut_always["hfgi.pth"] = 0.0  # Content-Length promises bytes that never come
    server.cut["hfgi.pth"] = [30_000]
    with pytest.raises(DownloadError) as err:
        download_asset(_asset(server, "hfgi"), tmp_path, retries=2, **QUIET)
    msg = str(err.value)
    assert "\n" not in msg and "cut short: got 30000 of 80000 bytes" in msg
    assert not (tmp_path / "hfgi.pth").exists()
    assert (tmp_path / "hfgi.pth.part").stat().st_size == 30_000
    assert "hfgi" not in read_manifest(tmp_path)["assets"]


def test_connection_refused_is_explained(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assets = assets_mod.registry(mirror=f"http://127.0.0.1:{port}/")
    (a,) = assets_mod.select(assets, ["hfgi"])
    with pytest.raises(DownloadError) as err:
        download_asset(a, tmp_path, retries=1, **QUIET)
    msg = str(err.value)
    assert "\n" not in msg and f"cannot reach 127.0.0.1:{port}" in msg and "network" in msg
    assert not (tmp_path / "hfgi.pth").exists()


def test_expected_checksum_mismatch_discards_download(server, tmp_path):
    from dataclasses import replace

    data = _payload(10_000, seed=6)
    server.files["hfgi.pth"] = data
    asset = replace(_asset(server, "hfgi"), sha256="0" * 64)
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_asset(asset, tmp_path, **QUIET)
    assert _tree(tmp_path) == []
    good = replace(asset, sha256=_sha(data), size=len(data))
    assert download_asset(good, tmp_path, **QUIET).status == "downloaded"


# --------------------------------------------------------------------------- archives

def test_zip_asset_is_unpacked_into_place(server, tmp_path):
    members = {
        "BFM_Fitting/similarity_Lm3D_all.mat": _payload(5_000, 7),
        "BFM_Fitting/01_MorphableModel.mat": _payload(9_000, 8),
        "__MACOSX/BFM_Fitting/._similarity_Lm3D_all.mat": b"junk",
    }
    blob = _zip(members)
    server.files["BFM_Fitting.zip"] = blob
    server.cut["BFM_Fitting.zip"] = [len(blob) // 2]  # and the archive download resumes too
    res = download_asset(_asset(server, "bfm"), tmp_path, retries=1, **QUIET)
    assert res.status == "downloaded"
    assert _tree(tmp_path) == ["BFM/01_MorphableModel.mat", "BFM/similarity_Lm3D_all.mat", "manifest.json"]
    assert (tmp_path / "BFM/similarity_Lm3D_all.mat").read_bytes() == members["BFM_Fitting/similarity_Lm3D_all.mat"]
    entry = read_manifest(tmp_path)["assets"]["bfm"]
    assert entry["sha256"] == _sha(blob) and entry["size"] == len(blob)
    assert entry["files"] == ["BFM/01_MorphableModel.mat", "BFM/similarity_Lm3D_all.mat"]

    server.files["interfacegan_directions-20230323T133213Z-001.zip"] = _zip(
        {"interfacegan_directions/age.pt": b"a" * 100, "interfacegan_directions/pose.pt": b"p" * 100})
    download_asset(_asset(server, "interfacegan"), tmp_path, **QUIET)
    assert (tmp_path / "interfacegan_directions/pose.pt").read_bytes() == b"p" * 100


def _corrupt_member(blob: bytes, member: bytes) -> bytes:
    """Flip bytes inside the compressed data of ``member`` (CRC / inflate will fail)."""
    at = blob.index(member) + len(member) + 40  # local header name, then compressed data
    return blob[:at] + bytes(b ^ 0xFF for b in blob[at:at + 16]) + blob[at + 16:]


@pytest.mark.parametrize("damage", ["member", "garbage", "truncated"])
def test_corrupted_zip_extracts_nothing(server, tmp_path, damage):
    members = {"BFM_Fitting/BFM_model_front.mat": _payload(20_000, 9),
               "BFM_Fitting/similarity_Lm3D_all.mat": _payload(20_000, 10)}
    blob = _zip(members)
    if damage == "member":
        blob = _corrupt_member(blob, b"BFM_Fitting/similarity_Lm3D_all.mat")
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:  # the damage is inside, not in the directory
            assert zf.namelist() == list(members)
    elif damage == "garbage":
        blob = b"<html>rate limited</html>" * 50
    else:
        blob = blob[: len(blob) - 300]
    server.files["BFM_Fitting.zip"] = blob
    with pytest.raises(DownloadError) as err:
        download_asset(_asset(server, "bfm"), tmp_path, **QUIET)
    msg = str(err.value)
    assert "\n" not in msg and "archive is corrupted" in msg and "run the command again" in msg
    assert list(tmp_path.iterdir()) == []  # no final names, no .part, no staging leftovers


def test_zip_with_path_traversal_is_refused(tmp_path):
    root = tmp_path / "ckpt"
    archive = tmp_path / "evil.zip"
    archive.write_bytes(_zip({"BFM_Fitting/similarity_Lm3D_all.mat": b"ok", "BFM_Fitting/../../escape.txt": b"x"}))
    with pytest.raises(DownloadError, match="points outside the target folder"):
        unpack(archive, root, into="BFM", strip="BFM_Fitting/", required=["BFM/similarity_Lm3D_all.mat"])
    assert not (tmp_path / "escape.txt").exists() and _tree(root) == []
    archive.write_bytes(_zip({"/etc/passwd_copy": b"x"}))
    with pytest.raises(DownloadError, match="absolute path"):
        unpack(archive, root)
    assert _tree(root) == []


def test_zip_without_expected_file_is_refused(server, tmp_path):
    server.files["BFM_Fitting.zip"] = _zip({"BFM_Fitting/other.mat": b"x"})
    with pytest.raises(DownloadError, match=r"does not contain BFM/similarity_Lm3D_all\.mat"):
        download_asset(_asset(server, "bfm"), tmp_path, **QUIET)
    assert _tree(tmp_path) == []


def test_download_all_continues_past_failures(server, tmp_path):
    server.files["ffhq_pca.pt"] = b"pca"
    chosen = assets_mod.select(assets_mod.registry(mirror=server.base), ["hfgi", "ganspace"])
    results = download_all(chosen, tmp_path, **QUIET)
    assert [(r.asset, r.status) for r in results] == [("hfgi", "failed"), ("ganspace", "downloaded")]
    assert "HTTP 404" in results[0].message


# --------------------------------------------------------------------------- console entry

def _cli(*args, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(STYLEHEAT), *args], capture_output=True, text=True, timeout=120, env=full_env)


def test_console_help():
    top = _cli("--help")
    assert top.returncode == 0
    assert "download" in top.stdout and "doctor" in top.stdout
    sub = _cli("download", "--help")
    assert sub.returncode == 0
    for opt in ("--dir", "--only", "--force", "--mirror", "STYLEHEAT_CHECKPOINTS"):
        assert opt in sub.stdout


def test_console_download_from_mirror(server, tmp_path):
    data = _payload(70_000, seed=11)
    server.files["ffhq_pca.pt"] = data
    server.files["epoch_20.pth"] = data[::-1]
    proc = _cli("download", "--dir", str(tmp_path), "--mirror", server.base, "--only", "ganspace", "Deep3D/epoch_20.pth")
    assert proc.returncode == 0, proc.stderr
    assert "What to do next" in proc.stdout and "styleheat doctor" in proc.stdout
    assert (tmp_path / "Deep3D/epoch_20.pth").read_bytes() == data[::-1]
    assert set(read_manifest(tmp_path)["assets"]) == {"ganspace", "deep3d"}

    proc = _cli("download", "--dir", str(tmp_path), "--mirror", server.base, "--only", "hfgi", "--retries", "0")
    assert proc.returncode == 1
    assert "HTTP 404" in proc.stderr and "--only hfgi" in proc.stderr

    proc = _cli("download", "--dir", str(tmp_path), "--only", "bogus")
    assert proc.returncode == 2 and "unknown asset 'bogus'" in proc.stderr

    proc = _cli("download", "--dir", str(tmp_path), "--mirror", "mirror.example/files", "--only", "hfgi")
    assert proc.returncode == 2 and "--mirror: the mirror must be an http:// or https:// URL" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_console_uses_env_dir(server, tmp_path):
    server.files["ffhq_pca.pt"] = b"x" * 10
    target = tmp_path / "from-env"
    proc = _cli("download", "--mirror", server.base, "--only", "ganspace",
                env={"STYLEHEAT_CHECKPOINTS": str(target)})
    assert proc.returncode == 0, proc.stderr
    assert "STYLEHEAT_CHECKPOINTS" in proc.stdout
    assert (target / "ffhq_pca.pt").read_bytes() == b"x" * 10
