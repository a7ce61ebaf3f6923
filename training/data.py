"""The training dataset on disk (documented in docs/training.md) and the PyTorch datasets of each stage.

Layout of a dataset folder::

    ROOT/dataset.json                      {"format": "styleheat-dataset", "version": 1, "resolution": 256,
                                            "fps": 25.0, "clips": [{"id", "person", "frames", "audio"}, ...]}
    ROOT/clips/<id>/frames/000000.png ...  RGB crops, resolution x resolution (the face moves freely in a
                                           box fixed per clip; NOT aligned per frame)
    ROOT/clips/<id>/coeffs.npy             (N, 73) float32  exp 64 | angle 3 | trans 3 | crop 3 (server.preprocessing.deep3d.row73)
    ROOT/clips/<id>/landmarks.npy          (N, 68, 2) float32, pixels of the frame (x right, y down)
    ROOT/clips/<id>/audio_windows.npy      (N, 80, 32) float32 AudioWarper mel window of each frame  [audio]
    ROOT/clips/<id>/mel.npy                (T, 80) float32 mel spectrogram, 80 steps per second     [audio]
    ROOT/clips/<id>/audio.wav              16 kHz mono PCM of the clip (the source of both)          [audio]

Frame ``i``'s driving window is rows ``[i-13, i+13]`` clamped to the clip (as the official datasets and
the inference engine). Images are float32 NCHW in [-1, 1].
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from models import audio_features as au
from models.warper import WarperConfig
from models.windows import audio_windows_for_frames, window_indices

FORMAT = "styleheat-dataset"
VERSION = 1
# the networks' input sizes (the official ones; the tiny test configs keep them)
COEFF_DIM = WarperConfig.coeff_dim          # 73 values per frame
MEL_BINS = WarperConfig.mel_bins            # 80
AUDIO_WINDOW = WarperConfig.mel_window      # AudioWarper mel steps per frame window (32)
SYNC_T = 5                  # SyncNet sees 5 consecutive frames
SYNC_MEL_STEPS = 16         # ... and 16 mel steps (0.2 s at 80 steps/s)


class DatasetError(ValueError):
    """The dataset folder is not usable; the message says what is wrong and how to fix it."""


# ------------------------------------------------------------------------------------------- writing
def write_clip(root: str | os.PathLike, clip_id: str, frames: Iterable[np.ndarray],
               coeffs: np.ndarray, landmarks: np.ndarray, *, person: str | None = None,
               wav16k: np.ndarray | None = None, fps: float = 25.0, audio_windows: np.ndarray | None = None,
               mel: np.ndarray | None = None) -> Path:
    """Write one clip (frames: N images (R,R,3) uint8 RGB, any iterable; coeffs (N,73); landmarks (N,68,2)
    in pixels of R) and register it in ``dataset.json`` (created on first use; all clips share one R).

    Audio: pass ``wav16k`` (16 kHz mono float) and the windows and mel are computed with ``models.windows``
    (exactly what inference feeds the AudioWarper), or pass ``audio_windows``/``mel`` directly.
    """
    import cv2

    root = Path(root)
    coeffs = np.asarray(coeffs, np.float32)
    landmarks = np.asarray(landmarks, np.float32)
    n = int(coeffs.shape[0]) if coeffs.ndim == 2 else -1
    if n <= 0 or coeffs.shape != (n, COEFF_DIM):
        raise DatasetError(f"clip {clip_id!r}: coeffs must be (N, {COEFF_DIM}) with N >= 1, got {coeffs.shape}")
    if landmarks.shape != (n, 68, 2):
        raise DatasetError(f"clip {clip_id!r}: landmarks must be ({n}, 68, 2), got {landmarks.shape}")
    if not np.isfinite(coeffs).all():
        raise DatasetError(f"clip {clip_id!r}: coeffs contain NaN/inf")
    meta = read_meta(root) if (root / "dataset.json").is_file() else None
    d = root / "clips" / clip_id
    (d / "frames").mkdir(parents=True, exist_ok=True)
    res = None
    count = 0
    for i, fr in enumerate(frames):
        fr = np.asarray(fr)
        if res is None:
            res = int(fr.shape[0])
            if meta is not None and meta["resolution"] != res:
                raise DatasetError(f"clip {clip_id!r} is {res}x{res} but the dataset at {root} is "
                                   f"{meta['resolution']}x{meta['resolution']}; use one dataset per resolution")
        if fr.shape != (res, res, 3) or fr.dtype != np.uint8:
            raise DatasetError(f"clip {clip_id!r} frame {i}: expected ({res}, {res}, 3) uint8, got {fr.shape} {fr.dtype}")
        cv2.imwrite(str(d / "frames" / f"{i:06d}.png"), cv2.cvtColor(fr, cv2.COLOR_RGB2BGR))
        count += 1
    if count != n:
        raise DatasetError(f"clip {clip_id!r}: {count} frames but {n} coefficient rows")
    if meta is None:
        meta = {"format": FORMAT, "version": VERSION, "resolution": res, "fps": float(fps), "clips": []}
    np.save(d / "coeffs.npy", coeffs)
    np.save(d / "landmarks.npy", landmarks)
    has_audio = False
    if wav16k is not None:
        wav = np.asarray(wav16k, np.float32).reshape(-1)
        try:
            import soundfile

            soundfile.write(str(d / "audio.wav"), wav, au.SAMPLE_RATE, subtype="PCM_16")
        except Exception:  # noqa: BLE001 - provenance only; the arrays below are what training reads
            pass
        audio_windows = audio_windows_for_frames(wav, au.SAMPLE_RATE, fps, n)
        mel = au.melspectrogram(wav).astype(np.float32)
    if audio_windows is not None:
        audio_windows = np.asarray(audio_windows, np.float32)
        if audio_windows.shape != (n, MEL_BINS, AUDIO_WINDOW):
            raise DatasetError(f"clip {clip_id!r}: audio windows must be ({n}, 80, 32), got {audio_windows.shape}")
        if mel is None:
            raise DatasetError(f"clip {clip_id!r}: audio windows given without the mel spectrogram")
        np.save(d / "audio_windows.npy", audio_windows)
        np.save(d / "mel.npy", np.asarray(mel, np.float32).reshape(-1, MEL_BINS))
        has_audio = True
    entry = {"id": clip_id, "person": person or clip_id.split("#")[0], "frames": n, "audio": has_audio}
    meta["clips"] = [c for c in meta["clips"] if c["id"] != clip_id] + [entry]
    tmp = root / "dataset.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, root / "dataset.json")
    return d


# ------------------------------------------------------------------------------------------- reading
def read_meta(root: Path) -> dict:
    """``ROOT/dataset.json``, checked for format and version (DatasetError saying what to do otherwise)."""
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{root} is not a StyleHEAT training dataset (no dataset.json); build one with "
                           "'styleheat prepare-data VIDEOS... --out DIR'")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); re-run 'styleheat prepare-data'") from None
    if meta.get("format") != FORMAT:
        raise DatasetError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise DatasetError(f"{path}: version {meta.get('version')!r} is not supported (expected {VERSION})")
    return meta


@dataclass
class Clip:
    id: str
    person: str
    frames: int
    audio: bool
    path: Path
    coeffs: np.ndarray
    landmarks: np.ndarray
    audio_windows: np.ndarray | None
    mel: np.ndarray | None

    def image(self, i: int, resolution: int) -> torch.Tensor:
        import cv2

        p = self.path / "frames" / f"{i:06d}.png"
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            raise DatasetError(f"cannot read {p}; the clip is incomplete -- re-run 'styleheat prepare-data'")
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if img.shape[0] != resolution or img.shape[1] != resolution:
            img = cv2.resize(img, (resolution, resolution), interpolation=cv2.INTER_AREA)
        return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0

    def window(self, i: int) -> torch.Tensor:
        """(73, 27) driving window of frame i."""
        rows = window_indices(i, self.frames, WarperConfig.coeff_window)
        return torch.from_numpy(np.ascontiguousarray(self.coeffs[rows].T))

    def sync_mel(self, first_frame: int, fps: float) -> torch.Tensor:
        """(1, 80, 16) mel steps starting at ``first_frame``'s time (Wav2Lip's cut), silence-padded."""
        start = int(au.MEL_FPS * first_frame / fps)
        out = np.full((SYNC_MEL_STEPS, MEL_BINS), au.SILENCE, np.float32)
        lo, hi = max(start, 0), min(start + SYNC_MEL_STEPS, self.mel.shape[0])
        if hi > lo:
            out[lo - start:hi - start] = self.mel[lo:hi]
        return torch.from_numpy(np.ascontiguousarray(out.T))[None]


class ClipStore:
    """All clips of a dataset folder, validated on open (arrays memory-mapped)."""

    def __init__(self, root: str | os.PathLike, *, need_audio: bool = False):
        self.root = Path(root)
        meta = read_meta(self.root)
        self.resolution = int(meta["resolution"])
        self.fps = float(meta.get("fps", 25.0))
        self.clips: list[Clip] = []
        for c in meta["clips"]:
            d = self.root / "clips" / c["id"]
            try:
                coeffs = np.load(d / "coeffs.npy", mmap_mode="r")
                lms = np.load(d / "landmarks.npy", mmap_mode="r")
            except FileNotFoundError as e:
                raise DatasetError(f"clip {c['id']!r} of {self.root} is incomplete ({e.filename} missing); "
                                   "re-run 'styleheat prepare-data' for it") from None
            n = int(c["frames"])
            if coeffs.shape != (n, COEFF_DIM) or lms.shape != (n, 68, 2):
                raise DatasetError(f"clip {c['id']!r}: coeffs {coeffs.shape} / landmarks {lms.shape} do not "
                                   f"match its {n} frames (expected ({n}, 73) and ({n}, 68, 2))")
            aw = mel = None
            if c.get("audio"):
                aw = np.load(d / "audio_windows.npy", mmap_mode="r")
                mel = np.load(d / "mel.npy", mmap_mode="r")
            self.clips.append(Clip(c["id"], c.get("person", c["id"]), n, bool(c.get("audio")), d,
                                   coeffs, lms, aw, mel))
        if need_audio:
            self.clips = [c for c in self.clips if c.audio and c.frames >= SYNC_T]
            if not self.clips:
                raise DatasetError(f"{self.root} has no clip with audio and at least {SYNC_T} frames; the "
                                   "AudioWarper stage needs audio (put VIDEO.wav next to each video)")
        if not self.clips:
            raise DatasetError(f"{self.root} holds no clips; add some with 'styleheat prepare-data'")
        self.by_person: dict[str, list[int]] = {}
        for i, c in enumerate(self.clips):
            self.by_person.setdefault(c.person, []).append(i)
        self.persons = sorted(self.by_person)

    def pick(self, rng: np.random.Generator) -> Clip:
        """A person uniformly, then one of their clips (the official datasets sample by person id)."""
        clips = self.by_person[self.persons[int(rng.integers(len(self.persons)))]]
        return self.clips[clips[int(rng.integers(len(clips)))]]


class _Base(Dataset):
    def __init__(self, store: ClipStore, length: int, seed: int = 0):
        self.store = store
        self.length = int(length)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index)])


class PairDataset(_Base):
    """Stage 1a / 2: a source and a driving frame of the same clip.

    Item: source, target (3,R,R); source_coeffs, target_coeffs (73,27); source_landmarks,
    target_landmarks (68,2) in pixels of R; with ``with_audio``: source_audio, target_audio (80,32).
    """

    with_audio = False

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._rng(index)
        clip = self.store.pick(rng)
        s, t = (int(v) for v in rng.integers(clip.frames, size=2))
        r = self.store.resolution
        extra = {}
        if self.with_audio:
            extra = {"source_audio": torch.from_numpy(np.array(clip.audio_windows[s])),
                     "target_audio": torch.from_numpy(np.array(clip.audio_windows[t]))}
        return {**extra, "source": clip.image(s, r), "target": clip.image(t, r),
                "source_coeffs": clip.window(s), "target_coeffs": clip.window(t),
                "source_landmarks": torch.from_numpy(np.array(clip.landmarks[s])),
                "target_landmarks": torch.from_numpy(np.array(clip.landmarks[t]))}


class SyncDataset(_Base):
    """Stage 1b: a source frame and 5 consecutive driving frames of the same clip, with audio.

    Item: source (3,R,R); source_coeffs (73,27); targets (5,3,R,R); target_coeffs (5,73,27);
    target_audio (5,80,32) AudioWarper windows; target_landmarks (5,68,2); sync_mel (1,80,16).
    """

    def __init__(self, store: ClipStore, length: int, seed: int = 0):
        super().__init__(store, length, seed)
        if any(not c.audio for c in store.clips):
            raise DatasetError("SyncDataset needs a ClipStore opened with need_audio=True")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._rng(index)
        clip = self.store.pick(rng)
        s = int(rng.integers(clip.frames))
        t0 = int(rng.integers(clip.frames - SYNC_T + 1))
        ts = list(range(t0, t0 + SYNC_T))
        r = self.store.resolution
        return {"source": clip.image(s, r), "source_coeffs": clip.window(s),
                "targets": torch.stack([clip.image(t, r) for t in ts]),
                "target_coeffs": torch.stack([clip.window(t) for t in ts]),
                "target_audio": torch.from_numpy(np.array(clip.audio_windows[ts])),
                "target_landmarks": torch.from_numpy(np.array(clip.landmarks[ts])),
                "sync_mel": clip.sync_mel(t0, self.store.fps)}


class ShardSampler(Sampler[int]):
    """Deterministic, resumable sampler: epoch e is a seeded permutation, rank r takes every world-th
    index; ``start`` skips the first batches of the epoch (resume mid-epoch)."""

    def __init__(self, length: int, *, rank: int = 0, world: int = 1, seed: int = 0):
        self.length, self.rank, self.world, self.seed = length, rank, world, seed
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def per_rank(self) -> int:
        return self.length // self.world

    def __iter__(self) -> Iterator[int]:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.length)
        mine = perm[self.rank::self.world][: self.per_rank()]
        return iter(int(i) for i in mine[self.start:])

    def __len__(self) -> int:
        return max(0, self.per_rank() - self.start)


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def steps_per_epoch(length: int, world: int, per_rank_batch: int) -> int:
    return max(1, (length // world) // per_rank_batch)


__all__ = ["FORMAT", "VERSION", "DatasetError", "write_clip", "read_meta", "ClipStore", "Clip", "PairDataset",
           "SyncDataset", "ShardSampler", "collate", "steps_per_epoch"]
