"""What capturing one site costs: generation inside `fluxsae.capture` vs plain generation.

Target (issue): capturing one site costs at most 1.05x plain generation (median over runs, same
process, tiny pipeline on CPU). Plain and captured runs alternate so that drift (thermal, other
load on the machine) hits both equally; warm-up runs come first and are not counted.

    python benchmarks/capture_overhead.py --runs 60 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import fluxsae
from fluxsae.tiny import TINY_GENERATION, tiny_flux_pipeline

RESULTS = Path(__file__).parent / "results" / "capture_overhead.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=40, help="timed runs of each variant")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs of each variant first")
    ap.add_argument("--site", default="transformer_blocks.1.image", help="the site captured")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    steps = TINY_GENERATION["num_inference_steps"]
    ap.add_argument("--steps", type=int, default=steps, help="denoising steps")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON written here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    pipe = tiny_flux_pipeline(seed=0)
    call = {**TINY_GENERATION, "num_inference_steps": args.steps, "output_type": "latent"}

    def plain():
        pipe("a red circle", generator=torch.Generator().manual_seed(0), **call)

    def capture_all():
        with fluxsae.capture(pipe, args.site):
            plain()

    def capture_one_step():
        with fluxsae.capture(pipe, args.site, steps=[0]):
            plain()

    variants = {"plain": plain, "capture_all_steps": capture_all, "capture_step_0": capture_one_step}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.warmup + args.runs):
        # Rotate the order each round so no variant always runs first (or right after another).
        names = list(variants)
        names = names[i % len(names) :] + names[: i % len(names)]
        for name in names:
            t0 = time.perf_counter()
            variants[name]()
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[name].append(dt)

    med = {k: statistics.median(v) for k, v in times.items()}
    # Paired ratios (each captured run against the plain run of the same round) cancel drift better.
    paired = {
        k: statistics.median(a / b for a, b in zip(times[k], times["plain"], strict=True))
        for k in variants
        if k != "plain"
    }
    print(f"{'variant':<20} {'median ms':>10} {'ratio':>7} {'paired':>7}")
    for k in variants:
        ratio = med[k] / med["plain"]
        print(f"{k:<20} {1e3 * med[k]:>10.2f} {ratio:>7.3f} {paired.get(k, 1.0):>7.3f}")

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "fluxsae": fluxsae.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "median_s": med,
        "ratio_to_plain": {k: med[k] / med["plain"] for k in variants if k != "plain"},
        "paired_median_ratio": paired,
        "target": 1.05,
        "times_s": times,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
