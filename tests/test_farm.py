"""`styleheat farm render` on a real local Ray cluster (127.0.0.1, tiny random weights), run as the real CLI.

Every farm run is a subprocess with a hard timeout; while it runs the test records the pids of all its
descendants (gcs, raylet, workers) and their listening TCP sockets, and afterwards checks by pid that none
is left and that nothing listened off loopback.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("ray")

from server_launch import REPO, cli_command  # noqa: E402

from server import protocol  # noqa: E402

N_FRAMES = 60
RUN_TIMEOUT = 150.0        # one farm run: ray.init + 2 workers (torch import, tiny model) on a loaded 2-core box
CRASH_MARKER = ".styleheat-farm-crash-once"


# ------------------------------------------------------------------------------------------ processes
def _ppid_map() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            out[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppid_map().items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def follow(proc: subprocess.Popen, what: str, timeout: float, tick=None) -> tuple[str, set[int]]:
    """Wait for ``proc``, recording the pids of all its descendants (``tick(pids now)`` each round); then
    (its output, every pid seen). Fails if it overruns ``timeout`` or leaves any descendant running: those
    are given 15 s to exit and then killed by pid."""
    pids: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} exceeded {timeout} s")
            now = _descendants(proc.pid)
            pids |= now
            if tick is not None:
                tick(now)
            time.sleep(0.25)
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            pids |= _descendants(proc.pid)
            proc.kill()
            proc.wait(10)
        # shutdown is bounded: give the cluster a few seconds to exit, then kill what we started, by pid
        end = time.monotonic() + 15
        while any(_alive(p) for p in pids) and time.monotonic() < end:
            time.sleep(0.2)
        left = sorted(p for p in pids if _alive(p))
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
    assert not left, f"processes left after the {what}: {left}"
    return output, pids


def _listen_table() -> dict[str, str]:
    """socket inode -> listening local address 'ip:port' (IPv4 and IPv6) of this network namespace."""
    out = {}
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] != "0A":       # LISTEN
                continue
            hexip, hexport = parts[1].split(":")
            if v6:
                ip = "::1" if hexip == "00000000000000000000000001000000" else (
                    "::" if set(hexip) == {"0"} else f"v6:{hexip}")
                if hexip.startswith("0000000000000000FFFF0000"):   # IPv4-mapped
                    b = bytes.fromhex(hexip[24:])[::-1]
                    ip = ".".join(str(x) for x in b)
            else:
                ip = ".".join(str(x) for x in bytes.fromhex(hexip)[::-1])
            out[parts[9]] = f"{ip}:{int(hexport, 16)}"
    return out


def _listening(pids: set[int]) -> set[str]:
    table = _listen_table()
    found = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in table:
                found.add(table[link[8:-1]])
    return found


def farm(*args: str, timeout: float = RUN_TIMEOUT, interrupt_when=None) -> tuple[int, str, set[int], set[str]]:
    """Run `styleheat farm render ARGS`; (rc, stderr+stdout, pids of every descendant seen, listening
    addresses seen). ``interrupt_when()`` true: send it SIGINT (Ctrl-C) once. Fails the test (after killing
    them by pid) if it overruns or leaves a process."""
    argv = cli_command("farm", "render", *args)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_AUTH_MODE", None)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    listening: set[str] = set()

    def tick(now: set[int]) -> None:
        nonlocal interrupt_when
        if interrupt_when is not None and interrupt_when():
            proc.send_signal(signal.SIGINT)
            interrupt_when = None
        listening.update(_listening(now))

    output, pids = follow(proc, f"farm run {' '.join(argv)}", timeout, tick)
    return proc.returncode, output, pids, listening


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def ray_tmpdir():
    """Ray's session folders (logs, sockets) of these runs go to a short temporary folder, removed at the end."""
    import tempfile

    d = tempfile.mkdtemp(prefix="sh-ray-", dir="/tmp")   # short: Ray's unix socket paths must stay < 108 chars
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = d
    try:
        yield d
    finally:
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """Portrait, a 60-row motion, and the single-process `styleheat render --tiny-random` of it."""
    from server.preprocessing.motion import write_motion

    d = tmp_path_factory.mktemp("farm")
    rng = np.random.default_rng(3)
    portrait = cv2.GaussianBlur(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), (0, 0), 3)
    cv2.imwrite(str(d / "face.png"), cv2.cvtColor(portrait, cv2.COLOR_RGB2BGR))
    rows = rng.standard_normal((N_FRAMES, 73)).astype(np.float32) * 0.4
    rows[:, 70] += 1
    write_motion(d / "motion.json", rows)
    render_single(d, d / "motion.json", d / "ref")
    return d, rows


def render_single(d: Path, motion: Path, out: Path) -> None:
    """`styleheat render --tiny-random` in this process, on one torch thread like each farm CPU worker (a 2-CPU
    cluster gives each of its 2 workers one CPU; CPU convolutions may round differently with another thread
    count, so bit-identity is only promised for equal thread counts)."""
    import torch

    from server import cli

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = cli.main(["render", "--tiny-random", "--device", "cpu", "--quiet", "--source", str(d / "face.png"),
                       "--motion", str(motion), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0


def _frames(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(folder.glob("frame_*.png"))}


def _assert_same_frames(got: Path, want: Path) -> None:
    a, b = _frames(got), _frames(want)
    assert sorted(a) == sorted(b) == [f"frame_{i:05d}.png" for i in range(N_FRAMES)]
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert not list(got.glob(".*.tmp")), "temporary files left in the job folder"


def _base(d: Path, out: Path, *extra: str) -> list[str]:
    return ["--tiny-random", "--source", str(d / "face.png"), "--motion", str(d / "motion.json"),
            "--out", str(out), "--workers", "2", "--chunk", "6", "--quiet", "--report", str(out) + ".json", *extra]


@pytest.fixture(scope="module")
def farmed(clip):
    """One clean 2-worker farm run of the clip (shared by the tests that compare against it)."""
    d, _ = clip
    out = d / "farm"
    rc, output, pids, listening = farm(*_base(d, out))
    assert rc == 0, output
    return out, json.loads(Path(str(out) + ".json").read_text()), pids, listening


# ------------------------------------------------------------------------------------------ tests
def test_frame_hashes_are_the_addons():
    """protocol.frame_hashes keeps the add-on's algorithm (its sidecars stay valid)."""
    from blender_addon import frames as addon_frames

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((40, 73)).astype(np.float32)
    audio = rng.standard_normal(16000 * 2).astype(np.float32)
    attrs = {"age": rng.uniform(-1, 1, 40), "pose": rng.uniform(-1, 1, 40)}
    for kw in ({}, dict(audio=audio, samples_per_frame=640.0, attributes=attrs, extra="x")):
        ours = protocol.frame_hashes("id1", "model", 256, rows, range(40), **kw)
        theirs = addon_frames.frame_hashes("id1", "model", 256, rows, range(40), **kw)
        assert ours == theirs
    changed = rows.copy()
    changed[20, 5] += 1
    h0 = protocol.frame_hashes("id1", "m", 256, rows, range(40))
    h1 = protocol.frame_hashes("id1", "m", 256, changed, range(40))
    assert {i for i in range(40) if h0[i] != h1[i]} == set(range(7, 34))   # the 27-row windows that see row 20


def test_two_workers_match_single_process(clip, farmed):
    d, _ = clip
    out, report, pids, listening = farmed
    _assert_same_frames(out, d / "ref")
    assert report["planned"] == list(range(N_FRAMES)) and sorted(report["rendered"]) == list(range(N_FRAMES))
    assert all(len(c) <= 6 and c == list(range(c[0], c[-1] + 1)) for c in report["chunks"])
    workers = report["workers"]
    assert len(workers) == 2 and report["restarts"] == 0
    for w in workers:   # each worker built its model once and inverted the portrait once
        assert w["engines_built"] == 1 and w["inversions"] == 1 and w["chunks_done"] >= 1, w
        assert w["pid"] in pids and w["node"] == "127.0.0.1"
    assert sum(w["frames_written"] for w in workers) == N_FRAMES
    # the local cluster lives on loopback only: ray's node address, and every listening socket of its processes
    assert report["cluster"]["nodes"] == ["127.0.0.1"]
    assert set(report["cluster"]["pids"]) <= pids and report["cluster"]["pids"]
    assert listening and all(a.startswith("127.0.0.1:") for a in listening), listening
    manifest = json.loads((out / "styleheat_farm.json").read_text())
    assert sorted(manifest["frames"], key=int) == [str(i) for i in range(N_FRAMES)]
    assert manifest["frames"]["7"]["file"] == "frame_00007.png"


def test_worker_killed_mid_chunk_is_restarted_and_its_chunk_retried(clip):
    d, _ = clip
    out = d / "crash"
    out.mkdir()
    (out / CRASH_MARKER).write_text("exit once")
    rc, output, pids, _ = farm(*_base(d, out))
    assert rc == 0, output
    report = json.loads(Path(str(out) + ".json").read_text())
    assert not (out / CRASH_MARKER).exists() and (out / f"{CRASH_MARKER}.taken").exists()
    assert report["restarts"] == 1, report["workers"]
    restarted = [w for w in report["workers"] if len(w["pids"]) == 2]
    assert len(restarted) == 1 and restarted[0]["engines_built"] == 1   # a new process ran the constructor
    assert sorted(set(report["rendered"])) == list(range(N_FRAMES))
    (out / f"{CRASH_MARKER}.taken").unlink()
    _assert_same_frames(out, d / "ref")


def test_resume_renders_only_missing_and_changed_frames(clip, farmed, tmp_path):
    from server.preprocessing.motion import write_motion

    d, rows = clip
    out = tmp_path / "resume"
    shutil.copytree(farmed[0], out)
    deleted = [0, 1, 2, 10, 20]
    for i in deleted:
        (out / f"frame_{i:05d}.png").unlink()
    changed = rows.copy()
    changed[[55, 56, 57], :64] += 0.5
    motion = tmp_path / "changed.json"
    write_motion(motion, changed)
    # a frame's pixels depend on the 27 rows around it: rows 55..57 reach frames 42..59
    expected = sorted(set(deleted) | set(range(42, N_FRAMES)))
    args = ["--tiny-random", "--source", str(d / "face.png"), "--motion", str(motion), "--out", str(out),
            "--workers", "2", "--chunk", "6", "--quiet", "--report", str(tmp_path / "r.json")]
    rc, output, _, _ = farm(*args)
    assert rc == 0, output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["planned"] == expected
    assert sorted(report["rendered"]) == expected
    assert [c for c in report["chunks"]] == [[0, 1, 2], [10], [20], list(range(42, 48)), list(range(48, 54)),
                                             list(range(54, 60))]
    # every frame, re-rendered or kept, equals a fresh single-process render of the changed motion
    render_single(d, motion, tmp_path / "ref2")
    # kept frames are bit-identical; a re-rendered frame whose batch partner was not re-rendered (frame 2 runs
    # alone, frame 10 too) went through a batch of another size, which on CPU may round 1 level differently
    got, want = _frames(out), _frames(tmp_path / "ref2")
    assert sorted(got) == sorted(want) == [f"frame_{i:05d}.png" for i in range(N_FRAMES)]
    for name in got:
        diff = np.abs(got[name].astype(int) - want[name].astype(int)).max()
        assert diff <= (1 if int(name[6:11]) in expected else 0), name
    assert not np.array_equal(cv2.imread(str(out / "frame_00045.png")), cv2.imread(str(d / "ref" / "frame_00045.png")))
    # and a third run has nothing to do, without starting a cluster
    rc, output, pids, _ = farm(*args)
    assert rc == 0 and "nothing to do" in output and not pids, output
    assert json.loads((tmp_path / "r.json").read_text())["planned"] == []


def test_start_end_render_only_that_range_with_json_progress(clip, tmp_path):
    """--start/--end are scene frames (first_frame + row): rows outside are context only; --progress-json prints
    machine-readable lines (what the add-on's Render on Farm reads); the report describes the engine."""
    from server.preprocessing.motion import write_motion

    d, rows = clip
    motion = tmp_path / "shifted.json"
    write_motion(motion, rows, first_frame=100)
    out = tmp_path / "range"
    rc, output, _, _ = farm("--tiny-random", "--source", str(d / "face.png"), "--motion", str(motion),
                            "--out", str(out), "--workers", "1", "--chunk", "4", "--quiet", "--start", "110",
                            "--end", "117", "--progress-json", "--report", str(tmp_path / "r.json"))
    assert rc == 0, output
    events = [json.loads(ln) for ln in output.splitlines() if ln.startswith("{")]
    assert events[0] == {"event": "start", "total": 8, "frames": 8}
    assert [e["done"] for e in events if e["event"] == "progress"] == [4, 8]
    assert events[-1]["event"] == "done" and events[-1]["status"] == 0 and events[-1]["done"] == 8
    assert sorted(p.name for p in out.glob("frame_*.png")) == [f"frame_{i:05d}.png" for i in range(10, 18)]
    for i in range(10, 18):   # the same pixels as those rows of the whole clip (same windows)
        diff = np.abs(cv2.imread(str(out / f"frame_{i:05d}.png")).astype(int)
                      - cv2.imread(str(d / "ref" / f"frame_{i:05d}.png")).astype(int)).max()
        assert diff <= 1, i
    report = json.loads((tmp_path / "r.json").read_text())
    assert sorted(int(r) for r in report["hashes"]) == list(range(10, 18))
    assert report["engine"]["model"] == "tiny-random (seed 0)" and report["engine"]["real_weights"] is False
    assert report["engine"]["first_frame"] == 100 and report["engine"]["sizes"] == [128, 64]
    rc, output, _, _ = farm("--tiny-random", "--source", str(d / "face.png"), "--motion", str(motion),
                            "--out", str(out), "--start", "90", "--end", "117")
    assert rc == 2 and "scene frames 100..159" in output, output


@pytest.mark.parametrize("case", ["row_width", "missing_portrait", "bad_chunk", "bad_size"])
def test_bad_input_is_a_clear_error_and_starts_no_cluster(clip, tmp_path, case):
    d, rows = clip
    source, motion, extra = d / "face.png", d / "motion.json", []
    if case == "row_width":
        motion = tmp_path / "wide.json"
        data = json.loads((d / "motion.json").read_text())
        data["rows"] = [r + [0.0] for r in data["rows"]]
        motion.write_text(json.dumps(data))
        want = "must be a list of 73 numbers"
    elif case == "missing_portrait":
        source = tmp_path / "nobody.png"
        want = f"--source {source}: file not found"
    elif case == "bad_chunk":
        extra = ["--chunk", "0"]
        want = "--chunk must be at least 1"
    else:
        extra = ["--size", "100"]
        want = "unsupported --size 100; this model renders [64, 128]"
    t0 = time.monotonic()
    rc, output, pids, _ = farm("--tiny-random", "--source", str(source), "--motion", str(motion),
                               "--out", str(tmp_path / "out"), "--quiet", *extra, timeout=60)
    assert rc == 2, output
    assert want in output and "Traceback" not in output, output
    assert not pids, "a process (Ray cluster) was started for bad input"
    assert time.monotonic() - t0 < 60


def test_ctrl_c_stops_the_cluster_and_leaves_only_complete_frames(clip, tmp_path):
    from server.preprocessing.motion import write_motion

    d, rows = clip
    motion = tmp_path / "long.json"
    write_motion(motion, np.tile(rows, (10, 1)))      # 600 rows: seconds of work left at the Ctrl-C
    out = tmp_path / "out"
    rc, output, pids, _ = farm("--tiny-random", "--source", str(d / "face.png"), "--motion", str(motion),
                               "--out", str(out), "--workers", "2", "--chunk", "4", "--quiet",
                               interrupt_when=lambda: len(list(out.glob("frame_*.png"))) >= 12)
    assert rc == 130 and "cancelled" in output and "run the same command again" in output, output
    assert pids   # a cluster ran, and (checked in farm()) none of its processes is left
    files = sorted(p.name for p in out.glob("frame_*.png"))
    assert 12 <= len(files) < 600
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    for name in files:   # complete PNGs only
        img = cv2.imread(str(out / name))
        assert img is not None and img.shape == (128, 128, 3), name
    recorded = json.loads((out / "styleheat_farm.json").read_text())["frames"]
    assert {e["file"] for e in recorded.values()} <= set(files)


def test_render_tiny_random_takes_no_checkpoints(clip, tmp_path, capsys):
    from server import cli

    d, _ = clip
    rc = cli.main(["render", "--tiny-random", "--checkpoints", str(tmp_path), "--source", str(d / "face.png"),
                   "--motion", str(d / "motion.json"), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "--tiny-random takes no --checkpoints" in capsys.readouterr().err


def test_composite_output_matches_the_single_process_render(tmp_path, fixtures_dir):
    """--output composite from an ordinary photo: the farm pastes each frame back exactly as `styleheat render`
    does (same frames, bit for bit), at the photo's size."""
    import torch
    from PIL import Image

    from server import cli
    from server.preprocessing.motion import write_motion

    face = np.asarray(Image.open(fixtures_dir / "portrait_40.jpg").convert("RGB"))
    m = cv2.getRotationMatrix2D((512, 512), 8, 0.3)
    m[:, 2] += (200 - 512, 150 - 512)
    photo = cv2.warpAffine(face, m, (360, 300), borderValue=(70, 120, 160))
    cv2.imwrite(str(tmp_path / "photo.png"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    rows = np.random.default_rng(5).standard_normal((8, 73)).astype(np.float32) * 0.3
    rows[:, 70] += 1
    write_motion(tmp_path / "m.json", rows)
    common = ["--tiny-random", "--source", str(tmp_path / "photo.png"), "--motion", str(tmp_path / "m.json"),
              "--output", "composite", "--quiet"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["render", "--device", "cpu", "--out", str(tmp_path / "ref"), *common]) == 0
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "farm"
    # chunks of 4 keep the batches of 2 the single-process render makes (batch boundaries can move a level)
    rc, output, _, _ = farm(*common, "--out", str(out), "--workers", "2", "--chunk", "4")
    assert rc == 0, output
    a, b = _frames(out), _frames(tmp_path / "ref")
    assert sorted(a) == sorted(b) and len(a) == 8
    for name in a:
        assert a[name].shape == (300, 360, 3)
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
