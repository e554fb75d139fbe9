"""fluxsae app: generate an image with a Flux pipeline and see where a site's residual stream is strong.

    python app.py                                   # the packaged Shapes model (CPU)
    python app.py --model tiny                      # a random tiny pipeline, for trying the UI
    python app.py --model black-forest-labs/FLUX.1-schnell --quantize nf4   # one GPU

The model also comes from the environment variable FLUXSAE_MODEL. Everything a request does runs
inside `fluxsae.capture` (hooks removed in `finally`) under one lock, so a failed or concurrent
request never leaves the shared pipeline changed.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import threading
import time
from collections.abc import Mapping

# Before gradio is imported: no analytics or version pings (the app must work offline).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import fluxsae  # noqa: E402
from fluxsae.heatmap import activation_norms, overlay, token_grid, token_map  # noqa: E402
from fluxsae.pipelines import SHAPES, TINY, PipelineLoadError, generation_defaults  # noqa: E402
from fluxsae.sites import SiteError, parse_site  # noqa: E402
from fluxsae.tiny import tiny_flux_pipeline  # noqa: E402

logger = logging.getLogger("fluxsae.app")

DISPLAY_PX = 384
"""Small images are enlarged (NEAREST, whole-number factor) to about this size for display."""
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 2000
"""Longer prompts are cut here before tokenising (the tokenizers truncate to far fewer tokens anyway)."""
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
    """An integer seed in 0..MAX_SEED, or a ValueError that says what was wrong."""
    if isinstance(seed, bool) or seed is None:
        raise ValueError(f"The seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}.")
    try:
        value = float(seed)
    except (TypeError, ValueError):
        raise ValueError(f"The seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}.") from None
    if not math.isfinite(value) or value != int(value) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"The seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}.")
    return int(value)


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
    if image is None:
        return None
    factor = max(1, px // max(image.size))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def build_demo(pipe, name: str, note: str | None = None, defaults: Mapping | None = None) -> gr.Blocks:
    """The Gradio Blocks for `pipe` (model `name`); `note` is shown under the title."""
    defaults = dict(defaults or generation_defaults(name, pipe))
    n_steps = int(defaults["num_inference_steps"])
    sites = [str(s) for s in fluxsae.all_sites(pipe)]
    lock = threading.Lock()

    def on_generate(prompt, seed, site, step):
        try:
            with lock:
                image, heat, stats = run(pipe, prompt, seed, site, step, defaults)
        except (ValueError, SiteError) as e:
            raise gr.Error(str(e), print_exception=False) from e
        except Exception as e:
            logger.exception("Generation failed")
            message = f"Generation failed ({type(e).__name__}: {e}). The app is unchanged; try again."
            raise gr.Error(message, print_exception=False) from e  # logged above, with the traceback
        return to_display(image), to_display(heat), stats

    shown = dict(type="pil", format="png", interactive=False, buttons=["download", "fullscreen"])
    with gr.Blocks(title="fluxsae", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# fluxsae\nGenerate an image with `{name}` and see, token by token, how strong the residual "
            "stream is (L2 norm) at a site of the transformer on a denoising step."
        )
        if note:
            gr.Markdown(f"**Note:** {note}", elem_id="note")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle", elem_id="prompt")
                seed = gr.Number(
                    value=0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed"
                )
                site = gr.Dropdown(sites, value=default_site(pipe), label="Site", elem_id="site")
                step = gr.Slider(
                    0, max(n_steps - 1, 1), value=n_steps - 1, step=1, label="Denoising step", elem_id="step"
                )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                with gr.Row():
                    image = gr.Image(label="Image", elem_id="image", **shown)
                    heat = gr.Image(label="Token activation norm", elem_id="heatmap", **shown)
                stats = gr.Markdown(elem_id="stats")
        inputs, outputs = [prompt, seed, site, step], [image, heat, stats]
        button.click(on_generate, inputs, outputs)
        prompt.submit(on_generate, inputs, outputs)
    return demo


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve the app. Host and port: --host/--port, else Gradio's own
    GRADIO_SERVER_NAME/GRADIO_SERVER_PORT (a Space sets GRADIO_SERVER_NAME=0.0.0.0), else 127.0.0.1 and the
    first free port from 7860. On a ZeroGPU Space (the `spaces` package importable) generation runs
    under `spaces.GPU`; elsewhere nothing changes."""
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
    try:
        import spaces  # ZeroGPU: imported before any CUDA work, as it requires
    except ImportError:
        spaces = None
    try:
        pipe, name, note = load_app_pipeline(args.model, args.quantize)
    except PipelineLoadError as e:
        raise SystemExit(str(e)) from e
    if spaces is not None:
        # ZeroGPU attaches a GPU only inside spaces.GPU functions, run in a forked worker that receives
        # its arguments pickled: the pipeline is captured here (the fork inherits it), never passed.
        cpu_run = getattr(run, "_fluxsae_cpu_run", run)

        @spaces.GPU(duration=120)
        def generate_on_gpu(prompt, seed, site, step, defaults):
            return cpu_run(pipe, prompt, seed, site, step, defaults)

        def run_via_gpu(_pipe, prompt, seed, site, step, defaults):
            return generate_on_gpu(prompt, seed, site, step, defaults)

        run_via_gpu._fluxsae_cpu_run = cpu_run
        run = run_via_gpu
        logger.info("ZeroGPU: generation runs under spaces.GPU")
    try:
        build_demo(pipe, name, note).queue().launch(server_name=host, server_port=port, share=args.share)
    except OSError as e:
        if port is None or "port" not in str(e).lower():
            raise
        raise SystemExit(
            f"Port {port} on {host} (from {port_from}) is in use or cannot be opened: pass --port with a "
            f"free port, or set GRADIO_SERVER_PORT (--port wins over it). ({e})"
        ) from e


if __name__ == "__main__":
    main()
