"""Do single units mean one thing? SAE features, ITDA atoms, MLP neurons, raw dimensions and random
directions scored against the Shapes truth, beside a logistic probe (what any linear readout can reach).

On 200 scenes no training saw (seed 31337, image i with noise seed 31337 + i, all 8 steps), each unit's
activation is averaged over the steps; the first half of the scenes chooses, the second half scores
(so "the best of 2,048" is not a best-of-many on the scored tokens). Per site and method:

- per concept (the 15 single concepts of `fluxsae.autointerp.oracle.SINGLE_CONCEPTS`): the unit with the
  best token AUROC on the selection half, scored on the evaluation half; coverage = share of concepts
  whose chosen unit reaches AUROC >= 0.9 there; the median over concepts;
- per unit: each live unit's best concept on the selection half (the 15 singles), and its AUROC for
  that concept on the evaluation half; the median over live units (a unit that never fires on the
  selection half is dead and left out);
- sparse probing (SAEBench's, against the truth): the k = 1, 2, 5 units with the best selection AUROC
  for a concept, a logistic regression on them fitted on the selection half, AUROC on the evaluation
  half; the median over concepts;
- the backgrounds' halo: for each background concept, the eval AUROC again with only its tokens next
  to an object as positives (`auroc_eval_near`, a third of them), then only the others
  (`auroc_eval_far`), every negative kept;
- absorption (sparse units only): on the tokens of a concept, the share where the concept's main unit
  is silent while another unit that is itself a detector of the concept (selection AUROC >= 0.7) fires,
  i.e. the concept was absorbed by a narrower unit; and the number of such units (splitting).

Units: dictionary codes (`encode_sparse`), MLP neurons (the hidden activations of the site's own block,
`fluxsae.autointerp.examples.capture_mlp`), raw dimensions with both signs, 2,048 random unit directions
(the floor: in a 128-d residual the best of many directions already detects coarse concepts), and a
logistic probe on the whole residual (one probe per concept, the ceiling of a linear readout).

    python benchmarks/interpretability.py                          # the packaged dictionaries
    python benchmarks/interpretability.py --dict matryoshka=runs/variants/matryoshka/package/sae \\
        --cache /tmp/interp_acts.safetensors                       # more dictionaries, cached generations
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from shapes_activations import command_line, generate, parse_dicts, scene_arguments, write_report

import fluxsae
from fluxsae import shapes
from fluxsae.autointerp.examples import RandomDirections
from fluxsae.autointerp.oracle import SINGLE_CONCEPTS
from fluxsae.feature_stats import step_averaged_codes
from fluxsae.shapes import truth
from fluxsae.shapes.world import TOKEN_GRID

RESULTS = Path(__file__).parent / "results"
SITES = ("transformer_blocks.3.image", "single_transformer_blocks.2.image")
CONCEPTS = list(SINGLE_CONCEPTS)
PROBE_KS = (1, 2, 5)
ABSORBER_AUROC = 0.7
"""A unit counts as a (narrower) detector of a concept when its selection AUROC reaches this."""
N_RANDOM = 2048


def _standardize(select: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = select.mean(0), select.std(0).clamp_min(1e-6)
    return (select - mean) / std, (other - mean) / std


def logistic_scores(x_select, y_select, x_eval, l2: float = 1e-3, iters: int = 100) -> torch.Tensor:
    """Fit a logistic regression on (x_select, y_select) with L-BFGS; its logits on x_eval [N] float32."""
    xs, xe = _standardize(x_select.double(), x_eval.double())
    w = torch.zeros(xs.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    target = y_select.double()
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, target) + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (xe @ w + b).float()


def logistic_auroc(x_select, y_select, x_eval, y_eval) -> float:
    """`logistic_scores`' AUROC on the eval half."""
    scores = logistic_scores(x_select, y_select, x_eval)
    return float(truth.auroc(scores[:, None], y_eval[:, None])[0, 0])


def _median(values) -> float:
    kept = [v for v in values if v == v]
    return statistics.median(kept) if kept else float("nan")


def next_to_an_object(masks: dict) -> np.ndarray:
    """bool [n, 64]: background tokens with an object token among their 8 neighbours on the 8x8 grid
    (about a third of the background; some show a few of the object's pixels, under COVER_FRACTION)."""
    grid = TOKEN_GRID
    obj = masks["object"].reshape(-1, grid, grid)
    padded = np.pad(obj, ((0, 0), (1, 1), (1, 1)))
    near = np.zeros_like(obj)
    for di in range(3):
        for dj in range(3):
            near |= padded[:, di : di + grid, dj : dj + grid]
    return near.reshape(len(obj), -1) & ~masks["object"].reshape(len(obj), -1)


def split_auroc(scores: torch.Tensor, positives: torch.Tensor, part: torch.Tensor) -> tuple[float, float]:
    """AUROC of scores [N] with only the positives inside / outside `part` [N] kept (every negative
    kept): how well a unit finds a background's tokens next to an object, and away from one."""
    out = []
    for keep in (part, ~part):
        tokens = keep | ~positives
        out.append(float(truth.auroc(scores[tokens][:, None], positives[tokens][:, None])[0, 0]))
    return out[0], out[1]


def score_units(units: torch.Tensor, masks: dict, half: int, *, sparse: bool) -> dict:
    """Every figure of the module docstring for units [n, 64, U] (step-averaged activations)."""
    n = units.shape[0]
    select_masks = {c: m[:half] for c, m in masks.items()}
    eval_masks = {c: m[half:] for c, m in masks.items()}
    sel_auroc, names = truth.concept_auroc(units[:half], select_masks, CONCEPTS)  # [U, C]
    ev_auroc, _ = truth.concept_auroc(units[half:], eval_masks, CONCEPTS)
    sel = torch.nan_to_num(sel_auroc, nan=-1.0)
    flat_sel = units[:half].reshape(half * truth.N_TOKENS, -1)
    flat_ev = units[half:].reshape((n - half) * truth.N_TOKENS, -1)
    near_ev = torch.from_numpy(next_to_an_object(eval_masks).reshape(-1))

    per_concept = {}
    for c, concept in enumerate(names):
        y_sel = torch.from_numpy(select_masks[concept].reshape(-1))
        y_ev = torch.from_numpy(eval_masks[concept].reshape(-1))
        order = sel[:, c].argsort(descending=True)
        unit = int(order[0])
        row = {"unit": unit, "auroc_select": float(sel[unit, c]), "auroc_eval": float(ev_auroc[unit, c])}
        if concept.startswith("background:"):
            row["auroc_eval_near"], row["auroc_eval_far"] = split_auroc(flat_ev[:, unit], y_ev, near_ev)
        for k in PROBE_KS:
            chosen = order[:k]
            row[f"probe_{k}"] = logistic_auroc(flat_sel[:, chosen], y_sel, flat_ev[:, chosen], y_ev)
        if sparse:
            on = flat_ev[y_ev]  # [tokens of the concept, U]
            absorbers = [int(u) for u in (sel[:, c] >= ABSORBER_AUROC).nonzero().squeeze(1) if int(u) != unit]
            main_silent = on[:, unit] <= 0
            other_fires = (on[:, absorbers] > 0).any(1) if absorbers else torch.zeros_like(main_silent)
            row["main_silent"] = float(main_silent.float().mean())
            row["absorbed"] = float((main_silent & other_fires).float().mean())
            row["n_detectors"] = len(absorbers) + 1
        per_concept[concept] = row

    live = (flat_sel > 0).any(0) if sparse else torch.ones(units.shape[-1], dtype=torch.bool)
    best_c = sel.argmax(1)
    unit_eval = ev_auroc.gather(1, best_c[:, None]).squeeze(1)
    unit_eval = unit_eval[live & (sel.max(1).values >= 0)]
    evals = [r["auroc_eval"] for r in per_concept.values()]
    summary = {
        "coverage": sum(v >= 0.9 for v in evals) / len(evals),
        "median_best_auroc": _median(evals),
        "median_unit_auroc": float(unit_eval.median()) if unit_eval.numel() else float("nan"),
        "live_units": int(live.sum()),
        **{f"probe_{k}": _median(r[f"probe_{k}"] for r in per_concept.values()) for k in PROBE_KS},
    }
    if sparse:
        summary["absorbed"] = _median(r["absorbed"] for r in per_concept.values())
        summary["main_silent"] = _median(r["main_silent"] for r in per_concept.values())
        summary["detectors_per_concept"] = _median(r["n_detectors"] for r in per_concept.values())
    return {"summary": summary, "per_concept": per_concept}


def full_probe(mean_acts: torch.Tensor, masks: dict, half: int) -> dict:
    """One logistic probe per concept on the whole residual: the ceiling of a linear readout."""
    n, _, d = mean_acts.shape
    x = mean_acts.reshape(n * truth.N_TOKENS, d)
    cut = half * truth.N_TOKENS
    near_ev = torch.from_numpy(next_to_an_object({c: m[half:] for c, m in masks.items()}).reshape(-1))
    per_concept = {}
    for concept in CONCEPTS:
        y = torch.from_numpy(masks[concept].reshape(-1))
        scores = logistic_scores(x[:cut], y[:cut], x[cut:])
        row = {"auroc_eval": float(truth.auroc(scores[:, None], y[cut:, None])[0, 0])}
        if concept.startswith("background:"):
            row["auroc_eval_near"], row["auroc_eval_far"] = split_auroc(scores, y[cut:], near_ev)
        per_concept[concept] = row
    evals = [r["auroc_eval"] for r in per_concept.values()]
    summary = {"coverage": sum(v >= 0.9 for v in evals) / len(evals), "median_best_auroc": _median(evals)}
    return {"summary": summary, "per_concept": per_concept}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scene_arguments(p, SITES)
    p.add_argument(
        "--dict",
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help="more dictionaries to score (Hub-layout roots with one folder per site)",
    )
    p.add_argument("--no-packaged", action="store_true", help="skip the packaged SAE and ITDA")
    p.add_argument("--no-baselines", action="store_true", help="skip MLP, raw, random and the probe")
    p.add_argument("--cache", type=Path, default=None, help="safetensors file to keep/reuse the generations")
    p.add_argument("--out", type=Path, default=RESULTS / "interpretability.json")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    start = time.perf_counter()
    acts = generate(args.scenes, args.seed, args.batch_size, args.cache, SITES, mlp=True)
    scenes = shapes.sample_scenes(args.scenes, seed=args.seed)
    masks = truth.scene_masks(scenes)
    half = args.scenes // 2
    dictionaries = {} if args.no_packaged else {"sae": ("shapes", "sae"), "itda": ("shapes", "itda")}
    dictionaries.update(parse_dicts(args.dict))

    results: dict = {}
    for site in args.sites:
        mean_acts = acts[site].mean(0)
        site_results = {}
        for name, (where, method) in dictionaries.items():
            dictionary = fluxsae.load_dictionary(where, site=site, method=method)
            codes = step_averaged_codes(dictionary, acts[site])
            site_results[name] = score_units(codes, masks, half, sparse=True)
            site_results[name]["dictionary"] = {
                "where": str(where),
                "n_features": dictionary.cfg.n_features,
                "k": dictionary.cfg.k,
                "held_out": dictionary.cfg.extra.get("held_out", {}),
                "spliced": dictionary.cfg.extra.get("spliced", {}),
            }
            print(site, name, site_results[name]["summary"], flush=True)
        if not args.no_baselines:
            d = mean_acts.shape[-1]
            baselines = {
                "mlp": acts[f"mlp:{site}"].mean(0),
                "raw": torch.cat([mean_acts, -mean_acts], dim=-1),
                "random": RandomDirections(N_RANDOM, d, seed=0)(mean_acts[None])[0],
            }
            for name, units in baselines.items():
                site_results[name] = score_units(units, masks, half, sparse=False)
                print(site, name, site_results[name]["summary"], flush=True)
            site_results["probe"] = full_probe(mean_acts, masks, half)
            print(site, "probe", site_results["probe"]["summary"], flush=True)
        results[site] = site_results

    return write_report(args.out, command_line(__file__, argv), {
        "scenes": args.scenes, "seed": args.seed, "select": "first half", "eval": "second half",
        "steps": "unit activations averaged over all 8 steps", "concepts": CONCEPTS,
        "seconds": round(time.perf_counter() - start, 1), "results": results,
    })  # fmt: skip


if __name__ == "__main__":
    main()
