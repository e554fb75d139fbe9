"""Token activations -> a map on the image grid -> a colour overlay on the generated image.

Flux packs the VAE latent into 2x2 patches, so image token `i` covers the square at row
`i // cols`, column `i % cols` of an (H / (vae_scale_factor * 2)) x (W / (vae_scale_factor * 2))
grid, in row-major order: 16x16 px per token for FLUX.1 (VAE x8), 8x8 px for the Shapes model
(VAE x4). Maps are upsampled with NEAREST so every token stays a crisp square: a smooth upsampling
would paint activation onto pixels the token never saw.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def token_grid(pipe, height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of the image-token grid for a `height` x `width` generation with `pipe`.

    `pipe` is a FluxPipeline (anything with `vae_scale_factor`). FLUX.1 at 1024 px: (64, 64);
    the Shapes model at 64 px: (8, 8).
    """
    factor = getattr(pipe, "vae_scale_factor", None)
    if not factor:
        raise ValueError(f"{type(pipe).__name__} has no vae_scale_factor: pass a diffusers FluxPipeline.")
    patch = int(factor) * 2  # VAE down-sampling, then Flux's 2x2 packing
    if height <= 0 or width <= 0 or height % patch or width % patch:
        raise ValueError(
            f"Image size {height}x{width} px does not split into whole tokens of {patch}x{patch} px "
            f"(vae_scale_factor {factor} x 2x2 packing): use multiples of {patch}."
        )
    return height // patch, width // patch


def token_map(values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Lay per-token `values` [tokens] out on the image grid: -> [rows, cols] (row-major)."""
    values = torch.as_tensor(values)
    rows, cols = grid
    if values.ndim != 1 or values.numel() != rows * cols:
        raise ValueError(
            f"A {rows}x{cols} token grid needs {rows * cols} values (one per image token), got a tensor "
            f"of shape {tuple(values.shape)}. Text-stream sites have no position on the image."
        )
    return values.reshape(rows, cols)


def activation_norms(acts: torch.Tensor, step: int = -1, batch: int = 0) -> torch.Tensor:
    """L2 norm of each token's activation: acts [steps, batch, tokens, d] -> [tokens] (float32)."""
    if acts.ndim != 4:
        raise ValueError(f"Expected activations [steps, batch, tokens, d], got shape {tuple(acts.shape)}.")
    n_steps, n_batch = acts.shape[:2]
    if not -n_steps <= step < n_steps:
        raise IndexError(f"Step {step} is out of range: {n_steps} steps were captured.")
    if not -n_batch <= batch < n_batch:
        raise IndexError(f"Batch index {batch} is out of range: the batch has {n_batch} images.")
    return acts[step, batch].float().norm(dim=-1)


def colorize(
    grid_values: torch.Tensor,
    size: tuple[int, int] | None = None,
    cmap: str = "inferno",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Image.Image:
    """A standalone RGB heatmap of `grid_values` [rows, cols], NEAREST-upsampled to `size` (w, h).

    Values are scaled to [0, 1] between `vmin` and `vmax` (default: the map's min and max) and
    clipped; a constant map takes the colormap's lowest colour.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("Heatmaps need matplotlib: `pip install 'fluxsae[app]'`.") from e

    v = torch.as_tensor(grid_values).detach().float().cpu()
    if v.ndim != 2:
        raise ValueError(f"A heatmap needs a 2-D map [rows, cols], got shape {tuple(v.shape)}.")
    if not torch.isfinite(v).all():
        raise ValueError("The heatmap values contain NaN or infinite entries; check the activations.")
    lo = float(v.min()) if vmin is None else float(vmin)
    hi = float(v.max()) if vmax is None else float(vmax)
    span = hi - lo
    scaled = ((v - lo) / span).clamp(0, 1) if span > 0 else torch.zeros_like(v)
    rgba = matplotlib.colormaps[cmap](scaled.numpy(), bytes=True)  # [rows, cols, 4] uint8
    heat = Image.fromarray(np.ascontiguousarray(rgba[..., :3]))
    return heat if size is None else heat.resize(size, Image.Resampling.NEAREST)


def overlay(
    image: Image.Image,
    grid_values: torch.Tensor,
    cmap: str = "inferno",
    alpha: float = 0.55,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Image.Image:
    """Blend a heatmap of `grid_values` [rows, cols] over `image`: alpha 0 is the image, 1 the map.

    Each token becomes a crisp square of `image.size / grid` pixels (NEAREST upsampling).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    heat = colorize(grid_values, image.size, cmap=cmap, vmin=vmin, vmax=vmax)
    return Image.blend(image.convert("RGB"), heat, alpha)
