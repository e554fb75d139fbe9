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

# Before gradio is imported: no analytics or version pings (the app must work offline).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import app_views as views  # noqa: E402
import fluxsae  # noqa: E402
from app_actions import make_actions  # noqa: E402
from fluxsae import shapes  # noqa: E402
from fluxsae.heatmap import activation_norms, overlay, token_grid, token_map  # noqa: E402
from fluxsae.pipelines import SHAPES, TINY, PipelineLoadError, generation_defaults  # noqa: E402
from fluxsae.sites import parse_site  # noqa: E402
from fluxsae.steering import DEFAULT_STEPS, DEFAULT_STRENGTH  # noqa: E402
from fluxsae.tiny import tiny_flux_pipeline  # noqa: E402

logger = logging.getLogger("fluxsae.app")

DISPLAY_PX = 384
"""Small images are enlarged (NEAREST, whole-number factor) to about this size for display."""
MAX_SEED = 2**32 - 1
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
        heat = overlay(image, token_map(norms, grid))
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
    methods = release.methods()
    vocabulary = shapes.vocabulary() if name == SHAPES else []
    first_site = next((s for s in PACKAGED_SITES if s in sites and release.get(s, "SAE")), default_site(pipe))

    actions = make_actions(
        pipe, defaults, release, sites, vocabulary, norms=lambda *args: run(*args), check_seed=check_seed,
        to_display=to_display, display_px=DISPLAY_PX, max_prompt_chars=MAX_PROMPT_CHARS, gpu=zero_gpu(),
    )  # fmt: skip

    shown = dict(type="pil", format="png", interactive=False, buttons=["download", "fullscreen"])
    examples = (
        [shapes.caption(s) for s in shapes.sample_scenes(6, seed=0)] if vocabulary else ["a red circle"]
    )
    last_step = max(n_steps - 1, 1)

    def step_slider(value, label, elem_id):
        return views.lenient(gr.Slider(0, last_step, value=value, step=1, label=label, elem_id=elem_id))

    with gr.Blocks(title="fluxsae", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# fluxsae\nGenerate an image with `{name}`, see which dictionary features (SAE or ITDA) or MLP "
            "neurons fire where, and steer them. At sites without a dictionary the map shows the residual "
            "stream's per-token L2 norm."
        )
        if note:
            gr.Markdown(f"**Note:** {note}", elem_id="note")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder=examples[0], elem_id="prompt")
                words = gr.Markdown(elem_id="vocabulary")
                gr.Examples([[e] for e in examples], [prompt], label="Example prompts")
                seed = views.lenient(
                    gr.Number(value=0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
                )
                site = gr.Dropdown(sites, value=first_site, label="Site", elem_id="site")
                method = gr.Radio(methods, value="SAE", label="Units", elem_id="method")
                with gr.Row():
                    first = step_slider(0, "First step", "first_step")
                    step = step_slider(n_steps - 1, "Last step", "step")
                feature = views.lenient(
                    gr.Number(value=-1, label="Feature (-1: the top one)", precision=0, elem_id="feature")
                )
                opacity = views.lenient(
                    gr.Slider(0, 1, value=0.55, label="Heatmap opacity", elem_id="opacity")
                )
                rank = gr.Radio(
                    list(views.RANKS),
                    value=next(iter(views.RANKS)),
                    label="Rank features by (unusual: mass over the feature's usual mass, so background "
                    "features that fire alike on every image sink)",
                    elem_id="rank",
                )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                with gr.Row():
                    image = gr.Image(
                        label="Image (click a pixel: features at that token)", elem_id="image", **shown
                    )
                    heat = gr.Image(label="Feature heatmap", elem_id="heatmap", **shown)
                stats = gr.Markdown(elem_id="stats")
                table = gr.Dataframe(
                    headers=["feature", "label", "score", "share %", "x usual"],
                    label="Top features",
                    interactive=False,
                    elem_id="top_features",
                )
        with gr.Row():
            with gr.Column():
                panel = gr.Markdown(elem_id="feature_panel")
                profile = gr.LinePlot(
                    x="step", y="mean activation", label="Timestep profile", elem_id="profile"
                )
                gallery = gr.Gallery(
                    label="Top examples", columns=5, height=200, format="png", elem_id="examples"
                )
                atom = gr.Gallery(
                    label="Atom source (ITDA: the image and patch it was taken from)",
                    columns=2,
                    height=220,
                    format="png",
                    elem_id="atom_source",
                )
            with gr.Column():
                with gr.Row():
                    px = views.lenient(gr.Number(value=0, label="x (px)", elem_id="pixel_x"))
                    py = views.lenient(gr.Number(value=0, label="y (px)", elem_id="pixel_y"))
                at = gr.Dataframe(
                    headers=["feature", "label", "activation", "share %"],
                    label="Features at the clicked token",
                    interactive=False,
                    elem_id="at_pixel",
                )
                query = gr.Textbox(label="Search labels", placeholder="red circle", elem_id="search")
                found = gr.Dataframe(
                    headers=["feature", "label", "score"],
                    label="Matching features",
                    interactive=False,
                    elem_id="found",
                )
        gr.Markdown("## Steer")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Row(equal_height=True):
                    add_box = gr.Textbox(
                        label="Add features (ids or label words, comma-separated; or pick a table row)",
                        scale=4,
                        elem_id="steer_add",
                    )
                    add_button = gr.Button("Add", scale=1, min_width=60, elem_id="steer_add_button")
                strength = views.lenient(
                    gr.Slider(
                        -20,
                        20,
                        value=DEFAULT_STRENGTH,
                        label="Strength of added features (add: mean token norms, negative suppresses; "
                        "clamp: the code value)",
                        elem_id="strength",
                    )
                )
                ids = gr.State([])
                rows, sliders, removes = [], [], []
                for i in range(views.MAX_FEATURES):
                    with gr.Row(visible=False, equal_height=True) as row:
                        sliders.append(
                            views.lenient(
                                gr.Slider(
                                    -20,
                                    20,
                                    value=DEFAULT_STRENGTH,
                                    label="feature",
                                    scale=5,
                                    elem_id=f"strength_{i}",
                                )
                            )
                        )
                        removes.append(gr.Button("✕", scale=0, min_width=40, elem_id=f"remove_{i}"))
                    rows.append(row)
                features = gr.Textbox(  # the steering list as /steer's argument
                    label="Features and strengths ('12: 4, 7: -2')", visible=False, elem_id="steer_features"
                )
                mode = gr.Radio(
                    list(views.MODES),
                    value="add",
                    label="Mode (ablate: clamp every listed feature to 0)",
                    elem_id="mode",
                )
                steered_steps = range(n_steps)[DEFAULT_STEPS]  # the library's default: the last steps
                with gr.Row():
                    steer_first = step_slider(steered_steps[0], "Steer from step", "steer_first")
                    steer_last = step_slider(steered_steps[-1], "to step", "steer_last")
                region = gr.ImageEditor(
                    label="Region (paint on the image; empty: everywhere)",
                    type="pil",
                    brush=gr.Brush(colors=["#ff00ff"]),
                    elem_id="region",
                )
                steer_button = gr.Button("Steer", variant="primary", elem_id="steer")
            with gr.Column(scale=2):
                with gr.Row():
                    original = gr.Image(label="Original", elem_id="original", **shown)
                    steered = gr.Image(label="Steered", elem_id="steered", **shown)
                    spliced = gr.Image(label="Dictionary spliced in", elem_id="spliced", **shown)
                steer_stats = gr.Markdown(elem_id="steer_stats")

        view = [site, method, first, step]
        gr.on(
            [button.click, prompt.submit],
            actions.on_generate,
            [prompt, seed, *view, feature, opacity, rank],
            [image, heat, stats, table, panel, profile, gallery, atom, words, state, region],
            api_name="generate",
            concurrency_limit=4,
        )
        prompt.change(
            actions.vocabulary_note, [prompt], [words], api_name="check_prompt", show_progress="hidden"
        )
        rank.change(actions.on_rank, [state, *view, rank], [table], api_name="top_features")
        feature_outputs = [heat, panel, profile, gallery, atom]
        gr.on(
            [feature.submit, opacity.release],
            actions.on_feature,
            [state, *view, feature, opacity],
            feature_outputs,
            api_name="show_feature",
        )

        def pick(rows, evt: gr.SelectData):
            chosen = int(rows.iloc[evt.index[0], 0])
            return chosen, str(chosen)

        for source in (table, at, found):
            source.select(pick, [source], [feature, add_box], api_name=False).then(
                actions.on_feature, [state, *view, feature, opacity], feature_outputs, api_name=False
            )

        def click(evt: gr.SelectData):
            return evt.index[0], evt.index[1]

        image.select(click, None, [px, py], api_name=False).then(
            actions.on_pixel, [state, *view, px, py], [at], api_name="features_at"
        )
        query.submit(actions.on_search, [query, site, method], [found], api_name="search")

        slots = [ids, *rows, *sliders]
        gr.on(
            [add_button.click, add_box.submit],
            actions.on_add,
            [add_box, ids, strength, site, method],
            [ids, add_box, *rows, *sliders],
            api_name=False,
        )
        for i, remove in enumerate(removes):
            remove.click(actions.on_remove(i), [ids, site, method, *sliders], slots, api_name=False)
        gr.on([site.change, method.change], actions.on_clear, None, slots, api_name=False)
        steer_button.click(actions.compose, [ids, *sliders], [features], api_name=False).then(
            actions.on_steer,
            [prompt, seed, site, method, features, strength, mode, steer_first, steer_last, region],
            [original, steered, spliced, steer_stats],
            api_name="steer",
            concurrency_limit=4,
        )
    return demo


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
