"""What a dictionary's features do on one image: the top features, the features at a pixel, one
feature's activations per step and its heatmap.

All of it starts from captured activations (`fluxsae.capture(pipe, [site]) as acts`; `acts[site]` is
[steps, batch, tokens, d]) and works for any dictionary through the shared interface (`encode_sparse`,
`cfg`, `site`); the statistics that fix colour scales and filter always-on features are
`fluxsae.feature_stats.FeatureStats`.

- `top_features`: the features of one image ranked by activation mass (or by mass over the feature's
  usual mass, `rank="lift"`), always-on features left out by their measured firing density.
- `features_at`: the features ranked at one token, picked by index, grid cell or pixel.
- `feature_activations` / `timestep_profile`: one feature's activations on an image, per step.
- `feature_heatmap`: one feature painted on the image, on a colour scale fixed by its max activation.
- `contrast_features` / `contrast_scores`: the features that tell generations showing something
  (captions naming "red") from others, at any site, the text stream included: what to clamp and add
  to swap one for another.

Steps below index the first axis of the captured tensor, which are the denoising steps when all steps
were captured (the default of `capture`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from PIL import Image

from fluxsae.feature_stats import (
    FeatureStats,
    as_index,
    batch_index,
    check_acts,
    check_feature,
    check_image_site,
    n_features_of,
    sparse_codes,
    step_averaged_codes,
    step_index,
)
from fluxsae.heatmap import feature_overlay, pixel_token

DEFAULT_MAX_DENSITY = 0.5
"""Features firing on more than this share of all tokens are "always on" and left out of rankings:
they carry the same mass on every image (a bias, the noise level) and drown out what this image shows.
Half the tokens is far above any concept of the Shapes world: an object covers ~16% of the tokens on
average, one background colour ~28%, so no feature that follows a concept is dropped."""


class TopFeature(NamedTuple):
    """One feature of an image, as ranked by `top_features`."""

    feature: int
    """The feature's index in the dictionary."""
    mass: float
    """Its activation summed over the image's tokens (averaged over the chosen steps)."""
    share: float
    """mass / the mass of all features on this image (always-on ones included)."""


class FeatureAt(NamedTuple):
    """One feature at one token, as ranked by `features_at`."""

    feature: int
    """The feature's index in the dictionary."""
    activation: float
    """Its activation at the token (averaged over the chosen steps)."""
    share: float
    """activation / the sum of all features' activations at that token."""


def _mass(dictionary, x: torch.Tensor) -> torch.Tensor:
    """Activations x [steps, tokens, d] -> [F]: each feature's activation summed over tokens, mean over
    steps."""
    values, indices = sparse_codes(dictionary, x)
    total = torch.zeros(n_features_of(dictionary), dtype=torch.float64)
    total.index_add_(0, indices.reshape(-1), values.reshape(-1).double())
    return total / x.shape[0]


def usual_mass(stats: FeatureStats, steps: Sequence[int], n_tokens: int) -> torch.Tensor:
    """[F] each feature's usual activation mass on one image: its mean activation per token at the
    denoising `steps` (rows of `stats.timestep_profile`, averaged) x `n_tokens`."""
    rows = [stats.steps.index(s) for s in steps if s in stats.steps]
    if len(rows) != len(steps):
        raise ValueError(
            f"steps {list(steps)} are not all among the steps the stats count ({list(stats.steps)})."
        )
    return stats.timestep_profile[rows].mean(0).double() * n_tokens


def _lift(mass: torch.Tensor, usual: torch.Tensor) -> torch.Tensor:
    """mass / (usual + mean usual): the feature's mass here in units of its usual mass, shrunk towards the
    mean usual mass of all features, so features that almost never fire do not top the list on a trace
    of activation."""
    return mass / (usual + usual.mean())


def _ranked(mass: torch.Tensor, n: int, stats: FeatureStats | None, max_density: float | None, dictionary,
            score: torch.Tensor | None = None):  # fmt: skip
    """(feature, mass, share) of the n largest entries of `score` [F] (default: mass [F]) left after the
    density filter."""
    if n < 1:
        raise ValueError(f"n must be >= 1 (how many features to return), got {n}.")
    score = mass if score is None else score
    total = float(mass.sum())
    keep = mass > 0
    if stats is not None:
        stats.check_matches(dictionary)
        limit = DEFAULT_MAX_DENSITY if max_density is None else float(max_density)
        keep &= stats.density <= limit
    elif max_density is not None:
        raise ValueError("max_density filters by measured firing density: pass stats=... as well.")
    candidates = keep.nonzero().flatten()
    order = candidates[score[candidates].argsort(descending=True, stable=True)][:n]
    return [(int(f), float(mass[f]), float(mass[f]) / total if total > 0 else 0.0) for f in order]


def top_features(
    dictionary,
    acts: torch.Tensor,
    stats: FeatureStats | None = None,
    n: int = 10,
    *,
    batch: int = 0,
    steps: int | Sequence[int] | None = None,
    max_density: float | None = None,
    rank: Literal["mass", "lift"] = "mass",
    step_ids: Sequence[int] | None = None,
) -> list[TopFeature]:
    """The features of one image ranked by activation mass (activation summed over its tokens), or by
    lift: mass / (usual mass + the mean usual mass of all features).

    Args:
        dictionary: any dictionary (SAE, ITDA) of the captured site.
        acts: captured activations [steps, batch, tokens, d].
        stats: the dictionary's FeatureStats; with them, features firing on more than `max_density`
            (default DEFAULT_MAX_DENSITY) of all tokens are left out as always-on. Without them nothing
            is filtered.
        n: how many features to return.
        batch: which image of the batch.
        steps: positions along the steps axis to average over (None: all).
        rank: "mass", or "lift": the usual mass is `usual_mass` (the feature's mean activation per token
            at these steps in `stats`, x the image's tokens; needs `stats` and every step captured, so
            positions are denoising steps). Large-area features that fire alike on every image of
            their kind (background colours) rank high by mass; lift ranks what is particular to this
            image first (figures: benchmarks/app_ranking.py, benchmarks/README.md).
        step_ids: the denoising step of each captured position, when not every step was captured (an
            image denoised from a noise level runs the last steps only: `Captured.steps`).
    Returns:
        Up to n TopFeature(feature, mass, share), largest mass (or lift) first; features with no
        activation on the image are never listed.
    """
    acts = check_acts(dictionary, acts)
    chosen = step_index(acts, steps)
    x = acts[chosen, batch_index(acts, batch)]  # [steps, tokens, d]
    mass = _mass(dictionary, x)
    if rank == "mass":
        score = None
    elif rank == "lift":
        if stats is None:
            raise ValueError("rank='lift' compares with the feature's usual mass: pass stats=... as well.")
        ids = list(stats.steps) if step_ids is None else [int(s) for s in step_ids]
        if len(ids) != acts.shape[0]:
            raise ValueError(
                f"rank='lift' needs the denoising step of every captured position: {acts.shape[0]} captured, "
                f"{len(ids)} known; capture every step, or pass step_ids=acts.steps."
            )
        score = _lift(mass, usual_mass(stats, [ids[i] for i in chosen], acts.shape[2]))
    else:
        raise ValueError(f"rank must be 'mass' or 'lift', got {rank!r}.")
    ranked = _ranked(mass, n, stats, max_density, dictionary, score)
    return [TopFeature(*r) for r in ranked]


def _grid_of(n_tokens: int, image_size: tuple[int, int] | None) -> tuple[int, int]:
    """(rows, cols) of an image-token grid of n_tokens for an image of image_size (width, height)."""
    if image_size is None:
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise ValueError(
                f"{n_tokens} image tokens do not form a square grid: pass image_size=(width, height)."
            )
        return side, side
    width, height = image_size
    rows = math.isqrt(round(n_tokens * height / width))
    if rows == 0 or n_tokens % rows or (n_tokens // rows) * height != rows * width:
        raise ValueError(
            f"{n_tokens} image tokens do not tile a {width}x{height} image with square tokens; check "
            "image_size=(width, height) and that acts come from that generation's image stream."
        )
    return rows, n_tokens // rows


def token_of(
    n_tokens: int,
    *,
    token: int | None = None,
    cell: tuple[int, int] | None = None,
    pixel: tuple[float, float] | None = None,
    image_size: tuple[int, int] | None = None,
) -> int:
    """The image token index (row-major) named by exactly one of `token`, `cell` = (row, col) of the
    token grid, or `pixel` = (x, y) of an image of `image_size` = (width, height)."""
    given = [name for name, v in (("token", token), ("cell", cell), ("pixel", pixel)) if v is not None]
    if len(given) != 1:
        raise ValueError(
            f"Name exactly one place: token=, cell=(row, col) or pixel=(x, y); got {given or 'none'}."
        )
    if pixel is not None:
        if image_size is None:
            raise ValueError("pixel=(x, y) needs image_size=(width, height) of the image it is on.")
        return pixel_token(pixel, image_size, _grid_of(n_tokens, image_size))
    if cell is not None:
        rows, cols = _grid_of(n_tokens, image_size)
        row, col = cell
        if not (0 <= row < rows and 0 <= col < cols):
            raise ValueError(
                f"cell {cell} is outside the {rows}x{cols} token grid (rows 0-{rows - 1}, cols 0-{cols - 1})."
            )
        return int(row) * cols + int(col)
    index = as_index(token)
    if index is None or not 0 <= index < n_tokens:
        raise ValueError(f"token {token!r} is not a token of the image: pick an integer in 0-{n_tokens - 1}.")
    return index


def features_at(
    dictionary,
    acts: torch.Tensor,
    *,
    token: int | None = None,
    cell: tuple[int, int] | None = None,
    pixel: tuple[float, float] | None = None,
    image_size: tuple[int, int] | None = None,
    stats: FeatureStats | None = None,
    n: int = 10,
    batch: int = 0,
    steps: int | Sequence[int] | None = None,
    max_density: float | None = None,
) -> list[FeatureAt]:
    """The features at one image token, ranked by activation there (averaged over `steps`).

    The token is named by exactly one of `token` (row-major index), `cell` = (row, col) of the token
    grid, or `pixel` = (x, y) of the generated image with `image_size` = (width, height): pixel ->
    token -> features. acts: captured [steps, batch, tokens, d] of an image-stream site. `stats`,
    `max_density`, `n`: as in `top_features`. Returns up to n FeatureAt(feature, activation, share).
    """
    check_image_site(dictionary)
    acts = check_acts(dictionary, acts)
    index = token_of(acts.shape[2], token=token, cell=cell, pixel=pixel, image_size=image_size)
    x = acts[step_index(acts, steps), batch_index(acts, batch), index][:, None]  # [steps, 1, d]
    ranked = _ranked(_mass(dictionary, x), n, stats, max_density, dictionary)
    return [FeatureAt(*r) for r in ranked]


def feature_activations(dictionary, acts: torch.Tensor, feature: int, batch: int | None = 0) -> torch.Tensor:
    """One feature's activation on every token at every captured step: acts [steps, batch, tokens, d] ->
    [steps, tokens] for image `batch` (None: [steps, batch, tokens], every image)."""
    feature = check_feature(dictionary, feature)
    acts = check_acts(dictionary, acts)
    x = acts if batch is None else acts[:, batch_index(acts, batch)]
    values, indices = sparse_codes(dictionary, x)
    return (values * (indices == feature)).sum(-1)


def timestep_profile(dictionary, acts: torch.Tensor, feature: int, batch: int | None = 0) -> torch.Tensor:
    """A feature's mean activation per captured step over the tokens of image `batch` (None: of every
    image): acts [steps, batch, tokens, d] -> [steps]. Over many generations:
    `FeatureStats.timestep_profile`."""
    a = feature_activations(dictionary, acts, feature, batch)
    return a.reshape(a.shape[0], -1).mean(1)


def feature_heatmap(
    dictionary,
    acts: torch.Tensor,
    feature: int,
    image: Image.Image,
    stats: FeatureStats | None = None,
    *,
    batch: int = 0,
    steps: int | Sequence[int] | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
    **overlay_args,
) -> Image.Image:
    """`feature`'s activations on the generated `image` (mean over `steps`), painted over it with a
    colour bar. The colour scale runs from 0 to `vmax`, by default the feature's max activation in
    `stats` so the same colour means the same value on every image and step; without either, the
    map's own max (then colours compare within one map only). `overlay_args` go to
    `fluxsae.heatmap.feature_overlay` (cmap, alpha, display_size)."""
    check_image_site(dictionary)
    a = feature_activations(dictionary, acts, feature, batch)  # [steps, tokens]
    grid = _grid_of(a.shape[1], image.size)
    values = a[step_index(check_acts(dictionary, acts), steps)].mean(0).reshape(grid)
    if vmax is None and stats is not None:
        stats.check_matches(dictionary)
        vmax = float(stats.max_activation[feature])
    return feature_overlay(image, values, vmin=0.0, vmax=vmax, colorbar=colorbar, **overlay_args)


def contrast_scores(dictionary, acts_with: torch.Tensor, acts_without: torch.Tensor) -> torch.Tensor:
    """[F] how much each feature separates generations with a property from generations without it.

    Each generation's feature values are their peak over its tokens (codes averaged over steps) times
    the feature's decoder length, i.e. how far the feature moves the token where it is strongest; a
    feature's score is the mean over `acts_with` minus the mean over `acts_without`.

    acts_with, acts_without: captured activations [steps, batch, tokens, d] at the dictionary's site
    (image or text stream), e.g. captions that name "red" against captions of other colours.
    """
    from fluxsae.steering import decoder_rows

    peaks = []
    for acts in (acts_with, acts_without):
        acts = check_acts(dictionary, acts)
        if acts.shape[1] == 0:
            raise ValueError(
                "contrast_features needs at least one generation on each side, got an empty batch."
            )
        peaks.append(step_averaged_codes(dictionary, acts).amax(1))  # [batch, F]
    length = decoder_rows(dictionary, range(n_features_of(dictionary))).norm(dim=1)
    return (peaks[0].mean(0) - peaks[1].mean(0)) * length


def contrast_features(
    dictionary, acts_with: torch.Tensor, acts_without: torch.Tensor, n: int = 3
) -> list[int]:
    """The `n` features with the highest `contrast_scores`, best first; only features scoring above 0.
    At a text site this finds the feature of a word, which `fluxsae.steer` can clamp to 0 while adding
    another's."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}.")
    scores = contrast_scores(dictionary, acts_with, acts_without)
    order = scores.argsort(descending=True)[:n]
    return [int(f) for f in order if scores[f] > 0]


def caption_features(
    dictionary, acts_with: torch.Tensor, acts_without: torch.Tensor, n: int = 3, tie: float = 0.02
) -> list[int]:
    """The `n` features that best tell generations with a property (captions naming "red") from those
    without, best first: by AUROC of each generation's peak over its tokens (codes averaged over steps);
    among features within `tie` of the best AUROC (many separate captions perfectly), the one that moves
    the token most (`contrast_scores`) first. What `fluxsae.word_steering` clamps and adds at text sites
    (benchmarks/results/steering.json: this choice turns a colour in 82-93% of trials)."""
    from fluxsae.shapes.truth import auroc

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}.")
    peaks = [step_averaged_codes(dictionary, check_acts(dictionary, a)).amax(1)
             for a in (acts_with, acts_without)]  # fmt: skip
    if not len(peaks[0]) or not len(peaks[1]):
        raise ValueError("caption_features needs at least one generation on each side, got an empty batch.")
    labels = torch.cat([torch.ones(len(peaks[0])), torch.zeros(len(peaks[1]))]).bool()[:, None]
    separation = torch.nan_to_num(auroc(torch.cat(peaks).float(), labels)[:, 0], nan=0.0)  # [F]
    gap = contrast_scores(dictionary, acts_with, acts_without)
    near = separation >= separation.max() - tie
    key = lambda f: (not bool(near[f]), -float(gap[f] if near[f] else separation[f]))  # noqa: E731
    order = sorted(range(len(gap)), key=key)
    return [int(f) for f in order[:n] if separation[f] > 0.5]


class FeatureDiff(NamedTuple):
    """One feature's mass on two images, as ranked by `diff`."""

    feature: int
    mass_a: float
    """Its activation summed over image A's tokens (averaged over the chosen steps)."""
    mass_b: float
    change: float
    """mass_b - mass_a: positive where B has more of it."""


def diff(
    dictionary, acts_a: torch.Tensor, acts_b: torch.Tensor, n: int = 10, *,
    steps: int | Sequence[int] | None = None, batch_a: int = 0, batch_b: int = 0,
    rank: Literal["specific", "change"] = "specific",
) -> list[FeatureDiff]:  # fmt: skip
    """The `n` features whose activation mass differs most between two images (e.g. two prompts from one
    seed): what one word of a prompt changes inside the model.

    acts_a, acts_b: captured activations [steps, batch, tokens, d] of the same site and steps.
    rank: "specific" (default) orders by change^2 / (mass_a + mass_b), a change both large and specific
    to one image; "change" by |change|, which puts dense, general features first (on 60 Shapes prompt
    pairs the top feature detects the changed attribute in 90% against 75%; results/own_image.json)."""
    acts_a, acts_b = check_acts(dictionary, acts_a), check_acts(dictionary, acts_b)
    if acts_a.shape[0] != acts_b.shape[0] or acts_a.shape[2] != acts_b.shape[2]:
        raise ValueError(
            f"diff compares images captured alike: got {acts_a.shape[0]} steps x {acts_a.shape[2]} tokens "
            f"against {acts_b.shape[0]} x {acts_b.shape[2]}; capture both at the same size and steps."
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}.")
    chosen = step_index(acts_a, steps)
    mass_a = _mass(dictionary, acts_a[chosen, batch_index(acts_a, batch_a)])
    mass_b = _mass(dictionary, acts_b[chosen, batch_index(acts_b, batch_b)])
    if rank not in ("specific", "change"):
        raise ValueError(f"rank must be 'specific' or 'change', got {rank!r}.")
    change = mass_b - mass_a
    score = change**2 / (mass_a.abs() + mass_b.abs()).clamp_min(1e-12) if rank == "specific" else change.abs()
    order = score.argsort(descending=True)[:n]
    return [FeatureDiff(int(f), float(mass_a[f]), float(mass_b[f]), float(change[f]))
            for f in order if change[f] != 0]  # fmt: skip
