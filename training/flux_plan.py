"""What a FLUX.1 recipe run will cost before it starts: tokens, disk and a rough time, per stage.

Disk is exact up to file headers: a site stores tokens x d x bytes (tokens = prompts x kept steps x the
stream's tokens: (H/16) x (W/16) image tokens, `max_sequence_length` text tokens), plus 36 bytes of
manifest per row and stream. Time is a floating-point count divided by the device's measured dense
matmul rate (a one-second probe in the compute dtype) and an efficiency (`EFFICIENCY`): good to about
2x, enough to tell minutes from days. `check_disk` refuses a run whose remaining stages do not fit.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxsae.sites import parse_site

MANIFEST_BYTES_PER_ROW = 4 * 5 + 8 * 2
"""Per stored row and stream: step, timestep, token, row, col (4 bytes each), prompt id, seed (8 each)."""

IMAGE_PNG_BYTES = 200_000
"""An upper bound for one 256 px PNG of autointerp (noise-like images of random weights do not compress)."""

EFFICIENCY = {"harvest": 0.5, "sae": 1 / 1.5, "itda": 0.5}
"""Share of the matmul probe's rate each stage reaches: a harvest runs a mix of matmuls, attention and
small ops; an SAE step costs ~1.5 dense encoder matmuls (benchmarks/README.md); ITDA's pursuit is a
matmul per round plus gathers."""


@dataclass
class Geometry:
    """The sizes of a FLUX-like model that the estimate needs."""

    width: int
    """Residual-stream width of every site (inner_dim: heads x head dim)."""
    vae_scale: int
    """Pixels per latent (8 for FLUX.1); image tokens are (H / (2 vae_scale)) x (W / (2 vae_scale))."""
    transformer_params: int
    t5_params: int
    blocks: int
    """Double + single blocks (attention cost)."""
    guidance_embeds: bool = False
    params: dict = field(default_factory=dict)
    """Parameters per component, for the size of a random-weights model folder."""


def geometry_of_configs(configs: dict[str, dict]) -> Geometry:
    """Geometry from component configs (`fluxsae.flux.flux1_configs`, with overrides): counted on `meta`."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fluxsae.tiny import BOS, EOS, PAD

    t = configs["transformer"]
    ids = {"pad_token_id": PAD, "eos_token_id": EOS}
    with torch.device("meta"):
        modules = {
            "transformer": FluxTransformer2DModel(**t),
            "text_encoder_2": T5EncoderModel(T5Config(**configs["text_encoder_2"], **ids)),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"], bos_token_id=BOS, **ids)),
            "vae": AutoencoderKL(**configs["vae"]),
        }
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    return Geometry(
        width=t["num_attention_heads"] * t["attention_head_dim"],
        vae_scale=2 ** (len(configs["vae"]["block_out_channels"]) - 1),
        transformer_params=params["transformer"],
        t5_params=params["text_encoder_2"],
        blocks=t["num_layers"] + t["num_single_layers"],
        guidance_embeds=bool(t.get("guidance_embeds")),
        params=params,
    )


def geometry_of_model(model: str) -> Geometry:
    """Geometry of a FLUX.1 Hub id (from the stored configs: nothing is downloaded) or a pipeline folder."""
    from fluxsae.flux import FLUX1_TRANSFORMER_CONFIGS, flux1_configs

    if model in FLUX1_TRANSFORMER_CONFIGS:
        return geometry_of_configs(flux1_configs(model))
    folder = Path(model)
    if not (folder / "model_index.json").is_file():
        raise SystemExit(
            f"--model {model}: no stored config for this Hub id and no pipeline folder there, so the run "
            f"cannot be sized before it starts. Download it first (`hf download {model} --local-dir DIR`) "
            f"and pass --model DIR, or use one of {sorted(FLUX1_TRANSFORMER_CONFIGS)}."
        )

    def read(sub: str) -> dict:
        cfg = json.loads((folder / sub / "config.json").read_text())
        return {k: v for k, v in cfg.items() if not k.startswith("_")}

    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    t, vae = read("transformer"), read("vae")
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(t)
        t5 = T5EncoderModel(T5Config(**read("text_encoder_2")))
    return Geometry(
        width=transformer.inner_dim,
        vae_scale=2 ** (len(vae["block_out_channels"]) - 1),
        transformer_params=sum(p.numel() for p in transformer.parameters()),
        t5_params=sum(p.numel() for p in t5.parameters()),
        blocks=transformer.config.num_layers + transformer.config.num_single_layers,
        guidance_embeds=bool(transformer.config.guidance_embeds),
    )


def image_tokens(geometry: Geometry, height: int, width: int) -> int:
    patch = 2 * geometry.vae_scale  # VAE down-sampling, then 2x2 packing
    if height % patch or width % patch:
        raise SystemExit(
            f"--height/--width must be multiples of {patch} for this model, got {height}x{width}."
        )
    return (height // patch) * (width // patch)


def matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """FLOP/s of a square matmul on `device` in `dtype` (the best of repeated runs within `seconds`)."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, end = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < end:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


@dataclass
class StageEstimate:
    stage: str
    tokens: int
    """Tokens the stage stores or reads (0 where it says nothing)."""
    disk_bytes: int
    flops: float
    note: str = ""


def transformer_flops(g: Geometry, n_image: int, n_text: int) -> float:
    """One transformer pass over one prompt: 2 x params x tokens plus attention (QK^T and AV)."""
    n = n_image + n_text
    return 2 * g.transformer_params * n + 4 * g.blocks * n * n * g.width


def estimate(plan: dict, g: Geometry) -> list[StageEstimate]:
    """Per-stage estimates of a recipe `plan` (a dict of the recipe's settings, resolved: sites, steps,
    generation, prompts, dictionary sizes) on geometry `g`."""
    gen = plan["generation"]
    n_image = image_tokens(g, gen["height"], gen["width"])
    n_text = gen["max_sequence_length"]
    kept, n_steps = len(plan["steps"]), gen["num_inference_steps"]
    itemsize = torch.empty(0, dtype=getattr(torch, plan["dtype"])).element_size()
    streams = {parse_site(s).stream for s in plan["sites"]}

    def harvest(prompts: int, name: str) -> StageEstimate:
        per_stream = {"image": prompts * kept * n_image, "text": prompts * kept * n_text}
        tokens = sum(per_stream[parse_site(s).stream] for s in plan["sites"])
        disk = tokens * g.width * itemsize + sum(per_stream[s] for s in streams) * MANIFEST_BYTES_PER_ROW
        flops = prompts * (n_steps * transformer_flops(g, n_image, n_text) + 2 * g.t5_params * n_text)
        return StageEstimate(
            name, tokens, disk, flops, f"{len(plan['sites'])} site(s) x {itemsize} B x d {g.width}"
        )

    out = []
    if plan.get("random_weights"):
        bytes_ = (
            sum(g.params.values()) * torch.empty(0, dtype=getattr(torch, plan["model_dtype"])).element_size()
        )
        out.append(StageEstimate("model", 0, bytes_, 0.0, "random weights saved as a pipeline folder"))
    out.append(harvest(plan["n_prompts"], "harvest"))
    n, k, d = plan["n_features"], plan["k"], g.width
    sae_weights = (2 * n * d + n + d) * 4
    sae_tokens = plan["sae_tokens"] * len(plan["sites"])
    # final SAE + checkpoint (weights, Adam's two moments, the dead-feature counters)
    out.append(
        StageEstimate(
            "sae",
            sae_tokens,
            len(plan["sites"]) * (4 * sae_weights + 8 * n),
            sae_tokens * 2 * n * d,
            f"{n:,} features, k {k}",
        )
    )
    atoms = plan["itda_max_atoms"] or 50_000
    train_tokens = out[-2].tokens // max(1, len(plan["sites"]))
    itda_flops = len(plan["sites"]) * train_tokens * plan["itda_k"] * 2 * (atoms / 2) * d
    out.append(
        StageEstimate(
            "itda",
            train_tokens * len(plan["sites"]),
            len(plan["sites"]) * atoms * (8 * d + 200),
            itda_flops,
            f"up to {atoms:,} atoms, k {plan['itda_k']}",
        )
    )
    if plan.get("label_methods"):
        label = harvest(plan["label_prompts"], "label harvest")
        units = {"sae": n, "itda": atoms}
        image_sites = [s for s in plan["sites"] if parse_site(s).stream == "image"]
        summaries = sum(units[m] * 10 * n_image * 4 for m in plan["label_methods"]) * len(image_sites)
        label.disk_bytes += summaries + plan["label_prompts"] * IMAGE_PNG_BYTES
        enc = sum(
            {"sae": 2 * n * d, "itda": plan["itda_k"] * 2 * atoms * d}[m] for m in plan["label_methods"]
        )
        label.flops += label.tokens * enc
        out.append(label)
    publish = len(plan["sites"]) * (sae_weights + atoms * 4 * d)
    out.append(StageEstimate("publish", 0, publish, 0.0, "staged copies of the dictionaries and labels"))
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def human_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    if s < 1000 * 86400:
        return f"{s / 86400:.1f} days"
    return f"{s / 86400 / 365:.3g} years"


def stage_seconds(e: StageEstimate, rates: dict[str, float]) -> float:
    """Seconds of a stage at `rates` ({"model": FLOP/s in the pipeline's dtype, "float32": ...}): harvests
    run in the pipeline's dtype, dictionaries train and encode in float32."""
    key = "harvest" if "harvest" in e.stage else e.stage
    rate = rates["model"] if key == "harvest" else rates["float32"]
    return e.flops / (rate * EFFICIENCY.get(key, 1.0)) if e.flops else 0.0


def table(estimates: list[StageEstimate], rates: dict[str, float], done: set[str]) -> str:
    lines = [f"{'stage':14s} {'tokens':>19s} {'disk':>10s} {'time (rough)':>14s}  note"]
    for e in estimates:
        state = "  (done)" if e.stage in done else ""
        tokens = f"{e.tokens:,}" if e.tokens else "-"
        seconds = stage_seconds(e, rates)
        lines.append(
            f"{e.stage:14s} {tokens:>19s} {human_bytes(e.disk_bytes):>10s} "
            f"{human_seconds(seconds) if seconds else '-':>14s}  {e.note}{state}"
        )
    return "\n".join(lines)


def existing_parent(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).exists() else 0


def check_disk(estimates: list[StageEstimate], work: Path, done: set[str], already: dict[str, int]) -> int:
    """Refuse (SystemExit) when the disk holding `work` cannot take what the stages not in `done` will
    write; `already` maps a stage to the bytes its folder holds now (a resumed harvest). Returns the bytes
    still needed."""
    todo = [e for e in estimates if e.stage not in done]
    need = {e.stage: max(0, e.disk_bytes - already.get(e.stage, 0)) for e in todo}
    total = sum(need.values())
    where = existing_parent(work)
    free = shutil.disk_usage(where).free
    if total > free:
        harvest = need.get("harvest", 0)
        raise SystemExit(
            f"Not enough disk for this run: it needs {human_bytes(total)} more in {work} (the harvest "
            f"{human_bytes(harvest)}: tokens x d x bytes per site, see the table above), and {where} has "
            f"{human_bytes(free)} free. Free space, pass a --work on a larger disk, or harvest less: fewer "
            "prompts (--n-prompts), steps (--steps) or sites (--sites), or a 2-byte --dtype."
        )
    return total
