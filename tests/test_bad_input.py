"""Bad input in all six scripts: settings that cannot train, damaged checkpoints and flags beside --resume each give
one `error:` line and exit status 2, never a traceback, before anything starts.

In-process tests call each script's `check_args`, `load_checkpoint` and `flags_given` directly (cheap); a few
subprocess runs per script check that `__main__` wires them in."""
import importlib

import pytest
import torch

from conftest import Job, describe, run_scripts

SCRIPTS = ["fp3o_smac", "mappo_smac", "happo_smac", "a2po_smac", "fp3o_mamujoco", "ippo_mpe"]
SETTINGS = {  # name: (Args fields, what the message must name)
    "no_envs": (dict(num_envs=0), "--num-envs"),
    "no_steps": (dict(num_steps=0), "--num-steps"),
    "no_epochs": (dict(update_epochs=0), "--update-epochs"),
    "negative_lr": (dict(learning_rate=-1.0), "--learning-rate"),
    "nan_critic_lr": (dict(critic_learning_rate=float("nan")), "--critic-learning-rate"),
    "gamma_above_one": (dict(gamma=1.5), "--gamma"),
    "less_than_one_batch": (dict(total_timesteps=100), "--total-timesteps"),
}


def module(name):
    return importlib.import_module(name)


def one_error(capsys, call) -> str:
    """Runs `call`, which must exit with status 2 after printing exactly one `error:` line; returns that line."""
    with pytest.raises(SystemExit) as e:
        call()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", list(SETTINGS))
def test_settings_that_cannot_train_are_one_error(capsys, script, case):
    m = module(script)
    fields, needle = SETTINGS[case]
    args = m.Args(**({"clip_coef": 0.2} if script == "fp3o_mamujoco" else {}))  # mamujoco fills its clip before
    m.check_args(args)  # the defaults are fine
    for name, value in fields.items():
        setattr(args, name, value)
    assert needle in one_error(capsys, lambda: m.check_args(args))


@pytest.mark.parametrize("script", ["mappo_smac", "fp3o_mamujoco", "ippo_mpe"])  # the scripts with --capture-video
@pytest.mark.parametrize("episodes", [0, 33])
def test_video_episodes_must_be_positive_and_at_most_the_evaluations_episodes(capsys, script, episodes):
    m = module(script)
    args = m.Args(video_episodes=episodes, eval_episodes=32, **({"clip_coef": 0.2} if script == "fp3o_mamujoco" else {}))
    assert "--video-episodes" in one_error(capsys, lambda: m.check_args(args))
    args.video_episodes = 32
    m.check_args(args)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """Files that are not usable checkpoints: junk bytes, a torch file cut in half, a torch file of something else."""
    base = tmp_path_factory.mktemp("damaged")
    (base / "junk.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"args": {}, "actor": {"w": torch.zeros(1000)}, "iteration": 3}, base / "whole.pt")
    data = (base / "whole.pt").read_bytes()
    (base / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"args": {"no_such_flag": 1}, "actor": {}}, base / "other.pt")
    return base


@pytest.mark.parametrize("script", SCRIPTS)
def test_damaged_checkpoints_are_one_error(capsys, damaged, script):
    m = module(script)
    assert "no checkpoint at" in one_error(capsys, lambda: m.load_checkpoint(str(damaged / "missing.pt")))
    for name in ("junk.pt", "truncated.pt"):
        assert "cannot read the checkpoint" in one_error(capsys, lambda: m.load_checkpoint(str(damaged / name)))
    assert "is not a checkpoint of" in one_error(capsys, lambda: m.load_checkpoint(str(damaged / "other.pt")))
    assert m.load_checkpoint(str(damaged / "whole.pt"))["iteration"] == 3  # a readable one loads


@pytest.mark.parametrize("script", SCRIPTS)
def test_flags_given_names_the_fields_of_a_command_line(script):
    m = module(script)
    argv = ["--seed", "3", "--learning_rate=0.1", "--no-progress-bar", "--track", "--sharing", "none"]
    assert m.flags_given(argv) == {"seed", "learning_rate", "progress_bar", "track", "sharing"}
    if script in ("fp3o_smac", "fp3o_mamujoco"):  # a field whose own name starts with no_
        assert m.flags_given(["--no-condition", "--no-dependent-step"]) == {"no_condition", "no_dependent_step"}
    assert set(m.RESUME_FLAGS) <= set(m.Args.__dataclass_fields__)


TINY = ["--num-envs", "2", "--num-steps", "8", "--total-timesteps", "16", "--eval-interval", "0"]  # if nothing failed
MAIN_CASES = {  # name: (arguments, what the message must name)
    "zero_envs": (["--num-envs", "0"], "--num-envs"),
    "less_than_one_batch": (["--total-timesteps", "10"], "--total-timesteps"),
    "truncated_checkpoint": (["--resume", "{truncated}"], "cannot read the checkpoint"),
    "flag_beside_resume": (["--resume", "{whole}", "--seed", "5", "--learning-rate", "1e-3"], "drop --learning-rate, --seed"),
    "eval_only_alone": (["--eval-only"], "--resume"),
}


@pytest.fixture(scope="module")
def main_runs(damaged, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_main")
    jobs = []
    for script in SCRIPTS:
        for case, (args, _) in MAIN_CASES.items():
            args = [a.format(truncated=damaged / "truncated.pt", whole=damaged / "whole.pt") for a in args]
            minibatches = ["--num-minibatches", "1"] if script == "fp3o_mamujoco" else []
            tiny = [] if "--resume" in args else [*TINY, *minibatches]  # a resumed run takes no such flags
            jobs.append(Job(f"{script}-{case}", f"{script}.py", [*tiny, *args], base / script))
    return run_scripts(jobs)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", list(MAIN_CASES))
def test_the_command_line_gives_one_error_line(main_runs, script, case):
    proc = main_runs[f"{script}-{case}"]
    assert proc.returncode == 2, describe(proc)
    err = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and MAIN_CASES[case][1] in err[0], describe(proc)
    assert "Traceback" not in proc.stdout + proc.stderr

