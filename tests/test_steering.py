"""steer() on the packaged Shapes pipeline and its packaged dictionaries: exact deltas, exact no-ops,
clamping, exception safety, and every bad input refused before anything runs."""

import copy

import numpy as np
import pytest
import torch

import fluxsae
from fluxsae import features, shapes
from fluxsae.hooks import capture
from fluxsae.steering import DEFAULT_TEXT_STRENGTH, MAX_STRENGTH, Directions, steer

D3 = "transformer_blocks.3.image"
S2 = "single_transformer_blocks.2.image"
PROMPT = "a large red circle at the top left on a gray background"


@pytest.fixture(scope="module")
def pipe():
    p = fluxsae.load_pipeline("shapes")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def sae():
    return fluxsae.load_sae("shapes", site=D3)


@pytest.fixture(scope="module")
def itda():
    return fluxsae.load_itda("shapes", site=D3)


def image(pipe, prompt=PROMPT, seed=0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, generator=g, output_type="np", **shapes.GENERATION_DEFAULTS).images[0]


@pytest.fixture(scope="module")
def plain(pipe):
    return image(pipe)


def no_hooks_left(pipe) -> bool:
    modules = [pipe.transformer, *pipe.transformer.modules()]
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def before_and_after(pipe, site, **steer_args):
    """The site's cond-pass output just before and just after the steering edit, same generation:
    a capture registered before steer's hook sees the block's own output, one registered after it
    sees what steer made of it. Each [steps, 1, tokens, d]."""
    with capture(pipe, site) as before, steer(pipe, **steer_args), capture(pipe, site) as after:
        image(pipe)
    return before[site], after[site]


def test_strength_zero_is_bit_exact(pipe, sae, plain):
    with steer(pipe, sae, {5: 0.0, 17: 0.0}):
        assert np.array_equal(image(pipe), plain)
    with steer(pipe, [(sae, {5: 0.0}), (Directions(torch.ones(128), S2, 10.0, "shapes"), {0: 0.0})]):
        assert np.array_equal(image(pipe), plain)
    assert no_hooks_left(pipe)


def test_add_is_strength_times_norm_times_direction_on_region_tokens_and_steps_only(pipe, sae):
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[1:3, 2:6] = True
    f, s = 7, 1.5
    pre, post = before_and_after(pipe, D3, dictionary=sae, features={f: s}, steps=[1, 3], region=region)
    delta = s * (sae.cfg.mean_token_norm * sae.directions[f])
    inside = region.flatten()
    for step in range(pre.shape[0]):
        if step in (1, 3):
            assert torch.equal(post[step, :, inside], pre[step, :, inside] + delta)
            assert torch.equal(post[step, :, ~inside], pre[step, :, ~inside])
        else:
            assert torch.equal(post[step], pre[step])
    assert not torch.equal(pre, post)


def test_a_steps_slice_is_resolved_against_the_generation_steps(pipe, sae):
    pre, post = before_and_after(pipe, D3, dictionary=sae, features={7: 1.0}, steps=slice(-2, None))
    n = shapes.GENERATION_DEFAULTS["num_inference_steps"]
    changed = [step for step in range(n) if not torch.equal(pre[step], post[step])]
    assert changed == [n - 2, n - 1]


def test_features_stack_and_negative_strengths_subtract(pipe, sae):
    m, dirs = sae.cfg.mean_token_norm, sae.directions
    pre, post = before_and_after(pipe, D3, dictionary=sae, features={3: 1.0, 9: -0.5}, steps=[0])
    torch.testing.assert_close(post[0] - pre[0], (m * dirs[3] - 0.5 * m * dirs[9]).expand_as(pre[0]))


def test_pixel_mask_selects_tokens_with_at_least_half_their_pixels(pipe, sae):
    pixels = torch.zeros(64, 64, dtype=torch.bool)
    pixels[0:8, 0:4] = True  # token (0, 0): exactly half of its pixels -> in
    pixels[8:11, 0:8] = True  # token (1, 0): 24 of 64 pixels -> out
    pre, post = before_and_after(pipe, D3, dictionary=sae, features={7: 1.0}, steps=[0], region=pixels)
    changed = (post[0, 0] != pre[0, 0]).any(-1)
    assert changed.nonzero().flatten().tolist() == [0]


def test_text_sites_steer_every_text_token(pipe):
    site = "transformer_blocks.3.text"
    direction = Directions(torch.arange(128.0), site, 10.0, "shapes")
    pre, post = before_and_after(pipe, site, dictionary=direction, features={0: 2.0}, steps=[0])
    torch.testing.assert_close(post[0] - pre[0], (20.0 * direction.directions[0]).expand_as(pre[0]))
    assert pre.shape[2] == shapes.GENERATION_DEFAULTS["max_sequence_length"]


TEXT_SITES = tuple(f"transformer_blocks.{i}.text" for i in range(4))


def colour_features(pipe, text_saes: dict, colours, per_colour: int = 2) -> dict:
    """{site: {colour: its text-SAE feature}} by `features.contrast_features` on one-object captions
    of that colour against those of the others."""
    pool = shapes.sample_scenes(200, seed=3, n_objects=1)
    scenes = [s for c in colours for s in [s for s in pool if s.objects[0].color == c][:per_colour]]
    gens = [torch.Generator().manual_seed(i) for i in range(len(scenes))]
    with capture(pipe, list(text_saes)) as acts:
        pipe([shapes.caption(s) for s in scenes], generator=gens, output_type="latent",
             **shapes.GENERATION_DEFAULTS)
    out = {}
    for site, sae in text_saes.items():
        out[site] = {}
        for c in colours:
            is_c = torch.tensor([s.objects[0].color == c for s in scenes])
            out[site][c] = features.contrast_features(sae, acts[site][:, is_c], acts[site][:, ~is_c], n=1)[0]
    return out


def test_a_list_of_ids_at_a_text_site_adds_the_text_defaults_strength_and_steps(pipe, sae):
    text = fluxsae.load_sae("shapes", site="transformer_blocks.1.text")
    with (
        capture(pipe, text.site) as pre,
        steer(pipe, [(text, [5]), (sae, [7])]),
        capture(pipe, text.site) as post,
    ):
        image(pipe)
    want = DEFAULT_TEXT_STRENGTH * text.cfg.mean_token_norm * text.directions[5]
    for step in range(8):  # every step at the text site, though the image site keeps the last four
        torch.testing.assert_close(post[text.site][step] - pre[text.site][step],
                                   want.expand_as(pre[text.site][step]), rtol=1e-4, atol=1e-4)
    pre, post = before_and_after(pipe, D3, dictionary=sae, features=[7])
    changed = [bool((post[i] != pre[i]).any()) for i in range(8)]
    assert changed == [False] * 4 + [True] * 4


def test_swapping_a_colour_feature_in_the_text_stream_recolours_the_object(pipe):
    """The packaged text-stream SAEs: clamping colour A's feature to 0 and adding B's at the text
    stream of every double block turns the object from A to B and keeps its shape and cell."""
    text_saes = {site: fluxsae.load_sae("shapes", site=site) for site in TEXT_SITES}
    feats = colour_features(pipe, text_saes, shapes.COLORS)
    scenes = [s for s in shapes.sample_scenes(60, seed=11, n_objects=1) if s.objects[0].color == "red"][:3]
    for scene, target in zip(scenes, ("blue", "green", "yellow"), strict=True):
        entries = []
        for site, sae in text_saes.items():
            entries += [(sae, {feats[site]["red"]: 0.0}, "clamp"), (sae, {feats[site][target]: 0.6}, "add")]
        prompt = shapes.caption(scene)
        plain = shapes.read_attributes((image(pipe, prompt, seed=1) * 255).round().astype(np.uint8))
        with steer(pipe, entries, steps=None):
            steered = shapes.read_attributes((image(pipe, prompt, seed=1) * 255).round().astype(np.uint8))
        assert no_hooks_left(pipe)
        want = scene.objects[0]
        assert [(o.color, o.shape, o.position) for o in plain.objects] == [("red", want.shape, want.position)]
        read = [(o.color, o.shape, o.position) for o in steered.objects]
        assert read == [(target, want.shape, want.position)]


def test_a_text_region_steers_only_its_text_tokens(pipe):
    direction = Directions(torch.arange(128.0), TXT, 10.0, "shapes")
    words = torch.zeros(24, dtype=torch.bool)
    words[[1, 2, 3]] = True  # "large red circle" of "a large red circle at ..."
    pre, post = before_and_after(pipe, TXT, dictionary=direction, features={0: 2.0}, steps=[0], region=words)
    changed = (post[0, 0] != pre[0, 0]).any(-1)
    assert changed.nonzero().flatten().tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="masks 23 text tokens but transformer_blocks.3.text has 24"):
        with steer(pipe, direction, {0: 1.0}, region=words[:23], steps=[0]):
            image(pipe)
    assert no_hooks_left(pipe)


def test_several_sites_at_once_equal_nested_blocks(pipe, sae):
    s2 = fluxsae.load_sae("shapes", site=S2)
    with steer(pipe, [(sae, {7: 1.0}), (s2, {11: 1.0})]):
        listed = image(pipe)
    with steer(pipe, sae, {7: 1.0}), steer(pipe, s2, {11: 1.0}):
        nested = image(pipe)
    with steer(pipe, sae, {7: 1.0}):
        one = image(pipe)
    assert np.array_equal(listed, nested)
    assert not np.array_equal(listed, one)


@pytest.mark.parametrize("which", ["sae", "itda"])
def test_clamp_zero_removes_the_feature_and_keeps_the_reconstruction_error(pipe, which, request):
    d = request.getfixturevalue(which)
    with capture(pipe, D3, steps=[0]) as acts:
        image(pipe)
    h = acts[D3][0, 0]  # [64, d]
    values, indices = d.encode_sparse(h)[:2]
    f = int(torch.mode(indices[values > 0]).values)  # the feature active on most tokens
    pre, post = before_and_after(pipe, D3, dictionary=d, features={f: 0.0}, mode="clamp", steps=[0])
    current = d.encode(pre[0, 0])[:, f]
    row = d.decode(torch.eye(d.cfg.n_features)[f]) - d.decode(torch.zeros(d.cfg.n_features))
    # h_new = h + decode(codes with f = 0) - decode(codes): only f's contribution leaves.
    torch.testing.assert_close(post[0, 0], pre[0, 0] - current[:, None] * row, atol=1e-4, rtol=1e-5)
    again = d.encode(post[0, 0])[:, f]
    assert (current > 0).sum() >= 10
    assert again.abs().sum() < 0.2 * current.sum()


def test_clamp_to_the_current_value_is_a_no_op(pipe, sae, plain):
    with capture(pipe, D3, steps=[0]) as acts:
        image(pipe)
    with torch.no_grad():
        codes = sae.encode(acts[D3][0, 0])  # [64, n]
    token, f = (int(i) for i in (codes > 0).nonzero()[0])
    region = torch.zeros(64, dtype=torch.bool)
    region[token] = True
    # The cond pass only: the uncond pass (empty prompt) has other activations there.
    value = {f: float(codes[token, f])}
    with steer(pipe, sae, value, mode="clamp", steps=[0], region=region, cfg_pass="cond"):
        torch.testing.assert_close(image(pipe), plain, atol=1e-5, rtol=0)
    # A feature active nowhere in this generation (every step, both CFG passes): clamping it to 0 changes
    # nothing, bit for bit.
    with capture(pipe, D3, cfg_pass="cond") as cond, capture(pipe, D3, cfg_pass="uncond") as uncond:
        image(pipe)
    with torch.no_grad():
        every = torch.cat([sae.encode(a[D3]).reshape(-1, sae.n_features) for a in (cond, uncond)])
    silent = int((every == 0).all(0).nonzero()[0])
    with steer(pipe, sae, {silent: 0.0}, mode="clamp"):
        assert np.array_equal(image(pipe), plain)


def test_an_exception_mid_generation_leaves_the_pipeline_as_it_was(pipe, sae, plain):
    def boom(pipeline, step, timestep, kwargs):
        if step == 2:
            raise RuntimeError("interrupted")
        return kwargs

    with pytest.raises(RuntimeError, match="interrupted"):
        with steer(pipe, [(sae, {7: 3.0}), (sae, {5: 0.0}, "clamp")]):
            g = torch.Generator().manual_seed(0)
            pipe(PROMPT, generator=g, callback_on_step_end=boom, **shapes.GENERATION_DEFAULTS)
    assert no_hooks_left(pipe)
    assert np.array_equal(image(pipe), plain)


def other_model(sae):
    d = copy.copy(sae)
    d.cfg = type(sae.cfg).from_dict({**sae.cfg.to_dict(), "base_model": "black-forest-labs/FLUX.1-schnell"})
    return d


def plain_directions(site=D3, width=128):
    return Directions(torch.ones(width), site, 1.0)


ALL = torch.ones(8, 8, dtype=torch.bool)
TXT = "transformer_blocks.3.text"
BAD = {  # case: (make (dictionary, features) from the SAE, other steer arguments, expected message)
    "unknown feature": (lambda sae: (sae, {2048: 1.0}), {}, "Unknown feature 2048"),
    "negative feature": (lambda sae: (sae, {-1: 1.0}), {}, "Unknown feature -1"),
    "non-integer feature": (lambda sae: (sae, {"3": 1.0}), {}, "integers"),
    "empty features": (lambda sae: (sae, {}), {}, "empty"),
    "nan strength": (lambda sae: (sae, {3: float("nan")}), {}, "finite"),
    "inf strength": (lambda sae: (sae, {3: float("inf")}), {}, "finite"),
    "absurd strength": (lambda sae: (sae, {3: MAX_STRENGTH * 1.01}), {}, "exceed"),
    "absurd clamp": (lambda sae: (sae, {3: 1e9}), {"mode": "clamp"}, "clamp values"),
    "bad mode": (lambda sae: (sae, {3: 1.0}), {"mode": "multiply"}, "mode must be"),
    "clamp without values": (lambda sae: (sae, [3]), {"mode": "clamp"}, "value per feature"),
    "region of the wrong shape": (lambda sae: (sae, {3: 1.0}), {"region": ALL[:4, :4]}, "region has shape"),
    "flat region too long": (lambda sae: (sae, {3: 1.0}), {"region": torch.ones(65) > 0}, "region has shape"),
    "soft region": (lambda sae: (sae, {3: 1.0}), {"region": torch.full((8, 8), 0.7)}, "bool mask"),
    "empty region": (lambda sae: (sae, {3: 1.0}), {"region": ~ALL}, "no token"),
    "image region on a text site": (
        lambda sae: (plain_directions(TXT), {0: 1.0}), {"region": ALL}, "mask over the text tokens"
    ),
    "empty text region": (
        lambda sae: (plain_directions(TXT), {0: 1.0}), {"region": torch.zeros(24) > 0}, "no text token"
    ),
    "site the pipeline lacks": (
        lambda sae: (plain_directions("transformer_blocks.18.image"), {0: 1.0}), {}, "out of range"
    ),
    "another width": (lambda sae: (plain_directions(width=64), {0: 1.0}), {}, "d_in=64"),
    "another base model": (lambda sae: (other_model(sae), {3: 1.0}), {}, "FLUX.1-schnell"),
    "empty steps": (lambda sae: (sae, {3: 1.0}), {"steps": []}, "steps is empty"),
    "negative steps": (lambda sae: (sae, {3: 1.0}), {"steps": [-1, 0]}, ">= 0"),
    "zero slice step": (lambda sae: (sae, {3: 1.0}), {"steps": slice(0, 8, 0)}, "positive step"),
    "bad cfg pass": (lambda sae: (sae, {3: 1.0}), {"cfg_pass": "neither"}, "cfg_pass"),
    "clamp on plain directions": (lambda sae: (plain_directions(), {0: 0.0}), {"mode": "clamp"}, "encodes"),
    "not a dictionary": (lambda sae: (sae.directions, {0: 1.0}), {}, "Tensor has no directions"),
    "a region named in words": (lambda sae: (sae, {3: 1.0}), {"region": "center"}, "must be a bool mask"),
    "a token norm that overflows": (
        lambda sae: (sae, {3: 1.0}), {"mean_token_norm": 1e305}, "not a token norm"
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_before_anything_runs(pipe, sae, case):
    make, kwargs, message = BAD[case]
    dictionary, features = make(sae)
    ran = []
    with pytest.raises(ValueError, match=message):
        with steer(pipe, dictionary, features, **kwargs):
            ran.append(True)
    assert not ran and no_hooks_left(pipe)


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (lambda sae: sae, {"steps": [100]}, r"steps \[100\] are outside this generation's 8"),
        (lambda sae: sae, {"steps": slice(20, None)}, "selects no step"),
        (lambda sae: damaged_norm(sae, 1e30), {}, "mean_token_norm"),
        (lambda sae: damaged_norm(sae, 1e-6), {}, "mean_token_norm"),
    ],
    ids=["a step the run lacks", "a slice past the run", "a huge mean token norm", "a tiny one"],
)  # fmt: skip
def test_what_only_the_generation_knows_is_refused_at_its_first_step(pipe, sae, plain, make, kwargs, message):
    """Steps past the run's end, and a mean token norm far off the steered tokens' (strength would blow the
    image up into NaN), raise at the first step, before any edit; the next generation is the plain one."""
    with pytest.raises(ValueError, match=message):
        with steer(pipe, make(sae), {3: 1.0}, **kwargs):
            image(pipe)
    assert no_hooks_left(pipe) and np.array_equal(image(pipe), plain)


def damaged_norm(sae, norm: float):
    d = copy.copy(sae)
    d.cfg = type(sae.cfg).from_dict({**sae.cfg.to_dict(), "mean_token_norm": norm})
    return d


def test_a_bad_entry_in_a_list_hooks_none_of_the_others(pipe, sae, plain):
    with pytest.raises(ValueError, match="Unknown feature"):
        with steer(pipe, [(sae, {7: 2.0}), (sae, {99999: 1.0})]):
            pass
    assert no_hooks_left(pipe)
    assert np.array_equal(image(pipe), plain)


def test_one_objects_words_mean_its_whole_phrase():
    """A swap restricted to "red circle" alone changes nothing (T5 spreads an object's attributes over its
    phrase): the words are widened to the phrase that holds them, up to "and", punctuation or "on a"."""
    from fluxsae.word_steering import phrase_of

    two = "a large yellow triangle at the left and a small red circle at the bottom right on a white ground"
    assert phrase_of(two, "red circle") == "a small red circle at the bottom right"
    assert phrase_of(two, "YELLOW") == "a large yellow triangle at the left"
    assert phrase_of(two, "white  ground") == "white ground"
    assert phrase_of("A red apple, with a blue pear.", "pear") == "a blue pear"
    for missing in ("green", "red square", "", "circ"):
        with pytest.raises(ValueError, match="is not in the prompt"):
            phrase_of(two, missing)
