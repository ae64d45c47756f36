"""fp3o_mamujoco.py: Gaussian policy math, padding and agent ids, the MaMuJoCo wrapper (against gymnasium-robotics
itself), time-limit bootstrapping in GAE, FP3O's objective with continuous actions, the whole update on hand-made
rollouts (the batch's normalisation, each step's gradient, when the dependent step runs, one agent), and end-to-end runs
(every sharing mode, one agent, exact resume, sync == async environments, evaluation of a saved model; bad input in
test_bad_input.py).

Evaluation videos (--capture-video) are checked end to end too.

The end-to-end runs are started once per module (two processes at a time, see harness.run_scripts)."""
import copy
import itertools
import math
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from harness import Job, describe, keep_copy, ran_ok, run_dir, run_dirs, run_scripts
from readers import assert_same_state_dict, assert_same_training_state, find_checkpoint, load_checkpoint, read_scalars
from references import assert_agent_steps_alone, clip_active, clipped_value_loss, ppo_clip
from video import EndingAt, assert_videos, assert_watchable

import fp3o_mamujoco as F

EPS = 0.2
CPU = torch.device("cpu")


def act_mask(act_dims):
    mask = torch.zeros(len(act_dims), 1, max(act_dims), dtype=torch.float64)
    for i, d in enumerate(act_dims):
        mask[i, 0, :d] = 1
    return mask


# ---------------------------------------------------------------------------------------------- Gaussian policy
def test_gaussian_log_prob_entropy_kl_match_torch_distributions_with_padded_action_dims():
    gen = torch.Generator().manual_seed(0)
    act_dims, B = [3, 1, 2], 7  # heterogeneous agents: padded to 3 action dims
    N, A = len(act_dims), max(act_dims)
    mask = act_mask(act_dims)
    rand = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)
    mean_p, mean_q = 4 * rand(N, B, A) - 2, 4 * rand(N, B, A) - 2
    std_p, std_q = 0.1 + rand(N, 1, A), 0.1 + rand(N, 1, A)
    actions = torch.randn(N, B, A, generator=gen, dtype=torch.float64)
    actions[..., 2] = 1e3  # garbage in padded dims must not matter (agent 0 uses dim 2: its log-prob is tiny)
    logp, ent = F.gaussian_log_prob(actions, mean_p, std_p, mask), F.gaussian_entropy(std_p, mask)
    kl = F.gaussian_kl(mean_p, std_p, mean_q, std_q, mask)
    assert logp.shape == kl.shape == (N, B) and ent.shape == (N, 1)
    for i, d in enumerate(act_dims):
        p = torch.distributions.Normal(mean_p[i, :, :d], std_p[i, :, :d].expand(B, d))
        q = torch.distributions.Normal(mean_q[i, :, :d], std_q[i, :, :d].expand(B, d))
        torch.testing.assert_close(logp[i], p.log_prob(actions[i, :, :d]).sum(-1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ent[i].expand(B), p.entropy().sum(-1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(kl[i], torch.distributions.kl_divergence(p, q).sum(-1), rtol=1e-12, atol=1e-12)
    assert (logp[1:] > -1e4).all() and (logp[0] < -1e4).all(), "padded dims must be excluded, real dims included"


def test_gaussian_actor_std_parametrisation_and_per_agent_copies():
    """std = y * sigmoid(theta / x) with theta initialised to x (x = 1, y = 0.5); one theta per agent unless full."""
    for sharing, copies in (("full", 1), ("partial", 4), ("none", 4)):
        actor = F.GaussianActor(4, 5, 3, 16, sharing, std_x=1.0, std_y=0.5)
        assert actor.theta.shape == (copies, 1, 3)
        torch.testing.assert_close(actor.std(), torch.full((copies, 1, 3), 0.5 / (1 + math.exp(-1.0))))
        mean, std = actor(torch.randn(4, 7, 5))
        assert mean.shape == (4, 7, 3) and std.shape == (copies, 1, 3)
    actor = F.GaussianActor(2, 5, 3, 16, "none", std_x=2.0, std_y=0.3)
    with torch.no_grad():
        actor.theta[1] = -4.0
    torch.testing.assert_close(actor.std()[0], torch.full((1, 3), 0.3 * torch.sigmoid(torch.tensor(1.0)).item()))
    torch.testing.assert_close(actor.std()[1], torch.full((1, 3), 0.3 * torch.sigmoid(torch.tensor(-2.0)).item()))
    assert (actor.std() < 0.3).all() and (actor.std() > 0).all(), "std is bounded by y"


def test_padded_action_dims_get_no_gradient():
    """Padded dims are excluded from log-prob and entropy: the head's padded outputs and thetas get exactly zero gradient."""
    torch.manual_seed(0)
    act_dims = [3, 1, 2]
    N, n_obs, A, B = 3, 6, 3, 20
    actor = F.GaussianActor(N, n_obs, A, 16, "partial")
    mask = act_mask(act_dims).float()
    mean, std = actor(torch.randn(N, B, n_obs))
    actions = torch.randn(N, B, A)
    (F.gaussian_log_prob(actions, mean, std, mask).sum() + F.gaussian_entropy(std, mask).sum()).backward()
    for i, d in enumerate(act_dims):
        assert (actor.net.head.weight.grad[i, :, d:] == 0).all() and (actor.theta.grad[i, 0, d:] == 0).all()
        assert (actor.net.head.weight.grad[i, :, :d] != 0).any() and (actor.theta.grad[i, 0, :d] != 0).all()


# ---------------------------------------------------------------------------------------------- networks
def test_agent_id_only_with_a_shared_trunk():
    """full and partial sharing append a one-hot agent id (input O + N); none has per-agent first layers (input O)."""
    N, O = 4, 5  # noqa: E741
    for sharing, n_in, trunk in (("full", O + N, 1), ("partial", O + N, 1), ("none", O, N)):
        net = F.AgentNet(N, O, 2, 8, sharing)
        assert net.fc1.weight.shape == (trunk, n_in, 8), sharing
    net = F.AgentNet(N, O, 2, 8, "full", out_gain=1.0)
    x = torch.randn(1, 3, O).expand(N, 3, O)  # every agent sees the same observation
    out = net(x)
    assert not torch.allclose(out[0], out[1]), "the agent id must tell agents apart under full sharing"
    # the id is the one-hot of the agent's index: reproduce agent 2's output with an explicit concatenation
    ref = torch.cat([x[2], torch.eye(N)[2].expand(3, N)], -1)
    ref = torch.relu(torch.relu(ref @ net.fc1.weight[0] + net.fc1.bias[0]) @ net.fc2.weight[0] + net.fc2.bias[0])
    torch.testing.assert_close(out[2], ref @ net.head.weight[0] + net.head.bias[0])
    assert F.AgentNet(1, O, 1, 8, "full").agent_id is False, "a single copy (the shared critic) needs no id"


def test_per_agent_layers_are_independent_without_sharing():
    torch.manual_seed(1)
    N, O = 3, 5  # noqa: E741
    net = F.AgentNet(N, O, 2, 8, "none")
    x = torch.randn(N, 4, O)
    out = net(x)
    with torch.no_grad():
        net.fc1.weight[0] += 1.0
    out2 = net(x)
    assert not torch.allclose(out[0], out2[0]) and torch.equal(out[1:], out2[1:])
    for i in range(N):  # agent i's output is its own MLP applied to its own input
        h = torch.relu(torch.relu(x[i] @ net.fc1.weight[i] + net.fc1.bias[i]) @ net.fc2.weight[i] + net.fc2.bias[i])
        torch.testing.assert_close(out2[i], h @ net.head.weight[i] + net.head.bias[i])


# ---------------------------------------------------------------------------------------------- environment wrapper
def reference_env(scenario, conf, k, **kw):
    """gymnasium-robotics' own env, with the script's deterministic order of observed joints (see the next test)."""
    env = F.import_mamujoco().parallel_env(scenario, conf, agent_obsk=k, **kw)
    key = lambda n: (n.label, repr(n.qpos_ids), repr(n.qvel_ids), repr(n.act_ids), repr(n.bodies))
    env.k_dicts = [{j: sorted(v, key=key) for j, v in d.items()} for d in env.k_dicts]
    return env


def test_observation_layout_is_the_same_in_every_env_instance():
    """Pusher repeats a joint label; gymnasium-robotics sorts observed joints by label, so without the script's
    tie-break two instances can disagree on the order of agent 0's observation."""
    obs = []
    for _ in range(6):
        env = F.MaMuJoCoAgents("Pusher", "3p", 1)
        env.reset(seed=0)
        obs.append(env.step(np.full((3, 3), 0.5, np.float32))[0])
    assert all(np.array_equal(obs[0], o) for o in obs[1:])


def test_env_pads_observations_maps_actions_and_clips_only_on_the_way_to_the_simulator():
    """Pusher 3p: agents with 16/13/16 observations and 3/1/3 actions in [-2, 2], against gymnasium-robotics itself."""
    envs = F.MaMuJoCoEnvs("Pusher", "3p", 1, 2, False, CPU)
    ref = [reference_env("Pusher", "3p", 1) for _ in range(2)]
    assert (envs.obs_dims, envs.act_dims, envs.state_dim) == ([16, 13, 16], [3, 1, 3], 23)
    assert envs.act_mask[:, 0].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 1]]
    nxt = envs.reset(seed=5)
    ref_obs = [r.reset(seed=5 + i)[0] for i, r in enumerate(ref)]  # the vector env seeds env i with seed + i
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        assert nxt["obs"].shape == (2, 3, 16) and nxt["state"].shape == (2, 23)
        for e, r in enumerate(ref):
            for i, name in enumerate(r.possible_agents):
                d = envs.obs_dims[i]
                np.testing.assert_array_equal(nxt["obs"][e, i, :d].numpy(), ref_obs[e][name].astype(np.float32))
                assert (nxt["obs"][e, i, d:] == 0).all(), "padding is zeros"
            np.testing.assert_array_equal(nxt["state"][e].numpy(), r.state().astype(np.float32))
        actions = 3 * torch.randn(2, 3, 3, generator=gen)  # often outside [-2, 2]
        actions[:, 1, 1:] = 1e6  # padded dims of agent 1: ignored
        nxt = envs.step(actions)
        for e, r in enumerate(ref):
            a = actions[e].numpy().clip(-2, 2)
            ref_obs[e], rew, term, trunc, _ = r.step({"agent_0": a[0], "agent_1": a[1, :1], "agent_2": a[2]})
            assert nxt["reward"][e].item() == pytest.approx(rew["agent_0"], rel=1e-6)
            assert bool(nxt["terminated"][e]) == term["agent_0"] and bool(nxt["truncated"][e]) == trunc["agent_0"]
    envs.close()


def test_env_truncation_keeps_the_final_state_and_starts_a_new_episode():
    envs = F.MaMuJoCoEnvs("HalfCheetah", "6x1", 1, 2, False, CPU, max_episode_steps=5)
    ref = reference_env("HalfCheetah", "6x1", 1, max_episode_steps=5)
    nxt = envs.reset(seed=3)
    ref.reset(seed=3)
    actions = torch.full((2, 6, 1), 0.3)
    for t in range(5):
        last = nxt
        nxt = envs.step(actions)
        obs, _, _, trunc, _ = ref.step({f"agent_{i}": np.array([0.3], np.float32) for i in range(6)})
        assert nxt["any_done"] == (t == 4) and nxt["truncated"].tolist() == [t == 4] * 2 and not nxt["terminated"].any()
    np.testing.assert_array_equal(nxt["final_state"][0].numpy(), ref.state().astype(np.float32))
    assert not torch.equal(nxt["state"][0], nxt["final_state"][0]), "state already starts the next episode"
    assert not torch.equal(nxt["final_state"], last["state"])
    assert nxt["ep_length"].tolist() == [5, 5] and nxt["ep_return"][0].item() != 0
    nxt = envs.step(actions)
    assert not nxt["any_done"] and nxt["ep_length"].tolist() == [1, 1]
    envs.close()


def test_env_state_round_trip_continues_exactly():
    envs = F.MaMuJoCoEnvs("Hopper", "3x1", 1, 2, False, CPU)
    envs.reset(seed=0)
    gen = torch.Generator().manual_seed(0)
    actions = [torch.rand(2, 3, 1, generator=gen) * 2 - 1 for _ in range(60)]
    for a in actions[:20]:
        envs.step(a)
    saved = envs.get_state()
    first = [envs.step(a) for a in actions[20:]]
    envs.set_state(saved)
    second = [envs.step(a) for a in actions[20:]]
    assert any(o["any_done"] for o in first), "Hopper should fall (terminate) with random actions: resets are covered"
    for a, b in zip(first, second, strict=True):
        for k in ("obs", "state", "reward", "terminated", "ep_return"):
            assert torch.equal(a[k], b[k]), k
    envs.close()


def test_listed_agent_configurations_are_accepted_by_gymnasium_robotics():
    from gymnasium_robotics.envs.multiagent_mujoco.obsk import get_parts_and_edges

    F.import_mamujoco()
    for scenario, confs in F.MAMUJOCO_CONFS.items():
        for conf in re.findall(r"[0-9][0-9a-z|]*", confs):  # "NxM (..., e.g. 8x2)": 8x2
            get_parts_and_edges(scenario, conf)
    assert F.default_clip_coef("Walker2d", "2x3") == F.default_clip_coef("Hopper", "3x1") == 0.05
    assert F.default_clip_coef("HalfCheetah", "6x1") == F.default_clip_coef("ManySegmentSwimmer", "8x2") == 0.2


# ---------------------------------------------------------------------------------------------- GAE with time limits
def slow_gae(rewards, values, final_values, terminated, truncated, gamma, lam):
    """Per env and t: A_t = sum_l (gamma*lam)^(l-t) delta_l over the rest of t's episode inside the rollout, with
    delta_l = r_l + gamma * V(next) - V(s_l); V(next) = 0 after a termination, V(final state) after a truncation,
    else V(s_{l+1}) (values[T]: the state after the rollout)."""
    T, E = rewards.shape
    adv = torch.zeros(T, E, dtype=torch.float64)
    for e, t in itertools.product(range(E), range(T)):
        total, discount = 0.0, 1.0
        for step in range(t, T):
            if terminated[step, e]:
                nv = 0.0
            elif truncated[step, e]:
                nv = float(final_values[step, e])
            else:
                nv = float(values[step + 1, e])
            total += discount * (float(rewards[step, e]) + gamma * nv - float(values[step, e]))
            if terminated[step, e] or truncated[step, e]:
                break
            discount *= gamma * lam
        adv[t, e] = total
    return adv, adv + values[:T]


def gae_batch(seed=0, T=12, E=5):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, E, generator=gen, dtype=torch.float64)
    values = torch.randn(T + 1, E, generator=gen, dtype=torch.float64)
    final_values = torch.randn(T, E, generator=gen, dtype=torch.float64)
    term, trunc = torch.zeros(T, E, dtype=torch.float64), torch.zeros(T, E, dtype=torch.float64)
    trunc[4, 0] = trunc[T - 1, 1] = 1.0  # time limits in the middle and at the end of the rollout
    term[3, 1] = term[7, 2] = 1.0  # terminations
    term[5, 3] = trunc[5, 3] = 1.0  # both at once: the termination wins
    trunc[2, 4] = term[9, 4] = 1.0  # env 4: a truncation, then a termination
    return rewards, values, final_values, term, trunc


def test_compute_gae_matches_a_slow_reference_with_truncations_and_terminations():
    r, v, fv, term, trunc = gae_batch()
    adv, ret = F.compute_gae(r, v, fv, term, trunc, 0.99, 0.95)
    adv_ref, ret_ref = slow_gae(r, v, fv, term, trunc, 0.99, 0.95)
    torch.testing.assert_close(adv, adv_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ret, ret_ref, rtol=1e-10, atol=1e-12)


def test_truncation_bootstraps_from_the_final_state_and_termination_does_not():
    r, v, fv, term, trunc = gae_batch()
    gamma, lam = 0.99, 0.95
    adv, _ = F.compute_gae(r, v, fv, term, trunc, gamma, lam)
    fv2 = fv.clone()
    fv2[4, 0] += 10.0  # env 0 truncated at t = 4: its final state's value enters A_t for t <= 4 ...
    fv2[7, 2] += 10.0  # env 2 terminated at t = 7: a final value is never used
    fv2[5, 3] += 10.0  # env 3 terminated and truncated at t = 5: no bootstrap
    fv2[6, 0] += 10.0  # no episode end there: unused
    adv2, _ = F.compute_gae(r, v, fv2, term, trunc, gamma, lam)
    expected = torch.zeros_like(adv)
    expected[:5, 0] = 10.0 * gamma * (gamma * lam) ** torch.arange(4, -1, -1, dtype=torch.float64)
    torch.testing.assert_close(adv2 - adv, expected, rtol=1e-10, atol=1e-10)
    # ... and the value of the next episode's first state (values[5]) does not leak back over the time limit
    v2 = v.clone()
    v2[5, 0] += 10.0
    adv3, _ = F.compute_gae(r, v2, fv, term, trunc, gamma, lam)
    assert torch.equal(adv3[:5, 0], adv[:5, 0]) and adv3[5, 0] != adv[5, 0]


def test_advantages_are_standardised_over_each_agents_own_samples():
    gen = torch.Generator().manual_seed(0)
    scale, shift = torch.tensor([[1.0], [50.0], [0.1]]), torch.tensor([[0.0], [10.0], [-3.0]])
    adv = (torch.randn(3, 40, generator=gen) * scale + shift).double()
    out = F.standardize_per_agent(adv)
    for i, a in enumerate(adv.tolist()):  # (A - mean) / std with the agent's own mean and (biased) std
        mean = sum(a) / len(a)
        std = math.sqrt(sum((x - mean) ** 2 for x in a) / len(a))
        assert out[i].tolist() == pytest.approx([(x - mean) / std for x in a], rel=1e-6)


def test_compute_gae_broadcasts_one_reward_over_per_agent_critics():
    r, v, fv, term, trunc = gae_batch()
    v3 = torch.stack([v, v + 1, v * 2], 1)  # [T+1, Nc=3, E]: three critics
    fv3 = torch.stack([fv, fv + 1, fv * 2], 1)
    adv, _ = F.compute_gae(r[:, None], v3, fv3, term[:, None], trunc[:, None], 0.9, 0.8)
    for c in range(3):
        torch.testing.assert_close(adv[:, c], slow_gae(r, v3[:, c], fv3[:, c], term, trunc, 0.9, 0.8)[0])


# ---------------------------------------------------------------------------------------------- normalisers
def test_running_norm_matches_the_statistics_of_all_data_seen():
    gen = torch.Generator().manual_seed(0)
    norm = F.RunningNorm((3, 1, 4))
    batches = [3 + 2 * torch.randn(10, 3, 5, 4, generator=gen) for _ in range(4)]  # [T, N, E, O]
    for x in batches:
        norm.update(x, (0, 2))
    data = torch.cat(batches).double().transpose(1, 2).reshape(-1, 3, 4)
    torch.testing.assert_close(norm.mean[:, 0], data.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm.var[:, 0], data.var(0, unbiased=False), rtol=1e-4, atol=1e-6)
    y = norm(batches[0].transpose(1, 2).reshape(-1, 3, 4).transpose(0, 1))  # [N, B, O]
    assert abs(y.mean().item()) < 0.2 and 0.8 < y.std().item() < 1.2
    # padded features (always 0) stay 0; statistics survive a state_dict round trip, incl. the cached float32 copies
    z = F.RunningNorm((2,))
    z.update(torch.stack([torch.randn(50), torch.zeros(50)], -1), (0,))
    assert (z(torch.zeros(7, 2))[:, 1] == 0).all()
    loaded = F.RunningNorm((3, 1, 4))
    loaded.load_state_dict(norm.state_dict())
    assert set(norm.state_dict()) == {"mean", "var", "count"}
    assert torch.equal(loaded(batches[1][0]), norm(batches[1][0]))
    assert torch.equal(F.RunningNorm((2,), enabled=False)(torch.full((3, 2), 50.0)), torch.full((3, 2), 50.0))


def test_running_norm_is_the_clipped_standard_score_with_its_eps_and_moves_with_the_module():
    """forward = clip((x - mean) / sqrt(var + 1e-8), +-10): the identity (clipped) before any data, and the eps shows
    where a feature barely varies; the float32 copies it uses are buffers (they follow .to(device)) but not saved."""
    x = torch.tensor([[0.5, -3.0], [40.0, -40.0], [1e-4, 3e-4]])
    norm = F.RunningNorm((2,))
    assert torch.equal(norm(x), x.clamp(-10, 10))
    norm.update(torch.tensor([[1e-4], [-1e-4]]).repeat(5000, 2), (0,))  # variance ~2e-8: sqrt(var + eps) is not sqrt(var)
    expected = ((x.double() - norm.mean) / (norm.var + 1e-8).sqrt()).clamp(-10, 10)
    torch.testing.assert_close(norm(x), expected.float())
    assert {"shift", "scale"} <= dict(norm.named_buffers()).keys() and not {"shift", "scale"} & norm.state_dict().keys()


# ---------------------------------------------------------------------------------------------- FP3O with Gaussians
def gaussian_setup(seed, sharing="partial", act_dims=(2, 1, 3, 2), B=64):
    """An actor, a batch of actions from an older policy and their log-probs under it: ratios spread around 1."""
    torch.manual_seed(seed)
    N, O, A = len(act_dims), 6, max(act_dims)  # noqa: E741
    mask = act_mask(act_dims).float()
    actor = F.GaussianActor(N, O, A, 16, sharing)
    obs = torch.randn(N, B, O)
    with torch.no_grad():
        mean_old = actor(obs)[0] + 0.15 * torch.randn(N, B, A)
        actions = mean_old + actor.std() * torch.randn(N, B, A)
        logp_old = F.gaussian_log_prob(actions, mean_old, actor.std(), mask)
    adv = torch.randn(N, B)
    ratio = lambda: (F.gaussian_log_prob(actions, *actor(obs), mask) - logp_old).exp()
    return actor, ratio, adv


def grads(loss, actor):
    return torch.autograd.grad(loss, list(actor.parameters()))


def test_with_all_factors_one_the_fp3o_loss_is_ppo_clip_in_value_and_gradient():
    actor, ratio, adv = gaussian_setup(0)
    r = ratio()
    assert clip_active(r, adv).any() and (~clip_active(r, adv)).any(), "need clipped and unclipped samples"
    ones = torch.ones_like(adv)
    for factors in ((ones, ones), (1.0, 1.0)):
        fp3o = F.fp3o_objective(ratio(), adv, *factors, EPS)
        torch.testing.assert_close(fp3o, ppo_clip(r, adv) - adv, rtol=0, atol=1e-6)
        for g1, g2 in zip(grads(-fp3o.mean(), actor), grads(-ppo_clip(ratio(), adv).mean(), actor), strict=True):
            torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-8)
    assert any(g.abs().sum() > 0 for g in grads(-ppo_clip(ratio(), adv).mean(), actor))


@pytest.mark.parametrize("sharing", ["full", "partial", "none"])
def test_dependent_step_gradient_equals_product_of_other_ratios_times_ppo_clip(sharing):
    """Listing B.3's literal objective has the gradient of prod_{m != i} rho^m * min(r^i A^i, clip(r^i) A^i) w.r.t.
    the actor's parameters (shared or not): the partner j = f^-1(i) only adds the constant -rho^j A^i."""
    actor, ratio, adv = gaussian_setup(1, sharing)
    N, B = adv.shape
    rho = 0.6 + 0.9 * torch.rand(N, B, generator=torch.Generator().manual_seed(2))
    partner = F.pipeline_partners(N, torch.Generator().manual_seed(3))
    factor_ij, factor_j = F.fp3o_factors(rho, partner)
    literal = lambda: F.fp3o_objective(ratio(), adv, factor_ij, factor_j, EPS)
    prod_others = torch.stack([rho[[m for m in range(N) if m != i]].prod(0) for i in range(N)])
    ref = lambda: prod_others * ppo_clip(ratio(), adv)
    torch.testing.assert_close(literal().detach(), ref().detach() - factor_j * adv, rtol=1e-5, atol=1e-5)
    g_literal = grads(literal().mean(), actor)
    for g1, g2 in zip(g_literal, grads(ref().mean(), actor), strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)
    g_ppo = grads(ppo_clip(ratio(), adv).mean(), actor)
    assert not all(torch.allclose(g1, g2) for g1, g2 in zip(g_literal, g_ppo, strict=True)), "the factors matter"


@pytest.mark.parametrize("n_agents", [2, 3, 5])
def test_fp3o_factors_match_a_slow_loop(n_agents):
    gen = torch.Generator().manual_seed(n_agents)
    B = 6
    rho = 0.5 + torch.rand(n_agents, B, generator=gen, dtype=torch.float64)
    partner = F.pipeline_partners(n_agents, torch.Generator().manual_seed(1))
    factor_ij, factor_j = F.fp3o_factors(rho, partner)
    for i, b in itertools.product(range(n_agents), range(B)):
        j = int(partner[i])
        expected = math.prod(float(rho[m, b]) for m in range(n_agents) if m not in (i, j))
        assert float(factor_ij[i, b]) == pytest.approx(expected, rel=1e-12) and factor_j[i, b] == rho[j, b]


@pytest.mark.parametrize("n_agents", [2, 3, 6, 8])
def test_pipeline_partners_is_a_cyclic_shift_of_a_permutation(n_agents):
    seen = set()
    for seed in range(20):
        partner = F.pipeline_partners(n_agents, torch.Generator().manual_seed(seed))
        assert sorted(partner.tolist()) == list(range(n_agents)) and all(int(partner[i]) != i for i in range(n_agents))
        f = {int(p): i for i, p in enumerate(partner.tolist())}  # f(i_p) = j_p
        orbit = [0]
        while len(orbit) < n_agents and f[orbit[-1]] != 0:
            orbit.append(f[orbit[-1]])
        assert len(orbit) == n_agents and f[orbit[-1]] == 0, "f must be a single n-cycle"
        seen.add(tuple(partner.tolist()))
    assert len(seen) > 1 or n_agents == 2


@pytest.mark.parametrize("seed", range(5))
def test_pipeline_partners_follow_the_generators_permutation_left_shifted(seed):
    """Eq. 9: the permutation i_1..i_n that the given generator draws (whatever torch's global one holds) and
    j_p = i_{p+1}: agent i_{p+1}'s partner is i_p."""
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed)).tolist()
    torch.manual_seed(1000 + seed)
    partner = F.pipeline_partners(5, torch.Generator().manual_seed(seed))
    assert [int(partner[perm[(p + 1) % 5]]) for p in range(5)] == perm


def test_fp3o_condition_and_constraint_use_the_slack():
    """Equal sums hold; S1 just below S2 holds within the slack and fails beyond it; the default slack is 1e-5."""
    ones, adv = torch.ones(2, 1, dtype=torch.float64), torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    low = torch.tensor([[1.0], [1.0 - 1e-3]], dtype=torch.float64)
    # the condition with rho = low: S1 = 1 - 1e-3, S2 = 1; the constraint with r_{k+1} = low: S1' = 1 - 1e-3, S2 = 1
    assert F.fp3o_condition(low, adv, slack=1e-2)[0] is True and F.fp3o_condition(low, adv, slack=1e-4)[0] is False
    assert F.fp3o_constraint(ones, low, adv, slack=1e-2) is True and F.fp3o_constraint(ones, low, adv, slack=1e-4) is False
    assert F.fp3o_condition(low, adv)[0] is False and F.fp3o_constraint(ones, low, adv) is False  # the default slack
    assert F.fp3o_condition(ones, adv)[0] is True and F.fp3o_constraint(ones, ones, adv) is True


def test_fp3o_condition_and_constraint_on_hand_made_batches():
    rho = torch.tensor([[2.0, 1.0], [0.5, 3.0]])  # [N = 2, B = 2], joint ratio [1, 3]
    adv = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    # S1 = sum A^i prod_m rho^m = (1 + 3) + (1 - 3) = 2;  S2 = sum A^i rho^i = (2 + 1) + (0.5 - 3) = 0.5
    assert F.fp3o_condition(rho, adv) == (True, pytest.approx(2.0), pytest.approx(0.5))
    assert F.fp3o_condition(rho, -adv)[0] is False
    # with the intermediate ratios as the new ones the constraint is the condition
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        rho, adv = 0.5 + torch.rand(3, 8, generator=gen), torch.randn(3, 8, generator=gen)
        assert F.fp3o_constraint(rho, rho, adv, 0.0) == F.fp3o_condition(rho, adv, 0.0)[0]


def test_double_clip_with_a_wide_inner_clip_has_the_plain_gradient():
    actor, ratio, adv = gaussian_setup(4)
    N, B = adv.shape
    rho = 0.6 + 0.9 * torch.rand(N, B, generator=torch.Generator().manual_seed(5))
    factor_ij, factor_j = F.fp3o_factors(rho, F.pipeline_partners(N, torch.Generator().manual_seed(6)))
    plain = F.fp3o_objective(ratio(), adv, factor_ij, factor_j, EPS).mean()
    double = F.fp3o_double_clip_objective(ratio(), adv, factor_ij * factor_j, factor_j, EPS, 1e6).mean()
    for g1, g2 in zip(grads(plain, actor), grads(double, actor), strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("max_grad_norm", [0.05, 1e6])
def test_fp3o_step_without_sharing_steps_each_agent_as_a_network_of_its_own(max_grad_norm):
    """--sharing none, one epoch, one minibatch, SGD (which, unlike Adam, sees the scale of a gradient), with a gradient
    clip that bites and without one: agent i's actor and critic copies step exactly as networks trained alone on
    agent i's samples (its own mean loss, its own clipping)."""
    actor, ratio, adv = gaussian_setup(3, "none", B=32)
    N, B = adv.shape
    critic = F.AgentNet(N, 5, 1, 8, "none", out_gain=1.0)
    obs, mask = torch.randn(N, B, 6), act_mask((2, 1, 3, 2)).float()
    with torch.no_grad():
        mean, std = actor(obs)
        actions = mean + std * torch.randn_like(mean)
    b = dict(obs=obs, actions=actions, logp=F.gaussian_log_prob(actions, mean, std, mask) + 0.2 * torch.randn(N, B),
             adv=adv, state=torch.randn(1, B, 5).expand(N, -1, -1), values=torch.randn(N, B), returns_n=torch.randn(N, B),
             act_mask=mask)  # fmt: skip
    start = copy.deepcopy((actor, critic))
    args = F.Args(update_epochs=1, num_minibatches=1, sharing="none", max_grad_norm=max_grad_norm, clip_coef=EPS)
    F.fp3o_step(actor, critic, [torch.optim.SGD(net.parameters(), lr=0.1) for net in (actor, critic)], b, (1.0, 1.0), args)
    for i in range(N):
        ref_actor, ref_critic = copy.deepcopy(start)
        mean, std = ref_actor(obs)
        r = (F.gaussian_log_prob(actions, mean, std, mask) - b["logp"]).exp()[i]
        ent = F.gaussian_entropy(std, mask)[i].mean()
        v_loss = clipped_value_loss(ref_critic(b["state"])[i, :, 0], b["values"][i], b["returns_n"][i], args.clip_coef, args.huber_delta)
        losses = (-ppo_clip(r, adv[i], args.clip_coef).mean() - args.ent_coef * ent, args.vf_coef * v_loss)
        assert_agent_steps_alone((actor, critic), (ref_actor, ref_critic), losses, i, 0.1, max_grad_norm, max_grad_norm < 1)


def test_fp3o_step_logs_the_approx_kl_and_clip_fraction_of_its_ratios():
    """One epoch of one minibatch: the logged approx. KL, mean((r - 1) - log r), and clip fraction, mean(|r - 1| > eps),
    are those of the ratios before the step, r = pi(a|o) / pi_k(a|o)."""
    actor, critic, opts, b, args, _ = update_setup(act_dims=(2, 3))
    args.update_epochs = 1
    b["logp"] = b["logp"] + 0.3 * torch.randn(b["logp"].shape, generator=torch.Generator().manual_seed(3))
    ratio = batch_ratios(actor, b)
    assert ((ratio - 1).abs() > EPS).any() and ((ratio - 1).abs() < EPS).any()
    stats = F.fp3o_step(actor, critic, opts, b, (1.0, 1.0), args)
    torch.testing.assert_close(stats[3], ((ratio - 1) - ratio.log()).mean())
    torch.testing.assert_close(stats[4], ((ratio - 1).abs() > EPS).float().mean())


def test_fp3o_step_with_scalar_factors_equals_ones_tensors():
    """The independent step passes factors 1.0; it must train exactly as with tensors of ones."""
    args = F.Args(clip_coef=0.2, num_minibatches=4, update_epochs=2)
    results = []
    for factors in ("scalar", "tensor"):
        actor, ratio, adv = gaussian_setup(7, "none", B=32)
        torch.manual_seed(8)
        critic = F.AgentNet(1, 5, 1, 8, "full", out_gain=1.0)
        opts = [F.adam(actor.parameters(), 1e-3), F.adam(critic.parameters(), 1e-3)]
        N, B = adv.shape
        b = dict(obs=torch.randn(N, B, 6), actions=torch.randn(N, B, 3), logp=torch.randn(N, B) - 3, adv=adv,
                 state=torch.randn(1, B, 5), values=torch.randn(1, B), returns_n=torch.randn(1, B),
                 act_mask=act_mask((2, 1, 3, 2)).float())  # fmt: skip
        f = (1.0, 1.0) if factors == "scalar" else (torch.ones(N, B), torch.ones(N, B))
        torch.manual_seed(9)
        stats = F.fp3o_step(actor, critic, opts, b, f, args)
        results.append((actor.state_dict(), critic.state_dict(), stats))
    assert_same_state_dict(results[0][0], results[1][0], "actor")
    assert_same_state_dict(results[0][1], results[1][1], "critic")
    assert results[0][2].shape == (5,) and torch.equal(results[0][2], results[1][2]), "the same logged losses"


# ---------------------------------------------------------------------------------------------- the whole update
T_, E_, O_, S_ = 16, 4, 6, 5  # steps, envs, observation and state sizes of the hand-made rollouts


class StepRecorder(torch.optim.Adam):
    """The script's Adam (eps 1e-5), keeping at every step the parameters it starts from and the gradient it applies."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr, eps=1e-5)
        self.steps = []

    def __setstate__(self, state):  # a deep copy keeps no record
        super().__setstate__(state)
        self.steps = []

    def step(self, closure=None):
        params = self.param_groups[0]["params"]
        self.steps.append(([p.detach().clone() for p in params], [p.grad.clone() for p in params]))
        return super().step(closure)


def rollout_buffer(actor, obs_norm, N, seed=0):
    """A rollout's storage [T, N, E, ...] as the script's loop fills it: raw observations and states, actions sampled
    around the actor's mean at the normalised observations, a termination and a time limit."""
    gen = torch.Generator().manual_seed(seed)
    buf = dict(obs=3 + 2 * torch.randn(T_, N, E_, O_, generator=gen), state=1 - torch.randn(T_ + 1, E_, S_, generator=gen),
               final_state=torch.randn(T_, E_, S_, generator=gen), reward=torch.randn(T_, 1, E_, generator=gen),
               terminated=torch.zeros(T_, 1, E_), truncated=torch.zeros(T_, 1, E_))  # fmt: skip
    buf["terminated"][5, 0, 1] = buf["truncated"][9, 0, 2] = 1.0
    with torch.no_grad():
        buf["mean"] = torch.stack([actor.net(obs_norm(o)) for o in buf["obs"]])
        buf["actions"] = buf["mean"] + actor.std() * torch.randn(buf["mean"].shape, generator=gen)
    return buf


def update_setup(sharing="partial", act_dims=(2, 1, 3), seed=0, lr=3e-3, norms=None, **kw):
    """Actor, critic, their (recording) optimizers, the batch rollout_batch makes of a hand-made rollout, and Args
    (two epochs of one minibatch, no gradient clipping)."""
    torch.manual_seed(seed)
    N, A = len(act_dims), max(act_dims)
    actor, Nc = F.GaussianActor(N, O_, A, 16, sharing), N if sharing == "none" else 1
    critic = F.AgentNet(Nc, S_, 1, 16, "none" if Nc > 1 else "full", out_gain=1.0)
    opts = [StepRecorder(actor.parameters(), lr), StepRecorder(critic.parameters(), lr)]
    norms = norms or (F.ValueNorm(), F.RunningNorm((N, 1, O_)), F.RunningNorm((S_,)))
    buf = rollout_buffer(actor, norms[1], N, seed)
    args = F.Args(sharing=sharing, num_steps=T_, num_envs=E_, num_minibatches=1, update_epochs=2, clip_coef=EPS,
                  max_grad_norm=1e6, **kw)  # fmt: skip
    b = F.rollout_batch(buf, critic, *norms, act_mask(act_dims).float(), actor.std().detach(), args)
    return actor, critic, opts, b, args, buf


@torch.no_grad()
def batch_ratios(actor, b):
    """pi(a|o) / pi_k(a|o) of the batch's actions under `actor`."""
    return (F.gaussian_log_prob(b["actions"], *actor(b["obs"]), b["act_mask"]) - b["logp"]).exp()


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_rollout_batch_normalises_with_the_statistics_the_rollout_acted_with():
    """Observations, states (and so values) in the batch are normalised with the statistics the rollout acted with;
    only then do the statistics take in this rollout, for the next one. A truncation bootstraps from the final state."""
    gen = torch.Generator().manual_seed(1)
    norms = (F.ValueNorm(), F.RunningNorm((3, 1, O_)), F.RunningNorm((S_,)))
    norms[0].update(5 * torch.randn(100, generator=gen))
    norms[1].update(torch.randn(4, 3, 8, O_, generator=gen), (0, 2)), norms[2].update(torch.randn(9, S_, generator=gen), (0,))
    before = copy.deepcopy(norms)
    actor, critic, _, b, args, buf = update_setup(norms=norms)
    flat = lambda x: x.transpose(0, 1).reshape(x.shape[1], T_ * E_, *x.shape[3:])
    assert torch.equal(b["obs"], before[1](flat(buf["obs"])))
    states = before[2](buf["state"][:T_].reshape(1, T_ * E_, S_))
    assert torch.equal(b["state"], states) and torch.equal(b["values"], critic(states)[..., 0].detach())
    refs = copy.deepcopy(before[1:])
    for norm, ref, x, dims in zip(norms[1:], refs, (buf["obs"], buf["state"][:T_]), ((0, 2), (0, 1)), strict=True):
        ref.update(x, dims)
        assert_same_state_dict(norm.state_dict(), ref.state_dict(), "statistics after the rollout")
    with torch.no_grad():
        logp = F.gaussian_log_prob(b["actions"], flat(buf["mean"]), actor.std(), b["act_mask"])
    assert torch.equal(b["logp"], logp) and torch.equal(b["adv"][0], b["adv"][1]), "the average split: A^i = A / n"
    again = lambda buf: F.rollout_batch(buf, critic, *copy.deepcopy(before), b["act_mask"], actor.std().detach(), args)
    adv = again(copy.deepcopy(buf))["adv"]
    for t, e, used in ((9, 2, True), (5, 1, False), (3, 0, False)):  # truncated, terminated, no episode end
        changed = copy.deepcopy(buf)
        changed["final_state"][t, e] += 3.0
        assert torch.equal(again(changed)["adv"], adv) != used, (t, e)


def loss_grads(actor, params, b, weights, args):
    """The gradient of the script's actor loss for FP3O's objective written as weights * PPO-clip (plus the entropy
    bonus; under --sharing none each agent's mean summed) at `params`, and the ratios r = pi / pi_k there."""
    ref = copy.deepcopy(actor)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), params, strict=True):
            p.copy_(q)
    mean, std = ref(b["obs"])
    r = (F.gaussian_log_prob(b["actions"], mean, std, b["act_mask"]) - b["logp"]).exp()
    entropy = F.gaussian_entropy(std, b["act_mask"]).mean()
    loss = -(weights * ppo_clip(r, b["adv"], args.clip_coef)).mean() - args.ent_coef * entropy
    n_sum = r.shape[0] if args.sharing == "none" else 1
    return torch.autograd.grad(n_sum * loss, list(ref.parameters())), r.detach()


@pytest.mark.parametrize("double_clip", [False, True])
@pytest.mark.parametrize("sharing", ["partial", "none"])
def test_each_step_follows_the_gradient_of_its_objective_with_the_intermediate_ratios_of_the_batch(sharing, double_clip):
    """The independent step's first gradient is that of -PPO-clip (the sign that increases the objective). The dependent
    step's first one is that of -prod_{m != i} rho^m * PPO-clip (listing B.3's literal objective: the partner only adds
    a constant), or with double clip of -clip(prod_{m != i} rho^m, 1 +- eps2) * PPO-clip (eq. D.10), with
    rho = pi_{k+0.5} / pi_k on this very batch, measured after the independent step."""
    actor, critic, opts, b, args, _ = update_setup(sharing, double_clip=double_clip, inner_clip_coef=0.05, no_condition=True)
    F.fp3o_update(actor, critic, opts, b, args)
    steps, first = opts[0].steps, args.update_epochs * args.num_minibatches  # the first step of the dependent step
    assert len(steps) == 2 * first and len(opts[1].steps) == 2 * first, "the critic trains on both steps"
    expected, r = loss_grads(actor, steps[0][0], b, 1.0, args)
    torch.testing.assert_close(r, torch.ones_like(r), rtol=0, atol=1e-5)  # the rollout's own policy
    for g, e in zip(steps[0][1], expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    _, rho = loss_grads(actor, steps[first][0], b, 1.0, args)
    others = rho.prod(0, keepdim=True) / rho  # prod_{m != i} rho^m
    weights = others.clamp(1 - 0.05, 1 + 0.05) if double_clip else others
    assert (others - 1).abs().max() > 0.1 and ((others - weights).abs().max() > 0.02) == double_clip
    expected, _ = loss_grads(actor, steps[first][0], b, weights, args)
    for g, e in zip(steps[first][1], expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("case", ["holds", "fails", "fails_no_condition"])
def test_the_dependent_step_runs_when_the_condition_holds_or_is_ignored(case):
    """Two agents. The average split (the same advantage for both) makes the condition hold; opposite advantages make
    it fail, and then the update is the independent step alone, bit for bit (same random minibatches), unless
    --no-condition. The constraint and the matching degree are measured only where the dependent step ran."""
    actor, critic, opts, b, args, _ = update_setup(act_dims=(2, 3), no_condition=case == "fails_no_condition")
    if case != "holds":
        b["adv"][1] = -b["adv"][0]
    ref_actor, ref_critic, ref_opts = copy.deepcopy((actor, critic, opts))
    torch.manual_seed(7)
    stats, diag = F.fp3o_update(actor, critic, opts, b, args)
    torch.manual_seed(7)
    ref_stats = F.fp3o_step(ref_actor, ref_critic, ref_opts, b, (1.0, 1.0), args)
    ran = case != "fails"
    assert diag["fp3o/condition_holds"] == float(case == "holds")
    assert {"fp3o/constraint_holds", "fp3o/condition_matches"} <= set(diag) if ran else "fp3o/S1" in diag
    assert not ran or diag["fp3o/condition_matches"] == float(diag["fp3o/constraint_holds"] == diag["fp3o/condition_holds"])
    assert ran or not {"fp3o/constraint_holds", "fp3o/condition_matches"} & set(diag)
    assert same_weights(actor, ref_actor) == same_weights(critic, ref_critic) == torch.equal(stats, ref_stats) == (not ran)


def update_beside_its_independent_step(case, **kw):
    """Two agents, the same advantage for both when case == "holds", else opposite ones: fp3o_update on update_setup's
    networks, and on a copy of them the independent step alone with the same random minibatches. Returns the batch b,
    args, the update's stats and diag, the updated actor, the copy ref = (actor, critic, opts) after the independent
    step, that step's stats `first` and rho = pi_{k+0.5} / pi_k."""
    actor, critic, opts, b, args, _ = update_setup(act_dims=(2, 3), **kw)
    if case != "holds":
        b["adv"][1] = -b["adv"][0]
    ref = copy.deepcopy((actor, critic, opts))
    torch.manual_seed(7)
    stats, diag = F.fp3o_update(actor, critic, opts, b, args)
    torch.manual_seed(7)
    first = F.fp3o_step(*ref, b, (1.0, 1.0), args)
    return SimpleNamespace(b=b, args=args, stats=stats, diag=diag, actor=actor, ref=ref, first=first,
                           rho=batch_ratios(ref[0], b))  # fmt: skip


@pytest.mark.parametrize("case", ["holds", "fails"])
def test_the_condition_is_logged_with_this_batchs_intermediate_ratios_and_the_slack_of_args(case):
    """Algorithm 1 line 7, logged as fp3o/S1 and fp3o/S2: S1 = sum A^i prod_m rho^m against S2 = sum A^i rho^i with
    rho = pi_{k+0.5} / pi_k under the actor that the independent step left; --condition-slack moves the threshold."""
    run = update_beside_its_independent_step(case)
    b, diag, rho = run.b, run.diag, run.rho
    s1, s2 = (b["adv"] * rho.prod(0)).sum().item(), (b["adv"] * rho).sum().item()
    assert (diag["fp3o/S1"], diag["fp3o/S2"]) == pytest.approx((s1, s2), rel=1e-5)
    assert diag["fp3o/condition_holds"] == float(s1 >= s2 - 1e-5) == float(case == "holds")
    wide = update_beside_its_independent_step(case, condition_slack=abs(s2 - s1) + 1.0)  # a slack wider than the gap
    assert wide.diag["fp3o/condition_holds"] == 1.0


@pytest.mark.parametrize("case, slack", [("holds", 1e-5), ("fails_no_condition", 1e-5), ("fails_within_slack", 20.0)])
def test_after_a_dependent_step_the_update_logs_the_two_steps_mean_and_eq_11s_constraint(case, slack):
    """When the dependent step runs, the logged losses are the mean of the two steps' and fp3o/constraint_holds is the
    constraint of eq. 11 under pi_{k+1}: sum A^i rho^i prod_{m != i} r_{k+1}^m >= sum A^i rho^i - slack."""
    run = update_beside_its_independent_step(case, no_condition=case == "fails_no_condition", condition_slack=slack)
    b, diag, rho = run.b, run.diag, run.rho
    second = F.fp3o_step(*run.ref, b, F.fp3o_factors(rho, F.pipeline_partners(2)), run.args)  # the dependent step by hand
    assert diag["fp3o/condition_holds"] == float(case != "fails_no_condition") and same_weights(run.actor, run.ref[0])
    torch.testing.assert_close(run.stats, (run.first + second) / 2)
    r_new = batch_ratios(run.actor, b)
    s1, s2 = (b["adv"] * rho * r_new.flip(0)).sum(), (b["adv"] * rho).sum()  # two agents: the other's r_{k+1}
    assert diag["fp3o/constraint_holds"] == float(s1 >= s2 - slack)


def test_one_agent_is_ppo_the_independent_step_alone():
    """n = 1 (e.g. ManySegmentSwimmer 1x4): no pipeline partner and no condition, FP3O is PPO-clip."""
    actor, critic, opts, b, args, _ = update_setup("full", act_dims=(3,))
    ref_actor, ref_critic, ref_opts = copy.deepcopy((actor, critic, opts))
    torch.manual_seed(7)
    stats, diag = F.fp3o_update(actor, critic, opts, b, args)
    torch.manual_seed(7)
    assert torch.equal(stats, F.fp3o_step(ref_actor, ref_critic, ref_opts, b, (1.0, 1.0), args))
    assert same_weights(actor, ref_actor) and same_weights(critic, ref_critic) and set(diag) == {"fp3o/kl_agent0"}


# ---------------------------------------------------------------------------------------------- end to end
SCRIPT = "fp3o_mamujoco.py"
ITER = 2 * 32
TINY = ["--num-envs", 2, "--num-steps", 32, "--num-minibatches", 4, "--eval-episodes", 2, "--max-episode-steps", 20,
        "--agent-obsk", 1, "--no-progress-bar", "--torch-threads", 1]  # fmt: skip
SAVE = ["--save-model", "--checkpoint-interval", 1, "--eval-interval", 2]
N_CHEETAH = 6
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("mamujoco_e2e")
    one, two = ["--total-timesteps", ITER], ["--total-timesteps", 2 * ITER]
    jobs = [
        Job("full", SCRIPT, TINY + two + SAVE, base / "full"),  # the reference for resume and async
        Job("half", SCRIPT, TINY + one + SAVE, base / "resume"),
        Job("resume", SCRIPT, lambda: ["--resume", keep_copy(find_checkpoint(base / "resume"), base / "half.pt"), *two,
                                       "--no-progress-bar"], base / "resume", after=["half"]),  # fmt: skip
        Job("async", SCRIPT, TINY + two + SAVE + ["--async-envs"], base / "async"),
        Job("eval_only", SCRIPT, lambda: ["--eval-only", "--resume", find_checkpoint(base / "full"), "--no-progress-bar"],
            base / "eval_only", after=["full"]),  # fmt: skip
        Job("partial", SCRIPT, TINY + one + ["--scenario", "Pusher", "--agent-conf", "3p", "--sharing", "partial",
                                             "--double-clip", "--eval-interval", 1, "--save-model", "--track"], base / "partial",
            env={"WANDB_MODE": "offline", "WANDB_DIR": str(base / "partial")}),  # fmt: skip
        Job("none", SCRIPT, TINY + one + ["--scenario", "Hopper", "--agent-conf", "3x1", "--sharing", "none", "--no-condition",
                                          "--advantage-split", "random", "--eval-interval", 1, "--save-model"],
            base / "none"),  # fmt: skip
        Job("one_agent", SCRIPT, TINY + one + ["--scenario", "ManySegmentSwimmer", "--agent-conf", "1x4",
                                               "--eval-interval", 0], base / "one_agent"),  # fmt: skip
        Job("no_dep", SCRIPT, TINY + one + ["--no-dependent-step", "--eval-interval", 0, "--no-normalize-obs", "--save-model"],
            base / "no_dep", env={"MUJOCO_GL": "glfw"}),  # fmt: skip  (no display: a renderer matters only for videos)
        Job("video", SCRIPT, TINY + two + ["--eval-interval", 1, "--capture-video", "--video-episodes", 2], base / "video"),
        Job("video_eval_only", SCRIPT, lambda: ["--eval-only", "--resume", find_checkpoint(base / "full"), "--capture-video",
                                                "--no-progress-bar"], base / "video_eval_only", after=["full"]),  # fmt: skip
    ]
    results = run_scripts(jobs)
    print("run times: " + ", ".join(f"{n} {p.duration:.1f}s" for n, p in results.items()), file=sys.stderr)
    return {"base": base, **{job.name: (results[job.name], job.cwd) for job in jobs}}


REQUIRED_TAGS = ["charts/SPS", "charts/learning_rate", "charts/episodic_return", "charts/episodic_length", "losses/value_loss",
                 "losses/policy_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac", "losses/explained_variance",
                 "charts/action_std", "eval/episodic_return"]  # fmt: skip


@pytest.mark.parametrize("name, n_agents", [("full", 6), ("partial", 3), ("none", 3)])
def test_runs_log_the_expected_scalars(runs, name, n_agents):
    _, cwd = ran_ok(runs, name)
    scalars = read_scalars(run_dir(cwd))
    tags = REQUIRED_TAGS + ["fp3o/condition_holds", "fp3o/S1"] + [f"fp3o/kl_agent{i}" for i in range(n_agents)]
    assert not [t for t in tags if t not in scalars], sorted(scalars)
    assert f"fp3o/kl_agent{n_agents}" not in scalars
    iterations = 2 if name == "full" else 1
    assert [s for s, _ in scalars["charts/SPS"]] == [ITER * (i + 1) for i in range(iterations)]
    # the matching degree where the dependent step ran: the condition held, or every iteration under --no-condition
    ran = [s for s, v in scalars["fp3o/condition_holds"] if v == 1 or name == "none"]
    for tag in ("fp3o/constraint_holds", "fp3o/condition_matches"):
        assert [s for s, _ in scalars.get(tag, [])] == ran, tag
    for tag in ("losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/approx_kl", "eval/episodic_return"):
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    assert all(v == pytest.approx(1e-5) for _, v in scalars["charts/learning_rate"])
    assert all(0 <= v <= 1 for _, v in scalars["losses/clipfrac"])
    assert all(v >= 0 for i in range(n_agents) for _, v in scalars[f"fp3o/kl_agent{i}"])
    assert all(0 < v < 0.5 for _, v in scalars["charts/action_std"])
    if name == "full":  # HalfCheetah never terminates: every episode is cut by the 20-step time limit
        assert all(v == 20 for _, v in scalars["charts/episodic_length"])


@pytest.mark.parametrize("name, n_agents, obs_dim", [("full", 6, 9), ("partial", 3, 16), ("none", 3, 9)])
def test_sharing_modes_reach_the_networks(runs, name, n_agents, obs_dim):
    """Per-agent copies: full shares everything; partial has per-agent actor heads and stds and one critic; none has
    per-agent actors and critics. A shared trunk gets the agent id."""
    _, cwd = ran_ok(runs, name)
    ckpt = load_checkpoint(find_checkpoint(cwd))
    sharing = ckpt["args"]["sharing"]
    assert sharing == name
    trunk, head = {"full": (1, 1), "partial": (1, n_agents), "none": (n_agents, n_agents)}[sharing]
    for k, v in ckpt["actor"].items():
        assert v.shape[0] == (head if k.startswith("net.head.") or k == "theta" else trunk), f"actor.{k}: {tuple(v.shape)}"
    assert ckpt["actor"]["net.fc1.weight"].shape[1] == obs_dim + (n_agents if trunk == 1 else 0)
    critic_copies = n_agents if sharing == "none" else 1
    assert all(v.shape[0] == critic_copies for v in ckpt["critic"].values())


def test_default_clip_coef_follows_table_e3(runs):
    assert load_checkpoint(find_checkpoint(ran_ok(runs, "none")[1]))["args"]["clip_coef"] == 0.05  # Hopper 3x1
    assert load_checkpoint(find_checkpoint(ran_ok(runs, "full")[1]))["args"]["clip_coef"] == 0.2


def test_no_dependent_step_runs_the_independent_step_only(runs):
    _, cwd = ran_ok(runs, "no_dep")
    scalars = read_scalars(run_dir(cwd))
    assert "fp3o/kl_agent0" in scalars and not any(t.startswith(("fp3o/condition", "fp3o/S", "eval/")) for t in scalars)
    ckpt = load_checkpoint(find_checkpoint(cwd))
    assert ckpt["obs_norm"]["count"].item() == pytest.approx(1e-4), "--no-normalize-obs keeps the statistics unused"


def test_one_agent_runs_ppo(runs):
    """ManySegmentSwimmer 1x4 has one agent: FP3O with n = 1 is PPO, no condition and no dependent step."""
    _, cwd = ran_ok(runs, "one_agent")
    scalars = read_scalars(run_dir(cwd))
    assert "fp3o/kl_agent0" in scalars and "losses/policy_loss" in scalars
    assert not [t for t in scalars if t.startswith(("fp3o/condition", "fp3o/S", "fp3o/constraint"))], sorted(scalars)


def test_track_writes_an_offline_wandb_run(runs):
    _, cwd = ran_ok(runs, "partial")
    offline = sorted((cwd / "wandb").glob("offline-run-*"))
    assert offline and run_dir(cwd).name in offline[0].name
    data = next(offline[0].glob("*.wandb")).read_bytes()
    for needle in (b"gymnasium-robotics", b"Pusher", b"losses/policy_loss"):
        assert needle in data, needle


ENV_FIELDS = ("obs_norm", "state_norm", "next", "env_state")  # what a checkpoint holds beyond the common training state


def test_resume_equals_an_uninterrupted_run(runs):
    """Stopped after one iteration mid-episode and resumed: bit-for-bit the run that never stopped (networks,
    optimisers, value and observation normalisers, simulator states, RNGs)."""
    _, full_cwd = ran_ok(runs, "full")
    ran_ok(runs, "half")
    _, resume_cwd = ran_ok(runs, "resume")
    ref, res, half = load_checkpoint(full_cwd), load_checkpoint(resume_cwd), load_checkpoint(runs["base"] / "half.pt")
    assert half["iteration"] == 1 and [s["elapsed"] for s in half["env_state"]["sim"]] == [12, 12], "split mid-episode"
    assert any(not torch.equal(ref["actor"][k], half["actor"][k]) for k in ref["actor"]), "training changes the actor"
    assert not torch.equal(ref["obs_norm"]["mean"], half["obs_norm"]["mean"])
    assert_same_training_state(ref, res, 2, 2 * ITER, extra=ENV_FIELDS)
    assert len(run_dirs(resume_cwd)) == 1
    assert sorted({s for s, _ in read_scalars(run_dir(resume_cwd))["charts/SPS"]}) == [ITER, 2 * ITER]


def test_async_envs_train_exactly_like_sync_envs(runs):
    sync, asynchronous = (load_checkpoint(ran_ok(runs, name)[1]) for name in ("full", "async"))
    assert_same_training_state(sync, asynchronous, 2, 2 * ITER, extra=ENV_FIELDS)


def test_eval_only_prints_an_evaluation(runs):
    proc, cwd = ran_ok(runs, "eval_only")
    m = re.search(r"eval: episodic_return (-?[0-9.]+) over (\d+) episodes", proc.stdout)
    assert m and int(m.group(2)) == 2, describe(proc)
    assert not run_dirs(cwd), "--eval-only should not start a new run"
    scalars = read_scalars(run_dir(ran_ok(runs, "full")[1]))
    assert float(m.group(1)) == pytest.approx(scalars["eval/episodic_return"][-1][1], rel=1e-4), "same model, same episodes"


def test_evaluate_draws_one_frame_per_step_of_the_first_episodes(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", F.offscreen_gl())
    torch.manual_seed(0)
    envs = F.MaMuJoCoEnvs("Hopper", "3x1", 1, 3, False, CPU, render=True)
    actor, norm = F.GaussianActor(3, envs.obs_dim, envs.act_dim, 16, "none"), F.RunningNorm((3, 1, envs.obs_dim), False)
    ret, frames = F.evaluate(actor, EndingAt(envs, [7, 4, 9]), norm, 3, videos=2)
    for video, length in zip(frames, [7, 4]):
        assert_watchable(video, length)
    assert F.evaluate(actor, EndingAt(envs, [7, 4, 9]), norm, 3) == (ret, []), "drawing changes no result"


def test_capture_video_writes_each_evaluations_first_episodes_as_mp4s_and_tensorboard_videos(runs):
    proc, cwd = ran_ok(runs, "video")
    assert_videos(proc, run_dir(cwd), [ITER, 2 * ITER], 2, 20, (240, 240))  # --max-episode-steps 20


def test_eval_only_with_capture_video_renders_the_saved_policy(runs):
    proc, cwd = ran_ok(runs, "video_eval_only")
    assert_videos(proc, run_dir(cwd), [2 * ITER], 1, 20, (240, 240))
