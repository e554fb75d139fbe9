"""What `interpretability.py`, `localization.py` and `background_halo.py` share: the Shapes scenes'
activations, generated once (and cached), their options, `--dict NAME=FOLDER` and the results file. Imported
by those scripts, which run as `python benchmarks/<name>.py` (so this folder is on the path)."""

from __future__ import annotations

import datetime
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import fluxsae
from fluxsae import shapes
from fluxsae.autointerp.examples import capture_mlp, stack_steps
from fluxsae.fileio import load_tensors, save_tensors
from fluxsae.shapes import truth


def generate(
    n: int, seed: int, batch: int, cache: Path | None, sites: Sequence[str], mlp: bool = False
) -> dict[str, torch.Tensor]:
    """Residual activations of `sites` on scenes `shapes.sample_scenes(n, seed)`, image i with noise seed
    `seed + i`, every step: "<site>" -> [steps, n, 64, d] float32 (the prompt's pass of true CFG, as
    `capture` keeps by default); with `mlp`, also "mlp:<site>" -> [steps, n, 64, width], the hidden
    activations of the site's own block. A `cache` file holding these scenes and keys is read instead."""
    keys = [*sites, *(f"mlp:{s}" for s in sites if mlp)]
    if cache is not None and cache.is_file():
        tensors, meta = load_tensors(cache)
        if meta.get("n") == n and meta.get("seed") == seed and all(k in tensors for k in keys):
            return tensors
    pipe = fluxsae.load_pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    n_steps = shapes.GENERATION_DEFAULTS["num_inference_steps"]
    scenes = shapes.sample_scenes(n, seed=seed)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for i in range(0, n, batch):
        chunk = scenes[i : i + batch]
        generators = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        with (
            torch.no_grad(),
            fluxsae.capture(pipe, list(sites)) as acts,
            capture_mlp(pipe, sites if mlp else [], truth.N_TOKENS) as hidden,
        ):
            pipe([shapes.caption(s) for s in chunk], generator=generators, output_type="latent",
                 **shapes.GENERATION_DEFAULTS)  # fmt: skip
        for site in sites:
            parts[site].append(acts[site].float())
            if mlp:
                parts[f"mlp:{site}"].append(stack_steps(hidden[site], n_steps))
        print(f"generated {i + len(chunk)}/{n}", flush=True)
    out = {key: torch.cat(v, dim=1) for key, v in parts.items()}
    if cache is not None:
        save_tensors(cache, out, {"n": n, "seed": seed})
    return out


def scene_arguments(parser, sites: Sequence[str]) -> None:
    """The options every script of these scenes takes: --scenes, --seed, --batch-size, --sites."""
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=31337)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--sites", type=lambda s: s.split(","), default=list(sites))


def parse_dicts(specs: list[str]) -> dict[str, tuple[str, None]]:
    """["name=folder", ...] -> name -> (folder, None): the kind comes from the folder's cfg.json."""
    out = {}
    for spec in specs:
        name, sep, where = spec.partition("=")
        if not sep or not name or not where:
            raise SystemExit(f"--dict takes NAME=FOLDER (a Hub-layout dictionary root), got {spec!r}")
        out[name] = (where, None)
    return out


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """How a script was run, for its results file: `argv` as `main(argv)` got it, or the shell's."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{Path(script).name}", *args])


def write_report(out: Path, command: str, fields: dict) -> dict:
    """The results file of a run: the command, date and machine, then `fields`; written to `out`."""
    report = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        **fields,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report
