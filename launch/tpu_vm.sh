#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: same command on every worker.
#   TPU=my-tpu ZONE=us-central2-b WORKDIR=gs://bucket/runs/lol DATA_DIR=gs://bucket/tfds \
#     launch/tpu_vm.sh [extra --config.* flags]
set -euo pipefail
: "${TPU:?name of the TPU VM}" "${ZONE:?zone of the TPU VM}" "${WORKDIR:?run directory (gs://...)}"
: "${DATA_DIR:?TFDS data_dir holding the built dataset}"
CONFIG="${CONFIG:-configs/lol.py}"
REPO_DIR="mirnet-jax"

gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all . "$TPU:$REPO_DIR"
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e; cd $REPO_DIR
  python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . 'jax[tpu]'
  .venv/bin/python -m mirnet_jax.main --config=$CONFIG --workdir=$WORKDIR \
    --config.data.data_dir=$DATA_DIR $*"
