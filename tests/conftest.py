"""Shared helpers for the tests of the single-file scripts (fp3o_smac.py, mappo_smac.py, happo_smac.py, ...).

- `ROOT`: the repository root; it is put on sys.path so that tests can `import fp3o_smac` (the scripts have no
  import-time side effects). The `repo_root` fixture returns it too.
- `run_script(script, *args, cwd=...)`: runs a top-level script in a subprocess (with `sys.executable`) in `cwd`,
  so that its `runs/` and `wandb/` folders land there; returns the CompletedProcess (text stdout/stderr).
- `run_scripts(jobs)`: several such runs at once (a few in parallel), for module-scoped fixtures.
- `run_dir(cwd)`, `read_scalars(run_dir)`: the run's TensorBoard folder and its scalars.
- `load_checkpoint`, `assert_same_training_state`, `assert_one_clear_error`: checks shared by the end-to-end tests.
- `hand_made_batch(script_module, sharing)`: a tiny GRU actor, critic, Adam optimizers and a rollout batch shaped like
  the SMAC scripts' `b`, for in-process tests of their updates.

Subprocesses get a persistent JAX compilation cache (SMAX's jitted step takes ~10-20 s to compile on a small CPU,
a cache hit well under a second) and one torch thread (on a shared 2-core machine OpenMP spinning makes the tiny
networks several times slower). Both can be overridden from the environment.
"""
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# JAX reads these when it is first imported (lazily, by the SMAX wrappers), so in-process tests use the cache too.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"jax-cache-pytest-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# The suite tests the CPU path whatever the machine has: CUDA is hidden from this process (torch and jax initialise it
# lazily, after this) and from the scripts it starts. A test about the device gives run_script `env=ON_DEVICE`: the
# devices the suite was started with (None: CUDA_VISIBLE_DEVICES was unset, and script_env removes it).
ON_DEVICE = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
os.environ["CUDA_VISIBLE_DEVICES"] = ""

SCRIPT_TIMEOUT = int(os.environ.get("TEST_SCRIPT_TIMEOUT", "600"))
SCRIPT_JOBS = int(os.environ.get("TEST_SCRIPT_JOBS", "2"))  # concurrent subprocesses in run_scripts


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (already importable: it is on sys.path)."""
    return ROOT


def script_env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.setdefault("WANDB_MODE", "offline")  # never reach the network, even if a test forgets
    env.setdefault("WANDB_SILENT", "true")
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)  # e.g. ON_DEVICE's unset CUDA_VISIBLE_DEVICES
        else:
            env[key] = value
    return env


def run_script(
    script: str, *args, cwd, env: Optional[dict] = None, timeout: int = SCRIPT_TIMEOUT
) -> subprocess.CompletedProcess:
    """Run `ROOT/script` (or an absolute path) with the current interpreter in `cwd`; never raises on a non-zero
    exit code (a timeout gives exit code -9)."""
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=str(cwd), env=script_env(env), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        proc = subprocess.CompletedProcess(cmd, -9, out, err + f"\n[test harness] timed out after {timeout} s")
    proc.duration = time.time() - t0  # seconds, for diagnosing slow suites
    return proc


def describe(proc: subprocess.CompletedProcess, tail: int = 3000) -> str:
    """For assertion messages: the command, exit code and the ends of stdout/stderr."""
    cmd = " ".join(map(str, proc.args))
    return f"$ {cmd}\nexit code {proc.returncode}\n--- stdout\n{proc.stdout[-tail:]}\n--- stderr\n{proc.stderr[-tail:]}"


@dataclass
class Job:
    """One script run for `run_scripts`. `after`: names of jobs that must finish first (e.g. a resume after a save);
    `args` may be a callable returning the arguments, evaluated when the job starts (e.g. to find a checkpoint).
    `script` is relative to the repository root, or an absolute path (e.g. a driver written by the test)."""

    name: str
    script: str
    args: Union[Sequence, Callable[[], Sequence]]
    cwd: Path
    env: Optional[dict] = None
    after: Sequence[str] = field(default_factory=tuple)


def run_scripts(jobs: Sequence[Job], max_parallel: int = SCRIPT_JOBS) -> dict:
    """Run several jobs, at most `max_parallel` processes at a time, respecting `after`. Returns {name: CompletedProcess}."""
    names = [j.name for j in jobs]
    assert len(set(names)) == len(names), "job names must be unique"
    slots = threading.Semaphore(max(1, max_parallel))
    futures = {}

    def work(job: Job):
        for dep in job.after:
            futures[dep].result()
        with slots:
            Path(job.cwd).mkdir(parents=True, exist_ok=True)
            try:
                args = job.args() if callable(job.args) else job.args
            except Exception as e:  # e.g. the checkpoint of a failed dependency is missing: fail this job only
                proc = subprocess.CompletedProcess([job.script], -1, "", f"[test harness] {job.name} not started: {e!r}")
                proc.duration = 0.0
                return proc
            return run_script(job.script, *args, cwd=job.cwd, env=job.env)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:  # threads only wait; `slots` bounds the processes
        for job in jobs:  # dependencies must be listed before their dependents
            assert all(d in futures for d in job.after), f"{job.name}: list {job.after} before it"
            futures[job.name] = pool.submit(work, job)
        return {name: fut.result() for name, fut in futures.items()}


def run_dirs(cwd) -> list:
    """TensorBoard run folders (`runs/*/`) under `cwd`."""
    return sorted(p for p in (Path(cwd) / "runs").glob("*") if p.is_dir())


def run_dir(cwd) -> Path:
    """The single run folder under `cwd/runs`."""
    dirs = run_dirs(cwd)
    assert len(dirs) == 1, f"expected one run folder under {cwd}/runs, found {dirs}"
    return dirs[0]


def read_scalars(path) -> dict:
    """{tag: [(step, value), ...]} of every scalar in the TensorBoard event files of a run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def find_checkpoint(cwd, name: str = "checkpoint.pt") -> Path:
    """The single `runs/*/checkpoint.pt` under `cwd`."""
    found = sorted((Path(cwd) / "runs").glob(f"*/{name}"))
    assert len(found) == 1, f"expected one {name} under {cwd}/runs, found {found}"
    return found[0]


def assert_same_state_dict(a: dict, b: dict, what: str = "state dict"):
    """Bit-for-bit equality of two state dicts (same keys, shapes, dtypes and values)."""
    assert a.keys() == b.keys(), f"{what}: different keys"
    for k in a:
        x, y = a[k], b[k]
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what}[{k}]: {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}"
        assert x.equal(y), f"{what}[{k}] differs (max abs diff {(x.double() - y.double()).abs().max().item():.3g})"


def load_checkpoint(path) -> dict:
    """A checkpoint file, or the single `runs/*/checkpoint.pt` under a folder."""
    import torch

    path = Path(path)
    return torch.load(find_checkpoint(path) if path.is_dir() else path, map_location="cpu", weights_only=False)


def assert_same_training_state(a: dict, b: dict, iteration: Optional[int] = None, global_step: Optional[int] = None):
    """Bit for bit: networks, Adam's moments and step counts, value normaliser; and the counters when given."""
    for key in ("actor", "critic", "value_norm"):
        assert_same_state_dict(a[key], b[key], key)
    for key in ("actor_opt", "critic_opt"):
        assert a[key]["state"].keys() == b[key]["state"].keys(), f"{key}: different parameters have state"
        for idx, state in a[key]["state"].items():
            assert_same_state_dict(state, b[key]["state"][idx], f"{key} state of parameter {idx}")
    assert (a["iteration"], a["global_step"]) == (b["iteration"], b["global_step"])
    if iteration is not None:
        assert (a["iteration"], a["global_step"]) == (iteration, global_step)


def assert_one_clear_error(proc: subprocess.CompletedProcess, mentions: Optional[str] = None):
    """Bad input: a non-zero exit, an `error: ...` line on stderr (naming `mentions`) and no traceback."""
    assert proc.returncode not in (0, -9), describe(proc)
    err = proc.stderr.strip()
    assert "Traceback" not in err + proc.stdout, describe(proc)
    assert "error" in err.lower(), describe(proc)
    if mentions is not None:
        assert mentions in err, describe(proc)


def clipped_value_loss(values, old_values, returns_n, clip: float, delta: float = 10.0):
    """MAPPO's clipped value loss written out: max of the two errors' Huber losses, which below `delta` (asserted)
    are their half squares; the mean over samples."""
    import torch

    clipped = old_values + (values - old_values).clamp(-clip, clip)
    assert ((values - returns_n).abs() < delta).all() and ((clipped - returns_n).abs() < delta).all()
    return torch.max((values - returns_n) ** 2 / 2, (clipped - returns_n) ** 2 / 2).mean()


def assert_agent_steps_alone(nets, refs, losses, agent: int, lr: float, max_grad_norm: float, clip_bites: bool):
    """--sharing none means N separate networks. `refs` are copies of `nets` from before their update, `losses` the
    losses of agent `agent`'s samples alone through them: one SGD step (lr) of each reference with torch's
    gradient-norm clipping, which bites exactly when `clip_bites`; then agent `agent`'s copy of every parameter of
    `nets` (updated by the script on all agents at once) must equal the reference's."""
    import torch

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
    import torch

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
    b = dict(obs=torch.randn(T, N, E, OBS, generator=gen), state=torch.randn(T, N, E, STATE, generator=gen),
             avail=avail, actions=actions, starts=starts, h0=torch.zeros(N, E, HID),
             values=torch.randn(T, N, E, generator=gen), active=(torch.rand(T, N, E, generator=gen) > 0.15).float(),
             adv=torch.randn(T, N, E, generator=gen), returns_n=torch.randn(T, N, E, generator=gen))  # fmt: skip
    b["logp"] = script.rollout_logp(actor, b) + logp_noise * torch.randn(T, N, E, generator=gen)
    return actor, critic, opts, b


TIME_TAGS = {"charts/SPS", "charts/rollout_time", "charts/update_time"}  # wall-clock: differ between identical runs
SMAC_TAGS = {"charts/SPS", "charts/learning_rate", "losses/policy_loss", "losses/value_loss", "losses/entropy",
             "losses/approx_kl", "losses/clipfrac", "losses/explained_variance", "eval/win_rate", "eval/episodic_return"}


def short_smac_run_scalars(proc, cwd, script: str, sharing: str, own_tags, steps=(64, 128)) -> dict:
    """A short SMAX 2s3z run of a SMAC script (exp_name `script`): it exited 0, its run folder is named
    `2s3z__{script}__{sharing}__1__{time}`, it logged the common tags and `own_tags` at every iteration (`steps`) and
    no other algorithm's diagnostics. Returns its scalars."""
    import re

    assert proc.returncode == 0, describe(proc)
    path = run_dir(cwd)
    assert re.fullmatch(rf"2s3z__{script}__{sharing}__1__\d+", path.name), path.name
    scalars = read_scalars(path)
    expected = SMAC_TAGS | set(own_tags)
    assert expected <= set(scalars), expected - set(scalars)
    others = tuple(f"{a}/" for a in ("fp3o", "mappo", "happo", "a2po") if not script.startswith(a))
    assert not any(tag.startswith(others) for tag in scalars)
    for tag in ("losses/policy_loss", "eval/win_rate", *own_tags):
        assert [step for step, _ in scalars[tag]] == list(steps), tag
    return scalars


def assert_same_scalars(a: dict, b: dict, tags=None):
    """The same logged values (all tags but the wall-clock ones, or just `tags`)."""
    if tags is None:
        assert a.keys() == b.keys()
        tags = set(a) - TIME_TAGS
    for tag in tags:
        assert a[tag] == b[tag], tag


def ran_ok(runs: dict, name: str):
    """(proc, cwd) of the run `name` in a {name: (proc, cwd)} dict, asserting that it exited 0 without a traceback."""
    proc, cwd = runs[name]
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, describe(proc)
    return proc, cwd


class EndingAt:
    """Batched envs (a script's env class) whose env i ends its first episode after lengths[i] steps, for checking what
    evaluate() does with episodes of different lengths (e.g. videos of the first ones)."""

    def __init__(self, envs, lengths):
        self.envs, self.num_envs, self.lengths, self.t = envs, envs.num_envs, torch.tensor(lengths), 0

    def reset(self, seed):
        return self.envs.reset(seed)

    def step(self, actions):
        out, self.t = self.envs.step(actions), self.t + 1
        out["done"] = out["done"] | (self.lengths == self.t)
        return out

    def render(self, i):
        return self.envs.render(i)


def assert_watchable(frames, length: int):
    """A video of `length` frames [T, H, W, 3] (uint8) that is neither blank nor frozen."""
    frames = np.asarray(frames)
    assert frames.shape[0] == length, f"one frame per state the agents act in: {frames.shape[0]} frames, not {length}"
    assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8
    assert frames[0].std() > 0, "a blank frame"
    assert np.abs(frames[0].astype(int) - frames[-1]).mean() > 0.1, "a frozen video"


def fake_module(folder, name):
    """A folder whose `name` module fails to import, as if it were not installed (for PYTHONPATH)."""
    folder.mkdir()
    (folder / f"{name}.py").write_text(f"raise ImportError('{name} is not installed')\n")
    return folder


def assert_videos(proc, run: Path, steps, episodes: int, length: int, size):
    """A run's --capture-video output: videos/{step}_{k}.mp4 for every evaluation step and its first `episodes` episodes,
    each a watchable video of `length` frames of `size` (H, W); the same as TensorBoard videos; the encoders quiet."""
    import imageio.v3 as iio
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert {p.name for p in (run / "videos").iterdir()} == {f"{s}_{k}.mp4" for s in steps for k in range(episodes)}
    for path in (run / "videos").iterdir():
        frames = iio.imread(path)
        assert frames.shape[1:3] == tuple(size), path
        assert_watchable(frames, length)
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    for k in range(episodes):
        assert [e.step for e in events.Images(f"videos/episode_{k}")] == list(steps)
    assert "ALSA" not in proc.stderr, "the encoders start quietly"
