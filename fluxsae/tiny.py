"""A tiny random `FluxPipeline`, built offline in about a second.

The tests, the benchmarks and the app (before the Shapes model is packaged) need a real
`diffusers.FluxPipeline` with the exact classes FLUX.1 uses, but neither FLUX.1's weights nor the
Hub are reachable here. This module builds one from configs alone: word-level tokenizers made
with the `tokenizers` library, tiny CLIP and T5 text encoders, a tiny `AutoencoderKL` that
down-samples x4 and a tiny `FluxTransformer2DModel`. The weights are random (seeded), so the
images are noise-like, but every code path of FLUX.1 (hooks, sites, steering, NF4) runs on it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# Special tokens first, in this order. The eos id must not be 2: for eos_token_id == 2,
# transformers' CLIPTextModel falls back to legacy argmax pooling, wrong for our vocabulary.
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
PAD, UNK, BOS, EOS = range(4)

TINY_WORDS = (
    "a", "an", "the", "red", "green", "blue", "yellow", "circle", "square", "triangle",
    "small", "large", "on", "in", "at", "background", "cat", "dog", "photo", "of",
)  # fmt: skip

TINY_GENERATION = {
    "height": 32,
    "width": 32,
    "num_inference_steps": 4,
    "max_sequence_length": 12,
    "guidance_scale": 0.0,
}
"""Call arguments the tiny pipeline is built for: 32x32 images -> 8x8 latents -> 4x4 = 16 image
tokens, and 12 text tokens (a different count, so a stream mix-up shows in the shapes)."""


def word_level_tokenizer(words: Iterable[str], model_max_length: int, add_bos: bool):
    """A `PreTrainedTokenizerFast` over whole words: unknown words map to `<unk>`, and `</s>` is
    always appended (CLIP pools the hidden state at the first eos; T5 expects it at the end).

    transformers' `CLIPTokenizer` and `T5TokenizerFast` insist on BPE and Unigram models, so a
    word-level vocabulary is wrapped in the generic fast tokenizer, which FluxPipeline accepts.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in sorted(set(words) - set(SPECIAL_TOKENS)):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "<s> $A </s>" if add_bos else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(
        single=template, pair=f"{template} $B </s>", special_tokens=[("<s>", BOS), ("</s>", EOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="right",
        truncation_side="right",
    )


def flux_components(
    words: Iterable[str] = TINY_WORDS,
    *,
    seed: int = 0,
    clip_dim: int = 32,
    t5_dim: int = 32,
    text_layers: int = 2,
    clip_max_length: int = 16,
    vae_channels: tuple[int, ...] = (8, 16, 16),
    latent_channels: int = 4,
    num_layers: int = 2,
    num_single_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 16,
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6),
) -> dict:
    """The seven components of a `FluxPipeline`, randomly initialised from `seed`.

    `vae_channels` sets the VAE depth: len(vae_channels) - 1 halvings, so (8, 16, 16) is x4.
    `sum(axes_dims_rope)` must equal `head_dim` (Flux's rotary embedding splits the head).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    words = list(words)
    tokenizer = word_level_tokenizer(words, clip_max_length, add_bos=True)
    tokenizer_2 = word_level_tokenizer(words, 512, add_bos=False)
    vocab_size = len(tokenizer)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=clip_dim, intermediate_size=2 * clip_dim,
            num_hidden_layers=text_layers, num_attention_heads=max(2, clip_dim // 32),
            max_position_embeddings=clip_max_length,
            projection_dim=clip_dim, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
            attention_dropout=0.0, dropout=0.0, hidden_act="gelu",
        )
    ).eval()  # fmt: skip
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=vocab_size, d_model=t5_dim, d_ff=2 * t5_dim, d_kv=t5_dim // 4, num_layers=text_layers,
            num_heads=4, dropout_rate=0.0, pad_token_id=PAD, eos_token_id=EOS,
            feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        )
    ).eval()  # fmt: skip
    n = len(vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=vae_channels, layers_per_block=1, norm_num_groups=min(vae_channels) // 2,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.0, shift_factor=0.0,
    ).eval()  # fmt: skip
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=num_layers,
        num_single_layers=num_single_layers, attention_head_dim=head_dim, num_attention_heads=num_heads,
        joint_attention_dim=t5_dim, pooled_projection_dim=clip_dim, guidance_embeds=False,
        axes_dims_rope=axes_dims_rope,
    ).eval()  # fmt: skip
    # Dynamic shifting assumes FLUX.1's 256-4096 image tokens; for a handful it moves the schedule.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return dict(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )  # fmt: skip


def tiny_flux_pipeline(seed: int = 0, **kwargs):
    """A random tiny `FluxPipeline` on CPU, float32; generate with `**TINY_GENERATION`."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**flux_components(seed=seed, **kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe
