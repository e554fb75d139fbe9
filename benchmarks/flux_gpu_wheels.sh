#!/usr/bin/env bash
# Wheels that benchmarks/flux_gpu.py needs on a GPU machine whose image has torch, transformers,
# accelerate, safetensors, tokenizers, pyarrow and pandas but no diffusers, bitsandbytes or eai-sparsify
# (the H200 image of this workplace: Python 3.12, torch 2.11+cu130). Run it here, where PyPI is
# reachable; the wheels land in .whl/ (ignored by git), pinned to this venv's versions:
#
#     bash benchmarks/flux_gpu_wheels.sh            # -> .whl/, about 10 MB
#
# bitsandbytes ships one library per CUDA version (120 MB in all); the wheel is rewritten with its CPU
# and CUDA 13.0 libraries only (CUDA_LIB=cuda128 etc. keeps another), so the working tree stays small
# enough to travel. On the GPU machine:
#
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#     PYTHONPATH=/tmp/site python3 benchmarks/flux_gpu.py
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.whl}
cuda_lib=${CUDA_LIB:-cuda130}
mkdir -p "$out"
grep -qxF "/$out/" .git/info/exclude 2>/dev/null || echo "/$out/" >>.git/info/exclude
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# diffusers (+ importlib-metadata), bitsandbytes, sparsify and what it imports (datasets, dill, multiprocess,
# simple-parsing, docstring-parser, natsort, schedulefree)
for pkg in diffusers importlib-metadata bitsandbytes eai-sparsify datasets dill multiprocess simple-parsing \
  docstring-parser natsort schedulefree; do
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$out" "$pkg==$(version "$pkg")"
done
python - "$out" "$cuda_lib" <<'EOF'
import sys, zipfile
from pathlib import Path

out, keep = Path(sys.argv[1]), sys.argv[2]
for wheel in out.glob("bitsandbytes-*.whl"):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        drop = {n for n in names if "/libbitsandbytes_" in n and not n.endswith((f"_{keep}.so", "_cpu.so"))}
        if not drop:
            continue
        trimmed = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as t:
            for n in names:
                if n in drop:
                    continue
                data = z.read(n)
                if n.endswith(".dist-info/RECORD"):  # the dropped files leave the record too
                    data = b"\n".join(l for l in data.split(b"\n") if l.split(b",")[0].decode() not in drop)
                t.writestr(z.getinfo(n), data)
    trimmed.replace(wheel)
    print(f"{wheel.name}: kept the {keep} and CPU libraries, dropped {len(drop)}")
EOF
du -ch "$out"/*.whl | tail -1
