"""How well the packaged Shapes model draws what its caption says, read back with `read_attributes`.

Targets (issue 3), on 500 scenes from a seed training never used:
  one object: colour >= 98%, position >= 97%, shape >= 95%, size >= 95% exact;
  two objects: every attribute of both objects right in >= 80% of images;
  held-out (colour, shape) pairs: colour and shape both right in >= 80%;
  generation at batch 1 on this CPU: <= 0.2 s per image (median).

    python benchmarks/shapes_quality.py                  # writes results/shapes_quality.json + a grid
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from fluxsae import load_pipeline, shapes

RESULTS = Path(__file__).parent / "results"
SEED = 20_261_126
"""Scene and noise seed: no training batch is drawn from it."""


@torch.no_grad()
def generate(pipe, scenes, seed: int, batch: int = 25) -> list[Image.Image]:
    images = []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i : i + batch]
        g = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        images += pipe([shapes.caption(s) for s in chunk], generator=g, **shapes.GENERATION_DEFAULTS).images
    return images


def held_out_rate(scenes, read, n_objects: int | None = None) -> float:
    """Over objects with a held-out (colour, shape) pair: a read object in the same cell has both right.
    `n_objects`: only scenes of that many objects (None: all)."""
    hits = []
    for true, got in zip(scenes, read, strict=True):
        if n_objects is not None and len(true.objects) != n_objects:
            continue
        for obj in true.objects:
            if (obj.color, obj.shape) in shapes.HELD_OUT_PAIRS:
                same_cell = [o for o in got.objects if o.position == obj.position]
                hits.append(any(o.color == obj.color and o.shape == obj.shape for o in same_cell))
    return float(np.mean(hits))


def binding_breakdown(scenes, read) -> dict[str, float]:
    """Where two-object scenes go wrong. Over two-object scenes: two objects read ("two:count"), both
    in the caption's cells ("two:cells"); over the objects of the scenes with both cells right, each
    attribute right ("two:<attribute>") and, where the two objects differ in it, taken from the
    other object ("two:<attribute>_swapped": binding failed, the attribute itself was drawn)."""
    two = [(t, r) for t, r in zip(scenes, read, strict=True) if len(t.objects) == 2]
    cells = [(t, r) for t, r in two if [o.position for o in r.objects] == [o.position for o in t.objects]]
    out = {"two:count": np.mean([len(r.objects) == 2 for _, r in two]), "two:cells": len(cells) / len(two)}
    for attribute in ("color", "shape", "size"):
        right, swapped = [], []
        for t, r in cells:
            for want, got, other in zip(t.objects, r.objects, t.objects[::-1], strict=True):
                value = getattr(got, attribute)
                right.append(value == getattr(want, attribute))
                if getattr(want, attribute) != getattr(other, attribute):
                    swapped.append(value == getattr(other, attribute))
        out[f"two:{attribute}"], out[f"two:{attribute}_swapped"] = np.mean(right), np.mean(swapped)
    return {k: float(v) for k, v in out.items()}


def grid(scenes, images, path: Path, columns: int = 8) -> None:
    """Pairs of rows: the rendered truth above what the model drew, captions in the file's JSON."""
    rows = -(-len(scenes) // columns)
    canvas = Image.new("RGB", (columns * 68, rows * 2 * 68), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (scene, image) in enumerate(zip(scenes, images, strict=True)):
        x, y = (i % columns) * 68 + 2, (i // columns) * 2 * 68 + 2
        canvas.paste(shapes.render(scene), (x, y))
        canvas.paste(image, (x, y + 66))
        draw.rectangle([x - 1, y - 1, x + 64, y + 130], outline=(200, 200, 200))
    canvas.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--scenes", type=int, default=500)
    ap.add_argument("--held-out-scenes", type=int, default=200)
    ap.add_argument("--timing-runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)

    scenes = shapes.sample_scenes(args.scenes, seed=SEED, held_out="exclude")
    images = generate(pipe, scenes, SEED)
    read = [shapes.read_attributes(im) for im in images]
    acc = {**shapes.attribute_accuracy(scenes, read), **binding_breakdown(scenes, read)}
    held = shapes.sample_scenes(args.held_out_scenes, seed=SEED + 1, held_out="only")
    held_images = generate(pipe, held, SEED + 10_000)
    held_read = [shapes.read_attributes(im) for im in held_images]
    acc["held_out_color_and_shape"] = held_out_rate(held, held_read)
    # apart: composing a new pair (one object) vs also binding it next to another object (two)
    acc["held_out_color_and_shape:one"] = held_out_rate(held, held_read, n_objects=1)
    acc["held_out_color_and_shape:two"] = held_out_rate(held, held_read, n_objects=2)

    times = []
    caption = shapes.caption(scenes[0])
    for i in range(args.timing_runs + 3):
        t = time.perf_counter()
        pipe(caption, generator=torch.Generator().manual_seed(i), **shapes.GENERATION_DEFAULTS)
        if i >= 3:
            times.append(time.perf_counter() - t)
    acc["seconds_per_image_batch1_median"] = statistics.median(times)

    args.out.mkdir(parents=True, exist_ok=True)
    grid(scenes[:32], images[:32], args.out / "shapes_samples.png")
    grid(held[:16], held_images[:16], args.out / "shapes_held_out_samples.png")
    result = {"model": args.model, "seed": SEED, "threads": args.threads, **acc,
              "captions_of_grid": [shapes.caption(s) for s in scenes[:32]]}  # fmt: skip
    (args.out / "shapes_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "captions_of_grid"}, indent=2))


if __name__ == "__main__":
    main()
