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
    assert roots <= {"__future__", "hashlib", "math", "re", "dataclasses", "typing", "msgpack", "numpy"}, roots
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


def _doc_tables(doc: str) -> dict[str, list[str]]:
    """{section heading: backticked names in the first column of its tables}."""
    import re

    out: dict[str, list[str]] = {}
    heading = ""
    for line in doc.splitlines():
        if line.startswith("#"):
            heading = line.strip("# ").strip()
            continue
        m = re.match(r"^\|\s*((?:`[^`]+`(?:,\s*)?)+)\s*\|", line)
        if m:
            out.setdefault(heading, []).extend(re.findall(r"`([^`]+)`", m.group(1)))
    return out


def test_docs_match_the_schema_both_ways():
    """Every type, field, stage, capability, limit key and error code of protocol.py is in the doc,
    and every name the doc's tables list exists in protocol.py."""
    doc = (REPO / "docs" / "protocol.md").read_text()
    names = set(P.ENVELOPE_FIELDS) | set(P.SERVER_ENVELOPE_FIELDS) | set(P.AUDIO_FIELDS) | set(P.ARRAY_FIELDS)
    names |= set(P.LIMIT_FIELDS) | set(P.PROGRESS_STAGES) | set(P.CAPABILITIES) | set(P.ENCODINGS)
    for fields in (*P.REQUEST_FIELDS.values(), *P.REPLY_FIELDS.values()):
        names |= set(fields)
    names |= set(P.REQUEST_TYPES) | set(P.REPLY_TYPES) | set(P.ERROR_CODES)
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert not missing, f"protocol.py names missing from docs/protocol.md: {missing}"
    # each request section documents exactly its fields (plus the envelope's id)
    import re

    tables = _doc_tables(doc)
    for t in (P.RENDER, P.EXTRACT, P.AUDIO2EXP, P.DUB):  # sections with a request-field table
        section = next(k for k in tables if re.match(rf"`{t}`(\s|$)", k))
        listed = set(tables[section]) - {"id"}
        assert listed == set(P.REQUEST_FIELDS[t]), (t, sorted(listed ^ set(P.REQUEST_FIELDS[t])))
    assert set(tables["Errors"]) == set(P.ERROR_CODES), sorted(set(tables["Errors"]) ^ set(P.ERROR_CODES))
    hello = set(P.REPLY_FIELDS[P.HELLO])
    assert {n for n in tables["`hello`"]} == hello, sorted(set(tables["`hello`"]) ^ hello)
    prepared = set(P.REPLY_FIELDS[P.PREPARED])
    listed = set(tables["`prepare` (identity from a portrait)"])
    assert listed == prepared, sorted(listed ^ prepared)
    limits = {n for n in tables["Limits"] if n.isupper() or "," in n}
    for n in limits:
        assert hasattr(P, n), n
    # prose "Fields:" lists name only known fields
    for m in re.finditer(r"Fields: ([^.]*)\.", doc):
        for n in re.findall(r"`([^`]+)`", m.group(1)):
            assert n in names, n


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


# --------------------------------------------------------------------------------------------
# bake additions: extract, audio2exp, presets, capabilities (docs/protocol.md)
# --------------------------------------------------------------------------------------------
def test_bake_types_and_codes_are_registered():
    assert P.EXTRACT in P.REQUEST_TYPES and P.AUDIO2EXP in P.REQUEST_TYPES
    assert P.EXTRACTED in P.REPLY_TYPES and P.EXPRESSIONS in P.REPLY_TYPES
    assert P.E_BAD_VIDEO == "bad_video" and P.E_BAD_VIDEO in P.ERROR_CODES
    assert set(P.REQUEST_FIELDS) == set(P.REQUEST_TYPES) and set(P.REPLY_FIELDS) == set(P.REPLY_TYPES)
    for t in ("presets", "pose_presets", "capabilities"):
        assert t in P.REPLY_FIELDS[P.HELLO]
    assert "coefficient_note" in P.REPLY_FIELDS[P.PREPARED]
    assert set(P.CAPABILITIES) == {"extract", "audio2exp", "align", "audio"}
    # the envelope check accepts the new request types
    assert P.check_envelope(P.request(P.EXTRACT, "x")) == ("extract", "x")


MP4_HEAD = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00"
AVI_HEAD = b"RIFF\x00\x00\x00\x00AVI LIST"


def test_extract_takes_only_video_containers():
    for data, kind in ((MP4_HEAD, "mp4"), (AVI_HEAD, "avi"), (b"\x1a\x45\xdf\xa3\x01", "mkv"),
                       (b"#EXTM3U\n/etc/passwd\n", None), (b"ffconcat version 1.0\n", None),
                       (b"\x89PNG\r\n\x1a\n", None), (b"\x00\x00\x00\x02ftyp", None)):
        assert P.video_container(data) == kind, data
    with pytest.raises(P.ProtocolError) as e:
        P.validate_extract(P.request(P.EXTRACT, "e", video=b"#EXTM3U\n#EXTINF:1,\n/etc/passwd\n"))
    assert e.value.code == P.E_BAD_FIELD and "not a video file" in e.value.message


def test_header_limits_and_short_echoes():
    import msgpack

    with pytest.raises(P.ProtocolError) as e:       # 1 M empty arrays in 1 MB: stopped by the budget
        P.unpack_header(msgpack.packb({"x": [[[]] * 20000] * 50}))
    assert e.value.code == P.E_TOO_LARGE
    with pytest.raises(P.ProtocolError) as e:
        P.unpack_header(msgpack.packb({"x": [0] * (P.MAX_HEADER_ARRAY_LEN + 1)}))
    assert e.value.code == P.E_BAD_MESSAGE
    with pytest.raises(P.ProtocolError) as e:
        P.validate_simple({"v": 1, "type": "heartbeat", **{"k" * 60000 + str(i): 0 for i in range(10)}})
    assert len(e.value.message) < 600 and "6 more" in e.value.message


def test_extract_round_trip_video_part_inline_and_path():
    h, parts = P.extract_request("e1", MP4_HEAD, smooth=2.0, fps=25.0)
    assert h["video"] == {"part": 0} and parts == [MP4_HEAD]
    req = P.validate_extract(*P.unpack(P.pack(h, parts)))
    assert (req.id, req.video, req.path, req.smooth, req.fps) == ("e1", MP4_HEAD, None, 2.0, 25.0)
    inline = P.validate_extract(P.request(P.EXTRACT, "e2", video=AVI_HEAD))
    assert inline.video == AVI_HEAD and inline.smooth == 0.0 and inline.fps is None
    by_path = P.validate_extract(P.request(P.EXTRACT, "e3", path="/tmp/v.mp4", smooth=0, fps=None))
    assert by_path.path == "/tmp/v.mp4" and by_path.video is None and by_path.fps is None


@pytest.mark.parametrize("fields, parts, code, words", [
    ({}, [], P.E_BAD_FIELD, "exactly one of 'video'"),
    ({"video": b"x", "path": "/a"}, [], P.E_BAD_FIELD, "exactly one of 'video'"),
    ({"video": {"part": 1}}, [b"x"], P.E_BAD_FIELD, "does not name one of the 1 parts"),
    ({"video": {"part": True}}, [b"x"], P.E_BAD_FIELD, "does not name"),
    ({"video": {"part": 0, "x": 1}}, [b"x"], P.E_BAD_FIELD, "must be bin bytes"),
    ({"video": "text"}, [], P.E_BAD_FIELD, "must be bin bytes"),
    ({"video": 5}, [], P.E_BAD_FIELD, "must be bin bytes"),
    ({"video": {"part": 0}}, [b""], P.E_BAD_VIDEO, "empty"),
    ({"video": b""}, [], P.E_BAD_VIDEO, "empty"),
    ({"path": ""}, [], P.E_BAD_FIELD, "path must be a non-empty string"),
    ({"path": 7}, [], P.E_BAD_FIELD, "path must be a non-empty string"),
    ({"path": "a\0b"}, [], P.E_BAD_FIELD, "path must be"),
    ({"path": "x" * (P.MAX_PATH_LENGTH + 1)}, [], P.E_BAD_FIELD, "path must be"),
    ({"path": "/a", "smooth": -1.0}, [], P.E_BAD_FIELD, "smooth must be in"),
    ({"path": "/a", "smooth": float("inf")}, [], P.E_BAD_FIELD, "smooth must be finite"),
    ({"path": "/a", "smooth": "1"}, [], P.E_BAD_FIELD, "smooth must be a number"),
    ({"path": "/a", "fps": 0}, [], P.E_BAD_FIELD, "fps must be in"),
    ({"path": "/a", "fps": True}, [], P.E_BAD_FIELD, "fps must be a number"),
    ({"path": "/a", "landmarks": 1}, [], P.E_BAD_FIELD, "unknown field"),
])
def test_validate_extract_rejects(fields, parts, code, words):
    with pytest.raises(P.ProtocolError) as e:
        P.validate_extract(P.request(P.EXTRACT, "e", **fields), parts)
    assert e.value.code == code and words in e.value.message, e.value.message
    with pytest.raises(P.ProtocolError) as e:
        P.validate_extract({"v": 1, "type": "extract", "path": "/a"})
    assert "missing field 'id'" in e.value.message


def test_audio2exp_round_trip_and_offset_convention():
    samples = np.random.default_rng(0).uniform(-1, 1, 8000).astype(np.float32)
    ref = np.linspace(-1, 1, 64).astype(np.float32)
    h, parts = P.audio2exp_request("a1", samples, 16000, 30.0, 12, offset_frames=5.0, ref_exp=ref)
    req = P.validate_audio2exp(*P.unpack(P.pack(h, parts)))
    assert (req.id, req.fps, req.n_frames, req.offset_frames) == ("a1", 30.0, 12, 5.0)
    np.testing.assert_array_equal(req.audio.samples, samples)
    np.testing.assert_array_equal(req.ref_exp, ref)
    assert req.audio.sample_rate == 16000 and req.audio.fps == 30.0 and req.audio_offset_frames == 5.0
    # render's audio map as is: its frame_offset (the strip's start frame) shifts the audio time
    h = P.request(P.AUDIO2EXP, "a2", audio={"samples": samples.tolist(), "sample_rate": 16000, "fps": 25.0,
                                            "frame_offset": 3.0}, n_frames=4, offset_frames=10)
    req = P.validate_audio2exp(h)
    assert req.fps == 25.0 and req.audio_offset_frames == 7.0
    assert req.ref_exp.shape == (64,) and not req.ref_exp.any()


@pytest.mark.parametrize("changes, words", [
    (dict(fps=None), "missing field 'fps'"),
    (dict(fps=0.0), "fps must be in"),
    (dict(fps=0.5), "fps must be in [1.0, 240.0]"),
    (dict(fps=float("nan")), "fps must be finite"),
    (dict(n_frames=0), "n_frames must be in"),
    (dict(n_frames=2.0), "n_frames must be an integer"),
    (dict(n_frames=None), "missing field 'n_frames'"),
    (dict(n_frames=P.MAX_ROWS + 1), "n_frames must be in"),
    (dict(offset_frames="1"), "offset_frames must be a number"),
    (dict(ref_exp=[0.0] * 63), "ref_exp: expected shape (64)"),
    (dict(ref_exp=[float("nan")] * 64), "NaN"),
    (dict(audio=None), "audio must be a map"),
    (dict(audio={"samples": [0.0] * 10, "sample_rate": 16000, "fps": 24.0}), "differs from fps"),
    (dict(audio={"samples": [], "sample_rate": 16000}), "empty"),
    (dict(audio={"samples": [0.0], "sample_rate": 100}), "sample_rate must be in"),
    (dict(audio={"samples": [0.0], "sample_rate": 16000, "gain": 1}), "unknown field"),
    (dict(blink=True), "unknown field"),
])
def test_validate_audio2exp_rejects(changes, words):
    h = P.request(P.AUDIO2EXP, "a", audio={"samples": [0.0] * 10, "sample_rate": 16000}, fps=25.0, n_frames=3)
    for k, v in changes.items():
        if v is None:
            h.pop(k, None)
        else:
            h[k] = v
    if "audio" in changes and changes["audio"] is None:
        h["audio"] = None
    with pytest.raises(P.ProtocolError) as e:
        P.validate_audio2exp(h)
    assert e.value.code == P.E_BAD_FIELD and words in e.value.message, e.value.message


def test_bake_reply_builders_and_decoders():
    rows = np.random.default_rng(2).normal(size=(5, 73)).astype(np.float32)
    h, parts = P.extracted_reply("e", 25.0, rows, ["w1"])
    assert h["type"] == P.EXTRACTED and h["rows"]["part"] == 0 and len(parts) == 1
    frames = P.pack(h, parts)
    assert len(frames[0]) < 200  # the rows are not inside the header
    fps, got, warnings = P.decode_extracted(*P.unpack(frames))
    assert fps == 25.0 and warnings == ["w1"]
    np.testing.assert_array_equal(got, rows)
    exp = rows[:, :64].copy()
    h, parts = P.expressions_reply("a", exp)
    assert h["type"] == P.EXPRESSIONS
    np.testing.assert_array_equal(P.decode_expressions(*P.unpack(P.pack(h, parts))), exp)
    with pytest.raises(ValueError):
        P.extracted_reply("e", 25.0, rows[:, :70])
    with pytest.raises(ValueError):
        P.expressions_reply("a", rows)


def test_decode_presets():
    got = P.decode_presets({"mouth": [0.5] * 64, "eyes": list(range(64))})
    assert set(got) == {"mouth", "eyes"} and got["eyes"].dtype == np.float32 and got["eyes"][63] == 63
    assert P.decode_presets(None) == {} and P.decode_presets({}) == {}
    assert P.decode_presets({"x_plus": [0.0] * 6}, P.POSE_WIDTH, "pose_presets")["x_plus"].shape == (6,)
    for bad in ([1, 2], {"m": [0.0] * 63}, {"": [0.0] * 64}, {"m": "x"}):
        with pytest.raises(P.ProtocolError):
            P.decode_presets(bad)


@pytest.mark.parametrize("dtype", [{"a": 1}, ["float32"], None, 5])
def test_decode_array_non_string_dtype_is_a_field_error(dtype):
    """Found by tests/test_server_fuzz.py: an unhashable dtype raised TypeError (an 'internal' reply)."""
    with pytest.raises(P.ProtocolError) as e:
        P.decode_array({"dtype": dtype, "shape": [1, 73], "data": b"\0" * 292}, "rows", (None, 73))
    assert e.value.code == P.E_BAD_FIELD and "dtype" in e.value.message


def test_decode_array_integer_lists_must_fit():
    assert P.decode_array([1, 2, 3], "f", (None,), dtype="int32").dtype == np.int32
    with pytest.raises(P.ProtocolError) as e:
        P.decode_array([2**40], "f", (None,), dtype="int32")
    assert "do not fit int32" in e.value.message
    with pytest.raises(P.ProtocolError) as e:  # a huge finite value beside a NaN is still named an overflow
        P.decode_array([1e308, float("nan")], "f", (None,))
    assert "overflow" in e.value.message
