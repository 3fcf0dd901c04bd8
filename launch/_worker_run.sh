#!/usr/bin/env bash
# Runs one pod worker's trainer (started by launch/tpu_pod.sh on every worker; not run by hand).
#
# Usage: launch/_worker_run.sh LOG COPY_TO -- COMMAND...
#   LOG      the worker's log file, appended to (a resumed run continues the same log).
#   COPY_TO  "" when LOG already lies in the workdir; else a gs:// object the log is copied to
#            every $ENGRAM_JAX_LOG_COPY_SECONDS seconds (default 60) and when the trainer exits.
# SIGTERM/SIGINT are passed on to the trainer (which then saves and exits); the exit status is the
# trainer's, also written as the log's last line.

set -uo pipefail

log="$1"
copy_to="$2"
[[ "$3" == "--" ]] || {
  echo "usage: $0 LOG COPY_TO -- COMMAND..." >&2
  exit 2
}
shift 3
mkdir -p "$(dirname "$log")"

"$@" >>"$log" 2>&1 </dev/null &
trainer=$!
trap 'kill -TERM "$trainer" 2>/dev/null' TERM INT

upload() {
  [[ -z "$copy_to" ]] && return 0
  gcloud storage cp --quiet "$log" "$copy_to" >/dev/null 2>&1 ||
    echo "$(date -u +%FT%TZ) could not copy this log to $copy_to" >>"$log"
}

while kill -0 "$trainer" 2>/dev/null; do
  sleep "${ENGRAM_JAX_LOG_COPY_SECONDS:-60}" &
  wait $! || true
  upload
done
wait "$trainer"
status=$?
echo "$(date -u +%FT%TZ) trainer exited with status $status" >>"$log"
upload
exit "$status"
