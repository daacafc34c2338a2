#!/usr/bin/env bash
# Builds the CLI and the Python module with candle's `cuda` feature (and our CUDA kernels,
# core/kernels/densepred.cu), on a machine without a GPU or a CUDA install:
#
#   bash tools/cuda/build.sh            # CLI  -> target/cuda/release/densepred
#                                       # wheel -> target/cuda/wheels/densepred-*.whl
#   bash tools/cuda/build.sh cli|python # one of the two
#   bash tools/cuda/build.sh cli-nccl   # the CLI with MPI + NCCL data-parallel training
#                                       # (`--features nccl`; needs Open MPI, README
#                                       # "Distributed training")
#
# The toolchain comes from PyPI (tools/cuda/env.sh, about 1.4 GB, once). A cold build takes about
# 12 minutes on 2 cores (candle-kernels' own CUDA kernels dominate). Set CUDA_COMPUTE_CAP for a
# GPU other than H100/H200 (e.g. 80 for A100).
#
# The binaries need libcuda.so.1 from the NVIDIA driver: they do not start on a machine without
# one. On a GPU machine, put the CUDA 13.0 runtime libraries on the library path, e.g. with the
# torch 2.11 venv of ../shared/notes/cuda_build.md:
#   LD_LIBRARY_PATH=$GPU_LIBS/cu13/lib:$GPU_LIBS/nccl/lib target/cuda/release/densepred ... --device cuda
# A machine whose driver finds no GPU gets an error naming the device (`--device cuda`), not a
# panic.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tools/cuda/env.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
what="${1:-all}"
case "$what" in
all | cli | python | cli-nccl) ;;
*)
    echo "usage: $0 [all|cli|python|cli-nccl]" >&2
    exit 2
    ;;
esac
if [ "$what" = cli-nccl ]; then
    cargo build --locked --release -p densepred-cli --features nccl
    ls -la "$CARGO_TARGET_DIR/release/densepred"
elif [ "$what" != python ]; then
    cargo build --locked --release -p densepred-cli --features cuda
    ls -la "$CARGO_TARGET_DIR/release/densepred"
fi
if [ "$what" = all ] || [ "$what" = python ]; then
    "$CUDA_VENV/bin/pip" install -q "maturin>=1.5,<2"
    "$CUDA_VENV/bin/maturin" build --release --locked --manifest-path python/Cargo.toml \
        --features cuda --out "$CARGO_TARGET_DIR/wheels"
    ls -la "$CARGO_TARGET_DIR/wheels"
fi
echo "on the GPU machine: LD_LIBRARY_PATH=$GPU_LIBS/cu13/lib:$GPU_LIBS/nccl/lib"
