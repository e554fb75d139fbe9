"""Harvest throughput vs plain generation throughput (target: at least 0.9x).

Both generate the same prompts in the same batches with the same per-prompt generators and stop at
the latents (no VAE decode, which a harvest does not need: this is the strict comparison). The
harvest also captures the sites at every step, converts to the storage dtype and writes a shard
(atomically, to a temporary folder). Rounds alternate plain / harvest after a warm-up round.

    python benchmarks/harvest_speed.py --model shapes --rounds 5 --batch 25 --prompts 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fluxsae import load_pipeline, shapes
from fluxsae.activations import shard_name, write_shard
from fluxsae.heatmap import token_grid
from training.harvest import harvest_shard

RESULTS = Path(__file__).parent / "results" / "harvest_speed.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--sites", default="transformer_blocks.3.image,single_transformer_blocks.2.image")
    ap.add_argument("--prompts", type=int, default=50, help="prompts per round")
    ap.add_argument("--batch", type=int, default=25, help="prompts per pipeline call")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe = load_pipeline(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    gen = dict(shapes.GENERATION_DEFAULTS)
    prompts = [{"prompt": shapes.caption(s)} for s in shapes.sample_scenes(args.prompts, seed=5)]
    ids = list(range(len(prompts)))
    sites = args.sites.split(",")
    cfg = {"dtype": args.dtype, "seed": 0}

    def plain():
        for b in range(0, len(prompts), args.batch):
            chunk = prompts[b : b + args.batch]
            gens = [torch.Generator().manual_seed(i) for i in ids[b : b + args.batch]]
            pipe([p["prompt"] for p in chunk], generator=gens, output_type="latent", **gen)

    def harvest(folder: Path):
        acts, manifests = harvest_shard(pipe, prompts, ids, sites, list(range(gen["num_inference_steps"])),
                                        gen, cfg, args.batch)  # fmt: skip
        write_shard(folder / shard_name(0), acts, manifests, {"index": 0})

    times = {"plain": [], "harvest": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds + 1):
            order = ["plain", "harvest"] if r % 2 == 0 else ["harvest", "plain"]
            for name in order:
                t = time.perf_counter()
                plain() if name == "plain" else harvest(Path(tmp))
                if r > 0:  # round 0 warms up
                    times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows, cols = token_grid(pipe, gen["height"], gen["width"])
    n_images = len(prompts)
    result = {
        "model": args.model, "sites": sites, "dtype": args.dtype, "threads": args.threads,
        "images_per_round": n_images, "rounds": args.rounds,
        "plain_images_per_s": n_images / med["plain"], "harvest_images_per_s": n_images / med["harvest"],
        "ratio": med["plain"] / med["harvest"],
        "tokens_per_s_per_site": n_images * gen["num_inference_steps"] * rows * cols / med["harvest"],
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
