"""The explainer / judge interface of automated interpretation, the reference work's prompts and score.

One feature (any unit: an SAE feature, an ITDA atom, an MLP neuron, a random direction) is shown
through its top-activating images (`Example`: the generated image and the unit's activation map on
its token grid, painted in blue by `fluxsae.autointerp.render`):

    explanation = explainer.explain(unit)              # UnitExamples -> Explanation(label, status, ...)
    judgement = judge.judge(example, explanation)      # -> Judgement(score in [0, 1], status, ...)
    score = reference_score(positive_scores, negative_scores)

Backends: `fluxsae.autointerp.vlm` (a local vision-language model through transformers),
`fluxsae.autointerp.http` (an OpenAI-compatible chat-completions endpoint) and
`fluxsae.autointerp.oracle` (the Shapes ground truth). The two model backends share `ChatExplainer`
and `ChatJudge` below: they differ only in how a chat (text + PIL images) is completed.

A model's answer that cannot be read (no "PATTERN:" / "SCORE:" line, an empty reply, a broken
response) is recorded with its status and raw text, never as a label or a score.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

Status = Literal["ok", "malformed", "empty", "error", "no_examples", "unexplained"]
"""How an answer ended: "ok" (read), "malformed" (an answer that does not follow the format),
"empty" (no text), "error" (no answer after every retry), "no_examples" (nothing to show),
"unexplained" (no candidate label describes the unit precisely enough: the Shapes oracle)."""


@dataclass(frozen=True)
class Example:
    """One top-activating image of a unit, as the explainer and the judge see it."""

    image: Image.Image
    """The generated image, without overlay (e.g. 64x64 RGB for the Shapes model)."""
    acts: np.ndarray
    """float32 [rows, cols]: the unit's activation on each image token (mean over the denoising steps)."""
    vmax: float
    """The activation painted at full strength (the unit's largest map value over its top images), so
    every image of one unit is painted on one scale."""
    image_id: int
    """Index of the image in the run (the `images` config of the label dataset)."""
    scene: object | None = None
    """The `fluxsae.shapes.Scene` the image was generated from, where known (the oracle needs it)."""


class Explanation(NamedTuple):
    """What an explainer said about one unit."""

    label: str | None
    """The short description ("yellow square"); None unless status is "ok"."""
    status: Status
    raw: str = ""
    """The backend's full answer (the model's text; the oracle's candidate ranking)."""
    concept: str | None = None
    """A machine-readable key of the label's concept, when the explainer knows one (the oracle)."""
    requests: int = 0
    """HTTP requests or generate() calls made, retries included."""


class Judgement(NamedTuple):
    """A judge's score for one image against one label."""

    score: float | None
    """In [0, 1]: how well the painted region matches the label; None unless status is "ok"."""
    status: Status
    raw: str = ""
    requests: int = 0


@dataclass(frozen=True)
class UnitExamples:
    """One unit and its top-activating images: what an explainer is given."""

    site: str
    method: str
    """"sae", "itda", "mlp" (neurons) or "random" (random unit directions, the floor)."""
    feature: int
    """The unit's index within its site and method."""
    examples: tuple[Example, ...]
    """Its top images, best first (may be empty for a unit that never fires)."""
    trials: tuple = ()
    """Held-out `fluxsae.autointerp.scoring.Trial`s for a detection scorer (none: not scored)."""


class Explainer(Protocol):
    name: str

    def explain(self, unit: UnitExamples) -> Explanation:
        """Describe what the painted regions of a unit's top images have in common."""
        ...


class Judge(Protocol):
    name: str

    def judge(self, example: Example, explanation: Explanation) -> Judgement:
        """Score in [0, 1] how well the painted region of one image matches the explanation."""
        ...


def reference_score(positives: Sequence[float | None], negatives: Sequence[float | None]) -> float | None:
    """The reference work's score: mean of s over the unit's own top images and of 1 - s over the top
    images of other units (each shown with that unit's painting). Judgements that failed (None) are
    left out; None when none is left."""
    terms = [s for s in positives if s is not None] + [1.0 - s for s in negatives if s is not None]
    return float(np.mean(terms)) if terms else None


# -- chat backends: prompts and parsing ------------------------------------------------------------

EXPLAIN_PROMPT = (
    "Each of the {n} images below comes from an image generator. A hidden unit of the generator responds "
    "to some regions of each image; those regions are painted blue, and the stronger the blue, the "
    "stronger the response. For each image, say in a few words what the blue regions show. Then say what "
    "all the blue regions have in common, as specifically as you can (an object's colour, shape, size, "
    "position, or the background), on a last line of exactly this form:\n"
    "PATTERN: <a short description>"
)
JUDGE_PROMPT = (
    "This image comes from an image generator. Some regions are painted blue: the stronger the blue, the "
    "stronger a hidden unit of the generator responds there. The unit is described as: \"{label}\".\n"
    "How well do the blue regions match this description? Be strict: a vague description that would fit "
    "almost any image deserves a low score, and so does blue paint on regions the description does not "
    "name. Answer with a last line of exactly this form:\n"
    "SCORE: <a number from 0 to 1>"
)

_PATTERN = re.compile(r"^\W*pattern\W*:\s*(?P<label>.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_SCORE = re.compile(r"score\W*:\s*(?P<value>[-+]?\d+(?:\.\d+)?|\.\d+)", re.IGNORECASE)
MAX_LABEL_CHARS = 200
"""A "pattern" longer than this is not a label: the answer is recorded as malformed."""


def parse_pattern(text: str | None) -> tuple[str | None, Status]:
    """The label of an explainer's answer (its last "PATTERN: ..." line) and the answer's status."""
    if text is None or not text.strip():
        return None, "empty"
    found = _PATTERN.findall(text)
    label = found[-1].strip().strip("\"'`*").strip() if found else ""
    if not label or len(label) > MAX_LABEL_CHARS:
        return None, "malformed"
    return label, "ok"


def parse_score(text: str | None) -> tuple[float | None, Status]:
    """The score of a judge's answer (its last "SCORE: x" with 0 <= x <= 1) and the answer's status."""
    if text is None or not text.strip():
        return None, "empty"
    found = _SCORE.findall(text)
    if not found:
        return None, "malformed"
    value = float(found[-1])
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        return None, "malformed"
    return value, "ok"


class ChatResult(NamedTuple):
    """One completed chat: the answer text (None when there is none), how it ended, requests made."""

    text: str | None
    status: Status
    requests: int = 1
    error: str = ""


class ChatBackend(Protocol):
    name: str

    def complete(self, text: str, images: Sequence[Image.Image]) -> ChatResult:
        """Answer one user turn made of `images` (in order, before the text) and `text`."""
        ...


class ChatExplainer:
    """An explainer that asks a vision-language model (any ChatBackend) for the common pattern."""

    def __init__(self, backend: ChatBackend, prompt: str = EXPLAIN_PROMPT, display_size: int = 256):
        self.backend = backend
        self.prompt = prompt
        self.display_size = display_size
        self.name = backend.name

    def explain(self, unit: UnitExamples) -> Explanation:
        from fluxsae.autointerp.render import paint

        examples = unit.examples
        if not examples:
            return Explanation(None, "no_examples")
        images = [paint(e.image, e.acts, e.vmax, size=self.display_size) for e in examples]
        result = self.backend.complete(self.prompt.format(n=len(images)), images)
        if result.status != "ok":
            return Explanation(None, result.status, result.text or result.error, requests=result.requests)
        label, status = parse_pattern(result.text)
        return Explanation(label, status, result.text or "", requests=result.requests)


class ChatJudge:
    """A judge that asks a vision-language model (any ChatBackend) for a 0-1 score, one image at a time."""

    def __init__(self, backend: ChatBackend, prompt: str = JUDGE_PROMPT, display_size: int = 256):
        self.backend = backend
        self.prompt = prompt
        self.display_size = display_size
        self.name = backend.name

    def judge(self, example: Example, explanation: Explanation) -> Judgement:
        from fluxsae.autointerp.render import paint

        if explanation.label is None:
            return Judgement(None, "no_examples")
        image = paint(example.image, example.acts, example.vmax, size=self.display_size)
        result = self.backend.complete(self.prompt.format(label=explanation.label), [image])
        if result.status != "ok":
            return Judgement(None, result.status, result.text or result.error, requests=result.requests)
        score, status = parse_score(result.text)
        return Judgement(score, status, result.text or "", requests=result.requests)
