# Sourced by tools/cuda/build.sh and tools/cuda/gpu_tests.sh: makes (once) and exports the CUDA
# 13.0 toolchain that ../shared/notes/cuda_build.md verified, built from PyPI's CUDA wheels, so
# no CUDA install or GPU is needed to build:
#   $DENSEPRED_CUDA_DIR/venv   nvcc 13.0, cudart, cuBLAS, cuRAND, NVRTC and NCCL wheels (the
#                              versions torch 2.11 pins, so the GPU machine's torch venv has the
#                              same sonames)
#   $DENSEPRED_CUDA_DIR/root   a CUDA_ROOT tree (bin, include, nvvm, lib64) of symlinks into the
#                              wheels, with the unversioned .so names the linker wants and a
#                              link-time libcuda stub (never shipped: the driver provides the real
#                              libcuda.so.1 on the GPU machine)
# DENSEPRED_CUDA_DIR defaults to ~/.cache/densepred-cuda. CUDA_COMPUTE_CAP defaults to 90
# (H100/H200); the driver JIT-compiles the PTX for newer GPUs.
set -euo pipefail

DENSEPRED_CUDA_DIR="${DENSEPRED_CUDA_DIR:-$HOME/.cache/densepred-cuda}"
CUDA_VENV="$DENSEPRED_CUDA_DIR/venv"
CUDA_ROOT="$DENSEPRED_CUDA_DIR/root"

if [ ! -x "$CUDA_ROOT/bin/nvcc" ] || [ ! -e "$CUDA_ROOT/lib64/libcuda.so" ]; then
    echo "densepred: setting up the CUDA 13.0 toolchain in $DENSEPRED_CUDA_DIR" >&2
    python3 -m venv "$CUDA_VENV"
    # nvcc must stay at 13.0.x: PTX of 13.1+ needs a newer driver than CUDA 13.0's (580).
    "$CUDA_VENV/bin/pip" install -q --no-deps \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.1.0.3 \
        nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88 nvidia-nccl-cu13==2.28.9
    sp="$("$CUDA_VENV/bin/python" -c 'import os, nvidia; print(os.path.dirname(nvidia.__path__[0]))')/nvidia"
    mkdir -p "$CUDA_ROOT/lib64"
    for d in bin include nvvm; do ln -sfn "$sp/cu13/$d" "$CUDA_ROOT/$d"; done
    for f in "$sp"/cu13/lib/*.so.* "$sp/nccl/lib/libnccl.so.2"; do
        ln -sfn "$f" "$CUDA_ROOT/lib64/$(basename "$f")"
    done
    for l in cublas cublasLt cudart nvrtc; do
        ln -sfn "$sp/cu13/lib/lib$l.so.13" "$CUDA_ROOT/lib64/lib$l.so"
    done
    ln -sfn "$sp/cu13/lib/libcurand.so.10" "$CUDA_ROOT/lib64/libcurand.so"
    ln -sfn "$sp/nccl/lib/libnccl.so.2" "$CUDA_ROOT/lib64/libnccl.so"
    # The link-time libcuda: every driver function cudarc binds, each returning
    # CUDA_ERROR_NO_DEVICE (100).
    cargo fetch --locked -q
    bindings=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)
    grep -ohE 'pub unsafe fn cu[A-Za-z0-9_]+' "$bindings" | awk '{print $4}' | sort -u \
        | sed 's/.*/int &(void){return 100;}/' > "$CUDA_ROOT/stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA_ROOT/lib64/libcuda.so" "$CUDA_ROOT/stub.c"
fi

export CUDA_ROOT CUDA_HOME="$CUDA_ROOT" CUDA_PATH="$CUDA_ROOT" PATH="$CUDA_ROOT/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
# Where the GPU machine's torch venv keeps the same CUDA 13.0 libraries (see the notes).
GPU_LIBS=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export GPU_LIBS
