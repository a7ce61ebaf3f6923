"""models.weights: official files -> our modules (strict, one error naming key and file), layouts, bundle."""
import dataclasses

import pytest
import torch

from models.styleheat import StyleHEAT, StyleHEATConfig
from models import weights

CFG = StyleHEATConfig.tiny(audio=True)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(1)
    m = StyleHEAT(CFG).eval()
    m.latent_avg = torch.randn_like(m.latent_avg)
    d = CFG.style_dim
    m.set_edit_assets(age=torch.randn(1, d), pose=torch.randn(d),
                      pca={"mean": torch.randn(1, d), "comp": torch.randn(60, 1, d), "std": torch.rand(60) + 1})
    return m


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _write(tmp_path, files):
    for name, obj in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp_path / name)
    return tmp_path


def test_round_trip_through_official_files(tmp_path, tiny_model):
    weights.write_official(tmp_path, tiny_model)
    model, report = weights.load_official(tmp_path, CFG)
    _assert_same(model, tiny_model)
    assert report.audio and model.has_audio
    assert report.sources["generator"] == "StyleGAN_e4e.pth"
    assert report.sources["hfgi_aligner"] == "hfgi.pth['aligner']"
    assert sorted(report.edits) == ["age", "pca", "pose"]
    assert not model.training


def test_checkpoints_subfolder_is_accepted(tmp_path, tiny_model):
    weights.write_official(tmp_path / "checkpoints", tiny_model)
    model, _ = weights.load_official(tmp_path, CFG)
    _assert_same(model, tiny_model)


def test_generator_keys_in_net_g_ema_override_and_are_reported(tmp_path, tiny_model):
    files = weights.official_files(tiny_model, generator_in_visual=True)
    net = files[weights.VISUAL]["net_G_ema"]
    # the separate StyleGAN file holds different values: the net_G_ema copy must win (official order)
    files[weights.STYLEGAN] = {k: v + 1.0 if v.is_floating_point() else v for k, v in files[weights.STYLEGAN].items()}
    net["generator.iteration_loss.perceptual.model.network.0.weight"] = torch.zeros(4, 3, 3, 3)  # training VGG
    model, report = weights.load_official(_write(tmp_path, files), CFG)
    _assert_same(model, tiny_model)
    assert "overridden by StyleHEAT_visual.pt['net_G_ema'] generator.stylegan.*" in report.sources["generator"]
    assert any("iteration_loss" in n for n in report.notes)


def test_hfgi_files_may_be_absent_when_net_g_ema_holds_them(tmp_path, tiny_model):
    files = weights.official_files(tiny_model, generator_in_visual=True)
    del files[weights.STYLEGAN], files[weights.HFGI]
    model, report = weights.load_official(_write(tmp_path, files), CFG)
    _assert_same(model, tiny_model)
    assert report.sources["generator"].startswith("StyleHEAT_visual.pt['net_G_ema'] generator.stylegan.*")
    assert "absent" in report.sources["hfgi_encoder"]


def test_no_audio_keys_means_no_audio_warper(tmp_path, tiny_model):
    files = weights.official_files(tiny_model)
    net = files[weights.VISUAL]["net_G_ema"]
    for k in [k for k in net if k.startswith("audio_warper.")]:
        del net[k]
    model, report = weights.load_official(_write(tmp_path, files), CFG)
    assert model.audio_warper is None and not report.audio
    assert any("audio" in n for n in report.notes)


def test_one_error_lists_every_problem_with_its_file(tmp_path, tiny_model):
    files = weights.official_files(tiny_model)
    aligner = files[weights.HFGI]["aligner"]
    gone = next(iter(aligner))
    del aligner[gone]
    files[weights.VISUAL]["net_G_ema"]["calibrator.bogus.weight"] = torch.zeros(2)
    files[weights.VISUAL]["net_G_ema"]["somewhere.else"] = torch.zeros(2)
    sg = files[weights.STYLEGAN]
    bad_key = "conv1.conv.weight"
    sg[bad_key] = torch.zeros(1, 2, 3)
    files[weights.E4E]["latent_avg"] = torch.zeros(7)
    files[weights.AGE] = torch.zeros(3)
    with pytest.raises(weights.WeightsError) as e:
        weights.load_official(_write(tmp_path, files), CFG)
    msg = str(e.value)
    assert f"missing key {gone!r} in hfgi.pth['aligner']" in msg
    assert "unexpected key 'calibrator.bogus.weight' in StyleHEAT_visual.pt['net_G_ema']" in msg
    assert "unexpected key 'somewhere.else' in StyleHEAT_visual.pt['net_G_ema']" in msg
    assert f"key {bad_key!r} in StyleGAN_e4e.pth has shape [1, 2, 3], expected" in msg
    assert "Encoder_e4e.pth['latent_avg'] has shape [7]" in msg
    assert "interfacegan_directions/age.pt" in msg
    assert "(6 problems)" in msg


def test_scalar_tensors_are_reported_not_a_traceback(tmp_path, tiny_model):
    files = weights.official_files(tiny_model)
    files[weights.E4E]["latent_avg"] = torch.tensor(1.0)
    files[weights.AGE] = torch.tensor(1.0)
    files[weights.GANSPACE] = {"mean": torch.tensor(1.0), "comp": torch.tensor(1.0), "std": torch.tensor(1.0)}
    with pytest.raises(weights.WeightsError) as e:
        weights.load_official(_write(tmp_path, files), CFG)
    msg = str(e.value)
    assert "Encoder_e4e.pth['latent_avg'] has shape []" in msg
    assert "interfacegan_directions/age.pt: expected a tensor of shape" in msg
    assert "ffhq_pca.pt: shapes mean [], comp [], std [] do not fit" in msg
    assert "(3 problems)" in msg


def test_missing_files_and_wrong_structure(tmp_path, tiny_model):
    files = weights.official_files(tiny_model)
    del files[weights.HFGI]
    files[weights.E4E] = {"latent_avg": files[weights.E4E]["latent_avg"]}   # no 'encoder'
    with pytest.raises(weights.WeightsError) as e:
        weights.load_official(_write(tmp_path, files), CFG)
    msg = str(e.value)
    assert "missing file hfgi.pth" in msg
    assert "Encoder_e4e.pth: missing top-level key 'encoder'" in msg
    with pytest.raises(weights.WeightsError, match="does not exist"):
        weights.load_official(tmp_path / "nowhere", CFG)


def test_unreadable_file_is_a_clear_error(tmp_path, tiny_model):
    weights.write_official(tmp_path, tiny_model)
    (tmp_path / weights.HFGI).write_bytes(b"not a checkpoint")
    with pytest.raises(weights.WeightsError, match=r"hfgi.pth could not be read as a weights-only torch checkpoint"):
        weights.load_official(tmp_path, CFG)


def test_bundle_round_trip_and_errors(tmp_path, tiny_model):
    path = weights.save_bundle(tmp_path / "m.safetensors", tiny_model, sources={"generator": "x"})
    model, meta = weights.load_bundle(path)
    _assert_same(model, tiny_model)
    assert meta["config"] == CFG and meta["sources"] == {"generator": "x"}
    assert sorted(model.edit_assets()) == sorted(tiny_model.edit_assets())
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(weights.WeightsError, match="not a StyleHEAT bundle"):
        weights.load_bundle(tmp_path / "other.safetensors")
    with pytest.raises(weights.WeightsError, match="not found"):
        weights.load_bundle(tmp_path / "none.safetensors")


def test_config_dict_round_trip():
    for cfg in (StyleHEATConfig(), CFG):
        assert StyleHEATConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        StyleHEATConfig.from_dict({"generatr": {}})


def _json_part(layout, file, part, keep=lambda k: True):
    return [(k, tuple(shape)) for k, shape, _dtype, _std in layout["files"][file]["parts"][part]["entries"] if keep(k)]


def test_full_size_expected_layout_equals_official_json(official_layout):
    """Our full-size module definitions reproduce every official key and shape, in order."""
    L = official_layout
    for asset, file in (("hfgi", "checkpoints/hfgi.pth"), ("e4e", "checkpoints/Encoder_e4e.pth"),
                        ("stylegan", "checkpoints/StyleGAN_e4e.pth")):
        ours = weights.expected_layout(asset)
        assert list(ours) == list(L["files"][file]["parts"]), asset
        for part, keys in ours.items():
            spec = L["files"][file]["parts"][part]
            if spec["kind"] == "tensor":
                assert list(keys.values()) == [tuple(spec["entries"][0][1])]
            else:
                assert list(keys.items()) == _json_part(L, file, part), (asset, part)
    visual = "checkpoints/StyleHEAT_visual.pt"
    required = weights.expected_layout("styleheat")["net_G_ema"]
    assert list(required.items()) == _json_part(L, visual, "net_G_ema",
                                                lambda k: k.startswith(("video_warper.", "calibrator.")))
    optional = weights.optional_layout("StyleHEAT_visual.pt")["net_G_ema"]
    json_generator = _json_part(L, visual, "net_G_ema",
                                lambda k: k.startswith("generator.") and not k.startswith(weights.IGNORED_PREFIXES))
    json_audio = _json_part(L, visual, "net_G_ema[enable_audio]")
    assert sorted(optional.items()) == sorted(json_generator + json_audio)
    # the generator.* copies hold exactly the separate files' tensors
    assert len(json_generator) == 171 + 621 + 295 + 105 and len(json_audio) == 166
    with pytest.raises(KeyError, match="no layout"):
        weights.expected_layout("bfm")


class _NotAllowed:
    """Any class outside torch's and our allow-list: loading it would mean running code."""


def test_torch_load_is_weights_only_and_agrees_with_doctor(tmp_path):
    import argparse
    import pickle

    from server.commands import doctor

    obj = {"opts": argparse.Namespace(size=1024), "w": torch.arange(3.0)}
    torch.save(obj, tmp_path / "zip.pt")
    torch.save(obj, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    for name in ("zip.pt", "legacy.pt"):
        got = weights.torch_load(tmp_path / name)
        assert got["opts"].size == 1024 and torch.equal(got["w"], obj["w"])
        assert doctor.load_torch(tmp_path / name)["opts"].size == 1024
    torch.save({"x": _NotAllowed()}, tmp_path / "code.pt")
    with pytest.raises(pickle.UnpicklingError, match="_NotAllowed"):
        weights.torch_load(tmp_path / "code.pt")
    with pytest.raises(doctor.CheckFailed, match="would run code"):
        doctor.load_torch(tmp_path / "code.pt")
