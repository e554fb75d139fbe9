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


def step_map(token_values: torch.Tensor, grid: tuple[int, int], steps=None) -> torch.Tensor:
    """One feature's token activations -> its map on the image grid, per step or averaged over steps.

    token_values: [tokens] (one step) or [steps, tokens] (e.g. `fluxsae.features.feature_activations`).
    steps: None averages every step, an int picks one, a sequence averages those. -> [rows, cols].
    """
    v = torch.as_tensor(token_values).detach().float()
    if v.ndim == 2:
        n = v.shape[0]
        chosen = list(range(n)) if steps is None else [steps] if isinstance(steps, int) else list(steps)
        if not chosen or any(not -n <= int(s) < n for s in chosen):
            raise ValueError(f"steps {steps!r} do not index the {n} steps of the activations (0-{n - 1}).")
        v = v[[int(s) for s in chosen]].mean(0)
    elif v.ndim != 1 or steps is not None:
        raise ValueError(
            f"step_map takes [tokens] or [steps, tokens] activations (steps only with the latter), got "
            f"shape {tuple(v.shape)} with steps={steps!r}."
        )
    return token_map(v, grid)


def pixel_token(pixel: tuple[float, float], image_size: tuple[int, int], grid: tuple[int, int]) -> int:
    """The image token (row-major index) that covers pixel (x, y) of an image of `image_size`
    (width, height) split into a `grid` of (rows, cols) tokens."""
    x, y = pixel
    width, height = image_size
    rows, cols = grid
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"Pixel (x={x}, y={y}) lies outside the {width}x{height} image.")
    return int(y * rows // height) * cols + int(x * cols // width)


COLORBAR_MIN_HEIGHT = 256
"""feature_overlay scales smaller images up (by a whole factor, NEAREST) to at least this height, so the
colour bar's labels are legible next to a 64 px Shapes image."""


def color_bar(
    height: int, vmin: float, vmax: float, cmap: str = "inferno", width: int | None = None, pad: int = 6
) -> Image.Image:
    """A vertical colour bar [height px] from `vmin` (bottom) to `vmax` (top), labelled at both ends and
    the middle. The gradient fills rows pad .. height - pad - 1; the labels sit to its right."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("Heatmaps need matplotlib: `pip install 'fluxsae[app]'`.") from e
    from PIL import ImageDraw, ImageFont

    if not (np.isfinite(vmin) and np.isfinite(vmax)):
        raise ValueError(f"The colour bar needs finite vmin and vmax, got {vmin} and {vmax}.")
    bar_width = width or max(8, height // 16)
    rows = height - 2 * pad
    if rows < 2:
        raise ValueError(f"A colour bar needs a height above {2 * pad + 1} px, got {height}.")
    font = ImageFont.load_default()
    labels = [(f"{v:.3g}", pad + i * (rows - 1) // 2) for i, v in enumerate((vmax, (vmin + vmax) / 2, vmin))]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(probe.textbbox((0, 0), text, font=font)[2] for text, _ in labels)
    bar = Image.new("RGB", (bar_width + 6 + text_width + 2, height), "white")
    gradient = np.linspace(1.0, 0.0, rows)[:, None].repeat(bar_width, 1)  # top = vmax
    rgba = matplotlib.colormaps[cmap](gradient, bytes=True)
    bar.paste(Image.fromarray(np.ascontiguousarray(rgba[..., :3])), (0, pad))
    draw = ImageDraw.Draw(bar)
    for text, y in labels:
        draw.line([(bar_width, y), (bar_width + 3, y)], fill="black")
        box = draw.textbbox((0, 0), text, font=font)
        draw.text((bar_width + 6, y - (box[1] + box[3]) // 2), text, fill="black", font=font)
    return bar


def feature_overlay(
    image: Image.Image,
    grid_values: torch.Tensor,
    *,
    vmin: float = 0.0,
    vmax: float | None = None,
    cmap: str = "inferno",
    alpha: float = 0.55,
    colorbar: bool = True,
    display_size: tuple[int, int] | None = None,
) -> Image.Image:
    """A feature's map [rows, cols] over `image`, with a colour bar on its right.

    The colour scale runs from `vmin` to `vmax` and clips outside it. Pass a fixed `vmax` (e.g. the
    feature's max activation from `fluxsae.feature_stats.FeatureStats`) and the same colour means the same
    activation on every image and step; by default it is this map's max. `display_size` (w, h): the
    size of the image part; default the image's, scaled up by a whole factor to at least
    COLORBAR_MIN_HEIGHT px tall (NEAREST, so tokens stay crisp squares). Returns an RGB image of
    display_size plus the bar's width.
    """
    v = torch.as_tensor(grid_values).detach().float()
    if vmax is None:
        vmax = max(float(v.max()), vmin) if v.numel() and torch.isfinite(v).all() else vmin
    if not vmax >= vmin:
        raise ValueError(f"vmax ({vmax}) must be >= vmin ({vmin}).")
    if display_size is None:
        factor = max(1, -(-COLORBAR_MIN_HEIGHT // image.height))
        display_size = (image.width * factor, image.height * factor)
    base = image.convert("RGB").resize(display_size, Image.Resampling.NEAREST)
    painted = overlay(base, v, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax)
    if not colorbar:
        return painted
    bar = color_bar(painted.height, vmin, vmax, cmap)
    canvas = Image.new("RGB", (painted.width + 4 + bar.width, painted.height), "white")
    canvas.paste(painted, (0, 0))
    canvas.paste(bar, (painted.width + 4, 0))
    return canvas
