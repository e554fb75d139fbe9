"""A unit's activations painted over an image the way the reference work showed them to its explainer.

Each image token becomes a crisp square (NEAREST upsampling) blended towards pure blue with
alpha = max_alpha x sqrt(activation / vmax), clipped to [0, max_alpha]: the square root lifts weak
activations enough to be seen, and tokens at or below 0 keep the image as it is. A blue Shapes
object stays visible under the paint because max_alpha < 1 keeps some of the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

BLUE = (0, 0, 255)
MAX_ALPHA = 0.75
"""Alpha of the strongest token: some of the image always shows through."""


def alpha_map(acts: np.ndarray, vmax: float, max_alpha: float = MAX_ALPHA) -> np.ndarray:
    """Per-token alpha of the paint: acts [rows, cols] -> float32 [rows, cols] in [0, max_alpha]."""
    acts = np.asarray(acts, dtype=np.float32)
    if acts.ndim != 2:
        raise ValueError(f"paint a 2-D token map [rows, cols], got shape {acts.shape}; reshape the tokens")
    if not np.isfinite(acts).all():
        raise ValueError("the activation map has NaN or infinite values; check the activations that made it.")
    if not vmax > 0:
        return np.zeros_like(acts)
    return (max_alpha * np.sqrt(np.clip(acts / vmax, 0.0, 1.0))).astype(np.float32)


def paint(
    image: Image.Image, acts: np.ndarray, vmax: float, *, size: int | None = 256, max_alpha: float = MAX_ALPHA
) -> Image.Image:
    """The image with the unit's token map [rows, cols] painted in blue, `size` px tall (None: as is).

    `vmax` is the activation painted at full strength; pass one value for all images of a unit so
    the blue means the same on each.
    """
    alpha = alpha_map(acts, vmax, max_alpha)
    base = image.convert("RGB")
    if size is not None and base.height != size:
        base = base.resize((round(base.width * size / base.height), size), Image.Resampling.NEAREST)
    rows, cols = alpha.shape
    if base.width % cols or base.height % rows:
        raise ValueError(
            f"a {base.width}x{base.height} image does not split into the {rows}x{cols} token grid of the "
            "map; pass a size that is a multiple of the grid."
        )
    a = np.kron(alpha, np.ones((base.height // rows, base.width // cols), dtype=np.float32))[..., None]
    pixels = np.asarray(base, dtype=np.float32)
    out = pixels * (1 - a) + np.asarray(BLUE, dtype=np.float32) * a
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def strip(images: Sequence[Image.Image], gap: int = 2) -> Image.Image:
    """Images of one height side by side on white, `gap` px apart (a unit's top examples in one file)."""
    if not images:
        raise ValueError("a strip needs at least one image")
    height = max(im.height for im in images)
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, height), "white")
    x = 0
    for im in images:
        canvas.paste(im.convert("RGB"), (x, 0))
        x += im.width + gap
    return canvas
