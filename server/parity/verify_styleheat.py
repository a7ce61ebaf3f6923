"""Recompute the StyleHEAT reference vectors (``vectors_seed*.npz``) with this project's networks.

The weights are rebuilt from the layout JSON (``official_checkpoints.json``) with the seeded-weight
rule (:mod:`server.parity.reference`) for the file's ``meta_seed`` and loaded through models.weights'
prefix mapping; the stored ``in_*`` inputs go through every stage, each stage fed with OUR previous
outputs (end to end):

  e4e -> HFGI inversion -> VideoWarper -> fx_warp -> CalibrationNet -> final 1024 image
  (official_forward, every pass) and the product path (one pass from the cached 64x64 feature)
  -> plain StyleGAN image -> AudioWarper -> 'young' / 'lip' edits with the in_edit_* stand-ins.

``verify_styleheat_vectors`` returns one :class:`server.parity.reference.Comparison` per array
(``styleheat verify-reference`` prints them). Peak memory stays around 3 GB: the e4e encoder (1 GB)
is built, used and freed first.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

#: the layout JSON of the official checkpoints (next to the vector files in the reference folder)
STYLEHEAT_LAYOUT = "official_checkpoints.json"
VISUAL = "checkpoints/StyleHEAT_visual.pt"
#: (file in the layout JSON, part) -> our module
SEEDED_PARTS = {
    "e4e": ("checkpoints/Encoder_e4e.pth", "encoder"),
    "hfgi_aligner": ("checkpoints/hfgi.pth", "aligner"),
    "hfgi_encoder": ("checkpoints/hfgi.pth", "encoder"),
    "generator": ("checkpoints/StyleGAN_e4e.pth", ""),
}

# in-process cache of computed outputs: they depend only on the inputs, the seed and the layout
_CACHE: dict[str, dict[str, np.ndarray]] = {}


def _cache_key(v: dict[str, np.ndarray], layout_path: Path) -> str:
    h = hashlib.sha256()
    for k in sorted(v):
        if k.startswith("in_") or k == "meta_seed":
            h.update(k.encode())
            h.update(np.ascontiguousarray(v[k]).tobytes())
    h.update(Path(layout_path).read_bytes())
    return h.hexdigest()


def verify_styleheat_vectors(npz_path: str | Path, layout_path: str | Path):
    """Comparisons of every StyleHEAT stage (see module docstring), in pipeline order."""
    from server.parity.reference import compare

    with np.load(npz_path) as z:
        v = {k: z[k] for k in z.files}
    outputs = compute_styleheat_outputs(v, layout_path)
    comparisons = []
    for name, got in outputs.items():
        ref_name = "fake_image_1024_f16" if name in ("product_path_1024", "fast_path_1024") else name
        if ref_name not in v:
            continue
        comparisons.append(compare(name, got, v[ref_name]))
    return comparisons


def compute_styleheat_outputs(v: dict[str, np.ndarray], layout_path: str | Path) -> dict[str, np.ndarray]:
    """Our outputs named like the reference arrays (plus ``product_path_1024`` and ``fast_path_1024``); cached in-process."""
    key = _cache_key(v, Path(layout_path))
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _compute(v, Path(layout_path))
    return _CACHE[key]


def _compute(v: dict[str, np.ndarray], layout_path: Path) -> dict[str, np.ndarray]:
    import torch

    from models.styleheat import INPUT_SIZE, StyleHEAT, StyleHEATConfig, resize
    from models import weights
    from server.parity import reference

    for name in ("in_source_image", "in_driving_3dmm", "meta_seed"):
        if name not in v:
            raise KeyError(f"the vector file has no {name!r} array")
    seed = int(v["meta_seed"])
    layout = reference.load_layout(layout_path)
    has_audio = "net_G_ema[enable_audio]" in layout["files"][VISUAL]["parts"] and "in_audio_feature" in v
    cfg = StyleHEATConfig(audio=has_audio)
    out: dict[str, np.ndarray] = {}

    def keep(name: str, t) -> None:
        out[name] = t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)

    with torch.device("meta"):
        model = StyleHEAT(cfg)

    def load(part: str, state: dict) -> None:
        module = getattr(model, part)
        expected = {k: tuple(t.shape) for k, t in module.state_dict().items()}
        problems = weights._Problems()
        problems.check(expected, state, f"seeded {part}")
        problems.raise_if_any(layout_path)
        module.load_state_dict(state, strict=True, assign=True)
        module.eval()

    def seeded(file: str, part: str):
        return reference.seeded_part(layout, file, part, seed)

    for part in ("generator", "hfgi_aligner", "hfgi_encoder"):
        load(part, seeded(*SEEDED_PARTS[part]))
    net = seeded(VISUAL, "net_G_ema")
    if has_audio:
        net.update(seeded(VISUAL, "net_G_ema[enable_audio]"))
    problems = weights._Problems()
    groups = weights.split_net_g_ema(net, "seeded net_G_ema", problems)
    problems.raise_if_any(layout_path)
    del net
    for part in ("video_warper", "calibrator") + (("audio_warper",) if has_audio else ()):
        load(part, groups[part])
    del groups
    model.latent_avg = torch.zeros(cfg.n_latent, cfg.style_dim)
    model.set_latent_avg(seeded("checkpoints/Encoder_e4e.pth", "latent_avg"))

    src = torch.from_numpy(np.asarray(v["in_source_image"], dtype=np.float32))
    drv = torch.from_numpy(np.asarray(v["in_driving_3dmm"], dtype=np.float32))
    with torch.inference_mode():
        # e4e (the 1 GB encoder lives only for this stage)
        load("e4e", seeded(*SEEDED_PARTS["e4e"]))
        x = resize(src, INPUT_SIZE)
        wx = model.e4e_codes(x)
        model.e4e = None
        image, _ = model.generator(wx)
        e4e_ix = resize(image.clamp(-1, 1), INPUT_SIZE)
        res = x - e4e_ix
        keep("e4e_wx", wx)
        keep("e4e_ix_256", e4e_ix)
        # HFGI inversion, product split at 64x64
        inv = model.prepare_from_codes(wx, e4e_ix, res)
        keep("hfgi_ix_256", inv.ix)
        keep("hfgi_wx", inv.wx)
        keep("hfgi_fx", inv.fx)
        keep("hfgi_inversion_condition_0_scale", inv.inversion_condition[0])
        keep("hfgi_inversion_condition_1_shift", inv.inversion_condition[1])
        # official forward (video only, as the reference ran it): every pass, debug passes included
        audio_warper, model.audio_warper = model.audio_warper, None
        o = model.official_forward(src, drv, inv_data=(inv.ix, inv.wx, inv.fx, inv.inversion_condition),
                                   imsize=1024)
        model.audio_warper = audio_warper
        keep("vw_descriptor", o["descriptor"])
        keep("vw_flow_field", o["flow_field"])
        keep("vw_warp_image_256", o["warp_image"])
        keep("vw_deformation", o["deformations"][0])
        keep("fx_warp_f16", o["fx_warp"])
        for i, rc in enumerate(o["refining_condition"]):
            keep(f"refining_condition_{i}", rc)
        keep("fake_image_1024_f16", o["fake_image"])
        # product path: one generator pass from the cached 64x64 feature
        keep("product_path_1024", model.render(inv, drv, out_size=1024))
        # the engine's fast path: per-identity folded synthesis (Winograd blocks where NNPACK runs)
        from models.fastpath import FoldedSynthesis
        folded = FoldedSynthesis.build(model.generator, inv.wx, channels_last=True)
        keep("fast_path_1024", model.render(inv, drv, out_size=1024, synthesize=lambda f, s, w, o: folded(f, s)))
        del folded
        keep("stylegan_plain_1024_f16", model.generator(inv.wx)[0])
        if has_audio:
            aw_in = resize(o["video_warp_image"], INPUT_SIZE)
            keep("aw_input_256", aw_in)
            mel = torch.from_numpy(np.asarray(v["in_audio_feature"], dtype=np.float32))
            keep("aw_flow_field", model.audio_warper(aw_in, mel)["flow_field"])
        del o
        # edits with the stand-in direction files (official HFGI.edit: the e4e code, the e4e residual)
        if "in_edit_age_direction" in v:
            model.set_edit_assets(age=torch.from_numpy(v["in_edit_age_direction"]))
        if "in_edit_pca_comp" in v:
            model.set_edit_assets(pca={"mean": torch.from_numpy(v["in_edit_pca_mean"]),
                                       "comp": torch.from_numpy(v["in_edit_pca_comp"]),
                                       "std": torch.from_numpy(v["in_edit_pca_std"])})
        for choice, factor in (("young", -5.0), ("lip", 20.0)):
            if f"edit_{choice}_wx" not in v:
                continue
            ix_edit, wx_edit, _, _ = model.official_edit(wx, res, choice, factor)
            keep(f"edit_{choice}_wx", wx_edit)
            keep(f"edit_{choice}_ix_256", ix_edit)
    return out

