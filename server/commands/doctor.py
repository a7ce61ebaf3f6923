"""`styleheat doctor`: check the checkpoint directory before running inference.

For every file of every asset in :mod:`server.checkpoints.assets` it says whether the file is present,
whether it loads safely (``torch.load(weights_only=True)``: tensors and plain containers only,
never code; ``scipy.io.loadmat`` for the BFM ``.mat``), and whether its contents have the layout
the loaders expect:

* when :func:`models.weights.expected_layout` exists (our own model definitions), every part's
  keys and tensor shapes are compared with it;
* otherwise (or for assets it does not describe) the network-independent checks of the
  registry apply: the top-level parts the official loaders read, a few key prefixes, tensor
  sizes.

Exit status 0 only when every file is present and valid.
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

NAME = "doctor"
HELP = "check that the downloaded weights are present, load safely and have the expected layout"
DESCRIPTION = (
    "Check the checkpoint directory: which files are present or missing, whether each loads "
    "safely (torch.load with weights_only=True: no code is run) and whether its contents have "
    "the layout the StyleHEAT loaders expect. Exit status 0 only when everything is present and "
    "valid. Directory: --dir, else $STYLEHEAT_CHECKPOINTS, else the per-user cache."
)

LayoutFn = Callable[[str], Mapping[str, Mapping[str, Any]]]
AUTO = object()  # check_dir(layouts=AUTO): use models.weights.expected_layout if it can

MAX_LISTED = 4  # how many key names a problem line shows


class CheckFailed(Exception):
    """A file failed a check; ``status`` is 'unreadable', 'refused' or 'wrong'."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class FileReport:
    path: str
    status: str                    # ok | missing | unreadable | refused | wrong
    detail: str = ""
    checked_against: str = ""      # "model definitions" | "basic structure" | ""


@dataclass
class AssetReport:
    asset: Any
    files: list[FileReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.status == "ok" for f in self.files)


# --------------------------------------------------------------------------- loading

def load_torch(path: Path) -> Any:
    """The loader's own ``models.weights.torch_load`` (weights_only=True); raises ``CheckFailed``."""
    import pickle

    from models.weights import torch_load

    try:
        return torch_load(path)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Weights only load failed" in text and "Unsupported operand" not in text:
            m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            what = f" ({m.group(1)})" if m else ""
            raise CheckFailed("refused", "refused: the file holds Python objects" + what +
                              " that would run code when loaded, not just weights") from None
        why = "invalid data in the pickle stream" if "Unsupported operand" in text else _short(err)
        raise CheckFailed("unreadable", f"cannot be read: the file is damaged or not a PyTorch checkpoint ({why})") from None
    except MemoryError:
        raise CheckFailed("unreadable", "cannot be read: not enough memory to load it") from None
    except Exception as err:  # RuntimeError (zip reader), EOFError, IndexError, ... on damaged files
        raise CheckFailed("unreadable", "cannot be read: the file is damaged or incomplete, or not a "
                          f"PyTorch checkpoint ({_short(err)})") from None


def load_mat(path: Path) -> dict:
    try:
        import scipy.io

        return scipy.io.loadmat(str(path))
    except Exception as err:  # ValueError, MatReadError, NotImplementedError (v7.3), ...
        raise CheckFailed("unreadable", "cannot be read: damaged or not a MATLAB v5 .mat file "
                          f"({_short(err)})") from None


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = text.split(". This is an internal")[0]
    return text if len(text) <= 120 else text[:117] + "..."


# --------------------------------------------------------------------------- layout checks

def _is_tensor(x) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _names(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f" and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else "")


def _get_part(obj: Any, part: str, kind: str) -> Any:
    """The top-level entry ``part`` of a loaded checkpoint (``""``: the object itself)."""
    if part == "":
        value = obj
    else:
        if not isinstance(obj, Mapping):
            raise CheckFailed("wrong", f"wrong layout: expected a dictionary with '{part}', found a "
                              f"{type(obj).__name__}")
        if part not in obj:
            found = _names(str(k) for k in obj.keys()) or "nothing"
            raise CheckFailed("wrong", f"wrong layout: no '{part}' entry (found: {found})")
        value = obj[part]
    where = f"'{part}'" if part else "the file"
    if kind == "tensor":
        if not _is_tensor(value):
            raise CheckFailed("wrong", f"wrong layout: {where} should be a tensor, found a {type(value).__name__}")
        return value
    if not isinstance(value, Mapping):
        raise CheckFailed("wrong", f"wrong layout: {where} should be a state dict, found a {type(value).__name__}")
    not_tensors = [str(k) for k, v in value.items() if not _is_tensor(v)]
    if not_tensors:
        raise CheckFailed("wrong", f"wrong layout: {where} has non-tensor entries: {_names(not_tensors)}")
    if not value:
        raise CheckFailed("wrong", f"wrong layout: {where} is an empty state dict")
    return value


def check_basic(obj: Any, spec) -> str:
    """Network-independent checks from the registry; returns a summary, raises ``CheckFailed``."""
    summary = []
    for part in spec.parts:
        value = _get_part(obj, part.name, part.kind)
        where = f"'{part.name}'" if part.name else "the file"
        if part.kind == "tensor":
            if part.last_dim is not None and (value.dim() == 0 or value.shape[-1] != part.last_dim):
                raise CheckFailed("wrong", f"wrong layout: {where} has shape {tuple(value.shape)}, "
                                  f"expected a last dimension of {part.last_dim}")
            summary.append(f"{part.name or 'tensor'} {tuple(value.shape)}")
        else:
            missing = [p for p in part.prefixes if not any(str(k).startswith(p) for k in value)]
            if missing:
                raise CheckFailed("wrong", f"wrong layout: {where} has no keys starting with "
                                  f"{_names(missing)} (is this the right file?)")
            summary.append(f"{part.name + ': ' if part.name else ''}{len(value)} tensors")
    return "; ".join(summary)


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in x)


@dataclass
class LayoutSource:
    """Where the expected keys and shapes come from.

    ``required(asset_name)`` -> {part: {key: shape}} (a bare-tensor part: ``{"": shape}``);
    raises ``KeyError`` for assets it does not describe. ``optional(asset_name)`` -> keys a file
    may hold besides those (same form). Keys starting with ``ignored_prefixes`` are allowed.
    """

    required: LayoutFn
    optional: LayoutFn | None = None
    ignored_prefixes: tuple[str, ...] = ()
    label: str = "model definitions"


def find_layout_source() -> LayoutSource | None:
    """Our model definitions (``models.weights.expected_layout``) when that module provides them."""
    try:
        from models import weights
    except Exception:  # not written yet, or its model imports are incomplete
        return None
    fn = getattr(weights, "expected_layout", None)
    if not callable(fn):
        return None
    opt = getattr(weights, "optional_layout", None)
    return LayoutSource(fn, opt if callable(opt) else None,
                        tuple(getattr(weights, "IGNORED_PREFIXES", ()) or ()))


def _tensor_matches(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    # a per-layer tensor may also come as one row (e.g. latent_avg (512,) for (18, 512)): the
    # loaders broadcast it
    return got == want or (len(got) >= 1 and len(want) >= 1 and got[-1] == want[-1]
                           and _numel(got) == want[-1])


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_layout(obj: Any, spec, layout: Mapping[str, Mapping[str, Any]],
                 optional: Mapping[str, Mapping[str, Any]] | None = None,
                 ignored_prefixes: tuple[str, ...] = ()) -> str:
    """Compare keys and shapes with ``layout`` (part -> key -> shape); raises ``CheckFailed``.

    Keys the file holds beyond ``layout`` must be in ``optional`` (with the right shape) or start
    with one of ``ignored_prefixes``: the loaders are strict.
    """
    optional = optional or {}
    summary = []
    for part, expected in layout.items():
        where = f"'{part}'" if part else "the file"
        declared = next((p for p in spec.parts if p.name == part), None)
        if (declared is not None and declared.kind == "tensor") or list(expected) == [""]:
            value = _get_part(obj, part, "tensor")
            want = _shape(next(iter(expected.values())))
            if not _tensor_matches(tuple(value.shape), want):
                raise CheckFailed("wrong", f"wrong shape: {where} is {tuple(value.shape)}, the model "
                                  f"expects {want}")
            summary.append(f"{part} {tuple(value.shape)}")
            continue
        value = _get_part(obj, part, "state_dict")
        missing = [k for k in expected if k not in value]
        if missing:
            raise CheckFailed("wrong", f"wrong keys: {where} lacks {len(missing)} of the "
                              f"{len(expected)} weights the model needs: {_names(missing)}")
        allowed = {**optional.get(part, {}), **expected}
        bad = [(k, tuple(v.shape), _shape(allowed[k])) for k, v in value.items()
               if k in allowed and tuple(v.shape) != _shape(allowed[k])]
        if bad:
            k, got, want = bad[0]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise CheckFailed("wrong", f"wrong shape: {where} '{k}' is {got}, the model expects {want}{more}")
        extra = [str(k) for k in value if k not in allowed and not str(k).startswith(ignored_prefixes)]
        if extra:
            raise CheckFailed("wrong", f"wrong keys: {where} has {len(extra)} weights the model does "
                              f"not know: {_names(extra)}")
        n_opt = sum(1 for k in value if k not in expected and k in allowed)
        summary.append(f"{part + ': ' if part else ''}{len(expected)} tensors match"
                       + (f" (+{n_opt} optional)" if n_opt else ""))
    return "; ".join(summary)


def _layouts_for(source: LayoutSource | None, asset, spec):
    """(required, optional) layouts of one file, or ``None`` when the source does not describe it."""
    if source is None or spec.fmt != "torch":
        return None
    for key in (asset.name, spec.path):
        try:
            layout = source.required(key)
        except (KeyError, LookupError, NotImplementedError):
            continue
        if not layout:
            continue
        optional = {}
        if source.optional is not None:
            try:
                optional = source.optional(key) or {}
            except (KeyError, LookupError, NotImplementedError):
                optional = {}
        return layout, optional
    return None


def check_file(asset, spec, root: Path, layouts: LayoutSource | None,
               manifest_entry: Mapping | None = None) -> FileReport:
    path = Path(root) / spec.path
    if not path.is_file():
        return FileReport(spec.path, "missing", "missing")
    size = path.stat().st_size
    if size == 0:
        return FileReport(spec.path, "unreadable", "cannot be read: the file is empty")
    recorded = (manifest_entry or {}).get("size")
    if not asset.archive and isinstance(recorded, int) and recorded != size:
        return FileReport(spec.path, "unreadable", f"damaged: {size} bytes, but `styleheat download` "
                          f"fetched {recorded} bytes (manifest.json); the file changed since")
    try:
        if spec.fmt == "mat":
            data = load_mat(path)
            for key, shape in spec.mat_keys.items():
                if key not in data:
                    raise CheckFailed("wrong", f"wrong layout: no variable '{key}' in the .mat file")
                got = tuple(getattr(data[key], "shape", ()))
                if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape)):
                    raise CheckFailed("wrong", f"wrong layout: '{key}' has shape {got}, expected {shape}")
            return FileReport(spec.path, "ok", ", ".join(f"{k} {tuple(data[k].shape)}" for k in spec.mat_keys),
                              "basic structure")
        obj = load_torch(path)
        basic = check_basic(obj, spec)  # top-level parts first: clearer messages for a wrong file
        try:
            found = _layouts_for(layouts, asset, spec)
        except Exception as err:  # the model definitions failed to build: fall back, say so
            return FileReport(spec.path, "ok", f"{basic} (model layout unavailable: {_short(err)})",
                              "basic structure")
        if found is None:
            return FileReport(spec.path, "ok", basic, "basic structure")
        try:
            detail = check_layout(obj, spec, found[0], found[1], layouts.ignored_prefixes)
        except CheckFailed as err:
            return FileReport(spec.path, err.status, str(err), layouts.label)
        return FileReport(spec.path, "ok", detail, layouts.label)
    except CheckFailed as err:
        return FileReport(spec.path, err.status, str(err))


def check_dir(root: Path, assets=None, layouts: Any = AUTO,
              manifest: Mapping[str, Any] | None = None) -> list[AssetReport]:
    """Check every file of ``assets`` (default: the official registry) under ``root``.

    ``layouts``: a :class:`LayoutSource`, ``None`` for the basic checks only, or ``AUTO`` for
    :func:`find_layout_source`. ``manifest``: the ``assets`` entries of ``root``'s manifest.json
    when the caller has read it already (default: read here).
    """
    from server.checkpoints.assets import OFFICIAL_ASSETS

    from server.checkpoints.download import read_manifest

    assets = OFFICIAL_ASSETS if assets is None else assets
    if layouts is AUTO:
        layouts = find_layout_source()
    if manifest is None:
        manifest = read_manifest(Path(root))["assets"] if Path(root).is_dir() else {}
    reports = []
    for asset in assets:
        rep = AssetReport(asset)
        entry = manifest.get(asset.name)
        for spec in asset.files:
            rep.files.append(check_file(asset, spec, Path(root), layouts,
                                        entry if isinstance(entry, Mapping) else None))
        reports.append(rep)
    return reports


# --------------------------------------------------------------------------- command

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", metavar="DIR", default=None,
                        help="checkpoint directory (default: $STYLEHEAT_CHECKPOINTS or the user cache)")


def report_evaluation_weights(root: Path) -> None:
    """Optional weights of `styleheat evaluate` in <root>/evaluation (never changes the exit status)."""
    from server.commands.evaluate import NEEDS, WEIGHT_OPTIONS
    from server.evaluation.networks import WeightsFileError, load_weights_file

    print(f"Optional evaluation weights ({root / 'evaluation'}; docs/evaluation.md):")
    for metric, names in NEEDS.items():
        for name in names:
            path = root / "evaluation" / WEIGHT_OPTIONS[name][1]
            if not path.is_file():
                print(f"  {'absent':8s} {metric:13s} evaluation/{path.name}")
                continue
            try:
                n = len(load_weights_file(path, name))
                print(f"  {'OK':8s} {metric:13s} evaluation/{path.name} -- {n} tensors")
            except WeightsFileError as e:
                print(f"  {'DAMAGED':8s} {metric:13s} evaluation/{path.name} -- {e}")


_LABEL = {"ok": "OK", "missing": "MISSING", "unreadable": "DAMAGED", "refused": "UNSAFE", "wrong": "WRONG"}


def run(args: argparse.Namespace) -> int:
    from server.checkpoints.download import read_manifest
    from server.checkpoints.paths import resolve_checkpoint_dir
    from models.weights import official_folder

    root, origin = resolve_checkpoint_dir(args.dir)
    folder = official_folder(root)
    if folder != root:  # an official checkout: the loaders read its checkpoints/ folder
        root, origin = folder, origin + ", its checkpoints/ folder"
    print(f"Checkpoint directory: {root} ({origin})")
    if root.exists() and not root.is_dir():
        print(f"  {root} is a file, not a directory.")
        print("What to do next: pass the checkpoint folder with --dir, or set STYLEHEAT_CHECKPOINTS.")
        return 1
    manifest = read_manifest(root)["assets"] if root.is_dir() else {}
    reports = check_dir(root, layouts=find_layout_source(), manifest=manifest)

    for rep in reports:
        for f in rep.files:
            line = f"  {_LABEL[f.status]:8s} {rep.asset.name:13s} {f.path}"
            if f.status != "missing":
                line += f" -- {f.detail}"
            print(line)
    against = {f.checked_against for r in reports for f in r.files if f.checked_against}
    if against:
        print("Layout checked against: " + (
            "our model definitions (keys and shapes) where they describe the file, basic structure "
            "(top-level parts, key prefixes, tensor sizes) elsewhere" if "model definitions" in against
            else "basic structure only (top-level parts, key prefixes, tensor sizes)"))

    report_evaluation_weights(root)
    bad = [r for r in reports if not r.ok]
    if not bad:
        print(f"All {len(reports)} assets are present and valid.")
        print("What to do next: nothing -- the weights are ready for inference.")
        return 0
    missing = [r.asset.name for r in bad if all(f.status == "missing" for f in r.files)]
    broken = [r.asset.name for r in bad if r.asset.name not in missing]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({', '.join(missing)})")
    if broken:
        parts.append(f"{len(broken)} damaged or wrong ({', '.join(broken)})")
    print(f"Problems: {len(bad)} of {len(reports)} assets need attention: " + "; ".join(parts) + ".")
    steps = []
    if missing and len(missing) == len(reports):
        steps.append(f"`styleheat download --dir {root}` to fetch all weights (about 3 GB)")
    elif missing:
        steps.append(f"`styleheat download --dir {root} --only {' '.join(missing)}`")
    if broken:
        steps.append(f"`styleheat download --dir {root} --only {' '.join(broken)} --force` to replace "
                     "the bad files")
        foreign = [n for n in broken if n not in manifest]
        if foreign:
            steps[-1] += (f" ({', '.join(foreign)} not fetched by styleheat download: if you copied "
                          "them in by hand, check where they came from)")
    print("What to do next: run " + ", then ".join(steps) + f", then `styleheat doctor --dir {root}` again.")
    return 1
