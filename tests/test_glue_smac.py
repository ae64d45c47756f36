"""The glue between the SMAC scripts' algorithm pieces, in process for each of the four scripts: `rollout` (T steps of
SMAX 3m with the GRU actor into the buffer, h0 and the episode starts kept) and `rollout_batch` (GAE on de-normalised
values with its bootstrap, the value normaliser's update, the standardised advantages, the normalised returns), checked
against references written out here; the update's replay of the rollout gives ratio 1 before any step, also on a second
rollout that begins in the middle of episodes. Then one short run per script: the learning-rate flags reach their
optimisers, and `--eval-only` on its checkpoint reports what the run's own last evaluation logged."""
import copy
import dataclasses
import re

import pytest
import torch
from harness import describe, run_dir, run_dirs, run_in_process
from readers import find_checkpoint, load_checkpoint, read_scalars
from references import reference_gae

import a2po_smac
import fp3o_smac
import happo_smac
import mappo_smac

SCRIPTS = {"fp3o": fp3o_smac, "mappo": mappo_smac, "happo": happo_smac, "a2po": a2po_smac}
MAP, E, T, HIDDEN = "3m", 4, 20, 16  # 3m's episodes last 10-20 steps here: starts inside rollouts and across their ends


@dataclasses.dataclass
class Rollout:
    """One rollout() call: what went in (h, start) and everything it returned."""

    h_in: torch.Tensor
    start_in: torch.Tensor
    buf: dict
    rewards: torch.Tensor
    nxt: dict
    h: torch.Tensor
    start: torch.Tensor
    ep_returns: list
    ep_wins: list


@pytest.fixture(scope="module", params=list(SCRIPTS))
def glue(request):
    """A script's SMAX envs, GRU actor, critic and value normaliser (one that has seen returns, so that de-normalising
    is no identity), and two consecutive rollouts of E envs x T steps, the second carrying on the first's h and start."""
    S = SCRIPTS[request.param]
    envs = S.make_envs("smax", MAP, E, 0, torch.device("cpu"))
    torch.manual_seed(0)
    N = envs.n_agents
    actor = S.AgentNet(N, envs.obs_dim, envs.n_actions, HIDDEN, "partial", recurrent=True)
    with torch.no_grad():
        actor.head.weight.mul_(30)  # far from uniform: the log-probabilities depend on the GRU state
    critic = S.AgentNet(N, envs.state_dim, 1, HIDDEN, "full", out_gain=1.0)
    value_norm = S.ValueNorm()
    value_norm.update(torch.tensor([-1.0, 0.5, 3.0]))
    nxt, h, start, rollouts = envs.reset(seed=0), torch.zeros(N, E, HIDDEN), torch.ones(E), []
    for _ in range(2):
        h_in, start_in = h.clone(), start.clone()
        buf, rewards, nxt, h, start, ep_returns, ep_wins = S.rollout(actor, critic, envs, nxt, h, start, T)
        rollouts.append(Rollout(h_in, start_in, buf, rewards, nxt, h, start, ep_returns, ep_wins))
    envs.close()
    yield dict(name=request.param, S=S, actor=actor, critic=critic, value_norm=value_norm, rollouts=rollouts, N=N,
               sizes=(envs.obs_dim, envs.state_dim, envs.n_actions), args=S.Args(gamma=0.97, gae_lambda=0.9))


def batch(glue, r: Rollout, start=None, args=None):
    """rollout_batch on a copy of the fixture's normaliser: (b, the normaliser after it, a2po's trace or None)."""
    norm = copy.deepcopy(glue["value_norm"])
    start = r.start if start is None else start
    out = glue["S"].rollout_batch(r.buf, r.rewards, glue["critic"], norm, r.nxt, start, args or glue["args"])
    b, trace = out if glue["name"] == "a2po" else (out, None)
    return b, norm, trace


def standardized(adv, active):
    """Each agent's advantages standardised over its active samples (population std, eps 1e-8)."""
    out = torch.empty_like(adv)
    for i in range(adv.shape[1]):
        a = adv[:, i][active[:, i].bool()]
        out[:, i] = (adv[:, i] - a.mean()) / (a.std(unbiased=False) + 1e-8)
    return out


def expected_batch(glue, r: Rollout, start):
    """From the rollout's pieces: the critic's de-normalised V of the states after the rollout, the reference GAE, and
    a copy of the fixture's normaliser updated with the active samples' returns."""
    norm = copy.deepcopy(glue["value_norm"])
    with torch.no_grad():
        next_value = norm.denormalize(glue["critic"](r.nxt["state"].transpose(0, 1)[None])[0][0, ..., 0])
    a, values, N = glue["args"], norm.denormalize(r.buf["values"]), glue["N"]
    per_sample = lambda x: x[:, None].expand(-1, N, -1).reshape(len(x), N * E)  # [T, E] -> [T, N * E]: the team's
    adv, returns = reference_gae(per_sample(r.rewards), values.reshape(T, N * E), per_sample(r.buf["starts"]),
                                 next_value.reshape(N * E), start.repeat(N), a.gamma, a.gae_lambda)
    adv, returns = adv.view(T, N, E).float(), returns.view(T, N, E).float()
    norm.update(returns[r.buf["active"].bool()])
    return next_value, adv, returns, norm


def update(glue, actor, critic, opts, b, trace, args):
    """The script's whole update of one iteration on b."""
    S, name = glue["S"], glue["name"]
    if name == "a2po":
        return S.a2po_update(actor, critic, opts, b, trace, copy.deepcopy(glue["value_norm"]), args)
    return getattr(S, f"{name}_update")(actor, critic, opts, b, args)


# ---------------------------------------------------------------------------------------------- rollout
def test_rollout_fills_the_buffer_from_where_the_last_one_stopped(glue):
    first, second = glue["rollouts"]
    N = glue["N"]
    # the situation the tests below rely on: episodes start inside both rollouts, the second begins mid-episode
    for r in (first, second):
        assert r.buf["starts"][1:].sum() > 0 and (r.buf["active"] == 0).any()
        obs, state, actions = glue["sizes"]
        assert {k: v.shape for k, v in r.buf.items()} == dict(
            obs=(T, N, E, obs), state=(T, N, E, state), avail=(T, N, E, actions), actions=(T, N, E), logp=(T, N, E),
            values=(T, N, E), active=(T, N, E), starts=(T, E), h0=(N, E, HIDDEN))
        # actions are indices, avail a mask, the rest float32
        assert {k: v.dtype for k, v in r.buf.items()} == {**dict.fromkeys(r.buf, torch.float32), "actions": torch.long,
                                                          "avail": torch.bool}
    assert (second.start_in == 0).any() and second.h_in.abs().sum() > 0
    # the buffer's first step is the observation, h and start it was handed; the second continues the first
    assert torch.equal(first.buf["starts"][0], torch.ones(E)) and torch.equal(first.buf["h0"], torch.zeros(N, E, HIDDEN))
    assert torch.equal(second.buf["h0"], first.h) and torch.equal(second.buf["starts"][0], first.start)
    for k in ("obs", "state", "avail"):
        assert torch.equal(second.buf[k][0], first.nxt[k].transpose(0, 1)), k
    assert torch.equal(second.buf["active"][0], first.nxt["active"].transpose(0, 1).float())
    # h after the rollout is the GRU's state after its last step: replaying the rollout from h0 ends there
    with torch.no_grad():
        _, h_end = glue["actor"](second.buf["obs"], second.buf["h0"], second.buf["starts"])
    torch.testing.assert_close(h_end, second.h, rtol=0, atol=1e-6)
    # every episode that ended is reported once, with its win; values are the critic's (normalised) V(s, o^i)
    for r in (first, second):
        ended = int(r.buf["starts"][1:].sum() + r.start.sum())
        assert len(torch.cat(r.ep_returns)) == len(torch.cat(r.ep_wins)) == ended
        with torch.no_grad():
            torch.testing.assert_close(r.buf["values"], glue["critic"](r.buf["state"])[0][..., 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("which", [0, 1], ids=["first_rollout", "second_rollout"])
def test_replay_from_h0_and_the_starts_gives_the_rollouts_log_probabilities(glue, which):
    r = glue["rollouts"][which]
    b, _, _ = batch(glue, r)
    S, actor = glue["S"], glue["actor"]
    torch.testing.assert_close(S.rollout_logp(actor, b), r.buf["logp"], rtol=0, atol=1e-5)
    if which == 1:  # the check is sharp: from a zero state, or without the starts, the log-probabilities differ
        zero = S.evaluate_actions(actor, b["obs"], b["avail"], b["actions"], torch.zeros_like(b["h0"]), b["starts"])[0]
        no_starts = S.evaluate_actions(actor, b["obs"], b["avail"], b["actions"], b["h0"], torch.zeros_like(b["starts"]))[0]
        assert (zero - r.buf["logp"]).abs().max() > 1e-2 and (no_starts - r.buf["logp"]).abs().max() > 1e-2


@pytest.mark.parametrize("which", [0, 1], ids=["first_rollout", "second_rollout"])
def test_the_update_replays_the_rollout_with_ratio_one_before_any_step(glue, which):
    """With learning rates 0 nothing moves, so every ratio the update computes must be 1: with a clip range of 1e-5 the
    logged clip fraction counts the samples whose replay differs from the rollout (GRU state, starts, minibatches)."""
    b, _, trace = batch(glue, glue["rollouts"][which])
    actor, critic = copy.deepcopy(glue["actor"]), copy.deepcopy(glue["critic"])
    opts = [torch.optim.Adam(net.parameters(), lr=0.0) for net in (actor, critic)]
    args = dataclasses.replace(glue["args"], clip_coef=1e-5, num_minibatches=2, update_epochs=1)
    stats, _ = update(glue, actor, critic, opts, b, trace, args)
    _, _, _, approx_kl, clipfrac = stats.tolist()
    assert clipfrac == 0.0 and abs(approx_kl) < 1e-9


# ---------------------------------------------------------------------------------------------- batch
@pytest.mark.parametrize("cut", [False, True], ids=["rollout_start", "episodes_start_after"])
def test_gae_bootstraps_from_the_critics_next_value_cut_where_an_episode_starts(glue, cut):
    r = glue["rollouts"][1]
    start = r.start.clone()
    if cut:  # some environments begin a new episode right after the rollout: no bootstrap there
        start[::2] = 1.0
    next_value, adv, returns, norm = expected_batch(glue, r, start)
    assert next_value.abs().min() > 1e-2, "a bootstrap of zero would pass unnoticed"
    torch.testing.assert_close(returns[-1], r.rewards[-1] + glue["args"].gamma * next_value * (1 - start))
    b, _, trace = batch(glue, r, start)
    torch.testing.assert_close(b["returns_n"], norm.normalize(returns), rtol=1e-5, atol=1e-5)
    if trace is not None:  # A2PO's PreOPC inputs: the same rewards, de-normalised values, starts and bootstrap
        rewards, values, starts, next_v, next_start = trace
        assert torch.equal(rewards[:, 0], r.rewards) and torch.equal(starts[:, 0], r.buf["starts"])
        torch.testing.assert_close(values, glue["value_norm"].denormalize(r.buf["values"]))
        torch.testing.assert_close(next_v, next_value)
        torch.testing.assert_close(next_start[0], start)


def test_value_normaliser_takes_in_the_active_returns_before_it_normalises_them(glue):
    r = glue["rollouts"][0]
    _, _, returns, expected_norm = expected_batch(glue, r, r.start)
    b, norm, _ = batch(glue, r)
    for name in ("mean", "mean_sq", "debias"):
        torch.testing.assert_close(getattr(norm, name), getattr(expected_norm, name), rtol=1e-6, atol=0, msg=name)
    torch.testing.assert_close(b["returns_n"], expected_norm.normalize(returns), rtol=1e-5, atol=1e-5)
    old = glue["value_norm"].normalize(returns)  # normalised before the update: measurably different
    assert (old - b["returns_n"]).abs().max() > 1e-3


def test_advantages_are_standardised_per_agent_over_active_samples_and_the_rest_is_the_rollout(glue):
    r = glue["rollouts"][1]
    _, adv, _, _ = expected_batch(glue, r, r.start)
    b, _, _ = batch(glue, r)
    torch.testing.assert_close(b["adv"], standardized(adv, r.buf["active"]), rtol=1e-4, atol=1e-4)
    assert b.keys() == {*r.buf, "adv", "returns_n"}
    assert all(b[k] is v for k, v in r.buf.items())  # the buffer itself, h0 included


@pytest.mark.parametrize("glue", ["fp3o"], indirect=True)
def test_fp3o_random_split_weighs_every_sample_with_dirichlet_weights_over_the_agents(glue):
    r, N = glue["rollouts"][1], glue["N"]
    _, adv, _, _ = expected_batch(glue, r, r.start)
    torch.manual_seed(3)
    b, _, _ = batch(glue, r, args=dataclasses.replace(glue["args"], advantage_split="random"))
    torch.manual_seed(3)
    weights = torch.distributions.Dirichlet(torch.ones(E, N)).sample((T,)).transpose(1, 2)  # F.4: [T, N, E], sum 1 over N
    torch.testing.assert_close(b["adv"], standardized(adv * weights, r.buf["active"]), rtol=1e-4, atol=1e-4)
    assert (b["adv"] - batch(glue, r)[0]["adv"]).abs().max() > 0.1  # the average split, A / n, standardises to A's


# ---------------------------------------------------------------------------------------------- short runs
LR, CRITIC_LR = 3e-2, 3e-3  # a policy that moves in two iterations: its greedy evaluation differs from the first one's
RUN = ["--map", MAP, "--env-backend", "smax", "--num-envs", 4, "--num-steps", 8, "--total-timesteps", 64, "--seed", 2,
       "--hidden-size", 16, "--update-epochs", 4, "--eval-interval", 1, "--eval-episodes", 16, "--save-model",
       "--learning-rate", LR, "--critic-learning-rate", CRITIC_LR, "--torch-threads", 1, "--no-progress-bar"]


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_short_run_sets_both_learning_rates_and_eval_only_reports_its_last_evaluation(name, tmp_path, monkeypatch, capfd):
    """Two iterations, in process as `python script.py ...` runs them, evaluated after each: the checkpoint's Adams
    carry --learning-rate (actor) and --critic-learning-rate (critic); then --eval-only on the checkpoint prints the
    win rate and return that the run logged at its last evaluation."""
    script = f"{name}_smac.py"
    train = run_in_process(script, *RUN, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert train.returncode == 0, describe(train)
    ckpt = load_checkpoint(tmp_path)
    assert [ckpt[k]["param_groups"][0]["lr"] for k in ("actor_opt", "critic_opt")] == [LR, CRITIC_LR]
    logged = read_scalars(run_dir(tmp_path))
    assert [v for _, v in logged["charts/learning_rate"]] == pytest.approx([LR, LR], rel=1e-6)
    (first, _), (last, ret) = logged["eval/episodic_return"]
    assert (first, last) == (32, 64) and ret != logged["eval/episodic_return"][0][1], "evaluations that tell policies apart"
    (tmp_path / "eval").mkdir()
    evaluation = run_in_process(script, "--resume", find_checkpoint(tmp_path), "--eval-only", "--no-progress-bar",
                                cwd=tmp_path / "eval", monkeypatch=monkeypatch, capfd=capfd)
    assert evaluation.returncode == 0, describe(evaluation)
    m = re.search(r"eval: win_rate ([0-9.]+), episodic_return (-?[0-9.]+) over 16 episodes", evaluation.stdout)
    assert m, describe(evaluation)
    assert float(m.group(1)) == pytest.approx(logged["eval/win_rate"][-1][1], abs=5e-4)
    assert float(m.group(2)) == pytest.approx(ret, abs=5e-4)
    assert not run_dirs(tmp_path / "eval"), "--eval-only starts no run"
