"""End to end, what the four SMAC scripts share (fp3o_smac.py, mappo_smac.py, happo_smac.py, a2po_smac.py): short runs
on SMAX 2s3z under each sharing mode log the expected scalars at every iteration and no other algorithm's, save the
networks that the sharing and actor flags ask for, and a run stopped after one iteration and resumed is bit for bit the
run that never stopped.

The runs are conftest's `smac_runs` (harness.smac_jobs), shared with the script-specific end-to-end tests in the
scripts' own modules; tests are grouped by script, so one script's runs are done before the next one's start. Bad input
is in test_bad_input.py; --eval-only against the run's own last evaluation in test_glue_smac.py."""
import math
import re

import pytest
import torch
from harness import SMAC_ITER, SMAC_RESUMED, SMAC_RUNS, SMAC_SCRIPTS, ran_ok, run_dir, run_dirs
from readers import assert_same_scalars, assert_same_training_state, load_checkpoint, read_scalars

N_AGENTS = 5  # SMAX 2s3z
STEPS = [SMAC_ITER, 2 * SMAC_ITER]  # one point per iteration
SMAC_TAGS = {"charts/SPS", "charts/learning_rate", "losses/policy_loss", "losses/value_loss", "losses/entropy",
             "losses/approx_kl", "losses/clipfrac", "losses/explained_variance", "eval/win_rate", "eval/episodic_return"}
PER_AGENT = {  # script: its own per-agent diagnostics, logged at every iteration
    "fp3o_smac": ["kl"],
    "mappo_smac": ["kl"],
    "happo_smac": ["kl_after_turn", "kl", "factor_mean", "factor_max", "position"],
    "a2po_smac": ["position", "clip", "kl_after_turn", "kl"],
}


def own_tags(script):
    algorithm = script.removesuffix("_smac")
    tags = [f"{algorithm}/{name}_agent{i}" for name in PER_AGENT[script] for i in range(N_AGENTS)]
    return tags + (["fp3o/condition_holds"] if script == "fp3o_smac" else [])


@pytest.fixture(scope="module", params=SMAC_SCRIPTS)
def script(request):
    return request.param


@pytest.fixture(scope="module")
def runs(smac_runs, script):
    return smac_runs(script)


@pytest.mark.parametrize("sharing", ["none", "partial", "full"])
def test_short_run_logs_the_expected_scalars(script, runs, sharing):
    """Exit 0 on SMAX; the run folder `2s3z__{script}__{sharing}__1__{time}`; the common tags and the script's own at
    every iteration, no other algorithm's; the logged learning rate is the default's and a win rate counts won
    evaluation episodes (4)."""
    proc, cwd = ran_ok(runs, sharing)
    assert "backend smax" in proc.stdout
    path = run_dir(cwd)
    assert re.fullmatch(rf"2s3z__{script}__{sharing}__1__\d+", path.name), path.name
    scalars = read_scalars(path)
    expected = SMAC_TAGS | set(own_tags(script))
    assert expected <= set(scalars), expected - set(scalars)
    others = tuple(f"{a}/" for a in ("fp3o", "mappo", "happo", "a2po") if not script.startswith(a))
    assert not [tag for tag in scalars if tag.startswith(others)]
    for tag in expected:
        assert [step for step, _ in scalars[tag]] == STEPS, tag
    for tag in ("losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl", "eval/episodic_return"):
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    assert [v for _, v in scalars["charts/learning_rate"]] == pytest.approx([5e-4, 5e-4])
    assert all(4 * v in (0, 1, 2, 3, 4) for _, v in scalars["eval/win_rate"])
    assert all(v > 0 for _, v in scalars["losses/entropy"]) and all(0 <= v <= 1 for _, v in scalars["losses/clipfrac"])
    kl_tags = ["losses/approx_kl", *(tag for tag in own_tags(script) if "/kl_agent" in tag)]
    assert all(v >= 0 for tag in kl_tags for _, v in scalars[tag])
    if "charts/win_rate" in scalars:  # only when an episode ended during a rollout
        assert all(0 <= v <= 1 for _, v in scalars["charts/win_rate"]) and "charts/episodic_return" in scalars


@pytest.mark.parametrize("sharing", ["none", "partial", "full"])
def test_sharing_and_actor_flags_reach_the_saved_networks(script, runs, sharing):
    """Per layer 1 copy (shared) or one per agent; partial sharing gives the actor per-agent heads and one critic
    (E.3); the GRU only in the RNN actor; the run config records the sharing."""
    _, cwd = ran_ok(runs, sharing)
    ckpt = load_checkpoint(cwd)
    trunk, head = {"full": (1, 1), "partial": (1, N_AGENTS), "none": (N_AGENTS, N_AGENTS)}[sharing]
    for net in ("actor", "critic"):
        if net == "critic" and sharing == "partial":
            trunk, head = 1, 1
        for k, v in ckpt[net].items():
            assert v.shape[0] == (head if k.startswith("head.") else trunk), f"{net}.{k}: {tuple(v.shape)}"
    mlp = "--actor" in SMAC_RUNS[script][sharing]
    assert ("gru.x2h.weight" in ckpt["actor"]) != mlp and ckpt["args"]["actor"] == ("mlp" if mlp else "rnn")
    assert not any(k.startswith("gru.") for k in ckpt["critic"])
    assert ckpt["args"]["sharing"] == sharing


def test_resume_equals_an_uninterrupted_run(script, runs):
    """Stopped after one iteration and resumed: bit for bit the run that never stopped (networks, Adam's moments and
    step counts, value normaliser, counters), every logged value the same, in the same TensorBoard run; and the
    second iteration trained (the compared checkpoints are not trivially equal)."""
    ran_ok(runs, "half")
    _, cwd = ran_ok(runs, "resume")
    _, ref_cwd = ran_ok(runs, SMAC_RESUMED[script])
    ref, res, half = load_checkpoint(ref_cwd), load_checkpoint(cwd), load_checkpoint(runs["base"] / "half.pt")
    assert_same_training_state(ref, res, 2, 2 * SMAC_ITER)
    assert (half["iteration"], half["global_step"]) == (1, SMAC_ITER)
    assert any(not torch.equal(ref["actor"][k], half["actor"][k]) for k in ref["actor"]), "the second iteration trained"
    assert len(run_dirs(cwd)) == 1, "the resumed run continues its TensorBoard run"
    resumed, uninterrupted = read_scalars(run_dir(cwd)), read_scalars(run_dir(ref_cwd))
    assert [step for step, _ in resumed["charts/SPS"]] == STEPS
    assert_same_scalars(resumed, uninterrupted)
