#!/usr/bin/env bash
# Full-budget runs of engram_jax.experiments for docs/results.md (about 75 minutes per corpus on an
# idle 2-core CPU machine with JOBS=2; see docs/results.md for the per-experiment estimates).
#
#   [JOBS=2] [EXPERIMENTS="iso_param allocation hyper_stability gate_analysis"] [ISO_SEEDS=3] \
#     [ALLOCATION_BUDGETS=1,3] experiments/run_all.sh [CORPUS] [SCRATCH]
#
# CORPUS: a text corpus (default: the bundled slice of the Python docs); SCRATCH: where the runs'
# checkpoints go (default /tmp/engram_jax_experiments/<corpus name>; a few GB). Rerunning resumes:
# finished runs are skipped, interrupted ones continue from their checkpoints. results.json,
# summary.md and the PNGs of each experiment are copied to docs/results/<corpus name>/<experiment>/,
# with the wall time and the machine in docs/results/<corpus name>/machine.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

CORPUS=${1:-$(python -c "from engram_jax.data import bundled_corpus_path; print(bundled_corpus_path())")}
NAME=$(basename "$CORPUS"); NAME=${NAME%.gz}; NAME=${NAME%.txt}; NAME=${NAME%.jsonl}; NAME=${NAME%.parquet}
SCRATCH=${2:-/tmp/engram_jax_experiments/$NAME}
JOBS=${JOBS:-2}
DOCS=docs/results/$NAME
mkdir -p "$SCRATCH" "$DOCS"

{  # appended: a resumed or partial set keeps the lines of the earlier invocations
  echo "corpus: $CORPUS"
  echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "started: $(date -u +%FT%TZ), load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "jax: $(python -c 'import jax; print(jax.__version__, jax.devices()[0].platform)')"
} >> "$DOCS/machine.txt"

run() {
  local name=$1; shift
  local start=$SECONDS
  echo "== $name $*"
  python -m "engram_jax.experiments.$name" --data_path="$CORPUS" --workdir="$SCRATCH/$name" \
    --jobs="$JOBS" "$@"
  mkdir -p "$DOCS/$name"
  cp "$SCRATCH/$name"/{results.json,summary.md} "$SCRATCH/$name"/*.png "$DOCS/$name/"
  echo "$name: $((SECONDS - start)) s wall, load average $(cut -d' ' -f1-3 /proc/loadavg)" \
    | tee -a "$DOCS/machine.txt"
}

# EXPERIMENTS chooses which experiments run (a subset keeps a corpus's run within its time budget).
for name in ${EXPERIMENTS:-iso_param allocation hyper_stability gate_analysis}; do
  case $name in
    iso_param) run iso_param --steps=300 --seeds="${ISO_SEEDS:-3}" ;;
    allocation) run allocation --steps=120 --seeds=1 --budgets="${ALLOCATION_BUDGETS:-1,3}" --evals=4 ;;
    hyper_stability) run hyper_stability --steps=300 --seeds=1 --learning_rate=0.01 ;;
    residual_variants) run residual_variants --steps=300 --seeds=3 --learning_rate=0.01 ;;
    gate_analysis) run gate_analysis --steps=300 --seeds=1 ;;
    *) echo "EXPERIMENTS: unknown experiment '$name'" >&2; exit 2 ;;
  esac
done
python -m engram_jax.experiments.floors --data_path="$CORPUS" | tee -a "$DOCS/machine.txt"
