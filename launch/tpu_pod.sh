#!/usr/bin/env bash
# A Cloud TPU VM pod slice: create it, install this checkout on every worker,
# run pixel_vit.main on all workers at once, copy the logs back, delete it.
#
# Usage:
#   launch/tpu_pod.sh [--dry_run] create --config=CONFIG [--config.KEY=VALUE...]  # --dry_run may also come last
#   launch/tpu_pod.sh [--dry_run] setup             # git HEAD of this checkout + jax[tpu] on every worker
#   launch/tpu_pod.sh [--dry_run] run --config=CONFIG --workdir=gs://BUCKET/RUN [MAIN FLAGS...]
#   launch/tpu_pod.sh [--dry_run] logs [LOCAL_DIR]  # default tpu_logs/TPU_NAME
#   launch/tpu_pod.sh [--dry_run] delete
#
# Before any gcloud call, `create` and `run` compile the run for the slice
# here, on this machine (`python -m pixel_vit.compile --topology=$ACCELERATOR_TYPE
# --config=... [--config.KEY=VALUE...]`: the TPU compiler from the [tpu]
# extra, no TPU needed) and stop when a program does not fit or does not
# compile. `--skip_compile_check` turns that off; a dry run prints the check.
#
# `run` starts `python3 -m pixel_vit.main --distributed=auto ...` on every
# worker (gcloud ... ssh --worker=all): jax.distributed.initialize() reads
# the process count, this worker's id and the coordinator (worker 0) from the
# TPU VM metadata server, so no coordinator flags are needed. Each worker
# appends its output to ~/pixel_vit_logs/<hostname>.log; `logs` copies them
# to LOCAL_DIR/worker_<i>/. The workdir must be storage every worker sees
# (a gs:// bucket): orbax writes each worker's shards of the checkpoint there.
#
# Environment: TPU_NAME and ZONE (required); PROJECT (default: gcloud's
# configured project); ACCELERATOR_TYPE (v4-32); RUNTIME_VERSION
# (tpu-ubuntu2204-base); JAX_VERSION (pin jax[tpu] in `setup`; default: newest);
# NUM_WORKERS (`logs`; default: counted with `gcloud ... describe`);
# DRY_RUN=1 (same as --dry_run: print the gcloud commands, run nothing).
set -euo pipefail

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

dry_run=${DRY_RUN:-0}
compile_check=1
args=()
for arg in "$@"; do  # --dry_run / --skip_compile_check may stand anywhere; pixel_vit.main must not see them
  case "$arg" in
    --dry_run) dry_run=1 ;;
    --skip_compile_check) compile_check=0 ;;
    *) args+=("$arg") ;;
  esac
done
set -- "${args[@]}"
action=${1:-}
[[ -n "$action" ]] || die "name a command: create | setup | run | logs | delete (see the header of $0)."
shift

[[ -n "${TPU_NAME:-}" ]] || die "set TPU_NAME (the TPU VM's name)."
[[ -n "${ZONE:-}" ]] || die "set ZONE (e.g. us-central2-b)."
accelerator_type=${ACCELERATOR_TYPE:-v4-32}
runtime_version=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
location=("--zone=$ZONE")
[[ -n "${PROJECT:-}" ]] && location+=("--project=$PROJECT")
remote_dir='~/pixel_vit'  # expanded by the worker's shell
remote_logs='~/pixel_vit_logs'

# Prints (dry run) or runs one command.
run() {
  if [[ "$dry_run" == 1 ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

tpu_vm=(gcloud compute tpus tpu-vm)

# Compiles the run given by the --config flags among "$@" for this slice, here
# (pixel_vit.compile); a program that does not fit ends the script.
check_compiles() {
  local check=(python -m pixel_vit.compile "--topology=$accelerator_type")
  local arg
  for arg in "$@"; do
    case "$arg" in --config=*|--config.*|--noconfig.*) check+=("$arg") ;; esac
  done
  if [[ "$dry_run" == 1 ]]; then
    printf '%q ' "${check[@]}" | sed 's/ $//'
    echo
  elif ! "${check[@]}"; then
    die "the compile check for $accelerator_type failed (above); nothing was created or started. Fix the config, or pass --skip_compile_check to go ahead anyway."
  fi
}

has_config() {
  local arg
  for arg in "$@"; do [[ "$arg" == --config=* ]] && return 0; done
  return 1
}

case "$action" in
  create)
    if [[ "$compile_check" == 1 ]]; then
      has_config "$@" || die "create needs --config=CONFIG (the run this slice is for: it is compiled for $accelerator_type first), or --skip_compile_check."
      check_compiles "$@"
    fi
    run "${tpu_vm[@]}" create "$TPU_NAME" "${location[@]}" \
      "--accelerator-type=$accelerator_type" "--version=$runtime_version"
    ;;

  setup)
    repo=$(cd "$(dirname "$0")/.." && pwd)
    archive="${TMPDIR:-/tmp}/pixel_vit_$TPU_NAME.tar.gz"
    jax_tpu="jax[tpu]${JAX_VERSION:+==$JAX_VERSION}"
    run git -C "$repo" archive --format=tar.gz "--output=$archive" HEAD
    run "${tpu_vm[@]}" scp "$archive" "$TPU_NAME:pixel_vit.tar.gz" --worker=all "${location[@]}"
    run "${tpu_vm[@]}" ssh "$TPU_NAME" --worker=all "${location[@]}" \
      "--command=rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf ~/pixel_vit.tar.gz -C $remote_dir && python3 -m pip install -U $(printf '%q' "$jax_tpu") && python3 -m pip install -e $remote_dir"
    ;;

  run)
    have_config=0 have_workdir=0
    for arg in "$@"; do
      case "$arg" in
        --config=*) have_config=1 ;;
        --workdir=*) have_workdir=1 ;;
        --coordinator_address=*|--num_processes=*|--process_id=*|--distributed=*)
          die "$arg: on a TPU pod every worker joins with --distributed=auto; drop it." ;;
      esac
    done
    (( have_config && have_workdir )) || die "run needs --config=CONFIG and --workdir=DIR (a gs:// bucket all workers see)."
    [[ "$compile_check" == 1 ]] && check_compiles "$@"
    main="python3 -m pixel_vit.main --distributed=auto$(printf ' %q' "$@")"
    # pipefail: the worker's exit status is python's, not tee's.
    run "${tpu_vm[@]}" ssh "$TPU_NAME" --worker=all "${location[@]}" \
      "--command=set -o pipefail; mkdir -p $remote_logs && cd $remote_dir && $main 2>&1 | tee -a $remote_logs/\$(hostname).log"
    ;;

  logs)
    local_dir=${1:-tpu_logs/$TPU_NAME}
    workers=${NUM_WORKERS:-}
    if [[ -z "$workers" ]]; then
      [[ "$dry_run" == 1 ]] && die "set NUM_WORKERS for a dry run of logs (a real run counts the workers with gcloud ... describe)."
      workers=$("${tpu_vm[@]}" describe "$TPU_NAME" "${location[@]}" --format='value(networkEndpoints.len())')
    fi
    [[ "$workers" =~ ^[1-9][0-9]*$ ]] || die "NUM_WORKERS=$workers must be a positive integer."
    run mkdir -p "$local_dir"
    for ((w = 0; w < workers; w++)); do
      # One worker at a time: every worker's log directory has the same name.
      run "${tpu_vm[@]}" scp --recurse "$TPU_NAME:pixel_vit_logs" "$local_dir/worker_$w" \
        "--worker=$w" "${location[@]}"
    done
    ;;

  delete)
    run "${tpu_vm[@]}" delete "$TPU_NAME" "${location[@]}" --quiet
    ;;

  *)
    die "unknown command '$action'; choose create | setup | run | logs | delete."
    ;;
esac
