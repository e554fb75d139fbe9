"""Read a Shapes scene back from pixels, and score a model's images against the scenes they were asked for.

`read_attributes` is exact on rendered scenes and tolerant of what a diffusion model draws
(slightly off colours, soft edges, mild noise), because every decision is taken relative to the
palette, never against exact pixel values:
1. background = the palette background nearest to the median of the border pixels;
2. object pixels = pixels farther from that background than half the distance from it to the
   nearest object colour (a soft edge counts as object exactly where it is at least half object);
3. 4-connected components of object pixels; components under MIN_COMPONENT_PIXELS are noise; the
   two largest are the objects;
4. per object: colour = the palette colour most of its pixels are nearest to; shape from geometry
   (a triangle is much narrower at its top than at its bottom; a square fills its bounding box,
   a circle ~pi/4 of it); size from the bounding-box side; position = grid cell of the centroid.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from fluxsae.shapes.world import (
    BACKGROUNDS,
    COLORS,
    IMAGE_SIZE,
    POSITIONS,
    SIZE_RANGES,
    Object,
    Scene,
)

MIN_COMPONENT_PIXELS = 15
"""Smaller connected blobs are noise: the smallest object (a 14 px triangle) has ~100 pixels."""
SIZE_THRESHOLD = (SIZE_RANGES["small"][1] + SIZE_RANGES["large"][0]) / 2
"""Bounding-box sides above this (in pixels) read as large: midway between the two size classes."""
TRIANGLE_TAPER = 0.6
"""A shape whose top quarter is narrower than this fraction of its bottom quarter is a triangle
(triangle ~0.14 of it, circle and square ~1)."""
SQUARE_CORNERS = 0.5
"""A shape filling more than this fraction of its box's corners (outside the inscribed ellipse) is
a square (square ~1, circle ~0.1 from pixelation)."""

_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float64)  # [6, 3]


def _as_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """Any RGB image as float [IMAGE_SIZE, IMAGE_SIZE, 3] in 0..255; other sizes are resized."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB array [H, W, 3], got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 array (0..255), got dtype {image.dtype}; "
                             "convert with (x * 255).round().clip(0, 255).astype(np.uint8)")
        image = Image.fromarray(image, mode="RGB")
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float64)


def _background(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """The palette background nearest to the median border colour, and that median [3]."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    median = np.median(border, axis=0)
    name = min(BACKGROUNDS, key=lambda b: np.linalg.norm(median - BACKGROUNDS[b]))
    return name, median


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of a bool [H, W] mask: int [H, W], each component labelled with the
    smallest flat index among its pixels, -1 off the mask.

    Min-label propagation with pointer jumping (scipy is not a dependency): each pass lets every
    pixel take its neighbours' smallest label, then the label of the pixel its label points to,
    so convex blobs settle in a handful of vectorised passes.
    """
    height, width = mask.shape
    off = height * width
    labels = np.where(mask, np.arange(off).reshape(height, width), off)
    while True:
        spread = labels.copy()
        np.minimum(spread[1:], labels[:-1], out=spread[1:])
        np.minimum(spread[:-1], labels[1:], out=spread[:-1])
        np.minimum(spread[:, 1:], labels[:, :-1], out=spread[:, 1:])
        np.minimum(spread[:, :-1], labels[:, 1:], out=spread[:, :-1])
        spread = np.where(mask, spread, off)
        lookup = np.append(spread.ravel(), off)
        for _ in range(3):
            spread = lookup[spread]
            lookup = np.append(spread.ravel(), off)
        if np.array_equal(spread, labels):
            return np.where(mask, labels, -1)
        labels = spread


def _trim(blob: np.ndarray) -> np.ndarray:
    """Crop a bool [H, W] object mask to its bounding box, ignoring rows and columns holding under
    a fifth of the widest one, so that a stray noisy pixel on the outline does not widen the box."""
    rows, cols = blob.sum(axis=1), blob.sum(axis=0)
    kept_rows = np.nonzero(rows >= 0.2 * rows.max())[0]
    kept_cols = np.nonzero(cols >= 0.2 * cols.max())[0]
    return blob[kept_rows[0]:kept_rows[-1] + 1, kept_cols[0]:kept_cols[-1] + 1]


def _shape(blob: np.ndarray) -> str:
    """Shape of one object from its trimmed bool [h, w] bounding-box crop."""
    widths = blob.sum(axis=1)
    quarter = max(1, len(widths) // 4)
    taper = widths[:quarter].mean() / max(widths[-quarter:].mean(), 1.0)
    if taper < TRIANGLE_TAPER:
        return "triangle"
    # Squares and circles differ only in the box corners outside the inscribed ellipse: compare
    # there rather than over the whole box, where soft edges blur the difference.
    height, width = blob.shape
    u = (np.arange(height)[:, None] + 0.5) / height - 0.5
    v = (np.arange(width)[None, :] + 0.5) / width - 0.5
    corners = u**2 + v**2 > 0.25
    return "square" if blob[corners].mean() > SQUARE_CORNERS else "circle"


def _read_object(pixels: np.ndarray, blob_mask: np.ndarray) -> Object:
    rows, cols = np.nonzero(blob_mask)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    extent = float(max(bottom - top + 1, right - left + 1))
    x, y = float(cols.mean() + 0.5), float(rows.mean() + 0.5)
    cell_row = min(int(y * 3 / IMAGE_SIZE), 2)
    cell_col = min(int(x * 3 / IMAGE_SIZE), 2)
    distances = np.linalg.norm(pixels[blob_mask][:, None, :] - _PALETTE[None], axis=-1)  # [n, 6]
    votes = np.bincount(distances.argmin(axis=1), minlength=len(_PALETTE_NAMES))
    return Object(
        shape=_shape(_trim(blob_mask)),
        color=_PALETTE_NAMES[int(votes.argmax())],
        size="large" if extent > SIZE_THRESHOLD else "small",
        position=POSITIONS[cell_row * 3 + cell_col],
        x=x, y=y, extent=extent,
    )


def read_attributes(image: Image.Image | np.ndarray) -> Scene:
    """Read a scene back from pixels: a PIL image or a uint8 array [H, W, 3] (resized to 64x64
    when it is not). Returns at most the two largest objects, with their measured centroid and
    bounding-box side as placement; `objects=()` when nothing but background is found.
    """
    scene, _ = _read(image)
    return scene


def _read(image) -> tuple[Scene, list[np.ndarray]]:
    """`read_attributes`'s scene and the pixel mask of each object it found (in its order)."""
    pixels = _as_pixels(image)
    background, measured = _background(pixels)
    # Half way to the closest object colour: a soft edge counts where it is at least half object,
    # which keeps the >= 2 px gap between objects background even after a slight blur.
    palette_bg = np.array(BACKGROUNDS[background], dtype=np.float64)
    threshold = 0.5 * np.linalg.norm(_PALETTE - palette_bg, axis=1).min()
    mask = np.linalg.norm(pixels - measured, axis=-1) > threshold
    labels = _components(mask)
    found, counts = np.unique(labels[labels >= 0], return_counts=True)
    keep = [label for label, count in sorted(zip(found, counts, strict=True), key=lambda lc: -lc[1])
            if count >= MIN_COMPONENT_PIXELS][:2]
    blobs = [labels == label for label in keep]
    objects = tuple(_read_object(pixels, blob) for blob in blobs)
    return Scene(objects=objects, background=background), blobs


def attribute_accuracy(true: list[Scene], read: list[Scene]) -> dict[str, float]:
    """How often what was read matches what was asked for, scene by scene.

    Returns (rates in 0..1, NaN where no scene of that kind was given):
        "one:n", "two:n": how many one- and two-object true scenes there were;
        "one:color", "one:shape", "one:size", "one:position": over one-object scenes, whether the
            largest object read (by bounding box) has the attribute; reading no object is wrong;
        "one:background", "two:background": background right;
        "two:objects": over two-object scenes, exactly two objects were read and each true object
            has a read object in the same cell with all four attributes right;
        "exact": over all scenes, the read scene equals the true one (every attribute, every object).
    """
    if len(true) != len(read):
        raise ValueError(f"got {len(true)} true scenes but {len(read)} read scenes; pass them pairwise")
    one = [(t, r) for t, r in zip(true, read, strict=True) if len(t.objects) == 1]
    two = [(t, r) for t, r in zip(true, read, strict=True) if len(t.objects) == 2]

    def rate(hits: list[bool]) -> float:
        return float(np.mean(hits)) if hits else math.nan

    result = {"one:n": float(len(one)), "two:n": float(len(two))}
    for attribute in ("color", "shape", "size", "position"):
        result[f"one:{attribute}"] = rate([
            bool(r.objects) and getattr(max(r.objects, key=lambda o: o.extent), attribute)
            == getattr(t.objects[0], attribute)
            for t, r in one
        ])
    result["one:background"] = rate([t.background == r.background for t, r in one])
    result["two:background"] = rate([t.background == r.background for t, r in two])
    # Objects are kept in cell order, so matching by position is tuple equality.
    result["two:objects"] = rate([t.objects == r.objects for t, r in two])
    result["exact"] = rate([t == r for t, r in zip(true, read, strict=True)])
    return result


def as_drawn(scene: Scene, image: Image.Image | np.ndarray) -> tuple[Scene, int]:
    """The scene a caption asked for, with each object placed where the image shows it.

    A generated image draws an object anywhere inside the cell its caption names, at any size of its
    class: the sampled placement (`x`, `y`, `extent`) of `sample_scenes` is not what the model drew,
    and token masks made from it miss half of the drawn object's tokens (median token IoU 0.56 on the
    packaged model, benchmarks/results/labels_trust.json). Each object of `scene` is placed where the
    object `read_attributes` finds in the same cell is drawn: the centroid and extent whose rendering of
    the caption's shape best covers the object's pixels (`fit_placement`); its shape, colour and size stay
    the caption's. Returns (that scene, how many objects were found in the image); an object not found
    keeps its sampled placement.
    """
    read, blobs = _read(image)
    found = {o.position: (o, blob) for o, blob in zip(read.objects, blobs, strict=True)}
    placed, matched = [], 0
    for obj in scene.objects:
        if obj.position in found:
            seen, blob = found[obj.position]
            obj = fit_placement(Object(obj.shape, obj.color, obj.size, obj.position, x=seen.x, y=seen.y,
                                       extent=seen.extent), blob)  # fmt: skip
            matched += 1
        placed.append(obj)
    return Scene(objects=tuple(placed), background=scene.background), matched


PLACEMENT_STEPS = (1.0, 0.5, 0.25)
"""Pixel steps of `fit_placement`'s search, coarse to fine."""


def fit_placement(obj: Object, pixels: np.ndarray) -> Object:
    """`obj` moved and resized (centroid, extent) so that its rendered pixels best match `pixels` (bool
    [64, 64]) by IoU: a local search from its placement, in steps of PLACEMENT_STEPS. A bounding box read
    off soft edges is a pixel or two off; token masks at the 25% and 95% cover marks feel it."""
    from fluxsae.shapes.world import object_mask

    def iou(o: Object) -> float:
        drawn = object_mask(o)
        return float((drawn & pixels).sum() / max((drawn | pixels).sum(), 1))

    best, score = obj, iou(obj)
    for step in PLACEMENT_STEPS:
        improved = True
        while improved:
            improved = False
            for dx, dy, de in ((step, 0, 0), (-step, 0, 0), (0, step, 0), (0, -step, 0), (0, 0, step),
                               (0, 0, -step)):  # fmt: skip
                candidate = Object(best.shape, best.color, best.size, best.position, x=best.x + dx,
                                   y=best.y + dy, extent=max(best.extent + de, 1.0))  # fmt: skip
                value = iou(candidate)
                if value > score + 1e-9:
                    best, score, improved = candidate, value, True
    return best
