"""`styleheat verify-reference` argument handling and dispatch on the vector file's keys (fast)."""
import numpy as np

from server import cli
from server.commands import verify_reference as vr


def test_dispatch_on_keys():
    assert vr._dispatch({"e4e_wx", "in_source_image"})[0] == "styleheat"
    kind, fn = vr._dispatch({"coeff_257", "lm68"})
    assert kind == "deep3d" and (fn is None or fn.__name__ == "verify_deep3d_vectors")
    kind, fn = vr._dispatch({"mel_basis", "indiv_mels"})
    assert kind == "audio" and (fn is None or fn.__name__ == "verify_audio_vectors")
    assert vr._dispatch({"something"}) == ("unknown", None)


def test_unknown_vectors_and_missing_files(tmp_path, capsys):
    np.savez(tmp_path / "odd.npz", x=np.zeros(3))
    assert cli.main(["verify-reference", "--vectors", str(tmp_path / "odd.npz")]) == 2
    assert "cannot verify" in capsys.readouterr().err
    assert cli.main(["verify-reference", "--vectors", str(tmp_path / "none.npz")]) == 2
    assert "not found" in capsys.readouterr().err
    np.savez(tmp_path / "v.npz", e4e_wx=np.zeros(1), in_source_image=np.zeros(1))
    assert cli.main(["verify-reference", "--vectors", str(tmp_path / "v.npz")]) == 2
    assert "official_checkpoints.json not found" in capsys.readouterr().err


def test_files_that_are_not_vector_files_get_a_clear_error(tmp_path, capsys):
    (tmp_path / "text.npz").write_text("hello")
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    for name, why in (("text.npz", "Cannot load file containing pickled data"), ("one.npz", "a single .npy array")):
        assert cli.main(["verify-reference", "--vectors", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"{name} is not a .npz reference vector file ({why}" in err and "Traceback" not in err


def test_vector_file_missing_an_array_names_it(tmp_path, capsys, reference_dir):
    np.savez(tmp_path / "d3.npz", coeff_257=np.zeros(3), lm68=np.zeros(3))
    rc = cli.main(["verify-reference", "--vectors", str(tmp_path / "d3.npz"), "--layout", str(reference_dir)])
    assert rc == 2
    assert "lacks the entry 'meta_json'; is it an unmodified deep3d reference vector file?" in capsys.readouterr().err
