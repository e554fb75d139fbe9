"""Building an ITDA: grow a dictionary of real activations one batch at a time, resumably.

For each batch, the per-token normalised error

    e_i = ||x_i - x_hat_i||^2 / sigma^2,   sigma^2 = mean_j ||x_j - mean(x)||^2

where sigma^2 is the total variance per token of every token seen so far, this batch included (for
the first batch it is the batch variance, the reference's choice; later it only gets steadier). The
mean of e_i over tokens is the FVU of `fluxsae.evaluate.reconstruction_metrics`, so `threshold` reads
as "add tokens that, alone, leave more than this share of an average token's variance unexplained",
on the reference's 0.1-0.6 scale. Relative-to-own-norm errors were rejected: FLUX's residual stream
carries a large shared component, so ||x||^2 dwarfs the part that differs between tokens and a
threshold on e_i / ||x_i||^2 would let almost every token pass as "well reconstructed".

Tokens above the threshold become atoms (centred on the first batch's mean when `center`), in rounds,
without near-duplicates, up to `max_atoms`; each atom keeps the harvest manifest row it came from.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from fluxsae.dictionary import DictionaryLoadError
from fluxsae.fileio import load_tensors, save_tensors
from fluxsae.itda import ITDA, MANIFEST_FIELDS, ITDAConfig
from fluxsae.pursuit import combine, pursuit

log = logging.getLogger(__name__)


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
        x_hat = combine(code.indices, code.values, self.atoms) if self.n_atoms else torch.zeros_like(x)
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
                "format_version": ITDAConfig.FORMAT_VERSION, "kind": "itda"}  # fmt: skip
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> ITDABuilder:
        """Inverse of `save`."""
        try:
            tensors, meta = load_tensors(path)
            if meta.get("kind", "itda") != "itda":
                raise ValueError(f"it is the checkpoint of a {meta['kind']!r} run")
            builder = cls(ITDAConfig.from_dict(meta["cfg"]), device)
        except Exception as err:
            raise DictionaryLoadError(
                f"{path}: not an ITDA build checkpoint ({type(err).__name__}: {err}). If the folder is "
                "another run's (an SAE training's), use another work folder; if it is this build's, delete "
                "the file to start the build over"
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
        if builder.full:
            break  # at max_atoms, perhaps already when checkpointed: nothing more can be added
        if position <= builder.batches_seen:
            continue  # consumed before the checkpoint
        x, manifest = batch if isinstance(batch, (tuple, list)) else (batch, None)
        report = builder.add_batch(x, manifest)
        if on_batch is not None:
            on_batch(report)
        if checkpoint is not None and builder.batches_seen % checkpoint_every == 0:
            builder.save(checkpoint)
    if checkpoint is not None:
        builder.save(checkpoint)
    return builder.to_itda(prompts)
