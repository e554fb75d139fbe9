"""The app's "steer by words" panel: take one word's concept out of the text stream and put another's
in (`fluxsae.word_steering`), optionally only for some words of the prompt and only inside a painted
region of the image (`fluxsae.regions.generate_pair`), original and steered side by side from one seed.

What runs the pipeline is one function, `swap_images`, wrapped like the other handlers' (the app's lock
outside, ZeroGPU's `spaces.GPU` inside): it takes and returns only picklable values.
"""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import app_views as views
import fluxsae
from fluxsae.regions import generate_pair
from fluxsae.word_steering import MAX_STRENGTH, STRENGTH, WordSteering, shapes_captions, template_captions


def make_word_actions(
    pipe, defaults: dict, release: views.Dictionaries, vocabulary: list[str], base
) -> SimpleNamespace:
    """The panel's handler (`on_swap`), sharing the lock, ZeroGPU wrapper and input checks of `base` (the
    namespace `app_actions.make_actions` returns)."""
    n_steps = int(defaults["num_inference_steps"])
    size = (int(defaults["width"]), int(defaults["height"]))
    state: dict = {}

    def steering() -> WordSteering:
        if "words" not in state:
            texts = release.text_dictionaries()
            if not texts:
                raise ValueError(
                    "Steering by words needs text-stream SAEs (e.g. transformer_blocks.3.text) in the "
                    "dictionary release; this one has none. Steer by features instead."
                )
            captions = shapes_captions if vocabulary else template_captions
            state["words"] = WordSteering(pipe, texts, captions, defaults)
        return state["words"]

    @base.on_gpu
    def swap_images(prompt: str, seed: int, take_out, put_in, strength: float, steps, tokens, mask):
        """(plain, steered) images as arrays in [0, 1] and the features used: (site, word, feature, role)."""
        words = steering()
        swap = words.swap(take_out, put_in, strength)

        def edit():
            return fluxsae.steer(pipe, swap.specs, steps=steps, region=tokens)

        plain, steered = generate_pair(pipe, prompt, seed, edit, region=mask, output_type="np", **defaults)
        return plain.images, steered.images, swap.features

    def check_word(word, what: str) -> str | None:
        word = " ".join(str(word or "").lower().split())
        if not word:
            return None
        unknown = views.unknown_words(word, vocabulary)
        if unknown:
            raise ValueError(
                f"The model does not know {', '.join(map(repr, unknown))} (the word {what}): it knows "
                f"{', '.join(vocabulary)}."
            )
        return word

    @base.user_errors("Steering by words")
    def on_swap(
        prompt, seed, take_out, put_in, words=None, strength=STRENGTH, first=0, last=None, region=None
    ):
        start = time.perf_counter()
        prompt, seed = base.check_prompt(prompt), base.check_seed(seed)
        steps = base.step_range(first, n_steps - 1 if last in (None, "") else last)
        take_out, put_in = check_word(take_out, "to take out"), check_word(put_in, "to put in")
        if take_out is None and put_in is None:
            raise ValueError("Name a word to take out, a word to put in, or both (e.g. red and blue).")
        if (
            take_out is not None
            and f" {take_out} " not in f" {' '.join(re.findall(r'[a-z0-9]+', prompt.lower()))} "
        ):
            raise ValueError(f"The prompt does not say {take_out!r}: take out a word it says.")
        strength = views.check_number(strength, "strength", -MAX_STRENGTH, MAX_STRENGTH)
        tokens = None
        if str(words or "").strip():
            tokens = fluxsae.word_steering.text_tokens(
                pipe, prompt, str(words).strip(), int(defaults["max_sequence_length"])
            )
        mask = views.region_mask(region, size)
        with base.lock:
            plain, steered, used = swap_images(prompt, seed, take_out, put_in, strength, steps, tokens, mask)
        images = [pipe.numpy_to_pil(x)[0] for x in (plain, steered)]
        named = views.features_used(used)
        parts = [
            named,
            f"strength {strength:g}, steps {steps[0]}-{steps[-1]}",
            f"only {str(words).strip()!r}" if tokens is not None else "every word",
            "inside the painted region" if mask is not None else "the whole image",
            f"seed {seed}",
            f"{(time.perf_counter() - start) * 1000:.0f} ms",
        ]
        reads = [views.reads(i) for i in images] if vocabulary else [None, None]
        return *(base.to_display(i) for i in images), " · ".join(parts), reads[0] or "", reads[1] or ""

    return SimpleNamespace(on_swap=on_swap, swap_images=swap_images)
