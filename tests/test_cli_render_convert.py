"""`styleheat convert` and `styleheat render` end to end on tiny seeded weights (real files, real CLI)."""
import json

import cv2
import numpy as np
import pytest
import torch

from models import weights
from server import cli
from server.engine import Engine
from server.preprocessing.motion import write_motion


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    engine = Engine.tiny_random(seed=0)
    weights.write_official(d / "checkpoints", engine.model)
    (d / "config.json").write_text(json.dumps(engine.model.config.to_dict()))
    rng = np.random.default_rng(0)
    portrait = cv2.GaussianBlur(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), (0, 0), 3)
    cv2.imwrite(str(d / "face.png"), cv2.cvtColor(portrait, cv2.COLOR_RGB2BGR))
    rows = rng.standard_normal((4, 73)).astype(np.float32) * 0.4
    rows[:, 70] += 1
    write_motion(d / "motion.json", rows, attributes={"age": [0.0, 0.0, 6.0, 6.0]})
    return d, engine, portrait, rows


def test_convert_then_render_bundle_matches_engine(tiny, tmp_path, capsys):
    d, engine, portrait, rows = tiny
    bundle = tmp_path / "tiny.safetensors"
    rc = cli.main(["convert", "--checkpoints", str(d / "checkpoints"), "--config", str(d / "config.json"),
                   "--out", str(bundle)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "generator     <- StyleGAN_e4e.pth" in out and bundle.is_file()
    frames = tmp_path / "frames"
    rc = cli.main(["render", "--bundle", str(bundle), "--source", str(d / "face.png"), "--motion",
                   str(d / "motion.json"), "--out", str(frames), "--device", "cpu", "--quiet",
                   "--precision", "float32"])             # the default, auto, is bfloat16 on AMX CPUs
    assert rc == 0
    files = sorted(p.name for p in frames.iterdir())
    assert files == [f"frame_{i:05d}.png" for i in range(4)]   # no temporary files left behind
    ident = engine.prepare_identity(portrait)
    expected = dict(engine.render(ident.id, rows, range(4), attributes={"age": np.array([0, 0, 6.0, 6.0])}))
    for i in range(4):
        got = cv2.cvtColor(cv2.imread(str(frames / f"frame_{i:05d}.png")), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(got, expected[i])
    # --precision bfloat16 reaches the engine: the frames differ from float32 (really bf16) and stay within the
    # tiny-network bf16 bound of tests/test_engine.py (25 dB; the full-size network meets BF16_MIN_PSNR_DB)
    bf16 = tmp_path / "bf16"
    rc = cli.main(["render", "--bundle", str(bundle), "--source", str(d / "face.png"), "--motion",
                   str(d / "motion.json"), "--out", str(bf16), "--device", "cpu", "--quiet", "--precision", "bfloat16"])
    assert rc == 0
    got = np.stack([cv2.imread(str(bf16 / f"frame_{i:05d}.png"))[..., ::-1] for i in range(4)]).astype(np.float64)
    want = np.stack([expected[i] for i in range(4)]).astype(np.float64)
    mse = float(((got - want) ** 2).mean())
    assert mse > 0 and 10 * np.log10(255.0 ** 2 / mse) >= 25.0


def test_precision_choices_are_the_engines():
    from server.model_options import PRECISION_CHOICES
    from server.engine import PRECISIONS
    assert PRECISION_CHOICES == PRECISIONS


def test_render_from_checkpoints_preview_size(tiny, tmp_path):
    d, engine, portrait, rows = tiny
    rc = cli.main(["render", "--checkpoints", str(d / "checkpoints"), "--config", str(d / "config.json"),
                   "--source", str(d / "face.png"), "--motion", str(d / "motion.json"), "--out",
                   str(tmp_path), "--size", "64", "--device", "cpu", "--quiet"])
    assert rc == 0
    img = cv2.imread(str(tmp_path / "frame_00003.png"))
    assert img.shape == (64, 64, 3)


def test_render_errors(tiny, tmp_path, capsys):
    d, *_ = tiny
    base = ["render", "--checkpoints", str(d / "checkpoints"), "--config", str(d / "config.json"),
            "--motion", str(d / "motion.json"), "--out", str(tmp_path / "o"), "--quiet"]
    cv2.imwrite(str(tmp_path / "wide.png"), np.zeros((64, 80, 3), np.uint8))
    assert cli.main(base + ["--source", str(tmp_path / "wide.png")]) == 2
    assert "no face found" in capsys.readouterr().err          # not square: it must be aligned, and has no face
    assert cli.main(base + ["--source", str(tmp_path / "wide.png"), "--align", "no"]) == 2
    assert "not square" in capsys.readouterr().err
    assert cli.main(base + ["--source", str(tmp_path / "missing.png")]) == 2
    assert "file not found" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    bad = [a if a != str(d / "motion.json") else str(tmp_path / "bad.json") for a in base]
    assert cli.main(bad + ["--source", str(d / "face.png")]) == 2
    assert "'format'" in capsys.readouterr().err
    assert cli.main(base + ["--source", str(d / "face.png"), "--size", "100"]) == 2
    assert "unsupported size" in capsys.readouterr().err
    # full-size config against tiny files: one clear weights error, exit 1
    full = [a for a in base if a not in ("--config", str(d / "config.json"))]
    assert cli.main(full + ["--source", str(d / "face.png")]) == 1
    err = capsys.readouterr().err
    assert "do not match the StyleHEAT model" in err and "StyleGAN_e4e.pth" in err


def test_convert_errors(tmp_path, capsys):
    assert cli.main(["convert", "--checkpoints", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "missing file StyleHEAT_visual.pt" in err and "missing file hfgi.pth" in err
    assert cli.main(["convert", "--checkpoints", str(tmp_path), "--out", str(tmp_path / "x.bin")]) == 2


def test_render_write_failure_is_a_clear_error(tiny, tmp_path, capsys):
    d, *_ = tiny
    out = tmp_path / "frames"
    (out / "frame_00001.png").mkdir(parents=True)  # a folder where a frame must go: the write fails
    rc = cli.main(["render", "--checkpoints", str(d / "checkpoints"), "--config", str(d / "config.json"),
                   "--source", str(d / "face.png"), "--motion", str(d / "motion.json"), "--out", str(out),
                   "--size", "64", "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"cannot write frames to {out}" in err and "choose another --out" in err
    assert (out / "frame_00000.png").is_file()  # frames before the failure are kept
    assert not list(out.glob(".*.tmp"))  # and no temporary file is left behind


def test_config_that_is_a_folder_is_a_clear_error(tmp_path, capsys):
    rc = cli.main(["convert", "--checkpoints", str(tmp_path), "--config", str(tmp_path),
                   "--out", str(tmp_path / "x.safetensors")])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"--config {tmp_path}: cannot be read" in err and "pass a JSON file" in err
