#!/usr/bin/env bash
# The headline map of the FP3O paper on SMAX: 6h_vs_8z (Table 2, appendix F.2), each script's table E.5 settings
# (MLP actor, clip 0.2), 3M steps per run, seeds 1-3 (SEEDS="1 2 3 4 5" for the paper's five).
#   partial sharing: FP3O, MAPPO, HAPPO; FP3O with --no-dependent-step (appendix F.5's ablation: the independent step
#                    alone); MAPPO with --update-epochs 10 (compute-matched: as many optimiser steps per sample as FP3O's
#                    two steps of 5 epochs)
#   no sharing:      FP3O, MAPPO, HAPPO
# FULL=1 adds full sharing and A2PO=1 adds A2PO (both sharing modes), if the machine time allows. The budget: the
# headline run (FP3O, no sharing, seed 3) won 97% of its evaluation games at 1.6M steps and 0.97-1.0 from 2M on, so
# 3M steps show which algorithm gets there and which stays at 0%; a run still rising at 3M can be continued with
# `--resume <sweep>/<run>/runs/<run>/checkpoint.pt --total-timesteps N` (the runs save checkpoints). One run is about
# 20-25 minutes of one core (~2,000-2,500 steps/s with a second run beside it).
#
#   bash benchmark/recipes/smax_6h_vs_8z_study.sh               24 runs, two at a time (~5 h on 2 cores)
#   bash benchmark/recipes/smax_6h_vs_8z_study.sh --workers 1   one run at a time (other flags go to benchmark/sweep.py)
#
# Runs finished before are skipped (those in the sweep folder and those committed in the results folder's runs.csv), so
# the study can be stopped and continued, on another machine too; the report covers the finished runs and marks the
# missing seeds. REPORT_ONLY=1 rewrites the report from the runs finished so far (while others still run).
# Output: benchmark/results/smax_6h_vs_8z/ (table.md with the win rate at 0.5M, 1M, 2M and 3M steps, IQM, 95% CIs,
# probability of improvement, steps to 80% wins; curves per algorithm and per seed; runs.csv, scalars.csv.gz).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=${PYTHON:-python}
OUT=${OUT:-benchmark/sweeps/smax_6h_vs_8z}
STEPS=${STEPS:-3000000}
read -r -a SEEDS <<< "${SEEDS:-1 2 3}"
RESULTS=benchmark/results/smax_6h_vs_8z
PARTIAL=(fp3o_smac.py mappo_smac.py happo_smac.py "fp3o-indep=fp3o_smac.py --no-dependent-step"
         "mappo-e10=mappo_smac.py --update-epochs 10")
NONE=(fp3o_smac.py mappo_smac.py happo_smac.py)
[ "${A2PO:-0}" = 1 ] && PARTIAL+=(a2po_smac.py) && NONE+=(a2po_smac.py)
EARLIER=()
[ -f "$RESULTS/runs.csv" ] && EARLIER=(--finished-in "$RESULTS/runs.csv")
COMMON=(--tasks 6h_vs_8z --seeds "${SEEDS[@]}" --args="--total-timesteps $STEPS --eval-interval 25 --save-model" "${EARLIER[@]}")
STATUS=0
if [ "${REPORT_ONLY:-0}" != 1 ]; then
  $PY benchmark/sweep.py --out "$OUT" --scripts "${PARTIAL[@]}" --sharing partial "${COMMON[@]}" "$@" || STATUS=1
  $PY benchmark/sweep.py --out "$OUT" --scripts "${NONE[@]}" --sharing none "${COMMON[@]}" "$@" || STATUS=1
  [ "${FULL:-0}" = 1 ] && { $PY benchmark/sweep.py --out "$OUT" --scripts "${NONE[@]}" --sharing full "${COMMON[@]}" "$@" || STATUS=1; }
fi
case " $* " in *" --dry-run "* | *" --slurm "*) exit $STATUS ;; esac
[ -f "$RESULTS/runs.csv" ] && EARLIER=(--previous "$RESULTS")
mkdir -p "$OUT"
$PY benchmark/report.py "$OUT" "${EARLIER[@]}" --out-dir "$RESULTS" --at 500000 1000000 2000000 3000000 --reach 0.8 \
  --plot-tags eval/win_rate eval/episodic_return --per-seed eval/win_rate \
  --csv-tags '^eval/' '^charts/(episodic_return|win_rate|gradient_steps|SPS)$' '^losses/(entropy|approx_kl)$' \
    '^fp3o/condition_holds$' \
  --title "SMAX 6h_vs_8z study: \`bash benchmark/recipes/smax_6h_vs_8z_study.sh\` ($STEPS steps per run, evaluation every 80,000 steps, 32 greedy episodes)"
gzip -9f "$RESULTS/scalars.csv"
exit $STATUS
