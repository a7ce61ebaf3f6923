"""Bake server analyses into ordinary keyframes on the face rig.

* **Bake from video** (:class:`VideoBake`): the server's ``extract`` turns a movie (a file or a movie
  strip) into 73-value rows; they become keys on ``rotation_euler``, ``location`` and the 64
  ``styleheat.expression`` channels (the inverse of the rig -> row mapping, ``frames.rig_channels_from_rows``),
  one key per scene frame from the chosen start frame.
* **Bake audio to expression** (:func:`bake_audio`): what the sound strips play (Blender's mixdown,
  exactly as for rendering) goes to the server's ``audio2exp``; the 64 expression rows become
  ``styleheat.expression`` keys over exactly the strip's frames, scaled, replacing or added to the
  existing curve.

Re-baking replaces the keys inside the baked range only; keys outside it are untouched. The keys
are plain F-curve keys (Bezier, auto-clamped handles) the animator can edit. Everything here is a
plain function or a class with ``step()`` so the modal operator, scripts and tests run the same
code (timers never fire in bpy-as-a-module).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import bpy
import numpy as np

from . import audio as audio_mod
from . import compat, frames as F, rig as rig_mod
from . import connection, render as R
from .client import Client, ClientError

LOOPBACK_HINTS = ("127.0.0.1", "localhost", "[::1]", "ipc://", "inproc://")
VIDEO_CHANNELS = ([("rotation_euler", i) for i in range(3)] + [("location", i) for i in range(3)]
                  + [(F.EXPRESSION_PATH, k) for k in range(64)])


def is_loopback(address: str) -> bool:
    return any(h in address for h in LOOPBACK_HINTS)


# --- keys ------------------------------------------------------------------------------------

def _static_value(obj, path: str, index: int) -> float:
    if path == F.EXPRESSION_PATH:
        buf = [0.0] * 64
        obj.styleheat.expression.foreach_get(buf)
        return float(buf[index])
    return float(getattr(obj, path)[index])


def channel_values(obj, path: str, index: int, frames) -> np.ndarray:
    """What one channel's F-curve gives at ``frames`` (its static value when it has no curve)."""
    fc = compat.find_fcurve(obj, path, index)
    frames = list(frames)
    if fc is None:
        return np.full(len(frames), _static_value(obj, path, index), dtype=np.float64)
    return np.asarray([fc.evaluate(f) for f in frames], dtype=np.float64)


def write_channel(obj, path: str, index: int, first: int, values) -> None:
    """Key ``values[i]`` at frame ``first + i`` after removing this channel's keys in that range."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return
    last = first + values.size - 1
    fc = compat.find_fcurve(obj, path, index)
    if fc is None:  # creates the action, its slot and the curve the version-appropriate way
        obj.keyframe_insert(path, index=index, frame=first)
        fc = compat.find_fcurve(obj, path, index)
        if fc is None:
            raise RuntimeError(f"could not create an F-curve for {path}[{index}] on {obj.name}")
    kps = fc.keyframe_points
    for i in range(len(kps) - 1, -1, -1):
        x = kps[i].co[0]
        if first - 0.5 < x < last + 0.5:
            kps.remove(kps[i], fast=True)
    for i, v in enumerate(values):
        kps.insert(first + i, float(v), options={"FAST"})
    fc.update()


def write_keys(obj, channels: dict, first: int) -> tuple[int, int]:
    """Write {(path, index): (N,) values} from ``first``; returns the keyed range (first, last)."""
    n = 0
    for (path, index), values in channels.items():
        write_channel(obj, path, index, first, values)
        n = max(n, len(values))
    return first, first + n - 1


def _portrait_base(client: Client, obj) -> np.ndarray:
    """The portrait's coefficients the baked keys are relative to (prepares it once if needed;
    neutral when the rig has no portrait)."""
    rig = obj.styleheat
    if not rig.has_base and rig.portrait:
        R.ensure_identity(client, obj)
    return rig_mod.base_coefficients(rig)


def _check_rig(obj) -> None:
    R.require_rig(obj)
    if obj.rotation_mode != "XYZ":
        raise R.UserError(f"{obj.name}: set Rotation Mode to XYZ Euler before baking (the bake keys "
                          "rotation_euler)")


def _connect_for(obj, address: str, timeout: float, capability: str, missing: str):
    """(client, server info, portrait base) for a bake that needs the server's ``capability``;
    ``missing`` is the error when the server says it lacks it (a server that does not list its
    capabilities is tried anyway)."""
    client = connection.get_client(address, timeout)
    info = connection.connect(address, timeout)
    caps = connection.info_field(info, "capabilities", None)
    if isinstance(caps, dict) and capability in caps and not caps[capability]:
        raise R.UserError(missing)
    return client, info, _portrait_base(client, obj)


# --- bake from video -------------------------------------------------------------------------

@dataclass
class VideoBake:
    """One running extraction. ``step()`` is the modal timer body; ``finish()`` writes the keys."""
    client: Client
    job: object
    obj_name: str
    scene_name: str
    first: int                              # scene frame of row 0
    limit: tuple[int, int] | None           # keep only rows inside these frames (a strip's visible range)
    source: str
    base: np.ndarray
    keyed: tuple[int, int] | None = None
    warnings: list = field(default_factory=list)
    error: Exception | None = None

    @property
    def done(self) -> bool:
        return self.job.finished or self.error is not None

    @property
    def cancelled(self) -> bool:
        return bool(self.job.cancelled)

    def status(self) -> str:
        return self.job.status()

    def step(self, timeout: float = 0.0) -> bool:
        """Handle what the server sent (waiting at most ``timeout`` s); False when over."""
        if self.done:
            return False
        try:
            return self.job.poll(timeout)
        except ClientError as exc:
            self.error = exc
            return False

    def cancel(self) -> None:
        self.job.cancel()

    def finish(self):
        """Write the keys (when the rows arrived); returns the keyed (first, last) or None."""
        result = self.job.result
        if result is None or self.error is not None:
            return None
        obj = bpy.data.objects.get(self.obj_name)
        if obj is None:
            raise R.UserError(f"the face rig {self.obj_name!r} was deleted during the bake")
        rows = result["rows"]
        self.warnings = list(result.get("warnings") or [])
        frames = np.arange(self.first, self.first + rows.shape[0])
        keep = np.ones(rows.shape[0], dtype=bool)
        if self.limit is not None:
            keep = (frames >= self.limit[0]) & (frames <= self.limit[1])
        if not keep.any():
            raise R.UserError(f"none of the {rows.shape[0]} extracted frames falls inside the strip's "
                              f"visible range {self.limit[0]}..{self.limit[1]}")
        idx = np.flatnonzero(keep)
        rows = rows[idx[0]:idx[-1] + 1]
        channels = F.rig_channels_from_rows(rows, self.base)
        self.keyed = write_keys(obj, channels, int(frames[idx[0]]))
        return self.keyed

    def run(self, should_stop=None, poll: float = 0.2):
        while self.step(poll):
            if should_stop is not None and should_stop(self):
                self.cancel()
                return None
        if self.error is not None:
            raise self.error
        return self.finish()


def start_video_bake(scene, obj, address: str, timeout: float = 5.0, *, filepath: str = "", strip: str = "",
                     start_frame: int | None = None, smooth: float = 0.0,
                     frame_timeout: float = 300.0) -> VideoBake:
    """Send the movie to the server's ``extract``. ``strip``: a movie strip's name (its file; rows
    keyed from the strip's start, one row per movie frame as the strip shows them, only over its
    visible frames) or ``filepath``: a movie file (rows resampled to the scene's frame rate, keyed
    from ``start_frame``, default the current frame)."""
    _check_rig(obj)
    limit = None
    if strip:
        s = next((x for x in compat.all_strips(scene) if x.name == strip), None)
        if s is None or s.type != "MOVIE":
            raise R.UserError(f"no movie strip named {strip!r} in scene {scene.name!r}")
        path = bpy.path.abspath(s.filepath)
        first = int(s.frame_start) if start_frame is None else int(start_frame)
        limit = (int(s.frame_final_start) + first - int(s.frame_start),
                 int(s.frame_final_end) - 1 + first - int(s.frame_start))
        source = f"strip {strip}"
    else:
        if not filepath:
            raise R.UserError("Pick a movie file or a movie strip to bake from.")
        path = bpy.path.abspath(filepath)
        first = scene.frame_current if start_frame is None else int(start_frame)
        source = os.path.basename(path)
    if not os.path.isfile(path):
        raise R.UserError(f"The movie {path!r} does not exist; pick an existing video file.")
    client, info, base = _connect_for(
        obj, address, timeout, "extract", "This StyleHEAT server cannot extract motion from video (it has no "
        "Deep3D weights: run 'styleheat download' and restart it with --checkpoints).")
    # a file: rows at the scene's rate (real time). A strip: Blender shows one movie frame per scene
    # frame (bpy 5.0 new_movie: a 50 fps movie of 20 frames lasts 20 scene frames), so one row per
    # movie frame keeps the keys on the frames that show them.
    fps = None if strip else compat.scene_fps(scene)
    if is_loopback(address):
        job = client.extract(path=os.path.abspath(path), fps=fps, smooth=smooth, timeout=frame_timeout)
    else:
        size = os.path.getsize(path)
        limit_bytes = int((connection.info_field(info, "limits", {}) or {}).get("max_part_bytes", 96 << 20))
        if size > limit_bytes:
            raise R.UserError(f"The movie is {size / 1e6:.0f} MB; this server accepts at most "
                              f"{limit_bytes / 1e6:.0f} MB per file. Trim or re-encode it.")
        with open(path, "rb") as f:
            data = f.read()
        job = client.extract(video=data, fps=fps, smooth=smooth, timeout=frame_timeout)
    return VideoBake(client, job, obj.name, scene.name, first, limit, source, base)


def bake_video(scene, obj, address: str, timeout: float = 5.0, should_stop=None, **kw) -> VideoBake:
    """Blocking bake (scripts, headless, tests)."""
    bake = start_video_bake(scene, obj, address, timeout, **kw)
    bake.run(should_stop)
    return bake


# --- bake audio to expression ----------------------------------------------------------------

@dataclass
class AudioBake:
    first: int
    last: int
    samples: np.ndarray          # the mono PCM sent (sample 0 plays at ``first``)
    sample_rate: int
    expressions: np.ndarray      # (N, 64) what the server returned
    offsets: np.ndarray          # (N, 64) keyed values (scaled offsets, plus the old curve when blending)


def sound_range(scene, strip: str = "") -> tuple[int, int]:
    """Frames (first, last) a sound strip (or all unmuted ones) plays over, trims included."""
    if strip:
        strips = [s for s in compat.all_strips(scene) if s.name == strip]
        if not strips or not compat.is_sound_strip(strips[0]):
            raise R.UserError(f"no sound strip named {strip!r} in scene {scene.name!r}")
        if strips[0].mute:
            raise R.UserError(f"the sound strip {strip!r} is muted; unmute it to bake what it plays")
    else:
        strips = audio_mod.audible_sound_strips(scene)
    if not strips:
        raise R.UserError("There is no unmuted sound strip to bake; add one in the Video Sequencer.")
    first = min(int(s.frame_final_start) for s in strips)
    last = max(int(s.frame_final_end) for s in strips) - 1
    return first, last


def bake_audio(scene, obj, address: str, timeout: float = 5.0, *, strip: str = "", scale: float = 1.0,
               blend: bool = False, frame_timeout: float = 300.0) -> AudioBake:
    """Key ``styleheat.expression`` over the strip's frames with the server's Audio2Exp rows:
    ``scale * (exp - e0)`` (``blend``: added to what the curves give there, else replacing it)."""
    _check_rig(obj)
    audio_mod.require()
    first, last = sound_range(scene, strip)
    client, _, base = _connect_for(obj, address, timeout, "audio2exp", "This StyleHEAT server has no Audio2Exp "
                                   "network; restart it with --audio2exp PATH (SadTalker's checkpoint).")
    e0 = base[:64]
    samples = audio_mod.mixdown(scene, first, last)
    if samples is None:
        raise R.UserError("There is no unmuted sound strip to bake; add one in the Video Sequencer.")
    fps = compat.scene_fps(scene)
    n = last - first + 1
    audio = {"samples": samples, "sample_rate": audio_mod.SAMPLE_RATE, "fps": fps, "frame_offset": float(first)}
    exp = client.audio2exp(audio, fps, n, e0, offset_frames=float(first), timeout=frame_timeout)
    offsets = F.expression_offsets(exp, e0, scale)
    frames = range(first, last + 1)
    if blend:
        for k in range(64):
            offsets[:, k] += channel_values(obj, F.EXPRESSION_PATH, k, frames)
    write_keys(obj, {(F.EXPRESSION_PATH, k): offsets[:, k] for k in range(64)}, first)
    return AudioBake(first, last, samples, audio_mod.SAMPLE_RATE, exp, offsets)
