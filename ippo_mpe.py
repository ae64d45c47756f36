"""IPPO (Independent PPO) on the Multi-Agent Particle Environments (mpe2, PettingZoo's parallel API).

Examples:
  python ippo_mpe.py --env simple_spread_v3 --total-timesteps 100000        # a short first run
  python ippo_mpe.py --env simple_spread_v3 --sharing none --seed 3         # 2M steps (the default)

Paper: de Witt et al., "Is Independent Learning All You Need in the StarCraft Multi-Agent Challenge?" (IPPO), the
independent-learning baseline of Feng et al. (FP3O; appendix F.3 runs MPE with MAPPO's settings). Every agent i
maximises PPO-clip (Schulman et al. 2017, eq. 7) with its own advantage, from its own reward and a decentralised
critic V(o^i) through GAE (Schulman et al. 2016, eq. 16); MPE's time limit is a truncation, so GAE bootstraps from the
value of the final observation. Defaults: MAPPO's MPE settings (Yu et al.: 128 envs x 25 steps, 10 epochs, 1
minibatch, lr 7e-4, entropy 0.01, 2 x 64 ReLU layers, gain 0.01 on the policy's last layer).
"""
import importlib
import os
import pickle
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (works with WANDB_MODE=offline)"""
    wandb_project_name: str = "fp3o"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    save_model: bool = False
    """whether to save a checkpoint to `runs/{run_name}/checkpoint.pt` (every `checkpoint_interval` iterations)"""
    checkpoint_interval: int = 50
    """iterations between checkpoints when `--save-model` is on"""
    resume: Optional[str] = None
    """path of a checkpoint to continue from exactly (implies `--save-model`)"""
    eval_only: bool = False
    """with `--resume`: only evaluate the loaded model and exit"""
    eval_interval: int = 25
    """iterations between evaluations (0 disables evaluation)"""
    eval_episodes: int = 32
    """deterministic episodes per evaluation (the FP3O paper uses 32)"""
    capture_video: bool = False
    """record evaluation episodes as videos in `runs/{run_name}/videos/`, TensorBoard and (with --track) wandb"""
    video_episodes: int = 1
    """episodes recorded per evaluation with `--capture-video` (the first of its deterministic episodes)"""
    progress_bar: bool = True
    """show a progress bar with steps, SPS and the latest episodic return"""
    torch_threads: int = 0
    """CPU threads for torch; 0 keeps torch's default (all cores). Use 1 when several runs share a machine"""

    env: str = "simple_spread_v3"
    """MPE task: simple_spread_v3, simple_reference_v3 or simple_speaker_listener_v4 (heterogeneous agents)"""
    num_agents: Optional[int] = None
    """simple_spread_v3 only: number of agents and of landmarks (None: mpe2's default, 3)"""
    local_ratio: Optional[float] = None
    """simple_spread_v3 and simple_reference_v3: weight of each agent's local reward against the global one (None: 0.5)"""
    max_cycles: int = 25
    """steps per episode (MPE's time limit, a truncation: the value of the last observation is bootstrapped)"""
    continuous_actions: bool = False
    """continuous actions in [0, 1] with a Gaussian policy (state-independent std) instead of discrete ones"""
    total_timesteps: int = 2_000_000
    """total environment steps of the experiment (one step of one environment moves all its agents)"""
    num_envs: int = 128
    """the number of parallel environments (stepped one after another in this process)"""
    num_steps: int = 25
    """steps per environment per rollout (MAPPO: 128 x 25, one whole episode per environment)"""

    sharing: Literal["full", "partial", "none"] = "full"
    """parameter sharing, for the actor AND the critic: full (one network for all agents), partial (shared trunk,
    per-agent last layer), none (a network per agent: fully independent learners)"""
    hidden_size: int = 64
    """width of the two hidden ReLU layers"""
    learning_rate: float = 7e-4
    """the learning rate of the actor optimizer"""
    critic_learning_rate: float = 7e-4
    """the learning rate of the critic optimizer"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 1
    """the number of mini-batches (random splits of every agent's samples)"""
    update_epochs: int = 10
    """the K epochs to update the policy and the critic"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient (also clips the value function)"""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 1.0
    """coefficient of the value function"""
    huber_delta: float = 10.0
    """delta of the critic's Huber loss"""
    max_grad_norm: float = 10.0
    """the maximum norm for the gradient clipping (per agent: see clip_grad_norm_per_agent)"""


def fail(message: str):
    """One clear line on stderr and a non-zero exit, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------------------------
# Environments: E mpe2 parallel envs behind one batched interface, agents second ([E, N, ...]).
# ----------------------------------------------------------------------------------------------
MPE_ENVS = {  # task: the options of its parallel_env that the flags may set (besides max_cycles, continuous_actions)
    "simple_spread_v3": ("N", "local_ratio"),
    "simple_reference_v3": ("local_ratio",),
    "simple_speaker_listener_v4": (),
}


# what a resumed run may change
RESUME_FLAGS = ("resume", "eval_only", "total_timesteps", "track", "progress_bar", "capture_video", "video_episodes")


def parse_args(argv=None) -> Args:
    """The command line (default: sys.argv) as Args; --help starts with the module docstring. A bad one: one `error:` line."""
    try:
        return tyro.cli(Args, args=argv, description=__doc__)
    except SystemExit as e:  # tyro has printed what is wrong; --help exits with 0
        fail("invalid command line (see above; --help lists the options)") if e.code else sys.exit(0)


def flags_given(argv) -> set:
    """The Args fields that a command line names: `--clip-coef 0.1`, `--clip_coef=0.1`, `--no-progress-bar`."""
    names = {arg[2:].split("=")[0].replace("-", "_") for arg in argv if arg.startswith("--")}
    return {name if name in Args.__dataclass_fields__ else name.removeprefix("no_") for name in names}


def check_args(args: Args):
    """Settings that cannot train: one `error:` line (exit status 2) before anything starts."""
    for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "hidden_size", "eval_episodes",
                 "video_episodes", "checkpoint_interval", "max_cycles", "learning_rate", "critic_learning_rate", "clip_coef",
                 "max_grad_norm"):
        if not getattr(args, name) > 0:  # NaN too
            fail(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if not (0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1):
        fail(f"--gamma ({args.gamma}) and --gae-lambda ({args.gae_lambda}) must lie in [0, 1]")
    if args.total_timesteps < args.num_envs * args.num_steps:
        fail(f"--total-timesteps ({args.total_timesteps}) is less than one iteration, --num-envs x --num-steps")
    if args.video_episodes > args.eval_episodes:
        fail(f"--video-episodes ({args.video_episodes}) must not exceed --eval-episodes ({args.eval_episodes})")
    if args.capture_video:
        try:
            __import__("imageio_ffmpeg"), __import__("moviepy")  # the encoders of record()
        except ImportError:
            fail("--capture-video needs imageio-ffmpeg and moviepy to write videos: pip install -r requirements.txt")


def load_checkpoint(path: str, eval_only: bool = False) -> dict:
    """This script's checkpoint at `path`, or one `error:` line that says what is wrong with the file."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at '{path}'")
    try:  # weights_only: tensors, numbers, strings and containers; any other object is refused before it is built
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an object it refuses (named, not imported), or a truncated, corrupt or not a torch file
        names = re.findall(r"(?:GLOBAL|class) ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else []
        if not names:
            fail(f"cannot read the checkpoint '{path}' ({type(e).__name__}): resume from an earlier one")
        names = sorted(set(getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", lambda _: names)(path)))
        if all(n.split(".")[0] == "numpy" for n in names):  # and its worlds pickled in bytes
            fail(f"'{path}' is an older version's checkpoint (pickled numpy and mpe2 objects, unsafe to load): train again, "
                 f"or if you trust it convert it and --resume {path}.new: python -c \"import pickle,runpy,torch as t; S=runpy."
                 f"run_path({os.path.abspath(__file__)!r}); c=t.load({path!r},weights_only=False); e=c['env_state']; "
                 f"e['worlds']=[S['world_state'](*pickle.loads(w)) for w in e['worlds']]; t.save(S['plain'](c),"
                 f"{path + '.new'!r})\"")
        fail(f"'{path}' holds pickled objects that loading would run as code ({', '.join(names)}): refused unopened")
    if not (isinstance(ckpt, dict) and set(ckpt.get("args", ())) <= set(Args.__dataclass_fields__)):
        fail(f"'{path}' is not a checkpoint of {os.path.basename(__file__)} (--save-model writes one)")
    fields = ("args run_name actor global_step iteration last_return critic actor_opt critic_opt value_norm env_state "
              "next_obs rng.torch rng.numpy rng.python").split()[: 4 if eval_only else None]  # --eval-only reads the first 4
    if missing := [k for k in fields if k.split(".")[-1] not in (ckpt.get("rng", {}) if "." in k else ckpt)]:
        fail(f"the checkpoint '{path}' lacks {', '.join(missing)}: damaged, or not one that --save-model wrote")
    return ckpt


def plain(x):
    """x with its numpy arrays as tensors (unsigned ones as int64), in lists, tuples and dicts: what checkpoints hold."""
    if isinstance(x, (list, tuple, dict)):
        return {k: plain(v) for k, v in x.items()} if isinstance(x, dict) else type(x)(map(plain, x))
    return torch.from_numpy(x.astype(np.int64 if x.dtype.kind == "u" else x.dtype)) if isinstance(x, np.ndarray) else x


def env_options(args: Args) -> dict:
    """The task's keyword arguments from the flags; a clear error for an unknown task or an option it lacks."""
    if args.env not in MPE_ENVS:
        fail(f"unknown --env '{args.env}'; the MPE tasks are: {', '.join(MPE_ENVS)}")
    options = dict(max_cycles=args.max_cycles, continuous_actions=args.continuous_actions)
    for flag, key, value in (("--num-agents", "N", args.num_agents), ("--local-ratio", "local_ratio", args.local_ratio)):
        if value is not None:
            if key not in MPE_ENVS[args.env]:
                fail(f"{flag} does not apply to {args.env} (only to {', '.join(e for e, o in MPE_ENVS.items() if key in o)})")
            options[key] = value
    if not 0.0 <= options.get("local_ratio", 0.5) <= 1.0:
        fail(f"--local-ratio must lie in [0, 1], got {args.local_ratio}")
    if options.get("N", 1) < 1 or args.max_cycles < 1:
        fail("--num-agents and --max-cycles must be at least 1")
    return options


def world_state(world, np_random, steps) -> dict:
    """An mpe2 world (positions, velocities, messages, colours, goals...), its env's generator state and step count, as
    tensors, numbers and strings: every object as the dict of its attributes, an entity as ("entity", its index)."""
    entities = world.entities
    attributes = lambda obj: {k: value(v) for k, v in vars(obj).items()}

    def value(v):
        if any(v is e for e in entities):
            return ("entity", next(i for i, e in enumerate(entities) if v is e))
        if isinstance(v, (list, tuple)):
            return [value(x) for x in v]
        return attributes(v) if hasattr(v, "__dict__") else plain(v)

    return dict(world=attributes(world), entities=[attributes(e) for e in entities], rng=np_random.bit_generator.state,
                steps=steps)


def set_world_state(env, state: dict):
    """Puts world_state's record into `env` (an env of the same task, reset: its objects take the saved values)."""
    u = env.unwrapped
    entities = u.world.entities

    def put(obj, attributes: dict):
        for k, v in attributes.items():
            setattr(obj, k, value(getattr(obj, k, None), v))

    def value(current, v):
        if isinstance(v, tuple):
            return entities[v[1]]
        if isinstance(v, list):
            return [value(None, x) for x in v]
        if isinstance(v, dict):
            return put(current, v) or current
        return v.numpy().copy() if torch.is_tensor(v) else v

    put(u.world, state["world"])
    for entity, attributes in zip(entities, state["entities"], strict=True):
        put(entity, attributes)
    u.np_random.bit_generator.state, u.steps = state["rng"], state["steps"]


class MpeEnvs:
    """`num_envs` mpe2 environments stepped one after another (an MPE step is 0.1-0.3 ms of Python; the networks run
    once per step for all envs and agents). Each env is driven through PettingZoo's AEC API, every agent acting in turn
    and the world moving after the last one: the same observations and rewards as mpe2's parallel_env (the tests
    compare them), ~1.5x faster because the parallel wrapper computes every observation twice.
    Observations are zero-padded to the widest agent [E, N, O];
    `avail` [N, A] marks each agent's own actions (discrete) or action dimensions (continuous) among the padded A.
    step(actions [E, N] or [E, N, A]) returns each agent's own reward [E, N], terminated/truncated/done [E] and, where
    an episode ended, `final_obs` (its last observation, before the automatic reset; MPE's time limit is a truncation
    whose value is bootstrapped), `ep_return` (the agents' mean return) and `ep_length`. With render=True, render(i)
    draws env i (mpe2's rgb_array: agents and landmarks seen from above, 700 x 700 pixels)."""

    def __init__(self, env_id: str, num_envs: int, options: dict, render: bool = False):
        module = importlib.import_module(f"mpe2.{env_id}")
        self.envs = [module.env(**options, render_mode="rgb_array" if render else None) for _ in range(num_envs)]
        self.agents, self.num_envs, self.continuous = self.envs[0].possible_agents, num_envs, options["continuous_actions"]
        spaces = [self.envs[0].action_space(a) for a in self.agents]
        self.act_dims = [int(s.shape[0] if self.continuous else s.n) for s in spaces]
        self.obs_dims = [self.envs[0].observation_space(a).shape[0] for a in self.agents]
        self.n_agents, self.obs_dim, self.n_actions = len(self.agents), max(self.obs_dims), max(self.act_dims)
        self.avail = torch.arange(self.n_actions)[None] < torch.tensor(self.act_dims)[:, None]
        self.ep_return, self.ep_length = np.zeros(num_envs, np.float32), np.zeros(num_envs, np.int64)

    def _observe(self, out, i):
        for j, agent in enumerate(self.agents):
            out[i, j, : self.obs_dims[j]] = self.envs[i].observe(agent)

    def reset(self, seed: int):
        obs = np.zeros((self.num_envs, self.n_agents, self.obs_dim), np.float32)
        for i, env in enumerate(self.envs):
            env.reset(seed=seed + i)
            self._observe(obs, i)
        self.ep_return[:], self.ep_length[:] = 0, 0
        return torch.from_numpy(obs)

    def step(self, actions: np.ndarray):
        E, N = self.num_envs, self.n_agents
        obs, final_obs = np.zeros((E, N, self.obs_dim), np.float32), np.zeros((E, N, self.obs_dim), np.float32)
        reward, terminated, truncated = np.zeros((E, N), np.float32), np.zeros(E, bool), np.zeros(E, bool)
        ep_return, ep_length = np.zeros(E, np.float32), np.zeros(E, np.int64)
        for i, env in enumerate(self.envs):
            for j in range(N):  # MPE's continuous actions lie in [0, 1]; padded actions/dimensions are dropped
                env.step(np.clip(actions[i, j, : self.act_dims[j]], 0.0, 1.0) if self.continuous else int(actions[i, j]))
            self._observe(obs, i)
            reward[i] = [env.rewards[a] for a in self.agents]
            terminated[i], truncated[i] = any(env.terminations.values()), any(env.truncations.values())  # all end together
            self.ep_return[i] += reward[i].mean()
            self.ep_length[i] += 1
            if terminated[i] or truncated[i]:
                ep_return[i], ep_length[i], self.ep_return[i], self.ep_length[i] = self.ep_return[i], self.ep_length[i], 0, 0
                env.reset()  # continues the env's own seeded generator
                final_obs[i], obs[i] = obs[i], 0.0
                self._observe(obs, i)
        out = dict(obs=obs, final_obs=final_obs, reward=reward, terminated=terminated, truncated=truncated,
                   done=terminated | truncated, ep_return=ep_return, ep_length=ep_length)  # fmt: skip
        return {k: torch.from_numpy(v) for k, v in out.items()}

    def render(self, i: int) -> np.ndarray:  # [H, W, 3]
        return self.envs[i].render()

    def get_state(self):
        """For exact resume, in tensors, numbers and strings: every world (world_state), the episodes' returns and lengths."""
        worlds = [world_state(e.unwrapped.world, e.unwrapped.np_random, e.unwrapped.steps) for e in self.envs]
        return dict(worlds=worlds, ep_return=plain(self.ep_return), ep_length=plain(self.ep_length))

    def set_state(self, state):
        for env, saved in zip(self.envs, state["worlds"], strict=True):
            set_world_state(env, saved)
        self.ep_return[:], self.ep_length[:] = state["ep_return"], state["ep_length"]

    def close(self):
        for env in self.envs:
            env.close()


# ----------------------------------------------------------------------------------------------
# Networks: every layer is an AgentLinear with weights [copies, in, out] applied to [N, batch, in]
# in one batched matmul; copies = 1 shares the layer, copies = N gives each agent its own.
# ----------------------------------------------------------------------------------------------
class AgentLinear(nn.Module):
    def __init__(self, copies: int, n_in: int, n_out: int, gain: float = np.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(copies, n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(copies, 1, n_out))
        for i in range(copies):  # orthogonal init of each copy, as in MAPPO
            nn.init.orthogonal_(self.weight.data[i].T, gain)

    def forward(self, x):  # x: [N, B, in] -> [N, B, out]
        return torch.baddbmm(self.bias, x, self.weight) if self.weight.shape[0] > 1 else x @ self.weight[0] + self.bias[0]


def layer_copies(sharing: str, n_agents: int):
    """(trunk copies, last-layer copies) for a sharing mode (FP3O appendix E.3)."""
    return {"full": (1, 1), "partial": (1, n_agents), "none": (n_agents, n_agents)}[sharing]


class AgentNet(nn.Module):
    """Two ReLU layers and a last layer, for all agents at once: x [N, B, in] -> [N, B, out]. When the trunk is
    shared (full and partial sharing) a one-hot agent id is appended to the input."""

    def __init__(self, n_agents, n_in, n_out, hidden, sharing, out_gain=0.01):
        super().__init__()
        trunk, head = layer_copies(sharing, n_agents)
        self.n_agents, self.agent_id = n_agents, trunk == 1
        n_in += n_agents if self.agent_id else 0
        self.fc1, self.fc2 = AgentLinear(trunk, n_in, hidden), AgentLinear(trunk, hidden, hidden)
        self.head = AgentLinear(head, hidden, n_out, out_gain)

    def forward(self, x):
        if self.agent_id:
            N, B = x.shape[:2]
            x = torch.cat([x, torch.eye(N, device=x.device)[:, None].expand(N, B, N)], -1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def masked_logits(logits, avail):
    return logits.masked_fill(~avail, -1e10)  # padded (unavailable) actions: logit -1e10


class Actor(AgentNet):
    """The policy of every agent over its own actions. Discrete: a categorical whose padded actions get logit -1e10.
    Continuous: a Gaussian with a state-independent std = 0.5 * sigmoid(theta), theta initialised to 1 (the authors'
    MaMuJoCo parametrisation; one theta per last-layer copy); padded action dimensions are left out of
    log-probabilities and entropies. `avail` [N, A] is a buffer, so checkpoints carry it."""

    def __init__(self, n_agents, n_in, avail, hidden, sharing, continuous=False):
        super().__init__(n_agents, n_in, avail.shape[1], hidden, sharing)
        self.register_buffer("avail", avail[:, None].clone())  # [N, 1, A]
        copies = layer_copies(sharing, n_agents)[1]
        self.theta = nn.Parameter(torch.ones(copies, 1, avail.shape[1])) if continuous else None

    def dist(self, obs):
        out = self(obs)
        if self.theta is None:
            return torch.distributions.Categorical(logits=masked_logits(out, self.avail))
        return torch.distributions.Normal(out, 0.5 * torch.sigmoid(self.theta))

    def log_prob_entropy(self, dist, actions):
        """Per-agent log pi^i(a^i|o^i) and entropy, [N, B] (continuous: summed over the agent's own dimensions)."""
        if self.theta is None:
            return dist.log_prob(actions), dist.entropy()
        own = self.avail.float()
        return (dist.log_prob(actions) * own).sum(-1), (dist.entropy() * own).sum(-1)

    def act(self, obs, deterministic=False):
        """Actions [N, B] (or [N, B, A]) and their log-probabilities; deterministic: the mode (argmax or mean)."""
        dist = self.dist(obs)
        if deterministic:
            action = dist.mean if self.theta is not None else dist.logits.argmax(-1)
        else:
            action = dist.sample()
        return action, self.log_prob_entropy(dist, action)[0]


class ValueNorm(nn.Module):
    """Running mean / variance of the returns with decay beta and bias correction (MAPPO's ValueNorm), one per copy of
    the critic's last layer: shared under full sharing, per agent otherwise. Statistics [copies, 1] broadcast over
    [..., N, B]."""

    def __init__(self, copies: int = 1, beta: float = 0.99999, eps: float = 1e-5):
        super().__init__()
        self.beta, self.eps = beta, eps
        for name in ("mean", "mean_sq", "debias"):
            self.register_buffer(name, torch.zeros(copies, 1, dtype=torch.float64))

    def update(self, x):  # x [N, B]
        x = x.double().reshape(self.mean.shape[0], -1)
        self.mean.mul_(self.beta).add_(x.mean(1, keepdim=True) * (1 - self.beta))
        self.mean_sq.mul_(self.beta).add_((x**2).mean(1, keepdim=True) * (1 - self.beta))
        self.debias.mul_(self.beta).add_(1 - self.beta)

    def stats(self):
        mean = self.mean / self.debias.clamp(min=self.eps)
        var = (self.mean_sq / self.debias.clamp(min=self.eps) - mean**2).clamp(min=1e-2)
        return mean.float(), var.sqrt().float()

    def normalize(self, x):
        mean, std = self.stats()
        return (x - mean) / std

    def denormalize(self, x):
        mean, std = self.stats()
        return x * std + mean


# ----------------------------------------------------------------------------------------------
# Algorithm pieces
# ----------------------------------------------------------------------------------------------
def bootstrap_values(values, last_value, final_values, terminated, truncated):
    """The value of what followed step t in the same episode, for GAE: V(o_{t+1}) inside an episode, V(final
    observation) where the time limit truncated it (bootstrapping), 0 where it terminated. values/final_values
    [T, N, E], last_value [N, E] (the observation after the rollout), terminated/truncated [T, 1, E] bool."""
    after = torch.cat([values[1:], last_value[None]])
    return torch.where(truncated, final_values, torch.where(terminated, torch.zeros_like(after), after))


def compute_gae(rewards, values, next_values, dones, gamma, lam):
    """GAE (Schulman et al. 2016, eq. 16) per agent on its own reward: delta_t = r_t + gamma next_values_t - V_t,
    A_t = delta_t + gamma lam (1 - done_t) A_{t+1}; dones[t] = 1 where an episode ended at step t (terminated or
    truncated). All [T, ...] with de-normalised values. Returns (advantages, returns = advantages + values)."""
    adv, last = torch.zeros_like(values), 0.0
    for t in reversed(range(values.shape[0])):
        delta = rewards[t] + gamma * next_values[t] - values[t]
        adv[t] = last = delta + gamma * lam * (1.0 - dones[t]) * last
    return adv, adv + values


def standardize_per_agent(adv):
    """Standardise each agent's advantages over its own samples; adv [N, B]."""
    return (adv - adv.mean(1, keepdim=True)) / (adv.std(1, unbiased=False, keepdim=True) + 1e-8)


def ppo_clip_objective(ratio, adv, clip_coef):
    """PPO-clip (Schulman et al. 2017, eq. 7), per sample, to be maximised: min(r A, clip(r, 1 +- eps) A) with
    r = pi^i(a^i|o^i) / pi_k^i(a^i|o^i) and A agent i's own advantage."""
    return torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef) * adv)


def value_loss_fn(new_values, old_values, returns_n, clip_coef, delta):
    """Huber loss on normalised returns with value clipping (MAPPO), averaged over samples."""
    clipped = old_values + (new_values - old_values).clamp(-clip_coef, clip_coef)
    huber = torch.nn.functional.huber_loss
    return torch.max(huber(new_values, returns_n, reduction="none", delta=delta),
                     huber(clipped, returns_n, reduction="none", delta=delta)).mean()  # fmt: skip


def clip_grad_norm_per_agent(net, max_norm):
    """Gradient-norm clipping as if every agent had its own network: agent i's norm covers its own layer copies and
    the shared layers; its copies are scaled by its own factor, shared layers by the smallest factor. Under full
    sharing this is torch's clip_grad_norm_; under no sharing no agent's gradient changes another agent's step."""
    params = [p for p in net.parameters() if p.grad is not None]
    sq_norm = sum(p.grad.pow(2).reshape(p.shape[0], -1).sum(1) for p in params)  # [N] (or [1]: all shared)
    scale = (max_norm / (sq_norm.sqrt() + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale.view(-1, *[1] * (p.dim() - 1)) if p.shape[0] > 1 else scale.min())


@torch.no_grad()
def rollout(actor, critic, envs, next_obs, buf):
    """Steps the envs T times from next_obs [N, E, O] into buf [T, N, E, ...]: observations, actions, log pi_k, values,
    rewards, episode ends and, where the time limit truncated an episode, V of its final observation (not of the next
    episode's first one, which the env hands back in its place). Returns (the observation after the rollout, the
    returns of the episodes that ended)."""
    ep_returns, device = [], next_obs.device
    for t in range(buf["obs"].shape[0]):
        buf["obs"][t] = next_obs
        buf["actions"][t], buf["logp"][t] = actor.act(next_obs)
        buf["values"][t] = critic(next_obs)[..., 0]
        nxt = envs.step(buf["actions"][t].transpose(0, 1).cpu().numpy())
        buf["rewards"][t] = nxt["reward"].T.to(device)
        buf["terminated"][t, 0], buf["truncated"][t, 0] = nxt["terminated"], nxt["truncated"]
        if nxt["truncated"].any():  # V(final observation) of the truncated episodes, to bootstrap from
            buf["final_values"][t] = critic(nxt["final_obs"].transpose(0, 1).to(device))[..., 0]
        if nxt["done"].any():
            ep_returns.append(nxt["ep_return"][nxt["done"]])
        next_obs = nxt["obs"].transpose(0, 1).to(device)
    return next_obs, ep_returns


@torch.no_grad()
def rollout_batch(buf, critic, value_norm, next_obs, args):
    """The update's batch [N, T * E, ...] from buf [T, N, E, ...]: GAE per agent on its own reward with de-normalised
    values and time-limit bootstrapping, standardised advantages, returns normalised by value_norm (updated with them)."""
    T, N, E = buf["obs"].shape[:3]
    values, final_values = value_norm.denormalize(buf["values"]), value_norm.denormalize(buf["final_values"])
    last_value = value_norm.denormalize(critic(next_obs)[..., 0])
    next_values = bootstrap_values(values, last_value, final_values, buf["terminated"], buf["truncated"])
    dones = (buf["terminated"] | buf["truncated"]).float()
    adv, returns = compute_gae(buf["rewards"], values, next_values, dones, args.gamma, args.gae_lambda)
    flat = lambda x: x.transpose(0, 1).reshape(N, T * E, *x.shape[3:])  # [T, N, E, ...] -> [N, T*E, ...]
    b = {k: flat(buf[k]) for k in ("obs", "actions", "logp", "values")}
    b["adv"], returns = standardize_per_agent(flat(adv)), flat(returns)
    value_norm.update(returns)
    b["returns_n"] = value_norm.normalize(returns)
    return b


def ippo_update(actor, critic, opts, b, args):
    """`update_epochs` epochs over random minibatches of the samples [N, B]: every agent maximises PPO-clip with its
    own advantage at once (one batched pass for all agents), and the critic regresses V(o^i) on agent i's returns.
    Under --sharing none (N separate networks) the losses are each agent's own mean summed over the agents (every
    agent acts at every step: N x the mean), so each network gets the gradient it would get alone; with the mean over
    all agents each copy would get 1/N of it, and the gradient clipping would bite N times later.
    Returns the agents' mean of (policy loss, value loss, entropy, approx. KL, clip fraction)."""
    n_samples, stats = b["obs"].shape[1], []
    n_sum = b["obs"].shape[0] if args.sharing == "none" else 1
    for _ in range(args.update_epochs):
        for mb in torch.randperm(n_samples, device=b["obs"].device).chunk(args.num_minibatches):
            m = {k: v[:, mb] for k, v in b.items()}
            logp, entropy = actor.log_prob_entropy(actor.dist(m["obs"]), m["actions"])
            ratio = (logp - m["logp"]).exp()
            pg_loss, ent = -ppo_clip_objective(ratio, m["adv"], args.clip_coef).mean(), entropy.mean()
            v_loss = value_loss_fn(critic(m["obs"])[..., 0], m["values"], m["returns_n"], args.clip_coef, args.huber_delta)
            for opt, loss, net in ((opts[0], pg_loss - args.ent_coef * ent, actor), (opts[1], args.vf_coef * v_loss, critic)):
                opt.zero_grad(set_to_none=True)
                (n_sum * loss).backward()
                clip_grad_norm_per_agent(net, args.max_grad_norm)
                opt.step()
            with torch.no_grad():
                kl = ((ratio - 1) - (logp - m["logp"])).mean()
                clipfrac = ((ratio - 1).abs() > args.clip_coef).float().mean()
            stats.append(torch.stack([pg_loss.detach(), v_loss.detach(), ent.detach(), kl, clipfrac]))
    return torch.stack(stats).mean(0)


@torch.no_grad()
def evaluate(actor, envs, seed, device, videos=0):
    """One deterministic episode (argmax or Gaussian mean) per environment, from the same seeded starts every time.
    Returns the mean episodic return (the agents' mean) and the frames of the first `videos` episodes (envs.render),
    one per state the agents act in."""
    obs, returns, frames = envs.reset(seed), torch.full((envs.num_envs,), float("nan")), [[] for _ in range(videos)]
    while returns.isnan().any():
        for k, video in enumerate(frames):
            video += [envs.render(k)] if returns[k].isnan() else []
        action, _ = actor.act(obs.transpose(0, 1).to(device), deterministic=True)
        nxt = envs.step(action.transpose(0, 1).cpu().numpy())
        first = nxt["done"] & returns.isnan()
        returns[first], obs = nxt["ep_return"][first], nxt["obs"]
    return returns.mean().item(), frames


def record(frames, run_name, step, writer, fps=10):
    """--capture-video: each episode's frames as runs/{run_name}/videos/{step}_{k}.mp4 (imageio's ffmpeg; MPE moves
    0.1 s per step) and a TensorBoard video `videos/episode_{k}` (with --track, wandb's TensorBoard sync logs it)."""
    import imageio.v2 as imageio

    for k, video in enumerate(frames):  # (nothing without --capture-video)
        os.environ.update({v: os.environ.get(v, "dummy") for v in ("SDL_AUDIODRIVER", "SDL_VIDEODRIVER")})  # add_video's
        os.makedirs(f"runs/{run_name}/videos", exist_ok=True)  # moviepy imports pygame, which would greet the sound card
        imageio.mimwrite(f"runs/{run_name}/videos/{step}_{k}.mp4", video, fps=fps, macro_block_size=1)
        writer.add_video(f"videos/episode_{k}", torch.from_numpy(np.stack(video)).permute(0, 3, 1, 2)[None], step, fps=fps)
    writer.flush()  # now: an --eval-only run exits right after


def package_versions():
    names = ("torch", "mpe2", "pettingzoo", "numpy", "tyro")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


if __name__ == "__main__":
    args = parse_args()
    ckpt, given = None, flags_given(sys.argv[1:])
    if args.resume:
        extra = ", ".join("--" + name.replace("_", "-") for name in sorted(given - set(RESUME_FLAGS)))
        if extra:
            fail(f"--resume continues the saved run with its own settings: drop {extra} (with --resume only "
                 f"{', '.join('--' + name.replace('_', '-') for name in RESUME_FLAGS[1:])} apply)")
        ckpt = load_checkpoint(args.resume, args.eval_only)
        cli = {k: getattr(args, k) for k in RESUME_FLAGS if k in given or k == "resume"}
        args = Args(**{**ckpt["args"], **cli, "save_model": True})
    elif args.eval_only:
        fail("--eval-only evaluates a saved model: add --resume runs/<run>/checkpoint.pt")
    check_args(args)
    options = env_options(args)
    run_name = ckpt["run_name"] if ckpt else f"{args.env}__{args.exp_name}__{args.sharing}__{args.seed}__{int(time.time())}"
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    envs = MpeEnvs(args.env, args.num_envs, options)
    videos = args.video_episodes if args.capture_video else 0  # episodes drawn per evaluation
    eval_envs = None  # every eval_interval iterations, or once with --eval-only
    if args.eval_interval > 0 or args.eval_only:
        eval_envs = MpeEnvs(args.env, args.eval_episodes, options, render=videos > 0)
    N, E, T, A = envs.n_agents, args.num_envs, args.num_steps, envs.n_actions
    print(f"{run_name}: {N} agents {envs.agents}, observations {envs.obs_dims} padded to {envs.obs_dim}, "
          f"{'action dims' if args.continuous_actions else 'actions'} {envs.act_dims} padded to {A}, "
          f"sharing {args.sharing} (actor and critic), device {device}")  # fmt: skip
    actor = Actor(N, envs.obs_dim, envs.avail, args.hidden_size, args.sharing, args.continuous_actions).to(device)
    critic = AgentNet(N, envs.obs_dim, 1, args.hidden_size, args.sharing, out_gain=1.0).to(device)  # decentralised V(o^i)
    opts = [torch.optim.Adam(actor.parameters(), lr=args.learning_rate, eps=1e-5),
            torch.optim.Adam(critic.parameters(), lr=args.critic_learning_rate, eps=1e-5)]  # fmt: skip
    value_norm = ValueNorm(layer_copies(args.sharing, N)[1]).to(device)
    eval_seed = args.seed + 100_000  # every evaluation starts from the same episodes
    if ckpt and args.eval_only:
        actor.load_state_dict(ckpt["actor"])
        ret, frames = evaluate(actor, eval_envs, eval_seed, device, videos)
        if args.capture_video:
            record(frames, run_name, ckpt["global_step"], SummaryWriter(f"runs/{run_name}"))
        print(f"eval: episodic_return {ret:.4f} over {args.eval_episodes} episodes")
        sys.exit(0)
    config = {**asdict(args), "versions": package_versions()}
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=config,
                   name=run_name, group=f"{args.env}__{args.exp_name}__{args.sharing}",
                   tags=[args.exp_name, args.sharing, args.env], save_code=True, resume="allow", id=run_name)  # fmt: skip
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in config.items()))
    ckpt_path = f"runs/{run_name}/checkpoint.pt"
    # rollout storage, agents second: [T, N, E, ...]
    act_shape, act_dtype = ((A,), torch.float32) if args.continuous_actions else ((), torch.long)
    buf = dict(obs=torch.zeros(T, N, E, envs.obs_dim, device=device),
               actions=torch.zeros(T, N, E, *act_shape, dtype=act_dtype, device=device),
               **{k: torch.zeros(T, N, E, device=device) for k in ("logp", "values", "rewards", "final_values")},
               terminated=torch.zeros(T, 1, E, dtype=torch.bool, device=device),
               truncated=torch.zeros(T, 1, E, dtype=torch.bool, device=device))  # fmt: skip
    num_iterations = args.total_timesteps // (E * T)
    global_step, first_iteration, last_return = 0, 1, float("nan")
    next_obs = envs.reset(seed=args.seed).transpose(0, 1).to(device)
    if ckpt:
        modules = dict(actor=actor, critic=critic, actor_opt=opts[0], critic_opt=opts[1], value_norm=value_norm)
        for key, module in modules.items():
            module.load_state_dict(ckpt[key])
        global_step, first_iteration, last_return = ckpt["global_step"], ckpt["iteration"] + 1, ckpt["last_return"]
        envs.set_state(ckpt["env_state"])  # continue the very same episodes
        next_obs = ckpt["next_obs"].to(device)
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"]), np.random.set_state(rng["numpy"]), random.setstate(rng["python"])
        torch.cuda.set_rng_state_all(rng["cuda"]) if rng.get("cuda") and device.type == "cuda" else None
    progress = None
    if args.progress_bar:
        progress = tqdm(total=num_iterations * E * T, initial=global_step, unit="step", dynamic_ncols=True)
    start_time, start_step, eval_return = time.time(), global_step, float("nan")  # the latest evaluation's

    for iteration in range(first_iteration, num_iterations + 1):
        t0 = time.time()
        next_obs, ep_returns = rollout(actor, critic, envs, next_obs, buf)
        global_step += E * T
        b = rollout_batch(buf, critic, value_norm, next_obs, args)
        rollout_time, t1 = time.time() - t0, time.time()

        stats = ippo_update(actor, critic, opts, b, args)
        update_time = time.time() - t1
        if not torch.isfinite(stats).all():
            kept = ckpt_path if args.save_model else "none saved: use --save-model"
            fail(f"non-finite loss at iteration {iteration}; the last good checkpoint is kept ({kept})")

        # ---- logging ----
        pg_loss, v_loss, entropy, approx_kl, clipfrac = stats.tolist()
        var_y = b["returns_n"].var()
        sps = int((global_step - start_step) / (time.time() - start_time))
        explained_var = (1 - (b["returns_n"] - b["values"]).var() / var_y).item() if var_y > 0 else float("nan")
        scalars = {"charts/SPS": sps, "charts/learning_rate": opts[0].param_groups[0]["lr"], "losses/policy_loss": pg_loss,
                   "losses/value_loss": v_loss, "losses/entropy": entropy, "losses/approx_kl": approx_kl,
                   "losses/clipfrac": clipfrac, "losses/explained_variance": explained_var,
                   "charts/rollout_time": rollout_time, "charts/update_time": update_time}  # fmt: skip
        if ep_returns:
            last_return = torch.cat(ep_returns).mean().item()
            scalars["charts/episodic_return"] = last_return
        if eval_envs is not None and (iteration % args.eval_interval == 0 or iteration == num_iterations):
            eval_return, frames = evaluate(actor, eval_envs, eval_seed, device, videos)
            scalars["eval/episodic_return"] = eval_return
            record(frames, run_name, global_step, writer)  # with --capture-video
        for k, v in scalars.items():
            writer.add_scalar(k, v, global_step)
        if progress is not None:
            progress.update(E * T)
            progress.set_postfix(SPS=sps, episodic_return=f"{last_return:.2f}", refresh=False)
        if args.save_model and (iteration % args.checkpoint_interval == 0 or iteration == num_iterations):
            torch.save({
                "args": asdict(args), "run_name": run_name, "iteration": iteration, "global_step": global_step,
                "last_return": last_return, "actor": actor.state_dict(), "critic": critic.state_dict(),
                "actor_opt": opts[0].state_dict(), "critic_opt": opts[1].state_dict(), "value_norm": value_norm.state_dict(),
                "env_state": envs.get_state(), "next_obs": next_obs.cpu(),
                "rng": plain({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                              "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}),
            }, ckpt_path + ".tmp")  # fmt: skip
            os.replace(ckpt_path + ".tmp", ckpt_path)  # atomic: a crash while saving keeps the last checkpoint

    if progress is not None:
        progress.close()
    envs.close()
    if eval_envs is not None:
        eval_envs.close()
    writer.close()
    if args.track:
        wandb.finish()
    result = f"eval return {eval_return:.2f}" if eval_envs is not None else f"training return {last_return:.2f}"
    print(f"done: {result} at step {global_step:,} after {(time.time() - start_time) / 60:.1f} min; runs/{run_name} "
          "(to look at it: tensorboard --logdir runs)")
