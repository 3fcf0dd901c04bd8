#!/usr/bin/env bash
# Full-budget runs of engram_jax.experiments for docs/results.md (docs/results.md gives each
# experiment's wall time on an idle 2-core CPU machine with JOBS=2).
#
#   [JOBS=2] [EXPERIMENTS="iso_param gate_analysis allocation memory_variants residual_variants"] \
#     [ISO_STEPS=1200] [ISO_SEEDS=5] [ISO_UPDATES=200] [ALLOCATION_BUDGETS=1,3] [VARIANT_STEPS=400] [RESIDUAL_STEPS=300] \
#     experiments/run_all.sh [CORPUS] [SCRATCH]
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

run() {  # run NAME [--workdir_of=OTHER] FLAGS...: OTHER's workdir reuses its finished runs
  local name=$1; shift
  local workdir=$SCRATCH/$name
  if [[ ${1:-} == --workdir_of=* ]]; then workdir=$SCRATCH/${1#--workdir_of=}; shift; fi
  local start=$SECONDS
  echo "== $name $*"
  python -m "engram_jax.experiments.$name" --data_path="$CORPUS" --workdir="$workdir" \
    --jobs="$JOBS" "$@"
  mkdir -p "$DOCS/$name"
  # the plots summary.md shows (a shared workdir holds another experiment's too)
  cp "$workdir"/{results.json,summary.md} "$DOCS/$name/"
  grep -o '([a-z_]*\.png)' "$workdir/summary.md" | tr -d '()' | sort -u \
    | while read -r png; do cp "$workdir/$png" "$DOCS/$name/"; done
  echo "$name: $((SECONDS - start)) s wall, load average $(cut -d' ' -f1-3 /proc/loadavg)" \
    | tee -a "$DOCS/machine.txt"
}

# The deciding budget of iso_param (and gate_analysis, which analyses iso_param's Engram runs):
# 1200 steps of 4 x 128 tokens (the 614k tokens of the earlier 300 x 16 x 128 runs, in four times
# the steps) with tables sized for 200 updates per row (about three times the earlier runs'; at
# equal activated parameters more is not affordable here: the wider rows' projections take the
# dense FFN's width, which is 164 at 200 and 44 at 300, and 500 is infeasible at rho = 0.75); the
# learning rate scaled with the square root of the batch (3e-3 at 16 -> 1.5e-3 at 4). Only MoE and
# Engram + MoE: the paired comparison.
ENGRAM_FLAGS=(--steps="${ISO_STEPS:-1200}" --seeds="${ISO_SEEDS:-5}"
  --updates_per_row="${ISO_UPDATES:-200}" --evals=4 --set=batch_size=4 --set=learning_rate=0.0015)

# EXPERIMENTS chooses which experiments run (a subset keeps a corpus's run within its time budget).
for name in ${EXPERIMENTS:-iso_param gate_analysis allocation memory_variants residual_variants}; do
  case $name in
    iso_param) run iso_param "${ENGRAM_FLAGS[@]}" --variants=moe,engram ;;
    gate_analysis)  # trains nothing once iso_param ran: the same config and run names
      run gate_analysis --workdir_of=iso_param "${ENGRAM_FLAGS[@]}"
      # gate_analysis wrote its report into iso_param's workdir: rewrite iso_param's own (no training)
      [[ -f $SCRATCH/iso_param/runs/moe-s0/result.json ]] && run iso_param "${ENGRAM_FLAGS[@]}" --variants=moe,engram ;;
    allocation) run allocation --steps=120 --seeds=1 --budgets="${ALLOCATION_BUDGETS:-1,3}" --evals=4 \
      --rhos=1.0,0.9,0.75,0.5 ;;
    hyper_stability) run hyper_stability --steps=300 --seeds=1 --learning_rate=0.01 ;;
    # The variant comparisons at iso_param's step shape (4 x 128 tokens), 3 paired seeds: 400 steps
    # for the memories, 300 for the residuals (the 12-layer dense model at a high learning rate).
    memory_variants) run memory_variants --steps="${VARIANT_STEPS:-400}" --seeds=3 --evals=4 \
      --set=batch_size=4 --set=learning_rate=0.0015 ;;
    residual_variants) run residual_variants --steps="${RESIDUAL_STEPS:-300}" --seeds=3 \
      --learning_rate=0.01 --evals=4 --set=batch_size=4 ;;
    *) echo "EXPERIMENTS: unknown experiment '$name'" >&2; exit 2 ;;
  esac
done
python -m engram_jax.experiments.floors --data_path="$CORPUS" | tee -a "$DOCS/machine.txt"
