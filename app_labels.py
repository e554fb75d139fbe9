"""What the app tells a person about a feature's label: how well the feature detects it, in words, and
which feature a word names (label search, steering by words), ranked by how well features detect it.

A label dataset made with detection scores (`fluxsae.labels`, the packaged Shapes labels) says, per
unit, the held-out precision ("when it fires, is it X?") and recall ("when X is there, does it fire?")
of its label, and, in its "detections" config, how well units detect the concepts a person searches
for. An older dataset has only the reference score, which rewards any unit whose top images show the
concept however little of it the unit covers: the app then says that it ranks by that score.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

from fluxsae.labels import has_detection

RANKED_BY_DETECTION = "F1"
"""Column header of the figure search ranks by when the labels carry detection scores."""
RANKED_BY_SCORE = "reference score (no detection scores in these labels)"


class Entry(NamedTuple):
    """What the app holds for one site and method."""

    dictionary: object
    """The dictionary (or `UnitCodes` for MLP neurons)."""
    stats: object
    """Its FeatureStats (None when the release has none)."""
    labels: dict
    """feature -> its row of the label dataset."""
    detections: list
    """Rows of the dataset's "detections" config at this site and method ([] when it has none)."""


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def label_of(labels: dict, feature: int) -> tuple[str, float | None]:
    """(label as shown, its figure: held-out F1, else the reference score) of `feature`."""
    row = labels.get(feature)
    if row is None:
        return "(no label)", None
    if row.get("status") == "unexplained":
        return "(unexplained)", None
    if not row.get("label"):
        return "(no label)", None
    figure = row.get("f1") if has_detection([row]) else row.get("score")
    return str(row["label"]), _number(figure)


def words(text) -> list[str]:
    """The words of a label or query, lowercased, without articles."""
    return [w for w in re.findall(r"[a-z0-9]+", str(text or "").lower()) if w not in ("a", "an", "the")]


def _unscoped(text: str) -> str:
    """A label without its step restriction: "blue, early steps only" -> "blue"."""
    return re.sub(r", (early|late) steps only$", "", str(text))


def search(query, labels: dict, detections=(), n: int = 20) -> tuple[list[tuple], str]:
    """Features whose label (or a concept they detect) holds every word of `query`, best first, and the
    name of the figure they are ranked by.

    With detection scores: one row per feature, (feature, text, F1, precision, recall), from the labels
    and the "detections" rows; the concept named by exactly the query's words first, over any steps
    ("blue" and "blue, early steps only" before "blue circle"), then by held-out F1, then by density (the
    more general feature first). Without: (feature, label, reference score, None, None), by reference
    score, as the labels were ranked before.
    """
    wanted = words(query)
    if not wanted:
        return [], RANKED_BY_DETECTION
    if not has_detection(labels):
        hits = [
            (f, str(r["label"]), _number(r.get("score")), None, None)
            for f, r in labels.items()
            if r.get("label") and all(w in words(r["label"]) for w in wanted)
        ]
        hits.sort(key=lambda h: -h[2] if h[2] is not None else 1.0)
        return hits[:n], RANKED_BY_SCORE
    candidates = list(detections)
    candidates += [{**r, "text": r["label"], "feature": f} for f, r in labels.items() if r.get("label")]
    ranked = []
    for r in candidates:
        found = words(r["text"])
        if all(w in found for w in wanted) and r.get("f1") is not None:
            exact = sorted(words(_unscoped(r["text"]))) == sorted(wanted)
            ranked.append(((not exact, -float(r["f1"]), -float(r.get("density") or 0)), r))
    ranked.sort(key=lambda kr: kr[0])
    out, seen = [], set()
    for _, r in ranked:
        if r["feature"] not in seen:
            seen.add(r["feature"])
            out.append((int(r["feature"]), str(r["text"]), _round(r["f1"]), _round(r.get("precision")),
                        _round(r.get("recall"))))  # fmt: skip
    return out[:n], RANKED_BY_DETECTION


def _round(value) -> float | None:
    value = _number(value)
    return None if value is None else round(value, 3)


def _percent(value) -> str:
    return f"{100 * float(value):.0f}%"


def describe(row: dict | None, feature: int) -> list[str]:
    """Markdown lines of the feature panel that say what the label is worth, plainly, once."""
    if row is None:
        return ["No label for this feature."]
    if row.get("status") == "unexplained":
        guess = (row.get("explanation") or "").split(";")[0].removeprefix("closest: ")
        return ["**Unexplained**: no label describes where this feature fires precisely enough (at least 80% "
                "of where it fires showing one concept, on scenes the labelling never saw)."
                + (f" The closest candidate was {guess}." if guess else "")]  # fmt: skip
    if row.get("status") != "ok" or not row.get("label"):
        return [f"No label for this feature ({row.get('status')})."]
    lines = [f"**{row['label']}** (explainer {row.get('explainer', '?')})"]
    if row.get("precision") is not None and row.get("recall") is not None:
        level = row.get("threshold") or 0.0
        where = "where it fires" if not level else f"where it fires above {level:g} of its peak"
        counts = (f"({row['n_fired']} and {row['n_concept']} samples of held-out scenes; "
                  f"F1 {float(row['f1']):.2f})")  # fmt: skip
        precision, recall = _percent(row["precision"]), _percent(row["recall"])
        if str(row.get("concept") or "").startswith("noise"):
            lines.append(
                f"It follows the starting noise of the generation, not anything in the image: {precision} of "
                f"{where} lies where that noise points along one direction, and it fires on {recall} of "
                f"those places {counts}. Steering it changes no concept."
            )
        else:
            label = row["label"]
            lines.append(f"It fires on {recall} of {label}; {precision} of {where} is {label} {counts}.")
    if row.get("detection") is not None:
        fuzzing = row.get("fuzzing")
        lines.append(
            f"A judge shown held-out images told those where it fires from others at balanced accuracy "
            f"{float(row['detection']):.2f} ({row.get('n_detection')} answers)"
            + (f"; its region from a random one at {float(fuzzing):.2f}." if fuzzing is not None else ".")
        )
    if row.get("score") is not None:
        lines.append(f"Reference score {float(row['score']):.2f} (judge {row.get('judge', '?')}; it rewards "
                     "top images that show the label, however little of it the feature covers).")  # fmt: skip
    if not has_detection([row]):
        lines.append("These labels carry no detection scores: the reference score is all there is.")
    return lines
