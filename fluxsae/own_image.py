"""Features of an image the model did not generate: encode it with the pipeline's VAE, noise it to a
chosen level and denoise it from there with its prompt (img2img), capturing every site on the way.

    analysis = analyse_image(pipe, image, "a red circle at the center on a white background",
                             sites=["transformer_blocks.3.image"])
    analysis.acts["transformer_blocks.3.image"]   # [steps run, 1, tokens, d], as `capture` records
    analysis.acts.steps                            # which denoising steps those are (the last ones)
    analysis.image, analysis.reconstruction        # the input as the model saw it, and what it drew

Every tool of `fluxsae.features` works on `analysis.acts` as on a generated image's. Editing works the
same way: `img2img_pipeline(pipe)` is a FluxImg2ImgPipeline sharing `pipe`'s modules, so `fluxsae.steer`
(and `fluxsae.regions.generate_pair`) on `pipe` act on it too.

The noise level is the share of the denoising schedule that is run again (diffusers' `strength`): at
1.0 the image is pure noise and only its prompt is left; near 0 the model changes almost nothing, and
sees an almost clean image at every step it runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import NamedTuple

import torch
from PIL import Image, UnidentifiedImageError

from fluxsae.hooks import Captured, capture

logger = logging.getLogger(__name__)

DEFAULT_NOISE = 0.5
"""The default noise level: half the schedule run again. On the Shapes model the attribute reader reads
back the same objects from the reconstruction of rendered scenes at this level
(benchmarks/results/own_image.json)."""
MAX_PIXELS = 4096 * 4096
"""Larger images are refused before they are decoded into memory (a 20,000 x 20,000 upload is 1.2 GB)."""


class ImageAnalysis(NamedTuple):
    """What `analyse_image` returns."""

    acts: Captured
    """`acts[site]` [steps run, 1, tokens, d] for every site asked for; `acts.steps` the step indices."""
    image: Image.Image
    """The input as the model saw it: RGB, at the model's resolution."""
    reconstruction: Image.Image
    """What the model drew from it (no edit)."""
    note: str
    """What was done to the input to fit the model ("" when nothing was)."""


def prepare_image(image, size: tuple[int, int]) -> tuple[Image.Image, str]:
    """Any image (a PIL image, a path or an array) as RGB at `size` (width, height), and a note of what was
    done to it. ValueError, for people, for what is no image, is empty or too large."""
    if not isinstance(image, Image.Image):
        try:
            opened = Image.open(image) if isinstance(image, (str, bytes)) or hasattr(image, "read") else None
            image = opened if opened is not None else Image.fromarray(image)
        except Image.DecompressionBombError as err:
            raise ValueError(f"The image is far too large to read ({err}): scale it down first.") from err
        except (UnidentifiedImageError, OSError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(
                f"That is not an image the app can read ({type(err).__name__}): use a PNG or JPEG."
            ) from err
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"The image is empty ({width}x{height} pixels): upload one with pixels in it.")
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"The image is {width}x{height} pixels; the largest taken is {MAX_PIXELS:,} pixels "
            f"(e.g. {math.isqrt(MAX_PIXELS)}x{math.isqrt(MAX_PIXELS)}): scale it down first."
        )
    notes = []
    if image.mode != "RGB":
        had = image.mode
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            image = flat
            notes.append(f"had its transparency laid on white ({had} to RGB)")
        else:
            image = image.convert("RGB")
            notes.append(f"was converted from {had} to RGB")
    if image.size != tuple(size):
        notes.append(f"was resized from {width}x{height} to the model's {size[0]}x{size[1]}")
        image = image.resize(tuple(size), Image.Resampling.LANCZOS)
    return image, ("The image " + " and ".join(notes) + ".") if notes else ""


def check_noise(level) -> float:
    """A noise level in (0, 1] from a number or numeric string, else a ValueError for people."""
    try:
        value = float(level) if not isinstance(level, bool) and level is not None else float("nan")
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"The noise level must be a number in (0, 1] (1: pure noise), got {level!r}.")
    return value


_IMG2IMG: dict[int, object] = {}


def img2img_pipeline(pipe):
    """A FluxImg2ImgPipeline made of `pipe`'s own modules (built once per pipeline): hooks on `pipe`'s
    transformer act on it, and it keeps `pipe`'s fluxsae attributes (base model, quantisation)."""
    from diffusers import FluxImg2ImgPipeline

    key = id(pipe)
    if key not in _IMG2IMG or _IMG2IMG[key][0] is not pipe:
        img = FluxImg2ImgPipeline.from_pipe(pipe)
        for name in ("fluxsae_base_model", "fluxsae_quantization"):
            if hasattr(pipe, name):
                setattr(img, name, getattr(pipe, name))
        img.set_progress_bar_config(disable=True)
        _IMG2IMG[key] = (pipe, img)
    return _IMG2IMG[key][1]


def run_on_image(pipe, image: Image.Image, prompt: str, strength: float, seed: int, **generation):
    """`img2img_pipeline(pipe)(prompt, image=image, strength=...)` from `seed`: what it returns."""
    img = img2img_pipeline(pipe)
    return img(
        prompt, image=image, strength=strength, generator=torch.Generator().manual_seed(seed), **generation
    )


def analyse_image(
    pipe,
    image,
    prompt: str,
    strength: float = DEFAULT_NOISE,
    sites=(),
    *,
    seed: int = 0,
    **generation,
) -> ImageAnalysis:
    """Capture `sites` while the model denoises `image` from noise level `strength` with `prompt`.

    image: a PIL image (any mode or size: it is converted and resized to the model's resolution, see
    `prepare_image`); strength: the noise level in (0, 1]; generation: the call's other arguments (e.g.
    `fluxsae.shapes.GENERATION_DEFAULTS`: height and width fix the resolution).
    """
    strength = check_noise(strength)
    size = (
        int(generation.get("width") or pipe.default_sample_size * pipe.vae_scale_factor),
        int(generation.get("height") or pipe.default_sample_size * pipe.vae_scale_factor),
    )
    image, note = prepare_image(image, size)
    with torch.no_grad(), capture(pipe, list(sites)) if sites else contextlib.nullcontext({}) as acts:
        out = run_on_image(pipe, image, prompt, strength, seed, **generation)
    return ImageAnalysis(acts, image, out.images[0], note)
