"""What autointerp knows of each unit after one streaming pass over many generations.

Units are anything with a value per image token: dictionary features (`dictionary_units`), MLP
neurons (`capture_mlp`: the hidden activations of the site's own block) and random unit directions
(`RandomDirections`, the floor). For each batch of images, `UnitAccumulator.update` takes the
units' activations [steps, batch, tokens, U] and keeps, in memory that does not grow with the
number of steps:

- FeatureStats (`fluxsae.feature_stats`): density, max and mean activation, timestep profile. "Fires"
  means > 0; dense units (MLP, random) are counted on their positive part.
- the top images per unit (`TopExamples`): images ranked by the max over tokens of the unit's
  step-averaged map, among the images where at least `min_active_tokens` tokens are > 0 (the
  reference work asked for 6 of 256 tokens; 2 of the Shapes model's 64 keeps the same share);
- the unit's activation averaged over the early and the late half of the steps, as float16, for the
  ground truth's AUROC (`fluxsae.autointerp.oracle`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from fluxsae.feature_stats import FeatureStats, FeatureStatsAccumulator, sparse_codes
from fluxsae.fileio import load_tensors, save_tensors
from fluxsae.hooks import track_steps
from fluxsae.sites import parse_site, resolve_site

logger = logging.getLogger(__name__)

SUMMARY_FILE = "units.safetensors"


def dictionary_units(dictionary, acts: torch.Tensor) -> torch.Tensor:
    """Dense codes of captured activations: [steps, batch, tokens, d] -> float32 [steps, batch, tokens, F]."""
    values, indices = sparse_codes(dictionary, acts)
    dense = values.new_zeros(*values.shape[:-1], int(dictionary.cfg.n_features))
    return dense.scatter_add_(-1, indices, values)


class RandomDirections:
    """`n` random unit directions of a site as units: activation = <x - centre, direction>.

    The centre is the mean token of the first batch seen (so the paint marks what differs from a
    typical token); AUROC does not depend on it.
    """

    def __init__(self, n: int, d: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.directions = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
        """[n, d] unit norm."""
        self.centre: torch.Tensor | None = None

    def __call__(self, acts: torch.Tensor) -> torch.Tensor:
        """[steps, batch, tokens, d] -> [steps, batch, tokens, n]."""
        acts = acts.float()
        if self.centre is None:
            self.centre = acts.reshape(-1, acts.shape[-1]).mean(0)
        return (acts - self.centre) @ self.directions.T


def mlp_module(pipe, site: str):
    """The MLP activation module of the site's block: `ff.net[0]` (GELU) of a double block, `act_mlp`
    of a single block."""
    site = parse_site(site)
    _, block = resolve_site(pipe, site)
    if site.kind == "transformer_blocks":
        return block.ff.net[0] if site.stream == "image" else block.ff_context.net[0]
    return block.act_mlp


@contextlib.contextmanager
def capture_mlp(pipe, sites: Sequence[str], n_image_tokens: int) -> Iterator[dict[str, list]]:
    """Record the MLP hidden activations of each image site's block on the prompt pass ("cond").

    Yields {site: [per transformer call, [batch, n_image_tokens, hidden]]}, in call order (one call per
    step); `stack_steps` turns a list into [steps, batch, tokens, hidden]. In a single block the MLP
    sees [text, image] tokens: the last `n_image_tokens` are kept. Hooks are removed in `finally`.
    """
    recorded: dict[str, list] = {str(s): [] for s in sites}
    handles = []
    with track_steps(pipe) as tracker:
        try:
            for site in sites:
                if parse_site(site).stream != "image":
                    raise ValueError(f"MLP neurons are captured on image tokens only; {site} is a text site.")

                def hook(module, args, output, site=str(site)):
                    if tracker.pass_name == "cond":
                        recorded[site].append(output[:, -n_image_tokens:].detach().float().cpu().clone())

                handles.append(mlp_module(pipe, site).register_forward_hook(hook))
            yield recorded
        finally:
            for h in handles:
                h.remove()


@contextlib.contextmanager
def capture_noise(pipe) -> Iterator[list[torch.Tensor]]:
    """Record the starting noise of every generation: the latent the transformer gets at the first step
    on the prompt's pass, [batch, image tokens, channels] per pipe call, in call order. The seed-noise
    explanation of `fluxsae.autointerp.detection` reads it. The hook is removed in `finally`."""
    recorded: list[torch.Tensor] = []
    with track_steps(pipe) as tracker:

        def hook(module, args, kwargs):
            if tracker.step == 0 and tracker.pass_name == "cond":
                latent = kwargs.get("hidden_states", args[0] if args else None)
                recorded.append(latent.detach().float().cpu().clone())

        # Registered after the tracker's own pre-hook, so it reads this call's step and pass.
        handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield recorded
        finally:
            handle.remove()


def stack_steps(calls: list[torch.Tensor], n_steps: int) -> torch.Tensor:
    """One generation's recorded calls (one per step) -> [steps, batch, tokens, hidden]."""
    if len(calls) != n_steps:
        raise ValueError(
            f"expected one MLP capture per step ({n_steps}), got {len(calls)}: one pipe call per capture"
        )
    return torch.stack(calls)


class TopExamples:
    """Streaming top-k images per unit (see the module docstring for the ranking)."""

    def __init__(self, n_units: int, k: int = 10, min_active_tokens: int = 2):
        self.k, self.min_active_tokens = k, min_active_tokens
        self.scores = torch.full((n_units, k), -float("inf"))
        self.ids = torch.full((n_units, k), -1, dtype=torch.long)
        self.maps: torch.Tensor | None = None  # [U, k, tokens]

    def update(self, maps: torch.Tensor, image_ids: torch.Tensor) -> None:
        """maps [batch, tokens, U]: each unit's step-averaged map on each image; image_ids [batch]."""
        maps = maps.float()
        n_units = self.scores.shape[0]
        if self.maps is None:
            self.maps = torch.zeros(n_units, self.k, maps.shape[1])
        score = maps.max(1).values.T  # [U, batch]
        active = (maps > 0).sum(1).T
        score = torch.where(active >= self.min_active_tokens, score, torch.full_like(score, -float("inf")))
        scores = torch.cat([self.scores, score], 1)
        order = scores.topk(self.k, dim=1).indices  # [U, k]
        ids = torch.cat([self.ids, torch.as_tensor(image_ids).long().expand(n_units, -1)], 1)
        all_maps = torch.cat([self.maps, maps.permute(2, 0, 1)], 1)  # [U, k + batch, tokens]
        self.scores = scores.gather(1, order)
        self.ids = torch.where(self.scores > -float("inf"), ids.gather(1, order), -1)
        self.maps = all_maps.gather(1, order[..., None].expand(-1, -1, all_maps.shape[2]))


@dataclass
class UnitSummary:
    """Everything the labelling needs about the units of one site and method."""

    site: str
    method: str
    stats: FeatureStats
    top_ids: torch.Tensor
    """[U, k] int64 image ids of the top images, best first (-1: no more qualifying images)."""
    top_scores: torch.Tensor
    """[U, k] the max of the unit's step-averaged map on each of them."""
    top_maps: torch.Tensor
    """[U, k, tokens] the step-averaged maps."""
    half_acts: torch.Tensor
    """float16 [2, n_images, tokens, U]: activations averaged over the early / late half of the steps."""
    image_ids: torch.Tensor
    """[n_images] the image ids of half_acts' rows."""

    @property
    def n_units(self) -> int:
        return self.top_ids.shape[0]

    def save(self, folder) -> None:
        self.stats.save(folder)
        save_tensors(
            f"{folder}/{SUMMARY_FILE}",
            {"top_ids": self.top_ids, "top_scores": self.top_scores.nan_to_num(neginf=-1e30),
             "top_maps": self.top_maps, "half_acts": self.half_acts, "image_ids": self.image_ids},
            {"site": self.site, "method": self.method},
        )  # fmt: skip

    @classmethod
    def load(cls, folder) -> UnitSummary:
        tensors, meta = load_tensors(f"{folder}/{SUMMARY_FILE}")
        return cls(meta["site"], meta["method"], FeatureStats.load(folder), tensors["top_ids"],
                   tensors["top_scores"], tensors["top_maps"], tensors["half_acts"], tensors["image_ids"])


class UnitCodes:
    """Unit activations (e.g. MLP neurons, [..., n_units]) presented as a dictionary whose codes are the
    units' positive part, so FeatureStatsAccumulator and `fluxsae.features` (top units, heatmaps) take
    dense units too. It has no decoder: `encode_sparse` only."""

    def __init__(self, site: str, n_units: int):
        self.site = site
        self.cfg = type("Cfg", (), {"n_features": n_units, "d_in": n_units})()
        self.directions = torch.zeros(1, 1)

    def encode_sparse(self, x: torch.Tensor):
        idx = torch.arange(x.shape[-1]).expand_as(x)
        return x.clamp(min=0), idx


class UnitAccumulator:
    """Streams unit activations of many batches into a UnitSummary (see the module docstring)."""

    def __init__(self, site: str, method: str, n_units: int, steps: Sequence[int], *, k: int = 10,
                 min_active_tokens: int = 2, fingerprint: str = ""):  # fmt: skip
        self.site, self.method, self.fingerprint = site, method, fingerprint
        self.steps = list(steps)
        self.stats = FeatureStatsAccumulator(UnitCodes(site, n_units), self.steps)
        self.top = TopExamples(n_units, k, min_active_tokens)
        self.halves: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []

    def update(self, units: torch.Tensor, image_ids: Sequence[int]) -> None:
        """units [steps, batch, tokens, U] (all steps of this accumulator, in order); image_ids [batch]."""
        if units.shape[0] != len(self.steps):
            raise ValueError(f"units hold {units.shape[0]} steps, the accumulator counts {len(self.steps)}")
        units = units.float()
        self.stats.update(units)
        half = (len(self.steps) + 1) // 2
        self.top.update(units.mean(0), torch.as_tensor(list(image_ids)))
        self.halves.append(torch.stack([units[:half].mean(0), units[half:].mean(0)]).half())
        self.ids.append(torch.as_tensor(list(image_ids)).long())

    def result(self, meta: dict | None = None) -> UnitSummary:
        stats = self.stats.result({**(meta or {}), "fingerprint": self.fingerprint, "method": self.method})
        return UnitSummary(self.site, self.method, stats, self.top.ids, self.top.scores, self.top.maps,
                           torch.cat(self.halves, 1), torch.cat(self.ids))
