"""How good is a dictionary? Two questions, answered separately.

Does it reconstruct? (`reconstruction_metrics`, on held-out activations x [N, d] or a stream of
batches, x_hat = decode_sparse(encode_sparse(x)))
    FVU  = sum_i ||x_i - x_hat_i||^2 / sum_i ||x_i - mean(x)||^2      (fraction of variance unexplained)
    explained_variance = 1 - FVU
    r2_mean_dim = mean over dimensions j of corr(x[:, j], x_hat[:, j])^2   (the reference work's figure)
    L0 = mean number of non-zero codes per token; dead = share of features that never fire on x;
    density = per-feature firing frequency (share of tokens on which the feature is non-zero).

Does the model still work with it spliced in? (`spliced_effect`, on a pipeline and prompts)
    The site's activations are replaced by their reconstruction (every step, every token of the site's
    stream, both CFG passes), and, as the baseline, by their mean (mean ablation). Two errors:
    velocity: along the clean trajectory, the transformer's output with the site replaced vs the clean
        output at the same input, ||v_edit - v||^2 / ||v||^2 summed over steps and prompts;
    image: the final image of a whole generation with the site replaced vs the clean one at the same
        seed, mean squared pixel error in [0, 1].
    recovered = 1 - err_dictionary / err_mean_ablation   (1: as good as the clean model; 0: no better
    than erasing the site to its mean).
    `splice` and `image_mse` are those two pieces on their own, for one image (the app shows them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from fluxsae.hooks import capture, edit_site

CODE_ELEMENTS = 2**25
"""Encoding builds [rows, n_features] pre-activations (an SAE's encoder, a pursuit's inner products)
even when the codes it returns are sparse: batches are cut so that stays near this many elements
(128 MiB in float32; 8,192 rows at 4,096 features, 512 at FLUX.1's 65,536)."""


def _batches(x: torch.Tensor | Iterable, batch_size: int, n_features: int) -> Iterator[torch.Tensor]:
    """Batches [b, d] of a tensor [N, d] or of an iterable of batches (or of (batch, manifest) pairs,
    as `training.build_itda.manifest_batches` yields), at most `batch_size` rows and about
    CODE_ELEMENTS codes each."""
    rows = max(1, min(batch_size, CODE_ELEMENTS // max(n_features, 1)))
    for batch in [x] if torch.is_tensor(x) else x:
        batch = batch[0] if isinstance(batch, (tuple, list)) else batch
        batch = batch.reshape(-1, batch.shape[-1])
        for start in range(0, len(batch), rows):
            yield batch[start : start + rows]


def _active(dictionary, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The distinct (token, feature) pairs with a non-zero code, as token * n_features + feature: what
    `encode(x) != 0` marks, without the dense [tokens, n_features] codes (a pursuit may pad with
    zero coefficients or name an atom twice)."""
    n_features = dictionary.cfg.n_features
    values, indices = values.reshape(-1, values.shape[-1]), indices.reshape(-1, indices.shape[-1])
    token = torch.arange(len(values), device=values.device)[:, None].expand_as(indices)
    nonzero = values != 0
    return torch.unique(token[nonzero] * n_features + indices[nonzero])


@torch.no_grad()
def reconstruction_metrics(
    dictionary, x: torch.Tensor | Iterable, batch_size: int = 8192
) -> dict[str, float]:
    """FVU, explained variance, r2_mean_dim, L0, dead share and density quantiles (module docstring).

    x: activations [N, d], or an iterable of batches [b, d] (e.g. `ActivationStore.iter_rows`), so
    held-out sets larger than memory stream through; either is encoded in batches of at most
    `batch_size` rows (fewer for wide dictionaries: CODE_ELEMENTS). Codes stay sparse (`encode_sparse` /
    `decode_sparse`); the statistics are sums over tokens accumulated in float64 (for r2_mean_dim the
    per-dimension sums of x, x_hat, x^2, x_hat^2 and x * x_hat), so a stream gives the numbers the
    whole tensor would. Batches go to the dictionary's device (x may sit in CPU memory).
    """
    device, n_features = dictionary.device, dictionary.cfg.n_features
    f64 = torch.float64
    n, sq_err, nonzeros = 0, torch.zeros((), dtype=f64), 0
    sums = None  # [5, d]: x, x_hat, x^2, x_hat^2, x * x_hat
    fired = torch.zeros(n_features, dtype=torch.int64)
    for xb in _batches(x, batch_size, n_features):
        xb = xb.to(device).float()
        values, indices = dictionary.encode_sparse(xb)
        x_hat = dictionary.decode_sparse(values, indices).float()
        xd, hd = xb.to(f64), x_hat.to(f64)
        batch = torch.stack([xd.sum(0), hd.sum(0), xd.pow(2).sum(0), hd.pow(2).sum(0), (xd * hd).sum(0)])
        sums = batch if sums is None else sums + batch
        sq_err += (xb - x_hat).pow(2).sum().to(f64).cpu()
        active = _active(dictionary, values, indices)
        fired += torch.bincount(active % n_features, minlength=n_features).cpu()
        nonzeros += len(active)
        n += len(xb)
    if n == 0:
        raise ValueError("reconstruction_metrics got no tokens: pass activations [N, d] with N > 0.")
    s_x, s_h, s_xx, s_hh, s_xh = sums.cpu()
    var_x = (s_xx - s_x.pow(2) / n).clamp_min(0)
    var_h = (s_hh - s_h.pow(2) / n).clamp_min(0)
    cov = s_xh - s_x * s_h / n
    corr = cov / (var_x.sqrt() * var_h.sqrt()).clamp_min(1e-12)
    fvu = (sq_err / var_x.sum()).item()
    density = fired.float() / n
    return {
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "r2_mean_dim": corr.pow(2).mean().item(),
        "l0": nonzeros / n,
        "dead_fraction": (fired == 0).float().mean().item(),
        "density_median": density.median().item(),
        "density_max": density.max().item(),
        "n_tokens": n,
    }


@torch.no_grad()
def density_histogram(
    dictionary, x: torch.Tensor | Iterable, bins: int = 40, batch_size: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of log10 feature density on x ([N, d] or batches, as `reconstruction_metrics`); dead
    features (at -inf) are left out."""
    n_features = dictionary.cfg.n_features
    fired, n = torch.zeros(n_features, dtype=torch.int64), 0
    for xb in _batches(x, batch_size, n_features):
        values, indices = dictionary.encode_sparse(xb.to(dictionary.device).float())
        fired += torch.bincount(_active(dictionary, values, indices) % n_features, minlength=n_features).cpu()
        n += len(xb)
    density = (fired.double() / max(n, 1)).numpy()
    live = density[density > 0]
    return np.histogram(np.log10(live), bins=bins)


def _generation_kwargs(pipe, gen: dict, seed: int) -> dict:
    return {**gen, "generator": torch.Generator(pipe.device).manual_seed(seed)}


def _reconstruct(dictionary):
    def reconstruct(h, step):
        x_hat = dictionary.decode_sparse(*dictionary.encode_sparse(h.float().to(dictionary.device)))
        return x_hat.to(h.device, h.dtype)

    return reconstruct


@contextlib.contextmanager
def splice(pipe, dictionary, site: str | None = None) -> Iterator[None]:
    """Within the block, `site`'s activations (default: the dictionary's site) are replaced by
    `dictionary`'s reconstruction on every step, every token of the stream and both CFG passes, as
    `spliced_effect` measures; the hooks are removed on exit, exceptions included."""
    with edit_site(pipe, site or dictionary.site, _reconstruct(dictionary), cfg_pass="both"):
        yield


def image_mse(images: np.ndarray, clean: np.ndarray) -> float:
    """Mean squared pixel error between images in [0, 1] (pipelines' output_type="np")."""
    return float(np.mean((np.asarray(images, np.float64) - np.asarray(clean, np.float64)) ** 2))


@torch.no_grad()
def spliced_effect(
    pipe, dictionary, prompts: Sequence[str], seeds: Sequence[int], generation: dict, site: str | None = None
) -> dict[str, float]:
    """Velocity and image errors of splicing `dictionary`'s reconstruction in at `site`, against mean
    ablation (see the module docstring). `generation`: the pipeline call arguments (height, width...)."""
    site = site or dictionary.site
    if len(prompts) != len(seeds):
        raise ValueError(f"Got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt.")

    reconstruct = _reconstruct(dictionary)
    calls: list[dict] = []
    images, mean_sum, mean_n = [], None, 0

    def keep_inputs(module, args, kwargs):
        calls.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})

    for prompt, seed in zip(prompts, seeds, strict=True):
        handle = pipe.transformer.register_forward_pre_hook(keep_inputs, with_kwargs=True)
        try:
            with capture(pipe, site, cfg_pass="cond") as acts:
                out = pipe(prompt, output_type="np", **_generation_kwargs(pipe, generation, seed))
        finally:
            handle.remove()
        images.append(out.images)
        a = acts[site].float()  # the mean-ablation value: the site's mean over all clean tokens, [d]
        mean_sum = a.sum((0, 1, 2)) if mean_sum is None else mean_sum + a.sum((0, 1, 2))
        mean_n += a.shape[0] * a.shape[1] * a.shape[2]
    mean = mean_sum / mean_n

    def ablate(h, step):
        return mean.to(h.device, h.dtype).expand_as(h).clone()  # captured on the CPU, h may be on a GPU

    def velocity_error(fn) -> float:
        num = den = 0.0
        for kwargs in calls:
            clean = pipe.transformer(**{**kwargs, "return_dict": False})[0]
            with edit_site(pipe, site, fn, cfg_pass="both"):
                edited = pipe.transformer(**{**kwargs, "return_dict": False})[0]
            num += (edited.float() - clean.float()).pow(2).sum().item()
            den += clean.float().pow(2).sum().item()
        return num / den

    def image_error(fn) -> float:
        errs = []
        for prompt, seed, clean in zip(prompts, seeds, images, strict=True):
            with edit_site(pipe, site, fn, cfg_pass="both"):
                out = pipe(prompt, output_type="np", **_generation_kwargs(pipe, generation, seed))
            errs.append(image_mse(out.images, clean))
        return float(np.mean(errs))

    result = {
        "velocity_err": velocity_error(reconstruct),
        "velocity_err_mean_ablation": velocity_error(ablate),
        "image_mse": image_error(reconstruct),
        "image_mse_mean_ablation": image_error(ablate),
    }
    result["velocity_recovered"] = 1 - result["velocity_err"] / result["velocity_err_mean_ablation"]
    result["image_recovered"] = 1 - result["image_mse"] / result["image_mse_mean_ablation"]
    result["n_prompts"] = len(prompts)
    return result
