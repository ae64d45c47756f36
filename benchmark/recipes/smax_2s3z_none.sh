#!/usr/bin/env bash
# How many steps SMAX 2s3z needs without parameter sharing: FP3O, MAPPO and HAPPO x --sharing none x seeds 1-3, 3M
# steps per run (A2PO=1 adds A2PO). With full or partial sharing the same scripts win most evaluation games by 640k
# steps (the quick SMAX recipe, `fp3o_table2_smac.sh --quick`); without sharing each agent's networks see a fifth of
# the samples, and the seed-1 runs of FP3O and MAPPO showed a plateau of ~2M steps. 3M steps is ~17 minutes of one
# core per run with a second run beside it (~3,000 steps/s).
#
#   bash benchmark/recipes/smax_2s3z_none.sh               9 runs, two at a time (~1.3 h on 2 cores)
#   A2PO=1 bash benchmark/recipes/smax_2s3z_none.sh        12 runs
#   SHARING="none full partial" bash ...                   the same budget with sharing too (27 runs)
#
# Runs finished before are skipped (in the sweep folder, or committed in the results folder's runs.csv), so the study
# can be stopped and continued on another machine. REPORT_ONLY=1 rewrites the report from the runs finished so far.
# Output: benchmark/results/smax_2s3z_none/ (table.md with the win rate at each budget and the steps to the first
# evaluation at >= 80% wins, curves, runs.csv, scalars.csv.gz).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=${PYTHON:-python}
OUT=${OUT:-benchmark/sweeps/smax_2s3z_none}
STEPS=${STEPS:-3000000}
SCRIPTS=(fp3o_smac.py mappo_smac.py happo_smac.py)
read -r -a SHARING <<< "${SHARING:-none}"
[ "${A2PO:-0}" = 1 ] && SCRIPTS+=(a2po_smac.py)
RESULTS=benchmark/results/smax_2s3z_none
EARLIER=()
[ -f "$RESULTS/runs.csv" ] && EARLIER=(--finished-in "$RESULTS/runs.csv")
STATUS=0
[ "${REPORT_ONLY:-0}" = 1 ] || $PY benchmark/sweep.py --out "$OUT" --scripts "${SCRIPTS[@]}" --tasks 2s3z --sharing "${SHARING[@]}" \
  --seeds 1 2 3 --args="--total-timesteps $STEPS --eval-interval 25 --save-model" "${EARLIER[@]}" "$@" || STATUS=1
case " $* " in *" --dry-run "* | *" --slurm "*) exit $STATUS ;; esac
[ -f "$RESULTS/runs.csv" ] && EARLIER=(--previous "$RESULTS")
mkdir -p "$OUT"
$PY benchmark/report.py "$OUT" "${EARLIER[@]}" --out-dir "$RESULTS" --at 500000 1000000 1500000 2000000 2500000 \
  --reach 0.8 --plot-tags eval/win_rate eval/episodic_return losses/entropy \
  --csv-tags '^eval/' '^charts/(episodic_return|win_rate|gradient_steps|SPS)$' '^losses/(entropy|approx_kl|value_loss)$' \
    '^fp3o/condition_holds$' \
  --title "SMAX 2s3z without sharing: \`bash benchmark/recipes/smax_2s3z_none.sh\` ($STEPS steps per run, evaluation every 80,000 steps, 32 greedy episodes)"
gzip -9f "$RESULTS/scalars.csv"
exit $STATUS
