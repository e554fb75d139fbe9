"""ITDA (Inference-Time Decomposition of Activations, Leask et al. 2025): a dictionary of real activations.

No encoder is learnt. The dictionary is a set of real activations, unit-normalised, picked greedily from
the data: a token is added when the current dictionary reconstructs it badly. Codes come from gradient
pursuit. So every feature is a real image patch at a real denoising step, with its provenance (prompt,
seed, step, token), and can be regenerated and checked (`atom_source`).

Gradient pursuit (Blumensath & Davies 2008), non-negative, L0 = k, run for k iterations on every token
at once: inner products of the residual with all atoms -> add the best atom (largest inner product)
to the support -> step along the gradient restricted to the support with the exact line-search step
-> clamp at 0. Clamping after a full step can raise the error, so each iteration also computes the
feasible step (capped where a coefficient would cross 0; it never raises the error) and keeps, per
token, whichever of the two reconstructs better: the error never grows from one iteration to the next.

Construction (`ITDABuilder`, `build_itda`): for each batch, the per-token normalised error

    e_i = ||x_i - x_hat_i||^2 / sigma^2,   sigma^2 = mean_j ||x_j - mean(x)||^2

where sigma^2 is the total variance per token of every token seen so far, this batch included (for
the first batch it is the batch variance, the reference's choice; later it only gets steadier). The
mean of e_i over tokens is the FVU of `fluxsae.evaluate.reconstruction_metrics`, so `threshold` reads
as "add tokens that, alone, leave more than this share of an average token's variance unexplained",
on the reference's 0.1-0.6 scale. Relative-to-own-norm errors were rejected: FLUX's residual stream
carries a large shared component, so ||x||^2 dwarfs the part that differs between tokens and a
threshold on e_i / ||x_i||^2 would let almost every token pass as "well reconstructed".

Centring (`center=True`, the default): for the same reason, atoms are real tokens minus the mean
activation, unit(x_j - bias), and codes are computed for x - bias; decoding adds the bias back (as an
SAE's decoder bias does). `bias` is the mean of the first batch the builder sees, then frozen, so
every atom is centred by the same vector. Raw atoms all share the mean (on the Shapes model its squared
norm is 1.5-1.8x the per-token variance), a non-negative combination of k of them must rebuild it
before it can explain anything else, and the held-out FVU at 2,048 atoms and L0 16 was 2.4x higher
(0.135 raw vs 0.056 centred on `transformer_blocks.3.image`). Steering along a centred atom moves the
token towards that token's own deviation from the mean, not towards the mean itself.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fluxsae.fileio import atomic_path, load_tensors, save_tensors, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""The newest cfg.json / itda.safetensors / atoms.parquet layout this code reads and the one it writes.
Version 2 added `center` and the `bias` tensor; version 1 files (raw atoms, no bias) still load."""

CFG_FILE, ATOMS_FILE, PROVENANCE_FILE = "cfg.json", "itda.safetensors", "atoms.parquet"

MANIFEST_FIELDS = ("prompt_id", "seed", "step", "timestep", "token", "row", "col")
"""Per-token provenance the harvest records (see fluxsae.activations)."""

PROVENANCE_COLUMNS = ("atom", "site", "prompt_id", "prompt", "seed", "step", "timestep", "token", "row",
                      "col", "batch", "error")  # fmt: skip
"""Columns of atoms.parquet, one row per atom: where it came from (prompt, seed, denoising step, token and
its cell in the image grid; -1 where unknown), the build batch that added it and its normalised error e_i
under the dictionary of that moment."""

_INT_FIELDS = ("prompt_id", "seed", "step", "token", "row", "col", "batch")


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fluxsae")
    except PackageNotFoundError:
        return "0.1.0"


@dataclass(frozen=True)
class ITDAConfig:
    """What an ITDA is and how it was built (cfg.json)."""

    d_in: int
    """Width of the site's residual stream (3072 for FLUX.1)."""

    k: int = 32
    """L0 of the codes: atoms per token chosen by the pursuit (the reference used 32-64)."""

    n_features: int = 0
    """Number of atoms; set from the atoms when the dictionary is built or saved."""

    site: str = ""
    """The site the atoms come from, e.g. "transformer_blocks.18.image"."""

    base_model: str = ""
    """The diffusion model the activations came from: "shapes" or a Hub id."""

    base_revision: str | None = None
    """Hub revision (commit) of `base_model`, if known."""

    threshold: float = 0.6
    """A token becomes an atom when its normalised error e_i (module docstring) exceeds this; the
    reference used 0.6 (range 0.1-0.6, higher for single blocks). Lower: more atoms."""

    max_atoms: int | None = None
    """Stop adding atoms at this many (None: no cap)."""

    prune_cosine: float | None = None
    """Drop a candidate whose cosine with an atom already kept (or an earlier candidate of its batch)
    exceeds this; the reference pruned pairs above 0.8. None: only exact-ish duplicates (0.99) go."""

    round_size: int | None = 256
    """Candidates of one batch are added in rounds of at most this many; after each round the rest are
    encoded again with the grown dictionary and kept only if still above the threshold. Without rounds
    (None, as in the reference) the first batch adds every one of its tokens, so the dictionary size
    follows the batch size rather than the data."""

    encoder: Literal["gradient_pursuit", "matching_pursuit"] = "gradient_pursuit"
    """How codes are computed: non-negative gradient pursuit, or non-negative matching pursuit (the
    original ITDA's encoder, restricted to positive inner products so codes stay non-negative)."""

    center: bool = True
    """Centre the atoms and the tokens on `bias` (the mean activation; module docstring). False: raw
    atoms and no bias, as in the ITDA paper."""

    mean_token_norm: float = 0.0
    """Mean L2 norm of the site's raw tokens seen while building; steering strengths are in these units."""

    steps: tuple[int, ...] | None = None
    """Denoising steps the activations came from (None: not recorded)."""

    resolution: tuple[int, int] | None = None
    """(height, width) in pixels of the generations the activations came from."""

    dtype: str = "float32"
    """Activation dtype at harvest."""

    quantization: str | None = None
    """Quantisation of the base model at harvest (e.g. "nf4"), None for none."""

    architecture: Literal["itda"] = "itda"
    """Dictionary type described by this cfg.json (an SAE's says "topk")."""

    format_version: int = FORMAT_VERSION
    """Layout version of cfg.json, itda.safetensors and atoms.parquet."""

    fluxsae_version: str = field(default_factory=_package_version)
    """fluxsae version that wrote the dictionary."""

    extra: dict = field(default_factory=dict)
    """Free-form JSON-serialisable details: build statistics, the harvest's generation arguments."""

    def __post_init__(self):
        for name, low in (("d_in", 1), ("k", 1), ("n_features", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"ITDAConfig.{name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.threshold, (int, float)) and self.threshold > 0):
            raise ValueError(
                f"ITDAConfig.threshold must be > 0 (the reference used 0.1-0.6), got {self.threshold!r}"
            )
        for name in ("max_atoms", "round_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"ITDAConfig.{name} must be None or a positive integer, got {value!r}")
        if self.prune_cosine is not None and not 0 < self.prune_cosine <= 1:
            raise ValueError(f"ITDAConfig.prune_cosine must be None or in (0, 1], got {self.prune_cosine!r}")
        if self.encoder not in ("gradient_pursuit", "matching_pursuit"):
            raise ValueError(
                f"ITDAConfig.encoder must be 'gradient_pursuit' or 'matching_pursuit', got {self.encoder!r}"
            )
        if self.architecture != "itda":
            raise ValueError(f"ITDAConfig.architecture must be 'itda', got {self.architecture!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists; `from_dict` turns them back)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ITDAConfig:
        """Inverse of `to_dict`; raises ValueError naming unknown or missing keys and too-new formats."""
        if not isinstance(d, dict):
            raise ValueError(f"an ITDA config must be a JSON object, got {type(d).__name__}")
        if d.get("architecture", "itda") != "itda":
            raise ValueError(
                f"it describes a {d['architecture']!r} dictionary, not an ITDA "
                "(load it with fluxsae.load_sae)"
            )
        version = d.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"format_version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"format_version {version} is newer than this fluxsae ({_package_version()}) reads "
                f"(up to {FORMAT_VERSION}); upgrade fluxsae"
            )
        if version < 2 and "center" not in d:
            d = {**d, "center": False}  # version 1 dictionaries were never centred
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ITDA config keys {unknown}; known keys: {sorted(names)}")
        if "d_in" not in d:
            raise ValueError("ITDA config lacks the required key 'd_in'")
        d = dict(d)
        for key in ("steps", "resolution"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


class SparseCode(NamedTuple):
    """The sparse codes of a batch of tokens."""

    coefficients: Tensor
    """[..., k] non-negative coefficients (0 in slots the pursuit could not fill or chose not to use)."""

    indices: Tensor
    """[..., k] int64 atom indices, distinct per token (0 in slots beyond the dictionary size)."""


# ---------------------------------------------------------------------------------------------
# Pursuit. Tokens are processed in row blocks so the [rows, n_atoms] inner products stay bounded.

_BLOCK_ELEMENTS = {"cpu": 1 << 22, "other": 1 << 27}


def _block_rows(n_atoms: int, device: torch.device) -> int:
    budget = _BLOCK_ELEMENTS["cpu" if device.type == "cpu" else "other"]
    return max(16, budget // max(1, n_atoms))


def _combine(indices: Tensor, weights: Tensor, atoms: Tensor) -> Tensor:
    """sum_s weights[:, s] * atoms[indices[:, s]]: [N, m], [N, m], [n, d] -> [N, d] (no [N, m, d] copy)."""
    return F.embedding_bag(indices, atoms, mode="sum", per_sample_weights=weights)


def _gradient_pursuit_block(x: Tensor, atoms: Tensor, k: int) -> tuple[Tensor, Tensor]:
    N, n = x.shape[0], atoms.shape[0]
    coef = x.new_zeros(N, k)
    idx = torch.zeros(N, k, dtype=torch.long, device=x.device)
    r = x.clone()
    for i in range(min(k, n)):
        ips = r @ atoms.T  # [N, n]: minus the gradient of ||r||^2 / 2 with respect to every coefficient
        support = idx[:, :i]
        g_old = ips.gather(1, support)
        ips.scatter_(1, support, float("-inf"))  # an atom enters the support once
        g_new, best = ips.max(1)
        idx[:, i] = best
        support = idx[:, : i + 1]
        g = torch.cat([g_old, g_new[:, None]], 1)
        a = coef[:, : i + 1]
        # the feasible direction: a coefficient at 0 cannot go down
        p = torch.where((a <= 0) & (g < 0), 0.0, g)
        c = _combine(support, p, atoms)  # D_S^T p
        cc = (c * c).sum(1)
        pg = (p * g).sum(1)
        alpha = torch.where(cc > 0, pg / cc.clamp_min(torch.finfo(cc.dtype).tiny), 0.0)  # exact line search
        full = (a + alpha[:, None] * p).clamp_min(0)  # the reference's step: may raise the error
        cap = torch.where(p < 0, a / (-p).clamp_min(torch.finfo(p.dtype).tiny), math.inf).amin(1)
        capped = (a + torch.minimum(alpha, cap)[:, None] * p).clamp_min(0)  # never raises it
        r_full = x - _combine(support, full, atoms)
        r_capped = x - _combine(support, capped, atoms)
        use_full = (r_full * r_full).sum(1) <= (r_capped * r_capped).sum(1)
        coef[:, : i + 1] = torch.where(use_full[:, None], full, capped)
        r = torch.where(use_full[:, None], r_full, r_capped)
    return coef, idx


def _matching_pursuit_block(x: Tensor, atoms: Tensor, k: int) -> tuple[Tensor, Tensor]:
    N, n = x.shape[0], atoms.shape[0]
    coef = x.new_zeros(N, k)
    idx = torch.zeros(N, k, dtype=torch.long, device=x.device)
    r = x.clone()
    for i in range(min(k, n)):
        ips = r @ atoms.T
        ips.scatter_(1, idx[:, :i], float("-inf"))
        value, best = ips.max(1)
        value = value.clamp_min(0)  # non-negative codes: a negative best inner product adds nothing
        coef[:, i], idx[:, i] = value, best
        r = r - value[:, None] * atoms[best]
    return coef, idx


def pursuit(
    x: Tensor,
    atoms: Tensor,
    k: int,
    method: Literal["gradient_pursuit", "matching_pursuit"] = "gradient_pursuit",
) -> SparseCode:
    """Non-negative sparse codes of x [N, d] over unit-norm `atoms` [n, d]: coefficients, indices [N, k].

    At most min(k, n) atoms per token, each chosen once. Gradient pursuit: see the module docstring.
    Matching pursuit: the atom with the largest positive inner product with the residual gets that
    inner product as its coefficient and is subtracted. With n < k the last slots hold (0, index 0).
    """
    if x.ndim != 2 or atoms.ndim != 2 or x.shape[1] != atoms.shape[1]:
        raise ValueError(
            f"pursuit needs x [N, d] and atoms [n, d], got {tuple(x.shape)} and {tuple(atoms.shape)}"
        )
    block = {"gradient_pursuit": _gradient_pursuit_block, "matching_pursuit": _matching_pursuit_block}[method]
    x = x.to(atoms.dtype)
    if atoms.shape[0] == 0 or x.shape[0] == 0:
        return SparseCode(
            x.new_zeros(x.shape[0], k), torch.zeros(x.shape[0], k, dtype=torch.long, device=x.device)
        )
    rows = _block_rows(atoms.shape[0], x.device)
    parts = [block(x[s : s + rows], atoms, k) for s in range(0, x.shape[0], rows)]
    return SparseCode(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


# ---------------------------------------------------------------------------------------------


class ITDALoadError(ValueError):
    """A saved ITDA folder could not be read; the message names the file and what to do."""


class ITDA(torch.nn.Module):
    """A dictionary of real activations with gradient-pursuit codes; the same interface as TopKSAE.

    itda.encode(x [..., d]) -> dense codes [..., n_features] (non-negative, <= k non-zeros per token)
    itda.decode(codes) -> x_hat [..., d];  itda.directions: the atoms [n_features, d], unit norm
    itda.provenance[i]: where atom i came from (prompt, seed, step, token, ...)
    itda.bias: [d] the mean activation the atoms and tokens are centred on (zeros when not centred)
    """

    def __init__(
        self,
        cfg: ITDAConfig,
        atoms: Tensor | None = None,
        provenance: Mapping[str, list] | None = None,
        bias: Tensor | None = None,
    ):
        super().__init__()
        atoms = torch.zeros(0, cfg.d_in) if atoms is None else atoms.detach().float()
        if atoms.ndim != 2 or atoms.shape[1] != cfg.d_in:
            raise ValueError(f"atoms must be [n, d_in={cfg.d_in}], got {tuple(atoms.shape)}")
        bias = torch.zeros(cfg.d_in) if bias is None else bias.detach().float()
        if tuple(bias.shape) != (cfg.d_in,):
            raise ValueError(f"bias must be [d_in={cfg.d_in}], got {tuple(bias.shape)}")
        if cfg.n_features != atoms.shape[0]:
            cfg = dataclasses.replace(cfg, n_features=atoms.shape[0])
        self.cfg = cfg
        self.register_buffer("atoms", atoms)
        self.register_buffer("bias", bias)
        n = atoms.shape[0]
        prov = {c: list((provenance or {}).get(c, [])) for c in PROVENANCE_COLUMNS}
        nan = [math.nan] * n
        defaults = {"atom": list(range(n)), "site": [cfg.site] * n, "prompt": [""] * n, "timestep": nan,
                    "error": nan}  # fmt: skip
        for c in PROVENANCE_COLUMNS:
            if not prov[c]:
                prov[c] = defaults.get(c, [-1] * n)
            if len(prov[c]) != n:
                raise ValueError(f"provenance column {c!r} has {len(prov[c])} rows for {n} atoms")
        self._provenance = prov
        self._rows: list[dict] | None = None

    @property
    def site(self) -> str:
        return self.cfg.site

    @property
    def device(self) -> torch.device:
        return self.atoms.device

    @property
    def dtype(self) -> torch.dtype:
        return self.atoms.dtype

    @property
    def n_atoms(self) -> int:
        return self.atoms.shape[0]

    @property
    def directions(self) -> Tensor:
        """[n_features, d_in] unit-norm directions in raw activation space: the atoms themselves
        (unit(x_j - bias) for a centred ITDA)."""
        return self.atoms

    @property
    def provenance(self) -> list[dict]:
        """One dict per atom: atom, site, prompt_id, prompt, seed, step, timestep, token, row, col,
        batch (the build batch that added it), error (its normalised error then)."""
        if self._rows is None:  # built once: the columns never change after construction
            cols = self._provenance
            self._rows = [{c: cols[c][i] for c in PROVENANCE_COLUMNS} for i in range(self.n_atoms)]
        return self._rows

    def provenance_table(self):
        """The provenance as a pyarrow.Table (the contents of atoms.parquet)."""
        pa = _pyarrow()
        types = {c: pa.int64() for c in ("atom", *_INT_FIELDS)}
        types.update(site=pa.string(), prompt=pa.string(), timestep=pa.float64(), error=pa.float64())
        return pa.table({c: pa.array(self._provenance[c], type=types[c]) for c in PROVENANCE_COLUMNS})

    def extra_repr(self) -> str:
        c = self.cfg
        return f"site={c.site!r}, d_in={c.d_in}, n_features={c.n_features}, k={c.k}, encoder={c.encoder}"

    # -- encode / decode -----------------------------------------------------------------------

    @torch.no_grad()
    def encode_sparse(self, x: Tensor) -> SparseCode:
        """Raw activations [..., d_in] -> coefficients, indices [..., k]."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.cfg.d_in).to(self.dtype) - self.bias
        code = pursuit(x, self.atoms, self.cfg.k, self.cfg.encoder)
        return SparseCode(code.coefficients.view(*lead, -1), code.indices.view(*lead, -1))

    def encode(self, x: Tensor) -> Tensor:
        """Raw activations [..., d_in] -> dense codes [..., n_features], at most k non-zeros per token."""
        coef, idx = self.encode_sparse(x)
        codes = coef.new_zeros(*coef.shape[:-1], self.n_atoms)
        if not self.n_atoms:
            return codes
        # scatter_add: padding slots (coefficient 0, index 0) must not overwrite atom 0's coefficient
        return codes.scatter_add_(-1, idx, coef)

    def decode_sparse(self, coefficients: Tensor, indices: Tensor) -> Tensor:
        """coefficients, indices [..., k] -> x_hat [..., d_in]; no dense codes built."""
        lead, m = coefficients.shape[:-1], coefficients.shape[-1]
        if self.n_atoms == 0:
            return self.bias.expand(*lead, self.cfg.d_in).clone()
        flat = _combine(indices.reshape(-1, m), coefficients.reshape(-1, m).to(self.dtype), self.atoms)
        return flat.view(*lead, self.cfg.d_in) + self.bias

    def decode(self, codes: Tensor) -> Tensor:
        """Dense codes [..., n_features] -> x_hat [..., d_in]."""
        return codes.to(self.dtype) @ self.atoms + self.bias

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction decode(encode(x)) of raw activations [..., d_in]."""
        return self.decode_sparse(*self.encode_sparse(x))

    # -- files ---------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> None:
        """Write folder/cfg.json, folder/itda.safetensors (atoms [n, d] and bias [d], float32) and
        folder/atoms.parquet, each atomically. Refuses to overwrite another dictionary type's cfg.json
        (e.g. an SAE's)."""
        folder = Path(folder)
        cfg_path = folder / CFG_FILE
        if cfg_path.is_file():
            try:
                other = json.loads(cfg_path.read_text()).get("architecture", "itda")
            except (json.JSONDecodeError, AttributeError):
                other = "itda"  # a broken file of ours: replace it
            if other != "itda":
                raise FileExistsError(
                    f"{cfg_path} belongs to a {other!r} dictionary; save the ITDA into a folder of its own "
                    "(one dictionary type per folder, e.g. a separate repo or root for ITDAs)"
                )
        pq = _pyarrow("parquet")
        with atomic_path(folder / PROVENANCE_FILE) as tmp:
            pq.write_table(self.provenance_table(), str(tmp))
        save_tensors(
            folder / ATOMS_FILE,
            {"atoms": self.atoms.float(), "bias": self.bias.float()},
            {"format_version": FORMAT_VERSION},
        )
        write_json(cfg_path, self.cfg.to_dict())

    @classmethod
    def load(cls, folder: str | os.PathLike, device: torch.device | str = "cpu") -> ITDA:
        """Read a folder written by `save`. Raises ITDALoadError naming the file and the problem."""
        folder = Path(folder)
        cfg = _read_cfg(folder / CFG_FILE)
        atoms, bias = _read_atoms(folder / ATOMS_FILE, cfg)
        provenance = _read_provenance(folder / PROVENANCE_FILE, atoms.shape[0])
        return cls(cfg, atoms, provenance, bias).to(device).eval()


_REDO = (
    "save it again with ITDA.save (or rebuild it with `python -m training.build_itda`), or download it again"
)


def _pyarrow(module: str = ""):
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise ImportError("ITDA provenance (atoms.parquet) needs pyarrow: `pip install pyarrow`.") from e
    return pyarrow.parquet if module == "parquet" else pyarrow


def _read_cfg(path: Path) -> ITDAConfig:
    if not path.is_file():
        where = "the folder does not exist" if not path.parent.is_dir() else "the file is missing"
        raise ITDALoadError(
            f"{path}: {where}. An ITDA folder holds {CFG_FILE}, {ATOMS_FILE} and {PROVENANCE_FILE} "
            "(ITDA.save writes all three); check the path and the site name"
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ITDALoadError(f"{path}: not valid JSON ({err}); {_REDO}") from err
    try:
        return ITDAConfig.from_dict(raw)
    except (ValueError, TypeError) as err:
        raise ITDALoadError(f"{path}: {err}") from err


def _read_atoms(path: Path, cfg: ITDAConfig) -> tuple[Tensor, Tensor]:
    if not path.is_file():
        raise ITDALoadError(f"{path}: the file is missing (its {CFG_FILE} is there); {_REDO}")
    try:
        tensors, meta = load_tensors(path)
    except Exception as err:  # safetensors raises its own error types for torn files
        raise ITDALoadError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {err}; {_REDO}"
        ) from err
    version = meta.get("format_version", FORMAT_VERSION)
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ITDALoadError(
            f"{path}: format_version {version} is newer than this fluxsae reads; upgrade fluxsae"
        )
    version = version if isinstance(version, int) else FORMAT_VERSION
    expected = {"atoms"} if version < 2 else {"atoms", "bias"}
    if set(tensors) != expected:
        raise ITDALoadError(
            f"{path}: expected the tensors {sorted(expected)} (format_version {version}), found "
            f"{sorted(tensors)}; {_REDO}"
        )
    atoms = tensors["atoms"]
    bias = tensors.get("bias", torch.zeros(cfg.d_in))
    if tuple(bias.shape) != (cfg.d_in,) or not bias.is_floating_point():
        raise ITDALoadError(
            f"{path}: bias has shape {list(bias.shape)} and dtype {bias.dtype}, expected [{cfg.d_in}] floats "
            f"(d_in of {CFG_FILE}); {_REDO}"
        )
    if not torch.isfinite(bias).all():
        raise ITDALoadError(f"{path}: the bias has NaN/inf values; the file is damaged; {_REDO}")
    if tuple(atoms.shape) != (cfg.n_features, cfg.d_in):
        raise ITDALoadError(
            f"{path}: atoms have shape {list(atoms.shape)} but {CFG_FILE} says n_features={cfg.n_features} x "
            f"d_in={cfg.d_in}; the two files do not belong together; {_REDO}"
        )
    if not atoms.is_floating_point():
        raise ITDALoadError(f"{path}: atoms have dtype {atoms.dtype}, expected a float")
    bad = (~torch.isfinite(atoms)).any(1).sum().item()
    if bad:
        raise ITDALoadError(f"{path}: {bad} atoms have NaN/inf values; the file is damaged; {_REDO}")
    norms = atoms.float().norm(dim=1)
    off = ((norms - 1).abs() > 1e-3).sum().item()
    if off:
        raise ITDALoadError(f"{path}: {off} atoms are not unit norm (ITDA atoms always are); {_REDO}")
    return atoms.float(), bias.float()


def _read_provenance(path: Path, n_atoms: int) -> dict[str, list]:
    if not path.is_file():
        raise ITDALoadError(f"{path}: the file is missing; every ITDA atom needs its provenance row; {_REDO}")
    pq = _pyarrow("parquet")
    try:
        table = pq.read_table(str(path))
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for torn files
        raise ITDALoadError(
            f"{path}: not a readable parquet file (truncated or corrupt?): {err}; {_REDO}"
        ) from err
    missing = sorted(set(PROVENANCE_COLUMNS) - set(table.column_names))
    if missing:
        raise ITDALoadError(f"{path}: missing columns {missing}; {_REDO}")
    if table.num_rows != n_atoms:
        raise ITDALoadError(
            f"{path}: {table.num_rows} provenance rows for {n_atoms} atoms; the files do not belong "
            f"together; {_REDO}"
        )
    cols = table.select(list(PROVENANCE_COLUMNS)).to_pydict()
    if cols["atom"] != list(range(n_atoms)):
        raise ITDALoadError(f"{path}: the 'atom' column is not 0..{n_atoms - 1} in order; {_REDO}")
    return cols


# ---------------------------------------------------------------------------------------------
# Construction


class BatchReport(NamedTuple):
    """What one `ITDABuilder.add_batch` did."""

    tokens: int
    """Tokens in the batch."""

    candidates: int
    """Tokens whose normalised error exceeded the threshold under the dictionary before this batch."""

    added: int
    """Atoms added (after rounds, de-duplication and the cap)."""

    n_atoms: int
    """Dictionary size after the batch."""

    fvu: float
    """Mean normalised error of the batch before adding: its FVU under the dictionary it met."""


class ITDABuilder:
    """Grows an ITDA one batch at a time; `save`/`load` a checkpoint to resume after a kill.

    builder = ITDABuilder(ITDAConfig(d_in=128, k=16, threshold=0.6, site=...))
    for x, manifest in batches:          # x [B, d]; manifest {field: [B]} (fluxsae.activations)
        builder.add_batch(x, manifest)
    itda = builder.to_itda(prompts)       # prompts: {prompt_id: text}
    """

    def __init__(self, cfg: ITDAConfig, device: torch.device | str = "cpu", bias: Tensor | None = None):
        """`bias`: the centre of a centred build ([d]); None: the mean of the first batch."""
        self.cfg = cfg
        d = cfg.d_in
        self.bias: Tensor | None = None if bias is None else bias.detach().float().to(device)
        if not cfg.center:
            self.bias = torch.zeros(d, device=device)
        self._store = torch.zeros(0, d, device=device)  # grows by doubling: atoms are its first rows
        self._n = 0
        floats = ("timestep", "error")
        self.provenance = {f: torch.zeros(0, dtype=torch.float32 if f in floats else torch.int64)
                           for f in (*MANIFEST_FIELDS, "batch", "error")}  # fmt: skip
        self.batches_seen = 0
        self.tokens_seen = 0
        # running sums (float64) for the variance sigma^2 and the mean token norm
        self.stats = {"sum": torch.zeros(d, dtype=torch.float64), "sq": torch.zeros(1, dtype=torch.float64),
                      "norm": torch.zeros(1, dtype=torch.float64)}  # fmt: skip

    @property
    def atoms(self) -> Tensor:
        """[n_atoms, d] the unit-norm atoms so far."""
        return self._store[: self._n]

    @atoms.setter
    def atoms(self, value: Tensor) -> None:
        self._store, self._n = value.detach().clone(), value.shape[0]

    @property
    def n_atoms(self) -> int:
        return self._n

    @property
    def full(self) -> bool:
        return self.cfg.max_atoms is not None and self.n_atoms >= self.cfg.max_atoms

    def variance(self) -> float:
        """sigma^2: mean squared distance of a token to the mean, over every token seen so far."""
        n = max(self.tokens_seen, 1)
        mean = self.stats["sum"] / n
        return max(float(self.stats["sq"] / n - mean.dot(mean)), 0.0)

    def errors(self, x: Tensor) -> Tensor:
        """Normalised errors e_i [N] of raw activations x [N, d] under the current dictionary (module
        docstring)."""
        x = x.to(self.atoms.device, torch.float32)
        return self._errors(x - self.bias if self.bias is not None else x)

    def _errors(self, x: Tensor) -> Tensor:
        """`errors` of already centred tokens x - bias."""
        code = pursuit(x, self.atoms, self.cfg.k, self.cfg.encoder)
        x_hat = _combine(code.indices, code.coefficients, self.atoms) if self.n_atoms else torch.zeros_like(x)
        return (x - x_hat).pow(2).sum(1) / max(self.variance(), torch.finfo(torch.float32).tiny)

    @torch.no_grad()
    def add_batch(self, x: Tensor, provenance: Mapping[str, Tensor] | None = None) -> BatchReport:
        """Add the tokens of x [B, d] the dictionary reconstructs badly; `provenance` {field: [B]} holds
        the harvest manifest of the rows (prompt_id, seed, step, timestep, token, row, col)."""
        x = x.detach().to(self.atoms.device, torch.float32).reshape(-1, self.cfg.d_in)
        if not torch.isfinite(x).all():
            raise ValueError(f"batch {self.batches_seen} holds NaN/inf activations; check the harvest")
        x64 = x.double()
        self.stats["sum"] += x64.sum(0).cpu()
        self.stats["sq"] += x64.pow(2).sum().cpu()
        self.stats["norm"] += x64.norm(dim=1).sum().cpu()
        self.tokens_seen += len(x)
        batch = self.batches_seen
        self.batches_seen += 1
        if self.full or len(x) == 0:
            return BatchReport(len(x), 0, 0, self.n_atoms, math.nan)
        if self.bias is None:
            self.bias = x.mean(0)
        x = x - self.bias
        err = self._errors(x)
        fvu = err.mean().item()
        cand = (err > self.cfg.threshold).nonzero().squeeze(1).cpu()
        n_candidates, before = len(cand), self.n_atoms
        while len(cand) and not self.full:
            size = self.cfg.round_size or len(cand)
            take, rest = cand[:size], cand[size:]
            keep = take[self._distinct(x[take])]
            if self.cfg.max_atoms is not None:
                keep = keep[: self.cfg.max_atoms - self.n_atoms]
            self._append(x[keep], err[keep], keep, provenance, batch)
            if not len(rest):
                break
            err[rest] = self._errors(x[rest])
            cand = rest[(err[rest] > self.cfg.threshold).cpu()]
        return BatchReport(len(x), n_candidates, self.n_atoms - before, self.n_atoms, fvu)

    def _distinct(self, cand: Tensor) -> Tensor:
        """Positions of the candidates [C, d] to keep: non-zero, and no cosine above the duplicate limit
        with an atom or with an earlier kept candidate."""
        limit = self.cfg.prune_cosine if self.cfg.prune_cosine is not None else 0.99
        norms = cand.norm(dim=1)
        ok = norms > 0
        u = cand / norms.clamp_min(torch.finfo(cand.dtype).tiny)[:, None]
        if self.n_atoms:
            ok &= (u @ self.atoms.T).amax(1) <= limit
        close = ((u @ u.T) > limit).cpu().numpy()
        blocked = ~ok.cpu().numpy()
        kept: list[int] = []
        for j in range(len(cand)):  # greedy, in batch order: a kept candidate blocks its near-duplicates
            if not blocked[j]:
                kept.append(j)
                blocked |= close[j]
        return torch.tensor(kept, dtype=torch.long)

    def _append(self, x: Tensor, err: Tensor, rows: Tensor, provenance, batch: int) -> None:
        if not len(x):
            return
        n, m = self._n, len(x)
        if n + m > len(self._store):  # amortised O(1) appends: a 50k x 3072 dictionary is 600 MB
            grown = self._store.new_zeros(max(2 * len(self._store), n + m, 256), self.cfg.d_in)
            grown[:n] = self._store[:n]
            self._store = grown
        self._store[n : n + m] = x / x.norm(dim=1, keepdim=True)
        self._n = n + m
        err, rows = err.cpu(), rows.cpu()
        for f, column in self.provenance.items():
            if f == "batch":
                new = torch.full((len(x),), batch, dtype=column.dtype)
            elif f == "error":
                new = err.to(column.dtype)
            elif provenance is not None and f in provenance:
                new = torch.as_tensor(provenance[f])[rows].to(column.dtype)
            else:
                new = torch.full(
                    (len(x),), math.nan if column.is_floating_point() else -1, dtype=column.dtype
                )
            self.provenance[f] = torch.cat([column, new])

    def to_itda(self, prompts: Mapping[int, str] | None = None, extra: Mapping | None = None) -> ITDA:
        """The dictionary built so far; `prompts` {prompt_id: text} fills the provenance's prompt column."""
        prov = {f: v.tolist() for f, v in self.provenance.items()}
        prov["prompt"] = [(prompts or {}).get(int(i), "") for i in prov["prompt_id"]]
        mean_norm = float(self.stats["norm"] / self.tokens_seen) if self.tokens_seen else 0.0
        built = {"batches": self.batches_seen, "tokens": self.tokens_seen, "variance": self.variance()}
        cfg = dataclasses.replace(
            self.cfg, n_features=self.n_atoms, mean_token_norm=mean_norm,
            extra={**self.cfg.extra, "build": built, **(extra or {})},
        )  # fmt: skip
        bias = self.bias.clone() if self.bias is not None else None
        return ITDA(cfg, self.atoms.clone(), prov, bias)

    def save(self, path: str | os.PathLike) -> None:
        """Checkpoint the partial dictionary, its provenance, statistics and batch count (atomically)."""
        tensors = {"atoms": self.atoms, **{f"provenance/{f}": v for f, v in self.provenance.items()},
                   **{f"stats/{k}": v for k, v in self.stats.items()}}  # fmt: skip
        if self.bias is not None:
            tensors["bias"] = self.bias
        meta = {"cfg": self.cfg.to_dict(), "batches_seen": self.batches_seen, "tokens_seen": self.tokens_seen,
                "format_version": FORMAT_VERSION}  # fmt: skip
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> ITDABuilder:
        """Inverse of `save`."""
        try:
            tensors, meta = load_tensors(path)
            builder = cls(ITDAConfig.from_dict(meta["cfg"]), device)
        except Exception as err:
            raise ITDALoadError(
                f"{path}: not a readable ITDA build checkpoint ({err}); delete it to start over"
            ) from err
        builder.atoms = tensors["atoms"].to(device)
        if "bias" in tensors:
            builder.bias = tensors["bias"].to(device)
        builder.provenance = {f: tensors[f"provenance/{f}"] for f in builder.provenance}
        builder.stats = {k: tensors[f"stats/{k}"] for k in builder.stats}
        builder.batches_seen, builder.tokens_seen = meta["batches_seen"], meta["tokens_seen"]
        return builder


def _same_build(a: ITDAConfig, b: ITDAConfig) -> bool:
    ignore = {"n_features", "mean_token_norm", "extra", "fluxsae_version"}
    da, db = a.to_dict(), b.to_dict()
    return all(da[k] == db[k] for k in da if k not in ignore)


def build_itda(
    batches: Iterable[Tensor | tuple[Tensor, Mapping[str, Tensor]]],
    cfg: ITDAConfig | None = None,
    *,
    prompts: Mapping[int, str] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    on_batch: Callable[[BatchReport], None] | None = None,
    device: torch.device | str = "cpu",
    **cfg_kwargs,
) -> ITDA:
    """Build an ITDA in one pass over `batches` (x [B, d], or (x, manifest {field: [B]})).

    `cfg`, or its fields as keyword arguments (d_in is then read from the first batch). `prompts`
    {prompt_id: text} names each atom's prompt. With `checkpoint` (a file path) the partial dictionary
    is saved every `checkpoint_every` batches and at the end; if the file exists the build resumes from
    it, skipping the batches it already consumed (so `batches` must come in the same order again).
    The build stops early once `max_atoms` is reached. `device`: where the pursuit runs ("cuda" for
    FLUX-sized dictionaries); `on_batch` is called with each batch's `BatchReport`.
    """
    it = iter(batches)
    first = None
    if cfg is None:
        if "d_in" not in cfg_kwargs:
            first = next(it, None)
            if first is None:
                raise ValueError("build_itda got no batches and no d_in")
            cfg_kwargs["d_in"] = (first[0] if isinstance(first, (tuple, list)) else first).shape[-1]
        cfg = ITDAConfig(**cfg_kwargs)
    elif cfg_kwargs:
        cfg = dataclasses.replace(cfg, **cfg_kwargs)
    builder = ITDABuilder(cfg, device)
    if checkpoint is not None and Path(checkpoint).is_file():
        builder = ITDABuilder.load(checkpoint, device)
        if not _same_build(builder.cfg, cfg):
            raise ValueError(
                f"{checkpoint} is a build with other settings; delete it or pass another checkpoint path"
            )
        log.info("resuming the ITDA build after %d batches (%d atoms)", builder.batches_seen, builder.n_atoms)
    source = itertools.chain([first], it) if first is not None else it
    for position, batch in enumerate(source, 1):
        if position <= builder.batches_seen:
            continue  # consumed before the checkpoint
        x, manifest = batch if isinstance(batch, (tuple, list)) else (batch, None)
        report = builder.add_batch(x, manifest)
        if on_batch is not None:
            on_batch(report)
        if checkpoint is not None and builder.batches_seen % checkpoint_every == 0:
            builder.save(checkpoint)
        if builder.full:
            break  # at max_atoms: nothing more can be added
    if checkpoint is not None:
        builder.save(checkpoint)
    return builder.to_itda(prompts)


# ---------------------------------------------------------------------------------------------
# Provenance: regenerate an atom's source image and check the atom is what the model computes there.


class AtomSource(NamedTuple):
    """An atom's source, regenerated: `atom_source(itda, i, pipe)`."""

    image: Any
    """The generated PIL image (prompt and seed of the atom's provenance)."""

    patch: Any
    """The token's cell cropped from `image` (PIL), or None for a text-stream atom."""

    box: tuple[int, int, int, int] | None
    """(left, top, right, bottom) of the token's cell in pixels, or None for a text-stream atom."""

    outlined: Any
    """`image` with the cell outlined (PIL)."""

    cosine: float
    """Cosine between the atom and the token captured at its step in this regeneration, centred on the
    ITDA's bias as the atom was (~1 when the
    provenance is right; a batched harvest differs from a batch-1 regeneration only by float error)."""

    captured: Tensor
    """[d] the captured token (raw activation)."""

    sigma: float
    """The noise level of the captured step (the manifest's `timestep`)."""

    provenance: dict
    """The atom's provenance row."""


def cell_box(token: int, grid: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixels of image token `token` on a (rows, cols) grid of an image of
    `size` = (width, height): token i covers row i // cols, column i % cols."""
    rows, cols = grid
    if not 0 <= token < rows * cols:
        raise ValueError(f"token {token} is outside the {rows}x{cols} image-token grid")
    w, h = size[0] // cols, size[1] // rows
    r, c = divmod(token, cols)
    return (c * w, r * h, (c + 1) * w, (r + 1) * h)


@torch.no_grad()
def atom_source(itda: ITDA, atom: int, pipe, generation: Mapping | None = None) -> AtomSource:
    """Regenerate atom `atom`'s source image with `pipe` from its provenance and verify it.

    `generation`: the pipeline call arguments of the harvest (height, width, num_inference_steps, ...);
    default: those recorded in `itda.cfg.extra["generation"]` by the build command. The site is captured
    at the atom's step during the regeneration, and the cosine with the atom is reported.
    """
    from PIL import ImageDraw

    from fluxsae.heatmap import token_grid
    from fluxsae.hooks import capture
    from fluxsae.sites import parse_site

    if not 0 <= atom < itda.n_atoms:
        raise IndexError(f"atom {atom} is out of range: the dictionary has {itda.n_atoms} atoms")
    prov = itda.provenance[atom]
    gen = dict(generation if generation is not None else itda.cfg.extra.get("generation") or {})
    if not gen:
        raise ValueError(
            "atom_source needs the harvest's generation arguments (height, width, num_inference_steps, ...): "
            "pass generation=ActivationStore(harvest).config['generation']"
        )
    if not prov["prompt"] or prov["seed"] < 0 or prov["step"] < 0 or prov["token"] < 0:
        raise ValueError(f"atom {atom} has no usable provenance (prompt, seed, step, token): {prov}")
    gen.pop("generator", None)
    gen.pop("output_type", None)
    generator = torch.Generator(pipe.device).manual_seed(int(prov["seed"]))
    with capture(pipe, itda.site, steps=[int(prov["step"])]) as acts:
        image = pipe(prov["prompt"], generator=generator, output_type="pil", **gen).images[0]
    captured = acts[itda.site][0, 0, int(prov["token"])].float().cpu()
    sigma = float(acts.sigmas[0]) if len(acts.sigmas) else math.nan
    atom_vec = itda.atoms[atom].float().cpu()
    centred = captured - itda.bias.float().cpu()  # atoms are unit(x - bias)
    cosine = float(centred @ atom_vec / centred.norm().clamp_min(torch.finfo(torch.float32).tiny))
    box = patch = None
    outlined = image.convert("RGB").copy()
    if parse_site(itda.site).stream == "image":
        grid = token_grid(pipe, gen["height"], gen["width"])
        box = cell_box(int(prov["token"]), grid, image.size)
        patch = image.crop(box)
        ImageDraw.Draw(outlined).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 0, 255))
    return AtomSource(image, patch, box, outlined, cosine, captured, sigma, prov)
