"""An experiment, not a library feature: does a scene-consistency term give SAE features that detect a
scene's background (`background_halo.py` says a reconstruction loss alone spends no feature on it)?

A Matryoshka TopK SAE trained as `training.train_sae` trains the packaged ones (same harvest, shards,
normalisation, optimiser, learning rate), except that each batch holds whole images -- the 64 image
tokens of 64 (prompt, step) pairs -- and the loss adds, for the first `--scene-features` features,

    lambda * mean over those features of  within-image variance / (total variance + eps)

so they are pushed to be constant over an image and to differ between images (a scene's background
colour is such a property; an object's colour is not). Only training changes: the SAE encodes tokens
one at a time like any other, and is saved in the Hub layout for `interpretability.py --dict`.

    python -m benchmarks.scene_features --out runs/variants/scene8 --scene-features 8 --scene-weight 1
    python benchmarks/interpretability.py --cache runs/interp_acts.safetensors --no-packaged \\
        --no-baselines --sites transformer_blocks.3.image --dict scene8=runs/variants/scene8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fluxsae.activations import ActivationStore, split_shards
from fluxsae.evaluate import reconstruction_metrics
from fluxsae.sae_training import default_lr, make_optimizer, train_step
from training.train_sae import TrainConfig, build_sae

TOKENS_PER_IMAGE = 64
EPS = 1e-6


def images(store: ActivationStore, site: str, shards: list[int]) -> torch.Tensor:
    """The site's rows of `shards` grouped by (prompt, step): [images, 64, d] in token order."""
    x, manifest = store.load(site, shards)
    key = manifest["prompt_id"].long() * 1000 + manifest["step"].long()
    order = torch.argsort(key * TOKENS_PER_IMAGE + manifest["token"].long())
    x, key = x[order], key[order]
    grouped = key.view(-1, TOKENS_PER_IMAGE) if len(x) % TOKENS_PER_IMAGE == 0 else None
    if grouped is None or not (grouped == grouped[:, :1]).all():
        raise SystemExit(f"{store.folder}: rows do not come in whole images of {TOKENS_PER_IMAGE} tokens")
    return x.view(-1, TOKENS_PER_IMAGE, x.shape[-1])


def scene_term(
    values: torch.Tensor, indices: torch.Tensor, n_images: int, features: range, detach_total: bool = False
) -> torch.Tensor:
    """Mean over `features` of within-image variance / total variance of their codes (`detach_total`:
    no gradient through the total, so shrinking a feature's spread is not rewarded)."""
    width = len(features)
    codes = torch.zeros(values.shape[0], width, dtype=values.dtype)
    inside = (indices >= features.start) & (indices < features.stop)
    codes.scatter_add_(1, torch.where(inside, indices - features.start, 0), values * inside)
    codes = codes.view(n_images, TOKENS_PER_IMAGE, width)
    within = codes.var(dim=1, correction=0).mean(0)
    total = codes.reshape(-1, width).var(0, correction=0)
    if detach_total:
        total = total.detach()
    return (within / (total + EPS)).mean()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acts", default="runs/shapes_dictionaries/harvest")
    p.add_argument("--site", default="transformer_blocks.3.image")
    p.add_argument("--out", type=Path, required=True, help="Hub-layout root: the SAE goes to OUT/<site>/")
    p.add_argument("--n-features", type=int, default=2048)
    p.add_argument("--k", type=int, default=24)
    p.add_argument("--matryoshka", default="8,32,128,512")
    p.add_argument("--scene-features", type=int, default=8, help="this many features get the scene term")
    p.add_argument("--scene-offset", type=int, default=0, help="index of the first of them")
    p.add_argument("--scene-weight", type=float, default=1.0, help="lambda")
    p.add_argument("--detach-total", action="store_true", help="no gradient through the total variance")
    p.add_argument("--tokens", type=int, default=8_000_000)
    p.add_argument("--images-per-batch", type=int, default=64, help="64 images x 64 tokens = 4096 per step")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    store = ActivationStore(args.acts)
    train_shards, eval_shards = split_shards(len(store.shards), 0.1)
    cfg = TrainConfig(
        acts=args.acts, site=args.site, n_features=args.n_features, k=args.k, tokens=args.tokens,
        matryoshka=tuple(int(m) for m in args.matryoshka.split(",") if m), aux_k=256, seed=args.seed,
    )  # fmt: skip
    sae = build_sae(cfg, store, train_shards)
    opt = make_optimizer(sae, default_lr(cfg.n_features))
    data = images(store, args.site, train_shards)
    generator = torch.Generator().manual_seed(args.seed)
    steps = args.tokens // (args.images_per_batch * TOKENS_PER_IMAGE)
    scene_features = range(args.scene_offset, args.scene_offset + args.scene_features)
    start = time.perf_counter()

    def scene_loss(out) -> torch.Tensor:
        term = scene_term(out.values, out.indices, args.images_per_batch, scene_features, args.detach_total)
        return args.scene_weight * term

    for step in tqdm(range(steps), desc="scene SAE"):
        pick = torch.randint(len(data), (args.images_per_batch,), generator=generator)
        stats = train_step(sae, opt, data[pick].reshape(-1, data.shape[-1]), extra_loss=scene_loss)
        if step % 200 == 0:
            print(f"step {step}: fvu {stats['fvu']:.4f} lambda x scene {stats['extra_loss']:.3f}", flush=True)
    folded = sae.fold_normalization()
    held_out, _ = store.load(args.site, eval_shards)
    metrics = reconstruction_metrics(folded, held_out)
    folded.save(args.out / args.site)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "held_out": metrics,
              "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["held_out"]))
    return result


if __name__ == "__main__":
    main()
