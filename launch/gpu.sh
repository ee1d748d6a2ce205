#!/usr/bin/env bash
# Train on GPU node(s) without a scheduler: one process per node, driving all of the node's GPUs.
#
#   one node:  WORKDIR=/shared/runs/lol launch/gpu.sh [--config.* flags]
#   N nodes:   on every node r = 0..N-1, node 0 reachable from the others at HOST0:PORT:
#              COORDINATOR=HOST0:1234 NUM_NODES=N NODE_RANK=r WORKDIR=/shared/runs/lol launch/gpu.sh
#   first:     DRY_RUN=1 ... prints the commands and runs nothing (all N nodes' when NODE_RANK is
#              unset).
#
# WORKDIR     run directory every node reaches (shared file system or gs://); required
# CONFIG      config file (configs/lol.py)
# DATA_DIR    TFDS data_dir holding the built dataset (default: the config's)
# PYTHON      interpreter with mirnet-jax installed (python3)
# INSTALL=1   first `pip install -e '.[cuda13]'` (CUDA=cuda12 for drivers older than CUDA 13);
#             with one environment on a shared file system, install once, from one node
# XLA_FLAGS   passed on, plus --xla_gpu_enable_latency_hiding_scheduler=true unless it is set
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
LAUNCHER=gpu.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=common.sh
source "$REPO/launch/common.sh"

need WORKDIR 'the run directory, on a file system every node reaches (or gs://...)'
check_flags "$@"
WORKDIR=$(absolute "$WORKDIR")
CONFIG=$(absolute "${CONFIG:-$REPO/configs/lol.py}")
PYTHON=${PYTHON:-python3}
extra=$(cuda_extra)

envs=("XLA_FLAGS=$(gpu_xla_flags)")
ranks=(-)  # '-': a single node, no jax.distributed
if [[ -n ${COORDINATOR:-} || -n ${NUM_NODES:-} || -n ${NODE_RANK:-} ]]; then
  need COORDINATOR 'HOST:PORT of node 0, where the jax.distributed coordinator listens'
  need NUM_NODES 'the number of nodes (one process each)'
  [[ $COORDINATOR =~ ^[^:]+:[0-9]+$ ]] || die "COORDINATOR must be HOST:PORT, got '$COORDINATOR'"
  positive_int NUM_NODES "$NUM_NODES"
  if [[ -n ${NODE_RANK:-} ]]; then
    if ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || ((NODE_RANK >= NUM_NODES)); then
      die "NODE_RANK must be 0..$((NUM_NODES - 1)), got '$NODE_RANK'"
    fi
    ranks=("$NODE_RANK")
  elif dry_run; then
    mapfile -t ranks < <(seq 0 $((NUM_NODES - 1)))
  else
    need NODE_RANK "this node's rank, 0..$((NUM_NODES - 1)) (0 on the coordinator's node)"
  fi
  envs+=("JAX_COORDINATOR_ADDRESS=$COORDINATOR" "JAX_NUM_PROCESSES=$NUM_NODES")
fi

cmd=("$PYTHON" -m mirnet_jax.main "--config=$CONFIG" "--workdir=$WORKDIR")
[[ -z ${DATA_DIR:-} ]] || cmd+=("--config.data.data_dir=$(absolute "$DATA_DIR")")
cmd+=("$@")

if dry_run; then
  echo '# DRY_RUN=1: nothing runs. One process per node, each using all of its GPUs:'
fi
for rank in "${ranks[@]}"; do
  where='this node'
  rank_env=()
  if [[ $rank != - ]]; then
    where="node $rank"
    rank_env=("JAX_PROCESS_ID=$rank")
  fi
  if [[ ${INSTALL:-0} == 1 ]]; then
    run "$where" "$PYTHON" -m pip install -e "${REPO}[${extra}]"
  fi
  run_last "$where" env "${envs[@]}" "${rank_env[@]}" "${cmd[@]}"
done
