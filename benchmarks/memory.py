"""Peak resident memory of `training.train_sae` and `training.build_itda` on FLUX.1-sized harvests.

    python benchmarks/memory.py --tokens 2000000,4000000 --work /tmp/fluxsae_memory \\
        --out benchmarks/results/memory.json

Writes a synthetic harvest in the real on-disk format (`fluxsae.activations.write_shard` and
`stream_rows`, a harvest.json as `training/harvest.py` writes it): FLUX.1's width (d = 3,072), bf16,
256 image tokens per prompt and step (FLUX.1 at 256 px) x 4 steps, `--prompts-per-shard` prompts per
shard. The smaller sizes are the first shards of the largest (symlinks), so the disk holds one
harvest. For each size both commands run as child processes, exactly as a user runs them, and their
peak resident set size is read from `os.wait4` (ru_maxrss). Target: under 4 GiB, and not growing
with the number of shards. The harvest is deleted at the end unless --keep.

The activations are Gaussian noise around a fixed mean: memory does not depend on what they hold,
and the training settings are chosen so both commands end in minutes on a CPU (few SAE steps, an
ITDA capped at `--max-atoms`), since neither the sample, the windows nor the evaluation they stream
depends on how long they train.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fluxsae.activations import ActivationStore, shard_name, split_shards, stream_rows, write_shard  # noqa: E402
from fluxsae.fileio import write_json  # noqa: E402
from fluxsae.flux import SCHNELL_GENERATION  # noqa: E402

SITE = "transformer_blocks.18.image"
"""The reference work's main site: FLUX.1's last double block, image stream."""
D = 3072
"""FLUX.1's residual width."""
TOKENS, STEPS = 256, (0, 1, 2, 3)
"""Image tokens per prompt and step at 256 x 256 px (16 x 16), and FLUX.1-schnell's 4 steps."""
BASE_ROWS = 32_768
"""Distinct random rows; each shard is a rotation of them (generating 4M x 3,072 normals would take
longer than the benchmark)."""
GiB = 2**30


def write_harvest(folder: Path, n_prompts: int, prompts_per_shard: int) -> None:
    """A FLUX.1-schnell-shaped harvest of `n_prompts` prompts at `folder`."""
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(D, generator=g) * 4  # FLUX residuals have a large mean and norm
    base = (torch.randn(BASE_ROWS, D, generator=g) + mean).to(torch.bfloat16)
    sigmas = [1.0 - s / len(STEPS) for s in STEPS]
    n_shards = -(-n_prompts // prompts_per_shard)
    for i in range(n_shards):
        ids = list(range(i * prompts_per_shard, min((i + 1) * prompts_per_shard, n_prompts)))
        manifest = stream_rows(ids, ids, list(STEPS), sigmas, TOKENS, (16, 16))
        rows = len(manifest["prompt_id"])
        acts = base[(torch.arange(rows) + i * 7_919) % BASE_ROWS]
        meta = {"index": i, "prompts": [ids[0], ids[-1] + 1], "rows": {"image": rows}, "sites": [SITE]}
        write_shard(folder / "shards" / shard_name(i), {SITE: acts}, {"image": manifest}, meta)
    write_metadata(folder, n_prompts, prompts_per_shard)


def write_metadata(folder: Path, n_prompts: int, prompts_per_shard: int) -> None:
    write_json(folder / "harvest.json", {
        "model": "black-forest-labs/FLUX.1-schnell", "revision": None, "quantization": None,
        "sites": [SITE], "dims": {SITE: D}, "steps": list(STEPS), "dtype": "bfloat16",
        "generation": dict(SCHNELL_GENERATION), "n_prompts": n_prompts, "seed": 0,
        "prompts_per_shard": prompts_per_shard, "prompt_source": "synthetic (benchmarks/memory.py)",
        "prompt_seed": None, "column": None, "cfg_pass": "cond",
    })  # fmt: skip
    with open(folder / "prompts.jsonl", "w") as f:
        for i in range(n_prompts):
            f.write(json.dumps({"id": i, "seed": i, "prompt": f"synthetic prompt {i}"}) + "\n")
    ActivationStore(folder, complete=False).write_manifest()


def link_prefix(big: Path, folder: Path, n_prompts: int, prompts_per_shard: int) -> None:
    """A harvest of the first shards of `big` (symlinked), as many as `n_prompts` prompts need: whole
    shards of `big`, so it may hold a few more prompts."""
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    n_shards = -(-n_prompts // prompts_per_shard)
    for i in range(n_shards):
        (folder / "shards" / shard_name(i)).symlink_to(big / "shards" / shard_name(i))
    write_metadata(folder, n_shards * prompts_per_shard, prompts_per_shard)


def peak_rss(cmd: list[str], log: Path) -> dict:
    """Run `cmd` as a child process; its peak RSS (GiB) and wall time."""
    t0 = time.time()
    with open(log, "w") as out:
        child = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}:\n{log.read_text()[-3000:]}")
    return {"peak_rss_gib": round(usage.ru_maxrss * 1024 / GiB, 3), "seconds": round(time.time() - t0, 1)}


def _common(args, acts: Path) -> list[str]:
    return ["--acts", str(acts), "--site", SITE, "--threads", str(args.threads),
            "--held-out", str(args.held_out)]  # fmt: skip


def sae_command(args, acts: Path, size: int, norm_sample: int) -> list[str]:
    name = f"{size}_{norm_sample}"
    return [sys.executable, "-m", "training.train_sae", *_common(args, acts),
            "--work", str(args.work / f"sae_{name}"), "--out", str(args.work / f"sae_out_{name}"),
            "--n-features", str(args.n_features), "--k", str(args.k), "--batch-size", str(args.sae_batch),
            "--tokens", str(args.sae_steps * args.sae_batch), "--log-every", "10",
            "--checkpoint-every", str(args.sae_steps), "--norm-sample", str(norm_sample)]  # fmt: skip


def itda_command(args, acts: Path, size: int) -> list[str]:
    return [sys.executable, "-m", "training.build_itda", *_common(args, acts),
            "--work", str(args.work / f"itda_{size}"), "--out", str(args.work / f"itda_out_{size}"),
            "--k", str(args.itda_k), "--threshold", "0.1", "--max-atoms", str(args.max_atoms),
            "--batch-size", "1024", "--eval-tokens", "2048"]  # fmt: skip


def old_path_gib(store: ActivationStore, train: list[int], held_out: list[int]) -> dict:
    """What the code before streaming held at once, by arithmetic: `build_sae` loaded every training
    shard as float32 (per-shard tensors, then their concatenation), the evaluation every held-out one."""
    rows = lambda shards: sum(store.shards[i].rows["image"] for i in shards)  # noqa: E731
    return {
        "train_sae_norm_sample_load_gib": round(2 * rows(train) * D * 4 / GiB, 1),
        "held_out_load_gib": round(2 * rows(held_out) * D * 4 / GiB, 1),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="2000000,4000000", help="harvest sizes in image tokens")
    p.add_argument("--prompts-per-shard", type=int, default=16, help="16 x 1,024 rows = 96 MiB per shard")
    p.add_argument("--work", type=Path, default=Path("/tmp/fluxsae_memory"))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/memory.json")
    p.add_argument("--n-features", type=int, default=16_384)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--sae-steps", type=int, default=10, help="SAE steps (memory is reached in the first)")
    p.add_argument(
        "--norm-samples", default="65536,16384",
        help="train_sae --norm-sample values to measure (the first is train_sae's default)",
    )  # fmt: skip
    p.add_argument("--sae-batch", type=int, default=256)
    p.add_argument("--max-atoms", type=int, default=1024, help="the ITDA build ends when it has this many")
    p.add_argument("--itda-k", type=int, default=32)
    p.add_argument("--held-out", type=float, default=0.004, help="share of shards held out (one at least)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the synthetic harvest")
    args = p.parse_args(argv)

    sizes = sorted(int(t) for t in args.tokens.split(","))
    norm_samples = [int(n) for n in args.norm_samples.split(",")]
    per_prompt = TOKENS * len(STEPS)
    prompts = [-(-t // per_prompt) for t in sizes]
    if args.work.exists():
        shutil.rmtree(args.work)
    t0 = time.time()
    big = args.work / f"harvest_{sizes[-1]}"
    write_harvest(big, prompts[-1], args.prompts_per_shard)
    folders = {sizes[-1]: big}
    for size, n in zip(sizes[:-1], prompts[:-1], strict=True):
        folders[size] = args.work / f"harvest_{size}"
        link_prefix(big, folders[size], n, args.prompts_per_shard)
    print(f"wrote {sizes[-1]:,} tokens in {time.time() - t0:.0f} s")

    rows = []
    for size in sizes:
        acts = folders[size]
        store = ActivationStore(acts)
        train, held_out = split_shards(len(store.shards), args.held_out)
        row = {
            "tokens": store.n_rows(SITE), "shards": len(store.shards), "train_shards": len(train),
            "held_out_shards": len(held_out),
            "harvest_gib": round(store.n_rows(SITE) * D * 2 / GiB, 2),
            "train_sae": {
                f"norm_sample_{n}": peak_rss(
                    sae_command(args, acts, size, n), args.work / f"train_sae_{size}_{n}.log"
                )
                for n in norm_samples
            },
            "build_itda": peak_rss(itda_command(args, acts, size), args.work / f"build_itda_{size}.log"),
            "old_code_would_load": old_path_gib(store, train, held_out),
        }  # fmt: skip
        for n in norm_samples:
            result = json.loads((args.work / f"sae_{size}_{n}" / "result.json").read_text())
            row["train_sae"][f"norm_sample_{n}"]["result"] = result
        row["build_itda"]["result"] = json.loads((args.work / f"itda_{size}" / "result.json").read_text())
        print(json.dumps(row, indent=1))
        rows.append(row)
    report = {
        "command": "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "site": SITE, "d": D, "storage_dtype": "bfloat16", "tokens_per_prompt": per_prompt,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "runs": rows,
    }  # fmt: skip
    write_json(args.out, report)
    if not args.keep:
        shutil.rmtree(args.work)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
