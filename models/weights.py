"""Official checkpoints -> our modules, and our safetensors bundle.

This is the ONLY module that knows the official file names, top-level keys and key prefixes, and the
one module of ``models/`` that reads files: the loader/converter sits here, below ``server/`` and
``training/`` (both load weights), so those layers import downwards only.
Each of our modules' own state-dict keys equal the official keys with the file / prefix stripped
(the table below), so mapping is prefix bookkeeping:

=================  ==============================================  =========================================
our part           primary source                                  alternative (``StyleHEAT_visual.pt``)
=================  ==============================================  =========================================
generator          ``StyleGAN_e4e.pth`` (the file is the dict)     ``net_G_ema`` keys ``generator.stylegan.*``
e4e                ``Encoder_e4e.pth['encoder']``                  ``generator.e4e_encoder.encoder.*``
hfgi_aligner       ``hfgi.pth['aligner']``                         ``generator.hfgi_aligner.*``
hfgi_encoder       ``hfgi.pth['encoder']``                         ``generator.hfgi_encoder.*``
video_warper       ``StyleHEAT_visual.pt['net_G_ema']`` ``video_warper.*``
calibrator         ``net_G_ema`` ``calibrator.*``
audio_warper       ``net_G_ema`` ``audio_warper.*`` (optional: all or none)
latent_avg         ``Encoder_e4e.pth['latent_avg']`` (a tensor, (18, 512) or (512,))
edits (optional)   ``interfacegan_directions/{age,pose}.pt``, ``ffhq_pca.pt`` (dict mean/comp/std)
=================  ==============================================  =========================================

The official loader reads the three HFGI files first, then ``net_G_ema`` with ``strict=False``, so
``generator.*`` keys in ``net_G_ema`` (present or not in the released file) override the separate files;
we do the same and report which source each part came from. ``generator.iteration_loss.*`` (the
training loss's VGG19) is ignored. Everything else is strict: any missing, unexpected or mis-shaped key
is collected and reported in ONE :class:`WeightsError` naming the key and its file.

Files are read with ``torch.load(map_location="cpu", weights_only=True)`` (memory-mapped when possible);
no code is ever loaded from a checkpoint. The bundle is a single safetensors file with the config JSON
in its metadata.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

VISUAL = "StyleHEAT_visual.pt"
HFGI = "hfgi.pth"
E4E = "Encoder_e4e.pth"
STYLEGAN = "StyleGAN_e4e.pth"
GANSPACE = "ffhq_pca.pt"
AGE = "interfacegan_directions/age.pt"
POSE = "interfacegan_directions/pose.pt"
NET = "net_G_ema"

#: our part -> (file, top-level key ("" = the file itself), key prefix inside it)
PRIMARY: dict[str, tuple[str, str, str]] = {
    "generator": (STYLEGAN, "", ""),
    "e4e": (E4E, "encoder", ""),
    "hfgi_aligner": (HFGI, "aligner", ""),
    "hfgi_encoder": (HFGI, "encoder", ""),
    "video_warper": (VISUAL, NET, "video_warper."),
    "calibrator": (VISUAL, NET, "calibrator."),
    "audio_warper": (VISUAL, NET, "audio_warper."),
}
#: HFGI parts that ``net_G_ema`` may also hold (and then override), by prefix
GENERATOR_OVERRIDES: dict[str, str] = {
    "generator": "generator.stylegan.",
    "e4e": "generator.e4e_encoder.encoder.",
    "hfgi_aligner": "generator.hfgi_aligner.",
    "hfgi_encoder": "generator.hfgi_encoder.",
}
#: ``net_G_ema`` keys that are part of the official module but never used by inference
IGNORED_PREFIXES: tuple[str, ...] = ("generator.iteration_loss.",)
MODULE_PARTS = tuple(PRIMARY)
#: asset name (server.checkpoints.assets) -> file
ASSET_FILES = {"styleheat": VISUAL, "hfgi": HFGI, "e4e": E4E, "stylegan": STYLEGAN}

BUNDLE_FORMAT = "styleheat-bundle"
BUNDLE_VERSION = 1


class WeightsError(ValueError):
    """Checkpoint files do not match the model; the message lists every problem with its file."""


@dataclass
class LoadReport:
    """Where each part came from, and what was ignored / optional."""

    directory: str
    sources: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    audio: bool = False
    edits: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{part:<13s} <- {src}" for part, src in self.sources.items()]
        return out + self.notes


# ---------------------------------------------------------------------------- layouts
def _config(config=None):
    from models.styleheat import StyleHEATConfig

    return config if config is not None else StyleHEATConfig()


def module_layouts(config=None, *, audio: bool = True) -> dict[str, dict[str, tuple[int, ...]]]:
    """{our part: {key: shape}} of every module, built on the meta device (no memory used)."""
    import dataclasses

    cached = _module_layouts(dataclasses.replace(_config(config), audio=audio))
    return {part: dict(keys) for part, keys in cached.items()}


@functools.lru_cache(maxsize=4)
def _module_layouts(cfg) -> dict[str, dict[str, tuple[int, ...]]]:
    from models.styleheat import StyleHEAT

    with torch.device("meta"):
        model = StyleHEAT(cfg)
    out = {}
    for part in MODULE_PARTS:
        module = getattr(model, part)
        if module is None:
            continue
        out[part] = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    return out


def _prefixed(layout: Mapping[str, tuple], prefix: str) -> dict[str, tuple]:
    return {prefix + k: v for k, v in layout.items()}


def expected_layout(asset_name: str, config=None) -> dict[str, dict[str, tuple[int, ...]]]:
    """Required content of an official checkpoint file: {top-level part: {key: shape}}.

    ``asset_name``: ``styleheat`` / ``hfgi`` / ``e4e`` / ``stylegan`` (server.checkpoints.assets names) or the file
    name. A bare-tensor part is given as ``{"": shape}``. For ``styleheat`` only the required
    ``video_warper.*`` / ``calibrator.*`` keys are listed; see :func:`optional_layout` for the rest.
    Shapes come from our model definitions (meta device), full size unless ``config`` says otherwise.
    """
    name = _asset_file(asset_name)
    cfg = _config(config)
    layouts = module_layouts(cfg, audio=False)
    if name == VISUAL:
        return {NET: {**_prefixed(layouts["video_warper"], "video_warper."),
                      **_prefixed(layouts["calibrator"], "calibrator.")}}
    if name == HFGI:
        return {"aligner": dict(layouts["hfgi_aligner"]), "encoder": dict(layouts["hfgi_encoder"])}
    if name == E4E:
        return {"encoder": dict(layouts["e4e"]), "latent_avg": {"": (cfg.n_latent, cfg.style_dim)}}
    return {"": dict(layouts["generator"])}


def optional_layout(asset_name: str, config=None) -> dict[str, dict[str, tuple[int, ...]]]:
    """Keys a file MAY hold besides :func:`expected_layout`'s (``styleheat``: the AudioWarper and the
    ``generator.*`` copies of the HFGI files; others: nothing). ``IGNORED_PREFIXES`` are also allowed."""
    if _asset_file(asset_name) != VISUAL:
        return {}
    layouts = module_layouts(config, audio=True)
    keys: dict[str, tuple] = {}
    for part, prefix in GENERATOR_OVERRIDES.items():
        keys.update(_prefixed(layouts[part], prefix))
    keys.update(_prefixed(layouts["audio_warper"], "audio_warper."))
    return {NET: keys}


def _asset_file(asset_name: str) -> str:
    key = asset_name.strip()
    if key.lower() in ASSET_FILES:
        return ASSET_FILES[key.lower()]
    base = key.rsplit("/", 1)[-1]
    for f in ASSET_FILES.values():
        if base.lower() == f.lower():
            return f
    raise KeyError(f"no layout for asset {asset_name!r}; known: {sorted(ASSET_FILES)} "
                   f"(or their file names {sorted(ASSET_FILES.values())})")


# ---------------------------------------------------------------------------- reading files
def official_folder(directory: str | os.PathLike) -> Path:
    """``directory``, or its ``checkpoints/`` subfolder when only that holds the files (an official
    checkout); ``styleheat doctor`` looks in the same place."""
    d = Path(directory).expanduser()
    if not (d / VISUAL).exists() and (d / "checkpoints" / VISUAL).exists():
        return d / "checkpoints"
    return d


def resolve_directory(directory: str | os.PathLike) -> Path:
    """The folder holding the official files (:func:`official_folder`); WeightsError if there is none."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise WeightsError(f"checkpoint directory {d} does not exist; download the weights with "
                           f"'styleheat download' or pass the folder holding {VISUAL}")
    return official_folder(d)


def safe_globals() -> list:
    """Classes a checkpoint may hold besides tensors and containers (rebuilding them runs no code):
    training scripts sometimes store their options as an ``argparse.Namespace``."""
    import argparse

    return [argparse.Namespace]


def torch_load(path: Path) -> Any:
    """torch.load with weights_only=True on CPU (plus :func:`safe_globals`), memory-mapped when the file
    is in the zip format (keeps multi-GB checkpoints out of RAM). ``styleheat doctor`` uses it too, so
    its verdict is what loading will do."""
    import zipfile

    with torch.serialization.safe_globals(safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, msg: str) -> None:
        self.items.append(msg)

    def check(self, expected: Mapping[str, tuple], got: Mapping[str, Any], where: str,
              *, allow_missing: bool = False) -> None:
        """Compare a state dict with {key: shape}; record missing / unexpected / mis-shaped keys."""
        if not allow_missing:
            for k in expected:
                if k not in got:
                    self.add(f"missing key {k!r} in {where} (expected shape {list(expected[k])})")
        for k, v in got.items():
            if k not in expected:
                self.add(f"unexpected key {k!r} in {where}")
            elif not isinstance(v, torch.Tensor):
                self.add(f"key {k!r} in {where} is a {type(v).__name__}, expected a tensor")
            elif tuple(v.shape) != tuple(expected[k]):
                self.add(f"key {k!r} in {where} has shape {list(v.shape)}, expected {list(expected[k])}")

    def raise_if_any(self, directory: Path | str) -> None:
        if self.items:
            head = (f"the checkpoints in {directory} do not match the StyleHEAT model "
                    f"({len(self.items)} problem{'s' if len(self.items) != 1 else ''}):")
            tail = ("Re-download the affected files ('styleheat download'), or check that they are the "
                    "official StyleHEAT release files.")
            raise WeightsError("\n".join([head] + [f"  - {p}" for p in self.items] + [tail]))


def _part_of(obj: Any, file: str, part: str, problems: _Problems) -> Any:
    if part == "":
        return obj
    if not isinstance(obj, Mapping):
        problems.add(f"{file}: expected a dict with key {part!r}, found a {type(obj).__name__}")
        return None
    if part not in obj:
        problems.add(f"{file}: missing top-level key {part!r} (found {sorted(map(str, obj))[:8]})")
        return None
    return obj[part]


def _as_state_dict(obj: Any, where: str, problems: _Problems) -> dict[str, Any] | None:
    if obj is None:
        return None
    if not isinstance(obj, Mapping):
        problems.add(f"{where}: expected a state dict (key -> tensor), found a {type(obj).__name__}")
        return None
    return dict(obj)


@dataclass
class OfficialState:
    """Validated official weights mapped to our parts (tensors may be memory-mapped)."""

    parts: dict[str, dict[str, torch.Tensor]]
    latent_avg: torch.Tensor
    edits: dict[str, Any]
    report: LoadReport


def split_net_g_ema(net: Mapping[str, Any], where: str, problems: _Problems) -> dict[str, dict[str, Any]]:
    """Split ``net_G_ema`` by prefix into {our part: stripped dict}; unknown keys become problems."""
    prefixes = {part: PRIMARY[part][2] for part in ("video_warper", "calibrator", "audio_warper")}
    prefixes.update(GENERATOR_OVERRIDES)
    groups: dict[str, dict[str, Any]] = {p: {} for p in prefixes}
    for key, value in net.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        for part, prefix in prefixes.items():
            if key.startswith(prefix):
                groups[part][key[len(prefix):]] = value
                break
        else:
            problems.add(f"unexpected key {key!r} in {where}")
    return groups


def map_official(get: Callable[[str], Any], exists: Callable[[str], bool], config=None, *,
                 directory: str = "", want_edits: bool = True) -> OfficialState:
    """Map official files to our parts and validate everything, collecting all problems.

    ``get(file)`` returns the loaded object of a file (relative name as in this module; it is called
    once per part, so it should cache), ``exists(file)`` says whether it is there. Raises WeightsError
    listing every problem.
    """
    cfg = _config(config)
    layouts = module_layouts(cfg, audio=True)
    problems = _Problems()
    report = LoadReport(directory=directory)
    parts: dict[str, dict[str, Any]] = {}

    def missing_file(file: str, why: str) -> None:
        problems.add(f"missing file {file} ({why})")

    # StyleHEAT_visual.pt: warpers, calibrator, maybe generator.* and audio
    groups: dict[str, dict[str, Any]] = {}
    if exists(VISUAL):
        where = f"{VISUAL}['{NET}']"
        net = _as_state_dict(_part_of(get(VISUAL), VISUAL, NET, problems), where, problems)
        if net is not None:
            groups = split_net_g_ema(net, where, problems)
            for part in ("video_warper", "calibrator"):
                problems.check(_prefixed(layouts[part], PRIMARY[part][2]),
                               _prefixed(groups[part], PRIMARY[part][2]), where)
                parts[part] = groups[part]
                report.sources[part] = f"{where} {PRIMARY[part][2]}*"
            if groups["audio_warper"]:
                problems.check(_prefixed(layouts["audio_warper"], "audio_warper."),
                               _prefixed(groups["audio_warper"], "audio_warper."), where)
                parts["audio_warper"] = groups["audio_warper"]
                report.sources["audio_warper"] = f"{where} audio_warper.*"
                report.audio = True
            else:
                report.notes.append(f"no audio_warper.* keys in {where}: audio driving is not available")
            n_ignored = sum(1 for k in net if k.startswith(IGNORED_PREFIXES))
            if n_ignored:
                report.notes.append(f"ignored {n_ignored} training-only keys generator.iteration_loss.* in {where}")
    else:
        missing_file(VISUAL, "the StyleHEAT video warper and calibration network")

    # the HFGI files, overridden by net_G_ema generator.* keys when present (official load order)
    for part, prefix in GENERATOR_OVERRIDES.items():
        file, top, _ = PRIMARY[part]
        override = groups.get(part, {})
        expected = layouts[part]
        if exists(file):
            where = f"{file}" + (f"['{top}']" if top else "")
            sd = _as_state_dict(_part_of(get(file), file, top, problems), where, problems)
            if sd is None:
                continue
            problems.check(expected, sd, where)
            source = where
            if override:
                problems.check(_prefixed(expected, prefix), _prefixed(override, prefix),
                               f"{VISUAL}['{NET}']", allow_missing=True)
                sd.update(override)
                source += (f", {len(override)} of {len(expected)} keys overridden by {VISUAL}['{NET}'] "
                           f"{prefix}* (official load order)")
            parts[part] = sd
            report.sources[part] = source
        elif override:
            problems.check(_prefixed(expected, prefix), _prefixed(override, prefix), f"{VISUAL}['{NET}']")
            parts[part] = override
            report.sources[part] = f"{VISUAL}['{NET}'] {prefix}* ({file} absent)"
        else:
            missing_file(file, f"{part}; {VISUAL} holds no {prefix}* keys either")

    # latent_avg (always from Encoder_e4e.pth: it is in no state dict)
    latent_avg = None
    if exists(E4E):
        t = _part_of(get(E4E), E4E, "latent_avg", problems)
        n, d = cfg.n_latent, cfg.style_dim
        if t is not None:
            if not isinstance(t, torch.Tensor):
                problems.add(f"{E4E}['latent_avg'] is a {type(t).__name__}, expected a tensor")
            elif t.dim() == 0 or t.shape[-1] != d or t.numel() not in (d, n * d):
                problems.add(f"{E4E}['latent_avg'] has shape {list(t.shape)}, expected [{n}, {d}] or [{d}]")
            else:
                latent_avg = t
                report.sources["latent_avg"] = f"{E4E}['latent_avg'] {list(t.shape)}"
    elif "e4e" in parts:
        missing_file(E4E, "latent_avg, the average W+ code, is only stored there")

    edits: dict[str, Any] = {}
    if want_edits:
        edits = _read_edits(get, exists, cfg, problems, report)

    problems.raise_if_any(directory or "the given files")
    return OfficialState(parts=parts, latent_avg=latent_avg, edits=edits, report=report)


def _read_edits(get, exists, cfg, problems: _Problems, report: LoadReport) -> dict[str, Any]:
    d = cfg.style_dim
    edits: dict[str, Any] = {}
    for name, file in (("age", AGE), ("pose", POSE)):
        if not exists(file):
            continue
        t = get(file)
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[-1] != d \
                or t.numel() not in (d, cfg.n_latent * d):
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            problems.add(f"{file}: expected a tensor of shape [{d}], [1, {d}] or [{cfg.n_latent}, {d}], got {shape}")
            continue
        edits[name] = t
        report.edits.append(name)
    if exists(GANSPACE):
        pca = get(GANSPACE)
        ok = isinstance(pca, Mapping) and all(isinstance(pca.get(k), torch.Tensor) for k in ("mean", "comp", "std"))
        if not ok:
            problems.add(f"{GANSPACE}: expected a dict of tensors with keys 'mean', 'comp', 'std'")
        else:
            mean, comp, std = pca["mean"], pca["comp"], pca["std"]
            if mean.dim() == 0 or comp.dim() == 0 or mean.shape[-1] != d or comp.shape[-1] != d \
                    or comp.numel() != comp.shape[0] * d or std.numel() != comp.shape[0]:
                problems.add(f"{GANSPACE}: shapes mean {list(mean.shape)}, comp {list(comp.shape)}, "
                             f"std {list(std.shape)} do not fit (expected [..., {d}], [K, 1, {d}] or [K, {d}], [K])")
            else:
                edits["pca"] = {"mean": mean, "comp": comp, "std": std}
                report.edits.append("pca")
    if not edits:
        report.notes.append(f"no edit files ({AGE}, {POSE}, {GANSPACE}): attribute edits unavailable")
    return edits


def read_official(directory: str | os.PathLike, config=None) -> OfficialState:
    """Read and validate the official files in ``directory`` (see module docstring)."""
    d = resolve_directory(directory)
    cache: dict[str, Any] = {}

    def exists(file: str) -> bool:
        return (d / file).is_file()

    def get(file: str) -> Any:
        if file not in cache:
            try:
                cache[file] = torch_load(d / file)
            except Exception as e:  # pickle errors, truncated zips, ...
                raise WeightsError(f"{d / file} could not be read as a weights-only torch checkpoint "
                                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                   f"re-download it with 'styleheat download'") from None
        return cache[file]

    return map_official(get, exists, config, directory=str(d))


def build_model(state: OfficialState, config=None, device: str | torch.device = "cpu"):
    """A StyleHEAT module in eval mode holding ``state`` (strict loads: ``state`` is validated)."""
    import dataclasses

    from models.styleheat import StyleHEAT

    cfg = dataclasses.replace(_config(config), audio="audio_warper" in state.parts)
    with torch.device("meta"):
        model = StyleHEAT(cfg)
    for part in MODULE_PARTS:
        module = getattr(model, part)
        if module is None:
            continue
        module.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v
                                for k, v in state.parts[part].items()}, strict=True, assign=True)
    model.latent_avg = torch.zeros(cfg.n_latent, cfg.style_dim)
    model.set_latent_avg(state.latent_avg)
    edits = state.edits
    model.set_edit_assets(age=edits.get("age"), pose=edits.get("pose"), pca=edits.get("pca"))
    # assign= adopted the (possibly memory-mapped) storages; copy into ordinary memory on the device
    return _materialize(model, device).eval()


def _materialize(model, device) -> Any:
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(p.detach().to(device, copy=True), requires_grad=False))
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None:
                module._buffers[name] = b.to(device, copy=True)
    return model


def load_official(directory: str | os.PathLike, config=None, device: str | torch.device = "cpu"):
    """Read, validate and load the official checkpoints -> (StyleHEAT model (eval), LoadReport)."""
    state = read_official(directory, config)
    model = build_model(state, config, device)
    return model, state.report


# ---------------------------------------------------------------------------- safetensors bundle
def save_bundle(path: str | os.PathLike, model, *, sources: Mapping[str, str] | None = None) -> Path:
    """Write the model's weights + config as one safetensors file (atomic)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": BUNDLE_FORMAT, "version": str(BUNDLE_VERSION),
            "config": json.dumps(model.config.to_dict()),
            "sources": json.dumps(dict(sources or {}))}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Read a bundle written by :func:`save_bundle` -> (StyleHEAT model (eval), metadata dict)."""
    from safetensors import safe_open

    from models.styleheat import StyleHEAT, StyleHEATConfig

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"bundle {path} not found; create one with 'styleheat convert --checkpoints DIR --out {path}'")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != BUNDLE_FORMAT:
        raise WeightsError(f"{path} is a safetensors file but not a StyleHEAT bundle (metadata format "
                           f"{meta.get('format')!r}); create one with 'styleheat convert'")
    if meta.get("version") != str(BUNDLE_VERSION):
        raise WeightsError(f"{path}: bundle version {meta.get('version')!r} is not supported (expected "
                           f"{BUNDLE_VERSION}); re-create it with 'styleheat convert'")
    try:
        config = StyleHEATConfig.from_dict(json.loads(meta["config"]))
    except Exception as e:
        raise WeightsError(f"{path}: bad config in the bundle metadata ({e})") from None
    with torch.device("meta"):
        model = StyleHEAT(config)
    for name in StyleHEAT.EDIT_BUFFERS:
        if name in tensors:
            setattr(model, name, torch.empty(tensors[name].shape, device="meta"))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = _Problems()
    problems.check(expected, tensors, str(path))
    problems.raise_if_any(path)
    model.load_state_dict(tensors, strict=True, assign=True)
    model = _materialize(model, device).eval()
    return model, {"config": config, "sources": json.loads(meta.get("sources", "{}"))}


# ---------------------------------------------------------------------------- export (tests, tools)
def official_files(model, *, generator_in_visual: bool = False) -> dict[str, Any]:
    """Our model's weights laid out as the official files: {relative file name: object to torch.save}.

    ``generator_in_visual``: also put the HFGI parts into ``net_G_ema`` under ``generator.*`` (the
    released file may or may not hold them). Edit assets are included when the model has them.
    """
    def sd(module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    net: dict[str, torch.Tensor] = {}
    for part in ("video_warper", "calibrator", "audio_warper"):
        module = getattr(model, part)
        if module is not None:
            net.update(_prefixed(sd(module), PRIMARY[part][2]))
    if generator_in_visual:
        for part, prefix in GENERATOR_OVERRIDES.items():
            net.update(_prefixed(sd(getattr(model, part)), prefix))
    files: dict[str, Any] = {
        VISUAL: {NET: net},
        HFGI: {"aligner": sd(model.hfgi_aligner), "encoder": sd(model.hfgi_encoder)},
        E4E: {"encoder": sd(model.e4e), "latent_avg": model.latent_avg.detach().cpu().clone()},
        STYLEGAN: sd(model.generator),
    }
    assets = model.edit_assets()
    if "age" in assets:
        files[AGE] = assets["age"].cpu().clone()
    if "pose" in assets:
        files[POSE] = assets["pose"].cpu().clone()
    if "pca_mean" in assets:
        files[GANSPACE] = {"mean": assets["pca_mean"].cpu().clone(), "comp": assets["pca_comp"].cpu().clone(),
                           "std": assets["pca_std"].cpu().clone()}
    return files


def write_official(directory: str | os.PathLike, model, **kwargs) -> Path:
    """torch.save :func:`official_files` under ``directory`` (tests and demos)."""
    d = Path(directory)
    for name, obj in official_files(model, **kwargs).items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, d / name)
    return d
