"""A dictionary's feature statistics over many generations, and the checks its image tools share.

`FeatureStats`: per feature, the firing density, the max activation, the mean activation when active
and the timestep profile (mean activation per denoising step), accumulated in one streaming pass
(`FeatureStatsAccumulator`) over captured activations (`acts[site]` [steps, batch, tokens, d]) and
saved beside the dictionary as `<site>/feature_stats.safetensors` (`load_feature_stats`). They fix
the colour scale of heatmaps and tell always-on features apart (`fluxsae.features`).

"Activation" is the value of the feature's code (non-negative for every dictionary, see
`fluxsae.dictionary.SparseCode`); a feature fires on a token when its activation there is > 0.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxsae.fileio import load_tensors, save_tensors
from fluxsae.sites import parse_site

logger = logging.getLogger(__name__)

STATS_FILE = "feature_stats.safetensors"
"""Where a dictionary's FeatureStats live: beside its cfg.json, in the site folder."""

FORMAT_VERSION = 1

_ENCODE_TOKENS = 1 << 14
"""Tokens encoded at a time: bounds the memory of encoding a whole FLUX.1 image (4096 tokens x steps)."""

# -- shared checks ---------------------------------------------------------------------------------


def n_features_of(dictionary) -> int:
    return int(dictionary.cfg.n_features)


def check_acts(dictionary, acts: torch.Tensor) -> torch.Tensor:
    acts = torch.as_tensor(acts)
    d_in = int(dictionary.cfg.d_in)
    if acts.ndim != 4 or acts.shape[-1] != d_in:
        raise ValueError(
            f"Expected captured activations [steps, batch, tokens, d={d_in}] of {dictionary.site}, got shape "
            f"{tuple(acts.shape)}: pass acts[site] from `with fluxsae.capture(pipe, [site]) as acts`, "
            f"for the site this dictionary reads ({dictionary.site})."
        )
    return acts


def as_index(value) -> int | None:
    """value as an int if it is an integer (Python, numpy or a 0-d tensor; not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_feature(dictionary, feature) -> int:
    n = n_features_of(dictionary)
    index = as_index(feature)
    if index is None or not 0 <= index < n:
        raise ValueError(
            f"Unknown feature id {feature!r}: {dictionary.site} has features 0-{n - 1} (an integer index)."
        )
    return index


def check_image_site(dictionary) -> None:
    if parse_site(dictionary.site).stream != "image":
        raise ValueError(
            f"{dictionary.site} is a text-stream site: its tokens are T5 tokens, with no position on the "
            "image, so there is no map to draw. Use a dictionary of an image-stream site ('...image')."
        )


def step_index(acts: torch.Tensor, steps) -> list[int]:
    """The positions along acts' steps axis to use: None = all, an int = that one, else a sequence."""
    n = acts.shape[0]
    chosen = list(range(n)) if steps is None else [steps] if isinstance(steps, int) else list(steps)
    if not chosen or any(not -n <= int(s) < n for s in chosen):
        raise ValueError(f"steps {steps!r} do not index the {n} captured steps (0-{n - 1}); pick from those.")
    return [int(s) % n for s in chosen]


def batch_index(acts: torch.Tensor, batch: int) -> int:
    n = acts.shape[1]
    if not -n <= batch < n:
        raise ValueError(f"batch {batch} is out of range: the capture holds {n} images (0-{n - 1}).")
    return batch % n


def sparse_codes(dictionary, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`dictionary.encode_sparse` of raw activations x [..., d] in blocks of tokens, without gradients,
    on the dictionary's device and dtype: -> (values, indices), each [..., k], on x's device."""
    device = getattr(dictionary, "device", x.device)
    dtype = getattr(dictionary, "dtype", x.dtype)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    values, indices = [], []
    with torch.no_grad():
        for start in range(0, flat.shape[0], _ENCODE_TOKENS):
            block = flat[start : start + _ENCODE_TOKENS].to(device=device, dtype=dtype)
            v, i = dictionary.encode_sparse(block)
            values.append(v.float().to(x.device))
            indices.append(i.to(x.device))
    k = values[0].shape[-1]
    return torch.cat(values).reshape(*lead, k), torch.cat(indices).reshape(*lead, k)


def step_averaged_codes(dictionary, acts: torch.Tensor) -> torch.Tensor:
    """Captured activations [steps, n, tokens, d] -> dense codes averaged over the steps [n, tokens, F]
    (what `fluxsae.features.feature_heatmap` paints by default), one step at a time, without a dense
    [steps, ...] array."""
    n_steps = acts.shape[0]
    codes = torch.zeros(*acts.shape[1:3], int(dictionary.cfg.n_features))
    for step in range(n_steps):
        values, indices = sparse_codes(dictionary, acts[step])
        codes.scatter_add_(-1, indices, values / n_steps)
    return codes


def fingerprint(dictionary) -> str:
    """A short hash of the dictionary's directions: stats computed for another dictionary are caught."""
    directions = dictionary.directions.detach().float().cpu().contiguous()
    return hashlib.sha256(directions.numpy().tobytes()).hexdigest()[:16]


# -- statistics over many generations --------------------------------------------------------------


@dataclass
class FeatureStats:
    """Per-feature statistics of one dictionary over many captured generations.

    Counts and sums are kept per denoising step (S steps, F features), so every figure below is exact
    and two FeatureStats of the same dictionary can be merged by adding them.
    """

    site: str
    """The dictionary's site."""
    steps: tuple[int, ...]
    """The denoising step of each row of the per-step tensors (S entries)."""
    tokens: torch.Tensor
    """[S] int64: tokens seen at each step."""
    fires: torch.Tensor
    """[S, F] int64: tokens on which each feature fired (activation > 0), per step."""
    activation_sum: torch.Tensor
    """[S, F] float64: sum of each feature's activations, per step."""
    max_activation: torch.Tensor
    """[F] float32: the largest activation of each feature on any token at any step (0 if it never fired)."""
    meta: dict = field(default_factory=dict)
    """JSON-ready provenance: the dictionary's fingerprint, scenes, seeds, generation arguments."""

    @property
    def n_features(self) -> int:
        return self.fires.shape[1]

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.sum())

    @property
    def density(self) -> torch.Tensor:
        """[F] share of all tokens (every step) on which each feature fires."""
        return (self.fires.sum(0).double() / max(self.n_tokens, 1)).float()

    @property
    def mean_when_active(self) -> torch.Tensor:
        """[F] mean activation over the tokens where the feature fires (0 if it never fired)."""
        return (self.activation_sum.sum(0) / self.fires.sum(0).clamp(min=1)).float()

    @property
    def timestep_profile(self) -> torch.Tensor:
        """[S, F] mean activation of each feature at each step, over all tokens of that step."""
        return (self.activation_sum / self.tokens.clamp(min=1)[:, None]).float()

    @property
    def density_per_step(self) -> torch.Tensor:
        """[S, F] share of each step's tokens on which each feature fires."""
        return (self.fires.double() / self.tokens.clamp(min=1)[:, None]).float()

    def check_matches(self, dictionary) -> None:
        """Raise ValueError if these stats were computed for another site or size of dictionary;
        warn (log) if for other directions (the dictionary was retrained since)."""
        if self.site != dictionary.site or self.n_features != n_features_of(dictionary):
            raise ValueError(
                f"These feature stats are for {self.n_features} features at {self.site}, the dictionary has "
                f"{n_features_of(dictionary)} at {dictionary.site}: load the stats from the dictionary's own "
                "folder, or recompute them with `python -m training.feature_stats`."
            )
        want = self.meta.get("fingerprint")
        if want and want != fingerprint(dictionary):
            logger.warning(
                "feature stats at %s were computed for other directions (fingerprint %s, dictionary %s): "
                "the dictionary changed since; recompute them with `python -m training.feature_stats`",
                self.site, want, fingerprint(dictionary),
            )

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `folder/feature_stats.safetensors` (metadata as JSON in its header); returns the path.
        Counts are stored as int32 and sums as float32 to keep the file small (~5 bytes x S x F x 2)."""
        path = Path(folder) / STATS_FILE
        save_tensors(
            path,
            {
                "tokens": self.tokens.long(),
                "fires": self.fires.int(),
                "activation_sum": self.activation_sum.float(),
                "max_activation": self.max_activation.float(),
            },
            {"format_version": FORMAT_VERSION, "site": self.site, "steps": list(self.steps),
             "meta": self.meta},
        )
        # The temporary file behind the atomic write is private (0600); stats ship with a dictionary
        # and must be as readable as its other files.
        umask = os.umask(0)
        os.umask(umask)
        path.chmod(0o666 & ~umask)
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> FeatureStats:
        """Read `folder/feature_stats.safetensors` (or that file itself); ValueError names what is wrong."""
        path = Path(folder)
        path = path if path.suffix == ".safetensors" else path / STATS_FILE
        redo = "recompute it with `python -m training.feature_stats`"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no feature stats there; {redo}.")
        try:
            tensors, meta = load_tensors(path)
        except Exception as err:  # safetensors raises its own error types for torn files
            raise ValueError(f"{path}: not a readable safetensors file ({err}); {redo}.") from err
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {meta['format_version']} is newer than fluxsae reads.")
        need = {"tokens", "fires", "activation_sum", "max_activation"}
        if set(tensors) != need or "site" not in meta or "steps" not in meta:
            raise ValueError(f"{path}: expected tensors {sorted(need)} and site/steps metadata; {redo}.")
        stats = cls(
            site=meta["site"],
            steps=tuple(meta["steps"]),
            tokens=tensors["tokens"].long(),
            fires=tensors["fires"].long(),
            activation_sum=tensors["activation_sum"].double(),
            max_activation=tensors["max_activation"].float(),
            meta=meta.get("meta", {}),
        )
        s, f = stats.fires.shape
        shapes = (stats.tokens.shape, stats.activation_sum.shape, stats.max_activation.shape)
        if shapes != ((s,), (s, f), (f,)):
            raise ValueError(f"{path}: tensor shapes do not fit together ({s} steps x {f} features); {redo}.")
        if len(stats.steps) != s:
            raise ValueError(f"{path}: {len(stats.steps)} steps in the metadata but {s} rows; {redo}.")
        return stats


class FeatureStatsAccumulator:
    """Streams captured activations into FeatureStats: memory is O(steps x features), whatever the data.

        acc = FeatureStatsAccumulator(sae, steps=range(8))
        for batch in batches:                      # each from `fluxsae.capture(pipe, [sae.site])`
            acc.update(acts[sae.site], steps=acts.steps)
        stats = acc.result()
    """

    def __init__(self, dictionary, steps: Sequence[int]):
        self.dictionary = dictionary
        self.steps = tuple(int(s) for s in steps)
        if not self.steps or len(set(self.steps)) != len(self.steps):
            raise ValueError(f"steps must be distinct denoising steps, e.g. range(8); got {steps!r}.")
        n_steps, n = len(self.steps), n_features_of(dictionary)
        self.tokens = torch.zeros(n_steps, dtype=torch.long)
        self.fires = torch.zeros(n_steps, n, dtype=torch.long)
        self.activation_sum = torch.zeros(n_steps, n, dtype=torch.float64)
        self.max_activation = torch.zeros(n, dtype=torch.float32)

    def update(self, acts: torch.Tensor, steps: Sequence[int] | None = None) -> None:
        """Add captured activations [steps, batch, tokens, d]; `steps` names the denoising step of each
        row of the first axis (default: this accumulator's steps, in order)."""
        acts = check_acts(self.dictionary, acts)
        steps = self.steps if steps is None else tuple(int(s) for s in steps)
        if len(steps) != acts.shape[0] or any(s not in self.steps for s in steps):
            raise ValueError(
                f"acts hold {acts.shape[0]} steps named {list(steps)}, but this accumulator counts steps "
                f"{list(self.steps)}: pass steps=acts.steps from the capture, or build the accumulator "
                "with the steps you capture."
            )
        n = n_features_of(self.dictionary)
        for row, step in enumerate(steps):
            values, indices = sparse_codes(self.dictionary, acts[row])
            values, indices = values.reshape(-1), indices.reshape(-1)
            # Unused slots hold value 0 with any index: they add nothing to either sum.
            s = self.steps.index(step)
            self.tokens[s] += acts.shape[1] * acts.shape[2]
            self.fires[s].index_add_(0, indices, (values > 0).long())
            self.activation_sum[s].index_add_(0, indices, values.double())
            peak = torch.zeros(n).scatter_reduce_(0, indices, values, reduce="amax")
            torch.maximum(self.max_activation, peak, out=self.max_activation)

    def result(self, meta: dict | None = None) -> FeatureStats:
        """The FeatureStats of everything added so far (meta: extra provenance to record)."""
        return FeatureStats(
            site=self.dictionary.site,
            steps=self.steps,
            tokens=self.tokens.clone(),
            fires=self.fires.clone(),
            activation_sum=self.activation_sum.clone(),
            max_activation=self.max_activation.clone(),
            meta={"fingerprint": fingerprint(self.dictionary), **(meta or {})},
        )


def load_feature_stats(
    name_or_path: str | os.PathLike, site: str | None = None, kind: str = "sae"
) -> FeatureStats | None:
    """The FeatureStats shipped with a dictionary, or None when it has none.

    `name_or_path`: a site folder (holding cfg.json), or, with `site` and `kind` ("sae" | "itda"),
    anything `fluxsae.load_sae` / `load_itda` accept ("shapes", a repo folder, a Hub id).

        stats = load_feature_stats("shapes", site="transformer_blocks.3.image", kind="sae")
    """
    folder = Path(name_or_path)
    if not (folder / STATS_FILE).is_file() and not (folder / "cfg.json").is_file():
        if site is None:
            raise ValueError(
                f"{name_or_path} is not a dictionary site folder: pass site=... (and kind='sae' or 'itda')."
            )
        if kind not in ("sae", "itda"):
            raise ValueError(f"kind must be 'sae' or 'itda', got {kind!r}.")
        from fluxsae.hub import site_folder

        folder = site_folder(name_or_path, site, f"{kind}.safetensors")
    if not (folder / STATS_FILE).is_file():
        logger.info("no %s in %s", STATS_FILE, folder)
        return None
    return FeatureStats.load(folder)


# -- one image -------------------------------------------------------------------------------------
