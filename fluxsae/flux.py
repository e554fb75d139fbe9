"""FLUX.1 facts in one place: its real geometry, how it is sampled, and a random-weight copy of it.

The geometry is the `config.json` of each component of the Hub repositories (diffusers format), known
without downloading 34 GB of weights: it lets sites, dictionary shapes and memory estimates be
checked against FLUX.1 on the `meta` device, and `random_flux_pipeline` builds the real
`FluxPipeline` from it with random weights (word-level tokenizers in place of CLIP's BPE and T5's
SentencePiece), so every shape, memory and speed figure that does not depend on trained weights can be
measured with no download. The generation defaults are what every caller (the harvest, the app, the
benchmarks) passes to `pipe(...)`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping

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


# -- the other components' configs (text_encoder/, text_encoder_2/, vae/, scheduler/ of the Hub repos) --

CLIP_L_CONFIG = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
    "initializer_range": 0.02, "initializer_factor": 1.0,
}  # fmt: skip
"""FLUX.1's `text_encoder`: the text tower of openai/clip-vit-large-patch14 (123M parameters). Its
token ids (bos 0, eos 2, pad 1) are those of the real BPE vocabulary; `random_flux_pipeline` sets those
of its word-level one instead."""

T5_XXL_CONFIG = {
    "vocab_size": 32128, "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
    "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0,
    "is_encoder_decoder": False, "use_cache": False, "tie_word_embeddings": False,
}  # fmt: skip
"""FLUX.1's `text_encoder_2`: the encoder of google/t5-v1_1-xxl (4.76B parameters)."""

FLUX1_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 2, "norm_num_groups": 32,
    "act_fn": "silu", "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
    "force_upcast": True,
}  # fmt: skip
"""FLUX.1's `AutoencoderKL` (84M parameters): 16 latent channels, x8 down-sampling."""

_SCHEDULER_COMMON = {"num_train_timesteps": 1000, "base_image_seq_len": 256, "max_image_seq_len": 4096,
                     "base_shift": 0.5, "max_shift": 1.15}  # fmt: skip
FLUX1_SCHEDULER_CONFIGS: dict[str, dict] = {
    "black-forest-labs/FLUX.1-schnell": {**_SCHEDULER_COMMON, "shift": 1.0, "use_dynamic_shifting": False},
    "black-forest-labs/FLUX.1-dev": {**_SCHEDULER_COMMON, "shift": 3.0, "use_dynamic_shifting": True},
}
"""FLUX.1's `FlowMatchEulerDiscreteScheduler`: schnell's is a plain shift, dev's is resolution-dependent."""

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae", "scheduler")
"""The components `random_flux_pipeline` builds from a config (and whose fields it lets you change)."""

CLIP_MAX_LENGTH, T5_MAX_LENGTH = 77, 512
"""Tokenizer lengths of FLUX.1: CLIP's 77 positions; T5 reads up to 512 tokens (`max_sequence_length`)."""


def flux1_configs(repo_id: str = "black-forest-labs/FLUX.1-schnell") -> dict[str, dict]:
    """The config of each component of FLUX.1 (`COMPONENTS`), as fresh dicts."""
    try:
        transformer = FLUX1_TRANSFORMER_CONFIGS[repo_id]
    except KeyError:
        raise KeyError(
            f"No stored config for {repo_id!r}; known: {sorted(FLUX1_TRANSFORMER_CONFIGS)}."
        ) from None
    configs = {"transformer": {k: v for k, v in transformer.items() if not k.startswith("_")},
               "text_encoder": CLIP_L_CONFIG, "text_encoder_2": T5_XXL_CONFIG, "vae": FLUX1_VAE_CONFIG,
               "scheduler": FLUX1_SCHEDULER_CONFIGS[repo_id]}  # fmt: skip
    return copy.deepcopy(configs)


def apply_overrides(configs: dict[str, dict], overrides: Mapping[str, Mapping] | None) -> dict[str, dict]:
    """`configs` with `overrides` ({component: {field: value}}) applied; a component or field that the
    config does not have is an error (a typo would otherwise build full-size FLUX.1 silently)."""
    out = copy.deepcopy(configs)
    for component, fields in (overrides or {}).items():
        if component not in out:
            raise ValueError(f"Unknown component {component!r} to override; the components are {COMPONENTS}.")
        unknown = sorted(set(fields) - set(out[component]))
        if unknown:
            raise ValueError(
                f"{component} has no field(s) {unknown}; its fields are {sorted(out[component])}."
            )
        out[component].update(copy.deepcopy(dict(fields)))
    t = out["transformer"]
    if sum(t["axes_dims_rope"]) != t["attention_head_dim"]:
        raise ValueError(
            f"transformer.axes_dims_rope {t['axes_dims_rope']} must sum to attention_head_dim "
            f"{t['attention_head_dim']} (Flux's rotary embedding splits each head); change both."
        )
    t["joint_attention_dim"] = out["text_encoder_2"]["d_model"]  # T5's width feeds the transformer
    t["pooled_projection_dim"] = out["text_encoder"]["projection_dim"]  # CLIP's pooled vector too
    vae = out["vae"]
    t["in_channels"] = 4 * vae["latent_channels"]  # latents are packed 2x2
    n = len(vae["block_out_channels"])
    vae["down_block_types"], vae["up_block_types"] = ["DownEncoderBlock2D"] * n, ["UpDecoderBlock2D"] * n
    return out


def parse_override(item: str) -> tuple[str, str, object]:
    """'transformer.num_layers=2' -> ("transformer", "num_layers", 2); the value is read as JSON
    ('[16, 32]', 'true'), else kept as a string."""
    import json

    key, sep, value = item.partition("=")
    component, dot, field = key.strip().partition(".")
    if not sep or not dot or not field:
        raise ValueError(f"{item!r}: expected COMPONENT.FIELD=VALUE, e.g. transformer.num_layers=2.")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return component, field, parsed


def overrides_from(items: Iterable[str]) -> dict[str, dict]:
    """["transformer.num_layers=2", "vae.block_out_channels=[16,32]"] -> {component: {field: value}}."""
    out: dict[str, dict] = {}
    for item in items:
        component, field, value = parse_override(item)
        out.setdefault(component, {})[field] = value
    return out


@contextlib.contextmanager
def _building(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules created inside are allocated on `device` in `dtype` from the start: at full size a float32
    copy first would need 67 GB."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def random_flux_pipeline(
    repo_id: str = "black-forest-labs/FLUX.1-schnell",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    overrides: Mapping[str, Mapping] | None = None,
    words: Iterable[str] | None = None,
):
    """FLUX.1's `diffusers.FluxPipeline` built from its real configs with random weights, on `device`.

    overrides: {component: {field: value}} changes the configs (see `COMPONENTS`), e.g.
        {"transformer": {"num_layers": 2, "num_single_layers": 2}, "text_encoder_2": {"num_layers": 2}}
        to run at reduced depth on a CPU. The transformer's text and latent widths follow T5's, CLIP's
        and the VAE's. `device="meta"` builds the full-size pipeline with no memory at all.
    words: the vocabulary of the word-level tokenizers (unknown words map to <unk>); default the tiny
        pipeline's 20 words plus nothing else, which is enough for shapes, memory and speed.
    Weights are seeded: one `seed`, device type and dtype give the same pipeline every time.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fluxsae.tiny import BOS, EOS, PAD, TINY_WORDS, word_level_tokenizer

    configs = apply_overrides(flux1_configs(repo_id), overrides)
    device = torch.device(device)
    words = list(TINY_WORDS if words is None else words)
    clip_length = configs["text_encoder"]["max_position_embeddings"]
    tokenizer = word_level_tokenizer(words, clip_length, add_bos=True)
    tokenizer_2 = word_level_tokenizer(words, T5_MAX_LENGTH, add_bos=False)
    ids = {"pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}
    for name, cfg in (
        ("text_encoder", configs["text_encoder"]),
        ("text_encoder_2", configs["text_encoder_2"]),
    ):
        if cfg["vocab_size"] < len(tokenizer):
            raise ValueError(
                f"{name}.vocab_size {cfg['vocab_size']} is below the {len(tokenizer)} words given."
            )
    torch.manual_seed(seed)
    with _building(device, dtype):
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"], **ids)).eval()
        t5 = {k: v for k, v in ids.items() if k != "bos_token_id"}
        text_encoder_2 = T5EncoderModel(T5Config(**configs["text_encoder_2"], **t5)).eval()
        vae = AutoencoderKL(**configs["vae"]).eval()
        transformer = FluxTransformer2DModel(**configs["transformer"]).eval()
    for module in (text_encoder, text_encoder_2, vae, transformer):
        module.requires_grad_(False)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**configs["scheduler"]), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts(pipe) -> dict[str, int]:
    """Parameters of each module of a pipeline (works on the `meta` device)."""
    return {name: sum(p.numel() for p in m.parameters()) for name, m in pipe.components.items()
            if isinstance(m, torch.nn.Module)}  # fmt: skip
