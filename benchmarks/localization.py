"""Does a concept's best feature light up where the concept is? Heatmap IoU against the Shapes truth.

For each object concept (the 6 colours and 3 shapes) and each dictionary (the packaged SAE and ITDA at
both sites), on 200 scenes no training run saw (seed 31337; image i uses noise seed 31337 + i):
1. activations of every step are captured, encoded, and the codes averaged over the 8 steps (what
   `fluxsae.features.feature_heatmap` paints by default);
2. the concept's best feature is the one with the highest token AUROC on the first 100 scenes
   (`fluxsae.shapes.truth.concept_auroc`);
3. on the other 100, for every scene showing the concept, the feature's 8x8 map is thresholded at
   0.5 x its max (`truth.heatmap_iou`; also Otsu's threshold) and compared with the concept's token
   mask: the median IoU over those scenes is the figure. Target (issue 12): >= 0.5 for the SAE.
Baseline: the concept's difference-of-means direction u (mean raw activation on its tokens minus
elsewhere, on the first 100 scenes, steps averaged), the map being the projection (x - m) . u / |u|
with m the midpoint of the two class means, so positive means "on the concept's side". Ceiling: a
logistic probe on the whole residual (steps averaged, fitted on the first 100 scenes' tokens), the map
being its probability; no linear readout of these activations detects the concept's tokens better,
so its IoU says roughly how much of the target a site allows. Each row also says where the half-max
maps go wrong (`half_max_errors`): the concept's tokens left off, and the tokens on that lie on its
rim, on other objects or further out; the share kept of fully and of partly covered tokens; how often
the peak that sets the cut lies off the concept.

    python benchmarks/localization.py                 # writes results/localization.json
    python benchmarks/localization.py --cache /tmp/loc_acts.safetensors   # reuse the generations
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from interpretability import logistic_scores
from shapes_activations import command_line, generate, parse_dicts, scene_arguments, write_report

import fluxsae
from fluxsae import shapes
from fluxsae.feature_stats import step_averaged_codes
from fluxsae.shapes import truth

RESULTS = Path(__file__).parent / "results"
SITES = ("transformer_blocks.3.image", "single_transformer_blocks.2.image")
CONCEPTS = [f"color:{c}" for c in shapes.COLORS] + [f"shape:{s}" for s in shapes.SHAPES]
THRESHOLDS = {"half_max": 0.5, "otsu": "otsu"}


def localize(unit_maps: torch.Tensor, masks: dict, eval_idx: list[int], concept: str, coverage: dict) -> dict:
    """IoU of unit_maps [n, 64] with the concept's masks on the eval scenes that show the concept;
    coverage[concept] [n, 64]: the share of each token its objects cover (for `half_max_errors`)."""
    shown = [i for i in eval_idx if masks[concept][i].any()]
    maps = unit_maps[shown]
    truth_masks = torch.from_numpy(masks[concept][shown])
    out = {"n_eval_scenes": len(shown)}
    if not shown:
        return {**out, **{f"{s}_iou_{n}": float("nan") for s in ("median", "mean") for n in THRESHOLDS}}
    for name, threshold in THRESHOLDS.items():
        iou = truth.heatmap_iou(maps, truth_masks, threshold=threshold)
        out[f"median_iou_{name}"] = float(iou.median())
        out[f"mean_iou_{name}"] = float(iou.mean())
    # A silent map (nothing > 0) scores IoU 0: how often that happens says whether a low IoU means
    # "fires in the wrong place" or "does not fire on this scene at all".
    out["silent_share"] = float((maps.flatten(1).max(1).values <= 0).float().mean())
    objects, cover = (torch.from_numpy(a[shown]) for a in (masks["object"], coverage[concept]))
    out["half_max_errors"] = half_max_errors(maps, truth_masks, objects, cover)
    return out


def half_max_on(maps: torch.Tensor) -> torch.Tensor:
    """The tokens (dim 1) of each map at >= 0.5 x its max, none where the max is <= 0: the rule of
    `truth.heatmap_iou`'s default threshold."""
    peak = maps.max(1, keepdim=True).values
    return (maps >= THRESHOLDS["half_max"] * peak) & (peak > 0)


ERRORS = ("missed", "on_rim", "on_other_objects", "on_far_background", "kept_full", "kept_partial",
          "peak_off_concept", "peak_on_its_edge", "peak_on_other_objects")  # fmt: skip


def half_max_errors(maps: torch.Tensor, concept: torch.Tensor, objects: torch.Tensor, cover: torch.Tensor):
    """Where a half-max map goes wrong. maps [m, 64]; concept, objects bool [m, 64]; cover [m, 64] the
    share of each token the concept's objects cover. Medians over the scenes: `missed` = share of the
    concept's tokens left off; of the tokens on, the share on the concept's rim (background tokens
    8-adjacent to it), on other objects, and on the background further away. Means over the scenes:
    the share kept of the concept's tokens that its objects cover fully (>= 90%) and partly (25-90%),
    and how often the map's peak lies off the concept's tokens (so that the 0.5 x peak cut is set
    by a token outside the mask): on a token its objects cover under 25% of, or on another object."""
    on = half_max_on(maps)
    side = shapes.world.TOKEN_GRID
    grid = concept.float().reshape(-1, 1, side, side)
    rim = (torch.nn.functional.max_pool2d(grid, 3, stride=1, padding=1).reshape(concept.shape) > 0) & ~objects
    n_on = on.sum(1).clamp(min=1).float()
    shares = {
        "missed": (concept & ~on).sum(1) / concept.sum(1).float(),
        "on_rim": (on & rim).sum(1) / n_on,
        "on_other_objects": (on & objects & ~concept).sum(1) / n_on,
        "on_far_background": (on & ~objects & ~rim).sum(1) / n_on,
    }
    out = {name: float(share.median()) for name, share in shares.items()}
    for name, part in (("kept_full", concept & (cover >= 0.9)), ("kept_partial", concept & (cover < 0.9))):
        has = part.any(1)
        kept = (on & part).sum(1)[has] / part.sum(1)[has].float()
        out[name] = float(kept.mean()) if has.any() else float("nan")
    at_peak = maps.argmax(1, keepdim=True)
    off, peak_cover = ~concept.gather(1, at_peak)[:, 0], cover.gather(1, at_peak)[:, 0]
    peak_on_object = objects.gather(1, at_peak)[:, 0]
    out["peak_off_concept"] = float(off.float().mean())
    out["peak_on_its_edge"] = float((off & (peak_cover > 0)).float().mean())  # under 25% of it covered
    out["peak_on_other_objects"] = float((off & (peak_cover == 0) & peak_on_object).float().mean())
    return out


def concept_coverage(scenes, concepts) -> dict[str, np.ndarray]:
    """concept -> [n, 64] float: per token, the largest share of it covered by one object showing the
    concept (a colour or shape of `concepts`); each object's coverage is computed once."""
    out = {c: np.zeros((len(scenes), shapes.world.TOKEN_GRID**2), dtype=np.float32) for c in concepts}
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            cover = shapes.world.token_coverage(shapes.world.object_mask(obj)).reshape(-1)
            for concept in (f"color:{obj.color}", f"shape:{obj.shape}"):
                if concept in out:
                    out[concept][i] = np.maximum(out[concept][i], cover)
    return out


def best_unit_by_iou(codes: torch.Tensor, masks: dict, select_idx: list[int], concept: str) -> int:
    """The unit whose half-max map has the highest median IoU with the concept's mask over the
    selection scenes showing it: codes [n, 64, U] -> a unit index (the rule of `truth.heatmap_iou`,
    vectorised over units)."""
    shown = [i for i in select_idx if masks[concept][i].any()]
    maps = codes[shown]  # [m, 64, U]
    mask = torch.from_numpy(masks[concept][shown])[:, :, None]  # [m, 64, 1]
    on = half_max_on(maps)
    iou = (on & mask).sum(1).float() / (on | mask).sum(1).float()  # [m, U]; the mask is never empty
    return int(iou.median(0).values.argmax())


def difference_of_means_map(mean_acts: torch.Tensor, select_masks: dict, concept: str) -> torch.Tensor:
    """[n, 64] projection of step-averaged activations [n, 64, d] on the concept's difference of means
    (fitted on the selection scenes, the first len(select_masks[concept]) of mean_acts), from the
    midpoint of the two class means."""
    half = len(select_masks[concept])
    direction = truth.difference_of_means(mean_acts[:half], select_masks, concept).double()
    chosen = mean_acts[:half].reshape(-1, mean_acts.shape[-1]).double()
    on = torch.from_numpy(select_masks[concept].reshape(-1))
    midpoint = (chosen[on].mean(0) + chosen[~on].mean(0)) / 2
    return ((mean_acts.double() - midpoint) @ (direction / direction.norm())).float()


def probe_map(mean_acts: torch.Tensor, select_masks: dict, concept: str) -> torch.Tensor:
    """[n, 64] probability of a logistic probe on the whole residual, fitted on the selection scenes."""
    half, tokens = len(select_masks[concept]), mean_acts.shape[1]
    flat = mean_acts.reshape(-1, mean_acts.shape[-1])
    on = torch.from_numpy(select_masks[concept].reshape(-1))
    return logistic_scores(flat[: half * tokens], on, flat).sigmoid().reshape(-1, tokens)


def _median(values) -> float:
    """Median of the defined values (NaN where a concept had no scene to score)."""
    kept = [v for v in values if v == v]
    return statistics.median(kept) if kept else float("nan")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scene_arguments(p, SITES)
    p.add_argument("--cache", type=Path, default=None, help="safetensors file to keep/reuse the activations")
    p.add_argument("--out", type=Path, default=RESULTS / "localization.json")
    p.add_argument(
        "--dict",
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help="score these dictionaries (Hub-layout roots, a folder per site), not the packaged",
    )
    args = p.parse_args(argv)
    dictionaries = parse_dicts(args.dict) or {"sae": ("shapes", "sae"), "itda": ("shapes", "itda")}
    torch.set_num_threads(min(2, torch.get_num_threads()))

    start = time.perf_counter()
    acts = generate(args.scenes, args.seed, args.batch_size, args.cache, SITES)
    seconds_generate = time.perf_counter() - start
    scenes = shapes.sample_scenes(args.scenes, seed=args.seed)
    masks = truth.scene_masks(scenes)
    coverage = concept_coverage(scenes, CONCEPTS)
    half = args.scenes // 2
    select, evaluate = list(range(half)), list(range(half, args.scenes))
    select_masks = {c: m[select] for c, m in masks.items()}
    eval_masks = {c: m[evaluate] for c, m in masks.items()}

    results: dict = {}
    for site in args.sites:
        mean_acts = acts[site].mean(0)  # [n, 64, d]
        for method, (where, kind) in dictionaries.items():
            dictionary = fluxsae.load_dictionary(where, site=site, method=kind)
            codes = step_averaged_codes(dictionary, acts[site])
            aurocs, names = truth.concept_auroc(codes[:half], select_masks, CONCEPTS)
            eval_aurocs, _ = truth.concept_auroc(codes[half:], eval_masks, CONCEPTS)
            best = truth.best_units(aurocs, names)
            rows = {}
            for concept in CONCEPTS:
                if concept not in best:  # absent from the selection scenes (only with few scenes)
                    continue
                unit, auroc = best[concept]
                c = names.index(concept)
                by_iou = best_unit_by_iou(codes, masks, select, concept)
                rows[concept] = {
                    "feature": unit,
                    "auroc_select": auroc,
                    "auroc_eval": float(eval_aurocs[unit, c]),
                    **localize(codes[:, :, unit], masks, evaluate, concept, coverage),
                    "chosen_by_iou": {
                        "feature": by_iou,
                        "auroc_eval": float(eval_aurocs[by_iou, c]),
                        **localize(codes[:, :, by_iou], masks, evaluate, concept, coverage),
                    },
                }
            results[f"{method}:{site}"] = rows
            print(method, site, {k: round(v["median_iou_half_max"], 3) for k, v in rows.items()}, flush=True)

        for name, concept_map in (("diff_of_means", difference_of_means_map), ("probe", probe_map)):
            rows = {}
            for concept in CONCEPTS:
                if not masks[concept][select].any():
                    continue
                maps = concept_map(mean_acts, select_masks, concept)
                auroc_select, _ = truth.concept_auroc(maps[:half, :, None], select_masks, [concept])
                auroc_eval, _ = truth.concept_auroc(maps[half:, :, None], eval_masks, [concept])
                rows[concept] = {
                    "auroc_select": float(auroc_select[0, 0]),
                    "auroc_eval": float(auroc_eval[0, 0]),
                    **localize(maps, masks, evaluate, concept, coverage),
                }
            results[f"{name}:{site}"] = rows
            print(name, site, {k: round(v["median_iou_half_max"], 3) for k, v in rows.items()})

    summary = {
        key: {
            "median_over_concepts_of_median_iou_half_max": _median(
                r["median_iou_half_max"] for r in rows.values()),
            "median_over_concepts_of_median_iou_otsu": _median(r["median_iou_otsu"] for r in rows.values()),
            "median_auroc_eval": _median(r["auroc_eval"] for r in rows.values()),
            "median_silent_share": _median(r.get("silent_share", float("nan")) for r in rows.values()),
            **{f"median_half_max_{name}": _median(r["half_max_errors"][name] for r in rows.values())
               for name in ERRORS},
            "chosen_by_iou_median_over_concepts_of_median_iou_half_max": _median(
                r["chosen_by_iou"]["median_iou_half_max"] for r in rows.values() if "chosen_by_iou" in r),
        }
        for key, rows in results.items()
    }  # fmt: skip
    report = write_report(args.out, command_line(__file__, argv), {
        "scenes": args.scenes, "seed": args.seed, "select_scenes": "first half", "eval_scenes": "second half",
        "concepts": CONCEPTS, "steps": "codes averaged over all 8 steps",
        "seconds": {"generate": round(seconds_generate, 1), "total": round(time.perf_counter() - start, 1)},
        "summary": summary, "per_concept": results,
    })  # fmt: skip
    print(json.dumps(summary, indent=2))
    return report


if __name__ == "__main__":
    main()
