"""Steer a generation by words: take one word's concept out of the text stream and put another's in.

What an image shows of its caption is decided in the text stream: every image token reads it through
joint attention at every block, so on the Shapes model a swap of text-stream SAE features recolours
an object in 82-93% of trials, where image-stream features move it in under 20%
(benchmarks/results/steering.json). "Make the red thing blue" is therefore: at every text site that
has a dictionary, clamp the features of "red" to 0 and add the feature of "blue", on every step.

    words = WordSteering(pipe, text_dictionaries, shapes_captions)   # one dictionary per text site
    swap = words.swap("red", "blue")                                   # features found once, cached
    with fluxsae.steer(pipe, swap.specs, steps=None, region=words.tokens(prompt, "red circle")):
        image = pipe(prompt, ...).images[0]                            # only that object's phrase
    swap.features                                                      # what it used, per site

A word's features are those that best tell captions naming it from the same captions naming another
word of its kind (`fluxsae.features.caption_features`): "red" against the other colours. Captions come
from a `captions(word)` function: `shapes_captions` for the Shapes world, `template_captions` for any
model.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from fluxsae.features import caption_features
from fluxsae.hooks import capture
from fluxsae.sites import parse_site

logger = logging.getLogger(__name__)

REMOVED = 3
"""Features of the word taken out that are clamped to 0 at each site (its feature splits across a few)."""
STRENGTH = 0.6
"""Strength of the word put in, in mean token norms (benchmarks/results/steering.json: 0.3 / 0.6 / 1.0
turned and kept 70 / 83 / 73% of the sweep's trials)."""
MAX_STRENGTH = 10.0
"""Largest strength accepted: beyond a few mean token norms the caption is noise."""
CAPTIONS = 8
"""Captions on each side when a word's features are found."""

Captions = Callable[[str], tuple[list[str], list[str]]]


class Swap(NamedTuple):
    """What `WordSteering.swap` plans: `steer` specs, and the features used."""

    specs: list[tuple]
    """[(dictionary, {feature: value}, mode)] for `fluxsae.steer(pipe, specs, steps=None)`."""
    features: list[tuple[str, str, int, str]]
    """(site, word, feature, "clamp to 0" | "add")."""


def shapes_captions(word: str, n: int = CAPTIONS, seed: int = 0) -> tuple[list[str], list[str]]:
    """One-object Shapes captions naming `word`, and the same scenes with another word of its kind
    (another colour, shape, size, cell or background) in its place. ValueError for a word the Shapes
    world does not know, naming the words it does."""
    from fluxsae import shapes

    kinds = {
        "color": tuple(shapes.COLORS),
        "shape": shapes.SHAPES,
        "size": shapes.SIZES,
        "position": shapes.POSITIONS,
        "background": tuple(shapes.BACKGROUNDS),
    }
    kind = next((k for k, values in kinds.items() if word in values), None)
    if kind is None:
        known = [v for values in kinds.values() for v in values]
        raise ValueError(f"The Shapes model knows no {word!r}; steer by one of: {', '.join(known)}.")
    with_word, without = [], []
    for i, scene in enumerate(shapes.sample_scenes(n, seed=seed, n_objects=1)):
        others = [v for v in kinds[kind] if v != word]
        other = others[i % len(others)]
        if kind == "background":
            named, swapped = (shapes.Scene(scene.objects, b) for b in (word, other))
        else:
            obj = scene.objects[0]
            named, swapped = (
                shapes.Scene((shapes.Object(**{**_attributes(obj), kind: v}),), scene.background)
                for v in (word, other)
            )
        with_word.append(shapes.caption(named))
        without.append(shapes.caption(swapped))
    return with_word, without


def _attributes(obj) -> dict:
    return {"shape": obj.shape, "color": obj.color, "size": obj.size, "position": obj.position}


TEMPLATES = ("a photo of a {} object", "a {} thing on a table", "an image of something {}", "a {} shape")


def template_captions(word: str, n: int = len(TEMPLATES)) -> tuple[list[str], list[str]]:
    """Captions naming `word` in a few templates, and the same captions without it: for any model."""
    if not re.fullmatch(r"[\w\- ]{1,40}", word or ""):
        raise ValueError(f"Steer by a word or two (letters, up to 40 characters), got {word!r}.")
    with_word = [t.format(word) for t in TEMPLATES[:n]]
    return with_word, [re.sub(r"\s+", " ", t.format("")).strip() for t in TEMPLATES[:n]]


class WordSteering:
    """Finds the features of words at every text site that has a dictionary, and plans swaps of them.

    pipe: the pipeline the dictionaries read; dictionaries: text-stream dictionaries (one per site);
    captions: word -> (captions naming it, the same captions without it); generation: the arguments of
    the generations that find the features (e.g. `fluxsae.shapes.GENERATION_DEFAULTS`).
    """

    def __init__(self, pipe, dictionaries: Sequence, captions: Captions, generation: dict | None = None):
        self.pipe = pipe
        self.dictionaries = [d for d in dictionaries if parse_site(d.site).stream == "text"]
        if not self.dictionaries:
            raise ValueError(
                "Steering by words needs a dictionary of the text stream (e.g. transformer_blocks.3.text)."
            )
        self.captions = captions
        self.generation = dict(generation or {})
        self._cache: dict[str, dict[str, list[int]]] = {}
        self._lock = threading.Lock()

    @property
    def sites(self) -> list[str]:
        return [d.site for d in self.dictionaries]

    def features(self, word: str) -> dict[str, list[int]]:
        """site -> the word's REMOVED best features there, best first (cached per word)."""
        word = str(word).strip().lower()
        with self._lock:
            if word not in self._cache:
                with_word, without = self.captions(word)
                acts = [self._capture(c) for c in (with_word, without)]
                found = {
                    d.site: caption_features(d, acts[0][d.site], acts[1][d.site], REMOVED)
                    for d in self.dictionaries
                }
                if not any(found.values()):
                    raise ValueError(
                        f"No text feature tells captions naming {word!r} from others; pick another word."
                    )
                self._cache[word] = found
                logger.info("features of %r: %s", word, found)
            return self._cache[word]

    def _capture(self, captions: list[str]) -> dict:
        generator = [torch.Generator().manual_seed(i) for i in range(len(captions))]
        with torch.no_grad(), capture(self.pipe, self.sites) as acts:
            self.pipe(captions, generator=generator, output_type="latent", **self.generation)
        return {site: acts[site] for site in self.sites}

    def swap(self, take_out: str | None, put_in: str | None, strength: float = STRENGTH) -> Swap:
        """The steer specs that clamp `take_out`'s features to 0 and add `put_in`'s best at `strength`, at
        every text site (either word may be None: only remove, or only add)."""
        if not take_out and not put_in:
            raise ValueError("Name a word to take out, a word to put in, or both.")
        if (
            isinstance(strength, bool)
            or not isinstance(strength, (int, float))
            or not math.isfinite(strength)
        ):
            raise ValueError(f"The strength must be a finite number, got {strength!r}.")
        if not -MAX_STRENGTH <= strength <= MAX_STRENGTH:
            raise ValueError(
                f"The strength must be within +-{MAX_STRENGTH:g} mean token norms, got {strength:g}."
            )
        out_features = self.features(take_out) if take_out else {}
        in_features = self.features(put_in) if put_in else {}
        specs, used = [], []
        for d in self.dictionaries:
            removed = [f for f in out_features.get(d.site, []) if f not in in_features.get(d.site, [])[:1]]
            if removed:
                specs.append((d, dict.fromkeys(removed, 0.0), "clamp"))
                used += [(d.site, take_out, f, "clamp to 0") for f in removed]
            added = in_features.get(d.site, [])[:1]
            if added and strength:
                specs.append((d, {added[0]: float(strength)}, "add"))
                used += [(d.site, put_in, added[0], "add")]
        if not specs:
            raise ValueError("Nothing to steer: the words' features cancel out at every site.")
        return Swap(specs, used)

    def tokens(
        self, prompt: str, words: str, max_sequence_length: int | None = None, *, whole_phrase: bool = True
    ) -> torch.Tensor:
        """bool [max_sequence_length] over the T5 tokens of `prompt`, for `steer(region=...)` at text sites:
        the phrase of `prompt` that holds `words` (`phrase_of`; `whole_phrase=False`: only the tokens of
        `words`, their first occurrence). ValueError when `words` are not in it."""
        limit = max_sequence_length or self.generation.get("max_sequence_length", 512)
        return text_tokens(self.pipe, prompt, phrase_of(prompt, words) if whole_phrase else words, limit)


PHRASE_BOUNDARY = re.compile(r",|;|\.|\band\b|\bwith\b|\bon an?\b|\bon the\b", re.IGNORECASE)
"""Where one object's phrase of a prompt ends: punctuation, "and", "with", "on a/the" (the background)."""


def phrase_of(prompt: str, words: str) -> str:
    """The phrase of `prompt` that holds `words` (first occurrence), from the boundary before them to the
    one after (PHRASE_BOUNDARY): "red circle" in "a small red circle at the top left and a blue square on
    a white background" -> "a small red circle at the top left". A swap restricted to the colour and shape
    words alone changes nothing: the T5 encoder has spread the object's attributes over its whole phrase
    (0 of 10 two-object trials turn, against 8 of 10 for the phrase; docs/research-log.md). ValueError when
    `words` are not in the prompt."""
    words = " ".join(str(words).split())
    found = re.search(r"\b" + r"\s+".join(map(re.escape, words.split())) + r"\b", prompt, re.IGNORECASE)
    if not words or found is None:
        raise ValueError(
            f"{words!r} is not in the prompt {prompt[:80]!r}: name words the prompt says, e.g. one object's."
        )
    before = [m.end() for m in PHRASE_BOUNDARY.finditer(prompt, 0, found.start())]
    after = PHRASE_BOUNDARY.search(prompt, found.end())
    return prompt[before[-1] if before else 0 : after.start() if after else len(prompt)].strip()


def text_tokens(pipe, prompt: str, words: str, max_sequence_length: int) -> torch.Tensor:
    """bool [max_sequence_length]: the T5 tokens of `prompt` that spell `words` (first occurrence)."""
    tokenizer = pipe.tokenizer_2
    ids = tokenizer(prompt, max_length=max_sequence_length, truncation=True)["input_ids"]
    wanted = tokenizer(words, add_special_tokens=False)["input_ids"]
    mask = torch.zeros(max_sequence_length, dtype=torch.bool)
    for start in range(len(ids) - len(wanted) + 1):
        if wanted and ids[start : start + len(wanted)] == wanted:
            mask[start : start + len(wanted)] = True
            return mask
    raise ValueError(
        f"{words!r} is not in the prompt {prompt[:80]!r}: name words the prompt says, e.g. one object's."
    )
