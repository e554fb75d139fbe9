"""The Shapes concepts a unit can be labelled with, as token masks: what the oracle's labels can say.

A concept picks tokens of a scene by up to five components, each optional:

- object attributes (`color:red`, `color:blue|purple` for either colour, `shape:square`, `size:small`,
  `position:top left` for the object's grid cell), combined with AND;
- a part of those objects (`part:...`): the whole object (default: tokens >= 25% covered, as
  `fluxsae.shapes.token_masks`), any part (> 0% covered), its inside (>= 95%), its edge (partly covered),
  the edge on one side (`part:edge:top left`: edge tokens in that direction from the centroid), or the
  halo (background tokens next to it); or, instead of objects, `part:background` (tokens that show no
  object) or `part:everywhere` (every token);
- the scene's background (`background:gray`, `background:black|gray`);
- a region of the image (`region:rows:6-7`, `region:cols:0-1`, `region:cell:top left` for a third of
  the image in each direction, `region:token:27`);
- the denoising steps (`@early`, `@late`: the first or second half of the steps).

Keys read like "color:red+part:edge", "background:gray+part:background+region:rows:6-7@late"; `text` is
what a person reads ("the edge of red objects", "gray background in rows 6-7, late steps only"). Keys
of the earlier vocabulary ("color:red", "color:yellow+shape:square@early", "background:gray",
"object") keep their meaning.

Masks are made from a scene's object placement: for a generated image, the placement the image shows
(`fluxsae.shapes.as_drawn`), not the one that was sampled.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fluxsae.shapes.world import (
    BACKGROUNDS,
    COLORS,
    COVER_FRACTION,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZES,
    TOKEN_GRID,
    Object,
    Scene,
    object_mask,
    token_coverage,
)

N_TOKENS = TOKEN_GRID * TOKEN_GRID
SCOPES = ("all", "early", "late")
"""Which denoising steps a concept is about: all of them, the first half, the second half."""
DIRECTIONS = ("top", "top right", "right", "bottom right", "bottom", "bottom left", "left", "top left")
"""Sides of an object, clockwise from the top: the direction from its centroid to a token's centre."""
INSIDE = 0.95
"""A token at least this covered by an object is inside it; one covered less (but at all) is on its edge."""
OBJECT_PARTS = ("whole", "any", "inside", "edge", *(f"edge:{d}" for d in DIRECTIONS), "halo", "boundary")
PARTS = (*OBJECT_PARTS, "background", "everywhere")
_OBJECT_KINDS = ("shape", "color", "size", "position")
_PART_TEXT = {
    "any": "{}, edge tokens included", "inside": "the inside of {}", "edge": "the edge of {}",
    "halo": "background next to {}",
    "boundary": "the boundary of {} (its edge and the background next to it)",
    **{f"edge:{d}": f"the {d} edge of {{}}" for d in DIRECTIONS},
}  # fmt: skip
_SCOPE_TEXT = {"all": "", "early": ", early steps only", "late": ", late steps only"}


def _third(positions) -> str | None:
    """The name of a row or column of the 3x3 grid of cells ("top third", "middle column"...) when `positions`
    are exactly its three cells, else None."""
    for i, name in enumerate(("top third", "middle band", "bottom third")):
        if set(positions) == set(POSITIONS[3 * i : 3 * i + 3]):
            return name
    for i, name in enumerate(("left third", "middle column", "right third")):
        if set(positions) == set(POSITIONS[i::3]):
            return name
    return None


@functools.cache
def _region_tokens(region: str) -> np.ndarray:
    """bool [64] of a region key ("rows:6-7", "cols:0-1", "cell:top left", "token:27")."""
    kind, _, value = region.partition(":")
    rows, cols = np.divmod(np.arange(N_TOKENS), TOKEN_GRID)
    if kind in ("rows", "cols"):
        low, _, high = value.partition("-")
        axis = rows if kind == "rows" else cols
        return (axis >= int(low)) & (axis <= int(high or low))
    if kind == "cell":
        row, col = divmod(POSITIONS.index(value), 3)
        centre_row, centre_col = (
            (rows + 0.5) * IMAGE_SIZE / TOKEN_GRID,
            (cols + 0.5) * IMAGE_SIZE / TOKEN_GRID,
        )
        third = IMAGE_SIZE / 3
        return (centre_row // third == row) & (centre_col // third == col)
    if kind == "token":
        return np.arange(N_TOKENS) == int(value)
    raise ValueError(f"unknown region {region!r}: rows:a-b, cols:a-b, cell:<position> or token:<index>")


def _region_text(region: str) -> str:
    kind, _, value = region.partition(":")
    if kind in ("rows", "cols"):
        low, _, high = value.partition("-")
        span = f"{kind[:-1]} {low}" if not high or high == low else f"{kind} {low}-{high}"
        return span
    if kind == "cell":
        return f"the {value} of the image"
    row, col = divmod(int(value), TOKEN_GRID)
    return f"the token at row {row}, column {col}"


def _geometry(scene: Scene) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Per object: (coverage [64] in [0, 1], direction [64]: index into DIRECTIONS of each token's
    centre seen from the object's centroid)."""
    # Objects compare by their attributes only, not their placement: the cache is keyed by both.
    return _placed_geometry(
        tuple((o.shape, o.color, o.size, o.position, o.x, o.y, o.extent) for o in scene.objects)
    )


@functools.lru_cache(maxsize=4096)
def _placed_geometry(objects: tuple[tuple, ...]) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    centres = (np.arange(TOKEN_GRID) + 0.5) * IMAGE_SIZE / TOKEN_GRID
    out = []
    for values in objects:
        obj = Object(*values[:4], x=values[4], y=values[5], extent=values[6])
        pixels = object_mask(obj)
        cover = token_coverage(pixels).reshape(-1)
        ys, xs = np.nonzero(pixels)
        cy, cx = (ys.mean() + 0.5, xs.mean() + 0.5) if len(ys) else (obj.y, obj.x)
        angle = np.degrees(np.arctan2(centres[None, :] - cx, cy - centres[:, None])) % 360  # 0 = up
        out.append((cover, (((angle + 22.5) // 45).astype(int) % 8).reshape(-1)))
    return tuple(out)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """8-neighbourhood dilation of a bool [64] token mask."""
    grid = np.pad(mask.reshape(TOKEN_GRID, TOKEN_GRID), 1)
    out = np.zeros((TOKEN_GRID, TOKEN_GRID), dtype=bool)
    for di, dj in itertools.product(range(3), range(3)):
        out |= grid[di : di + TOKEN_GRID, dj : dj + TOKEN_GRID]
    return out.reshape(-1)


def _part_tokens(cover: np.ndarray, direction: np.ndarray, part: str) -> np.ndarray:
    if part == "whole":
        return cover >= COVER_FRACTION
    if part in ("any", "halo", "boundary"):
        return cover > 0
    if part == "inside":
        return cover >= INSIDE
    edge = (cover > 0) & (cover < INSIDE)
    if part == "edge":
        return edge
    return edge & (direction == DIRECTIONS.index(part.split(":", 1)[1]))


@functools.cache
def _components(parts: tuple[str, ...]) -> tuple[dict[str, set[str]], str, set[str] | None, str | None]:
    """A concept's parts -> (object attribute -> allowed values, part, allowed backgrounds or None, region
    or None); ValueError for parts that are no concept."""
    wanted: dict[str, set[str]] = {}
    part, backgrounds, region = "whole", None, None
    allowed = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES, "position": POSITIONS}
    for p in parts:
        kind, _, value = p.partition(":")
        if p == "object":
            continue
        if kind == "part":
            if value not in PARTS:
                raise ValueError(f"unknown part {value!r}: one of {PARTS}")
            part = value
        elif kind == "background":
            backgrounds = set(value.split("|"))
            if not backgrounds <= set(BACKGROUNDS):
                raise ValueError(f"unknown background in {p!r}")
        elif kind == "region":
            _region_tokens(value)
            region = value
        elif kind in allowed:
            values = set(value.split("|"))
            if not values <= set(allowed[kind]):
                raise ValueError(f"unknown {kind} in {p!r}: one of {allowed[kind]}")
            wanted[kind] = values
        else:
            raise ValueError(f"unknown component {p!r}")
    if part in ("background", "everywhere") and wanted:
        raise ValueError(f"part {part!r} takes no object attributes")
    if backgrounds is not None and part == "whole" and not wanted and "object" not in parts:
        part = "background"  # "background:gray" alone: the tokens that show it
    if region is not None and part == "whole" and not wanted and "object" not in parts:
        part = "everywhere"
    return wanted, part, backgrounds, region


@functools.cache
def _complexity(parts: tuple[str, ...]) -> int:
    wanted, part, backgrounds, region = _components(parts)
    n = sum(1 if _third(v) else len(v) for v in wanted.values())
    n += part in OBJECT_PARTS and part != "whole"
    n += len(backgrounds) if backgrounds is not None else part == "background"
    n += region is not None
    return max(n, 1) - 1


@dataclass(frozen=True)
class Concept:
    """A Shapes concept (see the module docstring); `parts` are its components in key spelling."""

    parts: tuple[str, ...]
    """E.g. ("color:red", "part:edge"), ("background:gray", "part:background"), ("object",)."""
    scope: str = "all"
    """One of SCOPES."""

    def __post_init__(self):
        object.__setattr__(self, "parts", tuple(sorted(p for p in self.parts if p != "part:whole")))
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")

    @property
    def key(self) -> str:
        """Machine-readable name, e.g. "color:yellow+shape:square", "color:red+part:edge@early"."""
        return "+".join(self.parts) + ("" if self.scope == "all" else f"@{self.scope}")

    @classmethod
    def from_key(cls, key: str) -> Concept:
        body, _, scope = key.partition("@")
        concept = cls(tuple(body.split("+")), scope or "all")
        try:
            concept._components()
            concept.masks([Scene(objects=(), background="black")])
        except (ValueError, KeyError, IndexError) as err:
            raise ValueError(
                f"{key!r} is not a Shapes concept key (e.g. 'color:red+shape:square@early', "
                f"'color:red+part:edge'): {err}"
            ) from err
        return concept

    def _components(self) -> tuple[dict[str, set[str]], str, set[str] | None, str | None]:
        """(object attribute -> allowed values, part, allowed backgrounds or None, region or None)."""
        return _components(self.parts)

    @property
    def complexity(self) -> int:
        """How many components beyond one: each object attribute (one more for either of two values), a
        part other than the whole object, the background (one more for either of two), a region, a step
        scope. "red", "object", "gray background", "rows 6-7" are 0; "yellow square", "the edge of a red
        object", "red, early steps only" are 1."""
        return _complexity(self.parts) + (self.scope != "all")

    @property
    def text(self) -> str:
        """The label as a person would write it: "yellow square", "the edge of a red object"."""
        wanted, part, backgrounds, region = self._components()
        bg = None if backgrounds is None else " or ".join(b for b in BACKGROUNDS if b in backgrounds)
        where = f" in {_region_text(region)}" if region else ""
        if part in ("background", "everywhere"):
            if bg or part == "background":
                text = f"{bg or 'any'} background{where}"
            else:
                text = _region_text(region) if region else "every token"
            return text + _SCOPE_TEXT[self.scope]
        words = {
            k: " or ".join(x for x in order if x in wanted[k])
            for k, order in (
                ("shape", SHAPES),
                ("color", tuple(COLORS)),
                ("size", SIZES),
                ("position", POSITIONS),
            )
            if k in wanted
        }
        adjectives = " ".join(w for w in (words.get("size"), words.get("color")) if w)
        thing = f"{adjectives} {words.get('shape', 'object')}".strip()
        if part == "whole" and "color" in words and not ({"shape", "size"} & set(words)):
            thing = words["color"]  # "red", as the earlier labels read
        if "position" in words:
            third = _third(wanted["position"])
            thing = f"{thing} in the {third} of the image" if third else f"{thing} at the {words['position']}"
        if part != "whole":
            article = "an" if thing[0] in "aeiou" else "a"
            thing = _PART_TEXT[part].format(f"{article} {thing}")
        if bg:
            thing = f"{thing} on a {bg} background"
        return thing + where + _SCOPE_TEXT[self.scope]

    def masks(self, scenes: Sequence[Scene]) -> np.ndarray:
        """Tokens showing the concept (whatever the steps): bool [n_scenes, 64]."""
        return np.stack([self._mask(s) for s in scenes]) if len(scenes) else np.zeros((0, N_TOKENS), bool)

    def _mask(self, scene: Scene) -> np.ndarray:
        wanted, part, backgrounds, region = self._components()
        if backgrounds is not None and scene.background not in backgrounds:
            return np.zeros(N_TOKENS, dtype=bool)
        geometry = _geometry(scene)
        if part in ("background", "everywhere"):
            mask = np.ones(N_TOKENS, dtype=bool)
            if part == "background":
                for cover, _ in geometry:
                    mask &= cover < COVER_FRACTION
        else:
            mask = np.zeros(N_TOKENS, dtype=bool)
            for obj, (cover, direction) in zip(scene.objects, geometry, strict=True):
                if all(getattr(obj, kind) in values for kind, values in wanted.items()):
                    mask |= _part_tokens(cover, direction, part)
            if part in ("halo", "boundary"):
                touched = np.zeros(N_TOKENS, dtype=bool)
                for cover, _ in geometry:
                    touched |= cover > 0
                halo = _dilate(mask) & ~touched
                mask = halo if part == "halo" else halo | (mask & ~_inside(scene, wanted))
        return mask & _region_tokens(region) if region is not None else mask


def _inside(scene: Scene, wanted: dict) -> np.ndarray:
    """Tokens inside the scene's objects that have the `wanted` attributes."""
    mask = np.zeros(N_TOKENS, dtype=bool)
    for obj, (cover, _) in zip(scene.objects, _geometry(scene), strict=True):
        if all(getattr(obj, kind) in values for kind, values in wanted.items()):
            mask |= cover >= INSIDE
    return mask


def _either(values: Sequence[str], kind: str, size: int) -> list[str]:
    return [f"{kind}:" + "|".join(c) for c in itertools.combinations(values, size)]


def candidate_concepts() -> list[Concept]:
    """Every candidate label of the oracle (all three scopes of each; see the module docstring):

    - single attributes and the earlier pairs (size x shape, colour x shape, size x colour, colour x
      background, shape x background), whole objects; objects in one row or column of grid cells (any,
      or of one colour or shape);
    - each part of objects (any, inside, edge, edge on each side, halo) of: any object, one colour, one of
      two colours, a shape, a size, colour x shape, size x shape, size x colour;
    - whole, any part, inside, edge and halo of objects of one colour, one of two colours, a shape or a
      size (or any object), on one background or one of two;
    - background tokens (any colour, one, or one of two) and every token, in each band of rows or
      columns from an image side, each third of the image, and each token.
    """
    colors, backgrounds = list(COLORS), list(BACKGROUNDS)
    groups = {
        "shape": [f"shape:{s}" for s in SHAPES], "color": [f"color:{c}" for c in colors],
        "size": [f"size:{s}" for s in SIZES], "background": [f"background:{b}" for b in backgrounds],
        "position": [f"position:{p}" for p in POSITIONS],
    }  # fmt: skip
    thirds = ["position:" + "|".join(POSITIONS[3 * r : 3 * r + 3]) for r in range(3)]
    thirds += ["position:" + "|".join(POSITIONS[c::3]) for c in range(3)]
    bodies: list[tuple[str, ...]] = [("object",)]
    bodies += [(c,) for g in ("shape", "color", "size", "position", "background") for c in groups[g]]
    bodies += [(t, *k) for t in thirds for k in [(), *((c,) for c in groups["color"] + groups["shape"])]]
    for a, b in (("size", "shape"), ("color", "shape"), ("size", "color"), ("color", "background"),
                 ("shape", "background")):  # fmt: skip
        bodies += list(itertools.product(groups[a], groups[b]))
    either_colors = _either(colors, "color", 2) + _either(colors, "color", 3)
    kinds = [(), *((c,) for c in groups["color"] + either_colors + groups["shape"] + groups["size"])]
    kinds += list(itertools.product(groups["color"], groups["shape"]))
    kinds += list(itertools.product(groups["size"], groups["shape"]))
    kinds += list(itertools.product(groups["size"], groups["color"]))
    for part in OBJECT_PARTS[1:]:
        bodies += [(*k, f"part:{part}") if k else ("object", f"part:{part}") for k in kinds]
    scene_backgrounds = groups["background"] + _either(backgrounds, "background", 2)
    simple = [(), *((c,) for c in groups["color"] + either_colors + groups["shape"] + groups["size"])]
    for part in ("whole", "any", "inside", "edge", "halo", "boundary"):
        for k, bg in itertools.product(simple, scene_backgrounds):
            if part == "whole" and len(k) == 1 and bg in groups["background"] and not k[0].startswith("size"):
                continue  # colour x background and shape x background are above
            bodies.append((*(k or ("object",)), bg, f"part:{part}"))
    regions = [f"region:{axis}:{a}-{b}" for axis in ("rows", "cols") for a, b in
               ((0, 0), (0, 1), (0, 2), (0, 3), (4, 7), (5, 7), (6, 7), (7, 7))]  # fmt: skip
    regions += [f"region:cell:{p}" for p in POSITIONS] + [f"region:token:{t}" for t in range(N_TOKENS)]
    for region in regions:
        bodies.append(("part:everywhere", region))
        bodies += [("part:background", bg, region) for bg in ["", *scene_backgrounds]]
    concepts = [
        Concept(tuple(p for p in body if p), scope) for body in dict.fromkeys(bodies) for scope in SCOPES
    ]
    return list(dict.fromkeys(concepts))
