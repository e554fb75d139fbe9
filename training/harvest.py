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
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fluxsae import capture, load_pipeline, shapes
from fluxsae.activations import STORAGE_DTYPES, ActivationStore, shard_name, stream_rows, write_shard
from fluxsae.fileio import atomic_path, write_json
from fluxsae.heatmap import token_grid
from fluxsae.sites import parse_site, site_dim

FLUX_GENERATION = {"height": 256, "width": 256, "num_inference_steps": 4, "max_sequence_length": 256,
                   "guidance_scale": 0.0}  # fmt: skip
"""FLUX.1-schnell as the reference work ran it (256 x 256 -> 16 x 16 image tokens)."""


def load_prompts(args) -> list[dict]:
    """[{"prompt", ...}] from the Shapes world, a text file or a Hugging Face dataset."""
    if args.prompts == "shapes":
        scenes = shapes.sample_scenes(args.n_prompts, seed=args.prompt_seed)
        return [{"prompt": shapes.caption(s), "scene": dataclasses.asdict(s)} for s in scenes]
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise SystemExit(
                f"--prompts {path}: no such file (give a text file, one prompt per line, or 'shapes')."
            )
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise SystemExit(f"--prompts {path} holds no prompts.")
        return [{"prompt": p} for p in lines[: args.n_prompts or None]]
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
        out = []
        for row in ds:
            if isinstance(row[args.column], str) and row[args.column].strip():
                out.append({"prompt": row[args.column].strip()})
            if len(out) >= args.n_prompts:
                break
        return out
    raise SystemExit(
        "Say where prompts come from: --prompts shapes, --prompts FILE or --dataset NAME --column COL."
    )


def parse_steps(text: str | None, n_steps: int) -> list[int]:
    if text in (None, "", "all"):
        return list(range(n_steps))
    steps = set()
    for part in text.split(","):
        a, _, b = part.partition("-")
        steps.update(range(int(a), int(b) + 1) if b else [int(a)])
    bad = [s for s in steps if not 0 <= s < n_steps]
    if bad:
        raise SystemExit(
            f"--steps {text}: steps {sorted(bad)} are outside 0..{n_steps - 1} (num_inference_steps)."
        )
    return sorted(steps)


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
            acts[site].append(a.permute(1, 0, 2, 3).reshape(-1, a.shape[-1]))
        for stream in sorted({parse_site(s).stream for s in sites}):
            n_tokens = next(captured[s].shape[2] for s in sites if parse_site(s).stream == stream)
            image_grid = grid if stream == "image" else None
            rows = stream_rows(chunk_ids, seeds, captured.steps, sigmas, n_tokens, image_grid)
            manifests.setdefault(stream, []).append(rows)
    merged = {stream: {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
              for stream, parts in manifests.items()}  # fmt: skip
    return {s: torch.cat(v) for s, v in acts.items()}, merged


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes", help="'shapes', a Hub id or a pipeline folder")
    p.add_argument("--quantize", choices=["nf4"], default=None)
    p.add_argument("--revision", default=None)
    p.add_argument("--sites", required=True, help="comma-separated sites, e.g. transformer_blocks.3.image")
    p.add_argument("--steps", default="all", help="denoising steps to keep: 'all', '0,1,2' or '0-3'")
    p.add_argument("--prompts", default=None, help="'shapes' (captions of the Shapes world) or a text file")
    p.add_argument("--dataset", default=None, help="a Hugging Face dataset of captions")
    p.add_argument("--column", default="caption_llava_short")
    p.add_argument("--split", default="train")
    p.add_argument("--n-prompts", type=int, default=1000)
    p.add_argument("--prompt-seed", type=int, default=1, help="seed of the Shapes scenes (not the noise)")
    p.add_argument("--seed", type=int, default=0, help="prompt i is generated with seed SEED + i")
    p.add_argument("--dtype", choices=list(STORAGE_DTYPES), default="bfloat16", help="storage dtype")
    p.add_argument("--prompts-per-shard", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per pipeline call")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    for name in ("height", "width", "num_inference_steps", "max_sequence_length"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    for name in ("guidance_scale", "true_cfg_scale"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    gen = dict(shapes.GENERATION_DEFAULTS if args.model == "shapes" else FLUX_GENERATION)
    for name in (
        "height",
        "width",
        "num_inference_steps",
        "max_sequence_length",
        "guidance_scale",
        "true_cfg_scale",
    ):
        if getattr(args, name) is not None:
            gen[name] = getattr(args, name)
    if gen.get("true_cfg_scale", 1.0) > 1 and "negative_prompt" not in gen:
        gen["negative_prompt"] = ""

    pipe = load_pipeline(args.model, quantize=args.quantize, device=device, revision=args.revision)
    pipe.set_progress_bar_config(disable=True)
    sites = [str(parse_site(s.strip())) for s in args.sites.split(",") if s.strip()]
    dims = {s: site_dim(pipe, s) for s in sites}
    steps = parse_steps(args.steps, gen["num_inference_steps"])
    prompts = load_prompts(args)
    config = {
        "model": args.model, "revision": args.revision, "quantization": args.quantize, "sites": sites,
        "dims": dims, "steps": steps, "dtype": args.dtype, "generation": gen, "n_prompts": len(prompts),
        "seed": args.seed,
        "prompts_per_shard": args.prompts_per_shard, "prompt_source": args.prompts or args.dataset,
        "prompt_seed": args.prompt_seed if args.prompts == "shapes" else None,
        "column": args.column if args.dataset else None, "cfg_pass": "cond",
    }  # fmt: skip
    out = args.out
    (out / "shards").mkdir(parents=True, exist_ok=True)
    if (out / "harvest.json").exists():
        old = json.loads((out / "harvest.json").read_text())
        if old != json.loads(json.dumps(config)):
            changed = sorted(
                k for k in set(old) | set(config) if old.get(k) != json.loads(json.dumps(config)).get(k)
            )
            raise SystemExit(
                f"{out} holds a harvest with other settings ({', '.join(changed)}); use another --out."
            )
    elif rank == 0:
        write_json(out / "harvest.json", config)
    if rank == 0 or not (out / "prompts.jsonl").exists():
        with atomic_path(out / "prompts.jsonl") as tmp:
            tmp.write_text(
                "".join(
                    json.dumps({"id": i, "seed": args.seed + i, **q}) + "\n" for i, q in enumerate(prompts)
                )
            )

    per = args.prompts_per_shard
    n_shards = -(-len(prompts) // per)
    mine = [i for i in range(n_shards) if i % world == rank]
    todo = [i for i in mine if not (out / "shards" / shard_name(i)).exists()]
    for stale in (out / "shards").glob(".shard-*.tmp-*"):  # left by a killed run of this rank
        if int(stale.name.split("-")[1].split(".")[0]) in todo:
            stale.unlink(missing_ok=True)
    done_tokens, t0 = 0, time.time()
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"harvest (rank {rank})", unit="shard")
    for i in todo:
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
    bar.close()
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        store = ActivationStore(out)
        store.write_manifest()
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
