"""An experiment, not a library feature: ITDA atoms chosen with the object tokens over-represented.

The packaged ITDAs take as atoms the first distinct tokens the build meets in a shuffled pass, and
about four in five image tokens of a Shapes scene are background, so most atoms are background tokens
(`benchmarks/README.md`, Interpretability). This build keeps, in every shuffled batch, all the object
tokens (the truth of `fluxsae.shapes.token_masks`, from each prompt's scene) and only as many
background tokens as make the object tokens `--object-share` of the candidates; the other background
tokens of the batch are skipped. Everything else is `training.build_itda`'s (same harvest, shard
split, order, seed and settings); the held-out FVU is on every token of the held-out shards.

    python -m benchmarks.itda_object_share --acts runs/sd24/harvest \\
        --site single_transformer_blocks.2.image --object-share 0.5 --out runs/itda_obj/s50
    (and --object-share 0.8; --object-share 0.5 --prune-cosine 0.4)
    python benchmarks/interpretability.py --cache runs/interp_acts.safetensors --no-packaged \\
        --no-baselines --sites single_transformer_blocks.2.image --dict s50=runs/itda_obj/s50
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from fluxsae.activations import ActivationStore, split_shards
from fluxsae.evaluate import reconstruction_metrics
from fluxsae.itda_build import build_itda
from fluxsae.shapes.world import Object, Scene, token_masks
from training.build_itda import BuildConfig, itda_config, manifest_batches


def object_tokens(prompts: list[dict], folder) -> dict[int, torch.Tensor]:
    """prompt id -> bool [64]: the image tokens that show an object, from a harvest's prompt records."""
    out = {}
    for prompt in prompts:
        scene = prompt.get("scene")
        if scene is None:
            raise SystemExit(f"{folder} holds prompts without a scene: harvest Shapes prompts "
                             "(python -m training.harvest --prompts shapes).")
        objects = tuple(Object(**o) for o in scene["objects"])
        mask = token_masks(Scene(objects=objects, background=scene["background"]))["object"]
        out[int(prompt["id"])] = torch.from_numpy(mask.reshape(-1))
    return out


def object_share_batches(batches, is_object: dict[int, torch.Tensor], share: float, seed: int):
    """Each (x, manifest) batch with all its object tokens and a random subset of its background tokens,
    so that object tokens are `share` of it (all background tokens when the batch has too few)."""
    g = torch.Generator().manual_seed(seed)
    for x, manifest in batches:
        pairs = zip(manifest["prompt_id"].tolist(), manifest["token"].tolist(), strict=True)
        on_object = torch.stack([is_object[prompt][token] for prompt, token in pairs])
        background = (~on_object).nonzero()[:, 0]
        n_background = int(on_object.sum() * (1 - share) / share)
        chosen = background[torch.randperm(len(background), generator=g)[:n_background]]
        keep = torch.cat([on_object.nonzero()[:, 0], chosen]).sort().values
        yield x[keep], {key: value[keep] for key, value in manifest.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acts", required=True, help="a Shapes harvest folder (python -m training.harvest)")
    p.add_argument("--site", required=True)
    p.add_argument("--object-share", type=float, required=True, help="object tokens' share of candidates")
    p.add_argument("--out", type=Path, required=True, help="dictionary root: the ITDA goes to OUT/<site>/")
    p.add_argument("--k", type=int, default=24)
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--max-atoms", type=int, default=2048)
    p.add_argument("--prune-cosine", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 < args.object_share <= 1:
        raise SystemExit(f"--object-share must be in (0, 1], got {args.object_share}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    cfg = BuildConfig(acts=args.acts, site=args.site, k=args.k, threshold=args.threshold,
                      max_atoms=args.max_atoms, prune_cosine=args.prune_cosine, seed=args.seed)  # fmt: skip
    store = ActivationStore(cfg.acts)
    prompts = list(store.prompts())
    train, held_out = split_shards(len(store.shards), cfg.held_out)
    start = time.perf_counter()
    batches = manifest_batches(store, cfg.site, train, cfg.batch_size, cfg.seed, cfg.shards_in_memory)
    itda = build_itda(
        object_share_batches(batches, object_tokens(prompts, store.folder), args.object_share, args.seed + 5),
        itda_config(cfg, store), prompts={int(q["id"]): q["prompt"] for q in prompts},
    )  # fmt: skip
    result = {"object_share": args.object_share, "build_config": dataclasses.asdict(cfg),
              "n_atoms": itda.n_atoms, "seconds": round(time.perf_counter() - start, 1),
              "held_out": reconstruction_metrics(itda, store.iter_rows(cfg.site, held_out))}  # fmt: skip
    itda.cfg = dataclasses.replace(itda.cfg, extra={**itda.cfg.extra, "object_share_experiment": result})
    itda.cpu().save(args.out / cfg.site)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
