"""server.protocol: the schema the add-on vendors (no server needed)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest

from server import protocol as P

REPO = Path(__file__).resolve().parents[1]


def test_module_imports_only_stdlib_msgpack_numpy(tmp_path):
    tree = ast.parse((REPO / "server" / "protocol.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "protocol.py must not import relative modules (it is vendored)"
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "math", "re", "dataclasses", "typing", "msgpack", "numpy"}, roots
    # a vendored copy (as the add-on build makes it) loads alone and pulls in no torch, zmq, bpy, cv2
    (tmp_path / "vendored_protocol.py").write_bytes((REPO / "server" / "protocol.py").read_bytes())
    code = ("import sys, vendored_protocol as m; "
            "bad = [k for k in ('torch', 'zmq', 'bpy', 'cv2', 'server') if k in sys.modules]; "
            "print(m.PROTOCOL_VERSION, bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "1 []", (out.stdout, out.stderr)


def test_docs_name_every_message_type_and_error_code():
    doc = (REPO / "docs" / "protocol.md").read_text()
    for name in (*P.REQUEST_TYPES, *P.REPLY_TYPES, *P.ERROR_CODES):
        assert f"`{name}`" in doc, name


def test_pack_unpack_round_trip():
    parts: list = []
    arr = np.arange(2 * 73, dtype=np.float32).reshape(2, 73)
    h = P.request(P.RENDER, "r1", identity="abc", rows=P.array_field(arr, parts), frames=[5, 6], first_frame=5)
    frames = P.pack(h, parts)
    assert len(frames) == 2 and isinstance(frames[0], bytes)
    header, got_parts = P.unpack(frames)
    assert header["v"] == 1 and header["type"] == "render" and header["rows"]["part"] == 0
    req = P.validate_render(header, got_parts)
    np.testing.assert_array_equal(req.rows, arr)
    assert req.frames == [5, 6] and req.indices == [0, 1]
    assert req.encoding == "raw" and req.credit == P.DEFAULT_CREDIT and req.size is None


def test_array_forms_agree():
    a = np.random.default_rng(0).normal(size=(3, 73))
    inline = P.decode_array(P.array_field(a), "rows", (None, 73))
    listed = P.decode_array(a.tolist(), "rows", (None, 73))
    parts: list = []
    by_part = P.decode_array(P.array_field(a, parts), "rows", (None, 73), parts)
    assert inline.dtype == listed.dtype == by_part.dtype == np.float32
    np.testing.assert_array_equal(inline, listed)
    np.testing.assert_array_equal(inline, by_part)
    np.testing.assert_array_equal(inline, a.astype(np.float32))


@pytest.mark.parametrize("value, words", [
    (np.zeros((3, 72)), "shape"),
    (np.zeros((3, 73, 1)), "shape"),
    ("rows", "array map"),
    ([[1.0] * 73, [1.0] * 70], "rectangular"),
    ([["a"] * 73], "numbers"),
    ({"dtype": "float64", "shape": [1, 73], "data": b"\0" * 584}, "dtype"),
    ({"dtype": "float32", "shape": [1, 73], "data": b"\0" * 10}, "bytes"),
    ({"dtype": "float32", "shape": [1, 73]}, "exactly one"),
    ({"dtype": "float32", "shape": [1, 73], "data": b"", "part": 0}, "exactly one"),
    ({"dtype": "float32", "shape": [1, 73], "part": 0}, "part"),
    ({"dtype": "float32", "shape": [1, -73], "data": b""}, "non-negative"),
    ({"dtype": "float32", "shape": "1x73", "data": b""}, "shape"),
    ({"dtype": "float32", "shape": [1, 73], "data": "text"}, "bin"),
    ([[1e39] * 73], "float32"),
])
def test_decode_array_rejects(value, words):
    if isinstance(value, np.ndarray):
        value = P.array_field(value)
    with pytest.raises(P.ProtocolError) as e:
        P.decode_array(value, "rows", (None, 73))
    assert e.value.code == P.E_BAD_FIELD and words in e.value.message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected_in_both_forms(bad):
    a = np.zeros((2, 73), np.float32)
    a[1, 3] = bad
    for value in (P.array_field(a), a.tolist()):
        with pytest.raises(P.ProtocolError) as e:
            P.decode_array(value, "rows", (None, 73))
        assert e.value.code == P.E_BAD_FIELD and "NaN or infinite" in e.value.message


def test_array_size_limit():
    with pytest.raises(P.ProtocolError) as e:
        P.decode_array(P.array_field(np.zeros((11, 73))), "rows", (None, 73), max_elements=10 * 73)
    assert e.value.code == P.E_TOO_LARGE


@pytest.mark.parametrize("data, code", [
    (b"", P.E_BAD_MESSAGE),
    (b"\xc1", P.E_BAD_MESSAGE),
    (b"\x92\x01", P.E_BAD_MESSAGE),                          # truncated array
    (msgpack.packb({"a": 1}) + b"x", P.E_BAD_MESSAGE),       # trailing bytes
    (msgpack.packb([1]), P.E_BAD_MESSAGE),
    (msgpack.packb({b"k": 1}), P.E_BAD_MESSAGE),
    (msgpack.packb({"t": msgpack.ExtType(1, b"abc")}), P.E_BAD_MESSAGE),
    (b"\x80\x04\x95" + b"\0" * 8, P.E_BAD_MESSAGE),          # a pickle is not msgpack
])
def test_unpack_header_rejects_garbage(data, code):
    with pytest.raises(P.ProtocolError) as e:
        P.unpack_header(data)
    assert e.value.code == code and e.value.message


def test_unpack_limits():
    with pytest.raises(P.ProtocolError) as e:
        P.unpack([P.pack_header({"a": "x" * 100})], max_header_bytes=50)
    assert e.value.code == P.E_TOO_LARGE
    with pytest.raises(P.ProtocolError) as e:
        P.unpack([P.pack_header({"a": 1}), b"x" * 101], max_part_bytes=100)
    assert e.value.code == P.E_TOO_LARGE
    with pytest.raises(P.ProtocolError) as e:
        P.unpack([P.pack_header({"a": 1})] + [b""] * (P.MAX_PARTS + 1))
    assert e.value.code == P.E_BAD_MESSAGE
    with pytest.raises(P.ProtocolError):
        P.unpack([])


@pytest.mark.parametrize("header, code", [
    ({"type": "hello"}, P.E_VERSION),
    ({"v": 2, "type": "hello"}, P.E_VERSION),
    ({"v": True, "type": "hello"}, P.E_VERSION),
    ({"v": 1, "type": "fly"}, P.E_UNKNOWN_TYPE),
    ({"v": 1}, P.E_UNKNOWN_TYPE),
    ({"v": 1, "type": "hello", "id": ""}, P.E_BAD_FIELD),
    ({"v": 1, "type": "hello", "id": "has space"}, P.E_BAD_FIELD),
    ({"v": 1, "type": "hello", "id": 5}, P.E_BAD_FIELD),
])
def test_envelope(header, code):
    with pytest.raises(P.ProtocolError) as e:
        P.check_envelope(header)
    assert e.value.code == code


def _render(**changes):
    h = P.request(P.RENDER, "r", identity="abc", rows=np.zeros((4, 73)).tolist(), frames=[10, 11], first_frame=10)
    h.update(changes)
    return h


@pytest.mark.parametrize("changes, words", [
    (dict(frames=[9]), "frames[] must be in [10, 13]"),
    (dict(frames=[14]), "frames[] must be in [10, 13]"),
    (dict(frames=[11, 11]), "strictly increasing"),
    (dict(frames=[]), "non-empty"),
    (dict(frames=5), "non-empty"),
    (dict(first_frame=1.5), "first_frame must be an integer"),
    (dict(size=0), "size must be in"),
    (dict(size=True), "size must be an integer"),
    (dict(encoding="bmp"), "encoding"),
    (dict(credit=P.MAX_CREDIT + 1), "credit"),
    (dict(identity=""), "identity"),
    (dict(rows=[]), "shape"),
    (dict(attributes=[1, 2]), "attributes must be a map"),
    (dict(attributes={"a": [0.0] * 5}), "shape"),
    (dict(audio={"samples": [0.0], "sample_rate": 16000}), "missing field 'fps'"),
    (dict(audio={"samples": [0.0], "sample_rate": 16000.0, "fps": 25}), "sample_rate must be an integer"),
    (dict(audio={"samples": [0.0], "sample_rate": 16000, "fps": float("nan")}), "fps must be finite"),
    (dict(audio={"samples": [0.0], "sample_rate": 16000, "fps": 0}), "fps must be in"),
    (dict(audio={"samples": [], "sample_rate": 16000, "fps": 25}), "empty"),
    (dict(audio={"samples": [0.0], "sample_rate": 16000, "fps": 25, "gain": 2}), "unknown field"),
    (dict(audio=[0.0]), "audio must be a map"),
    (dict(extra=1), "unknown field"),
])
def test_validate_render_rejects(changes, words):
    with pytest.raises(P.ProtocolError) as e:
        P.validate_render(_render(**changes), [])
    assert e.value.code in (P.E_BAD_FIELD, P.E_TOO_LARGE)
    assert words in e.value.message, e.value.message


def test_validate_render_limits():
    with pytest.raises(P.ProtocolError) as e:
        P.validate_render(_render(rows=P.array_field(np.zeros((P.MAX_ROWS + 1, 73)))), [])
    assert e.value.code == P.E_TOO_LARGE


def test_validate_render_full_request():
    parts: list = []
    samples = np.zeros(16000, np.float32)
    h = _render(size=64, encoding="png", credit=0, attributes={"age": P.array_field(np.linspace(-1, 1, 4))},
                audio={"samples": P.array_field(samples, parts), "sample_rate": 16000, "fps": 24.0,
                       "frame_offset": 3.5})
    req = P.validate_render(h, parts)
    assert req.size == 64 and req.encoding == "png" and req.credit == 0
    assert req.attributes["age"].shape == (4,) and req.attributes["age"].dtype == np.float32
    assert req.audio.sample_rate == 16000 and req.audio.fps == 24.0 and req.audio.frame_offset == 3.5
    assert req.audio.samples.shape == (16000,)


def test_other_validators():
    assert P.validate_credit(P.request(P.CREDIT, "r", frames=3)) == ("r", 3)
    for bad in (0, -1, P.MAX_CREDIT + 1, 1.0, "2", None):
        with pytest.raises(P.ProtocolError):
            P.validate_credit(P.request(P.CREDIT, "r", frames=bad))
    assert P.validate_cancel(P.request(P.CANCEL, "r")) == "r"
    with pytest.raises(P.ProtocolError):
        P.validate_cancel(P.request(P.CANCEL))
    assert P.validate_forget(P.request(P.FORGET, "f", identity="abc")) == ("f", "abc")
    req = P.validate_prepare(P.request(P.PREPARE, "p"), [b"\x89PNG..."])
    assert req.align is True and req.image == b"\x89PNG..."
    for parts in ([], [b""], [b"a", b"b"]):
        with pytest.raises(P.ProtocolError):
            P.validate_prepare(P.request(P.PREPARE, "p"), parts)
    with pytest.raises(P.ProtocolError):
        P.validate_hello(P.request(P.HELLO, "h", client=5))
    with pytest.raises(P.ProtocolError):
        P.validate_simple(P.request(P.HEARTBEAT, "h", x=1))


def test_decode_raw_frame():
    img = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    h = P.frame_reply("r", frame=7, index=0, total=1, width=6, height=4, encoding="raw")
    assert h["channels"] == 3 and h["dtype"] == "uint8"
    np.testing.assert_array_equal(P.decode_raw_frame(h, img.tobytes()), img)
    with pytest.raises(ValueError):
        P.decode_raw_frame(h, img.tobytes()[:-1])
    with pytest.raises(ValueError):
        P.decode_raw_frame({**h, "encoding": "png"}, b"")
