"""Detection and fuzzing scores for judges that see pixels (a local VLM, an HTTP endpoint): the visual
form of the detection and fuzzing scores used for language-model features (Paulo et al. 2024).

The reference score asks a judge how well a unit's own top images match its label, so any unit whose
top images show the concept scores well, however little of the concept it covers. These two ask
whether the label predicts where the unit fires, on images the explainer never saw:

- detection: the judge sees held-out images one at a time, unpainted, with the label, and answers
  whether the image shows what the label describes. Half are images where the unit fires (beyond the
  top images shown to the explainer), half where it does not: near misses (top images of the units
  that fire most like it) and random others, shuffled. Balanced accuracy, precision and recall of the
  judge's answers against where the unit fires.
- fuzzing: images where the unit fires, painted blue on the unit's own region or on a random region of
  as many tokens; the judge answers whether the painted region shows what the label describes.
  Balanced accuracy.

One request per image. An answer that cannot be read is recorded as such and counted neither as yes
nor as no; a unit whose readable answers leave one class empty gets no score.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from fluxsae.autointerp.base import ChatBackend, Example, Status
from fluxsae.autointerp.render import paint

DETECT_PROMPT = (
    'This image comes from an image generator. Does it show the following: "{label}"? Judge only what '
    "is visible. Answer with a last line of exactly this form:\nANSWER: YES or NO"
)
FUZZ_PROMPT = (
    "This image comes from an image generator. Some regions are painted blue. Do the blue regions show "
    'the following: "{label}"? Answer NO if the blue paint is mostly on something else. Answer with a '
    "last line of exactly this form:\nANSWER: YES or NO"
)
_ANSWER = re.compile(r"answer\W*:\s*\**\s*(yes|no)\b", re.IGNORECASE)


class Trial(NamedTuple):
    """One image shown to the judge."""

    kind: str
    """"detection" (unpainted) or "fuzzing" (painted with `example.acts`)."""
    example: Example
    truth: bool
    """detection: the unit fires on the image; fuzzing: the paint is the unit's own region."""


def parse_yes_no(text: str | None) -> tuple[bool | None, Status]:
    """The judge's last "ANSWER: YES/NO" as a bool, and the answer's status ("malformed" without one)."""
    if text is None or not text.strip():
        return None, "empty"
    found = _ANSWER.findall(text)
    if not found:
        return None, "malformed"
    return found[-1].lower() == "yes", "ok"


def balanced_scores(truths: Sequence[bool], answers: Sequence[bool | None]) -> dict:
    """{"balanced_accuracy", "precision", "recall", "n", "unreadable"} of readable answers against the
    truth; the scores are None where a class has no readable answer (or nothing was answered yes)."""
    pairs = [(t, a) for t, a in zip(truths, answers, strict=True) if a is not None]
    pos = [a for t, a in pairs if t]
    neg = [a for t, a in pairs if not t]
    said_yes = [t for t, a in pairs if a]
    recall = float(np.mean(pos)) if pos else None
    specificity = 1.0 - float(np.mean(neg)) if neg else None
    return {
        "balanced_accuracy": None if recall is None or specificity is None else (recall + specificity) / 2,
        "precision": float(np.mean(said_yes)) if said_yes else None,
        "recall": recall,
        "n": len(pairs),
        "unreadable": len(truths) - len(pairs),
    }


def random_region(acts: np.ndarray, seed: int) -> np.ndarray:
    """A map with the values of `acts` [rows, cols] moved to a random set of as many tokens, not all the
    same tokens as before (when the map leaves room): the fuzzing decoy."""
    flat = np.asarray(acts, dtype=np.float32).reshape(-1)
    rng = random.Random(seed)
    active = [i for i in range(flat.size) if flat[i] > 0]
    idle = [i for i in range(flat.size) if flat[i] <= 0]
    for _ in range(20):
        chosen = rng.sample(range(flat.size), len(active))
        if set(chosen) != set(active) or not idle:
            break
    out = np.zeros_like(flat)
    out[chosen] = flat[active]
    return out.reshape(np.shape(acts))


class ChatDetector:
    """Detection and fuzzing with a vision-language model (any ChatBackend), one image per request."""

    def __init__(self, backend: ChatBackend, display_size: int = 256):
        self.backend = backend
        self.display_size = display_size
        self.name = f"detect:{backend.name}"

    def answer(self, trial: Trial, label: str) -> tuple[bool | None, Status, int, str]:
        """(yes / no / None, status, requests, raw text) for one trial."""
        e = trial.example
        if trial.kind == "fuzzing":
            image, prompt = paint(e.image, e.acts, e.vmax, size=self.display_size), FUZZ_PROMPT
        else:
            image = e.image.convert("RGB").resize((self.display_size, self.display_size))
            prompt = DETECT_PROMPT
        result = self.backend.complete(prompt.format(label=label), [image])
        if result.status != "ok":
            return None, result.status, result.requests, result.text or result.error
        value, status = parse_yes_no(result.text)
        return value, status, result.requests, result.text or ""

    def score(self, trials: Sequence[Trial], label: str) -> dict:
        """The record fields of a unit's detection and fuzzing: scores, their sample sizes, the answers."""
        answers = [self.answer(t, label) for t in trials]
        pairs = list(zip(trials, answers, strict=True))
        out = {
            "detector": self.name,
            "requests": sum(a[2] for a in answers),
            "detection_answers": [[t.kind, t.truth, a[0], a[1]] for t, a in pairs],
        }
        for kind, prefix in (("detection", "detection"), ("fuzzing", "fuzzing")):
            chosen = [(t.truth, a[0]) for t, a in pairs if t.kind == kind]
            s = balanced_scores([c[0] for c in chosen], [c[1] for c in chosen])
            out[prefix] = s["balanced_accuracy"]
            out[f"n_{prefix}"] = s["n"]
            if kind == "detection":
                out["detection_precision"], out["detection_recall"] = s["precision"], s["recall"]
        return out


def detection_trials(
    unit: int, fires: Mapping[int, bool], map_of: Callable[[int], np.ndarray], images: Mapping,
    scenes: Mapping, shown: Sequence[int], near: Sequence[int], *, n: int = 4, seed: int = 0,
) -> tuple[Trial, ...]:  # fmt: skip
    """A unit's held-out trials: `n` images where it fires and `n` where it does not (half near misses),
    for detection; the same `n` firing images painted on its region and on a random one, for fuzzing.

    fires: image id -> whether the unit fires on it; map_of(id): its step-averaged map [rows, cols] on
    that image; images / scenes: id -> PIL image / scene; shown: the ids its explainer saw (left out);
    near: ids of near misses (top images of similar units), tried first. Shuffled with `seed` and the
    unit, so reruns ask the same questions.
    """
    rng = random.Random(seed * 1_000_003 + int(unit))
    have = [i for i in images if i in fires]
    firing = [i for i in have if fires[i] and i not in set(shown)]
    quiet = [i for i in have if not fires[i]]
    positives = rng.sample(firing, min(n, len(firing)))
    near_misses = [i for i in dict.fromkeys(near) if i in set(quiet)][: n // 2]
    others = [i for i in quiet if i not in set(near_misses)]
    negatives = near_misses + rng.sample(others, min(n - len(near_misses), len(others)))
    maps = {i: np.asarray(map_of(i), dtype=np.float32) for i in [*positives, *negatives]}
    vmax = float(max((maps[i].max() for i in positives), default=0.0)) or 1.0

    def example(i, acts):
        return Example(images[i], acts, vmax, i, scenes.get(i))

    trials = [Trial("detection", example(i, maps[i]), True) for i in positives]
    trials += [Trial("detection", example(i, maps[i]), False) for i in negatives]
    trials += [Trial("fuzzing", example(i, maps[i]), True) for i in positives]
    trials += [Trial("fuzzing", example(i, random_region(maps[i], rng.randrange(1 << 30))), False)
               for i in positives]  # fmt: skip
    rng.shuffle(trials)
    return tuple(trials)
