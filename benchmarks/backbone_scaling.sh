#!/usr/bin/env bash
# MCGA beside SMT-T and Conv2Former-N (all densepred, same machine, one after the other), for
# BENCHMARKS.md (issue 22):
#   1. forward, batch 1, eval, classifier included, at 224² and 512²;
#   2. forward + backward, batch 2, train mode, at 224²;
#   3. forward, batch 1, backbone only, at 224², 384², 512², 768², 1024² for MCGA and SMT-T (does
#      MCGA's time grow linearly with the number of pixels, as its group attention promises?).
#
#   bash benchmarks/backbone_scaling.sh [ITERS]
set -euo pipefail
cd "$(dirname "$0")/.."
iters=${1:-5}
bin=target/release/densepred
[ -x "$bin" ] || cargo build --release -p densepred-cli
b() { "$bin" benchmark backbone "$@" --iters "$iters" | tail -1; }
for s in 224 512; do
    for m in mcga smt-t conv2former-n; do b "configs/backbones/${m}_in1k.toml" --shape "${s}x${s}"; done
done
for m in mcga smt-t conv2former-n; do b "configs/backbones/${m}.toml" --shape 224x224 --batch 2 --train; done
for s in 224 384 512 768 1024; do
    for m in mcga smt-t; do b "configs/backbones/${m}.toml" --shape "${s}x${s}"; done
done
