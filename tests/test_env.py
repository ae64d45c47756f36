"""Environment wrappers of fp3o_smac.py: SMAX (JaxMARL) for real, the StarCraft II process wrapper against a stand-in
with SMAC's API, and (when StarCraft II and smac are installed) one short real-game run."""
import importlib
import os
import signal

import numpy as np
import pytest
import torch
from harness import assert_one_clear_error, describe, exit_of, run_dir, run_script

import fp3o_smac as F

# the SC2 wrapper forks game processes after JAX has started its threads; the stand-in games never touch JAX
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")

E_SMAX = 8  # same batch as the end-to-end runs: the JAX compilation cache is shared


# ---------------------------------------------------------------------------------------------- SMAX
@pytest.fixture(scope="module")
def smax_envs():
    envs = F.make_envs("smax", "2s3z", E_SMAX, 0, torch.device("cpu"))
    yield envs
    envs.close()


def scripted_actions(avail, move=1):
    """Attack the last enemy in range, else move (action `move`, towards the enemy side), else stop (4)."""
    attack = avail[..., 5:]
    k = attack.shape[-1]
    target = 5 + k - 1 - attack.flip(-1).float().argmax(-1)
    fallback = torch.where(avail[..., move], torch.tensor(move), torch.tensor(4))
    return torch.where(attack.any(-1), target, fallback)


@pytest.fixture(scope="module")
def smax_rollout(smax_envs):
    """300 scripted steps; returns the first reset and every step's output (cloned: DLPack tensors are read-only views)."""
    first = {k: v.clone() for k, v in smax_envs.reset(seed=3).items()}
    nxt, steps = first, []
    for _ in range(300):
        actions = scripted_actions(nxt["avail"])
        out = {k: v.clone() for k, v in smax_envs.step(actions).items()}
        steps.append((nxt, actions, out))
        nxt = out
    return first, steps


def test_smax_reset_and_step_shapes(smax_envs, smax_rollout):
    first, steps = smax_rollout
    E, N, A = E_SMAX, smax_envs.n_agents, smax_envs.n_actions
    assert (N, A, smax_envs.idle_action) == (5, 10, 4)  # 2s3z: 5 allies; 4 moves + stop + 5 enemies to attack
    n_obs, S = smax_envs.obs_dim, smax_envs.state_dim
    assert first["obs"].shape == (E, N, n_obs) and first["obs"].dtype == torch.float32
    assert first["state"].shape == (E, N, S)
    assert first["avail"].shape == (E, N, A) and first["avail"].dtype == torch.bool
    assert first["active"].shape == (E, N) and first["active"].bool().all()
    out = steps[0][2]
    for k in ("obs", "state", "avail", "active"):
        assert out[k].shape == first[k].shape, k
    for k in ("reward", "terminated", "truncated", "done", "ep_return", "ep_length", "ep_won"):
        assert out[k].shape == (E,), k
    assert out["terminated"].dtype == torch.bool and out["ep_won"].dtype == torch.bool
    # agent-specific global state: world state (the same for all agents) followed by the agent's own obs
    for o in (first, out):
        assert torch.equal(o["state"][..., S - n_obs :], o["obs"])
        assert torch.equal(o["state"][:, :1, : S - n_obs].expand(E, N, S - n_obs), o["state"][..., : S - n_obs])


def test_smax_dead_agents_are_inactive_and_may_only_idle(smax_rollout):
    _, steps = smax_rollout
    n_dead = 0
    idle = torch.zeros(10, dtype=torch.bool)
    idle[4] = True
    for _, _, out in steps:
        dead = ~out["active"].bool()
        n_dead += int(dead.sum())
        assert (out["avail"][dead] == idle).all(), "a dead agent may only take the idle action 4"
        assert out["avail"][..., 4].all(), "the idle action is always available"
    assert n_dead > 0, "the scripted battles should kill some agents"


def test_smax_episode_statistics_and_wins_are_consistent(smax_rollout):
    first, steps = smax_rollout
    E = first["obs"].shape[0]
    ret, length = torch.zeros(E), torch.zeros(E, dtype=torch.long)
    wins = losses = 0
    for _, _, out in steps:
        ret += out["reward"].float()
        length += 1
        d = out["done"].bool()
        assert torch.equal(out["done"], out["terminated"]) and torch.equal(out["first"], out["done"]) and not out["truncated"].any()
        if d.any():
            assert torch.equal(out["ep_length"][d].long(), length[d])
            assert torch.allclose(out["ep_return"][d].float(), ret[d], rtol=1e-5, atol=1e-5)
            won = out["ep_won"][d]
            # a won battle ends with the win bonus (1) plus damage; a lost or drawn one never reaches 1 in one step
            assert torch.equal(won, out["reward"][d] >= 1.0), (out["reward"][d], won)
            wins, losses = wins + int(won.sum()), losses + int((~won).sum())
            assert out["active"][d].bool().all(), "a finished env starts a fresh episode: everybody alive"
            assert out["avail"][d][..., :4].any(-1).all()
            ret[d], length[d] = 0.0, 0
        assert not out["ep_won"][~d].any()
    assert wins > 0 and losses > 0, f"the scripted policy should win some and lose some battles ({wins} won, {losses} lost)"


def test_smax_get_state_set_state_reproduces_the_next_step(smax_envs):
    nxt = smax_envs.reset(seed=5)
    for _ in range(7):
        nxt = smax_envs.step(scripted_actions(nxt["avail"]))
    saved = smax_envs.get_state()
    actions = scripted_actions(nxt["avail"])
    first = [{k: v.clone() for k, v in smax_envs.step(actions).items()}]
    for _ in range(3):  # a few more steps with random available actions
        a = torch.distributions.Categorical(probs=first[-1]["avail"].float()).sample()
        first.append({k: v.clone() for k, v in smax_envs.step(a).items()})
        first[-1]["_a"] = a
    smax_envs.set_state(saved)
    again = [{k: v.clone() for k, v in smax_envs.step(actions).items()}]
    for ref in first[1:]:
        again.append({k: v.clone() for k, v in smax_envs.step(ref["_a"]).items()})
    for a, b in zip(first, again, strict=True):
        for k in b:
            assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------- StarCraft II wrapper
@pytest.fixture(params=["fp3o_smac", "mappo_smac", "happo_smac", "a2po_smac"])
def S(request):
    """Each SMAC script carries its own copy of the StarCraft II wrapper: every copy is tested."""
    return importlib.import_module(request.param)


class FakeSC2Env:
    """A stand-in with the API of SMAC's StarCraft2Env. Env `index` has episodes of 2 + index % 3 steps, a reward of
    index + 1 per step, and wins when index is even. The last agent dies after the first step (only no-op 0 left).
    obs of agent a = [index, episode, t, a, last action of a]. `crash_flag`: the game process dies (os._exit) at its
    `crash_at`-th step, once (the flag file marks that it happened)."""

    N_AGENTS, N_ACTIONS, OBS, STATE = 3, 6, 5, 4

    def __init__(self, index, crash_flag=None, crash_at=2):
        self.index, self.crash_flag, self.crash_at = index, crash_flag, crash_at
        self.episode, self.t, self.steps = 0, 0, 0
        self.last = np.zeros(self.N_AGENTS)
        self.length = 2 + index % 3

    def get_env_info(self):
        return dict(n_agents=self.N_AGENTS, n_actions=self.N_ACTIONS, obs_shape=self.OBS, state_shape=self.STATE,
                    episode_limit=5)  # fmt: skip

    def reset(self):
        self.episode, self.t, self.last = self.episode + 1, 0, np.zeros(self.N_AGENTS)
        return self.get_obs(), self.get_state()

    def step(self, actions):
        self.steps += 1
        if self.crash_flag and self.steps == self.crash_at and not os.path.exists(self.crash_flag):
            open(self.crash_flag, "w").close()
            os._exit(1)
        actions = np.asarray(actions)
        assert actions.shape == (self.N_AGENTS,)
        self.last = actions.astype(float)
        self.t += 1
        terminated = self.t >= self.length
        return float(self.index + 1), terminated, ({"battle_won": self.index % 2 == 0} if terminated else {})

    def get_obs(self):
        return [np.array([self.index, self.episode, self.t, a, self.last[a]], np.float32) for a in range(self.N_AGENTS)]

    def get_state(self):
        return np.array([self.index, self.t, -1, -2], np.float32)

    def get_avail_actions(self):
        alive = [0, 1, 1, 1, 1, 1]
        dead = [1, 0, 0, 0, 0, 0]
        return [dead if (a == self.N_AGENTS - 1 and self.t >= 1) else alive for a in range(self.N_AGENTS)]

    def close(self):
        pass


def policy(out):
    """Alive agents take action 1 + agent index, dead ones no-op 0."""
    n = out["obs"].shape[1]
    act = torch.arange(1, n + 1).expand(out["obs"].shape[0], n).clone()
    act[~out["active"].bool()] = 0
    return act


def test_sc2_envs_shapes_masks_and_episode_statistics(S):
    E = 3
    envs = S.SC2Envs(lambda i: FakeSC2Env(i), E, torch.device("cpu"))
    try:
        N, n_obs = FakeSC2Env.N_AGENTS, FakeSC2Env.OBS
        assert (envs.n_agents, envs.n_actions, envs.idle_action) == (N, FakeSC2Env.N_ACTIONS, 0)
        assert (envs.obs_dim, envs.state_dim) == (n_obs, FakeSC2Env.STATE + n_obs)
        out = envs.reset(seed=0)
        assert out["obs"].shape == (E, N, n_obs) and out["obs"].dtype == torch.float32
        assert out["state"].shape == (E, N, FakeSC2Env.STATE + n_obs) and out["state"].dtype == torch.float32
        assert out["avail"].shape == (E, N, FakeSC2Env.N_ACTIONS) and out["avail"].dtype == torch.bool
        assert out["active"].shape == (E, N) and out["active"].bool().all()
        assert out["obs"][:, 0, 0].tolist() == [0, 1, 2], "env i is game i"
        assert out["obs"][:, 0, 2].tolist() == [0, 0, 0]
        t = np.zeros(E, int)
        episodes_done = np.zeros(E, int)
        for step in range(12):
            actions = policy(out)
            out = envs.step(actions)
            t += 1
            lengths = np.array([2 + i % 3 for i in range(E)])
            done = t >= lengths
            for k in ("reward", "terminated", "truncated", "done", "ep_return", "ep_length", "ep_won"):
                assert out[k].shape == (E,), k
            assert out["done"].tolist() == done.tolist(), f"step {step}"
            assert torch.equal(out["first"], out["done"]), "without crashes a new episode starts where one finished"
            assert out["reward"].tolist() == [1.0, 2.0, 3.0]
            assert not out["truncated"].any()
            for i in np.flatnonzero(done):
                assert int(out["ep_length"][i]) == lengths[i]
                assert float(out["ep_return"][i]) == pytest.approx((i + 1) * lengths[i])
                assert bool(out["ep_won"][i]) == (i % 2 == 0)
                episodes_done[i] += 1
            assert not out["ep_won"][~torch.as_tensor(done)].any()
            t[done] = 0
            # finished envs reset themselves: the obs is the new episode's first
            assert out["obs"][:, 0, 2].tolist() == t.tolist()
            assert out["obs"][:, 0, 1].tolist() == (episodes_done + 1).tolist()
            # the actions reached the right game and agent (a reset clears them)
            for i in range(E):
                if t[i] > 0:
                    assert out["obs"][i, :, 4].tolist() == actions[i].tolist()
            # the last agent is dead after the first step of an episode: only no-op, active 0
            expect_active = torch.ones(E, N, dtype=torch.bool)
            expect_active[torch.as_tensor(t >= 1), N - 1] = False
            assert torch.equal(out["active"].bool(), expect_active)
            dead = ~out["active"].bool()
            assert out["avail"][dead][:, 0].all() and out["avail"][dead].sum(-1).eq(1).all()
            # agent-specific state: the game's state followed by the agent's obs
            assert torch.equal(out["state"][..., FakeSC2Env.STATE :], out["obs"])
            assert out["state"][:, :, 1].tolist() == [[float(x)] * N for x in t]
        assert (episodes_done >= 2).all()
    finally:
        envs.close()
    for _, proc in envs.workers:
        proc.join(timeout=5)
        assert not proc.is_alive(), "close() should end the game processes"


def test_sc2_envs_restart_a_crashed_game_and_go_on(S, tmp_path, capfd):
    E = 3
    flag = str(tmp_path / "crashed")
    envs = S.SC2Envs(lambda i: FakeSC2Env(i, crash_flag=flag if i == 1 else None, crash_at=2), E, torch.device("cpu"))
    try:
        out = envs.reset(seed=0)
        old_pid = envs.workers[1][1].pid
        out = envs.step(policy(out))  # game 1: t = 1
        assert out["obs"][1, 0, 2] == 1
        out = envs.step(policy(out))  # game 1 dies inside its second step
        assert os.path.exists(flag), "the stand-in should have crashed"
        assert envs.workers[1][1].pid != old_pid, "the crashed game should run in a new process"
        assert "crash" in capfd.readouterr().err.lower()
        assert out["done"].tolist() == [True, False, False], "a crash is not a finished episode"
        assert out["first"].tolist() == [True, True, False], "but it cuts GAE and the GRU state like one"
        assert out["obs"][1, 0, 2] == 0 and out["obs"][1, 0, 1] == 1, "the restarted game starts a fresh episode"
        assert out["active"][1].bool().all()
        assert out["obs"][2, 0, 2] == 2, "the other games go on"
        # game 1 (length 3) now runs its episode from the restart and reports it in full
        reported = None
        for _ in range(3):
            out = envs.step(policy(out))
            if out["done"][1]:
                reported = (int(out["ep_length"][1]), float(out["ep_return"][1]))
        assert reported == (3, 6.0)
    finally:
        envs.close()


def test_sc2_envs_restart_a_game_that_died_between_steps(S):
    """A game process can also die while it waits for the next command (the OOM killer, a SIGKILL, SC2 taking the
    worker down while the learner updates): the next step must restart it like a crash inside a step."""
    E = 2
    envs = S.SC2Envs(lambda i: FakeSC2Env(i), E, torch.device("cpu"))
    try:
        out = envs.step(policy(envs.reset(seed=0)))
        victim = envs.workers[1][1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=5)
        assert not victim.is_alive()
        out = envs.step(policy(out))  # must not raise (BrokenPipeError)
        assert envs.workers[1][1].pid != victim.pid, "the dead game should run in a new process"
        assert out["obs"][1, 0, 2] == 0 and not out["done"][1] and out["first"][1], "the restarted game starts a fresh episode"
        assert out["obs"][0, 0, 2] == 0 and out["done"][0], "game 0 (length 2) finished its episode as usual"
        out = envs.step(policy(out))
        assert out["obs"][1, 0, 2] == 1
    finally:
        envs.close()


def always_crashing_env(index):
    class Crashing(FakeSC2Env):
        def reset(self):
            os._exit(3)

    return Crashing(index)


def test_sc2_envs_give_up_on_a_game_that_keeps_crashing(S):
    envs = S.SC2Envs(always_crashing_env, 1, torch.device("cpu"))
    try:
        with pytest.raises(RuntimeError, match="crashed"):
            envs.reset(seed=0)
    finally:
        envs.close()


# ---------------------------------------------------------------------------------------------- backend choice
def test_choose_backend_falls_back_to_smax_without_starcraft(tmp_path, monkeypatch):
    monkeypatch.setenv("SC2PATH", str(tmp_path / "no_sc2_here"))
    assert F.sc2_path() is None and F.sc2_build() is None
    assert F.choose_backend("auto", "2s3z") == "smax"
    assert F.choose_backend("auto", "protoss_5_vs_5") == "smax"
    assert F.choose_backend("smax", "2s3z") == "smax"
    assert F.choose_backend("smacv2", "protoss_5_vs_5") == "smacv2"
    (tmp_path / "sc2" / "Versions" / "Base75689").mkdir(parents=True)
    (tmp_path / "sc2" / "Versions" / "Base69232").mkdir(parents=True)
    monkeypatch.setenv("SC2PATH", str(tmp_path / "sc2"))
    assert F.sc2_path() == str(tmp_path / "sc2")
    assert F.sc2_build() == "75689"
    expect = "smac" if F.importable("smac.env") else "smax"  # the game alone is not enough: the package is needed too
    assert F.choose_backend("auto", "3m") == expect


def test_make_envs_rejects_an_unknown_smax_map(capfd):
    proc = exit_of(lambda: F.make_envs("smax", "nope", 2, 0, torch.device("cpu")), capfd)
    assert_one_clear_error(proc, "SMAX has no map 'nope'. SMAX maps: 10m_vs_11m, 25m, 27m_vs_30m, 2s3z,")  # it lists them


# ---------------------------------------------------------------------------------------------- real game
HAVE_SC2 = F.sc2_path() is not None and F.importable("smac.env")


@pytest.mark.skipif(not HAVE_SC2, reason="needs StarCraft II (SC2PATH or ~/StarCraftII) and the smac package")
def test_real_starcraft2_one_iteration(tmp_path):
    proc = run_script(
        "fp3o_smac.py", "--env-backend", "smac", "--map", "3m", "--num-envs", 2, "--num-steps", 8, "--total-timesteps", 16,
        "--eval-interval", 1, "--eval-episodes", 1, "--no-progress-bar", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    assert "backend smac" in proc.stdout
    assert any(run_dir(tmp_path).glob("events.out.tfevents.*"))
