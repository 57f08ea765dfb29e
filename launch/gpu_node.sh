#!/usr/bin/env bash
# REGLUE training on one machine with several GPUs: one process drives every
# visible GPU (mesh {'data': -1, 'fsdp': 1} by default: data parallel).  Also
# one node of a multi-node run without SLURM: start it on every node with
# JAX_COORDINATOR_ADDRESS=<node0 host>:<port> JAX_NUM_PROCESSES=<nodes>
# JAX_PROCESS_ID=<0..nodes-1> (glue_jax then calls jax.distributed.initialize).
# Resumes from the latest checkpoint in $WORKDIR.
#
#   FEATURES=/data/features/in256 WORKDIR=/runs/reglue_b2 MODEL=B/2 bash launch/gpu_node.sh
#
# Environment:
#   FEATURES, WORKDIR       required: feature store root, run directory
#   MODEL, METHOD           default XL/2, reglue (glue_jax/configs/reglue.py arguments)
#   CONFIG_EXTRA            more glue_jax/configs/reglue.py arguments (default bf16; '' = float32)
#   EXTRA_FLAGS             e.g. "--config.train.batch_size=256 --config.mesh.fsdp=8"
#   CUDA_VISIBLE_DEVICES    which GPUs (default: all)
#   PYTHON                  interpreter with glue_jax + jax[cuda13] installed (python3)
#   DRY_RUN=1               print the command instead of running it
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "${here}/common.sh"

cd "$(dirname "${here}")"
train_cmd
# Overlap collectives with compute (XLA's latency-hiding scheduler).
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"
run "${TRAIN_CMD[@]}"
