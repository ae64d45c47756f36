"""Checkpoints in all six scripts are safe to open. load_checkpoint unpickles tensors, numbers, strings and containers
only (torch.load's weights_only), so a file holding any other object is refused with one `error:` line before anything
in it runs; what the scripts save is that plain (random states, the SMAX carry's leaves, the MaMuJoCo simulator states
and the MPE worlds included); a checkpoint of the older format (pickled numpy, jaxmarl or mpe2 objects) is one line that
says how to convert it, and the conversion it gives yields the checkpoint the script writes now; a checkpoint lacking a
field that __main__ reads is one line, not a KeyError. SMAX's jax does not preallocate the GPU, and its observations
reach torch through DLPack without a copy.

The checkpoints are those of one-iteration runs of each script, in process. Exact resume from them is tested by the
resume tests of test_smac_e2e.py, test_fp3o_mamujoco.py and test_ippo_mpe.py; CUDA's random state (`rng` `cuda`) by
test_device.py."""
import importlib
import os
import pickle
import re
import runpy
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import ROOT
from harness import assert_one_clear_error, exit_of, run_in_process
from readers import assert_same_tree

SMAC = ["fp3o_smac", "mappo_smac", "happo_smac", "a2po_smac"]
SCRIPTS = [*SMAC, "fp3o_mamujoco", "ippo_mpe"]
TINY = {  # one iteration of each script
    **{s: ["--map", "3m", "--num-envs", 2, "--num-steps", 4, "--total-timesteps", 8] for s in SMAC},
    "fp3o_mamujoco": ["--scenario", "Hopper", "--agent-conf", "3x1", "--agent-obsk", 1, "--num-envs", 2, "--num-steps", 8,
                      "--num-minibatches", 1, "--total-timesteps", 16, "--max-episode-steps", 5],
    "ippo_mpe": ["--env", "simple_reference_v3", "--num-envs", 2, "--num-steps", 5, "--total-timesteps", 10,
                 "--max-cycles", 7],
}
COMMON = ["--eval-interval", 0, "--save-model", "--no-progress-bar", "--torch-threads", 1]
# the fields --eval-only reads; a resumed run reads every field a run saves (but actor_steps, which older runs lacked)
EVAL_FIELDS = {**{s: ["args", "run_name", "actor", "global_step"] for s in [*SMAC, "ippo_mpe"]},
               "fp3o_mamujoco": ["args", "run_name", "actor", "obs_norm", "global_step"]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """saved(script): the path of the checkpoint that one iteration of `script` wrote, run as __main__ in this process
    when first asked for."""
    paths = {}

    def path(script):
        if script not in paths:
            cwd = tmp_path_factory.mktemp(script)
            with pytest.MonkeyPatch.context() as patch:
                patch.chdir(cwd)
                patch.setattr("sys.argv", [f"{script}.py", *map(str, TINY[script] + COMMON)])
                runpy.run_path(str(ROOT / f"{script}.py"), run_name="__main__")
            (paths[script],) = cwd.glob("runs/*/checkpoint.pt")
        return paths[script]

    return path


PLAIN = {dict, OrderedDict, list, tuple, torch.Tensor, str, int, float, bool, type(None)}  # what weights_only unpickles


def plain_types(x) -> set:
    """The types in a nested checkpoint, containers included."""
    inner = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ()
    return {type(x)}.union(*map(plain_types, inner))


def one_error(capfd, call) -> str:
    """The one `error:` line that `call` ends with (exit status 2, no traceback)."""
    proc = exit_of(call, capfd)
    assert_one_clear_error(proc)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr.strip()


class RunsCode:
    """Unpickled, it runs code: the code creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_in_it_runs(tmp_path, capfd, monkeypatch, script):
    marker, path = tmp_path / "ran", tmp_path / "shared.pt"
    torch.save({"args": {}, "run_name": "x", "global_step": 0, "actor": {"w": torch.zeros(2)}, "gift": RunsCode(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.exists(), "the crafted file runs code when it is unpickled"
    marker.unlink()
    m = importlib.import_module(script)
    line = one_error(capfd, lambda: m.load_checkpoint(str(path), eval_only=True))
    assert "would run as code (builtins.exec)" in line and "refused" in line and "convert" not in line, line
    proc = run_in_process(f"{script}.py", "--resume", path, "--eval-only", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert_one_clear_error(proc, "would run as code")
    assert not marker.exists(), "loading the checkpoint ran the code in it"


@pytest.mark.parametrize("script", SCRIPTS)
def test_what_a_run_saves_is_plain_and_loads_safely(saved, script):
    ckpt = importlib.import_module(script).load_checkpoint(str(saved(script)))
    assert plain_types(ckpt) <= PLAIN, plain_types(ckpt)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(saved(script)) == []
    assert ckpt["rng"]["cuda"] is None, "CUDA's random state: none on the CPU"
    assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python"}
    state = ckpt["rng"]["numpy"]  # np.random.set_state takes it as it is
    np.random.set_state(state)
    assert np.array_equal(np.random.get_state()[1], state[1].numpy()) and state[1].dtype == torch.int64
    if script in SMAC:  # the SMAX carry's leaves: the PRNG keys (uint32 in jax) as int64
        assert all(torch.is_tensor(x) for x in ckpt["env_state"]) and ckpt["env_state"][0].dtype == torch.int64


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_lacking_a_field_is_one_error(saved, tmp_path, capfd, monkeypatch, script):
    m, full = importlib.import_module(script), torch.load(saved(script), weights_only=True)
    fields = [k for k in full if k != "actor_steps"] + ["rng.torch", "rng.numpy", "rng.python"]
    for field in fields:
        ckpt = {**full, "rng": dict(full["rng"])}
        del (ckpt["rng"] if field.startswith("rng.") else ckpt)[field.removeprefix("rng.")]
        path, named = str(tmp_path / f"{field}.pt"), "rng.torch, rng.numpy, rng.python" if field == "rng" else field
        torch.save(ckpt, path)
        assert f"lacks {named}: " in one_error(capfd, lambda path=path: m.load_checkpoint(path)), field
        if field in EVAL_FIELDS[script]:
            assert f"lacks {field}: " in one_error(capfd, lambda path=path: m.load_checkpoint(path, eval_only=True)), field
        else:  # --eval-only does without it
            assert m.load_checkpoint(path, eval_only=True)["actor"].keys() == full["actor"].keys()
    args = ["--resume", tmp_path / "critic_opt.pt", "--total-timesteps", 10**6]  # as __main__: no KeyError traceback
    proc = run_in_process(f"{script}.py", *args, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert_one_clear_error(proc, "lacks critic_opt")


def older_format(script, ckpt: dict) -> dict:
    """`ckpt` as the scripts saved it before checkpoints were plain: numpy's random state with its numpy key; the SMAX
    carry as pickled jaxmarl classes; MaMuJoCo's simulator states and episode counters as numpy arrays; each MPE world
    pickled (with its env's generator and step count) into bytes."""
    m, old = importlib.import_module(script), {**ckpt, "rng": dict(ckpt["rng"])}
    kind, key, *rest = ckpt["rng"]["numpy"]
    old["rng"]["numpy"] = (kind, key.numpy().astype(np.uint32), *rest)
    a = ckpt["args"]
    if script in SMAC:
        del old["rng"]["cuda"]
        envs = m.SmaxEnvs(a["map"], a["num_envs"], torch.device("cpu"))
        envs.reset(seed=0)
        fresh, tree = envs.jax.tree.flatten(envs.carry)
        leaves = zip(ckpt["env_state"], fresh, strict=True)
        old["env_state"] = tree.unflatten([np.asarray(x.numpy(), y.dtype) for x, y in leaves])
    elif script == "fp3o_mamujoco":
        sims = tuple({**sim, "mj": sim["mj"].numpy()} for sim in ckpt["env_state"]["sim"])  # get_attr gives a tuple
        old["env_state"] = {"sim": sims, **{k: ckpt["env_state"][k].numpy() for k in ("ep_return", "ep_length")}}
    else:
        envs = m.MpeEnvs(a["env"], a["num_envs"], m.env_options(m.Args(**a)))
        envs.reset(seed=99)
        envs.set_state(ckpt["env_state"])
        worlds = [pickle.dumps((e.unwrapped.world, e.unwrapped.np_random, e.unwrapped.steps)) for e in envs.envs]
        old["env_state"] = {"worlds": worlds, **{k: ckpt["env_state"][k].numpy() for k in ("ep_return", "ep_length")}}
    return old


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_older_checkpoint_is_one_line_whose_conversion_gives_todays_checkpoint(saved, tmp_path, capfd, script):
    m, ckpt = importlib.import_module(script), torch.load(saved(script), weights_only=True)
    path = str(tmp_path / "old.pt")
    torch.save(older_format(script, ckpt), path)
    line = one_error(capfd, lambda: m.load_checkpoint(path, eval_only=True))
    assert "older version's checkpoint" in line and "train again" in line and f"--resume {path}.new" in line, line
    (code,) = re.findall(r'python -c "(.*)"$', line)
    exec(code, {})  # what the line tells a user who trusts the file to run
    converted = m.load_checkpoint(path + ".new")
    if script in SMAC:  # the older format had no CUDA state
        converted["rng"]["cuda"] = None
    scores = ("win_rate",) if script in SMAC else ("last_return",)  # NaN in a run this short: compared as strings
    assert [str(converted.pop(k)) for k in scores] == [str(ckpt.pop(k)) for k in scores]
    assert_same_tree(converted, ckpt, "checkpoint")
    if script == "ippo_mpe":  # the world was rebuilt from its pickle: its state, converted again, is the same
        envs = m.MpeEnvs(ckpt["args"]["env"], ckpt["args"]["num_envs"], m.env_options(m.Args(**ckpt["args"])))
        envs.reset(seed=5)
        envs.set_state(converted["env_state"])
        assert_same_tree(envs.get_state(), ckpt["env_state"], "env_state")


@pytest.mark.parametrize("env_id", ["simple_spread_v3", "simple_reference_v3", "simple_speaker_listener_v4"])
def test_mpe_worlds_are_saved_plain_and_restored_into_fresh_envs(env_id):
    """Every MPE task: a world saved mid-episode and put into envs reset with another seed continues the same episodes,
    goals (other entities, saved as their index) included."""
    m = importlib.import_module("ippo_mpe")
    options = m.env_options(m.Args(env=env_id, max_cycles=6))
    a, b = m.MpeEnvs(env_id, 2, options), m.MpeEnvs(env_id, 2, options)
    a.reset(seed=1), b.reset(seed=2)
    rng = np.random.default_rng(0)
    actions = [rng.integers(0, 3, size=(2, a.n_agents)) for _ in range(10)]
    for act in actions[:3]:
        a.step(act)
    state = a.get_state()
    assert plain_types(state) <= PLAIN, plain_types(state)
    b.set_state(state)
    goals = [(e.name, getattr(vars(e).get("_goal_a"), "name", None)) for e in b.envs[0].unwrapped.world.entities]
    assert goals == [(e.name, getattr(vars(e).get("_goal_a"), "name", None)) for e in a.envs[0].unwrapped.world.entities]
    for act in actions[3:]:  # across the automatic reset after 6 steps
        x, y = a.step(act), b.step(act)
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("script", SMAC)
def test_smax_leaves_the_gpu_to_torch_and_shares_observations_through_dlpack(monkeypatch, script):
    m = importlib.import_module(script)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "unset below")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE")
    jax = m.import_smax()[0]
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false", "jax would take 75% of a GPU at its first SMAX call"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    m.import_smax()
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true", "a user's own setting wins"
    envs = m.SmaxEnvs("3m", 2, torch.device("cpu"))
    x = jax.numpy.arange(6.0).reshape(2, 3)
    assert envs._torch(x).data_ptr() == x.unsafe_buffer_pointer(), "the observations reach torch without a copy"
