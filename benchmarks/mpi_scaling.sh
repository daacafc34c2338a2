#!/usr/bin/env bash
# Issue 24, scaling on one machine: training throughput of 1 process x 2 threads (batch 4)
# against 2 MPI ranks x 1 thread (batch 2 each, the same total batch), run one after the other,
# for the mini configs (SMT-T backbones); plus the gradient bytes all-reduced per step
# (trainable parameters x 4 bytes, f32). Prints a Markdown table (BENCHMARKS.md).
#
#   bash benchmarks/mpi_scaling.sh          # needs Open MPI (README "Distributed training")
#
# Each row: the median of the per-iteration `time` in metrics.jsonl after the first 3 iterations
# (rank 0's clock in the MPI run: it includes waiting for the other rank and the all-reduce).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cargo build --release --locked -p densepred-cli --features mpi >&2
bin=target/release/densepred
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

median() {
    python3 - "$1" <<'PY'
import json, statistics, sys
t = [r["time"] for r in map(json.loads, open(sys.argv[1])) if r.get("mode") == "train" and r["iter"] > 3]
print(f"{statistics.median(t):.3f}")
PY
}

echo "| config | trainable params | all-reduced per step | 1 rank x 2 threads, batch 4: s/iter | 2 ranks x 1 thread, batch 2 each: s/iter | speed-up |"
echo "|---|---:|---:|---:|---:|---:|"
for entry in \
    "configs/retinanet/retinanet_smt-t_fpn_mini-coco.toml train_cfg.max_epochs=1" \
    "configs/mask_rcnn/mask_rcnn_smt-t_fpn_mini-coco.toml train_cfg.max_epochs=1" \
    "configs/upernet/upernet_smt-t_mini-ade.toml train_cfg.max_iters=12"; do
    set -- $entry
    cfg=$1 length=$2
    common=(--no-progress --set "$length" --set train_cfg.val_interval=0
        --set default_hooks.logger.interval=1 --set default_hooks.checkpoint.interval=100000)
    rm -rf "$work"/one "$work"/two
    RAYON_NUM_THREADS=2 "$bin" train "$cfg" --work-dir "$work/one" "${common[@]}" \
        --set train_dataloader.batch_size=4 >/dev/null 2>&1
    mpirun -np 2 --oversubscribe --bind-to none -x RAYON_NUM_THREADS=1 \
        "$bin" train "$cfg" --launcher mpi --work-dir "$work/two" "${common[@]}" \
        --set train_dataloader.batch_size=2 >/dev/null 2>&1
    params=$("$bin" analyze params "$cfg" | awk '$1 == "total" {print $2}')
    one=$(median "$work/one/metrics.jsonl")
    two=$(median "$work/two/metrics.jsonl")
    python3 - "$cfg" "$params" "$one" "$two" <<'PY'
import sys
cfg, params, one, two = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
print(f"| `{cfg.split('/')[-1]}` | {params:,} | {params * 4 / 2**20:.1f} MiB | {one:.3f} | {two:.3f} | {one / two:.2f}x |")
PY
done
