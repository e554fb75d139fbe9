"""Harvest residual-stream activations from a Flux pipeline into sharded safetensors.

    python -m training.harvest --model shapes --prompts shapes --n-prompts 2000 \\
        --sites transformer_blocks.3.image,single_transformer_blocks.3.image --out runs/harvest
    python -m training.harvest --model black-forest-labs/FLUX.1-schnell --quantize nf4 \\
        --dataset opendiffusionai/cc12m-cleaned --column caption_llava_short --n-prompts 120000 \\
        --sites transformer_blocks.18.image --steps 0,1,2,3 --out runs/flux_d18
    torchrun --nproc-per-node 4 -m training.harvest ...     # shards are split by rank

Every step of the generation is kept unless `--steps` says otherwise (the reference work kept only
the pure-noise one). Prompt i is generated with seed `--seed + i`, alone in its generator, so any
row can be traced back and regenerated. Kill it at any moment and run the same command again: it
skips the shards that exist (each is written atomically) and redoes the one in progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from tqdm import tqdm

from fluxsae import capture, load_pipeline, shapes
from fluxsae.activations import STORAGE_DTYPES, ActivationStore, shard_name, stream_rows, write_shard
from fluxsae.fileio import atomic_path
from fluxsae.heatmap import token_grid
from fluxsae.pipelines import generation_defaults
from fluxsae.sites import parse_site, site_dim
from training.cli import (
    CommandParser,
    Range,
    add_config_arguments,
    check_config,
    check_threads,
    config_from_args,
)
from training.flux_plan import human_bytes, human_seconds
from training.resources import check_disk
from training.work import check_run_folder, claim


@dataclass(frozen=True)
class HarvestConfig:
    """What to harvest from which model, and where (the harvest itself is described by OUT/harvest.json,
    which a resumed harvest must match)."""

    sites: str
    """Comma-separated sites, e.g. transformer_blocks.3.image,single_transformer_blocks.3.image."""
    out: str
    """Harvest folder: harvest.json, prompts.jsonl, shards/ (a rerun resumes at the first missing shard)."""
    model: str = "shapes"
    """'shapes', a Hub id or a pipeline folder."""
    quantize: Literal["nf4"] | None = None
    """Quantise the transformer (nf4 keeps FLUX.1's near 7 GB); None: as stored."""
    revision: str | None = None
    """Hub revision (commit) of the model; None: the default branch."""
    steps: str = "all"
    """Denoising steps to keep: 'all', '0,1,2' or '0-3'."""
    prompts: str | None = None
    """'shapes' (captions of the Shapes world) or a text file, one prompt per line."""
    dataset: str | None = None
    """A Hugging Face dataset of captions, read from `column` of `split` (instead of --prompts)."""
    column: str = "caption_llava_short"
    """The dataset's caption column."""
    split: str = "train"
    """The dataset's split."""
    n_prompts: Annotated[int, Range(1)] | None = 1000
    """Prompts to harvest (None: every line of a --prompts file)."""
    skip_prompts: Annotated[int, Range(0)] = 0
    """Prompts of the source to pass over first (a second harvest of other prompts, e.g. for autointerp)."""
    prompt_seed: Annotated[int, Range(0)] = 1
    """Seed of the Shapes scenes (not of the noise)."""
    seed: Annotated[int, Range(0, 2**62)] = 0
    """Prompt i is generated with seed SEED + i, alone in its generator."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Storage dtype of the activations."""
    prompts_per_shard: Annotated[int, Range(1)] = 64
    """Prompts per shard file (a shard holds prompts x steps x tokens rows per site)."""
    batch_size: Annotated[int, Range(1)] = 16
    """Prompts per pipeline call."""
    device: str | None = None
    """Where the pipeline runs; None: cuda:LOCAL_RANK when a GPU is there, else the CPU."""
    threads: Annotated[int, Range(1)] | None = None
    """Torch CPU threads; None: torch's default."""
    height: Annotated[int, Range(8, 4096)] | None = None
    """Image height in pixels; None: what the model was made for (fluxsae.pipelines.generation_defaults)."""
    width: Annotated[int, Range(8, 4096)] | None = None
    """Image width in pixels; None: the model's default."""
    num_inference_steps: Annotated[int, Range(1, 1000)] | None = None
    """Denoising steps; None: the model's default."""
    max_sequence_length: Annotated[int, Range(1, 512)] | None = None
    """T5 tokens; None: the model's default."""
    guidance_scale: Annotated[float, Range(0)] | None = None
    """Distilled guidance (FLUX.1-dev); None: the model's default."""
    true_cfg_scale: Annotated[float, Range(0)] | None = None
    """Classifier-free guidance with an empty negative prompt (> 1 turns it on); None: the model's default."""


GENERATION_FIELDS = ("height", "width", "num_inference_steps", "max_sequence_length", "guidance_scale",
                     "true_cfg_scale")  # fmt: skip
"""The HarvestConfig fields that override the model's generation defaults."""


def load_prompts(args) -> list[dict]:
    """[{"prompt", ...}] from the Shapes world, a text file or a Hugging Face dataset."""
    if args.n_prompts is None and (args.prompts == "shapes" or not args.prompts):
        raise SystemExit("--n-prompts none reads every line of a --prompts file; say how many otherwise.")
    skip = getattr(args, "skip_prompts", 0)
    if skip < 0:
        raise SystemExit(f"--skip-prompts must be >= 0, got {skip}.")
    if args.prompts == "shapes":
        scenes = shapes.sample_scenes(args.n_prompts + skip, seed=args.prompt_seed)[skip:]
        return [{"prompt": shapes.caption(s), "scene": dataclasses.asdict(s)} for s in scenes]
    if args.prompts:
        lines = prompt_lines(args.prompts)
        end = None if args.n_prompts is None else skip + args.n_prompts
        chosen = [{"prompt": p} for p in lines[skip:end]]
        if not chosen:
            raise SystemExit(
                f"--prompts {args.prompts} holds {len(lines)} prompts, all skipped by --skip-prompts {skip}."
            )
        return chosen
    if args.dataset:
        from datasets import load_dataset

        try:
            ds = load_dataset(args.dataset, split=args.split, streaming=True)
        except Exception as e:
            raise SystemExit(
                f"Could not open the dataset {args.dataset!r} ({e}). Offline (HF_HUB_OFFLINE=1) only cached "
                "datasets load; or pass --prompts FILE."
            ) from e
        if args.column not in (ds.column_names or [args.column]):
            raise SystemExit(f"{args.dataset} has no column {args.column!r}; it has {ds.column_names}.")
        out, seen = [], 0
        for row in ds:
            if isinstance(row[args.column], str) and row[args.column].strip():
                seen += 1
                if seen > skip:
                    out.append({"prompt": row[args.column].strip()})
            if len(out) >= args.n_prompts:
                break
        return out
    raise SystemExit(
        "Say where prompts come from: --prompts shapes, --prompts FILE or --dataset NAME --column COL."
    )


def prompt_lines(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a prompts file (UTF-8); SystemExit saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(
            f"--prompts {path}: no such file (give a text file, one prompt per line, or 'shapes')."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise SystemExit(
            f"--prompts {path} is not UTF-8 text (line {line}, byte {e.start}: {e.reason}); save it as UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8`)."
        ) from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"--prompts {path} holds no prompts.")
    return lines


_STEPS = re.compile(r"(\d+)(?:-(\d+))?")


def parse_steps(text: str | None, n_steps: int | None) -> list[int]:
    """--steps as a sorted list of step indices: 'all', '0,1,2' or '0-3'. SystemExit names what is wrong;
    `n_steps` None checks the spelling only."""
    if text in (None, "", "all"):
        return list(range(n_steps or 0))
    steps = set()
    for part in text.split(","):
        m = _STEPS.fullmatch(part.strip())
        if m is None:
            raise SystemExit(
                f"--steps {text}: {part.strip()!r} is not a step or a range of steps; write 'all', '0,1,2' "
                "or '0-3' (steps count from 0)."
            )
        a, b = int(m[1]), int(m[2] or m[1])
        if b < a:
            raise SystemExit(f"--steps {text}: {part.strip()} is an empty range; write {b}-{a}.")
        steps.update(range(a, b + 1))
    if n_steps is None:
        return sorted(steps)
    bad = [s for s in steps if not 0 <= s < n_steps]
    if bad:
        raise SystemExit(
            f"--steps {text}: steps {sorted(bad)} are outside 0..{n_steps - 1} (num_inference_steps)."
        )
    return sorted(steps)


def check_finite(acts: torch.Tensor, site: str, prompts: list[dict], ids: list[int], cfg: dict) -> None:
    """SystemExit naming the prompts whose activations [steps, batch, tokens, d] at `site` hold NaN/inf:
    they would poison every dictionary trained on the harvest, so nothing of their shard is written."""
    bad = (~torch.isfinite(acts)).flatten(2).any(2)  # [steps, batch]
    if not bad.any():
        return
    which = bad.any(0).nonzero().flatten().tolist()
    named = "; ".join(f"{ids[i]}: {prompts[i]['prompt'][:80]!r}" for i in which[:5])
    more = f" and {len(which) - 5} more" if len(which) > 5 else ""
    gen = cfg["generation"]
    hint = (
        f"--dtype {cfg['dtype']} cannot hold these activations: use bfloat16 or float32"
        if cfg["dtype"] == "float16"
        else f"check the generation settings (true_cfg_scale {gen.get('true_cfg_scale')}, guidance_scale "
        f"{gen.get('guidance_scale')}, {gen['height']}x{gen['width']} px) or leave these prompts out"
    )
    raise SystemExit(
        f"The activations at {site} hold NaN/inf for prompt(s) {named}{more} (at {int(bad.sum())} "
        f"(step, prompt) pairs): {hint}. Their shard was not written; what was written is intact."
    )


def harvest_shard(
    pipe, prompts: list[dict], ids: list[int], sites, steps, gen: dict, cfg: dict, batch_size: int
):
    """Generate `prompts` and return ({site: [rows, d]}, {stream: manifest})."""
    dtype = STORAGE_DTYPES[cfg["dtype"]]
    grid = token_grid(pipe, gen["height"], gen["width"])
    acts: dict[str, list] = {s: [] for s in sites}
    manifests: dict[str, list] = {}
    for b in range(0, len(prompts), batch_size):
        chunk, chunk_ids = prompts[b : b + batch_size], ids[b : b + batch_size]
        seeds = [cfg["seed"] + i for i in chunk_ids]
        generators = [torch.Generator(pipe.device).manual_seed(s) for s in seeds]
        with capture(pipe, sites, steps, device="cpu", dtype=dtype) as captured:
            pipe([p["prompt"] for p in chunk], generator=generators, output_type="latent", **gen)
        sigmas = captured.sigmas.tolist()
        for site in sites:
            a = captured[site]  # [steps, batch, tokens, d] -> rows in (prompt, step, token) order
            check_finite(a, site, chunk, chunk_ids, cfg)
            acts[site].append(a.permute(1, 0, 2, 3).reshape(-1, a.shape[-1]))
        for stream in sorted({parse_site(s).stream for s in sites}):
            n_tokens = next(captured[s].shape[2] for s in sites if parse_site(s).stream == stream)
            image_grid = grid if stream == "image" else None
            rows = stream_rows(chunk_ids, seeds, captured.steps, sigmas, n_tokens, image_grid)
            manifests.setdefault(stream, []).append(rows)
    merged = {stream: {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
              for stream, parts in manifests.items()}  # fmt: skip
    return {s: torch.cat(v) for s, v in acts.items()}, merged


def parse_args(argv=None) -> HarvestConfig:
    """The command line as a HarvestConfig, every value checked that can be without the model: ranges
    (`check_config`), --steps' spelling, --out, the prompt source. SystemExit names the flag and value."""
    p = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, HarvestConfig)
    args = config_from_args(HarvestConfig, p.parse_args(argv))
    check_config(args)
    check_threads(args.threads)
    parse_steps(args.steps, None)
    if not [s for s in args.sites.split(",") if s.strip()]:
        raise SystemExit("--sites names no site; e.g. --sites transformer_blocks.3.image")
    check_run_folder(Path(args.out), "harvest.json", "--out")
    if args.n_prompts is None and (args.prompts == "shapes" or not args.prompts):
        raise SystemExit("--n-prompts none reads every line of a --prompts file; say how many otherwise.")
    if args.prompts and args.prompts != "shapes":
        prompt_lines(args.prompts)
    return args


def estimate(pipe, sites: list[str], dims: dict, steps: list[int], gen: dict, dtype: str) -> int:
    """Bytes of one prompt in the shards: rows (steps x tokens of the site's stream) x d x the storage
    dtype's size per site, plus the manifest of each stream (36 bytes a row)."""
    itemsize = torch.empty(0, dtype=STORAGE_DTYPES[dtype]).element_size()
    rows, cols = token_grid(pipe, gen["height"], gen["width"])
    tokens = {"image": rows * cols, "text": gen["max_sequence_length"]}
    streams = {parse_site(s).stream for s in sites}
    per_prompt = sum(len(steps) * tokens[parse_site(s).stream] * dims[s] * itemsize for s in sites)
    return per_prompt + sum(len(steps) * tokens[stream] * 36 for stream in streams)


def check_size(pipe, gen: dict) -> None:
    """SystemExit unless the image size is a whole number of tokens for this pipeline."""
    patch = pipe.vae_scale_factor * 2
    for name in ("height", "width"):
        if gen[name] % patch:
            good = max(patch, gen[name] // patch * patch)
            raise SystemExit(
                f"--{name} {gen[name]} is not a multiple of {patch} px (a token of this model); use {good}."
            )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    # the model's own defaults (FLUX.1-schnell's for any model other than shapes); flags override them
    gen = generation_defaults(args.model if args.model == "shapes" else "black-forest-labs/FLUX.1-schnell")
    gen.update({name: getattr(args, name) for name in GENERATION_FIELDS if getattr(args, name) is not None})
    if gen.get("true_cfg_scale", 1.0) > 1 and "negative_prompt" not in gen:
        gen["negative_prompt"] = ""
    steps = parse_steps(args.steps, gen["num_inference_steps"])
    n_wanted = args.n_prompts
    if args.prompts and args.prompts != "shapes":
        lines = len(prompt_lines(args.prompts)) - args.skip_prompts
        n_wanted = lines if n_wanted is None else min(n_wanted, lines)
        if n_wanted < 1:
            raise SystemExit(
                f"--prompts {args.prompts}: --skip-prompts {args.skip_prompts} passes over all of it."
            )

    pipe = load_pipeline(args.model, quantize=args.quantize, device=device, revision=args.revision)
    pipe.set_progress_bar_config(disable=True)
    sites = [str(parse_site(s.strip())) for s in args.sites.split(",") if s.strip()]
    dims = {s: site_dim(pipe, s) for s in sites}
    check_size(pipe, gen)
    out = Path(args.out)
    per = args.prompts_per_shard
    per_prompt = estimate(pipe, sites, dims, steps, gen, args.dtype)
    n_shards_wanted = -(-n_wanted // per)
    # the shards already there (a resumed harvest); read from the folder, as there may be billions wanted
    indices = [f.stem.removeprefix("shard-") for f in (out / "shards").glob("shard-*.safetensors")]
    done = sum(1 for i in indices if i.isdigit() and int(i) < n_shards_wanted)
    need = per_prompt * max(0, n_wanted - done * per)
    if rank == 0:
        print(
            f"harvest: {n_wanted} prompts x {len(steps)} steps at {len(sites)} site(s), {n_shards_wanted} "
            f"shards, about {human_bytes(per_prompt * n_wanted)} on disk ({human_bytes(need)} to write)",
            flush=True,
        )
    check_disk(need, out, "This harvest", "Harvest fewer prompts, steps or sites, use a 2-byte --dtype, or "
               "pass an --out on a larger disk.")  # fmt: skip
    prompts = load_prompts(args)
    config = {
        "model": args.model, "revision": args.revision, "quantization": args.quantize, "sites": sites,
        "dims": dims, "steps": steps, "dtype": args.dtype, "generation": gen, "n_prompts": len(prompts),
        "seed": args.seed,
        "prompts_per_shard": args.prompts_per_shard, "prompt_source": args.prompts or args.dataset,
        "prompt_seed": args.prompt_seed if args.prompts == "shapes" else None,
        "column": args.column if args.dataset else None, "cfg_pass": "cond",
    }  # fmt: skip
    if args.skip_prompts:  # only when set: harvests made before the option still resume
        config["skip_prompts"] = args.skip_prompts
    claim(out, "harvest.json", config, what="a harvest", flag="--out", write=rank == 0)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    if rank == 0 or not (out / "prompts.jsonl").exists():
        with atomic_path(out / "prompts.jsonl") as tmp:
            tmp.write_text(
                "".join(
                    json.dumps({"id": i, "seed": args.seed + i, **q}) + "\n" for i, q in enumerate(prompts)
                ),
                encoding="utf-8",
            )

    n_shards = -(-len(prompts) // per)
    mine = [i for i in range(n_shards) if i % world == rank]
    todo = [i for i in mine if not (out / "shards" / shard_name(i)).exists()]
    for stale in (out / "shards").glob(".shard-*.tmp-*"):  # left by a killed run of this rank
        if int(stale.name.split("-")[1].split(".")[0]) in todo:
            stale.unlink(missing_ok=True)
    done_tokens, t0 = 0, time.time()
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"harvest (rank {rank})", unit="shard")
    for n, i in enumerate(todo):
        ids = list(range(i * per, min((i + 1) * per, len(prompts))))
        acts, manifests = harvest_shard(
            pipe, [prompts[j] for j in ids], ids, sites, steps, gen, config, args.batch_size
        )
        rows = {stream: int(m["prompt_id"].shape[0]) for stream, m in manifests.items()}
        write_shard(out / "shards" / shard_name(i), acts, manifests,
                    {"index": i, "prompts": [ids[0], ids[-1] + 1], "rows": rows, "sites": sites})  # fmt: skip
        done_tokens += sum(a.shape[0] for a in acts.values())
        bar.update(1)
        bar.set_postfix(tokens_per_s=f"{done_tokens / (time.time() - t0):.0f}")
        if n == 0 and len(todo) > 1:
            left = (time.time() - t0) * (len(todo) - 1)
            bar.write(f"harvest (rank {rank}): about {human_seconds(left)} more for {len(todo) - 1} shard(s)")
    bar.close()
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        store = ActivationStore(out, complete=False)
        store.write_manifest()  # last: the harvest is complete now, and readers accept it
        itemsize = torch.empty(0, dtype=STORAGE_DTYPES[args.dtype]).element_size()
        report = {
            "shards": len(store.shards),
            "rows": {s: store.n_rows(s) for s in sites},
            "bytes_per_token": {s: dims[s] * itemsize for s in sites},
            "manifest_bytes_per_row": 4 * len(("step", "timestep", "token", "row", "col")) + 8 * 2,
            "seconds_this_run": round(time.time() - t0, 1),
        }
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
