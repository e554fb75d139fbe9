"""The Shapes ground truth as an oracle: which unit detects which concept, and where a map lands.

Every image token of a Shapes scene has known concepts (`fluxsae.shapes.token_masks`), so any
per-token unit activations -- SAE features, ITDA atoms, MLP neurons, projections on raw directions --
can be scored against them:

- `concept_auroc`: per (unit, concept) AUROC over all tokens of all scenes, i.e. the probability
  that a random token showing the concept has a higher activation than a random token that does
  not (ties count 1/2). 0.5 is chance, 1.0 a perfect detector, below 0.5 an anti-detector.
- `best_units`: the unit with the highest AUROC per concept.
- `heatmap_iou`: IoU of a thresholded activation map with a concept's token mask.
- `difference_of_means`: a concept's mean activation minus the mean elsewhere, the direction that
  steering and localisation compare dictionary features against.

Tokens are row-major over the 8x8 grid (token index = row * 8 + col), as in `token_masks`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fluxsae.shapes.world import TOKEN_GRID, Scene, concept_names, token_masks

logger = logging.getLogger(__name__)

CONCEPTS: list[str] = concept_names()
"""Every single concept, in `concept_names()` order: "object", "shape:*", "color:*", "size:*",
"position:*" (the 3x3 grid cells), "background:*"."""

N_TOKENS = TOKEN_GRID * TOKEN_GRID
"""Image tokens per Shapes scene (64)."""

_AUROC_BLOCK_ELEMENTS = 1 << 22
"""Units are ranked in blocks of about this many scores (~4M; the sort, its int64 order and positions
and the float64 ranks take ~45 bytes per score, so ~200 MB), so memory stays bounded however many
units and tokens come in."""

Masks = Mapping[str, np.ndarray]


def scene_masks(scenes: Sequence[Scene]) -> dict[str, np.ndarray]:
    """Token masks of many scenes: concept -> bool [n_scenes, 64] (row-major over the 8x8 grid).

    Every name of `CONCEPTS` is a key (absent concepts are all-False), as in `token_masks`.
    """
    if isinstance(scenes, Scene):
        raise ValueError("scene_masks takes a sequence of scenes; wrap a single scene in a list: [scene].")
    per_scene = [token_masks(scene) for scene in scenes]
    if not per_scene:
        raise ValueError("scene_masks got no scenes: pass at least one fluxsae.shapes.Scene.")
    return {c: np.stack([m[c].reshape(-1) for m in per_scene]) for c in CONCEPTS}


def _as_masks(scenes: Sequence[Scene] | Masks) -> dict[str, np.ndarray]:
    """Scenes, or masks already made by `scene_masks`, -> concept -> bool [n_scenes, 64]."""
    if isinstance(scenes, Mapping):
        return dict(scenes)
    return scene_masks(scenes)


def _average_ranks(block: torch.Tensor) -> torch.Tensor:
    """1-based ranks of each row's values, ties given their average rank: [U, N] -> float64 [U, N]."""
    ordered, order = torch.sort(block, dim=1)
    # Equal values occupy positions lo .. hi-1 of the sorted row: their average 1-based rank is
    # (lo + 1 + hi) / 2, whatever the sort put first among them.
    lo = torch.searchsorted(ordered, ordered, right=False)
    hi = torch.searchsorted(ordered, ordered, right=True)
    ranks_sorted = (lo + hi + 1).to(torch.float64) / 2
    ranks = torch.empty_like(ranks_sorted)
    ranks.scatter_(1, order, ranks_sorted)
    return ranks


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AUROC of every unit for every label: scores [N, U] float, labels [N, C] bool -> float64 [U, C].

    Rank-based (Mann-Whitney U): AUROC = (sum of the positives' ranks - P (P + 1) / 2) / (P * Q)
    for P positives and Q negatives among the N samples, ties given their average rank, so a tie
    between a positive and a negative counts 1/2. NaN where a label has no positives or no
    negatives. Ranks are computed once per unit and shared by all labels (one matrix product), in
    blocks of units so memory stays bounded: 2048 units x 12,800 tokens x 30 labels takes seconds.
    """
    scores = torch.as_tensor(scores)
    labels = torch.as_tensor(labels)
    if scores.ndim != 2 or labels.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(
            f"auroc needs scores [N, U] and labels [N, C] over the same N samples, got scores "
            f"{tuple(scores.shape)} and labels {tuple(labels.shape)}: flatten scenes and tokens into N first."
        )
    if labels.dtype != torch.bool:
        raise ValueError(f"labels must be bool (True = the sample shows the concept), got {labels.dtype}.")
    if not scores.is_floating_point():
        scores = scores.float()
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values; check the activations that produced them.")
    n, n_units = scores.shape
    positives = labels.sum(0).to(torch.float64)  # [C]
    negatives = n - positives
    onehot = labels.to(torch.float64)
    out = torch.empty(n_units, labels.shape[1], dtype=torch.float64)
    step = max(1, _AUROC_BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, n_units, step):
        block = scores[:, start : start + step].T.contiguous()  # [u, N]: sort along the samples
        rank_sums = _average_ranks(block) @ onehot  # [u, C]
        out[start : start + step] = (rank_sums - positives * (positives + 1) / 2) / (positives * negatives)
    out[:, (positives == 0) | (negatives == 0)] = float("nan")
    return out


def concept_auroc(
    unit_acts: torch.Tensor, scenes: Sequence[Scene] | Masks, concepts: Sequence[str] | None = None
) -> tuple[torch.Tensor, list[str]]:
    """AUROC of every unit for every concept over all image tokens of `scenes`.

    Args:
        unit_acts: [n_scenes, 64, U] token activations of any U units (SAE features, ITDA atoms,
            MLP neurons, projections), e.g. captured activations averaged over steps and encoded.
        scenes: the scenes the activations come from, in the same order (or their `scene_masks`).
        concepts: names from `CONCEPTS`; default all of them.

    Returns:
        ([U, C] float64 AUROC, the C concept names). NaN for a concept absent from every token (or
        present on every token) of these scenes.
    """
    masks = _as_masks(scenes)
    names = list(CONCEPTS if concepts is None else concepts)
    unknown = [c for c in names if c not in masks]
    if unknown:
        raise ValueError(f"Unknown concepts {unknown}: choose from truth.CONCEPTS: {CONCEPTS}.")
    unit_acts = torch.as_tensor(unit_acts)
    n_scenes = len(masks[names[0]]) if names else 0
    if unit_acts.ndim != 3 or unit_acts.shape[:2] != (n_scenes, N_TOKENS):
        raise ValueError(
            f"unit_acts must be [n_scenes={n_scenes}, {N_TOKENS} tokens, units], "
            f"got {tuple(unit_acts.shape)}. "
            "Captured activations are [steps, batch, tokens, d]: pick or average the steps first, "
            "and pass the image stream's tokens only."
        )
    labels = torch.from_numpy(np.stack([masks[c].reshape(-1) for c in names], axis=1))
    return auroc(unit_acts.reshape(n_scenes * N_TOKENS, -1), labels), names


def best_units(aurocs: torch.Tensor, concepts: Sequence[str]) -> dict[str, tuple[int, float]]:
    """The best unit for each concept: aurocs [U, C] (from `concept_auroc`) -> concept -> (unit, AUROC).

    NaN entries are skipped; a concept whose every entry is NaN (absent from the scenes) is left
    out of the result.
    """
    aurocs = torch.as_tensor(aurocs)
    if aurocs.ndim != 2 or aurocs.shape[1] != len(concepts):
        raise ValueError(
            f"aurocs must be [units, {len(concepts)} concepts] to match the concept names, "
            f"got {tuple(aurocs.shape)}."
        )
    filled = torch.nan_to_num(aurocs, nan=-1.0)
    values, units = filled.max(dim=0)
    best = {}
    for concept, unit, value in zip(concepts, units.tolist(), values.tolist(), strict=True):
        if value < 0:
            logger.debug("concept %s has no defined AUROC on these scenes; left out", concept)
            continue
        best[concept] = (int(unit), float(value))
    return best


def _otsu_thresholds(flat: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold per row of flat [n, T]: the cut between two sorted values that maximises
    the between-class variance. Returns [n]; a token is "on" when strictly above it. A constant row
    gets +inf (nothing on)."""
    ordered, _ = torch.sort(flat.double(), dim=1)
    t = ordered.shape[1]
    counts = torch.arange(1, t, dtype=torch.float64)  # tokens in the low class for a cut after i
    low_sum = ordered.cumsum(1)[:, :-1]
    total = ordered.sum(1, keepdim=True)
    mean_low = low_sum / counts
    mean_high = (total - low_sum) / (t - counts)
    between = counts * (t - counts) * (mean_low - mean_high) ** 2
    # Only cuts between distinct values separate anything.
    between = torch.where(ordered[:, 1:] > ordered[:, :-1], between, torch.full_like(between, -1.0))
    cut = between.argmax(1, keepdim=True)
    thresholds = ordered.gather(1, cut).squeeze(1)
    constant = between.max(1).values < 0
    return torch.where(constant, torch.full_like(thresholds, float("inf")), thresholds)


def heatmap_iou(maps: torch.Tensor, masks, threshold: float | str = 0.5) -> torch.Tensor:
    """IoU of each thresholded map with its mask: maps [n, rows, cols] or [n, tokens], masks bool of
    the same shape -> float64 [n].

    Threshold rules (per map, so maps of any scale compare):
    - a float t in (0, 1] (default 0.5): a token is on when its value >= t x the map's max and the
      max is > 0. A map with no positive value (e.g. the map of an all-zero activation) has no
      token on, so its IoU is 0 against any non-empty mask. Negative values never count: centre a
      signed map (e.g. a projection) at the point that separates the classes before scoring it.
    - "otsu": on when above Otsu's threshold (the cut between two classes of values that maximises
      their between-class variance); a constant map has no token on.
    IoU = |on & mask| / |on | mask|; NaN when both are empty.
    """
    maps = torch.as_tensor(maps)
    masks = torch.as_tensor(np.asarray(masks)) if not isinstance(masks, torch.Tensor) else masks
    if maps.shape != masks.shape or maps.ndim not in (2, 3):
        raise ValueError(
            f"maps and masks must have the same shape, [n, rows, cols] or [n, tokens]; got maps "
            f"{tuple(maps.shape)} and masks {tuple(masks.shape)}. For one map, add a leading axis: map[None]."
        )
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool (True = the token shows the concept), got {masks.dtype}.")
    if not torch.isfinite(maps).all():
        raise ValueError("maps contain NaN or infinite values; check the activations that produced them.")
    flat = maps.flatten(1).double()
    truth = masks.flatten(1)
    if threshold == "otsu":
        on = flat > _otsu_thresholds(flat)[:, None]
    elif isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0 < threshold <= 1:
        peak = flat.max(1, keepdim=True).values
        on = (flat >= threshold * peak) & (peak > 0)
    else:
        raise ValueError(
            f"threshold must be a fraction of each map's max in (0, 1] (e.g. 0.5) or 'otsu', "
            f"got {threshold!r}."
        )
    intersection = (on & truth).sum(1).double()
    union = (on | truth).sum(1).double()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, float("nan")))


def difference_of_means(acts: torch.Tensor, scenes: Sequence[Scene] | Masks, concept: str) -> torch.Tensor:
    """The concept's mean activation minus the mean on all other tokens: acts [n_scenes, 64, d] -> [d].

    `acts` are raw residual-stream activations of the image tokens (e.g. captured and averaged over
    steps). Not normalised: divide by its norm for a unit direction. The baseline that steering and
    localisation compare dictionary features against.
    """
    masks = _as_masks(scenes)
    if concept not in masks:
        raise ValueError(f"Unknown concept {concept!r}: choose from truth.CONCEPTS: {CONCEPTS}.")
    mask = torch.from_numpy(np.asarray(masks[concept]).reshape(-1))
    n_scenes = len(masks[concept])
    acts = torch.as_tensor(acts)
    if acts.ndim != 3 or acts.shape[:2] != (n_scenes, N_TOKENS):
        raise ValueError(
            f"acts must be [n_scenes={n_scenes}, {N_TOKENS} tokens, d], got {tuple(acts.shape)}. Captured "
            "activations are [steps, batch, tokens, d]: pick or average the steps first."
        )
    if mask.all() or not mask.any():
        raise ValueError(
            f"Concept {concept!r} covers {'every' if mask.all() else 'no'} token of these {n_scenes} scenes: "
            "a difference of means needs tokens with and without it; use more or other scenes."
        )
    flat = acts.reshape(n_scenes * N_TOKENS, -1).double()
    inside = flat[mask].mean(0)
    outside = flat[~mask].mean(0)
    return (inside - outside).to(acts.dtype if acts.is_floating_point() else torch.float32)
