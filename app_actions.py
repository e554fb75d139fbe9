"""Request handlers for app.py: check the inputs, call the library under the app's lock, and hand the
results to `app_views` for display. One factory, `make_actions`, so app.py holds only layout and wiring."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from types import SimpleNamespace

import gradio as gr
import numpy as np
import torch

import app_views as views
import fluxsae
from fluxsae.sites import SiteError, parse_site
from fluxsae.steering import MAX_STRENGTH

logger = logging.getLogger("fluxsae.app")


def _user_errors(action: str):
    """A decorator: ValueError -> a gr.Error with its message; anything else is logged and reported."""

    def wrap(fn):
        @functools.wraps(fn)
        def wrapped(*args):
            try:
                return fn(*args)
            except (ValueError, SiteError) as e:
                raise gr.Error(str(e), print_exception=False) from e
            except gr.Error:
                raise
            except Exception as e:
                logger.exception("%s failed", action)
                message = f"{action} failed ({type(e).__name__}: {e}). The app is unchanged; try again."
                raise gr.Error(message, print_exception=False) from e  # logged above, with the traceback

        return wrapped

    return wrap


def make_actions(
    pipe, defaults: dict, release: views.Dictionaries, sites: list[str], vocabulary: list[str], *,
    norms, check_seed, to_display, display_px: int, max_prompt_chars: int,
) -> SimpleNamespace:  # fmt: skip
    """The app's handlers for `pipe`, sharing one lock. `norms(pipe, prompt, seed, site, step, defaults)`
    draws the token-norm view used at sites without a dictionary (app.run); `check_seed`, `to_display`:
    app.py's own."""
    n_steps = int(defaults["num_inference_steps"])
    lock = threading.Lock()

    def check_prompt(prompt) -> str:
        prompt = "" if prompt is None else prompt
        if not isinstance(prompt, str):
            raise ValueError(f"The prompt must be text, got {type(prompt).__name__}.")
        return prompt[:max_prompt_chars]

    def vocabulary_note(prompt) -> str:
        unknown = views.unknown_words(check_prompt(prompt), vocabulary)
        if not unknown:
            return ""
        shown = ", ".join(f"`{w}`" for w in unknown[:12]) + (" ..." if len(unknown) > 12 else "")
        return f"⚠ The model does not know {shown}: it ignores them. Known words: {', '.join(vocabulary)}."

    def step_range(first, last) -> list[int]:
        first = views.check_number(first, "first step", 0, n_steps - 1, whole=True)
        last = views.check_number(last, "last step", 0, n_steps - 1, whole=True)
        if first > last:
            raise ValueError(f"The first step ({first}) is after the last step ({last}).")
        return list(range(first, last + 1))

    def entry_for(site, method, required: bool = True):
        site = str(parse_site(site))
        if site not in sites:
            raise ValueError(f"{site} is not a site of this model; pick one of the list.")
        if method not in views.METHODS:
            raise ValueError(f"The method must be one of {', '.join(views.METHODS)}, got {method!r}.")
        entry = release.get(site, method)
        if entry is None and required:
            raise ValueError(f"There is no {method} dictionary at {site}: pick another site or method.")
        return site, entry

    def generate(prompt, seed, site, method, first, last):
        prompt, seed = check_prompt(prompt), check_seed(seed)
        steps = step_range(first, last)
        site, _ = entry_for(site, method, required=False)
        generator = torch.Generator("cpu").manual_seed(seed)
        with lock, fluxsae.capture(pipe, [site]) as acts:
            image = pipe(prompt, generator=generator, output_type="pil", **defaults).images[0]
        return image, acts[site], steps

    def show(entry, acts, image, feature, steps, opacity):
        dictionary, stats, labels = entry
        feature = views.check_number(feature, "feature", 0, dictionary.n_features - 1, whole=True)
        opacity = views.check_number(opacity, "opacity", 0, 1)
        heat = views.heatmap(dictionary, acts, feature, image, stats, steps, opacity, display_px)
        panel = views.feature_panel(labels, feature, stats)
        return (
            heat,
            panel,
            views.profile_plot(stats, labels, feature),
            views.examples_gallery(release, labels, feature),
        )

    @_user_errors("Generation")
    def on_generate(prompt, seed, site, method, first, last, feature, opacity):
        start = time.perf_counter()
        site_, entry = entry_for(site, method, required=False)
        if entry is None:  # no dictionary here: the residual stream's token norms, as before
            with lock:
                image, heat, stats = norms(pipe, prompt, seed, site, last, defaults)
            empty = views.profile_plot(None, {}, 0)
            return (
                to_display(image),
                to_display(heat),
                stats,
                [],
                "",
                empty,
                [],
                vocabulary_note(prompt),
                None,
                to_display(image),
            )
        image, acts, steps = generate(prompt, seed, site, method, first, last)
        dictionary, stats_, labels = entry
        table = views.features_table(dictionary, acts, stats_, labels, steps)
        if feature in (None, "", -1, "-1"):
            feature = table[0][0] if table else 0
        heat, panel, profile, gallery = show(entry, acts, image, feature, steps, opacity)
        fvu = views.fvu_of(dictionary, acts[steps])
        stats = (
            f"**{method}** at `{site_}` · feature {int(float(feature))} on steps {steps[0]}-{steps[-1]} of "
            f"0-{n_steps - 1} · seed {check_seed(seed)} · FVU on this image {fvu:.3f} · "
            f"{(time.perf_counter() - start) * 1000:.0f} ms"
        )
        state = {"acts": acts, "image": image, "site": site_, "method": method}
        return (
            to_display(image),
            heat,
            stats,
            table,
            panel,
            profile,
            gallery,
            vocabulary_note(prompt),
            state,
            to_display(image),
        )

    def from_state(state, site, method):
        if not state or state["site"] != str(parse_site(site)) or state["method"] != method:
            raise ValueError("Generate an image first (for this site and method).")
        return entry_for(site, method)[1]

    @_user_errors("Showing the feature")
    def on_feature(state, site, method, first, last, feature, opacity):
        entry = from_state(state, site, method)
        return show(entry, state["acts"], state["image"], feature, step_range(first, last), opacity)

    @_user_errors("Finding the features at a pixel")
    def on_pixel(state, site, method, first, last, x, y):
        entry = from_state(state, site, method)
        image = state["image"]
        factor = max(1, display_px // max(image.size))  # x, y are on the displayed (enlarged) image
        x = views.check_number(x, "x", 0, image.width * factor - 1)
        y = views.check_number(y, "y", 0, image.height * factor - 1)
        dictionary, stats, labels = entry
        return views.at_pixel(
            dictionary,
            state["acts"],
            (x / factor, y / factor),
            image.size,
            stats,
            labels,
            step_range(first, last),
        )

    @_user_errors("Search")
    def on_search(query, site, method):
        _, entry = entry_for(site, method)
        return [list(h) for h in views.search_labels(query, entry[2], 20)]

    @_user_errors("Steering")
    def on_steer(prompt, seed, site, method, features, strength, mode, first, last, region):
        start = time.perf_counter()
        prompt, seed, steps = check_prompt(prompt), check_seed(seed), step_range(first, last)
        site, (dictionary, _, labels) = entry_for(site, method)
        ids = views.find_features(features, labels, dictionary.n_features)
        if mode not in ("add", "clamp"):
            raise ValueError(f"The mode must be 'add' or 'clamp', got {mode!r}.")
        strength = views.check_number(strength, "strength", -MAX_STRENGTH, MAX_STRENGTH)
        mask = views.region_mask(region, (int(defaults["width"]), int(defaults["height"])))
        with lock:
            images = []
            for steered in (False, True):
                generator = torch.Generator("cpu").manual_seed(seed)
                edit = (
                    fluxsae.steer(
                        pipe, dictionary, {f: strength for f in ids}, steps=steps, region=mask, mode=mode
                    )
                    if steered
                    else contextlib.nullcontext()
                )
                with edit:
                    images.append(pipe(prompt, generator=generator, output_type="pil", **defaults).images[0])
        diff = np.abs(
            np.asarray(images[0], dtype=np.float32) - np.asarray(images[1], dtype=np.float32)
        ).mean()
        named = ", ".join(f"{f} ({views.label_of(labels, f)[0]})" for f in ids)
        stats = (
            f"**{mode}** {strength:g} on {named} at `{site}`, steps {steps[0]}-{steps[-1]}"
            f"{', painted region' if mask is not None else ''} · seed {seed} · mean pixel change "
            f"{diff:.1f}/255 · {(time.perf_counter() - start) * 1000:.0f} ms"
        )
        return to_display(images[0]), to_display(images[1]), stats

    return SimpleNamespace(
        vocabulary_note=vocabulary_note, on_generate=on_generate, on_feature=on_feature, on_pixel=on_pixel,
        on_search=on_search, on_steer=on_steer,
    )  # fmt: skip
