"""The feature-label dataset: written by fluxsae.labels, read by `load_labels` and by plain
`datasets.load_dataset(folder)`; the packaged Shapes labels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fluxsae.feature_stats import load_feature_stats
from fluxsae.labels import (
    LABEL_COLUMNS,
    NEW_COLUMNS,
    LabelsNotFoundError,
    has_detection,
    load_labels,
    shapes_labels_dir,
    write_labels,
)

SITES = ("transformer_blocks.3.image", "single_transformer_blocks.2.image")


def _row(site, method, feature, **kw):
    row = {"site": site, "method": method, "feature": feature, "label": f"label {feature}", "status": "ok",
           "score": 0.5 + feature / 100, "timestep_profile": [0.1] * 8, "example_images": [feature % 3, 2],
           "example_maps": [[255] * 64, [0] * 64], "judge_scores": [1.0, None]}  # fmt: skip
    return {**row, **kw}


def test_written_labels_load_through_load_labels_and_load_dataset(tmp_path):
    import datasets

    rows = [_row(SITES[0], "sae", f) for f in range(4)] + [_row(SITES[1], "mlp", f) for f in range(3)]
    rows.append(_row(SITES[0], "itda", 0, label=None, status="malformed", score=None))
    images = [{"image_id": i, "prompt": f"p{i}", "seed": i, "scene": None,
               "image": Image.new("RGB", (64, 64), (i * 80, 0, 0))} for i in range(3)]  # fmt: skip
    strips = [{"site": SITES[0], "method": "sae", "feature": 0, "label": "label 0", "score": 0.5,
               "image": Image.new("RGB", (130, 64), "blue")}]  # fmt: skip
    folder = write_labels(tmp_path / "labels", rows, images, examples=strips, body="# test labels")
    card = (folder / "README.md").read_text()
    assert "config_name: labels" in card and "config_name: images" in card and "# test labels" in card

    plain = datasets.load_dataset(str(folder), split="train")  # the default config: the labels
    assert len(plain) == 8 and set(LABEL_COLUMNS) <= set(plain.column_names)
    sae = load_labels(folder, site=SITES[0], method="sae")
    assert sorted(sae["feature"]) == [0, 1, 2, 3]
    assert sae.filter(lambda r: r["feature"] == 2)[0]["score"] == pytest.approx(0.52)
    assert load_labels(folder, method="mlp")["site"] == [SITES[1]] * 3
    failed = load_labels(folder, method="itda")[0]
    assert failed["label"] is None and failed["status"] == "malformed" and failed["score"] is None
    assert sae[0]["example_maps"][0] == [255] * 64 and sae[0]["judge_scores"] == [1.0, None]
    shown = load_labels(folder, config="images")
    assert isinstance(shown[1]["image"], Image.Image) and shown[1]["image"].getpixel((0, 0)) == (80, 0, 0)
    assert load_labels(folder, config="examples", method="sae")[0]["image"].size == (130, 64)
    with pytest.raises(ValueError, match="has no labels for site"):
        load_labels(folder, site="transformer_blocks.0.image")
    with pytest.raises(ValueError, match="method must be one of"):
        load_labels(folder, method="pca")
    with pytest.raises(FileNotFoundError, match="not a label dataset folder.*README.md"):
        load_labels(tmp_path)


def test_a_dataset_written_before_detection_scores_loads_with_their_columns_empty(tmp_path):
    import pyarrow.parquet as pq

    rows = [_row(SITES[0], "sae", f) for f in range(3)]
    images = [{"image_id": 0, "prompt": "p", "seed": 0, "scene": None, "image": Image.new("RGB", (64, 64))}]
    folder = write_labels(tmp_path / "old", rows, images, body="# old labels")
    for shard in (folder / "data" / "labels").glob("*.parquet"):  # as the earlier releases wrote them
        table = pq.read_table(shard)
        pq.write_table(table.drop_columns([c for c in NEW_COLUMNS if c in table.column_names]), shard)
    assert "f1" not in pq.read_table(next((folder / "data" / "labels").glob("*.parquet"))).column_names
    old = load_labels(folder, site=SITES[0], method="sae")
    assert set(NEW_COLUMNS) <= set(old.column_names)
    assert all(old[c] == [None] * 3 for c in NEW_COLUMNS)
    assert old[1]["label"] == "label 1" and not has_detection(old)
    with pytest.raises(LabelsNotFoundError, match="no 'detections' config.*before detection scores"):
        load_labels(folder, config="detections")
    scored = {"f1": 0.7, "precision": 0.9, "recall": 0.6}
    detected = {"site": SITES[0], "method": "sae", "feature": 0, "concept": "color:red", "text": "red"}
    detected.update(scored)
    fresh = write_labels(tmp_path / "new", [{**rows[0], **scored}], images, detections=[detected])
    assert has_detection(load_labels(fresh)) and load_labels(fresh, config="detections")[0]["text"] == "red"


PACKAGED = shapes_labels_dir()


def test_packaged_shapes_labels_cover_every_unit_and_stay_small():
    import datasets

    assert (PACKAGED / "README.md").is_file(), "packaged labels missing: python -m training.shapes_labels"
    size = sum(f.stat().st_size for f in PACKAGED.rglob("*") if f.is_file())
    assert size < 15e6, f"the packaged labels take {size / 1e6:.1f} MB; the budget is 15 MB"
    everything = datasets.load_dataset(str(PACKAGED), "labels", split="train")
    assert len(everything) == 2 * (2048 + 2048 + 512)
    for site in SITES:
        for method, n in (("sae", 2048), ("itda", 2048), ("mlp", 512)):
            labels = load_labels("shapes", site=site, method=method)
            assert sorted(labels["feature"]) == list(range(n))
    sae = load_labels("shapes", site=SITES[0], method="sae").to_pandas()
    assert (sae["explainer"] == "shapes-oracle-detection").all()
    assert sae["status"].isin(["ok", "unexplained", "no_examples"]).all()
    # Every unit that fires on >= 0.2% of tokens in its shipped statistics has detection figures: a label
    # or "unexplained" (the Matryoshka SAE's outer features are often dead).
    density = load_feature_stats("shapes", site=SITES[0], kind="sae").density.numpy()
    assert set(sae[density[sae["feature"].to_numpy()] >= 0.002]["status"]) <= {"ok", "unexplained"}
    ok = sae[sae["status"] == "ok"]
    assert ok["label"].notna().all() and ok["concept"].notna().all()
    assert (ok["precision"] >= 0.8).all() and ok["recall"].between(0, 1).all() and (ok["n_fired"] > 0).all()
    assert ok["f1"].between(0, 1).all() and ok["threshold"].between(0, 1).all()
    assert (ok["fires_above"] >= 0).all()
    regions = ok[~ok["concept"].str.startswith("noise")]
    assert regions["auroc"].between(0, 1).all() and ok["concept"].str.startswith("noise").any()
    assert sae[sae["status"] != "ok"]["label"].isna().all()
    detections = load_labels("shapes", config="detections", site=SITES[0], method="sae")
    red = [r for r in detections if r["concept"] == "color:red"]
    assert red and max(r["f1"] for r in red) > 0.8  # the packaged SAE has a red feature, findable by F1
    scored = sae[sae["score"].notna()]
    assert len(scored) > 0.5 * len(ok) and scored["score"].between(0, 1).all()  # most labels are scored
    # The references resolve: example ids name rows of the images config, maps have one value per token.
    images = load_labels("shapes", config="images")
    ids = set(images["image_id"])
    row = scored.iloc[0]
    assert set(row["example_images"]) <= ids and all(len(m) == 64 for m in row["example_maps"])
    assert max(max(m) for m in row["example_maps"]) == 255  # the best example sets the scale
    assert len(row["timestep_profile"]) == 8
    best = regions.sort_values("auroc").iloc[-1]
    assert best["auroc"] > 0.9 and isinstance(best["label"], str)
    assert np.isclose(row["example_activations"][0], row["example_scale"])
