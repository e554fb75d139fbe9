"""The TopK SAE training step, shared by `training/train_sae.py` and the benchmarks.

loss = FVU (normalised space; for a Matryoshka SAE the mean FVU over its prefixes) + aux_coef x AuxK
loss; after each step the decoder rows are put back on the unit sphere, and the part of their gradient
that would only change their norm is removed first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fluxsae.sae import ForwardOutput, TopKSAE

log = logging.getLogger(__name__)


def make_optimizer(sae: TopKSAE, lr: float = 2e-4) -> torch.optim.Adam:
    """Adam with the reference work's settings: beta1 = 0, beta2 = 0.99, eps = 1e-10.

    beta1 = 0 (no momentum) suits TopK: a feature's gradient is zero on the steps it is not
    selected, and momentum would keep moving it anyway (benchmarks/README.md, "Design choices", has
    the comparison with default Adam). `fused=True` runs the update as one kernel over all
    parameters (CPU and CUDA).
    """
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.0, 0.99), eps=1e-10, fused=True)


def default_lr(n_features: int) -> float:
    """Adam's learning rate when none is given: 2e-4 / sqrt(n_features / 2**14), as sparsify picks."""
    return 2e-4 / (n_features / 2**14) ** 0.5


SCENE_EPS = 1e-6
"""Added to the total variance in `scene_consistency` (and to the norms in `scene_decorrelation` and
`scene_overlap`), so a feature silent on the whole batch costs 0."""


def _scene_codes(out: ForwardOutput, tokens_per_image: int, features: range) -> Tensor:
    """[images, tokens_per_image, len(features)] dense activations of `features` (0 where not selected)."""
    width = len(features)
    codes = out.values.new_zeros(out.values.shape[0], width)
    inside = (out.indices >= features.start) & (out.indices < features.stop)
    codes.scatter_add_(1, torch.where(inside, out.indices - features.start, 0), out.values * inside)
    return codes.view(-1, tokens_per_image, width)


def _mean_squared_pair_cosine(
    out: ForwardOutput, tokens_per_image: int, features: range, *, centred: bool
) -> Tensor:
    """Mean over pairs of `features` of the positive part, squared, of the cosine between their image
    means across the batch's images; `centred`: of their correlation instead."""
    means = _scene_codes(out, tokens_per_image, features).mean(1)  # [images, width]
    if centred:
        means = means - means.mean(0)
    means = means / (means.norm(dim=0) + SCENE_EPS)
    cos = means.T @ means
    width = cos.shape[0]
    off = cos - torch.diag(torch.diagonal(cos))
    return off.clamp_min(0).pow(2).sum() / (width * (width - 1))


def scene_consistency(out: ForwardOutput, tokens_per_image: int, features: range) -> Tensor:
    """Mean over `features` of within-image variance / total variance of their activations, for a
    batch of whole images (rows [i * T, (i + 1) * T) are image i, T = `tokens_per_image`; see
    `ActivationStore.image_batches`).

    0 when each feature is constant over every image (while differing between images, the share is
    of the batch's own spread), 1 when images explain none of its variance. Added to the loss, it
    asks those features to encode a property of the whole image, such as a scene's background, which
    a reconstruction loss alone leaves mixed into the object features next to it
    (benchmarks/README.md, "Interpretability").
    """
    codes = _scene_codes(out, tokens_per_image, features)
    within = codes.var(dim=1, correction=0).mean(0)
    total = codes.reshape(-1, codes.shape[-1]).var(0, correction=0)
    return (within / (total + SCENE_EPS)).mean()


def scene_decorrelation(out: ForwardOutput, tokens_per_image: int, features: range) -> Tensor:
    """Mean over pairs of `features` of their positive correlation across images, squared: each
    feature's mean activation over an image, correlated over the batch's images (same batch layout as
    `scene_consistency`; at least 2 features).

    0 when no two scene features rise together from image to image; 1 when all are copies of one.
    Negative correlation costs nothing, so features that each follow one kind of scene (one fires on
    black scenes, another on white ones) are free. Added to the loss, it stops scene features from
    duplicating one property of the scene and leaves them to find others.
    """
    return _mean_squared_pair_cosine(out, tokens_per_image, features, centred=True)


def scene_overlap(out: ForwardOutput, tokens_per_image: int, features: range) -> Tensor:
    """Mean over pairs of `features` of the squared cosine between their image means across the
    batch's images (uncentred: the activations are >= 0; same batch layout as `scene_consistency`;
    at least 2 features).

    0 when no two scene features fire on the same images; 1 when all are copies of one. Unlike
    `scene_decorrelation`, two features that both fire on one kind of scene overlap even when they
    anti-correlate elsewhere: a "dark" feature that fires on black scenes and half as much on gray
    ones overlaps a "light" one that does the reverse. So the scene features are pushed to split
    the scenes between them, one kind each, rather than share a brightness ramp.
    """
    return _mean_squared_pair_cosine(out, tokens_per_image, features, centred=False)


def train_step(
    model,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    *,
    clip_grad: float | None = None,
    extra_loss: Callable[[ForwardOutput], Tensor] | None = None,
    prefix_weights: Sequence[float] | None = None,
):
    """One optimisation step on raw activations x [N, d_in]; loss = fvu + aux_coef * aux_loss, plus
    `extra_loss(output of the forward pass)` when given (an experimental term).

    A Matryoshka SAE trains on the mean FVU of the whole dictionary and its nested prefixes; with
    `prefix_weights` (one per prefix, in `cfg.matryoshka` order; the whole dictionary weighs 1) on their
    weighted mean instead, so all 1s is the plain mean and 0 drops a prefix's term.

    `model` is a TopKSAE or a DistributedDataParallel wrapping one. Returns floats
    {"fvu", "aux_loss", "l0" (mean non-zeros per token), "dead_fraction"}, and "extra_loss" when given.
    """
    sae: TopKSAE = getattr(model, "module", model)
    out = model(x)
    reconstruction = out.fvu if out.loss is None else out.loss  # a Matryoshka SAE's loss covers its prefixes
    if prefix_weights is not None and out.prefix_fvus is not None:
        if len(prefix_weights) != len(out.prefix_fvus):
            raise ValueError(
                f"prefix_weights needs one weight per Matryoshka prefix {sae.cfg.matryoshka}, got "
                f"{tuple(prefix_weights)}"
            )
        w = out.prefix_fvus.new_tensor(prefix_weights)
        reconstruction = (out.fvu + (w * out.prefix_fvus).sum()) / (1 + w.sum())
    loss = reconstruction + sae.cfg.aux_coef * out.aux_loss if sae.cfg.aux_k else reconstruction
    extra = extra_loss(out) if extra_loss is not None else None
    if extra is not None:
        loss = loss + extra
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), clip_grad)
    optimizer.step()
    sae.set_decoder_norm_to_unit_norm()
    with torch.no_grad():
        l0 = (out.values > 0).sum(-1).to(out.fvu.dtype).mean()
        dead = sae.dead_mask().to(out.fvu.dtype).mean()
        fvu, aux, l0, dead = torch.stack([out.fvu, out.aux_loss, l0, dead]).tolist()
    if not math.isfinite(fvu):
        log.warning("train_step: FVU is %s", fvu)
    stats = {"fvu": fvu, "aux_loss": aux, "l0": l0, "dead_fraction": dead}
    return stats if extra is None else {**stats, "extra_loss": extra.item()}
