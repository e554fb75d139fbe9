"""The binding probes of the Shapes model's training: per-token targets and the linear read-out.

Two linear probes, used only while `training.shapes_model` trains and then dropped, add auxiliary
losses that teach binding. On T5's output tokens each word must say which object its phrase describes
(colour, shape, size and position); on the image tokens after one double block each token must say
which object covers it. Without them T5 stayed a bag of words and two objects swapped attributes.
`text_targets` and `image_targets` are the classes per token, `AttributeProbe` the read-out and loss.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fluxsae import shapes

PROBED_ATTRIBUTES = (
    ("color", tuple(shapes.COLORS)), ("shape", shapes.SHAPES), ("size", shapes.SIZES),
    ("position", shapes.POSITIONS),
)  # fmt: skip
"""What the probes predict per token: each attribute's classes, plus one more, "no object"."""
NO_OBJECT = [len(names) for _, names in PROBED_ATTRIBUTES]
"""The "no object" class of each attribute."""
IGNORE = -100
"""A token without a target (cross_entropy's ignore_index)."""


def _object_classes(obj) -> list[int]:
    return [names.index(getattr(obj, attribute)) for attribute, names in PROBED_ATTRIBUTES]


def text_targets(scene, length: int) -> torch.Tensor:
    """[length, 4] classes for the T5 tokens of `caption(scene)` (word-level tokenizer, no bos):
    each word of an object's phrase gets that object's attributes; "and", the closing "on a ...
    background", </s> and padding get "no object"."""
    out = torch.tensor([NO_OBJECT] * length)
    objects = iter(scene.objects)
    obj = next(objects, None)
    for i, word in enumerate(shapes.caption(scene).split()[:length]):
        if word in ("and", "on"):  # the caption's only connectives: the next phrase starts after them
            obj = next(objects, None)
        elif obj is not None:
            out[i] = torch.tensor(_object_classes(obj))
    return out


def image_targets(scene) -> torch.Tensor:
    """[64, 4] classes for the image tokens (row-major 8x8): the attributes of the object that
    covers most of the token if it covers at least COVER_FRACTION of it, else "no object"."""
    out = torch.tensor([NO_OBJECT] * shapes.TOKEN_GRID**2)
    if scene.objects:
        masks = [shapes.object_mask(obj) for obj in scene.objects]
        cover = np.stack([shapes.world.token_coverage(mask).reshape(-1) for mask in masks])
        best = cover.argmax(0)
        for i, obj in enumerate(scene.objects):
            shown = torch.from_numpy((best == i) & (cover[i] >= shapes.world.COVER_FRACTION))
            out[shown] = torch.tensor(_object_classes(obj))
    return out


class AttributeProbe(torch.nn.Module):
    """A linear read-out, per token, of the attributes of the object the token stands for (training
    only: it shapes what the text encoder and the transformer compute, and is not saved)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = torch.nn.Linear(dim, sum(n + 1 for n in NO_OBJECT))

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over attributes of the cross-entropy; `hidden` [b, t, d], `targets` [b, t, 4]."""
        logits = self.linear(hidden.float()).split([n + 1 for n in NO_OBJECT], dim=-1)
        losses = [
            F.cross_entropy(z.flatten(0, 1), targets[..., i].flatten(), ignore_index=IGNORE)
            for i, z in enumerate(logits)
        ]
        return torch.stack(losses).mean()
