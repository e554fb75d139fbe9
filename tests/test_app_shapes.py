"""The Gradio app on the packaged Shapes model, its SAEs, ITDAs and labels, through `gradio_client` against
the launched app and in headless Chromium. Feature ids and labels are read from the app's own answers,
never written here: the packaged dictionaries may be retrained."""

import os
import pickle
import re
import shutil
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # app.py lives at the repo root

from test_app import CHROMIUM, _free_port, _hooks  # noqa: E402

import app  # noqa: E402
import app_views as views  # noqa: E402
import fluxsae  # noqa: E402
from app_labels import label_of  # noqa: E402
from fluxsae import shapes  # noqa: E402

SITE, SINGLE = "transformer_blocks.3.image", "single_transformer_blocks.2.image"
PROMPT = "a red circle at the top left on a white background"
UNUSUAL, SHARE = "unusual for this image", "share of activation"


def _launch(pipe, **kwargs):
    demo = app.build_demo(pipe, "shapes", **kwargs)
    port = _free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def shapes_app():
    """The app on the packaged Shapes model with its SAEs, ITDAs and labels; yields (URL, pipeline)."""
    pipe = fluxsae.load_pipeline("shapes")
    demo, url = _launch(pipe)
    try:
        yield url, pipe
    finally:
        demo.close()


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def _pixels(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _generate(client, prompt=PROMPT, seed=0, method="SAE", feature=-1, site=SITE, rank=UNUSUAL, first=0,
              show=views.ALL):  # fmt: skip
    args = (prompt, seed, site, method, first, 7, feature, 0.55, rank, show)
    return client.predict(*args, api_name="/generate")


def _steer(client, features="0", strength=5, seed=0, mode="add", first=0, last=4, prompt="a blue square",
           method="SAE", region=None):  # fmt: skip
    return client.predict(
        prompt, seed, SITE, method, features, strength, mode, first, last, region, api_name="/steer"
    )


def _top(client, n=2, method="SAE", prompt=PROMPT) -> list[int]:
    """The ids of the first n top features the app finds on `prompt` (never hard-coded)."""
    return [row[0] for row in _generate(client, prompt=prompt, method=method)[3]["data"][:n]]


def _library_image(pipe, prompt, seed, edit=None) -> np.ndarray:
    """One generation as the app runs it, straight through the library: arrays in [0, 1]."""
    defaults = app.generation_defaults("shapes", pipe)
    generator = torch.Generator("cpu").manual_seed(seed)
    with edit if edit is not None else torch.no_grad():
        return pipe(prompt, generator=generator, output_type="np", **defaults).images


def _labels(site=SITE, method="sae") -> dict:
    return {int(r["feature"]): r for r in fluxsae.load_labels("shapes", site=site, method=method)}


def _shown(pipe, images) -> np.ndarray:
    return np.asarray(app.to_display(pipe.numpy_to_pil(images)[0]).convert("RGB"))


def test_every_action_is_one_named_endpoint_with_labelled_results(shapes_app):
    url, pipe = shapes_app
    client = _client(url)
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    names = ["/generate", "/check_prompt", "/top_features", "/show_feature", "/features_at", "/search"]
    own = ["/analyse_image", "/edit_image", "/diff_prompts", "/steer_towards"]
    assert sorted(api) == sorted([*names, "/steer", "/swap", *own])
    for info in api.values():
        assert all(r["label"] and not r["label"].startswith("value_") for r in info["returns"]), info
    region = [p for p in api["/steer"]["parameters"] if p["parameter_name"] == "region"]
    assert region and region[0]["parameter_has_default"]  # optional, as the page has it
    image, heat, stats, table, panel, profile, gallery, atom, words, region = _generate(client)
    assert _pixels(image).shape == (384, 384, 3) and _pixels(heat).shape[0] >= 384  # heatmap + colour bar
    assert "FVU on this image" in stats and " ms" in stats
    rows = table["data"]
    assert len(rows) == 10 and all(r[1] for r in rows)  # every top feature has a label
    assert f"Feature {rows[0][0]}" in panel and "density" in panel and gallery and atom == []
    # Another feature of the table: its own heatmap, on the same fixed scale machinery.
    heat2, panel2, *_ = client.predict(SITE, "SAE", 0, 7, rows[3][0], 0.8, api_name="/show_feature")
    assert f"Feature {rows[3][0]}" in panel2 and not np.array_equal(_pixels(heat), _pixels(heat2))
    at = client.predict(SITE, "SAE", 0, 7, 40, 40, api_name="/features_at")[0]["data"]
    assert at and all(len(r) == 4 for r in at)
    found = client.predict("red", SITE, "SAE", api_name="/search")
    assert found["headers"][:3] == ["feature", "detects", "F1"]
    assert found["data"] and all("red" in r[1] for r in found["data"])
    # Re-ranking the same image by share of activation: the same rows' shares, largest first.
    by_share = client.predict(SITE, "SAE", 0, 7, SHARE, api_name="/top_features")["data"]
    shares = [r[3] for r in by_share]
    assert shares == sorted(shares, reverse=True) and shares[0] >= max(r[3] for r in rows)
    # ITDA at the other packaged site.
    out = _generate(client, prompt="a red circle", site=SINGLE, method="ITDA")
    assert "ITDA" in out[2] and out[3]["data"]
    note = client.predict("a red circle in the top left", api_name="/check_prompt")
    assert "`in`" in note and "does not know" in note
    original, steered, spliced, steer_stats = _steer(client)
    assert not np.array_equal(_pixels(original), _pixels(steered)) and "mean pixel change" in steer_stats
    assert _hooks(pipe) == 0


def test_the_top_feature_by_default_a_marked_cell_and_prompt_notes(shapes_app):
    """Feature -1 (the box's default) means the image's top feature on every path; the statistics name
    the feature shown; a pixel's token is outlined; empty and over-long prompts are said to be."""
    url, _ = shapes_app
    client = _client(url)
    out = _generate(client, rank=SHARE)
    top = out[3]["data"][0][0]
    heat, panel, *_, stats = client.predict(SITE, "SAE", 0, 7, -1, 0.3, api_name="/show_feature")
    assert f"Feature {top}" in panel and f"feature {top} on steps" in stats
    other = out[3]["data"][2][0]
    stats = client.predict(SITE, "SAE", 0, 7, other, 0.3, api_name="/show_feature")[-1]
    assert f"feature {other} on steps" in stats
    rows, marked = client.predict(SITE, "SAE", 0, 7, 100, 100, api_name="/features_at")
    magenta = (_pixels(marked) == [255, 0, 255]).all(-1)
    assert rows["data"] and magenta[96:144, 96:144].any() and not magenta[200:, 200:].any()
    assert "prompt is empty" in client.predict("", api_name="/check_prompt")
    prompt = "a large red circle at the center and " * 4 + "on a gray background"
    long = client.predict(prompt, api_name="/check_prompt")
    assert "reads the first 24 tokens" in long and "stops after" in long
    assert views.cut_prompt("a red circle", 9) == "a red" and views.cut_prompt("abcdef", 3) == "abc"


def test_search_and_steering_by_words_take_the_feature_that_detects_the_word(shapes_app):
    """Search ranks by held-out F1 for the concept the words name exactly (any steps), read here from the
    label dataset independently of the app; steering by words takes that feature; the panel says what the
    label is worth in words; unexplained features say so; the table can hide them or keep the first groups."""
    import re as regex

    url, _ = shapes_app
    client = _client(url)
    labels = _labels()
    rows = [r for r in fluxsae.load_labels("shapes", config="detections", site=SITE, method="sae")]
    rows += [{**r, "text": r["label"]} for r in labels.values() if r["status"] == "ok"]
    for word in ("blue", "circle", "gray background"):
        exact = [r for r in rows if regex.sub(r", (early|late) steps only$", "", r["text"]) == word]
        best = max(exact, key=lambda r: (r["f1"], r["density"] or 0))
        first = client.predict(word, SITE, "SAE", api_name="/search")["data"][0]
        assert first[0] == best["feature"] and first[2] == pytest.approx(best["f1"], abs=1e-3), word
    blue = client.predict("blue", SITE, "SAE", api_name="/search")["data"][0][0]
    stats = _steer(client, features="blue: 2", prompt="a red circle")[3]
    assert f"{blue} (" in stats
    _generate(client)
    panel = client.predict(SITE, "SAE", 0, 7, blue, 0.5, api_name="/show_feature")[1]
    assert regex.search(r"It fires on \d+% of .*; \d+% of where it fires", panel)
    unexplained = next(f for f, r in labels.items() if r["status"] == "unexplained")
    panel = client.predict(SITE, "SAE", 0, 7, unexplained, 0.5, api_name="/show_feature")[1]
    assert "**Unexplained**" in panel and "closest candidate" in panel
    shown = _generate(client, rank=SHARE, show=views.LABELLED)[3]["data"]
    assert len(shown) == 10 and all(labels[r[0]]["status"] == "ok" for r in shown)
    first_groups = _generate(client, show="groups up to feature 127")[3]["data"]
    assert first_groups and all(r[0] <= 127 for r in first_groups)
    everything = _generate(client)[3]["data"]  # by lift, which brings the rare outer features up
    assert any(r[0] > 127 for r in everything)  # the filter did filter


def test_lift_ranks_by_mass_over_the_usual_mass(shapes_app):
    """rank="lift": mass / (usual mass + the mean usual mass), computed here from the feature's own
    activations and the shipped stats' timestep profile."""
    from fluxsae.feature_stats import load_feature_stats
    from fluxsae.features import feature_activations, top_features

    pipe = shapes_app[1]
    sae = fluxsae.load_sae("shapes", site=SITE)
    stats = load_feature_stats("shapes", site=SITE, kind="sae")
    with fluxsae.capture(pipe, [SITE]) as acts:
        _library_image(pipe, PROMPT, 0)
    acts = acts[SITE]
    steps = [2, 3, 4, 5]
    top = top_features(sae, acts, stats, 10, steps=steps, rank="lift")
    usual = stats.timestep_profile[steps].mean(0).double() * acts.shape[2]
    for t in top:
        mass = feature_activations(sae, acts, t.feature)[steps].mean(0).sum().item()
        assert t.mass == pytest.approx(mass, rel=1e-4)
    lift = [t.mass / (usual[t.feature] + usual.mean()).item() for t in top]
    assert lift == sorted(lift, reverse=True)
    by_mass = top_features(sae, acts, stats, 10, steps=steps)
    assert [t.feature for t in top] != [t.feature for t in by_mass]  # the two orders differ on this image
    with pytest.raises(ValueError, match="pass stats"):
        top_features(sae, acts, None, rank="lift")


def test_each_steered_feature_has_its_own_strength(shapes_app):
    url, pipe = shapes_app
    client = _client(url)
    a, b = _top(client)
    both = _steer(client, f"{a}: 6, {b}: -6")
    assert f"{a} (" in both[3] and "+6" in both[3] and "-6" in both[3]
    # What the library makes of {a: 6, b: -6} on the same steps (0-4), seed and prompt.
    sae = fluxsae.load_sae("shapes", site=SITE)
    edit = fluxsae.steer(pipe, sae, {a: 6.0, b: -6.0}, steps=range(0, 5), height=64, width=64)
    assert np.array_equal(_pixels(both[1]), _shown(pipe, _library_image(pipe, "a blue square", 0, edit)))
    # b's own strength matters; b at 0 is no edit at all; entries without a strength take `strength`.
    assert not np.array_equal(_pixels(both[1]), _pixels(_steer(client, f"{a}: 6, {b}: 6")[1]))
    alone = _pixels(_steer(client, f"{a}: 6")[1])
    assert np.array_equal(_pixels(_steer(client, f"{b}: 0, {a}: 6")[1]), alone)
    assert np.array_equal(_pixels(_steer(client, f"{a}, {b}: -6", strength=6)[1]), _pixels(both[1]))


def test_ablate_clamps_every_listed_feature_to_zero(shapes_app):
    client = _client(shapes_app[0])
    a, b = _top(client)
    ablated = _steer(client, f"{a}, {b}", mode="ablate", prompt=PROMPT, first=0, last=7)
    clamped = _steer(client, f"{a}: 0, {b}: 0", mode="clamp", prompt=PROMPT, first=0, last=7)
    assert np.array_equal(_pixels(ablated[1]), _pixels(clamped[1]))
    assert not np.array_equal(_pixels(ablated[0]), _pixels(ablated[1]))  # they fire here: removing them shows
    assert f"**ablate** {a} (" in ablated[3] and f"{b} (" in ablated[3]


def test_steering_reports_the_spliced_in_error_of_this_image(shapes_app):
    """The spliced-in image error is the library's: the image with the SAE's reconstruction spliced in at
    the site (fluxsae.evaluate.splice) against the plain one, by fluxsae.evaluate.image_mse."""
    from fluxsae.evaluate import image_mse, splice

    url, pipe = shapes_app
    original, steered, spliced, stats = _steer(_client(url), prompt=PROMPT)
    sae = fluxsae.load_sae("shapes", site=SITE)
    plain = _library_image(pipe, PROMPT, 0)
    with_sae = _library_image(pipe, PROMPT, 0, splice(pipe, sae))
    assert np.array_equal(_pixels(spliced), _shown(pipe, with_sae))
    assert np.array_equal(_pixels(original), _shown(pipe, plain))
    mse = float(re.search(r"image MSE (\d+\.\d+)", stats).group(1))
    assert mse == pytest.approx(image_mse(with_sae, plain), abs=6e-5) and mse > 0
    held_out = (sae.cfg.extra or {}).get("spliced")  # the build's held-out figures, when it wrote them
    if held_out:
        assert f"erasing the site to its mean: {held_out['image_mse_mean_ablation']:.4f}" in stats
    else:
        assert "held-out" not in stats
    assert re.search(r"FVU on this image 0\.\d+", stats) and "spliced image" in stats
    assert _hooks(pipe) == 0


def test_itda_feature_panel_shows_the_atom_source(shapes_app):
    from fluxsae.provenance import atom_source

    url, pipe = shapes_app
    client = _client(url)
    out = _generate(client, method="ITDA")
    atom_id = out[3]["data"][0][0]
    itda = fluxsae.load_itda("shapes", site=SITE)
    source = atom_source(itda, atom_id, pipe)
    panel, gallery = out[4], out[7]
    assert f"Feature {atom_id}" in panel and source.provenance["prompt"] in panel
    assert f"seed {source.provenance['seed']}" in panel and f"step {source.provenance['step']}" in panel
    cosine = float(re.search(r"cosine with the atom (-?\d\.\d+)", panel).group(1))
    assert cosine == pytest.approx(source.cosine, abs=1e-3) and cosine > 0.9  # the provenance is right
    assert len(gallery) == 2
    outlined, patch = (_pixels(item["image"]) for item in gallery)
    assert np.array_equal(outlined, np.asarray(views.enlarged(source.outlined, 384)))
    assert np.array_equal(patch, np.asarray(views.enlarged(source.patch, 384)))
    # Another atom through /show_feature: its own source.
    other = out[3]["data"][1][0]
    _, panel2, _, _, gallery2, _ = client.predict(SITE, "ITDA", 0, 7, other, 0.5, api_name="/show_feature")
    assert itda.provenance[other]["prompt"] in panel2 and len(gallery2) == 2


def test_mlp_neurons_rank_the_blocks_own_units(shapes_app):
    """MLP neurons: the hidden activations of the site's block, ranked here independently of the app
    (positive part summed over tokens, mean over steps, neurons denser than 0.5 left out as the
    library's filter does for every method)."""
    from gradio_client.exceptions import AppError

    from fluxsae.autointerp.examples import capture_mlp, stack_steps
    from fluxsae.features import DEFAULT_MAX_DENSITY

    url, pipe = shapes_app
    client = _client(url)
    out = _generate(client, method=views.MLP, rank=SHARE)
    assert "MLP neurons" in out[2] and "no FVU" in out[2]
    rows = out[3]["data"]
    labels = {int(r["feature"]): r for r in fluxsae.load_labels("shapes", site=SITE, method="mlp")}
    with capture_mlp(pipe, [SITE], 64) as hidden:
        _library_image(pipe, PROMPT, 0)
    units = stack_steps(hidden[SITE], 8)[:, 0]  # [steps, tokens, neurons]
    mass = units.double().clamp(min=0).sum(1).mean(0)
    dense = torch.tensor([float(labels[f]["density"]) > DEFAULT_MAX_DENSITY for f in range(len(mass))])
    expected = mass.masked_fill(dense, -1).argsort(descending=True)[:10].tolist()
    assert [r[0] for r in rows] == expected
    assert [r[1] for r in rows] == [label_of(labels, f)[0] for f in expected]
    assert _pixels(out[1]).shape[0] >= 384 and f"Feature {expected[0]}" in out[4]
    found = client.predict("gray background", SITE, views.MLP, api_name="/search")["data"]
    assert found and all("gray" in r[1] and "background" in r[1] for r in found)
    with pytest.raises(AppError, match="Steering takes dictionary features"):
        _steer(client, str(expected[0]), method=views.MLP)


def test_mlp_neurons_are_offered_only_where_labels_exist(shapes_app, tmp_path):
    from gradio_client.exceptions import AppError

    from fluxsae.labels import shapes_labels_dir

    pipe = shapes_app[1]

    def choices(demo):
        return [c for c in demo.blocks.values() if getattr(c, "elem_id", None) == "method"][0].choices

    assert [c[0] for c in choices(app.build_demo(pipe, "shapes"))] == ["SAE", "ITDA", views.MLP]
    release = tmp_path / "labels"
    shutil.copytree(shapes_labels_dir(), release)
    for shard in (release / "data" / "labels").glob("mlp-*.parquet"):
        shard.unlink()
    demo, url = _launch(pipe, labels=str(release))
    try:
        assert [c[0] for c in choices(demo)] == ["SAE", "ITDA"]
        client = _client(url)
        with pytest.raises(AppError, match="not in the list of choices"):
            _generate(client, method=views.MLP)
        assert _generate(client)[3]["data"]  # the SAE's labels still come from that release
    finally:
        demo.close()


def test_steering_a_painted_region_of_any_shape(shapes_app, tmp_path):
    """An ImageEditor value as gradio_client sends it: strokes on the top-left quarter, at a size that is
    not the image's; the edit lands there most."""
    from gradio_client import handle_file
    from PIL import Image

    client = _client(shapes_app[0])
    layer = np.zeros((300, 170, 4), np.uint8)
    layer[:150, :85] = 255
    Image.fromarray(layer).save(tmp_path / "layer.png")
    Image.new("RGB", (170, 300)).save(tmp_path / "background.png")
    files = {
        k: handle_file(tmp_path / f) for k, f in (("background", "background.png"), ("layer", "layer.png"))
    }
    region = {"background": files["background"], "layers": [files["layer"]], "composite": files["background"]}
    original, steered, _, stats = _steer(client, strength=20, region=region)
    assert "painted region" in stats
    change = np.abs(_pixels(original).astype(int) - _pixels(steered).astype(int)).sum(-1)
    assert change[:192, :192].mean() > change[192:, 192:].mean()
    blank = np.zeros((300, 170, 4), np.uint8)  # nothing painted: steer everywhere
    Image.fromarray(blank).save(tmp_path / "blank.png")
    region["layers"] = [handle_file(tmp_path / "blank.png")]
    assert "painted region" not in _steer(client, strength=20, region=region)[3]


def _swap(client, prompt="a large red circle at the center on a white background", seed=0, take_out="red",
          put_in="blue", words="", strength=0.6, first=0, last=7, region=None):  # fmt: skip
    args = (prompt, seed, take_out, put_in, words, strength, first, last, region)
    return client.predict(*args, api_name="/swap")


def test_swapping_words_turns_the_object_and_says_what_it_used(shapes_app):
    """Make the red thing blue through the app: the text-stream swap at every text site, the same images
    the library makes from the same seed, what the reader sees beside each, the features named."""
    from fluxsae.regions import generate_pair
    from fluxsae.word_steering import WordSteering, shapes_captions

    url, pipe = shapes_app
    client = _client(url)
    original, steered, stats, reads_before, reads_after = _swap(client)
    assert "red" in reads_before and "blue" in reads_after and "circle at the center" in reads_after
    texts = [fluxsae.load_sae("shapes", site=f"transformer_blocks.{i}.text") for i in range(4)]
    words = WordSteering(pipe, texts, shapes_captions, app.generation_defaults("shapes", pipe))
    swap = words.swap("red", "blue", 0.6)
    for site, _word, feature, _role in swap.features:
        assert f"`{site}`" in stats and str(feature) in stats
    plain, edited = generate_pair(pipe, "a large red circle at the center on a white background", 0,
                                  lambda: fluxsae.steer(pipe, swap.specs, steps=None), output_type="np",
                                  **app.generation_defaults("shapes", pipe))  # fmt: skip
    assert np.array_equal(_pixels(original), _shown(pipe, plain.images))
    assert np.array_equal(_pixels(steered), _shown(pipe, edited.images))
    two = "a large red circle at the left and a small red square at the right on a white background"
    only = _swap(client, prompt=two, words="red circle")  # the circle's whole phrase is steered
    assert "only 'a large red circle at the left'" in only[2]
    assert "blue circle" in only[4] and "red square" in only[4]
    assert _hooks(pipe) == 0


def test_a_painted_region_turns_what_is_in_it_and_keeps_the_rest(shapes_app, tmp_path):
    from gradio_client import handle_file
    from PIL import Image

    url, pipe = shapes_app
    client = _client(url)
    prompt = "a large red circle at the top left and a large red square at the bottom right on a gray"
    prompt += " background"
    layer = np.zeros((384, 384, 4), np.uint8)
    layer[:160, :160] = 255  # over the top-left object, on the displayed image
    Image.fromarray(layer).save(tmp_path / "layer.png")
    Image.new("RGB", (384, 384)).save(tmp_path / "background.png")
    background = handle_file(tmp_path / "background.png")
    painted = [handle_file(tmp_path / "layer.png")]
    region = {"background": background, "layers": painted, "composite": background}
    original, steered, stats, _, after = _swap(client, prompt=prompt, seed=3, region=region)
    assert "inside the painted region" in stats
    change = np.abs(_pixels(original).astype(int) - _pixels(steered).astype(int)).sum(-1)
    # The far corner keeps its latents; its pixels move only by what the decoder mixes across the image.
    assert change[:150, :150].mean() > 5 * change[250:, 250:].mean()
    assert "blue" in after and "red square at the bottom right" in after


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda c: _swap(c, take_out="teal"), "does not know 'teal'.*knows a, and"),
        (lambda c: _swap(c, take_out="green"), "does not say 'green'"),
        (lambda c: _swap(c, take_out="", put_in=""), "a word to take out, a word to put in"),
        (lambda c: _swap(c, strength="NaN"), "strength must be"),
        (lambda c: _swap(c, strength=1e6), "strength must be"),
        (lambda c: _swap(c, first=7, last=2), "after the last step"),
        (lambda c: _swap(c, last=99), "last step must be"),
        (lambda c: _swap(c, words="blue square"), "'blue square' is not in the prompt"),
        (lambda c: _generate(c, seed="NaN"), "whole number"),
        (lambda c: _generate(c, seed="abc"), "whole number"),
        (lambda c: _generate(c, feature=10**6), "feature must be"),
        (lambda c: _generate(c, method="MLP"), "not in the list of choices"),
        (lambda c: _generate(c, rank="best"), "not in the list of choices"),
        (lambda c: _generate(c, site="transformer_blocks.9.image"), "not in the list of choices"),
        (lambda c: _steer(c, strength=1e6), "strength must be"),
        (lambda c: _steer(c, strength="NaN"), "strength must be"),
        (lambda c: _steer(c, strength="abc"), "strength must be"),
        (lambda c: _steer(c, features="12: NaN"), "strength of feature 12 must be"),
        (lambda c: _steer(c, features="12: -1e6, 13: 2"), "strength of feature 12 must be"),
        (lambda c: _steer(c, features="12, 12: 3"), "named twice"),
        (lambda c: _steer(c, features=", ".join(map(str, range(9)))), "at most 8 features"),
        (lambda c: _steer(c, features="99999"), "no feature 99999"),
        (lambda c: _steer(c, features="zzz unknown: 3"), "No feature's label"),
        (lambda c: _steer(c, features=""), "at least one feature"),
        (lambda c: _steer(c, first=5, last=2), "after the last step"),
        (lambda c: _steer(c, mode="multiply"), "not in the list of choices"),
        (lambda c: c.predict(SITE, "SAE", 0, 7, 0, 0.5, api_name="/show_feature"), "Generate an image first"),
        (lambda c: c.predict(SITE, "SAE", 0, 7, SHARE, api_name="/top_features"), "Generate an image first"),
    ],
)  # fmt: skip
def test_bad_input_is_a_clear_error_and_the_next_request_is_unchanged(shapes_app, call, match):
    from gradio_client.exceptions import AppError

    client = _client(shapes_app[0])
    with pytest.raises(AppError, match=match):
        call(client)
    assert _hooks(shapes_app[1]) == 0


def test_a_region_covering_every_token_or_none_is_refused_or_ignored(shapes_app, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError
    from PIL import Image

    client = _client(shapes_app[0])
    Image.new("RGB", (384, 384)).save(tmp_path / "background.png")
    for name, value in (("all", 255), ("none", 0)):
        Image.fromarray(np.full((384, 384, 4), value, np.uint8)).save(tmp_path / f"{name}.png")
    background = handle_file(tmp_path / "background.png")
    region = {"background": background, "layers": [handle_file(tmp_path / "all.png")],
              "composite": background}  # fmt: skip
    with pytest.raises(AppError, match="covers every token"):
        _swap(client, region=region)
    region["layers"] = [handle_file(tmp_path / "none.png")]  # nothing painted: the whole image
    assert "the whole image" in _swap(client, region=region)[2]
    before = _swap(client, seed=5)
    with pytest.raises(AppError):
        _swap(client, seed=5, strength="inf")
    after = _swap(client, seed=5)
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(before[:2], after[:2], strict=True))


def test_a_text_site_shows_token_norms_though_the_release_has_a_text_sae_there(shapes_app):
    """The packaged SAEs cover the text streams (for steering captions); the app paints image tokens,
    so at a text site it shows the residual's norms, as at a site without a dictionary."""
    text_site = "transformer_blocks.1.text"
    assert fluxsae.load_sae("shapes", site=text_site).site == text_site
    out = _generate(_client(shapes_app[0]), site=text_site)
    assert out[3]["data"] in ([], [[]]) and "norm" in out[2].lower()
    assert views.Dictionaries("shapes").get(text_site, "SAE") is None


def test_odd_prompts_generate_and_leave_the_pipeline_unchanged(shapes_app):
    client = _client(shapes_app[0])
    before = _steer(client, strength="5")  # a number as a string is fine
    for prompt in ["", "red circle " * 1000, "ein roter Kreis ✨ 赤い円 \u202e"]:
        out = _generate(client, prompt=prompt)
        assert _pixels(out[0]).shape == (384, 384, 3)
    after = _steer(client, strength=5)
    for i in range(3):
        assert np.array_equal(_pixels(before[i]), _pixels(after[i]))


def _result(endpoint, out):
    """What a request returned, without its timings: images as pixels, tables as rows."""
    if endpoint == "steer":
        return [_pixels(p) for p in out[:3]]
    return [_pixels(out[0]), _pixels(out[1]), out[3]["data"]]


def test_eight_concurrent_clients_each_get_their_solo_result(shapes_app):
    """Eight clients at once, over both endpoints that run the pipeline and all three methods, one of
    them failing inside the pipeline (the text encoder raises on its prompt's word): each of the other
    seven gets exactly what it got alone, and no hook is left behind."""
    from gradio_client.exceptions import AppError

    url, pipe = shapes_app
    poison = pipe.tokenizer_2("purple").input_ids[0]

    def explode(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and bool((ids == poison).any()):
            raise RuntimeError("boom inside the text encoder")

    a, b = _top(_client(url))
    requests = [
        ("steer", dict(seed=1, features=f"{a}: 8")),
        ("steer", dict(seed=2, features=f"{a}: 4, {b}: -4")),
        ("steer", dict(seed=3, features=f"{b}", mode="ablate", prompt=PROMPT)),
        ("steer", dict(seed=4, features=f"{b}: -3", prompt="a small green triangle")),
        ("generate", dict(seed=5)),
        ("generate", dict(seed=6, method="ITDA")),
        ("generate", dict(seed=7, method=views.MLP, rank=SHARE)),
        ("steer", dict(seed=8, features=f"{a}: 8", prompt="a purple circle")),  # fails in the pipeline
    ]

    def send(request):
        endpoint, kwargs = request
        client = _client(url)
        try:
            return _result(endpoint, (_steer if endpoint == "steer" else _generate)(client, **kwargs))
        except AppError as e:
            return e

    handle = pipe.text_encoder_2.register_forward_pre_hook(explode, with_kwargs=True)
    try:
        solo = [send(r) for r in requests]
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(send, requests))
    finally:
        handle.remove()
    for got, alone in zip(together[:-1], solo[:-1], strict=True):
        assert not isinstance(got, Exception) and len(got) == len(alone)
        for x, y in zip(got, alone, strict=True):
            assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
    for failed in (solo[-1], together[-1]):
        assert isinstance(failed, AppError) and "boom inside the text encoder" in str(failed)
    assert _hooks(pipe) == 0


def test_zero_gpu_wraps_every_path_that_runs_the_pipeline(shapes_app, monkeypatch, tmp_path):
    """With the `spaces` package present, the functions that run the pipeline are spaces.GPU functions,
    called with and returning only what pickles (as ZeroGPU sends them to its worker), never the
    pipeline; their results are the plain app's."""
    import inspect

    url, pipe = shapes_app
    decorated, calls = [], []

    def GPU(duration=60):  # the shape of spaces.GPU(duration=...)
        def decorate(fn):
            decorated.append(fn)

            def on_gpu(*args, **kwargs):
                args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))  # what the worker receives
                calls.append(fn.__name__)
                return pickle.loads(pickle.dumps(fn(*args, **kwargs)))

            return on_gpu

        return decorate

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    demo, gpu_url = _launch(pipe)
    try:
        names = {fn.__name__ for fn in decorated}
        assert names == {"capture_units", "steer_images", "regenerate_atom", "swap_images", "analyse", "edit"}
        assert all("pipe" not in inspect.signature(fn).parameters for fn in decorated)
        plain, on_gpu = _client(url), _client(gpu_url)
        for method in ("SAE", "ITDA", views.MLP):
            assert np.array_equal(
                _pixels(_generate(plain, method=method, seed=9)[1]),
                _pixels(_generate(on_gpu, method=method, seed=9)[1]),
            )
        a = _top(on_gpu, 1)[0]
        for x, y in zip(_steer(plain, f"{a}: 5")[:3], _steer(on_gpu, f"{a}: 5")[:3], strict=True):
            assert np.array_equal(_pixels(x), _pixels(y))
        for x, y in zip(_swap(plain)[:2], _swap(on_gpu)[:2], strict=True):
            assert np.array_equal(_pixels(x), _pixels(y))
        upload = _own(tmp_path, shapes.render(shapes.sample_scenes(1, seed=2)[0]))
        x, y = _analyse(plain, upload, "a red circle"), _analyse(on_gpu, upload, "a red circle")
        assert np.array_equal(_pixels(x[1]), _pixels(y[1])) and x[3]["data"] == y[3]["data"]
        assert set(calls) - {"regenerate_atom"} == names - {"regenerate_atom", "edit"}
    finally:
        demo.close()
    assert _hooks(pipe) == 0


def _crop(shot: np.ndarray, box: dict, scroll_y: float) -> np.ndarray:
    top, left = int(box["y"] + scroll_y), int(box["x"])
    return shot[top : top + int(box["height"]), left : left + int(box["width"])]


@pytest.mark.browser
def test_features_search_and_steering_with_a_painted_region_in_a_real_browser(shapes_app, tmp_path):
    if not Path(CHROMIUM).exists():
        if os.environ.get("FLUXSAE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (FLUXSAE_REQUIRE_BROWSER=1).")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"], headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(shapes_app[0])
            page.locator("#prompt textarea").fill("a red circle in the top left")
            expect(page.locator("#vocabulary")).to_contain_text("does not know")
            page.locator("#generate").click()
            expect(page.locator("#stats")).to_contain_text("FVU on this image", timeout=60_000)
            expect(page.locator("#heatmap img[src]")).to_be_visible()
            # Pick the third feature of the table: the panel shows it.
            cell = page.locator('#top_features [role=row][aria-rowindex="4"] [role=gridcell]').first
            picked = cell.inner_text().strip()
            cell.click()
            expect(page.locator("#feature_panel")).to_contain_text(f"Feature {picked}", timeout=30_000)
            # Click a pixel: the features at that token.
            page.locator("#image img").click(position={"x": 60, "y": 60})
            expect(page.locator('#at_pixel [role=row][aria-rowindex="2"]')).to_be_visible(timeout=30_000)
            # Search for a word; the first match is the feature that detects it best; pick it.
            page.locator("#search textarea").fill("red")
            page.locator("#search textarea").press("Enter")
            match = page.locator('#found [role=row][aria-rowindex="2"] [role=gridcell]')
            expect(match.nth(1)).to_contain_text("red", timeout=30_000)
            found = match.nth(0).inner_text().strip()
            match.first.click()
            expect(page.locator("#feature_panel")).to_contain_text(f"Feature {found}", timeout=30_000)
            expect(page.locator("#feature_panel")).to_contain_text("of where it fires", timeout=30_000)
            found_label = label_of(_labels(), int(found))[0]
            page.get_by_role("tab", name="By features (image stream)").click()
            # Add it to the steering list; its own slider, at 10.
            expect(page.locator("#steer_add textarea")).to_have_value(found)
            page.locator("#steer_add_button").click()
            expect(page.locator("#strength_0")).to_contain_text(f"{found} · {found_label}", timeout=30_000)
            expect(page.locator("#strength_1")).to_be_hidden()
            page.locator("#strength_0 input[type=number]").fill("10")
            page.locator("#strength_0 input[type=number]").press("Tab")
            # Paint a stroke over the top-left of the image in the region editor.
            page.locator("#region").scroll_into_view_if_needed()
            page.locator('#region button[aria-label="Brush"]').first.click()
            box = page.locator("#region canvas").first.bounding_box()
            # The image sits in the middle of the editor: a stroke over its top-left quarter.
            x0, y0 = box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5
            page.mouse.move(x0 - box["height"] * 0.3, y0 - box["height"] * 0.3)
            page.mouse.down()
            for i in range(1, 11):
                page.mouse.move(x0 - box["height"] * (0.3 - 0.025 * i), y0 - box["height"] * 0.25)
            page.mouse.up()
            page.locator("#steer").click()
            stats = page.locator("#steer_stats")
            expect(stats).to_contain_text("painted region", timeout=60_000)
            expect(stats).to_contain_text(f"{found} ({found_label}) +10")
            expect(stats).to_contain_text("image MSE")
            expect(page.locator("#steered img[src]")).to_be_visible()
            page.locator("#steered").scroll_into_view_if_needed()
            scroll_y = page.evaluate("window.scrollY")
            steered_box = page.locator("#steered img").bounding_box()
            label_box = page.locator("#strength_0").bounding_box()
            page.screenshot(path=tmp_path / "app.png", full_page=True)
        finally:
            browser.close()
    shot = np.asarray(Image.open(tmp_path / "app.png").convert("RGB")).astype(int)
    steered = _crop(shot, steered_box, scroll_y)
    assert steered.size and steered.std() > 20  # a picture, not a blank or flat panel
    assert len({tuple(p) for p in steered.reshape(-1, 3)[::7]}) > 20
    label = _crop(shot, label_box, scroll_y)  # the slider row with the feature's label is on the shot
    assert label.size and (label.min(-1) < 100).mean() > 0.005  # dark text on the light row


def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"], headless=True)


def test_the_page_keeps_what_it_shows_when_a_request_fails_and_steers_by_words(shapes_app):
    """In the browser: the site list says where the dictionaries are; moving the opacity with the default
    feature redraws the top one; a clicked row's feature is named in the statistics; a failed request
    says why beside its control and leaves the image and table in place; steering by words shows the two
    images and what the reader sees in each."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("FLUXSAE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (FLUXSAE_REQUIRE_BROWSER=1).")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = _browser(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(shapes_app[0])
            expect(page.locator("#site input")).to_have_value(f"{SITE} (SAE, ITDA)", timeout=30_000)
            page.locator("#prompt textarea").fill("a large red circle at the center on a white background")
            page.locator("#generate").click()
            expect(page.locator("#stats")).to_contain_text("FVU on this image", timeout=60_000)
            first_row = page.locator('#top_features [role=row][aria-rowindex="2"] [role=gridcell]')
            top = first_row.first.inner_text().strip()
            page.locator("#opacity input[type=number]").fill("0.9")
            page.locator("#opacity input[type=number]").press("Enter")
            page.locator("#opacity input[type=range]").dispatch_event("mouseup")  # the slider's release
            expect(page.locator("#feature_panel")).to_contain_text(f"Feature {top}", timeout=30_000)
            expect(page.locator("#feature_message")).not_to_contain_text("⚠")
            cell = page.locator('#top_features [role=row][aria-rowindex="4"] [role=gridcell]').first
            picked = cell.inner_text().strip()
            cell.click()
            expect(page.locator("#stats")).to_contain_text(f"feature {picked} on steps", timeout=30_000)
            page.locator("#seed input").fill("")
            page.locator("#generate").click()
            expect(page.locator("#generate_message")).to_contain_text("seed", timeout=30_000)
            expect(page.locator("#image img[src]")).to_be_visible()
            expect(page.locator('#top_features [role=row][aria-rowindex="2"]')).to_be_visible()
            expect(page.locator("#stats")).to_contain_text(f"feature {picked} on steps")
            page.locator("#seed input").fill("0")
            page.get_by_role("tab", name="By words (text stream)").click()
            page.locator("#swap_out textarea").fill("red")
            page.locator("#swap_in textarea").fill("blue")
            page.locator("#swap").click()
            expect(page.locator("#swap_steered_reads")).to_contain_text("blue circle", timeout=60_000)
            expect(page.locator("#swap_original_reads")).to_contain_text("red circle")
            expect(page.locator("#swap_stats")).to_contain_text("clamped to 0")
            page.locator("#swap_out textarea").fill("teal")
            page.locator("#swap").click()
            expect(page.locator("#swap_message")).to_contain_text("does not know 'teal'", timeout=30_000)
            expect(page.locator("#swap_steered img[src]")).to_be_visible()
        finally:
            browser.close()


def _own(tmp_path, image, name="own.png"):
    from gradio_client import handle_file

    path = tmp_path / name
    if isinstance(image, bytes):
        path.write_bytes(image)
    else:
        image.save(path)
    return {"background": handle_file(path), "layers": [], "composite": handle_file(path)}


def _analyse(client, image, prompt, noise=0.5, first=0, last=7):
    args = (image, prompt, noise, 0, SITE, "SAE", first, last, -1, 0.5, SHARE, views.ALL)
    return client.predict(*args, api_name="/analyse_image")


def test_your_own_image_is_read_by_every_view_and_edited_by_words(shapes_app, tmp_path):
    """A rendered scene the model never generated, uploaded as a palette image of another size: the
    library's img2img pass gives the app's features; the pixel view and re-ranking work on it; an edit
    by words turns its colour and keeps the rest."""
    from fluxsae.feature_stats import load_feature_stats
    from fluxsae.own_image import analyse_image

    url, pipe = shapes_app
    client = _client(url)
    scene = shapes.Scene(shapes.sample_scenes(3, seed=8, n_objects=1)[1].objects, "white")
    prompt = shapes.caption(scene)
    upload = shapes.render(scene).resize((200, 200), 0).convert("P")
    out = _analyse(client, _own(tmp_path, upload), prompt)
    assert "from 200x200 to the model's 64x64" in out[8] and "steps 4-7" in out[8] and "steps 4-7" in out[2]
    analysis = analyse_image(pipe, upload, prompt, 0.5, [SITE], **app.generation_defaults("shapes", pipe))
    sae = fluxsae.load_sae("shapes", site=SITE)
    stats = load_feature_stats("shapes", site=SITE, kind="sae")
    expected = fluxsae.features.top_features(sae, analysis.acts[SITE], stats, n=1)[0].feature
    assert out[3]["data"][0][0] == expected and analysis.acts.steps == [4, 5, 6, 7]
    rows, _ = client.predict(SITE, "SAE", 4, 7, 200, 200, api_name="/features_at")
    assert rows["data"]
    with pytest.raises(Exception, match="denoised on steps 4-7 only"):
        client.predict(SITE, "SAE", 0, 3, SHARE, api_name="/top_features")
    color = scene.objects[0].color
    new = "blue" if color != "blue" else "green"
    edited = client.predict(_own(tmp_path, upload), prompt, 0, 0.5, color, new, "", 0.6, "", SITE, None,
                            api_name="/edit_image")  # fmt: skip
    assert color in edited[4] and color in edited[5] and f"{new} {scene.objects[0].shape}" in edited[6]


def test_two_prompts_show_what_differs_and_a_steers_towards_b(shapes_app):
    from fluxsae.features import diff

    url, pipe = shapes_app
    client = _client(url)
    a = "a large red circle at the center on a white background"
    b = a.replace("red", "blue")
    image_a, image_b, heat_a, heat_b, table, stats = client.predict(a, b, 0, SITE, "SAE", 0, 7, 0.5,
                                                                    api_name="/diff_prompts")  # fmt: skip
    sae = fluxsae.load_sae("shapes", site=SITE)
    acts = []
    for prompt in (a, b):
        with fluxsae.capture(pipe, [SITE]) as captured:
            _library_image(pipe, prompt, 0)
        acts.append(captured[SITE])
    expected = diff(sae, *acts, 10)
    assert [r[0] for r in table["data"]] == [d.feature for d in expected]
    assert table["data"][0][5] == pytest.approx(expected[0].change, abs=1e-3) and "changes most" in stats
    assert not np.array_equal(_pixels(heat_a), _pixels(heat_b))
    _, steered, said, reads_a, reads_b = client.predict(a, b, 0, 0.6, api_name="/steer_towards")
    assert "**red** clamped to 0" in said and "**blue** added" in said
    assert "red circle" in reads_a and "blue circle" in reads_b


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda tmp: _own(tmp, b"this is not an image", "text.png"), "not an image"),
        (lambda tmp: _own(tmp, b"", "empty.png"), "not an image"),
        (lambda tmp: None, "Upload or draw an image first"),
    ],
)  # fmt: skip
def test_bad_uploads_are_said_beside_the_control_and_change_nothing(shapes_app, tmp_path, make, match):
    from gradio_client.exceptions import AppError

    url, pipe = shapes_app
    client = _client(url)
    before = _generate(client, seed=4)
    with pytest.raises(AppError, match=match):
        _analyse(client, make(tmp_path), "a red circle")
    after = _generate(client, seed=4)
    assert np.array_equal(_pixels(before[0]), _pixels(after[0])) and _hooks(pipe) == 0


def test_own_image_inputs_are_checked_before_anything_runs():
    from PIL import Image

    from fluxsae.own_image import check_noise, prepare_image

    for bad in (0, -0.1, 1.5, "nan", "abc", None):
        with pytest.raises(ValueError, match=r"noise level must be a number in \(0, 1\]"):
            check_noise(bad)
    assert check_noise("1") == 1.0
    with pytest.raises(ValueError, match="largest taken"):
        prepare_image(Image.new("L", (20_000, 20_000)), (64, 64))  # refused from its size, not decoded
    with pytest.raises(ValueError, match="empty"):
        prepare_image(Image.new("RGB", (0, 10)), (64, 64))
    grey, note = prepare_image(Image.new("L", (64, 64), 128), (64, 64))
    assert grey.mode == "RGB" and grey.getpixel((3, 3)) == (128, 128, 128) and "from L to RGB" in note
    clear = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    flat, note = prepare_image(clear, (64, 64))
    assert flat.getpixel((10, 10)) == (255, 255, 255) and "transparency laid on white" in note
    assert "32x32" in note
