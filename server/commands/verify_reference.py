"""`styleheat verify-reference`: recompute the official reference vectors and compare (parity check).

For a StyleHEAT vector file (``vectors_seed*.npz``: has ``e4e_wx``) the weights are rebuilt from the
layout JSON with the seeded-weight rule (server.reference) for the file's ``meta_seed``, loaded through
models.weights' prefix mapping, and the stored ``in_*`` inputs go through every stage, each stage fed
with OUR previous outputs (end to end):

  e4e -> HFGI inversion -> VideoWarper -> fx_warp -> CalibrationNet -> final 1024 image
  (official_forward, every pass) and the product path (one pass from the cached 64x64 feature)
  -> plain StyleGAN image -> AudioWarper -> 'young' / 'lip' edits with the in_edit_* stand-ins.

One line per compared array (server.reference.Comparison.line), then ``parity: PASS`` or
``parity: FAIL <first failing array>``; exit status 0 only on PASS. Audio (SadTalker) and Deep3D vector
files are dispatched on their keys to server.verify_audio / server.verify_deep3d.

Peak memory stays around 3 GB: the e4e encoder (1 GB) is built, used and freed first.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

NAME = "verify-reference"
HELP = "recompute the official reference vectors with seeded weights and report parity"
DESCRIPTION = ("Rebuild the seeded weights of a reference vector file, run its stored inputs through this "
               "project's networks and compare every stage with the official outputs. Prints one line per "
               "array and 'parity: PASS' or 'parity: FAIL <array>'; exit status 0 only on PASS.")

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vectors", required=True, metavar="FILE.npz",
                        help="reference vector file (vectors_seed0.npz, vectors_audio_seed0.npz, vectors_deep3d_seed0.npz)")
    parser.add_argument("--layout", metavar="JSON",
                        help="checkpoint layout JSON (default: the matching layout next to the vectors file)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def run(args) -> int:
    vectors = Path(args.vectors)
    if not vectors.is_file():
        print(f"styleheat verify-reference: {vectors} not found", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        z = np.load(vectors)  # allow_pickle stays False: a pickle is refused, never run
    except (OSError, ValueError) as e:
        z, why = None, str(e)
    else:
        why = "a single .npy array"
    if not isinstance(z, np.lib.npyio.NpzFile):
        print(f"styleheat verify-reference: {vectors} is not a .npz reference vector file ({why}); pass one "
              f"of the files in shared/reference (vectors_seed0.npz, ...)", file=sys.stderr)
        return 2
    with z:
        keys = set(z.files)
    kind, fn = _dispatch(keys)
    if fn is None and kind == "unknown":
        print(f"styleheat verify-reference: cannot verify {vectors}: its arrays ({', '.join(sorted(keys)[:6])}) "
              f"are not those of a StyleHEAT, audio or Deep3D reference vector file", file=sys.stderr)
        return 2
    if fn is None:
        print(f"styleheat verify-reference: {vectors} holds {kind} vectors, which this installation cannot "
              f"verify yet ({_MISSING[kind]} is not available)", file=sys.stderr)
        return 2
    if kind == "styleheat":
        layout = Path(args.layout) if args.layout else vectors.parent / STYLEHEAT_LAYOUT
        if not layout.is_file():
            print(f"styleheat verify-reference: layout {layout} not found; pass --layout", file=sys.stderr)
            return 2
        target = layout
    else:
        target = Path(args.layout) if args.layout else vectors.parent
    t0 = time.time()
    try:
        comparisons = fn(vectors, target)
    except KeyError as e:
        print(f"styleheat verify-reference: {vectors} lacks the entry {e.args[0]!r}; is it an unmodified "
              f"{kind} reference vector file?", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"styleheat verify-reference: {e}", file=sys.stderr)
        return 2
    for c in comparisons:
        print(c.line())
    failed = [c for c in comparisons if not c.ok]
    print(f"({len(comparisons)} arrays compared in {time.time() - t0:.1f} s)")
    if not comparisons:
        print("parity: FAIL (nothing compared)")
        return 1
    if failed:
        print(f"parity: FAIL {failed[0].name}")
        return 1
    print("parity: PASS")
    return 0


_MISSING = {"audio": "server.verify_audio.verify_audio_vectors",
            "deep3d": "server.verify_deep3d.verify_deep3d_vectors", "unknown": "a verifier for these keys"}


def _dispatch(keys: set[str]) -> tuple[str, Callable | None]:
    if "e4e_wx" in keys and "in_source_image" in keys:
        return "styleheat", verify_styleheat_vectors
    if "coeff_257" in keys or "lm68" in keys:
        try:
            from server.verify_deep3d import verify_deep3d_vectors
        except ImportError:
            return "deep3d", None
        return "deep3d", verify_deep3d_vectors
    if "mel_basis" in keys or "indiv_mels" in keys:
        try:
            from server.verify_audio import verify_audio_vectors
        except ImportError:
            return "audio", None
        return "audio", verify_audio_vectors
    return "unknown", None


# ---------------------------------------------------------------------------- StyleHEAT stages
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
    from server.reference import compare

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
    from server import reference

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

