"""Sites: names for residual-stream tensors inside a Flux transformer.

A site is `"<block path>.<stream>"`, e.g. `transformer_blocks.18.image` or
`single_transformer_blocks.9.text`. The block path is the module path inside
`pipe.transformer`; the value is that block's output, i.e. the residual stream after the block.
Site strings are also folder names on disk and on the Hub, so they are strict: no spaces, no
leading zeros, lower case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

BlockKind = Literal["transformer_blocks", "single_transformer_blocks"]
Stream = Literal["image", "text"]

BLOCK_KINDS: tuple[str, ...] = ("transformer_blocks", "single_transformer_blocks")
STREAMS: tuple[str, ...] = ("image", "text")

# Both FluxTransformerBlock and FluxSingleTransformerBlock return
# `(encoder_hidden_states, hidden_states)`, i.e. (text, image). This is the one place that knows it.
_OUTPUT_POSITION = {"text": 0, "image": 1}

_SITE_RE = re.compile(r"^(?P<kind>[a-z_]+)\.(?P<index>0|[1-9][0-9]*)\.(?P<stream>[a-z]+)$")


class SiteError(ValueError):
    """A site string that is malformed or does not exist in the given transformer."""


@dataclass(frozen=True, order=True)
class Site:
    """One residual-stream tensor: the `stream` output of block `index` of `kind`."""

    kind: BlockKind
    """`transformer_blocks` (double-stream, MMDiT) or `single_transformer_blocks`."""
    index: int
    """Block index inside its ModuleList, from 0."""
    stream: Stream
    """`image` (the image tokens) or `text` (the T5 tokens)."""

    def __str__(self) -> str:
        return f"{self.kind}.{self.index}.{self.stream}"

    @property
    def module_path(self) -> str:
        """The block's module path inside `pipe.transformer`, e.g. `transformer_blocks.18`."""
        return f"{self.kind}.{self.index}"

    @property
    def output_position(self) -> int:
        """Where this stream sits in the block's returned tuple."""
        return _OUTPUT_POSITION[self.stream]


def parse_site(site: str | Site) -> Site:
    """Parse `"transformer_blocks.18.image"` into a `Site`, checking only the syntax."""
    if isinstance(site, Site):
        return site
    if not isinstance(site, str):
        raise SiteError(
            f"A site must be a string like 'transformer_blocks.18.image', got {type(site).__name__}."
        )
    m = _SITE_RE.match(site.strip())
    if m is None:
        raise SiteError(
            f"Malformed site {site!r}: expected '<block kind>.<index>.<stream>' such as "
            f"'transformer_blocks.18.image' or 'single_transformer_blocks.9.text'."
        )
    kind, stream = m["kind"], m["stream"]
    if kind not in BLOCK_KINDS:
        raise SiteError(
            f"Unknown block kind {kind!r} in site {site!r}: choose one of {', '.join(BLOCK_KINDS)}."
        )
    if stream not in STREAMS:
        raise SiteError(f"Unknown stream {stream!r} in site {site!r}: choose one of {', '.join(STREAMS)}.")
    return Site(kind, int(m["index"]), stream)  # type: ignore[arg-type]


def _transformer_of(model) -> nn.Module:
    """Accept a FluxPipeline or its transformer."""
    return getattr(model, "transformer", model)


def _n_blocks(transformer: nn.Module, kind: str) -> int:
    blocks = getattr(transformer, kind, None)
    if blocks is None:
        raise SiteError(
            f"{type(transformer).__name__} has no '{kind}': sites are defined for diffusers' "
            f"FluxTransformer2DModel (FLUX.1 and the Shapes model)."
        )
    return len(blocks)


def validate_site(model, site: str | Site) -> Site:
    """Parse `site` and check it exists in `model` (a FluxPipeline or FluxTransformer2DModel)."""
    s = parse_site(site)
    transformer = _transformer_of(model)
    n = _n_blocks(transformer, s.kind)
    if not 0 <= s.index < n:
        raise SiteError(
            f"Block index {s.index} is out of range in site '{s}': this transformer has {n} "
            f"{s.kind} (valid indices 0-{n - 1})."
        )
    return s


def resolve_site(model, site: str | Site) -> tuple[Site, nn.Module]:
    """The validated `Site` and the block module whose output it names."""
    s = validate_site(model, site)
    return s, getattr(_transformer_of(model), s.kind)[s.index]


def all_sites(model) -> list[Site]:
    """Every site of `model`: each double and single block, image and text streams."""
    transformer = _transformer_of(model)
    return [
        Site(kind, i, stream)  # type: ignore[arg-type]
        for kind in BLOCK_KINDS
        for i in range(_n_blocks(transformer, kind))
        for stream in STREAMS
    ]


def site_dim(model, site: str | Site) -> int:
    """The residual width d at `site` (3072 for FLUX.1)."""
    validate_site(model, site)
    return int(_transformer_of(model).inner_dim)
