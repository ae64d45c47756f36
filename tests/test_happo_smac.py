"""happo_smac.py: HAPPO's objective and factor M, the sequential update with per-agent weights (other agents' weights
and Adam moments untouched, Adam exact per agent) and the critic fitted after the turns, in process; and what its short
end-to-end runs on SMAX log of its own (test_smac_e2e.py checks what the four SMAC scripts share)."""
import copy

import pytest
import references
import torch
from harness import ran_ok, run_dir
from readers import assert_same_state_dict, read_scalars
from references import HAND_MADE, agent_slices, clip_active, ppo_clip

import happo_smac as H

EPS = 0.2
N, T, E, OBS, STATE, ACTS, HID = HAND_MADE.values()


# ---------------------------------------------------------------------------------------------- objective and M
def test_happo_objective_is_the_factor_times_ppo_clip():
    gen = torch.Generator().manual_seed(0)
    ratio = (0.5 + 1.1 * torch.rand(300, generator=gen, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(300, generator=gen, dtype=torch.float64)
    factor = 0.3 + 2 * torch.rand(300, generator=gen, dtype=torch.float64)
    obj = H.happo_objective(ratio, adv, factor, EPS)
    clipped_ratio = torch.clamp(ratio, 1 - EPS, 1 + EPS)
    assert torch.allclose(obj, factor * ppo_clip(ratio, adv))
    assert torch.allclose(obj, torch.min(ratio * adv * factor, clipped_ratio * adv * factor))  # listing B.2's form
    obj.sum().backward()
    clipped = clip_active(ratio, adv)
    assert clipped.any() and (~clipped).any()
    assert torch.allclose(ratio.grad, torch.where(clipped, torch.zeros_like(adv), factor * adv))


def test_happo_objective_on_hand_values():
    ratio, adv, factor = torch.tensor([0.5, 1.1, 1.5, 0.5, 1.5]), torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0]), torch.tensor(2.0)
    assert torch.allclose(H.happo_objective(ratio, adv, factor, EPS), torch.tensor([1.0, 2.2, 2.4, -1.6, -3.0]))


def test_factor_update_multiplies_by_exactly_the_agents_ratio_on_a_hand_made_batch():
    gen = torch.Generator().manual_seed(1)
    factor = 0.5 + torch.rand(T, E, generator=gen)
    logp_old, logp_new = -torch.rand(T, E, generator=gen) * 2, -torch.rand(T, E, generator=gen) * 2
    active = torch.ones(T, E)
    active[1, 2] = active[4, 0] = 0.0  # dead agent: its ratio does not enter M
    new = H.happo_factor_update(factor, logp_new.requires_grad_(), logp_old, active)
    alive = active.bool()
    assert torch.equal(new[alive], (factor * (logp_new - logp_old).exp())[alive])
    assert torch.equal(new[~alive], factor[~alive])
    assert not new.requires_grad  # detached, and never clipped:
    big = H.happo_factor_update(torch.ones(1), torch.tensor([1.0]), torch.tensor([0.0]), torch.ones(1))
    assert big.item() == pytest.approx(torch.e)


# ---------------------------------------------------------------------------------------------- the update
def hand_made_batch(sharing, seed=0):
    """hand_made_batch's tiny actor, critic, optimizers and batch, and the actor's per-agent parameters."""
    actor, critic, opts, b = references.hand_made_batch(H, sharing, seed, logp_noise=0.2)
    return actor, critic, opts, b, H.agent_params(actor, N)


ARGS = H.Args(update_epochs=2, num_minibatches=2)
FIXED = H.Args(update_epochs=2, num_minibatches=2, fixed_order=True)


def record_turns(monkeypatch):
    """Wrap happo_turn: record, per turn, the agent, its M, the RNG state before it and the rollout log-probs after it."""
    turns, original = [], H.happo_turn

    def recording(actor, opt, b, factor, agent, params, args, generator=None):
        rng = torch.get_rng_state()
        out = original(actor, opt, b, factor, agent, params, args, generator)
        turns.append(dict(agent=agent, factor=factor, rng=rng, logp=H.rollout_logp(actor, b)))
        return out

    monkeypatch.setattr(H, "happo_turn", recording)
    return turns


@pytest.mark.parametrize("sharing", ["full", "partial", "none"])
def test_each_turn_multiplies_m_by_exactly_that_agents_new_ratio(sharing, monkeypatch):
    actor, critic, opts, b, _ = hand_made_batch(sharing)
    turns = record_turns(monkeypatch)
    _, diag = H.happo_update(actor, critic, opts, b, ARGS, torch.Generator().manual_seed(3))
    order, factors = [t["agent"] for t in turns], {t["agent"]: t["factor"] for t in turns}
    assert sorted(order) == list(range(N)) and order != list(range(N))  # the generator's random order
    assert torch.equal(factors[order[0]], torch.ones(T, E))  # M = 1 for the first agent
    for prev, nxt in zip(order[:-1], order[1:], strict=True):
        logp_new = next(t["logp"] for t in turns if t["agent"] == prev)[:, prev]
        alive = b["active"][:, prev].bool()
        expected = factors[prev] * (logp_new - b["logp"][:, prev]).exp()
        assert torch.equal(factors[nxt][alive], expected[alive])
        assert torch.equal(factors[nxt][~alive], factors[prev][~alive])
        assert not torch.equal(factors[nxt], factors[prev])
    assert [diag[f"happo/position_agent{i}"] for i in range(N)] == [order.index(i) for i in range(N)]
    assert diag[f"happo/factor_mean_agent{order[0]}"] == diag[f"happo/factor_max_agent{order[0]}"] == 1.0
    last = order[-1]
    alive = b["active"][:, last].bool()
    assert diag[f"happo/factor_max_agent{last}"] == pytest.approx(factors[last][alive].max().item())
    assert diag[f"happo/factor_mean_agent{last}"] == pytest.approx(factors[last][alive].mean().item())


def test_only_the_turns_agent_samples_enter_the_losses():
    """Under full sharing everything moves the one network, but only agent 1's samples may drive its turn."""
    actor, critic, opts, b, per_agent = hand_made_batch("full")
    other = {**b, "adv": b["adv"].clone(), "logp": b["logp"].clone()}
    for key in ("adv", "logp"):
        other[key][:, [0, 2]] = torch.randn(T, 2, E) * 5
    factor = 0.5 + torch.rand(T, E)
    results = []
    for a, batch in ((copy.deepcopy(actor), b), (copy.deepcopy(actor), other)):
        torch.manual_seed(7)
        stats = H.happo_turn(a, torch.optim.Adam(a.parameters(), lr=5e-3, eps=1e-5), batch, factor, 1, [], ARGS)
        results.append((a.state_dict(), stats))
    assert_same_state_dict(results[0][0], results[1][0], "actor")
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("sharing", ["none", "partial"])
def test_a_turn_leaves_the_other_agents_weights_and_adam_moments_bit_for_bit(sharing):
    actor, critic, opts, b, params = hand_made_batch(sharing)
    H.happo_update(actor, critic, opts, b, FIXED)  # every agent has Adam moments now
    assert all(opts[0].state[p]["exp_avg"][i].abs().sum() > 0 for p in params for i in range(N))
    agent = 1
    before = {i: agent_slices(opts[0], params, i) for i in range(N)}
    shared = [p.detach().clone() for p in actor.parameters() if p.shape[0] == 1]
    assert bool(shared) == (sharing == "partial") and params
    H.happo_turn(actor, opts[0], b, torch.ones(T, E), agent, params, ARGS)
    for i in range(N):
        same = [torch.equal(x, y) for x, y in zip(before[i], agent_slices(opts[0], params, i), strict=True)]
        if i == agent:
            assert not any(same), f"agent {agent}'s own slices did not all move"
        else:
            assert all(same), f"agent {i}'s slices changed during agent {agent}'s turn"
    shared_after = [p.detach() for p in actor.parameters() if p.shape[0] == 1]
    assert all(not torch.equal(x, y) for x, y in zip(shared, shared_after, strict=True)), "the shared trunk must move"


def test_without_the_guard_adam_would_move_the_other_agents(monkeypatch):
    """The test above is not vacuous: a plain opt.step() with zero gradients still moves the other agents."""
    actor, critic, opts, b, params = hand_made_batch("none")
    H.happo_update(actor, critic, opts, b, FIXED)
    before = agent_slices(opts[0], params, 0)
    monkeypatch.setattr(H, "step_one_agent", lambda opt, params, agent: opt.step())
    H.happo_turn(actor, opts[0], b, torch.ones(T, E), 1, params, ARGS)
    assert not any(torch.equal(x, y) for x, y in zip(before, agent_slices(opts[0], params, 0), strict=True))


@pytest.mark.parametrize("sharing", ["none", "partial"])
def test_adam_step_counts_count_each_agents_own_steps(sharing):
    """The actor's per-agent tensors count their agent's steps, its shared ones every turn's; the critic, fitted once
    after the turns (Algorithm 3 line 14), takes MAPPO's epochs x minibatches steps per iteration."""
    actor, critic, opts, b, params = hand_made_batch(sharing)
    steps = ARGS.update_epochs * ARGS.num_minibatches
    for iteration in (1, 2):
        H.happo_update(actor, critic, opts, b, ARGS)
        for p in actor.parameters():
            assert opts[0].state[p]["step"].item() == iteration * steps * (1 if any(p is q for q in params) else N)
        assert all(opts[1].state[p]["step"].item() == iteration * steps for p in critic.parameters())


def test_every_agents_slice_is_updated_exactly_as_by_an_adam_of_its_own(monkeypatch):
    """Without sharing, agent i's turn (at any position) must equal training agent i alone from the same start with a
    fresh Adam, the same M and the same minibatches: bias correction included, bit for bit."""
    actor, critic, opts, b, _ = hand_made_batch("none")
    start = copy.deepcopy(actor.state_dict())
    original_turn = H.happo_turn
    turns = record_turns(monkeypatch)
    H.happo_update(actor, critic, opts, b, ARGS)
    assert [t["agent"] for t in turns] != list(range(N))  # some agent's turn is not at its own index
    for turn in turns:
        i = turn["agent"]
        ref_actor = H.AgentNet(N, OBS, ACTS, HID, "none", recurrent=True)
        ref_actor.load_state_dict(start)
        torch.set_rng_state(turn["rng"])  # the same minibatches
        ref_opt = torch.optim.Adam(ref_actor.parameters(), lr=5e-3, eps=1e-5)
        original_turn(ref_actor, ref_opt, b, turn["factor"], i, H.agent_params(ref_actor, N), ARGS)
        for (name, p), q in zip(actor.named_parameters(), ref_actor.parameters(), strict=True):
            assert torch.equal(p[i], q[i]), f"agent {i}'s {name} differs from what an Adam of its own gives"


# ---------------------------------------------------------------------------------------------- end to end
N_AGENTS = 5  # SMAX 2s3z


def logged_turns(scalars, k):
    """Iteration k's positions of the agents in the order of turns, per agent."""
    return [scalars[f"happo/position_agent{i}"][k][1] for i in range(N_AGENTS)]


@pytest.mark.parametrize("sharing", ["none", "partial", "full"])
def test_short_runs_log_the_turns(smac_runs, sharing):
    """In conftest's short runs (test_smac_e2e.py checks what all SMAC scripts log): each iteration's positions are an
    order of the agents (--fixed-order under full sharing: 0, 1, ...), the first agent's M is 1, every turn moved its
    agent, and without sharing a turn moves only its own agent: the KL after its turn is its final KL."""
    _, cwd = ran_ok(smac_runs("happo_smac"), sharing)
    scalars = read_scalars(run_dir(cwd))
    for k in range(2):
        positions = logged_turns(scalars, k)
        assert sorted(positions) == list(range(N_AGENTS))
        if sharing == "full":  # --fixed-order
            assert positions == list(range(N_AGENTS))
        first = positions.index(0)
        assert scalars[f"happo/factor_mean_agent{first}"][k][1] == scalars[f"happo/factor_max_agent{first}"][k][1] == 1.0
        assert all(scalars[f"happo/kl_after_turn_agent{i}"][k][1] > 0 for i in range(N_AGENTS))
        if sharing == "none":
            for i in range(N_AGENTS):
                assert scalars[f"happo/kl_after_turn_agent{i}"][k][1] == scalars[f"happo/kl_agent{i}"][k][1]


def test_random_order_changes_between_iterations_and_runs(smac_runs):
    orders = []
    for sharing in ("partial", "none"):
        scalars = read_scalars(run_dir(ran_ok(smac_runs("happo_smac"), sharing)[1]))
        orders += [tuple(logged_turns(scalars, k)) for k in range(2)]
    assert len(set(orders)) > 1


@pytest.mark.parametrize("max_grad_norm", [0.02, 100.0])
def test_critic_fit_without_sharing_steps_each_agents_copy_alone(max_grad_norm):
    """--sharing none: the critic's fit after the turns moves each agent's copy as that agent's network alone would,
    with its own gradient-norm clipping (a clip over the whole critic would couple the agents when it bites)."""
    _, critic, _, b, _ = hand_made_batch("none")
    args = H.Args(update_epochs=1, num_minibatches=1, sharing="none", max_grad_norm=max_grad_norm)
    refs = [copy.deepcopy(critic) for _ in range(N)]
    losses = []
    for i, ref in enumerate(refs):
        own = torch.zeros_like(b["active"])
        own[:, i] = b["active"][:, i] / b["active"][:, i].sum()  # agent i's own mean
        values = ref(b["state"])[0].squeeze(-1)
        losses.append(H.value_loss_fn(values, b["values"], b["returns_n"], own, args.clip_coef, args.huber_delta))
    H.happo_critic_fit(critic, torch.optim.SGD(critic.parameters(), lr=0.1), b, args)
    for i in range(N):
        references.assert_agent_steps_alone([critic], [refs[i]], [losses[i]], i, 0.1, max_grad_norm, max_grad_norm < 1)
