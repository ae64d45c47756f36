"""One command for a machine with an NVIDIA GPU: install the packages it lacks from wheels brought along, run the
device tests, measure the SMAC scripts on the GPU, and write the results as Markdown (default benchmark/results/gpu.md).

Parts, in this order, each with a share of --budget-s (what a part leaves unused goes to the later ones; a run that
outlasts its share is stopped and reported so):
  packages      the modules the scripts and tests import that this Python lacks are installed from --wheels (.whl/,
                written by benchmark/fetch_wheels.sh) into --site with pip --no-index --no-deps, on PYTHONPATH for
                everything that follows
  device tests  tests/test_device.py: every script trains on CUDA, resumes on CUDA exactly
  throughput    training SPS and the rollout/update split (benchmark/throughput.py's measurement) of fp3o_smac.py and
                mappo_smac.py on SMAX 2s3z at 128, 1,024 and 4,096 environments: jax on the GPU, then jax on the CPU
                (JAX_PLATFORMS=cpu) beside torch on the GPU
  side by side  4, 8 and 16 runs of fp3o_smac.py at once on the one GPU: the environment steps all of them make per
                second while all of them train (their charts/SPS events' steps and wall-clock times)
  time to win   fp3o_smac.py and mappo_smac.py side by side at the paper's settings for 2s3z (sharing full, 128
                environments x 25 steps), evaluated every 10 iterations: wall-clock seconds from the start to the
                first evaluation win rate >= --win-rate (0.95)

Usage: python benchmark/device_check.py                      (8 minutes on a GPU machine)
       python benchmark/device_check.py --tiny --out /tmp/gpu.md   (8 environments, 3 iterations, 2 runs side by
                                                                    side: a check of this tool on any machine)
Only the standard library is imported before the packages part; a bare machine needs python3 with torch, jax (with
CUDA for SMAX on the GPU), numpy, tensorboard and pytest, and the wheels of the rest.
"""
import argparse
import datetime
import glob
import importlib.util
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ["tyro", "jaxmarl", "gymnasium", "gymnasium_robotics", "pettingzoo", "mpe2", "mujoco"]
SHARES = {"tests": 0.25, "throughput": 0.35, "side": 0.2, "win": 0.2}  # of the time left when each part starts
FULL = dict(envs=[128, 1024, 4096], num_steps=25, iterations=5, skip=2, side_by_side=[4, 8, 16], budget_s=450.0)
TINY = dict(envs=[8], num_steps=8, iterations=3, skip=1, side_by_side=[2], budget_s=240.0)
SIDE_ENVS = 128  # environments per run in the side-by-side part (the scripts' default)


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmark", "results", "gpu.md"), help="the Markdown file to write")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: " + ", ".join(f"{k} {v}" for k, v in TINY.items()))
    p.add_argument("--budget-s", type=float, help=f"seconds for all parts together (default {FULL['budget_s']:.0f})")
    p.add_argument("--wheels", default=os.path.join(ROOT, ".whl"), help="folder of the wheels to install from")
    p.add_argument("--site", default=os.path.join(tempfile.gettempdir(), "device_check_site"), help="where they go")
    p.add_argument("--modules", nargs="*", default=MODULES, help="modules that must import (else: install the wheels)")
    p.add_argument("--tests", default="tests/test_device.py", help="the device tests ('' to leave them out)")
    p.add_argument("--scripts", nargs="+", default=["fp3o_smac.py", "mappo_smac.py"], help="SMAC scripts to measure")
    p.add_argument("--envs", type=int, nargs="+", help=f"environment counts of the throughput part ({FULL['envs']})")
    p.add_argument("--num-steps", type=int, help=f"steps per environment per iteration ({FULL['num_steps']})")
    p.add_argument("--iterations", type=int, help=f"iterations per throughput run ({FULL['iterations']})")
    p.add_argument("--skip", type=int, help=f"first iterations left out of the averages ({FULL['skip']})")
    p.add_argument("--side-by-side", type=int, nargs="*", help=f"run counts of the side-by-side part ({FULL['side_by_side']})")
    p.add_argument("--win-rate", type=float, default=0.95, help="the evaluation win rate to reach")
    args = p.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.iterations <= args.skip or args.skip < 0:
        fail(f"--iterations ({args.iterations}) must exceed --skip ({args.skip}) >= 0")
    if args.budget_s <= 0 or args.num_steps <= 0 or min(args.envs) <= 0 or min(args.side_by_side or [1]) <= 0:
        fail("--budget-s, --num-steps, --envs and --side-by-side must be positive")
    scripts = []
    for script in args.scripts:
        path = next((c for c in (os.path.join(ROOT, script), os.path.abspath(script)) if os.path.isfile(c)), None)
        if path is None:
            fail(f"script '{script}' not found (looked in {ROOT} and {os.getcwd()})")
        scripts.append(path)
    args.scripts = scripts
    return args


class Clock:
    """The overall deadline and each part's share of the time left."""

    def __init__(self, budget_s: float):
        self.start, self.end = time.time(), time.time() + budget_s
        self.left_shares = dict(SHARES)

    def part(self, name: str) -> float:
        """Seconds for part `name`: its share of the time left, among the parts not run yet."""
        share = self.left_shares.pop(name) / (sum(self.left_shares.values()) + SHARES[name])
        return max(0.0, (self.end - time.time()) * share)


def child_env(args, **extra) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if os.path.isdir(args.site):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.site, env.get("PYTHONPATH")) if p)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"jax-cache-benchmark-{os.getuid()}"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.update(extra)
    return env


def python_says(code: str, env: dict, timeout: float = 300) -> str:
    """What a fresh interpreter prints for `code` (its error's last line if it fails)."""
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"no answer in {timeout:.0f} s"
    lines = (proc.stdout if proc.returncode == 0 else proc.stderr).strip().splitlines()
    return lines[-1] if lines else f"exit {proc.returncode}"


PROBE = """import importlib.metadata as m, platform
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
try:
    import jax
    jx = f"jax {jax.__version__} on {jax.default_backend()} ({', '.join(str(d) for d in jax.devices())})"
except Exception as e:
    jx = f"jax: {type(e).__name__}: {e}"
print(f"Python {platform.python_version()}; torch {torch.__version__} (CUDA {torch.version.cuda}): {gpu}; {jx}")
"""
MISSING = "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))"


def missing_modules(args) -> list:
    try:
        proc = subprocess.run([sys.executable, "-c", MISSING, *args.modules], env=child_env(args), capture_output=True,
                              text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return list(args.modules)
    return proc.stdout.split() if proc.returncode == 0 else list(args.modules)


def install(args) -> list:
    """Markdown lines: what was missing, what was installed from the wheels, what is still missing."""
    missing = missing_modules(args)
    if not missing:
        return [f"Every module needed imports already ({', '.join(args.modules)})."]
    lines = [f"Missing: {', '.join(missing)}."]
    wheels = sorted(glob.glob(os.path.join(args.wheels, "*.whl")))
    if not wheels:
        return lines + [f"No wheels in `{args.wheels}` (benchmark/fetch_wheels.sh downloads them): nothing installed."]
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", args.site, *wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return lines + [f"pip failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"]
    names = ", ".join(os.path.basename(w).split("-")[0] + "-" + os.path.basename(w).split("-")[1] for w in wheels)
    lines.append(f"Installed from `{args.wheels}` into `{args.site}` (on PYTHONPATH from here on): {names}.")
    still = missing_modules(args)
    return lines + ([f"Still missing: {', '.join(still)}."] if still else [])


def device_tests(args, seconds: float) -> list:
    if not args.tests:
        return ["Left out (--tests '')."]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-o", "addopts=", args.tests]  # no xdist
    env = child_env(args, TEST_SCRIPT_JOBS=str(min(6, os.cpu_count() or 1)), TEST_SCRIPT_TIMEOUT=str(int(max(seconds, 1))))
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(seconds, 1))
        out, status = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, status = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    # pytest's result line ("1 passed, 1 skipped in 2s"), not a warning printed after it (stderr comes last)
    results = [x for x in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)\b|no tests ran", x)]
    summary = (results or [x for x in out.strip().splitlines() if x.strip()])[-1:] or ["no output"]
    lines = [f"`python -m pytest -q {args.tests}` ({time.time() - start:.0f} s of {seconds:.0f}): "
             f"{'stopped at its time limit' if status == 'timeout' else summary[0].strip('= ')}"]
    details = [x for x in out.splitlines() if x.startswith(("FAILED", "ERROR", "SKIPPED"))]
    if status != 0 or details:
        lines += ["", "```", *(details or out.strip().splitlines()[-30:])[:40], "```"]
    return lines


def throughput_part(args, throughput, seconds: float, jax_backend: str, torch_device: str, rows: dict) -> list:
    """Training SPS and rollout/update split per script, environment count and jax platform."""
    platforms = [("default", {})] + ([] if jax_backend == "cpu" else [("cpu", {"JAX_PLATFORMS": "cpu"})])
    runs = [(p, e, s) for p in platforms for e in args.envs for s in args.scripts]
    deadline = time.time() + seconds
    lines = [f"SMAX 2s3z, sharing full, {args.num_steps} steps per environment per iteration, {args.iterations} iterations, "
             f"the first {args.skip} left out; torch on {torch_device}.",
             "", "| script | jax on | envs | training SPS | rollout s/iter | update s/iter | update share | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for i, ((platform_name, extra), envs, script) in enumerate(runs):
        name = os.path.basename(script)
        where = jax_backend if platform_name == "default" else "cpu"
        left = deadline - time.time()
        if left < 5:
            lines.append(f"| {name} | {where} | {envs} | not run: the part's {seconds:.0f} s were spent | | | | |")
            continue
        targs = throughput.Args(scripts=[script], sharing=["full"], smac_task="--map 2s3z", iterations=args.iterations,
                                skip=args.skip, torch_threads=1, timeout=left / (len(runs) - i) * 1.5)
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(child_env(args, **extra))
        try:
            result = throughput.train_stats(script, "smac", "full", envs, args.num_steps, targs)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        if isinstance(result, str):
            lines.append(f"| {name} | {where} | {envs} | {result[:150]} | | | | |")
            continue
        sps, rollout, update, peak = result
        rows[name, where, envs] = sps
        lines.append(f"| {name} | {where} | {envs} | {sps:.0f} | {rollout:.3f} | {update:.3f} | "
                     f"{update / (rollout + update):.0%} | {peak:.0f} |")
    return lines


def start_run(args, script, flags, folder):
    os.makedirs(folder, exist_ok=True)
    log = open(os.path.join(folder, "log.txt"), "w")
    cmd = [sys.executable, script, *map(str, flags)]
    proc = subprocess.Popen(cmd, cwd=folder, env=child_env(args), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    proc.log, proc.folder, proc.started = log, folder, time.time()
    return proc


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    proc.log.close()


def events(folder, tag) -> list:
    """[(wall time, step, value)] of a scalar in the run folder under `folder`/runs (empty if none yet)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dirs = sorted(glob.glob(os.path.join(folder, "runs", "*")))
    if not dirs:
        return []
    acc = EventAccumulator(dirs[0], size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.wall_time, e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def last_words(proc) -> str:
    with open(os.path.join(proc.folder, "log.txt")) as f:
        words = [x for x in f.read().strip().splitlines() if x.strip()][-1:] or ["no output"]
    return words[0][:150]


def step_at(series, t):
    """The step a run had reached at wall time t, linear between its events."""
    for (t0, s0), (t1, s1) in zip(series, series[1:], strict=False):
        if t0 <= t <= t1:
            return s0 + (s1 - s0) * (t - t0) / (t1 - t0) if t1 > t0 else s1
    return series[-1][1] if t > series[-1][0] else series[0][1]


def aggregate_sps(series: list, skip: int):
    """(all runs' environment steps per second, seconds) over the window in which every run had finished its first
    `skip` iterations and none had stopped; None if there is no such window."""
    usable = [s[skip:] for s in series]
    if not usable or any(len(s) < 2 for s in usable):
        return None
    start, end = max(s[0][0] for s in usable), min(s[-1][0] for s in usable)
    if end <= start:
        return None
    return sum(step_at(s, end) - step_at(s, start) for s in usable) / (end - start), end - start


def side_by_side(args, seconds: float, work: str, one_run: float) -> list:
    script = args.scripts[0]
    name, counts = os.path.basename(script), list(args.side_by_side)
    flags = ["--map", "2s3z", "--sharing", "full", "--num-envs", SIDE_ENVS if not args.tiny else args.envs[0],
             "--num-steps", args.num_steps, "--eval-interval", 0, "--total-timesteps", 10**10, "--no-progress-bar",
             "--torch-threads", 1]
    lines = [f"{name}, SMAX 2s3z, {flags[7]} environments x {args.num_steps} steps each, evaluation off; all runs start "
             "at once and are stopped after their share of the time; SPS over the window in which all of them train "
             f"(each past its first {args.skip} iterations).", "",
             "| runs | aggregate SPS | per run | vs one run alone | window s |", "|---|---|---|---|---|"]
    deadline = time.time() + seconds
    for i, count in enumerate(counts):
        budget = (deadline - time.time()) / (len(counts) - i)
        if budget < 10:
            lines.append(f"| {count} | not run: the part's {seconds:.0f} s were spent | | | |")
            continue
        folders = [os.path.join(work, f"side{count}_{k}") for k in range(count)]
        procs = [start_run(args, script, flags + ["--seed", k + 1], folder) for k, folder in enumerate(folders)]
        end = time.time() + budget
        while time.time() < end and any(p.poll() is None for p in procs):
            time.sleep(1)
        for p in procs:
            stop(p)
        series = [[(t, s) for t, s, _ in events(p.folder, "charts/SPS")] for p in procs]
        result = aggregate_sps(series, args.skip)
        if result is None:
            got = sum(len(s) > args.skip + 1 for s in series)
            why = next((last_words(p) for p in procs if p.returncode not in (None, 0, -signal.SIGTERM)), "")
            lines.append(f"| {count} | {got} of {count} runs got past {args.skip} iterations in {budget:.0f} s {why} | | | |")
            continue
        sps, window = result
        ratio = f"{sps / one_run:.2f}x" if one_run else "?"
        lines.append(f"| {count} | {sps:.0f} | {sps / count:.0f} | {ratio} | {window:.1f} |")
    return lines


def time_to_win(args, seconds: float, work: str) -> list:
    flags = ["--map", "2s3z", "--sharing", "full", "--seed", 1, "--no-progress-bar", "--torch-threads", 1]
    if args.tiny:
        flags += ["--num-envs", args.envs[0], "--num-steps", args.num_steps, "--eval-interval", 1, "--eval-episodes", 4]
    else:
        flags += ["--eval-interval", 10]
    names = " and ".join(os.path.basename(s) for s in args.scripts)
    lines = [f"{names} side by side, SMAX 2s3z, `{shlex.join(map(str, flags))}` (the paper's settings for the map "
             f"otherwise); seconds from the start (interpreter, compilation and "
             f"evaluations included) to the first evaluation win rate >= {args.win_rate}.", "",
             "| script | reached at step | wall-clock s | win rate (step): the first that reached it, else the best |",
             "|---|---|---|---|"]
    procs = {s: start_run(args, s, flags, os.path.join(work, "win_" + os.path.basename(s)[:-3])) for s in args.scripts}
    reached, end = {}, time.time() + seconds
    while time.time() < end and len(reached) < len(procs):
        time.sleep(2)
        for script, proc in procs.items():
            hit = [e for e in events(proc.folder, "eval/win_rate") if e[2] >= args.win_rate - 1e-6]  # logged as float32
            if script not in reached and hit:
                reached[script] = hit[0]
                stop(proc)
            elif proc.poll() is not None and script not in reached:
                reached[script] = None
    for script, proc in procs.items():
        stop(proc)
        evals = events(proc.folder, "eval/win_rate")
        best = reached.get(script) or max(evals, key=lambda e: e[2], default=None)
        best_text = f"{best[2]:.3f} ({best[1]})" if best else "no evaluation logged"
        if reached.get(script):
            wall, step, _ = reached[script]
            lines.append(f"| {os.path.basename(script)} | {step} | {wall - proc.started:.1f} | {best_text} |")
        else:
            why = f"ended (exit {proc.returncode}): {last_words(proc)}" if script in reached else f"not within {seconds:.0f} s"
            lines.append(f"| {os.path.basename(script)} | {why} | | {best_text} |")
    return lines


def cpu_text() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} logical CPUs"


def gpu_text() -> str:
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        proc = subprocess.run(query, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "no nvidia-smi"
    return "; ".join(proc.stdout.strip().splitlines()) if proc.returncode == 0 else "nvidia-smi failed"


def main(argv=None):
    args = parse(argv)
    clock, started = Clock(args.budget_s), datetime.datetime.now()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sections = [("Packages", install(args))]
    if os.path.isdir(args.site) and args.site not in sys.path:
        sys.path.insert(0, args.site)  # throughput.py needs tyro
    spec = importlib.util.spec_from_file_location("benchmark_throughput", os.path.join(ROOT, "benchmark", "throughput.py"))
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    machine = python_says(PROBE, child_env(args))
    jax_backend = python_says("import jax; print(jax.default_backend())", child_env(args))
    torch_device = python_says("import torch; print('cuda' if torch.cuda.is_available() else 'cpu')", child_env(args))
    print(f"{machine}\n{gpu_text()}", flush=True)
    sections.append(("Device tests", device_tests(args, clock.part("tests"))))
    print("\n".join(sections[-1][1]), flush=True)
    rows = {}
    part = throughput_part(args, throughput, clock.part("throughput"), jax_backend, torch_device, rows)
    sections.append(("Training throughput", part))
    print("\n".join(sections[-1][1]), flush=True)
    one_run = rows.get((os.path.basename(args.scripts[0]), jax_backend, SIDE_ENVS if not args.tiny else args.envs[0]), 0.0)
    with tempfile.TemporaryDirectory(prefix="device_check_") as work:
        sections.append(("Runs side by side on one GPU", side_by_side(args, clock.part("side"), work, one_run)))
        print("\n".join(sections[-1][1]), flush=True)
        sections.append((f"Time to a {args.win_rate} evaluation win rate", time_to_win(args, clock.part("win"), work)))
        print("\n".join(sections[-1][1]), flush=True)
    took = time.time() - clock.start
    head = [f"# Device check{' (tiny sizes)' if args.tiny else ''}: {gpu_text()}", "",
            f"`python benchmark/device_check.py {shlex.join(sys.argv[1:] if argv is None else argv)}` on "
            f"{platform.node()}, {started:%Y-%m-%d %H:%M}, {took:.0f} s (budget {args.budget_s:.0f} s).", "",
            f"- Machine: {cpu_text()}; {gpu_text()}", f"- {machine}",
            f"- jax's default backend: {jax_backend}; XLA_PYTHON_CLIENT_PREALLOCATE "
            f"{os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE', 'unset (the scripts set it themselves)')}"]
    body = [line for title, lines in sections for line in ("", f"## {title}", "", *lines)]
    with open(args.out, "w") as f:
        f.write("\n".join(head + body) + "\n")
    print(f"wrote {args.out} ({took:.0f} s)")


if __name__ == "__main__":
    main()
