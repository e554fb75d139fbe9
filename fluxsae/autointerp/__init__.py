"""Automated interpretation: label every unit of a site from its top images, and score the label.

- `base`: the explainer / judge interface, the reference work's prompts and score.
- `render`: a unit's activations painted in blue over an image.
- `examples`: one streaming pass -> statistics, top images and step-half activations per unit.
- `oracle`: the Shapes ground truth as explainer and judge; concept coverage.
- `vlm`: a local vision-language model (transformers); `http`: an OpenAI-compatible endpoint.
- `run`: label many units, cached per unit and resumable.
"""

from fluxsae.autointerp.base import (
    ChatExplainer,
    ChatJudge,
    ChatResult,
    Example,
    Explainer,
    Explanation,
    Judge,
    Judgement,
    UnitExamples,
    parse_pattern,
    parse_score,
    reference_score,
)
from fluxsae.autointerp.http import HttpChat
from fluxsae.autointerp.oracle import Concept, ShapesOracle, candidate_concepts, concept_coverage
from fluxsae.autointerp.render import paint, strip
from fluxsae.autointerp.run import label_units
from fluxsae.autointerp.vlm import TransformersVLM

__all__ = [
    "ChatExplainer",
    "ChatJudge",
    "ChatResult",
    "Concept",
    "Example",
    "Explainer",
    "Explanation",
    "HttpChat",
    "Judge",
    "Judgement",
    "ShapesOracle",
    "TransformersVLM",
    "UnitExamples",
    "candidate_concepts",
    "concept_coverage",
    "label_units",
    "paint",
    "parse_pattern",
    "parse_score",
    "reference_score",
    "strip",
]
