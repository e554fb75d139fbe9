"""Views for app.py: turn library results (dictionaries, labels, features, steering) into what the UI
shows. No model logic: everything here calls `fluxsae`; app.py holds the layout and the wiring.

Units of a method: SAE features, ITDA atoms, or MLP neurons (the hidden activations of the site's block,
offered only where the label release has them). MLP neurons have no feature_stats file: their
statistics come from the labels' own columns (`stats_from_labels`)."""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import fluxsae
from app_labels import RANKED_BY_DETECTION, RANKED_BY_SCORE, Entry, describe, label_of, search
from fluxsae.autointerp.examples import UnitCodes
from fluxsae.evaluate import reconstruction_metrics
from fluxsae.feature_stats import FeatureStats, load_feature_stats
from fluxsae.features import feature_heatmap, features_at, top_features, usual_mass
from fluxsae.labels import has_detection
from fluxsae.sites import parse_site

logger = logging.getLogger("fluxsae.app")

MLP = "MLP neurons"
METHODS = {"SAE": "sae", "ITDA": "itda", MLP: "mlp"}
"""The method switch's choices -> the labels' method names. MLP neurons only where labels exist."""
RANKS = {"unusual for this image": "lift", "share of activation": "mass"}
"""How the top-features table is ordered -> `fluxsae.features.top_features(rank=...)`."""
ALL, LABELLED = "all features", "labelled features only"
"""What the top-features table shows (`show_choices` adds a Matryoshka dictionary's first groups)."""
MAX_SEED = 2**32 - 1
MAX_FEATURES = 8
"""At most this many features are steered at once."""
MODES = ("add", "clamp", "ablate")
"""Steering modes: add (strength in mean token norms), clamp (to the value, in code units), ablate
(clamp to 0)."""


def cut_prompt(prompt: str, limit: int) -> str:
    """`prompt` cut to at most `limit` characters at a word boundary (a cut word would read as unknown)."""
    if len(prompt) <= limit:
        return prompt
    cut = prompt[: limit + 1].rsplit(None, 1)[0] if " " in prompt[:limit] else prompt[:limit]
    return cut[:limit].rstrip()


def read_up_to(pipe, prompt: str, max_tokens: int) -> str | None:
    """The last words of `prompt` the model reads when its T5 tokens outrun `max_tokens`, else None."""
    tokenizer = getattr(pipe, "tokenizer_2", None)
    if tokenizer is None or not prompt.strip():
        return None
    ids = tokenizer(prompt, truncation=False)["input_ids"]
    if len(ids) <= max_tokens:
        return None
    kept = tokenizer.decode(ids[: max_tokens - 1], skip_special_tokens=True)  # the last place holds </s>
    return " ".join(kept.split()[-6:])


def mark_token(shown: Image.Image, pixel, image_size, n_tokens: int) -> Image.Image:
    """The displayed image with the token under `pixel` (of an image of `image_size`) outlined."""
    from PIL import ImageDraw

    rows = cols = math.isqrt(n_tokens)
    width, height = image_size
    row, col = min(int(pixel[1] * rows / height), rows - 1), min(int(pixel[0] * cols / width), cols - 1)
    cell_w, cell_h = shown.width / cols, shown.height / rows
    out = shown.convert("RGB").copy()
    box = (col * cell_w, row * cell_h, (col + 1) * cell_w - 1, (row + 1) * cell_h - 1)
    ImageDraw.Draw(out).rectangle(box, outline=(255, 0, 255), width=max(2, round(cell_w / 12)))
    return out


def features_used(used) -> str:
    """Markdown of a word swap's features, [(site, word, feature, role)] -> "**red** clamped to 0: 12, 369
    at `transformer_blocks.0.text`; ... · **blue** added: 0 at ..."."""
    groups: dict[tuple[str, str], dict[str, list[int]]] = {}
    for site, word, feature, role in used:
        groups.setdefault((word, role), {}).setdefault(site, []).append(int(feature))
    said = {"clamp to 0": "clamped to 0", "add": "added"}
    return " · ".join(
        f"**{word}** {said.get(role, role)}: "
        + "; ".join(f"{', '.join(map(str, feats))} at `{site}`" for site, feats in sites.items())
        for (word, role), sites in groups.items()
    )


def reads(image) -> str:
    """What the Shapes attribute reader sees in an image, as a caption ("a large blue circle at the center
    on a white background"), so a person sees whether a steer did what they asked."""
    from fluxsae import shapes

    scene = shapes.read_attributes(image)
    if not scene.objects:
        return f"reads: no object on a {scene.background} background"
    return f"reads: {shapes.caption(scene)}"


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
        self._all_detections = None
        self._sites = None
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

    def get(self, site: str, method: str, steer: bool = False) -> Entry | None:
        """The `app_labels.Entry` (dictionary, stats or None, labels {feature: row}, detection rows) or None
        when the release has none there. For MLP neurons the "dictionary" is `UnitCodes` (codes = the
        neurons) and the stats come from the labels; None where no MLP labels exist at `site`. A
        text-stream dictionary is only for steering (`steer=True`): its tokens have no place on the image."""
        method = METHODS.get(method, method)
        if method not in METHODS.values() or (self.source is None and method != "mlp"):
            return None
        if parse_site(site).stream != "image" and (not steer or method == "mlp"):
            return None
        if method == "mlp" and MLP not in self.methods():
            return None
        key = (str(site), method)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._load(*key)
            return self._cache[key]

    def sites_with(self) -> dict[str, list[str]]:
        """site -> the methods ("SAE", "ITDA") the release has a dictionary of there, from its folders (a
        Hub release: from its root config.json's site list, when that can be read)."""
        if self._sites is None:
            self._sites = {}
            for method, name in (("sae", "SAE"), ("itda", "ITDA")):
                for site in dictionary_sites(self.source, method) if self.source else []:
                    self._sites.setdefault(site, []).append(name)
        return self._sites

    def text_dictionaries(self) -> list:
        """The release's SAEs of the text stream (one per site), for steering by words."""
        sites = [s for s, methods in self.sites_with().items() if "SAE" in methods and s.endswith(".text")]
        entries = [self.get(s, "SAE", steer=True) for s in sorted(sites)]
        return [e.dictionary for e in entries if e is not None]

    def ranked_by(self) -> str:
        """What search ranks features by: held-out F1, or the reference score for labels without it."""
        with self._lock:
            return RANKED_BY_DETECTION if has_detection(self._dataset()) else RANKED_BY_SCORE

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
        return {int(row["feature"]): row for row in _rows_of(self._dataset(), site, method)}

    def _detections(self, site: str, method: str) -> list[dict]:
        """The "detections" rows of one site and method ([] when the labels have none)."""
        if self._all_detections is None:
            self._all_detections = []
            if self.labels_source is not None and has_detection(self._dataset()):
                try:
                    self._all_detections = fluxsae.load_labels(self.labels_source, config="detections")
                except Exception as e:  # an older dataset: search ranks by the labels alone
                    logger.warning("no detections config in %s (%s)", self.labels_source, e)
        return list(_rows_of(self._all_detections, site, method))

    def _load(self, site: str, method: str):
        if method == "mlp":
            labels = self._labels(site, method)
            if not labels:
                return None
            n_units = max(labels) + 1
            return Entry(UnitCodes(site, n_units), stats_from_labels(labels, site, n_units), labels,
                         self._detections(site, method))  # fmt: skip
        loader = fluxsae.load_sae if method == "sae" else fluxsae.load_itda
        try:
            dictionary = loader(self.source, site=site)
        except Exception as e:  # a release without this site: the app shows norms there
            logger.info("no %s dictionary at %s in %s (%s)", method, site, self.source, e)
            return None
        stats = load_feature_stats(self.source, site=site, kind=method)
        return Entry(dictionary, stats, self._labels(site, method), self._detections(site, method))

    def example_images(self):
        if self._images is None and self.labels_source is not None:
            try:
                self._images = fluxsae.load_labels(self.labels_source, config="images")
            except Exception as e:
                logger.info("no example images in %s (%s)", self.labels_source, e)
                self._images = []
        return self._images if self._images is not None else []


def _find_one(part: str, entry: Entry) -> int:
    """A feature id, or the feature that best detects the words of `part` (`app_labels.search`)."""
    n_features = entry.dictionary.cfg.n_features
    if re.fullmatch(r"[+-]?\d+(\.0*)?", part):
        f = int(float(part))
        if not 0 <= f < n_features:
            raise ValueError(f"There is no feature {part}: ids run from 0 to {n_features - 1}.")
        return f
    hits, _ = search(part, entry.labels, entry.detections, 1)
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


def find_features(text, entry: Entry) -> list[int]:
    """Feature ids named by `text`: ids and/or label search terms separated by commas."""
    found = list(dict.fromkeys(_find_one(part, entry) for part in _entries(text)))
    if len(found) > MAX_FEATURES:
        raise ValueError(f"Steer at most {MAX_FEATURES} features at once, got {len(found)}.")
    return found


def parse_steering(text, default, entry: Entry, limit: float) -> dict[int, float]:
    """{feature: strength} from "12: 4, red circle: -2, 7": comma-separated ids or label words, each
    with its own strength after a colon, else `default`. Strengths are numbers in [-limit, limit]."""
    out: dict[int, float] = {}
    for part in _entries(text):
        name, _, value = part.rpartition(":")
        if not name.strip() or not _is_number(value):
            name, value = part, default
        f = _find_one(name.strip(), entry)
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


def features_table(
    entry: Entry, acts, steps, rank: str = "mass", n: int = 10, show: str = ALL, step_ids=None
) -> list[list]:
    """Rows [feature, label, F1 (or reference score), share %, x usual] of the image's top features,
    ordered by `rank` ("mass" or "lift", see `top_features`), among those `show` keeps (`show_choices`:
    all, labelled ones, or the first Matryoshka groups). `steps`: positions in `acts`; `step_ids`: the
    denoising step of every position (default: every step captured). "x usual": the feature's mass on
    this image over its usual mass on one (None without stats, or for a feature the stats never saw fire)."""
    dictionary, stats, labels, _ = entry
    rank = "mass" if stats is None else rank
    ids = list(step_ids) if step_ids is not None else None
    usual = None
    if stats is not None:
        usual = usual_mass(stats, [(ids or list(stats.steps))[s] for s in steps], acts.shape[2])
    keep = shown_features(entry, show)
    rows = []
    n_all = dictionary.cfg.n_features
    ranked = top_features(dictionary, acts, stats, n_all, steps=steps, rank=rank, step_ids=ids)
    for t in [t for t in ranked if keep(t.feature)][:n]:
        label, figure = label_of(labels, t.feature)
        ratio = None if usual is None or usual[t.feature] <= 0 else round(t.mass / float(usual[t.feature]), 1)
        figure = None if figure is None else round(figure, 3)
        rows.append([t.feature, label, figure, round(100 * t.share, 2), ratio])
    return rows


def show_choices(entry: Entry | None) -> list[str]:
    """What the top-features table can be limited to: all features, those with a label, and, for a
    Matryoshka dictionary, its first groups ("groups up to feature 127"), where the general, readable
    features are (benchmarks/results/labels_trust.json)."""
    choices = [ALL, LABELLED]
    prefixes = getattr(getattr(entry, "dictionary", None), "cfg", None)
    for p in getattr(prefixes, "matryoshka", None) or ():
        choices.append(f"groups up to feature {int(p) - 1}")
    return choices


def shown_features(entry: Entry, show: str):
    """A predicate on feature ids for a `show_choices` value; ValueError for another value."""
    if show in (None, "", ALL):
        return lambda f: True
    if show == LABELLED:
        return lambda f: (entry.labels.get(f) or {}).get("status") == "ok"
    if show in show_choices(entry):
        last = int(show.rsplit(" ", 1)[1])
        return lambda f: f <= last
    raise ValueError(f"Show one of {', '.join(show_choices(entry))}; got {show!r}.")


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


def at_pixel(entry: Entry, acts, pixel, image_size, steps) -> list[list]:
    dictionary, stats, labels, _ = entry
    rows = []
    for f in features_at(dictionary, acts, pixel=pixel, image_size=image_size, stats=stats, steps=steps):
        label, _ = label_of(labels, f.feature)
        rows.append([f.feature, label, round(f.activation, 3), round(100 * f.share, 2)])
    return rows


def feature_panel(labels: dict, feature: int, stats, source=None) -> str:
    """Markdown: what the label is worth in words (`app_labels.describe`), density, max activation; for an
    ITDA atom, where it came from (`source`: the `fluxsae.provenance.AtomSource` fields the app keeps, see
    `atom_gallery`)."""
    lines = [f"### Feature {feature}", *describe(labels.get(feature), feature)]
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


def dictionary_sites(source: str, method: str) -> list[str]:
    """The sites a dictionary release (a short name, folder or Hub id) has dictionaries of `method` at."""
    from fluxsae.hub import available_sites
    from fluxsae.releases import resolve

    try:
        where, revision = resolve(source, method)
    except ValueError:
        return []
    weights = f"{method}.safetensors"
    if Path(where).is_dir():
        return available_sites(Path(where), weights)
    try:  # a Hub repo: its root config.json lists the sites (cached, or downloaded when online)
        from huggingface_hub import hf_hub_download

        config = json.loads(Path(hf_hub_download(where, "config.json", revision=revision)).read_text())
        return [str(s) for s in config.get("sites", [])]
    except Exception as e:  # offline and not cached, or no such file: the site list is simply unmarked
        logger.info("could not list the sites of %s (%s)", where, e)
        return []


def _rows_of(dataset, site: str, method: str):
    """The rows of a label dataset (or its "detections" config) at one site and method."""
    if not len(dataset):
        return []
    pairs = zip(dataset["site"], dataset["method"], strict=True)
    return dataset.select([i for i, (s, m) in enumerate(pairs) if s == site and m == method])


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
