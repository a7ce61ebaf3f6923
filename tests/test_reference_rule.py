"""Our seeded-weight rule must rebuild the official seeded tensors exactly."""
import importlib.util

import numpy as np
import torch

from server.parity import reference


def _official_helper(reference_dir):
    spec = importlib.util.spec_from_file_location("seeded_weights", reference_dir / "seeded_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rule_matches_shared_helper_on_hfgi(official_layout, reference_dir):
    sw = _official_helper(reference_dir)
    theirs = sw.build_file(official_layout, "checkpoints/hfgi.pth", seed=0)
    ours = reference.seeded_file(official_layout, "checkpoints/hfgi.pth", seed=0)
    assert set(ours) == set(theirs) == {"aligner", "encoder"}
    for part in ours:
        assert list(ours[part]) == list(theirs[part])
        for k in ours[part]:
            assert torch.equal(ours[part][k], theirs[part][k]), k


def test_latent_avg_is_a_tensor_with_its_own_seed_key(official_layout):
    a = reference.seeded_part(official_layout, "checkpoints/Encoder_e4e.pth", "latent_avg", seed=0)
    b = reference.seeded_part(official_layout, "checkpoints/Encoder_e4e.pth", "latent_avg", seed=1)
    assert tuple(a.shape) == (18, 512)
    assert abs(float(a.std()) - 0.2) < 0.01
    assert not torch.equal(a, b)


def test_compare_tolerances():
    ref = np.array([0.0, 3.0], dtype=np.float32)
    assert reference.compare("x", ref + 2.9e-4, ref).ok           # tol 3e-4
    assert not reference.compare("x", ref + 3.1e-4, ref).ok
    r16 = ref.astype(np.float16)
    assert reference.compare("y", ref + 5.9e-3, r16).ok            # tol 6e-3
    bad = ref.copy(); bad[0] = np.nan
    assert not reference.compare("z", bad, ref).ok


def test_prefix_selects_one_submodule_with_the_full_parts_seeds(official_layout):
    hfgi = reference.seeded_file(official_layout, "checkpoints/hfgi.pth", seed=0)["encoder"]
    sub = reference.seeded_part(official_layout, "checkpoints/hfgi.pth", "encoder", 0, prefix="conv_layer2.")
    full = {k[len("conv_layer2."):]: v for k, v in hfgi.items() if k.startswith("conv_layer2.")}
    assert sub and set(sub) == set(full)
    assert all(torch.equal(sub[k], full[k]) for k in sub)
    import pytest
    with pytest.raises(KeyError, match="no keys under"):
        reference.seeded_part(official_layout, "checkpoints/hfgi.pth", "encoder", 0, prefix="nope.")
