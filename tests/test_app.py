"""The Gradio app on the tiny pipeline: `run`, the fallbacks, then the real UI in headless Chromium.
The app on the Shapes model with its dictionaries and labels: tests/test_app_shapes.py."""

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
    assert image.size == (32, 32) and "mean token norm" in stats and "4x4 grid" in stats
    shown = app.to_display(image)
    assert shown.size == (384, 384)  # 12x with NEAREST: each source pixel a flat 12 px square
    assert len({tuple(p) for p in np.asarray(shown)[12:24, 12:24].reshape(-1, 3)}) == 1
    # The norms' map is drawn at the display size, with a colour bar beside it (its scale).
    assert heat.size[1] == 384 and heat.size[0] > 384 and app.to_display(heat).size == heat.size

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
                expect(page.locator("#generate_message")).to_contain_text("boom inside the transformer")
            finally:
                handle.remove()
            expect(page.locator("#image img[src]")).to_be_visible()  # what was shown stays
            page.locator("#seed input").fill("-5")
            page.locator("#generate").click()
            expect(page.locator("#generate_message")).to_contain_text("whole number from 0")
            page.locator("#seed input").fill("3")

            page.locator("#site input").click()
            page.get_by_role("option", name="single_transformer_blocks.1.image").click()
            page.locator("#generate").click()
            expect(page.locator("#stats")).to_contain_text(
                "single_transformer_blocks.1.image", timeout=60_000
            )
            expect(page.locator("#stats")).to_contain_text("seed 3")
            expect(page.locator("#heatmap img[src]")).to_be_visible()
            expect(page.locator("#generate_message")).not_to_contain_text("⚠")  # cleared by the success
            page.screenshot(path=tmp_path / "app.png", full_page=True)
        finally:
            browser.close()


def test_zero_gpu_is_none_without_the_spaces_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # `import spaces` raises ImportError
    assert app.zero_gpu() is None
