#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice, from your machine: ships the committed code to every worker
# host, installs it with `pip install -e '.[tpu]'` and starts the same command on all of them at
# once (gcloud ... --worker=all), one process per host. On a single-host VM that is worker 0 alone.
#
#   TPU=my-tpu ZONE=us-central2-b WORKDIR=gs://bucket/runs/lol DATA_DIR=gs://bucket/tfds \
#     launch/tpu_vm.sh [--config.* flags]
#   first: DRY_RUN=1 ... prints the commands (here and on every worker) and runs nothing.
#
# TPU, ZONE    the TPU VM or pod slice (gcloud compute tpus tpu-vm list); required
# WORKDIR      run directory, gs://... : a pod slice's hosts share no disk; required
# DATA_DIR     TFDS data_dir holding the built dataset, gs://... ; required
# SINGLE_HOST=1  allows absolute local paths for WORKDIR and DATA_DIR on a single-host VM's disk
# PROJECT      gcloud project (default: gcloud's)
# GCLOUD_FLAGS extra flags for both gcloud commands, e.g. '--tunnel-through-iap'
# CONFIG       config file inside the repository (configs/lol.py)
# REMOTE_DIR   directory on each worker, relative to the home directory (mirnet-jax)
# INSTALL=0    skip the pip install on the workers (default 1: a no-op when nothing changed)
# DETACH=1     start the run in the background on every worker (log: REMOTE_DIR/train.log), so
#              it survives the end of this ssh session
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
LAUNCHER=tpu_vm.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=common.sh
source "$REPO/launch/common.sh"

need TPU 'the name of the TPU VM or pod slice'
need ZONE 'the zone of the TPU VM or pod slice'
need WORKDIR 'the run directory, gs://BUCKET/...'
need DATA_DIR 'the TFDS data_dir holding the built dataset, gs://BUCKET/...'
check_flags "$@"
for var in WORKDIR DATA_DIR; do
  value=${!var}
  if [[ $value == gs://* ]]; then
    continue
  elif [[ ${SINGLE_HOST:-0} != 1 ]]; then
    die "$var=$value is not on GCS: the hosts of a pod slice share no disk, use gs://BUCKET/..." \
      "(SINGLE_HOST=1 allows a local path on a single-host VM)"
  elif [[ $value != /* ]]; then
    die "$var=$value must be an absolute path on the VM (or gs://...)"
  fi
done
CONFIG=${CONFIG:-configs/lol.py}
[[ $CONFIG != /* && -f $REPO/${CONFIG%%:*} ]] ||
  die "CONFIG=$CONFIG must be a config file inside the repository, e.g. configs/lol.py"
REMOTE_DIR=${REMOTE_DIR:-mirnet-jax}
[[ $REMOTE_DIR =~ ^[A-Za-z0-9_.][A-Za-z0-9_./-]*$ && /$REMOTE_DIR/ != */../* ]] ||
  die "REMOTE_DIR=$REMOTE_DIR must be a plain path relative to the workers' home directory"

gcloud_flags=("--zone=$ZONE")
[[ -z ${PROJECT:-} ]] || gcloud_flags+=("--project=$PROJECT")
read -r -a extra_flags <<<"${GCLOUD_FLAGS:-}"
gcloud_flags+=(${extra_flags[@]+"${extra_flags[@]}"} --worker=all)

# What every worker runs, as one shell line (gcloud hands it to the worker's login shell).
train=(.venv/bin/python -m mirnet_jax.main "--config=$CONFIG" "--workdir=$WORKDIR"
  "--config.data.data_dir=$DATA_DIR" "$@")
remote="set -eu; mkdir -p $REMOTE_DIR; tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR; cd $REMOTE_DIR"
if [[ ${INSTALL:-1} == 1 ]]; then
  remote+="; [ -x .venv/bin/python ] || python3 -m venv .venv"
  remote+="; .venv/bin/pip install -q -U pip; .venv/bin/pip install -q -e '.[tpu]'"
fi
# main.py starts jax.distributed when JAX_COORDINATOR_ADDRESS is set (jax reads the process count
# and id from the TPU metadata itself). The coordinator is worker 0: the first entry of the
# metadata's worker-network-endpoints (a host name, or name:id:ip), port 8482 as in jax's own
# Cloud TPU detection.
metadata=http://metadata.google.internal/computeMetadata/v1/instance/attributes
remote+="; endpoints=\$(curl -sf -H 'Metadata-Flavor: Google' $metadata/worker-network-endpoints)"
remote+=" || { echo '$LAUNCHER: no worker-network-endpoints in the TPU metadata' >&2; exit 2; }"
remote+="; first=\${endpoints%%,*}; export JAX_COORDINATOR_ADDRESS=\"\${first##*:}:8482\""
if [[ ${DETACH:-0} == 1 ]]; then
  remote+="; nohup $(join_quoted "${train[@]}") > train.log 2>&1 < /dev/null &"
else
  remote+="; exec $(join_quoted "${train[@]}")"
fi

git -C "$REPO" rev-parse --verify -q HEAD >/dev/null 2>&1 ||
  die "$REPO is not a git checkout with a commit: the workers get its HEAD (git archive)"
if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no) ]]; then
  echo "$LAUNCHER: warning: uncommitted changes are not shipped (the workers get HEAD)" >&2
fi
tarball="${TMPDIR:-/tmp}/mirnet-jax-$$.tar.gz"
if dry_run; then
  echo "# DRY_RUN=1: nothing runs. Here, then on every worker host of $TPU (one process each):"
fi
dry_run || trap 'rm -f "$tarball"' EXIT
run local git -C "$REPO" archive --format=tar.gz "--output=$tarball" HEAD
run local gcloud compute tpus tpu-vm scp "${gcloud_flags[@]}" "$tarball" "$TPU:$REMOTE_DIR.tar.gz"
dry_run || rm -f "$tarball"
if dry_run; then
  show local gcloud compute tpus tpu-vm ssh "$TPU" "${gcloud_flags[@]}" "--command=$remote"
  echo "[every worker] $remote"
else
  run_last local gcloud compute tpus tpu-vm ssh "$TPU" "${gcloud_flags[@]}" "--command=$remote"
fi
