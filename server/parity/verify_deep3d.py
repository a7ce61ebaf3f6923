"""Check the Deep3D preprocessing and regressor against ``vectors_deep3d_seed*.npz``.

``verify_deep3d_vectors(npz_path, layout_dir)`` recomputes, from the stored inputs, every array the
official run recorded and returns one :class:`server.parity.reference.Comparison` per array:

* ``image_256`` (NEAREST 1024 -> 256 of the portrait, when the portrait is found next to the reference
  folder in ``fixtures/``), ``lm68`` (dlib, only when dlib is installed): exact;
* ``lm68_yflip``, ``lm5p``: exact; ``trans_params``, ``lm68_224``, ``input_224``: rtol 1e-6;
  ``image_224``: exact (uint8); the same for the ``alt_*`` case;
* ``backbone_features``, ``coeff_257``, ``row_73`` with seeded weights rebuilt from
  ``<layout_dir>/deep3d_checkpoints.json``: 1e-5 x max(1, max|ref|).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from server.parity.reference import Comparison, compare, load_layout, max_abs_error, seeded_part
from server.preprocessing import deep3d

LAYOUT_NAME = "deep3d_checkpoints.json"
#: the Deep3D checkpoint's entry in that layout
DEEP3D_LAYOUT_FILE = "checkpoints/Deep3D/epoch_20.pth"


def seeded_deep3d_extractor(layout_path: str | os.PathLike, seed: int = 0,
                            device: str | torch.device = "cpu") -> deep3d.Deep3DExtractor:
    """A Deep3D extractor on the seeded reference weights of a layout JSON (``deep3d_checkpoints.json``)."""
    layout = load_layout(layout_path)
    state = seeded_part(layout, DEEP3D_LAYOUT_FILE, "net_recon", seed)
    return deep3d.Deep3DExtractor(deep3d.build_regressor(state, source=f"seeded weights (seed {seed})"), None, device)


def _exact(name: str, got, ref) -> Comparison:
    got = np.asarray(got)
    ref = np.asarray(ref)
    if got.shape != ref.shape:
        raise ValueError(f"{name}: shape {got.shape} does not match reference {ref.shape}")
    return Comparison(name, max_abs_error(got, ref), 0.0)


def verify_deep3d_vectors(npz_path: str | os.PathLike, layout_dir: str | os.PathLike) -> list[Comparison]:
    """All comparisons for one Deep3D vectors file. ``layout_dir``: the folder holding
    ``deep3d_checkpoints.json`` (or that JSON file itself); the portrait is looked up in its sibling
    ``fixtures/`` folder."""
    npz_path = Path(npz_path)
    layout_dir = Path(layout_dir)
    layout_file = layout_dir / LAYOUT_NAME
    if layout_dir.is_file():  # the layout JSON itself was given
        layout_file, layout_dir = layout_dir, layout_dir.parent
    if not layout_file.is_file():
        raise FileNotFoundError(f"Deep3D layout {layout_file} not found; pass the folder holding "
                                f"{LAYOUT_NAME} or the file itself")
    with np.load(npz_path) as z:  # closed again (an NpzFile keeps the file open)
        d = dict(z)
    meta = json.loads(str(d["meta_json"]))
    seed = int(meta.get("seed", 0))
    out: list[Comparison] = []

    portrait = layout_dir.parent / "fixtures" / str(meta.get("portrait", ""))
    if meta.get("portrait") and portrait.is_file():
        from PIL import Image

        with Image.open(portrait) as im:
            out.append(_exact("deep3d.image_256", deep3d.resize_nearest_256(np.asarray(im.convert("RGB"))),
                              d["image_256"]))

    from server.preprocessing import align

    if align.dlib_available():
        det = align.detect_landmarks(d["image_256"])
        got = det.landmarks if det is not None else np.full((68, 2), np.inf)
        out.append(_exact("deep3d.lm68 (dlib)", got, d["lm68"]))

    lm3d = d["lm3d_std"]
    out.append(_exact("deep3d.lm3d_std (built-in)", deep3d.STANDARD_LM5_3D, lm3d))
    yflip = deep3d.flip_y(d["lm68"])
    out.append(_exact("deep3d.lm68_yflip", yflip, d["lm68_yflip"]))
    out.append(_exact("deep3d.lm5p", deep3d.reduce_to_5(yflip), d["lm5p"]))

    aligned = deep3d.align_img(d["image_256"], yflip, lm3d)
    out.append(compare("deep3d.trans_params", aligned.trans_params, d["trans_params"], rel=1e-6))
    out.append(_exact("deep3d.image_224", aligned.image, d["image_224"]))
    out.append(compare("deep3d.lm68_224", aligned.landmarks, d["lm68_224"], rel=1e-6))
    x = deep3d.network_input(aligned.image)
    out.append(compare("deep3d.input_224", x, d["input_224"], rel=1e-6))

    if "alt_lm68" in d:
        alt = deep3d.align_img(d["image_256"], deep3d.flip_y(d["alt_lm68"]), lm3d)
        out.append(compare("deep3d.alt_trans_params", alt.trans_params, d["alt_trans_params"], rel=1e-6))
        out.append(_exact("deep3d.alt_image_224", alt.image, d["alt_image_224"]))
        out.append(compare("deep3d.alt_lm68_224", alt.landmarks, d["alt_lm68_224"], rel=1e-6))

    extractor = seeded_deep3d_extractor(layout_file, seed=seed)
    with torch.no_grad():
        feats = extractor.net.features(torch.from_numpy(d["input_224"]))
        coeff = extractor.net(torch.from_numpy(d["input_224"]))
    out.append(compare("deep3d.backbone_features", feats, d["backbone_features"], rel=1e-5))
    out.append(compare("deep3d.coeff_257", coeff, d["coeff_257"], rel=1e-5))
    # the full path: our own crop and network input -> row
    row = extractor.rows([d["image_256"]], d["lm68"][None])
    out.append(compare("deep3d.row_73[:70]", row[:, :70], d["row_73"][:, :70], rel=1e-5))
    out.append(compare("deep3d.row_73[70:] (crop)", row[:, 70:], d["row_73"][:, 70:], rel=1e-6))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Compare Deep3D preprocessing + regressor with reference vectors")
    p.add_argument("npz")
    p.add_argument("--layout-dir", default=None, help="folder with deep3d_checkpoints.json (default: the npz's)")
    a = p.parse_args(argv)
    results = verify_deep3d_vectors(a.npz, a.layout_dir or Path(a.npz).parent)
    for r in results:
        print(r.line())
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
