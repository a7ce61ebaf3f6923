"""The add-on's connection (session) state, in one place (bpy-free).

Everything the Blender side shares about the server lives here: one :class:`client.Client` per
address, the CURVE key folder those clients use, the servers' hello replies, the connection status
the panels show, the progress of the running render or bake, and the last time each server was
heard from. The bpy modules (render, bake, operators, preferences, scrub, panels, headless) read and
write this module; it imports none of them, so it is also usable (and tested) without Blender.
"""
from __future__ import annotations

import re
import time

from . import localserver
from . import protocol as P
from .client import DEAD_AFTER, Client, ServerDead, ServerError, ServerUnavailable

__all__ = ["DEAD_AFTER", "clients", "server_info", "curve_keys", "status", "progress", "get_client", "connect",
           "close_clients", "set_curve_keys_dir", "info_field", "presets_from_info", "set_status", "explain",
           "failure_text", "last_heartbeat", "can_restart_local", "sentence", "join", "CODE_TEXT", "wrap"]

clients: dict[str, Client] = {}          # address -> client
server_info: dict[str, dict] = {}        # address -> the server's last hello reply
#: CURVE encryption keys (not animation curves): the folder with server.key and client.key_secret
#: (from the preferences, or headless --curve-dir); "" for a loopback server
curve_keys = {"dir": ""}
#: connection status shown in the preferences and the panel (not saved); ``dead``: the address of a
#: server that stopped answering ("" otherwise)
status = {"state": "unknown", "text": "Not connected", "device": "", "model": "", "dead": ""}
#: the running render or bake (operators and panels; the live preview stands aside while ``running``)
progress = {"text": "", "running": False, "failed": False, "message": ""}


def set_progress(text: str, failed: bool = False, message: str = "") -> None:
    """The panel's job line; ``failed`` with the full error ``message`` (shown in a box under it)."""
    progress["text"], progress["failed"], progress["message"] = text, bool(failed), message or ""


def wrap(text: str, width_px: float, char_px: float = 7.0) -> list[str]:
    """``text`` split into lines that fit a sidebar ``width_px`` wide (about ``char_px`` per character)."""
    import textwrap

    cols = max(12, int(width_px / char_px))
    return textwrap.wrap(text, cols) or [""]


def set_curve_keys_dir(path: str) -> None:
    curve_keys["dir"] = path or ""


def get_client(address: str, timeout: float) -> Client:
    """The client for ``address`` (a new one when the timeout or the CURVE key folder changed)."""
    c = clients.get(address)
    if c is None or c.timeout != timeout or (c.curve_dir or "") != curve_keys["dir"]:
        if c is not None:
            c.close()
        c = clients[address] = Client(address, timeout=timeout, curve_dir=curve_keys["dir"] or None)
    return c


def close_clients() -> None:
    for c in clients.values():
        c.close()
    clients.clear()


def local_server_problem(address: str) -> str | None:
    """A sentence when the local server this Blender started for ``address`` has exited (said at once,
    without waiting for a connect timeout), else None."""
    if not localserver.serves(address):
        return None
    code = localserver.exit_code()
    if code is None:
        return None
    line = localserver.last_log_line()
    return (f"The local server this Blender started for {address} has exited (code {code})"
            + (f"; its last log line: {line.rstrip('.')}" if line else "") + ". Fix what it names, then press "
            "Restart Local Server (StyleHEAT panel or Preferences).")


def connect(address: str, timeout: float) -> dict:
    """hello -> the server's info (cached per address); raises ServerUnavailable with advice. A local
    server that has exited is reported at once; one that runs but does not answer yet is "starting"."""
    dead = local_server_problem(address)
    if dead is not None:
        exc = ServerUnavailable(dead)
        exc.local_reported = True
        raise exc
    try:
        info = get_client(address, timeout).hello()
    except ServerUnavailable as exc:
        if isinstance(exc, ServerDead) or not localserver.serves(address):
            raise
        dead = local_server_problem(address)     # it may have exited while we waited
        if dead is None and localserver.running():
            line = localserver.last_log_line()
            dead = (f"The local server (pid {localserver.pid()}) is still starting: it loads the model before "
                    f"it answers" + (f" (last log line: {line.rstrip('.')})" if line else "")
                    + ". Press refresh again in a few seconds.")
        if dead is None:
            raise
        new = ServerUnavailable(dead)
        new.local_reported = True
        raise new from None
    server_info[address] = info
    if status["dead"] == address:
        status["dead"] = ""
    return info


def last_heartbeat(address: str) -> float | None:
    """Seconds since the server at ``address`` last sent anything (None: never heard from)."""
    c = clients.get(address)
    if c is None or not c.last_seen:
        return None
    return time.monotonic() - c.last_seen


def info_field(info: dict, key: str, default=None):
    """hello fields, whether the server puts them at the top level or under "info"."""
    if key in info:
        return info[key]
    inner = info.get("info")
    if isinstance(inner, dict) and key in inner:
        return inner[key]
    return default


def presets_from_info(info: dict) -> dict:
    """The hello's expression presets {name: (64,) float32} (protocol.decode_presets); {} when the server
    has none or sends a malformed map (the scene then keeps the presets it stored earlier)."""
    try:
        return P.decode_presets(info_field(info, "presets", None))
    except P.ProtocolError:
        return {}


def set_status(state: str, text: str, info: dict | None = None) -> None:
    status["state"], status["text"] = state, text
    if state == "ok":
        status["dead"] = ""
    if info is not None:
        status["device"] = str(info_field(info, "device", ""))
        model = str(info_field(info, "model", ""))
        if info_field(info, "real_weights", True) is False:
            model += " (random weights)"
        status["model"] = model


def can_restart_local() -> bool:
    """True when this Blender started a local server (running or not) that can be started again."""
    return localserver.last_command() is not None


_ACTION_WORDS = ("use ", "pick ", "send ", "run ", "restart ", "retry", "choose ", "start ", "set ", "press ",
                 "install ", "try ", "free ", "lower ", "raise ", "add ", "connect ", "update ", "check ")

#: error codes -> (what went wrong, what to do); the code itself never reaches the user
CODE_TEXT = {
    "bad_message": ("The server could not read the add-on's request",
                    "Update the add-on and the server to the same release."),
    "too_large": ("The request is larger than the server accepts",
                  "Render fewer frames at once or use a smaller portrait or movie."),
    "version_mismatch": ("The add-on and the server speak different protocol versions",
                         "Install the add-on and the server from the same release."),
    "unknown_type": ("The server does not know this request",
                     "Update the server to the add-on's release."),
    "bad_field": ("The server refused a value the add-on sent",
                  "Check the rig's values (sizes, frame range) and try again."),
    "bad_image": ("The portrait was rejected", "Use a PNG or JPEG photo with one clearly visible face."),
    "unknown_identity": ("The server no longer knows the portrait (it was restarted)",
                         "Press Prepare Portrait, then render again."),
    "unsupported": ("This server cannot do that", "Start the server with the weights that provide it."),
    "busy": ("The server is busy with other jobs", "Wait until they finish, then try again."),
    "out_of_memory": ("The server ran out of memory", "Lower the Size, close other GPU programs, then try again."),
    "stalled": ("The server dropped the job because Blender stopped taking frames", "Render again."),
    "shutting_down": ("The server is shutting down",
                      "Start it again and retry; frames already written are kept."),
    "internal": ("The server failed unexpectedly", "Look at the server's log, restart it and try again."),
    "bad_video": ("The movie could not be used", "Use an MP4, MOV or AVI file that shows one face."),
}


def sentence(text: str) -> str:
    """``text`` as one sentence: capital first letter, one full stop (no code suffix like ``[busy]``)."""
    text = " ".join(str(text).split()).strip()
    text = re.sub(r"\s*\[[a-z_]+\]$", "", text)
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def says_what_to_do(text: str) -> bool:
    low = " " + text.lower()
    return any((" " + w) in low or (";" + w) in low for w in _ACTION_WORDS)


def join(what: str, detail: str = "", advice: str = "") -> str:
    """``what`` (what went wrong), the server's ``detail`` and ``advice``, each once, as full sentences;
    the advice is left out when the detail already says what to do."""
    parts = [sentence(what)]
    d = sentence(detail)
    if d and d.rstrip(".").lower() not in parts[0].lower():
        parts[0] = parts[0].rstrip(".") + ": " + d[0].lower() + d[1:]
    if advice and not (d and says_what_to_do(d)):
        parts.append(sentence(advice))
    return " ".join(parts)


def _video_text(message: str) -> str:
    low = message.lower()
    if "no face" in low:
        return ("No face was found in any frame of the movie. Use a movie that shows one face clearly from the "
                "front (not too small, not turned away).")
    if "not found" in low:
        return "The server cannot find that movie file. Pick a movie that exists on the server's machine."
    if "cannot open" in low or "no decodable frames" in low or "is empty" in low or "not a video" in low:
        return ("The file is not a movie the server can read. Pick an MP4, MOV or AVI file (not an image, audio "
                "file or playlist).")
    # other problems (too long, too large, ...): the server's sentence without its paths
    return join("The movie could not be used", re.sub(r"(/[^\s:;,]+)+", "the file", message),
                CODE_TEXT["bad_video"][1])


def explain(exc: Exception) -> str:
    """What went wrong and what to do, as full sentences, once; internal codes stay out."""
    if isinstance(exc, ServerError):
        code, message = exc.code, str(exc.message or "")
        low = message.lower()
        if code == "bad_video":
            return _video_text(message)
        if code == "bad_image" and "face" in low:
            return join("No usable face was found in the portrait", message,
                        "Pick a photo with one clearly visible, front-facing face.")
        if code in ("weights_missing", "no_weights") or (code == "internal" and "weights" in low):
            return join("The server is missing model weights", message,
                        "Run 'styleheat download' and restart the server with --checkpoints.")
        what, advice = CODE_TEXT.get(code, ("The server could not do this", "Check the server's log."))
        return join(what, message, advice)
    return sentence(str(exc))


def failure_text(exc: Exception) -> str:
    """:func:`explain`, plus what happened to the local server this Blender started; a dead server is
    remembered in :data:`status` (the panels then offer Restart Local Server when it was local)."""
    msg = explain(exc)
    code = localserver.exit_code()
    if code not in (None, 0) and not getattr(exc, "local_reported", False):  # our local server died: say why
        line = localserver.last_log_line()
        msg += f" The local server exited with code {code}" + (f": {sentence(line)}" if line else ".")
    if isinstance(exc, ServerDead):
        status["dead"] = exc.address
        if can_restart_local():
            msg += (" This Blender started that server: press Restart Local Server (StyleHEAT panel or "
                    "Preferences), then render again.")
    return msg
