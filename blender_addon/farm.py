"""Render on Farm: a face rig rendered by ``styleheat farm render`` on a Ray cluster (docs/farm.md, "From Blender").

The add-on never imports Ray (nor torch): it writes a job folder next to the .blend
(``//styleheat/farm/<rig>/``: the portrait, the rows as a styleheat-motion file with the 27-frame windows'
context rows beyond the range, the attribute strengths in it, the mixed-down audio as a float WAV), runs the
farm CLI as a subprocess with the server's Python from the add-on preferences, reads its ``--progress-json``
lines, and finally copies the finished frames to the very files a local render writes
(``//styleheat/<rig>/<rig>_####.png``) with the very per-frame hashes in the sidecar, and updates the image
strip. A later local render therefore sees those frames as up to date.

Everything is plain functions and a :class:`FarmRun` with ``step()`` (the operator's timer body), so headless
mode and the tests run the same code (timers never fire in bpy-as-a-module).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

import bpy
import numpy as np

from . import compat, frames as F, rig as rig_mod
from . import render as R
from .errors import UserError

JOB_ROOT = "//styleheat/farm"
LOCAL = "local"


# --- the command ---------------------------------------------------------------------------

def farm_command(python: str = "", command: str = "") -> list[str]:
    """``PYTHON -m server.cli`` (the Server Python preference, as the local server uses it), else the
    ``styleheat`` command beside the configured Server Command."""
    if python.strip():
        return [bpy.path.abspath(python.strip()) if python.strip().startswith("//") else python.strip(),
                "-m", "server.cli"]
    if command.strip():
        exe = shlex.split(command, posix=os.name != "nt")[0]
        name = "styleheat.exe" if os.name == "nt" else "styleheat"
        folder = os.path.dirname(exe)
        beside = os.path.join(folder, name) if folder else shutil.which(name)
        if beside and os.path.isfile(beside):
            return [beside]
        raise UserError(f"There is no 'styleheat' command beside the Server Command {exe!r}; set Server Python "
                        "in the add-on preferences to the Python of the environment where the server is installed.")
    raise UserError("Render on Farm runs 'styleheat farm render' with the server's Python: set Server Python (or "
                    "Server Command) in the add-on preferences.")


def job_dir(obj) -> str:
    if not bpy.data.filepath:
        raise UserError("Save the .blend first: the farm job is written next to it in //styleheat/farm/<rig name>/.")
    return bpy.path.abspath(f"{JOB_ROOT}/{bpy.path.clean_name(obj.name)}/")


def write_wav_float(path: str, samples: np.ndarray, sample_rate: int) -> None:
    """Mono 32-bit float WAV (exactly the samples a local render sends), written atomically."""
    data = np.ascontiguousarray(samples, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, int(sample_rate), int(sample_rate) * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    tmp = f"{path}.part{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", len(body)) + body)
    os.replace(tmp, path)


def write_motion(path: str, clip: rig_mod.Clip, fps: float) -> None:
    """The clip's rows (scene frame ``clip.first`` is row 0) and attributes as a styleheat-motion file
    (docs/motion-format.md); float32 values written exactly."""
    payload = {"format": "styleheat-motion", "version": 1, "fps": float(fps), "first_frame": int(clip.first),
               "layout": ["exp", 64, "angle", 3, "trans", 3, "crop", 3],
               "rows": [[float(v) for v in row] for row in np.asarray(clip.rows, dtype=np.float32)],
               "source": {"tool": "StyleHEAT Blender add-on (Render on Farm)", "blend": bpy.data.filepath}}
    if clip.attributes:
        payload["attributes"] = {k: [float(v) for v in np.asarray(a, dtype=np.float32)]
                                 for k, a in sorted(clip.attributes.items())}
    tmp = f"{path}.part{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


# --- one run -------------------------------------------------------------------------------

class FarmRun:
    """One ``styleheat farm render`` subprocess for one rig: ``step()`` polls it (progress from its JSON lines),
    ``cancel()`` stops it (only complete frames stay), ``finish()`` brings its frames into the rig's folder."""

    def __init__(self, scene, obj, argv: list[str], job: str, start: int, end: int, warnings: list,
                 env: dict | None = None):
        self.scene, self.obj_name = scene, obj.name
        self.argv, self.job, self.start, self.end = argv, job, start, end
        self.report_path = os.path.join(job, "report.json")
        self.warnings = list(warnings)
        self.done = 0
        self.total = end - start + 1
        self.planned: int | None = None
        self.status_code: int | None = None
        self.cancelled = False
        self.error: str | None = None
        self.written: list[int] = []
        self.finished = False
        self._lines: list[str] = []
        self._seen = 0
        fd, self.log_path = tempfile.mkstemp(prefix="styleheat_farm_", suffix=".log")
        log = os.fdopen(fd, "wb")
        kw = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if sys.platform == "win32"
              else {"start_new_session": True})       # its own process group: cancel reaches the whole job
        try:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                         cwd=job, env=env, text=True, **kw)
        except OSError as exc:
            raise UserError(f"Could not start the farm command ({' '.join(argv)}): {exc}") from None
        finally:
            log.close()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.append(line.rstrip("\n"))

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def status(self) -> str:
        if self.error:
            return f"Farm failed \u2014 {len(self.written)} frames kept"
        if self.cancelled:
            return f"Farm cancelled \u2014 {len(self.written)} frames kept"
        todo = self.planned if self.planned is not None else self.total
        return f"Farm frame {self.done}/{todo}"

    def step(self, timeout: float = 0.0) -> bool:
        """Read the progress lines that arrived (waiting at most ``timeout`` s); False once the farm exited."""
        deadline = time.monotonic() + timeout
        while True:
            self._parse()
            if not self.running:
                self._reader.join(5.0)
                self._parse()
                return False
            if time.monotonic() >= deadline:
                return True
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _parse(self) -> None:
        while self._seen < len(self._lines):
            line = self._lines[self._seen]
            self._seen += 1
            if not line.startswith("{"):
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "start":
                self.planned = int(ev.get("total", 0))
            elif ev.get("event") in ("progress", "done"):
                self.done = int(ev.get("done", self.done))

    def cancel(self, timeout: float = 20.0) -> None:
        """Stop the farm like Ctrl-C (its driver cancels the cluster's work and shuts it down), then the whole
        process group if it lingers. Frames finished before stay (each file was complete before it got its name)."""
        self.cancelled = True
        if not self.running:
            return
        try:
            if sys.platform == "win32":
                self.proc.send_signal(signal.CTRL_BREAK_EVENT)
            else:
                self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc)
        self.step()

    def log_tail(self, n: int = 1500) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def failure(self) -> str:
        """The farm's own sentence (its last 'styleheat farm render: ...' line), else the log's last line."""
        lines = [ln.strip() for ln in self.log_tail(4000).splitlines() if ln.strip()]
        said = [ln for ln in lines if ln.startswith("styleheat farm render:")]
        text = said[-1] if said else (lines[-1] if lines else f"exit code {self.proc.returncode}")
        return f"The farm render failed: {text[:400]}"

    def finish(self, channel: int = 0) -> list[int]:
        """After the subprocess ended: copy its finished frames to the rig's folder under the local render's names,
        record their hashes in the sidecar, update the image strip. Returns the scene frames brought in."""
        if self.finished:
            return self.written
        self.finished = True
        self.status_code = self.proc.returncode
        if self.status_code not in (0, None) and not self.cancelled:
            self.error = self.failure()
        try:
            with open(self.report_path, encoding="utf-8") as f:
                report = json.load(f)
        except (OSError, ValueError):
            report = None
        if not report or "engine" not in report:
            if self.error is None:
                self.error = self.failure() if self.status_code else "The farm wrote no report; nothing was imported."
            return self.written
        self.written = import_frames(self.scene, bpy.data.objects[self.obj_name], report, self.job,
                                     self.start, self.end, channel)
        try:
            os.unlink(self.log_path)
        except OSError:
            pass
        return self.written


def _kill_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if sys.platform == "win32":
        proc.kill()
    else:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except OSError:
                pass
            try:
                proc.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                continue
    proc.wait(timeout)


def engine_info(report: dict) -> dict:
    """A server hello equivalent of the farm's model (report["engine"]): what the local render's hashes use."""
    e = report["engine"]
    return {"model": e["model"], "real_weights": e["real_weights"], "native_size": e.get("native_size"),
            "sizes": e.get("sizes") or [], "audio": True}


def import_frames(scene, obj, report: dict, job: str, start: int, end: int, channel: int = 0) -> list[int]:
    """Copy the farm frames of this job (the manifest entries whose hash is this job's) into the rig's folder as
    a local render names them, with the local render's per-frame hashes in the sidecar; update the strip."""
    info = engine_info(report)
    identity = _identity(obj, report)
    directory = R.output_dir(obj)
    plan = R.plan_render(scene, obj, identity, info, start, end, directory,
                         size=R.pick_size(info, obj.styleheat.size), requested_size=obj.styleheat.size)
    frames_dir = os.path.join(job, "frames")
    try:
        with open(os.path.join(frames_dir, "styleheat_farm.json"), encoding="utf-8") as f:
            manifest = json.load(f).get("frames", {})
    except (OSError, ValueError):
        manifest = {}
    first = int(report["engine"]["first_frame"])
    want = report.get("hashes", {})
    os.makedirs(directory, exist_ok=True)
    brought = []
    for frame in plan.frames:
        row = str(frame - first)
        entry = manifest.get(row)
        src = os.path.join(frames_dir, str(entry.get("file", ""))) if isinstance(entry, dict) else ""
        if not entry or entry.get("hash") != want.get(row) or not os.path.isfile(src):
            continue
        name = F.frame_filename(plan.prefix, frame)
        if not F.is_current(plan.sidecar, directory, frame, plan.hashes[frame]):
            dst = os.path.join(directory, name)
            tmp = f"{dst}.part{os.getpid()}"
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
            brought.append(frame)
        plan.sidecar[str(frame)] = {"hash": plan.hashes[frame], "file": name}
    F.save_sidecar(directory, plan.sidecar, {"identity": identity, "model": plan.model})
    R.update_strip(scene, plan, channel or obj.styleheat.strip_channel)
    return brought


def _identity(obj, report: dict) -> str:
    """The identity a server gives this portrait: the rig's when prepared from the current portrait, else the
    farm's (the same content hash of the aligned portrait: server/engine.py prepare_identity)."""
    rig = obj.styleheat
    try:
        _, source = R._portrait_bytes(rig)
    except UserError:
        source = None
    if rig.identity and rig.identity_source == source:
        return rig.identity
    return str(report["engine"]["identity"])


def start_farm(scene, obj, address: str = LOCAL, *, python: str = "", command: str = "", start: int | None = None,
               end: int | None = None, tiny_random: bool = False, workers: int | None = None,
               chunk: int | None = None, cpu: bool = False, env: dict | None = None) -> FarmRun:
    """Write the rig's job (portrait, rows with the windows' context, attributes, mixed audio) and start
    ``styleheat farm render`` on it; the returned run is driven by ``step()`` and ``finish()``."""
    R.require_rig(obj)
    rig = obj.styleheat
    data, source = R._portrait_bytes(rig)
    if not tiny_random and (not rig.identity or rig.identity_source != source):
        raise UserError("Press Prepare Portrait once (with any StyleHEAT server, e.g. the local one) before "
                        "rendering on the farm: the rig needs the portrait's own coefficients for its rows.")
    base = farm_command(python, command)
    s0, e0 = R.frame_range(scene)
    start = s0 if start is None else start
    end = e0 if end is None else end
    R.output_dir(obj)                        # raises when the .blend is not saved
    job = job_dir(obj)
    os.makedirs(os.path.join(job, "frames"), exist_ok=True)
    # the same clip, attributes and audio as a local render of start..end (the hashes come after, from the
    # farm's model description)
    plan = R.plan_render(scene, obj, "", {"audio": True}, start, end, None, requested_size=rig.size)
    ext = os.path.splitext(bpy.path.abspath(rig.portrait))[1].lower() or ".png"
    portrait = os.path.join(job, f"portrait{ext}")
    with open(portrait, "wb") as f:
        f.write(data)
    motion = os.path.join(job, "motion.json")
    write_motion(motion, plan.clip, compat.scene_fps(scene))
    argv = base + ["farm", "render", "--source", portrait, "--motion", motion, "--out", os.path.join(job, "frames"),
                   "--start", str(start), "--end", str(end), "--align", "yes" if rig.align else "no",
                   "--report", os.path.join(job, "report.json"), "--progress-json", "--quiet"]
    audio_path = os.path.join(job, "audio.wav")
    if plan.audio is not None:
        write_wav_float(audio_path, plan.audio["samples"], plan.audio["sample_rate"])
        argv += ["--audio", audio_path]
    elif os.path.exists(audio_path):
        os.unlink(audio_path)
    if rig.size:
        argv += ["--size", str(rig.size)]
    if address and address.strip() and address.strip() != LOCAL:
        argv += ["--address", address.strip()]
    if tiny_random:
        argv += ["--tiny-random"]
    if workers:
        argv += ["--workers", str(workers)]
    if chunk:
        argv += ["--chunk", str(chunk)]
    if cpu:
        argv += ["--cpu"]
    try:
        os.unlink(os.path.join(job, "report.json"))    # a stale report must not be read as this run's
    except OSError:
        pass
    return FarmRun(scene, obj, argv, job, start, end, plan.warnings, env=env)


def render_on_farm(scene, obj, address: str = LOCAL, *, should_stop=None, on_progress=None, poll: float = 0.25,
                   timeout: float | None = None, **kw) -> FarmRun:
    """Blocking: start the farm for the rig, follow its progress, import its frames; raise UserError on failure
    (frames that finished before stay imported). ``should_stop(run)`` true cancels."""
    run = start_farm(scene, obj, address, **kw)
    deadline = None if timeout is None else time.monotonic() + timeout
    last = None
    try:
        while run.step(poll):
            if on_progress is not None and run.done != last:
                last = run.done
                on_progress(run)
            if (should_stop is not None and should_stop(run)) or (deadline and time.monotonic() > deadline):
                run.cancel()
                break
    except BaseException:
        run.cancel()
        raise
    if on_progress is not None and run.done != last:
        on_progress(run)
    run.finish()
    if run.error:
        raise UserError(run.error)
    return run


# --- the operator (its body in plain functions: timers never fire headless) -------------------

def operator_start(context, obj, s, **kw) -> FarmRun:
    """Start the farm for ``obj`` with the preferences ``s`` (Settings); sets the shared progress text."""
    from . import connection

    run = start_farm(context.scene, obj, s.farm_address, python=s.server_python, command=s.server_command, **kw)
    run.scene_name = context.scene.name
    connection.set_progress(run.status())
    return run


def operator_step(context, run: FarmRun, timeout: float = 0.0) -> bool:
    """The timer body: read the farm's progress; False once it exited."""
    from . import connection

    running = run.step(timeout)
    connection.progress["text"] = run.status()
    try:
        context.window_manager.progress_update(run.done)
        if context.area is not None:
            context.area.header_text_set(f"StyleHEAT: {run.status()} (Esc cancels)")
    except (AttributeError, RuntimeError):
        pass
    return running


def operator_finish(context, run: FarmRun) -> str | None:
    """Import the finished frames (strip, sidecar); the failure sentence, or None."""
    from . import connection

    try:
        if context.area is not None:
            context.area.header_text_set(None)
    except (AttributeError, RuntimeError):
        pass
    try:
        run.finish()
    except (OSError, UserError) as exc:
        run.error = f"The farm's frames could not be imported: {exc}"
    if run.error:
        connection.set_progress(run.status(), failed=True, message=run.error)
    else:
        connection.set_progress(run.status() if run.cancelled else
                                f"Farm done: {len(run.written)} frame(s) imported, "
                                f"{run.total - len(run.written)} unchanged")
    return run.error


def _operator_class():
    from . import connection, operators, preferences

    class STYLEHEAT_OT_render_farm(operators._ModalJob, operators._NeedsIdleRig, bpy.types.Operator):
        bl_idname = "styleheat.render_farm"
        bl_label = "Render on Farm"
        bl_description = ("Render the scene (or preview) range on a Ray render farm (Farm Address in the add-on "
                          "preferences; 'local': this machine) with 'styleheat farm render', into the same files "
                          "and image strip as Render Face Animation. Esc cancels; finished frames stay")

        def execute(self, context):     # blocking: scripts, --background
            s = preferences.settings(context)
            obj = rig_mod.find_rig(context)
            try:
                run = operator_start(context, obj, s)
            except UserError as exc:
                return operators._fail(self, exc)
            while operator_step(context, run, 0.2):
                pass
            return self._report(operator_finish(context, run), run)

        def invoke(self, context, event):
            s = preferences.settings(context)
            obj = rig_mod.find_rig(context)
            try:
                run = operator_start(context, obj, s)
            except UserError as exc:
                return operators._fail(self, exc)
            self._start_modal(context, run)
            context.window_manager.progress_begin(0, max(1, run.total))
            return {"RUNNING_MODAL"}

        def _step(self, context) -> bool:
            return operator_step(context, self.job, 0.0)

        def _end(self, context):
            self._stop_modal(context)
            context.window_manager.progress_end()
            return self._report(operator_finish(context, self.job), self.job)

        def _report(self, error, run):
            if error:
                self.report({"ERROR"}, error)
                return {"CANCELLED"}
            for w in run.warnings:
                self.report({"WARNING"}, f"StyleHEAT: {w}")
            self.report({"INFO"}, f"StyleHEAT: {connection.progress['text']}")
            return {"CANCELLED"} if run.cancelled else {"FINISHED"}

    return STYLEHEAT_OT_render_farm


CLASSES: tuple = ()


def classes() -> tuple:
    """The operator class (made on first use: it derives from operators' mix-ins)."""
    global CLASSES
    if not CLASSES:
        CLASSES = (_operator_class(),)
    return CLASSES
