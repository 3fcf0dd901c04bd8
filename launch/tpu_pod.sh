#!/usr/bin/env bash
# Launches engram_jax training on EVERY worker of a Cloud TPU VM (pod slice).
#
# A pod program must run on all workers at once: started on one host only, jax.distributed waits
# for the missing processes until its timeout (or deadlocks). This script therefore always uses
# `--worker=all`: to install the package into a venv on every worker, to check on every worker that
# the workdir and the data are reachable, then to start the trainer on every worker (detached, each
# worker logging into WORKDIR/logs/), and checks that each worker reported back after each step; a
# worker that did not is reported, with the command that stops the others.
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

Installs engram_jax into a venv on every worker of a Cloud TPU VM, checks on every worker that
the workdir and the data are reachable (python -m engram_jax.preflight), and starts
  PY -m engram_jax.train --distributed --config=... --workdir=... [overrides]
on all of them (gcloud compute tpus tpu-vm ssh NAME --worker=all). Each worker logs to
WORKDIR/logs/RUN_NAME.worker<N>.log (with a gs:// workdir: to ~/engram_jax_logs/ on the worker,
copied to the bucket every minute and at exit).

After a preemption (or any stop), run the SAME command again with --resume and the run's
--run_name: the workers are reinstalled (a recreated TPU VM is blank), the check also requires a
checkpoint in the workdir, and the trainer restores the latest checkpoint (model, tables and data
position) and appends to the same logs.

Required:
  --tpu=NAME               TPU VM (pod slice) name.
  --zone=ZONE              Its zone, e.g. us-central2-b.
  --config=PATH            Config file relative to the repository root (configs/*.py).
  --workdir=DIR            Run directory every worker reaches: a gs:// URL, or an absolute path
                           every worker sees (gcsfuse mount, NFS/Filestore share).
  --repo=GIT_URL           Repository every worker clones (default: this checkout's origin remote).

Options:
  --project=PROJECT        Google Cloud project (default: gcloud's configured project).
  --ref=REF                Git branch, tag or commit to check out (default: main).
  --remote_dir=DIR         Checkout directory on each worker, relative to home (default: engram_jax).
  --jax=SPEC               pip requirement for JAX on the workers (default: "jax[tpu]");
                           "none" keeps the JAX already installed.
  --venv=DIR               Virtual environment on each worker, relative to home, created if
                           missing (default: engram_jax_venv); needs python3-venv on the image.
  --python=PY              Use this interpreter on the workers instead of a venv (installs into
                           it; e.g. an image's own Python that allows pip installs).
  --ssh_flag=FLAG          Extra flag for every 'gcloud ... tpu-vm ssh', repeatable, e.g.
                           --ssh_flag=--internal-ip --ssh_flag=--tunnel-through-iap.
  --coordinator_port=PORT  Port of the jax.distributed coordinator on worker 0 (sets
                           config.mesh.coordinator_address=WORKER0_IP:PORT; default: JAX's own).
  --init_timeout=SECONDS   How long every process waits for all the others at start-up
                           (config.mesh.initialization_timeout).
  --num_workers=N          Worker count; default: read with 'gcloud ... tpu-vm describe'.
  --run_name=NAME          Names the log and pid files on the workers (default: a timestamp;
                           required with --resume).
  --skip_install           Do not install; the workers already have the checkout.
  --skip_check             Do not run the reachability check before starting.
  --resume                 Relaunch a stopped or preempted run (see above).
  --dry-run                Print the commands instead of running them.
  -h, --help               This help.

Everything after '--' is passed to the trainer, e.g. -- --config.num_train_steps=1000
EOF
}

# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

tpu="" zone="" project="" config="" workdir="" repo="" ref="main" remote_dir="engram_jax"
jax_spec="jax[tpu]" coordinator_port="" init_timeout="" num_workers="" run_name=""
venv="engram_jax_venv" python="" skip_install=0 skip_check=0 resume=0 dry_run=0
overrides=() ssh_flags=()

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
    --venv=*) venv="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --ssh_flag=*) ssh_flags+=("${1#*=}") ;;
    --skip_install) skip_install=1 ;;
    --skip_check) skip_check=1 ;;
    --resume) resume=1 ;;
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
[[ -n "$workdir" ]] || die_usage "--workdir=DIR is required (gs://BUCKET/PATH or /SHARED/PATH)"
[[ "$tpu" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die_usage "--tpu: got '$tpu'; expected a TPU name (lowercase letters, digits, '-')"
[[ "$zone" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
  die_usage "--zone: got '$zone'; expected a zone such as us-central2-b"
[[ "$config" != /* && "$config" == *.py ]] ||
  die_usage "--config: got '$config'; expected a .py path relative to the repository root"
[[ -f "$REPO_ROOT/$config" ]] ||
  die_usage "--config: '$config' does not exist in $REPO_ROOT (the workers check out the same repository)"
[[ "$workdir" == /?* || "$workdir" =~ ^gs://[a-z0-9][-_.a-z0-9]*[a-z0-9](/.*)?$ ]] ||
  die_usage "--workdir: got '$workdir'; expected gs://BUCKET/PATH or an absolute path every worker sees"
[[ "$workdir" != *[[:space:]\'\"\$\`]* ]] ||
  die_usage "--workdir: got '$workdir'; expected no spaces, quotes, '\$' or backquotes"
[[ "$venv" =~ ^[A-Za-z0-9._/-]+$ && "$venv" != /* ]] ||
  die_usage "--venv: got '$venv'; expected a relative path of letters, digits, '._/-'"
for flag in "${ssh_flags[@]}"; do
  [[ "$flag" == --?* ]] || die_usage "--ssh_flag: got '$flag'; expected a gcloud flag such as --internal-ip"
done
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
if ((resume)); then
  [[ -n "$run_name" ]] || die_usage "--resume needs the --run_name of the run to resume"
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
  printf '%s\0' gcloud compute tpus tpu-vm ssh "${gcloud_target[@]}" --worker=all \
    "${ssh_flags[@]}" "--command=$1"
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
if [[ -n "$python" ]]; then
  py="$(q "$python")"
  make_env=""
else
  py="\$HOME/$venv/bin/python"
  make_env="[ -x $py ] || python3 -m venv \$HOME/$venv || "
  make_env+="{ echo 'python3 -m venv failed: install python3-venv or pass --python'; exit 1; }; "
fi
install_remote="set -e; $worker_id; "
install_remote+="[ -d $dir/.git ] || git clone -q $(q "$repo") $dir; "
install_remote+="git -C $dir fetch -q origin $(q "$ref"); git -C $dir checkout -q --detach FETCH_HEAD; "
install_remote+="$make_env"
if [[ "$jax_spec" != "none" ]]; then
  install_remote+="$py -m pip install -q -U $(q "$jax_spec"); "
fi
install_remote+="$py -m pip install -q -e $dir; "
install_remote+="echo ENGRAM_JAX_INSTALLED worker=\$W"

config_args=("--config=$config" "--workdir=$workdir")
[[ -z "$coordinator_port" ]] ||
  config_args+=("--config.mesh.coordinator_address=$worker_ip0:$coordinator_port")
[[ -z "$init_timeout" ]] || config_args+=("--config.mesh.initialization_timeout=$init_timeout")
config_args+=("${overrides[@]}")
train_line="$py -m engram_jax.train --distributed $(printf '%q ' "${config_args[@]}")"
logs="\$HOME/engram_jax_logs"
pid_file="$logs/$run_name.pid"

# Each worker checks the workdir and data (and, resuming, that a checkpoint exists and that no
# trainer of this run still runs there) before anything starts.
check_remote="$worker_id; cd $dir && "
if ((resume)); then
  check_remote+="if [ -f $pid_file ] && kill -0 \$(cat $pid_file) 2>/dev/null; then "
  check_remote+="echo \"a trainer of $run_name still runs on worker \$W; stop it first\"; exit 1; fi; "
fi
check_remote+="$py -m engram_jax.preflight $(printf '%q ' "${config_args[@]}")"
((resume)) && check_remote+="--require_checkpoint "
check_remote+="&& echo ENGRAM_JAX_CHECKED worker=\$W"

# Logs live in the workdir: written there directly, or (gs://) copied there by the runner.
if [[ "$workdir" == gs://* ]]; then
  worker_log="$logs/$run_name.worker\$W.log"
  log_copy="${workdir%/}/logs/$run_name.worker\$W.log"
else
  worker_log="$(q "${workdir%/}")/logs/$run_name.worker\$W.log"
  log_copy="''"
fi
launch_remote="$worker_id; mkdir -p $logs; cd $dir && "
launch_remote+="{ nohup bash launch/_worker_run.sh $worker_log $log_copy -- ${train_line}"
launch_remote+="> /dev/null 2>&1 < /dev/null & "
launch_remote+="echo \$! > $pid_file; echo ENGRAM_JAX_STARTED worker=\$W pid=\$!; }"
stop_remote="kill \$(cat $pid_file)"

mapfile -d '' install_cmd < <(ssh_all "$install_remote")
mapfile -d '' check_cmd < <(ssh_all "$check_remote")
mapfile -d '' launch_cmd < <(ssh_all "$launch_remote")
mapfile -d '' stop_cmd < <(ssh_all "$stop_remote")

if ((dry_run)); then
  if ((!skip_install)); then
    echo "# install on every worker:"
    print_command "${install_cmd[@]}"
  fi
  if ((!skip_check)); then
    echo "# check the workdir and data path on every worker:"
    print_command "${check_cmd[@]}"
  fi
  echo "# start the trainer on every worker$( ((resume)) && echo " (resuming $run_name from its latest checkpoint)"):"
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

if ((!skip_check)); then
  echo "$SCRIPT_NAME: checking the workdir and data path on $num_workers workers ..."
  check_rc=0
  "${check_cmd[@]}" 2>&1 | tee "$output" || check_rc=$?
  missing="$(missing_workers ENGRAM_JAX_CHECKED)"
  if ((check_rc)) || [[ -n "$missing" ]]; then
    echo "$SCRIPT_NAME: error: the check failed (gcloud exit $check_rc) on workers: ${missing:-unknown}." >&2
    echo "Nothing was started. The ENGRAM_JAX_PREFLIGHT_FAILED lines above name the problem." >&2
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
echo "$SCRIPT_NAME: started on all $num_workers workers; logs: ${workdir%/}/logs/$run_name.worker<N>.log"
echo "After a preemption, rerun this command with --resume --run_name=$run_name."
echo "Stop with:"
print_command "${stop_cmd[@]}"
