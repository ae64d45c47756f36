#!/usr/bin/env bash
# A study on SMAX 3s5z (FP3O paper Table 2's heterogeneous hard map, 8 agents): FP3O, MAPPO and HAPPO x partial and
# none sharing x seeds 1-3, 1.5M steps per run (FULL=1 adds full sharing). Table 2 runs 5M steps on 3s5z (table E.5);
# 1.5M is the budget by which FP3O won most SMAX 3s5z evaluation games under partial sharing in earlier runs on this
# machine, so it can show which algorithm gets there and which does not, at about half an hour of one core per run
# (~800 steps/s with a second run beside it). Rows at 0.5M and 1M show the speed of learning on the way.
# Compute-matched baseline: MAPPO with --update-epochs 10 ("mappo-e10") under partial sharing, as many optimiser steps
# per sample as FP3O's two steps of 5 epochs.
#
#   bash benchmark/recipes/smax_3s5z_study.sh               21 runs, two at a time (~5.5 h on 2 cores)
#   FULL=1 bash benchmark/recipes/smax_3s5z_study.sh        30 runs
#   bash benchmark/recipes/smax_3s5z_study.sh --workers 1   one run at a time (other flags go to benchmark/sweep.py)
#
# Runs finished before are skipped (those in the sweep folder and those committed in the results folder's runs.csv), so
# the study can be stopped and continued, on another machine too; the report covers the finished runs and marks the
# missing seeds. REPORT_ONLY=1 rewrites the report from the runs finished so far (while others still run).
# Output: benchmark/results/smax_3s5z/ (table.md with IQM, 95% CIs and probability of improvement, curves against
# steps, seconds and gradient steps, runs.csv, scalars.csv.gz).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=${PYTHON:-python}
OUT=${OUT:-benchmark/sweeps/smax_3s5z}
STEPS=${STEPS:-1500000}
SHARING=(partial none)
[ "${FULL:-0}" = 1 ] && SHARING=(partial none full)
RESULTS=benchmark/results/smax_3s5z
# the runs committed in $RESULTS count as finished, so the study continues on a new machine without its sweep folder
EARLIER=()
[ -f "$RESULTS/runs.csv" ] && EARLIER=(--finished-in "$RESULTS/runs.csv")
STATUS=0
[ "${REPORT_ONLY:-0}" = 1 ] || $PY benchmark/sweep.py --out "$OUT" --scripts fp3o_smac.py mappo_smac.py happo_smac.py --tasks 3s5z \
  --sharing "${SHARING[@]}" --seeds 1 2 3 --args="--total-timesteps $STEPS --eval-interval 20" "${EARLIER[@]}" "$@" || STATUS=1
[ "${REPORT_ONLY:-0}" = 1 ] || $PY benchmark/sweep.py --out "$OUT" --scripts "mappo-e10=mappo_smac.py --update-epochs 10" \
  --tasks 3s5z --sharing partial --seeds 1 2 3 --args="--total-timesteps $STEPS --eval-interval 20" "${EARLIER[@]}" "$@" \
  || STATUS=1
case " $* " in *" --dry-run "* | *" --slurm "*) exit $STATUS ;; esac
[ -f "$RESULTS/runs.csv" ] && EARLIER=(--previous "$RESULTS")
mkdir -p "$OUT"
$PY benchmark/report.py "$OUT" "${EARLIER[@]}" --out-dir "$RESULTS" --at 500000 1000000 \
  --plot-tags eval/win_rate eval/episodic_return \
  --csv-tags '^eval/' '^charts/(episodic_return|win_rate|gradient_steps|SPS)$' '^losses/(entropy|approx_kl)$' \
  --title "SMAX 3s5z study: \`bash benchmark/recipes/smax_3s5z_study.sh\` ($STEPS steps per run, evaluation every 64,000 steps, 32 greedy episodes)"
gzip -9f "$RESULTS/scalars.csv"
exit $STATUS
