"""Where an ITDA atom came from: regenerate its source image and check the atom is what the model
computes there. This needs a pipeline, so it sits above the dictionaries (which are math on tensors)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from PIL import ImageDraw
from torch import Tensor

from fluxsae.heatmap import token_grid
from fluxsae.hooks import capture
from fluxsae.itda import ITDA
from fluxsae.sites import parse_site


class AtomSource(NamedTuple):
    """An atom's source, regenerated: `atom_source(itda, i, pipe)`."""

    image: Any
    """The generated PIL image (prompt and seed of the atom's provenance)."""

    patch: Any
    """The token's cell cropped from `image` (PIL), or None for a text-stream atom."""

    box: tuple[int, int, int, int] | None
    """(left, top, right, bottom) of the token's cell in pixels, or None for a text-stream atom."""

    outlined: Any
    """`image` with the cell outlined (PIL)."""

    cosine: float
    """Cosine between the atom and the token captured at its step in this regeneration, centred on the
    ITDA's bias as the atom was (~1 when the
    provenance is right; a batched harvest differs from a batch-1 regeneration only by float error)."""

    captured: Tensor
    """[d] the captured token (raw activation)."""

    sigma: float
    """The noise level of the captured step (the manifest's `timestep`)."""

    provenance: dict
    """The atom's provenance row."""


def cell_box(token: int, grid: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixels of image token `token` on a (rows, cols) grid of an image of
    `size` = (width, height): token i covers row i // cols, column i % cols."""
    rows, cols = grid
    if not 0 <= token < rows * cols:
        raise ValueError(f"token {token} is outside the {rows}x{cols} image-token grid")
    w, h = size[0] // cols, size[1] // rows
    r, c = divmod(token, cols)
    return (c * w, r * h, (c + 1) * w, (r + 1) * h)


@torch.no_grad()
def atom_source(itda: ITDA, atom: int, pipe, generation: Mapping | None = None) -> AtomSource:
    """Regenerate atom `atom`'s source image with `pipe` from its provenance and verify it.

    `generation`: the pipeline call arguments of the harvest (height, width, num_inference_steps, ...);
    default: those recorded in `itda.cfg.extra["generation"]` by the build command. The site is captured
    at the atom's step during the regeneration, and the cosine with the atom is reported.
    """
    if not 0 <= atom < itda.n_atoms:
        raise IndexError(f"atom {atom} is out of range: the dictionary has {itda.n_atoms} atoms")
    prov = itda.provenance[atom]
    gen = dict(generation if generation is not None else itda.cfg.extra.get("generation") or {})
    if not gen:
        raise ValueError(
            "atom_source needs the harvest's generation arguments (height, width, num_inference_steps, ...): "
            "pass generation=ActivationStore(harvest).config['generation']"
        )
    if not prov["prompt"] or prov["seed"] < 0 or prov["step"] < 0 or prov["token"] < 0:
        raise ValueError(f"atom {atom} has no usable provenance (prompt, seed, step, token): {prov}")
    gen.pop("generator", None)
    gen.pop("output_type", None)
    generator = torch.Generator(pipe.device).manual_seed(int(prov["seed"]))
    with capture(pipe, itda.site, steps=[int(prov["step"])]) as acts:
        image = pipe(prov["prompt"], generator=generator, output_type="pil", **gen).images[0]
    captured = acts[itda.site][0, 0, int(prov["token"])].float().cpu()
    sigma = float(acts.sigmas[0]) if len(acts.sigmas) else math.nan
    atom_vec = itda.atoms[atom].float().cpu()
    centred = captured - itda.bias.float().cpu()  # atoms are unit(x - bias)
    cosine = float(centred @ atom_vec / centred.norm().clamp_min(torch.finfo(torch.float32).tiny))
    box = patch = None
    outlined = image.convert("RGB").copy()
    if parse_site(itda.site).stream == "image":
        grid = token_grid(pipe, gen["height"], gen["width"])
        box = cell_box(int(prov["token"]), grid, image.size)
        patch = image.crop(box)
        ImageDraw.Draw(outlined).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 0, 255))
    return AtomSource(image, patch, box, outlined, cosine, captured, sigma, prov)
