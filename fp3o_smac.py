"""FP3O (Full-Pipeline PPO) on SMAC maps: SMAX (JaxMARL, no StarCraft II needed), SMAC and SMACv2.

Examples:
  python fp3o_smac.py --map 3m --total-timesteps 100000             # a short first run on SMAX
  python fp3o_smac.py --map 6h_vs_8z --sharing none --seed 3        # the paper's setting: table E.5's 20M steps

Paper: Feng et al., "FP3O: Enabling Proximal Policy Optimization in Multi-Agent Cooperation with Parameter-Sharing
Versatility", section 3.4, Algorithm 1, listing B.3; double clip eq. D.10; advantage split F.4; InStep-only ablation F.5.
One iteration: roll out pi_k -> independent step (every agent, PPO-clip) -> intermediate policy pi_{k+0.5} -> the
condition (Alg. 1 line 7) -> dependent step along the cyclic-shift pipelines.
"""
import contextlib
import glob
import multiprocessing as mp
import os
import pickle
import random
import re
import sys
import time
import warnings
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
    checkpoint_interval: int = 20
    """iterations between checkpoints when `--save-model` is on"""
    resume: Optional[str] = None
    """path of a checkpoint to continue from exactly (implies `--save-model`)"""
    eval_only: bool = False
    """with `--resume`: only evaluate the loaded model and exit"""
    eval_interval: int = 25
    """iterations between evaluations (0 disables evaluation)"""
    eval_episodes: int = 32
    """deterministic episodes per evaluation (the paper uses 32)"""
    capture_video: bool = False
    """record evaluation episodes as videos in `runs/{run_name}/videos/`, TensorBoard and (with --track) wandb"""
    video_episodes: int = 1
    """episodes recorded per evaluation with `--capture-video` (the first of its deterministic episodes)"""
    progress_bar: bool = True
    """show a progress bar with steps, SPS and the latest win rate"""
    torch_threads: int = 0
    """CPU threads for torch; 0 keeps torch's default (all cores). Use 1 when several runs share a machine"""

    map: str = "2s3z"
    """SMAC map (SMAX: 2s3z, 3s5z, 6h_vs_8z, smacv2_10_units, ...; SMACv2: protoss_5_vs_5, ...)"""
    env_backend: Literal["auto", "smax", "smac", "smacv2"] = "auto"
    """auto: the real game when installed, else SMAX (JaxMARL)"""
    total_timesteps: int = 1_000_000
    """total environment steps of the experiment (table E.5 sets it for the maps it lists, unless given)"""
    num_envs: int = 128
    """the number of parallel environments (SMAX: one jitted call steps them all, so use many)"""
    num_steps: int = 25
    """steps per environment per rollout (128 x 25 = 3,200, the paper's batch)"""

    sharing: Literal["full", "partial", "none"] = "full"
    """parameter sharing: full (one network), partial (actor: shared trunk, per-agent last layer; shared critic), none"""
    actor: Literal["rnn", "mlp"] = "rnn"
    """actor network: GRU after two ReLU layers, or an MLP (table E.5 sets it for the maps it lists, unless given)"""
    hidden_size: int = 64
    """width of every hidden layer and of the GRU"""
    learning_rate: float = 5e-4
    """the learning rate of the actor optimizer"""
    critic_learning_rate: float = 5e-4
    """the learning rate of the critic optimizer"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 1
    """the number of mini-batches (split over environments; whole sequences for the GRU)"""
    update_epochs: int = 5
    """epochs of each of the two FP3O steps"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient (also clips the value function; table E.5 sets it for its maps, unless given)"""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 1.0
    """coefficient of the value function"""
    huber_delta: float = 10.0
    """delta of the critic's Huber loss"""
    max_grad_norm: float = 10.0
    """the maximum norm for the gradient clipping"""

    double_clip: bool = False
    """use the double-clip objective (eq. D.10)"""
    inner_clip_coef: float = 0.2
    """eps2 of eq. D.10: clip of the other agents' joint intermediate ratio"""
    no_dependent_step: tyro.conf.FlagCreatePairsOff[bool] = False  # one flag, no --no-no- twin
    """ablation (F.5): run the independent step only (then FP3O reduces to PPO-clip per agent)"""
    no_condition: tyro.conf.FlagCreatePairsOff[bool] = False
    """ablation: always run the dependent step, ignoring the condition of Algorithm 1 line 7"""
    condition_slack: float = 1e-5
    """the dependent step runs when S1 >= S2 - slack"""
    advantage_split: Literal["average", "random"] = "average"
    """how the advantage is split over agents (F.4): average, A/n, a no-op (the per-agent standardisation undoes it);
    random, Dirichlet weights drawn per sample, which do change the update"""


# Table E.5 of the FP3O paper: per map the PPO clip, the actor network and the steps under full / partial / none sharing
# (None: not in the paper). For the chosen map they replace Args' defaults, except where the command line gives the flag.
PAPER_MAP_SETTINGS = {
    "bane_vs_bane": (0.2, "rnn", (2_000_000, 2_000_000, 2_000_000)),
    "2c_vs_64zg": (0.2, "rnn", (5_000_000, 5_000_000, 5_000_000)),
    "3s5z": (0.2, "rnn", (5_000_000, 5_000_000, 5_000_000)),
    "5m_vs_6m": (0.05, "rnn", (8_000_000, 10_000_000, 10_000_000)),
    "corridor": (0.2, "mlp", (8_000_000, 10_000_000, 10_000_000)),
    "6h_vs_8z": (0.2, "mlp", (10_000_000, 15_000_000, 20_000_000)),
    "10m_vs_11m": (0.2, "rnn", (8_000_000, None, None)),
    "3s5z_vs_3s6z": (0.05, "rnn", (12_000_000, None, None)),
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


def apply_paper_settings(args: Args, given: set) -> dict:
    """Set table E.5's values for args.map and args.sharing on `args`, except the `given` flags; returns them."""
    clip_coef, actor, steps = PAPER_MAP_SETTINGS.get(args.map, (None, None, (None, None, None)))
    table = dict(clip_coef=clip_coef, actor=actor, total_timesteps=steps[("full", "partial", "none").index(args.sharing)])
    used = {name: value for name, value in table.items() if value is not None and name not in given}
    for name, value in used.items():
        setattr(args, name, value)
    return used


def fail(message: str):
    """One clear line on stderr and a non-zero exit, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_args(args: Args):
    """Settings that cannot train: one `error:` line (exit status 2) before anything starts."""
    for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "hidden_size", "eval_episodes", "video_episodes",
                 "checkpoint_interval", "learning_rate", "critic_learning_rate", "clip_coef", "max_grad_norm"):
        if not getattr(args, name) > 0:  # NaN too
            fail(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if not (0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1):
        fail(f"--gamma ({args.gamma}) and --gae-lambda ({args.gae_lambda}) must lie in [0, 1]")
    if args.num_envs % args.num_minibatches:
        fail(f"--num-envs ({args.num_envs}) must be divisible by --num-minibatches ({args.num_minibatches})")
    if args.total_timesteps < args.num_envs * args.num_steps:
        fail(f"--total-timesteps ({args.total_timesteps}) is less than one iteration, --num-envs x --num-steps")
    if args.video_episodes > args.eval_episodes:
        fail(f"--video-episodes ({args.video_episodes}) must not exceed --eval-episodes ({args.eval_episodes})")
    if args.capture_video and not (importable("imageio_ffmpeg") and importable("moviepy")):
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
        if all(n.split(".")[0] in ("numpy", "jaxmarl") for n in names):
            fail(f"'{path}' is an older version's checkpoint (pickled numpy and jaxmarl objects, unsafe to load): train again"
                 f", or if you trust it convert it and --resume {path}.new: python -c \"import jax,runpy,torch as t; c=t.load("
                 f"{path!r},weights_only=False); c['env_state']=jax.tree.leaves(c['env_state']); t.save(runpy.run_path("
                 f"{os.path.abspath(__file__)!r})['plain'](c),{path + '.new'!r})\"")
        fail(f"'{path}' holds pickled objects that loading would run as code ({', '.join(names)}): refused unopened")
    if not (isinstance(ckpt, dict) and set(ckpt.get("args", ())) <= set(Args.__dataclass_fields__)):
        fail(f"'{path}' is not a checkpoint of {os.path.basename(__file__)} (--save-model writes one)")
    fields = ("args run_name actor global_step iteration win_rate critic actor_opt critic_opt value_norm env_state next h "
              "start rng.torch rng.numpy rng.python").split()[: 4 if eval_only else None]  # --eval-only reads the first four
    if missing := [k for k in fields if k.split(".")[-1] not in (ckpt.get("rng", {}) if "." in k else ckpt)]:
        fail(f"the checkpoint '{path}' lacks {', '.join(missing)}: damaged, or not one that --save-model wrote")
    return ckpt


def plain(x):
    """x with its numpy arrays as tensors (unsigned ones as int64), in lists, tuples and dicts: what checkpoints hold."""
    if isinstance(x, (list, tuple, dict)):
        return {k: plain(v) for k, v in x.items()} if isinstance(x, dict) else type(x)(map(plain, x))
    return torch.from_numpy(x.astype(np.int64 if x.dtype.kind == "u" else x.dtype)) if isinstance(x, np.ndarray) else x


# Environments. Every backend: reset(seed) -> dict(obs [E,N,O], state [E,N,S], avail [E,N,A], active [E,N]);
# step(actions [E,N]) -> the same plus reward, terminated, truncated, first [E] (the obs starts an episode: the last one
# finished, or a crashed game was restarted) and, where an episode finished (`done`), its ep_return, ep_length, ep_won.
# Dead agents keep `active` 0 and may only take the idle action.
ENV_KEYS = ("obs", "state", "avail", "active", "reward", "terminated", "ep_return", "ep_length", "ep_won")
SMACV2_RACES = {"protoss": (["stalker", "zealot", "colossus"], ["colossus"]),  # smacv2's configs/sc2_gen_*.yaml
                "terran": (["marine", "marauder", "medivac"], ["medivac"]),
                "zerg": (["zergling", "hydralisk", "baneling"], ["baneling"])}
SMACV2_SIZES = [(5, 5), (10, 10), (10, 11), (20, 20), (20, 23)]
SMACV2_SCENARIOS = [f"{r}_{a}_vs_{e}" for r in SMACV2_RACES for a, e in SMACV2_SIZES]


def sc2_path() -> Optional[str]:
    path = os.environ.get("SC2PATH", os.path.expanduser("~/StarCraftII"))
    return path if os.path.isdir(os.path.join(path, "Versions")) else None


def sc2_build() -> Optional[str]:
    builds = sorted(glob.glob(os.path.join(path, "Versions", "Base*"))) if (path := sc2_path()) else []
    return os.path.basename(builds[-1])[4:] if builds else None


def importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


def choose_backend(requested: str, map_name: str) -> str:
    if requested != "auto":
        return requested
    real_game = "smacv2" if map_name in SMACV2_SCENARIOS else "smac"
    return real_game if sc2_path() and importable(f"{real_game}.env") else "smax"


def import_smax():
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # jaxmarl prints on import (and swaps sys.stdout): silence file descriptor 1
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # jax takes GPU memory as needed, sharing it with torch
    try:
        import jax
        from jaxmarl.environments import smax
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved), os.close(devnull)
    return jax, smax


class SmaxEnvs:
    """JaxMARL's HeuristicEnemySMAX, all envs in one jitted vmapped step that also auto-resets and
    stacks arrays; they reach torch through DLPack without copies (read-only: never write into them).
    state[i] = concat(world state, obs of agent i): the agent-specific global state."""

    def __init__(self, map_name: str, num_envs: int, device: torch.device):
        jax, smax = import_smax()
        jnp, self.jax, self.device, self.num_envs = jax.numpy, jax, device, num_envs
        self.env = env = smax.HeuristicEnemySMAX(scenario=smax.map_name_to_scenario(map_name))
        self.n_agents, self.n_actions, self.idle_action = env.num_agents, env.num_ally_actions, 4
        self.obs_dim, self.state_dim, names = env.obs_size, env.state_size + env.obs_size, env.agents
        # a carry without weak types: reset, step and a resumed carry all match the step's one compilation
        strong = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, x.dtype), tree)

        def pack(obs, st):
            o = jnp.stack([obs[a] for a in names])
            s = jnp.concatenate([jnp.broadcast_to(obs["world_state"], (len(names), env.state_size)), o], -1)
            avail = jnp.stack(list(env.get_avail_actions(st).values())).astype(jnp.bool_)
            return o, s, avail, st.state.unit_alive[: env.num_agents]

        def reset_one(key):
            key, k = jax.random.split(key)
            obs, st = env.reset(k)
            return strong((key, st, jnp.float32(0), jnp.int32(0))), pack(obs, st)

        def step_one(carry, action):
            key, st, ep_ret, ep_len = carry
            key, k_step, k_reset = jax.random.split(key, 3)
            obs, st, rew, dones, _ = env.step_env(k_step, st, {a: action[i] for i, a in enumerate(names)})
            done, alive = dones["__all__"], st.state.unit_alive
            won = done & ~alive[env.num_agents :].any() & alive[: env.num_agents].any()
            ep_ret, ep_len = ep_ret + rew[names[0]], ep_len + 1
            obs_re, st_re = env.reset(k_reset)
            st = jax.tree.map(lambda x, y: jnp.where(done, x, y), st_re, st)
            obs = jax.tree.map(lambda x, y: jnp.where(done, x, y), obs_re, obs)
            out = (*pack(obs, st), rew[names[0]], done, ep_ret, ep_len, won)
            return strong((key, st, jnp.where(done, 0.0, ep_ret), jnp.where(done, 0, ep_len))), out

        self._reset = jax.jit(jax.vmap(reset_one))
        self._step = jax.jit(jax.vmap(step_one))

    def _torch(self, x):
        return torch.from_dlpack(x).to(self.device)

    def reset(self, seed: int):
        keys = self.jax.random.split(self.jax.random.PRNGKey(seed), self.num_envs)
        self.carry, (o, s, avail, active) = self._reset(keys)
        return dict(obs=self._torch(o), state=self._torch(s), avail=self._torch(avail), active=self._torch(active))

    def step(self, actions: torch.Tensor):
        acts = self.jax.numpy.asarray(actions.to(torch.int32).cpu().numpy())  # uncommitted, like the carry: one compilation
        self.carry, out = self._step(self.carry, acts)
        res = {k: self._torch(v) for k, v in zip(ENV_KEYS, out, strict=True)}
        res["truncated"] = torch.zeros_like(res["terminated"])  # a battle's time limit is terminal
        res["done"] = res["first"] = res["terminated"]
        return res

    def render(self, i: int) -> np.ndarray:
        """Env i as an RGB frame [H, W, 3]: allies blue, enemies red, a disc per living unit (its type's size and letter,
        faded as it loses health), a line from each unit that attacked in the last step to its target."""
        import matplotlib.pyplot as plt

        env, s = self.env, self.jax.tree.map(lambda x: np.asarray(x[i]), self.carry[1].state)
        alive = s.unit_positions[s.unit_alive.astype(bool)]
        centre, half = (alive.min(0) + alive.max(0)) / 2, max(np.ptp(alive, 0).max() / 2 + 2, 8)  # the view follows the fight
        fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
        ax.set(xlim=centre[0] + (-half, half), ylim=centre[1] + (-half, half), xticks=[], yticks=[], title=f"step {s.step}")
        health = s.unit_health / np.asarray(env.unit_type_health)[s.unit_types]
        for u in np.flatnonzero(s.unit_alive):
            ally, (x, y), kind = u < env.num_allies, s.unit_positions[u], s.unit_types[u]
            color, alpha = "C0" if ally else "C3", 0.3 + 0.7 * health[u]
            ax.add_patch(plt.Circle((x, y), env.unit_type_radiuses[kind], color=color, alpha=alpha))
            ax.text(x, y, env.unit_type_shorthands[kind], ha="center", va="center", fontsize=7)
            a = int(s.prev_attack_actions[u]) - env.num_movement_actions  # the target, counted from the other team's side
            if a >= 0:
                tx, ty = s.unit_positions[env.num_allies + a if ally else env.num_allies - 1 - a]
                ax.plot([x, tx], [y, ty], "k", lw=0.6)
        fig.canvas.draw()
        frame = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        plt.close(fig)
        return frame

    def get_state(self):  # for exact resume: the carry's leaves as tensors, its structure comes from a fresh reset
        return plain(self.jax.device_get(self.jax.tree.leaves(self.carry)))

    def set_state(self, leaves):
        fresh, tree = self.jax.tree.flatten(self.carry)
        self.carry = tree.unflatten([self.jax.numpy.asarray(x.numpy(), y.dtype) for x, y in zip(leaves, fresh, strict=True)])

    def close(self):
        pass


def make_sc2_env(backend: str, map_name: str, seed: int, replay_dir: str = ""):
    """One StarCraft II game: SMAC's StarCraft2Env, or smacv2's capability wrapper; save_replay() writes to replay_dir."""
    if backend == "smac":
        from smac.env import StarCraft2Env

        return StarCraft2Env(map_name=map_name, seed=seed, replay_dir=replay_dir)
    from smacv2.env.starcraft2.wrapper import StarCraftCapabilityEnvWrapper

    race, sizes = map_name.split("_", 1)
    n_units, n_enemies = (int(x) for x in sizes.split("_vs_"))
    unit_types, exceptions = SMACV2_RACES[race]
    team_gen = dict(dist_type="weighted_teams", unit_types=unit_types, weights=[0.45, 0.45, 0.1],
                    exception_unit_types=exceptions, observe=True)
    start = dict(dist_type="surrounded_and_reflect", p=0.5, n_enemies=n_enemies, map_x=32, map_y=32)
    return StarCraftCapabilityEnvWrapper(
        capability_config=dict(n_units=n_units, n_enemies=n_enemies, team_gen=team_gen, start_positions=start),
        map_name=f"10gen_{race}", seed=seed, replay_dir=replay_dir, obs_own_pos=True, conic_fov=False, use_unit_ranges=True,
        min_attack_range=2,
    )  # fmt: skip


def _sc2_worker(remote, env_fn):
    """Runs one game in its own process; answers 'reset' and 'step' with the ENV_KEYS values, 'save_replay' with None."""
    env, ep_return, ep_length = env_fn(), 0.0, 0
    while True:
        cmd, data = remote.recv()
        if cmd == "close":
            env.close()
            return remote.close()
        if cmd == "save_replay":  # SMAC's save_replay(): a replay of the game's episodes so far, into its replay_dir
            remote.send(env.save_replay())
            continue
        info, reward, done = {}, 0.0, False
        if cmd == "step":
            reward, done, info = env.step(data)
            ep_return, ep_length = ep_return + reward, ep_length + 1
        out = (ep_return, ep_length, bool(info.get("battle_won", False)))
        if cmd == "reset" or done:
            env.reset()
            ep_return, ep_length = 0.0, 0
        obs, avail = np.stack(env.get_obs()).astype(np.float32), np.stack(env.get_avail_actions()).astype(bool)
        st = np.asarray(env.get_state(), np.float32)
        state = np.concatenate([np.broadcast_to(st, (len(obs), st.size)), obs], -1)  # agent-specific global state
        active = ~(avail[:, 0] & (avail.sum(-1) == 1))  # a dead unit's only action is no-op
        remote.send((obs, state, avail, active, np.float32(reward), done, *out))


class SC2Envs:
    """Several StarCraft II games in parallel processes; a crashed game is restarted (its episode is
    dropped). `env_fn(index)` builds one game: make_sc2_env for the real game, a stand-in in tests."""

    def __init__(self, env_fn, num_envs: int, device: torch.device):
        self.env_fn, self.device, self.num_envs = env_fn, device, num_envs
        self.ctx = mp.get_context("fork")
        self.workers = [self._start(i) for i in range(num_envs)]
        info = env_fn(-1).get_env_info()  # a probe: no game is launched before reset
        self.n_agents, self.n_actions, self.idle_action = info["n_agents"], info["n_actions"], 0
        self.obs_dim, self.state_dim = info["obs_shape"], info["state_shape"] + info["obs_shape"]

    def _start(self, i):
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_sc2_worker, args=(child, lambda: self.env_fn(i)), daemon=True)
        proc.start()
        child.close()
        return parent, proc

    def _call(self, i, cmd, data=None):
        """Send one command to game i and wait; restart the game once when its process has died."""
        for _ in range(2):
            try:
                self.workers[i][0].send((cmd, data))
                return self.workers[i][0].recv()
            except (EOFError, BrokenPipeError, ConnectionResetError):
                print(f"StarCraft II game {i} crashed; restarting it", file=sys.stderr)
                self.workers[i][1].kill()
                self.workers[i] = self._start(i)
                cmd, data = "reset", None
        raise RuntimeError(f"StarCraft II game {i} crashed twice in a row")

    def _gather(self, results, crashed=False):
        columns = zip(ENV_KEYS, zip(*results, strict=True), strict=True)
        out = {k: torch.as_tensor(np.stack(v), device=self.device) for k, v in columns}
        out["truncated"] = torch.zeros_like(out["terminated"])  # a battle's time limit is terminal, as in SMAC
        crashed = torch.as_tensor(crashed, device=self.device)  # a restarted game: its episode is cut, not finished
        out["done"], out["first"] = out["terminated"] & ~crashed, out["terminated"] | crashed
        return out

    def reset(self, seed: int):
        return self._gather([self._call(i, "reset") for i in range(self.num_envs)])

    def step(self, actions: torch.Tensor):
        acts, crashed, results = actions.cpu().numpy(), np.zeros(self.num_envs, bool), []
        for i in range(self.num_envs):
            try:
                self.workers[i][0].send(("step", acts[i]))
            except (BrokenPipeError, ConnectionResetError):  # the game died while the learner was busy
                crashed[i] = True
        for i in range(self.num_envs):
            try:
                results.append(self._call(i, "reset") if crashed[i] else self.workers[i][0].recv())
            except (EOFError, ConnectionResetError):
                results.append(self._call(i, "reset"))
                crashed[i] = True
        return self._gather(results, crashed)

    def save_replay(self, games: int):
        """StarCraft II replays of the first `games` games (make_sc2_env's replay_dir)."""
        for i in range(games):
            self._call(i, "save_replay")

    def get_state(self):
        return None  # a running game cannot be saved: a resumed run starts fresh episodes

    def close(self):
        for remote, proc in self.workers:
            with contextlib.suppress(Exception):
                remote.send(("close", None))
            proc.join(timeout=5)


def make_envs(backend: str, map_name: str, num_envs: int, seed: int, device: torch.device, replay_dir: str = ""):
    if backend == "smax":
        maps = sorted(import_smax()[1].smax_env.MAP_NAME_TO_SCENARIO)
        if map_name not in maps:
            fail(f"SMAX has no map '{map_name}'. SMAX maps: {', '.join(maps)}")
        return SmaxEnvs(map_name, num_envs, device)
    module = {"smac": "smac.env", "smacv2": "smacv2.env"}[backend]
    if not importable(module):
        fail(f"--env-backend {backend} needs the '{backend}' package and StarCraft II (see README), or use smax")
    if not sc2_path():
        fail(f"StarCraft II not found (set SC2PATH); --env-backend {backend} needs it, or use smax")
    if backend == "smacv2" and map_name not in SMACV2_SCENARIOS:
        fail(f"smacv2 has no scenario '{map_name}'. Scenarios: {', '.join(SMACV2_SCENARIOS)}")
    if backend == "smac":
        from smac.env.starcraft2.maps import smac_maps

        maps = sorted(smac_maps.get_smac_map_registry())
        if map_name not in maps:
            fail(f"SMAC has no map '{map_name}'. SMAC maps: {', '.join(maps)}")
    return SC2Envs(lambda i: make_sc2_env(backend, map_name, seed + max(i, 0), replay_dir), num_envs, device)


# Networks: every layer is an AgentLinear with weights [copies, in, out] applied to [N, batch, in]
# in one batched matmul; copies = 1 shares the layer, copies = N gives each agent its own.
class AgentLinear(nn.Module):
    def __init__(self, copies: int, n_in: int, n_out: int, gain: float = np.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(copies, n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(copies, 1, n_out))
        for i in range(copies):  # orthogonal init of each copy, as in MAPPO
            nn.init.orthogonal_(self.weight.data[i].T, gain)

    def forward(self, x):  # x: [N, B, in] -> [N, B, out]
        return torch.baddbmm(self.bias, x, self.weight) if self.weight.shape[0] > 1 else x @ self.weight[0] + self.bias[0]


class AgentGRU(nn.Module):
    """A GRU cell made of AgentLinear layers (same equations as torch.nn.GRUCell)."""

    def __init__(self, copies: int, n_in: int, hidden: int):
        super().__init__()
        self.x2h, self.h2h = AgentLinear(copies, n_in, 3 * hidden, 1.0), AgentLinear(copies, hidden, 3 * hidden, 1.0)

    def forward(self, gx, h):  # gx = self.x2h(x), precomputed for whole sequences
        xr, xz, xn = gx.chunk(3, -1)
        hr, hz, hn = self.h2h(h).chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        return (1 - z) * torch.tanh(xn + r * hn) + z * h


def layer_copies(sharing: str, n_agents: int):
    """(trunk copies, last-layer copies) for a sharing mode (FP3O appendix E.3)."""
    return {"full": (1, 1), "partial": (1, n_agents), "none": (n_agents, n_agents)}[sharing]


class AgentNet(nn.Module):
    """Actor (GRU or MLP, categorical head) or critic (MLP, value head). When the trunk is shared (full
    and partial sharing) a one-hot agent id is appended to the input, as SMAC's obs_agent_id does."""

    def __init__(self, n_agents, n_in, n_out, hidden, sharing, recurrent=False, out_gain=0.01):
        super().__init__()
        trunk, head = layer_copies(sharing, n_agents)
        self.n_agents, self.agent_id, self.hidden = n_agents, trunk == 1, hidden
        n_in += n_agents if self.agent_id else 0
        self.fc1, self.fc2 = AgentLinear(trunk, n_in, hidden), AgentLinear(trunk, hidden, hidden)
        self.gru = AgentGRU(trunk, hidden, hidden) if recurrent else None
        self.head = AgentLinear(head, hidden, n_out, out_gain)

    def forward(self, x, h=None, starts=None):
        """x [T, N, B, in] (agents second), h [N, B, H], starts [T, B]: 1 where an episode begins
        (the GRU state is reset there). Returns [T, N, B, out] and the last hidden state."""
        T, N, B, _ = x.shape
        x = x.transpose(0, 1).reshape(N, T * B, -1)
        if self.agent_id:
            x = torch.cat([x, torch.eye(N, device=x.device)[:, None].expand(N, T * B, N)], -1)
        x = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        if self.gru is not None:
            outs, keep = [], (1 - starts).view(T, 1, B, 1).unbind(0)
            for t, gx in enumerate(self.gru.x2h(x).view(N, T, B, -1).unbind(1)):  # unbind: cheap backward
                h = self.gru(gx, h * keep[t])
                outs.append(h)
            x = torch.stack(outs, 1).view(N, T * B, -1)
        return self.head(x).view(N, T, B, -1).transpose(0, 1), h


def masked_logits(logits, avail):
    return logits.masked_fill(~avail, -1e10)  # unavailable actions: logit -1e10


def evaluate_actions(actor, obs, avail, actions, h0, starts):
    """Log-probabilities and entropies of stored actions under the current actor, [T, N, B]."""
    logits, _ = actor(obs, h0, starts)
    dist = torch.distributions.Categorical(logits=masked_logits(logits, avail), validate_args=False)  # checks cost ~5%
    return dist.log_prob(actions), dist.entropy()


class ValueNorm(nn.Module):
    """Running mean / variance of the returns with decay beta and bias correction (MAPPO's ValueNorm)."""

    def __init__(self, beta: float = 0.99999, eps: float = 1e-5):
        super().__init__()
        self.beta, self.eps = beta, eps
        for name in ("mean", "mean_sq", "debias"):
            self.register_buffer(name, torch.zeros((), dtype=torch.float64))

    def update(self, x):
        x = x.double()
        self.mean.mul_(self.beta).add_(x.mean() * (1 - self.beta))
        self.mean_sq.mul_(self.beta).add_((x**2).mean() * (1 - self.beta))
        self.debias.mul_(self.beta).add_(1 - self.beta)

    def stats(self):
        mean = self.mean / self.debias.clamp(min=self.eps)
        var = (self.mean_sq / self.debias.clamp(min=self.eps) - mean**2).clamp(min=1e-2)
        return mean.float(), var.sqrt().float()

    def normalize(self, x):
        return (x - self.stats()[0]) / self.stats()[1]

    def denormalize(self, x):
        return x * self.stats()[1] + self.stats()[0]


# Algorithm pieces
def compute_gae(rewards, values, dones, next_value, next_done, gamma, lam):
    """GAE (Schulman et al. 2016). rewards/dones [T, B...] with dones[t] = 1 when the obs at t starts
    a new episode; values [T, B...] de-normalised. Returns (advantages, returns)."""
    adv, last = torch.zeros_like(values), 0.0
    for t in reversed(range(values.shape[0])):
        nonterminal = 1.0 - (next_done if t == values.shape[0] - 1 else dones[t + 1])
        nv = next_value if t == values.shape[0] - 1 else values[t + 1]
        delta = rewards[t] + gamma * nv * nonterminal - values[t]
        adv[t] = last = delta + gamma * lam * nonterminal * last
    return adv, adv + values


def standardize_per_agent(adv, active):
    """Standardise each agent's advantages over its active (alive) samples; adv/active [T, N, B]."""
    n = active.sum((0, 2), keepdim=True).clamp(min=1)
    mean = (adv * active).sum((0, 2), keepdim=True) / n
    var = (((adv - mean) * active) ** 2).sum((0, 2), keepdim=True) / n
    return (adv - mean) / (var.sqrt() + 1e-8)


def pipeline_partners(n_agents: int, generator=None):
    """Non-overlapping selection (eq. 9, appendix E.3): a random permutation i_1..i_n and its cyclic left shift j_p =
    i_{p+1}, f(i_p) = j_p. Returns partner[i] = f^-1(i), the agent whose pipeline hands i its dependent step."""
    perm = torch.randperm(n_agents, generator=generator)
    partner = torch.empty(n_agents, dtype=torch.long)
    partner[perm.roll(-1)] = perm  # f^-1(j_p) = i_p
    return partner


def fp3o_factors(rho, partner):
    """rho [T, N, B] fixed intermediate ratios pi_{k+0.5}/pi_k. Returns, for every agent i with
    partner j = f^-1(i): factor_ij = prod_{m not in {i, j}} rho^m and factor_j = rho^j (listing B.3)."""
    log_rho, partner = rho.log(), partner.to(rho.device)
    has_partner = (partner != torch.arange(rho.shape[1], device=rho.device)).float().view(1, -1, 1)  # j != i (n > 1)
    others = log_rho.sum(1, keepdim=True) - log_rho - has_partner * log_rho[:, partner]
    return others.exp(), rho[:, partner]


def fp3o_objective(ratio, adv, factor_ij, factor_j, clip_coef):
    """FP3O's main objective (section 3.4 / listing B.3), per sample, to be maximised:
    min((r^i * factor_ij - 1) * factor_j * A^i, (clip(r^i, 1 +- eps) * factor_ij - 1) * factor_j * A^i).
    With factors 1 (independent step) it is PPO-clip minus A, which has PPO-clip's gradient (D.6)."""
    surr1 = (ratio * factor_ij - 1) * factor_j * adv
    surr2 = (torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef) * factor_ij - 1) * factor_j * adv
    return torch.min(surr1, surr2)


def fp3o_double_clip_objective(ratio, adv, rho_others, rho_j, clip_coef, inner_clip_coef):
    """Double-clip variant (eq. D.10): g = clip(prod_{m != i} rho^m, 1 +- eps2),
    min((r^i * g - rho^j) * A^i, (clip(r^i, 1 +- eps1) * g - rho^j) * A^i)."""
    g = torch.clamp(rho_others, 1 - inner_clip_coef, 1 + inner_clip_coef)
    surr1 = (ratio * g - rho_j) * adv
    surr2 = (torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef) * g - rho_j) * adv
    return torch.min(surr1, surr2)


def fp3o_condition(rho, adv, active, slack=1e-5):
    """Algorithm 1 line 7 with the intermediate policies, sum_i mu(pi_{k+0.5}^{-i}) >= sum_i mu(pi_k^{-i}), by importance
    sampling over the rollout: S1 = sum_i sum_t A^i prod_m rho^m, S2 = sum_i sum_t A^i rho^i. Returns (holds, S1, S2)."""
    joint = rho.prod(1, keepdim=True)
    s1, s2 = (adv * joint * active).sum(), (adv * rho * active).sum()
    return bool(s1 >= s2 - slack), s1.item(), s2.item()


def fp3o_constraint(rho, ratio_new, adv, active, slack=1e-5):
    """The true constraint of eq. 11 after the dependent step: S1' = sum_i sum_t A^i rho^i
    prod_{m != i} r_{k+1}^m against S2 (for the paper's 'matching degree', Figure 1)."""
    log_new = ratio_new.log()
    others_new = (log_new.sum(1, keepdim=True) - log_new).exp()
    s1, s2 = (adv * rho * others_new * active).sum(), (adv * rho * active).sum()
    return bool(s1 >= s2 - slack)


def loss_weights(active, per_agent: bool):
    """Per-sample loss weights [T, N, B]: the mean over active (alive) samples; with `per_agent` (--sharing none,
    N separate networks) each agent's own mean, summed over agents: every network gets the gradient it would alone."""
    return active / (active.sum((0, 2), keepdim=True) if per_agent else active.sum()).clamp(min=1)


def clip_grad_norm(net, max_norm: float, per_agent: bool):
    """torch's clip_grad_norm_ on the whole network, or (--sharing none) on each agent's own copy of it."""
    grads = [p.grad for p in net.parameters()]
    norm = sum(g.pow(2).flatten(1).sum(1) if per_agent else g.pow(2).sum() for g in grads).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *[1] * (g.dim() - 1)) if per_agent else scale)


def value_loss_fn(new_values, old_values, returns_n, weights, clip_coef, delta):
    """Huber loss on normalised returns with value clipping (MAPPO), weighted as `loss_weights` says."""
    clipped = old_values + (new_values - old_values).clamp(-clip_coef, clip_coef)
    huber = lambda v: torch.nn.functional.huber_loss(v, returns_n, reduction="none", delta=delta)
    return (torch.max(huber(new_values), huber(clipped)) * weights).sum()


@torch.no_grad()
def rollout(actor, critic, envs, nxt, h, start, num_steps):
    """`num_steps` steps of every environment under pi_k from `nxt` (the envs' last output), the GRU state h [N, E, H] and
    start [E] (1 where the obs starts an episode). Returns (buf: the rollout, agents second [T, N, E, ...]: obs, state,
    avail, active, actions, logp (log pi_k), values (normalised V), starts [T, E] and h0, the GRU state it began with;
    rewards [T, E]; the envs' output, h and start after it; the returns and wins of the episodes that ended in it)."""
    N, E, T, device = envs.n_agents, envs.num_envs, num_steps, h.device
    zeros = lambda *shape, dtype=torch.float32: torch.zeros(T, *shape, dtype=dtype, device=device)
    buf = dict(obs=zeros(N, E, envs.obs_dim), state=zeros(N, E, envs.state_dim), actions=zeros(N, E, dtype=torch.long),
               avail=zeros(N, E, envs.n_actions, dtype=torch.bool), logp=zeros(N, E), values=zeros(N, E), active=zeros(N, E),
               starts=zeros(E), h0=h.clone())
    rewards, ep_returns, ep_wins = zeros(E), [], []
    for t in range(T):
        for k in ("obs", "state", "avail", "active"):
            buf[k][t] = nxt[k].transpose(0, 1)
        buf["starts"][t] = start
        logits, h = actor(buf["obs"][t : t + 1], h, start[None])
        dist = torch.distributions.Categorical(logits=masked_logits(logits[0], buf["avail"][t]))
        action = dist.sample()
        buf["actions"][t], buf["logp"][t] = action, dist.log_prob(action)
        buf["values"][t] = critic(buf["state"][t : t + 1])[0][0, ..., 0]
        nxt = envs.step(action.T)
        rewards[t], start = nxt["reward"], nxt["first"].float()  # GAE and the GRU stop at episode starts
        if nxt["done"].any():
            ep_returns.append(nxt["ep_return"][nxt["done"]])
            ep_wins.append(nxt["ep_won"][nxt["done"]])
    return buf, rewards, nxt, h, start, ep_returns, ep_wins


@torch.no_grad()
def rollout_batch(buf, rewards, critic, value_norm, nxt, start, args):
    """The update's batch from rollout(): buf's fields, "adv" (A^i: GAE of the team reward on agent i's de-normalised
    V(s, o^i), bootstrapped from the next state's, cut where `start` begins an episode, split over agents (F.4), standardised
    per agent over its active samples) and "returns_n" (normalised after value_norm takes in the active ones)."""
    T, N, E = buf["logp"].shape
    next_value = critic(nxt["state"].transpose(0, 1)[None])[0][0, ..., 0]
    values_d, next_value_d = value_norm.denormalize(buf["values"]), value_norm.denormalize(next_value)
    adv, returns = compute_gae(rewards[:, None], values_d, buf["starts"][:, None], next_value_d, start, args.gamma,
                               args.gae_lambda)
    value_norm.update(returns[buf["active"].bool()])  # before the returns of the batch are normalised
    split = torch.full((1, N, 1), 1.0 / N, device=rewards.device)  # A^i / n (average split): undone by the standardisation
    if args.advantage_split == "random":  # w^i A^i, random weights summing to 1 (F.4)
        split = torch.distributions.Dirichlet(torch.ones(E, N, device=rewards.device)).sample((T,)).transpose(1, 2)
    return {**buf, "adv": standardize_per_agent(adv * split, buf["active"]), "returns_n": value_norm.normalize(returns)}


def fp3o_step(actor, critic, opts, b, factors, args, double_clip=False, generator=None):
    """One FP3O step (independent or dependent): `update_epochs` epochs of minibatches split over
    environments; actor and critic both train on every minibatch. `factors` = (factor_ij, factor_j)
    as [T, N, B] tensors (all ones for the independent step), or (rho_others, rho_j) for double clip."""
    B, per_agent, stats = b["obs"].shape[2], args.sharing == "none", []
    for _ in range(args.update_epochs):
        mbs = torch.randperm(B, generator=generator).chunk(args.num_minibatches) if args.num_minibatches > 1 else [slice(None)]
        for mb in mbs:  # one minibatch: no gather
            m = {k: v[:, :, mb] if v.dim() >= 3 else v[:, mb] for k, v in b.items() if k != "h0"}
            logp, entropy = evaluate_actions(actor, m["obs"], m["avail"], m["actions"], b["h0"][:, mb], m["starts"])
            ratio = (logp - m["logp"]).exp()
            f1, f2 = factors[0][:, :, mb], factors[1][:, :, mb]
            if double_clip:
                obj = fp3o_double_clip_objective(ratio, m["adv"], f1, f2, args.clip_coef, args.inner_clip_coef)
            else:
                obj = fp3o_objective(ratio, m["adv"], f1, f2, args.clip_coef)
            act, w = m["active"], loss_weights(m["active"], per_agent)
            pg_loss, ent = -(obj * w).sum(), (entropy * w).sum()
            new_values = critic(m["state"])[0].squeeze(-1)
            v_loss = value_loss_fn(new_values, m["values"], m["returns_n"], w, args.clip_coef, args.huber_delta)
            for opt, loss, net in ((opts[0], pg_loss - args.ent_coef * ent, actor), (opts[1], args.vf_coef * v_loss, critic)):
                opt.zero_grad(set_to_none=True)
                loss.backward()
                clip_grad_norm(net, args.max_grad_norm, per_agent)
                opt.step()
            with torch.no_grad():
                n_act = act.sum().clamp(min=1)
                kl = (((ratio - 1) - (logp - m["logp"])) * act).sum() / n_act
                clipfrac = (((ratio - 1).abs() > args.clip_coef).float() * act).sum() / n_act
            losses = torch.stack([pg_loss, v_loss, ent]).detach() / (actor.n_agents if per_agent else 1)  # agents' mean
            stats.append(torch.cat([losses, torch.stack([kl, clipfrac])]))
    return torch.stack(stats).mean(0)


def fp3o_update(actor, critic, opts, b, args, generator=None):
    """Algorithm 1, one iteration, on the rollout batch `b`; `generator` draws the pipelines and minibatches (None: torch's
    global one). Returns (the steps' mean loss stats, the diagnostics to log)."""
    ones, diag, ran = torch.ones_like(b["logp"]), {}, False
    # independent step (eq. 10): every pipeline's first agent i_p, i.e. every agent, with factors 1
    stats = fp3o_step(actor, critic, opts, b, (ones, ones), args, generator=generator)
    if not args.no_dependent_step:
        # intermediate policy pi_{k+0.5}: fixed per-sample ratios rho^i (dead agents: exactly 1)
        rho = ((rollout_logp(actor, b) - b["logp"]).exp() - 1) * b["active"] + 1
        holds, s1, s2 = fp3o_condition(rho, b["adv"], b["active"], args.condition_slack)  # Algorithm 1 line 7
        diag.update({"fp3o/condition_holds": float(holds), "fp3o/S1": s1, "fp3o/S2": s2})
        ran = holds or args.no_condition
        if ran:
            # dependent step (eq. 11): agent i's pipeline partner j = f^-1(i) from the cyclic shift
            factor_ij, factor_j = fp3o_factors(rho, pipeline_partners(rho.shape[1], generator).to(rho.device))
            factors = (factor_ij * factor_j, factor_j) if args.double_clip else (factor_ij, factor_j)  # D.10: prod_{m != i}
            stats = (stats + fp3o_step(actor, critic, opts, b, factors, args, args.double_clip, generator)) / 2
    r_new = (rollout_logp(actor, b) - b["logp"]).exp()  # pi_{k+1} / pi_k (rollout_logp runs without gradients)
    if ran:  # the matching degree (Figure 1): where the step was skipped, pi_{k+1} = pi_{k+0.5} matches by construction
        constraint = fp3o_constraint(rho, (r_new - 1) * b["active"] + 1, b["adv"], b["active"], args.condition_slack)
        diag.update({"fp3o/constraint_holds": float(constraint), "fp3o/condition_matches": float(constraint == holds)})
    kl = (((r_new - 1) - r_new.log()) * b["active"]).sum((0, 2)) / b["active"].sum((0, 2)).clamp(min=1)
    return stats, {**diag, **{f"fp3o/kl_agent{i}": v for i, v in enumerate(kl.tolist())}}


@torch.no_grad()
def rollout_logp(actor, b):
    """Log-probabilities of the whole rollout under the current actor (RNNs from the stored states)."""
    return evaluate_actions(actor, b["obs"], b["avail"], b["actions"], b["h0"], b["starts"])[0]


@torch.no_grad()
def evaluate(actor, envs, episodes, device, videos=0):
    """`episodes` deterministic (greedy) episodes on their own environments, one per env. Returns the mean return, the
    win rate and the frames of the first `videos` episodes (SMAX's render), one per state the agents act in."""
    nxt, frames = envs.reset(seed=12345), [[] for _ in range(videos)]
    h = torch.zeros(actor.n_agents, envs.num_envs, actor.hidden, device=device)
    finished = torch.zeros(envs.num_envs, dtype=torch.bool, device=device)
    returns, wins = torch.zeros(envs.num_envs, device=device), torch.zeros(envs.num_envs, device=device)
    starts = torch.zeros(1, envs.num_envs, device=device)
    while not finished.all():
        for k, video in enumerate(frames):
            video += [] if finished[k] else [envs.render(k)]
        logits, h = actor(nxt["obs"].transpose(0, 1)[None], h, starts)
        action = masked_logits(logits[0], nxt["avail"].transpose(0, 1)).argmax(-1)
        nxt = envs.step(action.T)
        new = nxt["done"] & ~finished
        returns[new], wins[new] = nxt["ep_return"][new].float(), nxt["ep_won"][new].float()
        finished |= nxt["done"]
        starts = nxt["first"].float()[None]
    return returns[:episodes].mean().item(), wins[:episodes].mean().item(), frames


def record(envs, frames, games, run_name, step, writer):
    """--capture-video: each SMAX episode's frames as runs/{run_name}/videos/{step}_{k}.mp4 (imageio's ffmpeg) and a
    TensorBoard video `videos/episode_{k}` (with --track, wandb's TensorBoard sync logs it as a wandb.Video); the real game
    saves StarCraft II replays of its first `games` games instead, into runs/{run_name}/replays/ (make_envs' replay_dir)."""
    if not frames:
        return envs.save_replay(games)
    import imageio.v2 as imageio

    os.environ.update({k: os.environ.get(k, "dummy") for k in ("SDL_AUDIODRIVER", "SDL_VIDEODRIVER")})  # add_video's moviepy
    os.makedirs(f"runs/{run_name}/videos", exist_ok=True)  # imports pygame, which would greet the sound card otherwise
    warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)  # jax's warning when ffmpeg starts: it execs at once
    for k, video in enumerate(frames):
        imageio.mimwrite(f"runs/{run_name}/videos/{step}_{k}.mp4", video, fps=8, macro_block_size=1)
        writer.add_video(f"videos/episode_{k}", torch.from_numpy(np.stack(video)).permute(0, 3, 1, 2)[None], step, fps=8)
    writer.flush()  # now: an --eval-only run exits right after


if __name__ == "__main__":
    args = parse_args()
    ckpt, given, paper = None, flags_given(sys.argv[1:]), {}
    if args.resume:
        extra = ", ".join("--" + name.replace("_", "-") for name in sorted(given - set(RESUME_FLAGS)))
        if extra:
            fail(f"--resume continues the saved run with its own settings: drop {extra} (with --resume only --eval-only, "
                 "--total-timesteps, --track, --[no-]progress-bar, --capture-video and --video-episodes apply)")
        ckpt = load_checkpoint(args.resume, args.eval_only)
        cli = {k: getattr(args, k) for k in RESUME_FLAGS if k in given or k == "resume"}
        args = Args(**{**ckpt["args"], **cli, "save_model": True})
    elif args.eval_only:
        fail("--eval-only evaluates a saved model: add --resume runs/<run>/checkpoint.pt")
    elif paper := apply_paper_settings(args, given):
        settings = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in paper.items())
        print(f"{args.map} with {args.sharing} sharing: {settings} (table E.5 of the paper; a flag given wins)")
    check_args(args)
    backend = choose_backend(args.env_backend, args.map)
    run_name = ckpt["run_name"] if ckpt else f"{args.map}__{args.exp_name}__{args.sharing}__{args.seed}__{int(time.time())}"
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.torch_threads or torch.get_num_threads())
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    envs = make_envs(backend, args.map, args.num_envs, args.seed, device)
    videos = args.video_episodes if args.capture_video and backend == "smax" else 0  # episodes drawn per evaluation
    replays = os.path.abspath(f"runs/{run_name}/replays")  # where --capture-video saves the real game's replays
    eval_envs = None
    if args.eval_interval:
        eval_envs = make_envs(backend, args.map, args.eval_episodes, args.seed + 10_000, device, replays)
    N, E, T, A = envs.n_agents, args.num_envs, args.num_steps, envs.n_actions
    print(f"{run_name}: backend {backend}, {N} agents, {A} actions, sharing {args.sharing}, device {device}")
    actor = AgentNet(N, envs.obs_dim, A, args.hidden_size, args.sharing, recurrent=args.actor == "rnn").to(device)
    critic_sharing = "full" if args.sharing == "partial" else args.sharing  # partial sharing: the actor's (E.3); shared critic
    critic = AgentNet(N, envs.state_dim, 1, args.hidden_size, critic_sharing, out_gain=1.0).to(device)
    opts = [torch.optim.Adam(actor.parameters(), lr=args.learning_rate, eps=1e-5),
            torch.optim.Adam(critic.parameters(), lr=args.critic_learning_rate, eps=1e-5)]  # fmt: skip
    value_norm = ValueNorm().to(device)
    if ckpt and args.eval_only:
        actor.load_state_dict(ckpt["actor"])
        eval_envs = make_envs(backend, args.map, args.eval_episodes, args.seed, device, replays)
        ret, win, frames = evaluate(actor, eval_envs, args.eval_episodes, device, videos)
        if args.capture_video:
            record(eval_envs, frames, args.video_episodes, run_name, ckpt["global_step"], SummaryWriter(f"runs/{run_name}"))
        print(f"eval: win_rate {win:.3f}, episodic_return {ret:.3f} over {args.eval_episodes} episodes")
        sys.exit(0)
    versions = {n: metadata.version(n) for n in "torch jax jaxmarl smac smacv2 numpy tyro".split() if importable(n)}
    config = {**asdict(args), "backend": backend, "versions": versions,
              "sc2_build": sc2_build() if backend != "smax" else None}  # fmt: skip
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=config,
                   name=run_name, id=run_name, group=f"{args.map}__{args.exp_name}__{args.sharing}", save_code=True,
                   tags=[args.exp_name, args.sharing, args.map, backend], resume="allow")
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in config.items()))
    ckpt_path = f"runs/{run_name}/checkpoint.pt"
    num_iterations = args.total_timesteps // (E * T)
    global_step, first_iteration, win_rate = 0, 1, float("nan")
    actor_steps = {"n": 0}  # actor optimiser steps so far: the x of benchmark/report.py's compute-matched curves
    opts[0].register_step_post_hook(lambda *_: actor_steps.update(n=actor_steps["n"] + 1))
    nxt = envs.reset(seed=args.seed)
    # the GRU state, and start = 1 where an episode starts
    h, start = torch.zeros(N, E, args.hidden_size, device=device), torch.ones(E, device=device)
    modules = {"actor": actor, "critic": critic, "actor_opt": opts[0], "critic_opt": opts[1], "value_norm": value_norm}
    if ckpt:
        for key, module in modules.items():
            module.load_state_dict(ckpt[key])
        global_step, first_iteration, win_rate, rng = ckpt["global_step"], ckpt["iteration"] + 1, ckpt["win_rate"], ckpt["rng"]
        actor_steps["n"] = ckpt.get("actor_steps", 0)
        if ckpt["env_state"]:  # SMAX: continue the very same episodes
            envs.set_state(ckpt["env_state"])
            nxt = {k: v.to(device) for k, v in ckpt["next"].items()}
            h, start = ckpt["h"].to(device), ckpt["start"].to(device)
        torch.set_rng_state(rng["torch"]), np.random.set_state(rng["numpy"]), random.setstate(rng["python"])
        torch.cuda.set_rng_state_all(rng["cuda"]) if rng.get("cuda") and device.type == "cuda" else None
    progress = tqdm(total=num_iterations * E * T, initial=global_step, unit="step", dynamic_ncols=True,
                    disable=not args.progress_bar)
    start_time, start_step, eval_win = time.time(), global_step, float("nan")  # eval_win: the latest evaluation's

    for iteration in range(first_iteration, num_iterations + 1):
        t0 = time.time()
        buf, rewards, nxt, h, start, ep_returns, ep_wins = rollout(actor, critic, envs, nxt, h, start, T)
        global_step += E * T
        b = rollout_batch(buf, rewards, critic, value_norm, nxt, start, args)
        rollout_time, t1 = time.time() - t0, time.time()

        # ---- FP3O update (Algorithm 1) ----
        stats, diag = fp3o_update(actor, critic, opts, b, args)
        update_time = time.time() - t1
        if not torch.isfinite(stats).all():
            kept = ckpt_path if args.save_model else "none saved: use --save-model"
            fail(f"non-finite loss at iteration {iteration}; the last good checkpoint is kept ({kept})")

        # ---- logging ----
        pg_loss, v_loss, entropy, approx_kl, clipfrac = stats.tolist()
        active = b["active"].bool()
        y_true, y_pred = b["returns_n"][active], b["values"][active]
        var_y = y_true.var()
        sps = int((global_step - start_step) / (time.time() - start_time))
        scalars = {"charts/SPS": sps, "charts/learning_rate": opts[0].param_groups[0]["lr"], "losses/policy_loss": pg_loss,
                   "losses/value_loss": v_loss, "losses/entropy": entropy, "losses/approx_kl": approx_kl,
                   "losses/clipfrac": clipfrac,
                   "losses/explained_variance": (1 - (y_true - y_pred).var() / var_y).item() if var_y > 0 else float("nan"),
                   "charts/rollout_time": rollout_time, "charts/update_time": update_time,
                   "charts/gradient_steps": actor_steps["n"], **diag}  # fmt: skip
        if ep_returns:
            rets, wins = torch.cat(ep_returns), torch.cat(ep_wins).float()
            win_rate = wins.mean().item()
            scalars.update({"charts/episodic_return": rets.mean().item(), "charts/win_rate": win_rate})
        if eval_envs is not None and (iteration % args.eval_interval == 0 or iteration == num_iterations):
            eval_return, eval_win, frames = evaluate(actor, eval_envs, args.eval_episodes, device, videos)
            if args.capture_video:
                record(eval_envs, frames, args.video_episodes, run_name, global_step, writer)
            scalars.update({"eval/episodic_return": eval_return, "eval/win_rate": eval_win})
        for k, v in scalars.items():
            writer.add_scalar(k, v, global_step)
        progress.update(E * T)
        progress.set_postfix(SPS=sps, win_rate=f"{win_rate:.2f}", refresh=False)
        if iteration == first_iteration + 2 and "total_timesteps" in paper:  # the time of table E.5's budget here
            speed = E * T / (time.time() - t0)  # this iteration's steps/s, once the first ones have compiled everything
            tqdm.write(f"at {speed:,.0f} steps/s, the {args.total_timesteps:,} steps of table E.5 take about "
                       f"{args.total_timesteps / speed / 3600:.1f} h (the progress bar keeps an estimate)")
        if args.save_model and (iteration % args.checkpoint_interval == 0 or iteration == num_iterations):
            torch.save({
                "args": asdict(args), "run_name": run_name, "iteration": iteration, "global_step": global_step,
                "win_rate": win_rate, "actor_steps": actor_steps["n"],
                **{key: module.state_dict() for key, module in modules.items()},
                "env_state": envs.get_state(), "next": {k: v.clone() for k, v in nxt.items()}, "h": h, "start": start,
                "rng": plain({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                              "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}),
            }, ckpt_path + ".tmp")  # fmt: skip
            os.replace(ckpt_path + ".tmp", ckpt_path)  # atomic: a crash while saving keeps the last checkpoint

    for closable in (progress, envs, eval_envs, writer):
        if closable is not None:
            closable.close()
    if args.track:
        wandb.finish()
    result = f"eval win rate {eval_win:.3f}" if eval_envs is not None else f"training win rate {win_rate:.3f}"
    print(f"done: {result} at step {global_step:,} after {(time.time() - start_time) / 60:.1f} min; runs/{run_name} "
          "(to look at it: tensorboard --logdir runs)")
