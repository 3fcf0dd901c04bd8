#!/usr/bin/env bash
# Runs N trainer processes on this machine, joined by jax.distributed over loopback with CPU
# collectives (gloo): a pod-free rehearsal of a multi-host run (same code path as a TPU pod:
# per-process data shards, global arrays, one shared checkpoint directory).
#
# Usage: see `launch/local_multiprocess.sh --help`.

set -euo pipefail

if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  echo "$0: error: bash >= 5.1 required (wait -n -p); this is bash $BASH_VERSION" >&2
  exit 1
fi

readonly SCRIPT_NAME="launch/local_multiprocess.sh"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --num_processes=N --config=configs/NAME.py --workdir=DIR [options]
                              [-- TRAINER_OVERRIDES...]

Starts processes 0..N-1 of
  python -m engram_jax.train --config=... --workdir=... --num_processes=N --process_id=i
      --config.mesh.coordinator_address=localhost:PORT
on CPU, waits for all of them and reports each one's exit status. If one fails, the others are
stopped (they would otherwise wait for it in every collective).

Required:
  --num_processes=N          Processes to start (>= 1).
  --config=PATH              Config file (e.g. configs/tiny.py).
  --workdir=DIR              Run directory shared by all processes.

Options:
  --port=PORT                Coordinator port on localhost (default: 12355).
  --devices_per_process=K    Simulated CPU devices per process (default: 1).
  --init_timeout=SECONDS     config.mesh.initialization_timeout (default: the config's).
  --python=PY                Interpreter (default: \$PYTHON, else python3).
  --log_dir=DIR              One log per process: process_<i>.log (default: DIR/launch_logs).
  --dry-run                  Print the commands instead of running them.
  -h, --help                 This help.

Everything after '--' is passed to every process, e.g. -- --config.num_train_steps=20
EOF
}

# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

num_processes="" config="" workdir="" port="12355" devices_per_process="1" init_timeout=""
python="${PYTHON:-python3}" log_dir="" dry_run=0
overrides=()

while (($#)); do
  case "$1" in
    --num_processes=*) num_processes="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --devices_per_process=*) devices_per_process="${1#*=}" ;;
    --init_timeout=*) init_timeout="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --dry-run | --dry_run) dry_run=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      overrides=("$@")
      break
      ;;
    *) die_usage "unknown argument '$1' (trainer overrides go after '--')" ;;
  esac
  shift
done

[[ -n "$num_processes" ]] || die_usage "--num_processes=N is required"
[[ -n "$config" ]] || die_usage "--config=PATH is required (e.g. configs/tiny.py)"
[[ -n "$workdir" ]] || die_usage "--workdir=DIR is required"
require_int --num_processes "$num_processes" 1 256
require_int --port "$port" 1 65535
require_int --devices_per_process "$devices_per_process" 1 1024
require_int --init_timeout "$init_timeout" 1 86400
[[ -f "${config%%:*}" ]] || die_usage "--config: '$config' is not a file"
[[ "$workdir" != *://* ]] ||
  die_usage "--workdir: got '$workdir'; expected a local directory (this runs on one machine)"
for override in "${overrides[@]}"; do
  [[ "$override" == --?* ]] ||
    die_usage "trainer override '$override': expected --flag=value (e.g. --config.num_train_steps=20)"
  case "$override" in
    --config=* | --workdir=* | --num_processes=* | --process_id=*)
      die_usage "trainer override '$override': set by this script; use its own options" ;;
  esac
done
[[ -n "$log_dir" ]] || log_dir="$workdir/launch_logs"

xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices_per_process"

# process_command I: the full command line of process I (env settings first).
process_command() {
  local cmd=(env JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
    "XLA_FLAGS=$xla_flags"
    "$python" -m engram_jax.train "--config=$config" "--workdir=$workdir"
    "--num_processes=$num_processes" "--process_id=$1"
    "--config.mesh.coordinator_address=localhost:$port")
  [[ -z "$init_timeout" ]] || cmd+=("--config.mesh.initialization_timeout=$init_timeout")
  cmd+=("${overrides[@]}")
  printf '%s\0' "${cmd[@]}"
}

if ((dry_run)); then
  echo "# $num_processes processes, logs in $log_dir/process_<i>.log"
  for ((i = 0; i < num_processes; i++)); do
    mapfile -d '' cmd < <(process_command "$i")
    print_command "${cmd[@]}"
  done
  exit 0
fi

mkdir -p "$log_dir"
pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  mapfile -d '' cmd < <(process_command "$i")
  "${cmd[@]}" >"$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
  echo "$SCRIPT_NAME: process $i started (pid $!), log $log_dir/process_$i.log"
done

# Wait in completion order; the first failure stops the rest.
failed=()
stopping=0
remaining=("${pids[@]}")
while ((${#remaining[@]})); do
  finished_pid=""
  rc=0
  wait -n -p finished_pid "${remaining[@]}" || rc=$?
  for ((i = 0; i < num_processes; i++)); do
    [[ "${pids[i]}" == "$finished_pid" ]] && break
  done
  next=()
  for pid in "${remaining[@]}"; do
    [[ "$pid" == "$finished_pid" ]] || next+=("$pid")
  done
  remaining=("${next[@]}")
  if ((rc && stopping)); then
    echo "$SCRIPT_NAME: process $i stopped (status $rc)" >&2
  elif ((rc)); then
    failed+=("$i")
    echo "$SCRIPT_NAME: process $i exited with status $rc; last lines of its log:" >&2
    tail -n 20 "$log_dir/process_$i.log" >&2 || true
    if ((${#remaining[@]})); then
      echo "$SCRIPT_NAME: stopping the other processes" >&2
      stopping=1
      stop_all
    fi
  else
    echo "$SCRIPT_NAME: process $i finished"
  fi
done

if ((${#failed[@]})); then
  echo "$SCRIPT_NAME: FAILED: process(es) ${failed[*]} of $num_processes failed; logs in $log_dir" >&2
  exit 1
fi
echo "$SCRIPT_NAME: all $num_processes processes finished; logs in $log_dir"
