"""Table E.5 of the FP3O paper in the four SMAC scripts: the chosen map's PPO clip, actor network and steps replace the
defaults, a flag given on the command line wins, a map the table does not list keeps the defaults, and the values
reach the networks and the saved run config."""
import importlib

import pytest
from harness import Job, describe, run_scripts
from readers import load_checkpoint

SCRIPTS = ["fp3o_smac", "mappo_smac", "happo_smac", "a2po_smac"]
E5 = {  # the paper's table E.5, written out again: map -> (clip, actor, steps for full, partial, none)
    "3s5z": (0.2, "rnn", (5e6, 5e6, 5e6)),
    "5m_vs_6m": (0.05, "rnn", (8e6, 10e6, 10e6)),
    "6h_vs_8z": (0.2, "mlp", (10e6, 15e6, 20e6)),
    "10m_vs_11m": (0.2, "rnn", (8e6, None, None)),
    "3s5z_vs_3s6z": (0.05, "rnn", (12e6, None, None)),
    "corridor": (0.2, "mlp", (8e6, 10e6, 10e6)),
    "bane_vs_bane": (0.2, "rnn", (2e6, 2e6, 2e6)),
    "2c_vs_64zg": (0.2, "rnn", (5e6, 5e6, 5e6)),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_table_is_the_papers(script):
    m = importlib.import_module(script)
    assert set(m.PAPER_MAP_SETTINGS) == set(E5)
    for name, (clip, actor, steps) in E5.items():
        assert m.PAPER_MAP_SETTINGS[name] == (clip, actor, tuple(None if s is None else int(s) for s in steps)), name


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("name", list(E5))
@pytest.mark.parametrize("sharing", ["full", "partial", "none"])
def test_the_map_sets_what_the_table_gives(script, name, sharing):
    m = importlib.import_module(script)
    args = m.Args(map=name, sharing=sharing)
    used = m.apply_paper_settings(args, given={"map", "sharing"})
    clip, actor, steps = E5[name]
    steps = steps[["full", "partial", "none"].index(sharing)]
    assert (args.clip_coef, args.actor) == (clip, actor)
    assert args.total_timesteps == (int(steps) if steps else m.Args().total_timesteps)  # "-": the default
    assert used == {"clip_coef": clip, "actor": actor, **({"total_timesteps": int(steps)} if steps else {})}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_flag_given_wins_and_other_maps_keep_the_defaults(script):
    m = importlib.import_module(script)
    argv = ["--map", "5m_vs_6m", "--clip-coef", "0.2", "--total-timesteps=300"]
    args = m.Args(map="5m_vs_6m", clip_coef=0.2, total_timesteps=300)
    assert m.apply_paper_settings(args, m.flags_given(argv)) == {"actor": "rnn"}
    assert (args.clip_coef, args.total_timesteps) == (0.2, 300)
    defaults = m.Args()
    for name in ("2s3z", "3m", "smacv2_10_units"):
        args = m.Args(map=name, sharing="none")
        assert m.apply_paper_settings(args, {"map"}) == {}
        assert (args.clip_coef, args.actor, args.total_timesteps) == (
            defaults.clip_coef, defaults.actor, defaults.total_timesteps)  # fmt: skip


TINY = ["--num-envs", "4", "--num-steps", "8", "--total-timesteps", "32", "--eval-interval", "0", "--no-progress-bar",
        "--save-model", "--torch-threads", "1"]  # fmt: skip
RUNS = {  # name: (script, arguments, the clip and actor the run must use)
    "fp3o_6h": ("fp3o_smac", ["--map", "6h_vs_8z", "--sharing", "none"], 0.2, "mlp"),
    "fp3o_5m": ("fp3o_smac", ["--map", "5m_vs_6m"], 0.05, "rnn"),
    "mappo_5m_mlp": ("mappo_smac", ["--map", "5m_vs_6m", "--actor", "mlp"], 0.05, "mlp"),  # the flag wins
    "happo_6h_clip": ("happo_smac", ["--map", "6h_vs_8z", "--sharing", "partial", "--clip-coef", "0.1"], 0.1, "mlp"),
    "a2po_5m": ("a2po_smac", ["--map", "5m_vs_6m", "--sharing", "none"], 0.05, "rnn"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("paper_settings")
    return run_scripts([Job(name, f"{script}.py", [*args, *TINY], base / name) for name, (script, args, *_) in RUNS.items()]), base


@pytest.mark.parametrize("name", list(RUNS))
def test_a_run_uses_and_records_the_tables_values(runs, name):
    procs, base = runs
    proc, (_, args, clip, actor) = procs[name], RUNS[name]
    assert proc.returncode == 0, describe(proc)
    announced = [line for line in proc.stdout.splitlines() if "table E.5" in line]
    assert len(announced) == 1, proc.stdout
    for flag, value in (("--clip-coef", clip), ("--actor", actor), ("--total-timesteps", 32)):
        assert (f"{flag} {value}" in announced[0]) == (flag not in args + TINY), (flag, announced[0])  # given: not the table's
    ckpt = load_checkpoint(base / name)
    assert (ckpt["args"]["clip_coef"], ckpt["args"]["actor"], ckpt["args"]["total_timesteps"]) == (clip, actor, 32)
    assert any("gru" in key for key in ckpt["actor"]) == (actor == "rnn")  # the network that was built
