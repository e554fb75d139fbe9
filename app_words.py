"""The app's "steer by words" panel: take one word's concept out of the text stream and put another's
in (`fluxsae.word_steering`), optionally only for some words of the prompt and only inside a painted
region of the image (`fluxsae.regions.generate_pair`), original and steered side by side from one seed.

What runs the pipeline is one function, `swap_images`, wrapped like the other handlers' (the app's lock
outside, ZeroGPU's `spaces.GPU` inside): it takes and returns only picklable values.
"""

from __future__ import annotations

import difflib
import re
import time
from types import SimpleNamespace

import app_views as views
import fluxsae
from fluxsae.regions import generate_pair
from fluxsae.word_steering import (
    MAX_STRENGTH,
    STRENGTH,
    WordSteering,
    phrase_of,
    shapes_captions,
    template_captions,
)


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

    def check_swap(prompt: str, take_out, put_in, words, strength):
        """(take_out, put_in, the object's phrase or None, its text-token mask or None, strength), checked
        against the prompt; `words` (a word or two of one object) are widened to their phrase."""
        take_out, put_in = check_word(take_out, "to take out"), check_word(put_in, "to put in")
        said = f" {' '.join(re.findall(r'[a-z0-9]+', prompt.lower()))} "
        if take_out is not None and f" {take_out} " not in said:
            raise ValueError(f"The prompt does not say {take_out!r}: take out a word it says.")
        strength = views.check_number(strength, "strength", -MAX_STRENGTH, MAX_STRENGTH)
        phrase = tokens = None
        if str(words or "").strip():
            limit = int(defaults["max_sequence_length"])
            phrase = phrase_of(prompt, str(words))  # the object's whole phrase
            tokens = fluxsae.word_steering.text_tokens(pipe, prompt, phrase, limit)
        return take_out, put_in, phrase, tokens, strength

    def steered_pair(prompt, seed, take_out, put_in, strength, steps, tokens, mask, phrase, start):
        """The swap's images and the outputs the panel shows (original, steered, statistics, reads)."""
        with base.lock:
            plain, steered, used = swap_images(prompt, seed, take_out, put_in, strength, steps, tokens, mask)
        images = [pipe.numpy_to_pil(x)[0] for x in (plain, steered)]
        parts = [
            views.features_used(used),
            f"strength {strength:g}, steps {steps[0]}-{steps[-1]}",
            "every word" if phrase is None else f"only {phrase!r}",
            "inside the painted region" if mask is not None else "the whole image",
            f"seed {seed}",
            f"{(time.perf_counter() - start) * 1000:.0f} ms",
        ]
        reads = [views.reads(i) for i in images] if vocabulary else ["", ""]
        return *(base.to_display(i) for i in images), " · ".join(parts), *reads

    @base.user_errors("Steering by words")
    def on_swap(
        prompt, seed, take_out, put_in, words=None, strength=STRENGTH, first=0, last=None, region=None
    ):
        start = time.perf_counter()
        prompt, seed = base.check_prompt(prompt), base.check_seed(seed)
        steps = base.step_range(first, n_steps - 1 if last in (None, "") else last)
        take_out, put_in, phrase, tokens, strength = check_swap(prompt, take_out, put_in, words, strength)
        if take_out is None and put_in is None:
            raise ValueError("Name a word to take out, a word to put in, or both (e.g. red and blue).")
        mask = views.region_mask(region, size)
        return steered_pair(prompt, seed, take_out, put_in, strength, steps, tokens, mask, phrase, start)

    @base.user_errors("Steering A towards B")
    def on_towards(prompt_a, prompt_b, seed, strength=STRENGTH):
        """Prompt A steered towards prompt B: the words B says instead of A's, swapped in A's text stream."""
        start = time.perf_counter()
        prompt_a, prompt_b = base.check_prompt(prompt_a), base.check_prompt(prompt_b)
        seed = base.check_seed(seed)
        take_out, put_in = changed_words(prompt_a, prompt_b)
        take_out, put_in, _, _, strength = check_swap(prompt_a, take_out, put_in, None, strength)
        steps = list(range(n_steps))
        return steered_pair(prompt_a, seed, take_out, put_in, strength, steps, None, None, None, start)

    return SimpleNamespace(on_swap=on_swap, on_towards=on_towards, swap_images=swap_images, steering=steering,
                           check_swap=check_swap, vocabulary=vocabulary)  # fmt: skip


def changed_words(prompt_a: str, prompt_b: str) -> tuple[str | None, str | None]:
    """(A's words, B's words) of the first place the two prompts differ: "a red circle" / "a blue circle"
    -> ("red", "blue"); a word only one of them has -> (it, None) or (None, it)."""
    a, b = (re.findall(r"[a-z0-9]+", p.lower()) for p in (prompt_a, prompt_b))
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op != "equal":
            return " ".join(a[i1:i2]) or None, " ".join(b[j1:j2]) or None
    raise ValueError("The two prompts say the same words: change a word of the second one.")
