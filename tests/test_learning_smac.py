"""Learning checks: every SMAC algorithm, on SMAX 3m with a fixed seed and a small budget, must reach an evaluation win
rate that a broken update cannot reach (one subprocess run each, about a minute of CPU).

Budgets and thresholds come from runs of each script with these flags at seeds 1, 2 and 3 (docs/development.md): each
threshold is well below the weakest seed's final evaluation win rate and well above what the same run reaches with a
broken update (zero learning rate, or the policy loss's sign flipped: 0 wins). The checks assert learning, not time."""
import pytest
from harness import describe, run_dir, run_script
from readers import read_scalars

FLAGS = ["--map", "3m", "--num-envs", 32, "--eval-episodes", 32, "--eval-interval", 1000, "--no-progress-bar",
         "--torch-threads", 1]  # fmt: skip
CHECKS = {  # script: (seed, environment steps (iterations of 32 x 25), the evaluation win rate it must reach)
    "fp3o_smac.py": (1, 32_000, 0.2),
    "mappo_smac.py": (1, 32_000, 0.2),
    "happo_smac.py": (1, 48_000, 0.2),  # at 32k steps seed 3 had not won yet
    "a2po_smac.py": (1, 32_000, 0.2),
}


@pytest.mark.parametrize("script", sorted(CHECKS))
def test_learns_smax_3m(script, tmp_path):
    seed, steps, threshold = CHECKS[script]
    proc = run_script(script, *FLAGS, "--total-timesteps", steps, "--seed", seed, cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    win_rates = read_scalars(run_dir(tmp_path))["eval/win_rate"]
    assert [step for step, _ in win_rates] == [steps], "one evaluation, at the end"
    assert win_rates[-1][1] >= threshold, f"{script} seed {seed}: evaluation win rate {win_rates[-1][1]} < {threshold}"
