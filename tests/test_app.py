"""The Gradio app: `run` on the tiny pipeline, then the real UI in headless Chromium."""

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # app.py lives at the repo root

import app  # noqa: E402
from fluxsae.tiny import TINY_GENERATION  # noqa: E402

# Two steps instead of four: same code paths, half the CPU time.
FAST = {**TINY_GENERATION, "num_inference_steps": 2}
IMAGE_SITE, TEXT_SITE = "transformer_blocks.1.image", "single_transformer_blocks.0.text"
CHROMIUM = "/usr/bin/chromium"


def _hooks(pipe) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pipe.transformer.modules())


def test_run_returns_image_overlay_and_stats(shared_tiny_pipe):
    image, heat, stats = app.run(shared_tiny_pipe, "a red circle", 0, IMAGE_SITE, 1, FAST)
    assert image.size == (32, 32) and heat.size == (32, 32)
    assert "mean token norm" in stats and "4x4 grid" in stats
    shown = app.to_display(heat)
    assert shown.size == (384, 384)  # 12x with NEAREST: each source pixel a flat 12 px square
    assert len({tuple(p) for p in np.asarray(shown)[12:24, 12:24].reshape(-1, 3)}) == 1

    # Empty prompt, an over-long prompt and a text-stream site all generate.
    image2, heat2, stats2 = app.run(shared_tiny_pipe, "", 3, TEXT_SITE, 0, FAST)
    assert image2.size == (32, 32) and heat2 is None
    assert "12 text tokens" in stats2 and "no position on the image" in stats2
    image3, _, _ = app.run(shared_tiny_pipe, "red circle " * 5000, 3, IMAGE_SITE, -1, FAST)
    assert image3.size == (32, 32)
    assert _hooks(shared_tiny_pipe) == 0


@pytest.mark.parametrize(
    "seed, match",
    [(-1, "whole number"), (1.5, "whole number"), (2**40, "whole number"), ("abc", "whole number"),
     (None, "whole number"), (float("nan"), "whole number")],
)  # fmt: skip
def test_bad_seed_is_a_clear_error_before_any_generation(shared_tiny_pipe, seed, match):
    with pytest.raises(ValueError, match=match):
        app.run(shared_tiny_pipe, "a red circle", seed, IMAGE_SITE, 0, FAST)


def test_bad_site_and_step_are_clear_errors(shared_tiny_pipe):
    with pytest.raises(ValueError, match="out of range"):
        app.run(shared_tiny_pipe, "x", 0, "transformer_blocks.9.image", 0, FAST)
    with pytest.raises(ValueError, match="step must be a whole number from 0 to 1"):
        app.run(shared_tiny_pipe, "x", 0, IMAGE_SITE, 2, FAST)


def test_failure_inside_generation_leaves_the_pipeline_unchanged(tiny_pipe):
    before = app.run(tiny_pipe, "a blue square", 7, IMAGE_SITE, 1, FAST)

    def explode(module, args, output):
        raise RuntimeError("boom inside the transformer")

    handle = tiny_pipe.transformer.single_transformer_blocks[0].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            app.run(tiny_pipe, "a blue square", 7, IMAGE_SITE, 1, FAST)
    finally:
        handle.remove()
    assert _hooks(tiny_pipe) == 0  # capture's hooks went with the exception

    after = app.run(tiny_pipe, "a blue square", 7, IMAGE_SITE, 1, FAST)
    assert np.array_equal(np.asarray(before[0]), np.asarray(after[0]))
    assert np.array_equal(np.asarray(before[1]), np.asarray(after[1]))


def _bare_pipeline(transformer=None, vae=None):
    """A real FluxPipeline holding only what generation_defaults / token_grid / default_site read."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=transformer,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )  # fmt: skip


def test_generation_defaults_per_model(shared_tiny_pipe):
    from diffusers import AutoencoderKL

    from fluxsae.flux import SCHNELL_GENERATION, meta_transformer
    from fluxsae.heatmap import token_grid
    from fluxsae.pipelines import shapes_model_dir
    from fluxsae.shapes import TOKEN_GRID
    from fluxsae.sites import resolve_site

    # The tiny pipeline: the arguments it is built for, and they generate its 4x4 token grid.
    tiny = app.generation_defaults("tiny", shared_tiny_pipe)
    assert tiny == TINY_GENERATION
    assert token_grid(shared_tiny_pipe, tiny["height"], tiny["width"]) == (4, 4)
    # The Shapes model: the settings its packaged dictionaries were harvested at, and the world's
    # 8x8 token grid through the packaged VAE.
    shapes = app.generation_defaults("shapes", shared_tiny_pipe)
    for folder in sorted((shapes_model_dir().parent / "dictionaries").glob("*/*/cfg.json")):
        cfg = json.loads(folder.read_text())
        assert cfg["resolution"] == [shapes["height"], shapes["width"]], folder
        assert cfg["steps"] == list(range(shapes["num_inference_steps"])), folder
        assert cfg["extra"].get("generation", shapes) == shapes, folder
    vae = AutoencoderKL.from_pretrained(shapes_model_dir() / "vae")
    assert token_grid(_bare_pipeline(vae=vae), shapes["height"], shapes["width"]) == (TOKEN_GRID, TOKEN_GRID)
    # FLUX.1-schnell: the one setting the harvest and the benchmarks also use (so app heatmaps see the
    # stream the dictionaries were trained on); FLUX.1-dev, guidance-distilled, gets its guidance.
    schnell = _bare_pipeline(meta_transformer("black-forest-labs/FLUX.1-schnell"))
    dev = _bare_pipeline(meta_transformer("black-forest-labs/FLUX.1-dev"))
    assert app.generation_defaults("black-forest-labs/FLUX.1-schnell", schnell) == SCHNELL_GENERATION
    dev_defaults = app.generation_defaults("black-forest-labs/FLUX.1-dev", dev)
    assert dev_defaults["guidance_scale"] > 1 and SCHNELL_GENERATION["guidance_scale"] == 0
    assert dev_defaults["num_inference_steps"] > SCHNELL_GENERATION["num_inference_steps"]
    for pipe, defaults in ((schnell, SCHNELL_GENERATION), (dev, dev_defaults)):
        token_grid(pipe, defaults["height"], defaults["width"])  # whole tokens, or it raises
    # The default site is the last double block's image stream: transformer_blocks.18 on FLUX.1.
    for pipe in (shared_tiny_pipe, schnell):
        _, block = resolve_site(pipe, app.default_site(pipe))
        assert block is pipe.transformer.transformer_blocks[-1] and app.default_site(pipe).endswith(".image")
    assert app.default_site(schnell) == "transformer_blocks.18.image"


@pytest.mark.parametrize("broken", ["missing", "truncated weights"])
def test_missing_shapes_model_falls_back_to_the_tiny_pipeline(monkeypatch, caplog, tmp_path, broken):
    """A real folder stands in for the packaged model: an empty one, or one with torn weights."""
    import fluxsae.pipelines as pipelines
    from fluxsae.tiny import tiny_flux_pipeline

    folder = tmp_path / "model"
    folder.mkdir()
    if broken == "truncated weights":
        tiny_flux_pipeline(seed=0).save_pretrained(folder)
        weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    monkeypatch.setattr(pipelines, "shapes_model_dir", lambda: folder)  # where the package looks
    pipe, name, note = app.load_app_pipeline("shapes")
    assert name == "tiny" and "not installed" in note
    assert ("is missing from" if broken == "missing" else "Unreadable weight files") in caplog.text
    image, _, _ = app.run(pipe, "a red circle", 0, app.default_site(pipe), 0, FAST)  # it is usable
    assert image.size == (32, 32)
    with pytest.raises(app.PipelineLoadError):
        app.load_app_pipeline("someone/not-there")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served_app(tiny_pipe):
    """The app on the tiny pipeline, served on a free localhost port; yields its URL."""
    demo = app.build_demo(tiny_pipe, "tiny", note=app.FALLBACK_NOTE, defaults=FAST)
    port = _free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.mark.browser
def test_app_in_a_real_browser(served_app, tiny_pipe, tmp_path):
    if not Path(CHROMIUM).exists():
        if os.environ.get("FLUXSAE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (FLUXSAE_REQUIRE_BROWSER=1).")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(served_app)
            expect(page.locator("#note")).to_contain_text("not installed")
            page.locator("#prompt textarea").fill("a red circle")
            page.locator("#generate").click()
            expect(page.locator("#stats")).to_contain_text("mean token norm", timeout=60_000)
            expect(page.locator("#stats")).to_contain_text("transformer_blocks.1.image")
            expect(page.locator("#image img[src]")).to_be_visible()
            expect(page.locator("#heatmap img[src]")).to_be_visible()

            # A failure inside generation shows an error, and the next request works.
            def explode(module, args, output):
                raise RuntimeError("boom inside the transformer")

            handle = tiny_pipe.transformer.single_transformer_blocks[0].register_forward_hook(explode)
            try:
                page.locator("#generate").click()
                expect(page.locator(".toast-body").first).to_contain_text("boom inside the transformer")
            finally:
                handle.remove()
            page.locator("#seed input").fill("-5")
            page.locator("#generate").click()
            expect(page.locator(".toast-body").first).to_contain_text("whole number from 0")
            page.locator("#seed input").fill("3")

            page.locator("#site input").click()
            page.get_by_role("option", name="single_transformer_blocks.1.image").click()
            page.locator("#generate").click()
            expect(page.locator("#stats")).to_contain_text(
                "single_transformer_blocks.1.image", timeout=60_000
            )
            expect(page.locator("#stats")).to_contain_text("seed 3")
            expect(page.locator("#heatmap img[src]")).to_be_visible()
            page.locator(".toast-close").first.click()  # dismiss the error toasts before the screenshot
            expect(page.locator(".toast-body")).to_have_count(0)
            page.screenshot(path=tmp_path / "app.png", full_page=True)
        finally:
            browser.close()


SITE = "transformer_blocks.3.image"


@pytest.fixture(scope="module")
def shapes_app():
    """The app on the packaged Shapes model with its SAEs, ITDAs and labels; yields (URL, pipeline)."""
    import fluxsae

    pipe = fluxsae.load_pipeline("shapes")
    demo = app.build_demo(pipe, "shapes")
    port = _free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", pipe
    finally:
        demo.close()


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def _pixels(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _generate(client, prompt="a red circle at the top left", seed=0, method="SAE", feature=-1):
    return client.predict(prompt, seed, SITE, method, 0, 7, feature, 0.55, api_name="/generate")


def _steer(client, features="red", strength=5, seed=0, mode="add", first=0, last=4, prompt="a blue square"):
    return client.predict(
        prompt, seed, SITE, "SAE", features, strength, mode, first, last, None, api_name="/steer"
    )


def test_every_action_is_one_named_endpoint_with_labelled_results(shapes_app):
    url, pipe = shapes_app
    client = _client(url)
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert sorted(api) == sorted(
        ["/generate", "/check_prompt", "/show_feature", "/features_at", "/search", "/steer"]
    )
    for info in api.values():
        assert all(r["label"] for r in info["returns"]), info
    image, heat, stats, table, panel, profile, gallery, words, region = _generate(client)
    assert _pixels(image).shape == (384, 384, 3) and _pixels(heat).shape[0] >= 384  # heatmap + colour bar
    assert "FVU on this image" in stats and " ms" in stats
    rows = table["data"]
    assert len(rows) == 10 and all(r[1] for r in rows)  # every top feature has a label
    assert f"Feature {rows[0][0]}" in panel and "density" in panel and gallery
    # Another feature of the table: its own heatmap, on the same fixed scale machinery.
    heat2, panel2, _, _ = client.predict(SITE, "SAE", 0, 7, rows[3][0], 0.8, api_name="/show_feature")
    assert f"Feature {rows[3][0]}" in panel2 and not np.array_equal(_pixels(heat), _pixels(heat2))
    at = client.predict(SITE, "SAE", 0, 7, 40, 40, api_name="/features_at")["data"]
    assert at and all(len(r) == 4 for r in at)
    found = client.predict("red circle", SITE, "SAE", api_name="/search")["data"]
    assert found and all("red circle" in r[1] for r in found)
    # ITDA at the other packaged site.
    out = client.predict("a red circle", 0, "single_transformer_blocks.2.image", "ITDA", 0, 7, -1, 0.5,
                         api_name="/generate")  # fmt: skip
    assert "ITDA" in out[2] and out[3]["data"]
    note = client.predict("a red circle in the top left", api_name="/check_prompt")
    assert "`in`" in note and "does not know" in note
    original, steered, steer_stats = _steer(client)
    assert not np.array_equal(_pixels(original), _pixels(steered)) and "mean pixel change" in steer_stats
    assert _hooks(pipe) == 0


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
    args = ("a blue square", 0, SITE, "SAE", "red", 20, "add", 0, 4)
    original, steered, stats = client.predict(*args, region, api_name="/steer")
    assert "painted region" in stats
    change = np.abs(_pixels(original).astype(int) - _pixels(steered).astype(int)).sum(-1)
    assert change[:192, :192].mean() > change[192:, 192:].mean()
    blank = np.zeros((300, 170, 4), np.uint8)  # nothing painted: steer everywhere
    Image.fromarray(blank).save(tmp_path / "blank.png")
    region["layers"] = [handle_file(tmp_path / "blank.png")]
    assert "painted region" not in client.predict(*args, region, api_name="/steer")[2]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda c: _generate(c, seed="NaN"), "whole number"),
        (lambda c: _generate(c, seed="abc"), "whole number"),
        (lambda c: _generate(c, feature=10**6), "feature must be"),
        (lambda c: _generate(c, method="MLP"), "not in the list of choices"),
        (lambda c: c.predict("", 0, "transformer_blocks.9.image", "SAE", 0, 7, -1, 0.5, api_name="/generate"),
         "not in the list of choices"),
        (lambda c: _steer(c, strength=1e6), "strength must be"),
        (lambda c: _steer(c, strength="NaN"), "strength must be"),
        (lambda c: _steer(c, strength="abc"), "strength must be"),
        (lambda c: _steer(c, features="99999"), "no feature 99999"),
        (lambda c: _steer(c, features="zzz unknown"), "No feature's label"),
        (lambda c: _steer(c, features=""), "at least one feature"),
        (lambda c: _steer(c, first=5, last=2), "after the last step"),
        (lambda c: _steer(c, mode="multiply"), "not in the list of choices"),
        (lambda c: c.predict(SITE, "SAE", 0, 7, 0, 0.5, api_name="/show_feature"), "Generate an image first"),
    ],
)  # fmt: skip
def test_bad_input_is_a_clear_error_and_the_next_request_is_unchanged(shapes_app, call, match):
    from gradio_client.exceptions import AppError

    client = _client(shapes_app[0])
    with pytest.raises(AppError, match=match):
        call(client)
    assert _hooks(shapes_app[1]) == 0


def test_odd_prompts_generate_and_leave_the_pipeline_unchanged(shapes_app):
    client = _client(shapes_app[0])
    before = _steer(client, strength="5")  # a number as a string is fine
    for prompt in ["", "red circle " * 1000, "ein roter Kreis ✨ 赤い円 \u202e"]:
        out = _generate(client, prompt=prompt)
        assert _pixels(out[0]).shape == (384, 384, 3)
    after = _steer(client, strength=5)
    assert np.array_equal(_pixels(before[0]), _pixels(after[0]))
    assert np.array_equal(_pixels(before[1]), _pixels(after[1]))


def test_concurrent_clients_each_get_their_solo_result(shapes_app):
    from concurrent.futures import ThreadPoolExecutor

    url = shapes_app[0]
    seeds = [1, 2, 3]
    solo = {s: _pixels(_steer(_client(url), seed=s, strength=8)[1]) for s in seeds}
    clients = [_client(url) for _ in seeds]
    with ThreadPoolExecutor(len(seeds)) as pool:
        results = list(
            pool.map(lambda cs: _steer(cs[0], seed=cs[1], strength=8), zip(clients, seeds, strict=True))
        )
    for s, r in zip(seeds, results, strict=True):
        assert np.array_equal(_pixels(r[1]), solo[s]), s


@pytest.mark.browser
def test_features_and_steering_in_a_real_browser(shapes_app, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
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
            expect(page.locator("#stats")).to_contain_text("FVU on this image", timeout=30_000)
            expect(page.locator("#heatmap img[src]")).to_be_visible()
            # Pick the third feature of the table: the panel shows it.
            cell = page.locator('#top_features [role=row][aria-rowindex="4"] [role=gridcell]').first
            picked = cell.inner_text().strip()
            cell.click()
            expect(page.locator("#feature_panel")).to_contain_text(f"Feature {picked}", timeout=30_000)
            # Click a pixel: the features at that token.
            page.locator("#image img").click(position={"x": 60, "y": 60})
            expect(page.locator('#at_pixel [role=row][aria-rowindex="2"]')).to_be_visible(timeout=30_000)
            page.locator("#steer_features textarea").fill(picked)
            page.locator("#strength input[type=number]").fill("10")
            page.locator("#strength input[type=number]").press("Tab")
            page.locator("#steer").click()
            expect(page.locator("#steer_stats")).to_contain_text(f"add 10 on {picked}", timeout=30_000)
            expect(page.locator("#steered img[src]")).to_be_visible()
            page.screenshot(path=tmp_path / "app.png", full_page=True)
        finally:
            browser.close()
