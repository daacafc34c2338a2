#!/usr/bin/env bash
# The data-parallel tests (tools/tests/mpi.rs): builds the CLI with the `mpi` feature and runs
# `train --launcher mpi` under `mpirun -np 2`. Needs Open MPI and libclang (Debian:
# apt-get install openmpi-bin libopenmpi-dev libclang-dev). Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo test --locked -p densepred-cli --features mpi --test mpi "$@"
