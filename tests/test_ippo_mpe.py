"""ippo_mpe.py: the MPE wrapper (padding, masking, truncation, state), the networks under each sharing mode, the IPPO
loss and update, the rollout and its batch (GAE with time-limit bootstrapping) in process; short end-to-end runs on
every task and sharing mode, exact resume, evaluation of a saved model and a non-finite loss (subprocesses); bad input
in test_bad_input.py."""
import copy
import math
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from harness import Job, assert_one_clear_error, describe, exit_of, keep_copy, ran_ok, run_dir, run_dirs, run_scripts
from mpe2 import simple_speaker_listener_v4, simple_spread_v3
from readers import assert_same_state_dict, assert_same_training_state, find_checkpoint, load_checkpoint, read_scalars
from references import assert_agent_steps_alone, clip_active, clipped_value_loss, ppo_clip
from video import EndingAt, assert_videos, assert_watchable

import ippo_mpe as M

SCRIPT = "ippo_mpe.py"
CPU = torch.device("cpu")
EPS = 0.2
SPREAD, REFERENCE, LISTENER = "simple_spread_v3", "simple_reference_v3", "simple_speaker_listener_v4"


def opts(**kw):
    return {"max_cycles": 25, "continuous_actions": False, **kw}


# ---------------------------------------------------------------------------------------------- environments
def test_heterogeneous_observations_are_zero_padded_to_the_widest_agent():
    envs = M.MpeEnvs(LISTENER, 2, opts())
    assert (envs.agents, envs.obs_dims, envs.act_dims) == (["speaker_0", "listener_0"], [3, 11], [3, 5])
    obs = envs.reset(seed=7)
    assert obs.shape == (2, 2, 11) and obs.dtype == torch.float32
    for i in range(2):  # the same seeds by hand
        ref, _ = simple_speaker_listener_v4.parallel_env().reset(seed=7 + i)
        assert torch.equal(obs[i, 0, :3], torch.from_numpy(ref["speaker_0"]))
        assert torch.equal(obs[i, 0, 3:], torch.zeros(8)), "padding is zeros"
        assert torch.equal(obs[i, 1], torch.from_numpy(ref["listener_0"]))


@pytest.mark.parametrize("continuous", [False, True])
def test_avail_marks_each_agents_own_actions(continuous):
    envs = M.MpeEnvs(LISTENER, 1, opts(continuous_actions=continuous))
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(envs.avail, expected)
    assert torch.equal(M.MpeEnvs(REFERENCE, 1, opts()).avail, torch.ones(2, 50, dtype=torch.bool))


@pytest.mark.parametrize("sharing", ["full", "partial", "none"])
def test_padded_actions_are_never_chosen(sharing):
    """Even when the network prefers a padded action, its probability is exactly 0 (logit -1e10); the entropy is over
    the agent's own actions only."""
    avail = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    actor = M.Actor(2, 11, avail, 16, sharing)
    with torch.no_grad():
        actor.head.bias[..., 3:] = 50.0  # unmasked, actions 3 and 4 would take almost all the mass
    obs = torch.randn(2, 4000, 11)
    dist = actor.dist(obs)
    assert torch.equal(dist.probs[0, :, 3:], torch.zeros(4000, 2))
    assert (dist.probs[1, :, 3:].sum(-1) > 0.99).all(), "the listener's own actions 3, 4 are not masked"
    actions, logp = actor.act(obs)
    assert actions[0].max() < 3 and actions[1].max() == 4 and torch.isfinite(logp).all()
    greedy, _ = actor.act(obs, deterministic=True)
    assert greedy[0].max() < 3
    with torch.no_grad():
        actor.head.weight.zero_(), actor.head.bias.zero_()  # uniform over the available actions
    _, entropy = actor.log_prob_entropy(actor.dist(obs), actions)
    torch.testing.assert_close(entropy[0], torch.full((4000,), math.log(3)))
    torch.testing.assert_close(entropy[1], torch.full((4000,), math.log(5)))


@pytest.mark.parametrize("sharing", ["full", "none"])
def test_gaussian_policy_ignores_padded_action_dimensions(sharing):
    avail = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    actor = M.Actor(2, 11, avail, 16, sharing, continuous=True)
    obs = torch.randn(2, 50, 11)
    dist = actor.dist(obs)
    std = 0.5 * torch.sigmoid(torch.tensor(1.0))  # std = 0.5 sigmoid(theta), theta initialised to 1
    torch.testing.assert_close(dist.stddev, torch.full_like(dist.stddev, std.item()))
    actions, logp = actor.act(obs)
    changed = actions.clone()
    changed[0, :, 3:] += 100.0  # the speaker's padded dimensions
    logp2, entropy = actor.log_prob_entropy(dist, changed)
    torch.testing.assert_close(logp2, logp)
    own = torch.distributions.Normal(dist.mean[0, :, :3], std).log_prob(actions[0, :, :3]).sum(-1)
    torch.testing.assert_close(logp[0], own)
    per_dim = 0.5 + 0.5 * math.log(2 * math.pi) + math.log(std)
    torch.testing.assert_close(entropy, torch.tensor([3 * per_dim, 5 * per_dim])[:, None].expand(2, 50))
    greedy, _ = actor.act(obs, deterministic=True)
    torch.testing.assert_close(greedy, dist.mean)


def test_step_truncates_at_max_cycles_and_hands_back_the_final_observation():
    """Against mpe2's parallel_env stepped by hand with the same seeds and actions (the wrapper drives the AEC API):
    per-agent rewards, the time limit as a truncation (not a termination), the final observation before the
    automatic reset, the episode's return and length."""
    E, T = 2, 3
    envs = M.MpeEnvs(SPREAD, E, opts(max_cycles=T))
    refs = [simple_spread_v3.parallel_env(max_cycles=T) for _ in range(E)]
    obs = envs.reset(seed=3)
    ref_obs = [r.reset(seed=3 + i)[0] for i, r in enumerate(refs)]
    agents = refs[0].possible_agents
    for i in range(E):
        assert torch.equal(obs[i], torch.from_numpy(np.stack([ref_obs[i][a] for a in agents])))
    rng, totals = np.random.default_rng(0), np.zeros(E)
    for t in range(T):
        actions = rng.integers(0, 5, size=(E, 3))
        out = envs.step(actions)
        for i, ref in enumerate(refs):
            o, r, term, trunc, _ = ref.step({a: int(actions[i, j]) for j, a in enumerate(agents)})
            assert out["reward"][i].tolist() == pytest.approx([r[a] for a in agents])
            totals[i] += np.mean([r[a] for a in agents])
            assert not any(term.values()) and bool(out["terminated"][i]) is False
            assert bool(out["truncated"][i]) == all(trunc.values()) == (t == T - 1)
            stacked = torch.from_numpy(np.stack([o[a] for a in agents]))
            if t < T - 1:
                assert torch.equal(out["obs"][i], stacked)
            else:
                assert torch.equal(out["final_obs"][i], stacked), "final observation of the truncated episode"
                first = ref.reset()[0]
                new = torch.from_numpy(np.stack([first[a] for a in agents]))
                assert torch.equal(out["obs"][i], new), "the next episode's first observation"
                assert not torch.equal(out["obs"][i], stacked)
        assert out["done"].tolist() == [t == T - 1] * E
    assert out["ep_return"].tolist() == pytest.approx(totals.tolist(), rel=1e-5)
    assert out["ep_length"].tolist() == [T] * E
    out = envs.step(np.zeros((E, 3), np.int64))
    assert not out["done"].any() and (out["ep_return"] == 0).all(), "statistics only where an episode ended"


@pytest.mark.parametrize("env_id", [SPREAD, LISTENER])
def test_env_state_round_trip_continues_the_same_episodes(env_id):
    """get_state/set_state (checkpoints): restored into envs that were reset with another seed, the same actions give
    the same observations and rewards, also across the automatic reset."""
    a, b = M.MpeEnvs(env_id, 3, opts(max_cycles=4)), M.MpeEnvs(env_id, 3, opts(max_cycles=4))
    a.reset(seed=1), b.reset(seed=99)
    rng = np.random.default_rng(1)
    actions = [rng.integers(0, 3, size=(3, a.n_agents)) for _ in range(12)]
    for act in actions[:2]:
        a.step(act)
    b.set_state(copy.deepcopy(a.get_state()))
    for act in actions[2:]:
        x, y = a.step(act), b.step(act)
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_continuous_actions_reach_the_env_clipped_and_without_padding():
    envs = M.MpeEnvs(LISTENER, 2, opts(continuous_actions=True))
    envs.reset(seed=0)
    actions = np.full((2, 2, 5), 7.0, np.float32)  # out of [0, 1], with padded dimensions for the speaker
    out = envs.step(actions)  # mpe2's wrapper would warn on out-of-bound actions and fail on a wrong shape
    assert torch.isfinite(out["obs"]).all()
    comm = envs.envs[0].unwrapped.world.agents[0].state.c
    assert np.allclose(comm, 1.0), f"the speaker's message should be the clipped action: {comm}"


def test_env_options_and_errors(capfd):
    assert M.env_options(M.Args(env=SPREAD, num_agents=4, local_ratio=0.2)) == opts(N=4, local_ratio=0.2)
    assert M.MpeEnvs(SPREAD, 1, opts(N=4)).n_agents == 4
    bad = [(dict(env="simple_nope_v9"), "simple_nope_v9"), (dict(env=LISTENER, num_agents=4), "--num-agents"),
           (dict(env=LISTENER, local_ratio=0.3), "--local-ratio"), (dict(local_ratio=1.5), "--local-ratio"),
           (dict(num_agents=0), "--num-agents")]  # fmt: skip
    for kwargs, needle in bad:
        proc = exit_of(lambda kwargs=kwargs: M.env_options(M.Args(**kwargs)), capfd)
        assert_one_clear_error(proc, needle)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---------------------------------------------------------------------------------------------- networks
@pytest.mark.parametrize("sharing,copies", [("full", (1, 1)), ("partial", (1, 3)), ("none", (3, 3))])
def test_sharing_sets_the_copies_of_every_layer_of_actor_and_critic(sharing, copies):
    avail = torch.ones(3, 5, dtype=torch.bool)
    for net in (M.Actor(3, 18, avail, 8, sharing, continuous=True), M.AgentNet(3, 18, 1, 8, sharing, out_gain=1.0)):
        for name, p in net.named_parameters():
            expected = copies[1] if name.startswith(("head.", "theta")) else copies[0]
            assert p.shape[0] == expected, f"{name}: {tuple(p.shape)}"
        assert net.fc1.weight.shape[1] == 18 + (3 if copies[0] == 1 else 0), "agent id only for a shared trunk"


def test_per_agent_networks_see_only_their_own_agent_and_shared_ones_the_agent_id():
    obs = torch.randn(3, 10, 18)
    net = M.AgentNet(3, 18, 4, 8, "none", out_gain=1.0)
    changed = obs.clone()
    changed[1] += 1.0
    out, out2 = net(obs), net(changed)
    assert torch.equal(out[0], out2[0]) and torch.equal(out[2], out2[2]) and not torch.equal(out[1], out2[1])
    for i in range(3):  # agent i's output is its own copy applied to its own input
        h = torch.relu(torch.relu(obs[i] @ net.fc1.weight[i] + net.fc1.bias[i]) @ net.fc2.weight[i] + net.fc2.bias[i])
        torch.testing.assert_close(out[i], h @ net.head.weight[i] + net.head.bias[i])
    shared = M.AgentNet(3, 18, 4, 8, "full", out_gain=1.0)
    same = obs[:1].expand(3, 10, 18)
    out = shared(same)
    assert not torch.allclose(out[0], out[1]), "the one-hot id tells agents apart under a shared trunk"


# ---------------------------------------------------------------------------------------------- the IPPO loss
def test_ppo_clip_objective_on_hand_values():
    ratio = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5, 0.5, 0.9, 1.0, 1.1, 1.5])
    adv = torch.tensor([1.0] * 5 + [-1.0] * 5)
    expected = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.2, -0.8, -0.9, -1.0, -1.1, -1.5])
    assert torch.allclose(M.ppo_clip_objective(ratio, adv, EPS), expected)


def test_ppo_clip_gradient_is_zero_exactly_where_clipped():
    gen = torch.Generator().manual_seed(0)
    ratio = (0.5 + 1.1 * torch.rand(200, generator=gen, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(200, generator=gen, dtype=torch.float64)
    M.ppo_clip_objective(ratio, adv, EPS).sum().backward()
    clipped = clip_active(ratio, adv)
    assert clipped.any() and (~clipped).any()
    assert torch.equal(ratio.grad, torch.where(clipped, torch.zeros_like(adv), adv))


N, B, OBS, HID = 3, 64, 11, 8


def agents_ppo_clip(logp, b):
    """Each agent's PPO-clip objective on the batch b (its mean over samples), [N]."""
    return ppo_clip((logp - b["logp"]).exp(), b["adv"]).mean(1).detach()


AVAIL = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)


def hand_made_batch(sharing, continuous=False, seed=0):
    torch.manual_seed(seed)
    actor, critic = M.Actor(N, OBS, AVAIL, HID, sharing, continuous), M.AgentNet(N, OBS, 1, HID, sharing, out_gain=1.0)
    opts_ = [torch.optim.Adam(actor.parameters(), lr=5e-3, eps=1e-5), torch.optim.Adam(critic.parameters(), lr=5e-3, eps=1e-5)]
    gen = torch.Generator().manual_seed(seed)
    obs = torch.randn(N, B, OBS, generator=gen)
    with torch.no_grad():
        actions, logp = actor.act(obs)
    # a rollout policy a little away from the current one, so that ratios differ from 1 and some are clipped
    b = dict(obs=obs, actions=actions, logp=logp + 0.3 * torch.randn(N, B, generator=gen),
             values=torch.randn(N, B, generator=gen), adv=torch.randn(N, B, generator=gen),
             returns_n=torch.randn(N, B, generator=gen))  # fmt: skip
    return actor, critic, opts_, b


@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("sharing", ["full", "partial", "none"])
def test_ippo_update_is_one_ppo_clip_step_per_agent_on_its_own_advantage(sharing, continuous):
    """One epoch, one minibatch: the actor's step is an Adam step on -mean_i,t min(r^i A^i, clip(r^i) A^i) - c_ent H
    with r^i from agent i's own policy and A^i its own advantage; the critic's on the clipped Huber loss of V(o^i)."""
    actor, critic, opts_, b = hand_made_batch(sharing, continuous)
    ref_actor, ref_critic = copy.deepcopy(actor), copy.deepcopy(critic)
    args = M.Args(update_epochs=1, num_minibatches=1, sharing=sharing)
    stats = M.ippo_update(actor, critic, opts_, b, args)

    out = ref_actor(b["obs"])  # written out from the network's raw output
    if continuous:
        std = 0.5 * torch.sigmoid(ref_actor.theta)
        normal = torch.distributions.Normal(out, std)
        own = AVAIL[:, None].float()
        logp, entropy = (normal.log_prob(b["actions"]) * own).sum(-1), (normal.entropy() * own).sum(-1)
    else:
        cat = torch.distributions.Categorical(logits=out.masked_fill(~AVAIL[:, None], -1e10))
        logp, entropy = cat.log_prob(b["actions"]), cat.entropy()
    ratio = (logp - b["logp"]).exp()
    assert ((ratio - 1).abs() > EPS).any() and ((ratio - 1).abs() < EPS).any()
    pg_loss = -ppo_clip(ratio, b["adv"]).mean()
    torch.testing.assert_close(stats[0], pg_loss.detach())
    values = ref_critic(b["obs"])[..., 0]
    v_loss = clipped_value_loss(values, b["values"], b["returns_n"], EPS)
    torch.testing.assert_close(stats[1], v_loss.detach())
    torch.testing.assert_close(stats[2], entropy.mean().detach())
    torch.testing.assert_close(stats[3], ((ratio - 1) - ratio.log()).mean().detach())  # approx. KL before the step (k3)
    torch.testing.assert_close(stats[4], ((ratio - 1).abs() > EPS).float().mean())  # the clip fraction
    n_sum = N if sharing == "none" else 1  # none: each agent's own mean, summed over agents (see the next test)
    for net, loss in ((ref_actor, pg_loss - args.ent_coef * entropy.mean()), (ref_critic, v_loss)):
        opt = torch.optim.Adam(net.parameters(), lr=5e-3, eps=1e-5)
        (n_sum * loss).backward()
        assert nn.utils.clip_grad_norm_(net.parameters(), args.max_grad_norm) < args.max_grad_norm, "no clipping here"
        opt.step()
    for net, ref in ((actor, ref_actor), (critic, ref_critic)):
        for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("sharing", ["full", "none"])
def test_the_policy_loss_has_the_sign_that_increases_each_agents_objective(sharing):
    """One small SGD step without entropy bonus: every agent's PPO-clip objective on the batch goes up."""
    actor, critic, _, b = hand_made_batch(sharing)
    objective = lambda: agents_ppo_clip(actor.log_prob_entropy(actor.dist(b["obs"]), b["actions"])[0], b)
    before = objective()
    args = M.Args(update_epochs=1, num_minibatches=1, sharing=sharing, ent_coef=0.0)
    M.ippo_update(actor, critic, [torch.optim.SGD(net.parameters(), lr=1e-2) for net in (actor, critic)], b, args)
    assert (objective() > before).all(), (before, objective())


@pytest.mark.parametrize("max_grad_norm", [0.05, 1e6])
@pytest.mark.parametrize("continuous", [False, True])
def test_without_sharing_each_agent_steps_as_a_network_of_its_own(continuous, max_grad_norm):
    """--sharing none, one epoch, one minibatch, SGD (which, unlike Adam, sees the scale of a gradient), with a
    gradient clip that bites and without one: agent i's copy steps exactly as a network trained alone on agent i's
    samples would."""
    actor, critic, _, b = hand_made_batch("none", continuous)
    start = copy.deepcopy((actor, critic))
    args = M.Args(update_epochs=1, num_minibatches=1, sharing="none", max_grad_norm=max_grad_norm)
    M.ippo_update(actor, critic, [torch.optim.SGD(net.parameters(), lr=0.1) for net in (actor, critic)], b, args)
    for i in range(N):
        ref_actor, ref_critic = copy.deepcopy(start)
        own = {k: v[i : i + 1] for k, v in b.items()}
        full_obs = b["obs"].clone()
        full_obs[i] = own["obs"][0]  # the networks take all agents' inputs; only agent i's outputs enter the loss
        logp, entropy = ref_actor.log_prob_entropy(ref_actor.dist(full_obs), b["actions"])
        ratio = (logp[i] - own["logp"][0]).exp()
        pg_loss = -ppo_clip(ratio, own["adv"][0]).mean()
        values = ref_critic(full_obs)[i, :, 0]
        v_loss = clipped_value_loss(values, own["values"][0], own["returns_n"][0], EPS)
        losses = (pg_loss - args.ent_coef * entropy[i].mean(), args.vf_coef * v_loss)
        assert_agent_steps_alone((actor, critic), (ref_actor, ref_critic), losses, i, 0.1, max_grad_norm, max_grad_norm < 1)


@pytest.mark.parametrize("sharing", ["none", "full"])
def test_without_sharing_agents_learn_independently(sharing):
    """--sharing none: agent 0's weights after several epochs and minibatches (with gradient clipping active) do not
    depend on agent 1's data; under full sharing they do (so the test can tell)."""
    results = []
    for scale in (1.0, 1000.0):
        actor, critic, opts_, b = hand_made_batch(sharing)
        b["obs"][1] *= scale
        b["adv"][1] *= scale
        b["returns_n"][1] += scale
        torch.manual_seed(5)  # the same minibatches
        M.ippo_update(actor, critic, opts_, b, M.Args(update_epochs=3, num_minibatches=4, max_grad_norm=0.05, sharing=sharing))
        results.append((actor.state_dict(), critic.state_dict()))
    for k in results[0][0]:
        for i in (0, 2) if sharing == "none" else ():
            assert torch.equal(results[0][0][k][i], results[1][0][k][i]), f"actor {k}: agent {i} moved with agent 1's data"
            if k in results[0][1]:
                assert torch.equal(results[0][1][k][i], results[1][1][k][i]), f"critic {k}: agent {i}"
    if sharing == "full":
        assert not torch.equal(results[0][0]["fc1.weight"], results[1][0]["fc1.weight"])


@pytest.mark.parametrize("n_agents", [2, 3])  # 2: simple_speaker_listener
def test_clip_grad_norm_per_agent(n_agents):
    torch.manual_seed(0)
    scales = torch.tensor([1.0, 10.0, 0.01][-n_agents:])  # agent 0 or 1 clipped, the last agent's small gradient not
    for sharing in ("full", "none", "partial"):
        net = M.AgentNet(n_agents, 6, 2, 4, sharing)
        for p in net.parameters():
            p.grad = torch.randn_like(p) * (scales if p.shape[0] > 1 else scales[:1]).view(-1, *[1] * (p.dim() - 1))
        grads = {k: p.grad.clone() for k, p in net.named_parameters()}
        M.clip_grad_norm_per_agent(net, 1.0)
        if sharing == "full":  # torch's own clipping
            ref = [g.clone().requires_grad_() for g in grads.values()]
            for r, g in zip(ref, grads.values(), strict=True):
                r.grad = g.clone()
            nn.utils.clip_grad_norm_(ref, 1.0)
            for (k, p), r in zip(net.named_parameters(), ref, strict=True):
                torch.testing.assert_close(p.grad, r.grad, msg=k)
        elif sharing == "none":  # each agent's gradient clipped on its own
            for i in range(n_agents):
                norm = torch.sqrt(sum(g[i].pow(2).sum() for g in grads.values()))
                factor = min(1.0, 1.0 / (norm.item() + 1e-6))
                for k, p in net.named_parameters():
                    torch.testing.assert_close(p.grad[i], grads[k][i] * factor, msg=f"{k}[{i}]")
            assert factor == 1.0, "the last agent's small gradient is left alone"
        else:  # per-agent heads by their own factor, the shared trunk by the smallest factor
            norms = torch.sqrt(sum(grads[k].pow(2).reshape(grads[k].shape[0], -1).sum(1) for k in grads))
            factors = (1.0 / (norms + 1e-6)).clamp(max=1.0)
            torch.testing.assert_close(net.head.weight.grad, grads["head.weight"] * factors.view(n_agents, 1, 1))
            torch.testing.assert_close(net.fc1.weight.grad, grads["fc1.weight"] * factors.min())


def test_advantages_are_standardised_per_agent():
    adv = torch.randn(3, 500) * torch.tensor([[1.0], [50.0], [0.1]]) + torch.tensor([[0.0], [10.0], [-3.0]])
    out = M.standardize_per_agent(adv)
    torch.testing.assert_close(out.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(1, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


def test_value_normaliser_is_per_agent_unless_the_critic_head_is_shared():
    returns = torch.stack([torch.full((100,), 5.0), torch.full((100,), -20.0)]) + torch.randn(2, 100)
    per_agent, shared = M.ValueNorm(2), M.ValueNorm(1)
    for _ in range(50):
        per_agent.update(returns), shared.update(returns)
    mean, _ = per_agent.stats()
    torch.testing.assert_close(mean[:, 0], returns.mean(1), atol=0.05, rtol=0)
    torch.testing.assert_close(shared.stats()[0][0, 0], returns.mean(), atol=0.05, rtol=0)
    x = torch.randn(7, 2, 4)  # [T, N, E]: statistics broadcast over the agent axis
    torch.testing.assert_close(per_agent.denormalize(per_agent.normalize(x)), x, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(per_agent.normalize(x)[:, 1], (x[:, 1] - mean[1]) / per_agent.stats()[1][1])


# ---------------------------------------------------------------------------------------------- GAE and time limits
def test_gae_bootstraps_truncated_episodes_from_the_final_observation():
    """Three envs, one agent, T = 3, gamma 0.9, lambda 0.5. Env 0: the time limit truncates its episode at t = 1 (next
    episode from t = 2); env 1: its episode terminates at t = 1; env 2: no end. V of the final observation of env 0 is
    10; the values at t = 2 (a new episode) must not leak into t = 1."""
    g, lam = 0.9, 0.5
    values = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [3.0, 3.0, 3.0]])[:, None]  # [T, N=1, E]
    rewards = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]])[:, None]
    final = torch.zeros(3, 1, 3)
    final[1, 0, 0] = 10.0
    terminated, truncated = torch.zeros(3, 1, 3, dtype=torch.bool), torch.zeros(3, 1, 3, dtype=torch.bool)
    truncated[1, 0, 0], terminated[1, 0, 1] = True, True
    last = torch.tensor([[4.0, 4.0, 4.0]])  # V of the observation after the rollout
    nxt = M.bootstrap_values(values, last, final, terminated, truncated)
    assert nxt[:, 0].tolist() == [[2.0, 2.0, 2.0], [10.0, 0.0, 3.0], [4.0, 4.0, 4.0]]
    adv, returns = M.compute_gae(rewards, values, nxt, (terminated | truncated).float(), g, lam)
    d = lambda t, e: rewards[t, 0, e] + g * nxt[t, 0, e] - values[t, 0, e]  # noqa: E731
    for e in range(3):
        a2 = d(2, e)
        a1 = d(1, e) + (g * lam * a2 if e == 2 else 0.0)  # env 0 and 1: the episode ended at t = 1
        a0 = d(0, e) + g * lam * a1
        torch.testing.assert_close(adv[:, 0, e], torch.stack([a0, a1, a2]))
    torch.testing.assert_close(returns[1, 0, :2], torch.tensor([1.0 + g * 10.0, 1.0]))  # r + gamma V(final) / r
    torch.testing.assert_close(returns, adv + values)


class RecordedEnvs:
    """MpeEnvs that keep what every step handed back."""

    def __init__(self, envs):
        self.envs, self.outs = envs, []

    def step(self, actions):
        self.outs.append(self.envs.step(actions))
        return self.outs[-1]


def rollout_buffer(T, E, n_agents, obs_dim):
    """Storage for `rollout`, as the script's loop allocates it (discrete actions)."""
    ends = {k: torch.zeros(T, 1, E, dtype=torch.bool) for k in ("terminated", "truncated")}
    return dict(obs=torch.zeros(T, n_agents, E, obs_dim), actions=torch.zeros(T, n_agents, E, dtype=torch.long),
                **{k: torch.zeros(T, n_agents, E) for k in ("logp", "values", "rewards", "final_values")}, **ends)  # fmt: skip


def test_rollout_bootstraps_a_truncated_episode_from_its_final_observation():
    """Episodes of 3 steps in a 7-step rollout: at each time limit the stored value is V(final observation), not V of
    the next episode's first observation that the env hands back in its place; values, log-probs and rewards belong to
    the observation the action was taken in."""
    T, E = 7, 2
    envs = RecordedEnvs(M.MpeEnvs(SPREAD, E, opts(max_cycles=3)))
    torch.manual_seed(0)
    O = envs.envs.obs_dim  # noqa: E741
    actor, critic = M.Actor(3, O, envs.envs.avail, HID, "none"), M.AgentNet(3, O, 1, HID, "none")
    first = envs.envs.reset(seed=1).transpose(0, 1)
    buf = rollout_buffer(T, E, 3, O)
    next_obs, ep_returns = M.rollout(actor, critic, envs, first, buf)
    V = lambda obs: critic(obs.transpose(0, 1))[..., 0].detach()  # [E, N, O] -> [N, E]
    assert torch.equal(buf["obs"][0], first) and torch.equal(next_obs, envs.outs[-1]["obs"].transpose(0, 1))
    for t, out in enumerate(envs.outs):
        assert bool(out["truncated"].all()) == (t in (2, 5)) and torch.equal(buf["truncated"][t, 0], out["truncated"])
        if t + 1 < T:
            assert torch.equal(buf["obs"][t + 1], out["obs"].transpose(0, 1))
        assert torch.equal(buf["values"][t], critic(buf["obs"][t])[..., 0].detach())
        assert torch.equal(buf["logp"][t], actor.log_prob_entropy(actor.dist(buf["obs"][t]), buf["actions"][t])[0].detach())
        assert torch.equal(buf["rewards"][t], out["reward"].T)
        if t in (2, 5):
            assert torch.equal(buf["final_values"][t], V(out["final_obs"]))
            assert not torch.isclose(buf["final_values"][t], V(out["obs"])).any(), "not the next episode's first observation"
    assert torch.equal(torch.cat(ep_returns), torch.cat([envs.outs[t]["ep_return"] for t in (2, 5)]))


def test_rollout_batch_runs_gae_on_de_normalised_values_and_normalises_the_returns():
    """Written out per agent and env: GAE from the de-normalised stored values, V(final observation) at a truncation,
    V(the observation after the rollout) at the end; advantages standardised per agent; returns normalised by the
    value normaliser after it took them in."""
    T, E, g, lam = 4, 2, 0.9, 0.8
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    critic = M.AgentNet(N, OBS, 1, HID, "none", out_gain=1.0)
    buf = rollout_buffer(T, E, N, OBS)
    buf.update(obs=torch.randn(T, N, E, OBS, generator=gen), values=torch.randn(T, N, E, generator=gen),
               rewards=torch.randn(T, N, E, generator=gen), final_values=torch.randn(T, N, E, generator=gen))  # fmt: skip
    buf["truncated"][1, 0, 0] = buf["terminated"][2, 0, 1] = True
    value_norm, next_obs = M.ValueNorm(N), torch.randn(N, E, OBS, generator=gen)
    value_norm.update(3 + 2 * torch.randn(N, 50, generator=gen))
    ref_norm = copy.deepcopy(value_norm)
    b = M.rollout_batch(buf, critic, value_norm, next_obs, M.Args(gamma=g, gae_lambda=lam))
    V, last = ref_norm.denormalize(buf["values"]), ref_norm.denormalize(critic(next_obs)[..., 0].detach())
    adv = torch.zeros(T, N, E)
    for t in reversed(range(T)):
        for e in range(E):
            trunc, term = bool(buf["truncated"][t, 0, e]), bool(buf["terminated"][t, 0, e])
            nxt = ref_norm.denormalize(buf["final_values"])[t, :, e] if trunc else V[t + 1, :, e] if t + 1 < T else last[:, e]
            delta = buf["rewards"][t, :, e] + g * (0.0 if term else 1.0) * nxt - V[t, :, e]
            adv[t, :, e] = delta + (0.0 if trunc or term or t + 1 == T else g * lam * adv[t + 1, :, e])
    returns = (adv + V).transpose(0, 1).reshape(N, T * E)
    adv = adv.transpose(0, 1).reshape(N, T * E)
    torch.testing.assert_close(b["adv"], (adv - adv.mean(1, keepdim=True)) / adv.std(1, unbiased=False, keepdim=True))
    ref_norm.update(returns)
    assert_same_state_dict(value_norm.state_dict(), ref_norm.state_dict(), "value normaliser")
    torch.testing.assert_close(b["returns_n"], ref_norm.normalize(returns))
    assert torch.equal(b["obs"][1, 2 * E + 1], buf["obs"][2, 1, 1]), "sample t * E + e of agent i"


def test_gae_with_lambda_one_is_the_discounted_return_plus_bootstrap():
    T, g = 6, 0.95
    gen = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(T, 2, 1, generator=gen), torch.randn(T, 2, 1, generator=gen)
    truncated = torch.zeros(T, 1, 1, dtype=torch.bool)
    truncated[3] = True
    final = torch.full((T, 2, 1), 7.0)
    nxt = M.bootstrap_values(values, torch.zeros(2, 1), final, torch.zeros_like(truncated), truncated)
    _, returns = M.compute_gae(rewards, values, nxt, truncated.float(), g, 1.0)
    expected0 = sum(g**k * rewards[k] for k in range(4)) + g**4 * 7.0
    torch.testing.assert_close(returns[0], expected0)
    torch.testing.assert_close(returns[4], rewards[4] + g * rewards[5])


# ---------------------------------------------------------------------------------------------- end to end
TINY = ["--num-envs", 2, "--num-steps", 5, "--max-cycles", 7, "--eval-episodes", 2, "--eval-interval", 1,
        "--no-progress-bar", "--torch-threads", 1, "--save-model", "--checkpoint-interval", 1]  # fmt: skip
ITER = 2 * 5  # steps per iteration; episodes of 7 steps end inside the second iteration
ENVS = {SPREAD: 3, REFERENCE: 2, LISTENER: 2}  # agents
CONTINUOUS = {LISTENER: "partial"}  # sharing of the --continuous-actions runs (padded action dimensions)
NAN_DRIVER = """
import runpy, sys
import torch

calls, huber = [0], torch.nn.functional.huber_loss


def poisoned(*args, **kwargs):  # NaN from the second iteration on (one epoch of one minibatch: 2 calls per iteration)
    calls[0] += 1
    out = huber(*args, **kwargs)
    return out * float("nan") if calls[0] > 2 else out


torch.nn.functional.huber_loss = poisoned
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, repo_root):
    base = tmp_path_factory.mktemp("ippo")
    (base / "driver").mkdir()
    (base / "driver" / "nan_driver.py").write_text(NAN_DRIVER)
    jobs = []

    def run(env_id, sharing, steps=2 * ITER, continuous=False):
        return [*TINY, "--total-timesteps", steps, "--env", env_id, "--sharing", sharing] + ["--continuous-actions"] * continuous

    for env_id in ENVS:
        for sharing in ("full", "partial", "none"):
            name, track = f"{env_id}-{sharing}", (env_id, sharing) == (SPREAD, "none")
            wandb = {"WANDB_MODE": "offline", "WANDB_DIR": str(base / name)} if track else None
            tracked = ["--track", "--capture-video"] * track  # and its videos reach wandb
            jobs.append(Job(name, SCRIPT, run(env_id, sharing) + tracked, base / name, env=wandb))
        if env_id in CONTINUOUS:
            name = f"{env_id}-continuous"
            jobs.append(Job(name, SCRIPT, run(env_id, CONTINUOUS[env_id], continuous=True), base / name))
    # the continuous speaker-listener run (heterogeneous agents, partial sharing), stopped after one iteration and resumed
    jobs.append(Job("half", SCRIPT, run(LISTENER, "partial", ITER, continuous=True), base / "resume"))
    resume = lambda: ["--resume", keep_copy(find_checkpoint(base / "resume"), base / "half.pt"), "--total-timesteps", 2 * ITER]
    jobs.append(Job("resume", SCRIPT, lambda: resume() + ["--no-progress-bar"], base / "resume", after=["half"]))
    evaluate = lambda: ["--eval-only", "--resume", find_checkpoint(base / f"{REFERENCE}-none"), "--no-progress-bar"]
    jobs.append(Job("eval_only", SCRIPT, evaluate, base / "eval_only", after=[f"{REFERENCE}-none"]))
    video = ["--capture-video", "--video-episodes", 2]
    jobs.append(Job("video", SCRIPT, run(SPREAD, "partial") + video, base / "video"))
    jobs.append(Job("video_eval_only", SCRIPT, lambda: evaluate() + ["--capture-video"], base / "video_eval_only",
                    after=[f"{REFERENCE}-none"]))  # fmt: skip
    driver = base / "driver" / "nan_driver.py"
    jobs.append(Job("nan", str(driver), [repo_root / SCRIPT, *run(SPREAD, "full"), "--update-epochs", 1], base / "nan"))
    results = run_scripts(jobs)
    print("run times: " + ", ".join(f"{n} {p.duration:.1f}s" for n, p in results.items()), file=sys.stderr)
    return {"base": base, **{job.name: (results[job.name], job.cwd) for job in jobs}}


REQUIRED_TAGS = ["charts/SPS", "charts/learning_rate", "charts/episodic_return", "charts/rollout_time", "charts/update_time",
                 "losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac",
                 "losses/explained_variance", "eval/episodic_return"]  # fmt: skip
RUNS = [f"{e}-{s}" for e in ENVS for s in ("full", "partial", "none")] + [f"{e}-continuous" for e in CONTINUOUS]


@pytest.mark.parametrize("name", RUNS)
def test_run_on_every_task_and_sharing_mode(runs, name):
    proc, cwd = ran_ok(runs, name)
    env_id, sharing = name.rsplit("-", 1)
    continuous, sharing = sharing == "continuous", CONTINUOUS[env_id] if sharing == "continuous" else sharing
    n = ENVS[env_id]
    assert f"{n} agents" in proc.stdout and f"sharing {sharing}" in proc.stdout
    scalars = read_scalars(run_dir(cwd))
    missing = [t for t in REQUIRED_TAGS if t not in scalars]
    assert not missing, f"missing tags {missing}; found {sorted(scalars)}"
    assert [s for s, _ in scalars["charts/SPS"]] == [ITER, 2 * ITER], "one point per iteration"
    assert [s for s, _ in scalars["eval/episodic_return"]] == [ITER, 2 * ITER]
    for tag in REQUIRED_TAGS:
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    assert all(0 <= v <= 1 for _, v in scalars["losses/clipfrac"])
    assert all(v == pytest.approx(7e-4) for _, v in scalars["charts/learning_rate"])
    assert all(v < 0 for _, v in scalars["charts/episodic_return"]), "MPE's rewards are negative distances"
    if not continuous:
        assert all(v > 0 for _, v in scalars["losses/entropy"])
    # the layout of the saved networks: copies per layer, padded sizes and the action mask
    ckpt = load_checkpoint(find_checkpoint(cwd))
    trunk, head = M.layer_copies(sharing, n)
    for net in ("actor", "critic"):
        for k, v in ckpt[net].items():
            if k != "avail":
                assert v.shape[0] == (head if k.startswith(("head.", "theta")) else trunk), f"{net}.{k}: {tuple(v.shape)}"
    assert ("theta" in ckpt["actor"]) == continuous
    assert ckpt["value_norm"]["mean"].shape == (head, 1)
    obs_dim, n_actions = {SPREAD: (18, 5), REFERENCE: (21, 50), LISTENER: (11, 5)}[env_id]
    assert ckpt["actor"]["fc1.weight"].shape[1] == obs_dim + (n if trunk == 1 else 0)
    assert ckpt["actor"]["head.weight"].shape[2] == n_actions
    if env_id == LISTENER:
        assert ckpt["actor"]["avail"][:, 0].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert ckpt["args"]["sharing"] == sharing and ckpt["args"]["continuous_actions"] == continuous


def test_track_writes_an_offline_wandb_run(runs):
    _, cwd = ran_ok(runs, f"{SPREAD}-none")
    offline = sorted((cwd / "wandb").glob("offline-run-*"))
    assert offline, f"no offline wandb run under {cwd / 'wandb'}"
    assert run_dir(cwd).name in offline[0].name, "the wandb run id is the run name"
    data = next(offline[0].glob("*.wandb")).read_bytes()
    for needle in (b"mpe2", b"versions", b"losses/policy_loss", SPREAD.encode(), b"videos/episode_0"):
        assert needle in data, needle
    assert list(offline[0].glob("files/media/images/*.gif")), "--capture-video's videos reach wandb (as wandb.Video gifs)"


def test_resume_equals_an_uninterrupted_run(runs):
    """Episodes of 7 steps and rollouts of 5: the split falls inside episodes, so the environments' state matters."""
    _, ref_cwd = ran_ok(runs, f"{LISTENER}-continuous")
    ran_ok(runs, "half")
    _, cwd = ran_ok(runs, "resume")
    ref, res, half = load_checkpoint(ref_cwd), load_checkpoint(cwd), load_checkpoint(runs["base"] / "half.pt")
    assert half["iteration"] == 1
    assert any(not torch.equal(half["actor"][k], ref["actor"][k]) for k in ref["actor"]), "the second iteration trained"
    # and the environments continue the same episodes: every world, the episodes' returns, the next observation
    assert_same_training_state(ref, res, 2, 20, extra=("next_obs", "env_state"))
    assert len(run_dirs(cwd)) == 1, "the resumed run continues the same TensorBoard run"
    steps = sorted({s for s, _ in read_scalars(run_dir(cwd))["charts/SPS"]})
    assert steps == [ITER, 2 * ITER]
    ref_scalars, res_scalars = read_scalars(run_dir(ref_cwd)), read_scalars(run_dir(cwd))
    for tag in ("losses/policy_loss", "eval/episodic_return", "charts/episodic_return"):
        assert ref_scalars[tag][-1] == res_scalars[tag][-1], tag


def test_eval_only_reproduces_the_last_evaluation(runs):
    proc, cwd = ran_ok(runs, "eval_only")
    m = re.search(r"eval: episodic_return (-?[0-9.]+) over (\d+) episodes", proc.stdout)
    assert m, describe(proc)
    assert int(m.group(2)) == 2
    last = read_scalars(run_dir(runs[f"{REFERENCE}-none"][1]))["eval/episodic_return"][-1][1]
    assert float(m.group(1)) == pytest.approx(last, abs=1e-4), "same greedy episodes from the same seeds"
    assert not run_dirs(cwd), "--eval-only should not start a new run"


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(runs):
    proc, cwd = runs["nan"]
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr and "non-finite loss at iteration 2" in proc.stderr, describe(proc)
    ckpt = load_checkpoint(find_checkpoint(cwd))
    assert ckpt["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["critic"].values())


def test_evaluate_draws_one_frame_per_step_of_the_first_episodes():
    torch.manual_seed(0)
    envs = M.MpeEnvs(SPREAD, 3, opts(max_cycles=9), render=True)
    actor = M.Actor(3, envs.obs_dim, envs.avail, 16, "none")
    ret, frames = M.evaluate(actor, EndingAt(envs, [7, 4, 9]), 0, CPU, videos=2)
    for video, length in zip(frames, [7, 4], strict=True):
        assert_watchable(video, length)
        assert video[0].shape == (700, 700, 3)
    assert M.evaluate(actor, EndingAt(envs, [7, 4, 9]), 0, CPU) == (ret, []), "drawing changes no result"


def test_capture_video_writes_each_evaluations_first_episodes_as_mp4s_and_tensorboard_videos(runs):
    proc, cwd = ran_ok(runs, "video")
    assert_videos(proc, run_dir(cwd), [ITER, 2 * ITER], 2, 7, (700, 700))  # --max-cycles 7


def test_eval_only_with_capture_video_renders_the_saved_policy(runs):
    proc, cwd = ran_ok(runs, "video_eval_only")
    assert_videos(proc, run_dir(cwd), [2 * ITER], 1, 7, (700, 700))
