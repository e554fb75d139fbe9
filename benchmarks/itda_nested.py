"""An experiment, not a library feature: can ITDA atoms detect the Shapes concepts if the codes are nested?

Every ITDA atom is one real token (one colour, shape, size, background, step and position at once), and
gradient pursuit over 2,048 such atoms gives each atom a code on a few similar tokens only (median
firing density 0.5%), so no atom follows a concept across scenes (packaged ITDAs: coverage 0). Pruned
builds (`build_itda --prune-cosine 0.4`: ~200-300 atoms, each far from the others) fire more broadly
and detect better, but reconstruct at three to four times the FVU.

This script encodes in two stages, in the spirit of a Matryoshka prefix: stage 1, pursuit with `k1`
atoms over a pruned ("coarse") ITDA; stage 2, pursuit with `k2` atoms over the packaged ("fine") ITDA on
what stage 1 left. The units are the coarse atoms then the fine atoms; both stages share the fine
ITDA's bias (a build's bias is the mean of its first batch; the pruned builds of the same
harvest and seed differ from the packaged bias by < 1e-5). Scored like
`interpretability.py` (the same 200 scenes, step-averaged codes, chosen on the first half, scored on the
second), with the FVU of the two stages on the same scenes' tokens, every step (`k1 0`: the fine ITDA
alone, whose FVU here is its held-out FVU's twin, 0.038 at double 3).

    python -m training.build_itda --acts runs/sd24/harvest --site transformer_blocks.3.image \
        --k 24 --threshold 0.1 --prune-cosine 0.4 --max-atoms 2048 --work W --out runs/itda/p0.4/dict
    python benchmarks/itda_nested.py --cache runs/interp_acts.safetensors --coarse runs/itda/p0.4/dict \
        --k1 0,24,64 --k2 24

(the build again with `--site single_transformer_blocks.2.image` for the second site.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from interpretability import score_units
from shapes_activations import command_line, generate, scene_arguments, write_report

import fluxsae
from fluxsae import shapes
from fluxsae.pursuit import combine, pursuit
from fluxsae.shapes import truth

RESULTS = Path(__file__).parent / "results"
SITES = ("transformer_blocks.3.image", "single_transformer_blocks.2.image")


def nested_codes(coarse, fine, acts: torch.Tensor, k1: int, k2: int) -> tuple[torch.Tensor, float]:
    """acts [steps, n, tokens, d] -> step-averaged dense codes [n, tokens, n_coarse + n_fine] and the FVU
    of the two-stage reconstruction over every step's tokens."""
    n_steps, n, tokens, d = acts.shape
    a1, a2, bias = coarse.atoms, fine.atoms, fine.bias
    codes = torch.zeros(n, tokens, a1.shape[0] + a2.shape[0])
    mean = acts.reshape(-1, d).mean(0)
    err = total = 0.0
    for step in range(n_steps):
        x = acts[step].reshape(-1, d) - bias
        x_hat = torch.zeros_like(x)
        dense = torch.zeros(x.shape[0], codes.shape[-1])
        for atoms, k, offset in ((a1, k1, 0), (a2, k2, a1.shape[0])):
            if k:
                code = pursuit(x - x_hat, atoms, k)
                x_hat += combine(code.indices, code.values, atoms)
                dense.scatter_add_(-1, code.indices + offset, code.values)
        err += (x - x_hat).pow(2).sum().item()
        total += (acts[step].reshape(-1, d) - mean).pow(2).sum().item()
        codes += dense.view(n, tokens, -1) / n_steps
    return codes, err / total


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scene_arguments(p, SITES)
    p.add_argument("--coarse", type=Path, required=True, help="pruned ITDAs' root (one folder per site)")
    p.add_argument("--fine", default="shapes", help="root of the fine ITDAs (default: the packaged ones)")
    p.add_argument("--k1", type=lambda s: [int(v) for v in s.split(",")], default=[0, 24, 64])
    p.add_argument("--k2", type=int, default=24)
    p.add_argument("--cache", type=Path, default=None, help="safetensors file to keep/reuse the generations")
    p.add_argument("--out", type=Path, default=RESULTS / "itda_nested.json")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    start = time.perf_counter()
    acts = generate(args.scenes, args.seed, args.batch_size, args.cache, SITES)
    masks = truth.scene_masks(shapes.sample_scenes(args.scenes, seed=args.seed))
    results: dict = {}
    for site in args.sites:
        coarse = fluxsae.load_dictionary(args.coarse, site=site, method="itda")
        fine = fluxsae.load_dictionary(args.fine, site=site, method="itda")
        site_results = {"coarse_atoms": coarse.n_atoms, "fine_atoms": fine.n_atoms}
        for k1 in args.k1:
            codes, fvu = nested_codes(coarse, fine, acts[site], k1, args.k2)
            scored = score_units(codes, masks, args.scenes // 2, sparse=True)
            scored["summary"].update(fvu=fvu, l0=k1 + args.k2)
            site_results[f"k1={k1},k2={args.k2}"] = scored
            per_concept = {c: round(v["auroc_eval"], 3) for c, v in scored["per_concept"].items()}
            print(site, f"k1 {k1} k2 {args.k2}", scored["summary"], per_concept, flush=True)
        results[site] = site_results

    return write_report(args.out, command_line(__file__, argv), {
        "scenes": args.scenes, "seed": args.seed, "coarse": str(args.coarse), "fine": str(args.fine),
        "seconds": round(time.perf_counter() - start, 1), "results": results,
    })  # fmt: skip


if __name__ == "__main__":
    main()
