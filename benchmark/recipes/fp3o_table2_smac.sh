#!/usr/bin/env bash
# FP3O paper, Table 2 (SMAC: median evaluation win rate over 5 seeds, +- std), on the SMAX maps of the table.
# FP3O, MAPPO, HAPPO x full / partial / none parameter sharing x seeds 1-5, with the steps, PPO clip and actor network
# of table E.5 (the scripts' defaults for these maps). Table 2's other maps (bane_vs_bane, 2c_vs_64zg, corridor) are
# not in SMAX; IPPO has no SMAC script here. SMAX maps are easier than StarCraft II's: compare algorithms with each other, not with the paper.
#
#   bash benchmark/recipes/fp3o_table2_smac.sh            full budgets (1.3e9 environment steps in all)
#   bash benchmark/recipes/fp3o_table2_smac.sh --quick    SMAX 2s3z, 3 seeds, 640k steps per run: ~70 min on 2 cores
#
# Other flags go to benchmark/sweep.py: --workers N, --dry-run, --slurm (job arrays instead of local runs), --track.
# Runs finished before are skipped, so the recipe can be stopped and started again. A failed run does not stop the
# others; the report marks its seed as missing and the recipe exits with status 1.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
QUICK=0
REPORT=1
PASS=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --dry-run | --slurm) REPORT=0; PASS+=("$arg") ;;
    *) PASS+=("$arg") ;;
  esac
done
SCRIPTS=(fp3o_smac.py mappo_smac.py happo_smac.py)
PY=${PYTHON:-python}
STATUS=0

if [ "$QUICK" = 1 ]; then
  # 2s3z x 3 algorithms x 3 sharing modes x 3 seeds = 27 runs of 200 iterations (3,200 steps each), two at a time.
  # Measured on a 2-core machine (one torch thread per run, two runs at a time): 42 minutes for seeds 1-2 and 30 for
  # seed 3; FP3O 260-516 s per run, HAPPO 243-386 s, MAPPO 178-360 s (benchmark/results/quick_smax/). QUICK_STEPS=...
  # changes the budget (runs finished with another budget run again). Runs committed in the results folder's runs.csv
  # count as finished, and the report merges them with the new ones.
  STEPS=${QUICK_STEPS:-640000}
  OUT=benchmark/sweeps/quick_smax
  RESULTS=benchmark/results/quick_smax
  EARLIER=()
  [ -f "$RESULTS/runs.csv" ] && EARLIER=(--finished-in "$RESULTS/runs.csv")
  $PY benchmark/sweep.py --out "$OUT" --scripts "${SCRIPTS[@]}" --tasks 2s3z --sharing full partial none --seeds 1 2 3 \
    --args="--total-timesteps $STEPS --eval-interval 10" "${EARLIER[@]}" ${PASS[@]+"${PASS[@]}"} || STATUS=1
  if [ "$REPORT" = 1 ]; then
    [ -f "$RESULTS/runs.csv" ] && EARLIER=(--previous "$RESULTS")
    mkdir -p "$OUT"
    # curves of the win rate and of the evaluation return (which shows learning before the first wins)
    $PY benchmark/report.py "$OUT" "${EARLIER[@]}" --out-dir "$RESULTS" --at 160000 320000 480000 --reach 0.8 \
      --plot-tags eval/win_rate eval/episodic_return \
      --title "Quick SMAX recipe: \`bash benchmark/recipes/fp3o_table2_smac.sh --quick\` ($STEPS steps per run, evaluation every 32,000 steps, 32 greedy episodes)"
    gzip -9f "$RESULTS/scalars.csv"  # every scalar of every run: large as plain text
  fi
  exit $STATUS
fi

OUT=benchmark/sweeps/fp3o_table2_smac
sweep() { $PY benchmark/sweep.py --out "$OUT" --scripts "${SCRIPTS[@]}" --seeds 1 2 3 4 5 "$@" ${PASS[@]+"${PASS[@]}"} || STATUS=1; }
# The scripts take table E.5's PPO clip, actor network and steps for the map and sharing mode themselves
# (3s5z: 0.2, rnn, 5M; 5m_vs_6m: 0.05, rnn, 8M / 10M / 10M; 6h_vs_8z: 0.2, mlp, 10M / 15M / 20M).
sweep --tasks 3s5z 5m_vs_6m 6h_vs_8z --sharing full partial none
# Table E.5 also lists two maps of appendix F.1 (full sharing only); SMAX has them. Uncomment to add them:
# sweep --tasks 10m_vs_11m 3s5z_vs_3s6z --sharing full
if [ "$REPORT" = 1 ]; then
  $PY benchmark/report.py "$OUT" --out-dir benchmark/results/fp3o_table2_smac --at 2000000 5000000 \
    --title "FP3O Table 2 on SMAX: \`bash benchmark/recipes/fp3o_table2_smac.sh\` (budgets of table E.5, 5 seeds)"
  gzip -9f benchmark/results/fp3o_table2_smac/scalars.csv  # every scalar of every run: large as plain text
fi
exit $STATUS
