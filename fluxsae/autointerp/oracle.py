"""The Shapes oracle: an explainer and a judge that read the ground truth instead of the pixels.

Explainer: a unit's label is the concept it detects, by the rule of `fluxsae.autointerp.detection`:
token-level precision >= 0.8 (when it fires, is it the concept?) on the scenes the label is chosen on
and on held-out ones, then the best F1, a more complex concept winning only when it earns its parts.
A unit no candidate describes that precisely is "unexplained": it gets no label rather than the
nearest wrong one. Candidates (`fluxsae.autointerp.concepts`) name attributes, parts of objects
(inside, edge, a side, the halo), regions of the image, step halves, and the starting noise.

Scenes should carry the placement the images show (`fluxsae.shapes.as_drawn`): the model draws an
object anywhere in its caption's cell.

Judge (the reference work's score): the score of one image is the share of the blue paint (alpha, see
`render.alpha_map`) that lies on tokens of the label's concept in that scene (a weighted precision).
What is painted is the step-averaged map, so the step restriction of a label is not judged, and a
seed-noise label, which names no region of the image, is not judged at all.

`concept_coverage` answers a simpler question: the best unit's AUROC for each of the 15 single concepts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from fluxsae.autointerp.base import Example, Explanation, Judgement, UnitExamples
from fluxsae.autointerp.concepts import SCOPES, Concept, candidate_concepts
from fluxsae.autointerp.detection import NOISE_KEY, Detector, UnitLabel
from fluxsae.autointerp.render import alpha_map
from fluxsae.shapes import truth
from fluxsae.shapes.world import BACKGROUNDS, COLORS, SHAPES, SIZES, Scene

logger = logging.getLogger(__name__)

SINGLE_CONCEPTS: tuple[str, ...] = (
    "object",
    *(f"shape:{s}" for s in SHAPES),
    *(f"color:{c}" for c in COLORS),
    *(f"size:{s}" for s in SIZES),
    *(f"background:{b}" for b in BACKGROUNDS),
)
"""The 15 single concepts of concept coverage: "object", 3 shapes, 6 colours, 2 sizes, 3 backgrounds."""

__all__ = ["SCOPES", "SINGLE_CONCEPTS", "Concept", "ShapesOracle", "candidate_concepts", "concept_coverage"]


class ShapesOracle:
    """The ground truth as explainer (the concept a unit detects) and judge (paint on the concept's tokens).

        oracle = ShapesOracle.fit(half_acts, drawn_scenes, noise=noise)   # half_acts [2, n_scenes, 64, U]
        oracle.explain(unit)        # Explanation(label="yellow square", concept="color:yellow+shape:square")
        oracle.label_of(3)          # UnitLabel: precision, recall, F1 on held-out scenes, threshold ...
        oracle.judge(example, explanation)                               # Judgement(score=0.93, ...)
    """

    name = "shapes-oracle-detection"
    """Not the earlier AUROC oracle's "shapes-oracle": a label cache of that one is refused, not mixed in."""

    def __init__(self, detector: Detector, aurocs: dict[int, float | None]):
        self.detector = detector
        self.aurocs = aurocs
        """unit -> AUROC for its label's concept on the held-out scenes (None without a region label)."""

    @classmethod
    def fit(
        cls, half_acts: torch.Tensor, scenes: Sequence[Scene], *, noise: torch.Tensor | None = None,
        concepts: Sequence[Concept] | None = None,
    ) -> ShapesOracle:  # fmt: skip
        """Detection figures of every unit for every candidate concept, and the labels they give.

        half_acts: [2, n_scenes, 64, U] each unit's activation averaged over the early and over the late
        half of the denoising steps, for the image tokens of `scenes` (in order). noise: the starting
        noise [n_scenes, 64, channels] (`examples.capture_noise`), for the seed-noise explanation.
        """
        detector = Detector(half_acts, scenes, noise=noise, concepts=concepts)
        held_out = np.nonzero(detector.split[1])[0]
        labels = [detector.label(u) for u in range(detector.n_units)]
        regions = [lab.concept for lab in labels if lab.concept and not lab.concept.startswith(NOISE_KEY)]
        keys = sorted(set(regions))
        aurocs: dict[int, float | None] = {u: None for u in range(detector.n_units)}
        if keys:
            kept = [scenes[i] for i in held_out]
            concepts = [Concept.from_key(k) for k in keys]
            halves = [np.concatenate([_scoped_masks(c, kept, h) for c in concepts], axis=1) for h in (0, 1)]
            targets = torch.from_numpy(np.concatenate(halves))  # [2 halves * n * 64, keys]
            scores = torch.as_tensor(half_acts)[:, torch.from_numpy(held_out)].float()
            table = truth.auroc(scores.reshape(-1, scores.shape[-1]), targets)  # [U, keys]
            column = {k: i for i, k in enumerate(keys)}
            for lab in labels:
                if lab.concept in column:
                    value = float(table[lab.unit, column[lab.concept]])
                    aurocs[lab.unit] = None if np.isnan(value) else value
        return cls(detector, aurocs)

    def label_of(self, unit: int) -> UnitLabel:
        return self.detector.label(unit)

    def auroc_of(self, unit: int, label: str | None = None) -> float | None:
        """The unit's held-out AUROC for its label's concept (None for a noise label or no label)."""
        return self.aurocs.get(int(unit))

    def explain(self, unit: UnitExamples) -> Explanation:
        lab = self.detector.label(unit.feature)
        if lab.status == "no_examples":
            return Explanation(None, "no_examples")
        figures = lab.held_out
        raw = (
            f"held out: precision {figures.precision:.3f}, recall {figures.recall:.3f}, F1 {figures.f1:.3f} "
            f"(fires above {lab.threshold:g} of its peak)"
        )
        if lab.status == "unexplained":
            return Explanation(None, "unexplained", f"closest: {lab.best_guess!r}; {raw}")
        return Explanation(lab.text, "ok", raw, concept=lab.concept)

    def judge(self, example: Example, explanation: Explanation) -> Judgement:
        key = explanation.concept or ""
        if key.startswith(NOISE_KEY):
            return Judgement(None, "no_examples", "a seed-noise label names no region of the image to judge")
        try:
            concept = Concept.from_key(key)
        except ValueError:
            why = f"the Shapes oracle judges only its own concepts, not {explanation.label!r}"
            return Judgement(None, "malformed", why)
        if example.scene is None:
            raise ValueError(f"image {example.image_id} has no scene: the oracle judge needs Shapes scenes.")
        paint = alpha_map(example.acts, example.vmax).reshape(-1).astype(np.float64)
        mask = concept.masks([example.scene])[0]
        total = paint.sum()
        return Judgement(float(paint[mask].sum() / total) if total > 0 else 0.0, "ok")


def _scoped_masks(concept: Concept, scenes: Sequence[Scene], half: int) -> np.ndarray:
    """[n * 64, 1] bool: the concept's tokens in step half `half` (none in the other half of a scoped one)."""
    mask = concept.masks(scenes).reshape(-1, 1)
    if concept.scope == ("late" if half == 0 else "early"):
        mask = np.zeros_like(mask)
    return mask


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
