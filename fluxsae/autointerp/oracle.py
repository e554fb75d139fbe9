"""The Shapes oracle: an explainer and a judge that read the ground truth instead of the pixels.

Explainer: the label of a unit is the candidate concept whose token mask its activation detects
best (highest AUROC). Candidates (`candidate_concepts`): every single attribute ("red", "square",
"small object", "object at the top left", "gray background", "object"), each also restricted to
the early or the late half of the denoising steps ("red, early steps only"), and pairs ("yellow
square", "small red object", "green on a gray background", ...). A more complex candidate wins only
when it beats a simpler one by `margin` AUROC per extra part, so "red" is not reported as "red on a
black background" for a trace of difference.

AUROCs are computed over (step half, scene, token) samples: the unit's activation averaged over
the early steps and over the late steps of each image, so one AUROC ranks every candidate, step-
restricted or not. `concept_coverage` answers the simpler question of the issue (activations
averaged over all steps, the 15 single concepts).

Judge: the score of one image is the share of the blue paint (alpha, see `render.alpha_map`) that
lies on tokens of the label's concept in that scene (a weighted precision). What is painted is the
step-averaged map, so the step restriction of a label cannot be seen and is not judged.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fluxsae.autointerp.base import Example, Explanation, Judgement, UnitExamples
from fluxsae.autointerp.render import alpha_map
from fluxsae.shapes import truth
from fluxsae.shapes.world import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Scene, token_masks

logger = logging.getLogger(__name__)

SCOPES = ("all", "early", "late")
"""Which denoising steps a concept is about: all of them, the first half, the second half."""

SINGLE_CONCEPTS: tuple[str, ...] = (
    "object",
    *(f"shape:{s}" for s in SHAPES),
    *(f"color:{c}" for c in COLORS),
    *(f"size:{s}" for s in SIZES),
    *(f"background:{b}" for b in BACKGROUNDS),
)
"""The 15 single concepts of concept coverage: "object", 3 shapes, 6 colours, 2 sizes, 3 backgrounds."""

_OBJECT_KINDS = ("shape", "color", "size", "position")


@dataclass(frozen=True)
class Concept:
    """A Shapes concept: one or two attributes, optionally restricted to early or late steps."""

    parts: tuple[str, ...]
    """Attributes in `truth.CONCEPTS` spelling ("color:red", "shape:square", "background:gray", "object");
    a token shows the concept when one object on it has every object attribute and the scene has the
    background attribute (a background alone: the tokens that show no object)."""
    scope: str = "all"
    """One of SCOPES."""

    @property
    def key(self) -> str:
        """Machine-readable name, e.g. "color:yellow+shape:square", "color:red@early"."""
        return "+".join(self.parts) + ("" if self.scope == "all" else f"@{self.scope}")

    @classmethod
    def from_key(cls, key: str) -> Concept:
        parts, _, scope = key.partition("@")
        concept = cls(tuple(parts.split("+")), scope or "all")
        known = all(p == "object" or p in truth.CONCEPTS for p in concept.parts)
        if concept.scope not in SCOPES or not known:
            raise ValueError(f"{key!r} is not a Shapes concept key (e.g. 'color:red+shape:square@early').")
        return concept

    @property
    def complexity(self) -> int:
        return len(self.parts) - 1 + (self.scope != "all")

    @property
    def text(self) -> str:
        """The label as a person would write it: "yellow square", "green on a gray background"."""
        values = dict(p.split(":", 1) if ":" in p else (p, p) for p in self.parts)
        background = values.pop("background", None)
        shape, color, size, position = (values.get(k) for k in _OBJECT_KINDS)
        noun = shape or "object"
        words = " ".join(w for w in (size, color) if w)
        if values:
            thing = f"{words} {noun}".strip() if (shape or not color or size) else color
            if position:
                thing = f"{thing} at the {position}"
            text = thing if background is None else f"{thing} on a {background} background"
        else:
            text = f"{background} background"
        return text + {"all": "", "early": ", early steps only", "late": ", late steps only"}[self.scope]

    def masks(self, scenes: Sequence[Scene]) -> np.ndarray:
        """Tokens showing the concept (whatever the steps): bool [n_scenes, 64]."""
        return np.stack([self._mask(s) for s in scenes])

    def _mask(self, scene: Scene) -> np.ndarray:
        wanted = dict(p.split(":", 1) for p in self.parts if p != "object")
        background = wanted.pop("background", None)
        if background is not None and background != scene.background:
            return np.zeros(truth.N_TOKENS, dtype=bool)
        if not wanted and "object" not in self.parts:
            return token_masks(scene)[f"background:{background}"].reshape(-1)
        mask = np.zeros(truth.N_TOKENS, dtype=bool)
        for obj in scene.objects:
            if all(getattr(obj, kind) == value for kind, value in wanted.items()):
                mask |= _object_tokens(obj, scene.background)
        return mask


def _object_tokens(obj, background: str) -> np.ndarray:
    return token_masks(Scene(objects=(obj,), background=background))["object"].reshape(-1)


def candidate_concepts() -> list[Concept]:
    """Every candidate label of the oracle: single attributes in all three scopes, then pairs."""
    singles = ["object", *(c for c in truth.CONCEPTS if c != "object")]
    out = [Concept((c,), scope) for c in singles for scope in SCOPES]
    groups = {
        "shape": [f"shape:{s}" for s in SHAPES], "color": [f"color:{c}" for c in COLORS],
        "size": [f"size:{s}" for s in SIZES], "background": [f"background:{b}" for b in BACKGROUNDS],
    }  # fmt: skip
    for a, b in (("size", "shape"), ("color", "shape"), ("size", "color"), ("color", "background"),
                 ("shape", "background")):  # fmt: skip
        out.extend(Concept((x, y)) for x, y in itertools.product(groups[a], groups[b]))
    assert len(POSITIONS) == 9  # positions enter as singles only: pairs with them are too rare to rank
    return out


def scope_labels(concepts: Sequence[Concept], scenes: Sequence[Scene]) -> torch.Tensor:
    """Labels of the (half, scene, token) samples: bool [2 * n_scenes * 64, C], early half first."""
    masks = np.stack([c.masks(scenes).reshape(-1) for c in concepts], axis=1)  # [n * 64, C]
    scope = np.array([c.scope for c in concepts])
    early = masks & (scope != "late")
    late = masks & (scope != "early")
    return torch.from_numpy(np.concatenate([early, late], axis=0))


class ShapesOracle:
    """The ground truth as explainer (best-detected concept) and judge (paint on the concept's tokens).

        oracle = ShapesOracle.fit(half_acts, scenes)       # half_acts [2, n_scenes, 64, U]
        oracle.explain(unit)                                # Explanation(label="yellow square", ...)
        oracle.judge(example, explanation)                  # Judgement(score=0.93, ...)
    """

    name = "shapes-oracle"

    def __init__(self, aurocs: torch.Tensor, concepts: Sequence[Concept], margin: float = 0.01):
        self.aurocs = torch.as_tensor(aurocs, dtype=torch.float64)
        """[U, C] AUROC of every unit for every candidate concept."""
        self.concepts = list(concepts)
        self.margin = float(margin)
        self._by_text = {c.text: c for c in self.concepts}
        self._by_key = {c.key: c for c in self.concepts}
        if self.aurocs.ndim != 2 or self.aurocs.shape[1] != len(self.concepts):
            raise ValueError(
                f"aurocs must be [units, {len(self.concepts)} concepts], got {tuple(self.aurocs.shape)}"
            )

    @classmethod
    def fit(
        cls, half_acts: torch.Tensor, scenes: Sequence[Scene], concepts: Sequence[Concept] | None = None,
        margin: float = 0.01,
    ) -> ShapesOracle:  # fmt: skip
        """AUROC of every unit for every candidate concept.

        half_acts: [2, n_scenes, 64, U] each unit's activation averaged over the early and over the late
        half of the denoising steps, for the image tokens of `scenes` (in order).
        """
        half_acts = torch.as_tensor(half_acts)
        n = len(scenes)
        if half_acts.ndim != 4 or tuple(half_acts.shape[:3]) != (2, n, truth.N_TOKENS):
            raise ValueError(
                f"half_acts must be [2 step halves, n_scenes={n}, {truth.N_TOKENS} tokens, units], got "
                f"{tuple(half_acts.shape)}"
            )
        concepts = list(candidate_concepts() if concepts is None else concepts)
        scores = half_acts.reshape(2 * n * truth.N_TOKENS, -1).float()
        return cls(truth.auroc(scores, scope_labels(concepts, scenes)), concepts, margin)

    def concept_of(self, unit: int) -> tuple[Concept, float]:
        """The label concept of a unit and its AUROC."""
        row = torch.nan_to_num(self.aurocs[unit], nan=-1.0)
        penalty = torch.tensor([c.complexity for c in self.concepts], dtype=torch.float64) * self.margin
        best = int((row - penalty).argmax())
        return self.concepts[best], float(row[best])

    def auroc_of(self, unit: int, label: str | None) -> float | None:
        """The unit's AUROC for a label given as text or key (None for a label that is no concept)."""
        concept = self._by_key.get(label) or self._by_text.get(label) if label else None
        if concept is None:
            return None
        value = float(self.aurocs[unit, self.concepts.index(concept)])
        return None if np.isnan(value) else value

    def explain(self, unit: UnitExamples) -> Explanation:
        concept, value = self.concept_of(unit.feature)
        top = torch.nan_to_num(self.aurocs[unit.feature], nan=-1.0).topk(3)
        pairs = zip(top.values.tolist(), top.indices.tolist(), strict=True)
        raw = "; ".join(f"{self.concepts[i].key}={v:.3f}" for v, i in pairs)
        return Explanation(concept.text, "ok", raw, concept=concept.key)

    def judge(self, example: Example, explanation: Explanation) -> Judgement:
        concept = self._by_key.get(explanation.concept or "") or self._by_text.get(explanation.label or "")
        if concept is None:
            why = f"the Shapes oracle judges only its own concepts, not {explanation.label!r}"
            return Judgement(None, "malformed", why)
        if example.scene is None:
            raise ValueError(f"image {example.image_id} has no scene: the oracle judge needs Shapes scenes.")
        paint = alpha_map(example.acts, example.vmax).reshape(-1).astype(np.float64)
        mask = concept.masks([example.scene])[0]
        total = paint.sum()
        return Judgement(float(paint[mask].sum() / total) if total > 0 else 0.0, "ok")


def concept_coverage(
    unit_acts: torch.Tensor, scenes: Sequence[Scene], threshold: float = 0.9,
    concepts: Sequence[str] = SINGLE_CONCEPTS,
) -> dict:  # fmt: skip
    """Best unit per single concept: unit_acts [n_scenes, 64, U] (averaged over all steps) ->
    {"best": {concept: (unit, auroc)}, "median_best_auroc", "coverage" (share with AUROC >= threshold)}."""
    aurocs, names = truth.concept_auroc(unit_acts, scenes, list(concepts))
    best = truth.best_units(aurocs, names)
    values = [best[c][1] for c in names if c in best]
    return {
        "best": best,
        "median_best_auroc": float(np.median(values)) if values else float("nan"),
        "coverage": float(np.mean([v >= threshold for v in values])) if values else 0.0,
        "threshold": threshold,
    }
