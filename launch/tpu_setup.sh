#!/usr/bin/env bash
# Copies this checkout to every host of a TPU VM / pod slice, installs it
# (requirements.txt + jax[tpu], Python 3.12 venv made with uv) and mounts the
# GCS bucket that holds the data and the workdirs with Cloud Storage FUSE.
# Safe to rerun (after code changes: it re-copies and reinstalls).
#
#   TPU_NAME=glue-xl ZONE=us-east5-a BUCKET=my-bucket bash launch/tpu_setup.sh
#
# Environment:
#   TPU_NAME, ZONE, BUCKET  required (BUCKET without gs://)
#   PROJECT                 Google Cloud project (default: gcloud's)
#   MOUNT                   mount point on every host (default /gcs/$BUCKET)
#   PYTHON_VERSION          default 3.12 (jax >= 0.11 needs Python >= 3.12)
#   JAX_SPEC                default "jax[tpu]>=0.11"
#   DRY_RUN=1               print the commands instead of running them
# Remote layout: ~/glue_jax (code), ~/glue_jax_venv (Python), $MOUNT (bucket).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "${here}/common.sh"

gcloud_tpu_flags
need BUCKET
mount="${MOUNT:-/gcs/${BUCKET}}"
repo="$(dirname "${here}")"
tarball="${TMPDIR:-/tmp}/glue_jax_${TPU_NAME}.tar.gz"

run tar -czf "${tarball}" -C "${repo}" --exclude=.git --exclude=workdirs \
  --exclude=__pycache__ --exclude='*.pyc' --exclude=.venv .
run gcloud compute tpus tpu-vm scp "${tarball}" "${TPU_NAME}:glue_jax.tar.gz" \
  "${TPU_FLAGS[@]}" --worker=all

q() { printf '%q' "$1"; }
on_all_workers "set -euo pipefail
rm -rf ~/glue_jax && mkdir -p ~/glue_jax && tar -xzf ~/glue_jax.tar.gz -C ~/glue_jax
if ! command -v uv >/dev/null && [[ ! -x ~/.local/bin/uv ]]; then
  curl -LsSf https://astral.sh/uv/install.sh | sh
fi
export PATH=~/.local/bin:\$PATH
[[ -x ~/glue_jax_venv/bin/python ]] || uv venv --python $(q "${PYTHON_VERSION:-3.12}") ~/glue_jax_venv
uv pip install --python ~/glue_jax_venv/bin/python -r ~/glue_jax/requirements.txt \
  $(q "${JAX_SPEC:-jax[tpu]>=0.11}") -e ~/glue_jax
if ! command -v gcsfuse >/dev/null; then
  repo_name=gcsfuse-\$(lsb_release -c -s)
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
    | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt \$repo_name main\" \
    | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi
sudo mkdir -p $(q "${mount}") && sudo chown \$(id -u):\$(id -g) $(q "${mount}")
mountpoint -q $(q "${mount}") || gcsfuse --implicit-dirs --rename-dir-limit=200000 \
  $(q "${BUCKET}") $(q "${mount}")
~/glue_jax_venv/bin/python -c 'import jax, glue_jax; print(\"glue_jax ready, jax\", jax.__version__)'"
