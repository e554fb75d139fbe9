"""The Shapes world: sampling, rendering, captions, per-token labels and reading scenes back from pixels."""

import inspect
import itertools
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFilter

from fluxsae.shapes import (
    BACKGROUNDS,
    COLORS,
    GENERATION_DEFAULTS,
    HELD_OUT_PAIRS,
    IMAGE_SIZE,
    PATCH,
    POSITIONS,
    SHAPES,
    SIZES,
    TOKEN_GRID,
    Object,
    Scene,
    attribute_accuracy,
    caption,
    concept_names,
    object_mask,
    read_attributes,
    render,
    sample_scenes,
    token_masks,
    vocabulary,
)


@pytest.fixture(scope="module")
def many_scenes():
    """2400 scenes: the training distribution, held-out pairs, and both object counts."""
    return (sample_scenes(1000, seed=11, held_out="include")
            + sample_scenes(500, seed=12, n_objects=1)
            + sample_scenes(500, seed=13, n_objects=2)
            + sample_scenes(400, seed=14, held_out="only"))


def _cell(obj):
    """The grid cell holding an object's centroid, computed independently of the library."""
    third = IMAGE_SIZE / 3
    return int(obj.y // third) * 3 + int(obj.x // third)


def test_the_world_is_as_specified():
    # ARCHITECTURE.md: shapes (circle, square, triangle, ...), >= 5 colours, small and large, a 3x3
    # grid of positions (test_objects_are_inside_the_image_in_their_cell checks the order), backgrounds.
    assert {"circle", "square", "triangle"} <= set(SHAPES) and len(COLORS) >= 5 and len(BACKGROUNDS) >= 2
    assert set(SIZES) == {"small", "large"} and len(set(POSITIONS)) == 9
    # Images are IMAGE_SIZE px and split into TOKEN_GRID x TOKEN_GRID tokens of PATCH px.
    assert TOKEN_GRID * PATCH == IMAGE_SIZE
    assert render(sample_scenes(1, seed=0)[0]).size == (IMAGE_SIZE, IMAGE_SIZE)
    # Every key is a FluxPipeline call argument, and the defaults cannot be changed by accident.
    from diffusers import FluxPipeline

    assert set(GENERATION_DEFAULTS) <= set(inspect.signature(FluxPipeline.__call__).parameters)
    assert (GENERATION_DEFAULTS["height"], GENERATION_DEFAULTS["width"]) == (IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(TypeError):
        GENERATION_DEFAULTS["height"] = 512
    # Colours must stay far apart from each other and from every background to be readable.
    palette = list(COLORS.values()) + list(BACKGROUNDS.values())
    assert min(np.linalg.norm(np.subtract(a, b)) for a, b in itertools.combinations(palette, 2)) >= 100
    # Held-out pairs are real pairs, and each colour and shape still has other partners in training.
    for color, shape in HELD_OUT_PAIRS:
        assert color in COLORS and shape in SHAPES
    trained = [pair for pair in itertools.product(COLORS, SHAPES) if pair not in HELD_OUT_PAIRS]
    assert {c for c, _ in trained} == set(COLORS) and {s for _, s in trained} == set(SHAPES)


def test_the_packaged_model_was_made_for_this_world():
    """Its tokenizers know exactly the world's words, every caption fits them untruncated, and its VAE
    turns IMAGE_SIZE px into the TOKEN_GRID x TOKEN_GRID tokens the labels are given on."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer

    from fluxsae.pipelines import shapes_model_dir

    folder = shapes_model_dir()
    captions = [caption(s) for s in sample_scenes(2000, seed=5, n_objects=2, held_out="include")]
    # CLIP pools the hidden state at </s>: a truncated caption loses it. T5 is padded to
    # max_sequence_length with no attention mask, so a longer caption would be cut too.
    for sub, limit in (("tokenizer", None), ("tokenizer_2", GENERATION_DEFAULTS["max_sequence_length"])):
        tok = AutoTokenizer.from_pretrained(folder / sub)
        assert set(tok.get_vocab()) - set(tok.all_special_tokens) == set(vocabulary()), sub
        ids = tok(captions)["input_ids"]
        assert not any(tok.unk_token_id in row for row in ids), sub
        assert max(len(row) for row in ids) <= (limit or tok.model_max_length), sub
    vae = AutoencoderKL.load_config(folder / "vae")
    vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)  # as FluxPipeline computes it
    assert vae_scale_factor * 2 == PATCH  # VAE down-sampling, then Flux's 2x2 packing


def test_object_rejects_unknown_attribute_values():
    with pytest.raises(ValueError, match="color"):
        Object("circle", "pink", "small", "top")
    with pytest.raises(ValueError, match="background"):
        Scene(objects=(), background="blue")


def test_sampling_is_deterministic_for_a_seed_and_differs_across_seeds():
    first, again, other = (sample_scenes(50, seed=s) for s in (3, 3, 4))
    assert [caption(s) for s in first] == [caption(s) for s in again]
    assert [(o.x, o.y, o.extent) for s in first for o in s.objects] == \
        [(o.x, o.y, o.extent) for s in again for o in s.objects]
    assert [caption(s) for s in first] != [caption(s) for s in other]
    # Placement jitter makes scenes with the same caption look different.
    images = {render(s).tobytes() for s in sample_scenes(300, seed=5, n_objects=1)}
    assert len(images) == 300


def test_object_counts_follow_n_objects():
    counts = [len(s.objects) for s in sample_scenes(400, seed=0)]
    assert set(counts) == {1, 2} and 0.4 < np.mean(np.array(counts) == 2) < 0.6
    assert all(len(s.objects) == 1 for s in sample_scenes(50, seed=0, n_objects=1))
    assert all(len(s.objects) == 2 for s in sample_scenes(50, seed=0, n_objects=2))
    with pytest.raises(ValueError, match="n_objects"):
        sample_scenes(1, seed=0, n_objects=3)


def test_objects_are_inside_the_image_in_their_cell_and_apart(many_scenes):
    for scene in many_scenes:
        for obj in scene.objects:
            mask = object_mask(obj)
            # A shape cut by the border would have fewer pixels than the same shape away from it.
            centred = Object(obj.shape, obj.color, obj.size, "center", x=32 + obj.x % 1, y=32 + obj.y % 1,
                             extent=obj.extent)
            assert mask.sum() == object_mask(centred).sum()
            assert POSITIONS[_cell(obj)] == obj.position
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert a.position != b.position
            points_a = np.argwhere(object_mask(a))
            points_b = np.argwhere(object_mask(b))
            chebyshev = np.abs(points_a[:, None, :] - points_b[None, :, :]).max(axis=-1)
            assert chebyshev.min() >= 3, "objects must be separated by at least 2 background pixels"


def test_size_classes_are_separable(many_scenes):
    extents = {size: [o.extent for s in many_scenes for o in s.objects if o.size == size] for size in SIZES}
    assert max(extents["small"]) + 4 < min(extents["large"])


def test_held_out_modes():
    def held(scene):
        return [(o.color, o.shape) in HELD_OUT_PAIRS for o in scene.objects]

    assert not any(any(held(s)) for s in sample_scenes(600, seed=1))
    assert all(any(held(s)) for s in sample_scenes(300, seed=1, held_out="only"))
    included = [any(held(s)) for s in sample_scenes(600, seed=1, held_out="include")]
    assert 0 < np.mean(included) < 0.5
    with pytest.raises(ValueError, match="held_out"):
        sample_scenes(1, seed=0, held_out="never")


def test_caption_names_every_attribute_in_canonical_order():
    for scene in sample_scenes(200, seed=2):
        text = caption(scene)
        assert text.endswith(f"on a {scene.background} background")
        phrases = [f"a {o.size} {o.color} {o.shape} at the {o.position}" for o in scene.objects]
        assert text == " and ".join(phrases) + f" on a {scene.background} background"
    two = Object("square", "blue", "small", "center", x=32, y=32, extent=15)
    one = Object("circle", "red", "large", "top left", x=12, y=12, extent=24)
    moved = Object("circle", "red", "large", "top left", x=14, y=13, extent=25)
    expected = "a large red circle at the top left and a small blue square at the center on a gray background"
    assert caption(Scene((two, one), "gray")) == caption(Scene((moved, two), "gray")) == expected


def test_vocabulary_covers_every_caption_word():
    vocab = vocabulary()
    assert vocab == sorted(set(vocab))
    words = {w for s in sample_scenes(2000, seed=6, held_out="include") for w in caption(s).split()}
    assert words <= set(vocab)
    assert re.fullmatch(r"[a-z]+", "".join(vocab))


def test_token_masks_label_every_concept_and_match_the_pixels(many_scenes):
    names = concept_names()
    coverage = []
    for scene in many_scenes[:600]:
        masks = token_masks(scene)
        assert list(masks) == names
        assert all(m.shape == (TOKEN_GRID, TOKEN_GRID) and m.dtype == bool for m in masks.values())
        for obj in scene.objects:
            for key in ("shape", "color", "size", "position"):
                assert masks[f"{key}:{getattr(obj, key)}"].any()
        assert np.array_equal(masks[f"background:{scene.background}"], ~masks["object"])
        # Independent check from the rendered pixels: a token shows an object iff >= 16 of its
        # 64 pixels differ from the background.
        pixels = np.asarray(render(scene))
        differs = (pixels != BACKGROUNDS[scene.background]).any(axis=-1)
        per_token = differs.reshape(TOKEN_GRID, PATCH, TOKEN_GRID, PATCH).sum(axis=(1, 3))
        if len(scene.objects) == 1:
            assert np.array_equal(masks["object"], per_token >= 16)
        coverage.append(masks["object"].mean())
    assert np.mean(coverage) >= 0.15


def test_read_attributes_round_trips_rendered_scenes(many_scenes):
    read = [read_attributes(render(s)) for s in many_scenes]
    accuracy = attribute_accuracy(many_scenes, read)
    assert accuracy["exact"] >= 0.995, accuracy
    assert accuracy["one:n"] > 500 and accuracy["two:n"] > 500
    # Measured placement is close to the true one (a triangle's thin apex and base row lose up to
    # ~2 px to pixel-centre sampling).
    for true, got in zip(many_scenes[:200], read[:200], strict=True):
        if true == got:
            for a, b in zip(true.objects, got.objects, strict=True):
                assert abs(a.extent - b.extent) <= 2.5 and abs(a.x - b.x) <= 1 and abs(a.y - b.y) <= 1


def test_read_attributes_tolerates_soft_edges_and_noise(many_scenes):
    rng = np.random.default_rng(0)
    scenes = many_scenes[::2]
    read = []
    for scene in scenes:
        blurred = np.asarray(render(scene).filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float64)
        noisy = (blurred + rng.normal(0, 8, blurred.shape)).round().clip(0, 255).astype(np.uint8)
        read.append(read_attributes(noisy))
    assert attribute_accuracy(scenes, read)["exact"] >= 0.95


def test_read_attributes_on_blank_and_resized_images():
    blank = Image.new("RGB", (64, 64), (250, 250, 250))
    assert read_attributes(blank) == Scene(objects=(), background="white")
    scene = sample_scenes(1, seed=9, n_objects=2)[0]
    assert read_attributes(render(scene).resize((128, 128), Image.Resampling.NEAREST)) == scene
    with pytest.raises(ValueError, match="uint8"):
        read_attributes(np.zeros((64, 64, 3), dtype=np.float32))


def test_attribute_accuracy_scores_each_attribute():
    true = sample_scenes(40, seed=4, n_objects=1) + sample_scenes(10, seed=4, n_objects=2)
    wrong_color = [Scene(tuple(Object(o.shape, "red" if o.color != "red" else "blue", o.size, o.position)
                               for o in s.objects), s.background) for s in true]
    accuracy = attribute_accuracy(true, wrong_color)
    assert accuracy["one:color"] == 0 and accuracy["two:objects"] == 0 and accuracy["exact"] == 0
    assert accuracy["one:shape"] == accuracy["one:size"] == accuracy["one:position"] == 1
    assert accuracy["one:background"] == accuracy["two:background"] == 1
    nothing = [Scene((), s.background) for s in true]
    assert attribute_accuracy(true, nothing)["one:shape"] == 0
    with pytest.raises(ValueError, match="pairwise"):
        attribute_accuracy(true, true[:-1])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_objects=st.sampled_from([None, 1, 2]),
       held_out=st.sampled_from(["exclude", "only", "include"]))
def test_any_seed_gives_readable_scenes(seed, n_objects, held_out):
    for scene in sample_scenes(5, seed, n_objects=n_objects, held_out=held_out):
        assert read_attributes(render(scene)) == scene
