#!/usr/bin/env bash
# Train on GPU node(s) without a scheduler: one process per node, all its GPUs.
#   single node:  WORKDIR=/shared/runs/lol launch/gpu.sh [--config.* flags]
#   N nodes:      on node r (0..N-1), with node 0 reachable at HOST0:
#     COORDINATOR=HOST0:1234 NUM_NODES=N NODE_RANK=r WORKDIR=/shared/runs/lol launch/gpu.sh
set -euo pipefail
: "${WORKDIR:?run directory on a shared file system}"
CONFIG="${CONFIG:-configs/lol.py}"
if [[ -n "${COORDINATOR:-}" ]]; then
  export JAX_COORDINATOR_ADDRESS="$COORDINATOR"
  export JAX_NUM_PROCESSES="${NUM_NODES:?number of nodes}"
  export JAX_PROCESS_ID="${NODE_RANK:?rank of this node}"
fi
# Let XLA take most of the GPU memory up front; TensorFlow (summaries only) is kept off the GPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec python -m mirnet_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
