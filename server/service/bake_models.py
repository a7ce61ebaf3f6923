"""What the server needs besides the engine: the face aligner and the audio converter (optional
collaborators, server/preprocessing/align.py and server/preprocessing/audio.py), and the bake models -- expression presets, the
tracker (``extract``; the engine shares it for the portraits' own rows) and Audio2Exp (``audio2exp``)
-- with a note saying why one is missing."""
from __future__ import annotations

import functools
import importlib
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from server import protocol as P

log = logging.getLogger("styleheat.server")


def find_aligner() -> Callable | None:
    """image (H, W, 3) uint8 RGB -> (aligned square RGB, [warnings], quad); None when no aligner can run here.

    ``quad``: (4, 2) corners of the crop in the input image (``AlignedPortrait.quad``), for pasting frames back.
    """
    try:
        from server.preprocessing import align as align_mod
    except ImportError:
        return None
    fn = getattr(align_mod, "align_portrait", None)
    available = getattr(align_mod, "dlib_available", lambda: True)
    try:
        if fn is None or not available():
            return None
    except Exception:
        return None

    def aligner(rgb: np.ndarray):
        out = fn(rgb)
        image = getattr(out, "image", out)
        quad = getattr(out, "quad", None)
        return (np.ascontiguousarray(image, dtype=np.uint8), list(getattr(out, "warnings", []) or []),
                None if quad is None else np.asarray(quad, dtype=np.float64))

    return aligner


#: what server/preprocessing/audio.py needs to compute mel windows and resample (librosa loads its submodules lazily,
#: so ``import librosa`` alone proves little: the probe imports the parts the audio path calls)
AUDIO_IMPORTS = ("librosa", "librosa.filters", "librosa.core.spectrum", "scipy.signal", "soxr")


@functools.cache
def audio_unavailable() -> str | None:
    """None when the audio path's libraries import here; else why not, in words (probed once)."""
    for name in AUDIO_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 -- ImportError, or a broken install failing on import
            return (f"the audio library {name} cannot be imported here ({type(exc).__name__}: {exc}); install "
                    f"the server's pinned dependencies (pip install -e . brings librosa==0.11.0)")
    return None


def find_audio_converter() -> tuple[Callable | None, str]:
    """(converter, note); the converter is None, and the note says why, when audio cannot be converted here.

    converter: (samples, sample_rate, fps, n_rows, first_frame, frame_offset) -> (n_rows, 80, 32) float32.
    Row ``i`` is scene frame ``first_frame + i``; ``samples[0]`` plays at scene frame ``frame_offset``;
    so row ``i`` shows audio time ``(first_frame + i - frame_offset) / fps``.
    """
    try:
        from server.preprocessing import audio as audio_mod
    except ImportError as exc:
        return None, f"the server's audio module (server/preprocessing/audio.py) cannot be imported ({exc})"
    fn = getattr(audio_mod, "audio_windows_for_frames", None)
    if not callable(fn):
        return None, "the server's audio module (server/preprocessing/audio.py) has no audio_windows_for_frames"
    missing = audio_unavailable()
    if missing is not None:
        return None, missing

    def convert(samples, sample_rate, fps, n_rows, first_frame, frame_offset):
        return fn(samples, sample_rate, fps, n_rows, offset_frames=float(first_frame) - float(frame_offset))

    return convert, "mel windows by server/preprocessing/audio.py"


DEEP3D_FILE = "Deep3D/epoch_20.pth"
PRESET_FILES = ("expression.pth", "expression_presets.json")
AUDIO2EXP_PATTERNS = ("audio2exp*.safetensors", "audio2exp*.pth", "auido2exp*.pth", "SadTalker_V0.0.2_*.safetensors")


class BakeModels:
    """What the bake requests need; ``None`` models come with a note saying why (sent as ``unsupported``)."""

    def __init__(self, *, presets: dict | None = None, pose_presets: dict | None = None,
                 presets_source: str | None = None, tracker=None,
                 extract_note: str = "this server was started without a 3DMM tracker (Deep3D)",
                 audio2exp=None, audio2exp_note: str = "this server was started without an Audio2Exp model",
                 tiny: bool = False):
        self.presets = presets or {}
        self.pose_presets = pose_presets or {}
        self.presets_source = presets_source
        self.tracker = tracker        # models.tracking.Tracker or None
        self.extract_note = extract_note
        self.audio2exp = audio2exp
        self.audio2exp_note = audio2exp_note
        self.tiny = tiny


def _preset_vector(value, name: str, width: int, source: str) -> list[float]:
    try:
        arr = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: preset {name!r} is not a list of numbers") from None
    arr = arr.reshape(-1)
    if arr.shape != (width,) or not np.isfinite(arr).all():
        raise ValueError(f"{source}: preset {name!r} must be {width} finite numbers, got {arr.size} values")
    return [float(x) for x in arr.astype(np.float32)]


def load_presets(path: str | os.PathLike) -> tuple[dict, dict]:
    """(expression presets {name: [64]}, pose presets {name: [6]}) from a preset file.

    * JSON ``{"presets": {name: [64 floats]}, "pose_presets": {name: [6 floats]}}`` (pose optional),
      the shape of ``shared/fixtures/expression_presets.json``;
    * the official ``docs/demo/intuitive_edit/expression.pth`` (a dict of tensors keyed
      ``expression_center`` ...), read with ``torch.load(weights_only=True)``; the ``expression_``
      prefix is dropped, 6-value entries are pose presets.

    ValueError names the file and what is wrong.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ValueError(f"preset file {source} not found")
    if path.suffix.lower() == ".json":
        import json

        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{source} is not readable JSON ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("presets"), dict):
            raise ValueError(f"{source} must be a JSON object with a 'presets' map name -> 64 numbers "
                             f"(and optionally 'pose_presets' name -> 6 numbers)")
        pose = obj.get("pose_presets", {})
        if not isinstance(pose, dict):
            raise ValueError(f"{source}: 'pose_presets' must be a map name -> 6 numbers")
        exp = {str(k): _preset_vector(v, k, P.EXP_WIDTH, source) for k, v in obj["presets"].items()}
        return exp, {str(k): _preset_vector(v, k, P.POSE_WIDTH, source) for k, v in pose.items()}
    from models.weights import torch_load

    try:
        obj = torch_load(path)
    except Exception as exc:  # noqa: BLE001 -- any unreadable file is a clear startup error
        raise ValueError(f"{source} cannot be read as a weights-only torch file ({type(exc).__name__}: {exc})") \
            from None
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{source} must hold a dict of preset tensors (expression_center, expression_mouth, ...)")
    exp, pose = {}, {}
    for k, v in obj.items():
        name = str(k)
        n = int(np.prod(getattr(v, "shape", np.shape(v)))) if not isinstance(v, (str, bytes)) else -1
        if n == P.POSE_WIDTH:
            pose[name] = _preset_vector(v, name, P.POSE_WIDTH, source)
        else:
            exp[name[len("expression_"):] if name.startswith("expression_") else name] = \
                _preset_vector(v, name, P.EXP_WIDTH, source)
    return exp, pose


def tiny_tracker(seed: int = 0, device: str = "cpu"):
    """The --tiny-random tracker: dlib landmarks and the seeded tiny Deep3D of :func:`tiny_deep3d`."""
    from server.preprocessing.tracking import DlibDeep3DTracker, require_dlib

    require_dlib()
    return DlibDeep3DTracker(tiny_deep3d(seed, device), description=f"dlib + tiny random Deep3D (seed {seed})")


def tiny_deep3d(seed: int = 0, device: str = "cpu"):
    """The --tiny-random Deep3D extractor: ``torch.manual_seed(seed); ReconNet(Deep3DConfig.tiny())``."""
    import torch

    from models.deep3d import Deep3DConfig, ReconNet
    from server.preprocessing.deep3d import Deep3DExtractor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ReconNet(Deep3DConfig.tiny())
    return Deep3DExtractor(net.eval(), None, device)


def tiny_audio2exp(seed: int = 0, device: str = "cpu"):
    """The --tiny-random Audio2Exp: ``torch.manual_seed(seed); Audio2Exp(Audio2ExpConfig.tiny()).eval()``."""
    import torch

    from models.audio2exp import Audio2Exp, Audio2ExpConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Audio2Exp(Audio2ExpConfig.tiny())
    return model.to(device).eval()


def find_audio2exp(directory: Path) -> Path | None:
    for pattern in AUDIO2EXP_PATTERNS:
        for root in (directory, directory / "checkpoints"):
            hits = sorted(root.glob(pattern)) if root.is_dir() else []
            if hits:
                return hits[0]
    return None


def load_bake_models(args, device: str = "cpu") -> BakeModels:
    """Presets (fatal if --presets is bad), the tracker and Audio2Exp on ``device`` (a failure only
    disables the request). The server hands ``bake.tracker`` to the engine too: one Deep3D in memory."""
    bake = _load_bake_models(args, str(device))
    missing = audio_unavailable()
    if bake.audio2exp is not None and missing is not None:   # it turns audio into mel spectrograms first
        bake.audio2exp = None
        bake.audio2exp_note = f"Audio2Exp cannot run here: {missing}"
        log.warning("%s", bake.audio2exp_note)
    return bake


def _load_bake_models(args, device: str) -> BakeModels:
    presets, pose, source = {}, {}, None
    checkpoints: Path | None = None
    if not args.tiny_random:
        from server.checkpoints.paths import resolve_checkpoint_dir

        path, _ = resolve_checkpoint_dir(args.checkpoints, option="--checkpoints")
        checkpoints = path.parent if path.is_file() else path
    if args.presets:
        presets, pose = load_presets(args.presets)
        source = str(args.presets)
    elif checkpoints is not None:
        for name in PRESET_FILES:
            if (checkpoints / name).is_file():
                presets, pose = load_presets(checkpoints / name)
                source = str(checkpoints / name)
                break
    bake = BakeModels(presets=presets, pose_presets=pose, presets_source=source, tiny=args.tiny_random)
    if args.no_bake_models:
        bake.extract_note = "this server was started with --no-bake-models (no 3DMM tracker, no Deep3D)"
        bake.audio2exp_note = ("this server was started with --no-bake-models (no Audio2Exp model); restart "
                               "it without that option, with --audio2exp PATH")
        return bake
    if args.tiny_random:
        try:
            bake.tracker = tiny_tracker(args.seed, device)
            bake.extract_note = "tiny random Deep3D (seeded, not real weights): its coefficients are noise"
        except RuntimeError as exc:  # no dlib
            bake.extract_note = str(exc)
        bake.audio2exp = tiny_audio2exp(args.seed, device)
        bake.audio2exp_note = "tiny random Audio2Exp (seeded, not real weights): its expressions are noise"
        if args.audio2exp is None:
            return bake
    if not args.tiny_random:
        from server.preprocessing.tracking import load_tracker

        deep3d = checkpoints / DEEP3D_FILE
        if not deep3d.is_file():
            bake.extract_note = (f"no Deep3D weights: {deep3d} is missing; run 'styleheat download' (it fetches "
                                 f"Deep3D/epoch_20.pth) or pass --checkpoints DIR holding it")
        else:
            try:
                bake.tracker = load_tracker(checkpoints, device=device)
                bake.extract_note = f"Deep3D from {deep3d}"
            except RuntimeError as exc:  # no dlib: the message says what to install
                bake.extract_note = str(exc)
                log.warning("%s", bake.extract_note)
            except Exception as exc:  # noqa: BLE001 -- the server still renders without it
                bake.extract_note = f"the Deep3D weights {deep3d} could not be loaded ({exc}); check them with 'styleheat doctor'"
                log.warning("%s", bake.extract_note)
    a2e_path = Path(args.audio2exp) if args.audio2exp else (find_audio2exp(checkpoints) if checkpoints else None)
    if a2e_path is None:
        bake.audio2exp_note = (f"no Audio2Exp checkpoint: none of {', '.join(AUDIO2EXP_PATTERNS)} in "
                               f"{checkpoints}; pass --audio2exp PATH (SadTalker's auido2exp_00300-model.pth "
                               f"or SadTalker_V0.0.2_256.safetensors)")
    else:
        from server.preprocessing.audio import load_audio2exp

        try:
            bake.audio2exp = load_audio2exp(a2e_path, device=device)
            bake.audio2exp_note = f"Audio2Exp from {a2e_path}"
        except (ValueError, OSError) as exc:
            if args.audio2exp:
                raise ValueError(f"--audio2exp {args.audio2exp}: {exc}") from None
            bake.audio2exp_note = (f"the Audio2Exp checkpoint {a2e_path} could not be loaded ({exc}); pass a "
                                   f"working one with --audio2exp PATH")
            log.warning("%s", bake.audio2exp_note)
    return bake

