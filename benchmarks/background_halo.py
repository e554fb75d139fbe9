"""Why no single unit detects a background concept: the halo next to objects, and a scene's colour that
only a whitened readout sees.

A background concept ("background:black") is the set of tokens of a black scene that show no object.
On the 200 scenes of `interpretability.py` (seed 31337, all 8 steps, step-averaged; the first 100
scenes fit or choose, the other 100 score), per site and background:

- halo: AUROC with only the background tokens next to an object (8-neighbourhood on the token grid) as
  positives, then only the others, every negative kept, for three single directions -- the dictionary's
  best unit (chosen by AUROC on the first half), the concept's difference of means (the direction a
  reconstruction objective sees: it is where the concept moves the activations most) and linear
  discriminant analysis (the difference of means whitened by the within-class covariance, the
  direction a probe finds);
- the scene's colour: "this token belongs to a black scene", read from every token and from object
  tokens only, by the same three;
- variance: the share of the token variance along the LDA direction, beside the share along the
  difference of means, in the standardised space the packaged SAEs are trained in (what a
  mean-squared-error objective weighs a direction by).

    python benchmarks/background_halo.py --cache runs/interp_acts.safetensors      # ~1 min with the cache
    python benchmarks/background_halo.py --dict NAME=FOLDER                        # another dictionary
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from interpretability import next_to_an_object, split_auroc
from shapes_activations import command_line, generate, parse_dicts, scene_arguments, write_report

import fluxsae
from fluxsae import shapes
from fluxsae.feature_stats import step_averaged_codes
from fluxsae.shapes import truth

RESULTS = Path(__file__).parent / "results"
SITES = ("transformer_blocks.3.image", "single_transformer_blocks.2.image")
BACKGROUNDS = tuple(shapes.BACKGROUNDS)
RIDGE = 1e-3
"""Added to the diagonal of the within-class covariance before LDA solves with it."""


def directions(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """x [N, d] float, y [N] bool -> {"dom": difference of means, "lda": it whitened by the pooled
    within-class covariance}."""
    dom = x[y].mean(0) - x[~y].mean(0)
    within = 0.5 * (torch.cov(x[y].T) + torch.cov(x[~y].T)) + RIDGE * torch.eye(x.shape[1])
    return {"dom": dom, "lda": torch.linalg.solve(within, dom)}


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float(truth.auroc(scores[:, None].float(), labels[:, None])[0, 0])


def site_figures(acts: torch.Tensor, codes: torch.Tensor, masks: dict, scenes: list, half: int) -> dict:
    """Every figure of the module docstring for one site: acts [steps, n, 64, d], codes [n, 64, F]."""
    x = acts.float().mean(0)
    n, tokens, d = x.shape
    x_sel, x_ev = x[:half].reshape(-1, d), x[half:].reshape(-1, d)
    c_sel, c_ev = codes[:half].reshape(half * tokens, -1), codes[half:].reshape((n - half) * tokens, -1)
    near_ev = torch.from_numpy(next_to_an_object({c: m[half:] for c, m in masks.items()}).reshape(-1))
    object_ev = torch.from_numpy(masks["object"][half:].reshape(-1))
    std = x_sel.std(0)
    z_sel = (x_sel - x_sel.mean(0)) / std  # each dimension's variance is 1: the total is d
    out = {}
    for background in BACKGROUNDS:
        concept = f"background:{background}"
        y_sel = torch.from_numpy(masks[concept][:half].reshape(-1))
        y_ev = torch.from_numpy(masks[concept][half:].reshape(-1))
        unit = int(truth.auroc(c_sel, y_sel[:, None])[:, 0].argmax())
        scores = {"unit": c_ev[:, unit], **{k: x_ev @ v for k, v in directions(x_sel, y_sel).items()}}
        row: dict = {}
        for name, s in scores.items():
            near, far = split_auroc(s, y_ev, near_ev)
            row[name] = {"all": auroc(s, y_ev), "next_to_an_object": near, "away": far}
        row["unit"]["id"] = unit
        for name, v in directions(x_sel, y_sel).items():
            # In the standardised space the packaged SAEs' loss is measured in: x . v = z . (std * v).
            u = std * v
            row[name]["variance_share"] = float((z_sel @ (u / u.norm())).var() / d)
        in_scene = torch.tensor([s.background == background for s in scenes])[:, None].expand(n, tokens)
        s_sel, s_ev = in_scene[:half].reshape(-1), in_scene[half:].reshape(-1)
        scene_unit = int(truth.auroc(c_sel, s_sel[:, None])[:, 0].argmax())
        scene_dirs = directions(x_sel, s_sel)
        scene_scores = {"unit": c_ev[:, scene_unit], **{k: x_ev @ v for k, v in scene_dirs.items()}}
        row["scene"] = {
            name: {"all_tokens": auroc(s, s_ev), "object_tokens": auroc(s[object_ev], s_ev[object_ev])}
            for name, s in scene_scores.items()
        }
        row["scene"]["unit"]["id"] = scene_unit
        out[concept] = row
    out["share_next_to_an_object"] = float(near_ev.sum() / (~object_ev).sum())
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    scene_arguments(p, SITES)
    p.add_argument("--dict", action="append", default=[], metavar="NAME=FOLDER",
                   help="dictionaries whose best unit to report (default: the packaged SAE)")  # fmt: skip
    p.add_argument("--cache", type=Path, default=None, help="interpretability.py's file of generations")
    p.add_argument("--out", type=Path, default=RESULTS / "background_halo.json")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    acts = generate(args.scenes, args.seed, args.batch_size, args.cache, SITES)
    scenes = shapes.sample_scenes(args.scenes, seed=args.seed)
    masks = truth.scene_masks(scenes)
    dictionaries = parse_dicts(args.dict) if args.dict else {"sae": ("shapes", "sae")}
    results: dict = {}
    for site in args.sites:
        for name, (where, method) in dictionaries.items():
            dictionary = fluxsae.load_dictionary(where, site=site, method=method)
            codes = step_averaged_codes(dictionary, acts[site])
            figures = site_figures(acts[site], codes, masks, scenes, args.scenes // 2)
            results.setdefault(site, {})[name] = figures
            print(site, name, json.dumps(results[site][name]), flush=True)
    return write_report(args.out, command_line(__file__, argv), {
        "scenes": args.scenes, "seed": args.seed, "select": "first half", "eval": "second half",
        "seconds": round(time.perf_counter() - start, 1), "results": results,
    })  # fmt: skip


if __name__ == "__main__":
    main()
