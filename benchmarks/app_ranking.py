"""Which features top the app's table: ranked by activation mass, or by lift (mass over the feature's usual
mass, `fluxsae.features.top_features(rank="lift")`), and whether a density threshold could hide the
background features instead.

On fresh Shapes scenes, for each packaged dictionary (SAE, ITDA at both packaged sites), the top 5
features of each image are read against the scene through their labels' concept keys (the Shapes
oracle's): the share that are background-colour features ("background:<colour>" alone), the share whose
concept matches the scene (an object's colour / shape / size / position, or its background), and the
share matching one of the scene's objects. Density: the labelled background features' firing density
against the other labelled features', from the shipped feature_stats.

    python benchmarks/app_ranking.py --scenes 24
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np
import torch

import fluxsae
from fluxsae import shapes
from fluxsae.feature_stats import load_feature_stats
from fluxsae.features import DEFAULT_MAX_DENSITY, top_features

RESULTS = Path(__file__).parent / "results" / "app_ranking.json"
SITES = ("transformer_blocks.3.image", "single_transformer_blocks.2.image")


def is_background(concept: str) -> bool:
    """A background-colour label: a background (or either of two) and nothing about objects."""
    parts = [p for p in concept.split("@")[0].split("+") if p != "part:background"]
    return bool(parts) and all(p.startswith("background:") for p in parts)


def matches(concept: str, scene, objects_only: bool = False) -> bool:
    """Whether every part of a concept key (e.g. "color:red+shape:circle@late") holds for one object of
    the scene (or, for a background key, the scene's background)."""
    # Parts of an object ("part:edge") and regions of the image say where, not what: they are left out.
    parts = [p.split(":", 1) for p in concept.split("@")[0].split("+") if ":" in p]
    parts = [(k, v.split("|")) for k, v in parts if k not in ("part", "region")]
    if not parts:
        return False
    if all(k == "background" for k, _ in parts):
        return not objects_only and all(scene.background in v for _, v in parts)

    def holds(obj, key, values):
        if key == "background":
            return scene.background in values
        if key == "position":
            return any(v == obj.position or v in obj.position.split() for v in values)
        return getattr(obj, key, None) in values

    return any(all(holds(o, k, v) for k, v in parts) for o in scene.objects)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=24, help="fresh scenes generated")
    ap.add_argument("--seed", type=int, default=321, help="scene seed (not a training seed)")
    ap.add_argument("--top", type=int, default=5, help="how many top features are read per image")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON written here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe = fluxsae.load_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    gen = dict(shapes.GENERATION_DEFAULTS)
    units = {}
    for site in SITES:
        for method in ("sae", "itda"):
            labels = fluxsae.load_labels("shapes", site=site, method=method)
            concepts = {int(f): c or "" for f, c in zip(labels["feature"], labels["concept"], strict=True)}
            units[site, method] = (
                fluxsae.load_dictionary("shapes", site=site, method=method),
                load_feature_stats("shapes", site=site, kind=method),
                concepts,
            )
    tally = {(s, m, r): {"background": [], "in_scene": [], "object_in_scene": []}
             for s, m in units for r in ("mass", "lift")}  # fmt: skip
    scenes = shapes.sample_scenes(args.scenes, seed=args.seed)
    for i, scene in enumerate(scenes):
        with fluxsae.capture(pipe, list(SITES)) as acts:
            pipe(shapes.caption(scene), generator=torch.Generator().manual_seed(args.seed + i), **gen)
        for (site, method), (dictionary, stats, concepts) in units.items():
            for rank in ("mass", "lift"):
                top = top_features(dictionary, acts[site], stats, args.top, rank=rank)
                keys = [concepts.get(t.feature, "") for t in top]
                row = tally[site, method, rank]
                row["background"].append(np.mean([is_background(c) for c in keys]))
                row["in_scene"].append(np.mean([matches(c, scene) for c in keys]))
                row["object_in_scene"].append(np.mean([matches(c, scene, objects_only=True) for c in keys]))

    result = {"date": datetime.date.today().isoformat(), "scenes": args.scenes, "seed": args.seed,
              "top": args.top, "ranking": [], "density": []}  # fmt: skip
    for (site, method, rank), row in tally.items():
        result["ranking"].append({"site": site, "method": method, "rank": rank,
                                  **{k: float(np.mean(v)) for k, v in row.items()}})  # fmt: skip
    for (site, method), (_, stats, concepts) in units.items():
        density = stats.density.numpy()
        background = [f for f, c in concepts.items() if is_background(c)]
        other = [f for f, c in concepts.items() if c and not is_background(c)]
        result["density"].append({
            "site": site, "method": method, "above_default_limit": int((density > DEFAULT_MAX_DENSITY).sum()),
            "background_quantiles_10_50_90_max": np.quantile(density[background], [.1, .5, .9, 1]).tolist(),
            "other_quantiles_10_50_90_max": np.quantile(density[other], [.1, .5, .9, 1]).tolist(),
        })  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for r in result["ranking"]:
        print(f"{r['method']:4} {r['site']:34} {r['rank']:4}  background {r['background']:.2f}  in scene "
              f"{r['in_scene']:.2f}  object in scene {r['object_in_scene']:.2f}")  # fmt: skip
    for d in result["density"]:
        print(f"{d['method']:4} {d['site']:34} density > {DEFAULT_MAX_DENSITY}: {d['above_default_limit']}; "
              f"background {np.round(d['background_quantiles_10_50_90_max'], 3)}, other "
              f"{np.round(d['other_quantiles_10_50_90_max'], 3)}")  # fmt: skip


if __name__ == "__main__":
    main()
