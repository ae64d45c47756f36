"""Reference algorithms the scripts are checked against, written out plainly, and the hand-made inputs they are
checked on.

- `ppo_clip`, `clip_active`: PPO's clipped surrogate per sample, and where its clipped, constant term is the minimum.
- `reference_gae`: GAE as a sum over the rest of each episode inside the rollout (loops over Python floats).
- `clipped_value_loss`: MAPPO's clipped value loss; `assert_agent_steps_alone`: --sharing none as N networks.
- `agent_slices`: one agent's slice of per-agent parameters and their Adam moments.
- `hand_made_batch(script, sharing)`: a tiny GRU actor, critic, Adam optimizers and a rollout batch shaped like the SMAC
  scripts' `b`, for in-process tests of their updates.
"""
import torch

EPS = 0.2  # the PPO clip of the tests


def ppo_clip(ratio, adv, eps=EPS):
    """min(r A, clip(r, 1 - eps, 1 + eps) A) per sample."""
    return torch.min(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)


def clip_active(ratio, adv, eps=EPS):
    """Samples whose PPO-clip term is the clipped, constant one (zero gradient)."""
    return ((ratio > 1 + eps) & (adv > 0)) | ((ratio < 1 - eps) & (adv < 0))


def reference_gae(rewards, values, dones, next_value, next_done, gamma, lam):
    """Per environment, A_t = sum_{l=t}^{end} (gamma*lam)^(l-t) delta_l over the rest of t's episode inside the
    rollout, delta_l = r_l + gamma * V_{l+1} * [obs l+1 continues the episode] - V_l. dones[t] = 1: obs t starts an
    episode; index T is the next obs (next_value, next_done). Returns (advantages, returns), float64."""
    T, B = values.shape
    vals = torch.cat([values, next_value[None]])
    starts = torch.cat([dones, next_done[None]])
    adv = torch.zeros(T, B, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            total, discount = 0.0, 1.0
            for step in range(t, T):
                cont = 1.0 - float(starts[step + 1, b])
                delta = float(rewards[step, b]) + gamma * float(vals[step + 1, b]) * cont - float(vals[step, b])
                total += discount * delta
                if cont == 0.0:  # the episode ends after `step`
                    break
                discount *= gamma * lam
            adv[t, b] = total
    return adv, adv + values.double()


def agent_slices(opt, params, i):
    """Agent i's slice of every per-agent parameter and of its Adam moments."""
    return [t[i].clone() for p in params for t in (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])]


def clipped_value_loss(values, old_values, returns_n, clip: float, delta: float = 10.0):
    """MAPPO's clipped value loss written out: max of the two errors' Huber losses, which below `delta` (asserted)
    are their half squares; the mean over samples."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    assert ((values - returns_n).abs() < delta).all() and ((clipped - returns_n).abs() < delta).all()
    return torch.max((values - returns_n) ** 2 / 2, (clipped - returns_n) ** 2 / 2).mean()


def assert_agent_steps_alone(nets, refs, losses, agent: int, lr: float, max_grad_norm: float, clip_bites: bool):
    """--sharing none means N separate networks. `refs` are copies of `nets` from before their update, `losses` the
    losses of agent `agent`'s samples alone through them: one SGD step (lr) of each reference with torch's
    gradient-norm clipping, which bites exactly when `clip_bites`; then agent `agent`'s copy of every parameter of
    `nets` (updated by the script on all agents at once) must equal the reference's."""
    for ref, loss in zip(refs, losses, strict=True):
        opt = torch.optim.SGD(ref.parameters(), lr=lr)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_grad_norm)
        assert bool(norm > max_grad_norm) == clip_bites, f"gradient norm {norm:.3g} against the clip {max_grad_norm}"
        opt.step()
    for net, ref in zip(nets, refs, strict=True):
        for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p[agent], q[agent], rtol=1e-5, atol=1e-6, msg=f"{name}[{agent}]")


HAND_MADE = dict(N=3, T=5, E=6, OBS=7, STATE=9, ACTS=4, HID=8)  # agents, steps, envs, sizes of hand_made_batch


def hand_made_batch(script, sharing: str, seed: int = 0, logp_noise: float = 0.3):
    """A tiny GRU actor and MLP critic built with `script.AgentNet`, their Adam optimizers (lr 5e-3) and a rollout
    batch `b` [T, N, E, ...] as the SMAC scripts build it: random masks with some dead agents, an episode start inside
    the rollout, and rollout log-probs a little away from the actor's, so that ratios differ from 1."""
    N, T, E, OBS, STATE, ACTS, HID = HAND_MADE.values()
    torch.manual_seed(seed)
    actor = script.AgentNet(N, OBS, ACTS, HID, sharing, recurrent=True)
    critic = script.AgentNet(N, STATE, 1, HID, sharing, out_gain=1.0)
    opts = [torch.optim.Adam(net.parameters(), lr=5e-3, eps=1e-5) for net in (actor, critic)]
    gen = torch.Generator().manual_seed(seed)
    avail = torch.rand(T, N, E, ACTS, generator=gen) > 0.3
    avail[..., 0] = True
    actions = torch.multinomial(avail.float().view(-1, ACTS), 1, generator=gen).view(T, N, E)
    starts = torch.zeros(T, E)
    starts[0], starts[2, 1] = 1.0, 1.0
    obs, state = torch.randn(T, N, E, OBS, generator=gen), torch.randn(T, N, E, STATE, generator=gen)
    values, active = torch.randn(T, N, E, generator=gen), (torch.rand(T, N, E, generator=gen) > 0.15).float()
    adv, returns_n = torch.randn(T, N, E, generator=gen), torch.randn(T, N, E, generator=gen)
    b = dict(obs=obs, state=state, avail=avail, actions=actions, starts=starts, h0=torch.zeros(N, E, HID), values=values,
             active=active, adv=adv, returns_n=returns_n)
    b["logp"] = script.rollout_logp(actor, b) + logp_noise * torch.randn(T, N, E, generator=gen)
    return actor, critic, opts, b
