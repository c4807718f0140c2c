#!/usr/bin/env bash
# Train on every worker of a Cloud TPU pod slice (e.g. v5litepod-16: 4 hosts x 4 chips).
#
#   scripts/launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#
# WORKDIR must be shared by every worker (a gs:// bucket or a mounted filestore): Orbax writes
# each host's shards of the checkpoints there. JAX finds the pod by itself on TPU VMs
# (`medjax.parallel.initialize_distributed`), so the same command runs on every worker; each
# worker reads only its own data shards (`config.data.shards`, one per process by default).
# The data folder (config.data.directory) must exist on every worker (same path).
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,10p' "$0"
  exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
EXTRA=$(printf ' %q' "$@")
REPO=${MEDJAX_REPO:-https://github.com/medjax/medjax.git}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d medjax ] || git clone -q $REPO medjax
  cd medjax && python3.11 -m venv .venv && .venv/bin/pip install -q -e '.[train]' 'jax[tpu]'
  .venv/bin/medjax train --config $CONFIG --workdir $WORKDIR $EXTRA
"
