"""FLUX.1's real transformer geometry, known without downloading 24 GB of weights.

These are the `transformer/config.json` files of the Hub repositories (diffusers format). They
let sites, SAE shapes and memory estimates be checked against FLUX.1 on the `meta` device.
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
