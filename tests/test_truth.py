import numpy as np
import pytest
import torch

from fluxsae import shapes
from fluxsae.shapes import truth


def pairwise_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The definition: P(score of a random positive > score of a random negative), ties 1/2."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_auroc_matches_the_pairwise_definition_with_many_ties():
    rng = np.random.default_rng(0)
    n, units, concepts = 300, 7, 5
    # Integer-valued and mostly-zero scores (like sparse codes): ties everywhere, between and within classes.
    scores = np.maximum(rng.integers(-3, 4, size=(n, units)), 0).astype(np.float32)
    scores[:, 0] = rng.normal(size=n)  # one unit without ties
    labels = rng.random((n, concepts)) < np.array([0.05, 0.2, 0.5, 0.9, 0.3])
    got = truth.auroc(torch.from_numpy(scores), torch.from_numpy(labels))
    assert got.shape == (units, concepts)
    want = np.array([[pairwise_auroc(scores[:, u], labels[:, c]) for c in range(concepts)]
                     for u in range(units)])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


def test_auroc_of_perfect_inverted_constant_and_undefined_detectors():
    labels = torch.tensor([[True, True, False]] * 4 + [[False, True, False]] * 6)
    signal = labels[:, 0].float()
    scores = torch.stack([signal, -signal, torch.zeros(10), torch.arange(10.0)], dim=1)
    got = truth.auroc(scores, labels)
    assert got[0, 0] == 1.0 and got[1, 0] == 0.0 and got[2, 0] == 0.5
    # A concept on every sample or on none has no AUROC.
    assert torch.isnan(got[:, 1]).all() and torch.isnan(got[:, 2]).all()


def test_auroc_is_chance_for_an_unrelated_unit_and_blocks_do_not_change_it(monkeypatch):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(20_000, 3, generator=g)
    labels = torch.rand(20_000, 2, generator=g) < 0.3
    whole = truth.auroc(scores, labels)
    assert (whole - 0.5).abs().max() < 0.02
    monkeypatch.setattr(truth, "_AUROC_BLOCK_ELEMENTS", 20_000)  # one unit per block
    assert torch.equal(truth.auroc(scores, labels), whole)


def test_auroc_refuses_mismatched_or_bad_input():
    with pytest.raises(ValueError, match="same N samples"):
        truth.auroc(torch.zeros(10, 3), torch.zeros(9, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be bool"):
        truth.auroc(torch.zeros(10, 3), torch.zeros(10, 2))
    bad = torch.zeros(10, 3)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        truth.auroc(bad, torch.zeros(10, 2, dtype=torch.bool))


def test_concept_auroc_finds_a_planted_colour_detector_and_best_units_picks_it():
    scenes = shapes.sample_scenes(40, seed=1)
    masks = truth.scene_masks(scenes)
    assert set(masks) == set(truth.CONCEPTS) and masks["object"].shape == (40, 64)
    assert "object" in truth.CONCEPTS and "position:center" in truth.CONCEPTS
    g = torch.Generator().manual_seed(0)
    acts = torch.rand(40, 64, 6, generator=g) * 0.5
    acts[..., 4] += torch.from_numpy(masks["color:red"]).float()  # unit 4 detects red perfectly
    aurocs, names = truth.concept_auroc(acts, scenes)
    assert names == truth.CONCEPTS and aurocs.shape == (6, len(names))
    assert aurocs[4, names.index("color:red")] == 1.0
    best = truth.best_units(aurocs, names)
    assert best["color:red"] == (4, 1.0)
    # Masks can be passed instead of scenes; a concept subset keeps its order.
    sub, sub_names = truth.concept_auroc(acts, masks, concepts=["color:red", "object"])
    assert sub_names == ["color:red", "object"]
    assert torch.equal(sub[:, 0], aurocs[:, names.index("color:red")])


def test_best_units_leaves_out_concepts_absent_from_the_scenes():
    aurocs = torch.tensor([[0.7, float("nan")], [0.9, float("nan")]])
    assert truth.best_units(aurocs, ["a", "b"]) == {"a": (1, pytest.approx(0.9))}
    with pytest.raises(ValueError, match="2 concepts"):
        truth.best_units(aurocs.T[:, :1], ["a", "b"])


def test_concept_auroc_explains_wrong_shapes_and_unknown_concepts():
    scenes = shapes.sample_scenes(3, seed=0)
    with pytest.raises(ValueError, match="pick or average the steps"):
        truth.concept_auroc(torch.zeros(8, 3, 64, 5), scenes)  # still has a steps axis
    with pytest.raises(ValueError, match="n_scenes=3"):
        truth.concept_auroc(torch.zeros(4, 64, 5), scenes)
    with pytest.raises(ValueError, match="Unknown concepts"):
        truth.concept_auroc(torch.zeros(3, 64, 5), scenes, concepts=["colour:red"])
    with pytest.raises(ValueError, match="wrap a single scene"):
        truth.scene_masks(scenes[0])


def test_heatmap_iou_on_hand_made_masks():
    mask = torch.zeros(3, 8, 8, dtype=torch.bool)
    mask[:, 2:4, 2:4] = True  # 4 tokens
    maps = torch.zeros(3, 8, 8)
    maps[0, 2:4, 2:4] = 5.0  # exactly the mask
    maps[0, 0, 0] = 1.0  # below half the max: off
    maps[1, 2:4, 2:5] = 1.0  # the mask plus 2 tokens: IoU 4/6
    # maps[2] is all zero: nothing is on, IoU 0
    iou = truth.heatmap_iou(maps, mask)
    np.testing.assert_allclose(iou.numpy(), [1.0, 4 / 6, 0.0])
    # The same on flat [n, tokens] maps, with Otsu's threshold, and with a stricter fraction.
    np.testing.assert_allclose(truth.heatmap_iou(maps.reshape(3, 64), mask.reshape(3, 64), "otsu").numpy(),
                               [1.0, 4 / 6, 0.0])
    maps[1, 2, 4] = 0.5
    np.testing.assert_allclose(truth.heatmap_iou(maps[1:2], mask[1:2], threshold=0.8).numpy(), [4 / 5])
    # Negative values are never "on"; both empty is undefined.
    assert truth.heatmap_iou(-torch.ones(1, 64), torch.zeros(1, 64, dtype=torch.bool)).isnan().all()


def test_heatmap_iou_explains_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        truth.heatmap_iou(torch.zeros(2, 8, 8), torch.zeros(2, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="map\\[None\\]"):
        truth.heatmap_iou(torch.zeros(8), torch.zeros(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be bool"):
        truth.heatmap_iou(torch.zeros(2, 64), torch.zeros(2, 64))
    with pytest.raises(ValueError, match="otsu"):
        truth.heatmap_iou(torch.zeros(2, 64), torch.zeros(2, 64, dtype=torch.bool), threshold=50)


def test_difference_of_means_recovers_a_planted_direction():
    scenes = shapes.sample_scenes(30, seed=2)
    masks = truth.scene_masks(scenes)
    g = torch.Generator().manual_seed(0)
    d = 32
    planted = torch.randn(d, generator=g)
    planted /= planted.norm()
    on_square = torch.from_numpy(masks["shape:square"]).float()[..., None]
    acts = torch.randn(30, 64, d, generator=g) * 0.3 + 3.0 * on_square * planted
    direction = truth.difference_of_means(acts, scenes, "shape:square")
    assert direction.shape == (d,)
    cosine = torch.nn.functional.cosine_similarity(direction, planted, dim=0)
    assert cosine > 0.97
    assert direction.norm() == pytest.approx(3.0, rel=0.1)  # not normalised: the size of the shift


def test_difference_of_means_explains_bad_input():
    scenes = shapes.sample_scenes(2, seed=0)
    with pytest.raises(ValueError, match="Unknown concept"):
        truth.difference_of_means(torch.zeros(2, 64, 4), scenes, "red")
    with pytest.raises(ValueError, match="pick or average the steps"):
        truth.difference_of_means(torch.zeros(8, 2, 64, 4), scenes, "object")
    absent = next(c for c in truth.CONCEPTS if not truth.scene_masks(scenes)[c].any())
    with pytest.raises(ValueError, match="covers no token"):
        truth.difference_of_means(torch.zeros(2, 64, 4), scenes, absent)
