"""FP3O (Full-Pipeline PPO) on Multi-Agent MuJoCo (gymnasium-robotics `mamujoco_v1`), Gaussian policies.

Examples:
  python fp3o_mamujoco.py --scenario HalfCheetah --agent-conf 6x1 --total-timesteps 20000            # a short first run
  python fp3o_mamujoco.py --scenario HalfCheetah --agent-conf 6x1 --sharing partial --seed 1  # the paper's 10M steps

Paper: Feng et al., "FP3O: Enabling Proximal Policy Optimization in Multi-Agent Cooperation with Parameter-Sharing
Versatility", section 3.4, Algorithm 1, listing B.3; double clip eq. D.10; advantage split F.4; InStep-only ablation
F.5; MaMuJoCo hyperparameters tables E.2 and E.3. One iteration: roll out pi_k -> independent step (every agent,
PPO-clip) -> intermediate policy pi_{k+0.5} -> condition (Alg. 1 line 7) -> dependent step along the cyclic-shift
pipelines. gymnasium-robotics' MaMuJoCo is built on the v5 MuJoCo tasks: its returns are not comparable with those of
the mujoco-py MaMuJoCo used in the paper.
"""
import contextlib
import fcntl
import io
import math
import os
import pickle
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Literal, Optional

import gymnasium
import mujoco
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
    checkpoint_interval: int = 25
    """iterations between checkpoints when `--save-model` is on"""
    resume: Optional[str] = None
    """path of a checkpoint to continue from exactly (implies `--save-model`)"""
    eval_only: bool = False
    """with `--resume`: only evaluate the loaded model and exit"""
    eval_interval: int = 10
    """iterations between evaluations (0 disables evaluation)"""
    eval_episodes: int = 32
    """deterministic episodes (mean action) per evaluation (the paper uses 32)"""
    capture_video: bool = False
    """record evaluation episodes as videos in `runs/{run_name}/videos/`, TensorBoard and (with --track) wandb"""
    video_episodes: int = 1
    """episodes recorded per evaluation with `--capture-video` (the first of its deterministic episodes)"""
    progress_bar: bool = True
    """show a progress bar with steps, SPS and the latest return"""
    torch_threads: int = 0
    """CPU threads for torch; 0 keeps torch's default (all cores). Use 1 when several runs share a machine"""

    scenario: str = "HalfCheetah"
    """MaMuJoCo scenario: Ant, HalfCheetah, Hopper, Humanoid, Walker2d, ManySegmentSwimmer, ..."""
    agent_conf: str = "6x1"
    """agent configuration of the scenario: 6x1 (HalfCheetah), 2x3 (Walker2d), 8x2 (ManySegmentSwimmer), ..."""
    agent_obsk: int = 5
    """each agent observes the joints up to k hops from its own (the paper's 'agent observation' 5, table E.2)"""
    max_episode_steps: Optional[int] = None
    """time limit of an episode (a truncation, bootstrapped); None keeps the task's own (1000 steps)"""
    total_timesteps: int = 10_000_000
    """total environment steps of the experiment"""
    num_envs: int = 4
    """the number of parallel environments (the paper's rollout threads)"""
    num_steps: int = 1000
    """steps per environment per rollout (the paper's episode length)"""
    async_envs: bool = False
    """step the environments in subprocesses (gymnasium's AsyncVectorEnv) instead of in-process"""
    normalize_obs: bool = True
    """normalise observations and states with running mean/std statistics (saved in checkpoints)"""

    sharing: Literal["full", "partial", "none"] = "full"
    """parameter sharing: full (one network), partial (actor: shared trunk, per-agent last layer and std; shared critic),
    none"""
    hidden_size: int = 64
    """width of the two hidden ReLU layers"""
    learning_rate: float = 1e-5
    """the learning rate of the actor optimizer"""
    critic_learning_rate: float = 3e-4
    """the learning rate of the critic optimizer"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 32
    """the number of mini-batches (over all num_envs x num_steps samples)"""
    update_epochs: int = 5
    """epochs of each of the two FP3O steps"""
    clip_coef: Optional[float] = None
    """clipping coefficient of the surrogate and the value loss; None: table E.3 (0.05 on Walker2d 2x3, Hopper 3x1,
    else 0.2)"""
    ent_coef: float = 0.001
    """coefficient of the entropy"""
    vf_coef: float = 1.0
    """coefficient of the value function"""
    huber_delta: float = 10.0
    """delta of the critic's Huber loss"""
    max_grad_norm: float = 10.0
    """the maximum norm for the gradient clipping"""
    std_x_coef: float = 1.0
    """x of the policy's std = y * sigmoid(theta / x), theta initialised to x"""
    std_y_coef: float = 0.5
    """y of the policy's std = y * sigmoid(theta / x)"""

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


def fail(message: str):
    """One clear line on stderr and a non-zero exit, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# what a resumed run may change
RESUME_FLAGS = ("resume", "eval_only", "total_timesteps", "track", "progress_bar", "torch_threads", "async_envs",
                "capture_video", "video_episodes")


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
    for name in ("num_envs", "num_steps", "num_minibatches", "update_epochs", "hidden_size", "eval_episodes", "video_episodes",
                 "checkpoint_interval", "learning_rate", "critic_learning_rate", "clip_coef", "max_grad_norm"):
        if not getattr(args, name) > 0:  # NaN too
            fail(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if not (0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1):
        fail(f"--gamma ({args.gamma}) and --gae-lambda ({args.gae_lambda}) must lie in [0, 1]")
    if (args.num_envs * args.num_steps) % args.num_minibatches:
        fail(f"--num-envs x --num-steps ({args.num_envs} x {args.num_steps}) must be divisible by --num-minibatches "
             f"({args.num_minibatches})")
    if args.total_timesteps < args.num_envs * args.num_steps:
        fail(f"--total-timesteps ({args.total_timesteps}) is less than one iteration, --num-envs x --num-steps")
    if args.video_episodes > args.eval_episodes:
        fail(f"--video-episodes ({args.video_episodes}) must not exceed --eval-episodes ({args.eval_episodes})")
    if args.capture_video:
        try:
            __import__("imageio_ffmpeg"), __import__("moviepy")  # the encoders of record()
        except ImportError:
            fail("--capture-video needs imageio-ffmpeg and moviepy to write videos: pip install -r requirements.txt")
        os.environ["MUJOCO_GL"] = offscreen_gl()


def offscreen_gl() -> str:
    """MuJoCo's offscreen OpenGL backend for --capture-video: MUJOCO_GL if set, else EGL (GPU or Mesa), else OSMesa,
    whichever opens a context here (tried in a subprocess: a backend that failed cannot be swapped out in this one)."""
    for gl in [os.environ["MUJOCO_GL"]] if os.environ.get("MUJOCO_GL") else ["egl", "osmesa"]:
        probe = [sys.executable, "-c", "import mujoco; mujoco.Renderer(mujoco.MjModel.from_xml_string('<mujoco/>'), 8, 8)"]
        if subprocess.run(probe, env={**os.environ, "MUJOCO_GL": gl}, capture_output=True).returncode == 0:
            return gl
    fail("--capture-video needs MuJoCo's offscreen rendering: EGL (Debian/Ubuntu: apt install libegl1) or OSMesa (libosmesa6)")


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
        if all(n.split(".")[0] == "numpy" for n in names):
            fail(f"'{path}' is an older version's checkpoint (pickled numpy objects, unsafe to load): train again, or if you "
                 f"trust it convert it and --resume {path}.new: python -c \"import runpy,torch as t; t.save(runpy.run_path("
                 f"{os.path.abspath(__file__)!r})['plain'](t.load({path!r},weights_only=False)),{path + '.new'!r})\"")
        fail(f"'{path}' holds pickled objects that loading would run as code ({', '.join(names)}): refused unopened")
    if not (isinstance(ckpt, dict) and set(ckpt.get("args", ())) <= set(Args.__dataclass_fields__)):
        fail(f"'{path}' is not a checkpoint of {os.path.basename(__file__)} (--save-model writes one)")
    fields = ("args run_name actor obs_norm global_step iteration last_return critic actor_opt critic_opt value_norm "
              "state_norm env_state next rng.torch rng.numpy rng.python").split()[: 5 if eval_only else None]  # --eval-only: 5
    if missing := [k for k in fields if k.split(".")[-1] not in (ckpt.get("rng", {}) if "." in k else ckpt)]:
        fail(f"the checkpoint '{path}' lacks {', '.join(missing)}: damaged, or not one that --save-model wrote")
    return ckpt


def plain(x):
    """x with its numpy arrays as tensors (unsigned ones as int64), in lists, tuples and dicts: what checkpoints hold."""
    if isinstance(x, (list, tuple, dict)):
        return {k: plain(v) for k, v in x.items()} if isinstance(x, dict) else type(x)(map(plain, x))
    return torch.from_numpy(x.astype(np.int64 if x.dtype.kind == "u" else x.dtype)) if isinstance(x, np.ndarray) else x


def default_clip_coef(scenario: str, agent_conf: str) -> float:
    """Table E.3: PPO clip 0.05 on 2-Agent Walker [2x3] and 3-Agent Hopper [3x1], 0.2 elsewhere."""
    return 0.05 if (scenario, agent_conf) in {("Walker2d", "2x3"), ("Hopper", "3x1")} else 0.2


# ----------------------------------------------------------------------------------------------
# Environments. MaMuJoCoEnvs: reset(seed) -> dict(obs [E,N,O], state [E,S]); step(actions [E,N,A]) -> the same plus
# reward, terminated, truncated, done [E], any_done, final_state [E,S] (the last state of envs that ended an episode;
# obs/state already start the next one), ep_return, ep_length [E] (valid where done). The global state is
# env.state(), the same for every agent.
# ----------------------------------------------------------------------------------------------
MAMUJOCO_CONFS = {  # gymnasium-robotics 1.4's factorisations (obsk.get_parts_and_edges)
    "Ant": "2x4, 2x4d, 4x2", "HalfCheetah": "2x3, 6x1", "Hopper": "3x1", "Humanoid": "9|8", "HumanoidStandup": "9|8",
    "Reacher": "2x1", "Pusher": "3p", "Swimmer": "2x1", "Walker2d": "2x3", "CoupledHalfCheetah": "1p1",
    "ManySegmentSwimmer": "NxM (N agents of M segments, e.g. 8x2)", "ManySegmentAnt": "NxM (N agents of M segments, e.g. 2x3)",
}  # fmt: skip


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2: MuJoCo 4 warns from C, once per env built, about an attribute of gymnasium's models."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved), os.close(devnull)


def import_mamujoco():
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # gymnasium_robotics prints a notice about Adroit on import
            from gymnasium_robotics import mamujoco_v1
    except ImportError:
        fail("gymnasium-robotics is not installed: pip install gymnasium-robotics")
    return mamujoco_v1


def check_task(scenario: str, agent_conf: str, agent_obsk: int):
    import_mamujoco()
    from gymnasium_robotics.envs.multiagent_mujoco.obsk import get_parts_and_edges

    if scenario not in MAMUJOCO_CONFS:
        fail(f"unknown MaMuJoCo scenario '{scenario}'. Scenarios: {', '.join(MAMUJOCO_CONFS)}")
    try:
        get_parts_and_edges(scenario, agent_conf)
    except Exception:
        fail(f"{scenario} has no agent configuration '{agent_conf}'. Configurations: {MAMUJOCO_CONFS[scenario]}")
    if agent_obsk < 0:
        fail(f"--agent-obsk must be >= 0 (got {agent_obsk})")


class MaMuJoCoAgents(gymnasium.Env):
    """One MaMuJoCo task (a PettingZoo ParallelEnv) as a gymnasium.Env for gymnasium's vector API.
    Action [N, A]: agent i's actions in its first act_dims[i] entries (A = the widest agent), clipped to the
    bounds here, on the way to the simulator. Observation: one flat vector, the agents' observations
    zero-padded to the widest agent [N * O], then env.state() [S]."""

    def __init__(self, scenario: str, agent_conf: str, agent_obsk: int, max_episode_steps: Optional[int] = None, render=False):
        lock = os.path.join(tempfile.gettempdir(), "fp3o_mamujoco.lock")
        with open(lock, "w") as f, quiet_stderr():  # ManySegment* tasks write and delete a shared asset file while building
            fcntl.flock(f, fcntl.LOCK_EX)
            drawn = dict(render_mode="rgb_array", width=240, height=240) if render else {}  # offscreen, for --capture-video
            self.env = import_mamujoco().parallel_env(scenario, agent_conf, agent_obsk=agent_obsk, **drawn)
        # gymnasium-robotics orders each agent's observed joints by label only; Pusher and ManySegmentAnt repeat labels,
        # so their observation layout would differ between env instances: break the ties by the joints' indices
        key = lambda n: (n.label, repr(n.qpos_ids), repr(n.qvel_ids), repr(n.act_ids), repr(n.bodies))
        self.env.k_dicts = [{k: sorted(v, key=key) for k, v in d.items()} for d in self.env.k_dicts]
        assert isinstance(self.env.single_agent_env, gymnasium.wrappers.TimeLimit)  # its step counter is state too
        if max_episode_steps is not None:  # set on the wrapper: parallel_env's keyword misses CoupledHalfCheetah's limit
            self.env.single_agent_env._max_episode_steps = max_episode_steps
        self.names = self.env.possible_agents
        self.obs_dims = [self.env.observation_space(a).shape[0] for a in self.names]
        self.act_dims = [self.env.action_space(a).shape[0] for a in self.names]
        N, self.obs_dim, A = len(self.names), max(self.obs_dims), max(self.act_dims)
        self.state_dim = self.env.single_agent_env.observation_space.shape[0]
        self.low, self.high = np.zeros((N, A), np.float32), np.zeros((N, A), np.float32)
        for i, a in enumerate(self.names):
            space = self.env.action_space(a)
            self.low[i, : self.act_dims[i]], self.high[i, : self.act_dims[i]] = space.low, space.high
        self.layout = dict(obs_dims=self.obs_dims, act_dims=self.act_dims, state_dim=self.state_dim, low=self.low,
                           high=self.high, fps=round(1 / self.env.single_agent_env.unwrapped.dt))  # videos in real time
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (N * self.obs_dim + self.state_dim,), np.float32)
        self.action_space = gymnasium.spaces.Box(-np.inf, np.inf, (N, A), np.float32)

    def _pack(self, obs):
        out, width = np.zeros(self.observation_space.shape, np.float32), self.obs_dim
        for i, a in enumerate(self.names):
            out[i * width : i * width + self.obs_dims[i]] = obs[a]
        out[len(self.names) * width :] = self.env.state()
        return out

    def reset(self, *, seed=None, options=None):
        return self._pack(self.env.reset(seed=seed)[0]), {}

    def step(self, action):
        action = np.clip(action, self.low, self.high)  # the stored (unclipped) actions stay as sampled
        obs, rew, term, trunc, _ = self.env.step({a: action[i, : self.act_dims[i]] for i, a in enumerate(self.names)})
        a0 = self.names[0]  # the team reward and episode end are the same for every agent
        return self._pack(obs), float(rew[a0]), bool(term[a0]), bool(trunc[a0]), {}

    @property
    def sim_state(self):
        """What continuing exactly needs: MuJoCo's integration state, the reset-noise RNG, the time-limit counter."""
        u, spec = self.env.single_agent_env.unwrapped, mujoco.mjtState.mjSTATE_INTEGRATION
        mj = np.empty(mujoco.mj_stateSize(u.model, spec))
        mujoco.mj_getState(u.model, u.data, mj, spec)
        return dict(mj=mj, rng=u.np_random.bit_generator.state, elapsed=self.env.single_agent_env._elapsed_steps)

    @sim_state.setter
    def sim_state(self, s):
        u = self.env.single_agent_env.unwrapped
        mujoco.mj_setState(u.model, u.data, s["mj"], mujoco.mjtState.mjSTATE_INTEGRATION)
        u.np_random.bit_generator.state = s["rng"]
        self.env.single_agent_env._elapsed_steps = s["elapsed"]


class MaMuJoCoEnvs:
    """num_envs copies of a task through gymnasium's vector API (in-process SyncVectorEnv, or AsyncVectorEnv with
    one subprocess per env), same-step autoreset; episode returns and lengths are counted here."""

    def __init__(self, scenario, agent_conf, agent_obsk, num_envs, asynchronous, device, max_episode_steps=None, render=False):
        fns = [lambda: MaMuJoCoAgents(scenario, agent_conf, agent_obsk, max_episode_steps, render)] * num_envs
        vec = gymnasium.vector.AsyncVectorEnv if asynchronous else gymnasium.vector.SyncVectorEnv
        try:
            self.envs = vec(fns, autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP)
        except Exception as e:
            fail(f"gymnasium-robotics could not build {scenario} {agent_conf} (agent_obsk {agent_obsk}): {e!r}")
        layout = self.envs.get_attr("layout")[0]
        self.obs_dims, self.act_dims, self.state_dim, self.fps = map(layout.get, ("obs_dims", "act_dims", "state_dim", "fps"))
        self.n_agents, self.obs_dim, self.act_dim = len(self.obs_dims), max(self.obs_dims), max(self.act_dims)
        self.num_envs, self.device = num_envs, device
        real = torch.arange(self.act_dim) < torch.tensor(self.act_dims)[:, None]
        self.act_mask = real[:, None].float().to(device)  # [N, 1, A]: 1 on each agent's real action dims, 0 on padding
        self.ep_return, self.ep_length = np.zeros(num_envs), np.zeros(num_envs, np.int64)

    def _split(self, x):
        x, NO = torch.as_tensor(x, device=self.device), self.n_agents * self.obs_dim
        return x[:, :NO].reshape(-1, self.n_agents, self.obs_dim), x[:, NO:]

    def reset(self, seed: int):
        obs, state = self._split(self.envs.reset(seed=seed)[0])
        self.ep_return[:], self.ep_length[:] = 0, 0
        return dict(obs=obs, state=state)

    def step(self, actions: torch.Tensor):
        x, reward, term, trunc, info = self.envs.step(actions.cpu().numpy())
        done = term | trunc
        self.ep_return += reward
        self.ep_length += 1
        obs, state = self._split(x)
        final_state, any_done = state, bool(done.any())
        if any_done:  # the true last observation of each finished env (same-step autoreset keeps it here)
            final = np.stack([f if d else s for f, d, s in zip(info["final_obs"], done, x, strict=True)])
            final_state = self._split(final)[1]
        out = dict(obs=obs, state=state, final_state=final_state, any_done=any_done)
        arrays = dict(reward=reward.astype(np.float32), terminated=term, truncated=trunc, done=done,
                      ep_return=self.ep_return.copy(), ep_length=self.ep_length.copy())  # fmt: skip
        out.update({k: torch.as_tensor(v, device=self.device) for k, v in arrays.items()})
        self.ep_return[done], self.ep_length[done] = 0, 0
        return out

    def render(self, i: int) -> np.ndarray:  # env i's frame [H, W, 3] (envs made with render=True, in this process)
        return self.envs.envs[i].env.render()

    def get_state(self):  # for exact resume, in tensors and numbers
        return plain(dict(sim=self.envs.get_attr("sim_state"), ep_return=self.ep_return, ep_length=self.ep_length))

    def set_state(self, s):
        self.envs.set_attr("sim_state", [{**sim, "mj": np.asarray(sim["mj"])} for sim in s["sim"]])
        self.ep_return[:], self.ep_length[:] = s["ep_return"], s["ep_length"]

    def close(self):
        self.envs.close()


def make_envs(args, num_envs, device, asynchronous=False, render=False):
    check_task(args.scenario, args.agent_conf, args.agent_obsk)
    return MaMuJoCoEnvs(args.scenario, args.agent_conf, args.agent_obsk, num_envs, asynchronous, device,
                        args.max_episode_steps, render)


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

    def forward(self, x):  # x: [N, B, in] -> [N, B, out]; one copy sees all N * B rows as one batch
        N, B, n_in = x.shape
        return torch.baddbmm(self.bias, x.reshape(self.weight.shape[0], -1, n_in), self.weight).view(N, B, -1)


def layer_copies(sharing: str, n_agents: int):
    """(trunk copies, last-layer copies) for a sharing mode (FP3O appendix E.3)."""
    return {"full": (1, 1), "partial": (1, n_agents), "none": (n_agents, n_agents)}[sharing]


class AgentNet(nn.Module):
    """Two ReLU layers and an output layer, x [N, B, in] -> [N, B, out]. When several agents share the trunk
    (full and partial sharing) a one-hot agent id is appended to the input."""

    def __init__(self, n_agents, n_in, n_out, hidden, sharing, out_gain=0.01):
        super().__init__()
        trunk, head = layer_copies(sharing, n_agents)
        self.agent_id = trunk == 1 and n_agents > 1
        n_in += n_agents if self.agent_id else 0
        self.fc1, self.fc2 = AgentLinear(trunk, n_in, hidden), AgentLinear(trunk, hidden, hidden)
        self.head = AgentLinear(head, hidden, n_out, out_gain)
        self.register_buffer("eye", torch.eye(n_agents)[:, None], persistent=False)

    def forward(self, x):
        if self.agent_id:
            x = torch.cat([x, self.eye.expand(-1, x.shape[1], -1)], -1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class GaussianActor(nn.Module):
    """pi^i(a|o) = N(mu^i(o), diag(std^i)^2) with a state-independent std = y * sigmoid(theta / x), theta
    initialised to x (the authors' parametrisation); one theta per agent under partial and no sharing."""

    def __init__(self, n_agents, obs_dim, act_dim, hidden, sharing, std_x=1.0, std_y=0.5):
        super().__init__()
        self.net = AgentNet(n_agents, obs_dim, act_dim, hidden, sharing)
        self.theta = nn.Parameter(torch.full((layer_copies(sharing, n_agents)[1], 1, act_dim), float(std_x)))
        self.std_x, self.std_y = std_x, std_y

    def std(self):  # [copies, 1, A]
        return self.std_y * torch.sigmoid(self.theta / self.std_x)

    def forward(self, obs):  # obs [N, B, O] -> mean [N, B, A], std [copies, 1, A]
        return self.net(obs), self.std()


LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(actions, mean, std, mask):
    """log pi^i(a^i|o^i) of a diagonal Gaussian, summed over agent i's real action dims (mask 1, padding 0): the
    per-agent ratio is the product over its action dims (listing B.3, line 18). [N, B, A] -> [N, B]."""
    z = (actions - mean) / std
    return ((-0.5 * z * z - std.log() - LOG_SQRT_2PI) * mask).sum(-1)


def gaussian_entropy(std, mask):
    """Entropy of each agent's Gaussian over its real action dims: sum 0.5 + log(sqrt(2 pi) std)."""
    return ((0.5 + LOG_SQRT_2PI + std.log()) * mask).sum(-1)


def gaussian_kl(mean_p, std_p, mean_q, std_q, mask):
    """KL(p || q) of diagonal Gaussians over each agent's real action dims."""
    kl = (std_q / std_p).log() + (std_p**2 + (mean_p - mean_q) ** 2) / (2 * std_q**2) - 0.5
    return (kl * mask).sum(-1)


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


class RunningNorm(nn.Module):
    """Observation normalisation: clip((x - mean) / sqrt(var + eps), +-clip) with the running mean and variance of
    every feature (per agent for observations), merged from each rollout's batch (Chan et al.'s parallel update).
    Statistics are frozen during a rollout. With enabled=False it is the identity."""

    def __init__(self, shape, enabled=True, clip=10.0, eps=1e-8):
        super().__init__()
        self.enabled, self.clip, self.eps = enabled, clip, eps
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))
        self.register_buffer("shift", torch.zeros(shape), persistent=False)  # float32 copies used by forward,
        self.register_buffer("scale", torch.ones(shape), persistent=False)  # refreshed by update and loading
        self._refresh()
        self.register_load_state_dict_post_hook(lambda module, keys: module._refresh())  # checkpoints too

    def _refresh(self):
        self.shift, self.scale = self.mean.float(), (self.var + self.eps).sqrt().float()

    def update(self, x, dims):
        """Merge the statistics of x, reduced over `dims`, into the running ones."""
        if not self.enabled:
            return
        x = x.double()
        n, mean, var = x.numel() // self.mean.numel(), x.mean(dims), x.var(dims, unbiased=False)
        mean, var = mean.reshape(self.mean.shape), var.reshape(self.mean.shape)
        delta, total = mean - self.mean, self.count + n
        m2 = self.var * self.count + var * n + delta**2 * self.count * n / total
        self.mean.add_(delta * n / total)
        self.var.copy_(m2 / total)
        self.count.copy_(total)
        self._refresh()

    def forward(self, x):
        return ((x - self.shift) / self.scale).clamp(-self.clip, self.clip) if self.enabled else x


# ----------------------------------------------------------------------------------------------
# Algorithm pieces. Update tensors are laid out agents first: [N, B] with B = num_steps * num_envs.
# ----------------------------------------------------------------------------------------------
def compute_gae(rewards, values, final_values, terminated, truncated, gamma, lam):
    """GAE (Schulman et al. 2016) with time limits. rewards, terminated, truncated [T, ...]; values [T + 1, ...] the
    (de-normalised) values of the states seen, the last one after the rollout; final_values [T, ...] the values of the
    last states of episodes that ended at t. A truncation bootstraps from its final state (a time limit is not a
    failure), a termination ends the return, either one cuts the trace. Returns (advantages, returns) [T, ...]:
    delta_t = r_t + gamma * (1 - term_t) * V(s'_t) - V(s_t),  A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1},
    with s'_t = the final state where truncated, else s_{t+1}."""
    next_values = torch.where(truncated.bool(), final_values, values[1:])
    deltas = rewards + gamma * (1.0 - terminated) * next_values - values[:-1]
    decay = gamma * lam * (1.0 - torch.maximum(terminated, truncated))
    adv, last = torch.zeros_like(deltas), 0.0
    for t in reversed(range(deltas.shape[0])):
        adv[t] = last = deltas[t] + decay[t] * last
    return adv, adv + values[:-1]


def standardize_per_agent(adv):
    """Standardise each agent's advantages over its samples; adv [N, B]."""
    return (adv - adv.mean(1, keepdim=True)) / (adv.std(1, unbiased=False, keepdim=True) + 1e-8)


@torch.no_grad()
def rollout_batch(buf, critic, value_norm, obs_norm, state_norm, act_mask, std, args):
    """The update's batch [N, T * E, ...] from the rollout's buf [T, N, E, ...] (raw observations and states): values, GAE,
    A^i, log pi_k(a|o). Normalised with the statistics the rollout acted with, which only then take in this rollout."""
    (T, N, E), S, Nc = buf["obs"].shape[:3], buf["state"].shape[-1], critic.head.weight.shape[0]
    flat = lambda x: x.transpose(0, 1).reshape(x.shape[1], T * E, *x.shape[3:])  # [T, N, E, ...] -> [N, T*E, ...]
    value = lambda states: critic(state_norm(states).reshape(1, -1, S).expand(Nc, -1, -1))  # [Nc, T' * E, 1]
    values = value(buf["state"]).view(Nc, T + 1, E).transpose(0, 1)  # V(s_t) and V(s_T) after the rollout
    final_values = value(buf["final_state"]).view(Nc, T, E).transpose(0, 1)  # V(last state of an episode)
    # GAE on de-normalised values, bootstrapping from V(final state) where a time limit cut the episode
    adv, returns = compute_gae(buf["reward"], value_norm.denormalize(values), value_norm.denormalize(final_values),
                               buf["terminated"], buf["truncated"], args.gamma, args.gae_lambda)  # fmt: skip
    value_norm.update(returns)
    adv = adv.expand(T, N, E).transpose(0, 1).reshape(N, T * E)  # the team's advantage for every agent
    if args.advantage_split == "random":  # A^i = w^i A with random weights summing to 1 over agents (F.4)
        adv = adv * torch.distributions.Dirichlet(torch.ones(T * E, N, device=adv.device)).sample().T
    else:  # A^i = A / n (average split), a no-op: the per-agent standardisation below undoes the 1/n
        adv = adv / N
    b = {"obs": obs_norm(flat(buf["obs"])),
         "state": state_norm(buf["state"][:T].reshape(1, T * E, S)).expand(Nc, -1, -1),
         "actions": flat(buf["actions"]), "mean": flat(buf["mean"]), "values": flat(values[:T]),
         "returns_n": flat(value_norm.normalize(returns)), "adv": standardize_per_agent(adv),
         "act_mask": act_mask, "std": std}  # fmt: skip
    b["logp"] = gaussian_log_prob(b["actions"], b["mean"], std, act_mask)  # log pi_k(a|o)
    obs_norm.update(buf["obs"], (0, 2)), state_norm.update(buf["state"][:T], (0, 1))  # for the next rollout
    return b


def pipeline_partners(n_agents: int, generator=None):
    """Non-overlapping selection (eq. 9, appendix E.3): a random permutation i_1..i_n and its cyclic
    left shift j_p = i_{p+1}, so f(i_p) = j_p. Returns partner[i] = f^-1(i): the agent whose pipeline
    hands agent i its dependent step; every agent is a partner exactly once and never its own (n > 1)."""
    perm = torch.randperm(n_agents, generator=generator)
    partner = torch.empty(n_agents, dtype=torch.long)
    partner[perm.roll(-1)] = perm  # f^-1(j_p) = i_p
    return partner


def fp3o_factors(rho, partner):
    """rho [N, B] fixed intermediate ratios pi_{k+0.5}/pi_k. Returns, for every agent i with partner
    j = f^-1(i): factor_ij = prod_{m not in {i, j}} rho^m and factor_j = rho^j (listing B.3)."""
    log_rho, partner = rho.log(), partner.to(rho.device)
    has_partner = (partner != torch.arange(rho.shape[0], device=rho.device)).to(rho.dtype)[:, None]
    return (log_rho.sum(0, keepdim=True) - log_rho - has_partner * log_rho[partner]).exp(), rho[partner]


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


def fp3o_condition(rho, adv, slack=1e-5):
    """Algorithm 1 line 7 with the intermediate policies: sum_i mu(pi_{k+0.5}^{-i}) >= sum_i mu(pi_k^{-i}),
    estimated by importance sampling over the rollout (rho, adv [N, B]):
    S1 = sum_i sum_t A^i prod_m rho^m,  S2 = sum_i sum_t A^i rho^i. Returns (holds, S1, S2)."""
    s1, s2 = (adv * rho.prod(0, keepdim=True)).sum(), (adv * rho).sum()
    return bool(s1 >= s2 - slack), s1.item(), s2.item()


def fp3o_constraint(rho, ratio_new, adv, slack=1e-5):
    """The true constraint of eq. 11 after the dependent step: S1' = sum_i sum_t A^i rho^i
    prod_{m != i} r_{k+1}^m against S2 (for the paper's 'matching degree', Figure 1)."""
    log_new = ratio_new.log()
    others_new = (log_new.sum(0, keepdim=True) - log_new).exp()
    return bool((adv * rho * others_new).sum() >= (adv * rho).sum() - slack)


def value_loss_fn(new_values, old_values, returns_n, clip_coef, delta):
    """Huber loss on normalised returns with value clipping (MAPPO)."""
    clipped = old_values + (new_values - old_values).clamp(-clip_coef, clip_coef)
    huber = torch.nn.functional.huber_loss
    return torch.max(huber(new_values, returns_n, reduction="none", delta=delta),
                     huber(clipped, returns_n, reduction="none", delta=delta)).mean()  # fmt: skip


def clip_grad_norm(net, max_norm: float, per_agent: bool):
    """torch's clip_grad_norm_ on the whole network, or (--sharing none) on each agent's own copy of it."""
    grads = [p.grad for p in net.parameters()]
    norm = sum(g.pow(2).flatten(1).sum(1) if per_agent else g.pow(2).sum() for g in grads).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *[1] * (g.dim() - 1)) if per_agent else scale)


def fp3o_step(actor, critic, opts, b, factors, args, double_clip=False):
    """One FP3O step (independent or dependent): `update_epochs` epochs of `num_minibatches` random minibatches;
    actor and critic both train on every minibatch. `factors` = (factor_ij, factor_j) as [N, B] tensors (or 1.0 for
    the independent step), or (rho_others, rho_j) for double clip. --sharing none (N separate networks): each agent's
    mean loss, summed over agents (= N x the mean), and per-agent clipping: each network steps as it would alone."""
    data = {k: b[k] for k in ("obs", "actions", "logp", "adv", "state", "values", "returns_n")}
    per_agent, n_agents = args.sharing == "none", b["logp"].shape[0]
    data.update({k: f for k, f in zip(("f1", "f2"), factors, strict=True) if torch.is_tensor(f)})
    B, mask, size = b["logp"].shape[1], b["act_mask"], b["logp"].shape[1] // args.num_minibatches
    stats = []
    for _ in range(args.update_epochs):
        perm = torch.randperm(B)
        shuffled = {k: v[:, perm] for k, v in data.items()}  # one gather per epoch; minibatches are slices of it
        for start in range(0, B, size):
            m = {k: v[:, start : start + size] for k, v in shuffled.items()}
            f1, f2 = m.get("f1", factors[0]), m.get("f2", factors[1])
            mean, std = actor(m["obs"])
            logp = gaussian_log_prob(m["actions"], mean, std, mask)
            ratio = (logp - m["logp"]).exp()
            if double_clip:
                obj = fp3o_double_clip_objective(ratio, m["adv"], f1, f2, args.clip_coef, args.inner_clip_coef)
            else:
                obj = fp3o_objective(ratio, m["adv"], f1, f2, args.clip_coef)
            pg_loss, ent = -obj.mean(), gaussian_entropy(std, mask).mean()
            new_values = critic(m["state"])[..., 0]
            v_loss = value_loss_fn(new_values, m["values"], m["returns_n"], args.clip_coef, args.huber_delta)
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            # actor and critic share no parameters: one backward pass gives each the gradient of its own loss
            ((n_agents if per_agent else 1) * (pg_loss - args.ent_coef * ent + args.vf_coef * v_loss)).backward()
            for opt, net in zip(opts, (actor, critic), strict=True):
                clip_grad_norm(net, args.max_grad_norm, per_agent)
                opt.step()
            with torch.no_grad():
                kl = ((ratio - 1) - (logp - m["logp"])).mean()
                clipfrac = ((ratio - 1).abs() > args.clip_coef).float().mean()
                stats.append(torch.stack([pg_loss, v_loss, ent, kl, clipfrac]))
    return torch.stack(stats).mean(0).cpu()


def fp3o_update(actor, critic, opts, b, args):
    """One iteration of Algorithm 1 on rollout_batch's b -> (the steps' mean policy loss, value loss, entropy, approx. KL,
    clip fraction), diagnostics. One agent: FP3O with n = 1 is PPO (no partner, no condition), the independent step only."""
    n_agents, dependent = b["logp"].shape[0], False
    stats, diag = fp3o_step(actor, critic, opts, b, (1.0, 1.0), args), {}  # independent step (eq. 10): factors 1
    if not args.no_dependent_step and n_agents > 1:
        with torch.no_grad():  # intermediate policy pi_{k+0.5}: fixed per-sample ratios rho^i
            rho = (gaussian_log_prob(b["actions"], *actor(b["obs"]), b["act_mask"]) - b["logp"]).exp()
        holds, s1, s2 = fp3o_condition(rho, b["adv"], args.condition_slack)
        diag.update({"fp3o/condition_holds": float(holds), "fp3o/S1": s1, "fp3o/S2": s2})
        if dependent := holds or args.no_condition:
            # dependent step (eq. 11): agent i's pipeline partner j = f^-1(i) from the cyclic shift
            factor_ij, factor_j = fp3o_factors(rho, pipeline_partners(n_agents))
            factors = (factor_ij * factor_j, factor_j) if args.double_clip else (factor_ij, factor_j)
            stats = (stats + fp3o_step(actor, critic, opts, b, factors, args, args.double_clip)) / 2
    with torch.no_grad():
        mean_new, std_new = actor(b["obs"])
        kl = gaussian_kl(b["mean"], b["std"], mean_new, std_new, b["act_mask"]).mean(1)  # KL(pi_k^i || pi_{k+1}^i)
        if dependent:  # matching degree (Figure 1) only here: a skipped step's constraint is the condition itself
            ratio_new = (gaussian_log_prob(b["actions"], mean_new, std_new, b["act_mask"]) - b["logp"]).exp()
            constraint = fp3o_constraint(rho, ratio_new, b["adv"], args.condition_slack)
            diag.update({"fp3o/constraint_holds": float(constraint), "fp3o/condition_matches": float(constraint == holds)})
    diag.update({f"fp3o/kl_agent{i}": kl[i].item() for i in range(n_agents)})
    return stats, diag


@torch.no_grad()
def evaluate(actor, envs, obs_norm, episodes, videos=0):
    """`episodes` deterministic episodes (mean action) on their own environments, one per env. Returns the mean return
    and the frames of the first `videos` episodes (envs.render), one per state the agents act in."""
    nxt, frames = envs.reset(seed=12345), [[] for _ in range(videos)]
    finished = torch.zeros(envs.num_envs, dtype=torch.bool, device=nxt["obs"].device)
    returns = torch.zeros(envs.num_envs, device=nxt["obs"].device)
    while not finished.all():
        for k, video in enumerate(frames):
            video += [] if finished[k] else [envs.render(k)]
        mean, _ = actor(obs_norm(nxt["obs"].transpose(0, 1)))
        nxt = envs.step(mean.transpose(0, 1))
        new = nxt["done"] & ~finished
        returns[new] = nxt["ep_return"][new].float()
        finished |= nxt["done"]
    return returns[:episodes].mean().item(), frames


def record(frames, run_name, step, writer, fps):
    """--capture-video: each episode as runs/{run_name}/videos/{step}_{k}.mp4 and as TensorBoard's `videos/episode_{k}`."""
    import imageio.v2 as imageio

    for k, video in enumerate(frames):  # (nothing without --capture-video)
        os.environ.update({v: os.environ.get(v, "dummy") for v in ("SDL_AUDIODRIVER", "SDL_VIDEODRIVER")})  # add_video's
        os.makedirs(f"runs/{run_name}/videos", exist_ok=True)  # moviepy imports pygame, which would greet the sound card
        imageio.mimwrite(f"runs/{run_name}/videos/{step}_{k}.mp4", video, fps=fps, macro_block_size=1)
        writer.add_video(f"videos/episode_{k}", torch.from_numpy(np.stack(video)).permute(0, 3, 1, 2)[None], step, fps=fps)
    writer.flush()  # now: an --eval-only run exits right after


def adam(params, lr):
    """Adam (eps 1e-5); the fused kernel where this torch has it for the device (CPU: torch >= 2.4): one call
    updates every tensor, which matters with 32 minibatches of small networks."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, eps=1e-5, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, eps=1e-5)


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
    if args.clip_coef is None:
        args.clip_coef = default_clip_coef(args.scenario, args.agent_conf)
    check_args(args)
    E, T = args.num_envs, args.num_steps
    env_id = f"{args.scenario}-{args.agent_conf.replace('|', '_')}-k{args.agent_obsk}"
    run_name = ckpt["run_name"] if ckpt else f"{env_id}__{args.exp_name}__{args.sharing}__{args.seed}__{int(time.time())}"
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.set_num_threads(args.torch_threads or torch.get_num_threads())
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    envs = make_envs(args, E, device, args.async_envs)
    N, O, A, S = envs.n_agents, envs.obs_dim, envs.act_dim, envs.state_dim  # noqa: E741
    print(f"{run_name}: {N} agents, obs dims {envs.obs_dims}, action dims {envs.act_dims}, state {S}, "
          f"sharing {args.sharing}, clip {args.clip_coef}, device {device}")  # fmt: skip
    actor = GaussianActor(N, O, A, args.hidden_size, args.sharing, args.std_x_coef, args.std_y_coef).to(device)
    Nc = N if args.sharing == "none" else 1  # critic copies: V(s) on the global state; partial shares the critic (E.3)
    critic = AgentNet(Nc, S, 1, args.hidden_size, "none" if Nc > 1 else "full", out_gain=1.0).to(device)
    opts = [adam(actor.parameters(), args.learning_rate), adam(critic.parameters(), args.critic_learning_rate)]
    value_norm = ValueNorm().to(device)
    obs_norm = RunningNorm((N, 1, O), args.normalize_obs).to(device)
    state_norm = RunningNorm((S,), args.normalize_obs).to(device)
    saved = dict(actor=actor, critic=critic, actor_opt=opts[0], critic_opt=opts[1], value_norm=value_norm,
                 obs_norm=obs_norm, state_norm=state_norm)  # the modules a checkpoint holds
    videos = args.video_episodes if args.capture_video else 0  # episodes drawn per evaluation
    eval_envs = make_envs(args, args.eval_episodes, device, render=videos) if args.eval_interval or args.eval_only else None
    if ckpt and args.eval_only:
        actor.load_state_dict(ckpt["actor"]), obs_norm.load_state_dict(ckpt["obs_norm"])
        ret, frames = evaluate(actor, eval_envs, obs_norm, args.eval_episodes, videos)
        if args.capture_video:
            record(frames, run_name, ckpt["global_step"], SummaryWriter(f"runs/{run_name}"), envs.fps)
        print(f"eval: episodic_return {ret:.3f} over {args.eval_episodes} episodes")
        sys.exit(0)
    packages = ("torch", "gymnasium", "gymnasium-robotics", "mujoco", "numpy", "tyro")
    versions = {name: metadata.version(name) for name in packages}
    config = {**asdict(args), "env_id": env_id, "versions": versions}
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=config,
                   name=run_name, group=f"{env_id}__{args.exp_name}__{args.sharing}", id=run_name, resume="allow",
                   tags=[args.exp_name, args.sharing, env_id, "mamujoco"], save_code=True)  # fmt: skip
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in config.items()))
    ckpt_path = f"runs/{run_name}/checkpoint.pt"
    # rollout storage, agents second: [T, N, E, ...]; raw observations and states (normalised after the rollout)
    buf = dict(obs=torch.zeros(T, N, E, O, device=device), actions=torch.zeros(T, N, E, A, device=device),
               mean=torch.zeros(T, N, E, A, device=device), state=torch.zeros(T + 1, E, S, device=device),
               final_state=torch.zeros(T, E, S, device=device))  # fmt: skip
    buf.update({k: torch.zeros(T, 1, E, device=device) for k in ("reward", "terminated", "truncated")})
    num_iterations = args.total_timesteps // (E * T)
    global_step, first_iteration, last_return = 0, 1, float("nan")
    nxt = envs.reset(seed=args.seed)
    if ckpt:
        for key, module in saved.items():
            module.load_state_dict(ckpt[key])
        global_step, first_iteration, last_return = ckpt["global_step"], ckpt["iteration"] + 1, ckpt["last_return"]
        envs.set_state(ckpt["env_state"])  # continue the very same episodes
        nxt = {k: v.to(device) for k, v in ckpt["next"].items()}
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"]), np.random.set_state(rng["numpy"]), random.setstate(rng["python"])
        torch.cuda.set_rng_state_all(rng["cuda"]) if rng.get("cuda") and device.type == "cuda" else None
    progress = tqdm(total=num_iterations * E * T, initial=global_step, unit="step", disable=not args.progress_bar)
    start_time, start_step, eval_return = time.time(), global_step, float("nan")  # the latest evaluation's

    for iteration in range(first_iteration, num_iterations + 1):
        t0, ep_returns, ep_lengths = time.time(), [], []
        with torch.no_grad():
            std = actor.std()  # state-independent: fixed during the rollout
            for t in range(T):  # only what acting needs; log-probabilities and values follow in one batch
                buf["obs"][t], buf["state"][t] = nxt["obs"].transpose(0, 1), nxt["state"]
                mean = actor.net(obs_norm(buf["obs"][t]))
                buf["actions"][t], buf["mean"][t] = mean + std * torch.randn_like(mean), mean
                nxt = envs.step(buf["actions"][t].transpose(0, 1))  # clipped to the bounds in the env, stored unclipped
                for k in ("reward", "terminated", "truncated"):
                    buf[k][t, 0] = nxt[k]
                if nxt["any_done"]:  # keep the last state of finished episodes: a time limit bootstraps from its value
                    buf["final_state"][t] = nxt["final_state"]
                    ep_returns.append(nxt["ep_return"][nxt["done"]])
                    ep_lengths.append(nxt["ep_length"][nxt["done"]])
            global_step += E * T
            buf["state"][T] = nxt["state"]
        b = rollout_batch(buf, critic, value_norm, obs_norm, state_norm, envs.act_mask, std, args)
        rollout_time, t1 = time.time() - t0, time.time()

        stats, diag = fp3o_update(actor, critic, opts, b, args)
        update_time = time.time() - t1
        if not torch.isfinite(stats).all():
            kept = ckpt_path if args.save_model else "none saved: use --save-model"
            fail(f"non-finite loss at iteration {iteration}; the last good checkpoint is kept ({kept})")

        # ---- logging ----
        pg_loss, v_loss, entropy, approx_kl, clipfrac = stats.tolist()
        y_true, y_pred = b["returns_n"].flatten(), b["values"].flatten()
        var_y = y_true.var()
        sps = int((global_step - start_step) / (time.time() - start_time))
        scalars = {"charts/SPS": sps, "charts/learning_rate": opts[0].param_groups[0]["lr"], "losses/policy_loss": pg_loss,
                   "losses/value_loss": v_loss, "losses/entropy": entropy, "losses/approx_kl": approx_kl,
                   "losses/clipfrac": clipfrac, "charts/action_std": actor.std().mean().item(),
                   "losses/explained_variance": (1 - (y_true - y_pred).var() / var_y).item() if var_y > 0 else float("nan"),
                   "charts/rollout_time": rollout_time, "charts/update_time": update_time, **diag}  # fmt: skip
        if ep_returns:
            last_return = torch.cat(ep_returns).mean().item()
            scalars["charts/episodic_return"] = last_return
            scalars["charts/episodic_length"] = torch.cat(ep_lengths).float().mean().item()
        if eval_envs is not None and (iteration % args.eval_interval == 0 or iteration == num_iterations):
            eval_return, frames = evaluate(actor, eval_envs, obs_norm, args.eval_episodes, videos)
            scalars["eval/episodic_return"] = eval_return
            record(frames, run_name, global_step, writer, envs.fps)  # with --capture-video
        for k, v in scalars.items():
            writer.add_scalar(k, v, global_step)
        progress.update(E * T)
        progress.set_postfix(SPS=sps, ret=f"{last_return:.1f}", refresh=False)
        if args.save_model and (iteration % args.checkpoint_interval == 0 or iteration == num_iterations):
            torch.save({
                "args": asdict(args), "run_name": run_name, "iteration": iteration, "global_step": global_step,
                "last_return": last_return, **{k: m.state_dict() for k, m in saved.items()}, "env_state": envs.get_state(),
                "next": {k: v.clone() for k, v in nxt.items() if torch.is_tensor(v)},
                "rng": plain({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                              "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}),
            }, ckpt_path + ".tmp")  # fmt: skip
            os.replace(ckpt_path + ".tmp", ckpt_path)  # atomic: a crash while saving keeps the last checkpoint

    for closable in (progress, envs, eval_envs, writer):
        if closable is not None:
            closable.close()
    if args.track:
        wandb.finish()
    result = f"eval return {eval_return:.2f}" if eval_envs is not None else f"training return {last_return:.2f}"
    print(f"done: {result} at step {global_step:,} after {(time.time() - start_time) / 60:.1f} min; runs/{run_name} "
          "(to look at it: tensorboard --logdir runs)")
