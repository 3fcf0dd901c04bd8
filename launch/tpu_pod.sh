#!/usr/bin/env bash
# Launches engram_jax training on EVERY worker of a Cloud TPU VM (pod slice).
#
# A pod program must run on all workers at once: started on one host only, jax.distributed waits
# for the missing processes until its timeout (or deadlocks). This script therefore always uses
# `--worker=all`, first to install the package on every worker, then to start the trainer on every
# worker (detached, logging to ~/engram_jax_logs/), and checks that each worker reported back; a
# worker that did not is reported as a partial launch, with the command that stops the others.
#
# Usage: see `launch/tpu_pod.sh --help`.

set -euo pipefail

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "$0: error: bash >= 4.4 required (mapfile -d); this is bash $BASH_VERSION" >&2
  exit 1
fi

readonly SCRIPT_NAME="launch/tpu_pod.sh"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly METADATA_URL="http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"

usage() {
  cat <<EOF
Usage: $SCRIPT_NAME --tpu=NAME --zone=ZONE --config=configs/NAME.py --workdir=/SHARED/PATH
                    --repo=GIT_URL [options] [-- TRAINER_OVERRIDES...]

Installs engram_jax on every worker of a Cloud TPU VM and starts
  python3 -m engram_jax.train --config=... --workdir=... [overrides]
on all of them (gcloud compute tpus tpu-vm ssh NAME --worker=all).

Required:
  --tpu=NAME               TPU VM (pod slice) name.
  --zone=ZONE              Its zone, e.g. us-central2-b.
  --config=PATH            Config file relative to the repository root (configs/*.py).
  --workdir=/SHARED/PATH   Run directory every worker sees at the same absolute path, e.g. a
                           bucket mounted with gcsfuse or an NFS/Filestore share (the trainer
                           uses POSIX file I/O for metrics and the tokenizer).
  --repo=GIT_URL           Repository every worker clones (default: this checkout's origin remote).

Options:
  --project=PROJECT        Google Cloud project (default: gcloud's configured project).
  --ref=REF                Git branch, tag or commit to check out (default: main).
  --remote_dir=DIR         Checkout directory on each worker, relative to home (default: engram_jax).
  --jax=SPEC               pip requirement for JAX on the workers (default: "jax[tpu]");
                           "none" keeps the JAX already installed.
  --coordinator_port=PORT  Port of the jax.distributed coordinator on worker 0 (sets
                           config.mesh.coordinator_address=WORKER0_IP:PORT; default: JAX's own).
  --init_timeout=SECONDS   How long every process waits for all the others at start-up
                           (config.mesh.initialization_timeout).
  --num_workers=N          Worker count; default: read with 'gcloud ... tpu-vm describe'.
  --run_name=NAME          Names the log and pid files on the workers (default: a timestamp).
  --skip_install           Do not install; the workers already have the checkout.
  --dry-run                Print the commands instead of running them.
  -h, --help               This help.

Everything after '--' is passed to the trainer, e.g. -- --config.num_train_steps=1000
EOF
}

# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

tpu="" zone="" project="" config="" workdir="" repo="" ref="main" remote_dir="engram_jax"
jax_spec="jax[tpu]" coordinator_port="" init_timeout="" num_workers="" run_name=""
skip_install=0 dry_run=0
overrides=()

while (($#)); do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --repo=*) repo="${1#*=}" ;;
    --ref=*) ref="${1#*=}" ;;
    --remote_dir=*) remote_dir="${1#*=}" ;;
    --jax=*) jax_spec="${1#*=}" ;;
    --coordinator_port=*) coordinator_port="${1#*=}" ;;
    --init_timeout=*) init_timeout="${1#*=}" ;;
    --num_workers=*) num_workers="${1#*=}" ;;
    --run_name=*) run_name="${1#*=}" ;;
    --skip_install) skip_install=1 ;;
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

# ------------------------------------------------------------------------------------ validation
[[ -n "$tpu" ]] || die_usage "--tpu=NAME is required"
[[ -n "$zone" ]] || die_usage "--zone=ZONE is required"
[[ -n "$config" ]] || die_usage "--config=PATH is required (e.g. configs/tiny.py)"
[[ -n "$workdir" ]] || die_usage "--workdir=/SHARED/PATH is required"
[[ "$tpu" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die_usage "--tpu: got '$tpu'; expected a TPU name (lowercase letters, digits, '-')"
[[ "$zone" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
  die_usage "--zone: got '$zone'; expected a zone such as us-central2-b"
[[ "$config" != /* && "$config" == *.py ]] ||
  die_usage "--config: got '$config'; expected a .py path relative to the repository root"
[[ -f "$REPO_ROOT/$config" ]] ||
  die_usage "--config: '$config' does not exist in $REPO_ROOT (the workers check out the same repository)"
[[ "$workdir" == /?* ]] ||
  die_usage "--workdir: got '$workdir'; expected an absolute path mounted on every worker (e.g. gcsfuse)"
[[ "$remote_dir" =~ ^[A-Za-z0-9._/-]+$ && "$remote_dir" != /* ]] ||
  die_usage "--remote_dir: got '$remote_dir'; expected a relative path of letters, digits, '._/-'"
require_int --coordinator_port "$coordinator_port" 1 65535
require_int --init_timeout "$init_timeout" 1 86400
require_int --num_workers "$num_workers" 1 4096
for override in "${overrides[@]}"; do
  [[ "$override" == --?* ]] ||
    die_usage "trainer override '$override': expected --flag=value (e.g. --config.num_train_steps=100)"
  case "$override" in
    --config=* | --workdir=* | --num_processes=* | --process_id=*)
      die_usage "trainer override '$override': set by this script; use its own options" ;;
  esac
done
if [[ -z "$repo" ]]; then
  repo="$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null || true)"
  [[ -n "$repo" ]] || die_usage "--repo=GIT_URL is required (this checkout has no 'origin' remote)"
fi
[[ -n "$run_name" ]] || run_name="run-$(date +%Y%m%d-%H%M%S)"
[[ "$run_name" =~ ^[A-Za-z0-9._-]+$ ]] ||
  die_usage "--run_name: got '$run_name'; expected letters, digits, '._-'"
if ((!dry_run)) && ! command -v gcloud >/dev/null 2>&1; then
  echo "$SCRIPT_NAME: error: gcloud not found on PATH (install the Google Cloud CLI)" >&2
  exit 1
fi

# ------------------------------------------------------------------------------------ commands
gcloud_target=("$tpu" "--zone=$zone")
[[ -z "$project" ]] || gcloud_target+=("--project=$project")
describe_cmd=(gcloud compute tpus tpu-vm describe "${gcloud_target[@]}"
  "--format=value(networkEndpoints[].ipAddress)")

ssh_all() { # ssh_all REMOTE_COMMAND
  printf '%s\0' gcloud compute tpus tpu-vm ssh "${gcloud_target[@]}" --worker=all "--command=$1"
}

q() { printf '%q' "$1"; }

worker_ip0="WORKER0_IP"
if [[ -n "$coordinator_port" || -z "$num_workers" ]]; then
  if ((dry_run)); then
    echo "# worker IPs (worker 0 is the coordinator; their count is the worker count):"
    print_command "${describe_cmd[@]}"
  else
    ips="$("${describe_cmd[@]}")" || {
      echo "$SCRIPT_NAME: error: could not describe TPU '$tpu' in zone '$zone'" >&2
      exit 1
    }
    read -r -a ip_list <<<"${ips//[;,]/ }"
    ((${#ip_list[@]})) || {
      echo "$SCRIPT_NAME: error: TPU '$tpu' reports no network endpoints" >&2
      exit 1
    }
    worker_ip0="${ip_list[0]}"
    if [[ -n "$num_workers" && "$num_workers" != "${#ip_list[@]}" ]]; then
      die_usage "--num_workers=$num_workers but TPU '$tpu' has ${#ip_list[@]} workers"
    fi
    num_workers="${#ip_list[@]}"
  fi
fi

worker_id="W=\$(curl -sf -H Metadata-Flavor:Google $METADATA_URL || echo unknown)"
dir="\$HOME/$remote_dir"
install_remote="set -e; $worker_id; "
install_remote+="[ -d $dir/.git ] || git clone -q $(q "$repo") $dir; "
install_remote+="git -C $dir fetch -q origin $(q "$ref"); git -C $dir checkout -q --detach FETCH_HEAD; "
if [[ "$jax_spec" != "none" ]]; then
  install_remote+="python3 -m pip install -q -U $(q "$jax_spec"); "
fi
install_remote+="python3 -m pip install -q -e $dir; "
install_remote+="echo ENGRAM_JAX_INSTALLED worker=\$W"

train_args=(python3 -m engram_jax.train --distributed "--config=$config" "--workdir=$workdir")
[[ -z "$coordinator_port" ]] ||
  train_args+=("--config.mesh.coordinator_address=$worker_ip0:$coordinator_port")
[[ -z "$init_timeout" ]] || train_args+=("--config.mesh.initialization_timeout=$init_timeout")
train_args+=("${overrides[@]}")
train_line="$(printf '%q ' "${train_args[@]}")"
logs="\$HOME/engram_jax_logs"
launch_remote="$worker_id; mkdir -p $logs; cd $dir && "
launch_remote+="{ nohup ${train_line}> $logs/$run_name.worker\$W.log 2>&1 < /dev/null & "
launch_remote+="echo \$! > $logs/$run_name.pid; echo ENGRAM_JAX_STARTED worker=\$W pid=\$!; }"
stop_remote="kill \$(cat $logs/$run_name.pid)"

mapfile -d '' install_cmd < <(ssh_all "$install_remote")
mapfile -d '' launch_cmd < <(ssh_all "$launch_remote")
mapfile -d '' stop_cmd < <(ssh_all "$stop_remote")

if ((dry_run)); then
  if ((!skip_install)); then
    echo "# install on every worker:"
    print_command "${install_cmd[@]}"
  fi
  echo "# start the trainer on every worker:"
  print_command "${launch_cmd[@]}"
  echo "# stop it on every worker:"
  print_command "${stop_cmd[@]}"
  exit 0
fi

# ------------------------------------------------------------------------------------ run
output="$(mktemp)"
trap 'rm -f "$output"' EXIT

# Lists the workers in [0, num_workers) whose marker line is missing from $output.
missing_workers() { # missing_workers MARKER
  local worker absent=()
  for ((worker = 0; worker < num_workers; worker++)); do
    grep -Eq "$1 worker=$worker( |\$)" "$output" || absent+=("$worker")
  done
  echo "${absent[*]}"
}

if ((!skip_install)); then
  echo "$SCRIPT_NAME: installing $repo@$ref on $num_workers workers of $tpu ..."
  install_rc=0
  "${install_cmd[@]}" 2>&1 | tee "$output" || install_rc=$?
  missing="$(missing_workers ENGRAM_JAX_INSTALLED)"
  if ((install_rc)) || [[ -n "$missing" ]]; then
    echo "$SCRIPT_NAME: error: install failed (gcloud exit $install_rc) on workers: ${missing:-unknown}." >&2
    echo "Nothing was started. Fix those workers and rerun." >&2
    exit 1
  fi
fi

echo "$SCRIPT_NAME: starting the trainer on all $num_workers workers of $tpu ..."
launch_rc=0
"${launch_cmd[@]}" 2>&1 | tee "$output" || launch_rc=$?
missing="$(missing_workers ENGRAM_JAX_STARTED)"
if ((launch_rc)) || [[ -n "$missing" ]]; then
  {
    echo "$SCRIPT_NAME: PARTIAL LAUNCH: gcloud exit $launch_rc; workers that did not start: ${missing:-unknown}."
    echo "The started workers wait in jax.distributed.initialize for the missing ones (up to"
    echo "config.mesh.initialization_timeout seconds) and then fail. Stop them now with:"
    print_command "${stop_cmd[@]}"
  } >&2
  exit 1
fi
echo "$SCRIPT_NAME: started on all $num_workers workers; logs: ~/engram_jax_logs/$run_name.worker<N>.log"
echo "Stop with:"
print_command "${stop_cmd[@]}"
