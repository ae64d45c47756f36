"""Bad input in all six scripts: settings that cannot train, damaged checkpoints and flags beside --resume each give
one `error:` line and exit status 2, never a traceback, before anything starts.

In-process tests call each script's `check_args`, `load_checkpoint` and `flags_given` directly, and run its `__main__`
in this process on bad command lines (harness.run_in_process: no interpreter start per case); one real command line
per script runs in a subprocess."""
import importlib
from collections import namedtuple

import pytest
import torch
from harness import Job, assert_one_clear_error, exit_of, run_in_process, run_scripts

SMAC = ["fp3o_smac", "mappo_smac", "happo_smac", "a2po_smac"]
SCRIPTS = [*SMAC, "fp3o_mamujoco", "ippo_mpe"]
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


def one_error(capfd, call) -> str:
    """Runs `call`, which must end as a bad command line does (harness.assert_one_clear_error); returns its one line."""
    proc = exit_of(call, capfd)
    assert_one_clear_error(proc)
    return proc.stderr.strip()


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", list(SETTINGS))
def test_settings_that_cannot_train_are_one_error(capfd, script, case):
    m = module(script)
    fields, needle = SETTINGS[case]
    args = m.Args(**({"clip_coef": 0.2} if script == "fp3o_mamujoco" else {}))  # mamujoco fills its clip before
    m.check_args(args)  # the defaults are fine
    for name, value in fields.items():
        setattr(args, name, value)
    assert needle in one_error(capfd, lambda: m.check_args(args))


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("episodes", [0, 33])
def test_video_episodes_must_be_positive_and_at_most_the_evaluations_episodes(capfd, script, episodes):
    m = module(script)
    args = m.Args(video_episodes=episodes, eval_episodes=32, **({"clip_coef": 0.2} if script == "fp3o_mamujoco" else {}))
    assert "--video-episodes" in one_error(capfd, lambda: m.check_args(args))
    args.video_episodes = 32
    m.check_args(args)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """Files that are not usable checkpoints: junk bytes, a torch file cut in half, a torch file of something else."""
    base = tmp_path_factory.mktemp("damaged")
    (base / "junk.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"args": {}, "actor": {"w": torch.zeros(1000)}, "iteration": 3, "run_name": "r", "global_step": 0,
                "obs_norm": {}}, base / "whole.pt")  # what --eval-only reads
    data = (base / "whole.pt").read_bytes()
    (base / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"args": {"no_such_flag": 1}, "actor": {}}, base / "other.pt")
    return base


@pytest.mark.parametrize("script", SCRIPTS)
def test_damaged_checkpoints_are_one_error(capfd, damaged, script):
    m = module(script)
    assert "no checkpoint at" in one_error(capfd, lambda: m.load_checkpoint(str(damaged / "missing.pt")))
    for path in (str(damaged / "junk.pt"), str(damaged / "truncated.pt")):
        assert "cannot read the checkpoint" in one_error(capfd, lambda path=path: m.load_checkpoint(path))
    assert "is not a checkpoint of" in one_error(capfd, lambda: m.load_checkpoint(str(damaged / "other.pt")))
    assert m.load_checkpoint(str(damaged / "whole.pt"), eval_only=True)["iteration"] == 3  # a readable one loads


@pytest.mark.parametrize("script", SCRIPTS)
def test_flags_given_names_the_fields_of_a_command_line(script):
    m = module(script)
    argv = ["--seed", "3", "--learning_rate=0.1", "--no-progress-bar", "--track", "--sharing", "none"]
    assert m.flags_given(argv) == {"seed", "learning_rate", "progress_bar", "track", "sharing"}
    if script in ("fp3o_smac", "fp3o_mamujoco"):  # a field whose own name starts with no_
        assert m.flags_given(["--no-condition", "--no-dependent-step"]) == {"no_condition", "no_dependent_step"}
    assert set(m.RESUME_FLAGS) <= set(m.Args.__dataclass_fields__)


TINY = ["--num-envs", "2", "--num-steps", "8", "--total-timesteps", "16", "--eval-interval", "0"]  # if nothing failed
Case = namedtuple("Case", "scripts args mentions env hidden", defaults=(None, ()))  # env: variables; hidden: modules
CASES = {  # name: the scripts, the arguments, what the message must name, and the environment
    "zero_envs": Case(SCRIPTS, ["--num-envs", "0"], "--num-envs must be positive"),
    "less_than_one_batch": Case(SCRIPTS, ["--total-timesteps", "10"], "--total-timesteps (10) is less than one iteration"),
    "missing_checkpoint": Case(SCRIPTS, ["--resume", "no/such.pt"], "no checkpoint at 'no/such.pt'"),
    "truncated_checkpoint": Case(SCRIPTS, ["--resume", "{truncated}"], "cannot read the checkpoint"),
    "flag_beside_resume": Case(SCRIPTS, ["--resume", "{whole}", "--seed", "5", "--learning-rate", "1e-3"],
                               "drop --learning-rate, --seed"),
    "eval_only_alone": Case(SCRIPTS, ["--eval-only"], "--eval-only evaluates a saved model: add --resume"),
    "unknown_sharing": Case(SCRIPTS, ["--sharing", "some"], "invalid choice 'some' for argument '--sharing'"),
    "unknown_flag": Case(SCRIPTS, ["--no-such-flag", "1"], "Unrecognized options: --no-such-flag"),
    "capture_video_without_encoders": Case(SCRIPTS, ["--capture-video"], "--capture-video needs imageio-ffmpeg and moviepy",
                                           hidden=("moviepy",)),
    "unknown_map": Case(SMAC, ["--map", "nope"], "SMAX has no map 'nope'. SMAX maps: 10m_vs_11m"),
    "unknown_backend": Case(SMAC, ["--env-backend", "foo"], "invalid choice 'foo' for argument '--env-backend'"),
    "backend_not_installed": Case(SMAC, ["--env-backend", "smac", "--map", "3m"], "--env-backend smac needs the 'smac'"),
    "minibatches_do_not_divide_envs": Case(SMAC, ["--num-envs", "6", "--num-minibatches", "4"],
                                           "--num-envs (6) must be divisible by --num-minibatches (4)"),
    "unknown_order": Case(["a2po_smac"], ["--order", "greedy"], "invalid choice 'greedy' for argument '--order'"),
    "more_blocks_than_agents": Case(["a2po_smac"], ["--num-blocks", "6"], "--num-blocks must be between 0"),
    "unknown_scenario": Case(["fp3o_mamujoco"], ["--scenario", "Nope"], "unknown MaMuJoCo scenario 'Nope'"),
    "unknown_agent_conf": Case(["fp3o_mamujoco"], ["--scenario", "HalfCheetah", "--agent-conf", "7x1"], "2x3, 6x1"),
    "minibatches_do_not_divide_samples": Case(["fp3o_mamujoco"], ["--num-envs", "3", "--num-steps", "10",
                                              "--num-minibatches", "4"], "must be divisible by --num-minibatches"),
    "negative_obsk": Case(["fp3o_mamujoco"], ["--agent-obsk", "-1"], "--agent-obsk must be >= 0"),
    "capture_video_without_a_renderer": Case(["fp3o_mamujoco"], ["--capture-video"], "apt install libegl1",
                                             env={"MUJOCO_GL": "glfw"}),
    "unknown_env": Case(["ippo_mpe"], ["--env", "simple_nope_v9"], "unknown --env 'simple_nope_v9'"),
}
IN_PROCESS = [(script, name) for name, case in CASES.items() for script in case.scripts]


def command_line(script, case, damaged):
    """The arguments of `case` for `script`, after tiny settings that would train briefly if the check were missing."""
    args = [a.format(truncated=damaged / "truncated.pt", whole=damaged / "whole.pt") for a in CASES[case].args]
    minibatches = ["--num-minibatches", "1"] if script == "fp3o_mamujoco" else []
    return args if "--resume" in args else [*TINY, *minibatches, *args]  # a resumed run takes no such flags


@pytest.mark.parametrize("script,case", IN_PROCESS, ids=[f"{s}-{c}" for s, c in IN_PROCESS])
def test_bad_input_is_one_error_line_before_anything_starts(script, case, damaged, tmp_path, monkeypatch, capfd):
    """The script's `__main__` run in this process: the error line, exit status 2, and no run folder."""
    args = command_line(script, case, damaged)
    proc = run_in_process(f"{script}.py", *args, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd, env=CASES[case].env,
                          hidden=CASES[case].hidden)
    assert_one_clear_error(proc, CASES[case].mentions)
    assert not (tmp_path / "runs").exists(), "nothing starts"


REAL = "unknown_sharing"  # the case that every script also runs as a real command line


@pytest.fixture(scope="module")
def real_runs(damaged, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_main")
    return run_scripts([Job(script, f"{script}.py", command_line(script, REAL, damaged), base / script) for script in SCRIPTS])


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_real_command_line_gives_the_same_error(real_runs, script):
    """`python script.py ...` in a subprocess: tyro's box about the command line, then the one error line."""
    assert_one_clear_error(real_runs[script], CASES[REAL].mentions)
