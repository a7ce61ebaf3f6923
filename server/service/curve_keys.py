"""Loopback checks and CURVE key files of ``styleheat-server`` (``--make-keys``, ``--curve-dir``)."""
from __future__ import annotations

import ipaddress
import os
import shutil
from pathlib import Path


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address (127.0.0.0/8, ::1, localhost)."""
    transport, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    if ";" in host:  # "source;destination" syntax is for connect; be conservative
        return False
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', 0.0.0.0-like names, interface names, host names


def is_loopback_address(address: str) -> bool:
    """True for a peer's IP address on this machine (127.0.0.0/8, ::1, IPv4-mapped loopback)."""
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def _write_key_file(path: Path, public: bytes, secret: bytes | None) -> None:
    """A ZeroMQ certificate file (the format zmq.auth.load_certificate reads), created with its final
    mode: 0600 for a secret, 0644 for a public key; O_EXCL, so an existing file is never overwritten."""
    lines = ["#   ZeroMQ CURVE certificate written by styleheat-server --make-keys",
             "#   " + ("SECRET: keep this file private" if secret is not None else "public key: share freely"),
             "", "metadata", "curve", f'    public-key = "{public.decode("ascii")}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret is not None else 0o644)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write("\n".join(lines) + "\n")


def make_keys(directory: str | os.PathLike) -> dict[str, Path]:
    """Create a CURVE key set: server.key(_secret), client.key(_secret), authorized_clients/client.key.

    The folder is made (or tightened to) 0700 and every secret file is created 0600 from the start: no
    moment at which another user could read a secret.
    """
    import zmq

    d = Path(directory)
    for name in ("server", "client"):
        if (d / f"{name}.key_secret").exists():
            raise FileExistsError(f"{d / (name + '.key_secret')} already exists; use another directory "
                                  f"or delete the old keys first")
    old = os.umask(0o077)            # new folders 0700 whatever the caller's umask
    try:
        d.mkdir(parents=True, exist_ok=True)
    finally:
        os.umask(old)
    os.chmod(d, 0o700)
    out = {}
    for name in ("server", "client"):
        pub, sec = zmq.curve_keypair()
        _write_key_file(d / f"{name}.key", pub, None)
        _write_key_file(d / f"{name}.key_secret", pub, sec)
        out[name] = d / f"{name}.key"
        out[name + "_secret"] = d / f"{name}.key_secret"
    auth_dir = d / "authorized_clients"
    auth_dir.mkdir(mode=0o700, exist_ok=True)
    shutil.copy(out["client"], auth_dir / "client.key")
    out["authorized_clients"] = auth_dir
    return out


def load_server_keys(directory: str | os.PathLike) -> tuple[bytes, bytes, Path]:
    """(public, secret, authorized_clients dir) from a --curve-dir; ValueError says what is missing."""
    import zmq.auth

    d = Path(directory)
    secret_file = d / "server.key_secret"
    auth_dir = d / "authorized_clients"
    if not secret_file.is_file():
        raise ValueError(f"{secret_file} not found; create keys with 'styleheat-server --make-keys {d}'")
    if not auth_dir.is_dir() or not any(auth_dir.glob("*.key")):
        raise ValueError(f"{auth_dir} has no client public keys (*.key); copy each client's .key file there")
    pub, sec = zmq.auth.load_certificate(secret_file)
    if not sec:
        raise ValueError(f"{secret_file} holds no secret key")
    return pub, sec, auth_dir


def load_client_keys(directory: str | os.PathLike) -> tuple[bytes, bytes, bytes]:
    """(server public, client public, client secret) for a client using a --make-keys directory.

    OSError for a missing file, ValueError for a file that holds no key (or no secret key).
    """
    import zmq.auth

    d = Path(directory)
    server_pub, _ = zmq.auth.load_certificate(d / "server.key")
    cpub, csec = zmq.auth.load_certificate(d / "client.key_secret")
    if not csec:
        raise ValueError(f"{d / 'client.key_secret'} holds no secret key")
    return server_pub, cpub, csec

