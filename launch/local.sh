#!/usr/bin/env bash
# N pixel_vit.main processes on this machine, joined through jax.distributed
# on 127.0.0.1: the multi-host code paths (per-process data shards,
# cross-process collectives over gloo, collective orbax checkpoints, process-0
# logging) without a cluster. Every process gets its own CPU devices.
#
# Usage:
#   launch/local.sh [--num_processes=2] [--devices_per_process=2] [--port=PORT]
#                   [--log_dir=DIR] [--dry_run] --config=CONFIG --workdir=DIR [MAIN FLAGS...]
#
# Every other flag (--config, --workdir, --config.key=value, ...) is passed to
# each `python -m pixel_vit.main` unchanged; the launcher adds
# --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I.
# Process I logs to LOG_DIR/process_I.log (default LOG_DIR: WORKDIR/logs).
# The launcher waits for all. If one fails it stops the others at once (a
# survivor would otherwise wait in a collective until JAX's heartbeat timeout);
# on Ctrl-C (or TERM) it sends every process TERM, which JAX treats as a
# preemption (the trainers checkpoint at their next step and exit), and KILLs
# what still runs after STOP_GRACE seconds. Either way it exits non-zero.
#
# Environment (flags win): NUM_PROCESSES, DEVICES_PER_PROCESS, PORT, LOG_DIR,
# DRY_RUN=1 (print the commands instead of running them), PYTHON (python3),
# STOP_GRACE (seconds the processes get to checkpoint after Ctrl-C; 30).
# The coordinator binds to 127.0.0.1 only; PORT defaults to a free one.
set -euo pipefail

num_processes=${NUM_PROCESSES:-2}
devices_per_process=${DEVICES_PER_PROCESS:-2}
port=${PORT:-}
log_dir=${LOG_DIR:-}
dry_run=${DRY_RUN:-0}
python=${PYTHON:-python3}
stop_grace=${STOP_GRACE:-30}
main_args=()
workdir=""
have_config=0

die() { echo "local.sh: $*" >&2; exit 2; }

for arg in "$@"; do
  case "$arg" in
    --num_processes=*) num_processes=${arg#*=} ;;
    --devices_per_process=*) devices_per_process=${arg#*=} ;;
    --port=*) port=${arg#*=} ;;
    --log_dir=*) log_dir=${arg#*=} ;;
    --dry_run) dry_run=1 ;;
    --process_id=*|--coordinator_address=*|--distributed=*)
      die "$arg is set by the launcher for each process; drop it." ;;
    --) ;;
    *)
      [[ "$arg" == --workdir=* ]] && workdir=${arg#*=}
      [[ "$arg" == --config=* ]] && have_config=1
      main_args+=("$arg") ;;
  esac
done

is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
is_count "$num_processes" || die "--num_processes=$num_processes must be a positive integer."
is_count "$devices_per_process" ||
  die "--devices_per_process=$devices_per_process must be a positive integer."
[[ "$stop_grace" =~ ^[0-9]+$ ]] || die "STOP_GRACE=$stop_grace must be a whole number of seconds."
[[ -n "$workdir" && "$have_config" == 1 ]] ||
  die "pass --config=CONFIG and --workdir=DIR (the flags pixel_vit.main needs)."
log_dir=${log_dir:-$workdir/logs}
if [[ -z "$port" ]]; then  # free now; taken by the coordinator moments later
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
elif ! [[ "$port" =~ ^[0-9]+$ ]] || (( port < 1 || port > 65535 )); then
  die "--port=$port must be a port number in 1..65535."
fi

# One process's command line, as an array.
command_for() {
  cmd=(env JAX_PLATFORMS=cpu "JAX_NUM_CPU_DEVICES=$devices_per_process"
       "$python" -m pixel_vit.main "${main_args[@]}"
       "--coordinator_address=127.0.0.1:$port" "--num_processes=$num_processes"
       "--process_id=$1")
}

if [[ "$dry_run" == 1 ]]; then
  for ((i = 0; i < num_processes; i++)); do
    command_for "$i"
    printf '%q ' "${cmd[@]}"
    printf '> %q 2>&1 &\n' "$log_dir/process_$i.log"
  done
  echo wait
  exit 0
fi

mkdir -p "$log_dir"
pids=()
# stop_all SECONDS: TERM every process still running, KILL what is left after
# SECONDS. JAX takes TERM as a preemption notice: a trainer that reaches its
# next step saves a checkpoint there and exits (pixel_vit/checkpoint.py).
stop_all() {
  local pid alive deadline=$((SECONDS + $1))
  for pid in "${pids[@]}"; do
    [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null || true
  done
  while (( SECONDS < deadline )); do
    alive=0
    for pid in "${pids[@]}"; do
      [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && alive=1
    done
    (( alive )) || return 0
    sleep 0.2
  done
  for pid in "${pids[@]}"; do
    [[ -n "$pid" ]] && kill -KILL "$pid" 2>/dev/null || true
  done
}
trap 'echo "local.sh: interrupted; stopping all processes (up to ${stop_grace}s for a checkpoint)" >&2
      stop_all "$stop_grace"; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  command_for "$i"
  "${cmd[@]}" > "$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
  echo "local.sh: process $i (pid $!, $devices_per_process CPU devices) -> $log_dir/process_$i.log"
done

# Poll rather than wait in turn: the first failure must stop the rest at once.
status=0
remaining=$num_processes
while (( remaining > 0 )); do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ -z "$pid" ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    rc=0
    wait "$pid" || rc=$?
    pids[$i]=""
    remaining=$((remaining - 1))
    if (( rc != 0 )); then
      echo "local.sh: process $i exited with status $rc; stopping the others." >&2
      echo "---- last lines of $log_dir/process_$i.log:" >&2
      tail -n 20 "$log_dir/process_$i.log" >&2 || true
      status=$rc
      # The others cannot finish a collective without it: no grace needed.
      stop_all 2
      break 2
    fi
  done
  (( remaining > 0 )) && sleep 0.5
done
trap - INT TERM
(( status == 0 )) && echo "local.sh: all $num_processes processes finished; logs in $log_dir"
exit "$status"
