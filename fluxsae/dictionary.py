"""One interface for every dictionary: what steering, heatmaps, autointerp, the Hub and the app code against.

A dictionary decomposes the activations of one site into features:

    d.encode(x)                x [..., d_in] -> dense codes [..., n_features] (at most k non-zeros per token)
    d.encode_sparse(x)         -> SparseCode(values, indices), each [..., k]
    d.decode(codes)            dense codes [..., n_features] -> x_hat [..., d_in]
    d.decode_sparse(v, i)      SparseCode fields [..., k] -> x_hat [..., d_in]; never builds dense codes
    d.directions               [n_features, d_in] unit-norm feature directions in raw activation space
    d.site, d.cfg, d.n_features, d.d_in, d.mean_token_norm

`TopKSAE` (fluxsae.sae) and `ITDA` (fluxsae.itda) implement it. Each saves to one folder per site
(`cfg.json` + its weights file); `cfg.json` names the `architecture`, and `load_folder` reads any
registered kind from it. The configs share `DictionaryConfig`: the provenance every dictionary records
(the base model and site, the harvest's steps, resolution, dtype and quantisation, the mean token norm
that steering strengths are measured in) and the versioned JSON round trip.

This module is math on tensors and files: it imports nothing of the pipeline side.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor

from fluxsae.fileio import atomic_path, load_tensors
from fluxsae.version import __version__

CFG_FILE = "cfg.json"
"""Every dictionary folder holds this config; its `architecture` says which class reads the folder."""


DICTIONARY_FILES = frozenset({CFG_FILE, "sae.safetensors", "itda.safetensors", "atoms.parquet",
                              "sae_weights.safetensors", "state_dict.pth", "config.json"})  # fmt: skip
"""The files that make a site folder's dictionary, in fluxsae's format or another library's
(fluxsae.formats). A save replaces them all; the folder's other files (feature statistics) are kept."""


class DictionaryLoadError(ValueError):
    """A saved dictionary folder could not be read; the message names the file and what to do."""


class SparseCode(NamedTuple):
    """The sparse codes of a batch of tokens, for every kind of dictionary."""

    values: Tensor
    """[..., k] non-negative activations of the selected features (0 in slots left unused)."""

    indices: Tensor
    """[..., k] int64 feature indices (unordered; a slot whose value is 0 may hold any index)."""


class ForwardOutput(NamedTuple):
    """What `dictionary(x)` returns: the reconstruction, the codes and the batch's losses."""

    x_hat: Tensor
    """[..., d_in] reconstruction in raw activation space."""

    values: Tensor
    """[N, k] activations of the selected features, N = tokens in the batch."""

    indices: Tensor
    """[N, k] int64 indices of the selected features."""

    fvu: Tensor
    """Scalar fraction of variance unexplained of this batch, sum((x - x_hat)^2) / sum((x - mean(x))^2)
    (an SAE computes it in its normalised space, where it trains)."""

    aux_loss: Tensor
    """Scalar auxiliary loss (an SAE's AuxK loss; 0 for dictionaries without one)."""

    loss: Tensor | None = None
    """Scalar reconstruction loss to train on when it is not `fvu` (a Matryoshka SAE's mean FVU over its
    nested prefixes); None: train on `fvu`."""

    prefix_fvus: Tensor | None = None
    """[P] a Matryoshka SAE's FVU of each nested prefix alone, in `cfg.matryoshka` order (`loss` is the
    mean of `fvu` and these); None for other dictionaries."""


@dataclass(frozen=True, kw_only=True)
class DictionaryConfig:
    """The provenance and file version shared by every dictionary config (a `cfg.json`).

    Subclasses add their own fields and set ARCHITECTURE and FORMAT_VERSION.
    """

    ARCHITECTURE: ClassVar[str] = ""
    """The `architecture` value of this kind's cfg.json."""
    FORMAT_VERSION: ClassVar[int] = 1
    """The newest layout of this kind's files: the one written, and the newest read."""
    LABEL: ClassVar[str] = "dictionary"
    """How error messages name this kind ("SAE", "ITDA")."""

    site: str = ""
    """The site the dictionary reads, e.g. "transformer_blocks.3.image"."""

    base_model: str = ""
    """The diffusion model the activations came from: "shapes" or a Hub id."""

    base_revision: str | None = None
    """Hub revision (commit) of `base_model`, if known."""

    mean_token_norm: float = 0.0
    """Mean L2 norm of the site's raw tokens; steering strengths are in these units."""

    steps: tuple[int, ...] | None = None
    """Denoising steps the activations came from (None: not recorded)."""

    resolution: tuple[int, int] | None = None
    """(height, width) in pixels of the generations the activations came from."""

    dtype: str = "float32"
    """Activation dtype at harvest."""

    quantization: str | None = None
    """Quantisation of the base model at harvest (e.g. "nf4"), None for none."""

    format_version: int | None = None
    """Layout version of the folder's files (None: the newest, this class's FORMAT_VERSION)."""

    fluxsae_version: str = __version__
    """fluxsae version that wrote the dictionary."""

    extra: dict = field(default_factory=dict)
    """Free-form JSON-serialisable details: training or build statistics, the harvest's generation args."""

    def __post_init__(self):
        if self.format_version is None:
            object.__setattr__(self, "format_version", self.FORMAT_VERSION)
        check_field_types(self)
        if not self.mean_token_norm >= 0:
            raise ValueError(
                f"{type(self).__name__}.mean_token_norm must be a finite number >= 0 (0: not recorded), "
                f"got {self.mean_token_norm!r}"
            )
        if self.steps is not None and any(s < 0 for s in self.steps):
            raise ValueError(f"{type(self).__name__}.steps must be step indices >= 0, got {self.steps!r}")
        if self.resolution is not None and (len(self.resolution) != 2 or min(self.resolution) < 1):
            raise ValueError(
                f"{type(self).__name__}.resolution must be (height, width) in pixels, got {self.resolution!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists; `from_dict` turns them back)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def upgrade(cls, d: dict[str, Any], version: int) -> dict[str, Any]:
        """Turn the dict of an older `format_version` into the current fields (subclasses override)."""
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Inverse of `to_dict`; raises ValueError naming unknown or missing keys, another architecture
        and too-new formats."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a dictionary config must be a JSON object, got {type(d).__name__}")
        kind = d.get("architecture", cls.ARCHITECTURE)
        if kind != cls.ARCHITECTURE:
            raise ValueError(
                f"it describes a {kind!r} dictionary, not {cls.ARCHITECTURE!r} "
                "(fluxsae.load_dictionary reads either kind)"
            )
        version = d.get("format_version", cls.FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"format_version must be a positive integer, got {version!r}")
        if version > cls.FORMAT_VERSION:
            raise ValueError(
                f"format_version {version} is newer than this fluxsae ({__version__}) reads "
                f"(up to {cls.FORMAT_VERSION}); upgrade fluxsae"
            )
        d = cls.upgrade(dict(d), version)
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.LABEL} config keys {unknown}; known keys: {sorted(names)}")
        missing = sorted(f.name for f in fields if f.name not in d and (_required(f) or f.name == "site"))
        if missing:
            raise ValueError(
                f"{cls.LABEL} config lacks required keys {missing}"
                + (" (a dictionary says which site it reads, e.g. \"site\": \"transformer_blocks.3.image\")"
                   if "site" in missing else "")
            )
        return cls(**d)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        plural = {int: "integers", float: "finite numbers", str: "strings"}
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {plural.get(args[0], args[0])}"
        return f"a list of {len(args)} {plural.get(args[0], args[0])}"
    names = {int: "an integer", float: "a finite number", str: "a string", bool: "True or False",
             dict: "a JSON object", type(None): "null"}  # fmt: skip
    return names.get(hint, getattr(hint, "__name__", str(hint)))


_MISMATCH = object()


def _typed(hint, value):
    """`value` as the type `hint` names (a list for a tuple, an integral number for an int), or _MISMATCH."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            out = _typed(arg, value)
            if out is not _MISMATCH:
                return out
        return _MISMATCH
    if hint is type(None):
        return None if value is None else _MISMATCH
    if origin is Literal:
        same = any(value == a and type(value) is type(a) for a in typing.get_args(hint))
        return value if same else _MISMATCH
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _MISMATCH
        args = typing.get_args(hint)
        items = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(items) != len(value):
            return _MISMATCH
        out = tuple(_typed(h, v) for h, v in zip(items, value, strict=True))
        return _MISMATCH if any(v is _MISMATCH for v in out) else out
    if hint is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if hint is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return int(value) if ok else _MISMATCH
    if hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else _MISMATCH
    if hint is str:
        return value if isinstance(value, str) else _MISMATCH
    if hint is dict:
        return value if isinstance(value, dict) else _MISMATCH
    return value


def check_field_types(cfg) -> None:
    """Raise ValueError naming the first field of dataclass `cfg` whose value is not of its annotated type
    (an int field holding "4", a tuple field holding the string "0-7", a float field holding NaN); lists
    in tuple fields become tuples and integral numbers in int fields ints."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        hint = _hints(type(cfg))[f.name]
        typed = _typed(hint, value)
        if typed is _MISMATCH:
            raise ValueError(f"{type(cfg).__name__}.{f.name} must be {_describe(hint)}, got {value!r}")
        if typed is not value:
            object.__setattr__(cfg, f.name, typed)


def check_positive_ints(cfg, names: tuple[str, ...], low: int = 1) -> None:
    """Raise ValueError unless every field in `names` of `cfg` is an integer >= low (bools refused)."""
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{type(cfg).__name__}.{name} must be an integer >= {low}, got {value!r}")


class Dictionary(torch.nn.Module):
    """Base of every dictionary (see the module docstring). Subclasses implement `encode_sparse`,
    `decode_sparse`, `decode`, `directions`, `forward`, `save` and `load`, and register with
    `register`. Buffers and parameters live on one device in one dtype."""

    cfg: DictionaryConfig
    CONFIG: ClassVar[type[DictionaryConfig]]
    """The config class (its ARCHITECTURE is what cfg.json names)."""
    WEIGHTS_FILE: ClassVar[str]
    """The file of a site folder holding the weights ("sae.safetensors", "itda.safetensors")."""
    MAIN_TENSOR: ClassVar[str]
    """The tensor whose device and dtype are the dictionary's."""

    @property
    def site(self) -> str:
        return self.cfg.site

    @property
    def n_features(self) -> int:
        return self.cfg.n_features

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def mean_token_norm(self) -> float:
        """Mean L2 norm of the site's raw tokens (steering strengths are multiples of it)."""
        return self.cfg.mean_token_norm

    @property
    def device(self) -> torch.device:
        return getattr(self, self.MAIN_TENSOR).device

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self, self.MAIN_TENSOR).dtype

    @property
    def directions(self) -> Tensor:
        """[n_features, d_in] unit-norm feature directions in raw activation space (detached)."""
        raise NotImplementedError

    def encode_sparse(self, x: Tensor) -> SparseCode:
        """Raw activations [..., d_in] -> SparseCode(values, indices) [..., k]."""
        raise NotImplementedError

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """values, indices [..., k] -> x_hat [..., d_in] in raw space; no dense codes built."""
        raise NotImplementedError

    def decode(self, codes: Tensor) -> Tensor:
        """Dense codes [..., n_features] -> x_hat [..., d_in] in raw space."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Raw activations [..., d_in] -> dense codes [..., n_features], at most k non-zeros per token."""
        values, indices = self.encode_sparse(x)
        codes = values.new_zeros(*values.shape[:-1], self.n_features)
        if not self.n_features:
            return codes
        # scatter_add: unused slots (value 0) may repeat an index and must not overwrite a real value
        return codes.scatter_add_(-1, indices, values)

    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(encode(x)) of raw activations [..., d_in], through the sparse path."""
        return self.decode_sparse(*self.encode_sparse(x))

    def save(self, folder: str | os.PathLike) -> None:
        raise NotImplementedError

    @classmethod
    def load(
        cls, folder: str | os.PathLike, device: torch.device | str = "cpu", *, site: str | None = None
    ) -> Dictionary:
        """Read a folder written by `save`; `site`: refuse it unless it holds that site's dictionary."""
        raise NotImplementedError

    def _save_folder(self, folder: str | os.PathLike, write: Callable[[Path], None]) -> None:
        """Write this dictionary's site folder with `write(tmp)`, whole, into a temporary folder beside
        `folder` that then replaces it in one step (`fluxsae.fileio.atomic_path`): a kill or a full disk
        leaves the old folder or the new one, never a mix of the two. Files of the old folder this save
        does not write (e.g. feature_stats.safetensors) are kept. Refuses a file in the way, a folder
        holding another kind of dictionary, and a folder named after another site."""
        folder = Path(folder)
        label = self.CONFIG.LABEL
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"{folder} is a file; save the {label} into a folder (one per site)")
        cfg_path = folder / CFG_FILE
        if cfg_path.is_file():
            try:
                other = json.loads(cfg_path.read_text()).get("architecture", self.CONFIG.ARCHITECTURE)
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                other = self.CONFIG.ARCHITECTURE  # a broken file of ours: replace it
            if other != self.CONFIG.ARCHITECTURE and other in _known_architectures():
                raise FileExistsError(
                    f"{cfg_path} belongs to a {other!r} dictionary; save the {label} into a folder of its "
                    "own (one dictionary type per folder, e.g. a separate repo or root for each kind)"
                )
        named = _site_name(folder.name)
        if named is not None and self.site and named != (_site_name(self.site) or self.site):
            raise ValueError(
                f"{folder} is named after site {folder.name!r} but this {label} reads {self.site!r}; it "
                f"would not load from there. Save it to a folder named {self.site}"
            )
        with atomic_path(folder, is_dir=True, carry=lambda name: name not in DICTIONARY_FILES) as tmp:
            write(tmp)


ARCHITECTURES: dict[str, type[Dictionary]] = {}
"""Dictionary classes by the `architecture` their cfg.json names."""


def register(cls: type[Dictionary]) -> type[Dictionary]:
    """Class decorator: make `load_folder` read folders whose cfg.json names cls.CONFIG.ARCHITECTURE."""
    ARCHITECTURES[cls.CONFIG.ARCHITECTURE] = cls
    return cls


def _known_architectures() -> dict[str, type[Dictionary]]:
    import fluxsae.itda  # noqa: F401  (registers "itda")
    import fluxsae.sae  # noqa: F401  (registers "topk")

    return ARCHITECTURES


def folder_architecture(folder: str | os.PathLike) -> str:
    """The `architecture` named by folder/cfg.json (DictionaryLoadError when unreadable)."""
    return str(read_json(Path(folder) / CFG_FILE, "").get("architecture", ""))


def load_folder(
    folder: str | os.PathLike, device: torch.device | str = "cpu", *, site: str | None = None
) -> Dictionary:
    """Load the dictionary in a site folder, whatever its kind (read from its cfg.json); `site`: refuse
    it unless it holds that site's dictionary."""
    kind = folder_architecture(folder)
    classes = _known_architectures()
    if kind not in classes:
        raise DictionaryLoadError(
            f"{Path(folder) / CFG_FILE}: unknown architecture {kind!r}; this fluxsae reads "
            f"{sorted(classes)} (upgrade fluxsae if the folder is newer)"
        )
    return classes[kind].load(folder, device=device, site=site)


# -- reading files ---------------------------------------------------------------------------------


def missing_file(path: Path) -> str:
    """What is wrong when `path` is not a file: no folder, a folder where the file should be, no file
    (and where an interrupted save left the previous folder, if it did)."""
    if path.is_dir():
        return "this is a folder, not a file"
    folder = path.parent
    if not folder.is_dir():
        aside = sorted(folder.parent.glob(f".{folder.name}.old-*/{folder.name}")) if folder.name else []
        if aside:
            return (
                f"the folder does not exist, but an interrupted save left the previous one at {aside[-1]}: "
                f"move it back to {folder}, or save again"
            )
        return "the folder does not exist"
    return "the file is missing"


def read_json(path: Path, redo: str) -> dict:
    """The JSON object in `path`, or DictionaryLoadError saying what is wrong with the file."""
    if not path.is_file():
        raise DictionaryLoadError(
            f"{path}: {missing_file(path)}. A dictionary folder holds {CFG_FILE} and its weights (the "
            "dictionary's save() writes both); check the path and the site name"
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DictionaryLoadError(f"{path}: not valid JSON ({err}); {redo}") from err
    if not isinstance(raw, dict):
        raise DictionaryLoadError(f"{path}: expected a JSON object, got {type(raw).__name__}; {redo}")
    return raw


def read_config(path: Path, cls: type[DictionaryConfig], redo: str, site: str | None = None):
    """`cls.from_dict` of the JSON in `path`, every failure as a DictionaryLoadError naming the file.

    The config's site must be the folder's name when the folder is named after a site, and `site` when
    one is asked for: a folder renamed, or copied under another site's name, would otherwise load (and
    steer) the wrong block."""
    raw = read_json(path, redo)
    try:
        cfg = cls.from_dict(raw)
    except (ValueError, TypeError) as err:
        raise DictionaryLoadError(f"{path}: {err}") from err
    check_site(path, cfg.site, site)
    return cfg


def _site_name(text: str) -> str | None:
    """`text` as a canonical site string, or None if it is not one."""
    from fluxsae.sites import parse_site

    try:
        return str(parse_site(text))
    except (ValueError, TypeError):
        return None


def check_site(path: Path, recorded: str, requested: str | None = None) -> None:
    """DictionaryLoadError unless the site a dictionary's config records (`recorded`, in `path`) is the
    one asked for and the one its folder is named after (when it is named after a site)."""
    own = _site_name(recorded) or recorded
    folder = path.parent.name
    if _site_name(folder) is not None and _site_name(folder) != own:
        raise DictionaryLoadError(
            f"{path}: says site {recorded!r} but its folder is named after {folder!r}; the folder was "
            f"renamed or the files copied into another site's folder. Put them in a folder named {own} "
            "(or fix the config's site if the folder's name is right)"
        )
    if requested is not None and (_site_name(str(requested)) or str(requested)) != own:
        raise DictionaryLoadError(
            f"{path}: holds the dictionary of site {recorded!r}, not of the requested {str(requested)!r}; "
            "pass that site, or the folder that holds it"
        )


def read_tensors(
    path: Path,
    shapes: Mapping[str, tuple[int, ...]] | Callable[[int], Mapping[str, tuple[int, ...]]],
    *,
    newest: int,
    redo: str,
    said: Mapping[str, str] | None = None,
) -> tuple[dict[str, Tensor], int]:
    """The tensors of a dictionary's safetensors file, validated: exactly the names of `shapes`, each of
    that shape, floating point and finite (`shapes` may be a function of the file's format_version, for
    layouts that changed). Returns (tensors, the file's format_version). Every failure is a
    DictionaryLoadError naming the file, the problem and what to do (`redo`); `said[name]` tells where a
    tensor's expected shape comes from (e.g. "cfg.json says n_features=2048 x d_in=128")."""
    if not path.is_file():
        raise DictionaryLoadError(f"{path}: {missing_file(path)} (its {CFG_FILE} is there); {redo}")
    try:
        tensors, meta = load_tensors(path)
    except Exception as err:  # safetensors raises its own error types for torn files
        raise DictionaryLoadError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {err}; {redo}"
        ) from err
    version = meta.get("format_version", newest)
    if not isinstance(version, int):
        version = newest
    if version > newest:
        raise DictionaryLoadError(
            f"{path}: format_version {version} is newer than this fluxsae reads; upgrade fluxsae"
        )
    if callable(shapes):
        shapes = shapes(version)
    missing, unexpected = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise DictionaryLoadError(
            f"{path}: missing tensors {missing}, unexpected tensors {unexpected} (format_version "
            f"{version}); {redo}"
        )
    for name, want in shapes.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(want):
            raise DictionaryLoadError(
                f"{path}: tensor {name} has shape {list(t.shape)} but "
                f"{(said or {}).get(name) or f'{CFG_FILE} expects {list(want)}'}; the two files do not "
                f"belong together; {redo}"
            )
        if not t.is_floating_point():
            raise DictionaryLoadError(f"{path}: tensor {name} has dtype {t.dtype}, expected a float")
        bad = (~torch.isfinite(t)).sum().item()
        if bad:
            raise DictionaryLoadError(
                f"{path}: tensor {name} has {bad} NaN/inf values; the run diverged or the file is "
                f"damaged; {redo}"
            )
    return tensors, version
