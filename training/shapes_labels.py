"""Make the packaged Shapes labels from scratch: the Shapes oracle labels every SAE feature, ITDA atom
and MLP neuron of the packaged Shapes dictionaries at both packaged sites.

    python -m training.shapes_labels                       # -> fluxsae/shapes/labels/ (~15 min CPU)
    python -m training.shapes_labels --work runs/shapes_labels --scenes 400

It is `python -m training.autointerp` with the packaged settings: 400 fresh scenes (seed
training.autointerp.SEED), methods sae, itda and mlp, the oracle as explainer and judge, and no
painted strips (the app paints examples from `example_maps` and the `images` config; keeping the
package small). Its pass also accumulates 2,048 random directions per site, unlabelled, so that
`python -m benchmarks.autointerp` can label the floor from the same work folder without generating again.
Resumable through its work folder, like the command it wraps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fluxsae.labels import shapes_labels_dir
from training import autointerp


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/shapes_labels", help="work folder (resume from it)")
    p.add_argument("--out", default=str(shapes_labels_dir()), help="where to write the dataset")
    p.add_argument("--scenes", type=int, default=400,
                   help="Shapes scenes to generate: labels are chosen on half and measured on the other half")
    args = p.parse_args(argv)
    start = time.perf_counter()
    summaries = autointerp.main([
        "--out", args.out, "--work", args.work, "--scenes", str(args.scenes), "--methods", "sae,itda,mlp",
        "--explainer", "oracle", "--pass-methods", "random",  # the floor of benchmarks/autointerp.py
    ])  # fmt: skip
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"wrote {args.out}: {size / 1e6:.2f} MB in {time.perf_counter() - start:.0f} s")
    return summaries


if __name__ == "__main__":
    main()
