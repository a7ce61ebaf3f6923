"""Bake server analyses into ordinary keyframes on the face rig.

* **Bake from video** (:class:`VideoBake`): the server's ``extract`` turns a movie (a file or a movie
  strip) into 73-value rows; they become keys on ``rotation_euler``, ``location`` and the 64
  ``styleheat.expression`` channels (the inverse of the rig -> row mapping, ``frames.rig_channels_from_rows``),
  one key per scene frame from the chosen start frame.
* **Bake audio to expression** (:func:`bake_audio`): what the sound strips play (Blender's mixdown,
  exactly as for rendering) goes to the server's ``audio2exp``; the 64 expression rows become
  ``styleheat.expression`` keys over exactly the strip's frames, scaled, replacing or added to the
  existing curve.

Each bake keys only the channel groups it is given (:data:`GROUPS`: head rotation, head position,
expression; audio adds the blink weight) and, by default, into its own *layer* (``layers.py``: an
action on an NLA track named after the source, blended with Combine over the rig's own action), so a
re-bake replaces only that layer. ``layer=None`` writes into the rig's own action instead, replacing
the keys inside the baked range only (keys outside it stay). The keys are plain F-curve keys the
animator can edit. Everything here is a
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
from . import connection, layers, render as R
from .client import Client, ClientError

LOOPBACK_HINTS = ("127.0.0.1", "localhost", "[::1]", "ipc://", "inproc://")
VIDEO_CHANNELS = ([("rotation_euler", i) for i in range(3)] + [("location", i) for i in range(3)]
                  + [(F.EXPRESSION_PATH, k) for k in range(64)])
#: the channel groups a bake can key: head rotation, head position, the 64 raw expression values
GROUPS = {"ROTATION": tuple(("rotation_euler", i) for i in range(3)),
          "LOCATION": tuple(("location", i) for i in range(3)),
          "EXPRESSION": tuple((F.EXPRESSION_PATH, k) for k in range(64))}
GROUP_LABELS = {"ROTATION": "Head Rotation", "LOCATION": "Head Position", "EXPRESSION": "Expression"}
MAX_POSE_STYLE = 45        # the server's limits (docs/protocol.md, audio2exp)
MAX_POSE_SCALE = 10.0
MAX_SEED = 2 ** 31 - 1
MAX_BLINK_RATE = 120.0
BLINK_MARKER = "blink"


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


def check_groups(groups) -> frozenset:
    """The channel groups as a set of :data:`GROUPS` names; a clear error for unknown or no groups."""
    if isinstance(groups, str):
        groups = (groups,)
    chosen = frozenset(str(g).upper() for g in groups)
    bad = sorted(chosen - set(GROUPS))
    if bad:
        raise R.UserError(f"unknown channel group(s) {', '.join(bad)}; choose from {', '.join(GROUPS)}")
    if not chosen:
        raise R.UserError("no channel group chosen: pick at least one of Head Rotation, Head Position, Expression")
    return chosen


def select_channels(channels: dict, groups) -> dict:
    keep = {c for g in groups for c in GROUPS[g]}
    return {k: v for k, v in channels.items() if k in keep}


def write_bake(obj, channels: dict, first: int, layer: str | None) -> tuple[int, int]:
    """Key ``channels`` from ``first`` into layer ``layer`` (replacing that layer) or, with
    ``layer=None``, into the rig's own action (replacing its keys in the range)."""
    if layer is None:
        return write_keys(obj, channels, first)
    layers.write_layer(obj, layer, channels, first)
    n = max(len(v) for v in channels.values())
    return first, first + n - 1


def _layer_name(layer: str | None, default: str) -> str | None:
    if layer is None:
        return None
    layer = str(layer).strip()
    return layer or default


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
    groups: frozenset = frozenset(GROUPS)
    layer: str | None = None                # the layer written (None: the rig's own action)
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
        channels = select_channels(F.rig_channels_from_rows(rows, self.base), self.groups)
        self.keyed = write_bake(obj, channels, int(frames[idx[0]]), self.layer)
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
                     frame_timeout: float = 300.0, groups=tuple(GROUPS), layer: str | None = "") -> VideoBake:
    """Send the movie to the server's ``extract``. ``strip``: a movie strip's name (its file; rows
    keyed from the strip's start, one row per movie frame as the strip shows them, only over its
    visible frames) or ``filepath``: a movie file (rows resampled to the scene's frame rate, keyed
    from ``start_frame``, default the current frame). ``groups``: the channel groups keyed;
    ``layer``: the layer written ("" = ``Video: <source>``, None = the rig's own action)."""
    _check_rig(obj)
    groups = check_groups(groups)
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
    name = _layer_name(layer, f"Video: {strip or os.path.basename(path)}")
    return VideoBake(client, job, obj.name, scene.name, first, limit, source, base, groups, name)


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
    expressions: np.ndarray      # (N, 64) what the server returned (without blinks)
    offsets: np.ndarray          # (N, 64) keyed values (scaled offsets, plus the old curve when blending)
    pose: np.ndarray | None = None          # (N, 6) the server's head pose (angles, translation), with ``pose``
    blink_weights: np.ndarray | None = None  # (N,) keyed blink weight, with ``blinks``
    blink_frames: list = field(default_factory=list)   # scene frames where the eyes are fully closed
    layer: str | None = None
    channels: list = field(default_factory=list)       # the (path, index) channels keyed


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


def _check_number(value, name: str, lo: float, hi: float, what: str, integer: bool = False):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise R.UserError(f"{name} must be a number ({what}), got {value!r}") from None
    if not np.isfinite(v) or v < lo or v > hi or (integer and v != int(v)):
        kind = "a whole number" if integer else "a number"
        raise R.UserError(f"{name} must be {kind} from {lo:g} to {hi:g} ({what}), got {value!r}")
    return int(v) if integer else v


def check_audio_options(scale=1.0, pose_style=0, pose_scale=1.0, seed=0, blink_rate=15.0, blink_seed=0) -> None:
    """Clear errors for out-of-range audio-bake options, before anything is sent or keyed."""
    _check_number(scale, "scale", 0.0, 1e6, "the expression strength: 1 = as predicted, 0 = none; "
                  "a negative value would invert the mouth motion")
    _check_number(pose_style, "pose style", 0, MAX_POSE_STYLE, "one of Audio2Pose's 46 learned styles", True)
    _check_number(pose_scale, "head motion scale", 0.0, MAX_POSE_SCALE,
                  "the head motion amplitude: 0 = still, 1 = as predicted")
    _check_number(seed, "head motion seed", 0, MAX_SEED, "any whole number picks one head motion", True)
    _check_number(blink_rate, "blink rate", 0.0, MAX_BLINK_RATE, "blinks per minute; people blink about 15")
    _check_number(blink_seed, "blink seed", 0, MAX_SEED, "any whole number picks one set of blink times", True)


def _set_blink_markers(scene, first: int, last: int, frames) -> None:
    """Timeline markers named ``blink`` at ``frames``, replacing those in first..last."""
    for m in [m for m in scene.timeline_markers if m.name == BLINK_MARKER and first <= m.frame <= last]:
        scene.timeline_markers.remove(m)
    for f in frames:
        scene.timeline_markers.new(BLINK_MARKER, frame=int(f))


def bake_audio(scene, obj, address: str, timeout: float = 5.0, *, strip: str = "", scale: float = 1.0,
               blend: bool = False, frame_timeout: float = 300.0, groups=tuple(GROUPS), layer: str | None = "",
               pose: bool = False, pose_style: int = 0, pose_scale: float = 1.0, seed: int = 0,
               blinks: bool = False, blink_rate: float = 15.0, blink_seed: int = 0,
               markers: bool = True) -> AudioBake:
    """Key what the sound strips play over exactly their frames, from the server's ``audio2exp``:

    * ``EXPRESSION`` in ``groups``: the 64 expression channels, ``scale * (exp - e0)`` (``blend``, only
      with ``layer=None``: added to what the rig's own curves give there, else replacing it);
    * ``pose`` (with ``ROTATION`` / ``LOCATION`` in ``groups``): SadTalker's Audio2Pose head motion
      (``pose_style`` 0..45, ``pose_scale`` 0..10, ``seed``) as rotation / location offsets from the
      portrait's pose;
    * ``blinks``: the ``styleheat.blink`` weight (1 = eyes fully closed) at ``blink_rate`` per minute
      (``blink_seed``); the closed-eye frames become timeline markers named ``blink`` (``markers``).

    ``layer``: the layer written ("" = ``Audio: <strip>``, None = the rig's own action). Options are
    checked before anything is sent; a bake whose strips play only silence is refused."""
    _check_rig(obj)
    check_audio_options(scale, pose_style, pose_scale, seed, blink_rate, blink_seed)
    groups = check_groups(groups)
    want_exp = "EXPRESSION" in groups
    pose_groups = [g for g in ("ROTATION", "LOCATION") if g in groups] if pose else []
    if pose and not pose_groups:
        raise R.UserError("Head motion is on but neither Head Rotation nor Head Position is chosen; choose one or "
                          "turn head motion off")
    if not (want_exp or pose_groups or blinks):
        raise R.UserError("Nothing to bake: choose Expression, turn on head motion (with Head Rotation or Head "
                          "Position) or turn on blinks")
    audio_mod.require()
    first, last = sound_range(scene, strip)
    samples = audio_mod.mixdown(scene, first, last)
    if samples is None:
        raise R.UserError("There is no unmuted sound strip to bake; add one in the Video Sequencer.")
    if not np.any(np.abs(samples) > 1e-6):
        raise R.UserError(f"The sound strips play only silence over frames {first}..{last} (muted or at volume 0 "
                          "there); nothing was baked. Unmute them or raise their volume.")
    client, info, base = _connect_for(obj, address, timeout, "audio2exp", "This StyleHEAT server has no Audio2Exp "
                                      "network; restart it with --audio2exp PATH (SadTalker's checkpoint).")
    e0 = base[:64]
    presets = {}
    if blinks:
        R.sync_presets(scene, info)
        presets = rig_mod.stored_presets(scene)
        if "eyes" not in presets:
            raise R.UserError("Blinks need the server's 'eyes' expression preset; start the server with --presets FILE "
                              "(or expression.pth in its checkpoints) and connect again")
    fps = compat.scene_fps(scene)
    n = last - first + 1
    audio = {"samples": samples, "sample_rate": audio_mod.SAMPLE_RATE, "fps": fps, "frame_offset": float(first)}
    motion = {}
    if pose_groups:
        motion = {"pose": True, "pose_style": int(pose_style), "pose_scale": float(pose_scale), "seed": int(seed),
                  "ref_pose": base[64:70]}
    exp, pose_rows, _ = client.audio2motion(audio, fps, n, e0, offset_frames=float(first), timeout=frame_timeout,
                                            **motion)
    name = _layer_name(layer, f"Audio: {strip or 'sound strips'}")
    frames = range(first, last + 1)
    channels: dict = {}
    offsets = F.expression_offsets(exp, e0, scale)
    if want_exp:
        if blend and name is None:
            for k in range(64):
                offsets[:, k] += channel_values(obj, F.EXPRESSION_PATH, k, frames)
        channels.update({(F.EXPRESSION_PATH, k): offsets[:, k] for k in range(64)})
    if pose_rows is not None:
        rows = np.tile(base.astype(np.float64), (n, 1))
        rows[:, 64:70] = pose_rows
        channels.update(select_channels(F.rig_channels_from_rows(rows, base), pose_groups))
    weights, closed = None, []
    if blinks:
        # the server adds w * (eyes - center) to its rows: the same request with blinks, minus the
        # rows without, projected on that direction, is the blink weight per frame
        with_b, _, peaks = client.audio2motion(audio, fps, n, e0, offset_frames=float(first), timeout=frame_timeout,
                                               blinks=True, blink_rate=float(blink_rate), blink_seed=int(blink_seed))
        d = F.blink_direction(presets)
        dd = float(d @ d)
        if dd <= 0.0:
            raise R.UserError("The server's 'eyes' and 'center' presets are equal, so a blink cannot be keyed")
        weights = (np.asarray(with_b, np.float64) - np.asarray(exp, np.float64)) @ d / dd
        closed = [first + int(p) for p in (peaks or [])]
        channels[(F.BLINK_PATH, 0)] = weights
    write_bake(obj, channels, first, name)
    if blinks and markers:
        _set_blink_markers(scene, first, last, closed)
    return AudioBake(first, last, samples, audio_mod.SAMPLE_RATE, exp, offsets, pose_rows, weights, closed, name,
                     sorted(channels))
