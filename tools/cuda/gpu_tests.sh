#!/usr/bin/env bash
# CUDA kernel tests (core/tests/cuda_ops.rs) for a GPU machine that cannot build them itself.
#
#   bash tools/cuda/gpu_tests.sh build   # here: with the CUDA 13.0 toolchain of tools/cuda/env.sh
#                                        # (made on first use); writes cuda-bundle/cuda_ops.xz
#                                        # (git-ignored)
#   bash tools/cuda/gpu_tests.sh run     # on the GPU machine, with cuda-bundle/ carried there
#
# `run` uses the CUDA 13 libraries of the GPU machine's torch venv and sets
# DENSEPRED_REQUIRE_CUDA=1, so a machine without a usable device fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
build)
    source tools/cuda/env.sh
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
    bin=$(cargo test -p densepred-core --features cuda --test cuda_ops --no-run --message-format=json \
        | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda_ops" and m.get("executable"):
        print(m["executable"])' | tail -1)
    mkdir -p cuda-bundle
    strip -o cuda-bundle/cuda_ops "$bin"
    xz -f -T0 cuda-bundle/cuda_ops
    ls -la cuda-bundle
    ;;
run)
    venv=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
    xz -dkf cuda-bundle/cuda_ops.xz
    chmod +x cuda-bundle/cuda_ops
    LD_LIBRARY_PATH="$venv/cu13/lib:$venv/nccl/lib" DENSEPRED_REQUIRE_CUDA=1 \
        cuda-bundle/cuda_ops --test-threads 1 --nocapture
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
