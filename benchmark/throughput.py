"""Training throughput of each script next to the raw environment stepping rate at the same number of environments.

For every script and sharing mode, a short real training run (evaluation off, one torch thread by default) in a
temporary folder; from its TensorBoard log, with the first `--skip` iterations (jit compilation, warm-up) left out:
  training SPS = environment steps / (rollout time + update time), and the rollout vs update split per iteration
  (charts/rollout_time, charts/update_time); peak memory = the run's peak resident set size (ru_maxrss of os.wait4).
Raw stepping: the same number of environments stepped with uniformly random valid actions, no networks:
  SMAC scripts: the script's own SMAX wrapper (`make_envs("smax", ...)`); ippo_mpe.py: its `MpeEnvs`;
  fp3o_mamujoco.py: its `make_envs` (gymnasium's in-process vector env). A script without the expected wrapper gets the
  simulator alone (mpe2 / mamujoco_v1 parallel envs stepped in turn); the table's last column says which.
Then the ratios the FP3O paper reports (tables F.3, F.4): time per step and memory of each algorithm relative to MAPPO
of the same family and sharing mode, and of sharing none relative to full. A script that is not in the checkout, or
whose run fails, gets a line saying so. Writes a markdown table (default benchmark/results/throughput.md).

Usage: python benchmark/throughput.py                           (every script, full/partial/none: about half an hour)
       python benchmark/throughput.py --scripts fp3o_smac.py mappo_smac.py --sharing full none --iterations 8
"""
import argparse
import contextlib
import datetime
import glob
import importlib.util
import inspect
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {"_smac": "smac", "_mamujoco": "mamujoco", "_mpe": "mpe"}
ALL_SCRIPTS = ["fp3o_smac.py", "mappo_smac.py", "happo_smac.py", "a2po_smac.py", "fp3o_mamujoco.py", "ippo_mpe.py"]


@dataclass
class Args:
    scripts: List[str] = field(default_factory=lambda: list(ALL_SCRIPTS))
    """scripts to measure (relative to the repository root, or paths); the family comes from the name (*_smac.py, ...)"""
    sharing: List[str] = field(default_factory=lambda: ["full", "partial", "none"])
    """sharing modes to measure"""
    smac_task: str = "--map 2s3z"
    """task flags of the SMAC scripts (SMAX)"""
    mamujoco_task: str = "--scenario HalfCheetah --agent-conf 6x1"
    """task flags of the MaMuJoCo scripts"""
    mpe_task: str = "--env simple_spread_v3"
    """task flags of the MPE scripts"""
    num_envs: int = 0
    """environments (0: each script's default, from its Args)"""
    num_steps: int = 0
    """steps per environment per iteration (0: each script's default)"""
    iterations: int = 12
    """training iterations per measurement"""
    skip: int = 2
    """first iterations left out of the averages (jit compilation, warm-up)"""
    raw_steps: int = 300
    """batched steps timed for the raw stepping rate (after 20 warm-up steps)"""
    torch_threads: int = 1
    """torch threads (and OMP_NUM_THREADS) of the training runs"""
    extra_args: str = ""
    """flags added to every training run (write it as --extra-args="--actor mlp")"""
    timeout: float = 1800.0
    """seconds after which a training run is stopped (and reported as failed)"""
    out: str = os.path.join(ROOT, "benchmark", "results", "throughput.md")
    """markdown table to write"""


def family_of(script: str) -> Optional[str]:
    stem = os.path.basename(script)[:-3]
    return next((fam for suffix, fam in FAMILIES.items() if stem.endswith(suffix)), None)


def algorithm_of(script: str) -> str:
    stem = os.path.basename(script)[:-3]
    return next((stem[: -len(s)] for s in FAMILIES if stem.endswith(s)), stem)


def resolve(script: str) -> Optional[str]:
    for candidate in (os.path.join(ROOT, script), script):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return None


def load_script(path):
    """Import a script as a module (everything above its __main__ is importable without side effects)."""
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def task_flags(family: str, args: Args) -> List[str]:
    return shlex.split({"smac": args.smac_task, "mamujoco": args.mamujoco_task, "mpe": args.mpe_task}[family])


def parse_flags(flags: List[str], *names) -> dict:
    p = argparse.ArgumentParser(add_help=False)
    for name in names:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name)
    return vars(p.parse_known_args(flags)[0])


def timed(step, steps: int, batch: int) -> float:
    """Env steps per second of `steps` calls of step(), after 20 warm-up calls (compilation)."""
    for i in range(steps + 20):
        if i == 20:
            start = time.perf_counter()
        step()
    return steps * batch / (time.perf_counter() - start)


def raw_smac(module, flags, num_envs, steps):
    import torch

    envs = module.make_envs("smax", parse_flags(flags, "map")["map"] or "2s3z", num_envs, 0, torch.device("cpu"))
    nxt = [envs.reset(seed=0)]

    def step():
        avail = nxt[0]["avail"]
        logits = torch.zeros(avail.shape).masked_fill(~avail, -1e10)
        nxt[0] = envs.step(torch.distributions.Categorical(logits=logits).sample())

    return timed(step, steps, num_envs), "script's SMAX wrapper"


def raw_mpe(module, flags, num_envs, steps):
    env_id = parse_flags(flags, "env")["env"] or "simple_spread_v3"
    rng = np.random.default_rng(0)
    if hasattr(module, "MpeEnvs") and hasattr(module, "env_options"):
        envs = module.MpeEnvs(env_id, num_envs, module.env_options(module.Args(env=env_id)))
        envs.reset(0)
        high = np.asarray(envs.act_dims)
        return timed(lambda: envs.step(rng.integers(0, high, size=(num_envs, len(high)))), steps, num_envs), "script's MpeEnvs"
    import importlib

    envs = [importlib.import_module(f"mpe2.{env_id}").parallel_env() for _ in range(num_envs)]
    return simulator_loop(envs, steps), "mpe2 parallel_env x E"


def raw_mamujoco(module, flags, num_envs, steps):
    f = parse_flags(flags, "scenario", "agent_conf")
    scenario, agent_conf = f["scenario"] or "HalfCheetah", f["agent_conf"] or "6x1"
    wrapper = getattr(module, "make_envs", None)
    if wrapper is not None and list(inspect.signature(wrapper).parameters)[:3] == ["args", "num_envs", "device"]:
        import torch

        envs = module.make_envs(module.Args(scenario=scenario, agent_conf=agent_conf), num_envs, torch.device("cpu"))
        envs.reset(seed=0)
        shape = (num_envs, envs.n_agents, envs.act_dim)  # clipped to each agent's bounds (and dims) by the wrapper
        return timed(lambda: envs.step(torch.rand(shape) * 2 - 1), steps, num_envs), "script's MaMuJoCoEnvs"
    from gymnasium_robotics import mamujoco_v1

    envs = [mamujoco_v1.parallel_env(scenario, agent_conf) for _ in range(num_envs)]
    return simulator_loop(envs, steps), "mamujoco_v1.parallel_env x E"


def simulator_loop(envs, steps):
    """PettingZoo parallel envs stepped one after another with random actions, reset when an episode ends."""
    for i, env in enumerate(envs):
        env.reset(seed=i)
        for a in env.possible_agents:
            env.action_space(a).seed(i)

    def step():
        for env in envs:
            _, _, term, trunc, _ = env.step({a: env.action_space(a).sample() for a in env.agents})
            if not env.agents or any(term.values()) or any(trunc.values()):
                env.reset()

    return timed(step, steps, len(envs))


RAW = {"smac": raw_smac, "mpe": raw_mpe, "mamujoco": raw_mamujoco}


def scalars(run_dir, tag):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


# The run's peak RSS: a child's rusage also counts the memory image it was forked from (a large parent), so a small
# Python process forks the command and reports the grandchild's ru_maxrss (KiB on Linux) from os.wait4.
PEAK_RSS_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
with open(os.environ["PEAK_RSS_FILE"], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(min(255, abs(os.waitstatus_to_exitcode(status))))
"""


def run_measured(cmd, cwd, env, timeout):
    """Run cmd in cwd; returns (exit status, peak RSS in MB, the end of its output)."""
    peak_file = os.path.join(cwd, "peak_rss_kib")
    with open(os.path.join(cwd, "log.txt"), "w") as log:
        launcher = [sys.executable, "-S", "-c", PEAK_RSS_LAUNCHER, *cmd]
        proc = subprocess.Popen(launcher, cwd=cwd, env={**env, "PEAK_RSS_FILE": peak_file}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            status = proc.wait()
    with open(os.path.join(cwd, "log.txt")) as log:
        tail = log.read()[-1500:]
    peak_mb = int(open(peak_file).read()) / 1024 if os.path.exists(peak_file) else float("nan")
    return status, peak_mb, tail


def train_stats(path, family, sharing, num_envs, num_steps, args):
    """Training SPS, mean rollout and update seconds per iteration, peak RSS (MB); or an error string."""
    with tempfile.TemporaryDirectory() as tmp:
        threads = str(args.torch_threads)
        cmd = [sys.executable, path, *task_flags(family, args), "--sharing", sharing, "--seed", "1", "--num-envs", str(num_envs),
               "--num-steps", str(num_steps), "--total-timesteps", str(args.iterations * num_envs * num_steps),
               "--eval-interval", "0", "--no-progress-bar", "--torch-threads", threads]  # fmt: skip
        cmd += shlex.split(args.extra_args)
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"jax-cache-benchmark-{os.getuid()}"))
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        status, peak_mb, tail = run_measured(cmd, tmp, env, args.timeout)
        run_dirs = glob.glob(os.path.join(tmp, "runs", "*"))
        if status != 0 or not run_dirs:
            last = [x for x in tail.strip().splitlines() if x.strip()][-1:] or ["no output"]
            return f"run failed (exit {status}): {last[0][:200]}"
        rollout = scalars(run_dirs[0], "charts/rollout_time")[args.skip :]
        update = scalars(run_dirs[0], "charts/update_time")[args.skip :]
        if not rollout or len(rollout) != len(update):
            return f"no charts/rollout_time and charts/update_time after {args.skip} iterations in its log"
        sps = num_envs * num_steps * len(rollout) / (sum(rollout) + sum(update))
        return sps, float(np.mean(rollout)), float(np.mean(update)), peak_mb


@contextlib.contextmanager
def working_directory(path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def ratio_lines(rows):
    """Time per step and peak memory relative to MAPPO (same family and sharing) and sharing none vs full."""
    ok = {(r["family"], r["algorithm"], r["sharing"]): r for r in rows if "sps" in r}
    lines = ["| family | sharing | ratio | time per step | peak memory |", "|---|---|---|---|---|"]
    for (fam, alg, sharing), r in ok.items():
        base = ok.get((fam, "mappo", sharing))
        if base is not None and alg != "mappo":
            time_ratio, memory_ratio = base["sps"] / r["sps"], r["peak"] / base["peak"]
            lines.append(f"| {fam} | {sharing} | {alg.upper()} / MAPPO | {time_ratio:.2f} | {memory_ratio:.2f} |")
    for (fam, alg, sharing), r in ok.items():
        full = ok.get((fam, alg, "full"))
        if full is not None and sharing != "full":
            lines.append(f"| {fam} | {alg} | {sharing} / full | {full['sps'] / r['sps']:.2f} | {r['peak'] / full['peak']:.2f} |")
    return lines if len(lines) > 2 else []


def main(args: Args, cli: Optional[List[str]] = None):
    """`cli`: the command-line arguments, quoted in the table."""
    if args.iterations <= args.skip:
        print(f"error: --iterations ({args.iterations}) must exceed --skip ({args.skip})", file=sys.stderr)
        sys.exit(2)
    load_before, started = os.getloadavg(), datetime.datetime.now()
    rows, notes, raw_cache = [], [], {}
    for script in args.scripts:
        path, family = resolve(script), family_of(script)
        name = os.path.basename(script)
        if path is None:
            notes.append(f"`{name}`: not in this checkout yet, not measured")
            continue
        if family is None:
            notes.append(f"`{name}`: unknown family (expected *_smac.py, *_mamujoco.py or *_mpe.py), not measured")
            continue
        module = load_script(path)
        defaults = module.Args() if hasattr(module, "Args") else None
        num_envs = args.num_envs or getattr(defaults, "num_envs", 0)
        num_steps = args.num_steps or getattr(defaults, "num_steps", 0)
        if not num_envs or not num_steps:
            notes.append(f"`{name}`: its Args has no num_envs / num_steps; give --num-envs and --num-steps")
            continue
        key = (family, tuple(task_flags(family, args)), num_envs)
        if key not in raw_cache:
            try:
                with tempfile.TemporaryDirectory() as tmp, working_directory(tmp):  # MuJoCo writes MUJOCO_LOG.TXT there
                    raw_cache[key] = RAW[family](module, task_flags(family, args), num_envs, args.raw_steps)
            except (Exception, SystemExit) as e:  # a failing wrapper is a note in the table, not the end of it
                raw_cache[key] = (float("nan"), f"raw stepping failed: {e!r}"[:120])
        raw, raw_via = raw_cache[key]
        for sharing in args.sharing:
            row = dict(script=name, family=family, algorithm=algorithm_of(name), sharing=sharing, envs=num_envs, steps=num_steps,
                       task=" ".join(task_flags(family, args)), raw=raw, raw_via=raw_via)  # fmt: skip
            result = train_stats(path, family, sharing, num_envs, num_steps, args)
            if isinstance(result, str):
                notes.append(f"`{name}` sharing {sharing}: {result}")
            else:
                row.update(zip(("sps", "rollout", "update", "peak"), result, strict=True))
            rows.append(row)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    load_after = os.getloadavg()
    lines = ["# Training throughput vs raw environment stepping", "",
             f"{started:%Y-%m-%d %H:%M}, {os.cpu_count()} CPU cores ({cpu_name()}), {args.torch_threads} torch thread(s) per run,"
             f" "
             f"load average {load_before[0]:.1f} before and {load_after[0]:.1f} after (other jobs slow every number down).",
             f"`python benchmark/throughput.py {shlex.join(cli or [])}`: {args.iterations} iterations per run, the first "
             f"{args.skip} left out; raw stepping: {args.raw_steps} batched steps with random valid actions.", "",
             "| script | task | sharing | envs x steps | training SPS | raw env SPS | training / raw | rollout s/iter | "
             "update s/iter | update share | peak RSS MB | raw stepping via |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        head = f"| {r['script']} | `{r['task']}` | {r['sharing']} | {r['envs']} x {r['steps']} |"
        if "sps" not in r:
            lines.append(head + f" failed | {r['raw']:.0f} | | | | | | {r['raw_via']} |")
            continue
        share = r["update"] / (r["rollout"] + r["update"])
        cells = [f"{r['sps']:.0f}", f"{r['raw']:.0f}", f"{r['sps'] / r['raw']:.1%}", f"{r['rollout']:.3f}", f"{r['update']:.3f}",
                 f"{share:.0%}", f"{r['peak']:.0f}", r["raw_via"]]  # fmt: skip
        lines.append(head + " " + " | ".join(cells) + " |")
    ratios = ratio_lines(rows)
    if ratios:
        lines += ["", "Ratios (time per environment step = 1 / training SPS; above 1: slower or larger):", ""] + ratios
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Args), sys.argv[1:])
