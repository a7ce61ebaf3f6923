"""The paper's motion-transfer protocol (Table 2) over a folder of test videos.

Same identity: frame 0 of each video (cut with the video's fixed FFHQ crop square, as ``styleheat
extract`` does) is the source; the next N frames' 3DMM rows drive it; every generated frame is compared
with the real frame it reproduces (PSNR, SSIM, LPIPS, CSIM against that frame, AED/APD against that
frame's coefficients) and FID compares the generated set with the real frames.

Cross identity: every source portrait is driven by the first N rows of every video; CSIM against the
source, AED/APD against the driving frame's coefficients, FID between the generated set and the source
portraits.

Each (source, video) result is cached in ``<out>/cache/`` under a hash of its inputs and options, so an
interrupted run resumes where it stopped and gives the same numbers.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from server.evaluation import metrics as M

ALL_METRICS = ("psnr", "ssim", "lpips", "fid", "csim", "aed", "apd")
CROSS_METRICS = ("fid", "csim", "aed", "apd")
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
CACHE_VERSION = 1
THUMBS = 4       # frames kept per pair for the figure
THUMB_SIZE = 128


class EvaluationError(ValueError):
    """Bad input to the protocol (message says what and what to do)."""


@dataclass
class Options:
    frames: int = 500
    size: int = 512
    metrics: tuple[str, ...] = ALL_METRICS
    distance: str = "l1"
    device: str = "cpu"
    precision: str | None = None
    batch_size: int | None = None
    model_id: str = ""          # identifies the StyleHEAT weights (hash key)
    weights: dict = field(default_factory=dict)  # name -> path of the metric networks in use

    def key_fields(self) -> dict:
        files = {}
        for name, path in sorted(self.weights.items()):
            st = Path(path).stat()
            files[name] = [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]
        return {"v": CACHE_VERSION, "frames": self.frames, "size": self.size, "metrics": sorted(self.metrics),
                "distance": self.distance, "precision": self.precision, "model": self.model_id, "weights": files}


def list_files(folder: str | Path, suffixes: set[str], what: str, option: str, limit: int | None) -> list[Path]:
    d = Path(folder)
    if not d.is_dir():
        raise EvaluationError(f"{option} {d}: not a folder; give the folder that holds the {what}")
    found = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not found:
        raise EvaluationError(f"{option} {d}: no {what} in it (looked for {', '.join(sorted(suffixes))})")
    return found[:limit] if limit else found


def _file_key(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def cache_key(kind: str, options: Options, *files: Path) -> str:
    blob = json.dumps({"kind": kind, "opts": options.key_fields(), "files": [_file_key(f) for f in files]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_npz_atomic(path: Path, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


class MetricNets:
    """The networks the chosen metrics need, loaded once."""

    def __init__(self, options: Options, tracker):
        from server.evaluation import networks as N

        w = options.weights
        self.lpips = N.LPIPSAlex.from_files(w.get("alexnet"), w.get("lpips_heads")) if "lpips" in options.metrics else None
        self.inception = N.FIDInception.from_file(w.get("inception")) if "fid" in options.metrics else None
        self.arcface = N.ArcFaceIRSE50.from_file(w.get("arcface")) if "csim" in options.metrics else None
        self.tracker = tracker
        self.distance = options.distance

    def lpips_values(self, gen: np.ndarray, ref: np.ndarray) -> np.ndarray:
        from server.evaluation.networks import uint8_to_pm1

        out = [self.lpips(uint8_to_pm1(gen[i:i + 8]), uint8_to_pm1(ref[i:i + 8])).numpy()
               for i in range(0, len(gen), 8)]
        return np.concatenate(out).astype(np.float64)

    def coefficients(self, images: np.ndarray, fallback_lm256: np.ndarray) -> tuple[np.ndarray, int]:
        """73-value rows of generated frames (dlib landmarks at 256; the driving frame's when none found)."""
        import cv2

        from server.preprocessing import align

        imgs, lms, fallbacks = [], [], 0
        for img, lm in zip(images, fallback_lm256):
            im256 = cv2.resize(img, (256, 256), interpolation=cv2.INTER_AREA) if img.shape[0] != 256 else img
            found = align.detect_landmarks(im256) if align.dlib_available() else None
            if found is None:
                fallbacks += 1
            imgs.append(im256)
            lms.append(found.landmarks if found is not None else lm)
        return self.tracker.extractor.rows(imgs, np.stack(lms)), fallbacks


def _thumbs(images) -> np.ndarray:
    import cv2

    idx = np.linspace(0, len(images) - 1, min(THUMBS, len(images))).round().astype(int)
    return np.stack([cv2.resize(images[i], (THUMB_SIZE, THUMB_SIZE), interpolation=cv2.INTER_AREA) for i in idx])


def evaluate_pair(engine, nets: MetricNets, options: Options, source: np.ndarray, driving_rows: np.ndarray,
                  driving_lm256: np.ndarray, reference: np.ndarray | None, progress: Callable[[int], None]) -> dict:
    """Render ``source`` driven by ``driving_rows`` and measure; ``reference``: real frames (same id) or None."""
    n = len(driving_rows)
    ident = engine.prepare_identity(source)
    gen = []
    try:
        for _, img in engine.render(ident.id, driving_rows, range(n), size=options.size,
                                    batch_size=options.batch_size):
            gen.append(img)
            progress(1)
    finally:
        engine.forget_identity(ident.id)
    gen = np.stack(gen)
    out: dict[str, np.ndarray] = {"thumb_gen": _thumbs(gen)}
    m = set(options.metrics)
    if reference is not None:
        out["thumb_ref"] = _thumbs(reference)
        if "psnr" in m:
            out["psnr"] = np.array([M.psnr(a, b) for a, b in zip(gen, reference)])
        if "ssim" in m:
            out["ssim"] = np.array([M.ssim(a, b) for a, b in zip(gen, reference)])
        if "lpips" in m:
            out["lpips"] = nets.lpips_values(gen, reference)
    if "csim" in m:
        eg = nets.arcface.embed(gen)
        er = nets.arcface.embed(reference if reference is not None else source[None].repeat(1, 0))
        out["csim"] = M.cosine_similarity(eg, er if reference is not None else np.repeat(er, n, 0))
    if "fid" in m:
        out["fid_gen"] = nets.inception.features(gen)
        if reference is not None:
            out["fid_real"] = nets.inception.features(reference)
    if "aed" in m or "apd" in m:
        rows, fallbacks = nets.coefficients(gen, driving_lm256)
        out["motion_fallbacks"] = np.array(fallbacks)
        if "aed" in m:
            out["aed"] = M.aed(rows, driving_rows, options.distance)
        if "apd" in m:
            out["apd"] = M.apd(rows, driving_rows, options.distance)
    return out


def _track(tracker, video: Path, frames: int):
    from models.tracking import VideoError

    try:
        res = tracker.track(video, max_frames=frames)
    except VideoError as e:
        raise EvaluationError(f"{video}: {e}") from None
    return res


def run_protocol(kind: str, engine, tracker, options: Options, out: Path, videos: list[Path],
                 sources: list[Path] | None = None, show_progress: bool = True) -> dict:
    """Run ``same-id`` or ``cross-id``; returns the results dict (per pair arrays + summary)."""
    from tqdm import tqdm
    import sys

    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    nets = MetricNets(options, tracker)
    pairs = [(None, v) for v in videos] if kind == "same-id" else [(s, v) for s in sources for v in videos]
    need = options.frames + (1 if kind == "same-id" else 0)
    results, tracked = [], {}
    bar = tqdm(total=len(pairs) * options.frames, unit="frame", desc=kind, file=sys.stderr,
               disable=not show_progress)
    try:
        for src, video in pairs:
            files = (video,) if src is None else (src, video)
            key = cache_key(kind, options, *files)
            name = (video.stem if src is None else f"{src.stem}__{video.stem}")
            path = cache / f"{name}-{key}.npz"
            if path.is_file():
                with np.load(path) as z:
                    data = {k: z[k] for k in z.files}
                bar.update(options.frames)
            else:
                if video not in tracked:
                    res = _track(tracker, video, need)
                    if res.num_frames < need:
                        raise EvaluationError(f"{video}: only {res.num_frames} frames; the protocol needs {need} "
                                              f"(lower --frames)")
                    crops = np.stack(list(res.crops(options.size)))
                    tracked[video] = (res.rows, res.landmarks_at(256), crops)
                rows, lm256, crops = tracked[video]
                if src is None:
                    data = evaluate_pair(engine, nets, options, crops[0], rows[1:need], lm256[1:need],
                                         crops[1:need], bar.update)
                    data["thumb_src"] = _thumbs(crops[:1])
                else:
                    image = read_source(src, options.size)
                    data = evaluate_pair(engine, nets, options, image, rows[:need], lm256[:need], None, bar.update)
                    data["thumb_drive"] = _thumbs(crops[:need])
                    data["thumb_src"] = _thumbs(image[None])
                _save_npz_atomic(path, data)
            results.append({"source": src.name if src else f"{video.name} frame 0", "video": video.name,
                            "cache": path.name, "data": data})
    finally:
        bar.close()
    real = None
    if "fid" in options.metrics and kind == "cross-id":
        real = nets.inception.features(np.stack([read_source(s, options.size) for s in sources]))
    return summarize(kind, options, results, real)


def read_source(path: Path, size: int) -> np.ndarray:
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise EvaluationError(f"--sources: {path} is not an image OpenCV can read (use PNG or JPEG)")
    h, w = bgr.shape[:2]
    if h != w:
        raise EvaluationError(f"--sources: {path} is {w}x{h}, not square; align it first "
                              f"('styleheat align --image {path} --out aligned.png')")
    return cv2.cvtColor(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA if w > size else cv2.INTER_CUBIC),
                        cv2.COLOR_BGR2RGB)


def _finite_mean(x: np.ndarray) -> float | None:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else None


def summarize(kind: str, options: Options, results: list[dict], fid_real: np.ndarray | None) -> dict:
    summary: dict[str, float | None] = {}
    for m in ("psnr", "ssim", "lpips", "csim", "aed", "apd"):
        if m in options.metrics and all(m in r["data"] for r in results):
            summary[m] = _finite_mean(np.concatenate([r["data"][m] for r in results]))
    if "fid" in options.metrics:
        gen = np.concatenate([r["data"]["fid_gen"] for r in results])
        real = fid_real if fid_real is not None else np.concatenate([r["data"]["fid_real"] for r in results])
        summary["fid"] = M.fid_from_features(gen, real) if min(len(gen), len(real)) >= 2 else None
    per_pair = []
    for r in results:
        d = r["data"]
        entry = {"source": r["source"], "video": r["video"], "cache": r["cache"], "frames": options.frames}
        for m in ("psnr", "ssim", "lpips", "csim", "aed", "apd"):
            if m in d:
                entry[m] = _finite_mean(d[m])
                entry[f"{m}_per_frame"] = [float(v) for v in d[m]]
        if "motion_fallbacks" in d:
            entry["frames_without_detected_face"] = int(d["motion_fallbacks"])
        per_pair.append(entry)
    psnr_inf = sum(int(np.isinf(r["data"]["psnr"]).sum()) for r in results if "psnr" in r["data"])
    return {"protocol": kind, "summary": summary, "pairs": per_pair, "frames_total": sum(p["frames"] for p in per_pair),
            "notes": {"psnr_identical_frames_skipped": psnr_inf}, "_results": results}
