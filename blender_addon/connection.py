"""The add-on's connection (session) state, in one place (bpy-free).

Everything the Blender side shares about the server lives here: one :class:`client.Client` per
address, the CURVE key folder those clients use, the servers' hello replies, the connection status
the panels show, the progress of the running render or bake, and the last time each server was
heard from. The bpy modules (render, bake, operators, preferences, scrub, panels, headless) read and
write this module; it imports none of them, so it is also usable (and tested) without Blender.
"""
from __future__ import annotations

import time

from . import localserver
from . import protocol as P
from .client import DEAD_AFTER, Client, ServerDead, ServerError

__all__ = ["DEAD_AFTER", "clients", "server_info", "curve_keys", "status", "progress", "get_client", "connect",
           "close_clients", "set_curve_keys_dir", "info_field", "presets_from_info", "set_status", "explain",
           "failure_text", "last_heartbeat", "can_restart_local"]

clients: dict[str, Client] = {}          # address -> client
server_info: dict[str, dict] = {}        # address -> the server's last hello reply
#: CURVE encryption keys (not animation curves): the folder with server.key and client.key_secret
#: (from the preferences, or headless --curve-dir); "" for a loopback server
curve_keys = {"dir": ""}
#: connection status shown in the preferences and the panel (not saved); ``dead``: the address of a
#: server that stopped answering ("" otherwise)
status = {"state": "unknown", "text": "Not connected", "device": "", "model": "", "dead": ""}
#: the running render or bake (operators and panels; the live preview stands aside while ``running``)
progress = {"text": "", "running": False}


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


def connect(address: str, timeout: float) -> dict:
    """hello -> the server's info (cached per address); raises ServerUnavailable with advice."""
    info = get_client(address, timeout).hello()
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


def explain(exc: Exception) -> str:
    """One sentence for the user, with what to do."""
    if isinstance(exc, ServerError):
        code = exc.code
        if code == "bad_image" and "face" in exc.message.lower():
            return f"No usable face in the portrait: {exc.message} Pick a photo with one clearly visible face."
        if code == "bad_image":
            return f"The portrait was rejected: {exc.message} Use a PNG/JPEG photo with one clearly visible face."
        if code in ("no_face", "face_not_found") or "no face" in exc.message.lower():
            return f"No face was found in the portrait: {exc.message} Pick a photo with one frontal face."
        if code in ("weights_missing", "no_weights") or "weights" in exc.message.lower():
            return (f"The server is missing model weights: {exc.message} "
                    "Run 'styleheat download' and restart the server with --checkpoints.")
        if code == "version_mismatch":
            return f"Add-on and server speak different protocol versions: {exc.message}"
        return f"Server error: {exc}"
    return str(exc)


def failure_text(exc: Exception) -> str:
    """:func:`explain`, plus what happened to the local server this Blender started; a dead server is
    remembered in :data:`status` (the panels then offer Restart Local Server when it was local)."""
    msg = explain(exc)
    code = localserver.exit_code()
    if code not in (None, 0):  # the server this Blender started has died: say why
        tail = [ln for ln in localserver.log_tail().splitlines() if ln.strip()]
        msg += f" The local server exited with code {code}" + (f": {tail[-1]}" if tail else ".")
    if isinstance(exc, ServerDead):
        status["dead"] = exc.address
        if can_restart_local():
            msg += (" This Blender started that server: press Restart Local Server (StyleHEAT panel or "
                    "Preferences), then render again.")
    return msg
