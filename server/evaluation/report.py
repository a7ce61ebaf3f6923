"""metrics.json, report.md (laid out like Table 2, the paper's StyleHEAT row beside ours) and report.png."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

#: Table 2 of the paper (HDTF, 512^2), StyleHEAT row; "x" columns are cross-identity.
PAPER_STYLEHEAT = {
    "same-id": {"fid": 18.02, "lpips": 0.1729, "psnr": 31.21, "ssim": 0.6019, "csim": 0.7475, "aed": 0.1151,
                "apd": 0.01664},
    "cross-id": {"fid": 91.28, "csim": 0.4890, "aed": 0.2630, "apd": 0.03484},
}
COLUMNS = {"same-id": ("fid", "lpips", "psnr", "ssim", "csim", "aed", "apd"),
           "cross-id": ("fid", "csim", "aed", "apd")}
ARROWS = {"fid": "↓", "lpips": "↓", "psnr": "↑", "ssim": "↑", "csim": "↑", "aed": "↓", "apd": "↓"}
FORMAT = {"fid": "{:.2f}", "lpips": "{:.4f}", "psnr": "{:.2f}", "ssim": "{:.4f}", "csim": "{:.4f}",
          "aed": "{:.4f}", "apd": "{:.5f}"}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def write_outputs(out: Path, results: dict, settings: dict) -> dict[str, Path]:
    kind = results["protocol"]
    doc = {"protocol": kind, "settings": settings, "summary": results["summary"],
           "paper_styleheat": PAPER_STYLEHEAT[kind], "frames_total": results["frames_total"],
           "notes": results["notes"], "pairs": results["pairs"]}
    paths = {"json": out / "metrics.json", "md": out / "report.md", "png": out / "report.png"}
    _write_atomic(paths["json"], json.dumps(_clean(doc), indent=1).encode())
    _write_atomic(paths["md"], markdown(doc).encode())
    _write_atomic(paths["png"], figure_png(kind, results["_results"]))
    return paths


def _fmt(metric: str, value) -> str:
    return "—" if value is None else FORMAT[metric].format(value)


def markdown(doc: dict) -> str:
    kind, s = doc["protocol"], doc["settings"]
    cols = [c for c in COLUMNS[kind] if c in s["metrics"]]
    prefix = "×" if kind == "cross-id" else ""
    head = "| method | " + " | ".join(f"{prefix}{c.upper()}{ARROWS[c]}" for c in cols) + " |"
    lines = [f"# StyleHEAT evaluation: {kind}", "",
             f"{doc['frames_total']} generated frames ({len(doc['pairs'])} source/video pairs, {s['frames']} "
             f"frames each) at {s['size']}², model: {s['model']}, precision {s['precision'] or 'auto'}.", "",
             head, "|" + "---|" * (len(cols) + 1),
             "| StyleHEAT (paper, Table 2) | " + " | ".join(_fmt(c, doc["paper_styleheat"].get(c)) for c in cols) + " |",
             "| ours (this run) | " + " | ".join(_fmt(c, doc["summary"].get(c)) for c in cols) + " |", "",
             "Settings: " + "; ".join([
                 "PSNR/SSIM on uint8 RGB, data range 255; SSIM scikit-image 7×7 uniform window, mean over RGB",
                 "LPIPS v0.1 AlexNet", "FID: TF-Inception pool3 (2048-d)" + (
                     ", generated vs the real driving frames" if kind == "same-id" else ", generated vs the source portraits"),
                 "CSIM: IR-SE50 ArcFace cosine, against the " + ("real frame" if kind == "same-id" else "source"),
                 f"AED/APD: {s['distance'].upper()} on Deep3D expression (64) / pose (angles + translation)"]) + ".",
             ""]
    if s.get("tiny_random"):
        lines += ["**Tiny random model (--tiny-random): these numbers test the pipeline, they say nothing about "
                  "StyleHEAT.**", ""]
    lines += ["## Per pair", "", "| source | video | " + " | ".join(c.upper() for c in cols if c != "fid") + " |",
              "|" + "---|" * (2 + len([c for c in cols if c != "fid"]))]
    for p in doc["pairs"]:
        lines.append(f"| {p['source']} | {p['video']} | " +
                     " | ".join(_fmt(c, p.get(c)) for c in cols if c != "fid") + " |")
    lines += ["", "![per-frame curves and frames](report.png)", ""]
    return "\n".join(lines)


def figure_png(kind: str, results: list[dict]) -> bytes:
    """Per-frame PSNR / LPIPS / AED curves of the first pair + a grid source | driving | ours (OpenCV)."""
    import cv2

    d = results[0]["data"]
    curves = [(m, d[m]) for m in ("psnr", "lpips", "aed", "csim") if m in d][:3]
    W, H = 420, 200
    panels = []
    for name, ys in curves:
        img = np.full((H, W, 3), 255, np.uint8)
        ys = np.asarray(ys, np.float64)
        ok = np.isfinite(ys)
        cv2.putText(img, f"{name.upper()} per frame ({results[0]['video']})", (8, 18), cv2.FONT_HERSHEY_SIMPLEX,
                    0.45, (0, 0, 0), 1, cv2.LINE_AA)
        x0, y0, x1, y1 = 50, 30, W - 10, H - 25
        cv2.rectangle(img, (x0, y0), (x1, y1), (160, 160, 160), 1)
        if ok.sum() >= 1:
            lo, hi = float(ys[ok].min()), float(ys[ok].max())
            hi = hi if hi > lo else lo + 1e-6
            for v, y in ((hi, y0), (lo, y1)):
                cv2.putText(img, f"{v:.3g}", (2, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
            n = len(ys)
            pts = [(int(x0 + (x1 - x0) * i / max(n - 1, 1)), int(y1 - (y1 - y0) * (v - lo) / (hi - lo)))
                   for i, v in enumerate(ys) if np.isfinite(v)]
            for a, b in zip(pts, pts[1:]):
                cv2.line(img, a, b, (200, 80, 0), 2, cv2.LINE_AA)
            for p in pts if len(pts) < 40 else []:
                cv2.circle(img, p, 3, (200, 80, 0), -1)
        cv2.putText(img, "frame", (x1 - 40, H - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
        panels.append(img)
    left = np.concatenate(panels, 0) if panels else np.full((H, W, 3), 255, np.uint8)
    # grid: rows = source, driving/real, ours; columns = sampled frames
    gen = d["thumb_gen"]
    drive = d.get("thumb_ref", d.get("thumb_drive"))
    src = d.get("thumb_src")
    if src is None:
        src = gen[:1] * 0 + 255
    t = gen.shape[1]
    row_src = np.concatenate([src[0]] + [np.full_like(src[0], 255)] * (len(gen) - 1), 1)
    grid_rows = [("source", row_src), ("real" if kind == "same-id" else "driving", np.concatenate(list(drive), 1)),
                 ("ours", np.concatenate(list(gen), 1))]
    labelled = []
    for label, row in grid_rows:
        pad = np.full((t, 70, 3), 255, np.uint8)
        cv2.putText(pad, label, (4, t // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        labelled.append(np.concatenate([pad, row], 1))
    right = np.concatenate(labelled, 0)
    h = max(left.shape[0], right.shape[0])
    canvas = np.full((h, left.shape[1] + right.shape[1] + 10, 3), 255, np.uint8)
    canvas[:left.shape[0], :left.shape[1]] = left
    canvas[:right.shape[0], left.shape[1] + 10:] = right
    ok, png = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError("could not encode the report figure as PNG")
    return png.tobytes()
