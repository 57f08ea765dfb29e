#!/usr/bin/env bash
# Creates a Cloud TPU VM: one host (v5p-8, v4-8, v6e-8) or a multi-host pod slice.
#
#   TPU_NAME=glue-xl ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64 bash launch/tpu_create.sh
#
# Environment:
#   TPU_NAME, ZONE      required
#   PROJECT             Google Cloud project (default: gcloud's configured one)
#   ACCELERATOR_TYPE    default v5p-32 (4 hosts x 4 chips)
#   RUNTIME_VERSION     default by generation: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5,
#                       v5e (v5litepod-N) v2-alpha-tpuv5-lite, v4 tpu-ubuntu2204-base
#   SPOT=1              Spot capacity (preemptible; the trainer checkpoints on SIGTERM)
#   DRY_RUN=1           print the gcloud command instead of running it
# Next: launch/tpu_setup.sh, then launch/tpu_train.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

gcloud_tpu_flags
accel="${ACCELERATOR_TYPE:-v5p-32}"
case "${accel}" in
  v6e-*) default_version=v2-alpha-tpuv6e ;;
  v5p-*) default_version=v2-alpha-tpuv5 ;;
  v5litepod-*) default_version=v2-alpha-tpuv5-lite ;;
  v4-*|v3-*|v2-*) default_version=tpu-ubuntu2204-base ;;
  *) default_version="" ;;
esac
version="${RUNTIME_VERSION:-${default_version}}"
[[ -n "${version}" ]] || die "no default runtime for ${accel}; set RUNTIME_VERSION"
extra=()
if [[ "${SPOT:-0}" == "1" ]]; then
  extra+=(--spot)
fi
run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${TPU_FLAGS[@]}" \
  --accelerator-type="${accel}" --version="${version}" ${extra[@]+"${extra[@]}"}
