"""End-to-end runs of fp3o_smac.py on SMAX (tiny: 8 envs x 8 steps): logging, flags, wandb offline, exact resume,
determinism, evaluation of a saved model, and clear errors for bad input.

All runs are started once per module (two processes at a time, see conftest.run_scripts) and the tests read their
results, so selecting a single test still runs them all."""
import json
import math
import re
import shutil
import sys

import pytest
import torch
from conftest import (
    Job,
    assert_one_clear_error,
    assert_same_training_state,
    describe,
    find_checkpoint,
    load_checkpoint,
    ran_ok,
    read_scalars,
    run_dir,
    run_dirs,
    run_scripts,
)

SCRIPT = "fp3o_smac.py"
N_AGENTS = 5  # SMAX 2s3z
ITER_STEPS = 8 * 8
TINY = ["--map", "2s3z", "--num-envs", 8, "--num-steps", 8, "--eval-episodes", 4, "--no-progress-bar"]
SAVE = ["--save-model", "--checkpoint-interval", 1, "--eval-interval", 2]

# runs `python driver.py SCRIPT ARGS...`: the script as __main__, with torch.distributions.Dirichlet recorded
DIRICHLET_DRIVER = '''
import json, runpy, sys
import torch

records = []
Base = torch.distributions.Dirichlet


class Recording(Base):
    def __init__(self, concentration, *args, **kwargs):
        super().__init__(concentration, *args, **kwargs)
        records.append({"batch_shape": list(self.batch_shape), "event_shape": list(self.event_shape)})


torch.distributions.Dirichlet = Recording
script = sys.argv[1]
sys.argv = [script] + sys.argv[2:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    with open("dirichlet.json", "w") as f:
        json.dump(records, f)
'''

BAD_INPUTS = {  # name: (arguments, what the message must mention)
    "unknown_map": (["--map", "nope"], "nope"),
    "unknown_sharing": (["--sharing", "some"], "some"),
    "unknown_backend": (["--env-backend", "foo"], "foo"),
    "backend_not_installed": (["--env-backend", "smac", "--map", "3m"], "smac"),
    "missing_checkpoint": (["--resume", "no/such/checkpoint.pt"], "no/such/checkpoint.pt"),
    "minibatches_do_not_divide_envs": (["--num-envs", 6, "--num-minibatches", 4], "num-minibatches"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, repo_root):
    base = tmp_path_factory.mktemp("fp3o_e2e")
    (base / "driver").mkdir()
    driver = base / "driver" / "dirichlet_driver.py"
    driver.write_text(DIRICHLET_DRIVER)
    one, two = ["--total-timesteps", ITER_STEPS], ["--total-timesteps", 2 * ITER_STEPS]
    jobs = [
        # two iterations, checkpoint after each: the reference for the resume
        Job("full", SCRIPT, TINY + two + SAVE, base / "full"),
        # the same, stopped after one iteration (twice: determinism) and resumed
        Job("half", SCRIPT, TINY + one + SAVE, base / "resume"),
        Job("half_again", SCRIPT, TINY + one + SAVE, base / "half_again"),
        Job("resume", SCRIPT, lambda: ["--resume", keep_copy(find_checkpoint(base / "resume"), base / "half.pt"), *two,
                                       "--no-progress-bar"], base / "resume", after=["half"]),  # fmt: skip
        Job("eval_only", SCRIPT, lambda: ["--eval-only", "--resume", find_checkpoint(base / "full"), "--no-progress-bar"],
            base / "eval_only", after=["full"]),  # fmt: skip
        # the other sharing modes and the MLP actor, each with some of the ablation flags
        Job("partial", SCRIPT, TINY + one + ["--sharing", "partial", "--double-clip", "--eval-interval", 1, "--save-model"],
            base / "partial"),
        Job("none", SCRIPT, TINY + one + ["--sharing", "none", "--no-condition", "--eval-interval", 1, "--track",
                                           "--save-model"], base / "none",
            env={"WANDB_MODE": "offline", "WANDB_DIR": str(base / "none"), "WANDB_SILENT": "true"}),  # fmt: skip
        Job("mlp", str(driver), [repo_root / SCRIPT, *TINY, *one, "--actor", "mlp", "--advantage-split", "random",
                                 "--eval-interval", 1, "--save-model"], base / "mlp"),  # fmt: skip
        Job("no_dependent_step", SCRIPT, TINY + one + ["--no-dependent-step", "--eval-interval", 0], base / "no_dep"),
    ]
    for name, (args, _) in BAD_INPUTS.items():
        jobs.append(Job(f"bad_{name}", SCRIPT, args + ["--no-progress-bar"], base / f"bad_{name}"))
    results = run_scripts(jobs)
    print("run times: " + ", ".join(f"{n} {p.duration:.1f}s" for n, p in results.items()), file=sys.stderr)
    return {"base": base, **{job.name: (results[job.name], job.cwd) for job in jobs}}


def keep_copy(src, dst):
    """Copy the checkpoint aside (the resumed run overwrites its own) and return the copy's path."""
    shutil.copyfile(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------- logging
REQUIRED_TAGS = [
    "charts/SPS", "charts/learning_rate", "losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/approx_kl",
    "losses/clipfrac", "losses/explained_variance", "fp3o/condition_holds", "fp3o/kl_agent0", "eval/win_rate",
    "eval/episodic_return",
]  # fmt: skip


@pytest.mark.parametrize("name", ["full", "partial", "none", "mlp"])
def test_run_writes_the_expected_tensorboard_scalars(runs, name):
    proc, cwd = ran_ok(runs, name)
    assert "backend smax" in proc.stdout
    scalars = read_scalars(run_dir(cwd))
    missing = [t for t in REQUIRED_TAGS + [f"fp3o/kl_agent{i}" for i in range(N_AGENTS)] if t not in scalars]
    assert not missing, f"missing tags {missing}; found {sorted(scalars)}"
    iterations = 2 if name == "full" else 1
    assert [s for s, _ in scalars["charts/SPS"]] == [ITER_STEPS * (i + 1) for i in range(iterations)], "one point per iteration"
    for tag in ("losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac"):
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    assert all(v > 0 for _, v in scalars["losses/entropy"])
    assert all(0 <= v <= 1 for _, v in scalars["losses/clipfrac"])
    assert all(v == pytest.approx(5e-4) for _, v in scalars["charts/learning_rate"])
    assert all(v in (0.0, 1.0) for _, v in scalars["fp3o/condition_holds"])
    assert all(v >= 0 for i in range(N_AGENTS) for _, v in scalars[f"fp3o/kl_agent{i}"])
    assert all(0 <= v <= 1 for _, v in scalars["eval/win_rate"])
    assert all(math.isfinite(v) for _, v in scalars["eval/episodic_return"])
    if "charts/win_rate" in scalars:  # only when an episode ended during a rollout
        assert all(0 <= v <= 1 for _, v in scalars["charts/win_rate"])
        assert "charts/episodic_return" in scalars


@pytest.mark.parametrize("name", ["full", "partial", "none", "mlp"])
def test_sharing_flag_and_actor_flag_reach_the_networks(runs, name):
    """Saved actor/critic layouts: copies = 1 (shared) or N (per agent) per layer, GRU only for the RNN actor."""
    _, cwd = ran_ok(runs, name)
    ckpt = load_checkpoint((cwd))
    trunk, head = {"full": (1, 1), "mlp": (1, 1), "partial": (1, N_AGENTS), "none": (N_AGENTS, N_AGENTS)}[name]
    for net in ("actor", "critic"):
        if net == "critic" and name == "partial":  # partial sharing concerns the policy: the critic is one network
            trunk, head = 1, 1
        for k, v in ckpt[net].items():
            assert v.shape[0] == (head if k.startswith("head.") else trunk), f"{net}.{k}: {tuple(v.shape)}"
    assert ("gru.x2h.weight" in ckpt["actor"]) == (name != "mlp")
    assert not any(k.startswith("gru.") for k in ckpt["critic"])
    assert ckpt["args"]["sharing"] == {"mlp": "full"}.get(name, name)


def test_no_dependent_step_runs_the_independent_step_only(runs):
    _, cwd = ran_ok(runs, "no_dependent_step")
    scalars = read_scalars(run_dir(cwd))
    assert "fp3o/kl_agent0" in scalars and "losses/policy_loss" in scalars
    condition_tags = [t for t in scalars if t in ("fp3o/condition_holds", "fp3o/S1", "fp3o/S2")]
    assert not condition_tags, "no condition without a dependent step"
    assert not [t for t in scalars if t.startswith("eval/")], "--eval-interval 0 disables evaluation"


def test_double_clip_and_no_condition_flags_run(runs):
    for name in ("partial", "none"):  # --double-clip, --no-condition
        _, cwd = ran_ok(runs, name)
        scalars = read_scalars(run_dir(cwd))
        assert all(math.isfinite(v) for _, v in scalars["losses/policy_loss"])
        if name == "none":  # the dependent step runs in every iteration: the matching degree is measured in each
            assert len(scalars["fp3o/condition_matches"]) == len(scalars["losses/policy_loss"]) == 1


def test_random_advantage_split_draws_weights_over_agents(runs):
    """Appendix F.4: A^i = w^i A with random weights w that sum to 1 over the agents. The script draws them from a
    Dirichlet, so its event (the simplex) must range over the n agents, not over the environments."""
    _, cwd = ran_ok(runs, "mlp")
    records = json.loads((cwd / "dirichlet.json").read_text())
    assert records, "--advantage-split random should draw Dirichlet weights"
    for r in records:
        assert r["event_shape"] == [N_AGENTS], (
            f"Dirichlet over {r['event_shape']} with batch {r['batch_shape']}: the weights sum to 1 over that axis, "
            f"but the split must sum to 1 over the {N_AGENTS} agents"
        )


def test_track_writes_an_offline_wandb_run(runs):
    _, cwd = ran_ok(runs, "none")
    offline = sorted((cwd / "wandb").glob("offline-run-*"))
    assert offline, f"no offline wandb run under {cwd / 'wandb'}"
    assert any(offline[0].glob("*.wandb")), "the offline run has no data file"
    assert run_dir(cwd).name in offline[0].name, "the wandb run id is the run name"
    data = next(offline[0].glob("*.wandb")).read_bytes()  # protobuf records: strings are stored as they are
    for needle in (b"backend", b"smax", b"versions", b"losses/policy_loss"):  # config and synced TensorBoard scalars
        assert needle in data, needle


# ---------------------------------------------------------------------------------------------- checkpoints
def test_resume_equals_an_uninterrupted_run(runs):
    _, full_cwd = ran_ok(runs, "full")
    ran_ok(runs, "half")
    proc, resume_cwd = ran_ok(runs, "resume")
    ref, res = load_checkpoint((full_cwd)), load_checkpoint((resume_cwd))
    assert_same_training_state(ref, res, 2, 2 * ITER_STEPS)
    # the resumed run continues the same TensorBoard run
    assert len(run_dirs(resume_cwd)) == 1
    steps = sorted({s for s, _ in read_scalars(run_dir(resume_cwd))["charts/SPS"]})
    assert steps == [ITER_STEPS, 2 * ITER_STEPS]
    # the actor optimiser's step count goes on where it stopped: 5 epochs x 1 minibatch per step that ran
    grad_steps = read_scalars(run_dir(resume_cwd))["charts/gradient_steps"]
    assert grad_steps == read_scalars(run_dir(full_cwd))["charts/gradient_steps"]
    assert grad_steps[0][1] in (5, 10) and grad_steps[1][1] - grad_steps[0][1] in (5, 10)
    assert res["actor_steps"] == grad_steps[1][1]


def test_same_seed_gives_identical_checkpoints(runs):
    ran_ok(runs, "half")
    _, b = ran_ok(runs, "half_again")
    ca, cb = load_checkpoint(runs["base"] / "half.pt"), load_checkpoint((b))
    assert_same_training_state(ca, cb, 1, ITER_STEPS)
    # and the same logged numbers (also those of the full run's first iteration)
    sa, sb = read_scalars(run_dir(runs["resume"][1])), read_scalars(run_dir(b))
    sf = read_scalars(run_dir(ran_ok(runs, "full")[1]))
    def first(scalars, tag):
        return [v for s, v in scalars[tag] if s == ITER_STEPS]

    for tag in ("losses/policy_loss", "losses/value_loss", "fp3o/S1", "fp3o/kl_agent0", "eval/episodic_return"):
        assert first(sa, tag) == first(sb, tag) and first(sa, tag), tag
        if tag != "eval/episodic_return":  # the full run evaluates only at its end
            assert first(sf, tag) == first(sb, tag), tag


def test_training_changes_the_networks(runs):
    """The checkpoints compared above must not be trivially equal (e.g. untrained)."""
    _, a = ran_ok(runs, "full")
    ran_ok(runs, "half")
    two, one = load_checkpoint((a)), load_checkpoint(runs["base"] / "half.pt")
    assert one["iteration"] == 1
    assert any(not torch.equal(two["actor"][k], one["actor"][k]) for k in two["actor"])


def test_eval_only_prints_an_evaluation(runs):
    proc, cwd = ran_ok(runs, "eval_only")
    m = re.search(r"eval: win_rate ([0-9.]+), episodic_return (-?[0-9.]+) over (\d+) episodes", proc.stdout)
    assert m, describe(proc)
    assert 0.0 <= float(m.group(1)) <= 1.0 and int(m.group(3)) == 4
    assert not run_dirs(cwd), "--eval-only should not start a new run"


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gives_a_short_error(runs, name):
    proc, _ = runs[f"bad_{name}"]
    assert_one_clear_error(proc, mentions=BAD_INPUTS[name][1])  # tyro's "Invalid choice" box ends with our "error:" line
    assert len(proc.stderr.strip().splitlines()) <= 10, f"a short message, not a wall:\n{proc.stderr}"
