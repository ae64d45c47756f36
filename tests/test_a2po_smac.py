"""a2po_smac.py: PreOPC (eq. 2) against a plain-loop reference, the semi-greedy order, adaptive clipping, eq. 6's double
clip, the turns (whose ratios, blocks and epochs; without sharing the other agents' weights and Adam moments untouched,
Adam exact per agent), in process; and what its short end-to-end runs on SMAX log of its own (test_smac_e2e.py checks
what the four SMAC scripts share)."""
import copy
import math

import pytest
import torch
from harness import ran_ok, run_dir
from readers import assert_same_state_dict, read_scalars
from references import agent_slices, clip_active, reference_gae

import a2po_smac as A

GAMMA, LAM, EPS = 0.9, 0.8, 0.2


# ---------------------------------------------------------------------------------------------- PreOPC (eq. 2)
def trajectory(seed=0, T=9, B=3):
    """A short rollout of B environments with episode ends inside it and at its end; float64."""
    gen = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(T, B, generator=gen, dtype=torch.float64), torch.randn(T, B, generator=gen, dtype=torch.float64)
    next_value = torch.randn(B, generator=gen, dtype=torch.float64)
    dones = torch.zeros(T, B, dtype=torch.float64)
    dones[0] = 1.0
    dones[3, 0] = dones[7, 0] = dones[6, 1] = 1.0  # obs t starts a new episode
    next_done = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)  # env 1's episode ends with the rollout
    return rewards, values, dones, next_value, next_done


def reference_preopc(rewards, values, dones, next_value, next_done, rho, gamma, lam):
    """Eq. 2 written out: A_t = sum_{l >= t} (gamma * lam)^(l - t) * prod_{m = t+1..l} min(1, rho_m) * delta_l, the sum
    running to the end of t's episode or of the rollout, whichever comes first."""
    T, B = rewards.shape
    adv = [[0.0] * B for _ in range(T)]
    for b in range(B):
        ends = [float(next_done[b]) if t == T - 1 else float(dones[t + 1][b]) for t in range(T)]  # s_{t+1} is a new episode
        delta = [float(rewards[t][b]) + gamma * (float(next_value[b]) if t == T - 1 else float(values[t + 1][b])) * (1 - ends[t])
                 - float(values[t][b]) for t in range(T)]  # fmt: skip
        for t in range(T):
            total = 0.0
            for l in range(t, T):  # noqa: E741
                weight = (gamma * lam) ** (l - t)
                for m in range(t + 1, l + 1):
                    weight *= min(1.0, float(rho[m][b]))
                total += weight * delta[l]
                if ends[l]:
                    break
            adv[t][b] = total
    return torch.tensor(adv, dtype=torch.float64)


def test_preopc_with_all_ratios_one_is_gae():
    traj = trajectory()
    adv, returns = A.preopc_advantages(*traj, torch.ones_like(traj[0]), GAMMA, LAM)
    assert torch.allclose(adv, reference_gae(*traj, GAMMA, LAM)[0], atol=1e-12, rtol=0)
    assert torch.allclose(adv, reference_preopc(*traj, torch.ones_like(traj[0]), GAMMA, LAM), atol=1e-12, rtol=0)
    assert torch.equal(returns, adv + traj[1])


def test_preopc_truncates_the_preceding_agents_ratio_as_eq_2():
    traj = trajectory(seed=1)
    rho = 0.2 + 1.8 * torch.rand(traj[0].shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert (rho < 1).any() and (rho > 1).any()
    adv, _ = A.preopc_advantages(*traj, rho.clamp(max=1.0), GAMMA, LAM)
    assert torch.allclose(adv, reference_preopc(*traj, rho, GAMMA, LAM), atol=1e-12, rtol=0)
    assert not torch.allclose(adv, reference_gae(*traj, GAMMA, LAM)[0])  # the weights below 1 matter
    # step t's own ratio is not in A_t, only in the advantages before it in the same episode
    changed = rho.clone()
    changed[5, 2] = 0.01
    adv2, _ = A.preopc_advantages(*traj, changed.clamp(max=1.0), GAMMA, LAM)
    assert torch.equal(adv2[5:], adv[5:]) and torch.equal(adv2[:, :2], adv[:, :2])
    assert (adv2[:5, 2] != adv[:5, 2]).all()


def test_preopc_on_hand_values():
    """One env, no episode end, V = 0: delta = r = 1; rho = (0.5, 0.5, 2.0); gamma * lam = 0.5."""
    ones = torch.ones(3, 1, dtype=torch.float64)
    rho = torch.tensor([[0.5], [0.5], [2.0]], dtype=torch.float64)
    adv, _ = A.preopc_advantages(ones, 0 * ones, 0 * ones, torch.zeros(1), torch.zeros(1), rho.clamp(max=1), 0.5, 1.0)
    # A_2 = 1; A_1 = 1 + 0.5 * min(1, 2.0) * 1 = 1.5; A_0 = 1 + 0.5 * min(1, 0.5) * 1.5 = 1.375 (rho_0 plays no part)
    assert adv.flatten().tolist() == [1.375, 1.5, 1.0]


# ---------------------------------------------------------------------------------------------- order and clipping
def test_semi_greedy_alternates_greedy_and_uniformly_random_picks():
    scores = [0.1, 0.9, 0.5, 0.7, 0.3, 0.2]
    adv = torch.tensor(scores).view(1, -1, 1).repeat(4, 1, 3)
    adv[1::2] *= -1  # the score is the mean |A|
    active = torch.ones_like(adv)
    adv[0, 0, 0], active[0, 0, 0] = 1000.0, 0.0  # a dead agent's sample does not count
    active[1:, 1] = 0.0  # agent 1 alive in 3 samples only: the largest mean |A| (0.9), but not the largest sum
    first_random = []
    for seed in range(300):
        torch.manual_seed(seed)
        order = A.agent_order("semi-greedy", adv, active).tolist()
        assert sorted(order) == list(range(6))
        remaining = list(range(6))
        for position, agent in enumerate(order):
            if position % 2 == 0:  # greedy: the largest score left
                assert scores[agent] == max(scores[j] for j in remaining), (order, position)
            remaining.remove(agent)
        first_random.append(order[1])
    counts = {agent: first_random.count(agent) for agent in range(6)}
    assert counts[1] == 0 and all(30 <= counts[a] <= 90 for a in (0, 2, 3, 4, 5)), counts  # uniform over the 5 left
    assert len({tuple(A.agent_order("semi-greedy", adv, active).tolist()) for _ in range(20)}) > 1
    assert A.agent_order("fixed", adv, active).tolist() == list(range(6))
    assert len({tuple(A.agent_order("random", adv, active).tolist()) for _ in range(20)}) > 1


# ---------------------------------------------------------------------------------------------- objective (eq. 6)
def test_double_clip_bounds_the_preceding_agents_weight():
    ratio = torch.ones(4, dtype=torch.float64, requires_grad=True)
    prev = torch.tensor([50.0, 0.01, 1.05, 1.0], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    obj = A.a2po_objective(ratio, adv, prev, EPS)
    # g = clip(prev, 0.9, 1.1): l = (1.1, 0.9, 1.05, 1.0), inside clip(l, 0.8, 1.2)
    assert torch.allclose(obj, torch.tensor([1.1, 0.9, 1.05, -1.0], dtype=torch.float64))
    obj.sum().backward()
    assert torch.allclose(ratio.grad, torch.tensor([1.1, 0.9, 1.05, -1.0], dtype=torch.float64))  # |weight| <= 1 + eps / 2
    # random inputs: the gradient's weight on A never leaves [1 - eps / 2, 1 + eps / 2], and is 0 where l is clipped
    gen = torch.Generator().manual_seed(3)
    ratio = (0.5 + torch.rand(500, generator=gen, dtype=torch.float64)).requires_grad_()
    prev = torch.exp(3 * torch.randn(500, generator=gen, dtype=torch.float64))
    adv = torch.randn(500, generator=gen, dtype=torch.float64)
    A.a2po_objective(ratio, adv, prev, EPS).sum().backward()
    g = prev.clamp(1 - EPS / 2, 1 + EPS / 2)
    l = ratio.detach() * g  # noqa: E741
    clipped = clip_active(l, adv)
    assert clipped.any() and (~clipped).any() and (prev > 2).any() and (prev < 0.5).any()
    assert torch.allclose(ratio.grad, torch.where(clipped, torch.zeros_like(adv), g * adv))


def test_per_agent_clip_ranges_broadcast():
    gen = torch.Generator().manual_seed(4)
    ratio, adv = 0.6 + 0.8 * torch.rand(5, 3, 7, generator=gen), torch.randn(5, 3, 7, generator=gen)
    prev = 0.7 + 0.6 * torch.rand(5, 3, 7, generator=gen)
    clip = torch.tensor([0.1, 0.15, 0.2]).view(1, 3, 1)
    together = A.a2po_objective(ratio, adv, prev, clip)
    for i, eps in enumerate((0.1, 0.15, 0.2)):
        assert torch.allclose(together[:, i], A.a2po_objective(ratio[:, i], adv[:, i], prev[:, i], eps))


# ---------------------------------------------------------------------------------------------- the update
N, T, E, OBS, STATE, ACTS, HID = 3, 6, 5, 7, 9, 4, 8


def hand_made_batch(sharing, n=N, seed=0):
    """Tiny actor (GRU) and critic, their optimizers, a rollout batch like the script's `b`, PreOPC's inputs and a value
    normaliser that has seen some returns."""
    torch.manual_seed(seed)
    actor = A.AgentNet(n, OBS, ACTS, HID, sharing, recurrent=True)
    critic = A.AgentNet(n, STATE, 1, HID, "full" if sharing == "partial" else sharing, out_gain=1.0)
    opts = [torch.optim.Adam(actor.parameters(), lr=5e-3, eps=1e-5), torch.optim.Adam(critic.parameters(), lr=5e-3, eps=1e-5)]
    gen = torch.Generator().manual_seed(seed)
    avail = torch.rand(T, n, E, ACTS, generator=gen) > 0.3
    avail[..., 0] = True
    actions = torch.multinomial(avail.float().view(-1, ACTS), 1, generator=gen).view(T, n, E)
    starts = torch.zeros(T, E)
    starts[0], starts[2, 1], starts[4, 3] = 1.0, 1.0, 1.0
    b = dict(obs=torch.randn(T, n, E, OBS, generator=gen), state=torch.randn(T, n, E, STATE, generator=gen),
             avail=avail, actions=actions, starts=starts, h0=torch.zeros(n, E, HID),
             values=torch.randn(T, n, E, generator=gen), active=(torch.rand(T, n, E, generator=gen) > 0.15).float())  # fmt: skip
    b["logp"] = A.rollout_logp(actor, b) + 0.2 * torch.randn(T, n, E, generator=gen)
    value_norm = A.ValueNorm()
    value_norm.update(3 + 2 * torch.randn(100, generator=gen))
    trace = (torch.randn(T, 1, E, generator=gen), value_norm.denormalize(b["values"]), starts[:, None],
             torch.randn(n, E, generator=gen), torch.tensor([[0.0, 1.0, 0.0, 0.0, 1.0]]))  # fmt: skip
    adv, returns = A.preopc_advantages(*trace, torch.ones(T, n, E), 0.99, 0.95)
    b.update(adv=A.standardize_per_agent(adv, b["active"]), returns_n=value_norm.normalize(returns))
    per_agent = (A.agent_params(actor, n), A.agent_params(critic, n))
    return actor, critic, opts, b, trace, value_norm, per_agent


def make_args(**kw):
    return A.Args(**{"update_epochs": 2, "num_minibatches": 1, **kw})


def update_in_order(actor, critic, opts, b, trace, order, value_norm, args, generator=None):
    """a2po_update with `order` as the iteration's agent order (whatever the rule would draw)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(A, "agent_order", lambda *_: order)
        return A.a2po_update(actor, critic, opts, b, trace, value_norm, args, generator)


def record_turns(monkeypatch):
    """Wrap a2po_turn: record each turn's agents, batch, clip, epochs, the RNG state and the rollout log-probs before it."""
    turns, original = [], A.a2po_turn

    def recording(actor, critic, opts, b, agents, clip, epochs, per_agent, args, generator=None):
        turns.append(dict(agents=agents.tolist(), b=b, clip=clip.flatten().tolist(), epochs=epochs, rng=torch.get_rng_state(),
                          logp=A.rollout_logp(actor, b)))  # fmt: skip
        return original(actor, critic, opts, b, agents, clip, epochs, per_agent, args, generator)

    monkeypatch.setattr(A, "a2po_turn", recording)
    return turns


def expected_turn_inputs(b, trace, value_norm, logp, moved, preopc=True):
    """Slow version of a turn's inputs: the joint ratio of the `moved` agents (alive samples only), eq. 2 with the plain-loop
    reference, standardised per agent, the value targets, and eq. 6's product over the moved agents other than i."""
    ratio = torch.where(b["active"].bool(), (logp - b["logp"]).exp(), torch.ones_like(logp)).double()
    joint = torch.ones(T, E, dtype=torch.float64)
    for j in moved:
        joint = joint * ratio[:, j]
    rewards, values_d, dones, next_value_d, next_done = (x.double() for x in trace)
    rho = joint if preopc else torch.ones_like(joint)
    adv = torch.stack([reference_preopc(rewards[:, 0], values_d[:, i], dones[:, 0], next_value_d[i], next_done[0], rho, 0.99,
                                        0.95) for i in range(N)], 1)  # fmt: skip
    prev = torch.stack([joint / (ratio[:, i] if i in moved else 1.0) for i in range(N)], 1)
    return A.standardize_per_agent(adv, b["active"].double()), value_norm.normalize(adv + values_d), prev


@pytest.mark.parametrize("sharing", ["none", "full", "partial"])
def test_each_turn_traces_with_the_current_ratios_of_the_agents_that_moved(sharing, monkeypatch):
    """Without sharing a turn's advantages, value targets and eq. 6's product use the preceding agents' current ratios; with
    a shared actor every turn moves every agent, so all agents' after the first turn (Algorithm 2)."""
    actor, critic, opts, b, trace, value_norm, per_agent = hand_made_batch(sharing)
    turns = record_turns(monkeypatch)
    order = torch.tensor([2, 0, 1])
    _, diag = update_in_order(actor, critic, opts, b, trace, order, value_norm, make_args(sharing=sharing))
    assert [t["agents"] for t in turns] == [[2], [0], [1]]
    assert torch.equal(turns[0]["b"]["adv"], b["adv"]) and torch.equal(turns[0]["b"]["prev_ratio"], torch.ones(T, N, E))
    for k, turn in enumerate(turns):
        moved = order[:k].tolist() if sharing == "none" else (list(range(N)) if k else [])
        adv, returns_n, prev = expected_turn_inputs(b, trace, value_norm, turn["logp"], moved)
        assert torch.allclose(turn["b"]["adv"].double(), adv, atol=1e-4), k
        assert torch.allclose(turn["b"]["returns_n"].double(), returns_n, atol=1e-4), k
        assert torch.allclose(turn["b"]["prev_ratio"].double(), prev, atol=1e-5), k
        if k:
            assert not torch.allclose(turn["b"]["adv"], b["adv"], atol=1e-4)  # the correction is not vacuous
    assert [diag[f"a2po/position_agent{i}"] for i in range(N)] == [1, 2, 0]
    kl_final = A.kl_per_agent(A.rollout_logp(actor, b), b)
    assert [diag[f"a2po/kl_agent{i}"] for i in range(N)] == pytest.approx(kl_final.tolist())
    assert all(diag[f"a2po/kl_after_turn_agent{i}"] > 0 for i in range(N))
    if sharing == "none":  # only its own turn moves an agent: its KL after its turn is its final KL
        assert all(diag[f"a2po/kl_after_turn_agent{i}"] == diag[f"a2po/kl_agent{i}"] for i in range(N))


def test_no_preopc_uses_the_rollouts_gae_in_every_turn(monkeypatch):
    actor, critic, opts, b, trace, value_norm, per_agent = hand_made_batch("none")
    turns = record_turns(monkeypatch)
    args = make_args(sharing="none", preopc=False)
    update_in_order(actor, critic, opts, b, trace, torch.tensor([1, 2, 0]), value_norm, args)
    for k, turn in enumerate(turns):
        assert torch.equal(turn["b"]["adv"], b["adv"]) and torch.equal(turn["b"]["returns_n"], b["returns_n"])
        _, _, prev = expected_turn_inputs(b, trace, value_norm, turn["logp"], [1, 2, 0][:k], preopc=False)
        assert torch.allclose(turn["b"]["prev_ratio"].double(), prev, atol=1e-5)  # eq. 6's product still corrects


@pytest.mark.parametrize("c,expected", [(0.5, [0.125, 0.15, 0.175, 0.2]), (0.0, [0.05, 0.1, 0.15, 0.2]), (1.0, [0.2] * 4)])
def test_adaptive_clip_for_four_agents(c, expected, monkeypatch):
    """eps_k = eps * c + eps * (1 - c) * k / n for the agent at position k = 1..n (section 4); n = 4, eps = 0.2."""
    actor, critic, opts, b, trace, value_norm, per_agent = hand_made_batch("none", n=4)
    turns = record_turns(monkeypatch)
    order = torch.tensor([2, 0, 3, 1])
    _, diag = update_in_order(actor, critic, opts, b, trace, order, value_norm,
                            make_args(sharing="none", clip_adapt_coef=c, update_epochs=1))  # fmt: skip
    for position, agent in enumerate(order.tolist()):
        assert diag[f"a2po/clip_agent{agent}"] == pytest.approx(expected[position])
        assert turns[position]["clip"][agent] == pytest.approx(expected[position])


@pytest.mark.parametrize("sharing", ["none", "full", "partial"])
def test_blocks_take_turns_and_a_shared_actor_divides_the_epochs(sharing, monkeypatch):
    """Order [2, 0, 1] in 2 blocks: [2, 0] then [1]. Without sharing each block runs all epochs; with a shared actor
    ceil(3 / 2) = 2 rounds of one epoch per block (Algorithm 2). Block-mates are not each other's preceding agents."""
    actor, critic, opts, b, trace, value_norm, per_agent = hand_made_batch(sharing)
    turns = record_turns(monkeypatch)
    update_in_order(actor, critic, opts, b, trace, torch.tensor([2, 0, 1]), value_norm,
                  make_args(sharing=sharing, num_blocks=2, update_epochs=3))  # fmt: skip
    if sharing == "none":
        assert [(t["agents"], t["epochs"]) for t in turns] == [([2, 0], 3), ([1], 3)]
        assert torch.equal(turns[0]["b"]["prev_ratio"], torch.ones(T, N, E))
        _, _, prev = expected_turn_inputs(b, trace, value_norm, turns[1]["logp"], [2, 0])
        assert torch.allclose(turns[1]["b"]["prev_ratio"].double(), prev, atol=1e-5)
    else:
        assert [(t["agents"], t["epochs"]) for t in turns] == [([2, 0], 1), ([1], 1), ([2, 0], 1), ([1], 1)]


@pytest.mark.parametrize("sharing", ["none", "full"])
def test_only_the_blocks_alive_samples_enter_the_losses(sharing, monkeypatch):
    """Other agents' samples and the block's dead samples may hold anything: the turn's result is the same. And every agent
    of the block is clipped with its own eps_k."""
    actor, critic, opts, b, trace, value_norm, per_agent = hand_made_batch(sharing)
    turn = {**b, "prev_ratio": 0.5 + torch.rand(T, N, E, generator=torch.Generator().manual_seed(7))}
    other = {k: v.clone() for k, v in turn.items()}
    outside = torch.ones(T, N, E, dtype=torch.bool)
    outside[:, [0, 2]] = ~b["active"][:, [0, 2]].bool()  # block [0, 2]: everything of agent 1, and 0's and 2's dead samples
    for key in ("adv", "returns_n", "values", "prev_ratio", "logp"):
        other[key][outside] = 5 * torch.randn(int(outside.sum()))
    clip, results, seen, original = torch.tensor([0.1, 0.3, 0.2]).view(1, N, 1), [], [], A.a2po_objective
    monkeypatch.setattr(A, "a2po_objective", lambda r, a, p, eps: seen.append(eps.flatten().tolist()) or original(r, a, p, eps))
    for batch in (turn, other):
        nets = copy.deepcopy((actor, critic))
        o = [torch.optim.Adam(net.parameters(), lr=5e-3, eps=1e-5) for net in nets]
        torch.manual_seed(8)
        params = (A.agent_params(nets[0], N), A.agent_params(nets[1], N))
        stats = A.a2po_turn(*nets, o, batch, torch.tensor([0, 2]), clip, 2, params, make_args(sharing=sharing))
        results.append((nets[0].state_dict(), nets[1].state_dict(), stats))
    assert_same_state_dict(results[0][0], results[1][0], "actor")
    assert_same_state_dict(results[0][1], results[1][1], "critic")
    assert torch.equal(results[0][2], results[1][2])
    assert seen and all(eps == pytest.approx([0.1, 0.2]) for eps in seen)


@pytest.mark.parametrize("sharing,block", [("none", [1]), ("none", [0, 2]), ("partial", [1])])
def test_a_turn_leaves_the_other_agents_weights_and_adam_moments_bit_for_bit(sharing, block):
    actor, critic, opts, b, trace, value_norm, per_agent = hand_made_batch(sharing)
    update_in_order(actor, critic, opts, b, trace, torch.arange(N), value_norm, make_args(sharing=sharing))
    moments = [opt.state[p]["exp_avg"][i] for opt, ps in zip(opts, per_agent, strict=True) for p in ps for i in range(N)]
    assert all(m.abs().sum() > 0 for m in moments)  # every agent has Adam moments now
    before = {(k, i): agent_slices(opts[k], per_agent[k], i) for k in range(2) for i in range(N) if per_agent[k]}
    shared = [p.detach().clone() for net in (actor, critic) for p in net.parameters() if p.shape[0] == 1]
    assert bool(shared) == (sharing == "partial") and per_agent[0]
    turn = {**b, "prev_ratio": 0.5 + torch.rand(T, N, E)}
    clip = torch.full((1, N, 1), EPS)
    A.a2po_turn(actor, critic, opts, turn, torch.tensor(block), clip, 2, per_agent, make_args(sharing=sharing))
    for k, i in before:
        after = agent_slices(opts[k], per_agent[k], i)
        same = [torch.equal(x, y) for x, y in zip(before[k, i], after, strict=True)]
        if i in block:
            assert not any(same), f"{'actor critic'.split()[k]}: agent {i}'s own slices did not all move"
        else:
            assert all(same), f"{'actor critic'.split()[k]}: agent {i}'s slices changed during the turn of {block}"
    shared_after = [p.detach() for net in (actor, critic) for p in net.parameters() if p.shape[0] == 1]
    assert all(not torch.equal(x, y) for x, y in zip(shared, shared_after, strict=True)), "the shared trunk must move"


@pytest.mark.parametrize("max_grad_norm", [0.01, 1e9])
def test_without_sharing_a_block_trains_each_agent_as_a_separate_network(max_grad_norm):
    """A block [0, 2] without sharing gives agents 0 and 2 what a turn of their own gives: each its own mean loss (Adam's
    eps tells a pooled mean apart) and its own gradient clipping (0.01 makes it bite), as N separate networks would."""
    actor, critic, opts, b, trace, value_norm, per_agent = hand_made_batch("none")
    start = copy.deepcopy((actor.state_dict(), critic.state_dict()))
    args, clip = make_args(sharing="none", max_grad_norm=max_grad_norm), torch.full((1, N, 1), EPS)
    turn = {**b, "prev_ratio": 0.5 + torch.rand(T, N, E, generator=torch.Generator().manual_seed(6))}
    torch.manual_seed(5)
    A.a2po_turn(actor, critic, opts, turn, torch.tensor([0, 2]), clip, 2, per_agent, args)
    for i in (0, 2):
        ref_actor, ref_critic = A.AgentNet(N, OBS, ACTS, HID, "none", recurrent=True), A.AgentNet(N, STATE, 1, HID, "none")
        ref_actor.load_state_dict(start[0]), ref_critic.load_state_dict(start[1])
        ref_opts = [torch.optim.Adam(net.parameters(), lr=5e-3, eps=1e-5) for net in (ref_actor, ref_critic)]
        torch.manual_seed(5)
        A.a2po_turn(ref_actor, ref_critic, ref_opts, turn, torch.tensor([i]), clip, 2, (A.agent_params(ref_actor, N),
                    A.agent_params(ref_critic, N)), args)  # fmt: skip
        for net, ref in ((actor, ref_actor), (critic, ref_critic)):
            for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
                assert torch.allclose(p[i], q[i], rtol=0, atol=1e-6), f"agent {i}'s {name}: not as a network of its own"
                assert not torch.equal(p[i], start[0 if net is actor else 1][name][i]), name


def test_without_the_guard_adam_would_move_the_other_agents(monkeypatch):
    """The test above is not vacuous: a plain opt.step() with zero gradients still moves the other agents."""
    actor, critic, opts, b, trace, value_norm, per_agent = hand_made_batch("none")
    update_in_order(actor, critic, opts, b, trace, torch.arange(N), value_norm, make_args(sharing="none"))
    before = agent_slices(opts[0], per_agent[0], 0)
    monkeypatch.setattr(A, "step_agents", lambda opt, params, agents: opt.step())
    A.a2po_turn(actor, critic, opts, {**b, "prev_ratio": torch.ones(T, N, E)}, torch.tensor([1]), torch.full((1, N, 1), EPS), 2,
                per_agent, make_args(sharing="none"))  # fmt: skip
    assert not any(torch.equal(x, y) for x, y in zip(before, agent_slices(opts[0], per_agent[0], 0), strict=True))


@pytest.mark.parametrize("sharing,num_blocks", [("none", 0), ("none", 2), ("partial", 0), ("partial", 2)])
def test_adam_step_counts_count_each_agents_own_steps(sharing, num_blocks):
    """Per-agent tensors count their agent's steps only (epochs x minibatches per round), shared ones every step."""
    actor, critic, opts, b, trace, value_norm, per_agent = hand_made_batch(sharing)
    args = make_args(sharing=sharing, num_blocks=num_blocks, update_epochs=3, num_minibatches=1)
    blocks = num_blocks or N
    own_steps, all_steps = (3, 3 * blocks) if sharing == "none" else (math.ceil(3 / blocks), math.ceil(3 / blocks) * blocks)
    for iteration in (1, 2):
        update_in_order(actor, critic, opts, b, trace, torch.randperm(N), value_norm, args)
        for opt, net, params in zip(opts, (actor, critic), per_agent, strict=True):
            for p in net.parameters():
                own = any(p is q for q in params)
                assert opt.state[p]["step"].item() == iteration * (own_steps if own else all_steps)


def test_every_agents_slice_is_updated_exactly_as_by_an_adam_of_its_own(monkeypatch):
    """Without sharing, an agent's turn (at any position) equals training that agent alone from the same start with a fresh
    Adam on the same turn inputs and minibatches: bias correction included, bit for bit."""
    actor, critic, opts, b, trace, value_norm, per_agent = hand_made_batch("none")
    start = copy.deepcopy((actor.state_dict(), critic.state_dict()))
    original_turn = A.a2po_turn
    turns = record_turns(monkeypatch)
    args = make_args(sharing="none")
    update_in_order(actor, critic, opts, b, trace, torch.tensor([0, 2, 1]), value_norm, args)
    for turn in turns:
        i = turn["agents"][0]
        ref_actor, ref_critic = A.AgentNet(N, OBS, ACTS, HID, "none", recurrent=True), A.AgentNet(N, STATE, 1, HID, "none")
        ref_actor.load_state_dict(start[0]), ref_critic.load_state_dict(start[1])
        ref_opts = [torch.optim.Adam(net.parameters(), lr=5e-3, eps=1e-5) for net in (ref_actor, ref_critic)]
        torch.set_rng_state(turn["rng"])  # the same minibatches
        ref_per_agent = (A.agent_params(ref_actor, N), A.agent_params(ref_critic, N))
        clip = torch.tensor(turn["clip"]).view(1, N, 1)
        original_turn(ref_actor, ref_critic, ref_opts, turn["b"], torch.tensor([i]), clip, turn["epochs"], ref_per_agent, args)
        for net, ref in ((actor, ref_actor), (critic, ref_critic)):
            for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
                assert torch.equal(p[i], q[i]), f"agent {i}'s {name} differs from what an Adam of its own gives"


# ---------------------------------------------------------------------------------------------- end to end
N_AGENTS = 5  # SMAX 2s3z


@pytest.mark.parametrize("sharing", ["none", "partial", "full"])
def test_short_runs_log_the_turns(smac_runs, sharing):
    """In conftest's short runs (test_smac_e2e.py checks what all SMAC scripts log): each iteration's positions are an
    order of the agents (--order fixed under full sharing: 0, 1, ...), each agent's clip is eps_k for its position k,
    every turn moved its agents, and without sharing a turn moves only its own agent: the KL after its turn is its
    final KL."""
    _, cwd = ran_ok(smac_runs("a2po_smac"), sharing)
    scalars = read_scalars(run_dir(cwd))
    for k in range(2):
        positions = [scalars[f"a2po/position_agent{i}"][k][1] for i in range(N_AGENTS)]
        assert sorted(positions) == list(range(N_AGENTS))
        if sharing == "full":  # --order fixed
            assert positions == list(range(N_AGENTS))
        for i in range(N_AGENTS):  # eps_k = 0.2 * (0.5 + 0.5 * k / 5), k = position + 1
            assert scalars[f"a2po/clip_agent{i}"][k][1] == pytest.approx(0.2 * (0.5 + 0.5 * (positions[i] + 1) / N_AGENTS))
            assert scalars[f"a2po/kl_after_turn_agent{i}"][k][1] > 0
        if sharing == "none":
            for i in range(N_AGENTS):
                assert scalars[f"a2po/kl_after_turn_agent{i}"][k][1] == scalars[f"a2po/kl_agent{i}"][k][1]
