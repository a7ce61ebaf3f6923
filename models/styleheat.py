"""StyleHEAT as one module: inversion (e4e + HFGI), motion (Video/Audio warper), calibration, StyleGAN2.

Two ways to run it:

* :meth:`StyleHEAT.official_forward` reproduces the official ``StyleHEAT.forward`` call for call
  (reference README, quirks 6 and 15): a full generator pass for the ``video_warp_image`` debug output
  (and one more for ``audio_warp_image`` with audio), then the final pass from the *unwarped* ``fx`` with
  the warp and the CalibrationNet's 64x64 pair applied inside the generator. It is the parity and
  speed-benchmark reference.
* the product path: :meth:`StyleHEAT.prepare` inverts a portrait once and caches everything that does not
  depend on the frame (W+, ``fx`` after the inversion condition, the RGB skip below 64x64, the 256 image);
  :meth:`StyleHEAT.render` then does per frame warper -> warp(fx) -> CalibrationNet -> ONE generator pass
  from 64x64 (:meth:`Generator.synthesize_from_64`), batched, with ``out_size`` for cheap previews.
  The result equals ``official_forward``'s ``fake_image`` (same operations, the debug passes dropped).

With audio (official ``enable_audio``): the AudioWarper sees the 256x256 resize of the warped-but-not-
calibrated image, its flow's top 32 rows are zeroed, and its deformation is applied after the video one.
That input image costs one extra generator pass per frame (exactly as in the official code).

Inputs are float32 NCHW in [-1, 1]; this module does no file I/O.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from models import editing, flow, hfgi
from models.calibration import CalibrationConfig, CalibrationNet
from models.e4e import E4EConfig, Encoder4Editing
from models.hfgi import HFGIConfig, ResidualAligner, ResidualEncoder
from models.stylegan2 import Generator, StyleGAN2Config
from models.warper import AudioWarper, VideoWarper, WarperConfig, zero_upper_flow_

#: side of the inversion / warper input image
INPUT_SIZE = 256

#: product attribute edits: name -> (edit data it needs, min strength, max strength); 0 = no edit
ATTRIBUTES: dict[str, tuple[str, float, float]] = {
    "age": ("age", -10.0, 10.0),
    "pose": ("pose", -10.0, 10.0),
    "beard": ("pca_mean", -40.0, 40.0),
    "lip": ("pca_mean", -40.0, 40.0),
}
_ASSET_FILES = {"age": "interfacegan_directions/age.pt", "pose": "interfacegan_directions/pose.pt",
                "pca_mean": "ffhq_pca.pt"}

_CONFIG_TYPES = {
    "generator": StyleGAN2Config, "e4e": E4EConfig, "hfgi": HFGIConfig,
    "video_warper": WarperConfig, "audio_warper": WarperConfig, "calibration": CalibrationConfig,
}


@dataclass(frozen=True)
class StyleHEATConfig:
    """All sub-network configs; defaults = the official full-size networks.

    ``audio``: build the AudioWarper (official ``enable_audio``).
    """

    generator: StyleGAN2Config = field(default_factory=StyleGAN2Config)
    e4e: E4EConfig = field(default_factory=E4EConfig)
    hfgi: HFGIConfig = field(default_factory=HFGIConfig)
    video_warper: WarperConfig = field(default_factory=WarperConfig)
    audio_warper: WarperConfig = field(default_factory=WarperConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    audio: bool = False

    @classmethod
    def tiny(cls, audio: bool = False) -> "StyleHEATConfig":
        """Every sub-network at its tiny() size (128^2 images, 32-channel fx) for tests."""
        return cls(generator=StyleGAN2Config.tiny(), e4e=E4EConfig.tiny(), hfgi=HFGIConfig.tiny(),
                   video_warper=WarperConfig.tiny(), audio_warper=WarperConfig.tiny(),
                   calibration=CalibrationConfig.tiny(), audio=audio)

    def with_audio(self, audio: bool) -> "StyleHEATConfig":
        return dataclasses.replace(self, audio=bool(audio))

    @property
    def n_latent(self) -> int:
        return self.generator.n_latent

    @property
    def style_dim(self) -> int:
        return self.generator.style_dim

    @property
    def size(self) -> int:
        return self.generator.size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StyleHEATConfig":
        """Inverse of :meth:`to_dict`; unknown fields raise ValueError naming them."""
        kwargs: dict[str, Any] = {}
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"StyleHEATConfig: unknown field(s) {sorted(unknown)}")
        for name, value in data.items():
            typ = _CONFIG_TYPES.get(name)
            if typ is None:
                kwargs[name] = value
                continue
            allowed = {f.name for f in dataclasses.fields(typ)}
            bad = set(value) - allowed
            if bad:
                raise ValueError(f"StyleHEATConfig.{name}: unknown field(s) {sorted(bad)}")
            kwargs[name] = typ(**{k: _tuples(v) for k, v in value.items()})
        return cls(**kwargs)


def _pca(assets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The GANSpace dict {mean, comp, std} (official ffhq_pca.pt layout) from :meth:`StyleHEAT.edit_assets`."""
    return {k: assets[f"pca_{k}"] for k in ("mean", "comp", "std")}


def _tuples(value: Any) -> Any:
    """JSON lists back to the (nested) tuples the frozen configs use."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


@dataclass
class Inversion:
    """What the product path caches per identity (batch 1 each).

    ix (1,3,256,256) HFGI reconstruction; wx (1,n_latent,style_dim); fx (1,C,64,64) after the inversion
    condition; skip32 (1,3,32,32) RGB skip below 64x64; inversion_condition (scale, shift) (1,C,64,64);
    res (1,3,256,256) = source - e4e image (needed to re-decode edited codes).
    """

    ix: torch.Tensor
    wx: torch.Tensor
    fx: torch.Tensor
    skip32: torch.Tensor
    inversion_condition: tuple[torch.Tensor, torch.Tensor]
    res: torch.Tensor


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`models.hfgi.resize` (the official bilinear ``F.interpolate``), a no-op when already that size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return hfgi.resize(x, size)


#: render qualities: name -> what it computes (the engine and the protocol advertise these sentences)
FULL = "full"
PREVIEW = "preview"
QUALITIES: dict[str, str] = {
    FULL: "every network, as the official inference: VideoWarper, warp, CalibrationNet, StyleGAN2 synthesis "
          "(stopped at the requested size when it is below the native one)",
    PREVIEW: "scrub preview: VideoWarper, warp and the StyleGAN2 synthesis stopped at the requested size; the "
             "CalibrationNet (the warp repair) is skipped, and with audio the AudioWarper sees the preview-size "
             "image instead of a full-size one",
}
#: lower bounds the tests assert for a 256^2 preview against the full 1024^2 frame downscaled (INTER_AREA) on
#: the seeded reference weights (tests/test_fast_path_full.py); the measured values are in benchmarks/README.md.
#: Seeded weights are random, so the CalibrationNet's repair is large and these bounds are loose; with the real
#: weights the skipped repair is a small correction.
PREVIEW_MIN_PSNR_DB = 15.0
PREVIEW_MIN_SSIM = 0.1


class _StageClock:
    """``with clock("warper"): ...`` adds the block's seconds to ``timings["warper"]`` (no-op without a dict)."""

    def __init__(self, timings: dict | None, device: torch.device):
        self.timings, self.cuda = timings, device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, stage: str):
        if self.timings is None:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0


class FrameNets:
    """The per-frame networks (VideoWarper, CalibrationNet, AudioWarper) in one precision and memory layout.

    ``FrameNets.of(model)`` wraps the model's own float32 modules (no copy). ``FrameNets.build(model,
    dtype=torch.bfloat16, channels_last=True)`` makes converted copies once (the engine keeps them): every
    weight in ``dtype``, 4-D weights and activations channels_last, so the whole frame runs in bfloat16 from
    the warper input to the synthesis output (only the 64x64 grid sampling stays float32, see
    :meth:`StyleHEAT.render`). Inputs are cast once with :meth:`image` / :meth:`feature`.
    """

    def __init__(self, video_warper, calibrator, audio_warper, dtype: torch.dtype, channels_last: bool):
        self.video_warper, self.calibrator, self.audio_warper = video_warper, calibrator, audio_warper
        self.dtype, self.channels_last = dtype, bool(channels_last)

    @classmethod
    def of(cls, model: "StyleHEAT") -> "FrameNets":
        return cls(model.video_warper, model.calibrator, model.audio_warper, torch.float32, False)

    @classmethod
    def build(cls, model: "StyleHEAT", *, dtype: torch.dtype = torch.float32, channels_last: bool = False,
              device: torch.device | str | None = None) -> "FrameNets":
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        dev = torch.device(device) if device is not None else model.latent_avg.device

        def convert(m):
            if m is None:
                return None
            m = copy.deepcopy(m).to(device=dev, dtype=dtype)
            if channels_last:
                m = m.to(memory_format=torch.channels_last)
            for p in m.parameters():
                p.requires_grad_(False)
            return m.eval()

        return cls(convert(model.video_warper), convert(model.calibrator), convert(model.audio_warper), dtype,
                   channels_last)

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 256, 256) warper input in this precision / layout."""
        return self._cast(x)

    def feature(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 64, 64) feature in this precision / layout."""
        return self._cast(x)

    def weight_dtypes(self) -> set[torch.dtype]:
        mods = [m for m in (self.video_warper, self.calibrator, self.audio_warper) if m is not None]
        return {t.dtype for m in mods for t in m.parameters()}


class StyleHEAT(nn.Module):
    """The composite network. Sub-modules: generator, e4e, hfgi_aligner, hfgi_encoder, video_warper,
    calibrator, audio_warper (None unless ``config.audio``); buffer ``latent_avg`` (n_latent, style_dim);
    optional edit buffers (``edit_age``, ``edit_pose``, ``edit_pca_mean``, ``edit_pca_comp``, ``edit_pca_std``).
    """

    EDIT_BUFFERS = ("edit_age", "edit_pose", "edit_pca_mean", "edit_pca_comp", "edit_pca_std")

    def __init__(self, config: StyleHEATConfig | None = None):
        super().__init__()
        self.config = cfg = config or StyleHEATConfig()
        self.generator = Generator(cfg.generator)
        self.e4e = Encoder4Editing(cfg.e4e)
        self.hfgi_aligner = ResidualAligner(cfg.hfgi)
        self.hfgi_encoder = ResidualEncoder(cfg.hfgi)
        self.video_warper = VideoWarper(cfg.video_warper)
        self.calibrator = CalibrationNet(cfg.calibration)
        self.audio_warper = AudioWarper(cfg.audio_warper) if cfg.audio else None
        self.register_buffer("latent_avg", torch.zeros(cfg.n_latent, cfg.style_dim))
        for name in self.EDIT_BUFFERS:
            self.register_buffer(name, None)

    # ------------------------------------------------------------------ parts
    @property
    def has_audio(self) -> bool:
        return self.audio_warper is not None

    def set_latent_avg(self, latent_avg: torch.Tensor) -> None:
        """Accepts (n_latent, style_dim), (1, n_latent, style_dim), (style_dim,) or (1, style_dim)."""
        n, d = self.config.n_latent, self.config.style_dim
        t = torch.as_tensor(latent_avg, dtype=torch.float32)
        if t.shape[-1] != d or t.numel() not in (d, n * d):
            raise ValueError(f"latent_avg must have shape ({n}, {d}) or ({d},), got {tuple(t.shape)}")
        t = t.reshape(-1, d).expand(n, d)
        self.latent_avg = t.to(self.latent_avg.device).clone()

    def set_edit_assets(self, *, age=None, pose=None, pca: Mapping[str, torch.Tensor] | None = None) -> None:
        """Attach the optional edit data (InterfaceGAN directions, GANSpace PCA dict mean/comp/std)."""
        given = {"age": age, "pose": pose}
        if pca is not None:
            given.update({f"pca_{k}": pca[k] for k in ("mean", "comp", "std")})
        for name, value in given.items():
            if value is not None:
                setattr(self, f"edit_{name}",
                        torch.as_tensor(value, dtype=torch.float32).to(self.latent_avg.device).clone())

    # ------------------------------------------------------------------ inversion (official HFGI)
    def e4e_codes(self, x_256: torch.Tensor) -> torch.Tensor:
        """e4e W+ code: encoder output + latent_avg -> (B, n_latent, style_dim)."""
        return self.e4e(x_256, self.latent_avg)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Official ``HFGI.encode`` (:func:`models.hfgi.encode`): x (B,3,H,W) -> (wx, ix_256 =
        resize(clamp(G(wx))), res = x_256 - ix_256)."""
        return tuple(hfgi.encode(self.e4e, self.generator, x, self.latent_avg))

    def decode(self, wx: torch.Tensor, ix: torch.Tensor, res: torch.Tensor, output_size: int = INPUT_SIZE):
        """Official ``HFGI.decode`` (:func:`models.hfgi.decode`) -> (ix_out, wx, fx, inversion_condition)."""
        return self._official_tuple(hfgi.decode(self.hfgi_aligner, self.hfgi_encoder, self.generator,
                                                wx, ix, res, output_size))

    @staticmethod
    def _official_tuple(inv: hfgi.Inversion):
        """models.hfgi's named result -> the official ``(ix, wx, fx, inversion_condition)`` order."""
        return inv.ix_256, inv.wx, inv.fx, tuple(inv.inversion_condition)

    def inverse(self, x: torch.Tensor):
        """Official ``HFGI.inverse`` -> (ix, wx, fx, inversion_condition)."""
        wx, ix, res = self.encode(x)
        return self.decode(wx, ix, res)

    def available_attributes(self) -> dict[str, tuple[float, float]]:
        """{attribute: (min, max)} of the product edits whose data is attached (see ATTRIBUTES)."""
        have = self.edit_assets()
        return {name: (lo, hi) for name, (asset, lo, hi) in ATTRIBUTES.items() if asset in have}

    def edit_wplus(self, wx: torch.Tensor, strengths: Mapping[str, float | torch.Tensor]) -> torch.Tensor:
        """Product attribute edits of W+ codes wx (B, n_latent, style_dim); 0 = no edit, continuous.

        ``age`` / ``pose``: ``w + s * direction`` (the official InterFaceGAN edit; official 'young' is
        age -5, 'old' age +5). ``beard`` / ``lip``: move the layer-0 GANSpace coordinate BY ``s`` on the
        official layers, i.e. ``models.editing.ganspace_edit`` with target ``c + s`` where ``c`` is the
        code's own coordinate (the official edit sets it TO the strength: lip 20, beard -20).
        Applied in the order age, pose, beard, lip. ``s`` is a float or a (B,) tensor.
        """
        assets = self.edit_assets()
        unknown = set(strengths) - set(ATTRIBUTES)
        if unknown:
            raise ValueError(f"unknown attribute(s) {sorted(unknown)}; known: {sorted(ATTRIBUTES)}")
        w = wx
        for name in ATTRIBUTES:
            if name not in strengths:
                continue
            asset = ATTRIBUTES[name][0]
            if asset not in assets:
                raise ValueError(f"attribute {name!r} needs edit data that is not loaded ({_ASSET_FILES[asset]})")
            s = editing.per_sample_strength(strengths[name], w)
            if name in ("age", "pose"):
                w = editing.interfacegan_edit(w, assets[name], s)
            else:
                pca = _pca(assets)
                direction = editing.GANSPACE_DIRECTIONS[name]
                w = editing.ganspace_edit(w, pca, direction,
                                          editing.ganspace_coordinate(w, pca, direction.index) + s)
        return w

    def edit_assets(self) -> dict[str, torch.Tensor]:
        """The attached edit buffers that are present, by short name (age, pose, pca_mean, ...)."""
        out = {}
        for name in self.EDIT_BUFFERS:
            t = getattr(self, name)
            if t is not None:
                out[name[len("edit_"):]] = t
        return out

    def official_edit(self, wx: torch.Tensor, res: torch.Tensor, choice: str, factor: float):
        """Official ``HFGI.edit(x=None, factor, choice, wx=, res=)`` (models.editing semantics: GANSpace
        strengths are target coordinates): the edited code decoded with the ORIGINAL residual.

        Returns (ix_edit (B,3,256,256), wx_edit, fx_edit, inversion_condition).
        """
        a = self.edit_assets()
        pca = _pca(a) if "pca_mean" in a else None
        return self._official_tuple(editing.hfgi_edit(self.generator, self.hfgi_aligner, self.hfgi_encoder, wx,
                                                      res, choice, factor, age_direction=a.get("age"),
                                                      pose_direction=a.get("pose"), pca=pca))

    # ------------------------------------------------------------------ official forward
    def official_forward(self, input_image: torch.Tensor, driven_3dmm: torch.Tensor,
                         driven_audio: torch.Tensor | None = None, inv_data=None, imsize: int = 512) -> dict:
        """The official ``StyleHEAT.forward``, every pass included (reference README quirks 6, 15).

        input_image (B,3,H,W) (only used when inv_data is None), driven_3dmm (B,73,27), driven_audio
        (B,80,32) when the AudioWarper exists. inv_data = (ix, wx, fx, inversion_condition) batch B.
        Returns dict(fake_image, video_warp_image, audio_warp_image (None without audio), fx_warp,
        plus the intermediates flow_field, descriptor, deformations, refining_condition, audio_flow_field).
        """
        if inv_data is None:
            ix, wx, fx, inversion_condition = self.inverse(input_image)
        else:
            ix, wx, fx, inversion_condition = inv_data
        video = self.video_warper(ix, driven_3dmm)
        descriptor = video["descriptor"]
        video_def = flow.flow_to_deformation(video["flow_field"])
        warping = [video_def]
        fx_warp = flow.warp(fx, video_def)
        video_img, _ = self.generator(wx, warping_condition=warping, inversion_condition=inversion_condition)
        video_img = resize(video_img, imsize)
        audio_img, audio_flow = None, None
        if self.audio_warper is not None:
            if driven_audio is None:
                raise ValueError("official_forward: this model has an AudioWarper (enable_audio); pass driven_audio")
            audio_in = resize(video_img, INPUT_SIZE)
            audio_flow = self.audio_warper(audio_in, driven_audio)["flow_field"]
            raw_audio_flow = audio_flow.clone()
            zero_upper_flow_(audio_flow)
            audio_def = flow.flow_to_deformation(audio_flow)
            warping.append(audio_def)
            fx_warp = flow.warp(fx_warp, audio_def)
            audio_img, _ = self.generator(wx, warping_condition=warping, inversion_condition=inversion_condition)
            audio_img = resize(audio_img, imsize)
            audio_flow = raw_audio_flow
        refining = self.calibrator(fx_warp, descriptor)
        fake, _ = self.generator(wx, f_condition=fx, refining_condition=refining, warping_condition=warping,
                                 inversion_condition=inversion_condition)
        fake = resize(fake, imsize)
        return {"fake_image": fake, "audio_warp_image": audio_img, "video_warp_image": video_img,
                "fx_warp": fx_warp, "flow_field": video["flow_field"], "descriptor": descriptor,
                "warp_image": video["warp_image"], "deformations": warping, "refining_condition": refining,
                "audio_flow_field": audio_flow}

    # ------------------------------------------------------------------ product path
    def prepare(self, x: torch.Tensor) -> Inversion:
        """Invert one portrait x (1,3,H,W) in [-1,1] once (e4e + HFGI) and cache the per-identity state."""
        if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
            raise ValueError(f"prepare: expected one image of shape (1, 3, H, W), got {tuple(x.shape)}")
        wx, ix_e4e, res = self.encode(x)
        return self.prepare_from_codes(wx, ix_e4e, res)

    def prepare_from_codes(self, wx: torch.Tensor, ix_e4e: torch.Tensor, res: torch.Tensor) -> Inversion:
        """HFGI decode of a (possibly edited) code with a residual, split at 64x64 for the render path."""
        condition = tuple(hfgi.inversion_condition(self.hfgi_aligner, self.hfgi_encoder, ix_e4e, res))
        fx, skip32 = self.generator.synthesize_to_64(wx, condition)
        image = self.generator.synthesize_from_64(fx, skip32, wx)
        ix = resize(image.clamp(-1.0, 1.0), INPUT_SIZE)
        return Inversion(ix=ix, wx=wx, fx=fx, skip32=skip32, inversion_condition=condition, res=res)

    def prepare_edit(self, base: Inversion, strengths: Mapping[str, float]) -> Inversion:
        """Inversion of the edited identity (official HFGI.edit with the base residual)."""
        wx_edit = self.edit_wplus(base.wx, strengths)
        return self.prepare_from_codes(wx_edit, hfgi.reconstruct(self.generator, wx_edit), base.res)

    def render(self, inv: Inversion | Sequence[Inversion], coeffs: torch.Tensor, mel: torch.Tensor | None = None,
               out_size: int | None = None, synthesize: Callable | None = None, *, quality: str = FULL,
               nets: "FrameNets | None" = None, timings: dict | None = None) -> torch.Tensor:
        """Frames for a batch of driving windows: coeffs (B,73,27), mel (B,80,32) or None.

        ``inv``: one Inversion for all frames, or a sequence of B (per-frame edited identities).
        Returns (B, 3, out_size, out_size) float32, not clamped. One generator pass per frame without audio
        (two with audio at ``quality="full"``: the AudioWarper's input image is a full pass, as in the
        official code).
        ``synthesize(feat64, skip32, wx, out_size) -> image``: the 64 -> image synthesis to use (default
        :meth:`Generator.synthesize_from_64`; the engine passes the per-identity folded fast path, which
        is only valid when every frame of the batch shares one W+ code).
        ``quality``: :data:`FULL` or :data:`PREVIEW` (see :data:`QUALITIES`: the preview skips the
        CalibrationNet and, with audio, feeds the AudioWarper the ``out_size`` synthesis instead of a full one).
        ``nets``: the per-frame networks in another precision / layout (:class:`FrameNets`, e.g. bfloat16
        channels_last); default: this module's own float32 ones.
        ``timings``: a dict that gets the seconds spent per stage added (warper, warp, calibration, synthesis;
        CUDA is synchronised at each stage boundary, so only pass it when measuring).
        """
        if quality not in QUALITIES:
            raise ValueError(f"quality must be one of {sorted(QUALITIES)}, got {quality!r}")
        if synthesize is None:
            synthesize = self._synthesize_reference
        nets = nets or FrameNets.of(self)
        size = out_size or self.config.size
        clock = _StageClock(timings, coeffs.device)
        b = coeffs.shape[0]
        ix, wx, fx, skip32 = self._batched(inv, b)
        with clock("warper"):
            video = nets.video_warper(nets.image(ix), coeffs.to(nets.dtype), with_warp_image=False)
        with clock("warp"):
            # grid_sample stays float32 whatever the precision: on CPU its bfloat16 kernel misreads
            # channels_last input, and a bfloat16 grid moves samples by up to 1/4 of a 64-grid pixel
            deformation = flow.flow_to_deformation(video["flow_field"].float())
            fx_warp = flow.warp(fx, deformation)
        if mel is not None:
            if nets.audio_warper is None:
                raise ValueError("render: audio given but this model has no AudioWarper weights")
            with clock("synthesis"):
                first = synthesize(nets.feature(fx_warp), skip32, wx, self.config.size if quality == FULL else size)
            with clock("warper"):
                audio_flow = nets.audio_warper(nets.image(resize(first.float(), INPUT_SIZE)), mel.to(nets.dtype),
                                               with_warp_image=False)["flow_field"].float()
            with clock("warp"):
                zero_upper_flow_(audio_flow)
                fx_warp = flow.warp(fx_warp, flow.flow_to_deformation(audio_flow))
        feat = nets.feature(fx_warp)
        if quality == FULL:
            with clock("calibration"):
                refining = nets.calibrator(feat, video["descriptor"], last_only=True)
                feat = feat * (1 + refining[6]) + refining[7]
        with clock("synthesis"):
            return synthesize(feat, skip32, wx, size).float()

    def _synthesize_reference(self, feat, skip32, wx, out_size):
        return self.generator.synthesize_from_64(feat, skip32, wx, out_size=out_size)

    @staticmethod
    def _batched(inv: Inversion | Sequence[Inversion], b: int):
        if isinstance(inv, Inversion):
            return (inv.ix.expand(b, -1, -1, -1), inv.wx.expand(b, -1, -1), inv.fx.expand(b, -1, -1, -1),
                    inv.skip32.expand(b, -1, -1, -1))
        invs = list(inv)
        if len(invs) != b:
            raise ValueError(f"render: {len(invs)} inversions for {b} frames")
        if all(i is invs[0] for i in invs):
            return StyleHEAT._batched(invs[0], b)
        return (torch.cat([i.ix for i in invs]), torch.cat([i.wx for i in invs]),
                torch.cat([i.fx for i in invs]), torch.cat([i.skip32 for i in invs]))
