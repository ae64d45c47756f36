"""FP3O's objective, factors, condition and pipeline selection (fp3o_smac.py), against the paper's definitions."""
import itertools

import pytest
import torch
from references import clip_active, hand_made_batch, ppo_clip

import fp3o_smac as F

EPS = 0.2


def random_ratios(shape, gen):
    """Ratios spread over [0.5, 1.6]: many samples fall outside the clip range 1 +- 0.2."""
    return 0.5 + 1.1 * torch.rand(shape, generator=gen, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- objective
def test_independent_step_objective_is_ppo_clip_minus_advantage_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    T, N, B, A = 6, 3, 20, 7
    logits_old = torch.randn(T, N, B, A, generator=gen, dtype=torch.float64)
    logits = (logits_old + 0.6 * torch.randn(T, N, B, A, generator=gen, dtype=torch.float64)).requires_grad_()
    actions = torch.randint(A, (T, N, B), generator=gen)
    adv = torch.randn(T, N, B, generator=gen, dtype=torch.float64)
    logp_old = torch.distributions.Categorical(logits=logits_old).log_prob(actions)

    def ratio():
        return (torch.distributions.Categorical(logits=logits).log_prob(actions) - logp_old).exp()

    r = ratio()
    assert clip_active(r, adv).any() and (~clip_active(r, adv)).any(), "test data must contain clipped and unclipped samples"
    ones = torch.ones_like(adv)
    fp3o = F.fp3o_objective(r, adv, ones, ones, EPS)
    ppo = ppo_clip(r, adv)
    torch.testing.assert_close(fp3o, ppo - adv, rtol=0, atol=1e-12)
    # also with plain Python scalars 1 as the factors
    torch.testing.assert_close(F.fp3o_objective(r, adv, 1, 1, EPS), ppo - adv, rtol=0, atol=1e-12)

    (g_fp3o,) = torch.autograd.grad(fp3o.sum(), logits)
    (g_ppo,) = torch.autograd.grad(ppo_clip(ratio(), adv).sum(), logits)
    assert g_ppo.abs().sum() > 0
    assert torch.allclose(g_fp3o, g_ppo, rtol=1e-10, atol=1e-12)

    # gradient w.r.t. the log-ratio too (the quantity the loss is built from)
    log_r = (logits.detach().log_softmax(-1).gather(-1, actions[..., None])[..., 0] - logp_old).requires_grad_()
    (g1,) = torch.autograd.grad(F.fp3o_objective(log_r.exp(), adv, 1, 1, EPS).sum(), log_r)
    (g2,) = torch.autograd.grad(ppo_clip(log_r.exp(), adv).sum(), log_r)
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-12)
    assert (g1[clip_active(log_r.detach().exp(), adv)] == 0).all()


@pytest.mark.parametrize("n_agents", [3, 4, 5])
def test_dependent_step_gradient_equals_product_of_other_ratios_times_ppo_clip(n_agents):
    """Listing B.3's literal objective with factor_ij, factor_j from fp3o_factors has the gradient of
    prod_{m != i} rho^m * min(r^i A^i, clip(r^i) A^i): the partner only adds a constant (factor_j > 0)."""
    gen = torch.Generator().manual_seed(n_agents)
    T, B = 5, 40
    rho = random_ratios((T, n_agents, B), gen)
    adv = torch.randn(T, n_agents, B, generator=gen, dtype=torch.float64)
    log_r = torch.log(random_ratios((T, n_agents, B), gen)).requires_grad_()
    partner = F.pipeline_partners(n_agents, torch.Generator().manual_seed(7 * n_agents))
    factor_ij, factor_j = F.fp3o_factors(rho, partner)

    assert clip_active(log_r.exp(), adv).any() and (~clip_active(log_r.exp(), adv)).any()
    obj = F.fp3o_objective(log_r.exp(), adv, factor_ij, factor_j, EPS)
    (g_literal,) = torch.autograd.grad(obj.sum(), log_r)

    prod_others = torch.stack([rho[:, [m for m in range(n_agents) if m != i]].prod(1) for i in range(n_agents)], 1)
    ref = prod_others * ppo_clip(log_r.exp(), adv)
    (g_ref,) = torch.autograd.grad(ref.sum(), log_r)
    assert torch.allclose(g_literal, g_ref, rtol=1e-10, atol=1e-12)
    # and the values differ exactly by the constant -factor_j * A
    assert torch.allclose(obj.detach(), ref.detach() - factor_j * adv, rtol=1e-10, atol=1e-12)
    # the gradient is not simply PPO-clip's (the factors matter)
    (g_ppo,) = torch.autograd.grad(ppo_clip(log_r.exp(), adv).sum(), log_r)
    assert not torch.allclose(g_literal, g_ppo)


def test_objective_gradient_flows_only_through_ratio():
    """The factors are fixed weights: the intermediate ratios they are made of come without gradients (rollout_logp,
    as the update computes them), and the objective's gradient in the ratio is factor_ij * factor_j * A where the
    unclipped term is the minimum, 0 where the clipped one is; on a float32 batch as in training."""
    actor, _, _, b = hand_made_batch(F, "full")
    assert any(p.requires_grad for p in actor.parameters()) and not F.rollout_logp(actor, b).requires_grad
    gen = torch.Generator().manual_seed(3)
    rho = (0.5 + torch.rand(4, 3, 10, generator=gen))
    ratio = (0.5 + torch.rand(4, 3, 10, generator=gen)).requires_grad_()
    adv = torch.randn(4, 3, 10, generator=gen)
    f_ij, f_j = F.fp3o_factors(rho, torch.tensor([2, 0, 1]))
    obj = F.fp3o_objective(ratio, adv, f_ij, f_j, EPS)
    assert obj.dtype == torch.float32 and obj.shape == (4, 3, 10)
    obj.sum().backward()
    clipped = clip_active(ratio.detach(), adv)
    assert clipped.any() and (~clipped).any() and (f_ij - 1).abs().min() > 0 and (f_j - 1).abs().min() > 0
    torch.testing.assert_close(ratio.grad, torch.where(clipped, torch.zeros_like(adv), f_ij * f_j * adv))


# ---------------------------------------------------------------------------------------------- factors
@pytest.mark.parametrize("n_agents", [2, 3, 4, 5])
def test_fp3o_factors_match_a_slow_loop(n_agents):
    gen = torch.Generator().manual_seed(10 + n_agents)
    T, B = 3, 6
    rho = random_ratios((T, n_agents, B), gen)
    for trial in range(3):
        partner = F.pipeline_partners(n_agents, torch.Generator().manual_seed(trial))
        factor_ij, factor_j = F.fp3o_factors(rho, partner)
        assert factor_ij.shape == factor_j.shape == (T, n_agents, B)
        exp_ij, exp_j = torch.ones(T, n_agents, B, dtype=torch.float64), torch.empty(T, n_agents, B, dtype=torch.float64)
        for t, i, b in itertools.product(range(T), range(n_agents), range(B)):
            j = int(partner[i])
            for m in range(n_agents):
                if m not in (i, j):
                    exp_ij[t, i, b] *= rho[t, m, b]
            exp_j[t, i, b] = rho[t, j, b]
        assert torch.allclose(factor_ij, exp_ij, rtol=1e-12, atol=0)
        assert torch.equal(factor_j, exp_j)
    if n_agents == 2:  # no third agent: factor_ij is the empty product
        assert torch.allclose(factor_ij, torch.ones_like(factor_ij))


def test_fp3o_factors_with_a_fixed_partner_map():
    """Hand-computed: 3 agents, partner = [1, 2, 0] (agent 0's partner is 1, ...)."""
    rho = torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64).view(1, 3, 1)
    f_ij, f_j = F.fp3o_factors(rho, torch.tensor([1, 2, 0]))
    assert f_ij.flatten().tolist() == pytest.approx([5.0, 2.0, 3.0])
    assert f_j.flatten().tolist() == pytest.approx([3.0, 5.0, 2.0])


# ---------------------------------------------------------------------------------------------- condition
def hand_batch():
    """T=1, N=2, B=2. joint rho = [1, 3]."""
    rho = torch.tensor([[[2.0, 1.0], [0.5, 3.0]]])
    adv = torch.tensor([[[1.0, 1.0], [1.0, -1.0]]])
    return rho, adv, torch.ones_like(adv)


def test_fp3o_condition_holds_on_a_hand_made_batch():
    rho, adv, active = hand_batch()
    # S1 = sum_i sum_b A^i_b * prod_m rho^m_b = (1*1 + 1*3) + (1*1 - 1*3) = 2
    # S2 = sum_i sum_b A^i_b * rho^i_b      = (1*2 + 1*1) + (1*0.5 - 1*3) = 0.5
    holds, s1, s2 = F.fp3o_condition(rho, adv, active)
    assert (s1, s2) == pytest.approx((2.0, 0.5))
    assert holds is True


def test_fp3o_condition_fails_on_a_hand_made_batch():
    rho, adv, active = hand_batch()
    holds, s1, s2 = F.fp3o_condition(rho, -adv, active)  # S1 = -2 < S2 = -0.5
    assert (s1, s2) == pytest.approx((-2.0, -0.5))
    assert holds is False


def test_fp3o_condition_ignores_inactive_samples_and_uses_the_slack():
    rho, adv, active = hand_batch()
    # an inactive sample with a huge advantage would flip the result if it counted
    rho2 = torch.cat([rho, torch.tensor([[[10.0], [10.0]]])], -1)
    adv2 = torch.cat([-adv, torch.tensor([[[1000.0], [1000.0]]])], -1)
    active2 = torch.cat([active, torch.zeros(1, 2, 1)], -1)
    holds, s1, s2 = F.fp3o_condition(rho2, adv2, active2)
    assert (s1, s2) == pytest.approx((-2.0, -0.5)) and holds is False
    # equal sums hold; S1 just below S2 holds within the slack and fails beyond it
    rho = torch.tensor([[[1.0], [1.0]]])
    adv = torch.tensor([[[1.0], [0.0]]])
    assert F.fp3o_condition(rho, adv, torch.ones_like(adv))[0] is True  # S1 = S2 = 1
    rho_low = torch.tensor([[[1.0], [1.0 - 1e-3]]])  # S1 = 1 - 1e-3, S2 = 1
    assert F.fp3o_condition(rho_low, adv, torch.ones_like(adv), slack=1e-2)[0] is True
    assert F.fp3o_condition(rho_low, adv, torch.ones_like(adv), slack=1e-4)[0] is False


def test_fp3o_constraint_equals_condition_when_new_ratios_are_the_intermediate_ones():
    outcomes = set()
    for seed in range(30):
        gen = torch.Generator().manual_seed(seed)
        T, N, B = 4, 3, 8
        rho = random_ratios((T, N, B), gen).float()
        adv = torch.randn(T, N, B, generator=gen)
        active = (torch.rand(T, N, B, generator=gen) > 0.2).float()
        holds, s1, s2 = F.fp3o_condition(rho, adv, active, slack=0.0)
        assert F.fp3o_constraint(rho, rho.clone(), adv, active, slack=0.0) == holds
        outcomes.add(holds)
    assert outcomes == {True, False}, "random batches should exercise both outcomes"


def test_fp3o_constraint_uses_the_other_agents_new_ratios():
    """S1' = sum A^i rho^i prod_{m != i} r_new^m, by hand: N=2, one sample."""
    rho = torch.tensor([[[2.0], [0.5]]])
    new = torch.tensor([[[4.0], [0.25]]])
    adv = torch.tensor([[[1.0], [1.0]]])
    # S1' = 1*2*0.25 + 1*0.5*4 = 2.5 ; S2 = 2 + 0.5 = 2.5 -> holds (equal)
    assert F.fp3o_constraint(rho, new, adv, torch.ones_like(adv), slack=0.0) is True
    new2 = torch.tensor([[[4.0], [1.0]]])  # S1' = 2*1 + 0.5*4 = 4 > S2 = 2.5
    assert F.fp3o_constraint(rho, new2, adv, torch.ones_like(adv), slack=0.0) is True
    assert F.fp3o_constraint(rho, new2, -adv, torch.ones_like(adv), slack=0.0) is False  # -4 < -2.5


# ---------------------------------------------------------------------------------------------- pipelines
def successor_cycle(partner):
    """f = partner^-1 as a dict, and the orbit of agent 0 under f."""
    f = {int(p): i for i, p in enumerate(partner.tolist())}
    orbit, a = [0], f[0]
    while a != 0 and len(orbit) <= len(partner):
        orbit.append(a)
        a = f[a]
    return f, orbit


@pytest.mark.parametrize("n_agents", [2, 3, 4, 5, 8])
def test_pipeline_partners_is_a_cyclic_shift_of_a_permutation(n_agents):
    seen = set()
    for seed in range(40):
        partner = F.pipeline_partners(n_agents, torch.Generator().manual_seed(seed))
        assert partner.dtype == torch.long and partner.shape == (n_agents,)
        assert sorted(partner.tolist()) == list(range(n_agents)), "every agent is a partner exactly once"
        assert all(int(partner[i]) != i for i in range(n_agents)), "no agent is its own partner"
        # a cyclic left shift of a permutation i_1..i_n (f(i_p) = i_{p+1}) is exactly a single n-cycle of f
        f, orbit = successor_cycle(partner)
        assert len(orbit) == n_agents and sorted(orbit) == list(range(n_agents)), f"f is not one n-cycle: {f}"
        # explicitly: with i = orbit, partner[i_{p+1}] = i_p for every p (cyclically)
        assert all(int(partner[orbit[(p + 1) % n_agents]]) == orbit[p] for p in range(n_agents))
        seen.add(tuple(partner.tolist()))
    if n_agents == 2:
        assert seen == {(1, 0)}
    else:  # random: several of the (n-1)! cycles appear
        assert len(seen) > 1


def test_pipeline_partners_uses_the_generator():
    a = F.pipeline_partners(6, torch.Generator().manual_seed(123))
    b = F.pipeline_partners(6, torch.Generator().manual_seed(123))
    assert torch.equal(a, b)


@pytest.mark.parametrize("seed", range(5))
def test_pipeline_partners_follow_the_generators_permutation_left_shifted(seed):
    """Eq. 9: the permutation i_1..i_n the generator draws and j_p = i_{p+1}: agent i_{p+1}'s partner is i_p."""
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed)).tolist()
    partner = F.pipeline_partners(5, torch.Generator().manual_seed(seed))
    assert [int(partner[perm[(p + 1) % 5]]) for p in range(5)] == perm


# ---------------------------------------------------------------------------------------------- double clip
def test_double_clip_with_a_wide_inner_clip_equals_the_plain_objective():
    gen = torch.Generator().manual_seed(5)
    T, N, B = 4, 4, 30
    rho = random_ratios((T, N, B), gen)
    adv = torch.randn(T, N, B, generator=gen, dtype=torch.float64)
    log_r = torch.log(random_ratios((T, N, B), gen)).requires_grad_()
    factor_ij, factor_j = F.fp3o_factors(rho, F.pipeline_partners(N, torch.Generator().manual_seed(1)))
    rho_others = factor_ij * factor_j
    plain = F.fp3o_objective(log_r.exp(), adv, factor_ij, factor_j, EPS)
    double = F.fp3o_double_clip_objective(log_r.exp(), adv, rho_others, factor_j, EPS, inner_clip_coef=1e6)
    (g_plain,) = torch.autograd.grad(plain.sum(), log_r)
    (g_double,) = torch.autograd.grad(double.sum(), log_r)
    assert torch.allclose(g_plain, g_double, rtol=1e-10, atol=1e-12)
    diff = (double - plain).detach()
    assert torch.allclose(diff, torch.full_like(diff, diff.flatten()[0].item()), atol=1e-10)  # a constant (here 0)


def test_double_clip_inner_clip_bounds_the_other_agents_ratio():
    """With eps2 = 0.1 the weight of PPO-clip's gradient is clip(prod_{m != i} rho^m, 0.9, 1.1)."""
    gen = torch.Generator().manual_seed(6)
    T, N, B = 3, 3, 40
    rho = random_ratios((T, N, B), gen)
    adv = torch.randn(T, N, B, generator=gen, dtype=torch.float64)
    log_r = torch.log(random_ratios((T, N, B), gen)).requires_grad_()
    factor_ij, factor_j = F.fp3o_factors(rho, torch.tensor([1, 2, 0]))
    rho_others = factor_ij * factor_j
    assert ((rho_others < 0.9) | (rho_others > 1.1)).any()
    double = F.fp3o_double_clip_objective(log_r.exp(), adv, rho_others, factor_j, EPS, inner_clip_coef=0.1)
    (g,) = torch.autograd.grad(double.sum(), log_r)
    ref = rho_others.clamp(0.9, 1.1) * ppo_clip(log_r.exp(), adv)
    (g_ref,) = torch.autograd.grad(ref.sum(), log_r)
    assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- the step
@pytest.mark.parametrize("sharing", ["full", "partial", "none"])
def test_independent_step_is_mappos_update(sharing):
    """With all factors 1, fp3o_step is MAPPO's update (appendix D.6): the same networks and optimizer states after
    two epochs of two minibatches, sharing semantics (per-agent losses and clipping under `none`) included."""
    import mappo_smac

    args = F.Args(update_epochs=2, num_minibatches=2, sharing=sharing)
    ones = lambda b: (torch.ones_like(b["logp"]), torch.ones_like(b["logp"]))
    steps = {"fp3o": lambda a, c, o, b: F.fp3o_step(a, c, o, b, ones(b), args),
             "mappo": lambda a, c, o, b: mappo_smac.mappo_step(a, c, o, b, mappo_smac.Args(update_epochs=2, num_minibatches=2, sharing=sharing))}  # fmt: skip
    after = {}
    for name, step in steps.items():
        actor, critic, opts, b = hand_made_batch(F, sharing)
        torch.manual_seed(7)  # the same minibatches
        stats = step(actor, critic, opts, b)
        after[name] = (actor.state_dict(), critic.state_dict(), opts[0].state_dict()["state"], stats)
    for k, (x, y) in enumerate(zip(after["fp3o"][:3], after["mappo"][:3], strict=True)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=f"item {k}")
    torch.testing.assert_close(after["fp3o"][3][1:], after["mappo"][3][1:])  # the policy loss differs by E[A] (D.6)
    assert not torch.equal(after["fp3o"][0]["head.weight"], hand_made_batch(F, sharing)[0].state_dict()["head.weight"])
