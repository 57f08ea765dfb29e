#!/usr/bin/env bash
# Starts (or resumes) REGLUE training on every host of a TPU VM / pod slice.
# Each host runs the same command; glue_jax calls jax.distributed.initialize()
# (GLUE_JAX_DISTRIBUTED=1; on Cloud TPU the coordinator, process count and id
# are detected), builds the global mesh and reads its own shard of the data.
# A run resumes from the latest checkpoint in $WORKDIR; rerun this script
# after a preemption.  Stop it (checkpoint, then exit) with launch/tpu_stop.sh.
#
#   TPU_NAME=glue-xl ZONE=us-east5-a BUCKET=my-bucket \
#     FEATURES=/gcs/my-bucket/features/in256 WORKDIR=/gcs/my-bucket/runs/reglue_xl \
#     bash launch/tpu_train.sh
#
# Environment:
#   TPU_NAME, ZONE          required
#   FEATURES, WORKDIR       required: feature store root and run directory as paths on
#                           the hosts (under the gcsfuse mount of tpu_setup.sh)
#   MODEL, METHOD           default XL/2, reglue (glue_jax/configs/reglue.py arguments)
#   CONFIG_EXTRA            more glue_jax/configs/reglue.py arguments (default bf16; '' = float32)
#   EXTRA_FLAGS             e.g. "--config.train.batch_size=256 --config.mesh.fsdp=4"
#   TFDS_DATA_DIR           exported on the hosts when set (online features: images)
#   PROJECT                 Google Cloud project (default: gcloud's)
#   FOREGROUND=1            stay attached and stream every host's output (default:
#                           detached, log in ~/glue_jax_train.log on each host)
#   DRY_RUN=1               print the gcloud command instead of running it
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

gcloud_tpu_flags
train_cmd
args="$(printf '%q ' "${TRAIN_CMD[@]:1}")"        # our interpreter is the venv's
env_exports="export GLUE_JAX_DISTRIBUTED=1"
if [[ -n "${TFDS_DATA_DIR:-}" ]]; then
  env_exports="${env_exports} TFDS_DATA_DIR=$(printf '%q' "${TFDS_DATA_DIR}")"
fi
launch="~/glue_jax_venv/bin/python ${args}"
if [[ "${FOREGROUND:-0}" == "1" ]]; then
  body="${launch}"
else
  body="setsid nohup ${launch} > ~/glue_jax_train.log 2>&1 < /dev/null &
echo \$! > ~/glue_jax_train.pid
echo \"\$(hostname): started pid \$(cat ~/glue_jax_train.pid), log ~/glue_jax_train.log\""
fi
on_all_workers "set -euo pipefail
cd ~/glue_jax
${env_exports}
${body}"
