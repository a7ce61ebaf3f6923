"""Registry of the official release assets that StyleHEAT inference needs.

File names, URLs and target paths follow the official download script of
OpenTalker/StyleHEAT (``bash/download.sh``): every asset except the BFM comes from the GitHub
release ``FeiiYin/StyleHEAT`` tag ``styleheat``; the BFM fitting files come from the SadTalker
release ``v0.0.1``. Target paths are relative to the checkpoint directory, which plays the role
of the official ``checkpoints/`` folder (see :mod:`server.checkpoints.paths`).

Two assets are zip archives: the InterfaceGAN directions are unpacked into the checkpoint
directory (giving ``interfacegan_directions/age.pt`` and ``pose.pt``), the BFM archive's
``BFM_Fitting/`` folder is unpacked into ``BFM/``. The training-only files of the script
(``ffhq_PCA.npz``, ``stylegan2_d_256.pth``, ``model_ir_se50.pth``, the demo videos) are not
listed: inference never reads them.

Each asset also says what a healthy file looks like without any network definition (its
top-level parts and a few key prefixes the official loaders index); ``styleheat doctor`` uses
that when :func:`models.weights.expected_layout` is not available.

Asset names (``--only NAME``; the file name works too):
``styleheat``, ``hfgi``, ``e4e``, ``stylegan``, ``ganspace``, ``interfacegan``, ``deep3d``,
``bfm``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable

STYLEHEAT_RELEASE = "https://github.com/FeiiYin/StyleHEAT/releases/download/styleheat/"
SADTALKER_RELEASE = "https://github.com/Winfredy/SadTalker/releases/download/v0.0.1/"


@dataclass(frozen=True)
class Part:
    """One top-level entry of a torch checkpoint (``name == ""``: the file itself).

    ``kind`` is ``"state_dict"`` (a mapping of key -> tensor) or ``"tensor"``.
    ``prefixes``: every one must start at least one key (state dicts only).
    ``last_dim``: required size of the last dimension (tensors only).
    """

    name: str
    kind: str = "state_dict"
    prefixes: tuple[str, ...] = ()
    last_dim: int | None = None


@dataclass(frozen=True)
class FileSpec:
    """One file that must exist under the checkpoint directory after installation.

    ``fmt`` is ``"torch"`` (read with ``torch.load(weights_only=True)``) or ``"mat"`` (MATLAB
    v5, read with ``scipy.io.loadmat``). ``parts`` (torch) are the top-level entries the
    loader reads; other top-level entries are allowed (e.g. optimizer state). ``mat_keys``
    (mat) maps each required variable to its required shape (``None`` entries: any size).
    """

    path: str
    fmt: str = "torch"
    parts: tuple[Part, ...] = ()
    mat_keys: dict[str, tuple[int | None, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Asset:
    """One downloadable release asset."""

    name: str
    filename: str              # name of the release asset (last URL component)
    url: str
    description: str
    files: tuple[FileSpec, ...]
    archive: bool = False      # a zip to unpack instead of a file to keep
    zip_strip: str = ""        # leading folder of the archive members to drop ("" = none)
    zip_into: str = ""         # folder (relative to the checkpoint dir) to unpack into
    size: int | None = None    # expected size in bytes, when known
    sha256: str | None = None  # expected digest, when known (the official release lists none)

    @property
    def target(self) -> str:
        """Where the downloaded bytes end up: the file itself, or the archive's temporary name."""
        return self.files[0].path if not self.archive else self.filename

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(f.path for f in self.files)


def _sd(name: str, *prefixes: str) -> Part:
    return Part(name, "state_dict", tuple(prefixes))


OFFICIAL_ASSETS: tuple[Asset, ...] = (
    Asset(
        name="styleheat",
        filename="StyleHEAT_visual.pt",
        url=STYLEHEAT_RELEASE + "StyleHEAT_visual.pt",
        description="StyleHEAT video warper and calibration network (net_G_ema)",
        files=(FileSpec("StyleHEAT_visual.pt", parts=(_sd("net_G_ema", "video_warper.", "calibrator."),)),),
    ),
    Asset(
        name="hfgi",
        filename="hfgi.pth",
        url=STYLEHEAT_RELEASE + "hfgi.pth",
        description="HFGI residual aligner and encoder (high-fidelity inversion)",
        files=(FileSpec("hfgi.pth", parts=(_sd("aligner", "conv_layer1.", "dconv_layer1."),
                                           _sd("encoder", "conv_layer1.", "condition_scale3."))),),
    ),
    Asset(
        name="e4e",
        filename="Encoder_e4e.pth",
        url=STYLEHEAT_RELEASE + "Encoder_e4e.pth",
        description="e4e encoder (portrait -> W+ code) and the average latent",
        files=(FileSpec("Encoder_e4e.pth", parts=(_sd("encoder", "input_layer.", "body.", "styles."),
                                                  Part("latent_avg", "tensor", last_dim=512))),),
    ),
    Asset(
        name="stylegan",
        filename="StyleGAN_e4e.pth",
        url=STYLEHEAT_RELEASE + "StyleGAN_e4e.pth",
        description="StyleGAN2 1024x1024 generator (flat state dict)",
        files=(FileSpec("StyleGAN_e4e.pth", parts=(_sd("", "input.", "conv1.", "to_rgb1.", "convs.", "to_rgbs."),)),),
    ),
    Asset(
        name="ganspace",
        filename="ffhq_pca.pt",
        url=STYLEHEAT_RELEASE + "ffhq_pca.pt",
        description="GANSpace PCA of the FFHQ latent space (beard / lip edits)",
        files=(FileSpec("ffhq_pca.pt", parts=(Part("mean", "tensor", last_dim=512),
                                              Part("comp", "tensor", last_dim=512),
                                              Part("std", "tensor"))),),
    ),
    Asset(
        name="interfacegan",
        filename="interfacegan_directions-20230323T133213Z-001.zip",
        url=STYLEHEAT_RELEASE + "interfacegan_directions-20230323T133213Z-001.zip",
        description="InterfaceGAN latent directions (age and pose edits)",
        files=(FileSpec("interfacegan_directions/age.pt", parts=(Part("", "tensor", last_dim=512),)),
               FileSpec("interfacegan_directions/pose.pt", parts=(Part("", "tensor", last_dim=512),))),
        archive=True,
    ),
    Asset(
        name="deep3d",
        filename="epoch_20.pth",
        url=STYLEHEAT_RELEASE + "epoch_20.pth",
        description="Deep3DFaceRecon regressor (driving video -> 3DMM coefficients)",
        files=(FileSpec("Deep3D/epoch_20.pth", parts=(_sd("net_recon", "backbone.", "final_layers."),)),),
    ),
    Asset(
        name="bfm",
        filename="BFM_Fitting.zip",
        url=SADTALKER_RELEASE + "BFM_Fitting.zip",
        description="Basel Face Model fitting files (standard 3D landmarks for face alignment)",
        files=(FileSpec("BFM/similarity_Lm3D_all.mat", fmt="mat", mat_keys={"lm": (68, 3)}),),
        archive=True,
        zip_strip="BFM_Fitting/",
        zip_into="BFM",
    ),
)


def registry(mirror: str | None = None) -> tuple[Asset, ...]:
    """The official assets; with ``mirror``, every URL becomes ``mirror/<filename>``.

    A mirror is any HTTP(S) server holding the release files under their release names (a
    company proxy, a local copy, the tests' server). Raises ``ValueError`` for another kind of URL.
    """
    if not mirror:
        return OFFICIAL_ASSETS
    if not mirror.lower().startswith(("http://", "https://")):
        raise ValueError(f"the mirror must be an http:// or https:// URL (the folder holding the release "
                         f"files), got {mirror!r}")
    base = mirror if mirror.endswith("/") else mirror + "/"
    return tuple(replace(a, url=base + a.filename) for a in OFFICIAL_ASSETS)


def select(assets: Iterable[Asset], names: Iterable[str] | None) -> list[Asset]:
    """The assets named by ``names`` (asset names or file names, case-insensitive), in registry order.

    Raises ``KeyError`` with a message listing the valid names when one is unknown.
    """
    assets = list(assets)
    if not names:
        return assets
    wanted: set[str] = set()
    for raw in names:
        key = raw.strip().lower()
        hit = [a for a in assets
               if key in (a.name.lower(), a.filename.lower()) or key in (p.lower() for p in a.paths)]
        if not hit:
            valid = ", ".join(a.name for a in assets)
            raise KeyError(f"unknown asset {raw!r}; choose from: {valid} (or their file names)")
        wanted.update(a.name for a in hit)
    return [a for a in assets if a.name in wanted]
