"""The feature-label dataset: one row per unit (SAE feature, ITDA atom, MLP neuron), as parquet shards
with a dataset card whose `configs:` make `datasets.load_dataset(folder_or_repo, config)` work.

    labels = load_labels("shapes", site="transformer_blocks.3.image", method="sae")   # datasets.Dataset
    labels[12]["label"], labels[12]["score"]

Layout (a folder or a Hub dataset repo):

    README.md                              dataset card: YAML `configs:` + the figures
    data/labels/<method>-<site>.parquet    config "labels" (the default): the columns of LABEL_FEATURES
    data/images/images.parquet             config "images": every generated image the examples refer to
    data/detections/<method>-<site>.parquet config "detections" (where the truth is known): how well units
                                           detect concepts, e.g. the best units for "red"
    data/examples/<method>-<site>.parquet  config "examples" (optional): each unit's top images, painted

A unit's top examples are referenced, not copied: `example_images` are ids into the "images" config
and `example_maps` the unit's activation on each of their tokens (uint8, 255 = `example_scale`), so
any viewer can paint them (`fluxsae.autointerp.render.paint`) and the packaged dataset stays small.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from fluxsae.fileio import atomic_path

logger = logging.getLogger(__name__)

SHAPES = "shapes"
METHODS = ("sae", "itda", "mlp", "random")
CONFIGS = ("labels", "images", "examples", "detections")


def _features():
    from datasets import Features, Image, Sequence, Value

    labels = Features({
        "site": Value("string"),
        "method": Value("string"),  # "sae" | "itda" | "mlp" (| "random", the floor, in benchmarks)
        "feature": Value("int32"),
        "label": Value("string"),  # None unless status == "ok"
        "concept": Value("string"),  # machine-readable concept key of the label (Shapes oracle), or None
        "status": Value("string"),  # "ok" | "unexplained" | "malformed" | "empty" | "error" | "no_examples"
        "score": Value("float32"),  # the reference score in [0, 1], None when not judged
        "auroc": Value("float32"),  # AUROC for the label's concept where the truth is known, else None
        **_detection_features(Value),
        "threshold": Value("float32"),  # fires = activation above this fraction of its peak ...
        "fires_above": Value("float32"),  # ... that is, above this step-half-averaged activation
        "noise_rule": Sequence(Value("float32")),  # a seed-noise label: direction per latent channel, offset
        "detection": Value("float32"),  # chat judge: balanced accuracy telling held-out images apart
        "detection_precision": Value("float32"),
        "detection_recall": Value("float32"),
        "n_detection": Value("int32"),  # readable answers
        "fuzzing": Value("float32"),  # chat judge: balanced accuracy, true region vs a random one
        "n_fuzzing": Value("int32"),
        "explainer": Value("string"),
        "judge": Value("string"),
        "density": Value("float32"),  # share of tokens (all steps) where the unit is > 0
        "max_activation": Value("float32"),
        "mean_activation": Value("float32"),  # mean over the tokens where the unit is > 0
        "timestep_profile": Sequence(Value("float32")),  # mean activation per denoising step
        "example_images": Sequence(Value("int32")),  # ids into the "images" config, best first
        "example_activations": Sequence(Value("float32")),  # max of the step-averaged map on each
        "example_maps": Sequence(Sequence(Value("uint8"))),  # [examples][tokens], 255 = example_scale
        "example_scale": Value("float32"),
        "negatives": Sequence(Value("int32")),  # the other units whose top images were the negatives
        "judge_scores": Sequence(Value("float32")),  # positives then negatives
        "explanation": Value("string"),  # the explainer's full answer
        "requests": Value("int32"),  # model calls made for this unit (retries included)
    })  # fmt: skip
    images = Features({
        "image_id": Value("int32"), "prompt": Value("string"), "seed": Value("int64"),
        "scene": Value("string"),  # the Shapes scene as JSON, when known
        "image": Image(),
    })  # fmt: skip
    examples = Features({
        "site": Value("string"), "method": Value("string"), "feature": Value("int32"),
        "label": Value("string"), "score": Value("float32"), "image": Image(),  # the top images, painted
    })  # fmt: skip
    detections = Features({
        "site": Value("string"), "method": Value("string"), "feature": Value("int32"),
        "concept": Value("string"), "text": Value("string"), "threshold": Value("float32"),
        **_detection_features(Value), "density": Value("float32"),
    })  # fmt: skip
    return {"labels": labels, "images": images, "examples": examples, "detections": detections}


def _detection_features(Value) -> dict:  # noqa: N803 (the datasets class, imported lazily)
    """The detection figures of a (unit, concept) pair on held-out scenes (`autointerp.detection`)."""
    return {
        "precision": Value("float32"),  # share of the samples where the unit fires that show the concept
        "mass_precision": Value("float32"),  # share of its activation mass on them
        "recall": Value("float32"),  # share of the concept's samples where it fires
        "f1": Value("float32"),
        "n_fired": Value("int32"),  # samples where it fires (step half, scene, token)
        "n_concept": Value("int32"),  # samples that show the concept
    }


def label_features():
    """The `datasets.Features` of the "labels" config."""
    return _features()["labels"]


DETECTION_COLUMNS = ("precision", "mass_precision", "recall", "f1", "n_fired", "n_concept")
NEW_COLUMNS = (*DETECTION_COLUMNS, "threshold", "fires_above", "noise_rule", "detection",
               "detection_precision", "detection_recall", "n_detection", "fuzzing", "n_fuzzing")  # fmt: skip
"""Columns a dataset written before detection scores lacks; `load_labels` gives them as None."""
LABEL_COLUMNS = (
    "site", "method", "feature", "label", "concept", "status", "score", "auroc", *NEW_COLUMNS, "explainer",
    "judge",
    "density", "max_activation", "mean_activation", "timestep_profile", "example_images",
    "example_activations", "example_maps", "example_scale", "negatives", "judge_scores", "explanation",
    "requests",
)  # fmt: skip


def shapes_labels_dir() -> Path:
    """Where the packaged Shapes labels live (made by `python -m training.shapes_labels`)."""
    return Path(__file__).resolve().parent / "shapes" / "labels"


CARD_COLUMNS = """
## Configs and columns

- `labels` (default): one row per unit. `site`, `method` ("sae", "itda", "mlp"), `feature` (index),
  `label` (None unless `status` is "ok"), `concept` (machine-readable key of the label's concept,
  e.g. `color:yellow+shape:square`, `color:red+part:edge@early`, `noise` for a seed-noise unit, when
  the explainer knows one), `status` ("ok", "unexplained": no label is precise enough, "malformed",
  "empty", "error", "no_examples"), `score` (the reference score, 0-1; None when not judged: fewer than
  5 top images), `auroc` (of the unit for its label's concept over (step half, scene, token) samples
  of held-out scenes, where the truth is known); where the truth is known, on held-out scenes:
  `precision` (share of the samples where the unit fires that show the concept), `mass_precision`
  (share of its activation there), `recall` (share of the concept's samples where it fires), `f1`,
  `n_fired` and `n_concept` (the sample sizes), `threshold` (it fires where its activation is above this
  fraction of its peak), `fires_above` (that activation: its mean over a step half), `noise_rule` (a
  seed-noise label: the direction in a token's starting noise, then the offset); from a chat judge:
  `detection` (balanced accuracy telling held-out images where the unit fires from others, near
  misses included), `detection_precision`, `detection_recall`,
  `n_detection`, `fuzzing` (balanced accuracy telling the unit's painted region from a random one of
  the same size), `n_fuzzing`; `explainer`, `judge`, `density`, `max_activation`,
  `mean_activation` (over the tokens where the unit is > 0), `timestep_profile` (mean activation per
  denoising step), `example_images` (ids into `images`, best first), `example_activations` (the max
  of the step-averaged map on each), `example_maps` (the map on each, one uint8 per token, row-major,
  255 = `example_scale`), `negatives` (the units whose top images were judged as negatives),
  `judge_scores` (positives, then negatives), `explanation` (the explainer's full answer), `requests`.
- `images`: `image_id`, `prompt`, `seed`, `scene` (the Shapes scene as JSON), `image`.
- `examples` (when written): each unit's top images painted in blue, one strip per unit.
- `detections` (where the truth is known): `site`, `method`, `feature`, `concept`, `text`, `threshold` and
  the held-out figures above, for each unit's best concepts and each searchable concept's best units
  ("red", "circle", "gray background", "object at the top left"): what the app's search ranks by.

Paint an example: `fluxsae.autointerp.render.paint(image, np.array(map).reshape(rows, cols) / 255, 1.0)`.
"""


def _yaml_configs(configs: Iterable[str]) -> str:
    lines = ["configs:"]
    for name in configs:
        lines += [f"- config_name: {name}", *(["  default: true"] if name == "labels" else []),
                  "  data_files:", "  - split: train", f"    path: data/{name}/*.parquet"]  # fmt: skip
    return "\n".join(lines)


def card(configs: Iterable[str], body: str, *, pretty_name: str = "fluxsae feature labels",
         base_model: str | None = None) -> str:  # fmt: skip
    """The dataset card: YAML front matter (configs, license, tags) and a markdown body."""
    head = ["---", "license: apache-2.0", f"pretty_name: {pretty_name}", "tags:", "- fluxsae",
            "- interpretability", "- sparse-autoencoder", "- flux"]  # fmt: skip
    if base_model and base_model != SHAPES:
        head += ["base_model:", f"- {base_model}"]
    return "\n".join([*head, _yaml_configs(configs), "---", "", body.strip(), ""])


def write_labels(
    folder: str | os.PathLike, labels: Sequence[dict], images: Sequence[dict], *,
    examples: Sequence[dict] | None = None, detections: Sequence[dict] | None = None, body: str = "",
    base_model: str | None = None,
) -> Path:  # fmt: skip
    """Write the dataset folder atomically (a kill leaves the old folder or the new one, never half).

    labels: rows with the LABEL_COLUMNS keys (missing keys are None); one shard per (method, site).
    images: rows {"image_id", "prompt", "seed", "scene", "image": PIL image}.
    examples: optional rows {"site", "method", "feature", "label", "score", "image": PIL image}.
    detections: optional rows of the "detections" config (see CARD_COLUMNS).
    """
    from datasets import Dataset

    features = _features()
    folder = Path(folder)
    bad = sorted({r.get("method") for r in labels} - set(METHODS))
    if bad:
        raise ValueError(f"unknown methods {bad} in the labels: use one of {METHODS}")
    with atomic_path(folder, is_dir=True) as tmp:
        groups: dict[tuple[str, str], list[dict]] = {}
        for row in labels:
            groups.setdefault((row["method"], row["site"]), []).append({c: row.get(c) for c in LABEL_COLUMNS})
        for (method, site), rows in sorted(groups.items()):
            shard = tmp / "data/labels" / f"{method}-{site}"
            _parquet(Dataset.from_list(rows, features=features["labels"]), shard)
        _parquet(Dataset.from_list(list(images), features=features["images"]), tmp / "data/images/images")
        configs = ["labels", "images"]
        for name, rows in (("examples", examples), ("detections", detections)):
            if rows:
                grouped: dict[tuple[str, str], list[dict]] = {}
                for row in rows:  # missing columns are None, as in the labels
                    row = {c: row.get(c) for c in features[name]}
                    grouped.setdefault((row["method"], row["site"]), []).append(row)
                for (method, site), part in sorted(grouped.items()):
                    shard = tmp / "data" / name / f"{method}-{site}"
                    _parquet(Dataset.from_list(part, features=features[name]), shard)
                configs.append(name)
        (tmp / "README.md").write_text(card(configs, body + "\n" + CARD_COLUMNS, base_model=base_model))
    return folder


def _parquet(dataset, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(stem) + ".parquet")


class LabelsNotFoundError(FileNotFoundError):
    """The label dataset asked for does not exist (packaged, locally or on the Hub), with what to do."""


def _source(name_or_folder_or_hub_id: str | os.PathLike, revision: str | None):
    """-> (folder or Hub dataset id, revision, whether it is local) of a label dataset; a release's short
    name ("shapes") resolved through fluxsae.releases."""
    from fluxsae.releases import get_release, resolve_labels

    name = str(name_or_folder_or_hub_id)
    try:
        source, revision = resolve_labels(name, revision)
    except ValueError as err:
        raise LabelsNotFoundError(str(err)) from err
    local = Path(source)
    if get_release(name) is not None and not local.exists() and not _looks_like_hub_id(source):
        raise LabelsNotFoundError(
            f"The {name!r} release's labels are not installed ({local}); reinstall fluxsae or make them "
            "with `python -m training.shapes_labels`."
        )
    if local.exists():
        if not (local / "README.md").is_file() or not any(local.rglob("*.parquet")):
            raise LabelsNotFoundError(
                f"{local} is not a label dataset folder: it needs parquet shards and a README.md (the "
                "dataset card whose configs name them); write one with fluxsae.labels.write_labels or "
                "stage one with `python -m training.publish dataset ... --dry-run DIR`."
            )
        return str(local), revision, True
    return source, revision, False


def _with_new_columns(ds):
    """A label dataset written before detection scores, with their columns added as None."""
    missing = [c for c in NEW_COLUMNS if c not in ds.column_names]
    if not missing:
        return ds
    features = _features()["labels"]
    for column in missing:
        ds = ds.add_column(column, [None] * len(ds), feature=features[column])
    return ds


def has_detection(labels) -> bool:
    """Whether a label dataset (or rows) carries detection scores: truth-based F1 or a chat detection score.
    Without them, labels can only be ranked by the reference score."""
    if hasattr(labels, "column_names"):  # a datasets.Dataset: read the two columns, not every row
        return any(v is not None for c in ("f1", "detection") if c in labels.column_names for v in labels[c])
    rows = labels.values() if isinstance(labels, dict) else labels
    return any(r.get("f1") is not None or r.get("detection") is not None for r in rows)


def _looks_like_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/"))


def load_labels(
    name_or_folder_or_hub_id: str | os.PathLike = SHAPES, site: str | None = None, method: str | None = None,
    *, config: str = "labels", revision: str | None = None,
):  # fmt: skip
    """A feature-label dataset as a `datasets.Dataset`, optionally filtered to one site and method.

    `name_or_folder_or_hub_id`: "shapes" (the packaged labels), a dataset folder, or a Hub dataset id
    (`revision` pins a commit). `config`: "labels" (default), "images", "examples" or "detections"
    (site/method filter all but "images"). A dataset of plain label shards (one "default" config, as
    `training.publish dataset` stages loose parquet files) reads as its labels. A dataset written before
    detection scores loads with their columns (NEW_COLUMNS) as None; `has_detection` tells.
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError("Label datasets need `datasets`: `pip install 'fluxsae[app]'`.") from err
    if config not in CONFIGS:
        raise ValueError(f"config must be one of {CONFIGS}, got {config!r}")
    if method is not None and method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    source, revision, local = _source(name_or_folder_or_hub_id, revision)
    try:
        names = datasets.get_dataset_config_names(source, revision=revision)
        if config == "labels" and "labels" not in names and names == ["default"]:
            config = "default"
        if config not in names:
            raise LabelsNotFoundError(
                f"The label dataset {source!r} has no {config!r} config (it has {names}); "
                + ("it was written before detection scores: rebuild it with `python -m training.autointerp`."
                   if config == "detections" else "pick one of those.")
            )
        # datasets keys a folder's cache by the folder's name and the card's file patterns, not by the files:
        # another folder of the same name (or this one, rewritten) would be served the rows cached first.
        # (The split sizes it would check against are that first folder's too.)
        fresh = dict(download_mode="force_redownload", verification_mode="no_checks") if local else {}
        ds = datasets.load_dataset(source, config, split="train", revision=revision, **fresh)
    except LabelsNotFoundError:
        raise
    except Exception as err:  # datasets raises its own types for missing repos, offline misses, bad configs
        if local:
            # datasets names no file: find the shard it could not read (a torn copy, a full disk)
            import pyarrow.parquet as pq

            for shard in sorted(Path(source).rglob("*.parquet")):
                try:
                    pq.read_metadata(shard)
                except Exception as bad:  # pyarrow raises ArrowInvalid / OSError for torn files
                    raise ValueError(
                        f"{shard}: not a readable parquet file ({bad}), so the label dataset {source} does "
                        "not load; write the dataset again (fluxsae.labels.write_labels, `python -m "
                        "training.autointerp`) or download it again."
                    ) from err
            raise
        if not _looks_like_hub_id(source):
            raise LabelsNotFoundError(
                f"{source}: no such folder, and not a Hub dataset id (user/name) either; check the path "
                "(a label dataset folder holds README.md and data/)."
            ) from err
        from fluxsae.hub import _offline

        here = "" if Path(source).exists() else f" (there is no folder {source} here either)"
        hint = (
            f"HF_HUB_OFFLINE is set: download it once online (`hf download {source} --repo-type dataset`)."
            if _offline()
            else "Check the dataset id and your network (private datasets need `hf auth login`)."
        )
        raise LabelsNotFoundError(
            f"Could not load the label dataset {source!r}{here}: {hint} ({err})"
        ) from err
    if config in ("labels", "default"):
        ds = _with_new_columns(ds)
    if config == "images" or (site is None and method is None):
        return ds
    sites, methods = set(ds.unique("site")), set(ds.unique("method"))
    if site is not None and site not in sites:
        raise ValueError(
            f"{name_or_folder_or_hub_id} has no labels for site {site!r}; it has {sorted(sites)}."
        )
    if method is not None and method not in methods:
        raise ValueError(f"{name_or_folder_or_hub_id} has no {method!r} labels; it has {sorted(methods)}.")
    keep = [(site is None or s == site) and (method is None or m == method)
            for s, m in zip(ds["site"], ds["method"], strict=True)]  # fmt: skip
    return ds.select([i for i, k in enumerate(keep) if k])
