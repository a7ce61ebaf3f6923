"""*Dub Movie Strip*: a filmed shot in the sequencer made to speak a sound strip (the server's ``dub``).

Dub Movie Strip: the selected movie strip's file (a path for a loopback server, else its bytes) and what the
chosen sound strip plays over the movie's frames (Blender's own mixdown, other sound strips muted meanwhile) go
to the server's ``dub``; every plate frame comes back at the plate's size and is written as a PNG sequence in
//styleheat/dub/<strip>/; an image strip above the movie strip shows it (Composite: opaque, it replaces the
movie visually; Matte: Alpha Over), with the movie strip's trims and transform. Its operator and panel are in
shots_ui.py.
"""
from __future__ import annotations

import os
import time

import bpy

from . import audio as audio_mod
from . import compat, connection, frames as F
from .bake import is_loopback
from .client import ClientError, DubStream
from .connection import info_field
from .errors import UserError
from .render import pick_size
from .shots import OUTPUTS, configure_strip

DUB_ROOT = "//styleheat/dub"


def _frame_start(strip) -> int:
    return int(round(strip.frame_start))


def find_dub_strips(scene, movie: str = "", sound: str = ""):
    """(movie strip, sound strip): the named ones, else the active/selected movie strip and the selected sound
    strip, else the sound strip overlapping the movie strip the most. UserError saying what to select."""
    strips = list(compat.all_strips(scene))
    by_name = {s.name: s for s in strips}
    ed = scene.sequence_editor
    active = getattr(ed, "active_strip", None) if ed is not None else None
    if movie:
        m = by_name.get(movie)
        if m is None or m.type != "MOVIE":
            raise UserError(f"There is no movie strip named {movie!r}; select the movie strip to dub.")
    elif active is not None and active.type == "MOVIE":
        m = active
    else:
        movies = [s for s in strips if s.type == "MOVIE" and s.select]
        if len(movies) != 1:
            raise UserError("Select one movie strip (the filmed shot to dub) and the sound strip with the speech.")
        m = movies[0]
    if sound:
        s = by_name.get(sound)
        if s is None or not compat.is_sound_strip(s):
            raise UserError(f"There is no sound strip named {sound!r}; select the sound strip with the speech.")
        return m, s
    selected = [s for s in strips if compat.is_sound_strip(s) and s.select and not s.mute]
    if len(selected) == 1:
        return m, selected[0]
    lo, hi = m.frame_final_start, m.frame_final_end

    def overlap(s) -> float:
        return min(hi, s.frame_final_end) - max(lo, s.frame_final_start)

    candidates = [s for s in strips if compat.is_sound_strip(s) and not s.mute and overlap(s) > 0]
    if not candidates:
        raise UserError(f"No sound strip plays during the movie strip {m.name!r}; add the speech as a sound strip "
                        f"over it (or select one).")
    return m, max(candidates, key=overlap)


def speech_mixdown(scene, movie, sound):
    """Mono float32 PCM of what ``sound`` plays over the movie's frames (sample 0 = the movie's first frame),
    at audio.SAMPLE_RATE; the other sound strips are muted meanwhile."""
    audio_mod.require()
    n = int(movie.frame_duration)
    first = _frame_start(movie)
    others = [s for s in compat.all_strips(scene) if compat.is_sound_strip(s) and s != sound and not s.mute]
    was = sound.mute
    try:
        for s in others:
            s.mute = True
        sound.mute = False
        samples = audio_mod.mixdown(scene, first, first + n - 1)
    finally:
        for s in others:
            s.mute = False
        sound.mute = was
    if samples is None or samples.size == 0:
        raise UserError(f"The sound strip {sound.name!r} gave no audio to dub with.")
    return samples


def dub_dir(movie) -> str:
    if not bpy.data.filepath:
        raise UserError("Save the .blend first: dubbed frames are written next to it in //styleheat/dub/<strip>/.")
    return bpy.path.abspath(f"{DUB_ROOT}/{bpy.path.clean_name(movie.name)}/")


def dub_strip_name(movie_name: str) -> str:
    return f"{movie_name} Dub"[:63]


class DubSession:
    """One ``dub`` request: ``step()`` writes each received plate frame (tmp + rename); :meth:`finish` adds the
    image strip. The modal operator, the blocking path and the tests run the same code."""

    def __init__(self, scene, movie, sound, stream: DubStream, directory: str, output: str):
        self.scene_name, self.movie_name, self.sound_name = scene.name, movie.name, sound.name
        self.stream, self.directory, self.output = stream, directory, output
        self.prefix = bpy.path.clean_name(movie.name) + "_dub"
        self.first = _frame_start(movie)
        self.written: list[str] = []
        self.size: tuple[int, int] | None = None
        self.warnings: list[str] = []
        self.error: Exception | None = None
        self.cancelled = False
        self.strip_name = ""
        self.started = time.monotonic()

    @property
    def done(self) -> bool:
        return self.stream.finished or self.error is not None

    def status(self) -> str:
        if not self.written:
            p = self.stream.progress
            if p:
                return str(p.get("message") or "tracking the plate")
            return "Waiting for the server"
        total = self.stream.total
        return f"Dub frame {len(self.written)}" + (f"/{total}" if total else "")

    def step(self, timeout: float = 0.0) -> bool:
        if self.done:
            return False
        try:
            self.stream.drain(self._store, timeout)
        except ClientError as exc:
            self.error = exc
            return False
        return not self.done

    def _store(self, fr) -> None:
        self.stream.total = fr.total or self.stream.total
        name = F.frame_filename(self.prefix, self.first + fr.frame)
        path = os.path.join(self.directory, name)
        tmp = f"{path}.part{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(fr.data if fr.encoding == "png" else F.encode_png(fr.rgb()))
        os.replace(tmp, path)
        self.size = (fr.width, fr.height)
        self.written.append(name)

    def cancel(self) -> None:
        self.cancelled = True
        self.stream.cancel(wait=0.0)

    def run(self, should_stop=None, poll: float = 0.2) -> "DubSession":
        while self.step(poll):
            if should_stop is not None and should_stop(self):
                self.cancel()
                break
        if self.error is not None:
            raise self.error
        return self

    def finish(self):
        """After the stream ended: the warnings, and the image strip above the movie strip (None when
        cancelled or nothing arrived)."""
        reply = self.stream.dubbed
        if reply is not None:
            self.warnings = [str(w) for w in reply.get("warnings") or []]
        scene = bpy.data.scenes.get(self.scene_name)
        movie = next((s for s in compat.all_strips(scene) if s.name == self.movie_name), None) if scene else None
        if reply is None or movie is None or not self.written:
            return None
        if int(reply.get("sent", -1)) != len(self.written):
            self.warnings.append(f"the server reports {reply.get('sent')} frames sent, {len(self.written)} arrived")
        strip = add_dub_strip(scene, movie, self.directory, self.written, self.output)
        self.strip_name = strip.name
        return strip


def _free_channel_above(scene, movie, avoid: str) -> int:
    lo, hi = movie.frame_final_start, movie.frame_final_end
    used = {s.channel for s in compat.all_strips(scene)
            if s.name != avoid and s.frame_final_start < hi and s.frame_final_end > lo}
    ch = movie.channel + 1
    while ch in used:
        ch += 1
    return ch


def add_dub_strip(scene, movie, directory: str, names: list[str], output: str):
    """An image strip of ``names`` (plate frames 0..) above ``movie``: same start, trims and transform."""
    name = dub_strip_name(movie.name)
    strips = compat.top_strips(scene)
    old = next((s for s in compat.all_strips(scene) if s.name == name), None)
    if old is not None:
        strips.remove(old)
    channel = _free_channel_above(scene, movie, name)
    first = os.path.join(directory, names[0])
    try:
        first = bpy.path.relpath(first)
    except ValueError:  # another drive on Windows
        pass
    strip = strips.new_image(name, first, channel, _frame_start(movie), fit_method="ORIGINAL")
    for n in names[1:]:
        strip.elements.append(n)
    for attr in ("frame_offset_start", "frame_offset_end"):
        try:
            setattr(strip, attr, getattr(movie, attr))
        except (AttributeError, TypeError, ValueError):
            pass
    for attr in ("offset_x", "offset_y", "scale_x", "scale_y", "rotation"):
        try:
            setattr(strip.transform, attr, getattr(movie.transform, attr))
        except (AttributeError, TypeError, ValueError):
            pass
    configure_strip(strip, output)
    if output != "matte":
        strip.blend_type = "REPLACE"      # opaque plate frames: they replace the movie strip visually
    return strip


def start_dub(scene, address: str, timeout: float = 5.0, *, movie: str = "", sound: str = "",
              output: str = "COMPOSITE", size: int = 0, frame_timeout: float = 300.0,
              info: dict | None = None) -> DubSession:
    """Check the strips and the server, mix the speech down, send the ``dub`` request."""
    m, s = find_dub_strips(scene, movie, sound)
    out = OUTPUTS.get(output, output)
    if out not in ("composite", "matte"):
        raise UserError(f"Dub output must be Composite or Matte, not {output!r}.")
    plate = bpy.path.abspath(m.filepath)
    if not os.path.isfile(plate):
        raise UserError(f"The movie file of strip {m.name!r} ({plate}) does not exist.")
    directory = dub_dir(m)
    info = connection.connect(address, timeout) if info is None else info
    caps = info_field(info, "capabilities", None) or {}
    if not caps.get("extract", False):
        raise UserError("This StyleHEAT server cannot dub: it has no 3DMM tracker (Deep3D) to follow the plate's "
                        "face. Start it with the Deep3D weights (styleheat download).")
    samples = speech_mixdown(scene, m, s)
    fps = compat.scene_fps(scene)
    warnings = []
    movie_fps = float(getattr(m, "fps", 0.0) or 0.0)
    if movie_fps and abs(movie_fps - fps) > 1e-3:
        warnings.append(f"the movie runs at {movie_fps:g} fps and the scene at {fps:g} fps: the sequencer shows "
                        f"one movie frame per scene frame, the lips follow the speech at the movie's rate")
    client = connection.get_client(address, timeout)
    os.makedirs(directory, exist_ok=True)
    kw = dict(output=out, size=pick_size(info, size) if size else None, frame_timeout=frame_timeout)
    if is_loopback(address):
        stream = client.dub(samples, audio_mod.SAMPLE_RATE, path=os.path.abspath(plate), **kw)
    else:
        with open(plate, "rb") as f:
            stream = client.dub(samples, audio_mod.SAMPLE_RATE, video=f.read(), **kw)
    session = DubSession(scene, m, s, stream, directory, out)
    session.warnings = warnings
    return session


def dub_movie_strip(scene, address: str, timeout: float = 5.0, should_stop=None, **kw) -> DubSession:
    """Blocking dub (scripts, --background, tests): start, run, add the strip."""
    session = start_dub(scene, address, timeout, **kw).run(should_stop)
    early = list(session.warnings)
    session.finish()
    session.warnings = early + session.warnings
    return session
