"""TopK SAE training speed and quality: fluxsae.sae against EleutherAI sparsify (eai-sparsify 1.3.3).

Same process, same threads, same data and batches, same shapes, same optimizer (Adam, beta1 = 0,
beta2 = 0.99, eps = 1e-10, fused) and learning rate. Each step times ours, theirs and one dense
matmul (as `x @ W_enc.T`, and into a reused buffer) in a rotating order, so load from elsewhere
hits all alike. Reports, after warm-up
(medians over steps):
  1. training throughput (tokens/s) of each and ours / theirs            target >= 1.2x
  2. held-out FVU of each after the same training tokens                 target: ours no worse
  3. one training step of ours / one dense encoder matmul x @ W_enc.T   target <= 2x

    pip install --no-deps eai-sparsify==1.3.3 -c constraints.txt
    pip install simple_parsing einops natsort schedulefree -c constraints.txt
    python benchmarks/sae_speed.py --threads 2 --out benchmarks/results/sae_speed.json
    python benchmarks/sae_speed.py --acts shard-*.safetensors --acts-key acts/transformer_blocks.3.image
    python benchmarks/sae_speed.py --device cuda --d-in 3072 --n-features 65536 --k 64

Both run in one precision (`--precision`): "fp32" (the default) runs sparsify's forward without the
bf16 CUDA autocast it is decorated with, so both do the same float32 arithmetic; "bf16" runs both
under `torch.autocast(device, bfloat16)` (sparsify as it ships on CUDA; our encoder matmul then runs in
bf16 too, gradients and the optimiser stay float32). sparsify's Triton decoder is used when installed.
`benchmarks/flux_gpu.py` runs this at FLUX.1's d 3072, 65,536 features, k 64 in both precisions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fluxsae.fileio import load_tensors, write_json  # noqa: E402
from fluxsae.sae import SAEConfig, TopKSAE  # noqa: E402
from fluxsae.sae_training import make_optimizer, train_step  # noqa: E402


class SparseWorld:
    """Tokens = k_true-sparse positive combinations of n_true random unit directions, plus an offset."""

    def __init__(self, d: int, n_true: int, k_true: int, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        dirs = torch.randn(n_true, d, generator=self.g)
        self.dirs = dirs / dirs.norm(dim=1, keepdim=True)
        self.offset = torch.randn(d, generator=self.g)
        self.k_true = k_true

    def sample(self, n: int) -> torch.Tensor:
        idx = torch.randint(0, len(self.dirs), (n, self.k_true), generator=self.g)
        coef = torch.rand(n, self.k_true, generator=self.g) + 0.5
        return F.embedding_bag(idx, self.dirs, per_sample_weights=coef, mode="sum") + self.offset


class FileData:
    """Batches drawn from real activations: tensor `key` of each file, flattened to [N, d] and
    concatenated (default key: the first floating tensor of 2+ dims); 10% held out."""

    def __init__(self, paths: list[str], key: str | None, seed: int):
        parts = []
        for path in paths:
            tensors, _ = load_tensors(path)
            name = key or next(k for k, v in tensors.items() if v.is_floating_point() and v.dim() >= 2)
            parts.append(tensors[name].reshape(-1, tensors[name].shape[-1]).float())
        x = torch.cat(parts)
        self.g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(len(x), generator=self.g)]
        cut = int(0.9 * len(x))
        self.train, self.held_out = x[:cut], x[cut:]

    def sample(self, n: int) -> torch.Tensor:
        return self.train[torch.randint(0, len(self.train), (n,), generator=self.g)]


def build_theirs(d_in: int, n_features: int, k: int, first_batch: torch.Tensor):
    """sparsify's SparseCoder set up as its Trainer does at step 0 (b_dec = batch mean, unit decoder)."""
    from sparsify import SparseCoder, SparseCoderConfig

    sc = SparseCoder(d_in, SparseCoderConfig(num_latents=n_features, k=k), device=first_batch.device)
    with torch.no_grad():
        sc.b_dec.copy_(first_batch.mean(0))
    return sc


def their_forward(sc, x: torch.Tensor, precision: str = "fp32"):
    """sparsify's forward: in "fp32" without the bf16 CUDA autocast its `forward` is wrapped in."""
    if precision == "fp32":
        return type(sc).forward.__wrapped__(sc, x)
    return sc(x)


def their_step(sc, opt, x: torch.Tensor, since_fired: torch.Tensor, precision: str = "fp32") -> float:
    """One step of sparsify's Trainer with loss_fn="fvu", auxk off (trainer.py, in its order)."""
    sc.set_decoder_norm_to_unit_norm()
    out = their_forward(sc, x, precision)
    did_fire = torch.zeros_like(since_fired, dtype=torch.bool)
    did_fire[out.latent_indices.flatten()] = True
    fvu = float(out.fvu.detach())
    out.fvu.backward()
    sc.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad()
    since_fired += len(x)
    since_fired[did_fire] = 0
    return fvu


@torch.no_grad()
def held_out_fvu(reconstruct, x: torch.Tensor, batch: int = 4096) -> float:
    """FVU in raw space: sum((x - x_hat)^2) / sum((x - mean(x))^2), the same formula for both."""
    err = sum((xb - reconstruct(xb)).pow(2).sum().item() for xb in x.split(batch))
    return err / (x - x.mean(0)).pow(2).sum().item()


def timed_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0)


def profile(name: str, step, steps: int = 5) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(f"\n== {name}: {steps} steps, ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=128, help="ignored with --acts (taken from the file)")
    p.add_argument("--n-features", type=int, default=2048)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument("--steps", type=int, default=300, help="training steps of each (the FVU comparison)")
    p.add_argument("--warmup", type=int, default=20, help="steps left out of the timing")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--acts", nargs="+", default=None, help="safetensors files of real activations")
    p.add_argument("--acts-key", default=None, help="tensor name in the --acts files")
    p.add_argument("--normalization", default="none", help="ours only: none, standardize or pca")
    p.add_argument("--n-true", type=int, default=4096, help="synthetic data: true directions")
    p.add_argument("--k-true", type=int, default=16, help="synthetic data: active directions per token")
    p.add_argument("--held-out", type=int, default=16384, help="synthetic data: held-out tokens")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="fp32: both in float32; bf16: both under bf16 autocast (see above)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of both steps")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    if args.acts:
        data = FileData(args.acts, args.acts_key, args.seed)
        held_out, d_in = data.held_out, data.train.shape[1]
    else:
        data = SparseWorld(args.d_in, args.n_true, args.k_true, args.seed)
        held_out, d_in = data.sample(args.held_out), args.d_in
    sample = lambda n: data.sample(n).to(device)
    held_out, first = held_out.to(device), sample(args.batch)

    cfg = SAEConfig(d_in=d_in, n_features=args.n_features, k=args.k, normalization=args.normalization)
    ours = TopKSAE(cfg, generator=torch.Generator().manual_seed(args.seed)).to(device)
    ours.fit_normalization(first).init_b_dec_from_data(first)  # b_dec: the batch mean, as sparsify's
    our_opt = make_optimizer(ours, args.lr)
    theirs = build_theirs(d_in, args.n_features, args.k, first)
    their_opt = torch.optim.Adam(theirs.parameters(), lr=args.lr, betas=(0.0, 0.99), eps=1e-10, fused=True)
    since_fired = torch.zeros(args.n_features, dtype=torch.long, device=device)

    # The timed things rotate their order every step, so load from elsewhere hits all alike. The dense
    # matmuls run in the step's precision: under bf16 autocast in bf16, like both encoders.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    mm_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    times: dict[str, list[float]] = {"ours": [], "theirs": [], "matmul": [], "matmul_out": []}
    buf = torch.empty(args.batch, args.n_features, device=device, dtype=mm_dtype)

    def ours_step(x):
        with autocast:
            return train_step(ours, our_opt, x)

    def theirs_step(x):
        with autocast:
            return their_step(theirs, their_opt, x, since_fired, args.precision)

    for step in range(args.steps):
        x = sample(args.batch)
        W = ours.W_enc.detach()
        xm, Wm = x.to(mm_dtype), W.to(mm_dtype)
        jobs = [("ours", lambda x=x: ours_step(x)),
                ("theirs", lambda x=x: theirs_step(x)),
                ("matmul", lambda x=xm, W=Wm: x @ W.T),
                ("matmul_out", lambda x=xm, W=Wm: torch.mm(x, W.T, out=buf))]  # fmt: skip
        shift = step % len(jobs)
        for name, fn in jobs[shift:] + jobs[:shift]:
            ms = timed_ms(fn, device)
            if step >= args.warmup:
                times[name].append(ms)

    if args.profile:
        x = sample(args.batch)
        profile("ours", lambda: ours_step(x))
        profile("theirs (sparsify)", lambda: theirs_step(x))

    ours.eval()
    our_step, their_step_ms, matmul_ms, matmul_out_ms = (
        statistics.median(times[k]) for k in ("ours", "theirs", "matmul", "matmul_out")
    )
    result = {
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "d_in": d_in},
        "machine": {
            "cpu": _cpu_name(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "step_ms": {"ours": our_step, "theirs": their_step_ms},
        "tokens_per_s": {"ours": args.batch / our_step * 1e3, "theirs": args.batch / their_step_ms * 1e3},
        "speedup": their_step_ms / our_step,
        "matmul_ms": matmul_ms,
        "step_over_matmul": our_step / matmul_ms,
        "matmul_into_buffer_ms": matmul_out_ms,
        "step_over_matmul_into_buffer": our_step / matmul_out_ms,
        "train_tokens": args.steps * args.batch,
        "held_out_fvu": {
            "ours": held_out_fvu(lambda xb: ours(xb).x_hat, held_out),
            "theirs": held_out_fvu(lambda xb: their_forward(theirs, xb).sae_out.float(), held_out),
        },
        "dead_fraction": {
            "ours": ours.dead_fraction(),
            "theirs": (since_fired >= cfg.dead_after_tokens).float().mean().item(),
        },
    }
    print_table(result)
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)
    return result


def print_table(r: dict) -> None:
    c = r["config"]
    print(f"\nd_in={c['d_in']} n_features={c['n_features']} k={c['k']} batch={c['batch']} "
          f"threads={c['threads']} steps={c['steps']} ({r['train_tokens']:,} tokens) "
          f"{c['precision']}")  # fmt: skip
    print(f"{'':28s}{'ours':>12s}{'sparsify':>12s}{'ratio':>10s}")
    print(f"{'step (median ms)':28s}{r['step_ms']['ours']:12.2f}{r['step_ms']['theirs']:12.2f}"
          f"{r['speedup']:9.2f}x")  # fmt: skip
    print(f"{'tokens/s':28s}{r['tokens_per_s']['ours']:12,.0f}{r['tokens_per_s']['theirs']:12,.0f}")
    print(f"{'held-out FVU':28s}{r['held_out_fvu']['ours']:12.4f}{r['held_out_fvu']['theirs']:12.4f}")
    print(f"{'step / dense matmul':28s}{r['step_over_matmul']:11.2f}x   "
          f"(x @ W_enc.T: {r['matmul_ms']:.2f} ms)")  # fmt: skip
    print(f"{'step / matmul into buffer':28s}{r['step_over_matmul_into_buffer']:11.2f}x   "
          f"(torch.mm(..., out=): {r['matmul_into_buffer_ms']:.2f} ms)\n")  # fmt: skip


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
