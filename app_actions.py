"""Request handlers for app.py: check the inputs, call the library under the app's lock, and hand the
results to `app_views` for display. One factory, `make_actions`, so app.py holds only layout and wiring.

Everything that runs the pipeline is one of three functions (`capture_units`, `steer_images`,
`regenerate_atom`), each wrapped in `gpu` (ZeroGPU's `spaces.GPU` on a Space): they take and return
only picklable values (never the pipeline or a dictionary, which the ZeroGPU worker inherits), and
the lock is taken around them, outside the worker."""

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
from app_labels import RANKED_BY_DETECTION, label_of, search
from fluxsae.autointerp.examples import capture_mlp, stack_steps
from fluxsae.evaluate import image_mse, splice
from fluxsae.heatmap import token_grid
from fluxsae.provenance import atom_source
from fluxsae.sites import SiteError, parse_site
from fluxsae.steering import MAX_STRENGTH

logger = logging.getLogger("fluxsae.app")

MAX_ATOM_SOURCES = 512
"""Regenerated ITDA atom sources kept (each is one small image and its patch)."""


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
    norms, check_seed, to_display, display_px: int, max_prompt_chars: int, gpu=None,
) -> SimpleNamespace:  # fmt: skip
    """The app's handlers for `pipe`, sharing one lock. `norms(pipe, prompt, seed, site, step, defaults)`
    draws the token-norm view used at sites without a dictionary (app.run); `check_seed`, `to_display`:
    app.py's own; `gpu`: a decorator for the functions that run the pipeline (spaces.GPU), or None."""
    n_steps = int(defaults["num_inference_steps"])
    size = (int(defaults["width"]), int(defaults["height"]))
    lock = threading.Lock()
    on_gpu = gpu or (lambda fn: fn)
    sources: dict[tuple[str, int], dict | None] = {}

    # -- what runs the pipeline (on the GPU, on a ZeroGPU Space) ---------------------------------------

    def seeded(seed: int) -> torch.Generator:
        return torch.Generator("cpu").manual_seed(seed)

    @on_gpu
    def capture_units(prompt: str, seed: int, site: str, method: str):
        """(image, units [steps, 1, tokens, F]): the site's residual stream, or its block's MLP neurons."""
        with contextlib.ExitStack() as stack:
            if views.METHODS[method] == "mlp":
                rows, cols = token_grid(pipe, size[1], size[0])
                hidden = stack.enter_context(capture_mlp(pipe, [site], rows * cols))
            else:
                acts = stack.enter_context(fluxsae.capture(pipe, [site]))
            image = pipe(prompt, generator=seeded(seed), output_type="pil", **defaults).images[0]
        return image, stack_steps(hidden[site], n_steps) if views.METHODS[method] == "mlp" else acts[site]

    @on_gpu
    def steer_images(prompt: str, seed: int, site: str, method: str, features: dict, steps, mask, mode: str):
        """The plain, steered and dictionary-spliced images (arrays in [0, 1]) from one seed, the FVU on
        the plain image's activations and the spliced generation's time."""
        dictionary = release.get(site, method).dictionary

        def generate():
            return pipe(prompt, generator=seeded(seed), output_type="np", **defaults).images

        with fluxsae.capture(pipe, [site]) as acts:
            plain = generate()
        edit = fluxsae.steer(
            pipe, dictionary, features, steps=steps, region=mask, mode=mode, height=size[1], width=size[0]
        )
        with edit:
            steered = generate()
        start = time.perf_counter()
        with splice(pipe, dictionary):
            spliced = generate()
        spliced_ms = (time.perf_counter() - start) * 1000
        return plain, steered, spliced, views.fvu_of(dictionary, acts[site]), spliced_ms

    @on_gpu
    def regenerate_atom(site: str, atom: int) -> dict:
        """An ITDA atom's source image (its token outlined), patch and cosine, by `atom_source`."""
        source = atom_source(release.get(site, "ITDA").dictionary, atom, pipe)
        return {"outlined": source.outlined, "patch": source.patch, "cosine": source.cosine,
                "provenance": source.provenance}  # fmt: skip

    # -- input checks ------------------------------------------------------------------------------------

    def check_prompt(prompt) -> str:
        prompt = "" if prompt is None else prompt
        if not isinstance(prompt, str):
            raise ValueError(f"The prompt must be text, got {type(prompt).__name__}.")
        return views.cut_prompt(prompt, max_prompt_chars)

    def vocabulary_note(prompt) -> str:
        prompt = check_prompt(prompt)
        notes = []
        if not prompt.strip():
            notes.append("The prompt is empty: the model draws from no caption (an unconditional sample).")
        unknown = views.unknown_words(prompt, vocabulary)
        if unknown:
            shown = ", ".join(f"`{w}`" for w in unknown[:12]) + (" ..." if len(unknown) > 12 else "")
            known = ", ".join(vocabulary)
            notes.append(f"⚠ The model does not know {shown}: it ignores them. Known words: {known}.")
        kept = views.read_up_to(pipe, prompt, int(defaults["max_sequence_length"]))
        if kept is not None:
            limit = defaults["max_sequence_length"]
            notes.append(f"⚠ The model reads the first {limit} tokens of a prompt: it stops after “{kept}”.")
        return "\n\n".join(notes)

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
        if method not in release.methods():
            raise ValueError(f"The method must be one of {', '.join(release.methods())}, got {method!r}.")
        entry = release.get(site, method)
        if entry is None and required:
            raise ValueError(f"There is no {method} dictionary at {site}: pick another site or method.")
        return site, entry

    def steerable(site, method):
        site, entry = entry_for(site, method)
        if views.METHODS[method] == "mlp":
            raise ValueError(
                "Steering takes dictionary features (SAE or ITDA): MLP neurons have no direction in the "
                "residual stream to add. Switch the dictionary to SAE or ITDA."
            )
        return site, entry

    def check_rank(rank) -> str:
        if rank not in views.RANKS:
            raise ValueError(f"Rank by one of {', '.join(views.RANKS)}, got {rank!r}.")
        return views.RANKS[rank]

    # -- views -------------------------------------------------------------------------------------------

    def source_of(site: str, method: str, feature: int) -> dict | None:
        if views.METHODS[method] != "itda":
            return None
        key = (site, feature)
        with lock:  # the pipeline's lock guards the cache too: one regeneration per atom
            if key not in sources:
                try:
                    source = regenerate_atom(site, feature)
                except ValueError as e:  # no usable provenance: the rest of the panel still shows
                    logger.info("no source for atom %s at %s (%s)", feature, site, e)
                    source = None
                if len(sources) >= MAX_ATOM_SOURCES:
                    sources.pop(next(iter(sources)))
                sources[key] = source
            return sources[key]

    def show(entry, site, method, acts, image, feature, steps, opacity):
        dictionary, stats, labels, _ = entry
        feature = views.check_number(feature, "feature", 0, dictionary.cfg.n_features - 1, whole=True)
        opacity = views.check_number(opacity, "opacity", 0, 1)
        heat = views.heatmap(dictionary, acts, feature, image, stats, steps, opacity, display_px)
        source = source_of(site, method, feature)
        return (
            heat,
            views.feature_panel(labels, feature, stats, source),
            views.profile_plot(stats, labels, feature),
            views.examples_gallery(release, labels, feature),
            views.atom_gallery(source, display_px),
        )

    # -- handlers ----------------------------------------------------------------------------------------

    @_user_errors("Generation")
    def on_generate(prompt, seed, site, method, first, last, feature, opacity, rank, show_only=views.ALL):
        start = time.perf_counter()
        site_, entry = entry_for(site, method, required=False)
        rank = check_rank(rank)
        if entry is None:  # no dictionary here: the residual stream's token norms, as before
            with lock:
                image, heat, stats = norms(pipe, prompt, seed, site, last, defaults)
            empty = views.profile_plot(None, {}, 0)
            shown = to_display(image)
            return shown, to_display(heat), stats, [], "", empty, [], [], vocabulary_note(prompt), None, shown
        prompt, seed, steps = check_prompt(prompt), check_seed(seed), step_range(first, last)
        dictionary = entry.dictionary
        with lock:
            image, acts = capture_units(prompt, seed, site_, method)
        if acts.shape[-1] != dictionary.cfg.d_in:
            raise ValueError(
                f"The {method} labels at {site_} are for {dictionary.cfg.d_in} units, this model has "
                f"{acts.shape[-1]}: they belong to another model; pass --labels for this one."
            )
        state = {"acts": acts, "image": image, "site": site_, "method": method, "seed": seed,
                 "steps": list(range(n_steps)), "ms": (time.perf_counter() - start) * 1000}  # fmt: skip
        return explore(state, entry, feature, opacity, rank, show_only, steps, vocabulary_note(prompt))

    def explore(state, entry, feature, opacity, rank, show_only, steps, note):
        """The explore panel's outputs for the image in `state` (generated, or your own)."""
        acts, image = state["acts"], state["image"]
        table = views.features_table(entry, acts, steps, rank, show=show_only, step_ids=state["steps"])
        state["top"] = table[0][0] if table else 0
        feature = state["top"] if is_top(feature) else feature
        shown_views = show(entry, state["site"], state["method"], acts, image, feature, steps, opacity)
        heat, panel, profile, gallery, atom = shown_views
        shown = to_display(image)
        stats = stats_line(state, entry, feature, steps)
        return shown, heat, stats, table, panel, profile, gallery, atom, note, state, shown

    def positions(state, first, last) -> list[int]:
        """The positions in the image's captured steps of the chosen denoising steps (your own image is
        denoised on the last steps only)."""
        wanted, have = step_range(first, last), state.get("steps") or list(range(n_steps))
        chosen = [have.index(s) for s in wanted if s in have]
        if not chosen:
            raise ValueError(
                f"This image was denoised on steps {have[0]}-{have[-1]} only (from its noise level): pick "
                "steps in that range."
            )
        return chosen

    def is_top(feature) -> bool:
        """Whether `feature` asks for the image's top feature (-1, the box's default, or nothing)."""
        return feature is None or str(feature).strip() in ("", "-1", "-1.0")

    def stats_line(state, entry, feature, steps) -> str:
        """The statistics line of the image in `state` with `feature` shown (said again when it changes)."""
        dictionary, acts = entry.dictionary, state["acts"]
        ids = state.get("steps") or list(range(n_steps))
        return (
            f"**{state['method']}** at `{state['site']}` · feature {int(float(feature))} on steps "
            f"{ids[steps[0]]}-{ids[steps[-1]]} of 0-{n_steps - 1} · seed {state['seed']} · "
            f"{views.reconstruction_note(dictionary, acts[steps])} · {state.get('made', 'generated')} in "
            f"{state['ms']:.0f} ms"
        )

    def from_state(state, site, method):
        if not state or state["site"] != str(parse_site(site)) or state["method"] != method:
            raise ValueError("Generate an image first (for this site and method).")
        return entry_for(site, method)[1]

    @_user_errors("Ranking the features")
    def on_rank(state, site, method, first, last, rank, show_only=views.ALL):
        entry = from_state(state, site, method)
        steps = positions(state, first, last)
        return views.features_table(entry, state["acts"], steps, check_rank(rank), show=show_only,
                                    step_ids=state["steps"])  # fmt: skip

    @_user_errors("Showing the feature")
    def on_feature(state, site, method, first, last, feature, opacity):
        entry = from_state(state, site, method)
        steps = positions(state, first, last)
        feature = state["top"] if is_top(feature) else feature
        shown = show(entry, state["site"], method, state["acts"], state["image"], feature, steps, opacity)
        return *shown, stats_line(state, entry, feature, steps)

    @_user_errors("Finding the features at a pixel")
    def on_pixel(state, site, method, first, last, x, y):
        entry = from_state(state, site, method)
        image = state["image"]
        factor = max(1, display_px // max(image.size))  # x, y are on the displayed (enlarged) image
        x = views.check_number(x, "x", 0, image.width * factor - 1)
        y = views.check_number(y, "y", 0, image.height * factor - 1)
        pixel = (x / factor, y / factor)
        rows = views.at_pixel(entry, state["acts"], pixel, image.size, positions(state, first, last))
        return rows, views.mark_token(to_display(image), pixel, image.size, state["acts"].shape[2])

    @_user_errors("Search")
    def on_search(query, site, method):
        _, entry = entry_for(site, method)
        rows, ranked_by = search(query, entry.labels, entry.detections, 20)
        what = "detects" if ranked_by == RANKED_BY_DETECTION else "label"
        headers = ["feature", what, ranked_by, "precision", "recall"]
        import pandas as pd

        return pd.DataFrame([list(r) for r in rows], columns=headers)

    # -- the steering list: up to MAX_FEATURES rows, one strength slider each ----------------------------

    def slot_updates(ids: list[int], labels: dict, values: list, keep: int):
        """Updates for every row (shown or hidden) and slider (label; value from `values` from row `keep`
        on, unchanged before it) for the steering list `ids`."""
        rows = [gr.update(visible=i < len(ids)) for i in range(views.MAX_FEATURES)]
        sliders = []
        for i in range(views.MAX_FEATURES):
            if i >= len(ids):
                sliders.append(gr.update(label="feature"))
            elif i < keep:
                sliders.append(gr.update())
            else:
                name = f"{ids[i]} · {label_of(labels, ids[i])[0]}"[:90]
                sliders.append(gr.update(label=name, value=values[i]))
        return rows, sliders

    @_user_errors("Adding a feature")
    def on_add(text, ids, default, site, method):
        _, entry = steerable(site, method)
        labels = entry.labels
        default = views.check_number(default, "strength", -MAX_STRENGTH, MAX_STRENGTH)
        ids = list(ids or [])
        new = [f for f in views.find_features(text, entry) if f not in ids]
        if len(ids) + len(new) > views.MAX_FEATURES:
            raise ValueError(f"Steer at most {views.MAX_FEATURES} features at once: remove one first.")
        merged = ids + new
        rows, sliders = slot_updates(merged, labels, [default] * len(merged), keep=len(ids))
        return merged, "", *rows, *sliders

    def on_remove(index: int):
        def remove(ids, site, method, *values):
            ids = list(ids or [])
            if index >= len(ids):
                return ids, *[gr.update()] * (2 * views.MAX_FEATURES)
            values = list(values[: len(ids)])
            del ids[index], values[index]
            entry = release.get(str(parse_site(site)), method) if method in release.methods() else None
            rows, sliders = slot_updates(ids, entry.labels if entry else {}, values, keep=index)
            return ids, *rows, *sliders

        return remove

    def on_clear():
        rows, sliders = slot_updates([], {}, [], keep=0)
        return [], *rows, *sliders

    def show_choices(site, method):
        """For a new site or method: the top-features table's "show" choices for its dictionary, and the
        units switch, which says when there is no dictionary there (the map shows token norms)."""
        try:
            entry = entry_for(site, method, required=False)[1]
        except (ValueError, SiteError):
            entry = None
        units = "Units (no dictionary at this site: the map shows token norms)" if entry is None else "Units"
        return gr.update(choices=views.show_choices(entry), value=views.ALL), gr.update(label=units)

    def compose(ids, *values) -> str:
        """The steering list as /steer's features argument: "12: 4, 7: -2"."""
        return ", ".join(f"{f}: {float(v):g}" for f, v in zip(ids or [], values, strict=False))

    @_user_errors("Steering")
    def on_steer(prompt, seed, site, method, features, strength, mode, first, last, region=None):
        start = time.perf_counter()
        prompt, seed, steps = check_prompt(prompt), check_seed(seed), step_range(first, last)
        site, entry = steerable(site, method)
        dictionary, labels = entry.dictionary, entry.labels
        if mode not in views.MODES:
            raise ValueError(f"The mode must be one of {', '.join(views.MODES)}, got {mode!r}.")
        default = views.check_number(strength, "strength", -MAX_STRENGTH, MAX_STRENGTH)
        chosen = views.parse_steering(features, default, entry, MAX_STRENGTH)
        if mode == "ablate":
            chosen = dict.fromkeys(chosen, 0.0)
        mask = views.region_mask(region, size)
        with lock:
            plain, steered, spliced, fvu, spliced_ms = steer_images(
                prompt, seed, site, method, chosen, steps, mask, "clamp" if mode == "ablate" else mode
            )
        images = [pipe.numpy_to_pil(x)[0] for x in (plain, steered, spliced)]
        diff = np.abs(
            np.asarray(images[0], dtype=np.float32) - np.asarray(images[1], dtype=np.float32)
        ).mean()
        named = ", ".join(
            f"{f} ({label_of(labels, f)[0]})" + ("" if mode == "ablate" else f" {s:+g}")
            for f, s in chosen.items()
        )
        stats = (
            f"**{mode}** {named} at `{site}`, steps {steps[0]}-{steps[-1]}"
            f"{', painted region' if mask is not None else ''} · seed {seed} · mean pixel change "
            f"{diff:.1f}/255 · FVU on this image {fvu:.3f} · "
            f"{views.spliced_note(dictionary, image_mse(spliced, plain))} · "
            f"{(time.perf_counter() - start) * 1000:.0f} ms (spliced image {spliced_ms:.0f} ms)"
        )
        return *(to_display(i) for i in images), stats

    return SimpleNamespace(
        vocabulary_note=vocabulary_note, on_generate=on_generate, on_rank=on_rank, on_feature=on_feature,
        on_pixel=on_pixel, on_search=on_search, on_add=on_add, on_remove=on_remove, on_clear=on_clear,
        show_choices=show_choices, compose=compose, on_steer=on_steer,
        # shared with the other panels (app_words, app_images):
        lock=lock, on_gpu=on_gpu, user_errors=_user_errors, check_prompt=check_prompt, check_seed=check_seed,
        step_range=step_range, to_display=to_display, entry_for=entry_for, check_rank=check_rank,
        explore=explore, steerable=steerable, positions=positions, capture_units=capture_units,
        display_px=display_px,
    )  # fmt: skip
