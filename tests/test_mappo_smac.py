"""mappo_smac.py: the PPO-clip objective and update (in process), and what its short end-to-end runs on SMAX log of
its own (test_smac_e2e.py checks what the four SMAC scripts share)."""
import copy

import pytest
import references
import torch
import torch.nn as nn
from harness import ran_ok, run_dir
from readers import read_scalars
from references import HAND_MADE, clip_active, ppo_clip

import mappo_smac as M

EPS = 0.2
N, T, E, OBS, STATE, ACTS, HID = HAND_MADE.values()


# ---------------------------------------------------------------------------------------------- objective
def test_ppo_clip_objective_on_hand_values():
    ratio = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5, 0.5, 0.9, 1.0, 1.1, 1.5])
    adv = torch.tensor([1.0] * 5 + [-1.0] * 5)
    # A > 0: min(r, clip(r)) = min(r, 1.2) for r > 1; A < 0: -max(r, clip(r)) = -max(r, 0.8) for r < 1
    expected = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.2, -0.8, -0.9, -1.0, -1.1, -1.5])
    assert torch.allclose(M.ppo_clip_objective(ratio, adv, EPS), expected)


def test_ppo_clip_objective_gradient_is_zero_exactly_where_clipped():
    gen = torch.Generator().manual_seed(0)
    ratio = (0.5 + 1.1 * torch.rand(200, generator=gen, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(200, generator=gen, dtype=torch.float64)
    M.ppo_clip_objective(ratio, adv, EPS).sum().backward()
    clipped = clip_active(ratio, adv)
    assert clipped.any() and (~clipped).any()
    assert torch.equal(ratio.grad, torch.where(clipped, torch.zeros_like(adv), adv))


# ---------------------------------------------------------------------------------------------- the update
def hand_made_batch(sharing, seed=0):
    return references.hand_made_batch(M, sharing, seed, logp_noise=0.3)


@pytest.mark.parametrize("sharing", ["full", "partial", "none"])
def test_mappo_step_is_one_ppo_clip_step_for_all_agents_at_once(sharing):
    """One epoch, one minibatch, with SGD (which, unlike Adam, sees the scale of a gradient): the actor steps on the
    PPO-clip loss (with entropy) of all agents' active samples, the critic on the clipped Huber value loss, with the
    gradient norm clipped. Under `none` (N separate networks) each agent's copy steps exactly as a network of its own
    would: on its own samples' mean loss, with its own gradient clipping. The logged losses are the agents' mean."""
    actor, critic, _, b = hand_made_batch(sharing)
    start = copy.deepcopy((actor, critic))
    sgd = lambda nets: [torch.optim.SGD(net.parameters(), lr=0.5) for net in nets]
    args = M.Args(update_epochs=1, num_minibatches=1, sharing=sharing, max_grad_norm=0.3)  # a clip that bites
    stats = M.mappo_step(actor, critic, sgd((actor, critic)), b, args)
    groups = [torch.arange(N)] if sharing != "none" else [torch.tensor([i]) for i in range(N)]
    logged, clipped = torch.zeros(2), []
    for agents in groups:  # the reference: one network (or one per agent) trained on its own samples
        ref_actor, ref_critic = copy.deepcopy(start)
        act = b["active"] * torch.isin(torch.arange(N), agents).float().view(1, N, 1)
        logits, _ = ref_actor(b["obs"], b["h0"], b["starts"])
        dist = torch.distributions.Categorical(logits=logits.masked_fill(~b["avail"], -1e10))
        ratio = (dist.log_prob(b["actions"]) - b["logp"]).exp()
        assert ((ratio - 1).abs() > EPS).any() and ((ratio - 1).abs() < EPS).any()
        surrogate = ppo_clip(ratio, b["adv"])
        pg_loss = -(surrogate * act).sum() / act.sum()
        v_loss = M.value_loss_fn(ref_critic(b["state"])[0].squeeze(-1), b["values"], b["returns_n"], act / act.sum(), EPS,
                                 args.huber_delta)  # fmt: skip
        logged += torch.stack([pg_loss, v_loss]).detach() / len(groups)
        losses = (pg_loss - args.ent_coef * (dist.entropy() * act).sum() / act.sum(), v_loss)
        for net, loss, opt in zip((ref_actor, ref_critic), losses, sgd((ref_actor, ref_critic)), strict=True):
            loss.backward()
            clipped.append(nn.utils.clip_grad_norm_(net.parameters(), args.max_grad_norm) > args.max_grad_norm)
            opt.step()
        for net, ref in ((actor, ref_actor), (critic, ref_critic)):
            for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
                idx = agents if p.shape[0] == N and sharing == "none" else slice(None)
                torch.testing.assert_close(p[idx], q[idx], rtol=1e-5, atol=1e-6, msg=name)
    assert any(clipped), "the gradient clipping was not exercised"
    torch.testing.assert_close(stats[:2], logged)


def test_mappo_step_moves_every_agent():
    actor, critic, opts, b = hand_made_batch("none")
    before = copy.deepcopy(actor.state_dict())
    M.mappo_step(actor, critic, opts, b, M.Args(update_epochs=2, num_minibatches=2))
    for name, p in actor.state_dict().items():
        for i in range(N):
            assert not torch.equal(p[i], before[name][i]), f"{name}: agent {i} did not move"


def test_fp3o_only_flags_are_gone():
    fields = set(M.Args.__dataclass_fields__)
    for flag in ("double_clip", "inner_clip_coef", "no_dependent_step", "no_condition", "condition_slack", "advantage_split"):
        assert flag not in fields
    assert M.Args().exp_name == "mappo_smac"
    assert not any(name.startswith("fp3o") or name == "pipeline_partners" for name in dir(M))


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("sharing", ["none", "partial", "full"])
def test_short_runs_move_every_agent(smac_runs, sharing):
    """In conftest's short runs (test_smac_e2e.py checks what all SMAC scripts log): every agent's policy moved in
    every iteration."""
    _, cwd = ran_ok(smac_runs("mappo_smac"), sharing)
    scalars = read_scalars(run_dir(cwd))
    assert all(v > 0 for i in range(5) for _, v in scalars[f"mappo/kl_agent{i}"])
