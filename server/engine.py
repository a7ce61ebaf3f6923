"""The inference engine: portraits in, talking-face frames out (bpy-free; see docs/engine.md).

``Engine`` owns one :class:`models.styleheat.StyleHEAT` in eval mode on one device. A portrait is
inverted once (:meth:`Engine.prepare_identity`, cached in an LRU keyed by a content hash); frames are
rendered batch by batch with ONE generator pass per frame from the cached 64x64 feature
(:meth:`Engine.render`). Per-frame attribute strengths re-invert the edited code (official
``HFGI.edit``) once per (identity, quantized strengths) and cache the result.

Frame conversion follows the official saving code: clamp(-1, 1) -> (x + 1) / 2 * 255, rounded to uint8.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from models.fastpath import FoldedCache, bf16_supported
from models.tracking import Tracker
from models.styleheat import FULL, INPUT_SIZE, PREVIEW, QUALITIES, FrameNets, Inversion, StyleHEAT, StyleHEATConfig
from models.windows import window_indices

#: how many identities stay cached, and how many edited variants per identity
IDENTITY_CACHE_SIZE = 8
EDIT_CACHE_SIZE = 32
FOLDED_CACHE_SIZE = 16   # folded synthesis modules (identity x edit x output size)
#: attribute strengths are quantized to this fraction of their (max - min) range before caching
ATTRIBUTE_QUANTUM = 1.0 / 200.0
#: bytes of uint8 preview frames kept so that scrubbing back to a frame already seen costs nothing
PREVIEW_CACHE_BYTES = 256 * 2 ** 20
PRECISIONS = ("auto", "float32", "bfloat16")


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once); os.cpu_count() if unknown."""
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = set(range(os.cpu_count() or 1))
    cores, cpu, phys = set(), None, "0"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cpu = int(value)
                elif key == "physical id":
                    phys = value
                elif key == "core id" and cpu in allowed:
                    cores.add((phys, value))
    except (OSError, ValueError):
        cores = set()
    return max(1, len(cores) or len(allowed))


def configure_threads(device: torch.device) -> int:
    """On CPU, one torch thread per physical core (hyper-threads share the FMA units and slow convolutions
    down) unless the user chose (OMP_NUM_THREADS / torch.set_num_threads before). Returns the thread count."""
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        n = physical_cores()
        if torch.get_num_threads() > n:
            torch.set_num_threads(n)
    return torch.get_num_threads()


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bfloat16' where it is native (CUDA with bf16, CPUs with AVX512-BF16 / AMX), else 'float32'."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if bf16_supported(device) else "float32"
    return precision


@dataclass(frozen=True)
class IdentityInfo:
    """Result of :meth:`Engine.prepare_identity`."""

    id: str
    image_256: np.ndarray                 # (256, 256, 3) uint8: the HFGI reconstruction the warper sees
    coefficients: np.ndarray | None       # (73,) float32 3DMM row of the portrait, or None
    coefficient_note: str | None = None   # why ``coefficients`` is None, when known


@dataclass
class _Identity:
    inv: Inversion
    info: IdentityInfo
    edits: "OrderedDict[tuple, Inversion]" = field(default_factory=OrderedDict)
    folded_keys: set = field(default_factory=set)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; otherwise the named device (ValueError if unusable)."""
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
    return dev


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 (clamp, (x+1)/2*255, round)."""
    x = ((images.detach().float().clamp(-1.0, 1.0) + 1.0) / 2.0 * 255.0).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) float32 in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1.0


def _runs(keys: Sequence) -> list[list[int]]:
    """Indices of ``keys`` grouped into maximal runs of equal consecutive keys (order kept)."""
    runs: list[list[int]] = []
    for j, k in enumerate(keys):
        if runs and keys[runs[-1][0]] == k:
            runs[-1].append(j)
        else:
            runs.append([j])
    return runs


class Engine:
    """See docs/engine.md. Thread-safe for one render at a time (a lock serializes GPU work)."""

    def __init__(self, model: StyleHEAT, *, device: torch.device, real_weights: bool, model_name: str,
                 tracker: Tracker | None = None, tracker_note: str | None = None,
                 identity_cache_size: int = IDENTITY_CACHE_SIZE, edit_cache_size: int = EDIT_CACHE_SIZE,
                 fast: bool = True, precision: str = "float32", channels_last: bool = True,
                 preview_cache_bytes: int = PREVIEW_CACHE_BYTES):
        """``fast``: render through the per-identity folded synthesis (models.fastpath; float32 equals the
        reference path within the parity tolerance); ``fast=False`` runs Generator.synthesize_from_64.
        ``precision``: "float32", "bfloat16" (VideoWarper, CalibrationNet, AudioWarper and the folded synthesis
        in bf16 channels_last: fast on CUDA and AVX512-BF16 / AMX CPUs, emulated and slow elsewhere; accuracy
        bound in models.fastpath.BF16_MIN_PSNR_DB) or "auto" (bfloat16 only where it is native).
        ``preview_cache_bytes``: budget of the cache of rendered ``quality="preview"`` frames (0: off).
        ``tracker`` (models.tracking.Tracker) gives each portrait its own 3DMM row; without one,
        ``tracker_note`` says why (it becomes IdentityInfo.coefficient_note)."""
        precision = resolve_precision(precision, device)
        if precision == "bfloat16" and not fast:
            raise ValueError("precision='bfloat16' needs the fast path (fast=True); the reference synthesis is float32")
        self.threads = configure_threads(device)
        self.model = model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = device
        self.real_weights = real_weights
        self.model_name = model_name
        self.tracker = tracker
        self.tracker_note = tracker_note or "no 3DMM regressor (tracker) was given to this engine"
        self._identities: "OrderedDict[str, _Identity]" = OrderedDict()
        self._identity_cache_size = max(1, identity_cache_size)
        self._edit_cache_size = max(1, edit_cache_size)
        self._lock = threading.RLock()
        self.config: StyleHEATConfig = model.config
        self.window = model.config.video_warper.coeff_window
        self.load_notes: list[str] = []
        #: the last prepare_identity's IdentityInfo.coefficient_note (why it returned no coefficients)
        self.coefficient_note: str | None = None
        self.fast = bool(fast)
        self.precision = precision
        self.channels_last = bool(channels_last)
        self._folded = FoldedCache(capacity=FOLDED_CACHE_SIZE)
        dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        self._nets = (FrameNets.build(self.model, dtype=dtype, channels_last=self.channels_last, device=device)
                      if dtype != torch.float32 else FrameNets.of(self.model))
        self._preview_cache: "OrderedDict[bytes, tuple[str, np.ndarray]]" = OrderedDict()   # key -> (identity, frame)
        self._preview_cache_bytes = max(0, int(preview_cache_bytes))
        self._preview_cache_used = 0
        self.preview_hits = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoints(cls, directory, device="auto", *, config: StyleHEATConfig | None = None,
                         tracker: Tracker | None = None, tracker_note: str | None = None,
                         precision: str = "auto") -> "Engine":
        """The official files as users download them (see models.weights for the layout).

        ``config``: only for non-standard model sizes (default: the official full-size model).
        """
        from models import weights

        dev = resolve_device(device)
        model, report = weights.load_official(directory, config, device="cpu")
        eng = cls(model, device=dev, real_weights=True, model_name="StyleHEAT (official checkpoints)",
                  tracker=tracker, tracker_note=tracker_note, precision=precision)
        eng.load_notes = report.lines()
        return eng

    @classmethod
    def from_bundle(cls, path, device="auto", *, tracker: Tracker | None = None,
                    tracker_note: str | None = None, precision: str = "auto") -> "Engine":
        """A safetensors bundle written by ``styleheat convert``."""
        from models import weights

        dev = resolve_device(device)
        model, meta = weights.load_bundle(path, device="cpu")
        eng = cls(model, device=dev, real_weights=True, model_name=f"StyleHEAT (bundle {Path(path).name})",
                  tracker=tracker, tracker_note=tracker_note, precision=precision)
        eng.load_notes = [f"{k:<13s} <- {v}" for k, v in meta.get("sources", {}).items()]
        return eng

    @classmethod
    def tiny_random(cls, seed: int = 0, device="cpu", *, audio: bool = True, edits: bool = True,
                    **options) -> "Engine":
        """Tiny config, seeded random weights (tests / demos); renders in milliseconds per frame on CPU.
        ``options``: further Engine arguments (precision, preview_cache_bytes, ...)."""
        dev = resolve_device(device)
        cfg = StyleHEATConfig.tiny(audio=audio)
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = StyleHEAT(cfg)
        _randomize_for_demo(model, gen)
        d = cfg.style_dim
        if edits:
            age = torch.randn(1, d, generator=gen)
            pose = torch.randn(1, d, generator=gen)
            k = 60
            comp = torch.randn(k, 1, d, generator=gen)
            comp = comp / comp.norm(dim=-1, keepdim=True)
            model.set_edit_assets(age=age / age.norm(), pose=pose / pose.norm(),
                                  pca={"mean": 0.1 * torch.randn(1, d, generator=gen), "comp": comp,
                                       "std": 1 + torch.rand(k, generator=gen)})
        return cls(model, device=dev, real_weights=False, model_name=f"tiny-random (seed {seed})", **options)

    # ------------------------------------------------------------------ info
    @property
    def native_size(self) -> int:
        return self.config.size

    @property
    def sizes(self) -> list[int]:
        """Output sizes render() accepts: powers of two from max(64, native/4) to native."""
        out, s = [], self.native_size
        while s >= max(64, self.native_size // 4):
            out.append(s)
            s //= 2
        return sorted(out)

    @property
    def default_batch_size(self) -> int:
        """Frames per generator pass when the caller does not say: 8 on CUDA; 2 on CPU. Measured on 2 cores
        (benchmarks/README.md): on an AMX Xeon batch 2 is as fast per frame as batch 1 within noise (1024^2 fp32
        0.87 vs 0.92 s, bf16 0.35 vs 0.35 s; 256^2 preview bf16 0.111 vs 0.111 s) and a larger batch only adds
        memory; on AVX2 batch 2 was slower only while NNPACK ran batched (now one frame at a time)."""
        return 8 if self.device.type == "cuda" else 2

    def attributes(self) -> dict[str, dict[str, float]]:
        """{name: {"min", "max", "default": 0.0}} of the attribute edits these weights support."""
        return {name: {"min": float(lo), "max": float(hi), "default": 0.0}
                for name, (lo, hi) in self.model.available_attributes().items()}

    def info(self) -> dict:
        return {"model": self.model_name, "device": str(self.device), "real_weights": self.real_weights,
                "sizes": self.sizes, "native_size": self.native_size, "attributes": self.attributes(),
                "audio_warper": self.model.has_audio, "qualities": dict(QUALITIES), "precision": self.precision,
                "threads": self.threads}

    # ------------------------------------------------------------------ identities
    def prepare_identity(self, image: np.ndarray) -> IdentityInfo:
        """Invert an FFHQ-aligned square portrait (H, W, 3) uint8 RGB once; cached by content hash."""
        image = _check_portrait(image)
        ident = hashlib.sha256(f"{image.shape}".encode() + image.tobytes()).hexdigest()[:20]
        with self._lock:
            hit = self._identities.get(ident)
            if hit is not None:
                self._identities.move_to_end(ident)
                self.coefficient_note = hit.info.coefficient_note
                return hit.info
            with torch.inference_mode():
                x = image_to_tensor(image).to(self.device)
                inv = self.model.prepare(x)
            coeffs, self.coefficient_note = self._coefficients(image)
            info = IdentityInfo(id=ident, image_256=to_uint8(inv.ix)[0], coefficients=coeffs,
                                coefficient_note=self.coefficient_note)
            self._identities[ident] = _Identity(inv=inv, info=info)
            self._evict()
            return info

    def add_inversion(self, inv: Inversion, note: str = "added as an Inversion (no portrait)") -> IdentityInfo:
        """Register an already computed :class:`models.styleheat.Inversion` (benchmarks, tests); the id is a hash
        of its W+ code and 64x64 feature."""
        if not isinstance(inv, Inversion):
            raise TypeError(f"inv must be a models.styleheat.Inversion, got {type(inv).__name__}")
        h = hashlib.sha256()
        for t in (inv.wx, inv.fx):
            h.update(t.detach().float().cpu().numpy().tobytes())
        ident = "inv-" + h.hexdigest()[:16]
        with self._lock:
            if ident not in self._identities:
                info = IdentityInfo(id=ident, image_256=to_uint8(inv.ix)[0], coefficients=None, coefficient_note=note)
                self._identities[ident] = _Identity(inv=inv, info=info)
                self._evict()
            self._identities.move_to_end(ident)
            return self._identities[ident].info

    def _evict(self) -> None:
        while len(self._identities) > self._identity_cache_size:
            self._release(*self._identities.popitem(last=False))

    def _release(self, identity_id: str, ident: "_Identity | None") -> None:
        """Free what an identity left in the shared caches: folded synthesis weights and preview frames."""
        if ident is not None:
            for key in ident.folded_keys:
                self._folded.forget(key)
        self._drop_previews(lambda owner: owner == identity_id)

    def _coefficients(self, image: np.ndarray) -> tuple[np.ndarray | None, str | None]:
        """(73,) float32 3DMM row of the portrait or None, and why it is None (when known)."""
        if self.tracker is None:
            return None, self.tracker_note
        try:
            row, reason = self.tracker.portrait_row(image)
        except Exception as e:  # optional feature (weights, landmark detector): never block inversion
            row, reason = None, f"{type(e).__name__}: {e}"
        return (None if row is None else np.asarray(row, dtype=np.float32).reshape(73)), reason

    def forget_identity(self, identity_id: str) -> None:
        """Drop an identity: its inversion, edits, folded synthesis weights and cached preview frames."""
        with self._lock:
            self._release(identity_id, self._identities.pop(identity_id, None))

    def clear_preview_cache(self) -> None:
        """Forget every cached preview frame (the next preview of each frame renders again)."""
        with self._lock:
            self._drop_previews(lambda owner: True)

    def _drop_previews(self, match: Callable[[str], bool]) -> None:
        for key in [k for k, (owner, _) in self._preview_cache.items() if match(owner)]:
            _, img = self._preview_cache.pop(key)
            self._preview_cache_used -= img.nbytes

    @property
    def preview_cache_frames(self) -> int:
        """How many preview frames are cached now."""
        return len(self._preview_cache)

    def identity_ids(self) -> list[str]:
        with self._lock:
            return list(self._identities)

    # ------------------------------------------------------------------ rendering
    def render(self, identity_id: str, rows: np.ndarray, frames: Sequence[int], *,
               audio: np.ndarray | None = None, attributes: Mapping[str, np.ndarray] | None = None,
               size: int | None = None, batch_size: int | None = None,
               should_stop: Callable[[], bool] | None = None, quality: str = FULL,
               timings: dict | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (frame_index, (size, size, 3) uint8) for ``frames`` in order, batch by batch.

        ``quality``: "full" or "preview" (models.styleheat.QUALITIES; previews skip the CalibrationNet and are
        cached, so scrubbing back to a frame costs nothing). ``timings``: dict that gets seconds per stage
        added (warper, warp, calibration, synthesis, encode).

        Input is validated before anything runs (ValueError with a clear sentence); see docs/engine.md.
        """
        ident = self._get_identity(identity_id)
        rows = _check_rows(rows, self.config.video_warper.coeff_dim)
        n = rows.shape[0]
        frames = _check_frames(frames, n)
        mel = self._check_audio(audio, n)
        attrs = self._check_attributes(attributes, n)
        size = self._check_size(size)
        if quality not in QUALITIES:
            raise ValueError(f"unknown quality {quality!r}; choose one of {', '.join(QUALITIES)}")
        if batch_size is None:
            batch_size = self.default_batch_size
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        return self._render_iter(ident, rows, frames, mel, attrs, size, int(batch_size), should_stop, quality,
                                 timings)

    def _render_iter(self, ident, rows, frames, mel, attrs, size, batch_size, should_stop, quality, timings):
        for start in range(0, len(frames), batch_size):
            if should_stop is not None and should_stop():
                return
            chunk = frames[start:start + batch_size]
            with self._lock, torch.inference_mode():
                keys = [self._quantize({k: float(v[i]) for k, v in attrs.items()}) for i in chunk]
                windows = {i: rows[window_indices(i, len(rows), self.window)].T for i in chunk}
                cache_keys = ({i: self._preview_key(ident, keys[j], windows[i], mel, i, size)
                               for j, i in enumerate(chunk)} if quality == PREVIEW else {})
                out: dict[int, np.ndarray] = {}
                for i, ck in cache_keys.items():
                    hit = self._preview_cache.get(ck)
                    if hit is not None:
                        self._preview_cache.move_to_end(ck)
                        self.preview_hits += 1
                        out[i] = hit[1]
                todo = [j for j, i in enumerate(chunk) if i not in out]
                # frames that share one W+ code (same quantized edit) run together through one folded synthesis
                for run in _runs([keys[j] for j in todo]):
                    sub = [chunk[todo[j]] for j in run]
                    key = keys[todo[run[0]]]
                    inv = self._inversion_for(ident, key)
                    coeffs = torch.from_numpy(np.stack([windows[i] for i in sub])).to(self.device)
                    mel_t = torch.from_numpy(mel[sub]).to(self.device) if mel is not None else None
                    synth = self._synthesizer(ident, key, inv) if self.fast else None
                    images = self.model.render(inv, coeffs, mel_t, out_size=size, synthesize=synth, quality=quality,
                                               nets=self._nets, timings=timings)
                    t0 = time.perf_counter()
                    for i, img in zip(sub, to_uint8(images)):
                        out[i] = img
                        if i in cache_keys:
                            self._remember_preview(cache_keys[i], ident.info.id, img)
                    if timings is not None:
                        timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - t0
            for i in chunk:
                yield int(i), out[i]

    @staticmethod
    def _preview_key(ident: _Identity, edit_key: tuple, window: np.ndarray, mel, i: int, size: int) -> bytes:
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{ident.info.id}|{edit_key!r}|{size}|".encode())
        h.update(np.ascontiguousarray(window).tobytes())
        if mel is not None:
            h.update(mel[i].tobytes())
        return h.digest()

    def _remember_preview(self, key: bytes, identity_id: str, img: np.ndarray) -> None:
        if img.nbytes > self._preview_cache_bytes:
            return
        old = self._preview_cache.pop(key, None)
        if old is not None:
            self._preview_cache_used -= old[1].nbytes
        self._preview_cache[key] = (identity_id, img)
        self._preview_cache_used += img.nbytes
        while self._preview_cache_used > self._preview_cache_bytes:
            _, (_, evicted) = self._preview_cache.popitem(last=False)
            self._preview_cache_used -= evicted.nbytes

    def _synthesizer(self, ident: _Identity, key: tuple, inv: Inversion) -> Callable:
        """The folded 64 -> image synthesis for one (identity, edit) W+ code, built once per output size."""
        cache_key = (ident.info.id, key)
        ident.folded_keys.add(cache_key)
        dtype = torch.bfloat16 if self.precision == "bfloat16" else torch.float32

        def synthesize(feat, skip32, wx, out_size):
            module = self._folded.get(cache_key, self.model.generator, inv.wx, out_size=out_size, dtype=dtype,
                                      channels_last=self.channels_last, device=self.device)
            return module(feat, skip32)

        return synthesize

    def _inversion_for(self, ident: _Identity, key: tuple) -> Inversion:
        """The (edited) inversion for a quantized edit key (see :meth:`_quantize`); cached per identity."""
        if not key:
            return ident.inv
        hit = ident.edits.get(key)
        if hit is not None:
            ident.edits.move_to_end(key)
            return hit
        inv = self.model.prepare_edit(ident.inv, dict(key))
        ident.edits[key] = inv
        while len(ident.edits) > self._edit_cache_size:
            ident.edits.popitem(last=False)
        return inv

    def _quantize(self, strengths: Mapping[str, float]) -> tuple:
        spec = self.attributes()
        out = []
        for name in sorted(strengths):
            lo, hi = spec[name]["min"], spec[name]["max"]
            q = (hi - lo) * ATTRIBUTE_QUANTUM
            value = round(strengths[name] / q) * q if q > 0 else strengths[name]
            if value != 0.0:
                out.append((name, float(value)))
        return tuple(out)

    # ------------------------------------------------------------------ validation
    def _get_identity(self, identity_id: str) -> _Identity:
        with self._lock:
            ident = self._identities.get(identity_id) if isinstance(identity_id, str) else None
            if ident is None:
                raise ValueError(f"unknown identity id {identity_id!r}: call prepare_identity(image) first "
                                 f"(identities are cached for the {self._identity_cache_size} most recent portraits)")
            self._identities.move_to_end(identity_id)
            return ident

    def _check_audio(self, audio, n: int) -> np.ndarray | None:
        if audio is None:
            return None
        if not self.model.has_audio:
            raise ValueError("audio given but these weights have no AudioWarper (audio_warper.* keys); "
                             "drive with 3DMM rows instead")
        cfg = self.config.audio_warper
        want = (n, cfg.mel_bins, cfg.mel_window)
        arr = np.asarray(audio)
        if arr.shape != want:
            raise ValueError(f"audio must have shape {want} (one {cfg.mel_bins}x{cfg.mel_window} mel window per row), "
                             f"got {arr.shape}")
        arr = arr.astype(np.float32)
        if not np.all(np.isfinite(arr)):
            raise ValueError("audio contains NaN or infinite values")
        return arr

    def _check_attributes(self, attributes, n: int) -> dict[str, np.ndarray]:
        if not attributes:
            return {}
        if not isinstance(attributes, Mapping):
            raise ValueError(f"attributes must be a mapping {{name: per-row strengths}}, got {type(attributes).__name__}")
        spec = self.attributes()
        out = {}
        for name, values in attributes.items():
            if name not in spec:
                known = ", ".join(sorted(spec)) or "none (no edit files loaded)"
                raise ValueError(f"unknown attribute {name!r}; known attributes: {known}")
            arr = np.asarray(values, dtype=np.float64)
            if arr.shape != (n,):
                raise ValueError(f"attribute {name!r} must have one strength per row, shape ({n},), got {arr.shape}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"attribute {name!r} contains NaN or infinite values")
            lo, hi = spec[name]["min"], spec[name]["max"]
            if arr.min() < lo or arr.max() > hi:
                raise ValueError(f"attribute {name!r} strengths must lie in [{lo}, {hi}], "
                                 f"got values from {arr.min():g} to {arr.max():g}")
            out[name] = arr
        return out

    def _check_size(self, size) -> int:
        if size is None:
            return self.native_size
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or int(size) not in self.sizes:
            raise ValueError(f"unsupported size {size!r}; choose one of {self.sizes}")
        return int(size)


def _check_portrait(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array (H, W, 3) uint8 RGB, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3) (RGB), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0..255), got dtype {image.dtype}")
    h, w = image.shape[:2]
    if h != w:
        raise ValueError(f"image must be a square FFHQ-aligned portrait, got {w}x{h}; align it first "
                         f"(server/preprocessing/align.py)")
    if h < 64:
        raise ValueError(f"image is too small ({w}x{h}); give an aligned portrait of at least {INPUT_SIZE}x{INPUT_SIZE}")
    return np.ascontiguousarray(image)


def _check_rows(rows, coeff_dim: int) -> np.ndarray:
    arr = np.asarray(rows)
    if arr.ndim != 2 or arr.shape[1] != coeff_dim or arr.shape[0] < 1:
        raise ValueError(f"rows must have shape (N, {coeff_dim}) (exp 64 | angle 3 | trans 3 | crop 3) with N >= 1, "
                         f"got {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"rows must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        r, c = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"rows contain NaN or infinite values (first at row {r}, column {c})")
    return arr


def _check_frames(frames, n: int) -> list[int]:
    try:
        given = list(frames)  # once: ``frames`` may be an iterator
        out = [int(f) for f in given]
        ok = all(float(f) == i for f, i in zip(given, out))
    except (TypeError, ValueError):
        raise ValueError("frames must be a sequence of integer row indices") from None
    if not ok:
        raise ValueError("frames must be integer row indices")
    bad = [f for f in out if f < 0 or f >= n]
    if bad:
        raise ValueError(f"frame index {bad[0]} is outside the clip: rows has {n} rows (valid 0..{n - 1})")
    return out


def _randomize_for_demo(model: StyleHEAT, gen: torch.Generator) -> None:
    """Tiny demo weights: the modules' own seeded init, a non-trivial latent_avg, and smaller ToRGB
    weights (ToRGB has no demodulation) so images mostly stay inside [-1, 1]."""
    model.latent_avg = 0.2 * torch.randn(model.latent_avg.shape, generator=gen)
    with torch.no_grad():
        for name, p in model.generator.named_parameters():
            if name.startswith("to_rgb") and name.endswith("conv.weight"):
                p.mul_(0.3)
