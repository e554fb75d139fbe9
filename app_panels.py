"""The app's panels: each one's components and wiring together (the handlers are in app_actions.py and
app_words.py, what they show is drawn by app_views.py).

Every action is wired twice (`wire`): for the page, a failed request leaves every output as it was and
says what was wrong beside the control (a message component); for the API (gradio_client), the named
endpoint raises the error as it always did.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

import app_views as views
from app_images import readable_later
from app_labels import RANKED_BY_DETECTION
from fluxsae.steering import DEFAULT_STEPS, DEFAULT_STRENGTH
from fluxsae.word_steering import STRENGTH as WORD_STRENGTH

SHOWN = dict(type="pil", format="png", interactive=False, buttons=["download", "fullscreen"])


def quiet(fn, n_outputs: int):
    """`fn` for the page: its outputs and an empty message, or, when it raises gr.Error, every output
    unchanged and the error as the message."""

    def run(*args):
        try:
            out = fn(*args)
        except gr.Error as e:
            return (*[gr.skip()] * n_outputs, f"⚠ {e.message}")
        return (*(out if isinstance(out, tuple) else (out,)), "")

    return run


def wire(triggers, fn, inputs, outputs, *, message, api_name=None, **kwargs):
    """Run `fn` on the page's `triggers` (errors in `message`), and, with `api_name`, as that named
    endpoint (errors raised), through a hidden trigger of its own. Returns the page's event."""
    event = gr.on(triggers, quiet(fn, len(outputs)), inputs, [*outputs, message], api_name=False, **kwargs)
    if api_name:
        gr.Button(visible=False).click(fn, inputs, outputs, api_name=api_name, **kwargs)
    return event


def message(elem_id: str) -> gr.Markdown:
    return gr.Markdown(elem_id=elem_id, label="Message")


def step_slider(last_step: int, value: int, label: str, elem_id: str):
    return views.lenient(gr.Slider(0, last_step, value=value, step=1, label=label, elem_id=elem_id))


def explore_panel(ui: SimpleNamespace, actions, release, methods, examples, site_choices, first_site) -> None:
    """Prompt, seed, site, units and steps; the image, its feature heatmap, statistics and top features."""
    with gr.Row():
        with gr.Column(scale=1):
            ui.prompt = gr.Textbox(label="Prompt", lines=2, placeholder=examples[0], elem_id="prompt")
            ui.words = gr.Markdown(elem_id="vocabulary", label="Vocabulary note")
            gr.Examples([[e] for e in examples], [ui.prompt], label="Example prompts")
            ui.seed = views.lenient(
                gr.Number(
                    value=0, label="Seed", precision=0, minimum=0, maximum=views.MAX_SEED, elem_id="seed"
                )
            )
            ui.site = gr.Dropdown(
                site_choices, value=first_site, label="Site (dictionaries in brackets)", elem_id="site"
            )
            ui.method = gr.Radio(methods, value="SAE", label="Units", elem_id="method")
            with gr.Row():
                ui.first = step_slider(ui.last_step, 0, "First step", "first_step")
                ui.step = step_slider(ui.last_step, ui.n_steps - 1, "Last step", "step")
            ui.feature = views.lenient(
                gr.Number(value=-1, label="Feature (-1: the top one)", precision=0, elem_id="feature")
            )
            ui.opacity = views.lenient(
                gr.Slider(0, 1, value=0.55, label="Heatmap opacity", elem_id="opacity")
            )
            ui.rank = gr.Radio(
                list(views.RANKS),
                value=next(iter(views.RANKS)),
                label="Rank features by (unusual: mass over the feature's usual mass, so background features "
                "that fire alike on every image sink)",
                elem_id="rank",
            )
            ui.show_only = gr.Dropdown(
                views.show_choices(release.get(first_site, "SAE")),
                value=views.ALL,
                label="Show in the table (a Matryoshka SAE's first groups hold its general features)",
                elem_id="show_only",
            )
            button = gr.Button("Generate", variant="primary", elem_id="generate")
            ui.generate_message = message("generate_message")
        with gr.Column(scale=2):
            with gr.Row():
                ui.image = gr.Image(
                    label="Image (click a pixel: features at that token)", elem_id="image", **SHOWN
                )
                ui.heat = gr.Image(label="Feature heatmap", elem_id="heatmap", **SHOWN)
            ui.stats = gr.Markdown(elem_id="stats", label="Statistics")
            figure = "F1" if release.ranked_by() == RANKED_BY_DETECTION else "score"
            ui.table = gr.Dataframe(
                headers=["feature", "label", figure, "share %", "x usual"],
                label="Top features",
                interactive=False,
                elem_id="top_features",
            )
    ui.view = [ui.site, ui.method, ui.first, ui.step]
    ui.generate_triggers = [button.click, ui.prompt.submit]


def feature_panel(ui: SimpleNamespace) -> None:
    """The chosen feature's page (label and what it is worth, profile, examples, atom source), the features
    at a clicked pixel, and label search."""
    with gr.Row():
        with gr.Column():
            ui.feature_message = message("feature_message")
            ui.panel = gr.Markdown(elem_id="feature_panel", label="Feature panel")
            ui.profile = gr.LinePlot(
                x="step", y="mean activation", label="Timestep profile", elem_id="profile"
            )
            ui.gallery = gr.Gallery(
                label="Top examples", columns=5, height=200, format="png", elem_id="examples"
            )
            ui.atom = gr.Gallery(
                label="Atom source (ITDA: the image and patch it was taken from)",
                columns=2,
                height=220,
                format="png",
                elem_id="atom_source",
            )
        with gr.Column():
            with gr.Row():
                ui.px = views.lenient(gr.Number(value=0, label="x (px)", elem_id="pixel_x"))
                ui.py = views.lenient(gr.Number(value=0, label="y (px)", elem_id="pixel_y"))
            ui.at = gr.Dataframe(
                headers=["feature", "label", "activation", "share %"],
                label="Features at the clicked token",
                interactive=False,
                elem_id="at_pixel",
            )
            ui.pixel_message = message("pixel_message")
            ui.query = gr.Textbox(label="Search labels", placeholder="red circle", elem_id="search")
            ui.found = gr.Dataframe(
                headers=["feature", "detects", "F1", "precision", "recall"],
                label="Matching features (ranked by how well they detect the words)",
                interactive=False,
                elem_id="found",
            )
            ui.search_message = message("search_message")


def words_tab(ui: SimpleNamespace) -> None:
    """Steer by words: take a word's concept out of the text stream, put another's in."""
    with gr.Tab("By words (text stream)", elem_id="words_tab"):
        gr.Markdown(
            "What an image shows of its prompt is decided in the text stream: take one word's features out "
            "of it and put another's in, at every text site with a dictionary, on the chosen steps "
            '("make the red thing blue": take out *red*, put in *blue*). Only some words of the prompt '
            "(one object's), or only a painted region, limit where it acts."
        )
        with gr.Row():
            ui.take_out = gr.Textbox(label="Take out (a word of the prompt)", elem_id="swap_out")
            ui.put_in = gr.Textbox(label="Put in", elem_id="swap_in")
        ui.only_words = gr.Textbox(
            label="Only one object (optional: a word or two of its phrase, e.g. 'red circle')",
            elem_id="swap_words",
        )
        ui.word_strength = views.lenient(
            gr.Slider(
                0,
                3,
                value=WORD_STRENGTH,
                label="Strength of the word put in (mean token norms)",
                elem_id="swap_strength",
            )
        )
        with gr.Row():
            ui.swap_first = step_slider(ui.last_step, 0, "From step", "swap_first")
            ui.swap_last = step_slider(ui.last_step, ui.n_steps - 1, "to step", "swap_last")
        ui.swap_button = gr.Button("Swap", variant="primary", elem_id="swap")
        ui.swap_message = message("swap_message")
        with gr.Row():
            with gr.Column():
                ui.swap_original = gr.Image(label="Original", elem_id="swap_original", **SHOWN)
                ui.swap_original_reads = gr.Markdown(
                    elem_id="swap_original_reads", label="The original reads"
                )
            with gr.Column():
                ui.swap_steered = gr.Image(label="Steered", elem_id="swap_steered", **SHOWN)
                ui.swap_steered_reads = gr.Markdown(
                    elem_id="swap_steered_reads", label="The steered image reads"
                )
        ui.swap_stats = gr.Markdown(elem_id="swap_stats", label="Steering statistics")


def features_tab(ui: SimpleNamespace) -> None:
    """Steer by features: image-stream feature sliders (add, clamp, ablate)."""
    with gr.Tab("By features (image stream)", elem_id="features_tab"):
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Row(equal_height=True):
                    ui.add_box = gr.Textbox(
                        label="Add features (ids or words, comma-separated; or pick a table row)",
                        scale=4,
                        elem_id="steer_add",
                    )
                    ui.add_button = gr.Button("Add", scale=1, min_width=60, elem_id="steer_add_button")
                ui.add_message = message("add_message")
                ui.strength = views.lenient(
                    gr.Slider(
                        -20,
                        20,
                        value=DEFAULT_STRENGTH,
                        label="Strength of added features (add: mean token norms, negative suppresses; "
                        "clamp: the code value)",
                        elem_id="strength",
                    )
                )
                ui.ids = gr.State([])
                ui.rows, ui.sliders, ui.removes = [], [], []
                for i in range(views.MAX_FEATURES):
                    with gr.Row(visible=False, equal_height=True) as row:
                        ui.sliders.append(
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
                        ui.removes.append(gr.Button("✕", scale=0, min_width=40, elem_id=f"remove_{i}"))
                    ui.rows.append(row)
                ui.features = gr.Textbox(  # the steering list as /steer's argument
                    label="Features and strengths ('12: 4, 7: -2')", visible=False, elem_id="steer_features"
                )
                ui.mode = gr.Radio(
                    list(views.MODES),
                    value="add",
                    label="Mode (ablate: clamp every listed feature to 0)",
                    elem_id="mode",
                )
                steered_steps = range(ui.n_steps)[DEFAULT_STEPS]  # the library's default: the last steps
                with gr.Row():
                    ui.steer_first = step_slider(
                        ui.last_step, steered_steps[0], "Steer from step", "steer_first"
                    )
                    ui.steer_last = step_slider(ui.last_step, steered_steps[-1], "to step", "steer_last")
                ui.steer_button = gr.Button("Steer", variant="primary", elem_id="steer")
                ui.steer_message = message("steer_message")
            with gr.Column(scale=2):
                with gr.Row():
                    ui.original = gr.Image(label="Original", elem_id="original", **SHOWN)
                    ui.steered = gr.Image(label="Steered", elem_id="steered", **SHOWN)
                    ui.spliced = gr.Image(label="Dictionary spliced in", elem_id="spliced", **SHOWN)
                ui.steer_stats = gr.Markdown(elem_id="steer_stats", label="Steering statistics")


def steer_panel(ui: SimpleNamespace) -> None:
    gr.Markdown("## Steer")
    with gr.Row():
        with gr.Column(scale=1):
            ui.region = gr.ImageEditor(
                label="Region (paint on the image; empty: everywhere)",
                type="pil",
                brush=gr.Brush(colors=["#ff00ff"]),
                elem_id="region",
            )
        with gr.Column(scale=1):
            gr.Markdown(
                "Paint over what should change: steering by words then acts inside the painted region only "
                "(the rest of the generation is kept, step by step), and steering by features edits the "
                "painted tokens only. Leave it empty to steer the whole image."
            )
    with gr.Tabs():
        words_tab(ui)
        features_tab(ui)


def own_image_panel(ui: SimpleNamespace, noise: float) -> None:
    """Your own image: upload, paste or draw one; analyse it (the explore views above show it) or edit it."""
    with gr.Accordion("Your own image", open=False, elem_id="own_panel"):
        gr.Markdown(
            "Upload, paste or draw an image: the model denoises it from the noise level with the prompt "
            "above, and every view above (heatmap, top features, a pixel's features, the feature page) reads "
            "it. "
            "Edit it with the words of the steering tab (take out / put in) or with features, inside the "
            "painted region if there is one: the image as the model sees it, its reconstruction without an "
            "edit, and the edited one."
        )
        with gr.Row():
            with gr.Column(scale=1):
                ui.own = readable_later(
                    gr.ImageEditor(
                        label="Your image (upload, paste or draw)",
                        type="pil",
                        sources=["upload", "clipboard"],
                        canvas_size=(384, 384),
                        elem_id="own_image",
                    )
                )
                ui.noise = views.lenient(
                    gr.Slider(
                        0.05,
                        1,
                        value=noise,
                        step=0.05,
                        label="Noise level (1: pure noise)",
                        elem_id="own_noise",
                    )
                )
                ui.own_features = gr.Textbox(
                    label="Features to add while editing (ids or words, at the site above; optional)",
                    elem_id="own_features",
                )
                with gr.Row():
                    ui.analyse_button = gr.Button("Analyse", variant="primary", elem_id="analyse")
                    ui.edit_button = gr.Button("Edit", elem_id="edit_image")
                ui.own_message = message("own_message")
            with gr.Column(scale=2):
                with gr.Row():
                    ui.own_original = gr.Image(label="As the model sees it", elem_id="own_original", **SHOWN)
                    ui.own_reconstruction = gr.Image(
                        label="Reconstruction", elem_id="own_reconstruction", **SHOWN
                    )
                    ui.own_edited = gr.Image(label="Edited", elem_id="own_edited", **SHOWN)
                ui.own_stats = gr.Markdown(elem_id="own_stats", label="Editing statistics")
                ui.own_reads = [
                    gr.Markdown(elem_id=f"own_reads_{i}", label=f"The {name} reads")
                    for i, name in enumerate(("image", "reconstruction", "edited image"))
                ]


def compare_panel(ui: SimpleNamespace) -> None:
    """Two prompts from one seed: the features they differ by, and prompt A steered towards B."""
    with gr.Accordion("Two prompts side by side", open=False, elem_id="compare_panel"):
        with gr.Row():
            ui.prompt_b = gr.Textbox(label="Prompt B (A is the prompt above)", elem_id="prompt_b")
            with gr.Column(scale=0, min_width=160):
                ui.compare_button = gr.Button("Compare", variant="primary", elem_id="compare")
                ui.towards_button = gr.Button("Steer A towards B", elem_id="towards")
        ui.compare_message = message("compare_message")
        with gr.Row():
            ui.diff_a = gr.Image(label="A", elem_id="diff_a", **SHOWN)
            ui.diff_b = gr.Image(label="B", elem_id="diff_b", **SHOWN)
            ui.diff_heat_a = gr.Image(label="The top feature on A", elem_id="diff_heat_a", **SHOWN)
            ui.diff_heat_b = gr.Image(label="The top feature on B", elem_id="diff_heat_b", **SHOWN)
        ui.diff_table = gr.Dataframe(
            headers=["feature", "label", "F1", "mass on A", "mass on B", "change"],
            label="Features that differ most",
            interactive=False,
            elem_id="diff_table",
        )
        ui.diff_stats = gr.Markdown(elem_id="diff_stats", label="Comparison statistics")
        with gr.Row():
            ui.towards_steered = gr.Image(label="A steered towards B", elem_id="towards_steered", **SHOWN)
            with gr.Column():
                ui.diff_a_reads = gr.Markdown(elem_id="diff_a_reads", label="A reads")
                ui.towards_stats = gr.Markdown(elem_id="towards_stats", label="Steering statistics")
                ui.towards_reads = gr.Markdown(elem_id="towards_reads", label="A steered towards B reads")
