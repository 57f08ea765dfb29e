#!/usr/bin/env bash
# Stops a detached launch/tpu_train.sh run: SIGTERM to the trainer on every
# host, which saves a checkpoint and exits (rerun tpu_train.sh to resume).
#
#   TPU_NAME=glue-xl ZONE=us-east5-a bash launch/tpu_stop.sh
#
# Environment: TPU_NAME, ZONE (required); PROJECT; DRY_RUN=1 prints the command.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

gcloud_tpu_flags
on_all_workers "set -euo pipefail
if [[ -f ~/glue_jax_train.pid ]] && kill -0 \$(cat ~/glue_jax_train.pid) 2>/dev/null; then
  kill -TERM \$(cat ~/glue_jax_train.pid) && echo \"\$(hostname): SIGTERM sent\"
else
  echo \"\$(hostname): no running trainer\"
fi"
