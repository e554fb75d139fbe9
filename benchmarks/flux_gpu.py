"""Every GPU figure of FLUX.1 at full size in one run (about 8 minutes on one H200, no network).

    python benchmarks/flux_gpu.py                              # CUDA: -> benchmarks/results/flux_gpu.json
    python benchmarks/flux_gpu.py --smoke --threads 1          # CPU, reduced sizes: checks that it runs

Sections, in this order; each one adds its figures to the JSON as soon as it ends, so a run cut short
keeps what it measured, and a failing section records its error and lets the next one run:
  sae        TopK SAE training vs eai-sparsify 1.3.3 at d 3,072, 65,536 features, k 64, batch 4,096
             (benchmarks/sae_speed.py, synthetic sparse data) in float32 and under bf16 autocast:
             throughput ratio (target >= 1.2x) and held-out FVU after the same tokens (target: no worse)
  itda       ITDA encode throughput (gradient pursuit, L0 32) at d 3,072 for 1k-50k atoms, beside the
             SAE's encode (65,536 features, k 64), 4,096 tokens
  harvest    FLUX.1-schnell at full size, random weights, bf16, 256 px, 4 steps, batch 16: plain
             generation vs two sites (transformer_blocks.18.image, single_transformer_blocks.9.image)
             captured at every step into CPU memory in bf16 (target >= 0.9x), and vs the blocking copy
             that `capture` used before (pinned + non-blocking now); the same at 1024 px, batch 2
             ([2, 4096, 3072] per site and step); the pinned copies checked bit-exact against the GPU's
  memory     peak GPU memory of that bf16 pipeline (weights; a 256 px generation), then the same random
             weights saved as a pipeline folder and loaded through `load_pipeline(folder, quantize="nf4")`
             (diffusers' and transformers' BitsAndBytesConfig): transformer, T5 and pipeline weights, peak
             during a generation (targets: transformer near 7 GB, pipeline under 16 GB)
On a fresh GPU machine: bring diffusers, bitsandbytes, eai-sparsify and their missing dependencies as
wheels (benchmarks/README.md, "FLUX.1 at full size on a GPU").
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fluxsae.fileio import write_json  # noqa: E402

SITES = ("transformer_blocks.18.image", "single_transformer_blocks.9.image")
WORDS = (
    "a",
    "photo",
    "of",
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "house",
    "tree",
    "car",
    "on",
    "the",
    "beach",
)

SMOKE_FLUX = {
    "transformer": {
        "num_layers": 19,
        "num_single_layers": 10,
        "num_attention_heads": 2,
        "attention_head_dim": 32,
        "axes_dims_rope": [8, 12, 12],
    },
    "text_encoder": {
        "num_hidden_layers": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "projection_dim": 32,
        "num_attention_heads": 2,
        "vocab_size": 256,
    },
    "text_encoder_2": {
        "num_layers": 1,
        "d_model": 32,
        "d_ff": 64,
        "num_heads": 2,
        "d_kv": 16,
        "vocab_size": 256,
    },
    "vae": {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4},
}
"""--smoke: FLUX.1-schnell's configs narrowed to d 64 (19 double blocks so the sites exist; 10 single)."""


def settings(smoke: bool) -> dict:
    if smoke:
        return {
            "sae": dict(d_in=128, n_features=2048, k=16, batch=512, steps=6, warmup=2, held_out=1024),
            "itda": dict(d_in=128, atoms=(256, 1024), k=8, tokens=512, sae_features=2048, sae_k=16),
            "harvest": [
                dict(height=64, width=64, batch=2, rounds=2),
                dict(height=128, width=128, batch=1, rounds=1),
            ],
            "flux": SMOKE_FLUX,
            "steps": 2,
            "max_sequence_length": 16,
        }
    return {
        "sae": dict(d_in=3072, n_features=65536, k=64, batch=4096, steps=150, warmup=20, held_out=16384),
        "itda": dict(
            d_in=3072,
            atoms=(1000, 2000, 5000, 10000, 20000, 50000),
            k=32,
            tokens=4096,
            sae_features=65536,
            sae_k=64,
        ),
        "harvest": [
            dict(height=256, width=256, batch=16, rounds=4),
            dict(height=1024, width=1024, batch=2, rounds=3),
        ],
        "flux": None,
        "steps": 4,
        "max_sequence_length": 256,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_memory(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    return {
        "allocated_bytes": torch.cuda.memory_allocated(device),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
    }


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# -- sections ------------------------------------------------------------------------------------


def section_sae(s: dict, device: torch.device, threads: int) -> dict:
    from benchmarks import sae_speed

    c = s["sae"]
    flags = {"device": device, "threads": threads, "d-in": c["d_in"], "n-features": c["n_features"],
             "k": c["k"], "batch": c["batch"], "steps": c["steps"], "warmup": c["warmup"],
             "held-out": c["held_out"]}  # fmt: skip
    keep = ("step_ms", "tokens_per_s", "speedup", "held_out_fvu", "train_tokens", "step_over_matmul",
            "matmul_ms", "dead_fraction")  # fmt: skip
    out = {}
    for precision in ("fp32", "bf16"):
        argv = [x for k, v in {**flags, "precision": precision}.items() for x in (f"--{k}", str(v))]
        try:
            r = sae_speed.main(argv)
        except Exception as e:  # the other precision still runs
            traceback.print_exc()
            out[precision] = {"error": f"{type(e).__name__}: {e}"}
            continue
        out[precision] = {k: r[k] for k in keep}
        out[precision]["fvu_no_worse"] = r["held_out_fvu"]["ours"] <= r["held_out_fvu"]["theirs"]
        out[precision]["command"] = "python benchmarks/sae_speed.py " + " ".join(argv)
    return out


def section_itda(s: dict, device: torch.device) -> dict:
    from fluxsae import ITDA, ITDAConfig, SAEConfig, TopKSAE

    c = s["itda"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(c["tokens"], c["d_in"], generator=g).to(device)

    def tokens_per_s(d) -> float:
        d.encode_sparse(x)
        times = []
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            d.encode_sparse(x)
            sync(device)
            times.append(time.perf_counter() - t0)
        return len(x) / statistics.median(times)

    rows = []
    for n in c["atoms"]:
        atoms = torch.randn(n, c["d_in"], generator=g)
        atoms /= atoms.norm(dim=1, keepdim=True)
        itda = ITDA(ITDAConfig(d_in=c["d_in"], k=c["k"]), atoms).to(device)
        rows.append({"n_atoms": n, "k": c["k"], "tokens_per_s": tokens_per_s(itda)})
        print(f"ITDA {n} atoms: {rows[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
        del itda
    sae = (
        TopKSAE(
            SAEConfig(d_in=c["d_in"], n_features=c["sae_features"], k=c["sae_k"]),
            generator=torch.Generator().manual_seed(0),
        )
        .to(device)
        .eval()
    )
    sae_row = {"n_features": c["sae_features"], "k": c["sae_k"], "tokens_per_s": tokens_per_s(sae)}
    print(f"SAE {c['sae_features']} features: {sae_row['tokens_per_s']:,.0f} tokens/s", flush=True)
    return {"tokens": c["tokens"], "d_in": c["d_in"], "itda": rows, "sae": sae_row}


@contextlib.contextmanager
def blocking_capture(pipe, sites, dtype=torch.bfloat16):
    """What `fluxsae.capture` did before pinned copies: a blocking `.to("cpu")` in every hook (baseline)."""
    from fluxsae.sites import resolve_site

    kept, handles = [], []
    for site in sites:
        s, block = resolve_site(pipe, site)

        def hook(module, args, kwargs, output, s=s):
            kept.append(output[s.output_position].detach().to(device="cpu", dtype=dtype, copy=True))

        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        yield kept
    finally:
        for h in handles:
            h.remove()


def build_pipeline(s: dict, device: torch.device, dtype: torch.dtype):
    from fluxsae.flux import random_flux_pipeline

    return random_flux_pipeline(device=device, dtype=dtype, overrides=s["flux"], words=WORDS)


def generate(pipe, prompts: list[str], h: int, w: int, s: dict, seed: int = 0):
    device = pipe.transformer.device
    gens = [torch.Generator(device).manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(
        prompts,
        height=h,
        width=w,
        num_inference_steps=s["steps"],
        guidance_scale=0.0,
        max_sequence_length=s["max_sequence_length"],
        generator=gens,
        output_type="latent",
    ).images


def prompts_of(n: int) -> list[str]:
    return [f"a photo of a {WORDS[3 + i % 3]} {WORDS[6 + i % 6]} on the beach" for i in range(n)]


def section_harvest(s: dict, device: torch.device, dtype: torch.dtype, state: dict) -> dict:
    from fluxsae import capture
    from fluxsae.flux import parameter_counts
    from fluxsae.pipelines import weight_bytes

    reset_peak(device)
    t0 = time.perf_counter()
    pipe = build_pipeline(s, device, dtype)
    sync(device)
    built = time.perf_counter() - t0
    state["pipe"] = pipe
    out = {
        "build_seconds": round(built, 1),
        "parameters": parameter_counts(pipe),
        "dtype": str(dtype),
        "sites": list(SITES),
        "weights_bytes": {
            n: weight_bytes(m) for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)
        },
    }
    print(f"built random FLUX.1-schnell in {built:.0f} s", flush=True)
    runs = []
    for cfg in s["harvest"]:
        h, w, batch = cfg["height"], cfg["width"], cfg["batch"]
        prompts = prompts_of(batch)
        variants = {
            "plain": contextlib.nullcontext,
            "capture": lambda: capture(pipe, list(SITES), device="cpu", dtype=torch.bfloat16),
            "blocking_copy": lambda: blocking_capture(pipe, SITES),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        finite = True
        for r in range(cfg["rounds"] + 1):  # round 0 warms up
            names = list(variants)
            names = names[r % 3 :] + names[: r % 3]
            for name in names:
                sync(device)
                t0 = time.perf_counter()
                with variants[name]() as acts:
                    latents = generate(pipe, prompts, h, w, s, seed=r)
                    if name == "capture":
                        acts[SITES[0]]  # the result is read (the one wait for the copies) inside the timing
                sync(device)
                if r:
                    times[name].append(time.perf_counter() - t0)
                finite &= bool(torch.isfinite(latents).all())
        med = {k: statistics.median(v) for k, v in times.items()}
        tokens = (h // 16) * (w // 16)
        row = {
            "height": h,
            "width": w,
            "batch": batch,
            "steps": s["steps"],
            "image_tokens": tokens,
            "rounds": cfg["rounds"],
            "seconds": med,
            "images_per_s": {k: batch / v for k, v in med.items()},
            "capture_over_plain": med["plain"] / med["capture"],
            "blocking_copy_over_plain": med["plain"] / med["blocking_copy"],
            "captured_bytes_per_generation": 2
            * len(SITES)
            * s["steps"]
            * batch
            * tokens
            * pipe.transformer.inner_dim,
            "latents_finite": finite,
        }
        print(
            f"{h}x{w} batch {batch}: plain {med['plain']:.2f} s, capture {row['capture_over_plain']:.3f}x, "
            f"blocking copy {row['blocking_copy_over_plain']:.3f}x",
            flush=True,
        )
        runs.append(row)
    out["runs"] = runs
    # Exact: the pinned, non-blocking copies hold the same bits as the activations left on the GPU.
    c = s["harvest"][0]
    prompts = prompts_of(2)
    with capture(pipe, list(SITES), device="cpu", dtype=torch.bfloat16) as to_cpu:
        generate(pipe, prompts, c["height"], c["width"], s)
    with capture(pipe, list(SITES), device=None, dtype=torch.bfloat16) as on_device:
        generate(pipe, prompts, c["height"], c["width"], s)
    out["pinned_copy_bit_exact"] = all(torch.equal(to_cpu[x], on_device[x].cpu()) for x in SITES)
    pinned = [t.is_pinned() for steps in to_cpu._data.values() for t in steps.values()]
    out["pinned"] = bool(pinned) and all(pinned)
    return out


def section_memory(s: dict, device: torch.device, dtype: torch.dtype, state: dict, scratch: Path) -> dict:
    from fluxsae import capture, load_pipeline
    from fluxsae.pipelines import weight_bytes

    pipe = state.pop("pipe", None) or build_pipeline(s, device, dtype)
    c = s["harvest"][0]
    out = {}
    reset_peak(device)
    weights = gpu_memory(device)
    generate(pipe, prompts_of(1), c["height"], c["width"], s)
    sync(device)
    out["bf16"] = {
        "weights_bytes": {
            n: weight_bytes(m) for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)
        },
        "after_load": weights,
        "generation_256px_batch1": gpu_memory(device),
        "dtype": str(dtype),  # float32 in --smoke on a CPU
    }
    need = sum(out["bf16"]["weights_bytes"].values())
    scratch.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(scratch).free
    if free < 1.1 * need:
        out["nf4"] = {
            "skipped": f"{scratch} has {free / 1e9:.1f} GB free; the bf16 folder needs {need / 1e9:.1f} GB"
        }
        return out
    folder = Path(tempfile.mkdtemp(prefix="flux1_random_", dir=scratch))
    try:
        t0 = time.perf_counter()
        pipe.save_pretrained(folder)
        saved = time.perf_counter() - t0
        del pipe
        reset_peak(device)
        t0 = time.perf_counter()
        nf4 = load_pipeline(folder, quantize="nf4", device=device)
        nf4.set_progress_bar_config(disable=True)
        sync(device)
        loaded = time.perf_counter() - t0
        after = gpu_memory(device)
        reset_peak(device)
        with capture(nf4, list(SITES), steps=[0]) as acts:
            latents = generate(nf4, prompts_of(1), c["height"], c["width"], s)
        sync(device)
        linear4 = sum(type(m).__name__ == "Linear4bit" for m in nf4.transformer.modules())
        t5_linear4 = sum(type(m).__name__ == "Linear4bit" for m in nf4.text_encoder_2.modules())
        out["nf4"] = {
            "weights_bytes": {
                n: weight_bytes(m) for n, m in nf4.components.items() if isinstance(m, torch.nn.Module)
            },
            "after_load": after,
            "generation_256px_batch1": gpu_memory(device),
            "save_seconds": round(saved, 1),
            "load_seconds": round(loaded, 1),
            "linear4bit_layers": {"transformer": linear4, "text_encoder_2": t5_linear4},
            "capture_shape": list(acts[SITES[0]].shape),
            "latents_finite": bool(torch.isfinite(latents).all()),
        }
        del nf4
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def machine(device: torch.device) -> dict:
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for name in ("diffusers", "transformers", "bitsandbytes", "eai-sparsify"):
        try:
            from importlib.metadata import version

            info[name] = version(name)
        except Exception:
            info[name] = None
    return info


SECTIONS = ("sae", "itda", "harvest", "memory")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="reduced sizes, any device (CPU): checks the script")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}"
    )
    p.add_argument(
        "--scratch",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the random bf16 pipeline folder is written for the NF4 load (~34 GB, removed after)",
    )
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/flux_gpu[_smoke].json")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.smoke:
        p.error("the full-size figures need a CUDA GPU (FLUX.1 in bf16 is 34 GB); on a CPU pass --smoke")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    out = args.out or ROOT / "benchmarks" / "results" / f"flux_gpu{'_smoke' if args.smoke else ''}.json"
    s = settings(args.smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    chosen = [x.strip() for x in args.sections.split(",") if x.strip()]
    bad = sorted(set(chosen) - set(SECTIONS))
    if bad:
        p.error(f"unknown sections {bad}; choose from {SECTIONS}")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "smoke": args.smoke,
        "machine": machine(device),
        "command": "python benchmarks/flux_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": {},
    }
    state: dict = {}
    start = time.perf_counter()
    for name in chosen:
        t0 = time.perf_counter()
        print(f"\n== {name} ({t0 - start:.0f} s in)", flush=True)
        try:
            if name == "sae":
                result[name] = section_sae(s, device, threads)
            elif name == "itda":
                result[name] = section_itda(s, device)
            elif name == "harvest":
                result[name] = section_harvest(s, device, dtype, state)
            else:
                result[name] = section_memory(s, device, dtype, state, args.scratch)
        except Exception as e:  # one failing section must not cost the others' figures
            traceback.print_exc()
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        result["seconds"][name] = round(time.perf_counter() - t0, 1)
        write_json(out, result)
    state.clear()
    result["seconds"]["total"] = round(time.perf_counter() - start, 1)
    write_json(out, result)
    print(json.dumps(summary(result), indent=1))
    print(f"wrote {out}")
    return result


def summary(r: dict) -> dict:
    """The headline figures (targets in the module docstring)."""
    out = {}
    for precision, v in (r.get("sae") or {}).items():
        if isinstance(v, dict) and "speedup" in v:
            out[f"sae_{precision}_speedup"] = round(v["speedup"], 3)
            out[f"sae_{precision}_fvu_ours_theirs"] = [
                round(v["held_out_fvu"]["ours"], 4),
                round(v["held_out_fvu"]["theirs"], 4),
            ]
    if "runs" in (r.get("harvest") or {}):
        for run in r["harvest"]["runs"]:
            out[f"harvest_{run['height']}px_capture_over_plain"] = round(run["capture_over_plain"], 3)
        out["pinned_copy_bit_exact"] = r["harvest"].get("pinned_copy_bit_exact")
    mem = r.get("memory") or {}
    for kind in ("bf16", "nf4"):
        m = mem.get(kind) or {}
        if "weights_bytes" in m:
            out[f"{kind}_transformer_GB"] = round(m["weights_bytes"]["transformer"] / 1e9, 2)
            out[f"{kind}_t5_GB"] = round(m["weights_bytes"]["text_encoder_2"] / 1e9, 2)
            peak = (m.get("generation_256px_batch1") or {}).get("peak_allocated_bytes")
            out[f"{kind}_peak_generation_GB"] = round(peak / 1e9, 2) if peak else None
    if "itda" in (r.get("itda") or {}):
        out["itda_tokens_per_s"] = {row["n_atoms"]: round(row["tokens_per_s"]) for row in r["itda"]["itda"]}
        out["sae_encode_tokens_per_s"] = round(r["itda"]["sae"]["tokens_per_s"])
    for name in SECTIONS:
        if isinstance(r.get(name), dict) and "error" in r[name]:
            out[f"{name}_error"] = r[name]["error"]
    return out


if __name__ == "__main__":
    main()
