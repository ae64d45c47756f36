"""What each SMAC script's update for one iteration does (fp3o_update, mappo_update, happo_update, a2po_update), in
process on the hand-made batches of references.py: which steps run, which factors and products reach which step (each
step's first gradient against the paper's objective written out here), the sign of the policy losses, and HAPPO's
critic.

A recorded optimizer step gives the parameters before it and the gradients it applies (after the script's gradient
clipping, which these tests switch off with a huge max norm, as they switch off the entropy bonus)."""
import copy

import pytest
import torch
from readers import assert_same_state_dict
from references import HAND_MADE, hand_made_batch, ppo_clip

import a2po_smac as A
import fp3o_smac as F
import happo_smac as H
import mappo_smac as M

N, T, E = HAND_MADE["N"], HAND_MADE["T"], HAND_MADE["E"]
EPS = 0.2
PLAIN = dict(update_epochs=2, num_minibatches=1, ent_coef=0.0, max_grad_norm=1e9)  # plain gradients of the policy loss
FAILS, HOLDS = 2, 0  # hand_made_batch seeds on which FP3O's condition fails / holds after the independent step


def record_steps(opt):
    """Wrap `opt.step`: before every step, record (the parameters' values, their gradients) as the step sees them."""
    steps, step = [], opt.step
    params = [p for group in opt.param_groups for p in group["params"]]

    def recording(*args, **kwargs):
        steps.append(([p.detach().clone() for p in params], [p.grad.clone() for p in params]))
        return step(*args, **kwargs)

    opt.step = recording
    return steps


def at(actor, values):
    """A copy of `actor` with the parameter values `values` (the first item of a recorded step)."""
    net = copy.deepcopy(actor)
    with torch.no_grad():
        for p, v in zip(net.parameters(), values, strict=True):
            p.copy_(v)
    return net


def rollout_logp(script, net, b):
    """Log-probabilities [T, N, E] of the rollout's actions under `net`, with gradients."""
    return script.evaluate_actions(net, b["obs"], b["avail"], b["actions"], b["h0"], b["starts"])[0]


def ratios(script, net, b):
    """pi / pi_k per sample under `net`, without gradients; dead agents' samples exactly 1."""
    with torch.no_grad():
        return torch.where(b["active"].bool(), (rollout_logp(script, net, b) - b["logp"]).exp(), torch.ones_like(b["logp"]))


def agent_mean(x, active, agent):
    """The mean of x [T, E] over agent `agent`'s alive samples."""
    return (x * active[:, agent]).sum() / active[:, agent].sum()


def assert_step_follows(script, step, actor, b, loss_of):
    """The recorded `step` of `actor` applies the gradient of `loss_of(logp [T, N, E])`, the loss written out from the
    paper; and that loss is the negative objective: a small move against the gradient raises the objective."""
    net = at(actor, step[0])
    params = list(net.parameters())
    loss = loss_of(rollout_logp(script, net, b))
    expected = torch.autograd.grad(loss, params)
    assert sum(g.abs().sum() for g in expected) > 0
    for (name, _), got, want in zip(net.named_parameters(), step[1], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7, msg=name)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in step[1]))
    with torch.no_grad():
        for p, g in zip(params, step[1], strict=True):
            p -= 1e-3 * g / norm
        assert loss_of(rollout_logp(script, net, b)) < loss


def training_state(actor, critic, opts):
    """Both networks' parameters and the optimizers' states, flattened into one dict of tensors."""
    out = {f"actor.{k}": v for k, v in actor.state_dict().items()}
    out.update({f"critic.{k}": v for k, v in critic.state_dict().items()})
    for name, opt in zip(("actor_opt", "critic_opt"), opts, strict=True):
        for idx, state in opt.state_dict()["state"].items():
            out.update({f"{name}.{idx}.{k}": v for k, v in state.items()})
    return out


# ---------------------------------------------------------------------------------------------- FP3O (Algorithm 1)
def fp3o_run(sharing, seed, generator_seed=1, record=False, global_seed=0, **flags):
    """fp3o_update on hand_made_batch's batch `seed` (torch's global generator seeded with `global_seed` afterwards);
    returns (actor, critic, opts, b, stats, diag, recorded actor steps, the pipeline partners drawn)."""
    actor, critic, opts, b = hand_made_batch(F, sharing, seed)
    torch.manual_seed(global_seed)
    args = F.Args(sharing=sharing, **{**(PLAIN if record else dict(update_epochs=2, num_minibatches=2)), **flags})
    steps, partners, draw = record_steps(opts[0]), [], F.pipeline_partners

    def drawing(n_agents, generator=None):
        partners.append(draw(n_agents, generator))
        return partners[-1]

    F.pipeline_partners = drawing
    try:
        stats, diag = F.fp3o_update(actor, critic, opts, b, args, torch.Generator().manual_seed(generator_seed))
    finally:
        F.pipeline_partners = draw
    return actor, critic, opts, b, stats, diag, steps, partners


@pytest.mark.parametrize("sharing", ["full", "partial", "none"])
def test_fp3o_when_the_condition_fails_the_update_is_the_independent_step_alone(sharing):
    """Algorithm 1: a failed condition skips the whole dependent step (actor and critic) and keeps the independent step;
    --no-condition runs it anyway; where the condition holds it runs."""
    variants = {"fp3o": {}, "independent": {"no_dependent_step": True}, "always": {"no_condition": True}}
    runs = {(seed, name): fp3o_run(sharing, seed, **flags) for seed in (FAILS, HOLDS) for name, flags in variants.items()}
    assert runs[FAILS, "fp3o"][5]["fp3o/condition_holds"] == 0.0 and runs[HOLDS, "fp3o"][5]["fp3o/condition_holds"] == 1.0
    state = {key: training_state(*run[:3]) for key, run in runs.items()}
    assert_same_state_dict(state[FAILS, "fp3o"], state[FAILS, "independent"], "failed condition against the independent step")
    assert torch.equal(runs[FAILS, "fp3o"][4], runs[FAILS, "independent"][4])
    assert runs[FAILS, "fp3o"][7] == [] and len(runs[FAILS, "always"][7]) == 1
    for key in ((FAILS, "always"), (HOLDS, "fp3o")):
        assert not torch.equal(state[key]["actor.head.weight"], state[key[0], "independent"]["actor.head.weight"]), key
        assert not torch.equal(state[key]["critic.head.weight"], state[key[0], "independent"]["critic.head.weight"]), key
    assert_same_state_dict(state[HOLDS, "fp3o"], state[HOLDS, "always"], "a condition that holds: as --no-condition")


def fp3o_dependent_loss(b, rho, partner, double_clip, per_agent):
    """The dependent step's loss written out: listing B.3's objective (or eq. D.10's), with factor_ij the product of
    rho^m over m not in {i, j}, factor_j = rho^j, j = partner[i]; the negative mean over alive samples (under `none`
    each agent's own mean, summed)."""

    def loss_of(logp):
        total = 0.0
        for i in range(N):
            j = int(partner[i])
            others = torch.stack([rho[:, m] for m in range(N) if m != i], 1).prod(1)  # prod_{m != i} rho^m
            factor_ij = torch.stack([rho[:, m] for m in range(N) if m not in (i, j)], 1).prod(1)
            r = (logp[:, i] - b["logp"][:, i]).exp()
            clipped, a = r.clamp(1 - EPS, 1 + EPS), b["adv"][:, i]
            if double_clip:  # eq. D.10: g = clip(prod_{m != i} rho^m, 1 +- eps2)
                g = others.clamp(1 - EPS, 1 + EPS)
                obj = torch.min((r * g - rho[:, j]) * a, (clipped * g - rho[:, j]) * a)
            else:
                obj = torch.min((r * factor_ij - 1) * rho[:, j] * a, (clipped * factor_ij - 1) * rho[:, j] * a)
            total = total - (agent_mean(obj, b["active"], i) if per_agent else (obj * b["active"][:, i]).sum())
        return total if per_agent else total / b["active"].sum()

    return loss_of


@pytest.mark.parametrize("sharing", ["full", "none"])
@pytest.mark.parametrize("double_clip", [False, True])
def test_fp3o_steps_follow_the_objectives_with_this_batchs_intermediate_ratios(sharing, double_clip):
    """The independent step's first gradient is PPO-clip's; the dependent step's first gradient is that of the literal
    objective with the ratios rho = pi_{k+0.5} / pi_k of this batch under the actor the independent step left, and with
    double clip, eq. D.10 on prod_{m != i} rho^m."""
    actor, critic, opts, b, _, diag, steps, partners = fp3o_run(sharing, HOLDS, record=True, double_clip=double_clip)
    assert diag["fp3o/condition_holds"] == 1.0 and len(steps) == 2 * PLAIN["update_epochs"] and len(partners) == 1
    per_agent = sharing == "none"

    def independent(logp):
        obj = ppo_clip((logp - b["logp"]).exp(), b["adv"])
        if per_agent:
            return -sum(agent_mean(obj[:, i], b["active"], i) for i in range(N))
        return -(obj * b["active"]).sum() / b["active"].sum()

    assert_step_follows(F, steps[0], actor, b, independent)
    first = steps[PLAIN["update_epochs"]]
    rho = ratios(F, at(actor, first[0]), b)  # pi_{k+0.5}: the actor as the independent step left it
    assert ((rho - 1).abs() > 0.05).float().mean() > 0.5  # ratios far from 1: the factors matter
    assert_step_follows(F, first, actor, b, fp3o_dependent_loss(b, rho, partners[0], double_clip, per_agent))


@pytest.mark.parametrize("seed,flags,logged", [(FAILS, {}, False), (FAILS, {"no_condition": True}, True), (HOLDS, {}, True),
                                               (HOLDS, {"no_dependent_step": True}, False)])  # fmt: skip
def test_fp3o_matching_degree_is_logged_only_where_the_dependent_step_ran(seed, flags, logged):
    """Where the dependent step is skipped, pi_{k+1} = pi_{k+0.5} and the constraint equals the condition by construction:
    nothing to log. Where it ran, the constraint of eq. 11 after it, S1' = sum A^i rho^i prod_{m != i} r_{k+1}^m against
    S2 = sum A^i rho^i, and whether the condition agreed with it."""
    actor, _, _, b, _, diag, steps, _ = fp3o_run("full", seed, record=True, **flags)
    assert ("fp3o/condition_holds" in diag) == (not flags.get("no_dependent_step", False))
    assert ("fp3o/constraint_holds" in diag) == ("fp3o/condition_matches" in diag) == logged
    if logged:
        rho, r_new = ratios(F, at(actor, steps[PLAIN["update_epochs"]][0]), b), ratios(F, actor, b)
        others_new = torch.stack([r_new[:, [m for m in range(N) if m != i]].prod(1) for i in range(N)], 1)
        s1, s2 = (b["adv"] * rho * others_new * b["active"]).sum(), (b["adv"] * rho * b["active"]).sum()
        constraint = float(s1 >= s2 - 1e-5)
        assert diag["fp3o/constraint_holds"] == constraint
        assert diag["fp3o/condition_matches"] == float(constraint == diag["fp3o/condition_holds"])


@pytest.mark.parametrize("seed", [FAILS, HOLDS])
def test_fp3o_condition_is_evaluated_with_this_batchs_intermediate_ratios(seed):
    """Algorithm 1 line 7, logged as fp3o/S1 and fp3o/S2: S1 = sum A^i prod_m rho^m against S2 = sum A^i rho^i over the
    alive samples, rho = pi_{k+0.5} / pi_k under the actor the independent step left."""
    actor, _, _, b, _, diag, steps, _ = fp3o_run("full", seed, record=True)
    rho = ratios(F, at(actor, steps[PLAIN["update_epochs"]][0]) if len(steps) > PLAIN["update_epochs"] else actor, b)
    s1, s2 = (b["adv"] * rho.prod(1, keepdim=True) * b["active"]).sum(), (b["adv"] * rho * b["active"]).sum()
    assert diag["fp3o/S1"] == pytest.approx(s1.item(), rel=1e-4) and diag["fp3o/S2"] == pytest.approx(s2.item(), rel=1e-4)
    assert diag["fp3o/condition_holds"] == float(s1 >= s2 - 1e-5) == float(seed == HOLDS)


def test_fp3o_generator_draws_the_pipelines_and_minibatches():
    """Everything random in the update (the pipelines, every step's minibatches) comes from its generator alone."""
    a, b_ = fp3o_run("none", HOLDS, generator_seed=4), fp3o_run("none", HOLDS, generator_seed=4, global_seed=9)
    c = fp3o_run("none", HOLDS, generator_seed=5)
    assert_same_state_dict(training_state(*a[:3]), training_state(*b_[:3]), "the same generator")
    assert not torch.equal(a[0].state_dict()["head.weight"], c[0].state_dict()["head.weight"])
    assert a[5].keys() == {"fp3o/condition_holds", "fp3o/S1", "fp3o/S2", "fp3o/constraint_holds", "fp3o/condition_matches",
                           *(f"fp3o/kl_agent{i}" for i in range(N))}  # fmt: skip
    r = ratios(F, a[0], a[3])
    kl = ((r - 1) - r.log()).sum((0, 2)) / a[3]["active"].sum((0, 2))
    assert [a[5][f"fp3o/kl_agent{i}"] for i in range(N)] == pytest.approx(kl.tolist(), rel=1e-4)


# ---------------------------------------------------------------------------------------------- MAPPO
@pytest.mark.parametrize("sharing", ["full", "none"])
def test_mappo_update_steps_on_ppo_clip_and_logs_each_agents_kl(sharing):
    actor, critic, opts, b = hand_made_batch(M, sharing)
    steps = record_steps(opts[0])
    stats, diag = M.mappo_update(actor, critic, opts, b, M.Args(sharing=sharing, **PLAIN), torch.Generator().manual_seed(0))

    def loss_of(logp):
        obj = ppo_clip((logp - b["logp"]).exp(), b["adv"])
        if sharing == "none":
            return -sum(agent_mean(obj[:, i], b["active"], i) for i in range(N))
        return -(obj * b["active"]).sum() / b["active"].sum()

    assert len(steps) == PLAIN["update_epochs"]
    for step in steps:
        assert_step_follows(M, step, actor, b, loss_of)
    r = ratios(M, actor, b)
    kl = ((r - 1) - r.log()).sum((0, 2)) / b["active"].sum((0, 2))
    assert diag.keys() == {f"mappo/kl_agent{i}" for i in range(N)} and stats.shape == (5,)
    assert [diag[f"mappo/kl_agent{i}"] for i in range(N)] == pytest.approx(kl.tolist(), rel=1e-4)


def test_mappo_generator_draws_the_minibatches():
    results = []
    for seed in (3, 3, 4):
        actor, critic, opts, b = hand_made_batch(M, "full")
        M.mappo_update(actor, critic, opts, b, M.Args(update_epochs=2, num_minibatches=2), torch.Generator().manual_seed(seed))
        results.append(training_state(actor, critic, opts))
    assert_same_state_dict(results[0], results[1], "the same generator")
    assert not torch.equal(results[0]["actor.head.weight"], results[2]["actor.head.weight"])


# ---------------------------------------------------------------------------------------------- HAPPO (Algorithm 3)
def order_of(diag, prefix):
    """The agents in the order the update took them, from the logged positions."""
    return sorted(range(N), key=lambda i: diag[f"{prefix}/position_agent{i}"])


@pytest.mark.parametrize("sharing", ["full", "partial", "none"])
def test_happo_turns_step_on_m_times_ppo_clip_with_the_m_of_the_agents_before(sharing):
    """Agent i_p's turn applies the gradient of M * PPO-clip on its own samples, where M is the product of the preceding
    agents' ratios pi_{k+1}^{i_l} / pi_k^{i_l} under the actor as each left its turn (M = 1 for the first)."""
    actor, critic, opts, b = hand_made_batch(H, sharing, logp_noise=0.2)
    steps = record_steps(opts[0])
    _, diag = H.happo_update(actor, critic, opts, b, H.Args(sharing=sharing, **PLAIN), torch.Generator().manual_seed(2))
    order, per_turn = order_of(diag, "happo"), PLAIN["update_epochs"]
    assert len(steps) == N * per_turn and order != list(range(N))
    factor = torch.ones(T, E)
    for p, i in enumerate(order):
        if p:  # the preceding agent's new ratio, under the actor as its turn left it
            factor = factor * ratios(H, at(actor, steps[p * per_turn][0]), b)[:, order[p - 1]]
            assert ((factor - 1).abs() > 0.05).any()

        def loss_of(logp, i=i, factor=factor):
            return -agent_mean(factor * ppo_clip((logp[:, i] - b["logp"][:, i]).exp(), b["adv"][:, i]), b["active"], i)

        assert_step_follows(H, steps[p * per_turn], actor, b, loss_of)


@pytest.mark.parametrize("sharing", ["full", "partial", "none"])
def test_happo_critic_is_fitted_once_after_the_turns_as_mappos(sharing):
    """Algorithm 3 line 14: the critic fits all agents' samples for the epochs x minibatches of MAPPO's critic, after the
    turns: from the same start the critic (and its Adam) ends bit-for-bit as MAPPO's (one minibatch: no draws)."""
    results = []
    for script, update in ((H, H.happo_update), (M, M.mappo_update)):
        actor, critic, opts, b = hand_made_batch(script, sharing)
        stats, _ = update(actor, critic, opts, b, script.Args(sharing=sharing, update_epochs=3, num_minibatches=1))
        state = training_state(actor, critic, opts)
        results.append(({k: v for k, v in state.items() if k.startswith("critic")}, stats[1]))
    assert_same_state_dict(results[0][0], results[1][0], "HAPPO's critic against MAPPO's")
    assert results[0][1] == results[1][1]  # the logged value loss


@pytest.mark.parametrize("sharing", ["full", "none"])
def test_happo_critic_fit_draws_minibatches_as_mappo_does(sharing):
    args = dict(sharing=sharing, update_epochs=2, num_minibatches=2)
    actor, critic, opts, b = hand_made_batch(H, sharing)
    v_loss = H.happo_critic_fit(critic, opts[1], b, H.Args(**args), torch.Generator().manual_seed(6))
    m_actor, m_critic, m_opts, m_b = hand_made_batch(M, sharing)
    stats, _ = M.mappo_update(m_actor, m_critic, m_opts, m_b, M.Args(**args), torch.Generator().manual_seed(6))
    assert_same_state_dict(m_critic.state_dict(), critic.state_dict(), "critic")
    torch.testing.assert_close(v_loss, stats[1])


@pytest.mark.parametrize("sharing", ["full", "none"])
def test_happo_turn_steps_on_the_entropy_bonus_too_and_logs_its_statistics(sharing):
    """A turn's loss is -(M * PPO-clip) - ent_coef * entropy, both means over the agent's alive samples; the turn logs
    that policy loss, the entropy, the approximate KL and the clip fraction of the samples it stepped on."""
    actor, critic, opts, b = hand_made_batch(H, sharing, logp_noise=0.2)
    steps = record_steps(opts[0])
    args = H.Args(sharing=sharing, update_epochs=1, num_minibatches=1, ent_coef=0.5, max_grad_norm=1e9)
    agent, factor = 1, 0.5 + torch.rand(T, E, generator=torch.Generator().manual_seed(0))
    stats = H.happo_turn(actor, opts[0], b, factor, agent, H.agent_params(actor, N), args)
    net = at(actor, steps[0][0])
    logp, entropy = H.evaluate_actions(net, b["obs"], b["avail"], b["actions"], b["h0"], b["starts"])
    log_ratio = logp[:, agent] - b["logp"][:, agent]
    ratio = log_ratio.exp()
    pg_loss = -agent_mean(factor * ppo_clip(ratio, b["adv"][:, agent]), b["active"], agent)
    ent = agent_mean(entropy[:, agent], b["active"], agent)
    expected = torch.autograd.grad(pg_loss - args.ent_coef * ent, list(net.parameters()))
    for (name, _), got, want in zip(net.named_parameters(), steps[0][1], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        kl = agent_mean((ratio - 1) - log_ratio, b["active"], agent)
        clipfrac = agent_mean(((ratio - 1).abs() > EPS).float(), b["active"], agent)
    assert 0 < clipfrac < 1 and kl > 0
    torch.testing.assert_close(stats, torch.stack([pg_loss, ent, kl, clipfrac]).detach(), rtol=1e-5, atol=1e-6)


def test_happo_generator_draws_the_order_and_every_minibatch():
    """Everything random in the update (the order, the turns' minibatches, the critic's) comes from its generator alone:
    torch's global generator, seeded differently, changes nothing."""
    results = []
    for seed, global_seed in ((3, 0), (3, 9), (4, 0)):
        actor, critic, opts, b = hand_made_batch(H, "none")
        torch.manual_seed(global_seed)
        args = H.Args(sharing="none", update_epochs=2, num_minibatches=2)
        _, diag = H.happo_update(actor, critic, opts, b, args, torch.Generator().manual_seed(seed))
        results.append((training_state(actor, critic, opts), order_of(diag, "happo")))
    assert_same_state_dict(results[0][0], results[1][0], "the same generator")
    assert results[0][1] == results[1][1]
    for net in ("actor.head.weight", "critic.head.weight"):
        assert not torch.equal(results[0][0][net], results[2][0][net])


@pytest.mark.parametrize("sharing", ["full", "none"])
def test_happo_fixed_order_and_the_logged_factors_and_kls(sharing):
    """--fixed-order takes the agents as numbered; each agent's logged M (mean and max over its alive samples) is the M
    its turn used, and its KL after the turn is measured under the actor as its turn left it."""
    actor, critic, opts, b = hand_made_batch(H, sharing, logp_noise=0.2)
    steps = record_steps(opts[0])
    args = H.Args(sharing=sharing, fixed_order=True, **PLAIN)
    _, diag = H.happo_update(actor, critic, opts, b, args, torch.Generator().manual_seed(2))
    per_turn, factor = PLAIN["update_epochs"], torch.ones(T, E)
    assert order_of(diag, "happo") == list(range(N))
    for i in range(N):
        after = at(actor, steps[(i + 1) * per_turn][0]) if i < N - 1 else actor  # the actor as agent i's turn left it
        act = b["active"][:, i]
        assert diag[f"happo/factor_mean_agent{i}"] == pytest.approx(((factor * act).sum() / act.sum()).item(), rel=1e-5)
        assert diag[f"happo/factor_max_agent{i}"] == pytest.approx(factor[act.bool()].max().item(), rel=1e-5)
        r = ratios(H, after, b)[:, i]
        kl = (((r - 1) - r.log()) * act).sum() / act.sum()
        assert diag[f"happo/kl_after_turn_agent{i}"] == pytest.approx(kl.item(), rel=1e-4) and kl > 0
        factor = factor * r  # M for the next agent (dead agents' samples: ratio 1)


# ---------------------------------------------------------------------------------------------- A2PO (Algorithms 1, 2)
def a2po_batch(sharing):
    """hand_made_batch's batch with PreOPC's inputs (eq. 2) and a value normaliser, as a2po_smac.py builds them."""
    actor, critic, opts, b = hand_made_batch(A, sharing, logp_noise=0.2)
    gen = torch.Generator().manual_seed(1)
    value_norm = A.ValueNorm()
    value_norm.update(1 + torch.randn(100, generator=gen))
    trace = (torch.randn(T, 1, E, generator=gen), value_norm.denormalize(b["values"]), b["starts"][:, None],
             torch.randn(N, E, generator=gen), torch.zeros(1, E))  # fmt: skip
    return actor, critic, opts, b, trace, value_norm


@pytest.mark.parametrize("sharing", ["none", "partial", "full"])
def test_a2po_turns_step_on_eq_6_with_the_current_product_of_the_agents_that_moved(sharing):
    """Each turn applies the gradient of eq. 6: l = r^i * clip(prod_j pi_hat^j / pi^j, 1 +- eps_i / 2) over the agents j
    that have moved (without sharing the preceding agents; with a shared actor all others after the first turn), under
    the actor as the turn starts, and min(l A, clip(l, 1 +- eps_i) A) with eps_i of agent i's position."""
    actor, critic, opts, b, trace, value_norm = a2po_batch(sharing)
    steps, turns, original = record_steps(opts[0]), [], A.a2po_turn

    def recording(*args):
        turns.append(args[3]["adv"])
        return original(*args)

    args = A.Args(sharing=sharing, **PLAIN)
    A.a2po_turn = recording
    try:
        _, diag = A.a2po_update(actor, critic, opts, b, trace, value_norm, args, torch.Generator().manual_seed(1))
    finally:
        A.a2po_turn = original
    order = order_of(diag, "a2po")
    per_turn = PLAIN["update_epochs"] if sharing == "none" else 1  # shared actor: ceil(2 / 3) = 1 round of 1 epoch
    assert len(steps) == N * per_turn and len(turns) == N
    for p, i in enumerate(order):
        eps_i = EPS * 0.5 + EPS * 0.5 * (p + 1) / N
        current = ratios(A, at(actor, steps[p * per_turn][0]), b)
        moved = order[:p] if sharing == "none" else [j for j in range(N) if p and j != i]
        product = current[:, moved].prod(1) if moved else torch.ones(T, E)
        if p:
            assert ((product - 1).abs() > 0.05).any()

        def loss_of(logp, i=i, eps_i=eps_i, product=product, adv=turns[p][:, i]):
            l = (logp[:, i] - b["logp"][:, i]).exp() * product.clamp(1 - eps_i / 2, 1 + eps_i / 2)  # noqa: E741
            return -agent_mean(ppo_clip(l, adv, eps_i), b["active"], i)

        assert_step_follows(A, steps[p * per_turn], actor, b, loss_of)


@pytest.mark.parametrize("sharing", ["full", "none"])
def test_a2po_turn_of_a_block_steps_on_its_mean_loss_with_the_entropy_bonus_and_logs_it(sharing):
    """A block's turn (two agents here) steps the actor on -(eq. 6) - ent_coef * entropy, as a mean over the block's
    alive samples (without sharing each agent's own mean: separate networks), and logs the policy and value losses and
    the entropy (the agents' mean), the approximate KL and the clip fraction of the samples it stepped on."""
    actor, critic, opts, b, trace, value_norm = a2po_batch(sharing)
    b = {**b, "prev_ratio": 0.8 + 0.4 * torch.rand(T, N, E, generator=torch.Generator().manual_seed(3))}
    steps, start_critic = record_steps(opts[0]), copy.deepcopy(critic)
    args = A.Args(sharing=sharing, num_minibatches=1, ent_coef=0.5, max_grad_norm=1e9)
    block, clip = torch.tensor([0, 2]), torch.full((1, N, 1), EPS)
    per_agent = (A.agent_params(actor, N), A.agent_params(critic, N))
    stats = A.a2po_turn(actor, critic, opts, b, block, clip, 1, per_agent, args)
    net = at(actor, steps[0][0])
    logp, entropy = (x[:, block] for x in A.evaluate_actions(net, b["obs"], b["avail"], b["actions"], b["h0"], b["starts"]))
    act, log_ratio = b["active"][:, block], logp - b["logp"][:, block]
    w = act / (act.sum((0, 2), keepdim=True) if sharing == "none" else act.sum())
    obj = A.a2po_objective(log_ratio.exp(), b["adv"][:, block], b["prev_ratio"][:, block], EPS)
    pg_loss, ent = -(obj * w).sum(), (entropy * w).sum()
    expected = torch.autograd.grad(pg_loss - args.ent_coef * ent, list(net.parameters()))
    for (name, _), got, want in zip(net.named_parameters(), steps[0][1], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        values = start_critic(b["state"])[0].squeeze(-1)[:, block]
        v_loss = A.value_loss_fn(values, b["values"][:, block], b["returns_n"][:, block], w, args.clip_coef, args.huber_delta)
        ratio, n = log_ratio.exp(), act.sum()
        kl, clipfrac = (((ratio - 1) - log_ratio) * act).sum() / n, (((ratio - 1).abs() > EPS).float() * act).sum() / n
    assert 0 < clipfrac < 1 and kl > 0
    agents = len(block) if sharing == "none" else 1
    expected_stats = torch.stack([pg_loss / agents, v_loss / agents, ent / agents, kl, clipfrac]).detach()
    torch.testing.assert_close(stats, expected_stats, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["semi-greedy", "random"])
def test_a2po_generator_draws_the_order_and_the_minibatches(rule):
    """Everything random in the update (the order's random picks, every turn's minibatches) comes from its generator
    alone: torch's global generator, seeded differently, changes nothing; another generator seed changes the update."""
    results = []
    for seed, global_seed in ((3, 0), *((3, g) for g in range(1, 6)), (4, 0)):
        actor, critic, opts, b, trace, value_norm = a2po_batch("none")
        torch.manual_seed(global_seed)
        args = A.Args(sharing="none", order=rule, update_epochs=2, num_minibatches=2)
        _, diag = A.a2po_update(actor, critic, opts, b, trace, value_norm, args, torch.Generator().manual_seed(seed))
        results.append((training_state(actor, critic, opts), order_of(diag, "a2po")))
    for same in results[1:-1]:
        assert_same_state_dict(results[0][0], same[0], "the same generator")
        assert results[0][1] == same[1]
    assert not torch.equal(results[0][0]["actor.head.weight"], results[-1][0]["actor.head.weight"])


@pytest.mark.parametrize("rule", ["fixed", "semi-greedy"])
def test_a2po_update_takes_the_agents_in_the_order_of_its_rule(rule, monkeypatch):
    """--order fixed: 0..n-1; semi-greedy: first the agent with the largest mean |A^i| of the rollout's GAE (eq. 2 with
    weights 1, every agent's own V), not of its returns. The update returns the mean of its turns' loss statistics."""
    actor, critic, opts, b, trace, value_norm = a2po_batch("none")
    args, turns, turn = A.Args(sharing="none", order=rule, **PLAIN), [], A.a2po_turn
    monkeypatch.setattr(A, "a2po_turn", lambda *a, **k: turns.append(turn(*a, **k)) or turns[-1])
    stats, diag = A.a2po_update(actor, critic, opts, b, trace, value_norm, args, torch.Generator().manual_seed(0))
    assert len(turns) == N and stats.shape == turns[0].shape == (5,)
    torch.testing.assert_close(stats, torch.stack(turns).mean(0))
    order = order_of(diag, "a2po")
    gae, returns = A.preopc_advantages(*trace, torch.ones(T, N, E), args.gamma, args.gae_lambda)
    by_gae, by_returns = ((x.abs() * b["active"]).sum((0, 2)) / b["active"].sum((0, 2)) for x in (gae, returns))
    if rule == "fixed":
        assert order == list(range(N))
    else:
        assert order[0] == by_gae.argmax().item() != by_returns.argmax().item()
