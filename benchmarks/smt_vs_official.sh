#!/usr/bin/env bash
# Interleaved SMT-T comparison, densepred against the official model code, for BENCHMARKS.md.
#
#   bash benchmarks/smt_vs_official.sh PYTHON OFFICIAL_SMT_PY [ROUNDS]
#
# PYTHON: an interpreter with torch and timm; OFFICIAL_SMT_PY: the official models/smt.py
# (AFeng-x/SMT). Each round runs, one after the other, densepred then the official code on:
# forward 1x3x224x224 and 1x3x512x512 (eval, classifier included, 10 iterations) and forward +
# backward 2x3x224x224 (train mode, sum of the stage-output means, 20 iterations). Every line
# printed is one run's median (and minimum) over its timed iterations after warm-ups.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:?python with torch and timm}
smt=${2:?path of the official models/smt.py}
rounds=${3:-3}
bin=target/release/densepred
[ -x "$bin" ] || cargo build --release -p densepred-cli
for r in $(seq 1 "$rounds"); do
    echo "# round $r"
    for size in 224 512; do
        "$bin" benchmark backbone configs/backbones/smt-t_in1k.toml --shape ${size}x${size} --iters 10
        "$py" benchmarks/official_smt.py --smt-file "$smt" forward --size "$size" --iters 10 2>/dev/null
    done
    "$bin" benchmark backbone configs/backbones/smt-t.toml --shape 224x224 --batch 2 --train --iters 20
    "$py" benchmarks/official_smt.py --smt-file "$smt" train --size 224 --iters 20 2>/dev/null
done
