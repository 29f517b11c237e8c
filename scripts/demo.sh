#!/usr/bin/env bash
# The showcase: a local Slurm cluster with emulated GPUs, the tier policy,
# and jobs on it. Leaves the cluster running for you to explore; the last
# lines say how to stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
STATE=${SINGULARITY_DEMO_STATE:-$PWD/.state/demo}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Local Slurm cluster: 4 nodes x 8 emulated GPUs"
singularity-admin cluster up --state-dir "$STATE" --nodes 4 --gpus-per-node 8
eval "$(singularity-admin cluster env --state-dir "$STATE")"
sinfo -o "%P %D %N %t %G"

exec .venv/bin/python scripts/demo.py --state-dir "$STATE"
