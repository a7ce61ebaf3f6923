"""`styleheat ping`: ask a running styleheat-server for its hello and print it."""
from __future__ import annotations

import argparse
import sys
import time

NAME = "ping"
HELP = "check that a styleheat-server answers, and print what it serves"
DESCRIPTION = ("Send a protocol hello to a running styleheat-server and print its reply (protocol version, "
               "device, model, whether the weights are real). Exit 0 when it answers, 1 when it cannot be reached.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default="tcp://127.0.0.1:5555",
                        help="server endpoint (default tcp://127.0.0.1:5555)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the reply (default 5)")
    parser.add_argument("--curve-dir", metavar="DIR",
                        help="CURVE keys for a remote server: DIR/server.key and DIR/client.key_secret "
                             "(as made by 'styleheat-server --make-keys')")


def run(args) -> int:
    import zmq

    from server import protocol as P

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if args.curve_dir:
            from server.service.curve_keys import load_client_keys

            try:
                server_pub, cpub, csec = load_client_keys(args.curve_dir)
                sock.curve_serverkey = server_pub
                sock.curve_publickey = cpub
                sock.curve_secretkey = csec
            except (OSError, ValueError, zmq.ZMQError) as exc:  # missing file, no key in it, malformed key
                print(f"styleheat ping: cannot read CURVE keys in {args.curve_dir}: {exc} (use the server.key and "
                      f"client.key_secret made by 'styleheat-server --make-keys DIR')", file=sys.stderr)
                return 1
        try:
            sock.connect(args.server)
        except zmq.ZMQError as exc:
            print(f"styleheat ping: cannot connect to {args.server!r}: {exc} "
                  f"(expected an endpoint like tcp://127.0.0.1:5555)", file=sys.stderr)
            return 1
        deadline = time.monotonic() + args.timeout
        # a DEALER without a usable peer (e.g. refused CURVE handshake) blocks on send: bound it
        sock.setsockopt(zmq.SNDTIMEO, max(1, int(args.timeout * 1000)))
        try:
            sock.send_multipart(P.pack(P.request(P.HELLO, "ping", client="styleheat ping")))
        except zmq.Again:
            sent = False
        else:
            sent = True
        while True:
            left = deadline - time.monotonic()
            if not sent or left <= 0 or not sock.poll(int(left * 1000) + 1):
                print(f"styleheat ping: no reply from {args.server} within {args.timeout:g} s: is styleheat-server "
                      f"running there{' (and are the CURVE keys right?)' if args.curve_dir else ''}? "
                      f"Start it with 'styleheat-server --bind {args.server}'", file=sys.stderr)
                return 1
            try:
                header, _ = P.unpack(sock.recv_multipart())
            except P.ProtocolError as exc:
                print(f"styleheat ping: {args.server} answered something that is not this protocol: {exc}",
                      file=sys.stderr)
                return 1
            if header.get("type") == P.ERROR:
                print(f"styleheat ping: the server refused the hello: {header.get('code')}: "
                      f"{header.get('message')}", file=sys.stderr)
                return 1
            if header.get("type") == P.HELLO and header.get("id") == "ping":
                break
        print(f"server:       {header.get('server')} at {args.server}")
        print(f"protocol:     {header.get('protocol')}"
              f"{'' if header.get('protocol') == P.PROTOCOL_VERSION else f' (this client speaks {P.PROTOCOL_VERSION})'}")
        print(f"device:       {header.get('device')}")
        print(f"model:        {header.get('model')}")
        print(f"real weights: {'yes' if header.get('real_weights') else 'no'}")
        if header.get("tiny_random"):
            print("note:         tiny random weights (--tiny-random): for tests and demos, not faces")
        print(f"sizes:        {header.get('sizes')} (native {header.get('native_size')})")
        attrs = header.get("attributes") or {}
        print(f"attributes:   {', '.join(sorted(attrs)) if attrs else 'none'}")
        print(f"audio:        {'yes' if header.get('audio') else 'no'}; "
              f"face alignment: {'yes' if header.get('align') else 'no'}")
        caps = header.get("capabilities")
        if isinstance(caps, dict):  # servers before the bake additions do not send these
            on = [k for k, v in caps.items() if v]
            print(f"capabilities: {', '.join(on) if on else 'none'}")
            presets = header.get("presets") or {}
            print(f"presets:      {', '.join(sorted(presets)) if presets else 'none'}")
        return 0
    finally:
        sock.close(linger=0)
