"""The Shapes world: scenes of 1-2 coloured shapes whose every concept is known per pixel and per token.

A scene is drawn by `sample_scenes`, painted by `render` (64x64 RGB, crisp edges), described by
`caption`, and labelled per image token by `token_masks`. The model sees the image as an 8x8 grid
of 8x8-pixel tokens in row-major order (token index = row * 8 + col), which is the grid the masks
use. `fluxsae.shapes.reader.read_attributes` reads a scene back from pixels.

Geometry conventions (shared by rendering, sampling and reading):
- pixel (row i, col j) has its centre at (x, y) = (j + 0.5, i + 0.5); a pixel belongs to a shape
  when its centre lies inside it, so rendering is exact and needs no anti-aliasing;
- an object's (x, y) is the area centroid of its shape and `extent` the side of its (square)
  bounding box. The centroid, not the bounding-box centre, defines the grid cell, because it is
  what a reader can measure robustly on soft, noisy generated images.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle")
COLORS = types.MappingProxyType({
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (160, 32, 240),
    "orange": (255, 140, 0),
})
"""Object colours, saturated and far apart from each other and from every background (RGB distance >= 115)."""
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
"""The 3x3 grid cells, row-major: cell index = row * 3 + col."""
BACKGROUNDS = types.MappingProxyType({
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
})

IMAGE_SIZE = 64
"""Image height and width in pixels."""
PATCH = 8
"""Pixels per image token along each side (VAE x4 down-sampling, then 2x2 packing in Flux)."""
TOKEN_GRID = IMAGE_SIZE // PATCH
"""Image tokens along each side: the model sees TOKEN_GRID x TOKEN_GRID = 64 tokens."""

GENERATION_DEFAULTS = types.MappingProxyType({
    # The model was trained on 64x64 images only: FluxPipeline's 512 px default gives 4096 tokens
    # at positions it never saw.
    "height": IMAGE_SIZE,
    "width": IMAGE_SIZE,
    # The schedule the model was trained for (it sees these sigmas more often than others).
    "num_inference_steps": 8,
    # Captions are at most 22 tokens with </s>; FluxPipeline pads T5 to 512 tokens with no attention
    # mask, so training and sampling must pad to this one length.
    "max_sequence_length": 24,
    # FLUX.1-dev's distilled guidance is not used (the model has no guidance embedding) ...
    "guidance_scale": 0.0,
    # ... but true classifier-free guidance is: captions are dropped in 10% of training batches, and
    # guidance 3 against the empty prompt makes shapes crisp and objects distinct. It runs the
    # transformer twice per step; capture's cfg_pass tells the passes apart.
    "true_cfg_scale": 3.0,
    "negative_prompt": "",
})
"""Call arguments the Shapes model was trained for: `pipe(prompt, **GENERATION_DEFAULTS)`."""

HELD_OUT_PAIRS = frozenset({("purple", "triangle"), ("orange", "square"), ("green", "circle")})
"""(colour, shape) pairs never shown in training; every colour and shape still appears with others."""

SIZE_RANGES = types.MappingProxyType({"small": (14.0, 17.0), "large": (23.0, 26.0)})
"""Bounding-box side in pixels, drawn uniformly per object. The gap between classes (6 px) keeps size
readable from pixels. Objects cover ~16.3% of the 64 tokens per scene on average (>= 15% is needed
for token-level concept labels to carry signal); 26 px is the largest large side at which any two
cells, even adjacent ones, always have room for two large objects, so no attribute is ever redrawn
for lack of room and the attribute distribution stays uniform."""
MIN_GAP = 2
"""Background pixels that always separate two objects, so they never merge when read back."""
CELL_MARGIN = 1.0
"""Distance in pixels the centroid keeps from its cell's borders, so position is never ambiguous."""
COVER_FRACTION = 0.25
"""A token shows an object when at least this fraction of its pixels belongs to the object."""

_CELL = IMAGE_SIZE / 3


@dataclass(frozen=True)
class Object:
    """One shape in a scene. Equality compares the four attributes only, not the pixel placement,
    so a scene read back from pixels equals the original whenever every attribute was read right."""

    shape: str
    """One of SHAPES."""
    color: str
    """A key of COLORS."""
    size: str
    """One of SIZES."""
    position: str
    """One of POSITIONS: the grid cell holding the centroid."""
    x: float = field(default=0.0, compare=False)
    """Centroid column in pixels (0 = left edge of the image)."""
    y: float = field(default=0.0, compare=False)
    """Centroid row in pixels (0 = top edge of the image)."""
    extent: float = field(default=0.0, compare=False)
    """Side of the bounding box in pixels (all shapes are as wide as they are tall)."""

    def __post_init__(self):
        for name, value, allowed in (("shape", self.shape, SHAPES), ("color", self.color, tuple(COLORS)),
                                     ("size", self.size, SIZES), ("position", self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"Object {name}={value!r} is not one of {allowed}")


@dataclass(frozen=True)
class Scene:
    """A 64x64 image: 0-2 objects (sampled scenes have 1 or 2; 0 only when a reader found none),
    ordered by grid cell index so that equal scenes compare equal, on a plain background."""

    objects: tuple[Object, ...]
    """The objects, in POSITIONS order of their cells."""
    background: str
    """A key of BACKGROUNDS."""

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"Scene background={self.background!r} is not one of {tuple(BACKGROUNDS)}")
        ordered = tuple(sorted(self.objects, key=lambda o: POSITIONS.index(o.position)))
        object.__setattr__(self, "objects", ordered)


def _pixel_centres() -> tuple[np.ndarray, np.ndarray]:
    """x and y of every pixel centre, each [IMAGE_SIZE, IMAGE_SIZE]."""
    coords = np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5
    return np.meshgrid(coords, coords)


_XS, _YS = _pixel_centres()


def _vertical_span(shape: str, y: float, extent: float) -> tuple[float, float]:
    """Top and bottom of a shape's bounding box given its centroid row: the centroid of an upward
    triangle sits at two thirds of its height, that of the other shapes at the middle."""
    if shape == "triangle":
        return y - 2 * extent / 3, y + extent / 3
    return y - extent / 2, y + extent / 2


def object_mask(obj: Object) -> np.ndarray:
    """Pixels of one object, bool [IMAGE_SIZE, IMAGE_SIZE] (row, col)."""
    half = obj.extent / 2
    dx = _XS - obj.x
    if obj.shape == "circle":
        return dx**2 + (_YS - obj.y) ** 2 <= half**2
    top, bottom = _vertical_span(obj.shape, obj.y, obj.extent)
    inside_rows = (_YS >= top) & (_YS <= bottom)
    if obj.shape == "square":
        return inside_rows & (np.abs(dx) <= half)
    # Upward isosceles triangle: the half-width grows linearly from 0 at the apex to `half` at the base.
    return inside_rows & (np.abs(dx) <= half * (_YS - top) / obj.extent)


def render(scene: Scene) -> Image.Image:
    """Paint a scene: a 64x64 RGB PIL image with solid, crisp (not anti-aliased) shapes."""
    pixels = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    pixels[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        pixels[object_mask(obj)] = COLORS[obj.color]
    return Image.fromarray(pixels, mode="RGB")


def _phrase(obj: Object) -> str:
    return f"a {obj.size} {obj.color} {obj.shape} at the {obj.position}"


def caption(scene: Scene) -> str:
    """The canonical caption, a pure function of the scene's attributes, e.g.
    "a large red circle at the top left and a small blue square at the center on a gray background"."""
    if not scene.objects:
        return f"a {scene.background} background"
    objects = " and ".join(_phrase(obj) for obj in scene.objects)
    return f"{objects} on a {scene.background} background"


def vocabulary() -> list[str]:
    """Every word any caption can contain, sorted and unique (the model's tokenizer is word-level)."""
    words = {"a", "at", "the", "and", "on", "background"}
    for group in (SHAPES, COLORS, SIZES, POSITIONS, BACKGROUNDS):
        for name in group:
            words.update(name.split())
    return sorted(words)


def concept_names() -> list[str]:
    """Keys of `token_masks`, always all of them, in this stable order: "object", then "shape:*",
    "color:*", "size:*", "position:*", "background:*", each group in the order of its constant."""
    names = ["object"]
    for prefix, group in (("shape", SHAPES), ("color", COLORS), ("size", SIZES),
                          ("position", POSITIONS), ("background", BACKGROUNDS)):
        names.extend(f"{prefix}:{name}" for name in group)
    return names


def token_coverage(mask: np.ndarray) -> np.ndarray:
    """Fraction of each token's pixels set in a pixel mask: [IMAGE_SIZE, IMAGE_SIZE] -> float [8, 8]."""
    return mask.reshape(TOKEN_GRID, PATCH, TOKEN_GRID, PATCH).mean(axis=(1, 3))


def token_masks(scene: Scene) -> dict[str, np.ndarray]:
    """Which image tokens show which concept: concept name -> bool [TOKEN_GRID, TOKEN_GRID] (row, col).

    Every name of `concept_names()` is a key, absent concepts with an all-False mask, so AUROC code
    can rely on stable keys. A token shows an object when >= COVER_FRACTION (25%) of its 64 pixels
    belong to that object; it then shows the object's shape, colour, size and position concepts and
    "object". A token may show two objects. "background:<name of the scene's background>" is set on
    exactly the tokens that show no object; the other backgrounds are all-False.
    """
    masks = {name: np.zeros((TOKEN_GRID, TOKEN_GRID), dtype=bool) for name in concept_names()}
    for obj in scene.objects:
        shown = token_coverage(object_mask(obj)) >= COVER_FRACTION
        for key in ("object", f"shape:{obj.shape}", f"color:{obj.color}", f"size:{obj.size}",
                    f"position:{obj.position}"):
            masks[key] |= shown
    masks[f"background:{scene.background}"] = ~masks["object"]
    return masks


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square (Chebyshev) dilation of a bool [H, W] mask by `radius` pixels."""
    grown = mask.copy()
    padded = np.pad(mask, radius)
    height, width = mask.shape
    for di in range(2 * radius + 1):
        for dj in range(2 * radius + 1):
            grown |= padded[di:di + height, dj:dj + width]
    return grown


def _place(rng: np.random.Generator, shape: str, color: str, size: str, cell: int) -> Object:
    """Draw an object's extent within its size class and its centroid inside its cell, keeping the
    whole shape inside the image."""
    low, high = SIZE_RANGES[size]
    extent = float(rng.uniform(low, high))
    row, col = divmod(cell, 3)
    x_low = max(col * _CELL + CELL_MARGIN, extent / 2)
    x_high = min((col + 1) * _CELL - CELL_MARGIN, IMAGE_SIZE - extent / 2)
    top_offset, bottom_offset = _vertical_span(shape, 0.0, extent)
    y_low = max(row * _CELL + CELL_MARGIN, -top_offset)
    y_high = min((row + 1) * _CELL - CELL_MARGIN, IMAGE_SIZE - bottom_offset)
    return Object(shape=shape, color=color, size=size, position=POSITIONS[cell],
                  x=float(rng.uniform(x_low, x_high)), y=float(rng.uniform(y_low, y_high)), extent=extent)


HeldOut = Literal["exclude", "only", "include"]


def _attributes_allowed(pairs: list[tuple[str, str]], held_out: HeldOut) -> bool:
    n_held = sum(pair in HELD_OUT_PAIRS for pair in pairs)
    if held_out == "exclude":
        return n_held == 0
    if held_out == "only":
        return n_held > 0
    return True


def _sample_scene(rng: np.random.Generator, n_objects: int | None, held_out: HeldOut) -> Scene:
    count = int(rng.integers(1, 3)) if n_objects is None else n_objects
    background = str(rng.choice(list(BACKGROUNDS)))
    while True:
        cells = [int(c) for c in rng.choice(9, size=count, replace=False)]
        shapes = [str(s) for s in rng.choice(SHAPES, size=count)]
        colors = [str(c) for c in rng.choice(list(COLORS), size=count)]
        sizes = [str(s) for s in rng.choice(SIZES, size=count)]
        if not _attributes_allowed(list(zip(colors, shapes, strict=True)), held_out):
            continue
        # Placement is redrawn, not the attributes, so the attribute distribution stays uniform;
        # the size ranges are small enough that every pair of cells has room for two large objects.
        for _ in range(1000):
            attributes = zip(shapes, colors, sizes, cells, strict=True)
            objects = [_place(rng, *object_attributes) for object_attributes in attributes]
            if count == 1 or not (_dilate(object_mask(objects[0]), MIN_GAP) & object_mask(objects[1])).any():
                return Scene(objects=tuple(objects), background=background)
        logger.debug("no room for %s in cells %s; redrawing the scene", sizes, cells)


def sample_scenes(
    n: int, seed: int, *, n_objects: int | None = None, held_out: HeldOut = "exclude"
) -> list[Scene]:
    """Draw `n` random scenes, the same ones for the same arguments.

    Args:
        n: how many scenes.
        seed: seeds a numpy Generator; nothing else is random.
        n_objects: 1 or 2 objects in every scene; None draws 1 or 2 with equal probability.
        held_out: "exclude" (the training distribution: no object has a (colour, shape) pair of
            HELD_OUT_PAIRS), "only" (every scene has at least one such object) or "include" (any).

    Every attribute is uniform over the allowed combinations; two objects never share a grid cell
    and are separated by >= MIN_GAP background pixels; each object lies fully inside the image,
    with a random size within its class and a random centroid inside its cell.
    """
    if n_objects not in (None, 1, 2):
        raise ValueError(f"n_objects must be None, 1 or 2, got {n_objects!r}")
    if held_out not in ("exclude", "only", "include"):
        raise ValueError(f"held_out must be 'exclude', 'only' or 'include', got {held_out!r}")
    rng = np.random.default_rng(seed)
    return [_sample_scene(rng, n_objects, held_out) for _ in range(n)]
