#!/usr/bin/env bash
# Steps to 80% evaluation wins on SMAX 2s3z with full and partial sharing where the quick SMAX recipe
# (`fp3o_table2_smac.sh --quick`, 640k steps per run) leaves them open: the seven (algorithm, sharing, seed) runs that
# had not reached 80% by 640k steps (MAPPO full seeds 1 and 3, MAPPO partial seeds 2 and 3, HAPPO partial seeds 1-3),
# again with 2M steps, evaluated as in the quick recipe (every 10 iterations = 32,000 steps, 32 greedy games). With the
# quick recipe's runs that did reach 80% they give the median steps to 80% of every cell with sharing, next to the
# no-sharing study (`smax_2s3z_none.sh`, 3M steps).
#
#   bash benchmark/recipes/smax_2s3z_reach.sh        7 runs, two at a time (~1.2 h on 2 cores)
#
# Runs finished before are skipped (in the sweep folder, or committed in the results folder's runs.csv).
# REPORT_ONLY=1 rewrites the report from the runs finished so far. Output: benchmark/results/smax_2s3z_reach/.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=${PYTHON:-python}
OUT=${OUT:-benchmark/sweeps/smax_2s3z_reach}
STEPS=${STEPS:-2000000}
RESULTS=benchmark/results/smax_2s3z_reach
EARLIER=()
[ -f "$RESULTS/runs.csv" ] && EARLIER=(--finished-in "$RESULTS/runs.csv")
STATUS=0
if [ "${REPORT_ONLY:-0}" != 1 ]; then
  for cell in "mappo_smac.py full 1 3" "mappo_smac.py partial 2 3" "happo_smac.py partial 1 2 3"; do
    read -r -a c <<< "$cell"
    $PY benchmark/sweep.py --out "$OUT" --scripts "${c[0]}" --tasks 2s3z --sharing "${c[1]}" --seeds "${c[@]:2}" \
      --args="--total-timesteps $STEPS --eval-interval 10" "${EARLIER[@]}" "$@" || STATUS=1
  done
fi
case " $* " in *" --dry-run "* | *" --slurm "*) exit $STATUS ;; esac
[ -f "$RESULTS/runs.csv" ] && EARLIER=(--previous "$RESULTS")
mkdir -p "$OUT"
$PY benchmark/report.py "$OUT" "${EARLIER[@]}" --out-dir "$RESULTS" --at 640000 1000000 1500000 --reach 0.8 \
  --plot-tags eval/win_rate eval/episodic_return \
  --csv-tags '^eval/' '^charts/(episodic_return|win_rate|gradient_steps|SPS)$' '^losses/(entropy|approx_kl)$' \
  --title "SMAX 2s3z with sharing, the runs the quick recipe left below 80%: \`bash benchmark/recipes/smax_2s3z_reach.sh\` ($STEPS steps per run, evaluation every 32,000 steps, 32 greedy episodes)"
gzip -9f "$RESULTS/scalars.csv"
exit $STATUS
