# Shared by the launch scripts (sourced, not run): dry runs, checks and the
# training command line.
#
# Environment read here (all scripts):
#   DRY_RUN=1      print each command (shell-quoted, one line) instead of running it
#   CONFIG         config file                       (default glue_jax/configs/reglue.py)
#   MODEL, METHOD  glue_jax/configs/reglue.py arguments       (default XL/2, reglue)
#   FEATURES       feature store root (data.path)    (required for training)
#   CONFIG_EXTRA   more config arguments, comma-separated (default bf16; '' for float32)
#   EXTRA_FLAGS    extra absl flags, e.g. "--config.train.batch_size=256 --config.mesh.fsdp=8"
#   WORKDIR        checkpoints, logs, samples        (required for training)
#   PYTHON         interpreter                       (default python3)

# run CMD...: run CMD, or print it shell-quoted when DRY_RUN=1.
run() {
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

die() {
  echo "error: $*" >&2
  exit 1
}

# need VAR...: each variable must be set and non-empty.
need() {
  local var
  for var in "$@"; do
    [[ -n "${!var:-}" ]] || die "set ${var} (usage: the comment at the top of ${0})"
  done
}

# train_cmd: sets the array TRAIN_CMD to the python command of the training run.
train_cmd() {
  need FEATURES WORKDIR
  local args="model=${MODEL:-XL/2},method=${METHOD:-reglue},features=${FEATURES}"
  local extra="${CONFIG_EXTRA-bf16}"
  if [[ -n "${extra}" ]]; then
    args="${args},${extra}"
  fi
  if [[ "${args}" == *[[:space:]]* ]]; then
    die "config arguments must not contain spaces: ${args}"
  fi
  TRAIN_CMD=("${PYTHON:-python3}" -m glue_jax.main "--config=${CONFIG:-glue_jax/configs/reglue.py}:${args}"
             "--workdir=${WORKDIR}")
  if [[ -n "${EXTRA_FLAGS:-}" ]]; then
    local -a flags
    read -r -a flags <<< "${EXTRA_FLAGS}"
    TRAIN_CMD+=("${flags[@]}")
  fi
}

# gcloud_tpu_flags: sets the array TPU_FLAGS (--zone, --project) for gcloud tpu-vm commands.
gcloud_tpu_flags() {
  need TPU_NAME ZONE
  TPU_FLAGS=("--zone=${ZONE}")
  if [[ -n "${PROJECT:-}" ]]; then
    TPU_FLAGS+=("--project=${PROJECT}")
  fi
}

# squote STRING: STRING in POSIX single quotes (safe for any remote login shell).
squote() {
  local quoted="${1//\'/\'\\\'\'}"
  printf "'%s'" "${quoted}"
}

# on_all_workers SCRIPT: runs the bash SCRIPT on every host of the TPU slice.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${TPU_FLAGS[@]}" --worker=all \
    --command="bash -c $(squote "$1")"
}
