#!/usr/bin/env bash
# Interleaved backbone comparison, densepred against the official model code, for BENCHMARKS.md.
#
#   bash benchmarks/backbone_vs_official.sh PYTHON ARCH OFFICIAL_FILE [ROUNDS] [SIZES]
#
# PYTHON: an interpreter with torch and timm; ARCH: smt_t | conv2former_n | conv2former_t;
# OFFICIAL_FILE: the official model file (AFeng-x/SMT models/smt.py, HVision-NKU/Conv2Former
# models/conv2former.py). Each round runs, one after the other, densepred then the official code
# on: forward 1x3xSxS for each S in SIZES (default "224 512"; eval, classifier included, 10
# iterations) and forward + backward 2x3x224x224 (train mode, sum of the stage-output means, 20
# iterations). Every line printed is one run's median (and minimum) over its timed iterations
# after warm-ups. DENSEPRED_BIN picks the densepred binary (default target/release/densepred,
# built when missing), e.g. to compare two builds.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:?python with torch and timm}
arch=${2:?smt_t, conv2former_n or conv2former_t}
file=${3:?path of the official model file}
rounds=${4:-3}
sizes=${5:-224 512}
case "$arch" in
    smt_t) cfg=configs/backbones/smt-t ;;
    conv2former_n) cfg=configs/backbones/conv2former-n ;;
    conv2former_t) cfg=configs/backbones/conv2former-t ;;
    *) echo "unknown arch $arch" >&2; exit 2 ;;
esac
bin=${DENSEPRED_BIN:-target/release/densepred}
[ -x "$bin" ] || cargo build --release -p densepred-cli
for r in $(seq 1 "$rounds"); do
    echo "# round $r"
    for size in $sizes; do
        "$bin" benchmark backbone "${cfg}_in1k.toml" --shape "${size}x${size}" --iters 10
        "$py" benchmarks/official_backbone.py --arch "$arch" --file "$file" forward --size "$size" --iters 10 2>/dev/null
    done
    "$bin" benchmark backbone "${cfg}.toml" --shape 224x224 --batch 2 --train --iters 20
    "$py" benchmarks/official_backbone.py --arch "$arch" --file "$file" train --size 224 --iters 20 2>/dev/null
done
