"""Your own image and two prompts, on the Shapes model: rendered scenes (`fluxsae.shapes.render`, which
the model never generated) stand in for real images.

1. Reconstruction: a rendered scene denoised from the default noise level with its caption; the
   attribute reader reads the same objects (colour, shape, size, cell) back.
2. Heatmaps: for each colour and shape, the SAE feature that detects it best on generated scenes (AUROC);
   its half-max map's IoU with the concept's tokens on generated scenes (placed as drawn) and on
   rendered ones (exact masks); the medians over the concepts, side by side.
3. Editing: a rendered one-object scene's colour A -> B by the text-stream swap during the img2img pass;
   reads B, and its shape, size and cell kept.
4. Two prompts differing in one attribute (colour, shape, size or background), one seed: the top
   feature of `fluxsae.features.diff` detects that attribute (AUROC >= 0.9 for A's or B's value on fresh
   scenes).
5. Time: /analyse_image of the app through gradio_client, an uploaded 64 px image (median of 10).

    python benchmarks/own_image.py          # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fluxsae
from fluxsae import shapes
from fluxsae.autointerp.examples import dictionary_units
from fluxsae.features import diff
from fluxsae.own_image import DEFAULT_NOISE, analyse_image, img2img_pipeline
from fluxsae.regions import generate_pair
from fluxsae.shapes import truth
from fluxsae.word_steering import WordSteering, shapes_captions

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the app (app.py), before benchmarks/app.py
from shapes_activations import command_line, write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "own_image.json"
SITE = "transformer_blocks.3.image"
GEN = dict(shapes.GENERATION_DEFAULTS)
CONCEPTS = [*(f"color:{c}" for c in shapes.COLORS), *(f"shape:{s}" for s in shapes.SHAPES)]


def codes_of(sae, acts: torch.Tensor) -> torch.Tensor:
    """[steps, n, 64, d] -> step-averaged codes [n, 64, F]."""
    return dictionary_units(sae, acts).mean(0)


def generated(pipe, scenes, seed: int):
    acts, images = [], []
    for i, scene in enumerate(scenes):
        with torch.no_grad(), fluxsae.capture(pipe, [SITE]) as captured:
            image = pipe(
                shapes.caption(scene), generator=torch.Generator().manual_seed(seed + i), **GEN
            ).images[0]
        acts.append(captured[SITE])
        images.append(image)
    return torch.cat(acts, 1), images


def median_iou(codes: torch.Tensor, scenes, best: dict) -> float:
    masks = truth.scene_masks(scenes)
    values = []
    for concept, (unit, _) in best.items():
        keep = masks[concept].any(1)
        if keep.any():
            maps = codes[torch.from_numpy(keep)][..., unit]
            values.append(
                float(np.nanmedian(truth.heatmap_iou(maps, torch.from_numpy(masks[concept][keep])).numpy()))
            )
    return float(np.median(values))


def heatmaps(pipe, sae, n: int, seed: int) -> dict:
    choose = shapes.sample_scenes(n, seed=seed)
    acts, images = generated(pipe, choose, seed)
    drawn = [shapes.as_drawn(s, im)[0] for s, im in zip(choose, images, strict=True)]
    aurocs, names = truth.concept_auroc(codes_of(sae, acts), drawn, CONCEPTS)
    best = truth.best_units(aurocs, names)
    fresh = shapes.sample_scenes(n, seed=seed + 1)
    acts, images = generated(pipe, fresh, seed + 1)
    drawn = [shapes.as_drawn(s, im)[0] for s, im in zip(fresh, images, strict=True)]
    on_generated = median_iou(codes_of(sae, acts), drawn, best)
    rendered = [
        analyse_image(pipe, shapes.render(s), shapes.caption(s), DEFAULT_NOISE, [SITE], seed=i, **GEN)
        for i, s in enumerate(fresh)
    ]
    on_rendered = median_iou(codes_of(sae, torch.cat([r.acts[SITE] for r in rendered], 1)), fresh, best)
    same = np.mean(
        [shapes.read_attributes(r.reconstruction) == s for r, s in zip(rendered, fresh, strict=True)]
    )
    return {
        "median_iou_generated": on_generated,
        "median_iou_rendered": on_rendered,
        "reconstruction_reads_the_same_objects": float(same),
        "scenes": n,
    }


def editing(pipe, n: int, seed: int) -> dict:
    texts = [fluxsae.load_sae("shapes", site=f"transformer_blocks.{i}.text") for i in range(4)]
    words = WordSteering(pipe, texts, shapes_captions, GEN)
    rng = random.Random(seed)
    turned = kept = 0
    img = img2img_pipeline(pipe)
    for i, scene in enumerate(shapes.sample_scenes(n, seed=seed, n_objects=1)):
        obj = scene.objects[0]
        target = rng.choice([c for c in shapes.COLORS if c != obj.color])
        swap = words.swap(obj.color, target)
        call = dict(image=shapes.render(scene), strength=DEFAULT_NOISE, **GEN)
        _, edited = generate_pair(
            img, shapes.caption(scene), i, lambda s=swap: fluxsae.steer(pipe, s.specs, steps=None), **call
        )
        read = shapes.read_attributes(edited.images[0]).objects
        got = max(read, key=lambda o: o.extent) if read else None
        turned += bool(got and got.color == target)
        kept += bool(got and (got.shape, got.size, got.position) == (obj.shape, obj.size, obj.position))
    return {"trials": n, "reads_b": turned / n, "kept": kept / n}


def prompt_pairs(pipe, sae, n: int, seed: int) -> dict:
    fresh = shapes.sample_scenes(200, seed=seed + 7)
    acts, images = generated(pipe, fresh, seed + 7)
    drawn = [shapes.as_drawn(s, im)[0] for s, im in zip(fresh, images, strict=True)]
    codes = codes_of(sae, acts)
    rng = random.Random(seed)
    kinds = {
        "color": tuple(shapes.COLORS),
        "shape": shapes.SHAPES,
        "size": shapes.SIZES,
        "background": tuple(shapes.BACKGROUNDS),
    }
    hits, rows = 0, []
    for i, scene in enumerate(shapes.sample_scenes(n, seed=seed, n_objects=1)):
        kind = list(kinds)[i % 4]
        obj = scene.objects[0]
        was = scene.background if kind == "background" else getattr(obj, kind)
        now = rng.choice([v for v in kinds[kind] if v != was])
        other = (
            shapes.Scene(scene.objects, now)
            if kind == "background"
            else shapes.Scene(
                (
                    shapes.Object(
                        **{**{k: getattr(obj, k) for k in ("shape", "color", "size", "position")}, kind: now}
                    ),
                ),
                scene.background,
            )
        )
        pair = []
        for s in (scene, other):
            with torch.no_grad(), fluxsae.capture(pipe, [SITE]) as captured:
                pipe(
                    shapes.caption(s), generator=torch.Generator().manual_seed(i), output_type="latent", **GEN
                )
            pair.append(captured[SITE])
        top = diff(sae, *pair, 1)[0].feature
        concepts = [f"{kind}:{v}" for v in (was, now)]
        aurocs, _ = truth.concept_auroc(codes[..., [top]], drawn, concepts)
        best = float(np.nanmax(aurocs.numpy()))
        hits += best >= 0.9
        rows.append({"kind": kind, "from": was, "to": now, "feature": top, "auroc": round(best, 3)})
    return {"pairs": n, "share_top_feature_detects_it": hits / n, "rows": rows}


def timing(runs: int) -> dict:
    from gradio_client import Client, handle_file

    import app

    pipe = fluxsae.load_pipeline("shapes")
    demo = app.build_demo(pipe, "shapes")
    demo.queue().launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    seconds = []
    try:
        client = Client(demo.local_url, verbose=False)
        with tempfile.TemporaryDirectory() as tmp:
            for i, scene in enumerate(shapes.sample_scenes(runs, seed=77)):
                path = Path(tmp) / f"{i}.png"
                shapes.render(scene).save(path)
                upload = {"background": handle_file(path), "layers": [], "composite": handle_file(path)}
                start = time.perf_counter()
                client.predict(
                    upload,
                    shapes.caption(scene),
                    DEFAULT_NOISE,
                    0,
                    SITE,
                    "SAE",
                    0,
                    7,
                    -1,
                    0.5,
                    "unusual for this image",
                    "all features",
                    api_name="/analyse_image",
                )
                seconds.append(time.perf_counter() - start)
    finally:
        demo.close()
    return {"requests": runs, "median_seconds": round(float(np.median(seconds)), 3)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=100)
    p.add_argument("--pairs", type=int, default=60)
    p.add_argument("--seed", type=int, default=6060, help="scene seed (no training or label run uses it)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    pipe = fluxsae.load_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    sae = fluxsae.load_sae("shapes", site=SITE)
    report = {
        "noise_level": DEFAULT_NOISE,
        "heatmaps": heatmaps(pipe, sae, args.scenes, args.seed),
        "editing": editing(pipe, args.scenes, args.seed + 2),
        "prompt_pairs": prompt_pairs(pipe, sae, args.pairs, args.seed + 3),
        "analyse": timing(10),
    }
    print(
        {k: v for k, v in report.items() if k != "prompt_pairs"},
        report["prompt_pairs"]["share_top_feature_detects_it"],
    )
    return write_report(args.out, command_line(__file__, argv), report)


if __name__ == "__main__":
    main()
