"""ITDA (Inference-Time Decomposition of Activations, Leask et al. 2025): a dictionary of real activations.

No encoder is learnt. The dictionary is a set of real activations, unit-normalised, picked greedily from
the data (`fluxsae.itda_build`): a token is added when the current dictionary reconstructs it badly.
Codes come from non-negative gradient pursuit (`fluxsae.pursuit`). So every feature is a real image
patch at a real denoising step, with its provenance (prompt, seed, step, token), and can be regenerated
and checked (`fluxsae.provenance.atom_source`).

Centring (`center=True`, the default): atoms are real tokens minus the mean activation,
unit(x_j - bias), and codes are computed for x - bias; decoding adds the bias back (as an SAE's decoder
bias does). `bias` is the mean of the first batch the builder sees, then frozen, so every atom is
centred by the same vector. FLUX's residual stream carries a large shared component: raw atoms all
share the mean (on the Shapes model its squared norm is 1.5-1.8x the per-token variance), and a
non-negative combination of k of them must rebuild it before it can explain anything else
(`benchmarks/README.md` has the figures). Steering along a centred atom moves the token towards that
token's own deviation from the mean, not towards the mean itself.

Format version 2 added `center` and the `bias` tensor; version 1 files (raw atoms, no bias) still load.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from fluxsae.dictionary import (
    CFG_FILE,
    Dictionary,
    DictionaryConfig,
    DictionaryLoadError,
    ForwardOutput,
    SparseCode,
    check_positive_ints,
    missing_file,
    read_config,
    read_tensors,
    register,
)
from fluxsae.fileio import save_tensors, write_json
from fluxsae.pursuit import combine, pursuit

ATOMS_FILE, PROVENANCE_FILE = "itda.safetensors", "atoms.parquet"

MANIFEST_FIELDS = ("prompt_id", "seed", "step", "timestep", "token", "row", "col")
"""Per-token provenance the harvest records (see fluxsae.activations)."""

PROVENANCE_COLUMNS = ("atom", "site", "prompt_id", "prompt", "seed", "step", "timestep", "token", "row",
                      "col", "batch", "error")  # fmt: skip
"""Columns of atoms.parquet, one row per atom: where it came from (prompt, seed, denoising step, token and
its cell in the image grid; -1 where unknown), the build batch that added it and its normalised error e_i
under the dictionary of that moment."""

_INT_FIELDS = ("prompt_id", "seed", "step", "token", "row", "col", "batch")


@dataclass(frozen=True)
class ITDAConfig(DictionaryConfig):
    """What an ITDA is and how it was built (cfg.json). The provenance fields (site, base model, steps,
    ...) are those of `DictionaryConfig`."""

    ARCHITECTURE: ClassVar[str] = "itda"
    FORMAT_VERSION: ClassVar[int] = 2
    LABEL: ClassVar[str] = "ITDA"

    d_in: int
    """Width of the site's residual stream (3072 for FLUX.1)."""

    k: int = 32
    """L0 of the codes: atoms per token chosen by the pursuit (the reference used 32-64)."""

    n_features: int = 0
    """Number of atoms; set from the atoms when the dictionary is built or saved."""

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

    architecture: Literal["itda"] = "itda"
    """Dictionary type described by this cfg.json (an SAE's says "topk")."""

    def __post_init__(self):
        super().__post_init__()
        check_positive_ints(self, ("d_in", "k"))
        check_positive_ints(self, ("n_features",), low=0)
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

    @classmethod
    def upgrade(cls, d: dict[str, Any], version: int) -> dict[str, Any]:
        if version < 2 and "center" not in d:
            d = {**d, "center": False}  # version 1 dictionaries were never centred
        return d


@register
class ITDA(Dictionary):
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

    CONFIG = ITDAConfig
    WEIGHTS_FILE = ATOMS_FILE
    MAIN_TENSOR = "atoms"

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
        return SparseCode(code.values.view(*lead, -1), code.indices.view(*lead, -1))

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """values, indices [..., k] -> x_hat [..., d_in]; no dense codes built."""
        lead, m = values.shape[:-1], values.shape[-1]
        if self.n_atoms == 0:
            return self.bias.expand(*lead, self.cfg.d_in).clone()
        flat = combine(indices.reshape(-1, m), values.reshape(-1, m).to(self.dtype), self.atoms)
        return flat.view(*lead, self.cfg.d_in) + self.bias

    def decode(self, codes: Tensor) -> Tensor:
        """Dense codes [..., n_features] -> x_hat [..., d_in]."""
        return codes.to(self.dtype) @ self.atoms + self.bias

    def forward(self, x: Tensor) -> ForwardOutput:
        """Encode and reconstruct raw activations x [..., d_in]; FVU of the batch in raw space (an ITDA
        has no auxiliary loss)."""
        values, indices = self.encode_sparse(x)
        x_hat = self.decode_sparse(values, indices)
        flat, flat_hat = x.reshape(-1, self.cfg.d_in).to(self.dtype), x_hat.reshape(-1, self.cfg.d_in)
        total = (flat - flat.mean(0)).pow(2).sum().clamp_min(torch.finfo(self.dtype).tiny)
        fvu = (flat - flat_hat).pow(2).sum() / total
        k = values.shape[-1]
        return ForwardOutput(x_hat, values.reshape(-1, k), indices.reshape(-1, k), fvu, fvu.new_zeros(()))

    # -- files ---------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> None:
        """Write folder/cfg.json, folder/itda.safetensors (atoms [n, d] and bias [d], float32) and
        folder/atoms.parquet. The folder is replaced as a whole, in one step (`Dictionary._save_folder`):
        a kill or a full disk leaves the old ITDA or the new one, never the old atoms with the new
        provenance. Refuses to overwrite another dictionary type's folder (e.g. an SAE's)."""
        pq = _pyarrow("parquet")
        table = self.provenance_table()
        tensors = {"atoms": self.atoms.float(), "bias": self.bias.float()}

        def write(tmp: Path) -> None:
            pq.write_table(table, str(tmp / PROVENANCE_FILE))
            save_tensors(tmp / ATOMS_FILE, tensors, {"format_version": ITDAConfig.FORMAT_VERSION})
            write_json(tmp / CFG_FILE, self.cfg.to_dict())

        self._save_folder(folder, write)

    @classmethod
    def load(
        cls, folder: str | os.PathLike, device: torch.device | str = "cpu", *, site: str | None = None
    ) -> ITDA:
        """Read a folder written by `save`. Raises DictionaryLoadError naming the file and the problem, also
        when `site` is given and the folder holds another site's ITDA."""
        folder = Path(folder)
        cfg = read_config(folder / CFG_FILE, ITDAConfig, _REDO, site)
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


def _read_atoms(path: Path, cfg: ITDAConfig) -> tuple[Tensor, Tensor]:
    """atoms [n_features, d_in] and bias [d_in] (zeros for version 1, which had none), validated."""
    n, d = cfg.n_features, cfg.d_in

    def shapes(version: int) -> dict[str, tuple[int, ...]]:
        return {"atoms": (n, d)} if version < 2 else {"atoms": (n, d), "bias": (d,)}

    said = {"atoms": f"{CFG_FILE} says n_features={n} x d_in={d}", "bias": f"{CFG_FILE} says d_in={d}"}
    tensors, _ = read_tensors(path, shapes, newest=ITDAConfig.FORMAT_VERSION, redo=_REDO, said=said)
    atoms = tensors["atoms"].float()
    off = ((atoms.norm(dim=1) - 1).abs() > 1e-3).sum().item()
    if off:
        raise DictionaryLoadError(f"{path}: {off} atoms are not unit norm (ITDA atoms always are); {_REDO}")
    return atoms, tensors.get("bias", torch.zeros(d)).float()


def _read_provenance(path: Path, n_atoms: int) -> dict[str, list]:
    if not path.is_file():
        raise DictionaryLoadError(
            f"{path}: {missing_file(path)}; every ITDA atom needs its provenance row; {_REDO}"
        )
    pq = _pyarrow("parquet")
    try:
        table = pq.read_table(str(path))
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for torn files
        raise DictionaryLoadError(
            f"{path}: not a readable parquet file (truncated or corrupt?): {err}; {_REDO}"
        ) from err
    missing = sorted(set(PROVENANCE_COLUMNS) - set(table.column_names))
    if missing:
        raise DictionaryLoadError(f"{path}: missing columns {missing}; {_REDO}")
    if table.num_rows != n_atoms:
        raise DictionaryLoadError(
            f"{path}: {table.num_rows} provenance rows for {n_atoms} atoms; the files do not belong "
            f"together; {_REDO}"
        )
    cols = table.select(list(PROVENANCE_COLUMNS)).to_pydict()
    if cols["atom"] != list(range(n_atoms)):
        raise DictionaryLoadError(f"{path}: the 'atom' column is not 0..{n_atoms - 1} in order; {_REDO}")
    return cols
