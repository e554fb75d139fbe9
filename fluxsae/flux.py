"""FLUX.1 facts in one place: its real transformer geometry and how it is sampled.

The geometry is the `transformer/config.json` of the Hub repositories (diffusers format), known
without downloading 24 GB of weights: it lets sites, dictionary shapes and memory estimates be
checked against FLUX.1 on the `meta` device. The generation defaults are what every caller (the
harvest, the app, the benchmarks) passes to `pipe(...)`.
"""

from __future__ import annotations

import torch

_FLUX1_COMMON = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

FLUX1_TRANSFORMER_CONFIGS: dict[str, dict] = {
    "black-forest-labs/FLUX.1-schnell": {**_FLUX1_COMMON, "guidance_embeds": False},
    "black-forest-labs/FLUX.1-dev": {**_FLUX1_COMMON, "guidance_embeds": True},
}


def meta_transformer(repo_id: str = "black-forest-labs/FLUX.1-schnell"):
    """FLUX.1's `FluxTransformer2DModel` with every tensor on the `meta` device (no memory)."""
    from diffusers import FluxTransformer2DModel

    try:
        cfg = FLUX1_TRANSFORMER_CONFIGS[repo_id]
    except KeyError:
        raise KeyError(
            f"No stored config for {repo_id!r}; known: {sorted(FLUX1_TRANSFORMER_CONFIGS)}."
        ) from None
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(cfg)


SCHNELL_GENERATION = {"height": 256, "width": 256, "num_inference_steps": 4, "max_sequence_length": 256,
                      "guidance_scale": 0.0}  # fmt: skip
"""FLUX.1-schnell as the reference work ran it: timestep-distilled, 4 steps, no guidance, T5 limited to
256 tokens; 256 x 256 px -> 16 x 16 image tokens."""

DEV_GENERATION = {"height": 256, "width": 256, "num_inference_steps": 28, "max_sequence_length": 512,
                  "guidance_scale": 3.5}  # fmt: skip
"""FLUX.1-dev: guidance-distilled (guidance is an input of the transformer), 28 steps."""


def flux1_generation(transformer_config=None) -> dict:
    """The call arguments for a FLUX.1 pipeline whose transformer has `transformer_config`: dev's when
    it embeds guidance, schnell's otherwise (a fresh dict)."""
    dev = getattr(transformer_config, "guidance_embeds", False)
    return dict(DEV_GENERATION if dev else SCHNELL_GENERATION)
