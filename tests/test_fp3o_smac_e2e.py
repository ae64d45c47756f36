"""End to end, what fp3o_smac.py does of its own on SMAX (test_smac_e2e.py checks what the four SMAC scripts share, on
the same runs: conftest's `smac_runs`): where the dependent step runs (the condition, --no-condition, --double-clip,
--no-dependent-step) and the actor's gradient steps it takes, across a resume too; --track's offline wandb run."""
import pytest
from harness import SMAC_ITER, SMAC_RESUMED, SMAC_RUNS, SMAC_TINY, Job, ran_ok, run_dir, run_scripts
from readers import load_checkpoint, read_scalars

SCRIPT = "fp3o_smac"
EPOCHS = 5  # the default --update-epochs, one minibatch: the gradient steps of one FP3O step


@pytest.fixture(scope="module")
def runs(smac_runs):
    return smac_runs(SCRIPT)


@pytest.fixture(scope="module")
def no_dependent_step(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("fp3o_no_dep")
    args = [*SMAC_TINY, "--total-timesteps", SMAC_ITER, "--no-dependent-step", "--eval-interval", 0]
    return run_scripts([Job("no_dep", f"{SCRIPT}.py", args, cwd)])["no_dep"], cwd


def gradient_steps_per_iteration(scalars) -> list:
    """The actor's optimiser steps in each iteration, from the logged running count."""
    counts = [0] + [v for _, v in scalars["charts/gradient_steps"]]
    return [b - a for a, b in zip(counts[:-1], counts[1:], strict=True)]


@pytest.mark.parametrize("sharing", ["none", "partial", "full"])
def test_the_dependent_step_runs_where_the_condition_holds(runs, sharing):
    """Algorithm 1 line 7: the dependent step runs in an iteration where the condition held (every iteration under
    --no-condition, the `none` run); only there is the matching degree measured, and the actor takes EPOCHS gradient
    steps for the independent step plus EPOCHS for the dependent one. The partial run adds --double-clip."""
    _, cwd = ran_ok(runs, sharing)
    scalars = read_scalars(run_dir(cwd))
    holds = [v for _, v in scalars["fp3o/condition_holds"]]
    assert all(v in (0.0, 1.0) for v in holds) and len(holds) == 2
    ran = [v == 1.0 or "--no-condition" in SMAC_RUNS[SCRIPT][sharing] for v in holds]
    steps = [SMAC_ITER * (k + 1) for k, r in enumerate(ran) if r]
    for tag in ("fp3o/constraint_holds", "fp3o/condition_matches"):
        assert [s for s, _ in scalars.get(tag, [])] == steps, tag
    assert gradient_steps_per_iteration(scalars) == [EPOCHS * (1 + r) for r in ran]


def test_the_resumed_run_counts_on_from_the_saved_gradient_steps(runs):
    """The checkpoint keeps the actor's step count: the resumed run logs the uninterrupted run's counts (test_smac_e2e.py
    compares every logged value) and saves the last of them."""
    _, cwd = ran_ok(runs, "resume")
    logged = [v for _, v in read_scalars(run_dir(cwd))["charts/gradient_steps"]]
    assert logged == [v for _, v in read_scalars(run_dir(ran_ok(runs, SMAC_RESUMED[SCRIPT])[1]))["charts/gradient_steps"]]
    assert load_checkpoint(runs["base"] / "half.pt")["actor_steps"] == logged[0]
    assert load_checkpoint(cwd)["actor_steps"] == logged[1]


def test_no_dependent_step_runs_the_independent_step_only(no_dependent_step):
    proc, cwd = no_dependent_step
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = read_scalars(run_dir(cwd))
    assert "fp3o/kl_agent0" in scalars and "losses/policy_loss" in scalars
    assert not [t for t in scalars if t.startswith(("fp3o/condition", "fp3o/S", "fp3o/constraint"))], "no condition"
    assert gradient_steps_per_iteration(scalars) == [EPOCHS]
    assert not [t for t in scalars if t.startswith("eval/")], "--eval-interval 0 disables evaluation"


def test_track_writes_an_offline_wandb_run(runs):
    _, cwd = ran_ok(runs, "none")  # with --track
    offline = sorted((cwd / "wandb").glob("offline-run-*"))
    assert offline, f"no offline wandb run under {cwd / 'wandb'}"
    assert any(offline[0].glob("*.wandb")), "the offline run has no data file"
    assert run_dir(cwd).name in offline[0].name, "the wandb run id is the run name"
    data = next(offline[0].glob("*.wandb")).read_bytes()  # protobuf records: strings are stored as they are
    for needle in (b"backend", b"smax", b"versions", b"losses/policy_loss"):  # config and synced TensorBoard scalars
        assert needle in data, needle
