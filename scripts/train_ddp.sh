#!/usr/bin/env bash
# Train on every GPU of this machine: cbir-train with DistributedDataParallel, one process per GPU, via torchrun.
#
#   scripts/train_ddp.sh --training_data DIR --weights OUT.pt [any other cbir-train flag]
#
# NPROC=N picks the number of processes (default: one per GPU; with no GPU, set NPROC to run N CPU processes on
# gloo). --batch_size is per process: the effective batch is NPROC times larger, so consider raising --lr.
# Several machines: run torchrun on each yourself, with --nnodes, --node_rank and --rdzv_endpoint (see torchrun -h).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
torchrun="$root/.venv/bin/torchrun"
[ -x "$torchrun" ] || torchrun="$(command -v torchrun)"
nproc="${NPROC:-}"
if [ -z "$nproc" ]; then
    if ! nproc="$("$root/.venv/bin/python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null)" \
        || [ "$nproc" -lt 1 ]; then
        echo "error: no GPU found; set NPROC=N to train with N CPU processes (gloo)" >&2
        exit 2
    fi
fi
exec "$torchrun" --standalone --nproc_per_node "$nproc" -m cbir.cli.train --parallel "$@"
