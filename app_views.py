"""Views for app.py: turn library results (dictionaries, labels, features, steering) into what the UI
shows. No model logic: everything here calls `fluxsae`; app.py holds the layout and the wiring."""

from __future__ import annotations

import logging
import math
import re
import threading

import numpy as np
import torch
from PIL import Image

import fluxsae
from fluxsae.evaluate import reconstruction_metrics
from fluxsae.feature_stats import load_feature_stats
from fluxsae.features import feature_heatmap, features_at, top_features

logger = logging.getLogger("fluxsae.app")

METHODS = {"SAE": "sae", "ITDA": "itda"}
MAX_FEATURES = 8
"""At most this many features are steered at once."""


def unknown_words(prompt: str, vocabulary) -> list[str]:
    """The words of `prompt` the model never saw in training (in order, once each)."""
    if not vocabulary:
        return []
    known = set(vocabulary)
    words = re.findall(r"[^\W\d_]+|\S", prompt.lower())
    return list(dict.fromkeys(w for w in words if w not in known))


def check_number(value, what: str, low: float, high: float, whole: bool = False) -> float:
    """A finite number in [low, high] from a number or a numeric string, else a ValueError for people."""
    kind = "a whole number" if whole else "a number"
    bounds = f"{int(low)} to {int(high)}" if whole else f"{low:g} to {high:g}"
    try:
        number = float(value) if not isinstance(value, bool) and value is not None else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not math.isfinite(number) or not low <= number <= high or (whole and number != int(number)):
        raise ValueError(f"The {what} must be {kind} from {bounds}, got {value!r}.")
    return int(number) if whole else number


class Dictionaries:
    """The dictionaries, statistics and labels of one release, loaded lazily per (site, method)."""

    def __init__(self, source: str | None, labels_source: str | None = None):
        self.source, self.labels_source = source, labels_source or source
        self._cache: dict[tuple[str, str], tuple | None] = {}
        self._images = None
        self._lock = threading.Lock()

    def get(self, site: str, method: str):
        """(dictionary, stats or None, labels {feature: row} ) or None when the release has none there."""
        method = METHODS.get(method, method)
        if self.source is None or method not in METHODS.values():
            return None
        key = (str(site), method)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._load(*key)
            return self._cache[key]

    def _load(self, site: str, method: str):
        loader = fluxsae.load_sae if method == "sae" else fluxsae.load_itda
        try:
            dictionary = loader(self.source, site=site)
        except Exception as e:  # a release without this site: the app shows norms there
            logger.info("no %s dictionary at %s in %s (%s)", method, site, self.source, e)
            return None
        stats = load_feature_stats(self.source, site=site, kind=method)
        labels = {}
        try:
            for row in fluxsae.load_labels(self.labels_source, site=site, method=method):
                labels[int(row["feature"])] = row
        except Exception as e:
            logger.info("no labels for %s %s in %s (%s)", method, site, self.labels_source, e)
        return dictionary, stats, labels

    def example_images(self):
        if self._images is None:
            try:
                self._images = fluxsae.load_labels(self.labels_source, config="images")
            except Exception as e:
                logger.info("no example images in %s (%s)", self.labels_source, e)
                self._images = []
        return self._images


def _score(row) -> float:
    return float("nan") if row.get("score") is None else float(row["score"])


def label_of(labels: dict, feature: int) -> tuple[str, float]:
    """(label, judge score) of `feature`; "(no label)" and NaN when the release has none."""
    row = labels.get(feature)
    if row is None or not row.get("label"):
        return "(no label)", float("nan")
    return str(row["label"]), _score(row)


def find_features(entry, labels: dict, n_features: int) -> list[int]:
    """Feature ids named by `entry`: ids and/or label search terms separated by commas."""
    text = str(entry if entry is not None else "").strip()
    if not text:
        raise ValueError(
            "Name at least one feature: an id (e.g. 12) or words of its label (e.g. red circle)."
        )
    found: list[int] = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        if re.fullmatch(r"[+-]?\d+(\.0*)?", part):
            f = int(float(part))
            if not 0 <= f < n_features:
                raise ValueError(f"There is no feature {part}: ids run from 0 to {n_features - 1}.")
            found.append(f)
            continue
        hits = search_labels(part, labels, 1)
        if not hits:
            raise ValueError(f"No feature's label matches {part[:80]!r}: try other words or an id.")
        found.append(hits[0][0])
    found = list(dict.fromkeys(found))
    if len(found) > MAX_FEATURES:
        raise ValueError(f"Steer at most {MAX_FEATURES} features at once, got {len(found)}.")
    return found


def search_labels(query, labels: dict, n: int = 20) -> list[tuple[int, str, float]]:
    """(feature, label, score) of the features whose label holds every word of `query`, best score first."""
    words = str(query or "").lower().split()
    if not words:
        return []
    hits = [
        (f, str(r["label"]), _score(r))
        for f, r in labels.items()
        if r.get("label") and all(w in str(r["label"]).lower() for w in words)
    ]
    hits.sort(key=lambda h: -h[2] if math.isfinite(h[2]) else 1.0)
    return hits[:n]


def features_table(dictionary, acts, stats, labels, steps, n: int = 10) -> list[list]:
    """Rows [feature, label, score, share %] of the image's top features."""
    rows = []
    for t in top_features(dictionary, acts, stats, n, steps=steps):
        label, score = label_of(labels, t.feature)
        rows.append([t.feature, label, round(score, 3), round(100 * t.share, 2)])
    return rows


def fvu_of(dictionary, acts) -> float:
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean x||^2 over this image's tokens and steps."""
    return reconstruction_metrics(dictionary, acts.reshape(-1, acts.shape[-1]))["fvu"]


def heatmap(dictionary, acts, feature: int, image: Image.Image, stats, steps, opacity: float, px: int):
    factor = max(1, px // max(image.size))
    return feature_heatmap(
        dictionary,
        acts,
        feature,
        image,
        stats,
        steps=steps,
        alpha=opacity,
        display_size=(image.width * factor, image.height * factor),
    )


def at_pixel(dictionary, acts, pixel, image_size, stats, labels, steps) -> list[list]:
    rows = []
    for f in features_at(dictionary, acts, pixel=pixel, image_size=image_size, stats=stats, steps=steps):
        label, score = label_of(labels, f.feature)
        rows.append([f.feature, label, round(f.activation, 3), round(100 * f.share, 2)])
    return rows


def feature_panel(labels: dict, feature: int, stats) -> str:
    """Markdown: label, explainer and score, density, max activation."""
    row = labels.get(feature)
    lines = [f"### Feature {feature}"]
    if row is None:
        lines.append("No label for this feature.")
    else:
        lines.append(
            f"**{row['label']}** · score {_score(row):.3f} (explainer "
            f"{row.get('explainer', '?')}, judge {row.get('judge', '?')})"
        )
        if row.get("auroc") is not None:
            lines.append(f"AUROC against the concept `{row.get('concept', '')}`: {float(row['auroc']):.3f}")
    if stats is not None:
        lines.append(
            f"density {float(stats.density[feature]):.4f} of tokens · max activation "
            f"{float(stats.max_activation[feature]):.3g}"
        )
    return "\n\n".join(lines)


def profile_plot(stats, labels: dict, feature: int):
    """A pandas DataFrame (step, mean activation) for gr.LinePlot: the feature's timestep profile."""
    import pandas as pd

    if stats is not None:
        values = stats.timestep_profile[:, feature].tolist()
    elif feature in labels:
        values = list(labels[feature]["timestep_profile"])
    else:
        values = []
    return pd.DataFrame({"step": list(range(len(values))), "mean activation": values})


def examples_gallery(dictionaries: Dictionaries, labels: dict, feature: int) -> list:
    """[(image with the feature's map painted in blue, caption)] of the feature's top examples."""
    from fluxsae.autointerp.render import paint

    row, images = labels.get(feature), dictionaries.example_images()
    if row is None or not len(images):
        return []
    out = []
    for image_id, flat in zip(row["example_images"], row["example_maps"], strict=False):
        example = images[int(image_id)]
        side = math.isqrt(len(flat))
        map01 = np.asarray(flat, dtype=np.float32).reshape(side, side) / 255.0
        out.append((paint(example["image"], map01, 1.0), example["prompt"]))
    return out


def region_mask(editor_value, size: tuple[int, int]) -> torch.Tensor | None:
    """The painted strokes of a gr.ImageEditor value as a bool pixel mask [height, width] of an image of
    `size` (width, height), or None when nothing is painted."""
    if not isinstance(editor_value, dict):
        return None
    layers = [layer for layer in editor_value.get("layers") or [] if layer is not None]
    if not layers:
        return None
    alpha = None
    for layer in layers:
        layer = layer if isinstance(layer, Image.Image) else Image.fromarray(np.asarray(layer))
        a = np.asarray(layer.convert("RGBA").resize(size, Image.Resampling.BOX))[..., 3] > 0
        alpha = a if alpha is None else alpha | a
    if alpha is None or not alpha.any():
        return None
    return torch.from_numpy(alpha)


def lenient(component):
    """`component` (a gr.Number or gr.Slider), its preprocess made to hand non-numeric API input ("5",
    "NaN", "abc") to the handler, which answers with a clear message, instead of failing inside Gradio
    with an opaque error. (Patched on the instance: a subclass would make Gradio write a .pyi stub.)"""
    strict = component.preprocess

    def preprocess(payload):
        try:
            return strict(payload)
        except (TypeError, ValueError):
            return payload

    component.preprocess = preprocess
    return component
