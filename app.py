"""fluxsae app: generate an image with a Flux pipeline, see which dictionary features (SAE / ITDA) fire
where, and steer them. Layout and wiring only: the handlers are in app_actions.py, what they show is
drawn by app_views.py, and both call the `fluxsae` library.

    python app.py                                   # the packaged Shapes model (CPU)
    python app.py --model tiny                      # a random tiny pipeline, for trying the UI
    python app.py --model black-forest-labs/FLUX.1-schnell --quantize nf4 --dictionaries <hub id>

The model also comes from the environment variable FLUXSAE_MODEL. Everything a request does runs
inside `fluxsae.capture` / `steer` / `splice` (hooks removed in `finally`) under one lock, so a failed
or concurrent request never leaves the shared pipeline changed.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections.abc import Mapping
from types import SimpleNamespace

# Before gradio is imported: no analytics or version pings (the app must work offline).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import app_panels as panels  # noqa: E402
import app_views as views  # noqa: E402
import fluxsae  # noqa: E402
from app_actions import make_actions  # noqa: E402
from app_images import make_image_actions  # noqa: E402
from app_words import make_word_actions  # noqa: E402
from fluxsae import shapes  # noqa: E402
from fluxsae.heatmap import activation_norms, feature_overlay, token_grid, token_map  # noqa: E402
from fluxsae.own_image import DEFAULT_NOISE  # noqa: E402
from fluxsae.pipelines import SHAPES, TINY, PipelineLoadError, generation_defaults  # noqa: E402
from fluxsae.sites import parse_site  # noqa: E402
from fluxsae.tiny import tiny_flux_pipeline  # noqa: E402

logger = logging.getLogger("fluxsae.app")

DISPLAY_PX = 384
"""Small images are enlarged (NEAREST, whole-number factor) to about this size for display."""
MAX_SEED = views.MAX_SEED
MAX_PROMPT_CHARS = 2000
"""Longer prompts are cut here before tokenising (the tokenizers truncate to far fewer tokens anyway)."""
PACKAGED_SITES = ("transformer_blocks.3.image", "single_transformer_blocks.2.image")
GPU_SECONDS = 120
"""ZeroGPU's time limit for one call that runs the pipeline."""
FALLBACK_NOTE = (
    "The packaged Shapes model is not installed; showing a random tiny pipeline "
    "(its images are noise: use it to try the interface)."
)


def load_app_pipeline(name: str, quantize: str | None = None) -> tuple[object, str, str | None]:
    """(pipeline, the model name it really is, a note for the UI or None).

    "shapes" falls back to the tiny random pipeline when the packaged model is missing.
    """
    if name == TINY:
        return tiny_flux_pipeline(), TINY, None
    try:
        return fluxsae.load_pipeline(name, quantize=quantize), name, None
    except PipelineLoadError as e:
        if name != SHAPES:
            raise
        logger.warning("%s Falling back to a random tiny pipeline.", e)
        return tiny_flux_pipeline(), TINY, FALLBACK_NOTE


def default_site(pipe) -> str:
    """The last double block's image stream (the reference work's main site is a late double block)."""
    n = len(pipe.transformer.transformer_blocks)
    return f"transformer_blocks.{n - 1}.image"


def check_seed(seed) -> int:
    """An integer seed in 0..MAX_SEED (a number or a numeric string), or a ValueError that says what was
    wrong."""
    return views.check_number(seed, "seed", 0, MAX_SEED, whole=True)


def _check_step(step, n_steps: int) -> int:
    try:
        value = float(step)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value) or value != int(value) or not -n_steps <= value < n_steps:
        raise ValueError(f"The step must be a whole number from 0 to {n_steps - 1}, got {step!r}.")
    return int(value) % n_steps


def run(pipe, prompt, seed, site, step, defaults: Mapping) -> tuple[Image.Image, Image.Image | None, str]:
    """Generate one image and map the per-token activation norm at `site` on denoising `step`.

    Returns (image at the generated size, heatmap overlay of the same size or None for a text-stream
    site, statistics as Markdown). Invalid input raises ValueError with a message for the user.
    """
    prompt = "" if prompt is None else prompt
    if not isinstance(prompt, str):
        raise ValueError(f"The prompt must be text, got {type(prompt).__name__}.")
    prompt = prompt[:MAX_PROMPT_CHARS]
    seed = check_seed(seed)
    site = parse_site(site)
    n_steps = int(defaults["num_inference_steps"])
    step = _check_step(step, n_steps)

    generator = torch.Generator("cpu").manual_seed(seed)
    start = time.perf_counter()
    with fluxsae.capture(pipe, [site], steps=[step]) as acts:
        image = pipe(prompt, generator=generator, output_type="pil", **defaults).images[0]
    ms = (time.perf_counter() - start) * 1000
    norms = activation_norms(acts[site], step=0)  # only `step` was captured

    if site.stream == "image":
        width, height = image.size
        grid = token_grid(pipe, height, width)
        factor = max(1, DISPLAY_PX // max(image.size))  # drawn at display size, with its colour bar
        heat = feature_overlay(image, token_map(norms, grid), vmax=float(norms.max()),
                               display_size=(width * factor, height * factor))  # fmt: skip
        where = f"{norms.numel()} image tokens ({grid[0]}x{grid[1]} grid)"
        note = ""
    else:
        heat = None
        where = f"{norms.numel()} text tokens"
        note = f"\n\nText tokens have no position on the image, so `{site}` has no heatmap."
    stats = (
        f"**mean token norm** {norms.mean():.3g} · min {norms.min():.3g} · max {norms.max():.3g} "
        f"over {where} at `{site}`, step {step} of 0-{n_steps - 1} · seed {seed} · "
        f"generated in {ms:.0f} ms{note}"
    )
    return image, heat, stats


def to_display(image: Image.Image | None, px: int = DISPLAY_PX) -> Image.Image | None:
    """Enlarge small images by a whole factor with NEAREST, so each token stays a crisp square."""
    return None if image is None else views.enlarged(image, px)


def zero_gpu():
    """`spaces.GPU(duration=GPU_SECONDS)` on a ZeroGPU Space (the `spaces` package importable), else None."""
    try:
        import spaces  # ZeroGPU: imported before any CUDA work, as it requires
    except ImportError:
        return None
    return spaces.GPU(duration=GPU_SECONDS)


def build_demo(
    pipe,
    name: str,
    note: str | None = None,
    defaults: Mapping | None = None,
    dictionaries: str | None = None,
    labels: str | None = None,
) -> gr.Blocks:
    """The Gradio Blocks for `pipe` (model `name`); `note` is shown under the title. `dictionaries` /
    `labels`: a release ("shapes", a folder, a Hub id) with SAEs / ITDAs and their labels (default:
    the packaged ones for the Shapes model, none otherwise). On a ZeroGPU Space every request that
    runs the pipeline does so under `spaces.GPU` (`zero_gpu`)."""
    defaults = dict(defaults or generation_defaults(name, pipe))
    n_steps = int(defaults["num_inference_steps"])
    sites = [str(s) for s in fluxsae.all_sites(pipe)]
    release = views.Dictionaries(dictionaries or (SHAPES if name == SHAPES else None), labels)
    vocabulary = shapes.vocabulary() if name == SHAPES else []
    first_site = next((s for s in PACKAGED_SITES if s in sites and release.get(s, "SAE")), default_site(pipe))
    actions = make_actions(
        pipe, defaults, release, sites, vocabulary, norms=lambda *args: run(*args), check_seed=check_seed,
        to_display=to_display, display_px=DISPLAY_PX, max_prompt_chars=MAX_PROMPT_CHARS, gpu=zero_gpu(),
    )  # fmt: skip
    words = make_word_actions(pipe, defaults, release, vocabulary, actions)
    images = make_image_actions(pipe, defaults, release, actions, words)
    examples = ["a red circle"]
    if vocabulary:
        examples = [shapes.caption(s) for s in shapes.sample_scenes(6, seed=0)]
    have = release.sites_with()
    site_choices = [(f"{s} ({', '.join(have[s])})" if s in have else s, s) for s in sites]
    ui = SimpleNamespace(n_steps=n_steps, last_step=max(n_steps - 1, 1))
    # Uploads and outputs leave the server cache after 10 minutes: an upload is never kept for others.
    with gr.Blocks(title="fluxsae", analytics_enabled=False, delete_cache=(600, 600)) as demo:
        gr.Markdown(
            f"# fluxsae\nGenerate an image with `{name}`, see which dictionary features (SAE or ITDA) or MLP "
            "neurons fire where, and steer them. At sites without a dictionary the map shows the residual "
            "stream's per-token L2 norm."
        )
        if note:
            gr.Markdown(f"**Note:** {note}", elem_id="note")
        ui.state = gr.State(None)
        panels.explore_panel(ui, actions, release, release.methods(), examples, site_choices, first_site)
        panels.feature_panel(ui)
        panels.own_image_panel(ui, DEFAULT_NOISE)
        panels.compare_panel(ui)
        panels.steer_panel(ui)
        _wire_explore(ui, actions)
        _wire_steering(ui, actions, words)
        _wire_images(ui, images, words)
    return demo


def _wire_explore(ui, actions) -> None:
    """Generate, re-rank, show a feature, read a pixel, search: page and API."""
    wire = panels.wire
    feature_outputs = [ui.heat, ui.panel, ui.profile, ui.gallery, ui.atom, ui.stats]
    generate_outputs = [ui.image, ui.heat, ui.stats, ui.table, ui.panel, ui.profile, ui.gallery, ui.atom,
                        ui.words, ui.state, ui.region]  # fmt: skip
    wire(ui.generate_triggers, actions.on_generate,
         [ui.prompt, ui.seed, *ui.view, ui.feature, ui.opacity, ui.rank, ui.show_only], generate_outputs,
         message=ui.generate_message, api_name="generate", concurrency_limit=4)  # fmt: skip
    ui.prompt.change(actions.vocabulary_note, [ui.prompt], [ui.words], api_name="check_prompt",
                     show_progress="hidden")  # fmt: skip
    rank_inputs = [ui.state, *ui.view, ui.rank, ui.show_only]
    wire([ui.rank.change], actions.on_rank, rank_inputs, [ui.table], message=ui.generate_message,
         api_name="top_features")  # fmt: skip
    wire([ui.show_only.change], actions.on_rank, rank_inputs, [ui.table], message=ui.generate_message)
    feature_inputs = [ui.state, *ui.view, ui.feature, ui.opacity]
    wire([ui.feature.submit, ui.opacity.release], actions.on_feature, feature_inputs, feature_outputs,
         message=ui.feature_message, api_name="show_feature")  # fmt: skip

    def pick(rows, evt: gr.SelectData):
        chosen = int(rows.iloc[evt.index[0], 0])
        return chosen, str(chosen)

    for source in (ui.table, ui.at, ui.found):
        source.select(pick, [source], [ui.feature, ui.add_box], api_name=False).then(
            panels.quiet(actions.on_feature, len(feature_outputs)), feature_inputs,
            [*feature_outputs, ui.feature_message], api_name=False,
        )  # fmt: skip

    def click(evt: gr.SelectData):
        return evt.index[0], evt.index[1]

    pixel_inputs = [ui.state, *ui.view, ui.px, ui.py]
    ui.image.select(click, None, [ui.px, ui.py], api_name=False).then(
        panels.quiet(actions.on_pixel, 2), pixel_inputs, [ui.at, ui.image, ui.pixel_message], api_name=False
    )
    gr.Button(visible=False).click(actions.on_pixel, pixel_inputs, [ui.at, ui.image], api_name="features_at")
    wire([ui.query.submit], actions.on_search, [ui.query, ui.site, ui.method], [ui.found],
         message=ui.search_message, api_name="search")  # fmt: skip
    gr.on([ui.site.change, ui.method.change], actions.show_choices, [ui.site, ui.method],
          [ui.show_only, ui.method], api_name=False)  # fmt: skip


def _wire_images(ui, images, words) -> None:
    """Your own image and two prompts: page and API."""
    wire = panels.wire
    explore = [ui.image, ui.heat, ui.stats, ui.table, ui.panel, ui.profile, ui.gallery, ui.atom, ui.words,
               ui.state, ui.region]  # fmt: skip
    wire([ui.analyse_button.click], images.on_analyse,
         [ui.own, ui.prompt, ui.noise, ui.seed, *ui.view, ui.feature, ui.opacity, ui.rank, ui.show_only],
         explore, message=ui.own_message, api_name="analyse_image", concurrency_limit=4)  # fmt: skip
    wire([ui.edit_button.click], images.on_edit,
         [ui.own, ui.prompt, ui.seed, ui.noise, ui.take_out, ui.put_in, ui.only_words, ui.word_strength,
          ui.own_features, ui.site, ui.region],
         [ui.own_original, ui.own_reconstruction, ui.own_edited, ui.own_stats, *ui.own_reads],
         message=ui.own_message, api_name="edit_image", concurrency_limit=4)  # fmt: skip
    wire([ui.compare_button.click], images.on_diff, [ui.prompt, ui.prompt_b, ui.seed, *ui.view, ui.opacity],
         [ui.diff_a, ui.diff_b, ui.diff_heat_a, ui.diff_heat_b, ui.diff_table, ui.diff_stats],
         message=ui.compare_message, api_name="diff_prompts", concurrency_limit=4)  # fmt: skip
    wire([ui.towards_button.click], words.on_towards, [ui.prompt, ui.prompt_b, ui.seed, ui.word_strength],
         [ui.diff_a, ui.towards_steered, ui.towards_stats, ui.diff_a_reads, ui.towards_reads],
         message=ui.compare_message, api_name="steer_towards", concurrency_limit=4)  # fmt: skip


def _wire_steering(ui, actions, words) -> None:
    """Steer by words and by features: page and API."""
    wire = panels.wire
    wire([ui.swap_button.click], words.on_swap,
         [ui.prompt, ui.seed, ui.take_out, ui.put_in, ui.only_words, ui.word_strength, ui.swap_first,
          ui.swap_last, ui.region],
         [ui.swap_original, ui.swap_steered, ui.swap_stats, ui.swap_original_reads, ui.swap_steered_reads],
         message=ui.swap_message, api_name="swap", concurrency_limit=4)  # fmt: skip
    slots = [ui.ids, *ui.rows, *ui.sliders]
    wire([ui.add_button.click, ui.add_box.submit], actions.on_add,
         [ui.add_box, ui.ids, ui.strength, ui.site, ui.method], [ui.ids, ui.add_box, *ui.rows, *ui.sliders],
         message=ui.add_message)  # fmt: skip
    for i, remove in enumerate(ui.removes):
        remove.click(actions.on_remove(i), [ui.ids, ui.site, ui.method, *ui.sliders], slots, api_name=False)
    gr.on([ui.site.change, ui.method.change], actions.on_clear, None, slots, api_name=False)
    steer_inputs = [ui.prompt, ui.seed, ui.site, ui.method, ui.features, ui.strength, ui.mode, ui.steer_first,
                    ui.steer_last, ui.region]  # fmt: skip
    steer_outputs = [ui.original, ui.steered, ui.spliced, ui.steer_stats]
    ui.steer_button.click(actions.compose, [ui.ids, *ui.sliders], [ui.features], api_name=False).then(
        panels.quiet(actions.on_steer, len(steer_outputs)), steer_inputs, [*steer_outputs, ui.steer_message],
        api_name=False, concurrency_limit=4,
    )  # fmt: skip
    gr.Button(visible=False).click(actions.on_steer, steer_inputs, steer_outputs, api_name="steer",
                                   concurrency_limit=4)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve the app. Host and port: --host/--port, else Gradio's own
    GRADIO_SERVER_NAME/GRADIO_SERVER_PORT (a Space sets GRADIO_SERVER_NAME=0.0.0.0), else 127.0.0.1 and the
    first free port from 7860. On a ZeroGPU Space (the `spaces` package importable) everything that runs
    the pipeline does so under `spaces.GPU`; elsewhere nothing changes."""
    global run
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=os.environ.get("FLUXSAE_MODEL", SHAPES),
        help="'shapes', 'tiny', a Hub id or a local pipeline folder (default: $FLUXSAE_MODEL or shapes)",
    )
    parser.add_argument("--quantize", choices=["nf4"], default=None, help="NF4 weights for FLUX.1")
    parser.add_argument(
        "--dictionaries",
        default=os.environ.get("FLUXSAE_DICTIONARIES"),
        help="SAE / ITDA release: 'shapes', a Hub id or a folder (default: $FLUXSAE_DICTIONARIES, else the "
        "packaged ones for the Shapes model)",
    )
    parser.add_argument(
        "--labels",
        default=os.environ.get("FLUXSAE_LABELS"),
        help="feature-label dataset: a Hub id or a folder (default: $FLUXSAE_LABELS, else the dictionaries')",
    )
    # No argparse defaults for host and port: they would hide Gradio's environment variables.
    parser.add_argument(
        "--port", type=int, default=None, help="default: $GRADIO_SERVER_PORT, else 7860 or the next free one"
    )
    parser.add_argument("--host", default=None, help="default: $GRADIO_SERVER_NAME, else 127.0.0.1")
    parser.add_argument("--share", action="store_true", help="make a public gradio.live link")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    host = args.host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    port, port_from = args.port, "--port"
    if port is None and os.environ.get("GRADIO_SERVER_PORT"):
        port_from = "GRADIO_SERVER_PORT"
        try:
            port = int(os.environ["GRADIO_SERVER_PORT"])
        except ValueError:
            raise SystemExit(
                f"GRADIO_SERVER_PORT={os.environ['GRADIO_SERVER_PORT']!r} is not a port number; set it to "
                "one (e.g. 7861) or pass --port."
            ) from None
    gpu = zero_gpu()  # before any CUDA work, as ZeroGPU requires
    try:
        pipe, name, note = load_app_pipeline(args.model, args.quantize)
    except PipelineLoadError as e:
        raise SystemExit(str(e)) from e
    if gpu is not None:
        # ZeroGPU attaches a GPU only inside spaces.GPU functions, run in a forked worker that receives
        # its arguments pickled: the pipeline is captured here (the fork inherits it), never passed.
        # (The feature and steering paths are wrapped the same way in build_demo, by make_actions.)
        cpu_run = getattr(run, "_fluxsae_cpu_run", run)

        @gpu
        def generate_on_gpu(prompt, seed, site, step, defaults):
            return cpu_run(pipe, prompt, seed, site, step, defaults)

        def run_via_gpu(_pipe, prompt, seed, site, step, defaults):
            return generate_on_gpu(prompt, seed, site, step, defaults)

        run_via_gpu._fluxsae_cpu_run = cpu_run
        run = run_via_gpu
        logger.info("ZeroGPU: generation runs under spaces.GPU")
    try:
        # Only what was asked for is passed on, so build_demo's own defaults stay the defaults.
        release = {k: v for k, v in (("dictionaries", args.dictionaries), ("labels", args.labels)) if v}
        demo = build_demo(pipe, name, note, **release)
        demo.queue().launch(server_name=host, server_port=port, share=args.share)
    except OSError as e:
        if port is None or "port" not in str(e).lower():
            raise
        raise SystemExit(
            f"Port {port} on {host} (from {port_from}) is in use or cannot be opened: pass --port with a "
            f"free port, or set GRADIO_SERVER_PORT (--port wins over it). ({e})"
        ) from e


if __name__ == "__main__":
    main()
