"""The --out checks shared by align, audio2exp, extract and convert (server.commands._output), via the real CLI."""
import pytest

from server import cli

# command -> (its arguments other than --out, the suffix its --out must have)
COMMANDS = {
    "align": (["--image", "face.png"], ".png"),
    "audio2exp": (["--audio", "speech.wav"], ".json"),
    "extract": (["--video", "drive.mp4"], ".json"),
    "convert": (["--checkpoints", "ckpt"], ".safetensors"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_out_is_refused_with_what_to_do(command, tmp_path, capsys):
    args, suffix = COMMANDS[command]

    def run(out):
        rc = cli.main([command, *args, "--out", str(out)])
        return rc, capsys.readouterr().err

    rc, err = run(tmp_path / "result.txt")
    assert rc == 2 and f"styleheat {command}: --out must be a {suffix}" in err
    assert "result.txt" in err

    rc, err = run(tmp_path / "missing" / f"result{suffix}")
    assert rc == 2 and "output folder" in err and "does not exist; create it first" in err

    folder = tmp_path / f"taken{suffix}"
    folder.mkdir()
    rc, err = run(folder)
    assert rc == 2 and "is a folder" in err


def test_suffix_is_case_insensitive_and_good_paths_pass(tmp_path):
    from server.commands._output import output_file_problem

    assert output_file_problem(tmp_path / "A.JSON", ".json") is None
    assert output_file_problem(tmp_path / "bundle.safetensors", ".safetensors", "bundle file") is None
    assert "must be a .png file" in output_file_problem(tmp_path / "a.jpg", ".png")
