#!/usr/bin/env bash
# FP3O paper, Table 1 (Multi-Agent MuJoCo: mean evaluation return over 5 seeds, +- std): the six tasks x full / partial
# / none parameter sharing x seeds 1-5, 10M steps each (table E.3, with its PPO clip of 0.05 on Walker2d and Hopper).
# Algorithms: every *_mamujoco.py script in the checkout (fp3o_mamujoco.py; baselines when they exist).
#
#   bash benchmark/recipes/fp3o_table1_mamujoco.sh           full budgets (9e8 environment steps per algorithm)
#   bash benchmark/recipes/fp3o_table1_mamujoco.sh --quick   HalfCheetah 6x1, 2 seeds, 500k steps per run
#
# Other flags go to benchmark/sweep.py: --workers N, --dry-run, --slurm (job arrays instead of local runs), --track.
# Runs finished before are skipped, so the recipe can be stopped and started again.
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
SCRIPTS=()
for s in fp3o_mamujoco.py mappo_mamujoco.py happo_mamujoco.py ippo_mamujoco.py; do
  [ -f "$s" ] && SCRIPTS+=("$s")
done
if [ ${#SCRIPTS[@]} = 0 ]; then echo "error: no *_mamujoco.py script in this checkout" >&2; exit 2; fi
PY=${PYTHON:-python}
STATUS=0

if [ "$QUICK" = 1 ]; then
  STEPS=${QUICK_STEPS:-500000}
  OUT=benchmark/sweeps/quick_mamujoco
  $PY benchmark/sweep.py --out "$OUT" --scripts "${SCRIPTS[@]}" --tasks "HalfCheetah-6x1=--scenario HalfCheetah --agent-conf 6x1" \
    --sharing full partial none --seeds 1 2 --args="--total-timesteps $STEPS" ${PASS[@]+"${PASS[@]}"} || STATUS=1
  if [ "$REPORT" = 1 ]; then
    $PY benchmark/report.py "$OUT" --out-dir benchmark/results/quick_mamujoco \
      --title "Quick MaMuJoCo recipe: \`bash benchmark/recipes/fp3o_table1_mamujoco.sh --quick\` ($STEPS steps per run)"
    gzip -9f benchmark/results/quick_mamujoco/scalars.csv  # every scalar of every run: large as plain text
  fi
  exit $STATUS
fi

OUT=benchmark/sweeps/fp3o_table1_mamujoco
# Table E.3: task [agents x joints], PPO clip; mlp actor and 10e6 steps for every task and sharing mode.
$PY benchmark/sweep.py --out "$OUT" --scripts "${SCRIPTS[@]}" --sharing full partial none --seeds 1 2 3 4 5 \
  --tasks "Reacher-2x1=--scenario Reacher --agent-conf 2x1 --clip-coef 0.2" \
          "Ant-2x4=--scenario Ant --agent-conf 2x4 --clip-coef 0.2" \
          "Walker2d-2x3=--scenario Walker2d --agent-conf 2x3 --clip-coef 0.05" \
          "Hopper-3x1=--scenario Hopper --agent-conf 3x1 --clip-coef 0.05" \
          "HalfCheetah-6x1=--scenario HalfCheetah --agent-conf 6x1 --clip-coef 0.2" \
          "ManySegmentSwimmer-8x2=--scenario ManySegmentSwimmer --agent-conf 8x2 --clip-coef 0.2" \
  --args="--total-timesteps 10000000" ${PASS[@]+"${PASS[@]}"} || STATUS=1
if [ "$REPORT" = 1 ]; then
  $PY benchmark/report.py "$OUT" --out-dir benchmark/results/fp3o_table1_mamujoco --at 2000000 5000000 \
    --title "FP3O Table 1 on MaMuJoCo: \`bash benchmark/recipes/fp3o_table1_mamujoco.sh\` (10M steps, 5 seeds)"
  gzip -9f benchmark/results/fp3o_table1_mamujoco/scalars.csv  # every scalar of every run: large as plain text
fi
exit $STATUS
