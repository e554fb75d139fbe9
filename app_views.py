"""Views for app.py: turn library results (dictionaries, labels, features, steering) into what the UI
shows. No model logic: everything here calls `fluxsae`; app.py holds the layout and the wiring.

Units of a method: SAE features, ITDA atoms, or MLP neurons (the hidden activations of the site's block,
offered only where the label release has them). MLP neurons have no feature_stats file: their
statistics come from the labels' own columns (`stats_from_labels`)."""

from __future__ import annotations

import logging
import math
import re
import threading

import numpy as np
import torch
from PIL import Image

import fluxsae
from fluxsae.autointerp.examples import UnitCodes
from fluxsae.evaluate import reconstruction_metrics
from fluxsae.feature_stats import FeatureStats, load_feature_stats
from fluxsae.features import feature_heatmap, features_at, top_features, usual_mass
from fluxsae.sites import parse_site

logger = logging.getLogger("fluxsae.app")

MLP = "MLP neurons"
METHODS = {"SAE": "sae", "ITDA": "itda", MLP: "mlp"}
"""The method switch's choices -> the labels' method names. MLP neurons only where labels exist."""
RANKS = {"unusual for this image": "lift", "share of activation": "mass"}
"""How the top-features table is ordered -> `fluxsae.features.top_features(rank=...)`."""
MAX_FEATURES = 8
"""At most this many features are steered at once."""
MODES = ("add", "clamp", "ablate")
"""Steering modes: add (strength in mean token norms), clamp (to the value, in code units), ablate
(clamp to 0)."""


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


def stats_from_labels(labels: dict, site: str, n_units: int) -> FeatureStats:
    """FeatureStats carrying what a label release records per unit (density, max activation, timestep
    profile): for units with no feature_stats file (MLP neurons). The per-step density is not recorded,
    so it is spread evenly over the steps; `density`, `max_activation`, `timestep_profile` and
    `mean_when_active` are the labels' (to float precision)."""
    n_steps = max(len(r.get("timestep_profile") or []) for r in labels.values())
    tokens = 1 << 24  # counts stand for shares: this many tokens per step keeps them exact to 6e-8
    density, peak = torch.zeros(n_units), torch.zeros(n_units)
    profile = torch.zeros(n_steps, n_units, dtype=torch.float64)
    for f, r in labels.items():
        density[f], peak[f] = float(r.get("density") or 0), float(r.get("max_activation") or 0)
        values = list(r.get("timestep_profile") or [])
        profile[: len(values), f] = torch.tensor(values, dtype=torch.float64)
    return FeatureStats(
        site=site,
        steps=tuple(range(n_steps)),
        tokens=torch.full((n_steps,), tokens, dtype=torch.long),
        fires=(density.double() * tokens).round().long().expand(n_steps, -1).clone(),
        activation_sum=profile * tokens,
        max_activation=peak,
        meta={"source": "labels"},
    )


class Dictionaries:
    """The dictionaries, statistics and labels of one release, loaded lazily per (site, method)."""

    def __init__(self, source: str | None, labels_source: str | None = None):
        self.source, self.labels_source = source, labels_source or source
        self._cache: dict[tuple[str, str], tuple | None] = {}
        self._images = None
        self._all_labels = None
        self._methods = None
        self._lock = threading.Lock()

    def methods(self) -> list[str]:
        """The method switch's choices: SAE and ITDA, and MLP neurons when the labels have some."""
        with self._lock:
            if self._methods is None:
                labels = self._dataset()
                found = set(labels.unique("method")) if len(labels) else set()
                self._methods = [m for m, key in METHODS.items() if key != "mlp" or key in found]
            return list(self._methods)

    def get(self, site: str, method: str):
        """(dictionary, stats or None, labels {feature: row}) or None when the release has none there.
        For MLP neurons the "dictionary" is `UnitCodes` (codes = the neurons) and the stats come from
        the labels; None where no MLP labels exist at `site`."""
        method = METHODS.get(method, method)
        if method not in METHODS.values() or (self.source is None and method != "mlp"):
            return None
        if parse_site(site).stream != "image":
            # The app paints features over the image's token grid; a text-stream dictionary (the
            # packaged Shapes ones steer captions, README "Steering") has no place on it: norms there.
            return None
        if method == "mlp" and MLP not in self.methods():
            return None
        key = (str(site), method)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._load(*key)
            return self._cache[key]

    def _dataset(self):
        """The release's whole label dataset, loaded once (callers hold the lock); [] when it has none."""
        if self._all_labels is None:
            self._all_labels = []
            if self.labels_source is not None:
                try:
                    self._all_labels = fluxsae.load_labels(self.labels_source)
                except Exception as e:
                    logger.info("no labels in %s (%s)", self.labels_source, e)
        return self._all_labels

    def _labels(self, site: str, method: str) -> dict:
        """{feature: row} of the labels of one site and method ({} when there are none)."""
        labels = self._dataset()
        if not len(labels):
            return {}
        pairs = zip(labels["site"], labels["method"], strict=True)
        rows = labels.select([i for i, (s, m) in enumerate(pairs) if s == site and m == method])
        return {int(row["feature"]): row for row in rows}

    def _load(self, site: str, method: str):
        if method == "mlp":
            labels = self._labels(site, method)
            if not labels:
                return None
            n_units = max(labels) + 1
            return UnitCodes(site, n_units), stats_from_labels(labels, site, n_units), labels
        loader = fluxsae.load_sae if method == "sae" else fluxsae.load_itda
        try:
            dictionary = loader(self.source, site=site)
        except Exception as e:  # a release without this site: the app shows norms there
            logger.info("no %s dictionary at %s in %s (%s)", method, site, self.source, e)
            return None
        stats = load_feature_stats(self.source, site=site, kind=method)
        return dictionary, stats, self._labels(site, method)

    def example_images(self):
        if self._images is None and self.labels_source is not None:
            try:
                self._images = fluxsae.load_labels(self.labels_source, config="images")
            except Exception as e:
                logger.info("no example images in %s (%s)", self.labels_source, e)
                self._images = []
        return self._images if self._images is not None else []


def _score(row) -> float:
    return float("nan") if row.get("score") is None else float(row["score"])


def label_of(labels: dict, feature: int) -> tuple[str, float]:
    """(label, judge score) of `feature`; "(no label)" and NaN when the release has none."""
    row = labels.get(feature)
    if row is None or not row.get("label"):
        return "(no label)", float("nan")
    return str(row["label"]), _score(row)


def _find_one(part: str, labels: dict, n_features: int) -> int:
    if re.fullmatch(r"[+-]?\d+(\.0*)?", part):
        f = int(float(part))
        if not 0 <= f < n_features:
            raise ValueError(f"There is no feature {part}: ids run from 0 to {n_features - 1}.")
        return f
    hits = search_labels(part, labels, 1)
    if not hits:
        raise ValueError(f"No feature's label matches {part[:80]!r}: try other words or an id.")
    return hits[0][0]


def _entries(entry) -> list[str]:
    text = str(entry if entry is not None else "").strip()
    if not text:
        raise ValueError(
            "Name at least one feature: an id (e.g. 12) or words of its label (e.g. red circle)."
        )
    return [p.strip() for p in text.split(",") if p.strip()]


def find_features(entry, labels: dict, n_features: int) -> list[int]:
    """Feature ids named by `entry`: ids and/or label search terms separated by commas."""
    found = list(dict.fromkeys(_find_one(part, labels, n_features) for part in _entries(entry)))
    if len(found) > MAX_FEATURES:
        raise ValueError(f"Steer at most {MAX_FEATURES} features at once, got {len(found)}.")
    return found


def parse_steering(entry, default, labels: dict, n_features: int, limit: float) -> dict[int, float]:
    """{feature: strength} from "12: 4, red circle: -2, 7": comma-separated ids or label words, each
    with its own strength after a colon, else `default`. Strengths are numbers in [-limit, limit]."""
    out: dict[int, float] = {}
    for part in _entries(entry):
        name, _, value = part.rpartition(":")
        if not name.strip() or not _is_number(value):
            name, value = part, default
        f = _find_one(name.strip(), labels, n_features)
        if f in out:
            raise ValueError(f"Feature {f} is named twice ({part[:80]!r}); give each feature once.")
        out[f] = check_number(value, f"strength of feature {f}", -limit, limit)
    if len(out) > MAX_FEATURES:
        raise ValueError(f"Steer at most {MAX_FEATURES} features at once, got {len(out)}.")
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


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


def features_table(dictionary, acts, stats, labels, steps, rank: str = "mass", n: int = 10) -> list[list]:
    """Rows [feature, label, score, share %, x usual] of the image's top features, ordered by `rank`
    ("mass" or "lift", see `top_features`). "x usual": the feature's mass on this image over its usual
    mass on one (None without stats, or for a feature the stats never saw fire)."""
    rank = "mass" if stats is None else rank
    usual = None if stats is None else usual_mass(stats, [stats.steps[s] for s in steps], acts.shape[2])
    rows = []
    for t in top_features(dictionary, acts, stats, n, steps=steps, rank=rank):
        label, score = label_of(labels, t.feature)
        ratio = None if usual is None or usual[t.feature] <= 0 else round(t.mass / float(usual[t.feature]), 1)
        rows.append([t.feature, label, round(score, 3), round(100 * t.share, 2), ratio])
    return rows


def fvu_of(dictionary, acts) -> float:
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean x||^2 over this image's tokens and steps."""
    return reconstruction_metrics(dictionary, acts.reshape(-1, acts.shape[-1]))["fvu"]


def reconstruction_note(dictionary, acts) -> str:
    """Markdown: the dictionary's FVU on these activations, or why there is none (MLP neurons)."""
    if isinstance(dictionary, UnitCodes):
        return "MLP neurons are the model's own units (nothing is reconstructed, no FVU)"
    return f"FVU on this image {fvu_of(dictionary, acts):.3f}"


def spliced_note(dictionary, mse: float) -> str:
    """Markdown: this image's error with the reconstruction spliced in, beside the release's held-out
    figures (cfg.json's `extra.spliced`, written by training.shapes_dictionaries) where they exist."""
    note = f"reconstruction spliced in: image MSE {mse:.4f}"
    held_out = (getattr(dictionary.cfg, "extra", None) or {}).get("spliced") or {}
    if "image_mse" in held_out and "image_mse_mean_ablation" in held_out:
        note += (
            f" (held-out mean {held_out['image_mse']:.4f}; erasing the site to its mean: "
            f"{held_out['image_mse_mean_ablation']:.4f})"
        )
    return note


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


def feature_panel(labels: dict, feature: int, stats, source=None) -> str:
    """Markdown: label, explainer and score, density, max activation; for an ITDA atom, where it came
    from (`source`: the `fluxsae.provenance.AtomSource` fields the app keeps, see `atom_gallery`)."""
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
    if source is not None:
        p = source["provenance"]
        lines.append(
            f"**Atom source**: token {p['token']} (row {p.get('row', '?')}, column {p.get('col', '?')}) "
            f'at step {p["step"]} of "{p["prompt"]}", seed {p["seed"]} (regenerated; cosine with the atom '
            f"{source['cosine']:.3f})"
        )
    return "\n\n".join(lines)


def atom_gallery(source, px: int) -> list:
    """[(source image with the atom's token outlined, caption), (the token's patch, caption)] for a
    gr.Gallery, enlarged to about `px` with NEAREST; [] without a source."""
    if source is None:
        return []
    out = [(enlarged(source["outlined"], px), f"source: {source['provenance']['prompt']}")]
    if source["patch"] is not None:
        out.append((enlarged(source["patch"], px), f"patch: token {source['provenance']['token']}"))
    return out


def enlarged(image: Image.Image, px: int) -> Image.Image:
    """`image` enlarged by a whole factor with NEAREST to about `px`, so each token stays a crisp square."""
    factor = max(1, px // max(image.size))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


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
