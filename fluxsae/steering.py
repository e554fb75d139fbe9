"""Steer a generation with dictionary features: add their directions, or clamp their activations.

    with fluxsae.steer(pipe, sae, {feature: 4.0}):              # add, default steps
        image = pipe(prompt, ...).images[0]
    with fluxsae.steer(pipe, sae, {red: 0.0}, mode="clamp"):   # ablate a feature
        ...
    with fluxsae.steer(pipe, [(sae_d3, {f: 0.8}), (sae_s2, {g: 0.8}), (sae_d3, {a: 0}, "clamp")]):
        ...                                                     # several sites / modes at once

- "add": h[tokens] += sum_f strength_f x mean token norm x unit direction_f. Strength is in units
  of the site's mean token norm (`cfg.mean_token_norm`), so 1.0 moves a token by a typical token's
  length whatever the model's scale.
- "clamp": encode the tokens, set each feature's activation to the given value (in the
  dictionary's code units; 0 ablates), decode, and keep the reconstruction error:
  h_new = h + decode(codes_clamped) - decode(codes). Both dictionaries decode affinely, so this is
  computed as h + sum_f (value_f - code_f) x raw decoder row_f: exact, and a bit-exact no-op where
  nothing changes.

Image sites steer the image tokens in `region`, text sites the text tokens in theirs (all by default).
On the Shapes model a caption's attributes are best changed in the text stream (the packaged SAEs
cover the text stream of every double block; `fluxsae.features.contrast_features` finds a word's
feature):

    swap = [e for sae in text_saes for e in ((sae, {red[sae.site]: 0.0}, "clamp"),
                                              (sae, {blue[sae.site]: DEFAULT_TEXT_STRENGTH}, "add"))]
    with fluxsae.steer(pipe, swap):         # text sites: every step (DEFAULT_TEXT_STEPS)
        ...
Everything is checked before the context is entered, and the hooks (fluxsae.hooks.edit_site)
are removed in `finally`: bad input raises ValueError with the pipeline untouched, and an
exception during generation leaves it exactly as it was.

Defaults (DEFAULT_STEPS, DEFAULT_TEXT_STEPS, DEFAULT_STRENGTH, DEFAULT_TEXT_STRENGTH,
DEFAULT_CFG_PASS) are what `python benchmarks/steering.py` found best on the Shapes model
(benchmarks/README.md, "Steering"; benchmarks/results/steering.json).
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fluxsae.hooks import CfgPass, edit_site
from fluxsae.hub import check_matches_pipeline
from fluxsae.sites import Site, validate_site

logger = logging.getLogger(__name__)

Mode = Literal["add", "clamp"]

DEFAULT_STEPS: slice = slice(-4, None)
"""Denoising steps steered by default: the last four (a slice is applied to range(number of steps)
when the generation runs; on the 8-step Shapes model, steps 4-7). Colour is settled late: adding
the packaged (Matryoshka) SAE's best colour feature at transformer_blocks.3.image, strength 4, turned
and kept the object in 10% of 30 trials on steps 4-7, 3% on 6-7, 2-7 and 0-7, 0% on 0-3, where the
shape and cell broke in 43-80% of trials (reference work: the first 5 of 7 steps, on FLUX.1)."""
DEFAULT_TEXT_STEPS: None = None
"""Steps steered at a text-stream site when `steps` is left at its default: all of them. The caption's
colour counts on every step: the text-SAE colour swap turned B in 87% of 30 sweep trials on steps 0-7,
53% on 4-7, 20% on 0-3 (benchmarks/README.md, "Steering")."""
DEFAULT_STRENGTH: float = 4.0
"""Strength given to features passed as a list of ids (add mode), in mean token norms. On steps
4-7: 0, 0, 3, 10% turned and kept at strengths 0.5, 1, 2, 4. No strength reaches the 80% target with
one image feature; benchmarks/README.md, "Steering", has what does better (the text stream)."""
DEFAULT_TEXT_STRENGTH: float = 0.6
"""The same for a text-stream site, where every later block reads the caption. The recipe that turns
a colour (python benchmarks/steering.py, the packaged text-stream SAEs): at the text stream of all
four double blocks, clamp colour A's 3 best features to 0 and add B's best at 0.6, on every step
(steps=None): B in 82.5% of 120 trials with shape and cell kept in 87.5%; shapes 90% / 98%. On the
sweep, strengths 0.3 / 0.6 / 1.0 turned and kept 70 / 83 / 73%; steps 4-7 only, 50%. With
cfg_pass="cond" it costs 1.07x a plain generation instead of 1.13x, at the same colour rate."""
DEFAULT_CFG_PASS: CfgPass = "both"
"""With true CFG (`true_cfg_scale > 1`), which transformer pass is steered. Steering only "cond"
turns more (33% vs 20% at strength 2) but breaks the object (kept 27% vs 77%)."""
MAX_NORM_RATIO: float = 1000.0
"""An "add" plan refuses, at the generation's first step, a mean_token_norm more than this many times
larger or smaller than the norm of the tokens it steers: strengths are in its units, so such a dictionary
(a corrupt cfg, another model's) would blow the image up into NaN or do nothing."""
MAX_STRENGTH: float = 100.0
"""Largest |strength| accepted, in mean token norms (add), and the largest change a clamp may make
(|value - 0| x the feature's decoder row norm, in mean token norms). A token's own norm is ~1 on
this scale; beyond 100 the image is noise, so larger values are taken for a unit mix-up."""

Features = Mapping[int, float] | Sequence[int]


@dataclass(frozen=True)
class DirectionsConfig:
    """The part of a dictionary config that steering reads, for `Directions`."""

    site: str
    """Where the directions live, e.g. "transformer_blocks.3.text"."""
    d_in: int
    """Residual width."""
    n_features: int
    """How many directions."""
    mean_token_norm: float
    """Mean L2 norm of a token at `site`: the unit of strength."""
    base_model: str = ""
    """The model the directions come from ("" skips the check)."""


class Directions:
    """Plain steering directions at a site (a difference of means, a probe, a feature moved to
    another site), usable with `steer(..., mode="add")` like a dictionary's features.

    directions: [n, d] or [d], any norm (normalised here); mean_token_norm: of `site`'s tokens.
    """

    def __init__(
        self, directions: torch.Tensor, site: str | Site, mean_token_norm: float, base_model: str = ""
    ):
        d = torch.as_tensor(directions).detach().float()
        d = d[None] if d.ndim == 1 else d
        if d.ndim != 2 or not torch.isfinite(d).all() or (d.norm(dim=1) == 0).any():
            raise ValueError(
                f"Directions must be a finite [n, d] or [d] tensor with no zero row, got {tuple(d.shape)}."
            )
        self.directions = d / d.norm(dim=1, keepdim=True)
        self.cfg = DirectionsConfig(str(site), d.shape[1], d.shape[0], float(mean_token_norm), base_model)

    @property
    def site(self) -> str:
        return self.cfg.site


@dataclass
class _Plan:
    """One validated edit: rows [F, d] float32 and targets [F] for `features` at `site`."""

    site: Site
    mode: Mode
    features: tuple[int, ...]
    targets: torch.Tensor
    rows: torch.Tensor
    dictionary: object
    region: torch.Tensor | None  # long token indices, or None for every token
    n_tokens: int | None  # the image token count `region` was made for
    mean_token_norm: float  # the unit of strength

    @property
    def is_noop(self) -> bool:
        return self.mode == "add" and not bool(self.targets.any())


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a real number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value}: strengths and clamp values must be finite numbers.")
    return value


def _features(
    features: Features | None, n_features: int, mode: Mode, default: float = DEFAULT_STRENGTH
) -> dict[int, float]:
    if features is None or (not isinstance(features, Mapping) and isinstance(features, (str, bytes))):
        raise ValueError(
            f"features must be a dict {{feature id: strength}} (or a list of ids), got {features!r}."
        )
    if not isinstance(features, Mapping):
        if mode == "clamp":
            raise ValueError("mode='clamp' needs a value per feature: pass {feature: value}, e.g. {12: 0.0}.")
        features = dict.fromkeys(features, default)
    if not features:
        raise ValueError("features is empty: pass at least one {feature id: strength} to steer with.")
    out = {}
    for f, s in features.items():
        if isinstance(f, bool) or not isinstance(f, numbers.Integral):
            raise ValueError(f"Feature ids must be integers, got {f!r} ({type(f).__name__}).")
        if not 0 <= int(f) < n_features:
            raise ValueError(
                f"Unknown feature {f}: this dictionary has features 0-{n_features - 1} "
                f"(cfg.n_features={n_features})."
            )
        out[int(f)] = _number(s, f"The {'value' if mode == 'clamp' else 'strength'} of feature {f}")
    return out


def _check_dictionary(pipe, dictionary) -> Site:
    missing = [a for a in ("directions", "cfg", "site") if not hasattr(dictionary, a)]
    if missing:
        raise ValueError(
            f"steer takes a fluxsae dictionary (TopKSAE, ITDA) or fluxsae.steering.Directions; "
            f"{type(dictionary).__name__} has no {', '.join(missing)}."
        )
    cfg = dictionary.cfg
    if str(dictionary.site) != str(cfg.site):
        raise ValueError(f"The dictionary's site {dictionary.site!r} differs from its cfg.site {cfg.site!r}.")
    site = validate_site(pipe, cfg.site)  # SiteError (a ValueError): no such block in this pipeline
    check_matches_pipeline(dictionary, pipe)  # DictionaryMismatchError: other base model or width
    shape = tuple(dictionary.directions.shape)
    if shape != (cfg.n_features, cfg.d_in):
        raise ValueError(
            f"The dictionary at {site} has directions of shape {shape}, but cfg says "
            f"[n_features={cfg.n_features}, d_in={cfg.d_in}]; the dictionary files are inconsistent."
        )
    return site


def _mean_token_norm(dictionary, override: float | None) -> float:
    m = override if override is not None else getattr(dictionary.cfg, "mean_token_norm", 0.0)
    m = _number(m, "mean_token_norm")
    if m <= 0:
        raise ValueError(
            f"The dictionary at {dictionary.site} records no mean token norm (cfg.mean_token_norm={m}): "
            "pass mean_token_norm=..., measured as captured tokens' .norm(dim=-1).mean()."
        )
    if not math.isfinite(m * MAX_STRENGTH * MAX_NORM_RATIO):
        raise ValueError(
            f"mean_token_norm={m:g} of the dictionary at {dictionary.site} is not a token norm (steering by "
            "it would overflow); its cfg.json is damaged or from another model: pass mean_token_norm=..., "
            "measured as captured tokens' .norm(dim=-1).mean()."
        )
    return m


def _token_grid(pipe, height: int | None, width: int | None) -> tuple[int, int, int]:
    """(rows, cols, pixels per token side) of the image tokens for a generation of this size.

    Without height/width, the size the pipeline uses when called without them, except for the
    Shapes model, whose callers always pass fluxsae.shapes.GENERATION_DEFAULTS.
    """
    if height is None or width is None:
        if getattr(pipe, "fluxsae_base_model", None) == "shapes":
            from fluxsae.shapes import GENERATION_DEFAULTS

            default_h, default_w = GENERATION_DEFAULTS["height"], GENERATION_DEFAULTS["width"]
        else:
            default_h = default_w = pipe.default_sample_size * pipe.vae_scale_factor
        height, width = height or default_h, width or default_w
    patch = pipe.vae_scale_factor * 2  # VAE down-sampling, then 2x2 packing into one token
    return int(height) // patch, int(width) // patch, patch


def _bool_mask(region) -> torch.Tensor:
    """A region as a bool tensor on the CPU: bool, or integers that are all 0 or 1."""
    if isinstance(region, (str, bytes)) or not isinstance(region, (torch.Tensor, np.ndarray, Sequence)):
        raise ValueError(
            f"region must be a bool mask (a tensor, array or nested list: the token grid, or a pixel mask), "
            f"got {region!r} ({type(region).__name__}); e.g. a [rows, cols] mask with True on the tokens to "
            "steer, or fluxsae.steering.region_mask."
        )
    try:
        if isinstance(region, torch.Tensor):
            mask = region.detach().cpu()
        else:
            mask = torch.as_tensor(np.asarray(region))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"region must be a bool mask, got a {type(region).__name__} that is not one ({e})."
        ) from e
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
        raise ValueError(
            f"region must be a bool mask (or 0/1 integers), got dtype {mask.dtype}; for a soft or "
            "0-255 mask pass e.g. mask > 0.5."
        )
    return mask.bool()


def _region_tokens(region, pipe, height, width) -> tuple[torch.Tensor, int]:
    """A region -> (long token indices, image token count). See `steer` for what a region may be."""
    rows, cols, patch = _token_grid(pipe, height, width)
    mask = _bool_mask(region)
    if tuple(mask.shape) in ((rows * cols,), (rows, cols)):
        tokens = mask.reshape(-1)
    elif tuple(mask.shape) == (rows * patch, cols * patch):
        # A token is in the region when at least half of its pixels are.
        cover = mask.float().reshape(rows, patch, cols, patch).mean(dim=(1, 3))
        tokens = (cover >= 0.5).reshape(-1)
    else:
        raise ValueError(
            f"region has shape {tuple(mask.shape)}; for a {rows * patch}x{cols * patch} image it must be "
            f"the token grid [{rows}, {cols}] (or flat [{rows * cols}]) or a pixel mask "
            f"[{rows * patch}, {cols * patch}]. For another image size pass height=, width= to steer."
        )
    if not tokens.any():
        raise ValueError("region selects no token (a pixel mask selects tokens >= half covered).")
    return tokens.nonzero().flatten(), rows * cols


def region_mask(
    region, pipe, height: int | None = None, width: int | None = None
) -> tuple[torch.Tensor, int, int]:
    """An image region as `steer` takes it -> (bool [rows * cols] token mask, rows, cols)."""
    tokens, n_tokens = _region_tokens(region, pipe, height, width)
    rows, cols, _ = _token_grid(pipe, height, width)
    mask = torch.zeros(n_tokens, dtype=torch.bool)
    mask[tokens] = True
    return mask, rows, cols


def _text_tokens(region) -> tuple[torch.Tensor, int]:
    """A text-site region: a bool (or 0/1) mask over the text tokens -> (long indices, text token count)."""
    mask = _bool_mask(region)
    if mask.ndim != 1:
        raise ValueError(
            f"At a text site, region is a bool mask over the text tokens [max_sequence_length], got "
            f"shape {tuple(mask.shape)}; e.g. the tokens of one object's words."
        )
    if not mask.any():
        raise ValueError("region selects no text token.")
    return mask.nonzero().flatten(), mask.numel()


def decoder_rows(dictionary, features: Iterable[int]) -> torch.Tensor:
    """Raw-space decoder rows [F, d] float32 of `features`: decode(e_f) - decode(0), exact for affine
    decoders (TopK SAEs, ITDA). What one unit of a feature's code adds to a token; `directions` are
    these rows normalised."""
    features = list(features)
    n = dictionary.cfg.n_features
    with torch.no_grad():
        unit = torch.zeros(len(features) + 1, n, device=dictionary.directions.device)
        unit[torch.arange(len(features)), torch.tensor(list(features))] = 1.0
        out = dictionary.decode(unit).float()
    return (out[:-1] - out[-1]).cpu()


def _plan(pipe, dictionary, features, mode, region, height, width, mean_token_norm) -> _Plan:
    if mode not in ("add", "clamp"):
        raise ValueError(f"mode must be 'add' or 'clamp', got {mode!r}.")
    site = _check_dictionary(pipe, dictionary)
    default = DEFAULT_TEXT_STRENGTH if site.stream == "text" else DEFAULT_STRENGTH
    feats = _features(features, int(dictionary.cfg.n_features), mode, default)
    ids = tuple(feats)
    m = _mean_token_norm(dictionary, mean_token_norm)
    targets = torch.tensor([feats[f] for f in ids], dtype=torch.float32)
    if mode == "add":
        bad = {f: s for f, s in feats.items() if abs(s) > MAX_STRENGTH}
        if bad:
            raise ValueError(
                f"Strengths {bad} exceed +-{MAX_STRENGTH:g} mean token norms; strength is in units of "
                f"the site's mean token norm ({m:.4g}), typical values are 0.5-4."
            )
        rows = m * dictionary.directions[list(ids)].detach().float().cpu()
    else:
        if not (hasattr(dictionary, "encode_sparse") and hasattr(dictionary, "decode")):
            raise ValueError(
                f"mode='clamp' needs a dictionary that encodes (TopKSAE, ITDA); {type(dictionary).__name__} "
                "does not. Use mode='add' with it."
            )
        rows = decoder_rows(dictionary, ids)
        change = targets.abs() * rows.norm(dim=1) / m
        if (change > MAX_STRENGTH).any():
            raise ValueError(
                f"Clamp values {feats} would move tokens by up to {change.max():.3g} mean token norms "
                f"(limit {MAX_STRENGTH:g}); clamp values are in the dictionary's code units."
            )
    tokens, n_tokens = None, None
    if region is not None:
        text = site.stream == "text"
        tokens, n_tokens = _text_tokens(region) if text else _region_tokens(region, pipe, height, width)
    return _Plan(site, mode, ids, targets, rows, dictionary, tokens, n_tokens, m)


def _edit(plan: _Plan):
    """The edit function for `edit_site`: h [batch, tokens, d] -> steered h (h itself when unchanged)."""
    cache: dict = {}

    def place(h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if plan.region is None:
            return h + delta
        out = h.clone()
        out[:, plan.region.to(h.device)] += delta
        return out

    def check(h: torch.Tensor) -> None:
        if plan.n_tokens is not None and h.shape[1] != plan.n_tokens:
            if plan.site.stream == "text":
                raise ValueError(
                    f"The region masks {plan.n_tokens} text tokens but {plan.site} has {h.shape[1]}: make "
                    "the mask as long as the generation's max_sequence_length."
                )
            raise ValueError(
                f"The region was made for {plan.n_tokens} image tokens but {plan.site} has {h.shape[1]}: "
                "pass steer the height= and width= of the generation."
            )

    def check_norm(h: torch.Tensor) -> None:
        """Once: the unit of strength must be of the order of the tokens it moves."""
        if "norm" in cache:
            return
        actual = float(h.detach().float().norm(dim=-1).mean())
        cache["norm"] = actual
        m = plan.mean_token_norm
        if actual > 0 and not 1 / MAX_NORM_RATIO <= m / actual <= MAX_NORM_RATIO:
            raise ValueError(
                f"The dictionary at {plan.site} says its tokens' mean norm is {m:.4g}, but this "
                f"generation's tokens there have a mean norm of {actual:.4g}: strengths are in units of the "
                f"former, so the edit would {'blow the image up' if m > actual else 'do nothing'}. Its "
                "cfg.json is damaged or from another model or resolution: pass mean_token_norm=..."
            )

    def add(h: torch.Tensor, step: int) -> torch.Tensor:
        check(h)
        check_norm(h)
        key = (h.device, h.dtype)
        if key not in cache:
            cache[key] = (plan.targets @ plan.rows).to(device=h.device).to(h.dtype)
        return place(h, cache[key])

    def clamp(h: torch.Tensor, step: int) -> torch.Tensor:
        check(h)
        d = plan.dictionary
        if "ids" not in cache:
            # (`directions` is computed afresh each time it is read: once is enough for the device.)
            cache["dev"] = dev = d.directions.device
            cache["ids"] = torch.tensor(plan.features, device=dev)
            cache["targets"], cache["rows"] = plan.targets.to(dev), plan.rows.to(dev)
        dev = cache["dev"]
        x = h if plan.region is None else h[:, plan.region.to(h.device)]
        with torch.no_grad():
            values, indices = d.encode_sparse(x.to(dev))[:2]
        # Sum over slots: ITDA pads unused slots with (coefficient 0, index 0).
        hits = indices.unsqueeze(-1) == cache["ids"]  # [b, t, k, F]
        current = (values.float().unsqueeze(-1) * hits).sum(-2)  # [b, t, F]
        change = cache["targets"] - current
        if not bool(change.any()):
            return h
        return place(h, (change @ cache["rows"]).to(device=h.device, dtype=h.dtype))

    return add if plan.mode == "add" else clamp


def _steps(steps: Iterable[int] | slice | None) -> frozenset[int] | slice | None:
    if steps is None:
        return None
    if isinstance(steps, slice):
        parts = [p for p in (steps.start, steps.stop, steps.step) if p is not None]
        if any(isinstance(p, bool) or not isinstance(p, numbers.Integral) for p in parts) or (
            steps.step is not None and steps.step <= 0
        ):
            raise ValueError(
                f"A steps slice takes integers and a positive step, e.g. slice(-4, None); got {steps}."
            )
        return steps
    steps = [steps] if isinstance(steps, numbers.Integral) else list(steps)
    if not steps:
        raise ValueError("steps is empty: nothing would be steered; pass e.g. range(0, 5), or None for all.")
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in steps):
        raise ValueError(f"steps must be denoising step indices >= 0 (from 0), got {steps}.")
    return frozenset(int(s) for s in steps)


@contextlib.contextmanager
def steer(
    pipe,
    dictionary,
    features: Features | None = None,
    steps: Iterable[int] | slice | None = DEFAULT_STEPS,
    region=None,
    mode: Mode = "add",
    *,
    cfg_pass: CfgPass = DEFAULT_CFG_PASS,
    height: int | None = None,
    width: int | None = None,
    mean_token_norm: float | None = None,
) -> Iterator[None]:
    """Steer every generation run inside the block with dictionary features.

    Args:
        pipe: a diffusers FluxPipeline (FLUX.1, the Shapes model).
        dictionary: a TopKSAE, ITDA or `Directions`; it steers at its own `site`, after checking that
            the pipeline has that site and is the dictionary's base model and width. Or a list of
            `(dictionary, features)` / `(dictionary, features, mode)` to steer several sites (or
            clamp one feature and add another) at once; `features` is then left out. Nesting
            `steer` blocks works too: their edits apply in the order the blocks were entered.
        features: {feature id: strength} (add, in mean token norms; negative suppresses) or
            {feature id: value} (clamp, in code units; 0 ablates). A list of ids adds each at
            DEFAULT_STRENGTH (DEFAULT_TEXT_STRENGTH at a text site). Several features stack.
        steps: denoising step indices to steer (from 0); a slice of range(number of steps), resolved
            when the generation runs (slice(-4, None): the last four); None for all. Left at its
            default, image sites take DEFAULT_STEPS and text sites DEFAULT_TEXT_STEPS (all).
        region: the tokens to steer (None: all). Image sites: a bool (or 0/1) mask over the token
            grid [rows, cols], flat [rows * cols], or a pixel mask [height, width], in which a token
            is in when >= half of its pixels are. Text sites: a bool mask over the text tokens
            [max_sequence_length], e.g. the words of one object. A list that mixes text and image
            sites takes no region: nest two `steer` blocks instead.
        mode: "add" or "clamp" (see the module docstring).
        cfg_pass: with true CFG, steer the "cond" pass, the "uncond" pass or "both".
        height, width: the image size the region is for; default the pipeline's default size
            (for the Shapes model fluxsae.shapes.GENERATION_DEFAULTS).
        mean_token_norm: overrides `dictionary.cfg.mean_token_norm` (the unit of strength).

    Raises ValueError (SiteError, DictionaryMismatchError) before anything is hooked for: unknown
    feature ids, an empty features dict, a site the pipeline lacks, another base model or width, a
    region of the wrong shape (an image mask at a text site, or the reverse), NaN/inf strengths or
    |strength| > MAX_STRENGTH, a bad mode, cfg_pass or steps, a mean_token_norm that is not a number a
    token could have. What only the generation knows raises ValueError at its first step, before any
    edit, with the hooks then removed: steps it does not have (steps=[100] on 8 steps), and a
    mean_token_norm more than MAX_NORM_RATIO times off the norm of the tokens steered ("add").
    All-zero strengths change nothing, bit for bit.
    """
    if isinstance(dictionary, (list, tuple)):
        if features is not None:
            raise ValueError("With a list of (dictionary, features[, mode]) leave the features argument out.")
        specs = list(dictionary)
        if not specs:
            raise ValueError("steer got an empty list: pass (dictionary, {feature: strength}) pairs.")
    else:
        specs = [(dictionary, features)]
    if cfg_pass not in ("cond", "uncond", "both"):
        raise ValueError(f"cfg_pass must be 'cond', 'uncond' or 'both', got {cfg_pass!r}.")
    keep = _steps(steps)
    by_default = steps is DEFAULT_STEPS  # then text sites take DEFAULT_TEXT_STEPS
    plans = []
    for spec in specs:
        if not isinstance(spec, (list, tuple)) or len(spec) not in (2, 3):
            raise ValueError(
                f"Each entry must be (dictionary, features) or (dictionary, features, mode), got {spec!r}."
            )
        d, f, m = (*spec, mode) if len(spec) == 2 else spec
        plans.append(_plan(pipe, d, f, m, region, height, width, mean_token_norm))
    logger.debug("steering %s on steps %s", [(str(p.site), p.mode, p.features) for p in plans], keep)
    with contextlib.ExitStack() as stack:
        for plan in plans:
            if plan.is_noop:
                continue
            fn = _edit(plan)
            here = DEFAULT_TEXT_STEPS if by_default and plan.site.stream == "text" else keep
            if here is not None:
                fn = _on_steps(pipe, here, fn)
            stack.enter_context(edit_site(pipe, plan.site, fn, None, cfg_pass=cfg_pass))
        yield


def _on_steps(pipe, steps: frozenset[int] | slice, fn):
    """Apply `fn` only on `steps` of the running generation (a slice: range(number of steps)[steps]).
    Steps the generation does not have raise ValueError at its first step: a silent no-op would look
    like a feature that does nothing."""

    def edit(h: torch.Tensor, step: int) -> torch.Tensor:
        # FluxPipeline sets the scheduler's timesteps before the first transformer call.
        timesteps = getattr(pipe.scheduler, "timesteps", None)
        total = len(timesteps) if timesteps is not None else 0
        if not total:  # no scheduler to ask: steer the steps asked for
            return fn(h, step) if isinstance(steps, frozenset) and step in steps else h
        chosen = range(total)[steps] if isinstance(steps, slice) else steps
        outside = [] if isinstance(steps, slice) else sorted(s for s in steps if s >= total)
        if outside or not chosen:
            what = f"steps {outside}" if outside else f"steps={steps}"
            raise ValueError(
                f"{what} {'are' if outside else 'selects no step'} outside this generation's {total} "
                f"denoising steps (0-{total - 1}); pass steps within range(num_inference_steps), or a "
                "slice such as slice(-4, None) (the last four, whatever the number of steps)."
            )
        return fn(h, step) if step in chosen else h

    return edit
