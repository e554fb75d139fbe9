"""Train the Shapes model from scratch on CPU and save it as a stock diffusers FluxPipeline.

    python -m training.shapes_model                   # -> fluxsae/shapes/model
    python -m training.shapes_model --out /tmp/m --vae-steps 200 --dit-steps 200   # a quick try

Three stages, each seeded and resumable (checkpoints are written atomically every
`--checkpoint-every` steps into `--work`; run the same command again after a kill):
  1. the VAE (AutoencoderKL, x4 down-sampling: 64x64 images -> 16x16x4 latents -> 8x8 tokens);
  2. the latent statistics (scaling_factor / shift_factor: diffusers' defaults are wrong here);
  3. the transformer (FluxTransformer2DModel) with both text encoders (tiny CLIP and T5), trained
     jointly by flow matching exactly as FluxPipeline samples: sigma in [0, 1],
     x_t = (1 - sigma) x0 + sigma noise, target noise - x0, prompts through `pipe.encode_prompt`
     with the fixed `max_sequence_length` of GENERATION_DEFAULTS (FLUX gives T5 no attention mask,
     so training and sampling must pad to the same length).
     Two linear probes, dropped afterwards, add auxiliary losses that teach binding: on T5's output
     tokens (each word must say which object it describes: colour, shape, size and position of its
     phrase) and on the image tokens after one double block (each token must say which object
     covers it). Without them T5 stayed a bag of words and two objects swapped their attributes.
Every batch is a pure function of (seed, step), so a resumed run continues the same sequence.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fluxsae import shapes
from fluxsae.fileio import atomic_path, load_tensors, save_tensors, write_json
from fluxsae.pipelines import shapes_model_dir
from fluxsae.sites import resolve_site
from fluxsae.tiny import flux_components
from training.cli import add_config_arguments, config_from_args, parse_assignments
from training.shapes_probes import IGNORE, NO_OBJECT, AttributeProbe, image_targets, text_targets
from training.work import append_jsonl, claim, load_checkpoint, save_checkpoint

logger = logging.getLogger("training.shapes_model")

# Seeds. Every random draw is a pure function of (cfg.seed, stage, step), so a resumed run draws what
# an unbroken one would. The strides are primes larger than the stages' step counts, so two stages
# or two seeds do not draw from the same seed.
SEED_STRIDE = 1_000_003
"""Scene seeds: cfg.seed * SEED_STRIDE + stage * STAGE_STRIDE + step."""
STAGE_STRIDE = 100_003
VAE_STAGE, LATENT_STAGE = 1, 2
"""The `stage` of the VAE batches and of the scenes encoded for the transformer stage."""
VAE_NOISE_STRIDE = 7919
"""The VAE's posterior sample at a step: torch.manual_seed(cfg.seed * VAE_NOISE_STRIDE + step)."""
DIT_BATCH_STRIDE = 104_729
"""A transformer batch (scenes, dropped captions, noise, sigmas): cfg.seed * DIT_BATCH_STRIDE + step."""
EVAL_SEED = 987_654
"""Scenes and noise of the quick evaluations after training (the benchmark uses others)."""
LOG_EVERY = 50
"""Steps between rows of the stage logs (vae_log.jsonl, transformer_log.jsonl)."""


@dataclass(frozen=True)
class ShapesModelConfig:
    """Architecture and schedule of the Shapes model (saved beside it as training_config.json)."""

    seed: int = 0
    """Seeds initialisation and every batch."""
    vae_steps: int = 1000
    """VAE optimisation steps."""
    vae_batch: int = 16
    """Images per VAE step."""
    vae_lr: float = 1e-3
    """Peak VAE learning rate (cosine decay to 5% of it)."""
    vae_kl_weight: float = 1e-6
    """Tiny: the latents must keep the crisp edges that tell a small square from a circle."""
    latent_scenes: int = 40_000
    """Scenes encoded once by the trained VAE and reused by the transformer stage."""
    two_object_rate: float = 0.7
    """Share of two-object scenes among them (the world draws half): binding two objects is the hard
    part, one object is learnt early."""
    dit_steps: int = 3200
    """Transformer (and text encoder) optimisation steps."""
    dit_batch: int = 64
    """Captioned latents per transformer step."""
    dit_lr: float = 1e-3
    """Peak AdamW learning rate of the transformer stage (linear warm-up, cosine decay to 10%)."""
    dit_weight_decay: float = 0.01
    """AdamW weight decay of the transformer stage."""
    dit_warmup: int = 200
    """Steps of linear learning-rate warm-up."""
    schedule_sigma_rate: float = 0.3
    """Share of each batch trained at exactly the sigmas that `num_inference_steps` samples at; the
    rest is half uniform, half logit-normal."""
    ema_decay: float = 0.999
    """Decay of the parameter average the saved model uses (ramped up over the first steps)."""
    empty_prompt_rate: float = 0.1
    """Share of captions replaced by "" so the model also learns the unconditional distribution
    (classifier-free guidance, GENERATION_DEFAULTS["true_cfg_scale"], needs it)."""
    pooled_text: bool = True
    """Condition on CLIP's pooled vector, FLUX's global text embedding (it modulates every image token
    alike). False: the transformer's pooled projection is zeroed and frozen, so the prompt reaches the
    image only through joint attention to T5's tokens, the one path that can tell which object an
    attribute belongs to. Tried before the binding probes existed: worse on every figure, two objects
    included (benchmarks/README.md); the packaged model keeps it on."""
    text_probe_weight: float = 1.0
    """Weight of an auxiliary loss that teaches T5 which words belong together: a linear probe on every
    T5 output token must predict the colour, shape, size and position of the object whose phrase the
    token is in ("no object" outside them). The diffusion loss alone left T5 a bag of words: two
    objects got each other's colours as often as their own. The probe is dropped after training."""
    image_probe_weight: float = 1.0
    """Weight of the same probe on the image tokens after double block `image_probe_block`: each
    token must predict the attributes of the object covering it (COVER_FRACTION) or "no object", at
    every noise level, so the transformer must fetch from the prompt what belongs at its position."""
    image_probe_block: int = 2
    """The double block (0..num_layers - 1) whose image tokens the image probe reads."""
    text_dim: int = 128
    """Width of the tiny CLIP and T5 text encoders."""
    text_layers: int = 3
    """Layers of each text encoder."""
    vae_channels: tuple[int, ...] = (32, 64, 64)
    """Channels of the VAE's blocks (len - 1 halvings: 3 blocks down-sample x4)."""
    latent_channels: int = 4
    """Channels of the VAE latents (16 after the transformer's 2x2 packing)."""
    num_layers: int = 4
    """Double (MMDiT) blocks of the transformer."""
    num_single_layers: int = 4
    """Single blocks of the transformer."""
    num_heads: int = 4
    """Attention heads."""
    head_dim: int = 32
    """Width of one head (the transformer's width is num_heads x head_dim)."""
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)
    """Rotary embedding dims per axis (text position, row, column); they sum to head_dim."""


def build_components(cfg: ShapesModelConfig) -> dict:
    return flux_components(
        shapes.vocabulary(),
        seed=cfg.seed,
        clip_dim=cfg.text_dim,
        t5_dim=cfg.text_dim,
        text_layers=cfg.text_layers,
        clip_max_length=shapes.GENERATION_DEFAULTS["max_sequence_length"],
        vae_channels=cfg.vae_channels,
        latent_channels=cfg.latent_channels,
        num_layers=cfg.num_layers,
        num_single_layers=cfg.num_single_layers,
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        axes_dims_rope=cfg.axes_dims_rope,
    )


def images_tensor(scenes) -> torch.Tensor:
    """[n, 3, 64, 64] in [-1, 1], as the VAE sees images."""
    arr = np.stack([np.asarray(shapes.render(s), dtype=np.float32) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def batch_scenes(seed: int, stage: int, step: int, n: int):
    """The `n` scenes of a stage's batch at `step` (a pure function of its arguments)."""
    return shapes.sample_scenes(n, seed=seed * SEED_STRIDE + stage * STAGE_STRIDE + step)


# ----------------------------------------------------------------------------- stage 1: VAE


def train_vae(vae, cfg: ShapesModelConfig, work: Path, checkpoint_every: int, device: str) -> None:
    ckpt = work / "vae.safetensors"
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    start = 0
    if ckpt.exists():
        start = load_checkpoint(ckpt, {"model/vae": vae}, opt)["step"]
        logger.info("VAE: resuming at step %d", start)
    if start >= cfg.vae_steps:
        return
    vae.train()
    bar = tqdm(range(start, cfg.vae_steps), initial=start, total=cfg.vae_steps, desc="VAE", smoothing=0.05)
    for step in bar:
        x = images_tensor(batch_scenes(cfg.seed, VAE_STAGE, step, cfg.vae_batch)).to(device)
        torch.manual_seed(cfg.seed * VAE_NOISE_STRIDE + step)
        lr = cfg.vae_lr * min(1.0, 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps)) + 0.05)
        for g in opt.param_groups:
            g["lr"] = lr
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % LOG_EVERY == 0:
            bar.set_postfix(mse=f"{mse.item():.5f}")
            append_jsonl(work / "vae_log.jsonl", {"step": step, "mse": mse.item(), "lr": lr})
        if (step + 1) % checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            save_checkpoint(ckpt, {"model/vae": vae}, opt, step=step + 1)


# ----------------------------------------------------------------------------- stage 2: latents


def transformer_scenes(cfg: ShapesModelConfig) -> list:
    """The scenes the transformer stage trains on: one-object ones first, then two-object ones."""
    n_two = round(cfg.latent_scenes * cfg.two_object_rate)
    seed = cfg.seed * SEED_STRIDE + LATENT_STAGE * STAGE_STRIDE
    scenes = shapes.sample_scenes(cfg.latent_scenes - n_two, seed=seed, n_objects=1)
    return scenes + shapes.sample_scenes(n_two, seed=seed + 1, n_objects=2)


@torch.no_grad()
def encode_latents(vae, scenes: list, work: Path, device: str) -> tuple[torch.Tensor, float, float]:
    """Encode the scenes once; returns (latents [n, c, 16, 16], shift, scale)."""
    path = work / "latents.safetensors"
    if path.exists():
        tensors, meta = load_tensors(path)
        return tensors["latents"], meta["shift"], meta["scale"]
    vae.eval()
    chunks = []
    for i in tqdm(range(0, len(scenes), 256), desc="latents"):
        chunks.append(vae.encode(images_tensor(scenes[i : i + 256]).to(device)).latent_dist.mode().cpu())
    latents = torch.cat(chunks)
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    save_tensors(path, {"latents": latents}, {"shift": shift, "scale": scale})
    return latents, shift, scale


# ----------------------------------------------------------------------------- stage 3: transformer


class EMA:
    """Exponential moving average of parameters (the saved model uses the averaged weights)."""

    def __init__(self, modules: dict, decay: float):
        self.decay = decay
        self.shadow = {name: copy.deepcopy(m).requires_grad_(False) for name, m in modules.items()}

    @torch.no_grad()
    def update(self, modules: dict, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for name, m in modules.items():
            torch._foreach_lerp_(list(self.shadow[name].parameters()), list(m.parameters()), 1 - d)


def inference_sigmas() -> torch.Tensor:
    """The sigmas FluxPipeline evaluates the transformer at with GENERATION_DEFAULTS (no shift)."""
    steps = shapes.GENERATION_DEFAULTS["num_inference_steps"]
    return torch.from_numpy(np.linspace(1.0, 1 / steps, steps)).float()


def sample_sigmas(cfg: ShapesModelConfig, g: torch.Generator) -> torch.Tensor:
    # Half uniform, half logit-normal (the high-noise steps decide the layout), and optionally a
    # share at exactly the sampling schedule's sigmas.
    n = cfg.dit_batch
    uniform, logit_normal = torch.rand(n, generator=g), torch.sigmoid(torch.randn(n, generator=g))
    sigma = torch.where(torch.rand(n, generator=g) < 0.5, uniform, logit_normal)
    grid = inference_sigmas()
    on_grid = torch.rand(n, generator=g) < cfg.schedule_sigma_rate
    return torch.where(on_grid, grid[torch.randint(0, len(grid), (n,), generator=g)], sigma)


def train_transformer(
    pipe, latents, scenes, cfg: ShapesModelConfig, work: Path, checkpoint_every: int, device: str
) -> dict:
    from diffusers import FluxPipeline

    modules = {
        "transformer": pipe.transformer,
        "text_encoder": pipe.text_encoder,
        "text_encoder_2": pipe.text_encoder_2,
    }
    max_len = shapes.GENERATION_DEFAULTS["max_sequence_length"]
    captions = [shapes.caption(s) for s in scenes]
    torch.manual_seed(cfg.seed)
    probes = {
        "text_probe": AttributeProbe(pipe.text_encoder_2.config.d_model).to(device),
        "image_probe": AttributeProbe(pipe.transformer.inner_dim).to(device),
    }
    if not cfg.pooled_text:
        pooled_proj = pipe.transformer.time_text_embed.text_embedder.linear_2
        with torch.no_grad():
            pooled_proj.weight.zero_()
            pooled_proj.bias.zero_()
        pipe.transformer.time_text_embed.text_embedder.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)  # its pooled output is all the pipeline uses of it
    params = [p for m in (*modules.values(), *probes.values()) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.dit_lr, weight_decay=cfg.dit_weight_decay, betas=(0.9, 0.99))
    ema = EMA(modules, cfg.ema_decay)
    ckpt = work / "transformer.safetensors"
    checkpointed = {
        f"model/{name}": m
        for name, m in {**modules, **probes, **{f"ema_{k}": v for k, v in ema.shadow.items()}}.items()
    }
    start = 0
    if ckpt.exists():
        start = load_checkpoint(ckpt, checkpointed, opt)["step"]
        logger.info("transformer: resuming at step %d", start)
    if start >= cfg.dit_steps:
        return ema.shadow
    text_target = torch.stack([text_targets(s, max_len) for s in scenes])
    image_target = torch.stack([image_targets(s) for s in scenes])
    probed: list[torch.Tensor] = []  # the image tokens after double block `image_probe_block`
    site, block = resolve_site(pipe.transformer, f"transformer_blocks.{cfg.image_probe_block}.image")
    hook = block.register_forward_hook(lambda _m, _i, out: probed.append(out[site.output_position]))
    for m in (*modules.values(), *probes.values()):
        m.train()
    n, c, h, w = latents.shape
    img_ids = FluxPipeline._prepare_latent_image_ids(cfg.dit_batch, h // 2, w // 2, device, torch.float32)
    bar = tqdm(
        range(start, cfg.dit_steps), initial=start, total=cfg.dit_steps, desc="transformer", smoothing=0.05
    )
    try:
        for step in bar:
            g = torch.Generator().manual_seed(cfg.seed * DIT_BATCH_STRIDE + step)
            idx = torch.randint(0, n, (cfg.dit_batch,), generator=g)
            drop = torch.rand(cfg.dit_batch, generator=g) < cfg.empty_prompt_rate
            prompts = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist(), strict=True)]
            x0 = FluxPipeline._pack_latents(latents[idx], cfg.dit_batch, c, h, w)
            noise = torch.randn(x0.shape, generator=g)
            sigma = sample_sigmas(cfg, g)
            x0, noise, sigma = x0.to(device), noise.to(device), sigma.to(device)
            s = sigma.view(-1, 1, 1)
            x_t = (1 - s) * x0 + s * noise
            lr = cfg.dit_lr * min(1.0, (step + 1) / cfg.dit_warmup)
            lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.dit_steps))
            for group in opt.param_groups:
                group["lr"] = lr
            prompt_embeds, pooled, text_ids = pipe.encode_prompt(
                prompts, None, device=device, max_sequence_length=max_len
            )
            probed.clear()
            v = pipe.transformer(
                hidden_states=x_t, timestep=sigma, pooled_projections=pooled,
                encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=img_ids, guidance=None,
                return_dict=False,
            )[0]  # fmt: skip
            flow = F.mse_loss(v, noise - x0)
            # Dropped captions: T5 saw "", so "no object" everywhere; the image's targets are unknowable.
            dropped = drop.view(-1, 1, 1)
            text_probe = probes["text_probe"].loss(
                prompt_embeds, torch.where(dropped, torch.tensor(NO_OBJECT), text_target[idx]).to(device)
            )
            image_probe = probes["image_probe"].loss(
                probed[0], torch.where(dropped, IGNORE, image_target[idx]).to(device)
            )
            loss = flow + cfg.text_probe_weight * text_probe + cfg.image_probe_weight * image_probe
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            ema.update(modules, step)
            if step % LOG_EVERY == 0:
                losses = {"loss": flow, "text_probe": text_probe, "image_probe": image_probe}
                losses = {name: value.item() for name, value in losses.items()}
                bar.set_postfix({name: f"{value:.4f}" for name, value in losses.items()})
                append_jsonl(work / "transformer_log.jsonl", {"step": step, **losses, "lr": lr})
            if (step + 1) % checkpoint_every == 0 or step + 1 == cfg.dit_steps:
                save_checkpoint(ckpt, checkpointed, opt, step=step + 1)
    finally:  # a hook left behind would corrupt every later forward pass of this transformer
        hook.remove()
    return ema.shadow


# ----------------------------------------------------------------------------- assembling


@torch.no_grad()
def quick_eval(pipe, n: int, seed: int, **generation) -> dict:
    """read_attributes accuracy on `n` generated one- and two-object scenes (a fast check);
    `generation` overrides GENERATION_DEFAULTS."""
    scenes = shapes.sample_scenes(n, seed=seed, held_out="include")
    read = []
    for i in range(0, n, 25):
        chunk = scenes[i : i + 25]
        g = torch.Generator(pipe.device).manual_seed(seed + i)
        kwargs = {**shapes.GENERATION_DEFAULTS, **generation}
        images = pipe([shapes.caption(s) for s in chunk], generator=g, **kwargs).images
        read += [shapes.read_attributes(im) for im in images]
    return shapes.attribute_accuracy(scenes, read)


@torch.no_grad()
def vae_eval(vae, n: int, seed: int) -> dict:
    """read_attributes accuracy on VAE reconstructions: the ceiling the transformer can reach."""
    from PIL import Image

    scenes = shapes.sample_scenes(n, seed=seed, held_out="include")
    device = next(vae.parameters()).device
    recon = vae.decode(vae.encode(images_tensor(scenes).to(device)).latent_dist.mode()).sample
    arr = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return shapes.attribute_accuracy(scenes, [shapes.read_attributes(Image.fromarray(a)) for a in arr])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=shapes_model_dir(), help="where the FluxPipeline folder goes")
    p.add_argument("--work", type=Path, default=Path("runs/shapes_model"), help="checkpoints and logs")
    p.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--eval-scenes", type=int, default=200, help="generations of the quick evaluations")
    p.add_argument("--device", default="cpu", help="cpu (the shipped model) or cuda (quick recipe checks)")
    add_config_arguments(p, ShapesModelConfig)
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE",
        help="override any ShapesModelConfig field by its name, e.g. --set dit_lr=1e-3 --set "
        "vae_channels=32,64,64 (applied after the flags above)",
    )  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(
        config_from_args(ShapesModelConfig, args), **parse_assignments(ShapesModelConfig, args.set)
    )
    if not 0 <= cfg.image_probe_block < cfg.num_layers:
        raise SystemExit(
            f"image_probe_block={cfg.image_probe_block}: the image probe reads a double block, one of "
            f"0..{cfg.num_layers - 1} (num_layers={cfg.num_layers})"
        )
    work = args.work
    claim(work, "config.json", cfg, what="a run")

    from diffusers import FluxPipeline

    t0 = time.time()
    components = build_components(cfg)
    for m in components.values():
        if isinstance(m, torch.nn.Module):
            m.to(args.device)
    train_vae(components["vae"], cfg, work, args.checkpoint_every, args.device)
    components["vae"].eval().requires_grad_(False)
    scenes = transformer_scenes(cfg)
    latents, shift, scale = encode_latents(components["vae"], scenes, work, args.device)
    latents = (latents - shift) * scale
    components["vae"].register_to_config(shift_factor=shift, scaling_factor=scale)
    pipe = FluxPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    ema = train_transformer(pipe, latents, scenes, cfg, work, args.checkpoint_every, args.device)
    for name, module in ema.items():
        getattr(pipe, name).load_state_dict(module.state_dict())
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        m.eval().requires_grad_(False)
    minutes = (time.time() - t0) / 60

    report = {"train_minutes_this_run": round(minutes, 1)}
    if args.eval_scenes:
        report["vae_eval"] = vae_eval(pipe.vae, args.eval_scenes, seed=EVAL_SEED)
        report["quick_eval"] = quick_eval(pipe, args.eval_scenes, seed=EVAL_SEED)
    pipe.to("cpu")
    with atomic_path(args.out, is_dir=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_json(
            tmp / "training_config.json",
            {"config": asdict(cfg), "report": report, "command": "python -m training.shapes_model"},
        )
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 2**20
    print(json.dumps({**report, "saved_to": str(args.out), "size_mb": round(size, 1)}, indent=2))


if __name__ == "__main__":
    main()
