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
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from fluxsae.fileio import load_tensors
from fluxsae.version import __version__

CFG_FILE = "cfg.json"
"""Every dictionary folder holds this config; its `architecture` says which class reads the folder."""


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
        missing = sorted(f.name for f in fields if f.name not in d and _required(f))
        if missing:
            raise ValueError(f"{cls.LABEL} config lacks required keys {missing}")
        for key in ("steps", "resolution"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


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
    def load(cls, folder: str | os.PathLike, device: torch.device | str = "cpu") -> Dictionary:
        raise NotImplementedError


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


def load_folder(folder: str | os.PathLike, device: torch.device | str = "cpu") -> Dictionary:
    """Load the dictionary in a site folder, whatever its kind (read from its cfg.json)."""
    kind = folder_architecture(folder)
    classes = _known_architectures()
    if kind not in classes:
        raise DictionaryLoadError(
            f"{Path(folder) / CFG_FILE}: unknown architecture {kind!r}; this fluxsae reads "
            f"{sorted(classes)} (upgrade fluxsae if the folder is newer)"
        )
    return classes[kind].load(folder, device=device)


# -- reading files ---------------------------------------------------------------------------------


def read_json(path: Path, redo: str) -> dict:
    """The JSON object in `path`, or DictionaryLoadError saying what is wrong with the file."""
    if not path.is_file():
        where = "the folder does not exist" if not path.parent.is_dir() else "the file is missing"
        raise DictionaryLoadError(
            f"{path}: {where}. A dictionary folder holds {CFG_FILE} and its weights (the dictionary's "
            "save() writes both); check the path and the site name"
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DictionaryLoadError(f"{path}: not valid JSON ({err}); {redo}") from err
    if not isinstance(raw, dict):
        raise DictionaryLoadError(f"{path}: expected a JSON object, got {type(raw).__name__}; {redo}")
    return raw


def read_config(path: Path, cls: type[DictionaryConfig], redo: str):
    """`cls.from_dict` of the JSON in `path`, every failure as a DictionaryLoadError naming the file."""
    raw = read_json(path, redo)
    try:
        return cls.from_dict(raw)
    except (ValueError, TypeError) as err:
        raise DictionaryLoadError(f"{path}: {err}") from err


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
        raise DictionaryLoadError(f"{path}: the file is missing (its {CFG_FILE} is there); {redo}")
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
