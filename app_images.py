"""The app's "your own image" and "two prompts" panels.

- Your own image (uploaded, or drawn in the app): denoised from a noise level with its prompt, with the
  sites captured (`fluxsae.own_image.analyse_image`), so every view of the explore panel works on it; and
  edited by words (the text-stream swap) and features during that pass: the image as the model saw it,
  its reconstruction without an edit and the edited one side by side.
- Two prompts from one seed: the features whose mass differs most (`fluxsae.features.diff`), with their
  labels and detection figures and the top one's heatmap on both images.

The functions that run the pipeline (`analyse`, `edit`, `pair`) are wrapped like the other handlers'.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import app_views as views
import fluxsae
from app_labels import label_of
from fluxsae.features import diff
from fluxsae.own_image import DEFAULT_NOISE, analyse_image, check_noise, img2img_pipeline, prepare_image
from fluxsae.regions import generate_pair


def editor_image(value):
    """The image of an upload / drawing component's value (a PIL image, or an ImageEditor's dict: its
    composite; a file the component could not read itself: its path), or None when there is none."""
    if isinstance(value, dict) and ("composite" in value or "background" in value):
        value = value.get("composite") if value.get("composite") is not None else value.get("background")
    if isinstance(value, dict):  # a file payload the component left unread (see `readable_later`)
        value = value.get("path")
    return getattr(value, "path", value) if not hasattr(value, "size") else value


def readable_later(component):
    """`component` (an image input), its preprocess made to hand what it cannot read (not an image, too
    large for PIL) to the handler, which says what is wrong beside the control, instead of failing inside
    Gradio."""
    strict = component.preprocess

    def preprocess(payload):
        try:
            return strict(payload)
        except Exception:  # noqa: BLE001 (any decoding failure: the handler reports it)
            return payload.model_dump() if hasattr(payload, "model_dump") else payload

    component.preprocess = preprocess
    return component


def make_image_actions(pipe, defaults: dict, release: views.Dictionaries, base, words) -> SimpleNamespace:
    """The panels' handlers, sharing the lock, ZeroGPU wrapper and checks of `base` (app_actions) and the
    word steering of `words` (app_words)."""
    n_steps = int(defaults["num_inference_steps"])
    size = (int(defaults["width"]), int(defaults["height"]))

    def own(image):
        image = editor_image(image)
        if image is None:
            raise ValueError("Upload or draw an image first (the box above the noise level).")
        return prepare_image(image, size)

    @base.on_gpu
    def analyse(image, prompt: str, strength: float, seed: int, site: str):
        analysis = analyse_image(pipe, image, prompt, strength, [site], seed=seed, **defaults)
        return analysis.acts[site], list(analysis.acts.steps), analysis.reconstruction

    @base.on_gpu
    def edit(image, prompt, strength, seed, take_out, put_in, word_strength, tokens, features, site, mask):
        specs, used = [], []
        if take_out or put_in:
            swap = words.steering().swap(take_out, put_in, word_strength)
            specs, used = list(swap.specs), swap.features
        if features:
            specs.append((release.get(site, "SAE").dictionary, features, "add"))
        img = img2img_pipeline(pipe)

        def steered():
            return fluxsae.steer(pipe, specs, steps=None, region=tokens if not features else None)

        call = dict(image=image, strength=strength, output_type="np", **defaults)
        plain, edited = generate_pair(img, prompt, seed, steered, region=mask, **call)
        return plain.images, edited.images, used

    def pair(prompt_a: str, prompt_b: str, seed: int, site: str, method: str):
        """Both prompts from one seed: [(image, units [steps, 1, tokens, F])] (each a wrapped capture)."""
        return [base.capture_units(prompt, seed, site, method) for prompt in (prompt_a, prompt_b)]

    @base.user_errors("Analysing your image")
    def on_analyse(
        image, prompt, strength, seed, site, method, first, last, feature, opacity, rank, show_only
    ):
        start = time.perf_counter()
        image, note = own(image)
        prompt, seed, strength = base.check_prompt(prompt), base.check_seed(seed), check_noise(strength)
        site_, entry = base.entry_for(site, method)
        if views.METHODS[method] == "mlp":
            raise ValueError("Your own image is read by a dictionary (SAE or ITDA): switch the units.")
        rank = base.check_rank(rank)
        base.step_range(first, last)
        with base.lock:
            acts, steps, reconstruction = analyse(image, prompt, strength, seed, site_)
        state = {
            "acts": acts,
            "image": image,
            "site": site_,
            "method": method,
            "seed": seed,
            "steps": steps,
            "made": "analysed",
            "ms": (time.perf_counter() - start) * 1000,
        }
        chosen = base.positions(state, first, last)
        notes = [n for n in (note, base.vocabulary_note(prompt)) if n]
        notes.append(
            f"Denoised from noise level {strength:g}: steps {steps[0]}-{steps[-1]} of 0-{n_steps - 1}."
        )
        return base.explore(state, entry, feature, opacity, rank, show_only, chosen, "\n\n".join(notes))

    @base.user_errors("Editing your image")
    def on_edit(
        image,
        prompt,
        seed,
        strength=DEFAULT_NOISE,
        take_out=None,
        put_in=None,
        only_words=None,
        word_strength=0.6,
        features=None,
        site=None,
        region=None,
    ):
        start = time.perf_counter()
        image, note = own(image)
        prompt, seed, strength = base.check_prompt(prompt), base.check_seed(seed), check_noise(strength)
        take_out, put_in, _, tokens, word_strength = words.check_swap(
            prompt, take_out, put_in, only_words, word_strength
        )
        chosen = None
        if str(features or "").strip():
            site_, entry = base.steerable(site, "SAE")
            chosen = views.parse_steering(features, 4.0, entry, 100.0)
        elif take_out is None and put_in is None:
            raise ValueError("Name a word to take out or put in, or features to add, to edit the image.")
        mask = views.region_mask(region, size)
        with base.lock:
            plain, edited, used = edit(
                image, prompt, strength, seed, take_out, put_in, word_strength, tokens, chosen, site, mask
            )
        images = [image, *(pipe.numpy_to_pil(x)[0] for x in (plain, edited))]
        said = (
            views.features_used(used)
            if used
            else ", ".join(f"feature {f} {s:+g} at `{site}`" for f, s in chosen.items())
        )
        stats = " · ".join(
            p
            for p in (
                said,
                f"noise level {strength:g}",
                note,
                "inside the painted region" if mask is not None else "the whole image",
                f"{(time.perf_counter() - start) * 1000:.0f} ms",
            )
            if p
        )
        reads = [views.reads(i) for i in images] if words.vocabulary else ["", "", ""]
        return (*(base.to_display(i) for i in images), stats, *reads)

    @base.user_errors("Comparing the prompts")
    def on_diff(prompt_a, prompt_b, seed, site, method, first=0, last=None, opacity=0.55):
        prompt_a, prompt_b, seed = (
            base.check_prompt(prompt_a),
            base.check_prompt(prompt_b),
            base.check_seed(seed),
        )
        if prompt_a == prompt_b:
            raise ValueError("The two prompts are the same: change a word of the second one.")
        steps = base.step_range(first, n_steps - 1 if last in (None, "") else last)
        site_, entry = base.entry_for(site, method)
        with base.lock:
            (image_a, acts_a), (image_b, acts_b) = pair(prompt_a, prompt_b, seed, site_, method)
        found = diff(entry.dictionary, acts_a, acts_b, 10, steps=steps)
        if not found:
            raise ValueError("No feature tells the two images apart at this site and on these steps.")
        rows = []
        for d in found:
            label, figure = label_of(entry.labels, d.feature)
            rows.append(
                [
                    d.feature,
                    label,
                    None if figure is None else round(figure, 3),
                    round(d.mass_a, 3),
                    round(d.mass_b, 3),
                    round(d.change, 3),
                ]
            )
        top = found[0].feature
        heats = [
            views.heatmap(entry.dictionary, acts, top, image, entry.stats, steps, opacity, base.display_px)
            for acts, image in ((acts_a, image_a), (acts_b, image_b))
        ]
        stats = (
            f"feature {top} ({label_of(entry.labels, top)[0]}) changes most: {found[0].mass_a:.3g} -> "
            f"{found[0].mass_b:.3g} at `{site_}`, steps {steps[0]}-{steps[-1]} · seed {seed}"
        )
        return base.to_display(image_a), base.to_display(image_b), *heats, rows, stats

    return SimpleNamespace(
        on_analyse=on_analyse, on_edit=on_edit, on_diff=on_diff, analyse=analyse, edit=edit, pair=pair
    )
