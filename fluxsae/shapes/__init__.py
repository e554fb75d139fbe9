"""The Shapes world: scenes of 1-2 coloured shapes with exact per-token concept labels, their
captions, and a reader that recovers a scene from pixels (see `world` and `reader`)."""

from fluxsae.shapes.reader import attribute_accuracy, read_attributes
from fluxsae.shapes.world import (
    BACKGROUNDS,
    COLORS,
    GENERATION_DEFAULTS,
    HELD_OUT_PAIRS,
    IMAGE_SIZE,
    PATCH,
    POSITIONS,
    SHAPES,
    SIZES,
    TOKEN_GRID,
    Object,
    Scene,
    caption,
    concept_names,
    object_mask,
    render,
    sample_scenes,
    token_masks,
    vocabulary,
)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "GENERATION_DEFAULTS",
    "HELD_OUT_PAIRS",
    "IMAGE_SIZE",
    "PATCH",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "TOKEN_GRID",
    "Object",
    "Scene",
    "attribute_accuracy",
    "caption",
    "concept_names",
    "object_mask",
    "read_attributes",
    "render",
    "sample_scenes",
    "token_masks",
    "vocabulary",
]
