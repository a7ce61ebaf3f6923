"""Motion file: round trip, defaults, and clear errors on every malformed field."""
import json

import numpy as np
import pytest

from server.preprocessing.motion import LAYOUT, Motion, MotionError, motion_from_dict, read_motion, write_motion


def _rows(n=5, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 73)).astype(np.float32)


def _doc(**over):
    d = {"format": "styleheat-motion", "version": 1, "fps": 30.0, "first_frame": 10,
         "layout": list(LAYOUT), "rows": _rows(3).tolist()}
    d.update(over)
    return d


def test_round_trip(tmp_path):
    rows = _rows(7)
    young = np.linspace(-1, 1, 7).astype(np.float32)
    p = write_motion(tmp_path / "m.json", rows, fps=24.0, first_frame=-3,
                     attributes={"young": young}, source={"tool": "test"})
    m = read_motion(p)
    assert m.rows.dtype == np.float32 and m.rows.shape == (7, 73)
    np.testing.assert_array_equal(m.rows, rows)
    np.testing.assert_array_equal(m.attributes["young"], young)
    assert (m.fps, m.first_frame, m.source, m.num_frames) == (24.0, -3, {"tool": "test"}, 7)
    raw = json.loads(p.read_text())
    assert raw["format"] == "styleheat-motion" and raw["version"] == 1 and raw["layout"] == list(LAYOUT)
    assert not list(tmp_path.glob("*.tmp"))
    # writing a Motion object gives the same file
    write_motion(tmp_path / "m2.json", m)
    assert json.loads((tmp_path / "m2.json").read_text()) == raw


def test_defaults_for_optional_fields(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"format": "styleheat-motion", "version": 1, "rows": [[0.5] * 73]}))
    m = read_motion(p)
    assert (m.fps, m.first_frame, m.attributes, m.source) == (25.0, 0, {}, None)
    assert m.rows.shape == (1, 73)


@pytest.mark.parametrize("over, needle", [
    ({"format": "something-else"}, "'format'"),
    ({"version": 2}, "version 2 is not supported"),
    ({"version": "1"}, "'version'"),
    ({"fps": 0}, "'fps'"),
    ({"fps": "fast"}, "'fps'"),
    ({"first_frame": 1.5}, "'first_frame'"),
    ({"layout": ["exp", 64]}, "'layout'"),
    ({"rows": []}, "empty"),
    ({"rows": "abc"}, "'rows' must be a list"),
    ({"rows": [[0.0] * 73, [0.0] * 70]}, "'rows[1]' must be a list of 73 numbers"),
    ({"rows": [[0.0] * 72 + ["x"]]}, "'rows[0][72]'"),
    ({"rows": [[0.0] * 72 + [float("nan")]]}, "'rows[0][72]'"),
    ({"attributes": {"young": [0.0, 1.0]}}, "'attributes.young' has 2 values but there are 3 rows"),
    ({"attributes": {"young": [0.0, float("inf"), 1.0]}}, "non-finite"),
    ({"attributes": [1, 2]}, "'attributes' must be an object"),
    ({"source": "me"}, "'source'"),
    ({"row": []}, "unknown field"),
])
def test_bad_fields_are_named(tmp_path, over, needle):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(_doc(**over)))
    with pytest.raises(MotionError) as e:
        read_motion(p)
    assert needle in str(e.value)
    assert str(p) in str(e.value)


def test_missing_rows_and_missing_file_and_bad_json(tmp_path):
    d = _doc()
    del d["rows"]
    with pytest.raises(MotionError, match="missing 'rows'"):
        motion_from_dict(d)
    with pytest.raises(MotionError, match="not found"):
        read_motion(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text('{"format": "styleheat-motion", ')
    with pytest.raises(MotionError, match="not valid JSON"):
        read_motion(tmp_path / "broken.json")
    (tmp_path / "nan.json").write_text(json.dumps(_doc()).replace("30.0", "NaN", 1))
    with pytest.raises(MotionError, match="'fps'"):
        read_motion(tmp_path / "nan.json")


def test_write_refuses_bad_data_and_leaves_nothing(tmp_path):
    with pytest.raises(MotionError, match="73 columns"):
        write_motion(tmp_path / "m.json", np.zeros((4, 70)))
    bad = _rows(2)
    bad[1, 5] = np.nan
    with pytest.raises(MotionError, match=r"\(1, 5\)"):
        write_motion(tmp_path / "m.json", bad)
    assert list(tmp_path.iterdir()) == []


def test_motion_object_validates():
    with pytest.raises(MotionError):
        Motion(rows=np.zeros((2, 10)))
    m = Motion(rows=np.zeros((2, 73), dtype=np.float64), attributes={"lip": [0, 1]})
    assert m.rows.dtype == np.float32 and m.attributes["lip"].dtype == np.float32
