"""Render the face rig through the server into a PNG sequence and an image strip.

Everything here is a plain function or a class with a ``step()`` method, so the modal operator,
the headless entry point and the tests run exactly the same code (timers and modal handlers
never fire in bpy-as-a-module).

Flow: :func:`plan_render` (main thread: sample the rig, mix the audio, hash every frame, decide
what is stale) -> :class:`RenderSession` (``step()`` writes each received frame as tmp + rename
and records its hash in the sidecar) -> :func:`update_strip`.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

import bpy
import numpy as np

from . import audio as audio_mod
from . import compat, frames as F, rig as rig_mod, shots
from . import protocol as P
from . import connection
from .client import Client, ClientError, ServerError
from .errors import UserError
from .connection import info_field

OUTPUT_ROOT = "//styleheat"
PREVIEW_IMAGE = "StyleHEAT Preview"


def sync_presets(scene, info: dict | None) -> dict:
    """Store the server's presets in the scene (when it sends any) and return the scene's presets:
    the rows use what the .blend holds, so they do not change when a server without presets (or
    no server) is used later."""
    if info:
        rig_mod.store_presets(scene, connection.presets_from_info(info), str(info_field(info, "model", "")))
    return rig_mod.stored_presets(scene)


def pick_size(info: dict, want: int | None) -> int | None:
    """A size the server supports: the smallest advertised size >= want (else the largest)."""
    if not want:
        return None
    sizes = sorted(int(s) for s in (info_field(info, "sizes", None) or []))
    if not sizes:
        return int(want)
    bigger = [s for s in sizes if s >= want]
    return bigger[0] if bigger else sizes[-1]


def max_size(info: dict) -> int | None:
    """The largest output side the server renders (its hello's ``sizes``, else ``native_size``); None: unknown."""
    sizes = [int(x) for x in (info_field(info, "sizes", None) or [])]
    if sizes:
        return max(sizes)
    native = info_field(info, "native_size", None)
    return int(native) if native else None


def size_warning(info: dict, want: int | None, what: str = "Size") -> str | None:
    """A sentence when ``want`` (the rig's Size or Preview Size) is more than the server renders."""
    top = max_size(info)
    if not want or top is None or want <= top:
        return None
    return (f"{what} {want} is more than this server renders ({info_field(info, 'model', 'its model')} makes at "
            f"most {top} px), so the frames come out {top} x {top} px; set {what} to {top} or less, or use a server "
            f"with larger weights")


PRESETS_MISSING = ("this server has no expression presets (the --tiny-random demo server has none), so {names} "
                   "change nothing; start the server with --presets FILE (or real weights) to use them")


def presets_warning(presets: dict, used: set) -> str | None:
    """A sentence when keyed/set expression sliders (``used``: preset names, "blink") have no preset to act on."""
    missing = sorted(n for n in used if (n if n != "blink" else "eyes") not in presets)
    if not missing:
        return None
    names = ", ".join(n.capitalize() for n in missing)
    return PRESETS_MISSING.format(names=f"the {names} slider{'s' if len(missing) > 1 else ''}")


def pick_quality(info: dict, want: str) -> str | None:
    """The render quality to send: ``want`` ("preview" / "full") when the server lists it in its hello's
    ``qualities``, else None (the server's default, full; older servers know no other)."""
    offered = info_field(info, "qualities", None) or {}
    return want if want in offered else None


def require_rig(obj) -> None:
    if not rig_mod.is_rig(obj):
        raise UserError(f"{obj.name if obj else 'Nothing'} is not a StyleHEAT face rig; add one with "
                        "Add > StyleHEAT Face Rig.")


# --- identity ------------------------------------------------------------------------------

def _portrait_bytes(rig) -> tuple[bytes, str]:
    path = bpy.path.abspath(rig.portrait) if rig.portrait else ""
    if not path:
        raise UserError("The face rig has no source portrait; set one in the StyleHEAT panel.")
    if not os.path.isfile(path):
        raise UserError(f"The portrait file {path!r} does not exist; pick an existing PNG or JPEG.")
    with open(path, "rb") as f:
        data = f.read()
    return data, hashlib.sha256(data).hexdigest()[:16] + f"|{int(rig.align)}"


def ensure_identity(client: Client, obj, force: bool = False) -> str:
    """Prepare the rig's portrait on the server when needed; stores identity and coefficients."""
    rig = obj.styleheat
    data, source = _portrait_bytes(rig)
    if rig.identity and rig.identity_source == source and not force:
        return rig.identity
    reply = client.prepare(data, align=rig.align)
    identity = reply.get("identity")
    if not isinstance(identity, str) or not identity:
        raise ClientError("the server's 'prepared' reply has no identity id")
    coeffs = reply.get("coefficients")
    if isinstance(coeffs, dict):
        coeffs = P.decode_array(coeffs, "coefficients", (73,))
    rig_mod.set_base(rig, coeffs if coeffs is not None else None)
    note = reply.get("coefficient_note")
    rig.base_note = "" if coeffs is not None else str(note or "the server measured no expression on it")[:400]
    rig.identity = identity
    rig.identity_source = source
    return identity


# --- planning ------------------------------------------------------------------------------

def frame_range(scene, use_preview: bool | None = None) -> tuple[int, int]:
    preview = scene.use_preview_range if use_preview is None else use_preview
    if preview:
        return scene.frame_preview_start, scene.frame_preview_end
    return scene.frame_start, scene.frame_end


def output_dir(obj) -> str:
    if not bpy.data.filepath:
        raise UserError("Save the .blend first: frames are written next to it in //styleheat/<rig name>/.")
    return bpy.path.abspath(f"{OUTPUT_ROOT}/{bpy.path.clean_name(obj.name)}/")


@dataclass
class RenderPlan:
    obj_name: str
    start: int
    end: int
    directory: str
    prefix: str
    identity: str
    model: str
    size: int | None
    clip: rig_mod.Clip
    audio: dict | None
    hashes: dict[int, str]                  # scene frame -> hash
    todo: list[int]                         # scene frames to (re-)render
    sidecar: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    output: str | None = None               # the render's ``output`` (None: the face crop, not sent)

    @property
    def frames(self) -> list[int]:
        return list(range(self.start, self.end + 1))


def plan_render(scene, obj, identity: str, info: dict, start: int, end: int, directory: str | None,
                size: int | None = None, force: bool = False, requested_size: int | None = None,
                size_name: str = "Size", output: str | None = None) -> RenderPlan:
    rig = obj.styleheat
    presets = sync_presets(scene, info)
    clip = rig_mod.sample_clip(scene, obj, start, end, presets)
    pcm = None
    warnings = [w for w in (size_warning(info, requested_size, size_name),
                            presets_warning(presets, clip.used_presets)) if w]
    for name, (lo, hi) in sorted(clip.clamped.items()):
        warnings.append(f"the {name} values go beyond the server's range {lo:g}..{hi:g}; they are clamped to it")
    known = info_field(info, "attributes", None)
    if isinstance(known, dict):
        unknown = sorted(n for n in clip.attributes if n not in known)
        if unknown:
            warnings.append(f"the server has no attribute edit(s) {', '.join(unknown)}; they are ignored")
        clip.attributes = {n: v for n, v in clip.attributes.items() if n in known}
    if rig.use_audio and info_field(info, "audio", False) is False and audio_mod.audible_sound_strips(scene):
        warnings.append("this server has no audio path, so the sound strips do not drive the lips")
    elif rig.use_audio and not audio_mod.available() and audio_mod.audible_sound_strips(scene):
        warnings.append(audio_mod.NO_AUDIO + ", so the sound strips do not drive the lips")
    elif rig.use_audio:
        samples = audio_mod.mixdown(scene, clip.first, clip.last)
        if samples is not None:
            pcm = {"samples": samples, "sample_rate": audio_mod.SAMPLE_RATE, "fps": compat.scene_fps(scene),
                   "frame_offset": float(clip.first)}
    model = f"{info_field(info, 'model', '?')}|real={info_field(info, 'real_weights', '?')}"
    native = info_field(info, "native_size", None)
    resolved = size or native or 0
    spf = (pcm["sample_rate"] / pcm["fps"]) if pcm else 0.0
    idx = [clip.index(f) for f in range(start, end + 1)]
    by_index = F.frame_hashes(identity, model, int(resolved), clip.rows, idx,
                              audio=pcm["samples"] if pcm else None, samples_per_frame=spf,
                              attributes=clip.attributes, extra=shots.hash_extra(output))
    hashes = {clip.first + i: h for i, h in by_index.items()}
    prefix = bpy.path.clean_name(obj.name)
    sidecar = F.load_sidecar(directory) if directory else {}
    todo = [f for f in range(start, end + 1)
            if force or not directory or not F.is_current(sidecar, directory, f, hashes[f])]
    return RenderPlan(obj.name, start, end, directory or "", prefix, identity, model, size or None, clip, pcm,
                      hashes, todo, sidecar, warnings, output)


# --- execution -----------------------------------------------------------------------------

class RenderSession:
    """Drives one render request. ``step()`` is the modal timer body; ``run()`` the blocking loop."""

    def __init__(self, client: Client, plan: RenderPlan, encoding: str = "png", credit: int = 4,
                 frame_timeout: float = 300.0, on_frame=None, quality: str | None = None):
        self.client, self.plan = client, plan
        self.encoding = encoding
        self.written: list[int] = []
        self.images: dict[int, np.ndarray] = {}     # raw encoding without a directory (preview)
        self.error: Exception | None = None
        self.cancelled = False
        self.on_frame = on_frame
        self.started = time.monotonic()
        self._dirty = False
        self._saved = 0.0
        self.stream = None
        if plan.todo:
            if plan.directory:
                os.makedirs(plan.directory, exist_ok=True)
            self.stream = client.render(plan.identity, plan.clip.rows, plan.clip.first, plan.todo, size=plan.size,
                                        encoding=encoding, credit=credit, attributes=plan.clip.attributes or None,
                                        audio=plan.audio, frame_timeout=frame_timeout, quality=quality,
                                        output=plan.output)

    @property
    def total(self) -> int:
        return len(self.plan.todo)

    @property
    def done(self) -> bool:
        return self.stream is None or self.stream.finished or self.error is not None

    def status(self) -> str:
        if self.error is not None:
            n = len(self.written)
            return f"Failed at {n + 1}/{self.total} \u2014 {n} frame{'s' if n != 1 else ''} kept"
        return f"Frame {len(self.written)}/{self.total}"

    def step(self, timeout: float = 0.0) -> bool:
        """Handle the frames that have arrived (waiting at most ``timeout`` s); False when over."""
        if self.done:
            return False
        try:
            self.stream.drain(self._store, timeout)
        except ClientError as exc:
            self.error = exc
            self.flush()
            return False
        if self.done:
            self.flush()
        return not self.done

    def _store(self, fr) -> None:
        p = self.plan
        if p.directory:
            name = F.frame_filename(p.prefix, fr.frame)
            path = os.path.join(p.directory, name)
            if fr.encoding == "png":
                tmp = f"{path}.part{os.getpid()}"
                with open(tmp, "wb") as f:
                    f.write(fr.data)
                os.replace(tmp, path)
            else:
                F.write_png_atomic(path, fr.rgb())
            p.sidecar[str(fr.frame)] = {"hash": p.hashes[fr.frame], "file": name}
            self._dirty = True
            if time.monotonic() - self._saved > 0.5:
                self.flush()
        else:
            self.images[fr.frame] = fr.rgb()
        self.written.append(fr.frame)
        if self.on_frame is not None:
            self.on_frame(self, fr)

    def flush(self) -> None:
        """Write the sidecar (throttled while frames stream in; always at the end)."""
        if self._dirty and self.plan.directory:
            F.save_sidecar(self.plan.directory, self.plan.sidecar,
                           {"identity": self.plan.identity, "model": self.plan.model})
        self._dirty = False
        self._saved = time.monotonic()

    def cancel(self) -> None:
        """Stop: frames written so far stay valid (each file was complete before it got its name)."""
        self.cancelled = True
        if self.stream is not None and not self.stream.finished:
            self.stream.cancel(wait=0.0)
        self.flush()

    def run(self, should_stop=None, poll: float = 0.2) -> "RenderSession":
        while self.step(poll):
            if should_stop is not None and should_stop(self):
                self.cancel()
                break
        self.flush()
        if self.error is not None:
            raise self.error
        return self


# --- results into Blender ------------------------------------------------------------------

def strip_name(obj_name: str) -> str:
    return (obj_name if "styleheat" in obj_name.lower() else f"StyleHEAT {obj_name}")[:63]


def _free_channel(scene, start: int, end: int, avoid: str) -> int:
    used = set()
    for s in compat.all_strips(scene):
        if s.name == avoid:
            continue
        if s.frame_final_start <= end and s.frame_final_end > start:
            used.add(s.channel)
    ch = 2
    while ch in used:
        ch += 1
    return ch


def update_strip(scene, plan: RenderPlan, channel: int = 0):
    """Add or update the image strip showing frames start.. (as far as files exist contiguously)."""
    names = []
    for f in plan.frames:
        name = F.frame_filename(plan.prefix, f)
        if not os.path.isfile(os.path.join(plan.directory, name)):
            break
        names.append(name)
    name = strip_name(plan.obj_name)
    strips = compat.top_strips(scene)
    old = next((s for s in compat.all_strips(scene) if s.name == name), None)
    keep = {}
    if old is not None:
        channel = channel or old.channel
        keep = {k: getattr(old, k) for k in ("blend_type", "blend_alpha", "mute", "lock") if hasattr(old, k)}
        strips.remove(old)
    if not names:
        return None
    channel = channel or _free_channel(scene, plan.start, plan.start + len(names) - 1, name)
    first = os.path.join(plan.directory, names[0])
    try:
        first = bpy.path.relpath(first)
    except ValueError:  # different drive on Windows
        pass
    strip = strips.new_image(name, first, channel, plan.start, fit_method=shots.fit_method(plan.output))
    for n in names[1:]:
        strip.elements.append(n)
    for k, v in keep.items():
        try:
            setattr(strip, k, v)
        except (AttributeError, TypeError):
            pass
    shots.configure_strip(strip, plan.output)
    return strip


def _png_size(path: str) -> tuple[int, int] | None:
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def rendered_size(scene, obj) -> tuple[int, int]:
    """(width, height) of the rig's rendered frames (its image strip's first file); UserError when none."""
    require_rig(obj)
    strip = next((s for s in compat.all_strips(scene) if s.name == strip_name(obj.name) and s.type == "IMAGE"), None)
    if strip is None or not len(strip.elements):
        raise UserError(f"{obj.name} has no rendered image strip yet; press Render Face Animation first.")
    path = os.path.join(bpy.path.abspath(strip.directory), strip.elements[0].filename)
    size = _png_size(path)
    if size is None:
        raise UserError(f"The strip's first frame {path} is missing or not a PNG; render again.")
    return size


def show_preview(rgb: np.ndarray, name: str = PREVIEW_IMAGE):
    """Put an (H, W, 3) uint8 frame into an image datablock and show it in open Image Editors."""
    h, w = rgb.shape[:2]
    img = bpy.data.images.get(name)
    if img is None or tuple(img.size) != (w, h):
        if img is not None:
            bpy.data.images.remove(img)
        img = bpy.data.images.new(name, w, h, alpha=True, float_buffer=False)
    rgba = np.empty((h, w, 4), dtype=np.float32)
    rgba[..., :3] = rgb[::-1] / 255.0
    rgba[..., 3] = 1.0
    img.pixels.foreach_set(rgba.ravel())
    img.update()
    wm = bpy.context.window_manager
    for window in getattr(wm, "windows", []):
        for area in window.screen.areas:
            if area.type == "IMAGE_EDITOR":
                area.spaces.active.image = img
    return img


# --- one-call helpers (headless, tests) ----------------------------------------------------

def start_render(scene, obj, address: str, timeout: float = 5.0, start: int | None = None, end: int | None = None,
                 force: bool = False, on_frame=None, frame_timeout: float = 300.0,
                 info: dict | None = None) -> RenderSession:
    """Connect (unless ``info``, the server's hello, is given), prepare the portrait when needed, plan
    start..end (default: the scene or preview range) into //styleheat/<rig>/ and send the request:
    the session that the blocking render and the modal operator both drive."""
    require_rig(obj)
    s0, e0 = frame_range(scene)
    client = connection.get_client(address, timeout)
    info = connection.connect(address, timeout) if info is None else info
    rig_mod.ensure_attributes(obj.styleheat, info_field(info, "attributes", {}))
    identity = ensure_identity(client, obj)
    plan = plan_render(scene, obj, identity, info, s0 if start is None else start, e0 if end is None else end,
                       output_dir(obj), size=pick_size(info, obj.styleheat.size), force=force,
                       requested_size=obj.styleheat.size, output=shots.render_output(info, obj.styleheat))
    return RenderSession(client, plan, frame_timeout=frame_timeout, on_frame=on_frame)


def render_range(context_scene, obj, address: str, timeout: float = 5.0, start: int | None = None,
                 end: int | None = None, force: bool = False, should_stop=None, on_frame=None,
                 frame_timeout: float = 300.0) -> RenderSession:
    """Blocking render of the rig over start..end (default: the scene or preview range)."""
    scene = context_scene
    kw = dict(start=start, end=end, force=force, on_frame=on_frame, frame_timeout=frame_timeout)
    try:
        session = start_render(scene, obj, address, timeout, **kw).run(should_stop)
    except ServerError as exc:
        if exc.code != "unknown_identity":
            raise
        # the server restarted and forgot the portrait: prepare it again and retry once
        ensure_identity(connection.get_client(address, timeout), obj, force=True)
        session = start_render(scene, obj, address, timeout, **kw).run(should_stop)
    update_strip(scene, session.plan, obj.styleheat.strip_channel)
    return session


def start_preview(scene, obj, address: str, timeout: float = 5.0, frame: int | None = None, *,
                  prepare: bool = True, info: dict | None = None) -> RenderSession:
    """Ask for one frame at the rig's preview size and quality; the session receives it (raw) into ``images``.

    The rig's ``preview_quality`` "PREVIEW" asks for the server's cheap scrub quality (CalibrationNet skipped,
    cached per frame: see the hello's ``qualities``); "FULL" for exactly what a render gives.
    ``prepare=False`` never uploads the portrait (the live scrub preview must not block on an inversion): a
    rig whose portrait is not prepared raises UserError. ``info``: the server's hello, when known."""
    require_rig(obj)
    frame = scene.frame_current if frame is None else frame
    client = connection.get_client(address, timeout)
    info = connection.connect(address, timeout) if info is None else info
    if prepare:
        identity = ensure_identity(client, obj)
    else:
        identity = prepared_identity(obj)
    plan = plan_render(scene, obj, identity, info, frame, frame, None,
                       size=pick_size(info, obj.styleheat.preview_size), requested_size=obj.styleheat.preview_size,
                       size_name="Preview Size")
    quality = pick_quality(info, "preview" if obj.styleheat.preview_quality == "PREVIEW" else "full")
    return RenderSession(client, plan, encoding="raw", quality=quality)


def prepared_identity(obj) -> str:
    """The rig's server identity when it matches its current portrait, else UserError (prepare it first)."""
    rig = obj.styleheat
    _, source = _portrait_bytes(rig)
    if not rig.identity or rig.identity_source != source:
        raise UserError("The portrait is not prepared yet: press Prepare Portrait (or Preview Frame) once.")
    return rig.identity


def preview_frame(scene, obj, address: str, timeout: float = 5.0, frame: int | None = None, warnings=None):
    """Render one frame at the rig's preview size into the preview image (blocking); returns the image.
    ``warnings``: a list that receives the plan's warnings (size reduced, no presets, ...)."""
    frame = scene.frame_current if frame is None else frame
    session = start_preview(scene, obj, address, timeout, frame).run()
    if warnings is not None:
        warnings.extend(session.plan.warnings)
    if frame not in session.images:
        raise ClientError("the server finished without sending the preview frame")
    return show_preview(session.images[frame])
