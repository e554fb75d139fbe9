"""Why a site's feature heat maps leave part of the object off: two diagnostics of `localization.py`.

1. TopK's competition. The packaged SAE's codes against the same features encoded with a larger k
   (2k, 4k) and with no top-k at all (ReLU of every pre-activation, as if each feature fired alone).
   If a concept's feature were dropped from the top k on the object's edge tokens, these maps would
   keep more of the object and their IoU would rise.
2. The activation's profile over the object. For each concept's best unit (SAE feature, difference of
   means, logistic probe; the maps of `localization.py`), on the eval scenes: the map divided by its
   peak (what the 0.5 x peak cut sees), median over the concept's tokens by the share of the token the
   object covers (25-50%, 50-75%, 75-90%, >= 90%), and the Spearman correlation of the map with that
   share over the concept's tokens. Beside it, where the ReLU's zero lies on the SAE feature's
   step-averaged pre-activation (0: the background tokens' median, 1: the fully covered tokens'):
   a high zero would make the map peaky by cutting the object's weaker tokens.

Same scenes, selection and eval halves as `localization.py` (200 scenes of seed 31337; units chosen by
AUROC on the first half).

    python benchmarks/feature_profile.py --cache runs/interp_acts.safetensors
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from localization import (
    CONCEPTS,
    SITES,
    concept_coverage,
    difference_of_means_map,
    localize,
    probe_map,
)
from shapes_activations import command_line, generate, scene_arguments, write_report

import fluxsae
from fluxsae import shapes
from fluxsae.feature_stats import step_averaged_codes
from fluxsae.shapes import truth

RESULTS = Path(__file__).parent / "results"
COVER_BINS = ((0.25, 0.5), (0.5, 0.75), (0.75, 0.9), (0.9, 1.01))


def pre_activations(sae, x: torch.Tensor) -> torch.Tensor:
    """The encoder's linear pre-activations [..., F] of raw activations [..., d] (before ReLU and TopK)."""
    with torch.no_grad():
        return (sae.normalize(x) - sae.b_dec) @ sae.W_enc.T + sae.b_enc


def encoded_maps(sae, acts: torch.Tensor, k: int | None) -> torch.Tensor:
    """Step-averaged dense codes [n, 64, F] of activations [steps, n, 64, d]: per-token TopK at `k`,
    or ReLU of every pre-activation when k is None. (At k = cfg.k the library's
    `step_averaged_codes` gives the package's own codes.)"""
    out = torch.zeros(*acts.shape[1:3], int(sae.cfg.n_features))
    for step in acts:
        pre = pre_activations(sae, step).relu()
        if k is not None:
            values, indices = pre.topk(k, dim=-1)
            pre = torch.zeros_like(pre).scatter_(-1, indices, values)
        out += pre / acts.shape[0]
    return out


def zero_height(pre: torch.Tensor, concept_full, background) -> float:
    """Where the ReLU's zero lies on a feature's step-averaged pre-activation map pre [m, 64]: 0 at the
    median over background tokens, 1 at the median over the concept's fully covered tokens."""
    full, back = pre[concept_full].median(), pre[background].median()
    return float(-back / (full - back))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def cover_profile(maps: torch.Tensor, mask, cover: torch.Tensor) -> dict:
    """maps [m, 64] (eval scenes), mask bool [m, 64], cover [m, 64] -> the map / its peak by cover bin
    (medians over the concept's tokens) and its Spearman correlation with the cover."""
    mask = torch.as_tensor(mask)
    relative = maps / maps.max(1, keepdim=True).values.clamp(min=1e-12)
    on_rel, on_cover = relative[mask], cover[mask]
    rho = torch.corrcoef(torch.stack([_ranks(on_rel), _ranks(on_cover)]))[0, 1]
    by_bin = {}
    for low, high in COVER_BINS:
        part = (on_cover >= low) & (on_cover < high)
        by_bin[f"{low:g}-{min(high, 1):g}"] = float(on_rel[part].median()) if part.any() else float("nan")
    return {"relative_to_peak_by_cover": by_bin, "spearman_with_cover": float(rho)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scene_arguments(p, SITES)
    p.add_argument("--cache", type=Path, default=None, help="safetensors file to keep/reuse the activations")
    p.add_argument("--out", type=Path, default=RESULTS / "feature_profile.json")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    acts = generate(args.scenes, args.seed, args.batch_size, args.cache, SITES)
    scenes = shapes.sample_scenes(args.scenes, seed=args.seed)
    masks = truth.scene_masks(scenes)
    coverage = concept_coverage(scenes, CONCEPTS)
    half = args.scenes // 2
    evaluate = list(range(half, args.scenes))
    select_masks = {c: m[:half] for c, m in masks.items()}
    eval_masks = {c: m[half:] for c, m in masks.items()}

    competition, profile, zero_heights = {}, {}, {}
    for site in args.sites:
        sae = fluxsae.load_dictionary("shapes", site=site, method="sae")
        if sae.cfg.batch_topk:
            raise SystemExit(f"the packaged SAE at {site} is BatchTopK; these maps assume per-token TopK")
        k = int(sae.cfg.k)
        sae_maps = {}
        for rule, rule_k in ((f"topk {k} (packaged)", k), (f"topk {2 * k}", 2 * k), (f"topk {4 * k}", 4 * k),
                             ("relu, no top-k", None)):  # fmt: skip
            if rule_k == k:
                codes = step_averaged_codes(sae, acts[site])  # the package's own codes
            else:
                codes = encoded_maps(sae, acts[site], rule_k)
            aurocs, names = truth.concept_auroc(codes[:half], select_masks, CONCEPTS)
            eval_aurocs, _ = truth.concept_auroc(codes[half:], eval_masks, CONCEPTS)
            best = truth.best_units(aurocs, names)
            rows = {}
            for concept in CONCEPTS:
                unit = best[concept][0]
                found = localize(codes[:, :, unit], masks, evaluate, concept, coverage)
                auroc = float(eval_aurocs[unit, names.index(concept)])
                rows[concept] = {"feature": unit, "auroc_eval": auroc,
                                 "median_iou_half_max": found["median_iou_half_max"],
                                 "missed": found["half_max_errors"]["missed"],
                                 "kept_partial": found["half_max_errors"]["kept_partial"]}  # fmt: skip
            competition[f"{site} {rule}"] = {
                "median_iou_half_max": statistics.median(r["median_iou_half_max"] for r in rows.values()),
                "median_auroc_eval": statistics.median(r["auroc_eval"] for r in rows.values()),
                "median_missed": statistics.median(r["missed"] for r in rows.values()),
                "per_concept": rows,
            }
            print(site, rule, {key: round(v, 3) for key, v in competition[f"{site} {rule}"].items()
                               if key != "per_concept"}, flush=True)  # fmt: skip
            if rule_k == k:
                sae_maps = {c: codes[:, :, best[c][0]] for c in CONCEPTS}
                background = torch.from_numpy(~masks["object"][half:])
                full = {c: torch.from_numpy(eval_masks[c] & (coverage[c][half:] >= 0.9)) for c in CONCEPTS}
                pre = sum(pre_activations(sae, step[half:]) for step in acts[site]) / acts[site].shape[0]
                heights = {c: zero_height(pre[:, :, best[c][0]], full[c], background) for c in CONCEPTS}
                zero_heights[site] = {"median": statistics.median(heights.values()), "per_concept": heights}
                print(site, "zero's height", round(zero_heights[site]["median"], 2), flush=True)

        mean_acts = acts[site].mean(0)
        kinds = {
            "sae": sae_maps,
            "diff_of_means": {c: difference_of_means_map(mean_acts, select_masks, c) for c in CONCEPTS},
            "probe": {c: probe_map(mean_acts, select_masks, c) for c in CONCEPTS},
        }
        for kind, concept_maps in kinds.items():
            rows = {c: cover_profile(concept_maps[c][half:], eval_masks[c],
                                     torch.from_numpy(coverage[c][half:])) for c in CONCEPTS}  # fmt: skip
            by_bin = {b: statistics.median(r["relative_to_peak_by_cover"][b] for r in rows.values())
                      for b in next(iter(rows.values()))["relative_to_peak_by_cover"]}  # fmt: skip
            rho = statistics.median(r["spearman_with_cover"] for r in rows.values())
            profile[f"{kind}:{site}"] = {"median_relative_to_peak_by_cover": by_bin,
                                         "median_spearman_with_cover": rho, "per_concept": rows}  # fmt: skip
            rounded = {b: round(v, 2) for b, v in by_bin.items()}
            print(kind, site, rounded, "spearman", round(rho, 2), flush=True)

    report = write_report(args.out, command_line(__file__, argv), {
        "scenes": args.scenes, "seed": args.seed, "select_scenes": "first half", "eval_scenes": "second half",
        "concepts": CONCEPTS, "steps": "codes averaged over all 8 steps",
        "seconds": round(time.perf_counter() - start, 1),
        "topk_competition": competition, "cover_profile": profile, "relu_zero_height": zero_heights,
    })  # fmt: skip
    print(json.dumps({rule: v["median_iou_half_max"] for rule, v in competition.items()}, indent=2))
    return report


if __name__ == "__main__":
    main()
