"""GAE, value normalisation, advantage standardisation and the per-agent networks of fp3o_smac.py."""
import pytest
import torch
from references import reference_gae

import fp3o_smac as F


# ---------------------------------------------------------------------------------------------- GAE
def gae_batch(seed=0, T=12, B=5):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, B, generator=gen, dtype=torch.float64)
    values = torch.randn(T, B, generator=gen, dtype=torch.float64)
    dones = torch.zeros(T, B, dtype=torch.float64)
    dones[0] = 1.0
    dones[4, 0] = dones[5, 1] = dones[9, 1] = dones[T - 1, 2] = 1.0  # episode ends in the middle, back to back, at the end
    dones[1, 3] = 1.0  # env 4: no episode end at all
    next_value = torch.randn(B, generator=gen, dtype=torch.float64)
    next_done = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    return rewards, values, dones, next_value, next_done


def test_compute_gae_matches_a_slow_reference_with_episode_ends_in_the_middle():
    r, v, d, nv, nd = gae_batch()
    adv, ret = F.compute_gae(r, v, d, nv, nd, 0.99, 0.95)
    adv_ref, ret_ref = reference_gae(r, v, d, nv, nd, 0.99, 0.95)
    assert torch.allclose(adv, adv_ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ret, ret_ref, rtol=1e-10, atol=1e-12)


def test_compute_gae_does_not_look_across_an_episode_end():
    r, v, d, nv, nd = gae_batch()
    adv, _ = F.compute_gae(r, v, d, nv, nd, 0.99, 0.95)
    v2, r2, nv2 = v.clone(), r.clone(), nv.clone()
    v2[4:, 0] += 100.0  # env 0: a new episode starts at t = 4; nothing of it may leak into t < 4
    r2[4:, 0] += 100.0
    nv2[1] += 100.0  # env 1: next_done = 1, so the next obs's value is never bootstrapped
    adv2, _ = F.compute_gae(r2, v2, d, nv2, nd, 0.99, 0.95)
    assert torch.allclose(adv2[:4, 0], adv[:4, 0])
    assert torch.allclose(adv2[:, 1], adv[:, 1])
    # ... while without the episode end it does leak (so the check above can fail)
    d3 = d.clone()
    d3[4, 0] = 0.0
    adv3, _ = F.compute_gae(r2, v2, d3, nv2, nd, 0.99, 0.95)
    assert not torch.allclose(adv3[:4, 0], adv[:4, 0])


def test_compute_gae_broadcasts_a_team_reward_over_agents():
    """As in the training loop: rewards/dones [T, 1, E], values [T, N, E], next_value [N, E], next_done [E]."""
    gen = torch.Generator().manual_seed(1)
    T, N, E = 7, 3, 4
    rewards = torch.randn(T, 1, E, generator=gen)
    values = torch.randn(T, N, E, generator=gen)
    dones = (torch.rand(T, 1, E, generator=gen) < 0.2).float()
    next_value = torch.randn(N, E, generator=gen)
    next_done = (torch.rand(E, generator=gen) < 0.5).float()
    adv, ret = F.compute_gae(rewards, values, dones, next_value, next_done, 0.9, 0.8)
    assert adv.shape == ret.shape == (T, N, E)
    for i in range(N):
        ref, _ = reference_gae(rewards[:, 0], values[:, i], dones[:, 0], next_value[i], next_done, 0.9, 0.8)
        assert torch.allclose(adv[:, i].double(), ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------- ValueNorm
def test_value_norm_round_trip_and_convergence():
    torch.manual_seed(0)
    vn = F.ValueNorm()
    x = torch.randn(100) * 3 + 2
    assert torch.allclose(vn.denormalize(vn.normalize(x)), x, atol=1e-5)
    for _ in range(300):
        vn.update(torch.randn(2000) * 2.0 + 5.0)
    mean, std = vn.stats()
    assert mean.item() == pytest.approx(5.0, abs=0.02)
    assert std.item() == pytest.approx(2.0, abs=0.02)
    assert torch.allclose(vn.denormalize(vn.normalize(x)), x, atol=1e-5)
    assert torch.allclose(vn.normalize(x), (x - mean) / std, atol=1e-6)
    z = vn.normalize(torch.randn(100_000) * 2.0 + 5.0)
    assert z.mean().item() == pytest.approx(0.0, abs=0.03) and z.std().item() == pytest.approx(1.0, abs=0.03)


def test_value_norm_is_debiased_and_in_the_state_dict():
    vn = F.ValueNorm(beta=0.9)
    vn.update(torch.full((10,), 4.0))  # one update: the debiased mean is the batch mean, not 0.1 * 4
    assert vn.stats()[0].item() == pytest.approx(4.0)
    assert {"mean", "mean_sq", "debias"} <= set(vn.state_dict())
    vn2 = F.ValueNorm(beta=0.9)
    vn2.load_state_dict(vn.state_dict())
    assert vn2.stats()[0].item() == pytest.approx(4.0)


# ---------------------------------------------------------------------------------------------- standardisation
def test_standardize_per_agent_ignores_inactive_samples():
    gen = torch.Generator().manual_seed(2)
    T, N, B = 6, 3, 5
    scale, shift = torch.tensor([1.0, 5.0, 0.1]).view(1, N, 1), torch.tensor([0.0, 3.0, -2.0]).view(1, N, 1)
    adv = torch.randn(T, N, B, generator=gen) * scale + shift
    active = (torch.rand(T, N, B, generator=gen) > 0.3).float()
    out = F.standardize_per_agent(adv, active)
    garbage = adv.clone()
    garbage[active == 0] = 1e6  # inactive samples must not affect active ones
    out2 = F.standardize_per_agent(garbage, active)
    mask = active.bool()
    assert torch.allclose(out[mask], out2[mask], atol=1e-5)
    for i in range(N):
        a = adv[:, i][mask[:, i]]
        expected = (a - a.mean()) / (a.std(unbiased=False) + 1e-8)
        assert torch.allclose(out[:, i][mask[:, i]], expected, atol=1e-5)
        assert out[:, i][mask[:, i]].mean().abs() < 1e-5


# ---------------------------------------------------------------------------------------------- networks
N_AGENTS, OBS, ACTS, HID = 3, 7, 5, 8


def expected_params(sharing, recurrent, n=N_AGENTS, n_in=OBS, n_out=ACTS, h=HID):
    trunk, head = {"full": (1, 1), "partial": (1, n), "none": (n, n)}[sharing]
    n_in = n_in + (n if trunk == 1 else 0)  # one-hot agent id whenever the trunk is shared
    per_trunk = (n_in * h + h) + (h * h + h) + ((h * 3 * h + 3 * h) * 2 if recurrent else 0)
    return trunk * per_trunk + head * (h * n_out + n_out)


@pytest.mark.parametrize("recurrent", [True, False])
@pytest.mark.parametrize("sharing", ["full", "partial", "none"])
def test_agentnet_parameter_count(sharing, recurrent):
    net = F.AgentNet(N_AGENTS, OBS, ACTS, HID, sharing, recurrent=recurrent)
    assert sum(p.numel() for p in net.parameters()) == expected_params(sharing, recurrent)


def net_io(seed=0, T=3, B=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N_AGENTS, B, OBS, generator=gen)
    h0 = torch.randn(N_AGENTS, B, HID, generator=gen)
    return x, h0, torch.zeros(T, B)


@pytest.mark.parametrize("recurrent", [True, False])
def test_no_sharing_isolates_agents(recurrent):
    torch.manual_seed(0)
    net = F.AgentNet(N_AGENTS, OBS, ACTS, HID, "none", recurrent=recurrent)
    for p in net.parameters():
        assert p.shape[0] == N_AGENTS
    x, h0, starts = net_io()
    for i in range(N_AGENTS):
        net.zero_grad()
        out, _ = net(x, h0, starts)
        (out[:, i] ** 2).sum().backward()
        for name, p in net.named_parameters():
            assert p.grad is not None, name
            for j in range(N_AGENTS):
                if j == i:
                    assert p.grad[j].abs().sum() > 0, f"{name}: agent {i}'s loss leaves its own copy without gradient"
                else:
                    assert torch.count_nonzero(p.grad[j]) == 0, f"{name}: agent {i}'s loss reaches agent {j}'s copy"


def test_partial_sharing_shares_the_trunk_and_not_the_head():
    torch.manual_seed(0)
    net = F.AgentNet(N_AGENTS, OBS, ACTS, HID, "partial", recurrent=True)
    trunk = {n: p for n, p in net.named_parameters() if not n.startswith("head.")}
    assert {n.split(".")[0] for n in trunk} == {"fc1", "fc2", "gru"}
    assert all(p.shape[0] == 1 for p in trunk.values())
    assert net.head.weight.shape[0] == N_AGENTS and net.head.bias.shape[0] == N_AGENTS
    x, h0, starts = net_io()
    for i in range(N_AGENTS):
        net.zero_grad()
        out, _ = net(x, h0, starts)
        (out[:, i] ** 2).sum().backward()
        for j in range(N_AGENTS):
            for p in (net.head.weight, net.head.bias):
                nz = torch.count_nonzero(p.grad[j])
                assert (nz > 0) if j == i else (nz == 0)
        assert all(p.grad.abs().sum() > 0 for p in trunk.values())


def test_full_sharing_uses_one_copy_and_tells_agents_apart_by_id():
    torch.manual_seed(0)
    net = F.AgentNet(N_AGENTS, OBS, ACTS, HID, "full", recurrent=False, out_gain=1.0)
    assert all(p.shape[0] == 1 for p in net.parameters())
    x = torch.randn(1, 1, 4, OBS).expand(1, N_AGENTS, 4, OBS)  # the same observation for every agent
    out, _ = net(x)
    assert not torch.allclose(out[:, 0], out[:, 1])


@pytest.mark.parametrize("copies", [1, 3])
def test_agent_gru_equals_torch_grucell(copies):
    torch.manual_seed(0)
    n_in, H, B = 6, 5, 4
    gru = F.AgentGRU(copies, n_in, H)
    cells = [torch.nn.GRUCell(n_in, H) for _ in range(copies)]
    with torch.no_grad():
        for c, cell in enumerate(cells):  # AgentLinear weight [copies, in, out] = GRUCell weight [3H, in] transposed
            gru.x2h.weight[c].copy_(cell.weight_ih.T)
            gru.x2h.bias[c, 0].copy_(cell.bias_ih)
            gru.h2h.weight[c].copy_(cell.weight_hh.T)
            gru.h2h.bias[c, 0].copy_(cell.bias_hh)
    x = torch.randn(N_AGENTS, B, n_in)
    h = torch.randn(N_AGENTS, B, H)
    with torch.no_grad():
        out = gru(gru.x2h(x), h)
        for i in range(N_AGENTS):
            ref = cells[i if copies > 1 else 0](x[i], h[i])
            assert torch.allclose(out[i], ref, atol=1e-6)


def test_recurrent_actor_resets_its_hidden_state_where_an_episode_starts():
    torch.manual_seed(0)
    net = F.AgentNet(N_AGENTS, OBS, ACTS, HID, "partial", recurrent=True, out_gain=1.0)
    T, B, k = 6, 3, 3
    x = torch.randn(T, N_AGENTS, B, OBS)
    h0 = torch.randn(N_AGENTS, B, HID)
    starts = torch.zeros(T, B)
    starts[k, 1] = 1.0  # env 1 starts a new episode at t = k
    with torch.no_grad():
        out, h_last = net(x, h0, starts)
        # env 1 from t = k on equals a fresh run from a zero state on the tail of the sequence
        tail, h_tail = net(x[k:, :, 1:2], torch.zeros(N_AGENTS, 1, HID), torch.zeros(T - k, 1))
        assert torch.allclose(out[k:, :, 1:2], tail, atol=1e-6)
        assert torch.allclose(h_last[:, 1:2], h_tail, atol=1e-6)
        # the other envs keep their memory: another h0 changes their outputs after k, but not env 1's
        out2, _ = net(x, torch.randn(N_AGENTS, B, HID), starts)
        assert not torch.allclose(out2[k:, :, 0], out[k:, :, 0])
        assert torch.allclose(out2[k:, :, 1], out[k:, :, 1], atol=1e-6)
        assert not torch.allclose(out2[:k, :, 1], out[:k, :, 1])
        # one step at a time (as in the rollout) equals the whole sequence at once (as in training)
        h, steps = h0, []
        for t in range(T):
            o, h = net(x[t : t + 1], h, starts[t : t + 1])
            steps.append(o)
        assert torch.allclose(torch.cat(steps), out, atol=1e-6)


def test_masked_logits_and_evaluate_actions():
    torch.manual_seed(0)
    net = F.AgentNet(N_AGENTS, OBS, ACTS, HID, "none", recurrent=True)
    x, h0, starts = net_io()
    avail = torch.ones(*x.shape[:3], ACTS, dtype=torch.bool)
    avail[..., 0] = False
    actions = torch.randint(1, ACTS, x.shape[:3])
    logp, ent = F.evaluate_actions(net, x, avail, actions, h0, starts)
    assert logp.shape == ent.shape == x.shape[:3]
    logits, _ = net(x, h0, starts)
    ref = torch.log_softmax(logits[..., 1:], -1).gather(-1, (actions - 1)[..., None])[..., 0]
    assert torch.allclose(logp, ref, atol=1e-5)
    probs = torch.softmax(F.masked_logits(logits, avail), -1)
    assert (probs[..., 0] == 0).all()
