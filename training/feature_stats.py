"""Compute FeatureStats (firing density, max and mean activation, timestep profile) of dictionaries on
fresh Shapes generations, and write them beside each dictionary as `<site>/feature_stats.safetensors`.

    python -m training.feature_stats                    # the 4 packaged Shapes dictionaries, 200 scenes
    python -m training.feature_stats --source runs/my_saes --kinds sae --sites transformer_blocks.3.image

Scenes come from `fluxsae.shapes.sample_scenes(n, seed)`, are captioned, and generated with
`GENERATION_DEFAULTS` (all 8 steps; image i of the run uses noise seed `seed + i`), so a run is
reproducible. Every site is captured once per batch and feeds every dictionary of that site.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm

import fluxsae
from fluxsae import shapes
from fluxsae.feature_stats import FeatureStatsAccumulator
from fluxsae.hub import check_matches_pipeline, site_folder

SITES = ("transformer_blocks.3.image", "single_transformer_blocks.2.image")
"""The sites of the packaged Shapes dictionaries."""
SEED = 7_000_001
"""Scene and noise seed of the packaged stats: no training, harvest or benchmark run draws from it."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="shapes", help="'shapes' or a repo folder (one sub-folder per site)")
    p.add_argument("--kinds", default="sae,itda", help="comma-separated dictionary kinds: sae, itda")
    p.add_argument("--sites", default=",".join(SITES), help="comma-separated sites")
    p.add_argument("--scenes", type=int, default=200, help="how many Shapes scenes to generate")
    p.add_argument("--seed", type=int, default=SEED, help="scene seed; image i uses noise seed seed + i")
    p.add_argument("--batch-size", type=int, default=25, help="images per pipeline call")
    p.add_argument("--model", default="shapes", help="the pipeline the dictionaries read (the Shapes model)")
    args = p.parse_args(argv)
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.sites = [s for s in args.sites.split(",") if s]
    if any(k not in ("sae", "itda") for k in args.kinds):
        p.error(f"--kinds takes sae and/or itda, got {args.kinds}")
    if args.scenes < 1 or args.batch_size < 1:
        p.error("--scenes and --batch-size must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    pipe = fluxsae.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    jobs = []  # (folder, dictionary, accumulator)
    for site in args.sites:
        for kind in args.kinds:
            folder = site_folder(args.source, site, f"{kind}.safetensors")
            dictionary = (fluxsae.load_sae if kind == "sae" else fluxsae.load_itda)(args.source, site=site)
            check_matches_pipeline(dictionary, pipe)
            steps = range(shapes.GENERATION_DEFAULTS["num_inference_steps"])
            jobs.append((folder, dictionary, FeatureStatsAccumulator(dictionary, steps)))
    scenes = shapes.sample_scenes(args.scenes, seed=args.seed)
    start = time.perf_counter()
    for i in tqdm(range(0, len(scenes), args.batch_size), desc="feature stats", unit="batch"):
        chunk = scenes[i : i + args.batch_size]
        generators = [torch.Generator().manual_seed(args.seed + i + j) for j in range(len(chunk))]
        with torch.no_grad(), fluxsae.capture(pipe, args.sites) as acts:
            pipe([shapes.caption(s) for s in chunk], generator=generators, output_type="latent",
                 **shapes.GENERATION_DEFAULTS)
        for _, dictionary, acc in jobs:
            acc.update(acts[dictionary.site], steps=acts.steps)
    meta = {
        "n_scenes": args.scenes, "scene_seed": args.seed, "noise_seeds": f"{args.seed} + image index",
        "generation": dict(shapes.GENERATION_DEFAULTS), "model": args.model, "cfg_pass": "cond",
    }  # fmt: skip
    summary = {}
    for folder, dictionary, acc in jobs:
        stats = acc.result(meta)
        path = stats.save(folder)
        d = stats.density
        summary[f"{type(dictionary).__name__}:{dictionary.site}"] = {
            "file": str(path), "bytes": path.stat().st_size, "tokens": stats.n_tokens,
            "density_median": float(d.median()), "density_max": float(d.max()),
            "never_fired": int((stats.fires.sum(0) == 0).sum()),
        }  # fmt: skip
    summary["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
