"""What the animator hears, as mono PCM for the server.

Blender's own mixdown renders the sequencer exactly as playback does -- strip position, trims,
sound offset, volume (keyed volume included), pan and mute -- so the add-on mixes the scene down
over the clip's frame range instead of reading ``strip.sound.filepath`` (which ignores all of
that). Mono avoids the -3 dB stereo pan law; 16 kHz is what StyleHEAT's audio path consumes.
Sample k of the mixdown plays at scene frame ``first + k * fps / rate`` (checked sample-exact by
tests/test_addon_blender.py against the source WAV).

Version notes (all checked by the bpy matrix, scripts/blender_matrix.py): the bpy 4.2 module is built
without Audaspace (no sound strips, no mixdown options), see :func:`available`; from 5.2 on the mixdown
operator runs as a background job when *invoked* from the UI (called from Python it still runs to the
end before returning) and a failed write is only reported, the operator still returns FINISHED; and
Audaspace aborts the whole process (4.5, 5.0) when asked to read a file that holds no audio. So the
written file is checked before it is read.
"""
from __future__ import annotations

import os
import tempfile

import bpy
import numpy as np

from . import compat
from .errors import UserError

SAMPLE_RATE = 16000
WAV_HEADER = 44  # bytes before the samples of a plain WAV file
NO_AUDIO = "this Blender was built without audio support (bpy.app.build_options.audaspace is off)"


def available() -> bool:
    """Whether this Blender can play (and so mix down) sound strips."""
    return bool(getattr(bpy.app.build_options, "audaspace", True))


def require() -> None:
    if not available():
        raise UserError(f"{NO_AUDIO[0].upper()}{NO_AUDIO[1:]}, so it cannot mix the sound strips down; use a "
                        "Blender build that plays sound (every official download does)")


def audible_sound_strips(scene) -> list:
    return [s for s in compat.all_strips(scene) if compat.is_sound_strip(s) and not s.mute]


def mixdown(scene, first: int, last: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray | None:
    """Mono float32 PCM of scene frames first..last (inclusive); sample 0 plays at frame ``first``.
    None when no unmuted sound strip exists."""
    if not audible_sound_strips(scene):
        return None
    require()
    fps = compat.scene_fps(scene)
    n_total = int(round((last - first + 1) * sample_rate / fps))
    pad = 0
    lo = first
    if lo < 0:  # scene ranges cannot start below frame 0; nothing plays there anyway
        pad, lo = int(round(-lo * sample_rate / fps)), 0
    saved = (scene.frame_start, scene.frame_end, scene.use_preview_range)
    fd, path = tempfile.mkstemp(prefix="styleheat_mix_", suffix=".wav", dir=bpy.app.tempdir or None)
    os.close(fd)
    try:
        scene.use_preview_range = False
        if last < lo:
            return np.zeros(n_total, dtype=np.float32)
        scene.frame_start = lo
        scene.frame_end = last
        with bpy.context.temp_override(scene=scene):
            try:
                result = bpy.ops.sound.mixdown(filepath=path, check_existing=False, container="WAV", codec="PCM",
                                               format="F32", mixrate=sample_rate, channels="MONO")
            except RuntimeError as exc:  # the operator's error report (5.2 returns FINISHED instead)
                raise UserError(f"Blender's audio mixdown failed: {str(exc).strip()}") from exc
        if "FINISHED" not in result:
            raise UserError(f"Blender's audio mixdown did not finish ({result}); "
                            "check that the sound files of the strips exist")
        expected = n_total - pad
        try:
            size = os.path.getsize(path)
        except OSError:
            size = 0
        if size < WAV_HEADER + 4 * (expected - 1):
            raise UserError(f"Blender's audio mixdown wrote {size} bytes to {path}, too few for {expected} "
                            "samples; see Blender's report above (is the temporary folder writable?)")
        import aud
        data = np.asarray(aud.Sound(path).data(), dtype=np.float32)
    finally:
        scene.frame_start, scene.frame_end, scene.use_preview_range = saved[0], saved[1], saved[2]
        try:
            os.remove(path)
        except OSError:
            pass
    mono = data[:, 0] if data.ndim == 2 else data.reshape(-1)
    out = np.zeros(n_total, dtype=np.float32)
    body = mono[: max(0, n_total - pad)]
    out[pad:pad + body.shape[0]] = body
    return out
