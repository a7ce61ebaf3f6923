"""The farm driver: validate the inputs, plan, start or join the Ray cluster, hand out chunks, write the
manifest, and leave no cluster behind.

Everything that can be checked without a cluster (motion, portrait, audio, checkpoints, output folder)
is checked first, so a bad input fails in a second with its message and starts nothing.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.farm.plan import Manifest, frame_file, frames_to_render, make_chunks, portrait_identity

LOOPBACK = "127.0.0.1"
DEFAULT_CHUNK = 16
PROG = "styleheat farm render"


class FarmError(Exception):
    """A failure with a sentence for the user; ``code`` is the exit status (2: bad input, 1: failure)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass
class FarmOptions:
    source: str
    motion: str
    out: str
    audio: str | None = None
    address: str | None = None
    chunk: int = DEFAULT_CHUNK
    workers: int | None = None
    cpu: bool = False
    tiny_random: bool = False
    seed: int = 0
    checkpoints: str | None = None
    bundle: str | None = None
    config: str | None = None
    size: int | None = None
    precision: str | None = None
    batch_size: int | None = None
    max_restarts: int = 2
    quiet: bool = False
    report: str | None = None
    output: str = "crop"          # crop | composite | matte (server/shots/compositing.py)
    align: str = "auto"           # auto | yes | no (server/shots/source.py)
    seam: str = "feather"
    start: int | None = None      # scene frames (the motion's first_frame + row) to render; None: the clip's ends
    end: int | None = None
    progress_json: bool = False   # one JSON object per line on stdout: start, progress, done (for the add-on)


@dataclass
class Job:
    """A validated job: inputs in memory, the per-row hashes and what is left to render."""
    options: FarmOptions
    out: Path
    spec: dict
    portrait: np.ndarray
    rows: np.ndarray
    attributes: dict
    mel: np.ndarray | None
    placing: dict | None          # output != crop: {output, photo, quad, shape, seam} for the workers
    hashes: dict[int, str]
    manifest: Manifest
    planned: list[int]
    chunks: list[list[int]] = field(default_factory=list)
    engine: dict = field(default_factory=dict)   # model name, real_weights, sizes, identity: as a server's hello


# ------------------------------------------------------------------------------------------ validation
def _engine_spec(o: FarmOptions) -> tuple[dict, str, str]:
    """(spec for the workers, model key for the hash, extra key) -- checks that the files exist."""
    from server.model_options import read_config

    precision = o.precision
    if o.tiny_random:
        if o.checkpoints or o.bundle or o.config:
            raise FarmError("--tiny-random takes no --checkpoints, --bundle or --config", 2)
        spec: dict[str, Any] = {"kind": "tiny", "seed": int(o.seed)}
        model = f"tiny-random (seed {o.seed})"
    elif o.bundle:
        if o.checkpoints:
            raise FarmError("give --checkpoints or --bundle, not both", 2)
        path = Path(o.bundle).resolve()
        if not path.is_file():
            raise FarmError(f"--bundle {o.bundle}: file not found (the workers read it from the same path: "
                            f"put it on shared storage)", 2)
        spec = {"kind": "bundle", "path": str(path)}
        model = f"bundle:{path}"
    else:
        from server.checkpoints.paths import resolve_checkpoint_dir

        try:
            directory, _ = resolve_checkpoint_dir(o.checkpoints, option="--checkpoints")
            config = read_config(o.config)
        except ValueError as e:
            raise FarmError(str(e), 2) from None
        spec = {"kind": "checkpoints", "path": str(Path(directory).resolve()),
                "config": config.to_dict() if config is not None else None}
        model = f"checkpoints:{spec['path']}"
    spec["precision"] = precision
    extra = f"precision={precision or 'default'}|config={json.dumps(spec.get('config'), sort_keys=True)}"
    return spec, model, extra


def _engine_description(spec: dict) -> dict:
    """What a server with this model says in its hello (model name, real_weights, native size, sizes), so the
    add-on hashes farm frames exactly as frames a server rendered (server/engine.py names the models)."""
    from models.styleheat import StyleHEATConfig

    if spec["kind"] == "tiny":
        desc = {"model": f"tiny-random (seed {spec['seed']})", "real_weights": False,
                "native_size": StyleHEATConfig.tiny().size}
    elif spec["kind"] == "bundle":
        desc = {"model": f"StyleHEAT (bundle {Path(spec['path']).name})", "real_weights": True, "native_size": None}
    else:
        native = (StyleHEATConfig.from_dict(spec["config"]) if spec.get("config") else StyleHEATConfig()).size
        desc = {"model": "StyleHEAT (official checkpoints)", "real_weights": True, "native_size": native}
    sizes, s = [], desc["native_size"]
    while s and s >= max(64, desc["native_size"] // 4):
        sizes.append(s)
        s //= 2
    desc["sizes"] = sizes
    return desc


def _check_size(o: FarmOptions, spec: dict) -> None:
    """--size against the sizes Engine.render accepts (powers of two from max(64, native/4) to native),
    where the native size is known without loading weights (a bundle's is checked by the workers)."""
    if o.size is None or spec["kind"] == "bundle":
        return
    from models.styleheat import StyleHEATConfig

    if spec["kind"] == "tiny":
        native = StyleHEATConfig.tiny().size
    else:
        native = (StyleHEATConfig.from_dict(spec["config"]) if spec.get("config") else StyleHEATConfig()).size
    sizes, s = [], native
    while s >= max(64, native // 4):
        sizes.append(s)
        s //= 2
    if o.size not in sizes:
        raise FarmError(f"unsupported --size {o.size}; this model renders {sorted(sizes)}", 2)


def _read_audio(path: str, fps: float, n: int, first_frame: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(mono PCM, mel windows (n, 80, 32), sample rate); FarmError if the audio path is unavailable here."""
    from server.preprocessing.audio import AudioError, read_audio
    from server.service.bake_models import find_audio_converter

    convert, note = find_audio_converter()
    if convert is None:
        raise FarmError(f"--audio cannot be used on this machine: {note}", 2)
    try:
        samples, sr = read_audio(path)
    except AudioError as e:
        raise FarmError(f"--audio {e}", 2) from None
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    try:
        mel = np.asarray(convert(mono, sr, fps, n, first_frame, first_frame), dtype=np.float32)
    except ValueError as e:
        raise FarmError(f"--audio {path}: {e}", 2) from None
    return mono, mel, int(sr)


def prepare(o: FarmOptions) -> Job:
    """Validate every input and plan the job; FarmError (code 2) on bad input. Starts no cluster."""
    from server import protocol
    from server.frame_files import read_portrait
    from server.preprocessing.motion import MotionError, read_motion

    if o.chunk < 1:
        raise FarmError(f"--chunk must be at least 1, got {o.chunk}", 2)
    if o.workers is not None and o.workers < 1:
        raise FarmError(f"--workers must be at least 1, got {o.workers}", 2)
    if o.batch_size is not None and o.batch_size < 1:
        raise FarmError(f"--batch-size must be at least 1, got {o.batch_size}", 2)
    from server.shots.source import portrait_from_photo

    try:
        motion = read_motion(o.motion)
        photo = read_portrait(Path(o.source), square=False)
        src = portrait_from_photo(photo, align=o.align, name=f"--source {o.source}")
    except (MotionError, ValueError) as e:
        raise FarmError(str(e), 2) from None
    portrait = src.portrait
    placing = None
    if o.output != "crop":
        placing = {"output": o.output, "photo": photo if o.output == "composite" else None,
                   "quad": src.placement.quad, "shape": src.placement.source_shape, "seam": o.seam}
    spec, model, extra = _engine_spec(o)
    extra += f"|output={o.output}|seam={o.seam if o.output == 'composite' else '-'}"
    if o.output != "crop":   # the photo and where the crop sits in it decide the placed frame's pixels too
        extra += f"|placement={src.placement.key()}|photo={portrait_identity(photo)}"
    _check_size(o, spec)
    out = Path(o.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FarmError(f"cannot create output folder {out}: {e.strerror or e}", 2) from None
    n = motion.num_frames
    pcm = mel = None
    samples_per_frame = 0.0
    if o.audio:
        pcm, mel, sr = _read_audio(o.audio, motion.fps, n, motion.first_frame)
        samples_per_frame = sr / motion.fps
    rows = np.asarray(motion.rows, dtype=np.float32)
    attributes = {k: np.asarray(v) for k, v in (motion.attributes or {}).items()}
    first, last = motion.first_frame, motion.first_frame + n - 1
    lo = first if o.start is None else o.start
    hi = last if o.end is None else o.end
    if not first <= lo <= hi <= last:
        raise FarmError(f"--start {lo} / --end {hi}: the motion's rows cover scene frames {first}..{last} "
                        f"(first_frame {first}, {n} rows); pick a range inside them", 2)
    hashes = protocol.frame_hashes(portrait_identity(portrait), model, int(o.size or 0), rows,
                                   range(lo - first, hi - first + 1),
                                   audio=pcm, samples_per_frame=samples_per_frame, attributes=attributes or None,
                                   extra=extra)
    manifest = Manifest.load(out)
    planned = frames_to_render(manifest, out, hashes)
    job = Job(options=o, out=out, spec=spec, portrait=portrait, rows=rows, attributes=attributes, mel=mel,
              placing=placing, hashes=hashes, manifest=manifest, planned=planned, chunks=make_chunks(planned, o.chunk),
              engine=dict(_engine_description(spec), identity=portrait_identity(portrait), first_frame=first))
    manifest.info = {"model": model, "source": str(Path(o.source).resolve()),
                     "motion": str(Path(o.motion).resolve()), "audio": o.audio and str(Path(o.audio).resolve()),
                     "size": o.size, "precision": o.precision, "frames": n, "output": o.output}
    return job


# ------------------------------------------------------------------------------------------ cluster
def _is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


def _start_ray(o: FarmOptions, n_workers: int | None):
    """ray.init: join ``--address`` (token authentication required off loopback) or start a local cluster
    bound to 127.0.0.1 with a fresh per-run token. Returns the ray module."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if o.address:
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" and not _is_loopback(o.address):
            raise FarmError(f"--address {o.address} is not on this machine and RAY_AUTH_MODE=disabled: the farm "
                            f"only joins a remote cluster with Ray's token authentication on (docs/farm.md)", 2)
    else:
        # keep every socket of the local cluster on loopback, and give it a token nobody else has
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        if not any(os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    try:
        import ray
    except ImportError:
        raise FarmError("the render farm needs Ray: pip install 'styleheat-blender[farm]' (ray==2.60.0)", 2) from None
    common = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR", configure_logging=True)
    if o.address:
        ray.init(address=o.address, **common)
    else:
        cpus = os.cpu_count() or 1
        gpus = 0
        if not o.cpu:
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        ray.init(num_cpus=max(cpus, n_workers or 1), num_gpus=gpus, _node_ip_address=LOOPBACK, **common)
    return ray


def _cluster_pids(ray) -> list[int]:
    """pids of the cluster processes this driver started (gcs, raylet, ...); [] when it joined one."""
    try:
        node = ray._private.worker._global_node
        procs = node.all_processes if node is not None else {}
        return sorted(int(p.process.pid) for infos in procs.values() for p in infos if p.process is not None)
    except Exception:  # noqa: BLE001 -- private API: best effort, for the report only
        return []


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}" if not isinstance(cause, ValueError) else str(cause)
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


# ------------------------------------------------------------------------------------------ run
def run(o: FarmOptions, log=print) -> int:
    def say(msg: str) -> None:
        if not o.quiet:
            print(msg, file=sys.stderr)

    try:
        job = prepare(o)
    except FarmError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.code
    n = len(job.hashes)
    report: dict[str, Any] = {"frames_total": n, "planned": job.planned, "chunks": job.chunks, "rendered": [],
                              "workers": [], "restarts": 0, "cluster": {}, "engine": job.engine,
                              "hashes": {str(r): h for r, h in sorted(job.hashes.items())}}
    progress(o, "start", total=len(job.planned), frames=n)
    say(f"{len(job.planned)} of {n} frames to render in {len(job.chunks)} chunks "
        f"({n - len(job.planned)} already current in {job.out})")
    if not job.planned:
        _write_report(o, report)
        log(f"nothing to do: all {n} frames in {job.out} are current")
        progress(o, "done", done=0, total=0, status=0)
        return 0
    ray = None
    status = 1
    try:
        ray = _start_ray(o, o.workers)
        status = _farm(ray, job, report, say, log)
    except FarmError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        status = e.code
    except KeyboardInterrupt:
        print(f"{PROG}: cancelled; {len(report['rendered'])} frames finished and recorded in the manifest; "
              f"run the same command again to render the rest", file=sys.stderr)
        status = 130
    finally:
        if ray is not None:
            try:
                ray.shutdown()
            except Exception:  # noqa: BLE001
                pass
        _remove_temporaries(job.out)
        _write_report(o, report)
        progress(o, "done", done=len(report["rendered"]), total=len(job.planned), status=status)
    return status


def progress(o: FarmOptions, event: str, **fields) -> None:
    """--progress-json: one JSON object per line on stdout ({"event": "start" | "progress" | "done", ...})."""
    if o.progress_json:
        print(json.dumps(dict(event=event, **fields)), flush=True)


def _farm(ray, job: Job, report: dict, say, log) -> int:
    from ray.exceptions import RayActorError, RayTaskError
    from tqdm import tqdm

    from server.farm.worker import FarmWorker

    o = job.options
    report["cluster"] = {"address": o.address or "local", "pids": _cluster_pids(ray),
                         "nodes": sorted({nd.get("NodeManagerAddress") for nd in ray.nodes() if nd.get("Alive")})}
    gpus = int(ray.cluster_resources().get("GPU", 0)) if not o.cpu else 0
    if gpus:
        count = min(gpus, o.workers or gpus)
        resources = {"num_gpus": 1, "num_cpus": 1}
        device = "cuda"
    else:
        count = o.workers or 1
        cpus = int(ray.cluster_resources().get("CPU", 1))
        resources = {"num_cpus": max(1, cpus // count) if not o.address else 1}
        device = "cpu"
    count = min(count, len(job.chunks))
    spec = dict(job.spec, device=device)
    actor_cls = ray.remote(max_restarts=o.max_restarts, max_task_retries=o.max_restarts, **resources)(FarmWorker)
    shared = [ray.put(x) for x in (job.portrait, job.rows, job.attributes or None, job.mel, job.placing)]
    actors = [actor_cls.remote(spec, str(job.out.resolve()), o.size, o.batch_size) for _ in range(count)]
    say(f"starting {count} {'GPU' if gpus else 'CPU'} worker(s) on {report['cluster']['address']} cluster")
    pids: dict[int, set[int]] = {i: set() for i in range(count)}
    try:
        for i, info in enumerate(ray.get([a.info.remote() for a in actors])):
            pids[i].add(info["pid"])
    except RayActorError as e:
        raise FarmError(f"a worker could not load the model: {_cause(e)}") from None
    queue = deque(job.chunks)
    pending: dict[Any, tuple[int, list[int]]] = {}

    def submit(i: int) -> None:
        if queue:
            chunk = queue.popleft()
            pending[actors[i].render_chunk.remote(chunk, *shared)] = (i, chunk)

    for i in range(count):
        submit(i)
    latest: dict[int, dict] = {}
    bar = tqdm(total=len(job.planned), unit="frame", desc="farm", file=sys.stderr, disable=o.quiet)
    t0 = time.time()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                i, chunk = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except RayTaskError as e:
                    raise FarmError(f"rendering rows {chunk[0]}..{chunk[-1]} failed: {_cause(e)}") from None
                except RayActorError as e:
                    raise FarmError(f"a worker died more than --max-restarts={o.max_restarts} times while "
                                    f"rendering rows {chunk[0]}..{chunk[-1]}: {_cause(e)}") from None
                frames = [int(f) for f in result.pop("frames")]
                pids[i].add(result["pid"])
                latest[i] = result
                job.manifest.record(frames, job.hashes)
                job.manifest.save(job.out)
                report["rendered"].extend(frames)
                bar.update(len(frames))
                progress(o, "progress", done=len(report["rendered"]), total=len(job.planned),
                         fps=round(len(report["rendered"]) / max(time.time() - t0, 1e-9), 3))
                submit(i)
    except BaseException:
        for ref in pending:
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001
                pass
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        raise
    finally:
        bar.close()
        report["workers"] = [dict(latest.get(i, {}), pids=sorted(pids[i])) for i in range(count)]
        report["restarts"] = sum(len(p) - 1 for p in pids.values())
    for a in actors:
        ray.kill(a, no_restart=True)
    dt = time.time() - t0
    done = len(report["rendered"])
    log(f"wrote {done} frames to {job.out} with {count} worker(s) in {dt:.1f} s ({done / max(dt, 1e-9):.2f} "
        f"frames/s); restarts: {report['restarts']}")
    return 0


def _remove_temporaries(out: Path) -> None:
    """Half-written frames of killed workers (their .tmp files); complete frames stay."""
    try:
        for p in out.glob(".frame_*.png.tmp"):
            p.unlink(missing_ok=True)
    except OSError:
        pass


def _write_report(o: FarmOptions, report: dict) -> None:
    if not o.report:
        return
    path = Path(o.report)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1), encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["FarmError", "FarmOptions", "Job", "prepare", "run", "frame_file"]
