"""How good is a dictionary? Two questions, answered separately.

Does it reconstruct? (`reconstruction_metrics`, on held-out activations x [N, d], x_hat = decode(encode(x)))
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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fluxsae.hooks import capture, edit_site


@torch.no_grad()
def reconstruction_metrics(dictionary, x: torch.Tensor, batch_size: int = 8192) -> dict[str, float]:
    """FVU, explained variance, r2_mean_dim, L0, dead share and density quantiles on x [N, d].

    x may live on another device than the dictionary (e.g. held-out activations in CPU memory and a
    dictionary on the GPU): batches go to the dictionary's device, the statistics come back to x's."""
    x = x.float()
    device = dictionary.device
    n_features = dictionary.cfg.n_features
    sq_err = 0.0
    fired = torch.zeros(n_features, dtype=torch.int64)
    nonzeros = 0
    x_hats = []
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        codes = dictionary.encode(xb.to(device))
        x_hat = dictionary.decode(codes).float().to(x.device)
        x_hats.append(x_hat)
        sq_err += (xb - x_hat).pow(2).sum().item()
        active = codes != 0
        fired += active.sum(0).cpu()
        nonzeros += active.sum().item()
    x_hat = torch.cat(x_hats)
    total = (x - x.mean(0)).pow(2).sum().item()
    fvu = sq_err / total
    xc, hc = x - x.mean(0), x_hat - x_hat.mean(0)
    corr = (xc * hc).sum(0) / (xc.norm(dim=0) * hc.norm(dim=0)).clamp_min(1e-12)
    density = fired.float() / len(x)
    return {
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "r2_mean_dim": corr.pow(2).mean().item(),
        "l0": nonzeros / len(x),
        "dead_fraction": (fired == 0).float().mean().item(),
        "density_median": density.median().item(),
        "density_max": density.max().item(),
        "n_tokens": len(x),
    }


def density_histogram(dictionary, x: torch.Tensor, bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of log10 feature density on x (dead features at -inf are left out)."""
    with torch.no_grad():
        fired = (dictionary.encode(x.float().to(dictionary.device)) != 0).float().mean(0).cpu().numpy()
    live = fired[fired > 0]
    return np.histogram(np.log10(live), bins=bins)


def _generation_kwargs(pipe, gen: dict, seed: int) -> dict:
    return {**gen, "generator": torch.Generator(pipe.device).manual_seed(seed)}


@torch.no_grad()
def spliced_effect(
    pipe, dictionary, prompts: Sequence[str], seeds: Sequence[int], generation: dict, site: str | None = None
) -> dict[str, float]:
    """Velocity and image errors of splicing `dictionary`'s reconstruction in at `site`, against mean
    ablation (see the module docstring). `generation`: the pipeline call arguments (height, width...)."""
    site = site or dictionary.site
    if len(prompts) != len(seeds):
        raise ValueError(f"Got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt.")

    def reconstruct(h, step):
        x_hat = dictionary.decode(dictionary.encode(h.float().to(dictionary.device)))
        return x_hat.to(h.device, h.dtype)

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
            errs.append(float(np.mean((out.images - clean) ** 2)))
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
