"""Steering from the app, measured through its own endpoints (gradio_client against `python app.py`).

- Colour A -> B: one-object Shapes prompts; /swap takes out the object's colour and puts in another.
  Success: the largest object read from the steered image has colour B; kept: its shape and cell are the
  prompt's. Shape A -> B alike (kept: colour and cell).
- A painted region: two-object prompts; the original is read from /generate, object 1's drawn pixels
  are painted (as a person would paint over it), and /swap turns its colour A to B inside the region.
  Success: object 1 reads B; kept: object 2 reads as it did in the original (colour, shape, size, cell).
  Trials whose original does not show both objects are left out (nothing to keep or turn).
- Cost: /swap's wall time per request (a steered pair: original and steered, from one seed), and the
  time from starting `python app.py` to its first answer.

    python benchmarks/app_steering.py            # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fluxsae import shapes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes_activations import command_line, write_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "app_steering.json"
SITE = "transformer_blocks.3.image"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int) -> tuple[subprocess.Popen, float]:
    """`python app.py` on `port`, and the seconds until it answers a request."""
    from gradio_client import Client

    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while True:
        try:
            Client(f"http://127.0.0.1:{port}/", verbose=False).predict("", api_name="/check_prompt")
            return proc, time.perf_counter() - start
        except Exception:
            if proc.poll() is not None or time.perf_counter() - start > 300:
                raise SystemExit("python app.py did not start") from None
            time.sleep(0.5)


def read(path) -> shapes.Scene:
    return shapes.read_attributes(Image.open(path).convert("RGB").resize((64, 64), Image.Resampling.BOX))


def largest(scene: shapes.Scene):
    return max(scene.objects, key=lambda o: o.extent) if scene.objects else None


def one_object(client, attr: str, n: int, seed: int) -> dict:
    values = tuple(shapes.COLORS) if attr == "color" else shapes.SHAPES
    rng = random.Random(seed)
    turned = kept = 0
    seconds = []
    for i, scene in enumerate(shapes.sample_scenes(n, seed=seed, n_objects=1)):
        obj = scene.objects[0]
        source = getattr(obj, attr)
        target = rng.choice([v for v in values if v != source])
        start = time.perf_counter()
        out = client.predict(shapes.caption(scene), i, source, target, "", 0.6, 0, 7, None, api_name="/swap")
        seconds.append(time.perf_counter() - start)
        got = largest(read(out[1]))
        turned += bool(got and getattr(got, attr) == target)
        other = "shape" if attr == "color" else "color"
        kept += bool(got and getattr(got, other) == getattr(obj, other) and got.position == obj.position)
    return {"trials": n, "reads_b": turned / n, "kept": kept / n, "seconds": seconds}


def painted(client, n: int, seed: int, folder: Path) -> dict:
    from gradio_client import handle_file

    rng = random.Random(seed)
    turned = kept = used = 0
    for i, scene in enumerate(shapes.sample_scenes(n, seed=seed, n_objects=2)):
        first, second = scene.objects
        target = rng.choice([c for c in shapes.COLORS if c != first.color])
        prompt = shapes.caption(scene)
        image = client.predict(
            prompt, i, SITE, "SAE", 0, 7, -1, 0.5, "share of activation", api_name="/generate"
        )[0]
        original = read(image)
        found = {o.position: o for o in original.objects}
        if first.position not in found or second.position not in found:
            continue
        used += 1
        drawn = shapes.as_drawn(shapes.Scene((first,), scene.background), Image.open(image).resize((64, 64)))[
            0
        ]
        pixels = np.kron(shapes.object_mask(drawn.objects[0]), np.ones((6, 6), bool))  # on the 384 px image
        layer = np.zeros((384, 384, 4), np.uint8)
        layer[pixels] = 255
        Image.fromarray(layer).save(folder / f"layer{i}.png")
        Image.new("RGB", (384, 384)).save(folder / "background.png")
        background = handle_file(folder / "background.png")
        region = {
            "background": background,
            "layers": [handle_file(folder / f"layer{i}.png")],
            "composite": background,
        }
        out = client.predict(prompt, i, first.color, target, "", 0.6, 0, 7, region, api_name="/swap")
        steered = {o.position: o for o in read(out[1]).objects}
        turned += bool(first.position in steered and steered[first.position].color == target)
        kept += steered.get(second.position) == found[second.position]
    return {
        "trials": n,
        "both_objects_in_the_original": used,
        "object_turns_b": turned / used,
        "other_kept": kept / used,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--colour-trials", type=int, default=120)
    p.add_argument("--shape-trials", type=int, default=120)
    p.add_argument("--region-trials", type=int, default=60)
    p.add_argument("--seed", type=int, default=9090, help="scene seed (no training or label run uses it)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    from gradio_client import Client

    port = free_port()
    proc, ready = start_app(port)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        colour = one_object(client, "color", args.colour_trials, args.seed)
        shape = one_object(client, "shape", args.shape_trials, args.seed + 1)
        with tempfile.TemporaryDirectory() as tmp:
            region = painted(client, args.region_trials, args.seed + 2, Path(tmp))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    seconds = colour.pop("seconds") + shape.pop("seconds")
    report = {
        "ready_seconds": round(ready, 1),
        "colour": colour,
        "shape": shape,
        "region": region,
        "swap_seconds_median": round(float(np.median(seconds)), 3),
        "swap_seconds_p90": round(float(np.percentile(seconds, 90)), 3),
    }
    print(report)
    return write_report(args.out, command_line(__file__, argv), report)


if __name__ == "__main__":
    main()
